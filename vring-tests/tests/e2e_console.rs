// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End-to-end tests of the `vhost-user-console` daemon with a real Linux
//! `virtio_console` driver: user-mode Linux (`virtio_uml.device=SOCK:3`; QEMU 10.0 has
//! no user-creatable generic vhost-user device) boots the busybox initramfs; the host
//! side of each port is a unix socket the test connects to.
//!
//! - one console port (`/dev/hvc0`, raw mode): 256 KiB of every byte value each way,
//!   checked byte for byte and in order;
//!   then a resize request on the socket reaches the guest (`stty size` on `/dev/hvc0`,
//!   through the config space and a config-change message);
//! - two ports (VIRTIO_CONSOLE_F_MULTIPORT): the guest finds the named port under
//!   `/sys/class/virtio-ports/*/name`, and 256 KiB go through it each way; the guest
//!   opening and closing it is logged by the daemon (checked in its log);
//! - two ports, the console port's size: the initial `--cols/--rows` and a resize
//!   request on its socket reach `stty size` on `/dev/hvc0` (RESIZE control messages);
//!
//! - two VMs at once on one daemon (`--count 2`): each writes its own pattern to its
//!   `/dev/hvc0`, and the host reads each from its own socket, byte for byte; then one
//!   SIGTERM stops the daemon cleanly;
//!
//! UML negotiates the packed ring when it is offered; the single-port case runs twice,
//! on the packed ring and on the split ring (`--no-packed`), and the guest checks the
//! negotiated VIRTIO_F_RING_PACKED in `/sys/bus/virtio/devices/*/features`. Needs the daemon built
//! (`cargo build --release -p vhost-user-console`, or `$E2E_VHOST_USER_CONSOLE`) and
//! what `vring-tests/scripts/install-test-deps.sh` installs.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vring_tests::e2e::{
    repo_root, uml_kernel, BackgroundProcess, Initramfs, TempDir, UmlVm, SCRIPT_PRELUDE,
};

/// Bytes sent each way: every byte value, repeated.
const LEN: usize = 256 * 1024;
const VM_TIMEOUT: Duration = Duration::from_secs(90);

fn pattern() -> Vec<u8> {
    (0..LEN).map(|i| i.to_le_bytes()[0]).collect()
}

fn console_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("E2E_VHOST_USER_CONSOLE") {
        return PathBuf::from(p);
    }
    let p = repo_root().join("target/release/vhost-user-console");
    assert!(
        p.is_file(),
        "{} is not built: cargo build --release -p vhost-user-console",
        p.display()
    );
    p
}

fn spawn_daemon(sock: &Path, ports: &[String]) -> BackgroundProcess {
    spawn_daemon_with(sock, ports, &[], &[sock.to_path_buf()])
}

/// Starts the daemon on `sock` (a pattern with `--count`) with `ports` and `extra`
/// options, and waits for every socket in `wait_for`.
fn spawn_daemon_with(
    sock: &Path,
    ports: &[String],
    extra: &[&str],
    wait_for: &[PathBuf],
) -> BackgroundProcess {
    let mut cmd = Command::new(console_binary());
    // A size offers VIRTIO_CONSOLE_F_SIZE (a socket has none of its own).
    cmd.arg("--socket-path")
        .arg(sock)
        .args(["--cols", "80", "--rows", "24"])
        .args(extra);
    for p in ports {
        cmd.arg("--port").arg(p);
    }
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    let mut d =
        BackgroundProcess::spawn("vhost-user-console", cmd).unwrap_or_else(|e| panic!("{e}"));
    for s in wait_for {
        d.wait_for_socket(s, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    d
}

/// `pattern()` rotated left by `by` bytes.
fn rotated_pattern(by: usize) -> Vec<u8> {
    let p = pattern();
    [&p[by..], &p[..by]].concat()
}

/// Connects to a port's socket once the daemon created it.
fn connect(path: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("connecting to {}: {e}", path.display()),
        }
    }
}

/// Reads exactly `n` bytes (bounded by the VM timeout).
fn read_exact_timeout(s: &mut UnixStream, n: usize) -> Result<Vec<u8>, String> {
    s.set_read_timeout(Some(VM_TIMEOUT)).unwrap();
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(format!("the port closed after {got} of {n} bytes")),
            Ok(k) => got += k,
            Err(e) => return Err(format!("after {got} of {n} bytes: {e}")),
        }
    }
    Ok(buf)
}

