// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End-to-end tests of the `vhost-user-net` daemon: a real QEMU (TCG) boots a real
//! Debian Linux guest whose `eth0` (virtio-net-pci on `-netdev vhost-user`) is served
//! by the daemon in front of a TAP.
//!
//! Everything on the host side lives in a network namespace the test creates
//! (`ip netns add vhun-<pid>-<case>`, deleted at the end even when the test fails): the
//! daemon runs inside it (`ip netns exec`), its TAP `vhut0` gets 10.77.0.1/24 there,
//! and the test's TCP endpoints run on a thread that joined it (`setns`). QEMU itself
//! stays in the root namespace: it talks to the daemon over the unix socket only. The
//! guest (10.77.0.2/24) pings the TAP's address, uploads 4 MiB with busybox `nc` to a
//! listener of the test and downloads 4 MiB from another; both sides compare SHA-256
//! sums. Busybox's `nc` has no `-q`/`-N`: it half-closes when its input ends, so each
//! transfer ends when the sending side has sent everything.
//!
//! The daemon is not built here: run `cargo build --release -p vhost-user-net` first
//! (`target/debug` is the fallback, `E2E_VHOST_USER_NET=/path` overrides). Needs root
//! (namespaces, TAP), `ip`, QEMU and the guest kernel of
//! `vring-tests/scripts/install-test-deps.sh`. `E2E_VERBOSE=1` shows the guest console.
//!
//! The DPDK cases run `dpdk-testpmd` (virtio_user, `io` forwarding) as the frontend
//! instead of QEMU, and are skipped when it is not installed.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vring_tests::e2e::netns::{self, NetNs};
use vring_tests::e2e::{
    self, repo_root, BackgroundProcess, GuestKernel, Initramfs, QemuVm, TempDir, VmOutput,
};

const MIB: usize = 1 << 20;
/// Bytes moved each way.
const TRANSFER: usize = 4 * MIB;
const HOST_ADDR: &str = "10.77.0.1";
const GUEST_MAC: &str = "52:54:00:77:00:02";
const TAP: &str = "vhut0";
const UPLOAD_PORT: u16 = 5001;
const DOWNLOAD_PORT: u16 = 5002;
/// Limit for one VM run (boot ~4 s under TCG, plus the transfers).
const VM_TIMEOUT: Duration = Duration::from_secs(180);
/// Limit for the host endpoints (accept, and each transfer).
const ENDPOINT_TIMEOUT: Duration = Duration::from_secs(150);
/// Virtio feature bits checked in the guest's `features` string.
const F_MRG_RXBUF: usize = 15;
const F_MQ: usize = 22;
const F_VERSION_1: usize = 32;
const F_RING_PACKED: usize = 34;

fn ok<T>(r: e2e::Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

/// Our daemon: `$E2E_VHOST_USER_NET`, else target/release, else target/debug.
fn daemon_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("E2E_VHOST_USER_NET").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| repo_root().join("target"), PathBuf::from);
    for profile in ["release", "debug"] {
        let p = target.join(profile).join("vhost-user-net");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "the vhost-user-net daemon is not built under {}: run `cargo build --release -p \
         vhost-user-net` (or set E2E_VHOST_USER_NET)",
        target.display()
    );
}

/// SHA-256 of `data` in hex, by the host's `sha256sum`.
fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running sha256sum: {e}"));
    let mut stdin = child
        .stdin
        .take()
        .unwrap_or_else(|| panic!("sha256sum stdin"));
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("sha256sum: {e}"));
    let _ = writer.join();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// A pseudo-random pattern (xorshift), so that a shifted or repeated block shows.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect()
}

/// Accepts one connection before `deadline` (non-blocking accept, polled).
fn accept(listener: &TcpListener, deadline: Instant) -> Result<TcpStream, String> {
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("set_nonblocking: {e}"))?;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)
                    .map_err(|e| format!("set_nonblocking: {e}"))?;
                s.set_read_timeout(Some(ENDPOINT_TIMEOUT))
                    .and_then(|()| s.set_write_timeout(Some(ENDPOINT_TIMEOUT)))
                    .map_err(|e| format!("socket timeouts: {e}"))?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err("no connection from the guest".into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
}

/// What the host endpoints saw.
struct Transfers {
    uploaded: Vec<u8>,
}

