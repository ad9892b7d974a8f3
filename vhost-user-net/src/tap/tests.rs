// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! TAP tests. Those that create interfaces need root and `/dev/net/tun`; each runs in a
//! thread of its own that first enters a new, empty network namespace
//! (`unshare(CLONE_NEWNET)` affects only the calling thread), so every interface, socket
//! and address they use exists only there and disappears with the thread. Without root or
//! `/dev/net/tun` they print why and pass.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_MRG_RXBUF,
};

use super::*;
use crate::test_netns::{in_netns, packet_socket, recv_ours, send, wait_readable, ETHERTYPE};

fn frame(tag: u8) -> Vec<u8> {
    let mut f = vec![0xff; 6]; // broadcast
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&ETHERTYPE);
    f.extend((0..46).map(|i| tag.wrapping_add(i)));
    f
}

/// Reads from the TAP until a frame with [`ETHERTYPE`] arrives (2 s at most); returns the
/// vnet header and the frame.
fn read_ours(q: &TapQueue, hdr_len: usize) -> (Vec<u8>, Vec<u8>) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while wait_readable(q.as_raw_fd(), deadline) {
        let mut hdr = vec![0xaau8; hdr_len];
        let mut data = vec![0u8; 2048];
        match q.readv(&mut [IoSliceMut::new(&mut hdr), IoSliceMut::new(&mut data)]) {
            Ok(n) if data.get(12..14) == Some(&ETHERTYPE[..]) => {
                data.truncate(n - hdr_len);
                return (hdr, data);
            }
            Ok(_) => {}
            Err(e) if is_would_block(&e) => {}
            Err(e) => panic!("readv: {e}"),
        }
    }
    panic!("no frame with our EtherType on the TAP");
}

#[test]
fn offloads_map_from_guest_features() {
    let all = bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_GUEST_TSO6)
        | bit(VIRTIO_NET_F_GUEST_ECN)
        | bit(VIRTIO_NET_F_GUEST_UFO);
    let o = TapOffloads::from_guest_features(all | bit(VIRTIO_F_VERSION_1));
    assert_eq!(
        o.bits(),
        libc::TUN_F_CSUM
            | libc::TUN_F_TSO4
            | libc::TUN_F_TSO6
            | libc::TUN_F_TSO_ECN
            | libc::TUN_F_UFO
    );
    assert_eq!(o.guest_features(), all);
    assert_eq!(
        TapOffloads::from_guest_features(bit(VIRTIO_NET_F_GUEST_CSUM)),
        TapOffloads::CSUM
    );
    assert!(TapOffloads::from_guest_features(0).is_empty());
}

#[test]
fn invalid_names_are_refused() {
    for bad in ["0123456789abcdef", "a/b", "a b", "a:b", ".", "..", "a\0"] {
        assert!(
            matches!(validate_name(bad), Err(TapError::InvalidName(_))),
            "{bad:?}"
        );
        assert!(
            matches!(Tap::open(bad, 1), Err(TapError::InvalidName(_))),
            "{bad:?}"
        );
    }
    assert!(validate_name("").is_ok());
    assert!(validate_name("vhu-net0.1_x").is_ok());
    assert!(validate_name("0123456789abcde").is_ok());
}

#[test]
fn zero_or_too_many_queue_pairs_are_refused() {
    assert!(matches!(Tap::open("t", 0), Err(TapError::QueueCount(0))));
    assert!(matches!(
        Tap::open("t", 257),
        Err(TapError::QueueCount(257))
    ));
}

#[test]
fn too_many_iovecs_are_refused() {
    assert_eq!(check_iovecs(MAX_IOVECS).unwrap(), 1024);
    assert_eq!(
        check_iovecs(MAX_IOVECS + 1).unwrap_err().kind(),
        io::ErrorKind::InvalidInput
    );
}

