// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The device served by virtio-core's vhost-user server to the `vhost` crate's frontend,
//! with virtio-core's driver side playing the guest in memfd-backed memory, in front of a
//! TAP that exists only in a network namespace the test creates (`unshare(CLONE_NEWNET)`
//! on a dedicated thread, as the TAP tests do). Frames sent on the transmit queue are seen
//! on an AF_PACKET socket bound to the TAP; frames sent on that socket arrive in receive
//! buffers, with and without MRG_RXBUF, on split and packed rings. Without root or
//! `/dev/net/tun` the tests print why and pass.

#![allow(clippy::cast_possible_truncation)]

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOMULTI, VIRTIO_NET_CTRL_RX_PROMISC,
    VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_CTRL_RX_EXTRA, VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_core::driver::{DriverBuffer, DriverQueue};
use virtio_core::vhost_user::{FrontendSocket, Server, ServerConfig};
use virtio_core::RingLayout;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::features::bit;
use crate::hdr::VnetHeader;
use crate::test_guest::GuestMem;
use crate::test_netns::{in_netns, packet_socket, recv_ours, send, ETHERTYPE};

const QSIZE: u16 = 64;
const TIMEOUT: Duration = Duration::from_secs(5);
const RING_PACKED: u64 = 1 << 34;
const EVENT_IDX: u64 = 1 << 29;
/// An experimental EtherType, to tell our frames from anything else on the interface.
const MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

fn frame(tag: u8, payload: usize) -> Vec<u8> {
    let mut f = vec![0xff; 6]; // broadcast: passes the filter without promiscuous mode
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&ETHERTYPE);
    f.extend((0..payload).map(|i| tag.wrapping_add(i as u8)));
    f
}

struct Ring {
    driver: DriverQueue,
    kick: EventFd,
    call: EventFd,
}

