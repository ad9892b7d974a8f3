// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Descriptor chains: the validated, flattened view of one buffer made available by the
//! driver, independent of the ring layout it came from.
//!
//! A [`DescriptorChain`] is filled by [`crate::Queue::pop_into`] in one pass that validates
//! every descriptor up front (crosvm's rule: validate first, use later) and translates
//! every buffer to host memory once. What remains is a list of host iovecs, readable ones
//! first, which can be handed to `readv`/`writev`/io_uring without copying, or walked with
//! [`Reader`] and [`Writer`]. The chain holds an `Arc` of the [`GuestMemoryView`] it was
//! translated with, so the iovecs stay valid while the chain lives, even if the frontend
//! replaces the memory table in the meantime.

use std::io;
use std::sync::Arc;

use vm_memory::ByteValued;

use crate::error::{Error, Result};
use crate::memory::GuestMemoryView;

/// Most indirect-table entries accepted (the table length field is 32 bits; a table of
/// more than 65535 descriptors cannot be addressed by a 16-bit `next`).
pub(crate) const MAX_INDIRECT_ENTRIES: u32 = u16::MAX as u32;

/// One validated guest buffer of a chain (or a piece of one, where it crosses a region).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub guest_addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

/// A validated descriptor chain; see the module documentation.
///
/// Reuse one `DescriptorChain` across [`crate::Queue::pop_into`] calls to keep the hot
/// path free of allocation: its vectors keep their capacity.
#[derive(Default)]
pub struct DescriptorChain {
    id: u16,
    ring_slots: u16,
    desc_count: u32,
    iovecs: Vec<libc::iovec>,
    guest_addrs: Vec<u64>,
    readable_segments: usize,
    readable_len: u32,
    writable_len: u32,
    total_len: u64,
    seen_writable: bool,
    mem: Option<Arc<GuestMemoryView>>,
}

// SAFETY: the raw pointers in `iovecs` point into guest mappings kept alive by `mem`
// (an `Arc<GuestMemoryView>`, itself `Send + Sync`); they carry no thread affinity.
unsafe impl Send for DescriptorChain {}
// SAFETY: shared references only hand out copies of the pointers, never write through them.
unsafe impl Sync for DescriptorChain {}

impl std::fmt::Debug for DescriptorChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DescriptorChain")
            .field("id", &self.id)
            .field("ring_slots", &self.ring_slots)
            .field("desc_count", &self.desc_count)
            .field("readable_len", &self.readable_len)
            .field("writable_len", &self.writable_len)
            .field("segments", &self.segments().collect::<Vec<_>>())
            .finish()
    }
}

impl DescriptorChain {
    /// An empty chain, to be filled by [`crate::Queue::pop_into`].
    pub fn new() -> Self {
        Self::default()
    }

    /// The value to pass to [`crate::Queue::add_used`]: the head descriptor index (split)
    /// or the buffer ID (packed).
    pub fn id(&self) -> u16 {
        self.id
    }

    /// Ring slots the chain occupies (packed; 1 for an indirect buffer). For split rings,
    /// the number of descriptors in the descriptor table walked.
    pub fn ring_slots(&self) -> u16 {
        self.ring_slots
    }

    /// Number of descriptors in the chain, counting indirect-table entries but not the
    /// descriptors that point to indirect tables.
    pub fn descriptor_count(&self) -> u32 {
        self.desc_count
    }

    /// Total bytes of the device-readable buffers.
    pub fn readable_len(&self) -> u32 {
        self.readable_len
    }

    /// Total bytes of the device-writable buffers.
    pub fn writable_len(&self) -> u32 {
        self.writable_len
    }

    /// Host iovecs of the device-readable buffers, in chain order.
    pub fn readable_iovecs(&self) -> &[libc::iovec] {
        &self.iovecs[..self.readable_segments]
    }

