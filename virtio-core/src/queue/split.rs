// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The split virtqueue, device side (virtio 1.2 §2.7).

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use super::{map_area, IndirectTable, PopContext, QueueConfig, RingArea};
use crate::chain::DescriptorChain;
use crate::desc::{
    split_avail_ring_size, split_desc_table_size, split_used_ring_size, vring_need_event,
    VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
};
use crate::error::{Error, Result};
use crate::memory::GuestMemoryView;

// Offsets inside the avail ring: flags, idx, ring[size], used_event.
const AVAIL_FLAGS: usize = 0;
const AVAIL_IDX: usize = 2;
const AVAIL_RING: usize = 4;
// Offsets inside the used ring: flags, idx, ring[size] of 8 bytes, avail_event.
const USED_FLAGS: usize = 0;
const USED_IDX: usize = 2;
const USED_RING: usize = 4;

pub(crate) struct SplitRing {
    size: u16,
    desc_table: RingArea,
    avail: RingArea,
    used: RingArea,
    event_idx: bool,
    /// Free-running index of the next avail ring entry to read.
    next_avail: Wrapping<u16>,
    /// Free-running index of the next used ring entry to write.
    next_used: Wrapping<u16>,
    /// Last avail->idx read; entries below it are known published (no re-read needed).
    shadow_avail_idx: Wrapping<u16>,
    /// next_used at the last notification decision; None: notify next time.
    signalled_used: Option<u16>,
    /// Whether we last wrote VIRTQ_USED_F_NO_NOTIFY (only saves redundant writes on
    /// disable; enabling always writes, since guest memory may hold a stale flag from
    /// before a reset or a backend restart).
    no_notify: bool,
    in_flight: u16,
    /// One bit per head index popped and not yet used.
    heads_in_flight: Box<[u64]>,
    /// Chains in flight whose heads are unknown (restored with `set_base`): `add_used`
    /// accepts that many heads not in `heads_in_flight`.
    unknown_in_flight: u16,
    /// `unknown_in_flight` as `set_base` left it: chains counted in flight that this
    /// instance did not pop.
    restored_in_flight: u16,
    /// Scratch for `add_used_batch`: heads whose bit it cleared, to put back on failure.
    batch_taken: Vec<u16>,
}

impl SplitRing {
    pub(crate) fn new(config: &QueueConfig, mem: &GuestMemoryView) -> Result<Self> {
        let (desc_table, avail, used) = Self::map(config, mem)?;
        let mut ring = SplitRing {
            size: config.size,
            desc_table,
            avail,
            used,
            event_idx: config.event_idx,
            next_avail: Wrapping(0),
            next_used: Wrapping(0),
            shadow_avail_idx: Wrapping(0),
            signalled_used: None,
            no_notify: false,
            in_flight: 0,
            heads_in_flight: vec![0u64; usize::from(config.size).div_ceil(64)].into_boxed_slice(),
            unknown_in_flight: 0,
            restored_in_flight: 0,
            batch_taken: Vec::new(),
        };
        ring.set_base(0)?;
        Ok(ring)
    }

    fn map(config: &QueueConfig, mem: &GuestMemoryView) -> Result<(RingArea, RingArea, RingArea)> {
        let size = config.size;
        Ok((
            map_area(
                mem,
                "descriptor table",
                config.desc_table,
                split_desc_table_size(size),
                16,
            )?,
            map_area(
                mem,
                "avail ring",
                config.driver_area,
                split_avail_ring_size(size),
                2,
            )?,
            map_area(
                mem,
                "used ring",
                config.device_area,
                split_used_ring_size(size),
                4,
            )?,
        ))
    }

    pub(crate) fn remap(&mut self, config: &QueueConfig, mem: &GuestMemoryView) -> Result<()> {
        let (d, a, u) = Self::map(config, mem)?;
        self.desc_table = d;
        self.avail = a;
        self.used = u;
        Ok(())
    }

