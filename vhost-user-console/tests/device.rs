// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The console device served by virtio-core's `Server` on a unix socket, driven by the
//! `vhost` crate's `Frontend` and a userspace driver (`virtio_core::driver`) on memfd
//! guest memory; host sides are socket servers the test connects to as a client.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "test code"
)]

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_console::cli::{ConsoleArgs, PortSpec};
use vhost_user_console::config::{
    feature_mask, VIRTIO_CONSOLE_F_EMERG_WRITE, VIRTIO_CONSOLE_F_MULTIPORT, VIRTIO_CONSOLE_F_SIZE,
};
use vhost_user_console::control::{
    DriverMessage, VIRTIO_CONSOLE_CONSOLE_PORT, VIRTIO_CONSOLE_DEVICE_ADD,
    VIRTIO_CONSOLE_PORT_NAME, VIRTIO_CONSOLE_PORT_OPEN, VIRTIO_CONSOLE_RESIZE,
};
use vhost_user_console::{ConsoleDevice, HostLocation, HostPorts};
use virtio_core::driver::{DriverBuffer, DriverQueue};
use virtio_core::vhost_user::{
    Device, Server, ServerConfig, ShutdownHandle, VHOST_USER_F_PROTOCOL_FEATURES,
};
use virtio_core::RingLayout;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const VERSION_1: u64 = 1 << 32;
const RING_PACKED: u64 = 1 << 34;
const EVENT_IDX: u64 = 1 << 29;
const INDIRECT: u64 = 1 << 28;
const QSIZE: u16 = 64;
const MEM_SIZE: usize = 8 << 20;
const BUF: u32 = 4096;
const TIMEOUT: Duration = Duration::from_secs(20);

// ---- set-up ----

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "vcon-test-{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn args(ports: &[&str]) -> ConsoleArgs {
    ConsoleArgs {
        ports: ports
            .iter()
            .map(|p| p.parse::<PortSpec>().unwrap())
            .collect(),
        log_size: 1 << 20,
        log_files: 2,
        replay_bytes: 64 << 10,
        cols: None,
        rows: None,
    }
}

/// A running server on a socket path, with its device.
struct Daemon {
    path: PathBuf,
    stop: ShutdownHandle,
    thread: Option<JoinHandle<()>>,
}

impl Daemon {
    fn start(dir: &TempDir, args: &ConsoleArgs) -> (Self, Arc<ConsoleDevice>) {
        let (d, dev, _) = Self::start_with_locations(dir, args);
        (d, dev)
    }

