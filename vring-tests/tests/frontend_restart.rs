// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Backend restarts at the protocol level: the userspace frontend
//! (`vring_tests::frontend`) keeps its guest memory, rings and inflight area while our
//! `vhost-user-blk` daemon is killed with SIGKILL at QD32 and started again on the same
//! socket, reconnects the way QEMU does (GET_INFLIGHT_FD once, SET_INFLIGHT_FD on every
//! connection, rings restarted where a frontend that could not stop them knows them to
//! be), and checks that every request completes exactly once with the right data. Also
//! the 16-bit packed ring base DPDK's virtio_user sends.
//!
//! The image is served through a throttled qemu-storage-daemon FUSE export, so writes
//! stay in flight long enough to be caught by the kill; the restarted daemon's log must
//! say it found requests in flight, or the case proves nothing and fails.
//!
//! Needs our daemon built (`cargo build --release -p vhost-user-blk`, or
//! `$E2E_VHOST_USER_BLK`) and `qemu-storage-daemon` with FUSE exports.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "test code"
)]

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vring_tests::e2e::blk::{spawn_vhost_user_blk, ThrottledFile};
use vring_tests::e2e::{BackgroundProcess, TempDir};
use vring_tests::frontend::blk::{check_pattern, fill_pattern};
use vring_tests::frontend::{BlkFrontend, BlkOp, FrontendOptions, Limit, Workload, WorkloadOp};

const DISK: u64 = 64 << 20;
const BS: u32 = 4096;
const SECTORS_PER_BLOCK: u64 = BS as u64 / 512;
/// Requests in flight when the daemon is killed.
const DEPTH: u16 = 32;
/// Writes per second the throttled image takes.
const WRITE_IOPS: u32 = 20;
const GENERATION: u64 = 7;

struct Daemon {
    process: Option<BackgroundProcess>,
    args: Vec<OsString>,
    sock: PathBuf,
    // Dropped after the daemon, before the directory.
    _file: ThrottledFile,
    image: PathBuf,
    _dir: TempDir,
}

impl Daemon {
    fn start(tag: &str) -> Daemon {
        let dir = TempDir::new(tag).unwrap();
        let image = dir.path().join("disk.img");
        File::create(&image).unwrap().set_len(DISK).unwrap();
        let file = ThrottledFile::start(&image, &dir.path().join("slow.img"), WRITE_IOPS)
            .unwrap_or_else(|e| panic!("{e}"));
        let sock = dir.path().join("blk.sock");
        let args: Vec<OsString> = vec![
            "--blk-file".into(),
            file.path().into(),
            "--num-queues".into(),
            "1".into(),
        ];
        let process = spawn_vhost_user_blk(&sock, &args).unwrap_or_else(|e| panic!("{e}"));
        Daemon {
            process: Some(process),
            args,
            sock,
            _file: file,
            image,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        self.process.as_ref().map(|p| p.log()).unwrap_or_default()
    }

    /// SIGKILL, wait until gone, start again on the same socket; the killed log.
    fn kill_and_restart(&mut self) -> String {
        let mut old = self.process.take().unwrap();
        let pid = i32::try_from(old.pid().unwrap()).unwrap();
        // SAFETY: kill(2) has no memory effects; `pid` is our unreaped child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        assert!(
            old.wait_timeout(Duration::from_secs(10)).unwrap().is_some(),
            "the killed daemon did not exit"
        );
        let log = old.log();
        self.process =
            Some(spawn_vhost_user_blk(&self.sock, &self.args).unwrap_or_else(|e| panic!("{e}")));
        log
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        drop(self.process.take());
    }
}

/// The number in the restarted daemon's "N requests left in flight" line for queue 0.
fn recovered_requests(log: &str) -> Option<u64> {
    log.lines().find_map(|l| {
        let rest = l.split("queue 0: ").nth(1)?;
        let n = rest.strip_suffix(" requests left in flight by a previous backend instance")?;
        n.trim().parse().ok()
    })
}

fn options(packed: bool) -> FrontendOptions {
    FrontendOptions {
        packed,
        inflight: true,
        slots: DEPTH,
        queue_size: 128,
        max_block_size: BS,
        timeout: Duration::from_secs(30),
        ..FrontendOptions::default()
    }
}

