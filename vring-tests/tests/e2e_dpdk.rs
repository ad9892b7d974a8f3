// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End-to-end smoke test of the DPDK testpmd harness (`vring_tests::e2e::dpdk`):
//! one testpmd serves a `net_vhost0` port (DPDK's own vhost-user backend) in
//! `rxonly` mode, a second one drives a `net_virtio_user0` port (DPDK's
//! vhost-user frontend) on the same socket in `txonly` mode for about a
//! second; every packet the frontend's port counts as sent must be counted by
//! the backend as received, or as missed/failed in its own statistics. Split
//! and packed (`packed_vq=1`) rings.
//!
//! This proves the harness; later tests put our vhost-user-net daemon between
//! two such frontends. The two busy-polling testpmds run on different host
//! CPUs (`--lcores=0@0,1@0` and `0@1,1@1`).
//!
//! Needs `dpdk-testpmd` and its vhost / virtio PMDs, which
//! `vring-tests/scripts/install-test-deps.sh` installs (Debian `dpdk-dev`,
//! `librte-net-vhost23`, `librte-net-virtio23`); fails with that hint when
//! they are missing. `E2E_VERBOSE=1` shows both testpmds' output live.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::sync::Mutex;
use std::time::{Duration, Instant};

use vring_tests::e2e::dpdk::{FwdMode, RunningTestPmd, TestPmd, VirtioUserOptions};
use vring_tests::e2e::{E2eError, TempDir};

/// MAC address of the frontend port.
const MAC: &str = "52:54:00:12:34:56";
/// How long the frontend sends.
const SEND_FOR: Duration = Duration::from_secs(1);
/// At least this many packets must get through in [`SEND_FOR`].
const MIN_PACKETS: u64 = 10_000;
/// How long the backend gets to drain its ring after the frontend stopped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The cases run one at a time: each pins its two busy-polling testpmds to
/// the host's two CPUs.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// VIRTIO_F_RING_PACKED.
const F_RING_PACKED: u64 = 1 << 34;

/// The host CPU for the frontend: CPU 1 when there are two, else 0.
fn frontend_cpu() -> u32 {
    match std::thread::available_parallelism() {
        Ok(n) if n.get() >= 2 => 1,
        _ => 0,
    }
}

/// Fails the test (with both logs) if `r` is an error.
#[track_caller]
fn check<T>(r: Result<T, E2eError>, be: &RunningTestPmd, fe: &RunningTestPmd) -> T {
    r.unwrap_or_else(|e| fail(&e.to_string(), be, Some(fe)))
}

#[track_caller]
fn fail(what: &str, be: &RunningTestPmd, fe: Option<&RunningTestPmd>) -> ! {
    panic!(
        "{what}\n----- backend testpmd (`{}`) -----\n{}\n----- frontend testpmd -----\n{}\n\
         ----- end -----",
        be.cmdline(),
        be.log(),
        fe.map_or_else(
            || "(not started)".into(),
            |f| format!("`{}`\n{}", f.cmdline(), f.log())
        )
    )
}