#[test]
fn tun_features_include_vnet_hdr_and_multi_queue() {
    in_netns(|| {
        let f = probe_features().unwrap();
        assert_ne!(f & iff(libc::IFF_TAP), 0);
        assert_ne!(f & iff(libc::IFF_VNET_HDR), 0);
        assert_ne!(f & iff(libc::IFF_MULTI_QUEUE), 0);
    });
}

#[test]
fn open_creates_nonblocking_tap_with_12_byte_vnet_hdr() {
    in_netns(|| {
        let tap = Tap::open("vhu0", 1).unwrap();
        assert_eq!(tap.name(), "vhu0");
        assert!(if_index("vhu0").is_some());
        assert_eq!(tap.vnet_hdr_len().unwrap(), 12);
        let q = &tap.queues()[0];
        // SAFETY: F_GETFL on an open descriptor.
        let fl = unsafe { libc::fcntl(q.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(fl & libc::O_NONBLOCK, 0);
        let (name, flags) = q.attached().unwrap();
        assert_eq!(name, "vhu0");
        let want = iff(libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR);
        assert_eq!(flags & want, want);
        assert_eq!(flags & iff(libc::IFF_MULTI_QUEUE), 0);
        let mut buf = [0u8; 64];
        assert!(is_would_block(&q.read(&mut buf).unwrap_err()));
    });
}

#[test]
fn empty_name_lets_the_kernel_choose() {
    in_netns(|| {
        let tap = Tap::open("", 2).unwrap();
        assert!(tap.name().starts_with("tap"), "{}", tap.name());
        for q in tap.queues() {
            assert_eq!(q.attached().unwrap().0, tap.name());
        }
    });
}

#[test]
fn vnet_hdr_len_follows_features() {
    in_netns(|| {
        let tap = Tap::open("vhu0", 1).unwrap();
        tap.configure(Negotiated::from_bits_unchecked(0)).unwrap();
        assert_eq!(tap.vnet_hdr_len().unwrap(), 10);
        tap.configure(Negotiated::from_bits_unchecked(bit(VIRTIO_NET_F_MRG_RXBUF)))
            .unwrap();
        assert_eq!(tap.vnet_hdr_len().unwrap(), 12);
        assert!(matches!(
            tap.set_vnet_hdr_len(8),
            Err(TapError::InvalidVnetHdrLen(8))
        ));
        assert_eq!(tap.vnet_hdr_len().unwrap(), 12);
    });
}

#[test]
fn multi_queue_tap_has_one_fd_per_pair() {
    in_netns(|| {
        let tap = Tap::open("vhu0", 3).unwrap();
        tap.set_link_up(true).unwrap();
        let sock = packet_socket("vhu0");
        assert_eq!(tap.queues().len(), 3);
        for (i, q) in tap.queues().iter().enumerate() {
            let (name, flags) = q.attached().unwrap();
            assert_eq!(name, "vhu0");
            assert_ne!(flags & iff(libc::IFF_MULTI_QUEUE), 0);
            let tag = u8::try_from(i).unwrap();
            let f = frame(tag);
            let hdr = [0u8; 12];
            q.writev(&[IoSlice::new(&hdr), IoSlice::new(&f)]).unwrap();
            assert_eq!(recv_ours(&sock), f, "queue {i}");
        }
    });
}

#[test]
fn detached_queue_can_be_attached_again() {
    in_netns(|| {
        let tap = Tap::open("vhu0", 2).unwrap();
        let q = &tap.queues()[1];
        q.set_enabled(false).unwrap();
        // The kernel refuses to detach a detached queue and to attach an attached one.
        assert_eq!(
            q.set_enabled(false).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
        q.set_enabled(true).unwrap();
        assert_eq!(
            q.set_enabled(true).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
        assert_eq!(q.attached().unwrap().0, "vhu0");
    });
}

#[test]
fn second_open_of_a_multi_queue_tap_attaches_more_queues() {
    in_netns(|| {
        let a = Tap::open("vhu0", 2).unwrap();
        let b = Tap::open("vhu0", 2).unwrap();
        assert_eq!(b.name(), a.name());
        assert!(matches!(
            Tap::open("vhu0", 1),
            Err(TapError::Attach { queue: 0, .. })
        ));
    });
}

#[test]
fn single_queue_tap_in_use_is_refused() {
    in_netns(|| {
        let _a = Tap::open("vhu0", 1).unwrap();
        let err = Tap::open("vhu0", 1).unwrap_err();
        assert!(matches!(err, TapError::Attach { .. }), "{err}");
        assert!(err.to_string().contains("vhu0"), "{err}");
    });
}

#[test]
fn frame_written_to_tap_is_seen_on_the_interface() {
    in_netns(|| {
        let tap = Tap::open("vhu0", 1).unwrap();
        tap.set_link_up(true).unwrap();
        let sock = packet_socket("vhu0");
        let f = frame(7);
        let hdr = [0u8; 12]; // flags 0, GSO_NONE, num_buffers 0
        let n = tap.queues()[0]
            .writev(&[IoSlice::new(&hdr), IoSlice::new(&f)])
            .unwrap();
        assert_eq!(n, 12 + f.len());
        assert_eq!(recv_ours(&sock), f);
    });
}

#[test]
fn frame_sent_on_the_interface_is_read_with_vnet_header() {
    in_netns(|| {
        let tap = Tap::open("vhu0", 1).unwrap();
        tap.set_link_up(true).unwrap();
        let sock = packet_socket("vhu0");
        let f = frame(9);
        send(&sock, &f);
        let (hdr, data) = read_ours(&tap.queues()[0], 12);
        assert_eq!(data, f);
        // flags, gso_type, hdr_len, gso_size, csum_start, csum_offset: all 0 for a plain
        // frame.
        assert_eq!(&hdr[..10], &[0u8; 10]);
        // num_buffers is zeroed by recent kernels and skipped by older ones: never 1.
        assert!(hdr[10..] == [0, 0] || hdr[10..] == [0xaa, 0xaa], "{hdr:?}");
    });
}

#[test]
fn legacy_10_byte_header_is_used_when_set() {
    in_netns(|| {
        let tap = Tap::open("vhu0", 1).unwrap();
        tap.set_vnet_hdr_len(10).unwrap();
        tap.set_link_up(true).unwrap();
        let sock = packet_socket("vhu0");
        let f = frame(3);
        send(&sock, &f);
        let (_, data) = read_ours(&tap.queues()[0], 10);
        assert_eq!(data, f);
        tap.queues()[0]
            .writev(&[IoSlice::new(&[0u8; 10]), IoSlice::new(&f)])
            .unwrap();
        assert_eq!(recv_ours(&sock), f);
    });
}

#[test]
fn offloads_the_kernel_accepts_are_active() {
    in_netns(|| {
        let tap = Tap::open("vhu0", 1).unwrap();
        let supported = tap.probe_offloads().unwrap();
        for f in [
            TapOffloads::CSUM,
            TapOffloads::TSO4,
            TapOffloads::TSO6,
            TapOffloads::TSO_ECN,
        ] {
            assert!(supported.contains(f), "{}", f.name());
        }
        let want = TapOffloads::CSUM | TapOffloads::TSO4;
        assert_eq!(tap.set_offloads(want).unwrap(), want);
    });
}

#[test]
fn offload_the_kernel_refuses_is_dropped() {
    in_netns(|| {
        let tap = Tap::open("vhu0", 1).unwrap();
        // TSO without checksum offload is refused by the kernel (EINVAL).
        let active = tap
            .set_offloads(TapOffloads::TSO4 | TapOffloads::TSO6)
            .unwrap();
        assert!(active.is_empty(), "{active:?}");
        // With CSUM it is kept; a refused flag does not take the others with it.
        let f = Negotiated::from_bits_unchecked(
            bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4),
        );
        assert_eq!(
            tap.configure(f).unwrap(),
            TapOffloads::CSUM | TapOffloads::TSO4
        );
    });
}