/// Guest commands making /tmp/pat: every byte value, repeated to LEN bytes.
fn guest_pattern() -> String {
    format!(
        r#"i=0; : > /tmp/all
while [ $i -lt 256 ]; do printf "\\$(printf %o $i)" >> /tmp/all; i=$((i+1)); done
[ "$(wc -c < /tmp/all)" -eq 256 ] || fail "byte table is $(wc -c < /tmp/all) bytes"
cp /tmp/all /tmp/pat
while [ "$(wc -c < /tmp/pat)" -lt {LEN} ]; do cat /tmp/pat /tmp/pat > /tmp/pat2; mv /tmp/pat2 /tmp/pat; done
[ "$(wc -c < /tmp/pat)" -eq {LEN} ] || fail "pattern is $(wc -c < /tmp/pat) bytes"
"#
    )
}

struct Case {
    _tmp: TempDir,
    daemon: BackgroundProcess,
    sock: PathBuf,
}

impl Case {
    fn fail(&self, what: &str, guest: &str) -> ! {
        panic!(
            "{what}\n----- guest log -----\n{guest}\n----- vhost-user-console log -----\n{}\n----- end -----",
            self.daemon.log()
        )
    }
}

/// Runs UML with `script`, while `host` talks to the ports; both must succeed.
fn run_case(
    case: &Case,
    script: &str,
    host: impl FnOnce(&vring_tests::e2e::RunningVm) -> Result<(), String> + Send,
) {
    let kernel = uml_kernel().unwrap_or_else(|e| panic!("{e}"));
    let initrd = Initramfs::new(&kernel)
        .modules(&["virtio_console"])
        .script(format!("{SCRIPT_PRELUDE}set -e\n{script}step done\n"))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let vm = UmlVm::new(&kernel, &initrd)
        .virtio_console(&case.sock)
        .timeout(VM_TIMEOUT)
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let host_result = host(&vm);
    let out = match vm.wait() {
        Ok(out) => out,
        Err(e) => case.fail(&format!("UML run failed: {e}"), e.log().unwrap_or("")),
    };
    if let Err(e) = host_result {
        case.fail(&format!("host side: {e}"), &out.log);
    }
    if !out.success() {
        case.fail(
            &format!("guest script failed (E2E-EXIT={})", out.exit_code),
            &out.log,
        );
    }
}

#[test]
fn console_port_carries_every_byte_value_both_ways_and_resizes_packed() {
    console_case(true);
}

#[test]
fn console_port_carries_every_byte_value_both_ways_and_resizes_split() {
    console_case(false);
}

