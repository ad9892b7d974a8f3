// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End-to-end test of the `vhost-user-net` daemon in switch mode with two DPDK testpmd
//! `net_virtio_user` frontends on two `--switch` sockets (no TAP, no root needed beyond
//! what testpmd `--no-huge` needs).
//!
//! Frontend 2 first sends a short `txonly` burst to frontend 1 so that the switch learns
//! its address; then frontend 1 sends `txonly` to frontend 2's MAC (`set eth-peer`) for
//! about a second while frontend 2 runs `rxonly`. What frontend 2 received must equal
//! what frontend 1's port sent minus what the daemon counted as dropped for port 1
//! (its per-port counters, logged at SIGTERM). Split and packed (`packed_vq=1`) rings.
//! The two busy-polling testpmds run on different host CPUs.
//!
//! The daemon is not built here: `cargo build --release -p vhost-user-net` first
//! (`target/debug` is the fallback, `E2E_VHOST_USER_NET=/path` overrides). Needs
//! `dpdk-testpmd` (`vring-tests/scripts/install-test-deps.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vring_tests::e2e::dpdk::{FwdMode, PortStats, RunningTestPmd, TestPmd, VirtioUserOptions};
use vring_tests::e2e::{repo_root, BackgroundProcess, TempDir};

const MAC1: &str = "02:00:00:00:00:11";
const MAC2: &str = "02:00:00:00:00:22";
const SEND_FOR: Duration = Duration::from_secs(1);
const MIN_PACKETS: u64 = 1_000;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

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
    panic!("the vhost-user-net daemon is not built: run `cargo build --release -p vhost-user-net`");
}

fn second_cpu() -> u32 {
    match std::thread::available_parallelism() {
        Ok(n) if n.get() >= 2 => 1,
        _ => 0,
    }
}

/// The value after `key ` in the last "switch port {port} counters:" line of `log`.
fn daemon_counter(log: &str, port: usize, key: &str) -> Option<u64> {
    let tag = format!("switch port {port} counters:");
    let line = log.lines().rev().find(|l| l.contains(&tag))?;
    let rest = line.split(&tag).nth(1)?;
    let toks: Vec<&str> = rest.split_whitespace().collect();
    toks.windows(2)
        .find(|w| w[0] == key)
        .and_then(|w| w[1].parse().ok())
}

struct Run {
    daemon: BackgroundProcess,
    fe1: Option<RunningTestPmd>,
    fe2: Option<RunningTestPmd>,
}

impl Run {
    #[track_caller]
    fn fail(&self, what: &str) -> ! {
        let log = |p: &Option<RunningTestPmd>| {
            p.as_ref().map_or_else(
                || "(not running)".into(),
                |p| format!("`{}`\n{}", p.cmdline(), p.log()),
            )
        };
        panic!(
            "{what}\n----- daemon -----\n{}\n----- frontend 1 -----\n{}\n----- frontend 2 -----\n{}\n----- end -----",
            self.daemon.log(),
            log(&self.fe1),
            log(&self.fe2)
        )
    }
}

fn port_stats(run: &mut Run, which: u8) -> PortStats {
    let fe = if which == 1 {
        run.fe1.as_mut()
    } else {
        run.fe2.as_mut()
    };
    match fe.map(|f| f.port(0)) {
        Some(Ok(s)) => s,
        Some(Err(e)) => run.fail(&format!("frontend {which}: {e}")),
        None => run.fail(&format!("frontend {which} is not running")),
    }
}

fn command(run: &mut Run, which: u8, line: &str) -> String {
    let fe = if which == 1 {
        run.fe1.as_mut()
    } else {
        run.fe2.as_mut()
    };
    let r = match (fe, line) {
        (Some(f), "txonly") => f.set_fwd(FwdMode::TxOnly),
        (Some(f), "rxonly") => f.set_fwd(FwdMode::RxOnly),
        (Some(f), "stop") => f.stop().map(|s| format!("{s:?}")),
        (Some(f), l) => f.command(l),
        (None, _) => run.fail(&format!("frontend {which} is not running")),
    };
    r.unwrap_or_else(|e| run.fail(&format!("frontend {which}: `{line}`: {e}")))
}

