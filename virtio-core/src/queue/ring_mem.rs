// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Raw access to a ring area in guest memory, translated to a host pointer once per
//! configuration.
//!
//! Every access goes through this type so that the unsafe code touching ring memory sits
//! in one place. Offsets are computed by the ring code from the validated queue size; the
//! area's length and alignment were checked when it was created, so each access is in
//! bounds and naturally aligned. Values are little-endian in guest memory (§2.4).

use std::sync::atomic::{AtomicU16, Ordering};

/// A validated, aligned ring area of `len` bytes at host address `base`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RingArea {
    base: *mut u8,
    len: usize,
}

impl RingArea {
    /// # Safety
    ///
    /// `base..base + len` must be mapped, readable and writable, and stay so while the
    /// area is used (the owning queue holds the memory view that keeps it mapped); `base`
    /// must be aligned to the strictest access the ring code makes on it (checked by the
    /// caller against the spec alignment, which covers every field access).
    pub(crate) unsafe fn new(base: *mut u8, len: usize) -> Self {
        RingArea { base, len }
    }

    #[inline(always)]
    fn ptr<T>(&self, off: usize) -> *mut T {
        debug_assert!(off + std::mem::size_of::<T>() <= self.len);
        debug_assert_eq!(off % std::mem::align_of::<T>(), 0);
        self.base.wrapping_add(off).cast()
    }

    /// Plain (relaxed) 16-bit read.
    #[inline(always)]
    pub(crate) fn read_u16(&self, off: usize) -> u16 {
        // SAFETY: in bounds and 2-aligned per the type invariant; the guest may write this
        // location concurrently, so the access is atomic (relaxed) rather than a plain read.
        let v = unsafe { AtomicU16::from_ptr(self.ptr::<u16>(off)) }.load(Ordering::Relaxed);
        u16::from_le(v)
    }

    /// 16-bit read with acquire ordering: later reads of ring memory are ordered after it.
    #[inline(always)]
    pub(crate) fn load_u16_acquire(&self, off: usize) -> u16 {
        // SAFETY: as in `read_u16`.
        let v = unsafe { AtomicU16::from_ptr(self.ptr::<u16>(off)) }.load(Ordering::Acquire);
        u16::from_le(v)
    }

    /// Plain (relaxed) 16-bit write.
    #[inline(always)]
    pub(crate) fn write_u16(&self, off: usize, v: u16) {
        // SAFETY: as in `read_u16`; the location is one the device side owns by the spec.
        unsafe { AtomicU16::from_ptr(self.ptr::<u16>(off)) }.store(v.to_le(), Ordering::Relaxed);
    }

    /// 16-bit write with release ordering: earlier writes to ring memory become visible
    /// no later than this one.
    #[inline(always)]
    pub(crate) fn store_u16_release(&self, off: usize, v: u16) {
        // SAFETY: as in `write_u16`.
        unsafe { AtomicU16::from_ptr(self.ptr::<u16>(off)) }.store(v.to_le(), Ordering::Release);
    }

    /// Plain 32-bit write.
    #[inline(always)]
    pub(crate) fn write_u32(&self, off: usize, v: u32) {
        // SAFETY: in bounds and 4-aligned per the type invariant (packed descriptor `len`).
        unsafe { std::ptr::write_volatile(self.ptr::<u32>(off), v.to_le()) };
    }

    /// Reads 16 bytes of a descriptor as (addr, len, u16 at 12, u16 at 14).
    #[inline(always)]
    pub(crate) fn read_descriptor(&self, off: usize) -> (u64, u32, u16, u16) {
        // SAFETY: in bounds per the type invariant; descriptor tables and rings are
        // 16-aligned (§2.7.5, §2.8.13). A volatile read of the whole descriptor takes one
        // snapshot, so later validation and use see the same values (no double fetch).
        let raw = unsafe { std::ptr::read_volatile(self.ptr::<[u64; 2]>(off)) };
        decode_descriptor(raw)
    }
}

/// Splits a raw 16-byte descriptor into (addr, len, u16 at byte 12, u16 at byte 14).
#[inline(always)]
#[allow(clippy::cast_possible_truncation)] // Each field is masked or shifted to its width.
pub(crate) fn decode_descriptor(raw: [u64; 2]) -> (u64, u32, u16, u16) {
    let addr = u64::from_le(raw[0]);
    let rest = u64::from_le(raw[1]);
    // Little-endian layout of bytes 8..16: len (u32), then two u16 fields.
    (
        addr,
        (rest & 0xffff_ffff) as u32,
        ((rest >> 32) & 0xffff) as u16,
        (rest >> 48) as u16,
    )
}