    pub(crate) fn set_base(&mut self, base: u32) -> Result<()> {
        let next_avail = u16::try_from(base).map_err(|_| Error::InvalidRingBase(base))?;
        self.next_avail = Wrapping(next_avail);
        self.shadow_avail_idx = self.next_avail;
        // The used idx lives in guest memory; continue from what the driver sees. Chains
        // between used idx and next_avail were in flight when the state was saved.
        self.next_used = Wrapping(self.used.read_u16(USED_IDX));
        self.in_flight = next_avail.wrapping_sub(self.next_used.0).min(self.size);
        self.heads_in_flight.fill(0);
        self.unknown_in_flight = self.in_flight;
        self.restored_in_flight = self.in_flight;
        self.signalled_used = None;
        self.no_notify = false;
        Ok(())
    }

    pub(crate) fn next_avail(&self) -> u16 {
        self.next_avail.0
    }

    pub(crate) fn next_used(&self) -> u16 {
        self.next_used.0
    }

    pub(crate) fn in_flight(&self) -> u16 {
        self.in_flight
    }

    pub(crate) fn restored_in_flight(&self) -> u16 {
        self.restored_in_flight
    }

    /// Reads avail->idx with acquire ordering (§2.7.13: the driver writes ring entries and
    /// descriptors before idx; acquire orders our later reads of them after this load) and
    /// rejects an index more than a queue size ahead (§2.7.13.3 driver requirement).
    #[inline]
    fn refresh_avail_idx(&mut self) -> Result<()> {
        let idx = Wrapping(self.avail.load_u16_acquire(AVAIL_IDX));
        if (idx - self.next_avail).0 > self.size {
            return Err(Error::AvailIndexOverrun {
                avail_idx: idx.0,
                next_avail: self.next_avail.0,
            });
        }
        self.shadow_avail_idx = idx;
        Ok(())
    }

    pub(crate) fn has_available(&mut self) -> Result<bool> {
        if self.next_avail == self.shadow_avail_idx {
            self.refresh_avail_idx()?;
        }
        Ok(self.next_avail != self.shadow_avail_idx)
    }

    pub(crate) fn pop_into(
        &mut self,
        ctx: PopContext<'_>,
        chain: &mut DescriptorChain,
    ) -> Result<bool> {
        if !self.has_available()? {
            return Ok(false);
        }
        let size = self.size;
        // size is a power of two: the mask is the modulo.
        let slot = usize::from(self.next_avail.0 & (size - 1));
        let head = self.avail.read_u16(AVAIL_RING + 2 * slot);
        if head >= size {
            return Err(Error::HeadOutOfRange { head, size });
        }
        if self.in_flight >= size {
            return Err(Error::TooManyInFlight(size));
        }
        if self.head_is_in_flight(head) {
            return Err(Error::HeadInUse(head));
        }
        self.walk_chain(ctx, head, chain)?;
        self.next_avail += 1;
        self.in_flight += 1;
        self.heads_in_flight[usize::from(head / 64)] |= 1 << (head % 64);
        Ok(true)
    }

    #[inline(always)]
    fn head_is_in_flight(&self, head: u16) -> bool {
        self.heads_in_flight[usize::from(head / 64)] & (1 << (head % 64)) != 0
    }

