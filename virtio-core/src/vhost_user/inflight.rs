// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Inflight I/O tracking (vhost-user.rst, "Inflight I/O tracking").
//!
//! The backend records every chain it pops in a shared-memory area that the frontend keeps
//! across backend restarts (`GET_INFLIGHT_FD` / `SET_INFLIGHT_FD`). A restarted backend
//! reads it back to find the requests that were in flight when the previous instance died,
//! and resubmits them in the order they were fetched.
//!
//! The area holds one region per queue, at a fixed stride. Split rings use
//! `QueueRegionSplit` (16-byte header, then one 16-byte `DescStateSplit` per descriptor),
//! packed rings `QueueRegionPacked` (32-byte header, then one 32-byte `DescStatePacked`
//! per ring slot, linked into a free list). Both are written exactly in the documented
//! format and with the documented procedures, so the area is interchangeable with other
//! implementations (libvhost-user for split, DPDK for both).
//!
//! The area is shared with the frontend, so nothing read back from it is trusted: every
//! index is bounds-checked, and an area found inconsistent stops tracking for that queue
//! (logged) instead of ever touching memory outside it.

use std::any::Any;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{compiler_fence, Ordering};
use std::sync::Arc;

use super::error::{Error, Result};
use crate::desc::PackedDescriptor;
use crate::queue::RingLayout;

/// Alignment of each queue's region (as DPDK and libvhost-user use).
pub const INFLIGHT_ALIGN: u64 = 64;
/// Current region version.
const VERSION: u16 = 1;

/// Split: `QueueRegionSplit` field offsets.
mod split {
    pub const VERSION: usize = 8;
    pub const DESC_NUM: usize = 10;
    pub const LAST_BATCH_HEAD: usize = 12;
    pub const USED_IDX: usize = 14;
    pub const HEADER: usize = 16;
    /// `DescStateSplit`: inflight u8, padding[5], next u16, counter u64.
    pub const DESC: usize = 16;
    pub const D_INFLIGHT: usize = 0;
    pub const D_NEXT: usize = 6;
    pub const D_COUNTER: usize = 8;
}

/// Packed: `QueueRegionPacked` field offsets.
mod packed {
    pub const VERSION: usize = 8;
    pub const DESC_NUM: usize = 10;
    pub const FREE_HEAD: usize = 12;
    pub const OLD_FREE_HEAD: usize = 14;
    pub const USED_IDX: usize = 16;
    pub const OLD_USED_IDX: usize = 18;
    pub const USED_WRAP: usize = 20;
    pub const OLD_USED_WRAP: usize = 21;
    /// 29 bytes of fields, `desc[]` aligned to 8.
    pub const HEADER: usize = 32;
    /// `DescStatePacked`: inflight u8, padding u8, next u16, last u16, num u16,
    /// counter u64, id u16, flags u16, len u32, addr u64.
    pub const DESC: usize = 32;
    pub const D_INFLIGHT: usize = 0;
    pub const D_NEXT: usize = 2;
    pub const D_LAST: usize = 4;
    pub const D_NUM: usize = 6;
    pub const D_COUNTER: usize = 8;
    pub const D_ID: usize = 16;
    pub const D_FLAGS: usize = 18;
    pub const D_LEN: usize = 20;
    pub const D_ADDR: usize = 24;
}

/// Packed descriptor flag bits used by the reconnect procedure.
const DESC_F_AVAIL: u16 = 1 << 7;
const DESC_F_USED: u16 = 1 << 15;

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Bytes one queue's region takes in `layout` for a queue of `queue_size`.
pub fn queue_region_size(layout: RingLayout, queue_size: u16) -> u64 {
    let n = u64::from(queue_size);
    match layout {
        RingLayout::Split => align_up(
            split::HEADER as u64 + split::DESC as u64 * n,
            INFLIGHT_ALIGN,
        ),
        RingLayout::Packed => align_up(
            packed::HEADER as u64 + packed::DESC as u64 * n,
            INFLIGHT_ALIGN,
        ),
    }
}

/// The per-queue stride of areas this backend allocates: large enough for either layout,
/// because `GET_INFLIGHT_FD` may come before the ring layout is negotiated.
pub fn queue_stride(queue_size: u16) -> u64 {
    queue_region_size(RingLayout::Split, queue_size)
        .max(queue_region_size(RingLayout::Packed, queue_size))
}

/// A request found in flight when a ring started with an inflight area left by a previous
/// backend instance: it was popped and never completed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct InflightRequest {
    /// Split: the head descriptor index. Packed: the buffer ID.
    pub id: u16,
    /// Fetch order: requests must be resubmitted in increasing `counter` order.
    pub counter: u64,
    /// Packed: the chain's ring descriptors as recorded when it was popped (the ring
    /// slots may have been overwritten since). Split: empty (the descriptor table still
    /// holds the chain, reachable from `id`).
    pub descriptors: Vec<PackedDescriptor>,
}

/// A mapping of an inflight area.
pub(crate) struct InflightMapping {
    base: *mut u8,
    len: usize,
    /// The mapping's entry in the SIGBUS registry (the frontend may shrink its file).
    registration: Option<super::sigbus::Registration>,
}

// SAFETY: plain shared memory owned by this value; the pointer carries no thread affinity.
unsafe impl Send for InflightMapping {}
// SAFETY: as above; all accesses go through the per-queue accessors, one thread each.
unsafe impl Sync for InflightMapping {}