    /// Host iovecs of the device-writable buffers, in chain order.
    pub fn writable_iovecs(&self) -> &[libc::iovec] {
        &self.iovecs[self.readable_segments..]
    }

    /// Hints the CPU to start loading the first `len` bytes of the device-readable
    /// buffers into its caches, and returns at once.
    ///
    /// A device that pops a batch of chains and then reads each (a network switch reading
    /// Ethernet headers) calls this for the whole batch first, so that the cache misses on
    /// buffers the driver wrote on another CPU overlap instead of stalling one after the
    /// other. Only a hint: nothing is read, no fault can happen (on architectures without
    /// a prefetch instruction it does nothing).
    pub fn prefetch_readable(&self, len: usize) {
        prefetch_iovecs(self.readable_iovecs(), len, prefetch_line);
    }

    /// Hints the CPU to take the first `len` bytes of the device-writable buffers into
    /// its caches for writing (x86 PREFETCHW: the line is fetched exclusive, so the other
    /// CPUs' copies are invalidated now rather than when the device's stores reach it),
    /// and returns at once.
    ///
    /// A device that pops a batch of receive chains and then copies a frame into each
    /// calls this as it pops them: the driver's CPU last touched those lines, and the
    /// ownership transfers overlap instead of holding up the copies one after the other.
    /// Only a hint: nothing is written, no fault can happen.
    pub fn prefetch_writable(&self, len: usize) {
        prefetch_iovecs(self.writable_iovecs(), len, prefetch_line_for_write);
    }

    /// The guest memory the iovecs point into; holding it keeps them valid.
    pub fn memory(&self) -> Option<&Arc<GuestMemoryView>> {
        self.mem.as_ref()
    }

