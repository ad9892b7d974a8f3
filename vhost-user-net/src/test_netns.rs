// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
// Test helpers shared by the TAP and device tests: a network namespace per test (so the
// host's interfaces are never touched) and an AF_PACKET socket on an interface in it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::tap::{if_index, TUN_PATH};

/// An experimental EtherType (IEEE 802 local experimental 1), to tell our frames from
/// the IPv6 neighbour discovery traffic an interface sends when it comes up.
pub(crate) const ETHERTYPE: [u8; 2] = [0x88, 0xb5];

/// Runs `f` in a new network namespace, on a thread of its own. Returns without running
/// it when the test cannot create TAPs here.
pub(crate) fn in_netns(f: impl FnOnce() + Send + 'static) {
    // SAFETY: geteuid takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new(TUN_PATH).exists() {
        eprintln!("skipped: needs root and {TUN_PATH}");
        return;
    }
    let t = std::thread::spawn(move || {
        // SAFETY: unshare takes no pointers; CLONE_NEWNET moves only this thread into a
        // new network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "skipped: unshare(CLONE_NEWNET): {}",
                io::Error::last_os_error()
            );
            return;
        }
        f();
    });
    if let Err(panic) = t.join() {
        std::panic::resume_unwind(panic);
    }
}

/// An AF_PACKET socket bound to interface `name` (all EtherTypes), non-blocking.
pub(crate) fn packet_socket(name: &str) -> OwnedFd {
    let proto = u16::try_from(libc::ETH_P_ALL).unwrap().to_be();
    // SAFETY: socket() takes no pointers; the result is checked.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    assert!(
        raw >= 0,
        "socket(AF_PACKET): {}",
        io::Error::last_os_error()
    );
    // SAFETY: `raw` is a descriptor we just opened and own.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain data; all zeros is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
    addr.sll_protocol = proto;
    addr.sll_ifindex = i32::try_from(if_index(name).unwrap()).unwrap();
    // SAFETY: `addr` is a valid sockaddr_ll and the length passed is its size.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            u32::try_from(size_of::<libc::sockaddr_ll>()).unwrap(),
        )
    };
    assert_eq!(r, 0, "bind(AF_PACKET): {}", io::Error::last_os_error());
    sock
}

pub(crate) fn wait_readable(fd: RawFd, deadline: Instant) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the duration of the call.
    let r = unsafe {
        libc::poll(
            &mut p,
            1,
            i32::try_from(left.as_millis()).unwrap_or(i32::MAX),
        )
    };
    r > 0
}

/// Receives from `sock` until a frame with [`ETHERTYPE`] arrives (5 s at most).
pub(crate) fn recv_ours(sock: &OwnedFd) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65536];
    while wait_readable(sock.as_raw_fd(), deadline) {
        // SAFETY: `buf` is writable for its length during the call.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if let Ok(n) = usize::try_from(n) {
            if buf.get(12..14) == Some(&ETHERTYPE[..]) {
                return buf[..n].to_vec();
            }
        }
    }
    panic!("no frame with our EtherType on the packet socket");
}

pub(crate) fn send(sock: &OwnedFd, frame: &[u8]) {
    // SAFETY: `frame` is readable for its length during the call.
    let n = unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    assert_eq!(
        usize::try_from(n).ok(),
        Some(frame.len()),
        "send: {}",
        io::Error::last_os_error()
    );
}
