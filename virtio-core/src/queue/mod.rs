// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Device-side virtqueues: one [`Queue`] type over the split (§2.7) and packed (§2.8)
//! layouts, chosen at run time from the negotiated VIRTIO_F_RING_PACKED.
//!
//! A device is written once against [`Queue`]:
//!
//! ```
//! # use std::sync::Arc;
//! # use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use virtio_core::{DescriptorChain, GuestMemoryView, Queue, QueueConfig, RingLayout};
//! # let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
//! let mem = Arc::new(GuestMemoryView::new(Arc::new(mem)).unwrap());
//! let config = QueueConfig {
//!     layout: RingLayout::Split,
//!     size: 256,
//!     desc_table: 0x1000,
//!     driver_area: 0x2000,
//!     device_area: 0x3000,
//!     event_idx: true,
//!     indirect_desc: true,
//! };
//! let mut queue = Queue::new(config, mem).unwrap();
//! let mut chain = DescriptorChain::new();
//! while queue.pop_into(&mut chain).unwrap() {
//!     let written = 0; // ... process the chain ...
//!     queue.add_used(chain.id(), written).unwrap();
//! }
//! if queue.needs_notification() {
//!     // signal the call eventfd
//! }
//! ```

mod packed;
pub(crate) mod ring_mem;
mod split;

use std::sync::Arc;

use crate::chain::{DescriptorChain, MAX_INDIRECT_ENTRIES};
use crate::desc::PackedDescriptor;
use crate::error::{Error, Result};
use crate::memory::GuestMemoryView;
pub use packed::desc_event_needs_notification;
use packed::PackedRing;
use ring_mem::{decode_descriptor, RingArea};
use split::SplitRing;

/// Largest queue size of either layout (§2.7, §2.8: 2^15).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// The ring layout of a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RingLayout {
    /// Split virtqueue (§2.7).
    Split,
    /// Packed virtqueue (§2.8), negotiated with VIRTIO_F_RING_PACKED.
    Packed,
}

impl RingLayout {
    /// The layout chosen by the negotiated features (VIRTIO_F_RING_PACKED, bit 34).
    pub fn from_features(features: u64) -> Self {
        if features & (1 << virtio_bindings::virtio_config::VIRTIO_F_RING_PACKED) != 0 {
            RingLayout::Packed
        } else {
            RingLayout::Split
        }
    }

    fn name(self) -> &'static str {
        match self {
            RingLayout::Split => "split",
            RingLayout::Packed => "packed",
        }
    }
}

/// Where a queue lives and what was negotiated for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// Split or packed.
    pub layout: RingLayout,
    /// Number of entries (split: power of 2 ≤ 32768; packed: 1..=32768).
    pub size: u16,
    /// Descriptor Area: split descriptor table, or packed descriptor ring.
    pub desc_table: u64,
    /// Driver Area: split avail ring, or packed driver event suppression.
    pub driver_area: u64,
    /// Device Area: split used ring, or packed device event suppression.
    pub device_area: u64,
    /// VIRTIO_F_EVENT_IDX negotiated.
    pub event_idx: bool,
    /// VIRTIO_F_INDIRECT_DESC negotiated.
    pub indirect_desc: bool,
}

impl QueueConfig {
    /// Checks the size and alignment rules of the layout (§2.7, §2.8). Memory placement
    /// is checked by [`Queue::new`].
    pub fn validate(&self) -> Result<()> {
        let ok = match self.layout {
            RingLayout::Split => self.size.is_power_of_two() && self.size <= MAX_QUEUE_SIZE,
            RingLayout::Packed => self.size >= 1 && self.size <= MAX_QUEUE_SIZE,
        };
        if !ok {
            return Err(Error::InvalidSize {
                size: u32::from(self.size),
                layout: self.layout.name(),
            });
        }
        let (desc_align, driver_align, device_align) = match self.layout {
            RingLayout::Split => (16, 2, 4),
            RingLayout::Packed => (16, 4, 4),
        };
        for (area, addr, align) in [
            ("descriptor area", self.desc_table, desc_align),
            ("driver area", self.driver_area, driver_align),
            ("device area", self.device_area, device_align),
        ] {
            if addr % align != 0 {
                return Err(Error::Misaligned { area, addr, align });
            }
        }
        Ok(())
    }
}