fn switch_case(packed: bool) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let ring = if packed { "packed" } else { "split" };
    let tmp = TempDir::new("e2e-switch").unwrap();
    let s0 = tmp.path().join("sw0.sock");
    let s1 = tmp.path().join("sw1.sock");
    let mut cmd = Command::new(daemon_binary());
    cmd.arg("--switch").arg(&s0).arg("--switch").arg(&s1);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    let mut daemon = BackgroundProcess::spawn("vhost-user-net", cmd).unwrap();
    for s in [&s0, &s1] {
        if let Err(e) = daemon.wait_for_socket(s, Duration::from_secs(10)) {
            panic!("{e}\n----- daemon -----\n{}", daemon.log());
        }
    }
    let mut run = Run {
        daemon,
        fe1: None,
        fe2: None,
    };
    let opts = VirtioUserOptions {
        packed,
        ..Default::default()
    };
    for (which, sock, mac, cpu) in [(1u8, &s0, MAC1, 0), (2, &s1, MAC2, second_cpu())] {
        match TestPmd::new(&format!("switch-fe{which}"))
            .cpu(cpu)
            .virtio_user(sock, mac, &opts)
            .spawn()
        {
            Ok(p) if which == 1 => run.fe1 = Some(p),
            Ok(p) => run.fe2 = Some(p),
            Err(e) => run.fail(&format!("frontend {which}: {e}")),
        }
    }
    // Frontend 2 makes itself known: a short burst to frontend 1.
    command(&mut run, 2, &format!("set eth-peer 0 {MAC1}"));
    command(&mut run, 2, "txonly");
    command(&mut run, 2, "start");
    std::thread::sleep(Duration::from_millis(100));
    command(&mut run, 2, "stop");
    command(&mut run, 2, "rxonly");
    command(&mut run, 2, "start");
    let rx_before = port_stats(&mut run, 2).rx_packets;

    command(&mut run, 1, &format!("set eth-peer 0 {MAC2}"));
    command(&mut run, 1, "txonly");
    command(&mut run, 1, "start");
    std::thread::sleep(SEND_FOR);
    command(&mut run, 1, "stop");
    let sent = port_stats(&mut run, 1);

    // Let frontend 2 drain what the switch still holds, until its count stops moving.
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let mut last = None;
    let got = loop {
        let s = port_stats(&mut run, 2);
        if s.rx_packets - rx_before >= sent.tx_packets
            || last == Some(s.rx_packets)
            || Instant::now() >= deadline
        {
            break s;
        }
        last = Some(s.rx_packets);
        std::thread::sleep(Duration::from_millis(300));
    };
    command(&mut run, 2, "stop");
    let received = got.rx_packets - rx_before;
    for which in [1u8, 2] {
        let fe = if which == 1 {
            run.fe1.take()
        } else {
            run.fe2.take()
        };
        if let Some(f) = fe {
            if let Err(e) = f.quit(Duration::from_secs(10)) {
                run.fail(&format!("frontend {which}: quit: {e}"));
            }
        }
    }
    if let Some(pid) = run.daemon.pid().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) on the daemon we spawned (not yet reaped: BackgroundProcess
        // reaps it only in wait/drop).
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    match run.daemon.wait_timeout(Duration::from_secs(10)) {
        Ok(Some(st)) if st.success() => {}
        other => run.fail(&format!(
            "the daemon did not stop cleanly on SIGTERM: {other:?}"
        )),
    }
    let log = run.daemon.log();
    let counter = |port, key| {
        daemon_counter(&log, port, key).unwrap_or_else(|| {
            run.fail(&format!(
                "no `{key}` counter of port {port} in the daemon log"
            ))
        })
    };
    let tx0 = counter(0, "tx");
    let rx1 = counter(1, "rx");
    let dropped1 =
        counter(1, "drop_full") + counter(1, "drop_too_big") + counter(1, "drop_disconnect");
    let learned = log.contains("switch port 1: connected");
    eprintln!(
        "{ring}: frontend 1 sent {}, frontend 2 received {received}; daemon: port 0 tx {tx0}, port 1 rx {rx1}, port 1 dropped {dropped1}; took {:.1}s",
        sent.tx_packets,
        started.elapsed().as_secs_f64()
    );
    // Frontend 2's burst was counted too (port 1 tx, port 0 rx): only frontend 1 sends
    // to port 1, so its numbers are exact.
    if sent.tx_packets < MIN_PACKETS
        || !learned
        || tx0 < sent.tx_packets
        || received + dropped1 != sent.tx_packets
        || rx1 != received
    {
        run.fail(&format!(
            "{ring}: counts do not match: frontend 1 sent {} (need >= {MIN_PACKETS}), frontend 2 \
             received {received}; daemon port 0 tx {tx0}, port 1 rx {rx1}, port 1 dropped {dropped1} \
             (need received + dropped == sent, daemon rx == received)",
            sent.tx_packets
        ));
    }
}

#[test]
fn e2e_switch_testpmd_unicast_split() {
    switch_case(false);
}

#[test]
fn e2e_switch_testpmd_unicast_packed() {
    switch_case(true);
}

