// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The userspace vhost-user-blk frontend (`vring_tests::frontend`) against real backends.
//!
//! Against the reference backend, `qemu-storage-daemon`: negotiation, config space, split
//! rings with 1 and 2 queues at QD1 and QD32, direct and indirect chains, interrupt and
//! polling completion, data verification (through the device and in the image file),
//! flush, GET_ID, read-only exports, clean shutdown, reconnection, and clear refusals
//! (packed rings, which qsd lacks; too many queues; a refused GET_CONFIG).
//!
//! qsd has no packed rings, so the packed path (and its 32-bit SET_VRING_BASE) is also run
//! against a RAM disk on virtio-core's vhost-user server, and the same frontend runs
//! unchanged (split and packed) against our `vhost-user-blk` daemon, which must be built
//! first (`cargo build --release -p vhost-user-blk`, or `$E2E_VHOST_USER_BLK`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "test code"
)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vhost::vhost_user::VhostUserProtocolFeatures;
use vring_tests::e2e::{QsdBlkExport, TempDir};
use vring_tests::frontend::blk::{
    check_pattern, fill_pattern, GET_ID_LEN, VIRTIO_BLK_F_MQ, VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
};
use vring_tests::frontend::{
    BlkFrontend, BlkOp, CompletionMode, FrontendError, FrontendOptions, Limit, Workload, WorkloadOp,
};

const DISK: u64 = 64 << 20;
const BS: u32 = 4096;

struct Setup {
    qsd: Option<QsdBlkExport>,
    image: PathBuf,
    sock: PathBuf,
    _dir: TempDir,
}

impl Setup {
    fn new(tag: &str, writable: bool, queues: u16) -> Setup {
        let dir = TempDir::new(tag).unwrap();
        let image = dir.path().join("disk.img");
        File::create(&image).unwrap().set_len(DISK).unwrap();
        let sock = dir.path().join("vhost.sock");
        let qsd = match QsdBlkExport::start(&image, &sock, writable, queues) {
            Ok(q) => q,
            Err(e) => panic!("{e}"),
        };
        Setup {
            qsd: Some(qsd),
            image,
            sock,
            _dir: dir,
        }
    }

    fn connect(&mut self, opts: FrontendOptions) -> BlkFrontend {
        match BlkFrontend::connect(&self.sock, opts) {
            Ok(fe) => fe,
            Err(e) => panic!("connect: {e}\nqsd log:\n{}", self.log()),
        }
    }

    fn log(&mut self) -> String {
        self.qsd
            .as_mut()
            .map(|q| q.process().log())
            .unwrap_or_default()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(q) = self.qsd.take() {
            let _ = q.stop();
        }
    }
}