/// The single-port case, on the packed ring (offered, UML takes it) or the split ring
/// (`--no-packed`); the guest checks the negotiated bit 34 (VIRTIO_F_RING_PACKED).
fn console_case(packed: bool) {
    let tmp = TempDir::new(if packed { "ucon1p" } else { "ucon1s" }).unwrap();
    let sock = tmp.path().join("vcon.sock");
    let port = tmp.path().join("con0");
    let extra: &[&str] = if packed { &[] } else { &["--no-packed"] };
    let daemon = spawn_daemon_with(
        &sock,
        &[format!("socket={}", port.display())],
        extra,
        std::slice::from_ref(&sock),
    );
    let mut client = connect(&port);
    let case = Case {
        _tmp: tmp,
        daemon,
        sock,
    };
    let script = format!(
        r#"{pat}
test -c /dev/hvc0 || fail "no /dev/hvc0"
f=$(cat /sys/bus/virtio/devices/*/features)
[ "$(echo "$f" | cut -c 35)" = {packed_bit} ] || fail "features $f: RING_PACKED (bit 34) is not {packed_bit}"
step "features $f"
exec 3<>/dev/hvc0
stty raw -echo <&3
step "guest -> host"
cat /tmp/pat >&3
echo E2E-H2G-READY
step "host -> guest"
head -c {LEN} <&3 > /tmp/back
cmp /tmp/pat /tmp/back || fail "the bytes the host sent arrived changed"
step "resize"
echo E2E-RESIZE-READY
i=0
while [ "$(stty size <&3 2>&1)" != "33 101" ]; do
    i=$((i+1)); [ $i -lt 100 ] || fail "the console size is $(stty size <&3 2>&1), not 33 101"
    usleep 50000
done
step "size $(stty size <&3)"
"#,
        pat = guest_pattern(),
        packed_bit = u8::from(packed),
    );
    run_case(&case, &script, |vm| {
        let got = read_exact_timeout(&mut client, LEN)?;
        if got != pattern() {
            let at = got
                .iter()
                .zip(pattern())
                .position(|(a, b)| *a != b)
                .unwrap_or(0);
            return Err(format!(
                "guest output differs from the pattern at byte {at}"
            ));
        }
        vm.wait_for_output("E2E-H2G-READY", VM_TIMEOUT)
            .map_err(|e| e.to_string())?;
        client
            .write_all(&pattern())
            .map_err(|e| format!("writing to the console: {e}"))?;
        vm.wait_for_output("E2E-RESIZE-READY", VM_TIMEOUT)
            .map_err(|e| e.to_string())?;
        client
            .write_all(b"\x1b]vhost-resize;101;33\x07")
            .map_err(|e| format!("sending the resize: {e}"))
    });
}

#[test]
fn named_port_carries_every_byte_value_both_ways() {
    let tmp = TempDir::new("ucon2").unwrap();
    let sock = tmp.path().join("vcon.sock");
    let con = tmp.path().join("con0");
    let data = tmp.path().join("port1");
    let daemon = spawn_daemon(
        &sock,
        &[
            format!("name=console,socket={},console", con.display()),
            format!("name=org.vhost.test,socket={}", data.display()),
        ],
    );
    let con_client = connect(&con);
    let mut data_client = connect(&data);
    let case = Case {
        _tmp: tmp,
        daemon,
        sock,
    };
    let script = format!(
        r#"{pat}
dev=""
i=0
while [ -z "$dev" ]; do
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat $p/name 2>/dev/null)" = org.vhost.test ] && dev=/dev/$(basename $p)
    done
    i=$((i+1)); [ $i -lt 100 ] || fail "no virtio port named org.vhost.test: $(ls /sys/class/virtio-ports/)"
    [ -n "$dev" ] || usleep 50000
done
step "named port $dev"
test -c "$dev" || fail "$dev is not a character device"
exec 4<>"$dev"
cat /tmp/pat >&4
echo E2E-H2G-READY
head -c {LEN} <&4 > /tmp/back
cmp /tmp/pat /tmp/back || fail "the bytes the host sent through the named port arrived changed"
exec 4>&-
step "named port closed"
echo E2E-CLOSED
"#,
        pat = guest_pattern()
    );
    run_case(&case, &script, |vm| {
        let got = read_exact_timeout(&mut data_client, LEN)?;
        if got != pattern() {
            return Err("the named port's output differs from the pattern".into());
        }
        vm.wait_for_output("E2E-H2G-READY", VM_TIMEOUT)
            .map_err(|e| e.to_string())?;
        data_client
            .write_all(&pattern())
            .map_err(|e| format!("writing to the named port: {e}"))?;
        vm.wait_for_output("E2E-CLOSED", VM_TIMEOUT)
            .map_err(|e| e.to_string())?;
        // The daemon logs the guest's PORT_OPEN 1 and 0 for the named port, in order.
        let opened = "console port 1 (org.vhost.test): opened by the guest";
        let closed = "console port 1 (org.vhost.test): closed by the guest";
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = case.daemon.log();
            if let (Some(o), Some(c)) = (log.find(opened), log.find(closed)) {
                return if o < c {
                    Ok(())
                } else {
                    Err("the daemon logged the close before the open".into())
                };
            }
            if Instant::now() >= deadline {
                return Err(format!("the daemon did not log `{opened}` and `{closed}`"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    drop(con_client);
}

#[test]
fn one_daemon_serves_two_vms_at_once() {
    const VMS: usize = 2;
    let tmp = TempDir::new("ucon3").unwrap();
    let sock_pattern = tmp.path().join("vcon%d.sock");
    let port_pattern = tmp.path().join("con%d");
    let socks: Vec<PathBuf> = (0..VMS)
        .map(|i| tmp.path().join(format!("vcon{i}.sock")))
        .collect();
    let ports: Vec<PathBuf> = (0..VMS)
        .map(|i| tmp.path().join(format!("con{i}")))
        .collect();
    let mut daemon = spawn_daemon_with(
        &sock_pattern,
        &[format!("socket={}", port_pattern.display())],
        &["--count", "2"],
        &socks,
    );
    let kernel = uml_kernel().unwrap_or_else(|e| panic!("{e}"));
    // VM i writes the pattern rotated by 37 * i bytes: each its own bytes.
    let rotation = |i: usize| 37 * i;
    let mut vms = Vec::new();
    let mut readers = Vec::new();
    for i in 0..VMS {
        let by = rotation(i);
        let script = format!(
            r#"{pat}
test -c /dev/hvc0 || fail "no /dev/hvc0"
exec 3<>/dev/hvc0
stty raw -echo <&3
step "vm {i}: guest -> host"
{{ tail -c +{from} /tmp/pat; head -c {by} /tmp/pat; }} >&3
"#,
            pat = guest_pattern(),
            from = by + 1,
        );
        let initrd = Initramfs::new(&kernel)
            .modules(&["virtio_console"])
            .script(format!("{SCRIPT_PRELUDE}set -e\n{script}step done\n"))
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let mut client = connect(&ports[i]);
        readers.push(std::thread::spawn(move || {
            read_exact_timeout(&mut client, LEN).and_then(|got| {
                if got == rotated_pattern(by) {
                    Ok(())
                } else {
                    let at = got
                        .iter()
                        .zip(rotated_pattern(by))
                        .position(|(a, b)| *a != b)
                        .unwrap_or(0);
                    Err(format!(
                        "vm {i}: its output differs from its pattern at byte {at}"
                    ))
                }
            })
        }));
        let vm = UmlVm::new(&kernel, &initrd)
            .virtio_console(&socks[i])
            .timeout(VM_TIMEOUT)
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        vms.push((vm, initrd));
    }
    let mut failures = Vec::new();
    for (i, r) in readers.into_iter().enumerate() {
        match r.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("vm {i} host side: {e}")),
            Err(_) => failures.push(format!("vm {i}: the reader panicked")),
        }
    }
    let mut logs = String::new();
    for (i, (vm, _initrd)) in vms.into_iter().enumerate() {
        match vm.wait() {
            Ok(out) => {
                if !out.success() {
                    failures.push(format!("vm {i}: E2E-EXIT={}", out.exit_code));
                }
                logs += &format!("----- guest {i} -----\n{}\n", out.log);
            }
            Err(e) => {
                failures.push(format!("vm {i}: UML run failed: {e}"));
                logs += &format!("----- guest {i} -----\n{}\n", e.log().unwrap_or(""));
            }
        }
    }
    let still_running = daemon.try_wait().map(|s| s.is_none()).unwrap_or(false);
    if !still_running {
        failures.push("the daemon exited before SIGTERM".into());
    }
    // One SIGTERM stops every server: a clean exit within `stop`'s 5 s, not its SIGKILL.
    let (status, log) = match daemon.stop() {
        Ok(r) => r,
        Err(e) => panic!("stopping the daemon: {e}\n{logs}"),
    };
    if !status.success() {
        failures.push(format!("after SIGTERM the daemon ended with {status}"));
    }
    assert!(
        failures.is_empty(),
        "{}\n{logs}----- vhost-user-console log -----\n{log}\n----- end -----",
        failures.join("\n"),
    );
}

/// With multiport the console port's size comes in RESIZE control messages (cols, then
/// rows): the `--cols/--rows` size sent after PORT_READY (CONSOLE_PORT, PORT_NAME,
/// RESIZE, PORT_OPEN), then a socket client's resize request.
#[test]
fn multiport_console_port_resizes() {
    let tmp = TempDir::new("ucon4").unwrap();
    let sock = tmp.path().join("vcon.sock");
    let con = tmp.path().join("con0");
    let data = tmp.path().join("port1");
    let daemon = spawn_daemon(
        &sock,
        &[
            format!("name=console,socket={},console", con.display()),
            format!("name=org.vhost.test,socket={}", data.display()),
        ],
    );
    let mut con_client = connect(&con);
    let data_client = connect(&data);
    let case = Case {
        _tmp: tmp,
        daemon,
        sock,
    };
    let script = r#"
test -c /dev/hvc0 || fail "no /dev/hvc0"
exec 3<>/dev/hvc0
stty raw -echo <&3
i=0
while [ "$(stty size <&3 2>&1)" != "24 80" ]; do
    i=$((i+1)); [ $i -lt 100 ] || fail "the initial console size is $(stty size <&3 2>&1), not 24 80"
    usleep 50000
done
step "initial size $(stty size <&3)"
echo E2E-RESIZE-READY
i=0
while [ "$(stty size <&3 2>&1)" != "33 101" ]; do
    i=$((i+1)); [ $i -lt 100 ] || fail "the console size is $(stty size <&3 2>&1), not 33 101"
    usleep 50000
done
step "size $(stty size <&3)"
"#;
    run_case(&case, script, |vm| {
        vm.wait_for_output("E2E-RESIZE-READY", VM_TIMEOUT)
            .map_err(|e| e.to_string())?;
        con_client
            .write_all(b"\x1b]vhost-resize;101;33\x07")
            .map_err(|e| format!("sending the resize: {e}"))
    });
    drop(data_client);
}