/// Two QEMU guests through switch mode: guest A (10.79.0.1) pings guest B (10.79.0.2),
/// then sends 1 MiB to B's busybox `nc` listener; both print the SHA-256 and the test
/// compares. The addresses exist only inside the two guests: their frames go nowhere but
/// through our switch.
#[test]
fn two_qemu_guests_ping_and_transfer_through_the_switch() {
    use vring_tests::e2e::{GuestKernel, Initramfs, QemuVm};
    let _serial = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let tmp = TempDir::new("swvm").unwrap();
    let s0 = tmp.path().join("s0.sock");
    let s1 = tmp.path().join("s1.sock");
    let mut cmd = Command::new(daemon_binary());
    cmd.arg("--switch").arg(&s0).arg("--switch").arg(&s1);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    let mut daemon = BackgroundProcess::spawn("vhost-user-net --switch", cmd).unwrap();
    for s in [&s0, &s1] {
        daemon
            .wait_for_socket(s, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let kernel = GuestKernel::locate().unwrap_or_else(|e| panic!("{e}"));
    let prelude = r#"set -e
fail() { echo "GUEST-FAIL: $*"; exit 1; }
step() { echo "E2E-STEP [$(cut -d' ' -f1 /proc/uptime)] $*"; }
ip link set lo up
ip link show eth0 >/dev/null 2>&1 || fail "no eth0"
"#;
    let script_b = format!(
        r#"{prelude}ip addr add 10.79.0.2/24 dev eth0
ip link set eth0 up
step "listening"
nc -l -p 5000 > /tmp/rx || fail "nc -l failed"
echo "E2E-KV rx_sha=$(sha256sum /tmp/rx | cut -d' ' -f1)"
echo "E2E-KV rx_size=$(wc -c < /tmp/rx)"
"#
    );
    let script_a = format!(
        r#"{prelude}ip addr add 10.79.0.1/24 dev eth0
ip link set eth0 up
i=0
until ping -c 1 -W 2 10.79.0.2 >/dev/null 2>&1; do
    i=$((i+1)); [ $i -lt 60 ] || fail "guest B never answered a ping"
done
ping -c 3 -W 5 10.79.0.2 || fail "no ping replies from guest B"
step "ping done"
dd if=/dev/urandom of=/tmp/tx bs=64k count=16 2>/dev/null
echo "E2E-KV tx_sha=$(sha256sum /tmp/tx | cut -d' ' -f1)"
i=0
until nc -w 30 10.79.0.2 5000 < /tmp/tx; do
    i=$((i+1)); [ $i -lt 20 ] || fail "could not send to guest B"
    sleep 1
done
step "sent"
"#
    );
    let vm = |script: String, sock: &std::path::Path, mac: &str| {
        let initrd = Initramfs::new(&kernel)
            .modules(&["virtio_net"])
            .script(script)
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        QemuVm::new(&kernel, &initrd)
            .timeout(Duration::from_secs(240))
            .chardev_socket("c0", sock)
            .args(["-netdev", "vhost-user,id=n0,chardev=c0"])
            .device(&format!("virtio-net-pci,netdev=n0,mac={mac},romfile="))
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let b = vm(script_b, &s1, "52:54:00:79:00:02");
    let a = vm(script_a, &s0, "52:54:00:79:00:01");
    let out_a = a.wait();
    let out_b = b.wait();
    let kv = |log: &str, key: &str| {
        let prefix = format!("E2E-KV {key}=");
        log.lines()
            .rev()
            .find_map(|l| l.trim_end().strip_prefix(&prefix).map(str::to_owned))
    };
    let report = |what: &str| -> String {
        format!(
            "{what}\n----- guest A -----\n{}\n----- guest B -----\n{}\n----- daemon -----\n{}",
            out_a
                .as_ref()
                .map_or_else(|e| e.to_string(), |o| o.log.clone()),
            out_b
                .as_ref()
                .map_or_else(|e| e.to_string(), |o| o.log.clone()),
            daemon.log()
        )
    };
    let (Ok(oa), Ok(ob)) = (&out_a, &out_b) else {
        panic!("{}", report("a VM run failed"));
    };
    assert!(
        oa.success() && ob.success(),
        "{}",
        report("a guest script failed")
    );
    let tx = kv(&oa.log, "tx_sha");
    assert!(tx.is_some(), "{}", report("guest A printed no checksum"));
    assert_eq!(tx, kv(&ob.log, "rx_sha"), "{}", report("checksums differ"));
    assert_eq!(
        kv(&ob.log, "rx_size")
            .map(|s| s.trim().to_owned())
            .as_deref(),
        Some("1048576"),
        "{}",
        report("guest B received the wrong size")
    );
}