fn ok<T>(r: Result<T, FrontendError>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

/// Checks blocks of the image file against the pattern each queue wrote last.
fn check_image(image: &Path, blocks: u64, generations: &[u64]) {
    let f = File::open(image).unwrap();
    let nq = generations.len() as u64;
    let mut buf = vec![0u8; BS as usize];
    for b in (0..blocks).step_by(97) {
        f.read_exact_at(&mut buf, b * u64::from(BS)).unwrap();
        let sector = b * u64::from(BS) / 512;
        if let Err(m) = check_pattern(&buf, sector, generations[(b % nq) as usize]) {
            panic!("image block {b}: {m}");
        }
    }
}

#[test]
fn split_two_queues_qd32_verify() {
    let mut s = Setup::new("fe-mq", true, 2);
    // Data put in the file before connecting must read back through the device.
    let mut pre = vec![0u8; BS as usize];
    fill_pattern(&mut pre, 8, 77);
    File::options()
        .write(true)
        .open(&s.image)
        .unwrap()
        .write_all_at(&pre, 4096)
        .unwrap();

    let mut fe = s.connect(FrontendOptions {
        queues: 2,
        ..FrontendOptions::default()
    });
    let info = fe.info().clone();
    assert_eq!(fe.capacity_bytes(), Some(DISK), "config space capacity");
    assert!(info.has(VIRTIO_BLK_F_MQ));
    assert!(info.has(VIRTIO_RING_F_EVENT_IDX), "qsd offers EVENT_IDX");
    assert!(info.has_protocol(VhostUserProtocolFeatures::CONFIG));
    assert!(info.has_protocol(VhostUserProtocolFeatures::REPLY_ACK));
    assert_eq!(info.config.and_then(|c| c.num_queues), Some(2));
    assert!(info.backend_queue_num.unwrap() >= 2);

    let (_, back) = ok(fe.request(0, BlkOp::Read, 8, &[], BS));
    check_pattern(&back, 8, 77).unwrap();

    let span = 8u64 << 20;
    let mut w = Workload::new(WorkloadOp::Verify, BS, 32, Limit::Count(8192));
    w.span = Some(span);
    let r = ok(fe.run_workload(&w));
    let blocks = span / u64::from(BS);
    // Each queue owns half the blocks; 2 rounds of write + flush + read each.
    assert_eq!(r.per_queue.len(), 2);
    assert!(r.per_queue.iter().all(|q| q.rounds == 2), "{r:?}");
    assert_eq!(r.verified_blocks, 2 * blocks);
    assert_eq!((r.reads, r.writes), (2 * blocks, 2 * blocks));
    assert_eq!(r.flushes, 4, "FLUSH negotiated: one per round per queue");
    assert_eq!(r.latencies_ns.len() as u64, r.ops);
    check_image(&s.image, blocks, &r.last_generation);

    // A short timed random-read run on both queues.
    let r = ok(fe.run_workload(&Workload::new(
        WorkloadOp::RandRead,
        BS,
        32,
        Limit::Duration(Duration::from_millis(300)),
    )));
    assert!(r.per_queue.iter().all(|q| q.ops > 0), "{r:?}");
    assert!(r.iops() > 0.0 && r.latency().p99 >= r.latency().p50);

    let bases = ok(fe.shutdown());
    assert_eq!(bases.len(), 2);
}

#[test]
fn indirect_no_event_idx_no_reply_ack_qd1() {
    let mut s = Setup::new("fe-ind", true, 1);
    let mut fe = s.connect(FrontendOptions {
        indirect: true,
        event_idx: false,
        reply_ack: false,
        queue_size: 32,
        slots: 32,
        ..FrontendOptions::default()
    });
    let info = fe.info().clone();
    assert!(info.has(VIRTIO_RING_F_INDIRECT_DESC));
    assert!(!info.has(VIRTIO_RING_F_EVENT_IDX));
    assert!(!info.has_protocol(VhostUserProtocolFeatures::REPLY_ACK));
    // QD1 then QD32 on a 32-entry ring: only fits with indirect descriptors.
    for depth in [1, 32] {
        let mut w = Workload::new(WorkloadOp::Verify, 16384, depth, Limit::Count(512));
        w.span = Some(4 << 20);
        let r = ok(fe.run_workload(&w));
        assert_eq!(r.verified_blocks, 256);
    }
    let (c, id) = ok(fe.request(0, BlkOp::GetId, 0, &[], GET_ID_LEN));
    assert_eq!(c.len, GET_ID_LEN);
    assert_eq!(id.len(), GET_ID_LEN as usize);
    let (c, _) = ok(fe.request(0, BlkOp::Flush, 0, &[], 0));
    assert_eq!(c.status, 0);
    // 256 * 2 * 2 verify requests, a get-id and a flush (2 flushes in the workloads).
    let bases = ok(fe.shutdown());
    assert_eq!(bases, vec![256 * 2 * 2 + 2 + 2]);
}

#[test]
fn polling_completion_and_reconnect() {
    let mut s = Setup::new("fe-poll", true, 2);
    for round in 0..2 {
        let mut fe = s.connect(FrontendOptions {
            queues: 2,
            completion: CompletionMode::Poll,
            ..FrontendOptions::default()
        });
        let mut w = Workload::new(WorkloadOp::Verify, BS, 8, Limit::Count(1024));
        w.span = Some(1 << 20);
        w.seed = 1000 + round;
        let r = ok(fe.run_workload(&w));
        assert_eq!(r.verified_blocks, 256 * 2, "round {round}");
        assert!(
            r.per_queue.iter().all(|q| q.sleeps == 0),
            "polling never sleeps"
        );
        ok(fe.shutdown());
    }
}

#[test]
fn packed_ring_refused_clearly() {
    let mut s = Setup::new("fe-packed", true, 1);
    let err = BlkFrontend::connect(
        &s.sock,
        FrontendOptions {
            packed: true,
            ..FrontendOptions::default()
        },
    )
    .expect_err("qemu-storage-daemon has no packed rings");
    match &err {
        FrontendError::FeatureNotOffered { feature, bit, .. } => {
            assert_eq!((*feature, *bit), ("VIRTIO_F_RING_PACKED", 34));
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(err
        .to_string()
        .contains("does not offer VIRTIO_F_RING_PACKED"));
    // The refused connection is gone; the daemon serves the next one.
    let mut fe = s.connect(FrontendOptions::default());
    let mut w = Workload::new(WorkloadOp::Verify, BS, 4, Limit::Count(64));
    w.span = Some(1 << 20);
    ok(fe.run_workload(&w));
    ok(fe.shutdown());
}

#[test]
fn too_many_queues_refused() {
    let s = Setup::new("fe-nq", true, 1);
    let err = BlkFrontend::connect(
        &s.sock,
        FrontendOptions {
            queues: 3,
            ..FrontendOptions::default()
        },
    )
    .expect_err("one queue exported");
    assert!(
        matches!(
            err,
            FrontendError::NotEnoughQueues {
                requested: 3,
                available: 1
            }
        ),
        "{err}"
    );
}

#[test]
fn read_only_export() {
    let mut s = Setup::new("fe-ro", false, 1);
    let mut fe = s.connect(FrontendOptions::default());
    assert!(fe.read_only());
    let w = Workload::new(WorkloadOp::RandWrite, BS, 4, Limit::Count(16));
    assert!(matches!(fe.run_workload(&w), Err(FrontendError::ReadOnly)));
    let r = ok(fe.run_workload(&Workload::new(
        WorkloadOp::RandRead,
        BS,
        4,
        Limit::Count(64),
    )));
    assert_eq!(r.reads, 64);
    // A write the device must refuse: a failed status, not a hang or a success.
    match fe.request(0, BlkOp::Write, 0, &[0u8; 4096], 0) {
        Err(FrontendError::RequestFailed { status, .. }) => assert_ne!(status, 0),
        other => panic!("write on a read-only export: {other:?}"),
    }
    ok(fe.shutdown());
}

// ---------------------------------------------------------------------------------------
// qemu-storage-daemon has no packed rings; the packed path (and the 32-bit packed
// SET_VRING_BASE) is checked against a RAM disk on virtio-core's own vhost-user server.

mod ramdisk {
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};

    use virtio_core::vhost_user::{
        Device, DeviceError, GroupContext, GroupInfo, Processed, ProtocolFeatures, QueueHandler,
    };
    use virtio_core::DescriptorChain;
    use vring_tests::frontend::blk::{
        bit, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
    };

    /// A minimal virtio-blk device over a shared byte vector.
    pub struct RamDisk {
        pub data: Arc<Mutex<Vec<u8>>>,
        pub queues: u16,
    }

    pub struct Handler {
        data: Arc<Mutex<Vec<u8>>>,
        chain: DescriptorChain,
    }

    impl Device for RamDisk {
        type Handler = Handler;

        fn features(&self) -> u64 {
            [
                VIRTIO_F_VERSION_1,
                VIRTIO_F_RING_PACKED,
                VIRTIO_RING_F_EVENT_IDX,
                VIRTIO_RING_F_INDIRECT_DESC,
                VIRTIO_BLK_F_FLUSH,
                VIRTIO_BLK_F_MQ,
            ]
            .into_iter()
            .fold(0, |f, b| f | bit(b))
        }

        fn protocol_features(&self) -> ProtocolFeatures {
            ProtocolFeatures::CONFIG
        }

        fn num_queues(&self) -> u16 {
            self.queues
        }

        fn max_queue_size(&self) -> u16 {
            1024
        }

        fn read_config(&self, offset: u32, buf: &mut [u8]) -> Result<(), DeviceError> {
            let mut cfg = [0u8; 60];
            let sectors = self.data.lock().unwrap().len() as u64 / 512;
            cfg[0..8].copy_from_slice(&sectors.to_le_bytes());
            cfg[34..36].copy_from_slice(&self.queues.to_le_bytes());
            let o = offset as usize;
            let src = cfg
                .get(o..o + buf.len())
                .ok_or(DeviceError::ConfigOutOfRange {
                    offset,
                    len: buf.len(),
                    size: cfg.len(),
                })?;
            buf.copy_from_slice(src);
            Ok(())
        }

        fn start_group(&self, _group: &GroupInfo) -> Result<Handler, DeviceError> {
            Ok(Handler {
                data: self.data.clone(),
                chain: DescriptorChain::new(),
            })
        }
    }

    impl QueueHandler for Handler {
        fn process(
            &mut self,
            ctx: &mut GroupContext<'_>,
            queue: u16,
        ) -> Result<Processed, DeviceError> {
            let Some(vring) = ctx.vring(queue) else {
                return Ok(Processed::Empty);
            };
            while vring.pop_into(&mut self.chain)? {
                let mut r = self.chain.reader();
                let mut hdr = [0u8; 16];
                r.read_exact(&mut hdr)?;
                let ty = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
                let off = u64::from_le_bytes(hdr[8..16].try_into().unwrap()) as usize * 512;
                let mut w = self.chain.writer();
                let mut data = self.data.lock().unwrap();
                let status = match ty {
                    0 => {
                        let n = w.available() - 1;
                        w.write_all(&data[off..off + n])?;
                        0u8
                    }
                    1 => {
                        let n = r.available();
                        r.read_exact(&mut data[off..off + n])?;
                        0
                    }
                    4 => 0,
                    _ => 2,
                };
                w.write_all(&[status])?;
                let written = w.bytes_written() as u32;
                vring.add_used(self.chain.id(), written)?;
            }
            Ok(Processed::Empty)
        }
    }
}

#[test]
fn packed_rings_on_virtio_core_server() {
    use std::sync::{Arc, Mutex};
    use virtio_core::vhost_user::{Server, ServerConfig};
    use virtio_core::RingLayout;

    let dir = TempDir::new("fe-packed-vc").unwrap();
    let sock = dir.path().join("ram.sock");
    let data = Arc::new(Mutex::new(vec![0u8; 8 << 20]));
    let device = Arc::new(ramdisk::RamDisk {
        data: data.clone(),
        queues: 2,
    });
    let mut server = Server::bind(&sock, device, ServerConfig::default()).unwrap();
    let shutdown = server.shutdown_handle();
    let t = std::thread::spawn(move || server.serve());
    for (indirect, event_idx, size) in [(false, true, 256), (true, false, 100)] {
        let mut fe = ok(BlkFrontend::connect(
            &sock,
            FrontendOptions {
                queues: 2,
                packed: true,
                indirect,
                event_idx,
                queue_size: size,
                ..FrontendOptions::default()
            },
        ));
        assert_eq!(fe.info().layout, RingLayout::Packed);
        assert_eq!(fe.capacity_bytes(), Some(8 << 20));
        // Enough requests to wrap the rings (and their wrap counters) many times.
        let w = Workload::new(WorkloadOp::Verify, BS, 32, Limit::Count(8192));
        let r = ok(fe.run_workload(&w));
        assert_eq!(r.verified_blocks, 4096);
        let data = data.lock().unwrap();
        for (b, block) in data.chunks(BS as usize).enumerate().step_by(61) {
            let g = r.last_generation[b % 2];
            check_pattern(block, (b * 8) as u64, g).unwrap();
        }
        drop(data);
        // GET_VRING_BASE: both halves, wrap bits included, match the driver.
        let bases = ok(fe.shutdown());
        assert!(bases.iter().all(|b| b & 0xffff == b >> 16), "{bases:x?}");
    }
    shutdown.shutdown();
    t.join().unwrap().unwrap();
}

#[test]
fn refused_get_config_is_an_error_not_a_hang() {
    let mut s = Setup::new("fe-cfg", true, 1);
    let mut fe = s.connect(FrontendOptions {
        timeout: Duration::from_secs(1),
        ..FrontendOptions::default()
    });
    let cfg = ok(fe.get_config(0, 8));
    assert_eq!(u64::from_le_bytes(cfg.try_into().unwrap()), DISK / 512);
    // More than qemu-storage-daemon's config space: libvhost-user answers with an empty
    // reply, which the `vhost` crate takes for the start of a longer one and waits for
    // the rest of, forever. The watchdog turns that into an error.
    let t = std::time::Instant::now();
    match fe.get_config(0, 128) {
        Err(e) => assert!(e.to_string().contains("GET_CONFIG"), "{e}"),
        Ok(cfg) => panic!("GET_CONFIG of 128 bytes returned {} bytes", cfg.len()),
    }
    assert!(t.elapsed() < Duration::from_secs(5));
}

/// Our `vhost-user-blk` daemon: `$E2E_VHOST_USER_BLK`, else the workspace's
/// `target/{release,debug}/vhost-user-blk` (build it first, as CI does with
/// `cargo build --release --workspace --bins`).
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

/// The same frontend, unchanged, against our daemon: split and packed rings, 2 queues,
/// QD32, data verified through the device and in the file.
#[test]
fn our_daemon_split_and_packed() {
    let dir = TempDir::new("fe-ours").unwrap();
    let image = dir.path().join("disk.img");
    File::create(&image).unwrap().set_len(DISK).unwrap();
    let sock = dir.path().join("vhost.sock");
    let mut cmd = std::process::Command::new(our_daemon());
    cmd.arg("--socket-path")
        .arg(&sock)
        .arg("--blk-file")
        .arg(&image)
        .arg("--num-queues")
        .arg("2");
    let mut daemon = vring_tests::e2e::BackgroundProcess::spawn("vhost-user-blk", cmd).unwrap();
    if let Err(e) = daemon.wait_for_socket(&sock, Duration::from_secs(10)) {
        panic!("{e}");
    }
    for packed in [false, true] {
        let mut fe = match BlkFrontend::connect(
            &sock,
            FrontendOptions {
                queues: 2,
                packed,
                ..FrontendOptions::default()
            },
        ) {
            Ok(fe) => fe,
            Err(e) => panic!("connect (packed {packed}): {e}\n{}", daemon.log()),
        };
        assert_eq!(fe.capacity_bytes(), Some(DISK));
        let span = 8u64 << 20;
        let mut w = Workload::new(WorkloadOp::Verify, BS, 32, Limit::Count(8192));
        w.span = Some(span);
        let r = match fe.run_workload(&w) {
            Ok(r) => r,
            Err(e) => panic!("verify (packed {packed}): {e}\n{}", daemon.log()),
        };
        assert_eq!(r.verified_blocks, 2 * span / u64::from(BS));
        check_image(&image, span / u64::from(BS), &r.last_generation);
        if let Err(e) = fe.shutdown() {
            panic!("shutdown (packed {packed}): {e}\n{}", daemon.log());
        }
    }
    let _ = daemon.stop();
}