    fn start_with_locations(
        dir: &TempDir,
        args: &ConsoleArgs,
    ) -> (Self, Arc<ConsoleDevice>, Vec<(u32, HostLocation)>) {
        let _ = env_logger::builder().is_test(true).try_init();
        let ports = HostPorts::open(args).unwrap();
        let locations = ports.locations().to_vec();
        let device = Arc::new(ConsoleDevice::new(ports).unwrap());
        let path = dir.path("vhost.sock");
        let mut server = Server::bind(
            &path,
            device.clone(),
            ServerConfig {
                thread_name: "vcon-test".into(),
                ..ServerConfig::default()
            },
        )
        .unwrap();
        let stop = server.shutdown_handle();
        device
            .set_config_notifier(server.config_notifier())
            .unwrap();
        let thread = std::thread::spawn(move || {
            if let Err(e) = server.serve() {
                panic!("server failed: {e}");
            }
        });
        (
            Daemon {
                path,
                stop,
                thread: Some(thread),
            },
            device,
            locations,
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop.shutdown();
        if let Some(t) = self.thread.take() {
            let r = t.join();
            if !std::thread::panicking() {
                r.unwrap();
            }
        }
    }
}

fn memfd(len: usize) -> File {
    // SAFETY: a valid C string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"vcon-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor nothing else owns.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(len as u64).unwrap();
    f
}

/// One guest ring: the driver side and its eventfds, and the buffers it posted.
struct Ring {
    index: u16,
    driver: DriverQueue,
    kick: EventFd,
    call: EventFd,
    /// Guest address of each chain in flight, by id.
    addrs: HashMap<u16, u64>,
    free: Vec<u64>,
}

/// A connected frontend: guest memory, rings, the `vhost` frontend.
struct Guest {
    fe: Frontend,
    mem: GuestMemoryMmap<()>,
    _file: File,
    rings: Vec<Ring>,
    features: u64,
}

impl Guest {
    /// Connects, negotiates (`layout`, every feature the device offers that the test
    /// knows) and starts every queue.
    fn connect(path: &Path, layout: RingLayout) -> Self {
        let file = memfd(MEM_SIZE);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        let mut fe = Frontend::connect(path, 64).unwrap();
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        let known = VERSION_1
            | EVENT_IDX
            | INDIRECT
            | feature_mask(VIRTIO_CONSOLE_F_SIZE)
            | feature_mask(VIRTIO_CONSOLE_F_MULTIPORT)
            | feature_mask(VIRTIO_CONSOLE_F_EMERG_WRITE)
            | if layout == RingLayout::Packed {
                RING_PACKED
            } else {
                0
            };
        assert_eq!(offered & VERSION_1, VERSION_1);
        let features = offered & known;
        fe.set_features(features | VHOST_USER_F_PROTOCOL_FEATURES)
            .unwrap();
        let pf = fe.get_protocol_features().unwrap();
        assert!(pf.contains(VhostUserProtocolFeatures::CONFIG));
        fe.set_protocol_features(
            pf & (VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::BACKEND_REQ),
        )
        .unwrap();
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let region = mem.iter().next().unwrap();
        let info = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: region.len(),
            userspace_addr: region.get_host_address(MemoryRegionAddress(0)).unwrap() as u64,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        };
        fe.set_mem_table(&[info]).unwrap();
        let nq = fe.get_queue_num().unwrap() as u16;
        let mut rings = Vec::new();
        for index in 0..nq {
            let base = 0x10000 * (u64::from(index) + 1);
            let driver = DriverQueue::new(layout, QSIZE, base, features & EVENT_IDX != 0);
            driver.init(&mem).unwrap();
            let bufs = 0x100000 + u64::from(index) * u64::from(QSIZE) * u64::from(BUF);
            let ring = Ring {
                index,
                driver,
                kick: EventFd::new(EFD_NONBLOCK).unwrap(),
                call: EventFd::new(EFD_NONBLOCK).unwrap(),
                addrs: HashMap::new(),
                free: (0..u64::from(QSIZE))
                    .rev()
                    .map(|k| bufs + k * u64::from(BUF))
                    .collect(),
            };
            let user = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
            let i = usize::from(index);
            fe.set_vring_num(i, QSIZE).unwrap();
            fe.set_vring_base(i, 0).unwrap();
            fe.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: QSIZE,
                    queue_size: QSIZE,
                    flags: 0,
                    desc_table_addr: user(ring.driver.desc_table()),
                    used_ring_addr: user(ring.driver.device_area()),
                    avail_ring_addr: user(ring.driver.driver_area()),
                    log_addr: None,
                },
            )
            .unwrap();
            fe.set_vring_kick(i, &ring.kick).unwrap();
            fe.set_vring_call(i, &ring.call).unwrap();
            fe.set_vring_enable(i, true).unwrap();
            rings.push(ring);
        }
        Guest {
            fe,
            mem,
            _file: file,
            rings,
            features,
        }
    }

    /// Posts one writable buffer of `BUF` bytes on queue `q`.
    fn post_rx(&mut self, q: u16) -> u16 {
        self.post_rx_len(q, BUF)
    }

    /// Posts one writable buffer of `len` (at most `BUF`) bytes on queue `q`.
    fn post_rx_len(&mut self, q: u16, len: u32) -> u16 {
        assert!(len <= BUF);
        let ring = &mut self.rings[usize::from(q)];
        let addr = ring.free.pop().expect("a free buffer");
        let id = ring
            .driver
            .add_chain(
                &self.mem,
                &[DriverBuffer {
                    addr,
                    len,
                    writable: true,
                }],
            )
            .unwrap();
        ring.addrs.insert(id, addr);
        ring.kick.write(1).unwrap();
        id
    }

    /// Posts `data` (at most `BUF` bytes) as one readable buffer on queue `q`.
    fn send(&mut self, q: u16, data: &[u8]) -> u16 {
        assert!(data.len() <= BUF as usize);
        let ring = &mut self.rings[usize::from(q)];
        let addr = ring.free.pop().expect("a free buffer");
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
        let id = ring
            .driver
            .add_chain(
                &self.mem,
                &[DriverBuffer {
                    addr,
                    len: data.len() as u32,
                    writable: false,
                }],
            )
            .unwrap();
        ring.addrs.insert(id, addr);
        ring.kick.write(1).unwrap();
        id
    }

    /// Takes one used chain of queue `q` if there is one: its id and the bytes written.
    fn try_used(&mut self, q: u16) -> Option<(u16, Vec<u8>)> {
        let ring = &mut self.rings[usize::from(q)];
        let (id, len) = ring.driver.pop_used(&self.mem).unwrap()?;
        let addr = ring
            .addrs
            .remove(&id)
            .expect("a used chain the driver posted");
        ring.free.push(addr);
        let mut data = vec![0u8; len as usize];
        self.mem.read_slice(&mut data, GuestAddress(addr)).unwrap();
        Some((id, data))
    }

    /// Waits for one used chain of queue `q`.
    fn used(&mut self, q: u16) -> (u16, Vec<u8>) {
        let start = Instant::now();
        loop {
            if let Some(u) = self.try_used(q) {
                return u;
            }
            assert!(start.elapsed() < TIMEOUT, "queue {q}: no used chain");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Asserts that queue `q` returns nothing within `d`.
    fn no_used_for(&mut self, q: u16, d: Duration) {
        std::thread::sleep(d);
        let ring = &mut self.rings[usize::from(q)];
        assert_eq!(ring.driver.pop_used(&self.mem).unwrap(), None, "queue {q}");
    }

    /// Receives `len` bytes of host input on receiveq `q`, keeping `depth` buffers posted.
    fn receive(&mut self, q: u16, len: usize, depth: usize) -> Vec<u8> {
        let mut got = Vec::with_capacity(len);
        let mut posted = 0;
        let start = Instant::now();
        while got.len() < len {
            while posted < depth {
                self.post_rx(q);
                posted += 1;
            }
            match self.try_used(q) {
                Some((_, data)) => {
                    posted -= 1;
                    got.extend_from_slice(&data);
                }
                None => {
                    assert!(
                        start.elapsed() < TIMEOUT,
                        "received {} of {len} bytes",
                        got.len()
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        got
    }

    fn ring_count(&self) -> usize {
        self.rings.len()
    }

    /// `index` of ring `i` (queue number).
    fn queue(&self, i: usize) -> u16 {
        self.rings[i].index
    }
}

/// Connects a socket client (the host-side user).
fn client(path: &Path) -> UnixStream {
    let c = UnixStream::connect(path).unwrap();
    c.set_read_timeout(Some(TIMEOUT)).unwrap();
    c
}

fn read_exactly(c: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    c.read_exact(&mut out).unwrap();
    out
}

/// Bytes that are not UTF-8, every value, and no resize escape sequence.
fn binary(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(151).wrapping_add(seed) ^ 0x80)
        .collect()
}

fn layouts() -> [RingLayout; 2] {
    [RingLayout::Split, RingLayout::Packed]
}

// ---- (a) guest to host ----

fn guest_output_case(layout: RingLayout) {
    let dir = TempDir::new("tx");
    let sock = dir.path("con0");
    let (daemon, _device) = Daemon::start(&dir, &args(&[&format!("socket={}", sock.display())]));
    let mut user = client(&sock);
    let mut guest = Guest::connect(&daemon.path, layout);
    assert_eq!(
        guest.ring_count(),
        2,
        "a single port: receiveq and transmitq"
    );
    let chunks: Vec<Vec<u8>> = (0..20u8)
        .map(|k| binary(1000 + usize::from(k), k))
        .collect();
    assert!(std::str::from_utf8(&chunks[0]).is_err());
    let mut expected = Vec::new();
    for c in &chunks {
        guest.send(1, c);
        expected.extend_from_slice(c);
        let (_, written) = guest.used(1);
        assert!(
            written.is_empty(),
            "a transmit chain is returned with used length 0"
        );
    }
    assert_eq!(read_exactly(&mut user, expected.len()), expected);
}

#[test]
fn guest_output_reaches_socket_client_byte_for_byte_split() {
    guest_output_case(layouts()[0]);
}

#[test]
fn guest_output_reaches_socket_client_byte_for_byte_packed() {
    guest_output_case(layouts()[1]);
}

// ---- (b) host to guest ----

fn host_input_case(layout: RingLayout) {
    let dir = TempDir::new("rx");
    let sock = dir.path("con0");
    let (daemon, _device) = Daemon::start(&dir, &args(&[&format!("socket={}", sock.display())]));
    let mut user = client(&sock);
    let mut guest = Guest::connect(&daemon.path, layout);
    let data = binary(50_000, 7);
    user.write_all(&data).unwrap();
    assert_eq!(guest.receive(0, data.len(), 8), data);
}

#[test]
fn host_input_reaches_guest_receive_buffers_in_order_split() {
    host_input_case(RingLayout::Split);
}

#[test]
fn host_input_reaches_guest_receive_buffers_in_order_packed() {
    host_input_case(RingLayout::Packed);
}

#[test]
fn host_input_without_receive_buffers_blocks_the_client_and_is_not_lost() {
    let dir = TempDir::new("bp");
    let sock = dir.path("con0");
    let (daemon, _device) = Daemon::start(&dir, &args(&[&format!("socket={}", sock.display())]));
    let user = client(&sock);
    let mut guest = Guest::connect(&daemon.path, RingLayout::Split);
    // Far more than the port's input buffer and the socket's kernel buffers together.
    let total = 4 << 20;
    let data = binary(total, 3);
    let written = Arc::new(AtomicUsize::new(0));
    let writer = {
        let data = data.clone();
        let written = written.clone();
        let mut user = user.try_clone().unwrap();
        std::thread::spawn(move || {
            for chunk in data.chunks(8192) {
                user.write_all(chunk).unwrap();
                written.fetch_add(chunk.len(), Ordering::Release);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let early = written.load(Ordering::Acquire);
    assert!(
        early < total,
        "the client's writes must block while the guest posts no receive buffers"
    );
    guest.no_used_for(0, Duration::from_millis(50));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        written.load(Ordering::Acquire),
        early,
        "no progress without receive buffers"
    );
    let got = guest.receive(0, total, 32);
    writer.join().unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "every byte arrives, in order");
}

// ---- (c) multiport control ----

fn control_msg(data: &[u8]) -> (u32, u16, u16, Vec<u8>) {
    assert!(data.len() >= 8, "control message of {} bytes", data.len());
    let id = u32::from_le_bytes(data[0..4].try_into().unwrap());
    let event = u16::from_le_bytes(data[4..6].try_into().unwrap());
    let value = u16::from_le_bytes(data[6..8].try_into().unwrap());
    (id, event, value, data[8..].to_vec())
}

fn send_control(guest: &mut Guest, msg: DriverMessage) {
    let mut buf = [0u8; 8];
    let n = msg.encode(&mut buf).unwrap();
    guest.send(3, &buf[..n]);
    let (_, written) = guest.used(3);
    assert!(written.is_empty());
}

fn next_control(guest: &mut Guest) -> (u32, u16, u16, Vec<u8>) {
    let (_, data) = guest.used(2);
    guest.post_rx(2);
    control_msg(&data)
}

fn multiport_case(layout: RingLayout) {
    let dir = TempDir::new("mp");
    let s0 = dir.path("con0");
    let s1 = dir.path("port1");
    let (daemon, _device) = Daemon::start(
        &dir,
        &args(&[
            &format!("name=con0,socket={}", s0.display()),
            &format!("name=org.test.port1,socket={}", s1.display()),
        ]),
    );
    let mut guest = Guest::connect(&daemon.path, layout);
    assert_ne!(guest.features & feature_mask(VIRTIO_CONSOLE_F_MULTIPORT), 0);
    assert_eq!(guest.ring_count(), 6, "§5.3.2: 2 + 2 * max_nr_ports queues");
    assert_eq!(guest.queue(4), 4);
    for _ in 0..8 {
        guest.post_rx(2);
    }
    send_control(&mut guest, DriverMessage::DeviceReady(true));
    assert_eq!(
        next_control(&mut guest),
        (0, VIRTIO_CONSOLE_DEVICE_ADD, 0, vec![])
    );
    assert_eq!(
        next_control(&mut guest),
        (1, VIRTIO_CONSOLE_DEVICE_ADD, 0, vec![])
    );
    send_control(&mut guest, DriverMessage::PortReady { id: 0, ok: true });
    assert_eq!(
        next_control(&mut guest),
        (0, VIRTIO_CONSOLE_CONSOLE_PORT, 1, vec![])
    );
    assert_eq!(
        next_control(&mut guest),
        (0, VIRTIO_CONSOLE_PORT_NAME, 1, b"con0".to_vec())
    );
    send_control(&mut guest, DriverMessage::PortReady { id: 1, ok: true });
    assert_eq!(
        next_control(&mut guest),
        (1, VIRTIO_CONSOLE_PORT_NAME, 1, b"org.test.port1".to_vec())
    );
    guest.no_used_for(2, Duration::from_millis(50));
    let mut user = client(&s1);
    assert_eq!(
        next_control(&mut guest),
        (1, VIRTIO_CONSOLE_PORT_OPEN, 1, vec![]),
        "the host client connecting opens the port"
    );
    // Port 1's data queues are 4 (receiveq) and 5 (transmitq).
    guest.send(5, b"to port 1\xff");
    guest.used(5);
    assert_eq!(read_exactly(&mut user, 10), b"to port 1\xff");
    user.write_all(b"\x00from host").unwrap();
    assert_eq!(guest.receive(4, 10, 2), b"\x00from host");
    drop(user);
    assert_eq!(
        next_control(&mut guest),
        (1, VIRTIO_CONSOLE_PORT_OPEN, 0, vec![]),
        "the host client leaving closes the port"
    );
}

#[test]
fn multiport_control_announces_ports_names_and_host_connection_split() {
    multiport_case(RingLayout::Split);
}

#[test]
fn multiport_control_announces_ports_names_and_host_connection_packed() {
    multiport_case(RingLayout::Packed);
}

#[test]
fn malformed_control_message_is_refused_and_the_device_keeps_working() {
    let dir = TempDir::new("bad");
    let (daemon, device) = Daemon::start(
        &dir,
        &args(&[
            &format!("socket={}", dir.path("a").display()),
            &format!("socket={}", dir.path("b").display()),
        ]),
    );
    let mut guest = Guest::connect(&daemon.path, RingLayout::Split);
    for _ in 0..4 {
        guest.post_rx(2);
    }
    // Unknown event, trailing bytes, a port that does not exist, too short.
    for bad in [
        &[0xff, 0xff, 0xff, 0xff, 99, 0, 1, 0][..],
        &[0, 0, 0, 0, 3, 0, 1, 0, 0][..],
        &[7, 0, 0, 0, 3, 0, 1, 0][..],
        &[1, 2, 3][..],
    ] {
        guest.send(3, bad);
        guest.used(3);
    }
    guest.no_used_for(2, Duration::from_millis(50));
    send_control(&mut guest, DriverMessage::DeviceReady(true));
    assert_eq!(next_control(&mut guest).1, VIRTIO_CONSOLE_DEVICE_ADD);
    drop(guest);
    drop(daemon);
    let errors: u64 = device
        .port_metrics()
        .iter()
        .map(|(_, m)| m.snapshot().control_errors)
        .sum();
    assert_eq!(errors, 4);
}

// ---- (d) emerg_wr ----

#[test]
fn emerg_write_through_set_config_reaches_the_host_side() {
    let dir = TempDir::new("emerg");
    let sock = dir.path("con0");
    let (daemon, _device) = Daemon::start(&dir, &args(&[&format!("socket={}", sock.display())]));
    let mut user = client(&sock);
    let mut guest = Guest::connect(&daemon.path, RingLayout::Split);
    assert_ne!(
        guest.features & feature_mask(VIRTIO_CONSOLE_F_EMERG_WRITE),
        0
    );
    guest.send(1, b"normal ");
    guest.used(1);
    assert_eq!(read_exactly(&mut user, 7), b"normal ");
    for &b in b"\xffpanic!" {
        guest
            .fe
            .set_config(8, VhostUserConfigFlags::WRITABLE, &[b, 0, 0, 0])
            .unwrap();
    }
    assert_eq!(read_exactly(&mut user, 7), b"\xffpanic!");
    // Other fields are read-only.
    assert!(guest
        .fe
        .set_config(0, VhostUserConfigFlags::WRITABLE, &[1, 0])
        .is_err());
}

#[test]
fn config_space_reports_size_and_max_nr_ports() {
    let dir = TempDir::new("cfg");
    let mut a = args(&[
        &format!("socket={}", dir.path("a").display()),
        &format!("socket={}", dir.path("b").display()),
        &format!("socket={}", dir.path("c").display()),
    ]);
    a.cols = Some(132);
    a.rows = Some(43);
    let (daemon, _device) = Daemon::start(&dir, &a);
    let mut guest = Guest::connect(&daemon.path, RingLayout::Split);
    assert_ne!(guest.features & feature_mask(VIRTIO_CONSOLE_F_SIZE), 0);
    let (_, cfg) = guest
        .fe
        .get_config(0, 12, VhostUserConfigFlags::WRITABLE, &[0; 12])
        .unwrap();
    assert_eq!(&cfg[0..2], &132u16.to_le_bytes());
    assert_eq!(&cfg[2..4], &43u16.to_le_bytes());
    assert_eq!(&cfg[4..8], &3u32.to_le_bytes());
    assert_eq!(&cfg[8..12], &[0; 4], "emerg_wr reads 0");
    // Exactly the size asked (user-mode Linux reads single fields).
    let (_, rows) = guest
        .fe
        .get_config(2, 2, VhostUserConfigFlags::WRITABLE, &[0; 2])
        .unwrap();
    assert_eq!(rows, 43u16.to_le_bytes());
}

// ---- (f) reconnection ----

#[test]
fn second_frontend_is_served_with_the_same_socket_host_side() {
    let dir = TempDir::new("reconnect");
    let sock = dir.path("con0");
    let (daemon, _device) = Daemon::start(&dir, &args(&[&format!("socket={}", sock.display())]));
    let mut user = client(&sock);
    for (round, layout) in layouts().into_iter().enumerate() {
        let mut guest = Guest::connect(&daemon.path, layout);
        let out = format!("boot {round}\r\n");
        guest.send(1, out.as_bytes());
        guest.used(1);
        assert_eq!(read_exactly(&mut user, out.len()), out.as_bytes());
        let input = binary(3000, round as u8);
        user.write_all(&input).unwrap();
        assert_eq!(guest.receive(0, input.len(), 2), input);
        drop(guest);
        // The server notices the disconnect; output in between is kept for the user.
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn output_while_no_client_is_replayed_when_one_connects() {
    let dir = TempDir::new("replay");
    let sock = dir.path("con0");
    let (daemon, _device) = Daemon::start(&dir, &args(&[&format!("socket={}", sock.display())]));
    let mut guest = Guest::connect(&daemon.path, RingLayout::Packed);
    guest.send(1, b"early bytes\x00\xff");
    guest.used(1);
    let mut user = client(&sock);
    assert_eq!(read_exactly(&mut user, 13), b"early bytes\x00\xff");
}

// ---- resize ----

#[test]
fn multiport_socket_resize_sends_resize_cols_then_rows() {
    let dir = TempDir::new("resize-mp");
    let s0 = dir.path("con0");
    let (daemon, _device) = Daemon::start(
        &dir,
        &args(&[
            &format!("socket={}", s0.display()),
            &format!("socket={}", dir.path("other").display()),
        ]),
    );
    let mut guest = Guest::connect(&daemon.path, RingLayout::Split);
    for _ in 0..8 {
        guest.post_rx(2);
    }
    send_control(&mut guest, DriverMessage::DeviceReady(true));
    next_control(&mut guest);
    next_control(&mut guest);
    send_control(&mut guest, DriverMessage::PortReady { id: 0, ok: true });
    assert_eq!(
        next_control(&mut guest),
        (0, VIRTIO_CONSOLE_CONSOLE_PORT, 1, vec![])
    );
    let mut user = client(&s0);
    assert_eq!(
        next_control(&mut guest),
        (0, VIRTIO_CONSOLE_PORT_OPEN, 1, vec![])
    );
    user.write_all(b"ab\x1b]vhost-resize;132;43\x07cd").unwrap();
    let mut payload = 132u16.to_le_bytes().to_vec();
    payload.extend_from_slice(&43u16.to_le_bytes());
    assert_eq!(
        next_control(&mut guest),
        (0, VIRTIO_CONSOLE_RESIZE, 0, payload),
        "§5.3.6.2: RESIZE carries cols, then rows"
    );
    assert_eq!(
        guest.receive(0, 4, 2),
        b"abcd",
        "the resize sequence is not guest input"
    );
}

#[test]
fn single_port_socket_resize_updates_the_config_space() {
    let dir = TempDir::new("resize-1");
    let sock = dir.path("con0");
    let mut a = args(&[&format!("socket={}", sock.display())]);
    a.cols = Some(80);
    a.rows = Some(24);
    let (daemon, device) = Daemon::start(&dir, &a);
    let mut guest = Guest::connect(&daemon.path, RingLayout::Packed);
    assert_ne!(guest.features & feature_mask(VIRTIO_CONSOLE_F_SIZE), 0);
    assert_eq!(guest.features & feature_mask(VIRTIO_CONSOLE_F_MULTIPORT), 0);
    let mut user = client(&sock);
    user.write_all(b"\x1b]vhost-resize;100;30\x07").unwrap();
    let start = Instant::now();
    loop {
        let (_, cfg) = guest
            .fe
            .get_config(0, 4, VhostUserConfigFlags::WRITABLE, &[0; 4])
            .unwrap();
        if cfg == [100, 0, 30, 0] {
            break;
        }
        assert!(start.elapsed() < TIMEOUT, "config space still {cfg:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let size = device.config_space().size();
    assert_eq!((size.cols, size.rows), (100, 30));
}

// ---- pty ----

#[test]
fn pty_port_passes_bytes_both_ways() {
    let dir = TempDir::new("pty");
    let (daemon, _device, locations) = Daemon::start_with_locations(&dir, &args(&["pty"]));
    let HostLocation::Pty(slave) = &locations[0].1 else {
        panic!("port 0 is not a pty: {locations:?}");
    };
    let mut user = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(slave)
        .unwrap();
    let mut guest = Guest::connect(&daemon.path, RingLayout::Split);
    guest.send(1, b"\x00\xffhello\r\n");
    guest.used(1);
    // Non-blocking reads until 9 bytes came, bounded by TIMEOUT.
    let mut got = Vec::new();
    let start = Instant::now();
    while got.len() < 9 {
        let mut buf = [0u8; 64];
        match user.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(start.elapsed() < TIMEOUT, "pty got {got:?}");
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("reading the pty: {e}"),
        }
    }
    assert_eq!(got, b"\x00\xffhello\r\n");
    user.write_all(b"\x03ls\r").unwrap();
    assert_eq!(guest.receive(0, 4, 2), b"\x03ls\r");
}

#[test]
fn disabled_receiveq_gets_no_input_until_enabled_again() {
    let dir = TempDir::new("disable");
    let sock = dir.path("con0");
    let (daemon, _device) = Daemon::start(&dir, &args(&[&format!("socket={}", sock.display())]));
    let mut user = client(&sock);
    let mut guest = Guest::connect(&daemon.path, RingLayout::Packed);
    // User-mode Linux's teardown: SET_VRING_ENABLE 0, no GET_VRING_BASE.
    guest.fe.set_vring_enable(0, false).unwrap();
    guest.post_rx(0);
    user.write_all(b"kept\xfe").unwrap();
    guest.no_used_for(0, Duration::from_millis(200));
    guest.fe.set_vring_enable(0, true).unwrap();
    let (_, data) = guest.used(0);
    assert_eq!(data, b"kept\xfe");
}

#[test]
fn too_small_control_receive_buffer_drops_that_message_only() {
    let dir = TempDir::new("small");
    let (daemon, device) = Daemon::start(
        &dir,
        &args(&[
            &format!("name=con0,socket={}", dir.path("a").display()),
            &format!("socket={}", dir.path("b").display()),
        ]),
    );
    let mut guest = Guest::connect(&daemon.path, RingLayout::Split);
    // Room for DEVICE_ADD (8 bytes) but not for PORT_NAME (8 + 4).
    for _ in 0..4 {
        guest.post_rx_len(2, 8);
    }
    send_control(&mut guest, DriverMessage::DeviceReady(true));
    assert_eq!(guest.used(2).1.len(), 8);
    assert_eq!(guest.used(2).1.len(), 8);
    send_control(&mut guest, DriverMessage::PortReady { id: 0, ok: true });
    let (_, console_port) = guest.used(2);
    assert_eq!(control_msg(&console_port).1, VIRTIO_CONSOLE_CONSOLE_PORT);
    let (_, name) = guest.used(2);
    assert!(
        name.is_empty(),
        "the PORT_NAME did not fit: returned with 0 bytes"
    );
    guest.post_rx(2);
    send_control(&mut guest, DriverMessage::PortReady { id: 1, ok: true });
    guest.no_used_for(2, Duration::from_millis(50));
    let _user = client(&dir.path("b"));
    assert_eq!(
        next_control(&mut guest),
        (1, VIRTIO_CONSOLE_PORT_OPEN, 1, vec![]),
        "the device goes on after a dropped message"
    );
    drop(guest);
    drop(daemon);
    let errors: u64 = device
        .port_metrics()
        .iter()
        .map(|(_, m)| m.snapshot().control_errors)
        .sum();
    assert_eq!(errors, 1);
}

#[test]
fn single_port_resize_sends_a_config_change_message() {
    let dir = TempDir::new("cfgchange");
    let sock = dir.path("con0");
    let mut a = args(&[&format!("socket={}", sock.display())]);
    a.cols = Some(80);
    a.rows = Some(24);
    let (daemon, _device) = Daemon::start(&dir, &a);
    let mut guest = Guest::connect(&daemon.path, RingLayout::Split);
    let (mut backend_req, theirs) = UnixStream::pair().unwrap();
    backend_req.set_read_timeout(Some(TIMEOUT)).unwrap();
    guest.fe.set_backend_request_fd(&theirs).unwrap();
    let mut user = client(&sock);
    user.write_all(b"\x1b]vhost-resize;120;40\x07").unwrap();
    // VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (2), no payload.
    let mut header = [0u8; 12];
    backend_req.read_exact(&mut header).unwrap();
    let request = u32::from_le_bytes(header[0..4].try_into().unwrap());
    let flags = u32::from_le_bytes(header[4..8].try_into().unwrap());
    let size = u32::from_le_bytes(header[8..12].try_into().unwrap());
    assert_eq!((request, size), (2, 0));
    if flags & 0x8 != 0 {
        // NEED_REPLY (REPLY_ACK negotiated): acknowledge with 0.
        let mut reply = Vec::new();
        reply.extend_from_slice(&2u32.to_le_bytes());
        reply.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
        reply.extend_from_slice(&8u32.to_le_bytes());
        reply.extend_from_slice(&0u64.to_le_bytes());
        backend_req.write_all(&reply).unwrap();
    }
    let (_, cfg) = guest
        .fe
        .get_config(0, 4, VhostUserConfigFlags::WRITABLE, &[0; 4])
        .unwrap();
    assert_eq!(cfg, [120, 0, 40, 0]);
}

#[test]
fn no_packed_stops_offering_the_packed_ring() {
    let tmp = TempDir::new("nopacked");
    let spec = format!("socket={}", tmp.0.join("c").display());
    let device = ConsoleDevice::new(HostPorts::open(&args(&[&spec])).unwrap()).unwrap();
    assert_eq!(Device::features(&device) & RING_PACKED, RING_PACKED);
    let spec = format!("socket={}", tmp.0.join("d").display());
    let device = ConsoleDevice::new(HostPorts::open(&args(&[&spec])).unwrap())
        .unwrap()
        .with_packed_ring(false);
    let f = Device::features(&device);
    assert_eq!(f & RING_PACKED, 0);
    assert_eq!(f & VERSION_1, VERSION_1);
}