impl Ring {
    fn start(fe: &mut Frontend, mem: &GuestMem, index: u16, layout: RingLayout) -> Ring {
        let driver = DriverQueue::new(layout, QSIZE, 0x10000 * (u64::from(index) + 1), true);
        driver.init(&mem.mem).unwrap();
        let ring = Ring {
            driver,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
        };
        let i = usize::from(index);
        fe.set_vring_num(i, QSIZE).unwrap();
        fe.set_vring_base(i, 0).unwrap();
        fe.set_vring_addr(
            i,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: mem.user_addr(ring.driver.desc_table()),
                used_ring_addr: mem.user_addr(ring.driver.device_area()),
                avail_ring_addr: mem.user_addr(ring.driver.driver_area()),
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_kick(i, &ring.kick).unwrap();
        fe.set_vring_call(i, &ring.call).unwrap();
        fe.set_vring_enable(i, true).unwrap();
        ring
    }

    fn add(&mut self, mem: &GuestMem, bufs: &[DriverBuffer]) -> u16 {
        let id = self.driver.add_chain(&mem.mem, bufs).unwrap();
        self.kick.write(1).unwrap();
        id
    }

    fn used(&mut self, mem: &GuestMem) -> (u16, u32) {
        let start = Instant::now();
        loop {
            if let Some(u) = self.driver.pop_used(&mem.mem).unwrap() {
                return u;
            }
            assert!(start.elapsed() < TIMEOUT, "no used chain");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn assert_no_used(&mut self, mem: &GuestMem) {
        assert_eq!(self.driver.pop_used(&mem.mem).unwrap(), None);
    }
}

/// Sends one control command and checks its ack (§5.1.6.5).
fn control(ring: &mut Ring, mem: &GuestMem, at: u64, cmd: &[u8]) {
    mem.mem.write_slice(cmd, GuestAddress(at)).unwrap();
    mem.mem.write_obj(0xaau8, GuestAddress(at + 0x100)).unwrap();
    let id = ring.add(
        mem,
        &[
            DriverBuffer {
                addr: at,
                len: cmd.len() as u32,
                writable: false,
            },
            DriverBuffer {
                addr: at + 0x100,
                len: 1,
                writable: true,
            },
        ],
    );
    assert_eq!(ring.used(mem), (id, 1));
    let ack: u8 = mem.mem.read_obj(GuestAddress(at + 0x100)).unwrap();
    assert_eq!(ack, crate::ctrl::ACK_OK, "control command {cmd:?} refused");
}

/// A one-pair device on a new TAP `name`, served in-process over a socketpair; the
/// frontend has sent SET_OWNER.
fn serve_tap(
    name: &str,
) -> (
    Arc<NetDevice>,
    Frontend,
    std::thread::JoinHandle<Result<(), virtio_core::vhost_user::Error>>,
    GuestMem,
) {
    let tap = Tap::open(name, 1).unwrap();
    let device = Arc::new(
        NetDevice::with_tap(
            tap,
            &NetOptions {
                mac: MAC,
                mtu: None,
                queue_pairs: 1,
                max_queue_size: 256,
            },
        )
        .unwrap(),
    );
    let (a, b) = UnixStream::pair().unwrap();
    let mut server = Server::new(
        FrontendSocket::Connected(b),
        Arc::clone(&device),
        ServerConfig::default(),
    )
    .unwrap();
    let server = std::thread::spawn(move || server.serve());
    let fe = Frontend::from_stream(a, 3);
    fe.set_owner().unwrap();
    (device, fe, server, GuestMem::new())
}

/// Acks VERSION_1, EVENT_IDX, MAC, the control queue with RX filtering, the ring layout,
/// MRG_RXBUF if asked and `extra`, after checking they are offered.
fn ack_features(fe: &mut Frontend, layout: RingLayout, mrg_rxbuf: bool, extra: u64) {
    let offered = fe.get_features().unwrap();
    let mut want = bit(VIRTIO_F_VERSION_1)
        | EVENT_IDX
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_CTRL_VQ)
        | bit(VIRTIO_NET_F_CTRL_RX)
        | bit(VIRTIO_NET_F_CTRL_RX_EXTRA)
        | extra
        | virtio_core::vhost_user::VHOST_USER_F_PROTOCOL_FEATURES;
    if layout == RingLayout::Packed {
        want |= RING_PACKED;
    }
    if mrg_rxbuf {
        want |= bit(VIRTIO_NET_F_MRG_RXBUF);
    }
    assert_eq!(offered & want, want, "offered {offered:#x}");
    fe.set_features(want).unwrap();
}

/// Only broadcast frames get through (no promiscuous mode, no multicast, §5.1.6.5.1:
/// not the IPv6 multicast the kernel sends when the link comes up); then link up.
fn broadcast_only_and_link_up(ctrl: &mut Ring, mem: &GuestMem, device: &NetDevice) {
    let (class, promisc, nomulti) = (
        VIRTIO_NET_CTRL_RX as u8,
        VIRTIO_NET_CTRL_RX_PROMISC as u8,
        VIRTIO_NET_CTRL_RX_NOMULTI as u8,
    );
    control(ctrl, mem, 0x30_0000, &[class, promisc, 0]);
    control(ctrl, mem, 0x30_1000, &[class, nomulti, 1]);
    device.shared.tap.set_link_up(true).unwrap();
}

fn case(layout: RingLayout, mrg_rxbuf: bool) {
    let (device, mut fe, server, mem) = serve_tap("vut0");
    ack_features(&mut fe, layout, mrg_rxbuf, 0);
    let pf = fe.get_protocol_features().unwrap();
    assert!(pf.contains(VhostUserProtocolFeatures::CONFIG));
    fe.set_protocol_features(
        pf & (VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ),
    )
    .unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert_eq!(fe.get_queue_num().unwrap(), 3);
    fe.set_mem_table(&[mem.region()]).unwrap();
    let mut rx = Ring::start(&mut fe, &mem, 0, layout);
    let mut tx = Ring::start(&mut fe, &mem, 1, layout);
    let mut ctrl = Ring::start(&mut fe, &mem, 2, layout);

    broadcast_only_and_link_up(&mut ctrl, &mem, &device);
    let sock = packet_socket("vut0");

    // TX: header and frame in separate descriptors, straight to the TAP.
    for tag in 0..3u8 {
        let f = frame(tag, 100 + usize::from(tag));
        let at = 0x20_0000 + 0x1000 * u64::from(tag);
        mem.mem.write_slice(&[0u8; 12], GuestAddress(at)).unwrap();
        mem.mem.write_slice(&f, GuestAddress(at + 0x100)).unwrap();
        let id = tx.add(
            &mem,
            &[
                DriverBuffer {
                    addr: at,
                    len: 12,
                    writable: false,
                },
                DriverBuffer {
                    addr: at + 0x100,
                    len: f.len() as u32,
                    writable: false,
                },
            ],
        );
        assert_eq!(tx.used(&mem), (id, 0));
        assert_eq!(recv_ours(&sock), f);
    }

    // Hostile transmit chains: bad header flags, a chain shorter than its header, a
    // header without an Ethernet frame. Each is returned (length 0), dropped and counted.
    let bad_flags = {
        let mut b = vec![0u8; 12];
        b[0] = 0xfe; // only NEEDS_CSUM is the driver's (§5.1.6.2.1)
        b.extend_from_slice(&frame(9, 50));
        b
    };
    for (k, buf) in [bad_flags, vec![0u8; 4], vec![0u8; 12 + 5]]
        .iter()
        .enumerate()
    {
        let at = 0x28_0000 + 0x1000 * k as u64;
        mem.mem.write_slice(buf, GuestAddress(at)).unwrap();
        let id = tx.add(
            &mem,
            &[DriverBuffer {
                addr: at,
                len: buf.len() as u32,
                writable: false,
            }],
        );
        assert_eq!(tx.used(&mem), (id, 0));
    }
    assert_eq!(device.metrics(0).unwrap().snapshot().drop_bad_header, 3);

    // RX: a frame that arrives before any buffer waits for one (no loss, no spin).
    let first = frame(0x40, 300);
    send(&sock, &first);
    std::thread::sleep(Duration::from_millis(50));
    rx.assert_no_used(&mem);
    let (buf_len, nbufs) = if mrg_rxbuf {
        (128u32, 8u16)
    } else {
        (2048u32, 2u16)
    };
    let mut posted = Vec::new();
    for k in 0..nbufs {
        let addr = 0x10_0000 + 0x1000 * u64::from(k);
        let id = rx.add(
            &mem,
            &[DriverBuffer {
                addr,
                len: buf_len,
                writable: true,
            }],
        );
        posted.push((id, addr));
    }
    let total = 12 + first.len();
    let chains = if mrg_rxbuf {
        total.div_ceil(buf_len as usize)
    } else {
        1
    };
    let mut got = Vec::new();
    for &(posted_id, addr) in posted.iter().take(chains) {
        let (id, len) = rx.used(&mem);
        assert_eq!(id, posted_id, "chains are used in order");
        let mut b = vec![0u8; len as usize];
        mem.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        got.extend_from_slice(&b);
    }
    let hdr = VnetHeader::read(&got, 12).unwrap();
    assert_eq!(
        usize::from(hdr.num_buffers.to_native()),
        chains,
        "num_buffers (§5.1.6.4)"
    );
    assert_eq!(&got[12..], &first[..], "the frame behind its vnet header");

    // A second frame lands in the buffers left.
    let second = frame(0x80, 60);
    send(&sock, &second);
    let (id, len) = rx.used(&mem);
    assert_eq!(id, posted[chains].0);
    assert_eq!(len as usize, 12 + second.len());
    let mut b = vec![0u8; second.len()];
    mem.mem
        .read_slice(&mut b, GuestAddress(posted[chains].1 + 12))
        .unwrap();
    assert_eq!(b, second);

    // A multicast frame is filtered (NOMULTI), a broadcast one after it delivered.
    let mut multi = frame(0x90, 60);
    multi[..6].copy_from_slice(&[0x01, 0x00, 0x5e, 0, 0, 1]);
    send(&sock, &multi);
    if mrg_rxbuf {
        let third = frame(0xa0, 60);
        send(&sock, &third);
        let (id, _) = rx.used(&mem);
        let k = posted.iter().position(|p| p.0 == id).unwrap();
        let mut b = vec![0u8; third.len()];
        mem.mem
            .read_slice(&mut b, GuestAddress(posted[k].1 + 12))
            .unwrap();
        assert_eq!(b, third);
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    while device.metrics(0).unwrap().snapshot().drop_filtered == 0 {
        assert!(
            Instant::now() < deadline,
            "the multicast frame was not filtered"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    if !mrg_rxbuf {
        // Without MRG_RXBUF a frame larger than the next buffer is dropped (§5.1.6.3.1)
        // and the buffer kept for the next frame, which fits.
        let id = rx.add(
            &mem,
            &[DriverBuffer {
                addr: 0x1f_0000,
                len: 100,
                writable: true,
            }],
        );
        send(&sock, &frame(0xb0, 300));
        let small = frame(0xc0, 60);
        send(&sock, &small);
        assert_eq!(rx.used(&mem), (id, 12 + small.len() as u32));
        let mut b = vec![0u8; small.len()];
        mem.mem
            .read_slice(&mut b, GuestAddress(0x1f_0000 + 12))
            .unwrap();
        assert_eq!(b, small);
        assert_eq!(device.metrics(0).unwrap().snapshot().drop_too_big, 1);
    }

    // Disconnecting returns the buffers still held and ends the connection cleanly.
    drop(fe);
    drop(sock);
    let start = Instant::now();
    while !server.is_finished() {
        assert!(
            start.elapsed() < TIMEOUT,
            "the server did not notice the disconnect"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = server.join().unwrap();
    let m = device.metrics(0).unwrap().snapshot();
    assert_eq!(m.tx_packets, 3);
    assert!(m.rx_packets >= 2, "{m}");
    let _ = (&mut ctrl, &mut tx);
}

#[test]
fn tap_frames_both_ways_split() {
    in_netns(|| case(RingLayout::Split, false));
}

#[test]
fn tap_frames_both_ways_split_mrg_rxbuf() {
    in_netns(|| case(RingLayout::Split, true));
}

#[test]
fn tap_frames_both_ways_packed() {
    in_netns(|| case(RingLayout::Packed, false));
}

#[test]
fn tap_frames_both_ways_packed_mrg_rxbuf() {
    in_netns(|| case(RingLayout::Packed, true));
}

/// The frame `posted[..chains]` hold: reads each used chain (checking the order and that
/// the chain is one of `posted`), returns header and frame.
fn used_frame(rx: &mut Ring, mem: &GuestMem, posted: &[(u16, u64)], chains: usize) -> Vec<u8> {
    let mut got = Vec::new();
    for &(posted_id, addr) in posted.iter().take(chains) {
        let (id, len) = rx.used(mem);
        assert_eq!(id, posted_id, "chains are used in order");
        let mut b = vec![0u8; len as usize];
        mem.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        got.extend_from_slice(&b);
    }
    got
}

/// With a GSO offload (GUEST_TSO4) and MRG_RXBUF: while the held chains cannot take the
/// largest frame, frames go through the bounce buffer; once they can, frames are read
/// straight into them, spanning chains in order with `num_buffers` set (§5.1.6.4), and
/// the chains a frame does not need are held for the next one.
fn direct_rx_case(layout: RingLayout, mrg_rxbuf: bool) {
    let (device, mut fe, server, mem) = serve_tap("vut2");
    ack_features(
        &mut fe,
        layout,
        mrg_rxbuf,
        bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4),
    );
    let pf = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(pf & VhostUserProtocolFeatures::REPLY_ACK)
        .unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.set_mem_table(&[mem.region()]).unwrap();
    let mut rx = Ring::start(&mut fe, &mem, 0, layout);
    let mut tx = Ring::start(&mut fe, &mem, 1, layout);
    let mut ctrl = Ring::start(&mut fe, &mem, 2, layout);
    broadcast_only_and_link_up(&mut ctrl, &mem, &device);
    let sock = packet_socket("vut2");

    let mut next_addr = 0x10_0000u64;
    let mut post = |rx: &mut Ring, len: u32| {
        let addr = next_addr;
        next_addr += u64::from(len).next_multiple_of(0x1000);
        let id = rx.add(
            &mem,
            &[DriverBuffer {
                addr,
                len,
                writable: true,
            }],
        );
        (id, addr)
    };
    let check = |got: &[u8], chains: usize, f: &[u8]| {
        let hdr = VnetHeader::read(got, 12).unwrap();
        assert_eq!(
            usize::from(hdr.num_buffers.to_native()),
            chains,
            "num_buffers"
        );
        assert_eq!(&got[12..], f, "the frame behind its vnet header");
    };

    if !mrg_rxbuf {
        // A Linux guest's "big packet" chain: the header, then pages (§5.1.6.3.1: one
        // chain per frame). It takes the largest frame, so the frame is read into it.
        let at = 0x20_0000u64;
        let mut bufs = vec![DriverBuffer {
            addr: at,
            len: 12,
            writable: true,
        }];
        bufs.extend((0..17u64).map(|k| DriverBuffer {
            addr: at + 0x1000 * (k + 1),
            len: 0x1000,
            writable: true,
        }));
        let id = rx.add(&mem, &bufs);
        let a = frame(0x10, 1400);
        send(&sock, &a);
        let (got_id, len) = rx.used(&mem);
        assert_eq!((got_id, len as usize), (id, 12 + a.len()));
        let mut got = vec![0u8; 12 + a.len()];
        mem.mem
            .read_slice(&mut got[..12], GuestAddress(at))
            .unwrap();
        mem.mem
            .read_slice(&mut got[12..], GuestAddress(at + 0x1000))
            .unwrap();
        check(&got, 1, &a);
        // A 2 KiB chain cannot take the largest frame: a frame that fits goes through the
        // bounce buffer into it.
        let (id, addr) = post(&mut rx, 2048);
        let b = frame(0x20, 100);
        send(&sock, &b);
        assert_eq!(rx.used(&mem), (id, (12 + b.len()) as u32));
        let mut got = vec![0u8; 12 + b.len()];
        mem.mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
        check(&got, 1, &b);
        assert_eq!(device.metrics(0).unwrap().snapshot().rx_packets, 2);
        finish(fe, sock, server);
        let _ = (&mut ctrl, &mut tx);
        return;
    }

    // 1536 bytes of buffers: less than the largest frame, so through the bounce buffer.
    let small: Vec<_> = (0..3).map(|_| post(&mut rx, 512)).collect();
    let a = frame(0x10, 1200);
    send(&sock, &a);
    check(&used_frame(&mut rx, &mem, &small, 3), 3, &a);

    // Three small buffers and a 64 KiB one: together they take the largest frame.
    let mut posted: Vec<_> = (0..3).map(|_| post(&mut rx, 512)).collect();
    posted.push(post(&mut rx, 0x1_0000));
    let b = frame(0x20, 1200);
    send(&sock, &b);
    check(&used_frame(&mut rx, &mem, &posted, 3), 3, &b);
    // The 64 KiB chain was held; the next frame lands in it.
    let c = frame(0x30, 100);
    send(&sock, &c);
    check(&used_frame(&mut rx, &mem, &posted[3..], 1), 1, &c);
    // A multicast frame read into held chains is filtered (NOMULTI) and its chains kept.
    let more: Vec<_> = (0..2).map(|_| post(&mut rx, 0x1_0000)).collect();
    let mut multi = frame(0x40, 60);
    multi[..6].copy_from_slice(&[0x01, 0x00, 0x5e, 0, 0, 1]);
    send(&sock, &multi);
    let d = frame(0x50, 60);
    send(&sock, &d);
    check(&used_frame(&mut rx, &mem, &more, 1), 1, &d);
    let m = device.metrics(0).unwrap().snapshot();
    // The kernel's own IPv6 multicast (sent as the link comes up) is filtered too.
    assert!(m.drop_filtered >= 1, "{m}");
    assert_eq!(m.rx_packets, 4, "{m}");
    finish(fe, sock, server);
    let _ = (&mut ctrl, &mut tx);
}

/// Disconnects and waits for the server to end cleanly.
fn finish<T>(fe: Frontend, sock: std::os::fd::OwnedFd, server: std::thread::JoinHandle<T>) {
    drop(fe);
    drop(sock);
    let start = Instant::now();
    while !server.is_finished() {
        assert!(
            start.elapsed() < TIMEOUT,
            "the server did not notice the disconnect"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = server.join().unwrap();
}

#[test]
fn rx_with_gso_reads_frames_straight_into_held_chains_split() {
    in_netns(|| direct_rx_case(RingLayout::Split, true));
}

#[test]
fn rx_with_gso_reads_frames_straight_into_held_chains_packed() {
    in_netns(|| direct_rx_case(RingLayout::Packed, true));
}

#[test]
fn rx_with_gso_without_mrg_rxbuf_reads_a_frame_into_one_big_chain_split() {
    in_netns(|| direct_rx_case(RingLayout::Split, false));
}

#[test]
fn rx_with_gso_without_mrg_rxbuf_reads_a_frame_into_one_big_chain_packed() {
    in_netns(|| direct_rx_case(RingLayout::Packed, false));
}

/// Two queue pairs with CTRL_VQ and MQ: the control queue (index 4, §5.1.2) is served by
/// group 0; until VQ_PAIRS_SET only pair 0 is used and TAP queue 1 is detached
/// (§5.1.6.5.6); VQ_PAIRS_SET 2 attaches it, and both pairs' transmit queues reach the
/// TAP.
fn mq_case(layout: RingLayout) {
    use virtio_bindings::virtio_net::{
        VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_F_MQ,
    };
    let tap = Tap::open("vut1", 2).unwrap();
    let device = Arc::new(
        NetDevice::with_tap(
            tap,
            &NetOptions {
                mac: MAC,
                mtu: Some(1400),
                queue_pairs: 2,
                max_queue_size: 256,
            },
        )
        .unwrap(),
    );
    let (a, b) = UnixStream::pair().unwrap();
    let mut server = Server::new(
        FrontendSocket::Connected(b),
        Arc::clone(&device),
        ServerConfig::default(),
    )
    .unwrap();
    let server = std::thread::spawn(move || server.serve());
    let mut fe = Frontend::from_stream(a, 5);
    let mem = GuestMem::new();
    fe.set_owner().unwrap();
    let offered = fe.get_features().unwrap();
    let mut want = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_NET_F_CTRL_VQ)
        | bit(VIRTIO_NET_F_MQ)
        | bit(virtio_bindings::virtio_net::VIRTIO_NET_F_MTU)
        | virtio_core::vhost_user::VHOST_USER_F_PROTOCOL_FEATURES;
    if layout == RingLayout::Packed {
        want |= RING_PACKED;
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
    assert_eq!(fe.get_queue_num().unwrap(), 5);
    // The config space: max_virtqueue_pairs and mtu (§5.1.4).
    let (_, cfg) = fe
        .get_config(
            0,
            crate::config::CONFIG_SIZE as u32,
            vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE,
            &[0u8; crate::config::CONFIG_SIZE],
        )
        .unwrap();
    assert_eq!(&cfg[..6], &MAC.0);
    assert_eq!(
        u16::from_le_bytes([cfg[8], cfg[9]]),
        2,
        "max_virtqueue_pairs"
    );
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1400, "mtu");
    fe.set_mem_table(&[mem.region()]).unwrap();
    let _rx0 = Ring::start(&mut fe, &mem, 0, layout);
    let mut tx0 = Ring::start(&mut fe, &mem, 1, layout);
    let _rx1 = Ring::start(&mut fe, &mem, 2, layout);
    let mut tx1 = Ring::start(&mut fe, &mem, 3, layout);
    let mut ctrl = Ring::start(&mut fe, &mem, 4, layout);
    assert!(device.shared.is_attached(0));
    assert!(
        !device.shared.is_attached(1),
        "unused pairs' TAP queues are detached"
    );
    let (class, cmd) = (
        VIRTIO_NET_CTRL_MQ as u8,
        VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
    );
    control(&mut ctrl, &mem, 0x30_0000, &[class, cmd, 2, 0]);
    assert!(
        device.shared.is_attached(1),
        "VQ_PAIRS_SET 2 attaches TAP queue 1"
    );
    device.shared.tap.set_link_up(true).unwrap();
    let sock = packet_socket("vut1");
    for (k, tx) in [&mut tx0, &mut tx1].into_iter().enumerate() {
        let f = frame(0x10 * k as u8, 80);
        let at = 0x20_0000 + 0x1000 * k as u64;
        let mut buf = vec![0u8; 12];
        buf.extend_from_slice(&f);
        mem.mem.write_slice(&buf, GuestAddress(at)).unwrap();
        let id = tx.add(
            &mem,
            &[DriverBuffer {
                addr: at,
                len: buf.len() as u32,
                writable: false,
            }],
        );
        assert_eq!(tx.used(&mem), (id, 0));
        assert_eq!(recv_ours(&sock), f, "pair {k}");
    }
    // Back to one pair: TAP queue 1 is detached (the kernel still takes writes on a
    // detached queue, so a frame a driver sends on pair 1 goes out), and VQ_PAIRS_SET 2
    // attaches it again.
    control(&mut ctrl, &mem, 0x30_2000, &[class, cmd, 1, 0]);
    assert!(!device.shared.is_attached(1));
    std::thread::sleep(Duration::from_millis(20));
    let send_on_pair1 = |tx: &mut Ring, tag: u8| {
        let f = frame(tag, 70);
        let mut buf = vec![0u8; 12];
        buf.extend_from_slice(&f);
        let at = 0x22_0000 + 0x1000 * u64::from(tag);
        mem.mem.write_slice(&buf, GuestAddress(at)).unwrap();
        let id = tx.add(
            &mem,
            &[DriverBuffer {
                addr: at,
                len: buf.len() as u32,
                writable: false,
            }],
        );
        assert_eq!(tx.used(&mem), (id, 0));
        f
    };
    let f = send_on_pair1(&mut tx1, 0x31);
    assert_eq!(recv_ours(&sock), f, "pair 1 while detached");
    control(&mut ctrl, &mem, 0x30_3000, &[class, cmd, 2, 0]);
    assert!(device.shared.is_attached(1));
    let f = send_on_pair1(&mut tx1, 0x32);
    assert_eq!(recv_ours(&sock), f, "pair 1 after reattaching");

    // VQ_PAIRS_SET 3 is out of range: VIRTIO_NET_ERR, nothing changes.
    mem.mem
        .write_slice(&[class, cmd, 3, 0], GuestAddress(0x30_1000))
        .unwrap();
    let id = ctrl.add(
        &mem,
        &[
            DriverBuffer {
                addr: 0x30_1000,
                len: 4,
                writable: false,
            },
            DriverBuffer {
                addr: 0x30_1100,
                len: 1,
                writable: true,
            },
        ],
    );
    assert_eq!(ctrl.used(&mem), (id, 1));
    let ack: u8 = mem.mem.read_obj(GuestAddress(0x30_1100)).unwrap();
    assert_eq!(ack, crate::ctrl::ACK_ERR);
    assert!(device.shared.is_attached(1));
    drop(fe);
    drop(sock);
    let start = Instant::now();
    while !server.is_finished() {
        assert!(
            start.elapsed() < TIMEOUT,
            "the server did not notice the disconnect"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = server.join().unwrap();
    assert_eq!(device.metrics(0).unwrap().snapshot().tx_packets, 1);
    assert_eq!(device.metrics(1).unwrap().snapshot().tx_packets, 3);
}

#[test]
fn two_queue_pairs_control_queue_and_vq_pairs_set_split() {
    in_netns(|| mq_case(RingLayout::Split));
}

#[test]
fn two_queue_pairs_control_queue_and_vq_pairs_set_packed() {
    in_netns(|| mq_case(RingLayout::Packed));
}

#[test]
fn queue_roles_with_and_without_a_control_queue() {
    use virtio_bindings::virtio_net::VIRTIO_NET_F_MQ;
    let ctrl_mq = Negotiated::from_bits_unchecked(bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_MQ));
    assert_eq!(queue_role(4, ctrl_mq, 2), Some(QueueRole::Ctrl));
    assert_eq!(queue_role(3, ctrl_mq, 2), Some(QueueRole::Tx(1)));
    // CTRL_VQ without MQ: the control queue is at index 2 (§5.1.2).
    let ctrl = Negotiated::from_bits_unchecked(bit(VIRTIO_NET_F_CTRL_VQ));
    assert_eq!(queue_role(2, ctrl, 2), Some(QueueRole::Ctrl));
    assert_eq!(queue_role(3, ctrl, 2), None);
    // No CTRL_VQ (QEMU, DPDK): every pair carries data, none is a control queue.
    let none = Negotiated::from_bits_unchecked(bit(VIRTIO_F_VERSION_1));
    assert_eq!(queue_role(2, none, 2), Some(QueueRole::Rx(1)));
    assert_eq!(queue_role(3, none, 2), Some(QueueRole::Tx(1)));
    assert_eq!(queue_role(4, none, 2), None);
}