fn txonly_to_rxonly(packed: bool, queues: Option<u16>) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let tmp = TempDir::new("dpdk").unwrap();
    let sock = tmp.path().join("vhost.sock");
    let mut be = TestPmd::new("backend")
        .cpu(0)
        .vhost_backend(&sock, queues)
        .queues(queues.unwrap_or(1))
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    be.set_fwd(FwdMode::RxOnly)
        .unwrap_or_else(|e| panic!("{e}"));
    be.start().unwrap_or_else(|e| panic!("{e}"));

    let opts = VirtioUserOptions {
        packed,
        queues,
        ..Default::default()
    };
    let mut fe = match TestPmd::new("frontend")
        .cpu(frontend_cpu())
        .virtio_user(&sock, MAC, &opts)
        .queues(queues.unwrap_or(1))
        .spawn()
    {
        Ok(fe) => fe,
        Err(e) => fail(&format!("frontend: {e}"), &be, None),
    };
    if let Err(e) = be.wait_for_output(
        "virtio is now ready for processing",
        Duration::from_secs(10),
    ) {
        fail(&format!("backend: {e}"), &be, Some(&fe));
    }
    let features = be.negotiated_features().unwrap_or(0);
    if (features & F_RING_PACKED != 0) != packed {
        fail(
            &format!("negotiated features {features:#x}: packed ring should be {packed}"),
            &be,
            Some(&fe),
        );
    }

    let r = fe.set_fwd(FwdMode::TxOnly);
    check(r, &be, &fe);
    let r = fe.start();
    let out = check(r, &be, &fe);
    let want = format!("Tx queue number: {}", queues.unwrap_or(1));
    if !out.contains(&want) {
        fail(
            &format!("frontend `start` output lacks `{want}`"),
            &be,
            Some(&fe),
        );
    }
    std::thread::sleep(SEND_FOR);
    let r = fe.stop();
    let fe_fwd = check(r, &be, &fe);
    let r = fe.port(0);
    let sent = check(r, &be, &fe);

    // The backend keeps polling: wait until it has accounted for every packet
    // the frontend's port sent, or its counters stop moving.
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let mut last = None;
    let got = loop {
        let r = be.port(0);
        let s = check(r, &be, &fe);
        let accounted = s.rx_packets + s.rx_missed + s.rx_errors + s.rx_nombuf;
        if accounted >= sent.tx_packets || last == Some(s) || Instant::now() >= deadline {
            break s;
        }
        last = Some(s);
        std::thread::sleep(Duration::from_millis(200));
    };
    let r = be.stop();
    let be_fwd = check(r, &be, &fe);
    let ring = format!(
        "{}, {} queue pair(s)",
        if packed { "packed" } else { "split" },
        queues.unwrap_or(1)
    );
    eprintln!(
        "{ring}: frontend sent {} packets ({} not taken by the full ring), backend received {} \
         (missed {}, errors {}, nombuf {}, dropped {}); negotiated features {features:#x}",
        sent.tx_packets,
        fe_fwd.tx_dropped,
        got.rx_packets,
        got.rx_missed,
        got.rx_errors,
        got.rx_nombuf,
        be_fwd.rx_dropped
    );
    let dropped = got.rx_missed + got.rx_errors + got.rx_nombuf + be_fwd.rx_dropped;
    if sent.tx_packets < MIN_PACKETS
        || sent.tx_errors != 0
        || got.rx_packets > sent.tx_packets
        || sent.tx_packets - got.rx_packets > dropped
    {
        fail(
            &format!(
                "{ring}: counts do not match: frontend port {sent:?}, forward {fe_fwd:?}; \
                 backend port {got:?}, forward {be_fwd:?} (need >= {MIN_PACKETS} sent, and \
                 sent - received <= what the backend counted as dropped)"
            ),
            &be,
            Some(&fe),
        );
    }
    if let Err(e) = fe.quit(Duration::from_secs(10)) {
        fail(&format!("frontend: {e}"), &be, None);
    }
    if let Err(e) = be.quit(Duration::from_secs(10)) {
        panic!("backend: {e}");
    }
    eprintln!("{ring}: took {:.1}s", started.elapsed().as_secs_f64());
}

#[test]
fn testpmd_virtio_user_to_vhost_split() {
    txonly_to_rxonly(false, None);
}

#[test]
fn testpmd_virtio_user_to_vhost_packed() {
    txonly_to_rxonly(true, None);
}

/// Two queue pairs (`queues=2` on both ports, which also gives virtio_user
/// its control queue; `--rxq=2 --txq=2`): testpmd's one forwarding core sends
/// on both TX queues and the backend's receives on both RX queues.
#[test]
fn testpmd_virtio_user_to_vhost_two_queues() {
    txonly_to_rxonly(false, Some(2));
}

/// A frontend started without a backend fails at once, saying why, instead of
/// running testpmd without its port.
#[test]
fn testpmd_virtio_user_without_backend_fails_clearly() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = TempDir::new("dpdk-nobe").unwrap();
    let sock = tmp.path().join("missing.sock");
    let started = Instant::now();
    let err = TestPmd::new("frontend")
        .cpu(frontend_cpu())
        .virtio_user(&sock, MAC, &VirtioUserOptions::default())
        .spawn()
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, E2eError::Guest { .. }) && text.contains("needs its backend listening"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(15), "{text}");
}