    /// The chain's buffers as guest ranges (zero-length descriptors are omitted; a buffer
    /// crossing a guest memory region boundary appears as several pieces).
    pub fn segments(&self) -> impl Iterator<Item = Segment> + '_ {
        self.iovecs
            .iter()
            .zip(&self.guest_addrs)
            .enumerate()
            .map(|(i, (iov, &guest_addr))| Segment {
                guest_addr,
                // Segment lengths come from 32-bit descriptor lengths.
                len: u32::try_from(iov.iov_len).unwrap_or(u32::MAX),
                writable: i >= self.readable_segments,
            })
    }

    /// A reader over the device-readable buffers.
    pub fn reader(&self) -> Reader<'_> {
        Reader {
            cursor: Cursor::new(self.readable_iovecs()),
        }
    }

    /// A writer over the device-writable buffers; it never writes past them.
    pub fn writer(&self) -> Writer<'_> {
        Writer {
            cursor: Cursor::new(self.writable_iovecs()),
        }
    }

    /// Appends to `out` the iovecs covering `len` bytes of the readable buffers starting
    /// `offset` bytes in. Returns how many bytes the appended iovecs cover (less than `len`
    /// if the readable part is shorter).
    pub fn readable_iovecs_range(
        &self,
        offset: usize,
        len: usize,
        out: &mut Vec<libc::iovec>,
    ) -> usize {
        sub_iovecs(self.readable_iovecs(), offset, len, out)
    }

    /// Like [`Self::readable_iovecs_range`], over the writable buffers.
    pub fn writable_iovecs_range(
        &self,
        offset: usize,
        len: usize,
        out: &mut Vec<libc::iovec>,
    ) -> usize {
        sub_iovecs(self.writable_iovecs(), offset, len, out)
    }

    // ---- building (crate-internal, used by the ring layouts) ----

    pub(crate) fn reset(&mut self, mem: &Arc<GuestMemoryView>) {
        self.id = 0;
        self.ring_slots = 0;
        self.desc_count = 0;
        self.iovecs.clear();
        self.guest_addrs.clear();
        self.readable_segments = 0;
        self.readable_len = 0;
        self.writable_len = 0;
        self.total_len = 0;
        self.seen_writable = false;
        // Only touch the reference count when the memory table actually changed.
        match &self.mem {
            Some(m) if Arc::ptr_eq(m, mem) => {}
            _ => self.mem = Some(Arc::clone(mem)),
        }
    }

    pub(crate) fn set_head(&mut self, id: u16, ring_slots: u16) {
        self.id = id;
        self.ring_slots = ring_slots;
    }

    /// Counts one descriptor against `max` (loop and length protection).
    #[inline]
    pub(crate) fn count_descriptor(&mut self, max: u32) -> Result<()> {
        self.desc_count += 1;
        if self.desc_count > max {
            return Err(Error::ChainTooLong { max });
        }
        Ok(())
    }

    /// Validates and appends one buffer (already counted with `count_descriptor`).
    ///
    /// The common case (the buffer inside one region) is inlined into the ring walks; a
    /// buffer crossing regions takes the out-of-line [`Self::push_buffer_pieces`].
    #[inline(always)]
    pub(crate) fn push_buffer(
        &mut self,
        view: &GuestMemoryView,
        hint: &mut usize,
        addr: u64,
        len: u32,
        writable: bool,
    ) -> Result<()> {
        if writable {
            self.seen_writable = true;
        } else if self.seen_writable {
            // §2.7.4.2: device-writable descriptors come after all device-readable ones
            // (zero-length writable descriptors included).
            return Err(Error::ReadableAfterWritable { addr });
        }
        self.total_len += u64::from(len);
        if self.total_len > u64::from(u32::MAX) {
            return Err(Error::ChainTooLarge);
        }
        if len == 0 {
            // Nothing to map.
            return Ok(());
        }
        match view.translate(addr, u64::from(len), hint) {
            Some(host) => {
                self.push_segment(host, len, addr, writable);
                Ok(())
            }
            None => self.push_buffer_pieces(view, hint, addr, len, writable),
        }
    }

    /// Slow path of [`Self::push_buffer`]: a buffer split across regions, or outside
    /// guest memory.
    #[cold]
    #[inline(never)]
    fn push_buffer_pieces(
        &mut self,
        view: &GuestMemoryView,
        hint: &mut usize,
        addr: u64,
        len: u32,
        writable: bool,
    ) -> Result<()> {
        let outside = || Error::BufferOutsideMemory {
            addr,
            len: u64::from(len),
        };
        let iovecs = &mut self.iovecs;
        let guest_addrs = &mut self.guest_addrs;
        let mut pieces = 0usize;
        view.for_each_piece(
            addr,
            u64::from(len),
            hint,
            |host, piece, gpa| {
                iovecs.push(libc::iovec {
                    iov_base: host.cast(),
                    // A piece is at most `len`, a u32.
                    iov_len: crate::usize_from(piece),
                });
                guest_addrs.push(gpa);
                pieces += 1;
                Ok(())
            },
            outside,
        )?;
        if writable {
            self.writable_len += len;
        } else {
            self.readable_len += len;
            self.readable_segments += pieces;
        }
        Ok(())
    }

    #[inline(always)]
    fn push_segment(&mut self, host: *mut u8, len: u32, gpa: u64, writable: bool) {
        self.iovecs.push(libc::iovec {
            iov_base: host.cast(),
            iov_len: len as usize,
        });
        self.guest_addrs.push(gpa);
        if writable {
            self.writable_len += len;
        } else {
            self.readable_len += len;
            self.readable_segments += 1;
        }
    }
}