    /// Walks the chain whose head descriptor is `head` (< size) into `chain` (§2.7.5):
    /// the one walk of a split chain, for new chains and recovered ones alike.
    #[inline]
    fn walk_chain(
        &self,
        ctx: PopContext<'_>,
        head: u16,
        chain: &mut DescriptorChain,
    ) -> Result<()> {
        let size = self.size;
        chain.reset(ctx.mem);
        let mem: &GuestMemoryView = ctx.mem;
        let mut index = head;
        // Descriptors walked in the table; bounds the walk so a `next` loop ends (§2.7.5.3.1:
        // a chain is at most `size` long).
        let mut walked: u16 = 0;
        loop {
            if walked == size {
                return Err(Error::ChainTooLong {
                    max: u32::from(size),
                });
            }
            walked += 1;
            let (addr, len, flags, next) = self.desc_table.read_descriptor(usize::from(index) * 16);
            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                if flags & VIRTQ_DESC_F_NEXT != 0 {
                    return Err(Error::IndirectWithNext);
                }
                if !ctx.indirect_desc {
                    return Err(Error::IndirectNotNegotiated);
                }
                walk_indirect(mem, ctx.hint, chain, addr, len)?;
                break;
            }
            chain.count_descriptor(u32::from(size))?;
            chain.push_buffer(mem, ctx.hint, addr, len, flags & VIRTQ_DESC_F_WRITE != 0)?;
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                break;
            }
            if next >= size {
                return Err(Error::NextOutOfRange {
                    index,
                    next,
                    table_len: u32::from(size),
                });
            }
            index = next;
        }
        chain.set_head(head, walked);
        Ok(())
    }

    /// Takes back a chain that a previous device instance popped and never completed
    /// (vhost-user inflight recovery): walks it from `head` like a pop, and turns one of
    /// the chains [`Self::set_base`] counted in flight with unknown heads into `head`.
    /// The avail index does not move: the restored base already covers the chain.
    pub(crate) fn pop_recovered_into(
        &mut self,
        ctx: PopContext<'_>,
        head: u16,
        chain: &mut DescriptorChain,
    ) -> Result<()> {
        if head >= self.size {
            return Err(Error::HeadOutOfRange {
                head,
                size: self.size,
            });
        }
        if self.head_is_in_flight(head) {
            return Err(Error::HeadInUse(head));
        }
        if self.unknown_in_flight == 0 {
            return Err(Error::RecoveredNotInFlight(head));
        }
        self.walk_chain(ctx, head, chain)?;
        self.unknown_in_flight -= 1;
        self.heads_in_flight[usize::from(head / 64)] |= 1 << (head % 64);
        Ok(())
    }

    /// Takes `id` out of the in-flight set: `Some(true)` if its bit was set, `Some(false)`
    /// if it was counted as one of the unknown heads, `None` if it is not in flight.
    #[inline]
    fn take_in_flight(&mut self, id: u16) -> Option<bool> {
        let word = self.heads_in_flight.get_mut(usize::from(id / 64))?;
        let bit = 1u64 << (id % 64);
        if *word & bit != 0 {
            *word &= !bit;
            Some(true)
        } else if self.unknown_in_flight > 0 {
            self.unknown_in_flight -= 1;
            Some(false)
        } else {
            None
        }
    }

    /// One completion: the hot path of [`crate::Queue::add_used`].
    #[inline]
    pub(crate) fn add_used_one(&mut self, id: u16, len: u32) -> Result<()> {
        if self.take_in_flight(id).is_none() {
            return Err(Error::NotInFlight(id));
        }
        let off = USED_RING + 8 * usize::from(self.next_used.0 & (self.size - 1));
        self.used.write_u32(off, u32::from(id));
        self.used.write_u32(off + 4, len);
        self.next_used += 1;
        // §2.7.8: the element before the idx (release).
        self.used.store_u16_release(USED_IDX, self.next_used.0);
        self.in_flight -= 1;
        Ok(())
    }

    pub(crate) fn add_used_batch(&mut self, used: &[(u16, u32)]) -> Result<()> {
        // Take every head out of the in-flight set first, so that one not in flight (or
        // repeated) publishes nothing: on failure the heads taken so far are put back.
        let saved_unknown = self.unknown_in_flight;
        self.batch_taken.clear();
        for &(id, _) in used {
            match self.take_in_flight(id) {
                Some(true) => self.batch_taken.push(id),
                Some(false) => {}
                None => {
                    self.unknown_in_flight = saved_unknown;
                    for &prev in &self.batch_taken {
                        self.heads_in_flight[usize::from(prev / 64)] |= 1 << (prev % 64);
                    }
                    return Err(Error::NotInFlight(id));
                }
            }
        }
        let mask = self.size - 1;
        for &(id, len) in used {
            let off = USED_RING + 8 * usize::from(self.next_used.0 & mask);
            self.used.write_u32(off, u32::from(id));
            self.used.write_u32(off + 4, len);
            self.next_used += 1;
        }
        // §2.7.8 / §2.7.14: the used elements must be visible before the new idx; release
        // orders the element writes above before this store.
        self.used.store_u16_release(USED_IDX, self.next_used.0);
        // Every id was in flight, so the count fits.
        self.in_flight -= u16::try_from(used.len()).unwrap_or(self.in_flight);
        Ok(())
    }

    pub(crate) fn needs_notification(&mut self) -> bool {
        // §2.7.10: the device reads used_event / flags after publishing used idx. A full
        // fence orders our idx store before this load (store→load needs SeqCst), matching
        // the driver's fence between its used_event store and its used idx read.
        fence(Ordering::SeqCst);
        let new = self.next_used.0;
        let old = self.signalled_used.replace(new);
        if old == Some(new) {
            // Nothing was used since the last decision.
            return false;
        }
        if self.event_idx {
            let used_event = self.avail.read_u16(AVAIL_RING + 2 * usize::from(self.size));
            match old {
                None => true,
                Some(old) => vring_need_event(used_event, new, old),
            }
        } else {
            self.avail.read_u16(AVAIL_FLAGS) & VIRTQ_AVAIL_F_NO_INTERRUPT == 0
        }
    }

    pub(crate) fn enable_notification(&mut self) -> Result<bool> {
        if self.event_idx {
            // Ask for a kick when the driver passes next_avail (avail_event, §2.7.10).
            self.used
                .write_u16(USED_RING + 8 * usize::from(self.size), self.next_avail.0);
        } else {
            // Always written: the flag in guest memory may be stale (see `no_notify`).
            self.used.write_u16(USED_FLAGS, 0);
            self.no_notify = false;
        }
        // Our store above must be visible before we re-read avail idx, or the driver may
        // add a buffer, read the old suppression and skip the kick: lost wake-up. The
        // driver does the mirror-image fence (§2.7.10).
        fence(Ordering::SeqCst);
        self.refresh_avail_idx()?;
        Ok(self.next_avail != self.shadow_avail_idx)
    }

    pub(crate) fn disable_notification(&mut self) {
        // With EVENT_IDX the driver kicks only when passing avail_event, which we stop
        // moving forward; nothing to write (as QEMU and Linux vhost do).
        if !self.event_idx && !self.no_notify {
            self.used.write_u16(USED_FLAGS, VIRTQ_USED_F_NO_NOTIFY);
            self.no_notify = true;
        }
    }
}

/// Walks a split indirect table (§2.7.5.3): entries chained by `next` from entry 0.
fn walk_indirect(
    mem: &GuestMemoryView,
    hint: &mut usize,
    chain: &mut DescriptorChain,
    addr: u64,
    len: u32,
) -> Result<()> {
    let table = IndirectTable::new(mem, hint, addr, len)?;
    let mut i: u32 = 0;
    let mut walked: u32 = 0;
    loop {
        if walked == table.entries {
            return Err(Error::ChainTooLong { max: table.entries });
        }
        walked += 1;
        let (baddr, blen, flags, next) = table.entry(i, hint)?;
        if flags & VIRTQ_DESC_F_INDIRECT != 0 {
            return Err(Error::NestedIndirect);
        }
        chain.count_descriptor(u32::MAX)?;
        chain.push_buffer(mem, hint, baddr, blen, flags & VIRTQ_DESC_F_WRITE != 0)?;
        if flags & VIRTQ_DESC_F_NEXT == 0 {
            return Ok(());
        }
        if u32::from(next) >= table.entries {
            return Err(Error::NextOutOfRange {
                index: u16::try_from(i).unwrap_or(u16::MAX),
                next,
                table_len: table.entries,
            });
        }
        i = u32::from(next);
    }
}