/// The test's TCP endpoints inside the namespace: receives the guest's upload, then
/// sends `download` to the guest.
fn spawn_endpoints(ns: &NetNs, download: Vec<u8>) -> JoinHandle<Result<Transfers, String>> {
    let name = ns.name().to_string();
    std::thread::spawn(move || {
        netns::enter_named(&name)?;
        let up = TcpListener::bind((HOST_ADDR, UPLOAD_PORT)).map_err(|e| format!("bind: {e}"))?;
        let down =
            TcpListener::bind((HOST_ADDR, DOWNLOAD_PORT)).map_err(|e| format!("bind: {e}"))?;
        let deadline = Instant::now() + ENDPOINT_TIMEOUT;
        let mut s = accept(&up, deadline)?;
        let mut uploaded = Vec::with_capacity(TRANSFER);
        s.read_to_end(&mut uploaded)
            .map_err(|e| format!("receiving the upload after {} bytes: {e}", uploaded.len()))?;
        drop(s);
        let mut s = accept(&down, deadline)?;
        s.write_all(&download)
            .map_err(|e| format!("sending the download: {e}"))?;
        drop(s);
        Ok(Transfers { uploaded })
    })
}

const GUEST_SCRIPT: &str = r#"set -e
fail() { echo "GUEST-FAIL: $*"; exit 1; }
step() { echo "E2E-STEP [$(cut -d' ' -f1 /proc/uptime)] $*"; }
kv() { echo "E2E-KV $1=$2"; }
for d in /sys/bus/virtio/devices/*; do
    if [ "$(cat "$d/device")" = 0x0001 ]; then kv features "$(cat "$d/features")"; fi
done
ip link set lo up
ip link show eth0 >/dev/null 2>&1 || fail "no eth0"
kv mac "$(cat /sys/class/net/eth0/address)"
kv queues "$(ls /sys/class/net/eth0/queues | grep -c rx-)"
ip addr add 10.77.0.2/24 dev eth0
ip link set eth0 up
step "eth0 up"
ping -c 3 -W 10 10.77.0.1 || fail "no ping reply from 10.77.0.1"
step "ping done"
dd if=/dev/urandom of=/tmp/up bs=64k count=64 2>/dev/null
kv up_sha "$(sha256sum /tmp/up | cut -d' ' -f1)"
nc -w 30 10.77.0.1 5001 < /tmp/up || fail "upload failed"
step "upload done"
nc -w 30 10.77.0.1 5002 < /dev/null > /tmp/down || fail "download failed"
kv down_size "$(wc -c < /tmp/down)"
kv down_sha "$(sha256sum /tmp/down | cut -d' ' -f1)"
step "download done"
for c in rx_packets tx_packets rx_dropped tx_dropped; do kv "$c" "$(cat /sys/class/net/eth0/statistics/$c)"; done
step done
"#;

fn kv(log: &str, key: &str) -> Option<String> {
    let prefix = format!("E2E-KV {key}=");
    log.lines()
        .rev()
        .find_map(|l| l.trim_end().strip_prefix(&prefix).map(str::to_owned))
}

fn feature(features: &str, bit: usize) -> bool {
    features.as_bytes().get(bit) == Some(&b'1')
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ring {
    Split,
    Packed,
}

/// Creates the namespace, starts the daemon in it on `<dir>/net.sock` with TAP
/// [`TAP`], and gives the TAP 10.77.0.1/24.
fn start_daemon(case: &str, queue_pairs: u16) -> (NetNs, TempDir, BackgroundProcess) {
    let bin = daemon_binary();
    let ns = NetNs::create("vhun", case).unwrap_or_else(|e| panic!("{e}"));
    let dir = ok(TempDir::new("e2e-net"));
    let socket = dir.path().join("net.sock");
    let mut cmd = ns.command(&bin.to_string_lossy());
    cmd.arg("--socket-path")
        .arg(&socket)
        .args(["--tap", TAP, "--mac", GUEST_MAC])
        .args(["--queue-pairs", &queue_pairs.to_string()]);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    let mut daemon = ok(BackgroundProcess::spawn("vhost-user-net", cmd));
    ok(daemon.wait_for_socket(&socket, Duration::from_secs(10)));
    for args in [
        &["addr", "add", "10.77.0.1/24", "dev", TAP][..],
        &["link", "set", TAP, "up"],
        &["link", "set", "lo", "up"],
    ] {
        if let Err(e) = ns.ip(args) {
            panic!("{case}: {e}\n----- daemon log -----\n{}", daemon.log());
        }
    }
    (ns, dir, daemon)
}

/// One VM at a time (2 shared cores; TCG is slow enough alone).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Guest runs against one daemon, one after the other, one per ring layout in `rings`
/// (several: the daemon serves the next VM on the same socket after the previous one
/// exited).
fn net_case(case: &str, rings: &[Ring], queue_pairs: u16) {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let started = Instant::now();
    let kernel = GuestKernel::locate().unwrap_or_else(|e| panic!("{e}"));
    let (ns, dir, mut daemon) = start_daemon(case, queue_pairs);
    let socket = dir.path().join("net.sock");
    let fail = |what: &str, guest: &str, daemon: &BackgroundProcess| -> ! {
        panic!(
            "{case}: {what}\n----- guest log -----\n{guest}\n----- daemon log -----\n{}\n----- end -----",
            daemon.log()
        )
    };

    for (round, &ring) in rings.iter().enumerate() {
        let download = pattern(TRANSFER);
        let endpoints = spawn_endpoints(&ns, download.clone());

        let initrd = ok(Initramfs::new(&kernel)
            .modules(&["virtio_net"])
            .script(GUEST_SCRIPT)
            .build());
        let packed = if ring == Ring::Packed { "on" } else { "off" };
        let (netdev, device) = if queue_pairs > 1 {
            (
                format!("vhost-user,id=n0,chardev=c0,queues={queue_pairs}"),
                format!(
                    "virtio-net-pci,netdev=n0,mac={GUEST_MAC},packed={packed},mq=on,vectors={},romfile=",
                    2 * queue_pairs + 2
                ),
            )
        } else {
            (
                "vhost-user,id=n0,chardev=c0".to_owned(),
                format!("virtio-net-pci,netdev=n0,mac={GUEST_MAC},packed={packed},romfile="),
            )
        };
        let vm = QemuVm::new(&kernel, &initrd)
            .smp(u32::from(queue_pairs))
            .timeout(VM_TIMEOUT)
            .chardev_socket("c0", &socket)
            .args(["-netdev", &netdev])
            .device(&device);
        let out: VmOutput = match vm.run() {
            Ok(out) if out.success() => out,
            Ok(out) => fail(
                &format!(
                    "guest script failed (E2E-EXIT={}; see GUEST-FAIL and E2E-STEP)",
                    out.exit_code
                ),
                &out.log,
                &daemon,
            ),
            Err(e) => fail(
                &format!("VM run failed: {e}"),
                e.log().unwrap_or(""),
                &daemon,
            ),
        };
        eprintln!("{case}: VM ran in {:.1}s", out.elapsed.as_secs_f64());
        let log = &out.log;

        let features = kv(log, "features").unwrap_or_else(|| fail("no features", log, &daemon));
        if !feature(&features, F_VERSION_1) || !feature(&features, F_MRG_RXBUF) {
            fail(
                &format!("features {features}: want VERSION_1 and MRG_RXBUF"),
                log,
                &daemon,
            );
        }
        if feature(&features, F_RING_PACKED) != (ring == Ring::Packed) {
            fail(
                &format!("features {features}: RING_PACKED does not match {ring:?}"),
                log,
                &daemon,
            );
        }
        if queue_pairs > 1 {
            let queues = kv(log, "queues").unwrap_or_default();
            if !feature(&features, F_MQ) || queues.trim() != queue_pairs.to_string() {
                fail(
                    &format!("features {features}, {queues} queues: want MQ with {queue_pairs}"),
                    log,
                    &daemon,
                );
            }
        }
        if kv(log, "mac").as_deref() != Some(GUEST_MAC) {
            fail("the guest's MAC address is not the one given", log, &daemon);
        }
        let transfers = match endpoints.join() {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => fail(&format!("host endpoint: {e}"), log, &daemon),
            Err(_) => fail("host endpoint thread panicked", log, &daemon),
        };
        if transfers.uploaded.len() != TRANSFER {
            fail(
                &format!(
                    "uploaded {} bytes, want {TRANSFER}",
                    transfers.uploaded.len()
                ),
                log,
                &daemon,
            );
        }
        if kv(log, "up_sha").as_deref() != Some(sha256(&transfers.uploaded).as_str()) {
            fail(
                "the upload's SHA-256 differs between guest and host",
                log,
                &daemon,
            );
        }
        if kv(log, "down_size").map(|s| s.trim().to_owned()).as_deref()
            != Some(TRANSFER.to_string().as_str())
        {
            fail(
                "the guest received a download of the wrong size",
                log,
                &daemon,
            );
        }
        if kv(log, "down_sha").as_deref() != Some(sha256(&download).as_str()) {
            fail(
                "the download's SHA-256 differs between host and guest",
                log,
                &daemon,
            );
        }
        match daemon.try_wait() {
            Ok(None) => {}
            Ok(Some(s)) => fail(
                &format!("the daemon exited ({s}) after the VM"),
                log,
                &daemon,
            ),
            Err(e) => fail(&format!("checking the daemon: {e}"), log, &daemon),
        }
        eprintln!("{case}: VM {round} ({ring:?}) passed");
    }
    let (status, dlog) = ok(daemon.stop());
    if !status.success() {
        panic!("{case}: the daemon did not exit cleanly on SIGTERM ({status})\n{dlog}");
    }
    for line in dlog.lines().filter(|l| l.contains("counters")) {
        eprintln!("{case}: daemon: {line}");
    }
    drop(ns);
    eprintln!("{case}: passed in {:.1}s", started.elapsed().as_secs_f64());
}

#[test]
fn e2e_net_ping_and_transfers_split() {
    net_case("split", &[Ring::Split], 1);
}

#[test]
fn e2e_net_ping_and_transfers_packed() {
    net_case("packed", &[Ring::Packed], 1);
}

/// A second VM (packed, after a split one) on the same socket after the first exited.
#[test]
fn e2e_net_second_vm_served_after_the_first_exits() {
    net_case("second", &[Ring::Split, Ring::Packed], 1);
}

/// Two queue pairs (`mq=on,vectors=6` on two vCPUs): QEMU serves the control queue and
/// enables the second pair's rings; the TAP has a queue per pair.
#[test]
fn e2e_net_two_queue_pairs() {
    net_case("mq", &[Ring::Split], 2);
}

/// `dpdk-testpmd` on PATH, if installed.
fn testpmd_binary() -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|d| PathBuf::from(d).join("dpdk-testpmd"))
        .find(|p| p.is_file())
}

/// The first `RX-packets: N` / `TX-packets: N` of testpmd's final statistics.
fn testpmd_count(log: &str, what: &str) -> Option<u64> {
    let key = format!("{what}-packets:");
    log.lines()
        .find_map(|l| l.split_once(&key))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
}

/// The TAP's received-frames counter, read inside the namespace.
fn tap_rx_packets(ns: &NetNs) -> u64 {
    ns.command("cat")
        .arg(format!("/sys/class/net/{TAP}/statistics/rx_packets"))
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0)
}

/// DPDK virtio_user as the frontend (testpmd in `io` mode, which sends every frame it
/// receives back out): it handles its own config space and control queue, strips
/// CTRL_VQ from SET_FEATURES (masked by the device), never negotiates EVENT_IDX and sends
/// SET_VRING_CALL before SET_FEATURES. The ARP requests of a ping inside the namespace
/// reach testpmd (receive path) and come back to the TAP (transmit path).
fn dpdk_case(case: &str, packed: bool, mrg_rxbuf: bool, queues: u16) {
    let Some(testpmd) = testpmd_binary() else {
        eprintln!("{case}: skipped: dpdk-testpmd is not installed");
        return;
    };
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (ns, dir, mut daemon) = start_daemon(case, queues);
    let socket = dir.path().join("net.sock");
    let before = tap_rx_packets(&ns);
    // testpmd runs until its stdin (the pipe from `sleep`) ends.
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!(
        "sleep 8 | exec {} --no-huge --no-pci -m 512 --no-shconf --file-prefix=vunet-{}-{case} \
         --vdev net_virtio_user0,path={},mac={GUEST_MAC},packed_vq={},mrg_rxbuf={},queues={queues} \
         -- --forward-mode=io --total-num-mbufs=32768 --rxq={queues} --txq={queues}",
        testpmd.display(),
        std::process::id(),
        socket.display(),
        u8::from(packed),
        u8::from(mrg_rxbuf),
    ));
    let mut pmd = ok(BackgroundProcess::spawn("dpdk-testpmd", cmd));
    std::thread::sleep(Duration::from_secs(3));
    // Nobody answers: the ping fails; its ARP requests are what is counted.
    let _ = ns
        .command("ping")
        .args(["-c", "5", "-i", "0.3", "-W", "1", "10.77.0.2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let Some(status) = ok(pmd.wait_timeout(Duration::from_secs(30))) else {
        panic!(
            "{case}: testpmd did not exit\n{}\n----- daemon log -----\n{}",
            pmd.log(),
            daemon.log()
        );
    };
    let log = pmd.log();
    let (rx, tx) = (testpmd_count(&log, "RX"), testpmd_count(&log, "TX"));
    let after = tap_rx_packets(&ns);
    let alive = matches!(daemon.try_wait(), Ok(None));
    let report = format!("{log}\n----- daemon log -----\n{}", daemon.log());
    assert!(
        status.success(),
        "{case}: testpmd failed ({status})\n{report}"
    );
    assert!(
        rx.unwrap_or(0) > 0,
        "{case}: testpmd received nothing\n{report}"
    );
    assert!(
        tx.unwrap_or(0) > 0,
        "{case}: testpmd sent nothing\n{report}"
    );
    assert!(
        after > before,
        "{case}: the TAP received nothing from testpmd\n{report}"
    );
    assert!(alive, "{case}: the daemon exited\n{report}");
    let (status, dlog) = ok(daemon.stop());
    assert!(status.success(), "{case}: daemon exit {status}\n{dlog}");
    eprintln!(
        "{case}: testpmd RX {rx:?} TX {tx:?}, TAP received {}",
        after - before
    );
    drop(ns);
}

#[test]
fn e2e_net_dpdk_testpmd_split() {
    dpdk_case("dpdk-split", false, true, 1);
}

#[test]
fn e2e_net_dpdk_testpmd_packed() {
    dpdk_case("dpdk-packed", true, true, 1);
}

/// user-mode Linux as a third frontend (`virtio_uml.device=SOCK:1`): it hands every
/// queue to the backend, the control queue included (Linux's virtio_net probe waits on
/// the control queue), uses 256-entry rings and a pipe as call fd. Its virtio_net probes
/// and pings the TAP's address through the daemon.
#[test]
fn e2e_net_user_mode_linux_probes_and_pings() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let (ns, dir, daemon) = start_daemon("uml", 1);
    let socket = dir.path().join("net.sock");
    let kernel = ok(vring_tests::e2e::uml_kernel());
    let script = r#"set -e
fail() { echo "GUEST-FAIL: $*"; exit 1; }
step() { echo "E2E-STEP [$(cut -d' ' -f1 /proc/uptime)] $*"; }
ip link set lo up
ip link show eth0 >/dev/null 2>&1 || fail "no eth0"
ip addr add 10.77.0.2/24 dev eth0
ip link set eth0 up
ping -c 3 -W 10 10.77.0.1 || fail "no ping reply from 10.77.0.1"
step "ping done"
"#;
    let initrd = ok(vring_tests::e2e::Initramfs::new(&kernel)
        .modules(&["virtio_net"])
        .script(script.to_string())
        .build());
    let out = vring_tests::e2e::UmlVm::new(&kernel, &initrd)
        .virtio_net(&socket)
        .timeout(Duration::from_secs(60))
        .run();
    let log = match &out {
        Ok(o) => o.log.clone(),
        Err(e) => e.log().unwrap_or("").to_string(),
    };
    match out {
        Ok(o) if o.success() && log.contains("ping done") => {}
        _ => panic!(
            "user-mode Linux over vhost-user-net failed\n----- guest -----\n{log}\n----- daemon -----\n{}",
            daemon.log()
        ),
    }
    drop(ns);
}

/// testpmd without merged receive buffers (one chain per frame).
#[test]
fn e2e_net_dpdk_testpmd_split_without_mrg_rxbuf() {
    dpdk_case("dpdk-nomrg", false, false, 1);
}

/// testpmd with two queue pairs (its control queue stays inside testpmd: MQ becomes
/// SET_VRING_ENABLE of the second pair).
#[test]
fn e2e_net_dpdk_testpmd_two_queue_pairs() {
    dpdk_case("dpdk-2q", false, true, 2);
}