/// Issues a prefetch for every cache line of the first `len` bytes of `iovecs`.
#[inline(always)]
fn prefetch_iovecs(iovecs: &[libc::iovec], len: usize, prefetch: fn(*const u8)) {
    const LINE: usize = 64;
    let mut left = len;
    for iov in iovecs {
        if left == 0 {
            break;
        }
        let n = iov.iov_len.min(left);
        let base = iov.iov_base.cast::<u8>().cast_const();
        let mut off = 0;
        while off < n {
            prefetch(base.wrapping_add(off));
            off += LINE;
        }
        left -= n;
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_line(p: *const u8) {
    // SAFETY: SSE, which the intrinsic needs, is part of the x86_64 baseline; a prefetch
    // does not access memory (it never faults, whatever the address): it only hints the
    // cache.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>());
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn prefetch_line(_p: *const u8) {}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_line_for_write(p: *const u8) {
    // SAFETY: as in `prefetch_line`: a hint that never faults. `_MM_HINT_ET0` emits
    // PREFETCHW, which CPUs without it execute as a no-op (it is in the NOP space).
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_ET0 }>(p.cast::<i8>());
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn prefetch_line_for_write(_p: *const u8) {}

/// Appends to `out` the sub-range `offset..offset + len` of `iovs`; returns bytes covered.
pub fn sub_iovecs(
    iovs: &[libc::iovec],
    mut offset: usize,
    len: usize,
    out: &mut Vec<libc::iovec>,
) -> usize {
    let mut left = len;
    for iov in iovs {
        if left == 0 {
            break;
        }
        if offset >= iov.iov_len {
            offset -= iov.iov_len;
            continue;
        }
        let n = (iov.iov_len - offset).min(left);
        out.push(libc::iovec {
            iov_base: iov.iov_base.cast::<u8>().wrapping_add(offset).cast(),
            iov_len: n,
        });
        left -= n;
        offset = 0;
    }
    len - left
}

/// A position in a list of iovecs.
#[derive(Clone)]
struct Cursor<'a> {
    iovs: &'a [libc::iovec],
    idx: usize,
    off: usize,
    done: usize,
    total: usize,
}

impl<'a> Cursor<'a> {
    fn new(iovs: &'a [libc::iovec]) -> Self {
        Cursor {
            iovs,
            idx: 0,
            off: 0,
            done: 0,
            total: iovs.iter().map(|i| i.iov_len).sum(),
        }
    }

    fn remaining(&self) -> usize {
        self.total - self.done
    }

    /// Calls `f(host_ptr, n)` for consecutive pieces until `want` bytes or the end.
    fn step(&mut self, mut want: usize, mut f: impl FnMut(*mut u8, usize)) -> usize {
        let start = self.done;
        while want > 0 {
            let Some(iov) = self.iovs.get(self.idx) else {
                break;
            };
            let avail = iov.iov_len - self.off;
            if avail == 0 {
                self.idx += 1;
                self.off = 0;
                continue;
            }
            let n = avail.min(want);
            f(iov.iov_base.cast::<u8>().wrapping_add(self.off), n);
            self.off += n;
            self.done += n;
            want -= n;
        }
        self.done - start
    }
}

/// Reads the device-readable part of a chain in order (`io::Read`).
#[derive(Clone)]
pub struct Reader<'a> {
    cursor: Cursor<'a>,
}

impl Reader<'_> {
    /// Bytes left to read.
    pub fn available(&self) -> usize {
        self.cursor.remaining()
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> usize {
        self.cursor.done
    }

    /// Skips up to `n` bytes; returns how many were skipped.
    pub fn consume(&mut self, n: usize) -> usize {
        self.cursor.step(n, |_, _| {})
    }

    /// Reads a whole `T`, or fails with `UnexpectedEof` without consuming anything.
    pub fn read_obj<T: ByteValued + Default>(&mut self) -> io::Result<T> {
        if self.available() < std::mem::size_of::<T>() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut obj = T::default();
        let n = io::Read::read(self, obj.as_mut_slice())?;
        debug_assert_eq!(n, std::mem::size_of::<T>());
        Ok(obj)
    }

    /// Appends iovecs for the next `n` bytes to `out` and consumes them (zero-copy).
    pub fn take_iovecs(&mut self, n: usize, out: &mut Vec<libc::iovec>) -> usize {
        self.cursor.step(n, |p, len| {
            out.push(libc::iovec {
                iov_base: p.cast(),
                iov_len: len,
            })
        })
    }
}

impl io::Read for Reader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut copied = 0;
        self.cursor.step(buf.len(), |src, n| {
            // SAFETY: `src..src + n` lies inside a guest buffer validated and translated when
            // the chain was built, whose mapping the chain keeps alive; `buf[copied..]` has
            // room for `n` bytes because `step` never yields more than asked. Guest memory
            // never overlaps a Rust-owned buffer.
            unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr().add(copied), n) };
            copied += n;
        });
        Ok(copied)
    }
}

