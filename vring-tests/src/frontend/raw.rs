// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-user requests the `vhost` crate's frontend cannot send, written directly on the
//! connection.
//!
//! `Frontend::set_vring_base` takes a `u16`, but a packed ring's base carries the last
//! avail index and wrap counter in bits 0–15 *and* the last used index and wrap counter in
//! bits 16–31 (QEMU sends and decodes both halves). A fresh packed ring starts with both
//! wrap counters at 1: 0x8000_8000.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use super::FrontendError;

/// Base of a fresh packed ring: avail and used index 0, both wrap counters 1.
pub(crate) const PACKED_FRESH_BASE: u32 = 0x8000_8000;

const SET_VRING_BASE: u32 = 10;
const FLAG_VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// Sends SET_VRING_BASE(`index`, `base`) and, with REPLY_ACK, checks the ack.
///
/// `sock` is a duplicate of the `vhost` frontend's socket; the caller does not use the
/// frontend concurrently, so the message is not interleaved with another.
pub(crate) fn set_vring_base(
    sock: &UnixStream,
    index: u16,
    base: u32,
    reply_ack: bool,
) -> Result<(), FrontendError> {
    let flags = FLAG_VERSION_1 | if reply_ack { FLAG_NEED_REPLY } else { 0 };
    let mut msg = Vec::with_capacity(20);
    msg.extend_from_slice(&SET_VRING_BASE.to_le_bytes());
    msg.extend_from_slice(&flags.to_le_bytes());
    msg.extend_from_slice(&8u32.to_le_bytes());
    msg.extend_from_slice(&u32::from(index).to_le_bytes());
    msg.extend_from_slice(&base.to_le_bytes());
    let ctx = |what: &str| format!("SET_VRING_BASE {base:#x} (queue {index}): {what}");
    (&*sock)
        .write_all(&msg)
        .map_err(|e| FrontendError::io(ctx("sending"), e))?;
    if !reply_ack {
        return Ok(());
    }
    let mut reply = [0u8; 20];
    (&*sock)
        .read_exact(&mut reply)
        .map_err(|e| FrontendError::io(ctx("reading the ack"), e))?;
    let word = |i: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&reply[4 * i..4 * i + 4]);
        u32::from_le_bytes(b)
    };
    let mut value = [0u8; 8];
    value.copy_from_slice(&reply[12..20]);
    let value = u64::from_le_bytes(value);
    if word(0) != SET_VRING_BASE || word(1) & FLAG_REPLY == 0 || word(2) != 8 {
        return Err(FrontendError::Protocol(ctx(&format!(
            "bad ack header {:#x}/{:#x}/{}",
            word(0),
            word(1),
            word(2)
        ))));
    }
    if value != 0 {
        return Err(FrontendError::Protocol(ctx(&format!(
            "refused by the backend (ack {value})"
        ))));
    }
    Ok(())
}

/// Runs `f` (a request on the frontend whose socket `sock` duplicates); if it has not
/// returned after `timeout`, shuts the socket down so that it fails instead of blocking.
///
/// The socket's read timeout is not enough: the `vhost` crate retries a receive that
/// timed out (EAGAIN), so a reply it misreads as longer than it is (libvhost-user's empty
/// GET_CONFIG reply) would block it forever. After a shutdown the connection is unusable.
pub(crate) fn with_watchdog<T>(
    sock: &UnixStream,
    timeout: std::time::Duration,
    f: impl FnOnce() -> T,
) -> T {
    let (done, wait) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        s.spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(timeout) {
                log::warn!("no reply within {timeout:?}: shutting the connection down");
                let _ = sock.shutdown(std::net::Shutdown::Both);
            }
        });
        let r = f();
        let _ = done.send(());
        r
    })
}