impl Drop for InflightMapping {
    fn drop(&mut self) {
        drop(self.registration.take());
        // SAFETY: a mapping created by `map_fd`, owned by this value, no longer referenced.
        if unsafe { libc::munmap(self.base.cast(), self.len) } != 0 {
            log::warn!(
                "munmap of the inflight area failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

impl InflightMapping {
    fn map_fd(fd: &OwnedFd, offset: u64, len: u64) -> Result<Self> {
        let bad = |why: String| Error::BadInflight(why);
        let ulen = usize::try_from(len).map_err(|_| bad(format!("size {len:#x} is too large")))?;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| bad(format!("offset {offset:#x} is too large")))?;
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        if offset % page != 0 {
            return Err(bad(format!("offset {offset:#x} is not page-aligned")));
        }
        // SAFETY: `st` is a valid out-pointer; `fd` is open.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(bad(format!(
                "fstat failed: {}",
                std::io::Error::last_os_error()
            )));
        }
        if st.st_mode & libc::S_IFMT == libc::S_IFREG
            && (st.st_size as u64) < offset.saturating_add(len)
        {
            return Err(bad(format!(
                "file of {} bytes is shorter than offset + size {:#x}",
                st.st_size,
                offset.saturating_add(len)
            )));
        }
        // SAFETY: a fresh shared mapping at a kernel-chosen address; checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ulen,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(Error::Mmap {
                what: "inflight area",
                len,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(InflightMapping {
            base: base.cast(),
            len: ulen,
            registration: super::sigbus::Registration::new(base, ulen),
        })
    }
}

/// The inflight area of a connection: one region per queue.
pub(crate) struct InflightArea {
    mapping: Arc<InflightMapping>,
    num_queues: u16,
    queue_size: u16,
    stride: usize,
}

impl std::fmt::Debug for InflightArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightArea")
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .field("stride", &self.stride)
            .finish()
    }
}