/// Writes the device-writable part of a chain in order (`io::Write`); it never writes
/// past the writable capacity and never touches readable buffers.
#[derive(Clone)]
pub struct Writer<'a> {
    cursor: Cursor<'a>,
}

impl Writer<'_> {
    /// Bytes of writable room left.
    pub fn available(&self) -> usize {
        self.cursor.remaining()
    }

    /// Bytes written so far (the value for `add_used`'s length, §2.7.8).
    pub fn bytes_written(&self) -> usize {
        self.cursor.done
    }

    /// Skips `n` bytes of writable room without writing them.
    pub fn consume(&mut self, n: usize) -> usize {
        self.cursor.step(n, |_, _| {})
    }

    /// Writes a whole `T`, or fails with `WriteZero` without writing anything.
    pub fn write_obj<T: ByteValued>(&mut self, obj: T) -> io::Result<()> {
        if self.available() < std::mem::size_of::<T>() {
            return Err(io::ErrorKind::WriteZero.into());
        }
        io::Write::write_all(self, obj.as_slice())
    }

    /// Appends iovecs for the next `n` bytes of room to `out` and consumes them.
    pub fn take_iovecs(&mut self, n: usize, out: &mut Vec<libc::iovec>) -> usize {
        self.cursor.step(n, |p, len| {
            out.push(libc::iovec {
                iov_base: p.cast(),
                iov_len: len,
            })
        })
    }
}

impl io::Write for Writer<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut copied = 0;
        self.cursor.step(buf.len(), |dst, n| {
            // SAFETY: `dst..dst + n` lies inside a device-writable guest buffer validated and
            // translated when the chain was built and kept mapped by the chain; `buf[copied..]`
            // holds at least `n` bytes. Guest memory never overlaps a Rust-owned buffer.
            unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr().add(copied), dst, n) };
            copied += n;
        });
        Ok(copied)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How many of `chains`, in order, one buffer of `len` bytes fills when written across
/// their device-writable parts (VIRTIO_NET_F_MRG_RXBUF, virtio 1.2 §5.1.6.4: a received
/// packet may span several chains, the first one's header saying how many in
/// `num_buffers`). `None` if they do not hold `len` bytes together; a zero-length buffer
/// takes one chain.
pub fn merged_chains_needed(chains: &[DescriptorChain], len: usize) -> Option<usize> {
    let mut room = 0usize;
    for (i, c) in chains.iter().enumerate() {
        room += c.writable_len() as usize;
        if room >= len {
            return Some(i + 1);
        }
    }
    None
}

