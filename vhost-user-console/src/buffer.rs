// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The bounded byte buffers of the data path. Both are rings allocated once, hold any
//! bytes (no UTF-8 assumption) and keep them in order.
//!
//! * [`ReplayBuffer`]: guest output kept while no client is attached (or while the
//!   client is slower than the guest), replayed on attach. When full, the **oldest**
//!   bytes are dropped and counted ([`ReplayBuffer::dropped`]).
//! * [`InputBuffer`]: host-to-guest input waiting for receiveq buffers. It never drops:
//!   when it is full, the caller stops reading the host side (backpressure) until the
//!   guest posts buffers.

use std::io;

/// A fixed-capacity byte ring.
#[derive(Debug)]
struct Ring {
    buf: Box<[u8]>,
    head: usize,
    len: usize,
}

impl Ring {
    fn new(capacity: usize) -> Self {
        Self {
            buf: vec![0; capacity].into_boxed_slice(),
            head: 0,
            len: 0,
        }
    }

    fn capacity(&self) -> usize {
        self.buf.len()
    }

    fn free(&self) -> usize {
        self.capacity() - self.len
    }

    /// The queued bytes as up to two slices, oldest first.
    fn slices(&self) -> (&[u8], &[u8]) {
        let first_len = self.len.min(self.capacity() - self.head);
        let first = &self.buf[self.head..self.head + first_len];
        let second = &self.buf[..self.len - first_len];
        (first, second)
    }

    fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        self.len -= n;
        self.head = if self.len == 0 {
            0
        } else {
            (self.head + n) % self.capacity()
        };
    }

    /// The free space after the queued bytes that is contiguous in memory.
    fn tail_space(&mut self) -> &mut [u8] {
        let cap = self.capacity();
        if cap == 0 {
            return &mut [];
        }
        let tail = (self.head + self.len) % cap;
        let end = if tail < self.head || self.len == cap {
            self.head
        } else {
            cap
        };
        &mut self.buf[tail..end]
    }

    fn commit(&mut self, n: usize) {
        self.len += n.min(self.free());
    }

    /// Appends as much of `data` as fits; returns how much.
    fn push(&mut self, mut data: &[u8]) -> usize {
        let mut total = 0;
        while !data.is_empty() {
            let space = self.tail_space();
            let n = space.len().min(data.len());
            if n == 0 {
                break;
            }
            space[..n].copy_from_slice(&data[..n]);
            self.commit(n);
            data = &data[n..];
            total += n;
        }
        total
    }

    /// Copies queued bytes into `out` and consumes them.
    fn pop_into(&mut self, out: &mut [u8]) -> usize {
        let (a, b) = self.slices();
        let n1 = a.len().min(out.len());
        out[..n1].copy_from_slice(&a[..n1]);
        let n2 = b.len().min(out.len() - n1);
        out[n1..n1 + n2].copy_from_slice(&b[..n2]);
        self.consume(n1 + n2);
        n1 + n2
    }

    /// Writes queued bytes with `write` until it would block, fails or all are gone.
    fn drain_to(&mut self, write: &mut dyn FnMut(&[u8]) -> io::Result<usize>) -> io::Result<usize> {
        let mut total = 0;
        while self.len > 0 {
            let chunk = self.slices().0;
            match write(chunk) {
                Ok(0) => break,
                Ok(n) => {
                    let n = n.min(chunk.len());
                    self.consume(n);
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(total)
    }
}

/// Guest output kept for a client that is absent or slow; oldest bytes dropped when
/// full.
#[derive(Debug)]
pub struct ReplayBuffer {
    ring: Ring,
    dropped: u64,
}

impl ReplayBuffer {
    /// A buffer of `capacity` bytes (0: keeps nothing, every byte pushed is dropped).
    pub fn new(capacity: usize) -> Self {
        Self {
            ring: Ring::new(capacity),
            dropped: 0,
        }
    }

    /// Appends `data`, dropping the oldest bytes (queued ones first, then the start of
    /// `data` itself if it is longer than the capacity) to make room. Returns the
    /// number of bytes dropped by this call.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let cap = self.ring.capacity();
        let mut dropped = 0;
        let data = if data.len() > cap {
            dropped += data.len() - cap;
            &data[data.len() - cap..]
        } else {
            data
        };
        let overflow = data.len().saturating_sub(self.ring.free());
        self.ring.consume(overflow);
        dropped += overflow;
        self.ring.push(data);
        self.dropped = self.dropped.saturating_add(dropped as u64);
        dropped
    }

    /// Appends as much of `data` as fits without dropping anything (for a connected
    /// client that applies backpressure to the guest).
    pub fn push_bounded(&mut self, data: &[u8]) -> usize {
        self.ring.push(data)
    }

    /// Writes the kept bytes, oldest first, with `write` (e.g. to a client that just
    /// attached) until it would block; what it did not take stays queued.
    pub fn replay(
        &mut self,
        write: &mut dyn FnMut(&[u8]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        self.ring.drain_to(write)
    }

    /// The kept bytes, oldest first, as up to two slices.
    pub fn as_slices(&self) -> (&[u8], &[u8]) {
        self.ring.slices()
    }

    /// Forgets the first `n` kept bytes.
    pub fn consume(&mut self, n: usize) {
        self.ring.consume(n);
    }

    /// Bytes kept.
    pub fn len(&self) -> usize {
        self.ring.len
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.ring.len == 0
    }

    /// Free space before bytes would be dropped.
    pub fn free(&self) -> usize {
        self.ring.free()
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.ring.capacity()
    }

    /// Bytes dropped since creation.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Forgets the kept bytes (not the dropped count).
    pub fn clear(&mut self) {
        self.ring.consume(self.ring.len);
    }
}

/// Host-to-guest input, bounded: when full, stop reading the host side.
#[derive(Debug)]
pub struct InputBuffer {
    ring: Ring,
}

impl InputBuffer {
    /// A buffer of `capacity` bytes (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            ring: Ring::new(capacity.max(1)),
        }
    }

    /// Reads from the host side with `read` into the free space until it would block,
    /// reports end of file (`Ok(0)`), or the buffer is full. Returns the bytes added;
    /// `WouldBlock` is not an error here. Never reads more than fits, so nothing is
    /// dropped: when [`InputBuffer::is_full`], stop watching the host side for input.
    pub fn fill_from(
        &mut self,
        read: &mut dyn FnMut(&mut [u8]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let mut total = 0;
        loop {
            let space = self.ring.tail_space();
            if space.is_empty() {
                return Ok(total);
            }
            match read(space) {
                Ok(0) => return Ok(total),
                Ok(n) => {
                    self.ring.commit(n);
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(total),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if total > 0 {
                        return Ok(total);
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Appends as much of `data` as fits; returns how much (the rest is the caller's to
    /// keep).
    pub fn push(&mut self, data: &[u8]) -> usize {
        self.ring.push(data)
    }

    /// Moves queued bytes, oldest first, into `out` (a receiveq buffer); returns how many.
    pub fn pop_into(&mut self, out: &mut [u8]) -> usize {
        self.ring.pop_into(out)
    }

    /// The queued bytes, oldest first, as up to two slices.
    pub fn as_slices(&self) -> (&[u8], &[u8]) {
        self.ring.slices()
    }

    /// Forgets the first `n` queued bytes (after copying them from [`Self::as_slices`]).
    pub fn consume(&mut self, n: usize) {
        self.ring.consume(n);
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.ring.len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.ring.len == 0
    }

    /// Whether the buffer is full: stop reading the host side.
    pub fn is_full(&self) -> bool {
        self.ring.free() == 0
    }

    /// Free space in bytes.
    pub fn free(&self) -> usize {
        self.ring.free()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(r: &ReplayBuffer) -> Vec<u8> {
        let (a, b) = r.as_slices();
        [a, b].concat()
    }

    #[test]
    fn replay_keeps_order_across_wrap() {
        let mut r = ReplayBuffer::new(8);
        r.push(b"abcde");
        r.consume(3);
        r.push(b"fghij");
        assert_eq!(contents(&r), b"defghij");
        assert_eq!(r.dropped(), 0);
    }

    #[test]
    fn replay_drops_oldest_and_counts() {
        let mut r = ReplayBuffer::new(4);
        assert_eq!(r.push(b"abc"), 0);
        assert_eq!(r.push(b"def"), 2);
        assert_eq!(contents(&r), b"cdef");
        assert_eq!(r.push(b"0123456789"), 10);
        assert_eq!(contents(&r), b"6789");
        assert_eq!(r.dropped(), 12);
    }

    #[test]
    fn replay_of_zero_capacity_drops_everything() {
        let mut r = ReplayBuffer::new(0);
        assert_eq!(r.push(b"xyz"), 3);
        assert!(r.is_empty());
        assert_eq!(r.dropped(), 3);
        assert_eq!(r.push_bounded(b"a"), 0);
    }

    #[test]
    fn replay_writes_until_would_block_and_keeps_rest() {
        let mut r = ReplayBuffer::new(8);
        r.push(b"123456");
        r.consume(4);
        r.push(b"789abc");
        let mut out = Vec::new();
        let mut budget = 5;
        let n = r
            .replay(&mut |b: &[u8]| {
                if budget == 0 {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                let n = b.len().min(budget);
                budget -= n;
                out.extend_from_slice(&b[..n]);
                Ok(n)
            })
            .unwrap();
        assert_eq!(n, 5);
        assert_eq!(out, b"56789");
        assert_eq!(contents(&r), b"abc");
    }

    #[test]
    fn replay_push_bounded_never_drops() {
        let mut r = ReplayBuffer::new(4);
        assert_eq!(r.push_bounded(b"abcdef"), 4);
        assert_eq!(contents(&r), b"abcd");
        assert_eq!(r.dropped(), 0);
    }

    #[test]
    fn replay_holds_any_bytes() {
        let mut r = ReplayBuffer::new(256);
        let all: Vec<u8> = (0..=255).collect();
        r.push(&all);
        assert_eq!(contents(&r), all);
    }

    #[test]
    fn input_fill_stops_when_full() {
        let mut b = InputBuffer::new(4);
        let mut calls = 0;
        let n = b
            .fill_from(&mut |buf: &mut [u8]| {
                calls += 1;
                buf.fill(b'x');
                Ok(buf.len())
            })
            .unwrap();
        assert_eq!(n, 4);
        assert!(b.is_full());
        assert_eq!(calls, 1);
        assert_eq!(b.fill_from(&mut |_| panic!("read while full")).unwrap(), 0);
    }

    #[test]
    fn input_fill_treats_would_block_as_done() {
        let mut b = InputBuffer::new(8);
        let n = b
            .fill_from(&mut |_| Err(io::ErrorKind::WouldBlock.into()))
            .unwrap();
        assert_eq!(n, 0);
        assert!(b
            .fill_from(&mut |_| Err(io::Error::from_raw_os_error(libc::EIO)))
            .is_err());
    }

    #[test]
    fn input_keeps_order_across_wrap() {
        let mut b = InputBuffer::new(5);
        assert_eq!(b.push(b"abcd"), 4);
        let mut out = [0u8; 3];
        assert_eq!(b.pop_into(&mut out), 3);
        assert_eq!(&out, b"abc");
        let mut src = &b"efghij"[..];
        let n = b
            .fill_from(&mut |buf: &mut [u8]| {
                let n = buf.len().min(src.len());
                buf[..n].copy_from_slice(&src[..n]);
                src = &src[n..];
                Ok(n)
            })
            .unwrap();
        assert_eq!(n, 4, "fills exactly the free space, in two pieces");
        assert_eq!(src, b"ij", "the rest stays in the host side");
        let mut out = [0u8; 8];
        let n = b.pop_into(&mut out);
        assert_eq!(&out[..n], b"defgh");
    }
}