impl InflightArea {
    /// Allocates a zeroed area in a sealed memfd (GET_INFLIGHT_FD). Returns the area, the
    /// memfd to hand to the frontend, and the area's size.
    pub fn allocate(num_queues: u16, queue_size: u16) -> Result<(Self, OwnedFd, u64)> {
        if num_queues == 0 || queue_size == 0 {
            return Err(Error::BadInflight(format!(
                "{num_queues} queues of size {queue_size} requested"
            )));
        }
        let stride = queue_stride(queue_size);
        let size = stride * u64::from(num_queues);
        let os = |what| move |source| Error::Os { what, source };
        // SAFETY: valid NUL-terminated name; the result is checked.
        let raw = unsafe {
            libc::memfd_create(
                c"vhost-user-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if raw < 0 {
            return Err(os("memfd_create for the inflight area")(
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let len = libc::off_t::try_from(size)
            .map_err(|_| Error::BadInflight(format!("size {size:#x} too large")))?;
        // SAFETY: plain syscall on our descriptor.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
            return Err(os("ftruncate of the inflight memfd")(
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: plain syscall on our descriptor. Sealing the size keeps the frontend (or
        // anyone) from shrinking the file under our mapping (SIGBUS).
        let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(os("sealing the inflight memfd")(
                std::io::Error::last_os_error(),
            ));
        }
        let mapping = InflightMapping::map_fd(&fd, 0, size)?;
        Ok((
            InflightArea {
                mapping: Arc::new(mapping),
                num_queues,
                queue_size,
                stride: crate::usize_from(stride),
            },
            fd,
            size,
        ))
    }

    /// Maps an area handed back by the frontend (SET_INFLIGHT_FD).
    pub fn from_fd(
        fd: &OwnedFd,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self> {
        if num_queues == 0 || queue_size == 0 {
            return Err(Error::BadInflight(format!(
                "{num_queues} queues of size {queue_size}"
            )));
        }
        let stride = mmap_size / u64::from(num_queues);
        let needed = queue_region_size(RingLayout::Split, queue_size)
            .min(queue_region_size(RingLayout::Packed, queue_size));
        if stride < needed || stride % 8 != 0 {
            return Err(Error::BadInflight(format!(
                "size {mmap_size:#x} is too small for {num_queues} queues of size {queue_size}"
            )));
        }
        let mapping = InflightMapping::map_fd(fd, mmap_offset, mmap_size)?;
        Ok(InflightArea {
            mapping: Arc::new(mapping),
            num_queues,
            queue_size,
            stride: crate::usize_from(stride),
        })
    }

    /// The queue size the area was sized for.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// True once the frontend shrank the area's file and an access faulted (`sigbus`).
    pub fn poisoned(&self) -> bool {
        self.mapping
            .registration
            .as_ref()
            .is_some_and(super::sigbus::Registration::poisoned)
    }

    /// The number of queues the area has regions for.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// The region of queue `index`, if the area has one.
    pub fn queue(&self, index: u16) -> Option<QueueArea> {
        if index >= self.num_queues {
            return None;
        }
        let off = usize::from(index) * self.stride;
        if off + self.stride > self.mapping.len {
            return None;
        }
        Some(QueueArea {
            // In bounds of the mapping (checked above).
            base: self.mapping.base.wrapping_add(off),
            len: self.stride,
            _owner: self.mapping.clone(),
        })
    }
}

/// One queue's region of an inflight area, with bounds-checked volatile field access.
pub(crate) struct QueueArea {
    base: *mut u8,
    len: usize,
    _owner: Arc<dyn Any + Send + Sync>,
}

// SAFETY: the pointer targets shared memory kept mapped by `_owner`; one worker thread
// uses a queue's region at a time.
unsafe impl Send for QueueArea {}

macro_rules! accessors {
    ($get:ident, $set:ident, $t:ty) => {
        #[inline]
        fn $get(&self, off: usize) -> $t {
            if off % std::mem::align_of::<$t>() != 0 || off + std::mem::size_of::<$t>() > self.len {
                debug_assert!(false, "inflight field access out of bounds at {off}");
                return 0;
            }
            // SAFETY: in bounds of the region (checked just above) and naturally aligned
            // (the region base is 8-aligned: page-aligned mapping, stride a multiple of 8).
            // Volatile: the memory is shared with another process.
            <$t>::from_le(unsafe { self.base.add(off).cast::<$t>().read_volatile() })
        }

        #[inline]
        fn $set(&self, off: usize, v: $t) {
            if off % std::mem::align_of::<$t>() != 0 || off + std::mem::size_of::<$t>() > self.len {
                debug_assert!(false, "inflight field access out of bounds at {off}");
                return;
            }
            // SAFETY: as in the getter.
            unsafe { self.base.add(off).cast::<$t>().write_volatile(v.to_le()) }
        }
    };
}

impl QueueArea {
    accessors!(get_u8, set_u8, u8);
    accessors!(get_u16, set_u16, u16);
    accessors!(get_u32, set_u32, u32);
    accessors!(get_u64, set_u64, u64);

    /// A region over memory owned by `owner` (tests).
    ///
    /// # Safety
    ///
    /// `base..base + len` must be valid for reads and writes, 8-aligned, for as long as
    /// `owner` lives.
    #[cfg(test)]
    pub(crate) unsafe fn from_raw(
        base: *mut u8,
        len: usize,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> Self {
        QueueArea {
            base,
            len,
            _owner: owner,
        }
    }

    fn zero(&self) {
        for off in (0..self.len / 8).map(|i| i * 8) {
            self.set_u64(off, 0);
        }
    }
}

/// Orders the stores to the area in program order, so that a crash at any point leaves
/// the state the documented recovery procedure expects.
#[inline(always)]
fn step() {
    compiler_fence(Ordering::SeqCst);
}

/// The tracker of one queue: [`SplitTracker`] or [`PackedTracker`].
pub(crate) enum Tracker {
    Split(SplitTracker),
    Packed(PackedTracker),
}

/// Split-ring tracking (`QueueRegionSplit`).
pub(crate) struct SplitTracker {
    area: QueueArea,
    size: u16,
    counter: u64,
    disabled: bool,
}

impl SplitTracker {
    fn desc(i: u16, field: usize) -> usize {
        split::HEADER + usize::from(i) * split::DESC + field
    }

    /// Attaches to a queue's region. A fresh region (version 0, or sized for another queue
    /// size) is initialised; a used one is recovered with the documented reconnect
    /// procedure. `ring_used_idx` is the used ring's idx now. Returns the requests still
    /// in flight, in fetch order.
    pub fn attach(
        area: QueueArea,
        size: u16,
        ring_used_idx: u16,
        index: u16,
    ) -> Result<(Self, Vec<InflightRequest>)> {
        if (area.len as u64) < (split::HEADER + split::DESC * usize::from(size)) as u64 {
            return Err(Error::BadInflight(format!(
                "queue {index}: region of {} bytes too small for {size} split descriptors",
                area.len
            )));
        }
        let mut t = SplitTracker {
            area,
            size,
            counter: 1,
            disabled: false,
        };
        let version = t.area.get_u16(split::VERSION);
        let desc_num = t.area.get_u16(split::DESC_NUM);
        if version != VERSION || desc_num != size {
            if version != 0 {
                log::warn!(
                    "queue {index}: inflight region has version {version} for {desc_num} descriptors; \
                     reinitialising it for {size}"
                );
            }
            t.area.zero();
            t.area.set_u16(split::DESC_NUM, size);
            t.area.set_u16(split::USED_IDX, ring_used_idx);
            step();
            t.area.set_u16(split::VERSION, VERSION);
            return Ok((t, Vec::new()));
        }
        // Reconnect: finish an interrupted used batch.
        let recorded = t.area.get_u16(split::USED_IDX);
        if recorded != ring_used_idx {
            let batch = ring_used_idx.wrapping_sub(recorded);
            if batch > size {
                log::error!(
                    "queue {index}: inflight used_idx {recorded} is {batch} behind the used ring's \
                     idx {ring_used_idx}; region ignored"
                );
                t.area.zero();
                t.area.set_u16(split::DESC_NUM, size);
                t.area.set_u16(split::USED_IDX, ring_used_idx);
                step();
                t.area.set_u16(split::VERSION, VERSION);
                return Ok((t, Vec::new()));
            }
            let mut i = t.area.get_u16(split::LAST_BATCH_HEAD);
            for _ in 0..batch {
                if i >= size {
                    log::error!("queue {index}: inflight last-batch list leaves the region at {i}");
                    break;
                }
                t.area.set_u8(Self::desc(i, split::D_INFLIGHT), 0);
                i = t.area.get_u16(Self::desc(i, split::D_NEXT));
            }
            step();
            t.area.set_u16(split::USED_IDX, ring_used_idx);
        }
        let mut inflight: Vec<InflightRequest> = (0..size)
            .filter(|&i| t.area.get_u8(Self::desc(i, split::D_INFLIGHT)) == 1)
            .map(|i| InflightRequest {
                id: i,
                counter: t.area.get_u64(Self::desc(i, split::D_COUNTER)),
                descriptors: Vec::new(),
            })
            .collect();
        inflight.sort_by_key(|r| r.counter);
        t.counter = inflight.last().map_or(1, |r| r.counter.wrapping_add(1));
        Ok((t, inflight))
    }

    /// Records a popped chain (before it is processed).
    #[inline]
    pub fn on_pop(&mut self, head: u16) {
        if self.disabled || head >= self.size {
            return;
        }
        self.area
            .set_u64(Self::desc(head, split::D_COUNTER), self.counter);
        self.counter = self.counter.wrapping_add(1);
        step();
        self.area.set_u8(Self::desc(head, split::D_INFLIGHT), 1);
    }

    /// Steps before the used ring is published: link the batch into the last-batch list.
    #[inline]
    pub fn before_used(&mut self, used: &[(u16, u32)]) {
        if self.disabled {
            return;
        }
        for &(head, _) in used {
            if head >= self.size {
                continue;
            }
            let last = self.area.get_u16(split::LAST_BATCH_HEAD);
            self.area.set_u16(Self::desc(head, split::D_NEXT), last);
            self.area.set_u16(split::LAST_BATCH_HEAD, head);
        }
        step();
    }

    /// Steps after the used ring is published (`ring_used_idx` is the new used idx).
    #[inline]
    pub fn after_used(&mut self, used: &[(u16, u32)], ring_used_idx: u16) {
        if self.disabled {
            return;
        }
        step();
        for &(head, _) in used {
            if head < self.size {
                self.area.set_u8(Self::desc(head, split::D_INFLIGHT), 0);
            }
        }
        step();
        self.area.set_u16(split::USED_IDX, ring_used_idx);
    }
}

/// Packed-ring tracking (`QueueRegionPacked`).
pub(crate) struct PackedTracker {
    area: QueueArea,
    size: u16,
    counter: u64,
    /// Head entry of each in-flight buffer ID (`NONE` when not in flight).
    entry_of_id: Box<[u16]>,
    disabled: bool,
    index: u16,
    /// The ring base (vhost-user encoding) the area says the ring is at, when `attach`
    /// recovered a region left by a previous backend instance.
    restored_base: Option<u32>,
}

const NONE: u16 = u16::MAX;

impl PackedTracker {
    fn desc(i: u16, field: usize) -> usize {
        packed::HEADER + usize::from(i) * packed::DESC + field
    }

    fn init(&mut self, used: (u16, bool)) {
        self.area.zero();
        self.area.set_u16(packed::DESC_NUM, self.size);
        for i in 0..self.size {
            // The last entry links to `size`: the end of the free list.
            self.area.set_u16(Self::desc(i, packed::D_NEXT), i + 1);
        }
        self.area.set_u16(packed::FREE_HEAD, 0);
        self.area.set_u16(packed::OLD_FREE_HEAD, 0);
        self.area.set_u16(packed::USED_IDX, used.0);
        self.area.set_u16(packed::OLD_USED_IDX, used.0);
        self.area.set_u8(packed::USED_WRAP, u8::from(used.1));
        self.area.set_u8(packed::OLD_USED_WRAP, u8::from(used.1));
        step();
        self.area.set_u16(packed::VERSION, VERSION);
    }

    /// Attaches to a queue's region (see [`SplitTracker::attach`]). `used` is the device's
    /// (next used slot, used wrap counter) now; `ring_flags(slot)` reads the flags of a
    /// descriptor ring slot (for the reconnect procedure).
    pub fn attach(
        area: QueueArea,
        size: u16,
        used: (u16, bool),
        index: u16,
        ring_flags: impl Fn(u16) -> u16,
    ) -> Result<(Self, Vec<InflightRequest>)> {
        if (area.len as u64) < (packed::HEADER + packed::DESC * usize::from(size)) as u64 {
            return Err(Error::BadInflight(format!(
                "queue {index}: region of {} bytes too small for {size} packed descriptors",
                area.len
            )));
        }
        let mut t = PackedTracker {
            area,
            size,
            counter: 1,
            entry_of_id: vec![NONE; 1 << 16].into_boxed_slice(),
            disabled: false,
            index,
            restored_base: None,
        };
        let version = t.area.get_u16(packed::VERSION);
        let desc_num = t.area.get_u16(packed::DESC_NUM);
        if version != VERSION || desc_num != size {
            if version != 0 {
                log::warn!(
                    "queue {index}: inflight region has version {version} for {desc_num} descriptors; \
                     reinitialising it for {size}"
                );
            }
            t.init(used);
            return Ok((t, Vec::new()));
        }
        let recovered = t.recover(&ring_flags).and_then(|list| {
            let base = t.ring_base_after(&list)?;
            Ok((list, base))
        });
        match recovered {
            Ok((list, base)) => {
                t.restored_base = Some(base);
                Ok((t, list))
            }
            Err(why) => {
                t.entry_of_id.fill(NONE);
                log::error!(
                    "queue {index}: inflight region is inconsistent ({why}); reinitialising it"
                );
                t.init(used);
                Ok((t, Vec::new()))
            }
        }
    }

    /// The ring base a recovered region implies, in the vhost-user encoding: the used
    /// position is the area's (committed) `used_idx`/`used_wrap_counter`, and since every
    /// popped chain is either used or still in flight, the avail position is that many
    /// ring slots further: the slots of the chains in `list`.
    ///
    /// This is what a restarted backend must go on from. A frontend cannot know it:
    /// QEMU restarts a packed ring from the last base it was told (it keeps no used index
    /// for packed rings), which is stale after a crash.
    fn ring_base_after(&self, list: &[InflightRequest]) -> std::result::Result<u32, String> {
        let a = &self.area;
        let used_idx = a.get_u16(packed::USED_IDX);
        let used_wrap = a.get_u8(packed::USED_WRAP) != 0;
        let slots: usize = list.iter().map(|r| r.descriptors.len()).sum();
        let size = usize::from(self.size);
        if slots > size {
            return Err(format!("{slots} ring slots in flight in a ring of {size}"));
        }
        let mut avail = usize::from(used_idx) + slots;
        let mut avail_wrap = used_wrap;
        if avail >= size {
            avail -= size;
            avail_wrap = !avail_wrap;
        }
        let avail = u32::try_from(avail).map_err(|_| "avail index out of range".to_string())?;
        Ok(avail
            | (u32::from(avail_wrap) << 15)
            | (u32::from(used_idx) << 16)
            | (u32::from(used_wrap) << 31))
    }

    /// The ring base the recovered region implies (see [`Self::ring_base_after`]);
    /// `None` if the region was fresh or reinitialised.
    pub fn restored_base(&self) -> Option<u32> {
        self.restored_base
    }

    /// The documented reconnect procedure.
    fn recover(
        &mut self,
        ring_flags: &impl Fn(u16) -> u16,
    ) -> std::result::Result<Vec<InflightRequest>, String> {
        let size = self.size;
        let a = &self.area;
        let used_idx = a.get_u16(packed::USED_IDX);
        let old_used_idx = a.get_u16(packed::OLD_USED_IDX);
        if used_idx >= size || old_used_idx >= size {
            return Err(format!(
                "used_idx {used_idx} / old_used_idx {old_used_idx} out of range"
            ));
        }
        if used_idx != old_used_idx {
            // Was the first used descriptor of the interrupted batch published?
            let old_wrap = a.get_u8(packed::OLD_USED_WRAP) != 0;
            let avail_flags = if old_wrap { DESC_F_AVAIL } else { DESC_F_USED };
            if ring_flags(old_used_idx) & (DESC_F_AVAIL | DESC_F_USED) != avail_flags {
                // Published: commit the in-progress update.
                a.set_u16(packed::OLD_FREE_HEAD, a.get_u16(packed::FREE_HEAD));
                a.set_u16(packed::OLD_USED_IDX, used_idx);
                a.set_u8(packed::OLD_USED_WRAP, a.get_u8(packed::USED_WRAP));
            }
        }
        // Roll back anything in progress.
        a.set_u16(packed::FREE_HEAD, a.get_u16(packed::OLD_FREE_HEAD));
        a.set_u16(packed::USED_IDX, a.get_u16(packed::OLD_USED_IDX));
        a.set_u8(packed::USED_WRAP, a.get_u8(packed::OLD_USED_WRAP));
        // Nothing on the free list is in flight.
        let mut i = a.get_u16(packed::FREE_HEAD);
        let mut steps = 0u32;
        while i < size {
            if steps > u32::from(size) {
                return Err("free list loops".into());
            }
            steps += 1;
            a.set_u8(Self::desc(i, packed::D_INFLIGHT), 0);
            i = a.get_u16(Self::desc(i, packed::D_NEXT));
        }
        if i != size {
            return Err(format!("free list leaves the region at {i}"));
        }
        let mut list = Vec::new();
        for e in 0..size {
            if a.get_u8(Self::desc(e, packed::D_INFLIGHT)) != 1 {
                continue;
            }
            let num = a.get_u16(Self::desc(e, packed::D_NUM));
            if num == 0 || num > size {
                return Err(format!("entry {e} has {num} descriptors"));
            }
            let mut descriptors = Vec::with_capacity(usize::from(num));
            let mut d = e;
            for k in 0..num {
                if d >= size {
                    return Err(format!("chain of entry {e} leaves the region at {d}"));
                }
                descriptors.push(PackedDescriptor {
                    addr: a.get_u64(Self::desc(d, packed::D_ADDR)),
                    len: a.get_u32(Self::desc(d, packed::D_LEN)),
                    id: a.get_u16(Self::desc(d, packed::D_ID)),
                    flags: a.get_u16(Self::desc(d, packed::D_FLAGS)),
                });
                if k + 1 < num {
                    d = a.get_u16(Self::desc(d, packed::D_NEXT));
                }
            }
            if d != a.get_u16(Self::desc(e, packed::D_LAST)) {
                return Err(format!(
                    "chain of entry {e} does not end at its recorded last entry"
                ));
            }
            // The buffer ID is in the last descriptor of the chain.
            let id = descriptors.last().map_or(0, |x| x.id);
            if self.entry_of_id[usize::from(id)] != NONE {
                return Err(format!("buffer id {id} recorded twice"));
            }
            self.entry_of_id[usize::from(id)] = e;
            list.push(InflightRequest {
                id,
                counter: a.get_u64(Self::desc(e, packed::D_COUNTER)),
                descriptors,
            });
        }
        list.sort_by_key(|r| r.counter);
        self.counter = list.last().map_or(1, |r| r.counter.wrapping_add(1));
        Ok(list)
    }

    /// Stops tracking this queue (logged).
    pub fn disable(&mut self, why: &str) {
        if self.disabled {
            return;
        }
        log::error!("queue {}: inflight tracking stopped: {why}", self.index);
        self.disabled = true;
    }

    /// Records a popped chain of `slots` ring descriptors; `desc_at(k)` returns the
    /// k-th descriptor of the chain (addr, len, id, flags) as read from the ring.
    #[inline]
    pub fn on_pop(&mut self, slots: u16, id: u16, desc_at: impl Fn(u16) -> PackedDescriptor) {
        if self.disabled || slots == 0 {
            return;
        }
        if self.entry_of_id[usize::from(id)] != NONE {
            self.disable("a buffer id was popped twice");
            return;
        }
        let size = self.size;
        let a = &self.area;
        let head = a.get_u16(packed::OLD_FREE_HEAD);
        if head >= size {
            self.disable("free list exhausted (more descriptors in flight than ring slots)");
            return;
        }
        for k in 0..slots {
            let free = a.get_u16(packed::FREE_HEAD);
            if free >= size {
                self.disable("free list exhausted (more descriptors in flight than ring slots)");
                return;
            }
            if k == 0 {
                a.set_u16(Self::desc(head, packed::D_NUM), 0);
                a.set_u64(Self::desc(head, packed::D_COUNTER), self.counter);
                self.counter = self.counter.wrapping_add(1);
                step();
                a.set_u8(Self::desc(head, packed::D_INFLIGHT), 1);
            }
            let last = k + 1 == slots;
            if last {
                a.set_u16(Self::desc(head, packed::D_LAST), free);
            }
            let num = a.get_u16(Self::desc(head, packed::D_NUM));
            a.set_u16(Self::desc(head, packed::D_NUM), num.wrapping_add(1));
            let d = desc_at(k);
            a.set_u64(Self::desc(free, packed::D_ADDR), d.addr);
            a.set_u32(Self::desc(free, packed::D_LEN), d.len);
            a.set_u16(Self::desc(free, packed::D_FLAGS), d.flags);
            a.set_u16(Self::desc(free, packed::D_ID), d.id);
            step();
            let next = a.get_u16(Self::desc(free, packed::D_NEXT));
            a.set_u16(packed::FREE_HEAD, next);
            if last {
                step();
                a.set_u16(packed::OLD_FREE_HEAD, next);
            }
        }
        self.entry_of_id[usize::from(id)] = head;
    }

    /// Checks every ID of a used batch is tracked in flight (and appears once), so that
    /// the area is only changed for a batch the ring will accept.
    pub fn check_used(&self, used: &[(u16, u32)]) -> bool {
        self.disabled
            || used.iter().enumerate().all(|(i, &(id, _))| {
                self.entry_of_id[usize::from(id)] != NONE
                    && !used[..i].iter().any(|&(p, _)| p == id)
            })
    }

    /// Steps before the used descriptors are published: return the batch's entries to the
    /// free list and advance `used_idx` from `used` (the device's next used slot and wrap
    /// counter before the batch).
    #[inline]
    pub fn before_used(&mut self, used: &[(u16, u32)], mut pos: (u16, bool)) {
        if self.disabled {
            return;
        }
        let size = self.size;
        for &(id, _) in used {
            let e = self.entry_of_id[usize::from(id)];
            if e >= size {
                continue;
            }
            let a = &self.area;
            let last = a.get_u16(Self::desc(e, packed::D_LAST));
            let num = a.get_u16(Self::desc(e, packed::D_NUM));
            if last >= size || num == 0 || num > size {
                self.disable("an in-flight entry was corrupted");
                return;
            }
            a.set_u16(
                Self::desc(last, packed::D_NEXT),
                a.get_u16(packed::FREE_HEAD),
            );
            a.set_u16(packed::FREE_HEAD, e);
            let next = u32::from(pos.0) + u32::from(num);
            if next >= u32::from(size) {
                pos.1 = !pos.1;
            }
            pos.0 = u16::try_from(next % u32::from(size)).unwrap_or(0);
        }
        let a = &self.area;
        a.set_u16(packed::USED_IDX, pos.0);
        a.set_u8(packed::USED_WRAP, u8::from(pos.1));
        step();
    }

    /// Steps after the used descriptors are published.
    #[inline]
    pub fn after_used(&mut self, used: &[(u16, u32)]) {
        if self.disabled {
            return;
        }
        step();
        for &(id, _) in used {
            let e = std::mem::replace(&mut self.entry_of_id[usize::from(id)], NONE);
            if e < self.size {
                self.area.set_u8(Self::desc(e, packed::D_INFLIGHT), 0);
            }
        }
        step();
        let a = &self.area;
        a.set_u16(packed::OLD_FREE_HEAD, a.get_u16(packed::FREE_HEAD));
        a.set_u16(packed::OLD_USED_IDX, a.get_u16(packed::USED_IDX));
        a.set_u8(packed::OLD_USED_WRAP, a.get_u8(packed::USED_WRAP));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn stride(n: u16) -> usize {
        usize::try_from(queue_stride(n)).unwrap()
    }

    /// A heap-backed region for tests.
    pub(crate) fn area(len: usize) -> (QueueArea, Arc<Vec<u64>>) {
        let buf = Arc::new(vec![0u64; len.div_ceil(8)]);
        let base = buf.as_ptr().cast_mut().cast::<u8>();
        // SAFETY: the buffer is `len` bytes (rounded up), 8-aligned, kept alive by `owner`;
        // the tests access it only through this region (plus reads of `buf` after).
        let a = unsafe { QueueArea::from_raw(base, len, buf.clone()) };
        (a, buf)
    }

    fn bytes(buf: &Arc<Vec<u64>>) -> Vec<u8> {
        buf.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn region_sizes_match_the_documented_structures() {
        // QueueRegionSplit: 16-byte header + 16 per descriptor, aligned to 64.
        assert_eq!(
            queue_region_size(RingLayout::Split, 256),
            16 + 16 * 256 + 48
        );
        // QueueRegionPacked: 32-byte header + 32 per descriptor, aligned to 64.
        assert_eq!(
            queue_region_size(RingLayout::Packed, 256),
            32 + 32 * 256 + 32
        );
        assert_eq!(queue_stride(1), 64);
        assert_eq!(
            queue_stride(256),
            queue_region_size(RingLayout::Packed, 256)
        );
    }

    #[test]
    fn split_fresh_region_is_initialised() {
        let (a, buf) = area(stride(8));
        let (_t, list) = SplitTracker::attach(a, 8, 5, 0).unwrap();
        assert!(list.is_empty());
        let b = bytes(&buf);
        assert_eq!(u64_at(&b, 0), 0, "features");
        assert_eq!(u16_at(&b, split::VERSION), 1);
        assert_eq!(u16_at(&b, split::DESC_NUM), 8);
        assert_eq!(u16_at(&b, split::USED_IDX), 5);
    }

    #[test]
    fn split_pop_and_complete_follow_the_procedure() {
        let (a, buf) = area(stride(8));
        let (mut t, _) = SplitTracker::attach(a, 8, 0, 0).unwrap();
        t.on_pop(3);
        t.on_pop(5);
        let b = bytes(&buf);
        let d = |i: usize, f: usize| split::HEADER + i * split::DESC + f;
        assert_eq!(b[d(3, split::D_INFLIGHT)], 1);
        assert_eq!(b[d(5, split::D_INFLIGHT)], 1);
        assert!(u64_at(&b, d(3, split::D_COUNTER)) < u64_at(&b, d(5, split::D_COUNTER)));
        // Complete 5 then 3 in one batch; the used ring idx goes 0 -> 2.
        t.before_used(&[(5, 0), (3, 0)]);
        let b = bytes(&buf);
        assert_eq!(u16_at(&b, split::LAST_BATCH_HEAD), 3);
        assert_eq!(u16_at(&b, d(3, split::D_NEXT)), 5);
        t.after_used(&[(5, 0), (3, 0)], 2);
        let b = bytes(&buf);
        assert_eq!(b[d(3, split::D_INFLIGHT)], 0);
        assert_eq!(b[d(5, split::D_INFLIGHT)], 0);
        assert_eq!(u16_at(&b, split::USED_IDX), 2);
    }

    #[test]
    fn split_reconnect_finishes_an_interrupted_batch_and_lists_in_fetch_order() {
        let (a, buf) = area(stride(8));
        let (mut t, _) = SplitTracker::attach(a, 8, 0, 0).unwrap();
        for head in [6, 1, 4, 2] {
            t.on_pop(head);
        }
        // Complete 1 fully; then crash after publishing 4 (used idx 1 -> 2) but before
        // clearing its inflight flag.
        t.before_used(&[(1, 0)]);
        t.after_used(&[(1, 0)], 1);
        t.before_used(&[(4, 0)]);
        drop(t);
        let owner: Arc<dyn Any + Send + Sync> = buf.clone();
        // SAFETY: same live buffer as above.
        let a = unsafe { QueueArea::from_raw(buf.as_ptr().cast_mut().cast(), stride(8), owner) };
        let (mut t, list) = SplitTracker::attach(a, 8, 2, 0).unwrap();
        let ids: Vec<u16> = list.iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![6, 2]);
        assert_eq!(u16_at(&bytes(&buf), split::USED_IDX), 2);
        // New requests get later counters than the recovered ones.
        t.on_pop(7);
        let b = bytes(&buf);
        let d = |i: usize| split::HEADER + i * split::DESC + split::D_COUNTER;
        assert!(u64_at(&b, d(7)) > u64_at(&b, d(2)));
    }

    fn packed_desc(k: u16, id: u16, slots: u16) -> PackedDescriptor {
        PackedDescriptor {
            addr: 0x1000 * u64::from(id) + u64::from(k),
            len: 100 + u32::from(k),
            id,
            flags: if k + 1 < slots { 1 } else { 0 } | DESC_F_AVAIL,
        }
    }

    #[test]
    fn packed_fresh_region_has_a_full_free_list() {
        let (a, buf) = area(stride(4));
        let (_t, list) = PackedTracker::attach(a, 4, (0, true), 0, |_| 0).unwrap();
        assert!(list.is_empty());
        let b = bytes(&buf);
        assert_eq!(u16_at(&b, packed::VERSION), 1);
        assert_eq!(u16_at(&b, packed::DESC_NUM), 4);
        assert_eq!(u16_at(&b, packed::FREE_HEAD), 0);
        assert_eq!(b[packed::USED_WRAP], 1);
        assert_eq!(b[packed::OLD_USED_WRAP], 1);
        for i in 0..4usize {
            assert_eq!(
                u16_at(&b, packed::HEADER + i * packed::DESC + packed::D_NEXT),
                u16::try_from(i).unwrap() + 1
            );
        }
    }

    #[test]
    fn packed_pop_records_chain_and_completion_frees_it() {
        let (a, buf) = area(stride(4));
        let (mut t, _) = PackedTracker::attach(a, 4, (0, true), 0, |_| 0).unwrap();
        // Chain A: 2 slots, id 7. Chain B: 1 slot, id 9.
        t.on_pop(2, 7, |k| packed_desc(k, 7, 2));
        t.on_pop(1, 9, |k| packed_desc(k, 9, 1));
        let b = bytes(&buf);
        let d = |i: usize, f: usize| packed::HEADER + i * packed::DESC + f;
        assert_eq!(b[d(0, packed::D_INFLIGHT)], 1);
        assert_eq!(u16_at(&b, d(0, packed::D_NUM)), 2);
        assert_eq!(u16_at(&b, d(0, packed::D_LAST)), 1);
        assert_eq!(u16_at(&b, d(1, packed::D_ID)), 7);
        assert_eq!(u64_at(&b, d(1, packed::D_ADDR)), 0x7001);
        assert_eq!(b[d(2, packed::D_INFLIGHT)], 1);
        assert_eq!(u16_at(&b, d(2, packed::D_LAST)), 2);
        assert_eq!(u16_at(&b, packed::FREE_HEAD), 3);
        assert_eq!(u16_at(&b, packed::OLD_FREE_HEAD), 3);
        // Complete B (out of order): its entry returns to the free list, used idx 0 -> 1.
        assert!(t.check_used(&[(9, 0)]));
        assert!(!t.check_used(&[(8, 0)]));
        assert!(!t.check_used(&[(9, 0), (9, 0)]));
        t.before_used(&[(9, 0)], (0, true));
        let b = bytes(&buf);
        assert_eq!(u16_at(&b, packed::FREE_HEAD), 2);
        assert_eq!(u16_at(&b, d(2, packed::D_NEXT)), 3);
        assert_eq!(u16_at(&b, packed::USED_IDX), 1);
        assert_eq!(u16_at(&b, packed::OLD_USED_IDX), 0);
        t.after_used(&[(9, 0)]);
        let b = bytes(&buf);
        assert_eq!(b[d(2, packed::D_INFLIGHT)], 0);
        assert_eq!(u16_at(&b, packed::OLD_USED_IDX), 1);
        assert_eq!(u16_at(&b, packed::OLD_FREE_HEAD), 2);
        // Complete A: 2 slots, used idx 1 -> 3.
        t.before_used(&[(7, 0)], (1, true));
        t.after_used(&[(7, 0)]);
        let b = bytes(&buf);
        assert_eq!(u16_at(&b, packed::USED_IDX), 3);
        assert_eq!(u16_at(&b, packed::FREE_HEAD), 0);
        // Wrapping: a 2-slot chain used at slot 3 of 4 flips the wrap counter.
        t.on_pop(2, 1, |k| packed_desc(k, 1, 2));
        t.before_used(&[(1, 0)], (3, true));
        t.after_used(&[(1, 0)]);
        let b = bytes(&buf);
        assert_eq!(u16_at(&b, packed::USED_IDX), 1);
        assert_eq!(b[packed::USED_WRAP], 0);
    }

    fn reattach(
        buf: &Arc<Vec<u64>>,
        size: u16,
        flags: impl Fn(u16) -> u16,
    ) -> (PackedTracker, Vec<InflightRequest>) {
        let owner: Arc<dyn Any + Send + Sync> = buf.clone();
        // SAFETY: a live buffer of at least the stride.
        let a = unsafe { QueueArea::from_raw(buf.as_ptr().cast_mut().cast(), stride(size), owner) };
        PackedTracker::attach(a, size, (0, true), 0, flags).unwrap()
    }

    #[test]
    fn packed_reconnect_rolls_back_an_unpublished_batch() {
        let (a, buf) = area(stride(4));
        let (mut t, _) = PackedTracker::attach(a, 4, (0, true), 0, |_| 0).unwrap();
        t.on_pop(2, 7, |k| packed_desc(k, 7, 2));
        t.on_pop(1, 9, |k| packed_desc(k, 9, 1));
        // Crash after the area steps of completing B, before its used flags were written:
        // slot 0 still holds A's head as the driver made it available (wrap 1).
        t.before_used(&[(9, 0)], (0, true));
        drop(t);
        let (_t, list) = reattach(&buf, 4, |_| DESC_F_AVAIL | 1);
        let ids: Vec<u16> = list.iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![7, 9]);
        assert_eq!(list[0].descriptors.len(), 2);
        assert_eq!(list[0].descriptors[0].addr, 0x7000);
        assert_eq!(list[1].descriptors, vec![packed_desc(0, 9, 1)]);
        let b = bytes(&buf);
        assert_eq!(u16_at(&b, packed::USED_IDX), 0);
        assert_eq!(u16_at(&b, packed::FREE_HEAD), 3);
    }

    #[test]
    fn packed_reconnect_commits_a_published_batch() {
        let (a, buf) = area(stride(4));
        let (mut t, _) = PackedTracker::attach(a, 4, (0, true), 0, |_| 0).unwrap();
        t.on_pop(2, 7, |k| packed_desc(k, 7, 2));
        t.on_pop(1, 9, |k| packed_desc(k, 9, 1));
        // Crash after B's used descriptor was published at slot 0 (AVAIL|USED, wrap 1) but
        // before the area's completion steps.
        t.before_used(&[(9, 0)], (0, true));
        drop(t);
        let (mut t, list) = reattach(&buf, 4, |slot| {
            if slot == 0 {
                DESC_F_AVAIL | DESC_F_USED
            } else {
                0
            }
        });
        let ids: Vec<u16> = list.iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![7]);
        let b = bytes(&buf);
        assert_eq!(u16_at(&b, packed::USED_IDX), 1);
        assert_eq!(u16_at(&b, packed::OLD_USED_IDX), 1);
        // The recovered request can be completed through the tracker.
        assert!(t.check_used(&[(7, 0)]));
        t.before_used(&[(7, 0)], (1, true));
        t.after_used(&[(7, 0)]);
        assert_eq!(u16_at(&bytes(&buf), packed::USED_IDX), 3);
    }

    #[test]
    fn packed_corrupt_region_is_reinitialised_not_trusted() {
        let (a, buf) = area(stride(4));
        let (mut t, _) = PackedTracker::attach(a, 4, (0, true), 0, |_| 0).unwrap();
        t.on_pop(1, 9, |k| packed_desc(k, 9, 1));
        drop(t);
        // Corrupt the free list head.
        let owner: Arc<dyn Any + Send + Sync> = buf.clone();
        // SAFETY: live buffer.
        let raw = unsafe { QueueArea::from_raw(buf.as_ptr().cast_mut().cast(), stride(4), owner) };
        raw.set_u16(packed::OLD_FREE_HEAD, 1000);
        let (_t, list) = reattach(&buf, 4, |_| 0);
        assert!(list.is_empty());
        assert_eq!(u16_at(&bytes(&buf), packed::FREE_HEAD), 0);
    }

    #[test]
    fn packed_free_list_exhaustion_disables_tracking_without_overflow() {
        let (a, _buf) = area(stride(2));
        let (mut t, _) = PackedTracker::attach(a, 2, (0, true), 0, |_| 0).unwrap();
        t.on_pop(2, 1, |k| packed_desc(k, 1, 2));
        t.on_pop(1, 2, |k| packed_desc(k, 2, 1));
        assert!(t.disabled);
    }

    #[test]
    fn area_allocation_and_remap() {
        let (area, fd, size) = InflightArea::allocate(2, 128).unwrap();
        assert_eq!(size, 2 * queue_stride(128));
        assert!(area.queue(1).is_some());
        assert!(area.queue(2).is_none());
        let (q, _) = SplitTracker::attach(area.queue(1).unwrap(), 128, 0, 1).unwrap();
        drop(q);
        let again = InflightArea::from_fd(&fd, size, 0, 2, 128).unwrap();
        let q1 = again.queue(1).unwrap();
        assert_eq!(q1.get_u16(split::VERSION), 1);
        assert_eq!(q1.get_u16(split::DESC_NUM), 128);
        assert!(InflightArea::from_fd(&fd, 64, 0, 2, 128).is_err());
    }
}