/// Translates one ring area and checks it lies inside one region with host alignment.
pub(crate) fn map_area(
    mem: &GuestMemoryView,
    area: &'static str,
    addr: u64,
    len: u64,
    align: usize,
) -> Result<RingArea> {
    let outside = Error::AreaOutsideMemory { area, addr, len };
    let host = mem.translate(addr, len, &mut 0).ok_or(outside.clone())?;
    if (host as usize) % align != 0 {
        return Err(Error::Misaligned {
            area,
            addr: host as u64,
            align: align as u64,
        });
    }
    let len = usize::try_from(len).map_err(|_| outside)?;
    // SAFETY: `host..host + len` lies inside one mapped region of `mem` (checked by
    // `translate`), which the queue keeps alive as long as it uses the area; alignment was
    // checked just above.
    Ok(unsafe { RingArea::new(host, len) })
}

enum Ring {
    Split(SplitRing),
    Packed(PackedRing),
}

/// A device-side virtqueue of either layout. See the module documentation.
pub struct Queue {
    config: QueueConfig,
    mem: Arc<GuestMemoryView>,
    ring: Ring,
    /// Last guest memory region hit by a buffer translation.
    region_hint: usize,
    broken: bool,
}

// SAFETY: the ring's raw pointers point into guest memory kept mapped by `mem` (an
// `Arc<GuestMemoryView>`, `Send + Sync`); a `Queue` is used by one thread at a time.
unsafe impl Send for Queue {}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("config", &self.config)
            .field("vring_base", &self.vring_base())
            .field("broken", &self.broken)
            .finish()
    }
}

impl Queue {
    /// Validates `config` against `mem` and translates the ring areas once. The ring
    /// state starts as after a reset (split: `next_used` taken from the used ring's idx,
    /// so a restarted backend continues where the guest sees the device; packed: both
    /// positions 0, both wrap counters 1).
    pub fn new(config: QueueConfig, mem: Arc<GuestMemoryView>) -> Result<Self> {
        config.validate()?;
        let ring = match config.layout {
            RingLayout::Split => Ring::Split(SplitRing::new(&config, &mem)?),
            RingLayout::Packed => Ring::Packed(PackedRing::new(&config, &mem)?),
        };
        Ok(Queue {
            config,
            mem,
            ring,
            region_hint: 0,
            broken: false,
        })
    }

