// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Protocol tests: the server driven by the `vhost` crate's `Frontend` (and, for requests
//! it cannot send, raw messages), over socketpairs or a socket path, with memfd-backed
//! guest memory that the test maps too, to play the driver.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
    VhostUserU64, VhostUserVringState,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    ByteValued, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::error::Result as VuResult;
use super::message::{req, test_util, FLAG_NEED_REPLY};
use super::*;
use crate::chain::DescriptorChain;
use crate::queue::RingLayout;

const VERSION_1: u64 = 1 << 32;
const RING_PACKED: u64 = 1 << 34;
const EVENT_IDX: u64 = 1 << 29;
const INDIRECT: u64 = 1 << 28;
const QSIZE: u16 = 16;
const MEM_SIZE: usize = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);

// ---- a toy device: echoes each chain's readable bytes into its writable buffers ----

#[derive(Default)]
struct TestDevice {
    /// Hold popped chains until the queue's completion eventfd fires.
    hold: bool,
    resets: AtomicUsize,
    started: Arc<AtomicUsize>,
    held: Arc<AtomicUsize>,
    config: Mutex<[u8; 8]>,
    completions: Mutex<Vec<(u16, EventFd)>>,
    /// Runs every worker of the device there (see `Device::worker_thread`).
    shared: Option<Arc<WorkerThread>>,
    /// The threads `process` ran on.
    threads: Arc<Mutex<Vec<std::thread::ThreadId>>>,
}

impl TestDevice {
    fn new(hold: bool) -> Arc<Self> {
        Arc::new(TestDevice {
            hold,
            config: Mutex::new(*b"vhostcfg"),
            ..Default::default()
        })
    }

    /// Completes the chains held by queue `index`.
    fn complete(&self, index: u16) {
        let c = self.completions.lock().unwrap();
        let (_, evt) = c
            .iter()
            .rev()
            .find(|(i, _)| *i == index)
            .expect("queue started");
        evt.write(1).unwrap();
    }

