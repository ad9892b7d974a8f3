// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The block device's vhost-user face (`vhost_user_blk::BlkDevice`) tested in-process
//! through virtio-core's server: the userspace frontend negotiates, sets up split and
//! packed rings on two queues served by one worker thread (`queues_per_thread` 2, so one
//! handler drives both queues' block processors), and verifies data written and read
//! back, on a tmpfs file (inline engine path) and a file on /tmp.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "test code"
)]

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use vhost_user_blk::device::DeviceOptions;
use vhost_user_blk::{
    BackendOptions, BlkDevice, BlockBackend, BlockDevice, CacheMode, EngineChoice,
};
use virtio_core::vhost_user::{Server, ServerConfig};
use vring_tests::e2e::TempDir;
use vring_tests::frontend::{BlkFrontend, FrontendOptions, Limit, Workload, WorkloadOp};

const DISK: u64 = 16 << 20;

fn serve_and_verify(dir: &Path, packed: bool) {
    let image = dir.join("disk.img");
    File::create(&image).unwrap().set_len(DISK).unwrap();
    let backend = BlockBackend::open(&BackendOptions {
        path: image.clone(),
        read_only: false,
        direct: false,
        logical_block_size: None,
        physical_block_size: None,
        serial: None,
        cache_mode: CacheMode::WriteBack,
    })
    .unwrap();
    let engine = EngineChoice::Auto.resolve().unwrap();
    let options = DeviceOptions {
        num_queues: 2,
        ..DeviceOptions::default()
    };
    let device = Arc::new(BlkDevice::new(BlockDevice::new(
        Arc::new(backend),
        options,
        engine,
    )));
    let sockdir = TempDir::new("blkinproc").unwrap();
    let sock = sockdir.path().join("blk.sock");
    let config = ServerConfig {
        queues_per_thread: 2,
        thread_name: "inproc".into(),
        ..ServerConfig::default()
    };
    let mut server = Server::bind(&sock, device, config).unwrap();
    let stop = server.shutdown_handle();
    let t = std::thread::spawn(move || server.serve());
    let mut fe = BlkFrontend::connect(
        &sock,
        FrontendOptions {
            queues: 2,
            packed,
            ..FrontendOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("connect: {e}"));
    assert_eq!(fe.capacity_bytes(), Some(DISK));
    let w = Workload::new(WorkloadOp::Verify, 4096, 16, Limit::Count(4096));
    let r = fe
        .run_workload(&w)
        .unwrap_or_else(|e| panic!("workload: {e}"));
    assert!(r.verified_blocks > 0, "{r:?}");
    fe.shutdown().unwrap();
    stop.shutdown();
    t.join().unwrap().unwrap();
}

#[test]
fn blk_device_serves_two_queues_on_one_worker_split_on_tmpfs() {
    let dir = TempDir::new_in(Path::new("/dev/shm"), "blkip").unwrap();
    serve_and_verify(dir.path(), false);
}

#[test]
fn blk_device_serves_two_queues_on_one_worker_packed_on_disk_file() {
    let dir = TempDir::new("blkip").unwrap();
    serve_and_verify(dir.path(), true);
}