    /// The configuration the queue was built with.
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.config.size
    }

    /// The ring layout.
    pub fn layout(&self) -> RingLayout {
        self.config.layout
    }

    /// The guest memory the queue translates through.
    pub fn memory(&self) -> &Arc<GuestMemoryView> {
        &self.mem
    }

    /// Replaces the guest memory (after a memory table change) and translates the ring
    /// areas again. On failure the queue is unchanged.
    pub fn set_memory(&mut self, mem: Arc<GuestMemoryView>) -> Result<()> {
        match &mut self.ring {
            Ring::Split(r) => r.remap(&self.config, &mem)?,
            Ring::Packed(r) => r.remap(&self.config, &mem)?,
        }
        self.mem = mem;
        self.region_hint = 0;
        Ok(())
    }

    /// The ring state in the vhost-user `GET_VRING_BASE` encoding. Split: the next avail
    /// index. Packed: bits 0–14 last avail index, bit 15 avail wrap counter, bits 16–30
    /// last used index, bit 31 used wrap counter.
    pub fn vring_base(&self) -> u32 {
        match &self.ring {
            Ring::Split(r) => u32::from(r.next_avail()),
            Ring::Packed(r) => r.vring_base(),
        }
    }

    /// Restores a ring state in the `SET_VRING_BASE` encoding (see [`Self::vring_base`]).
    /// Split: also resynchronises `next_used` from the used ring's idx. Clears the broken
    /// state and in-flight bookkeeping.
    pub fn set_vring_base(&mut self, base: u32) -> Result<()> {
        match &mut self.ring {
            Ring::Split(r) => r.set_base(base)?,
            Ring::Packed(r) => r.set_base(base)?,
        }
        self.broken = false;
        Ok(())
    }

    /// True once an error has broken the queue; it stays broken until reset.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Marks the queue broken (e.g. when the device finds a chain it cannot accept).
    pub fn set_broken(&mut self) {
        self.broken = true;
    }

    /// Pops the next available chain into `chain` (reusing its buffers). Returns
    /// `Ok(false)` when the driver has made nothing new available.
    ///
    /// Any error breaks the queue (see [`Error`]).
    pub fn pop_into(&mut self, chain: &mut DescriptorChain) -> Result<bool> {
        if self.broken {
            return Err(Error::Broken);
        }
        let ctx = PopContext {
            mem: &self.mem,
            hint: &mut self.region_hint,
            indirect_desc: self.config.indirect_desc,
        };
        let r = match &mut self.ring {
            Ring::Split(r) => r.pop_into(ctx, chain),
            Ring::Packed(r) => r.pop_into(ctx, chain),
        };
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    /// Takes back into `chain` a chain that a previous device instance popped and never
    /// completed (vhost-user "Inflight I/O tracking"), validated as a pop would and
    /// counted in flight, so that it completes with [`Self::add_used`] like any other.
    /// The ring positions do not move: the caller restored a base that covers it
    /// ([`Self::set_vring_base`]; split: `next_used` plus the number of recovered chains).
    ///
    /// Any error breaks the queue.
    pub fn pop_recovered_into(
        &mut self,
        chain: &mut DescriptorChain,
        recovered: RecoveredChain<'_>,
    ) -> Result<()> {
        if self.broken {
            return Err(Error::Broken);
        }
        let ctx = PopContext {
            mem: &self.mem,
            hint: &mut self.region_hint,
            indirect_desc: self.config.indirect_desc,
        };
        let r = match (&mut self.ring, recovered) {
            (Ring::Split(r), RecoveredChain::Split { head }) => {
                r.pop_recovered_into(ctx, head, chain)
            }
            (Ring::Packed(r), RecoveredChain::Packed { descriptors }) => {
                r.pop_recovered_into(ctx, descriptors, chain)
            }
            (_, _) => Err(Error::RecoveredLayoutMismatch),
        };
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    /// Pops the next available chain into a new [`DescriptorChain`].
    pub fn pop(&mut self) -> Result<Option<DescriptorChain>> {
        let mut chain = DescriptorChain::new();
        Ok(self.pop_into(&mut chain)?.then_some(chain))
    }

    /// True if the driver has made a buffer available that was not popped yet (for busy
    /// polling; does not consume anything).
    pub fn has_available(&mut self) -> Result<bool> {
        if self.broken {
            return Err(Error::Broken);
        }
        let r = match &mut self.ring {
            Ring::Split(r) => r.has_available(),
            Ring::Packed(r) => Ok(r.has_available()),
        };
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    /// Returns a chain to the driver with `len` bytes written, and publishes it.
    /// `id` is [`DescriptorChain::id`].
    pub fn add_used(&mut self, id: u16, len: u32) -> Result<()> {
        match &mut self.ring {
            Ring::Split(r) => r.add_used_one(id, len),
            Ring::Packed(r) => r.add_used_one(id, len),
        }
    }

    /// Returns several chains (`(id, len)` in completion order) with one publish: the
    /// driver sees all of them at once (split: one used idx store; packed: the first used
    /// descriptor's flags are written last).
    pub fn add_used_batch(&mut self, used: &[(u16, u32)]) -> Result<()> {
        match &mut self.ring {
            Ring::Split(r) => r.add_used_batch(used),
            Ring::Packed(r) => r.add_used_batch(used),
        }
    }

    /// Decides whether the driver must be notified of the used buffers added since the
    /// last notification (§2.7.10, §2.8.10), and records that it now has been, if so.
    pub fn needs_notification(&mut self) -> bool {
        match &mut self.ring {
            Ring::Split(r) => r.needs_notification(),
            Ring::Packed(r) => r.needs_notification(),
        }
    }

    /// Asks the driver to notify (kick) on new buffers. Returns true if buffers were made
    /// available meanwhile: the caller must process them before sleeping, or a wake-up is
    /// lost (the re-check after the full fence is what closes that race).
    pub fn enable_notification(&mut self) -> Result<bool> {
        if self.broken {
            return Err(Error::Broken);
        }
        let r = match &mut self.ring {
            Ring::Split(r) => r.enable_notification(),
            Ring::Packed(r) => Ok(r.enable_notification()),
        };
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    /// Asks the driver not to notify (the device is polling).
    pub fn disable_notification(&mut self) {
        match &mut self.ring {
            Ring::Split(r) => r.disable_notification(),
            Ring::Packed(r) => r.disable_notification(),
        }
    }

    /// Next ring position the device will read a chain from (split: free-running avail
    /// index; packed: slot index in the ring).
    pub fn next_avail(&self) -> u16 {
        match &self.ring {
            Ring::Split(r) => r.next_avail(),
            Ring::Packed(r) => r.next_avail(),
        }
    }

    /// Next used position (split: free-running used idx; packed: slot index).
    pub fn next_used(&self) -> u16 {
        match &self.ring {
            Ring::Split(r) => r.next_used(),
            Ring::Packed(r) => r.next_used(),
        }
    }

    /// Packed: the device's avail wrap counter. Split: always true.
    pub fn avail_wrap_counter(&self) -> bool {
        match &self.ring {
            Ring::Split(_) => true,
            Ring::Packed(r) => r.avail_wrap_counter(),
        }
    }

    /// Packed: the device's used wrap counter. Split: always true.
    pub fn used_wrap_counter(&self) -> bool {
        match &self.ring {
            Ring::Split(_) => true,
            Ring::Packed(r) => r.used_wrap_counter(),
        }
    }

    /// Chains popped and not yet returned with `add_used`.
    pub fn in_flight(&self) -> u16 {
        match &self.ring {
            Ring::Split(r) => r.in_flight(),
            Ring::Packed(r) => r.in_flight(),
        }
    }

    /// Split: how many of the chains [`Self::set_vring_base`] counted in flight (those
    /// between the used idx and the restored base) were restored without being popped by
    /// this queue; only a resubmission (inflight tracking) can complete them. Packed: 0
    /// (a restored packed ring has nothing in flight).
    pub fn restored_in_flight(&self) -> u16 {
        match &self.ring {
            Ring::Split(r) => r.restored_in_flight(),
            Ring::Packed(_) => 0,
        }
    }
}

/// A chain a previous device instance popped and never completed, as an inflight area
/// recorded it (see [`Queue::pop_recovered_into`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoveredChain<'a> {
    /// Split ring: the chain's head descriptor index (the chain is still in the
    /// descriptor table: the driver does not reuse it before it is used).
    Split {
        /// Head descriptor index.
        head: u16,
    },
    /// Packed ring: copies of the chain's ring descriptors, recorded when it was popped
    /// (the ring slots themselves may have been overwritten by used descriptors since).
    Packed {
        /// The ring descriptors, head first.
        descriptors: &'a [PackedDescriptor],
    },
}

/// What a ring layout's pop needs from the queue.
pub(crate) struct PopContext<'a> {
    pub mem: &'a Arc<GuestMemoryView>,
    pub hint: &'a mut usize,
    pub indirect_desc: bool,
}

/// Reads entries of an indirect table (§2.7.5.3, §2.8.19).
pub(crate) struct IndirectTable<'a> {
    mem: &'a GuestMemoryView,
    addr: u64,
    /// Host pointer when the whole table lies in one region (the common case).
    host: Option<*const u8>,
    /// Number of 16-byte entries.
    pub entries: u32,
}