/// Writes `parts` (one buffer, e.g. a vnet header and a frame, in order) across the
/// device-writable parts of `chains`, filling each chain before the next, and stores the
/// bytes written to each chain in `lens` (for one `add_used_batch` of all of them, which
/// publishes them together). Returns how many chains were used, or `None` (nothing
/// written) if the chains or `lens` are too short: check with [`merged_chains_needed`]
/// first to size the header's `num_buffers`. No allocation.
pub fn write_merged(
    chains: &[DescriptorChain],
    parts: &[&[u8]],
    lens: &mut [u32],
) -> Option<usize> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let needed = merged_chains_needed(chains, total)?;
    if lens.len() < needed {
        return None;
    }
    let mut ci = 0;
    let mut w = chains.first()?.writer();
    for part in parts {
        let mut rest: &[u8] = part;
        while !rest.is_empty() {
            let n = io::Write::write(&mut w, rest).unwrap_or(0);
            rest = &rest[n..];
            if w.available() == 0 && (!rest.is_empty() || ci + 1 < needed) {
                lens[ci] = u32::try_from(w.bytes_written()).unwrap_or(u32::MAX);
                ci += 1;
                if ci == needed {
                    break;
                }
                w = chains[ci].writer();
            }
        }
    }
    if ci < needed {
        lens[ci] = u32::try_from(w.bytes_written()).unwrap_or(u32::MAX);
    }
    Some(needed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_iovecs_spans_segments() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        let iovs = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 8,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 8,
            },
        ];
        let mut out = Vec::new();
        assert_eq!(sub_iovecs(&iovs, 6, 4, &mut out), 4);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].iov_len, 2);
        assert_eq!(out[1].iov_base, b.as_mut_ptr().cast());
        out.clear();
        assert_eq!(sub_iovecs(&iovs, 14, 10, &mut out), 2);
    }

    fn chains(mem: &Arc<GuestMemoryView>, lens: &[u32]) -> Vec<DescriptorChain> {
        let mut out = Vec::new();
        let mut addr = 0x1000u64;
        for (id, &len) in lens.iter().enumerate() {
            let mut c = DescriptorChain::new();
            c.reset(mem);
            c.push_buffer(mem, &mut 0, addr, len, true).unwrap();
            c.set_head(u16::try_from(id).unwrap(), 1);
            addr += 0x1000;
            out.push(c);
        }
        out
    }

    fn view() -> (Arc<GuestMemoryView>, vm_memory::GuestMemoryMmap<()>) {
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 0x10000)])
                .unwrap();
        (
            Arc::new(GuestMemoryView::new(Arc::new(mem.clone())).unwrap()),
            mem,
        )
    }

    #[test]
    fn merged_write_fills_chains_in_order_and_reports_each_length() {
        use vm_memory::{Bytes, GuestAddress};
        let (view, mem) = view();
        let cs = chains(&view, &[100, 100, 100]);
        let hdr = [0xaau8; 12];
        let frame: Vec<u8> = (0..=200u8).collect();
        assert_eq!(merged_chains_needed(&cs, 12 + frame.len()), Some(3));
        let mut lens = [0u32; 4];
        assert_eq!(write_merged(&cs, &[&hdr, &frame], &mut lens), Some(3));
        assert_eq!(lens[..3], [100, 100, 13]);
        let mut back = vec![0u8; 100];
        mem.read_slice(&mut back, GuestAddress(0x1000)).unwrap();
        assert_eq!(back[..12], hdr);
        assert_eq!(back[12..], frame[..88]);
        mem.read_slice(&mut back, GuestAddress(0x2000)).unwrap();
        assert_eq!(back[..], frame[88..188]);
        let mut tail = [0u8; 13];
        mem.read_slice(&mut tail, GuestAddress(0x3000)).unwrap();
        assert_eq!(tail[..], frame[188..]);
    }

    #[test]
    fn merged_write_that_does_not_fit_writes_nothing() {
        let (view, _mem) = view();
        let cs = chains(&view, &[10, 10]);
        assert_eq!(merged_chains_needed(&cs, 21), None);
        let mut lens = [0u32; 2];
        assert_eq!(write_merged(&cs, &[&[1u8; 21]], &mut lens), None);
        // Too few length slots for the chains needed.
        let mut one = [0u32; 1];
        assert_eq!(write_merged(&cs, &[&[1u8; 15]], &mut one), None);
        // An exact fit uses exactly the chains needed.
        assert_eq!(write_merged(&cs, &[&[1u8; 10]], &mut lens), Some(1));
        assert_eq!(lens[0], 10);
    }
}