fn restart_at_qd32(packed: bool) {
    let mut daemon = Daemon::start(if packed { "rstp" } else { "rsts" });
    let mut fe = BlkFrontend::connect(&daemon.sock, options(packed))
        .unwrap_or_else(|e| panic!("connect: {e}\n{}", daemon.log()));
    assert!(
        fe.inflight_area().is_some(),
        "the daemon did not offer INFLIGHT_SHMFD"
    );
    // QD32 of distinct writes, each block its own pattern.
    let q = &mut fe.queues()[0];
    let mut data = vec![0u8; BS as usize];
    for k in 0..u64::from(DEPTH) {
        let slot = q.alloc_slot().unwrap();
        let sector = k * SECTORS_PER_BLOCK;
        fill_pattern(&mut data, sector, GENERATION);
        q.write_data(slot, &data).unwrap();
        q.submit(slot, BlkOp::Write, sector, BS, k).unwrap();
    }
    q.kick().unwrap();
    // The throttle lets a burst through, then 20 writes a second: most are in flight.
    std::thread::sleep(Duration::from_millis(300));
    let killed_log = daemon.kill_and_restart();
    fe.reconnect(&daemon.sock)
        .unwrap_or_else(|e| panic!("reconnect: {e}\n{}", daemon.log()));

    let q = &mut fe.queues()[0];
    let mut done = Vec::new();
    let start = Instant::now();
    while done.len() < usize::from(DEPTH) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "only {} of {DEPTH} requests completed\n{}",
            done.len(),
            daemon.log()
        );
        q.wait(&mut done)
            .unwrap_or_else(|e| panic!("waiting for completions: {e}\n{}", daemon.log()));
        if q.in_flight() == 0 {
            break;
        }
    }
    // Exactly once each (the queue refuses an ID it has no request for).
    let mut tags: Vec<u64> = done.iter().map(|c| c.user).collect();
    tags.sort_unstable();
    assert_eq!(tags, (0..u64::from(DEPTH)).collect::<Vec<_>>());
    for c in &done {
        c.check(0).unwrap();
    }
    let log = daemon.log();
    let n = recovered_requests(&log).unwrap_or_else(|| {
        panic!(
            "the restarted daemon found no request in flight: the kill proved nothing\n\
             ----- killed -----\n{killed_log}\n----- restarted -----\n{log}"
        )
    });
    assert!(n > 0 && n <= u64::from(DEPTH), "{n} requests recovered");
    eprintln!(
        "{} ring: {n} of {DEPTH} requests were in flight at the kill; all {DEPTH} completed once",
        if packed { "packed" } else { "split" }
    );
    // Read everything back through the device, and check the image too.
    for k in 0..u64::from(DEPTH) {
        let sector = k * SECTORS_PER_BLOCK;
        let (_, back) = fe.request(0, BlkOp::Read, sector, &[], BS).unwrap();
        check_pattern(&back, sector, GENERATION)
            .unwrap_or_else(|m| panic!("block {k} read back wrong: {m:?}"));
    }
    fe.shutdown().unwrap();
    let img = File::open(&daemon.image).unwrap();
    let mut back = vec![0u8; BS as usize];
    for k in 0..u64::from(DEPTH) {
        img.read_exact_at(&mut back, k * u64::from(BS)).unwrap();
        check_pattern(&back, k * SECTORS_PER_BLOCK, GENERATION)
            .unwrap_or_else(|m| panic!("image block {k} wrong: {m:?}"));
    }
}

#[test]
fn restart_at_qd32_completes_every_request_once_split() {
    restart_at_qd32(false);
}

#[test]
fn restart_at_qd32_completes_every_request_once_packed() {
    restart_at_qd32(true);
}

/// DPDK's virtio_user sends a fresh packed ring's base as `0x8000` (16 bits); the daemon
/// must serve it with correct used wrap counters.
#[test]
fn packed_ring_with_16_bit_base_verifies_data() {
    let dir = TempDir::new("p16").unwrap();
    let image = dir.path().join("disk.img");
    File::create(&image).unwrap().set_len(DISK).unwrap();
    let sock = dir.path().join("blk.sock");
    let args: Vec<OsString> = vec!["--blk-file".into(), image.into()];
    let daemon = spawn_vhost_user_blk(&sock, &args).unwrap_or_else(|e| panic!("{e}"));
    let opts = FrontendOptions {
        packed: true,
        packed_base_16bit: true,
        queue_size: 64,
        slots: 16,
        ..FrontendOptions::default()
    };
    let mut fe = BlkFrontend::connect(&sock, opts)
        .unwrap_or_else(|e| panic!("connect: {e}\n{}", daemon.log()));
    // Several laps of the 64-entry ring, every block verified.
    let mut w = Workload::new(WorkloadOp::Verify, BS, 16, Limit::Count(1024));
    w.span = Some(1 << 20);
    let report = fe
        .run_workload(&w)
        .unwrap_or_else(|e| panic!("workload: {e}\n{}", daemon.log()));
    assert!(report.ops >= 1024, "{report:?}");
    fe.shutdown().unwrap();
}