impl<'a> IndirectTable<'a> {
    /// Validates the table's length and placement.
    pub(crate) fn new(
        mem: &'a GuestMemoryView,
        hint: &mut usize,
        addr: u64,
        len: u32,
    ) -> Result<Self> {
        if len == 0 || len % 16 != 0 || len / 16 > MAX_INDIRECT_ENTRIES {
            return Err(Error::InvalidIndirectLength(len));
        }
        let outside = || Error::BufferOutsideMemory {
            addr,
            len: u64::from(len),
        };
        let host = match mem.translate(addr, u64::from(len), hint) {
            Some(h) => Some(h.cast_const()),
            None => {
                // Possibly split across regions: check every byte is guest memory.
                mem.for_each_piece(addr, u64::from(len), hint, |_, _, _| Ok(()), outside)?;
                None
            }
        };
        Ok(IndirectTable {
            mem,
            addr,
            host,
            entries: len / 16,
        })
    }

    /// Entry `i` (< `entries`) as (addr, len, u16 at 12, u16 at 14).
    pub(crate) fn entry(&self, i: u32, hint: &mut usize) -> Result<(u64, u32, u16, u16)> {
        debug_assert!(i < self.entries);
        let off = u64::from(i) * 16;
        let mut raw = [0u64; 2];
        match self.host {
            Some(h) => {
                // SAFETY: `h..h + entries * 16` lies inside one mapped region (checked in
                // `new`) kept alive by the queue's memory view; `i < entries`. Indirect
                // tables need not be aligned, hence the unaligned read.
                raw = unsafe {
                    std::ptr::read_unaligned(h.add(crate::usize_from(off)).cast::<[u64; 2]>())
                };
            }
            None => {
                let dst = raw.as_mut_ptr().cast::<u8>();
                let mut done = 0usize;
                self.mem.for_each_piece(
                    self.addr + off,
                    16,
                    hint,
                    |src, n, _| {
                        // SAFETY: `src..src + n` is mapped guest memory (from the view);
                        // `done + n <= 16`, the size of `raw`.
                        unsafe {
                            std::ptr::copy_nonoverlapping(src, dst.add(done), crate::usize_from(n))
                        };
                        done += crate::usize_from(n);
                        Ok(())
                    },
                    || Error::BufferOutsideMemory {
                        addr: self.addr,
                        len: u64::from(self.entries) * 16,
                    },
                )?;
            }
        }
        Ok(decode_descriptor(raw))
    }
}
