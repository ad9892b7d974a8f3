// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Switch mode in process: three `vhost` crate frontends, each with virtio-core's driver
//! side playing its guest in memfd-backed memory, on three servers sharing one
//! [`SwitchHub`]. Checks flooding of unknown unicast and broadcast, unicast after
//! learning, no echo to the sender, and that a disconnected port leaves the switch.

#![allow(clippy::cast_possible_truncation, clippy::unwrap_used)]

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF};
use virtio_core::driver::{DriverBuffer, DriverQueue};
use virtio_core::vhost_user::{FrontendSocket, Server, ServerConfig};
use virtio_core::RingLayout;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd as TestEventFd, EFD_NONBLOCK as NONBLOCK};

use super::*;
use crate::features::bit;
use crate::test_guest::GuestMem;

const QSIZE: u16 = 64;
const TIMEOUT: Duration = Duration::from_secs(5);
const RING_PACKED: u64 = 1 << 34;
const RX_BUF: u64 = 0x20_0000;
const TX_BUF: u64 = 0x30_0000;
const BROADCAST: [u8; 6] = [0xff; 6];

fn mac(n: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0, n]
}

fn frame(dst: [u8; 6], src: [u8; 6], tag: u8) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend((0..60u8).map(|i| tag.wrapping_add(i)));
    f
}

struct Guest {
    mem: GuestMem,
    _fe: Frontend,
    rx: DriverQueue,
    tx: DriverQueue,
    kicks: [TestEventFd; 2],
    _calls: [TestEventFd; 2],
    rx_addrs: HashMap<u16, u64>,
    next_tx: u64,
}

