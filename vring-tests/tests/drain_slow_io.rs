// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Stopping a ring with slow I/O in flight must not stall the other rings of the same
//! worker thread (`vhost-user-blk --queues-per-thread 2`).
//!
//! The slow disk is real: `qemu-storage-daemon` exports a throttled block node (20 IOPS)
//! over FUSE as a regular file, which our `vhost-user-blk` daemon serves through
//! io_uring. The daemon must be built first (`cargo build --release -p vhost-user-blk`,
//! or `$E2E_VHOST_USER_BLK`); the test needs qemu-storage-daemon
//! (`vring-tests/scripts/install-test-deps.sh`) and FUSE mounts: root with `/dev/fuse`,
//! or `fusermount3` (package fuse3) for other users. It fails, with the daemon's log,
//! when the export cannot be set up.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "test code"
)]

use std::fs::File;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use vhost::VhostBackend;
use vring_tests::e2e::blk::ThrottledFile;
use vring_tests::e2e::{BackgroundProcess, TempDir};
use vring_tests::frontend::blk::{GET_ID_LEN, VIRTIO_BLK_S_OK};
use vring_tests::frontend::{BlkFrontend, BlkOp, FrontendOptions};

const DISK: u64 = 64 << 20;
/// Reads in flight on the draining queue: at 20 IOPS, well over a second of I/O.
const SLOW_READS: u16 = 48;

/// Our `vhost-user-blk` daemon: `$E2E_VHOST_USER_BLK`, else the workspace's
/// `target/{release,debug}/vhost-user-blk`.
fn our_daemon() -> PathBuf {
    if let Some(p) = std::env::var_os("E2E_VHOST_USER_BLK").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let root = vring_tests::e2e::repo_root();
    ["release", "debug"]
        .iter()
        .map(|p| root.join("target").join(p).join("vhost-user-blk"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("vhost-user-blk is not built: run `cargo build --release -p vhost-user-blk`")
        })
}

#[test]
fn draining_queue_does_not_stall_its_worker_neighbour() {
    if let Err(e) = io_uring::IoUring::new(2) {
        println!("io_uring unavailable ({e}): skipped");
        return;
    }
    let dir = TempDir::new("drain-slow").unwrap();
    let image = dir.path().join("disk.img");
    File::create(&image).unwrap().set_len(DISK).unwrap();
    let throttled = ThrottledFile::start_all_ops(&image, &dir.path().join("slow.img"), 20)
        .unwrap_or_else(|e| panic!("{e}"));
    let slow = throttled.path().to_path_buf();

    let sock = dir.path().join("vhost.sock");
    let mut cmd = Command::new(our_daemon());
    cmd.arg("--socket-path")
        .arg(&sock)
        .arg("--blk-file")
        .arg(&slow)
        .args(["--num-queues", "2", "--queues-per-thread", "2"])
        .args(["--engine", "io_uring"]);
    let mut daemon = BackgroundProcess::spawn("vhost-user-blk", cmd).unwrap();
    if let Err(e) = daemon.wait_for_socket(&sock, Duration::from_secs(10)) {
        panic!("{e}");
    }
    let mut fe = BlkFrontend::connect(
        &sock,
        FrontendOptions {
            queues: 2,
            slots: 64,
            max_block_size: 4096,
            ..FrontendOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("connect: {e}\n{}", daemon.log()));

    // Queue 0: slow reads, 1 MiB apart (no page cache or readahead hits).
    let q0 = &mut fe.queues()[0];
    for i in 0..u64::from(SLOW_READS) {
        let slot = q0.alloc_slot().unwrap();
        q0.submit(slot, BlkOp::Read, i * 2048, 4096, i).unwrap();
    }
    q0.kick().unwrap();
    std::thread::sleep(Duration::from_millis(100));

    // Stop queue 0 (GET_VRING_BASE waits for its drain) from another thread.
    let vhost = fe.vhost_frontend().clone();
    let stop = std::thread::spawn(move || {
        let r = vhost.get_vring_base(0);
        (r, Instant::now())
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !stop.is_finished(),
        "queue 0 drained before the test could use queue 1: the I/O was not slow\n{}",
        daemon.log()
    );

    // Queue 1, same worker thread: a GET_ID (no disk I/O) must complete at once.
    let start = Instant::now();
    let (c, id) = fe
        .request(1, BlkOp::GetId, 0, &[], GET_ID_LEN)
        .unwrap_or_else(|e| panic!("GET_ID on queue 1: {e}\n{}", daemon.log()));
    let latency = start.elapsed();
    assert_eq!(c.status, VIRTIO_BLK_S_OK);
    assert_eq!(id.len(), GET_ID_LEN as usize);
    assert!(
        !stop.is_finished() && latency < Duration::from_millis(500),
        "queue 1 waited {latency:?}, until queue 0's drain ended\n{}",
        daemon.log()
    );

    // Queue 0's drain still completes every read in flight, then reports the base.
    let (base, stopped_at) = stop.join().unwrap();
    let base = base.unwrap_or_else(|e| panic!("GET_VRING_BASE: {e}\n{}", daemon.log()));
    assert_eq!(base, u32::from(SLOW_READS));
    assert!(stopped_at > start + latency);
    let mut done = Vec::new();
    fe.queues()[0].poll(&mut done).unwrap();
    assert_eq!(done.len(), usize::from(SLOW_READS));
    assert!(done.iter().all(|c| c.status == VIRTIO_BLK_S_OK));

    drop(fe);
    let (_, log) = daemon.stop().unwrap();
    assert!(!log.contains("still in flight"), "{log}");
    drop(throttled);
}