    fn wait_held(&self, n: usize) {
        let start = Instant::now();
        while self.held.load(Ordering::Acquire) < n {
            assert!(start.elapsed() < TIMEOUT, "device did not pop {n} chains");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The handler of one group (by default one queue): echoes, or holds chains until the
/// group's completion eventfd fires.
struct TestQueue {
    hold: bool,
    held: Vec<(u16, DescriptorChain)>,
    spare: Vec<DescriptorChain>,
    completion: EventFd,
    held_count: Arc<AtomicUsize>,
    started: Arc<AtomicUsize>,
    threads: Arc<Mutex<Vec<std::thread::ThreadId>>>,
}

fn echo(chain: &DescriptorChain, vring: &mut Vring) -> Result<(), DeviceError> {
    let mut data = Vec::new();
    chain.reader().read_to_end(&mut data)?;
    let mut w = chain.writer();
    let n = w.write(&data)?;
    vring.add_used(chain.id(), u32::try_from(n).unwrap())?;
    Ok(())
}

/// Token of the completion eventfd of a [`TestQueue`].
const COMPLETION_TOKEN: u32 = 0;

impl QueueHandler for TestQueue {
    fn queue_started(
        &mut self,
        ctx: &mut GroupContext<'_>,
        _queue: &QueueContext,
    ) -> Result<(), DeviceError> {
        self.started.fetch_add(1, Ordering::AcqRel);
        if ctx.queues().count() == 1 {
            ctx.register(
                self.completion.as_raw_fd(),
                Interest::READABLE,
                COMPLETION_TOKEN,
            )?;
        }
        Ok(())
    }

    fn queue_stopped(&mut self, ctx: &mut GroupContext<'_>, _queue: u16) {
        if ctx.queues().count() == 0 {
            ctx.unregister(COMPLETION_TOKEN);
        }
    }

    fn process(
        &mut self,
        ctx: &mut GroupContext<'_>,
        queue: u16,
    ) -> Result<Processed, DeviceError> {
        {
            let me = std::thread::current().id();
            let mut t = self.threads.lock().unwrap();
            if !t.contains(&me) {
                t.push(me);
            }
        }
        let Some(vring) = ctx.vring(queue) else {
            return Ok(Processed::Empty);
        };
        loop {
            let mut chain = self.spare.pop().unwrap_or_default();
            if !vring.pop_into(&mut chain)? {
                self.spare.push(chain);
                return Ok(Processed::Empty);
            }
            let mut head = [0u8; 5];
            let _ = chain.reader().read(&mut head)?;
            assert_ne!(&head, b"PANIC", "the test asked this handler to panic");
            if self.hold {
                self.held.push((queue, chain));
                self.held_count.fetch_add(1, Ordering::AcqRel);
            } else {
                echo(&chain, vring)?;
                self.spare.push(chain);
            }
        }
    }

    fn handle_event(
        &mut self,
        ctx: &mut GroupContext<'_>,
        _token: u32,
        events: Events,
    ) -> Result<(), DeviceError> {
        if events.hangup || events.error {
            return Err(DeviceError::Other("an event source hung up".into()));
        }
        let _ = self.completion.read();
        for (queue, chain) in std::mem::take(&mut self.held) {
            if let Some(vring) = ctx.vring(queue) {
                echo(&chain, vring)?;
            }
            self.held_count.fetch_sub(1, Ordering::AcqRel);
            self.spare.push(chain);
        }
        Ok(())
    }
}

impl Device for TestDevice {
    type Handler = TestQueue;

    fn features(&self) -> u64 {
        VERSION_1 | RING_PACKED | EVENT_IDX | INDIRECT
    }

    fn protocol_features(&self) -> ProtocolFeatures {
        ProtocolFeatures::CONFIG | ProtocolFeatures::INFLIGHT_SHMFD
    }

    fn num_queues(&self) -> u16 {
        2
    }

    fn max_queue_size(&self) -> u16 {
        256
    }

    fn read_config(&self, offset: u32, buf: &mut [u8]) -> Result<(), DeviceError> {
        let cfg = self.config.lock().unwrap();
        let off = offset as usize;
        let src = cfg
            .get(off..off + buf.len())
            .ok_or(DeviceError::ConfigOutOfRange {
                offset,
                len: buf.len(),
                size: cfg.len(),
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        // Only byte 0 is writable.
        if offset != 0 || data.len() != 1 {
            return Err(DeviceError::ConfigReadOnly {
                offset,
                len: data.len(),
            });
        }
        self.config.lock().unwrap()[0] = data[0];
        Ok(())
    }

    fn start_group(&self, group: &GroupInfo) -> Result<TestQueue, DeviceError> {
        let completion = EventFd::new(EFD_NONBLOCK)?;
        let mut c = self.completions.lock().unwrap();
        for &q in &group.queues {
            c.push((q, completion.try_clone()?));
        }
        Ok(TestQueue {
            hold: self.hold,
            held: Vec::new(),
            spare: Vec::new(),
            completion,
            held_count: self.held.clone(),
            started: self.started.clone(),
            threads: self.threads.clone(),
        })
    }

    fn worker_thread(&self, _group: u16) -> Option<Arc<WorkerThread>> {
        self.shared.clone()
    }

    fn reset(&self) {
        self.resets.fetch_add(1, Ordering::AcqRel);
    }
}

// ---- guest memory and the driver side ----

fn memfd(len: usize) -> File {
    // SAFETY: valid C string; result checked.
    let fd = unsafe { libc::memfd_create(c"test-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor we own.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(len as u64).unwrap();
    f
}

/// Guest memory the test (as the frontend/driver) maps, and its region descriptions.
struct GuestMem {
    mem: GuestMemoryMmap<()>,
    _files: Vec<File>,
}

impl GuestMem {
    fn new(ranges: &[(u64, usize)]) -> Self {
        let files: Vec<File> = ranges.iter().map(|&(_, l)| memfd(l)).collect();
        let with_files: Vec<_> = ranges
            .iter()
            .zip(&files)
            .map(|(&(a, l), f)| {
                (
                    GuestAddress(a),
                    l,
                    Some(FileOffset::new(f.try_clone().unwrap(), 0)),
                )
            })
            .collect();
        GuestMem {
            mem: GuestMemoryMmap::from_ranges_with_files(with_files).unwrap(),
            _files: files,
        }
    }

    fn region_info(&self, i: usize) -> VhostUserMemoryRegionInfo {
        let r = self.mem.iter().nth(i).unwrap();
        VhostUserMemoryRegionInfo {
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: r.get_host_address(MemoryRegionAddress(0)).unwrap() as u64,
            mmap_offset: 0,
            mmap_handle: r.file_offset().unwrap().file().as_raw_fd(),
        }
    }

    fn regions(&self) -> Vec<VhostUserMemoryRegionInfo> {
        (0..self.mem.num_regions())
            .map(|i| self.region_info(i))
            .collect()
    }

    /// The frontend (user) address of guest address `gpa`.
    fn user_addr(&self, gpa: u64) -> u64 {
        self.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
    }
}

/// Waits until `evt` is signalled (with a timeout) and consumes it.
fn wait_signal(evt: &EventFd) {
    let mut p = libc::pollfd {
        fd: evt.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd.
    let r = unsafe { libc::poll(&mut p, 1, i32::try_from(TIMEOUT.as_millis()).unwrap()) };
    assert_eq!(r, 1, "no call eventfd signal");
    evt.read().unwrap();
}

fn queue_base(q: u16) -> u64 {
    0x10000 * (u64::from(q) + 1)
}

/// A driver queue plus its eventfds.
struct TestRing {
    index: u16,
    driver: crate::driver::DriverQueue,
    kick: EventFd,
    call: EventFd,
    next_buf: u64,
}

impl TestRing {
    fn new(index: u16, layout: RingLayout, mem: &GuestMem) -> Self {
        let driver = crate::driver::DriverQueue::new(layout, QSIZE, queue_base(index), true);
        driver.init(&mem.mem).unwrap();
        TestRing {
            index,
            driver,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
            next_buf: 0x80000 + 0x10000 * u64::from(index),
        }
    }

    fn config_data(&self, mem: &GuestMem) -> VringConfigData {
        VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: mem.user_addr(self.driver.desc_table()),
            used_ring_addr: mem.user_addr(self.driver.device_area()),
            avail_ring_addr: mem.user_addr(self.driver.driver_area()),
            log_addr: None,
        }
    }

    /// Configures and starts the ring through `fe` (QEMU's order).
    fn setup(&self, fe: &mut Frontend, mem: &GuestMem) {
        self.setup_with_base(fe, mem, 0);
    }

    /// [`Self::setup`] with a SET_VRING_BASE value of `base`.
    fn setup_with_base(&self, fe: &mut Frontend, mem: &GuestMem, base: u16) {
        let i = usize::from(self.index);
        fe.set_vring_num(i, QSIZE).unwrap();
        fe.set_vring_base(i, base).unwrap();
        fe.set_vring_addr(i, &self.config_data(mem)).unwrap();
        fe.set_vring_kick(i, &self.kick).unwrap();
        fe.set_vring_call(i, &self.call).unwrap();
        fe.set_vring_enable(i, true).unwrap();
    }

    /// Makes a chain (readable `data`, one writable buffer of `data.len()`) available at
    /// guest address `at` (or the ring's next buffer area) and kicks.
    fn send_at(&mut self, mem: &GuestMem, data: &[u8], at: Option<u64>) -> u16 {
        let addr = at.unwrap_or_else(|| {
            let a = self.next_buf;
            self.next_buf += 0x1000;
            a
        });
        mem.mem.write_slice(data, GuestAddress(addr)).unwrap();
        let len = u32::try_from(data.len()).unwrap();
        let bufs = [
            crate::driver::DriverBuffer {
                addr,
                len,
                writable: false,
            },
            crate::driver::DriverBuffer {
                addr: addr + 0x800,
                len,
                writable: true,
            },
        ];
        let id = self.driver.add_chain(&mem.mem, &bufs).unwrap();
        self.kick.write(1).unwrap();
        id
    }

    fn send(&mut self, mem: &GuestMem, data: &[u8]) -> u16 {
        self.send_at(mem, data, None)
    }

    /// Waits for the call signal, then takes one used chain and checks its echo.
    fn receive(&mut self, mem: &GuestMem, id: u16, data: &[u8], at: u64) {
        let start = Instant::now();
        let mut armed = false;
        loop {
            if let Some((uid, len)) = self.driver.pop_used(&mem.mem).unwrap() {
                assert_eq!(uid, id);
                assert_eq!(len as usize, data.len());
                let mut out = vec![0u8; data.len()];
                mem.mem
                    .read_slice(&mut out, GuestAddress(at + 0x800))
                    .unwrap();
                assert_eq!(out, data);
                return;
            }
            assert!(start.elapsed() < TIMEOUT, "chain {id} not returned");
            if !armed {
                // As a driver does: ask for an interrupt at the next used buffer, then
                // re-check the used ring before sleeping.
                self.driver.enable_interrupts(&mem.mem, None).unwrap();
                std::sync::atomic::fence(Ordering::SeqCst);
                armed = true;
                continue;
            }
            wait_signal(&self.call);
        }
    }
}

use vm_memory::Bytes;

fn init_log() {
    let _ = env_logger::builder().is_test(true).try_init();
}

fn spawn_server(
    device: Arc<TestDevice>,
    config: ServerConfig,
) -> (Frontend, ConfigNotifier, JoinHandle<VuResult<()>>) {
    init_log();
    let (a, b) = UnixStream::pair().unwrap();
    let mut server = Server::new(FrontendSocket::Connected(b), device, config).unwrap();
    let notifier = server.config_notifier();
    let t = std::thread::spawn(move || server.serve());
    (Frontend::from_stream(a, 8), notifier, t)
}

/// SET_OWNER, features (with `extra` virtio bits), protocol features, REPLY_ACK on every
/// later request, memory table.
fn negotiate(fe: &mut Frontend, extra: u64, mem: &GuestMem) {
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    assert_ne!(features & VHOST_USER_F_PROTOCOL_FEATURES, 0);
    fe.set_features(VERSION_1 | EVENT_IDX | INDIRECT | extra | VHOST_USER_F_PROTOCOL_FEATURES)
        .unwrap();
    let pf = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(pf).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.set_mem_table(&mem.regions()).unwrap();
}

fn default_mem() -> GuestMem {
    GuestMem::new(&[(0, MEM_SIZE)])
}

// ---- tests ----

#[test]
fn features_and_protocol_negotiation() {
    let device = TestDevice::new(false);
    let (mut fe, _n, t) = spawn_server(device.clone(), ServerConfig::default());
    fe.set_owner().unwrap();
    let f = fe.get_features().unwrap();
    assert_eq!(
        f,
        VERSION_1 | RING_PACKED | EVENT_IDX | INDIRECT | VHOST_USER_F_PROTOCOL_FEATURES
    );
    fe.set_features(f).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    for want in [
        VhostUserProtocolFeatures::MQ,
        VhostUserProtocolFeatures::REPLY_ACK,
        VhostUserProtocolFeatures::CONFIG,
        VhostUserProtocolFeatures::BACKEND_REQ,
        VhostUserProtocolFeatures::BACKEND_SEND_FD,
        VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        VhostUserProtocolFeatures::RESET_DEVICE,
        VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        VhostUserProtocolFeatures::STATUS,
    ] {
        assert!(pf.contains(want), "{want:?} not offered");
    }
    assert!(!pf.contains(VhostUserProtocolFeatures::LOG_SHMFD));
    fe.set_protocol_features(pf).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert_eq!(fe.get_queue_num().unwrap(), 2);
    assert_eq!(fe.get_max_mem_slots().unwrap(), 509);
    // Unoffered virtio feature bits are refused (REPLY_ACK failure), the connection stays.
    assert!(fe.set_features(f | 1 << 40).is_err());
    assert_eq!(fe.get_features().unwrap(), f);
    drop(fe);
    t.join().unwrap().unwrap();
    assert_eq!(device.resets.load(Ordering::Acquire), 1);
}

fn echo_test(layout: RingLayout, config: ServerConfig) {
    let device = TestDevice::new(false);
    let mem = default_mem();
    let (mut fe, _n, t) = spawn_server(device.clone(), config);
    let extra = if layout == RingLayout::Packed {
        RING_PACKED
    } else {
        0
    };
    negotiate(&mut fe, extra, &mem);
    let mut rings: Vec<TestRing> = (0..2).map(|i| TestRing::new(i, layout, &mem)).collect();
    for r in &rings {
        r.setup(&mut fe, &mem);
    }
    for round in 0..(u32::from(QSIZE) * 3) {
        for r in rings.iter_mut() {
            let data = format!("hello {round} from queue {}", r.index).into_bytes();
            let at = r.next_buf;
            let id = r.send(&mem, &data);
            r.receive(&mem, id, &data, at);
            if r.next_buf > 0x80000 + 0x10000 * u64::from(r.index) + 0x8000 {
                r.next_buf = 0x80000 + 0x10000 * u64::from(r.index);
            }
        }
    }
    // 48 chains of 2 descriptors each went through each ring.
    let base = fe.get_vring_base(0).unwrap();
    match layout {
        RingLayout::Split => assert_eq!(base, 48),
        RingLayout::Packed => {
            // 96 slots on a 16-slot ring: 6 laps, both positions 0, wrap counters back to 1.
            assert_eq!(base, 0x8000_8000);
        }
    }
    drop(fe);
    t.join().unwrap().unwrap();
}

#[test]
fn split_ring_echo() {
    echo_test(RingLayout::Split, ServerConfig::default());
}

#[test]
fn packed_ring_echo() {
    echo_test(RingLayout::Packed, ServerConfig::default());
}

#[test]
fn busy_polling_and_grouped_workers() {
    let config = ServerConfig {
        queues_per_thread: 2,
        poll_us: 200,
        ..ServerConfig::default()
    };
    echo_test(RingLayout::Split, config.clone());
    echo_test(RingLayout::Packed, config);
}

/// A device whose workers all run on `thread`.
fn shared_device(thread: &Arc<WorkerThread>) -> Arc<TestDevice> {
    Arc::new(TestDevice {
        config: Mutex::new(*b"vhostcfg"),
        shared: Some(thread.clone()),
        ..Default::default()
    })
}

fn wait_for_workers(thread: &WorkerThread, n: usize) {
    let start = Instant::now();
    while thread.workers() != n {
        assert!(
            start.elapsed() < TIMEOUT,
            "{} hosted workers, expected {n}",
            thread.workers()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn workers_of_two_connections_run_on_one_shared_thread() {
    let thread = WorkerThread::new("test-shared").unwrap();
    let devices = [shared_device(&thread), shared_device(&thread)];
    let mem = [default_mem(), default_mem()];
    for round in 0..2 {
        let mut conns: Vec<_> = devices
            .iter()
            .zip(&mem)
            .map(|(d, m)| {
                let (mut fe, _n, t) = spawn_server(d.clone(), ServerConfig::default());
                let layout = if round == 0 {
                    RingLayout::Split
                } else {
                    RingLayout::Packed
                };
                negotiate(&mut fe, if round == 0 { 0 } else { RING_PACKED }, m);
                let rings: Vec<TestRing> = (0..2).map(|i| TestRing::new(i, layout, m)).collect();
                for r in &rings {
                    r.setup(&mut fe, m);
                }
                (fe, t, rings)
            })
            .collect();
        // Both connections, both queues, interleaved.
        for n in 0..(u32::from(QSIZE) * 2) {
            for ((_, _, rings), m) in conns.iter_mut().zip(&mem) {
                for r in rings.iter_mut() {
                    let data = format!("round {round} chain {n} queue {}", r.index).into_bytes();
                    let at = r.next_buf;
                    let id = r.send(m, &data);
                    r.receive(m, id, &data, at);
                    if r.next_buf > 0x80000 + 0x10000 * u64::from(r.index) + 0x8000 {
                        r.next_buf = 0x80000 + 0x10000 * u64::from(r.index);
                    }
                }
            }
        }
        // One worker per queue (the default grouping), all four on the shared thread.
        assert_eq!(thread.workers(), 4);
        for (fe, t, _) in conns.drain(..) {
            drop(fe);
            t.join().unwrap().unwrap();
        }
        // Stopped workers leave the thread; it stays for the next connections.
        wait_for_workers(&thread, 0);
    }
    let threads: Vec<_> = devices
        .iter()
        .flat_map(|d| d.threads.lock().unwrap().clone())
        .collect();
    assert!(!threads.is_empty());
    assert!(
        threads.iter().all(|t| *t == threads[0]),
        "handlers ran on {threads:?}"
    );
    assert_ne!(threads[0], std::thread::current().id());
}

#[test]
fn a_worker_whose_handle_is_dropped_without_join_stops_by_itself() {
    let thread = WorkerThread::new("test-shared-orphan").unwrap();
    let device = TestDevice::new(false);
    let handler = device
        .start_group(&GroupInfo {
            group: 0,
            queues: vec![0],
            features: 0,
        })
        .unwrap();
    let handle = super::worker::WorkerHandle::spawn(
        0,
        "orphan".into(),
        1,
        handler,
        super::worker::WorkerSettings {
            poll: super::poll::PollPolicy::Off,
            drain_timeout: Duration::from_secs(1),
        },
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
        Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
        Some(&thread),
    )
    .unwrap();
    wait_for_workers(&thread, 1);
    drop(handle);
    wait_for_workers(&thread, 0);
}

#[test]
fn a_panicking_hosted_handler_stops_only_its_own_worker() {
    let thread = WorkerThread::new("test-shared-panic").unwrap();
    let (a, b) = (shared_device(&thread), shared_device(&thread));
    let (mem_a, mem_b) = (default_mem(), default_mem());
    let (mut fe_a, _na, ta) = spawn_server(a, ServerConfig::default());
    let (mut fe_b, _nb, tb) = spawn_server(b, ServerConfig::default());
    negotiate(&mut fe_a, 0, &mem_a);
    negotiate(&mut fe_b, 0, &mem_b);
    let mut ring_a = TestRing::new(0, RingLayout::Split, &mem_a);
    let mut ring_b = TestRing::new(0, RingLayout::Split, &mem_b);
    ring_a.setup(&mut fe_a, &mem_a);
    ring_b.setup(&mut fe_b, &mem_b);
    let at = ring_b.next_buf;
    let id = ring_b.send(&mem_b, b"before");
    ring_b.receive(&mem_b, id, b"before", at);
    wait_for_workers(&thread, 2);
    ring_a.send(&mem_a, b"PANIC");
    // A's worker is gone; B's goes on, on the same thread.
    wait_for_workers(&thread, 1);
    for n in 0..u32::from(QSIZE) {
        let data = format!("after {n}").into_bytes();
        let at = ring_b.next_buf;
        let id = ring_b.send(&mem_b, &data);
        ring_b.receive(&mem_b, id, &data, at);
    }
    // A's connection still ends cleanly when its frontend goes.
    drop(fe_a);
    let _ = ta.join().unwrap();
    drop(fe_b);
    tb.join().unwrap().unwrap();
    wait_for_workers(&thread, 0);
}

#[test]
fn packed_get_vring_base_returns_32_bits_and_ring_restarts_from_it() {
    let device = TestDevice::new(false);
    let mem = default_mem();
    let (mut fe, _n, t) = spawn_server(device.clone(), ServerConfig::default());
    negotiate(&mut fe, RING_PACKED, &mem);
    let mut ring = TestRing::new(0, RingLayout::Packed, &mem);
    ring.setup(&mut fe, &mem);
    // 9 chains of 2 slots: 18 slots on a 16-slot ring, positions 2, wrap counters 0.
    for k in 0..9u8 {
        let at = ring.next_buf;
        let id = ring.send(&mem, &[k; 10]);
        ring.receive(&mem, id, &[k; 10], at);
    }
    let base = fe.get_vring_base(0).unwrap();
    assert_eq!(base, 2 | (2 << 16), "avail 2 wrap 0, used 2 wrap 0");
    // Stopped: a chain made available now is not processed...
    let at = ring.next_buf;
    let id = ring.send(&mem, b"after stop");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(ring.driver.pop_used(&mem.mem).unwrap(), None);
    // ... until the ring is restarted (the frontend sends a new kick fd) from the base.
    ring.kick = EventFd::new(EFD_NONBLOCK).unwrap();
    fe.set_vring_kick(0, &ring.kick).unwrap();
    ring.kick.write(1).unwrap();
    ring.receive(&mem, id, b"after stop", at);
    assert_eq!(fe.get_vring_base(0).unwrap(), 4 | (4 << 16));
    drop(fe);
    t.join().unwrap().unwrap();
}

/// Raw-protocol frontend for requests `Frontend` cannot send (32-bit SET_VRING_BASE,
/// STATUS).
struct Raw(UnixStream);

impl Raw {
    fn u64_req(&self, code: u32, v: u64) -> u64 {
        let r = test_util::request(
            &self.0,
            code,
            FLAG_NEED_REPLY,
            VhostUserU64::new(v).as_slice(),
            &[],
            true,
        )
        .unwrap()
        .unwrap();
        decode::<VhostUserU64>(&r).value
    }

    fn get_u64(&self, code: u32) -> u64 {
        let r = test_util::request(&self.0, code, 0, &[], &[], true)
            .unwrap()
            .unwrap();
        decode::<VhostUserU64>(&r).value
    }

    fn state(&self, code: u32, index: u32, num: u32, reply: bool) -> Option<Vec<u8>> {
        let flags = if reply { FLAG_NEED_REPLY } else { 0 };
        let want = reply || code == req::GET_VRING_BASE;
        test_util::request(
            &self.0,
            code,
            flags,
            VhostUserVringState::new(index, num).as_slice(),
            &[],
            want,
        )
        .unwrap()
    }
}

fn decode<T: ByteValued + Default>(b: &[u8]) -> T {
    let mut v = T::default();
    v.as_mut_slice().copy_from_slice(b);
    v
}

fn ack_value(r: Option<Vec<u8>>) -> u64 {
    decode::<VhostUserU64>(&r.unwrap()).value
}

fn raw_server(device: Arc<TestDevice>) -> (Raw, JoinHandle<VuResult<()>>) {
    let (a, b) = UnixStream::pair().unwrap();
    let mut server = Server::new(
        FrontendSocket::Connected(b),
        device,
        ServerConfig::default(),
    )
    .unwrap();
    let t = std::thread::spawn(move || server.serve());
    (Raw(a), t)
}

#[test]
fn raw_32bit_packed_base_status_and_reset_device() {
    let device = TestDevice::new(false);
    let (raw, t) = raw_server(device.clone());
    let f = raw.get_u64(req::GET_FEATURES);
    // SET_FEATURES before REPLY_ACK is negotiated: no reply.
    test_util::request(
        &raw.0,
        req::SET_FEATURES,
        0,
        VhostUserU64::new(f).as_slice(),
        &[],
        false,
    )
    .unwrap();
    let pf = raw.get_u64(req::GET_PROTOCOL_FEATURES);
    assert_eq!(raw.u64_req(req::SET_PROTOCOL_FEATURES, pf), 0);
    // A packed base with both halves and wrap bits round-trips unchanged.
    assert_eq!(
        ack_value(raw.state(req::SET_VRING_BASE, 1, 0x8005_0003, true)),
        0
    );
    let r = raw.state(req::GET_VRING_BASE, 1, 0, false).unwrap();
    let s: VhostUserVringState = decode(&r);
    let (index, num) = (s.index, s.num);
    assert_eq!((index, num), (1, 0x8005_0003));
    // STATUS.
    assert_eq!(raw.u64_req(req::SET_STATUS, 0xf), 0);
    assert_eq!(raw.get_u64(req::GET_STATUS), 0xf);
    assert_ne!(raw.u64_req(req::SET_STATUS, 0x1ff), 0, "status is one byte");
    // RESET_DEVICE forgets ring state and features.
    test_util::request(&raw.0, req::RESET_DEVICE, FLAG_NEED_REPLY, &[], &[], true).unwrap();
    assert_eq!(raw.get_u64(req::GET_STATUS), 0);
    let r = raw.state(req::GET_VRING_BASE, 1, 0, false).unwrap();
    let s: VhostUserVringState = decode(&r);
    let num = s.num;
    assert_eq!(num, 0);
    assert_eq!(device.resets.load(Ordering::Acquire), 1);
    // A split ring's base must fit 16 bits once the split layout is negotiated.
    test_util::request(
        &raw.0,
        req::SET_FEATURES,
        FLAG_NEED_REPLY,
        VhostUserU64::new(VHOST_USER_F_PROTOCOL_FEATURES).as_slice(),
        &[],
        true,
    )
    .unwrap();
    assert_ne!(
        ack_value(raw.state(req::SET_VRING_BASE, 0, 0x1_0000, true)),
        0
    );
    // GET_CONFIG outside the config space: a config header with size 0 and no payload.
    let mut cfg =
        vhost::vhost_user::message::VhostUserConfig::new(4, 8, VhostUserConfigFlags::WRITABLE)
            .as_slice()
            .to_vec();
    cfg.extend_from_slice(&[0u8; 8]);
    let r = test_util::request(&raw.0, req::GET_CONFIG, 0, &cfg, &[], true)
        .unwrap()
        .unwrap();
    assert_eq!(r.len(), 12);
    assert_eq!(&r[4..8], &0u32.to_ne_bytes());
    // Unknown request: refused with a REPLY_ACK failure, the connection stays.
    let r = test_util::request(&raw.0, 99, FLAG_NEED_REPLY, &[], &[], true).unwrap();
    assert_ne!(ack_value(r), 0);
    assert_eq!(raw.get_u64(req::GET_QUEUE_NUM), 2);
    drop(raw);
    t.join().unwrap().unwrap();
}

/// QEMU's vhost-user-net (hw/net/vhost_net.c, vhost_net_start) restores the rings'
/// enable state with SET_VRING_ENABLE before SET_FEATURES: protocol features are
/// negotiated once offered and SET_PROTOCOL_FEATURES followed, so it is accepted. Without
/// that negotiation it is still refused (vhost-user.rst, SET_VRING_ENABLE).
#[test]
fn set_vring_enable_before_set_features_after_protocol_negotiation() {
    let device = TestDevice::new(false);
    let (raw, t) = raw_server(device.clone());
    let _ = raw.get_u64(req::GET_FEATURES);
    // Before SET_PROTOCOL_FEATURES (no REPLY_ACK yet): refused, which closes nothing;
    // GET_QUEUE_NUM still answers.
    raw.state(req::SET_VRING_ENABLE, 0, 1, false);
    assert_eq!(raw.get_u64(req::GET_QUEUE_NUM), 2);
    let pf = raw.get_u64(req::GET_PROTOCOL_FEATURES);
    assert_eq!(raw.u64_req(req::SET_PROTOCOL_FEATURES, pf), 0);
    assert_eq!(
        ack_value(raw.state(req::SET_VRING_ENABLE, 0, 1, true)),
        0,
        "SET_VRING_ENABLE after protocol negotiation, before SET_FEATURES"
    );
    assert_eq!(ack_value(raw.state(req::SET_VRING_ENABLE, 1, 0, true)), 0);
    assert_ne!(
        ack_value(raw.state(req::SET_VRING_ENABLE, 0, 2, true)),
        0,
        "the value must be 0 or 1"
    );
    // RESET_DEVICE keeps the protocol features (REPLY_ACK still answers).
    test_util::request(&raw.0, req::RESET_DEVICE, FLAG_NEED_REPLY, &[], &[], true).unwrap();
    assert_eq!(ack_value(raw.state(req::SET_VRING_ENABLE, 0, 1, true)), 0);
    drop(raw);
    t.join().unwrap().unwrap();
}

#[test]
fn invalid_requests_are_refused_without_panic() {
    let device = TestDevice::new(false);
    let mem = default_mem();
    let (mut fe, _n, t) = spawn_server(device.clone(), ServerConfig::default());
    negotiate(&mut fe, 0, &mem);
    // Queue index out of range (the device has 2 queues).
    assert!(fe.set_vring_num(5, QSIZE).is_err());
    assert!(fe.set_vring_base(2, 0).is_err());
    // Split sizes must be powers of 2, and at most the device's maximum.
    assert!(fe.set_vring_num(0, 100).is_err());
    assert!(fe.set_vring_num(0, 512).is_err());
    assert!(fe.set_vring_num(0, 0).is_err());
    // Ring addresses outside the memory table.
    let ring = TestRing::new(0, RingLayout::Split, &mem);
    let mut bad = ring.config_data(&mem);
    bad.used_ring_addr = 0x10;
    assert!(fe.set_vring_addr(0, &bad).is_err());
    // A read-only config byte.
    assert!(fe
        .set_config(1, VhostUserConfigFlags::WRITABLE, &[1])
        .is_err());
    // The connection still works.
    ring.setup(&mut fe, &mem);
    let mut ring = ring;
    let at = ring.next_buf;
    let id = ring.send(&mem, b"still alive");
    ring.receive(&mem, id, b"still alive", at);
    // GET_VRING_BASE for a queue that does not exist: the frontend would wait for a
    // reply that cannot say "failed", so the connection is closed.
    assert!(fe.get_vring_base(5).is_err());
    assert!(matches!(
        t.join().unwrap(),
        Err(Error::InvalidQueueIndex { index: 5, .. })
    ));
    assert_eq!(device.resets.load(Ordering::Acquire), 1);
}

#[test]
fn set_mem_table_with_oversized_payload_is_accepted() {
    // user-mode Linux sends a payload sized for 8 regions while declaring 1.
    let device = TestDevice::new(false);
    let (raw, t) = raw_server(device);
    let mem = default_mem();
    let info = mem.region_info(0);
    let mut body = Vec::new();
    body.extend_from_slice(&1u32.to_ne_bytes());
    body.extend_from_slice(&0u32.to_ne_bytes());
    for i in 0..8 {
        let r = if i == 0 {
            vhost::vhost_user::message::VhostUserMemoryRegion::new(
                info.guest_phys_addr,
                info.memory_size,
                info.userspace_addr,
                0,
            )
        } else {
            vhost::vhost_user::message::VhostUserMemoryRegion::default()
        };
        body.extend_from_slice(r.as_slice());
    }
    let f = raw.get_u64(req::GET_FEATURES);
    test_util::request(
        &raw.0,
        req::SET_FEATURES,
        0,
        VhostUserU64::new(f).as_slice(),
        &[],
        false,
    )
    .unwrap();
    let pf = raw.get_u64(req::GET_PROTOCOL_FEATURES);
    raw.u64_req(req::SET_PROTOCOL_FEATURES, pf);
    let r = test_util::request(
        &raw.0,
        req::SET_MEM_TABLE,
        FLAG_NEED_REPLY,
        &body,
        &[info.mmap_handle],
        true,
    )
    .unwrap();
    assert_eq!(ack_value(r), 0);
    // Two fds for one declared region: refused.
    let r = test_util::request(
        &raw.0,
        req::SET_MEM_TABLE,
        FLAG_NEED_REPLY,
        &body,
        &[info.mmap_handle, info.mmap_handle],
        true,
    )
    .unwrap();
    assert_ne!(ack_value(r), 0);
    drop(raw);
    t.join().unwrap().unwrap();
}

#[test]
fn reconnect_after_disconnect_on_the_same_socket() {
    let dir = std::env::temp_dir().join(format!(
        "vu-reconnect-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dev.sock");
    let device = TestDevice::new(false);
    let mut server = Server::bind(&path, device.clone(), ServerConfig::default()).unwrap();
    let stop = server.shutdown_handle();
    let t = std::thread::spawn(move || server.serve());
    let mem = default_mem();
    for round in 0..3u8 {
        let mut fe = Frontend::connect(&path, 8).unwrap();
        negotiate(&mut fe, if round == 1 { RING_PACKED } else { 0 }, &mem);
        let layout = if round == 1 {
            RingLayout::Packed
        } else {
            RingLayout::Split
        };
        let mut ring = TestRing::new(0, layout, &mem);
        ring.setup(&mut fe, &mem);
        let at = ring.next_buf;
        let id = ring.send(&mem, &[round; 32]);
        ring.receive(&mem, id, &[round; 32], at);
        // Disconnect with the ring running.
        drop(fe);
        let start = Instant::now();
        while device.resets.load(Ordering::Acquire) < usize::from(round) + 1 {
            assert!(
                start.elapsed() < TIMEOUT,
                "device not reset after disconnect"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    stop.shutdown();
    t.join().unwrap().unwrap();
    assert!(
        !path.exists(),
        "socket file removed when the server is dropped"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shutdown_closes_a_live_connection() {
    let dir = std::env::temp_dir().join(format!("vu-shutdown-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dev.sock");
    let device = TestDevice::new(false);
    let mut server = Server::bind(&path, device.clone(), ServerConfig::default()).unwrap();
    let stop = server.shutdown_handle();
    let t = std::thread::spawn(move || server.serve());
    let mem = default_mem();
    let mut fe = Frontend::connect(&path, 8).unwrap();
    negotiate(&mut fe, 0, &mem);
    let ring = TestRing::new(0, RingLayout::Split, &mem);
    ring.setup(&mut fe, &mem);
    stop.shutdown();
    t.join().unwrap().unwrap();
    assert_eq!(device.resets.load(Ordering::Acquire), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn get_vring_base_waits_for_in_flight_requests() {
    let device = TestDevice::new(true);
    let mem = default_mem();
    let (mut fe, _n, t) = spawn_server(device.clone(), ServerConfig::default());
    negotiate(&mut fe, 0, &mem);
    let mut ring = TestRing::new(0, RingLayout::Split, &mem);
    ring.setup(&mut fe, &mem);
    let at0 = ring.next_buf;
    let a = ring.send(&mem, b"first");
    let at1 = ring.next_buf;
    let b = ring.send(&mem, b"second");
    device.wait_held(2);
    let d = device.clone();
    let completer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        d.complete(0);
    });
    let start = Instant::now();
    let base = fe.get_vring_base(0).unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(90),
        "GET_VRING_BASE did not wait"
    );
    assert_eq!(base, 2);
    completer.join().unwrap();
    // Both chains are in the used ring.
    ring.receive(&mem, a, b"first", at0);
    ring.receive(&mem, b, b"second", at1);
    drop(fe);
    t.join().unwrap().unwrap();
}

/// Maps an inflight fd (as the frontend would keep it).
struct InflightMap {
    ptr: *mut u8,
    len: usize,
}

impl InflightMap {
    fn new(fd: &File, len: u64) -> Self {
        let len = usize::try_from(len).unwrap();
        // SAFETY: fresh shared mapping of the whole memfd; checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        InflightMap {
            ptr: ptr.cast(),
            len,
        }
    }

    fn u8(&self, off: usize) -> u8 {
        assert!(off < self.len);
        // SAFETY: in bounds of the mapping.
        unsafe { self.ptr.add(off).read_volatile() }
    }

    fn u16(&self, off: usize) -> u16 {
        u16::from(self.u8(off)) | (u16::from(self.u8(off + 1)) << 8)
    }
}

impl Drop for InflightMap {
    fn drop(&mut self) {
        // SAFETY: our mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn inflight_test(layout: RingLayout) {
    let device = TestDevice::new(true);
    let mem = default_mem();
    let (mut fe, _n, t) = spawn_server(device.clone(), ServerConfig::default());
    let extra = if layout == RingLayout::Packed {
        RING_PACKED
    } else {
        0
    };
    negotiate(&mut fe, extra, &mem);
    let (info, file) = fe
        .get_inflight_fd(&VhostUserInflight::new(0, 0, 2, QSIZE))
        .unwrap();
    let size = info.mmap_size;
    assert_eq!(size, 2 * inflight::queue_stride(QSIZE));
    assert_eq!(info.num_queues, 2);
    fe.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
    let map = InflightMap::new(&file, size);
    let mut ring = TestRing::new(0, layout, &mem);
    ring.setup(&mut fe, &mem);
    let at0 = ring.next_buf;
    let a = ring.send(&mem, b"one");
    let at1 = ring.next_buf;
    let b = ring.send(&mem, b"two");
    device.wait_held(2);
    match layout {
        RingLayout::Split => {
            // QueueRegionSplit of queue 0: version 1, desc_num, DescStateSplit per head.
            assert_eq!(map.u16(8), 1);
            assert_eq!(map.u16(10), QSIZE);
            let d = |i: u16| 16 + 16 * usize::from(i);
            assert_eq!(map.u8(d(a)), 1, "head {a} recorded in flight");
            assert_eq!(map.u8(d(b)), 1, "head {b} recorded in flight");
            device.complete(0);
            ring.receive(&mem, a, b"one", at0);
            ring.receive(&mem, b, b"two", at1);
            wait_until("inflight flags cleared", || {
                map.u8(d(a)) == 0 && map.u8(d(b)) == 0
            });
            assert_eq!(map.u16(14), 2, "used_idx");
        }
        RingLayout::Packed => {
            // QueueRegionPacked: version, desc_num, free_head, old_free_head, used_idx...
            assert_eq!(map.u16(8), 1);
            assert_eq!(map.u16(10), QSIZE);
            let d = |i: usize| 32 + 32 * i;
            // Two chains of 2 descriptors: entries 0..4, heads 0 and 2.
            assert_eq!(map.u8(d(0)), 1);
            assert_eq!(map.u8(d(2)), 1);
            assert_eq!(map.u16(d(0) + 6), 2, "num");
            assert_eq!(map.u16(d(1) + 16), a, "buffer id in the last descriptor");
            assert_eq!(map.u16(12), 4, "free_head");
            device.complete(0);
            ring.receive(&mem, a, b"one", at0);
            ring.receive(&mem, b, b"two", at1);
            wait_until("inflight flags cleared", || {
                map.u8(d(0)) == 0 && map.u8(d(2)) == 0
            });
            assert_eq!(map.u16(16), 4, "used_idx");
            assert_eq!(map.u16(18), 4, "old_used_idx");
            assert_eq!(map.u8(20), 1, "used wrap counter");
        }
    }
    drop(fe);
    t.join().unwrap().unwrap();
}

#[test]
fn inflight_split_set_and_cleared() {
    inflight_test(RingLayout::Split);
}

#[test]
fn inflight_packed_set_and_cleared() {
    inflight_test(RingLayout::Packed);
}

/// A backend restart with requests in flight: the first instance completes one chain,
/// pops two more and dies holding them; the frontend keeps the inflight area and restarts
/// the ring on a new instance with a base that does not cover them (split: the used
/// index, what QEMU sends when GET_VRING_BASE failed; packed: the base it first sent,
/// since QEMU keeps no used index for packed rings). The new instance's handler gets the
/// two through its ordinary pop, first and in fetch order, and new chains follow.
fn restart_resubmits_inflight_requests(layout: RingLayout) {
    let extra = if layout == RingLayout::Packed {
        RING_PACKED
    } else {
        0
    };
    let device = TestDevice::new(true);
    let mem = default_mem();
    let config = ServerConfig {
        drain_timeout: Duration::from_millis(50),
        ..ServerConfig::default()
    };
    let (mut fe, _n, t) = spawn_server(device.clone(), config.clone());
    negotiate(&mut fe, extra, &mem);
    let (info, file) = fe
        .get_inflight_fd(&VhostUserInflight::new(0, 0, 2, QSIZE))
        .unwrap();
    fe.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
    let mut ring = TestRing::new(0, layout, &mem);
    ring.setup(&mut fe, &mem);
    let at_done = ring.next_buf;
    let done = ring.send(&mem, b"completed before the crash");
    device.wait_held(1);
    device.complete(0);
    ring.receive(&mem, done, b"completed before the crash", at_done);
    let at_a = ring.next_buf;
    let a = ring.send(&mem, b"lost one");
    let at_b = ring.next_buf;
    let b = ring.send(&mem, b"lost two");
    device.wait_held(2);
    drop(fe);
    t.join().unwrap().unwrap();

    // Second instance: an echo device that knows nothing of recovery.
    let device2 = TestDevice::new(false);
    let (mut fe, _n, t) = spawn_server(device2.clone(), config);
    negotiate(&mut fe, extra, &mem);
    fe.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
    ring.kick = EventFd::new(EFD_NONBLOCK).unwrap();
    ring.setup(&mut fe, &mem);
    // Resubmitted first, in fetch order, exactly once.
    ring.receive(&mem, a, b"lost one", at_a);
    ring.receive(&mem, b, b"lost two", at_b);
    let at_c = ring.next_buf;
    let c = ring.send(&mem, b"after the restart");
    ring.receive(&mem, c, b"after the restart", at_c);
    assert_eq!(
        ring.driver.pop_used(&mem.mem).unwrap(),
        None,
        "no duplicates"
    );
    // The ring went on from where the first instance stopped: four chains popped.
    let base = fe.get_vring_base(0).unwrap();
    let expected = match layout {
        RingLayout::Split => 4,
        // Four 2-descriptor chains: slot 8 of wrap 1 for both positions.
        RingLayout::Packed => 8 | 1 << 15 | 8 << 16 | 1 << 31,
    };
    assert_eq!(base, expected, "ring base after recovery");
    drop(fe);
    t.join().unwrap().unwrap();
}

#[test]
fn restart_resubmits_inflight_requests_split() {
    restart_resubmits_inflight_requests(RingLayout::Split);
}

#[test]
fn restart_resubmits_inflight_requests_packed() {
    restart_resubmits_inflight_requests(RingLayout::Packed);
}

/// DPDK's virtio_user sends a packed base in 16 bits: `0x8000` for a fresh ring, and
/// after a stop only the avail half of what GET_VRING_BASE answered. Both must leave the
/// used position equal to the avail one, or completions carry the wrong wrap counter and
/// the driver never sees them.
#[test]
fn packed_ring_base_in_16_bits_serves_requests_and_restarts() {
    let device = TestDevice::new(false);
    let mem = default_mem();
    let (mut fe, _n, t) = spawn_server(device.clone(), ServerConfig::default());
    negotiate(&mut fe, RING_PACKED, &mem);
    let mut ring = TestRing::new(0, RingLayout::Packed, &mem);
    ring.setup_with_base(&mut fe, &mem, 0x8000);
    // More than a lap, so the restart below happens in wrap 0.
    for k in 0..QSIZE / 2 + 3 {
        let data = format!("request {k}");
        let at = ring.next_buf;
        let id = ring.send(&mem, data.as_bytes());
        ring.receive(&mem, id, data.as_bytes(), at);
    }
    // GET_VRING_BASE answers all 32 bits: 11 chains of 2 slots = 22 = 6 into wrap 0.
    let base = fe.get_vring_base(0).unwrap();
    assert_eq!(base, 6 | 6 << 16);
    // Restart as DPDK does, with the avail half only.
    ring.kick = EventFd::new(EFD_NONBLOCK).unwrap();
    ring.setup_with_base(&mut fe, &mem, u16::try_from(base & 0xffff).unwrap());
    for k in 0..3 {
        let data = format!("after restart {k}");
        let at = ring.next_buf;
        let id = ring.send(&mem, data.as_bytes());
        ring.receive(&mem, id, data.as_bytes(), at);
    }
    assert_eq!(fe.get_vring_base(0).unwrap(), 12 | 12 << 16);
    drop(fe);
    t.join().unwrap().unwrap();
}

#[test]
fn config_space_and_change_notification() {
    let device = TestDevice::new(false);
    let mem = default_mem();
    let (mut fe, notifier, t) = spawn_server(device.clone(), ServerConfig::default());
    // No backend channel yet.
    assert!(matches!(
        notifier.notify_config_change(),
        Err(Error::NoBackendChannel)
    ));
    negotiate(&mut fe, 0, &mem);
    let (_, payload) = fe
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
        .unwrap();
    assert_eq!(&payload, b"vhostcfg");
    fe.set_config(0, VhostUserConfigFlags::WRITABLE, b"V")
        .unwrap();
    let (_, payload) = fe
        .get_config(0, 2, VhostUserConfigFlags::WRITABLE, &[0u8; 2])
        .unwrap();
    assert_eq!(&payload, b"Vh");
    // Backend channel: the daemon's notifier reaches the frontend, which acks.
    let (ours, theirs) = UnixStream::pair().unwrap();
    fe.set_backend_request_fd(&theirs).unwrap();
    drop(theirs);
    let n2 = notifier.clone();
    let sender = std::thread::spawn(move || n2.notify_config_change());
    let (request, flags, payload) = test_util::read_message(&ours).unwrap();
    assert_eq!(request, 2, "BACKEND_CONFIG_CHANGE_MSG");
    assert_ne!(flags & FLAG_NEED_REPLY, 0, "REPLY_ACK was negotiated");
    assert!(payload.is_empty());
    test_util::write_reply(&ours, 2, VhostUserU64::new(0).as_slice()).unwrap();
    sender.join().unwrap().unwrap();
    // A refusal from the frontend is reported.
    let n3 = notifier.clone();
    let sender = std::thread::spawn(move || n3.notify_config_change());
    let _ = test_util::read_message(&ours).unwrap();
    test_util::write_reply(&ours, 2, VhostUserU64::new(1).as_slice()).unwrap();
    assert!(matches!(
        sender.join().unwrap(),
        Err(Error::BackendRequestRefused(_))
    ));
    drop(fe);
    t.join().unwrap().unwrap();
    // The channel belonged to the closed connection.
    assert!(matches!(
        notifier.notify_config_change(),
        Err(Error::NoBackendChannel)
    ));
}

#[test]
fn memory_regions_added_and_removed_while_running() {
    let device = TestDevice::new(false);
    // Region 0: rings and first buffers. Region 1 (added later): more buffers.
    let mem = GuestMem::new(&[(0, MEM_SIZE), (0x4000_0000, 0x10000)]);
    let (mut fe, _n, t) = spawn_server(device.clone(), ServerConfig::default());
    fe.set_owner().unwrap();
    let f = fe.get_features().unwrap();
    fe.set_features(f & !RING_PACKED).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(pf).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.add_mem_region(&mem.region_info(0)).unwrap();
    let mut ring = TestRing::new(0, RingLayout::Split, &mem);
    ring.setup(&mut fe, &mem);
    let at = ring.next_buf;
    let id = ring.send(&mem, b"low memory");
    ring.receive(&mem, id, b"low memory", at);
    // Once the region is added, the running worker translates buffers in it.
    fe.add_mem_region(&mem.region_info(1)).unwrap();
    let id = ring.send_at(&mem, b"high memory", Some(0x4000_0000));
    ring.receive(&mem, id, b"high memory", 0x4000_0000);
    fe.remove_mem_region(&mem.region_info(1)).unwrap();
    assert!(
        fe.remove_mem_region(&mem.region_info(1)).is_err(),
        "already removed"
    );
    let at = ring.next_buf;
    let id = ring.send(&mem, b"low again");
    ring.receive(&mem, id, b"low again", at);
    drop(fe);
    t.join().unwrap().unwrap();
}

#[test]
fn broken_queue_reports_needs_reset_and_other_queues_keep_going() {
    let device = TestDevice::new(false);
    let mem = default_mem();
    let (mut fe, _n, t) = spawn_server(device.clone(), ServerConfig::default());
    negotiate(&mut fe, 0, &mem);
    let mut q0 = TestRing::new(0, RingLayout::Split, &mem);
    let mut q1 = TestRing::new(1, RingLayout::Split, &mem);
    let err = EventFd::new(EFD_NONBLOCK).unwrap();
    q0.setup(&mut fe, &mem);
    q1.setup(&mut fe, &mem);
    fe.set_vring_err(0, &err).unwrap();
    // A chain whose writable buffer crosses the end of guest memory breaks queue 0.
    q0.send_at(&mem, b"xy", Some(MEM_SIZE as u64 - 0x801));
    wait_signal(&err);
    let at = q1.next_buf;
    let id = q1.send(&mem, b"queue 1 still runs");
    q1.receive(&mem, id, b"queue 1 still runs", at);
    drop(fe);
    t.join().unwrap().unwrap();
}

#[test]
fn ring_waits_for_kick_and_protocol_enable_rules() {
    let device = TestDevice::new(false);
    let mem = default_mem();
    let (mut fe, _n, t) = spawn_server(device.clone(), ServerConfig::default());
    negotiate(&mut fe, 0, &mem);
    let mut ring = TestRing::new(0, RingLayout::Split, &mem);
    fe.set_vring_num(0, QSIZE).unwrap();
    fe.set_vring_base(0, 0).unwrap();
    fe.set_vring_addr(0, &ring.config_data(&mem)).unwrap();
    fe.set_vring_call(0, &ring.call).unwrap();
    assert_eq!(
        device.started.load(Ordering::Acquire),
        0,
        "no kick fd: not started"
    );
    fe.set_vring_kick(0, &ring.kick).unwrap();
    assert_eq!(device.started.load(Ordering::Acquire), 1);
    // PROTOCOL_FEATURES negotiated: the ring starts disabled.
    let at = ring.next_buf;
    let id = ring.send(&mem, b"wait for enable");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(ring.driver.pop_used(&mem.mem).unwrap(), None);
    fe.set_vring_enable(0, true).unwrap();
    ring.receive(&mem, id, b"wait for enable", at);
    drop(fe);
    t.join().unwrap().unwrap();
}

#[test]
fn rings_start_enabled_without_protocol_features() {
    let device = TestDevice::new(false);
    let mem = default_mem();
    let (fe, _n, t) = spawn_server(device.clone(), ServerConfig::default());
    fe.set_owner().unwrap();
    fe.get_features().unwrap();
    fe.set_features(VERSION_1 | EVENT_IDX).unwrap();
    fe.set_mem_table(&mem.regions()).unwrap();
    let mut ring = TestRing::new(0, RingLayout::Split, &mem);
    fe.set_vring_num(0, QSIZE).unwrap();
    fe.set_vring_base(0, 0).unwrap();
    fe.set_vring_addr(0, &ring.config_data(&mem)).unwrap();
    fe.set_vring_call(0, &ring.call).unwrap();
    fe.set_vring_kick(0, &ring.kick).unwrap();
    let at = ring.next_buf;
    let id = ring.send(&mem, b"enabled at start");
    ring.receive(&mem, id, b"enabled at start", at);
    drop(fe);
    t.join().unwrap().unwrap();
}

mod device_api;
mod hostile;