impl Guest {
    fn connect(stream: UnixStream, layout: RingLayout, mrg_rxbuf: bool) -> Guest {
        let guest = GuestMem::new();
        let mem = &guest.mem;
        let mut fe = Frontend::from_stream(stream, 2);
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        let mut want = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_NET_F_MAC)
            | virtio_core::vhost_user::VHOST_USER_F_PROTOCOL_FEATURES;
        if layout == RingLayout::Packed {
            want |= RING_PACKED;
        }
        if mrg_rxbuf {
            want |= bit(VIRTIO_NET_F_MRG_RXBUF);
        }
        assert_eq!(offered & want, want, "offered {offered:#x}");
        fe.set_features(want).unwrap();
        let pf = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(
            pf & (VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ),
        )
        .unwrap();
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        assert_eq!(fe.get_queue_num().unwrap(), 2);
        fe.set_mem_table(&[guest.region()]).unwrap();
        let kicks = [
            TestEventFd::new(NONBLOCK).unwrap(),
            TestEventFd::new(NONBLOCK).unwrap(),
        ];
        let calls = [
            TestEventFd::new(NONBLOCK).unwrap(),
            TestEventFd::new(NONBLOCK).unwrap(),
        ];
        let mut queues = Vec::new();
        for i in 0..2usize {
            let q = DriverQueue::new(layout, QSIZE, 0x10000 * (i as u64 + 1), false);
            q.init(mem).unwrap();
            fe.set_vring_num(i, QSIZE).unwrap();
            fe.set_vring_base(i, 0).unwrap();
            fe.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: QSIZE,
                    queue_size: QSIZE,
                    flags: 0,
                    desc_table_addr: guest.user_addr(q.desc_table()),
                    used_ring_addr: guest.user_addr(q.device_area()),
                    avail_ring_addr: guest.user_addr(q.driver_area()),
                    log_addr: None,
                },
            )
            .unwrap();
            fe.set_vring_kick(i, &kicks[i]).unwrap();
            fe.set_vring_call(i, &calls[i]).unwrap();
            fe.set_vring_enable(i, true).unwrap();
            queues.push(q);
        }
        let tx = queues.pop().unwrap();
        let rx = queues.pop().unwrap();
        Guest {
            mem: guest,
            _fe: fe,
            rx,
            tx,
            kicks,
            _calls: calls,
            rx_addrs: HashMap::new(),
            next_tx: TX_BUF,
        }
    }

    /// Posts `n` receive buffers of 2 KiB.
    fn post_rx(&mut self, n: u16) {
        for k in 0..n {
            let addr = RX_BUF + 0x800 * u64::from(k);
            let id = self
                .rx
                .add_chain(
                    &self.mem.mem,
                    &[DriverBuffer {
                        addr,
                        len: 0x800,
                        writable: true,
                    }],
                )
                .unwrap();
            self.rx_addrs.insert(id, addr);
        }
        self.kicks[0].write(1).unwrap();
    }

    /// Transmits `f` behind a plain 12-byte header and waits for the chain back.
    fn send(&mut self, f: &[u8]) {
        self.send_burst(&[f.to_vec()]);
    }

    /// Transmits every frame of `frames` with one kick and waits until the device returned
    /// all their chains.
    fn send_burst(&mut self, frames: &[Vec<u8>]) {
        let mut ids = Vec::new();
        for f in frames {
            let at = self.next_tx;
            self.next_tx += 0x1000;
            let mut b = vec![0u8; 12];
            b.extend_from_slice(f);
            self.mem.mem.write_slice(&b, GuestAddress(at)).unwrap();
            let id = self
                .tx
                .add_chain(
                    &self.mem.mem,
                    &[DriverBuffer {
                        addr: at,
                        len: b.len() as u32,
                        writable: false,
                    }],
                )
                .unwrap();
            ids.push(id);
        }
        self.kicks[1].write(1).unwrap();
        let start = Instant::now();
        let mut back = 0;
        while back < ids.len() {
            if let Some((id, len)) = self.tx.pop_used(&self.mem.mem).unwrap() {
                assert_eq!((id, len), (ids[back], 0), "transmit chains return in order");
                back += 1;
                continue;
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "only {back} of {} transmit chains returned",
                ids.len()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The next received frame (header checked and stripped).
    fn recv(&mut self) -> Vec<u8> {
        let start = Instant::now();
        loop {
            if let Some((id, len)) = self.rx.pop_used(&self.mem.mem).unwrap() {
                let addr = self.rx_addrs[&id];
                let mut b = vec![0u8; len as usize];
                self.mem.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                assert!(b.len() >= 12);
                // A plain header: no flags, no GSO, num_buffers 1.
                assert_eq!(&b[..10], &[0u8; 10]);
                assert_eq!(u16::from_le_bytes([b[10], b[11]]), 1);
                return b[12..].to_vec();
            }
            assert!(start.elapsed() < TIMEOUT, "no frame received");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn assert_nothing(&mut self) {
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(self.rx.pop_used(&self.mem.mem).unwrap(), None);
    }
}

type ServerThread = std::thread::JoinHandle<Result<(), virtio_core::vhost_user::Error>>;

/// Port `port` of `hub`, its queues on `shared` if given, else on threads of its own.
fn start(
    hub: &Arc<SwitchHub>,
    port: usize,
    shared: Option<&Arc<WorkerThread>>,
) -> (UnixStream, ServerThread) {
    let mut device =
        SwitchPortDevice::new(Arc::clone(hub), port, MacAddr(mac(0x40 + port as u8)), 256).unwrap();
    if let Some(t) = shared {
        device = device.with_worker_thread(Arc::clone(t));
    }
    let device = Arc::new(device);
    let (a, b) = UnixStream::pair().unwrap();
    let mut server = Server::new(
        FrontendSocket::Connected(b),
        device,
        ServerConfig::default(),
    )
    .unwrap();
    (a, std::thread::spawn(move || server.serve()))
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn case(layout: RingLayout, mrg_rxbuf: bool, shared: Option<&Arc<WorkerThread>>) {
    let hub = SwitchHub::new(3, SwitchConfig::default(), 1500).unwrap();
    let mut guests = Vec::new();
    let mut servers = Vec::new();
    for port in 0..3 {
        let (stream, server) = start(&hub, port, shared);
        let mut g = Guest::connect(stream, layout, mrg_rxbuf);
        g.post_rx(16);
        guests.push(g);
        servers.push(server);
    }
    wait_for("every port to connect", || {
        (0..3).all(|p| hub.is_connected(p))
    });
    let (a, b, c) = (mac(1), mac(2), mac(3));

    // Unknown unicast floods: B and C get it, A (the sender) does not.
    let f = frame(b, a, 1);
    guests[0].send(&f);
    assert_eq!(guests[1].recv(), f);
    assert_eq!(guests[2].recv(), f);
    guests[0].assert_nothing();

    // B answers A, whose address is learned: unicast, C sees nothing.
    let f = frame(a, b, 2);
    guests[1].send(&f);
    assert_eq!(guests[0].recv(), f);
    guests[2].assert_nothing();
    guests[1].assert_nothing();

    // A to B, now both learned: only B.
    let f = frame(b, a, 3);
    guests[0].send(&f);
    assert_eq!(guests[1].recv(), f);
    guests[2].assert_nothing();

    // Broadcast from C: A and B, no echo to C.
    let f = frame(BROADCAST, c, 4);
    guests[2].send(&f);
    assert_eq!(guests[0].recv(), f);
    assert_eq!(guests[1].recv(), f);
    guests[2].assert_nothing();
    assert_eq!(hub.table_len(), 3);

    // C disconnects: it leaves the switch, its address is forgotten.
    let gc = guests.pop().unwrap();
    drop(gc);
    let sc = servers.pop().unwrap();
    wait_for("the server of port 2 to finish", || sc.is_finished());
    let _ = sc.join().unwrap();
    assert!(!hub.is_connected(2));
    assert_eq!(hub.table_len(), 2);
    // A frame for C's old address now floods to B only.
    let f = frame(c, a, 5);
    guests[0].send(&f);
    assert_eq!(guests[1].recv(), f);

    // Malformed: shorter than an Ethernet header; counted, nothing forwarded.
    guests[0].send(&[0u8; 6]);
    guests[1].assert_nothing();
    let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let ca = hub.counters(0).unwrap();
    assert_eq!(l(&ca.tx_frames), 3);
    assert_eq!(l(&ca.drop_bad), 1);
    assert_eq!(l(&hub.counters(1).unwrap().rx_frames), 4);
    assert_eq!(l(&hub.counters(2).unwrap().rx_frames), 1);
    assert_eq!(l(&hub.counters(1).unwrap().drop_full), 0);
    drop(guests);
    for s in servers {
        let _ = s.join().unwrap();
    }
}

#[test]
fn switch_forwarding_split() {
    case(RingLayout::Split, false, None);
}

#[test]
fn switch_forwarding_packed_mrg_rxbuf() {
    case(RingLayout::Packed, true, None);
}

#[test]
fn switch_forwarding_with_every_port_on_one_shared_thread() {
    let thread = WorkerThread::new("test-switch").unwrap();
    case(RingLayout::Split, false, Some(&thread));
    case(RingLayout::Packed, true, Some(&thread));
    wait_for("the ports' workers to leave the shared thread", || {
        thread.workers() == 0
    });
}

#[test]
fn frame_queue_full_drops_and_consumer_is_single() {
    let q = Arc::new(FrameQueue::new(4, 64));
    for i in 0..4u8 {
        assert_eq!(
            q.push_with(|s| {
                s[0] = i;
                Some(1)
            }),
            Push::Queued
        );
    }
    assert_eq!(q.push_with(|_| Some(1)), Push::Full);
    let mut c = q.consumer().unwrap();
    assert!(q.consumer().is_none());
    for i in 0..4u8 {
        assert_eq!(c.front(), Some(&[i][..]));
        c.pop();
    }
    assert_eq!(c.front(), None);
    assert_eq!(q.push_with(|_| None), Push::Refused);
    assert_eq!(c.front(), None);
    assert_eq!(q.push_with(|_| Some(3)), Push::Queued);
    assert_eq!(c.clear(), 1);
    drop(c);
    assert!(q.consumer().is_some());
}

#[test]
fn frame_queue_many_producers() {
    let q = Arc::new(FrameQueue::new(64, 8));
    let producers: Vec<_> = (0..3u8)
        .map(|p| {
            let q = Arc::clone(&q);
            std::thread::spawn(move || {
                let mut sent = 0u32;
                while sent < 10_000 {
                    let r = q.push_with(|s| {
                        s[0] = p;
                        s[1..5].copy_from_slice(&sent.to_le_bytes());
                        Some(5)
                    });
                    if r == Push::Queued {
                        sent += 1;
                    } else {
                        std::thread::yield_now();
                    }
                }
            })
        })
        .collect();
    let mut c = q.consumer().unwrap();
    let mut next = [0u32; 3];
    let start = Instant::now();
    while next.iter().sum::<u32>() < 30_000 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "stalled at {next:?}"
        );
        let Some(f) = c.front() else {
            std::thread::yield_now();
            continue;
        };
        let p = usize::from(f[0]);
        let n = u32::from_le_bytes(f[1..5].try_into().unwrap());
        // Each producer's frames arrive in order, none lost.
        assert_eq!(n, next[p]);
        next[p] += 1;
        c.pop();
    }
    for t in producers {
        t.join().unwrap();
    }
}

/// Two connected ports on a hub whose queues hold `slots` frames; A (port 0) is learned
/// by B (port 1) and B by A, so frames between them are unicast.
fn two_ports(
    slots: usize,
    shared: Option<&Arc<WorkerThread>>,
) -> (Arc<SwitchHub>, Vec<Guest>, Vec<ServerThread>) {
    let hub = SwitchHub::with_queue_slots(2, SwitchConfig::default(), 1500, slots).unwrap();
    let mut guests = Vec::new();
    let mut servers = Vec::new();
    for port in 0..2 {
        let (stream, server) = start(&hub, port, shared);
        guests.push(Guest::connect(stream, RingLayout::Split, false));
        servers.push(server);
    }
    wait_for("both ports to connect", || {
        (0..2).all(|p| hub.is_connected(p))
    });
    guests[0].post_rx(1);
    guests[1].post_rx(1);
    let f = frame(mac(2), mac(1), 0);
    guests[0].send(&f);
    assert_eq!(guests[1].recv(), f);
    let f = frame(mac(1), mac(2), 0);
    guests[1].send(&f);
    assert_eq!(guests[0].recv(), f);
    (hub, guests, servers)
}

#[test]
fn unicast_to_a_full_queue_waits_for_space_instead_of_dropping() {
    unicast_to_a_full_queue_waits(None);
}

#[test]
fn a_sender_waits_for_a_receiver_on_the_same_shared_thread() {
    // The waiting sender must give the thread back to the receiver's worker.
    let thread = WorkerThread::new("test-switch-wait").unwrap();
    unicast_to_a_full_queue_waits(Some(&thread));
}

fn unicast_to_a_full_queue_waits(shared: Option<&Arc<WorkerThread>>) {
    // 48 frames in one burst into a queue of 4 slots whose receiver has buffers: the
    // sender outruns the receiver's worker and must wait for it, frame by frame.
    let (hub, mut guests, servers) = two_ports(4, shared);
    guests[1].rx_addrs.clear();
    guests[1].post_rx(60);
    let frames: Vec<Vec<u8>> = (1..=48).map(|t| frame(mac(2), mac(1), t)).collect();
    guests[0].send_burst(&frames);
    for f in &frames {
        assert_eq!(&guests[1].recv(), f, "frames arrive complete and in order");
    }
    let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
    assert_eq!(l(&hub.counters(1).unwrap().drop_full), 0);
    assert_eq!(l(&hub.counters(1).unwrap().rx_frames), 49);
    drop(guests);
    for s in servers {
        let _ = s.join().unwrap();
    }
}

#[test]
fn unicast_to_a_receiver_without_buffers_is_dropped_and_the_sender_goes_on() {
    // B posts no receive buffers: its queue fills (4 frames) and the rest is dropped and
    // counted; A gets every transmit chain back (it does not wait for a stalled port).
    let (hub, mut guests, servers) = two_ports(4, None);
    let frames: Vec<Vec<u8>> = (1..=20).map(|t| frame(mac(2), mac(1), t)).collect();
    guests[0].send_burst(&frames);
    let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
    wait_for("the dropped frames to be counted", || {
        l(&hub.counters(1).unwrap().drop_full) == 16
    });
    // The queued frames are delivered, oldest first, once buffers come.
    guests[1].post_rx(8);
    for f in frames.iter().take(4) {
        assert_eq!(&guests[1].recv(), f);
    }
    guests[1].assert_nothing();
    // A still forwards.
    let f = frame(mac(2), mac(1), 99);
    guests[0].send(&f);
    assert_eq!(guests[1].recv(), f);
    drop(guests);
    for s in servers {
        let _ = s.join().unwrap();
    }
}

#[test]
fn frame_queue_wakes_a_waiting_producer_once_slots_are_freed() {
    let q = Arc::new(FrameQueue::new(2, 8));
    let mut c = q.consumer().unwrap();
    assert_eq!(q.push_with(|_| Some(1)), Push::Queued);
    assert_eq!(q.push_with(|_| Some(1)), Push::Queued);
    assert_eq!(q.push_with(|_| Some(1)), Push::Full);
    assert_eq!(c.take_waiters(), 0);
    assert!(q.wait_for_space(3));
    assert!(q.wait_for_space(70));
    assert!(c.front().is_some());
    c.pop();
    // Ports 3 and 70 (bit 6) are to be woken, once.
    assert_eq!(c.take_waiters(), (1 << 3) | (1 << 6));
    assert_eq!(c.take_waiters(), 0);
    // A stalled consumer makes producers drop rather than wait, and wakes the waiting ones.
    assert!(q.wait_for_space(1));
    assert_eq!(c.set_stalled(true), 1 << 1);
    assert!(!q.wait_for_space(1));
    assert!(q.is_stalled());
    assert_eq!(c.set_stalled(false), 0);
    assert!(!q.is_stalled());
}

#[test]
fn frame_queue_signals_a_sleeping_consumer_once() {
    let q = Arc::new(FrameQueue::new(4, 8));
    let mut c = q.consumer().unwrap();
    // A new consumer counts as sleeping: the first frame wakes it.
    assert_eq!(q.push_with(|_| Some(1)), Push::Queued);
    assert!(q.take_wake_up());
    assert!(!q.take_wake_up(), "one wake-up per sleep");
    // Not empty: the consumer must not sleep.
    assert!(!c.prepare_to_sleep());
    c.pop();
    // Empty: it may sleep, and the next frame wakes it.
    assert!(c.prepare_to_sleep());
    assert_eq!(q.push_with(|_| Some(1)), Push::Queued);
    assert!(q.take_wake_up());
    // Awake (it has not said it sleeps again): no wake-up for the next frame.
    assert_eq!(q.push_with(|_| Some(1)), Push::Queued);
    assert!(!q.take_wake_up());
}

#[test]
fn frame_queue_peeks_a_batch_and_frees_it_in_order() {
    let q = Arc::new(FrameQueue::new(4, 8));
    let mut c = q.consumer().unwrap();
    for i in 0..3u8 {
        assert_eq!(
            q.push_with(|s| {
                s[0] = i;
                Some(1)
            }),
            Push::Queued
        );
    }
    // Several frames borrowed at once; nothing past the published ones.
    assert_eq!((c.peek(0), c.peek(2)), (Some(&[0u8][..]), Some(&[2u8][..])));
    assert_eq!(c.peek(3), None);
    c.pop_n(2);
    assert_eq!(c.peek(0), Some(&[2u8][..]));
    // The freed slots take new frames.
    for _ in 0..3 {
        assert_eq!(q.push_with(|_| Some(1)), Push::Queued);
    }
    assert_eq!(q.push_with(|_| Some(1)), Push::Full);
}
