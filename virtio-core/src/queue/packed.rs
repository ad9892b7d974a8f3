// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The packed virtqueue, device side (virtio 1.2 §2.8).

use std::sync::atomic::{fence, Ordering};

use super::{map_area, IndirectTable, PopContext, QueueConfig, RingArea};
use crate::chain::DescriptorChain;
use crate::desc::{
    vring_need_event, PackedDescriptor, RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED, VIRTQ_DESC_F_WRITE,
};
use crate::error::{Error, Result};
use crate::memory::GuestMemoryView;

// Offsets inside a packed descriptor.
const DESC_LEN: usize = 8;
const DESC_ID: usize = 12;
const DESC_FLAGS: usize = 14;
// Offsets inside an event suppression structure.
const EVENT_OFF_WRAP: usize = 0;
const EVENT_FLAGS: usize = 2;

/// True if a descriptor with `flags` is available for a driver wrap counter `wrap`
/// (§2.8.1: AVAIL equals the wrap counter and USED does not).
#[inline(always)]
pub(crate) fn is_available(flags: u16, wrap: bool) -> bool {
    let avail = flags & VIRTQ_DESC_F_AVAIL != 0;
    let used = flags & VIRTQ_DESC_F_USED != 0;
    avail == wrap && used != wrap
}

pub(crate) struct PackedRing {
    size: u16,
    desc_ring: RingArea,
    /// Driver event suppression: written by the driver, read by us.
    driver_event: RingArea,
    /// Device event suppression: written by us.
    device_event: RingArea,
    event_idx: bool,
    next_avail: u16,
    avail_wrap_counter: bool,
    next_used: u16,
    used_wrap_counter: bool,
    /// Ring slots taken by each in-flight buffer ID (0: not in flight). Indexed by ID,
    /// which the driver chooses freely (§2.8.5), hence all 2^16 entries.
    slots_by_id: Box<[u16]>,
    in_flight: u16,
    /// (next_used, used_wrap_counter) when the driver was last notified.
    signalled_used: Option<(u16, bool)>,
    /// Used ring slots advanced since then (distinguishes "nothing" from "a full ring").
    used_since_signal: u32,
    /// The flags we last wrote to the device event structure.
    device_event_flags: u16,
    /// Scratch for `add_used_batch` (slot counts taken, to put back on a bad ID).
    batch_slots: Vec<u16>,
}

impl PackedRing {
    pub(crate) fn new(config: &QueueConfig, mem: &GuestMemoryView) -> Result<Self> {
        let (desc_ring, driver_event, device_event) = Self::map(config, mem)?;
        Ok(PackedRing {
            size: config.size,
            desc_ring,
            driver_event,
            device_event,
            event_idx: config.event_idx,
            next_avail: 0,
            avail_wrap_counter: true,
            next_used: 0,
            used_wrap_counter: true,
            slots_by_id: vec![0u16; 1 << 16].into_boxed_slice(),
            in_flight: 0,
            signalled_used: None,
            used_since_signal: 0,
            device_event_flags: RING_EVENT_FLAGS_ENABLE,
            batch_slots: Vec::new(),
        })
    }

    fn map(config: &QueueConfig, mem: &GuestMemoryView) -> Result<(RingArea, RingArea, RingArea)> {
        Ok((
            map_area(
                mem,
                "descriptor ring",
                config.desc_table,
                16 * u64::from(config.size),
                16,
            )?,
            map_area(mem, "driver event suppression", config.driver_area, 4, 4)?,
            map_area(mem, "device event suppression", config.device_area, 4, 4)?,
        ))
    }

    pub(crate) fn remap(&mut self, config: &QueueConfig, mem: &GuestMemoryView) -> Result<()> {
        let (d, dr, dv) = Self::map(config, mem)?;
        self.desc_ring = d;
        self.driver_event = dr;
        self.device_event = dv;
        Ok(())
    }

    pub(crate) fn vring_base(&self) -> u32 {
        u32::from(self.next_avail)
            | (u32::from(self.avail_wrap_counter) << 15)
            | (u32::from(self.next_used) << 16)
            | (u32::from(self.used_wrap_counter) << 31)
    }

    pub(crate) fn set_base(&mut self, base: u32) -> Result<()> {
        let next_avail = u16::try_from(base & 0x7fff).unwrap_or(0);
        let next_used = u16::try_from((base >> 16) & 0x7fff).unwrap_or(0);
        if next_avail >= self.size || next_used >= self.size {
            return Err(Error::InvalidRingBase(base));
        }
        self.next_avail = next_avail;
        self.avail_wrap_counter = base & (1 << 15) != 0;
        self.next_used = next_used;
        self.used_wrap_counter = base & (1 << 31) != 0;
        self.slots_by_id.fill(0);
        self.in_flight = 0;
        self.signalled_used = None;
        self.used_since_signal = 0;
        Ok(())
    }

    pub(crate) fn next_avail(&self) -> u16 {
        self.next_avail
    }

    pub(crate) fn next_used(&self) -> u16 {
        self.next_used
    }

    pub(crate) fn avail_wrap_counter(&self) -> bool {
        self.avail_wrap_counter
    }

    pub(crate) fn used_wrap_counter(&self) -> bool {
        self.used_wrap_counter
    }

    pub(crate) fn in_flight(&self) -> u16 {
        self.in_flight
    }

    #[inline(always)]
    fn head_flags_acquire(&self) -> u16 {
        // §2.8.21: the driver writes a chain's head flags last; acquire orders our reads
        // of the chain's descriptors after this load.
        self.desc_ring
            .load_u16_acquire(usize::from(self.next_avail) * 16 + DESC_FLAGS)
    }

    pub(crate) fn has_available(&self) -> bool {
        is_available(self.head_flags_acquire(), self.avail_wrap_counter)
    }

    pub(crate) fn pop_into(
        &mut self,
        ctx: PopContext<'_>,
        chain: &mut DescriptorChain,
    ) -> Result<bool> {
        let flags = self.head_flags_acquire();
        if !is_available(flags, self.avail_wrap_counter) {
            return Ok(false);
        }
        if self.in_flight >= self.size {
            // Each buffer takes at least one slot: more than `size` in flight means the
            // driver overwrote slots the device still owns.
            return Err(Error::TooManyInFlight(self.size));
        }
        let size = self.size;
        let mut slot = self.next_avail;
        let mut wrap = self.avail_wrap_counter;
        let ring = &self.desc_ring;
        let (id, slots) = walk_chain(ctx, chain, size, |k| {
            let off = usize::from(slot) * 16;
            // One snapshot of the descriptor. For the head, keep the flags loaded with
            // acquire above rather than a second read the driver could have changed.
            let (addr, len, id, raw_flags) = ring.read_descriptor(off);
            let f = if k == 0 { flags } else { raw_flags };
            // Advance, flipping the wrap counter past the ring end (§2.8.1).
            slot += 1;
            if slot == size {
                slot = 0;
                wrap = !wrap;
            }
            Some((addr, len, id, f))
        })?;
        self.take_slots(id, slots)?;
        chain.set_head(id, slots);
        self.next_avail = slot;
        self.avail_wrap_counter = wrap;
        Ok(true)
    }

    /// Records buffer `id` as in flight, taking `slots` ring slots.
    #[inline(always)]
    fn take_slots(&mut self, id: u16, slots: u16) -> Result<()> {
        let entry = &mut self.slots_by_id[usize::from(id)];
        if *entry != 0 {
            return Err(Error::BufferIdInUse(id));
        }
        *entry = slots;
        self.in_flight += 1;
        Ok(())
    }

    /// Takes back a chain that a previous device instance popped and never completed
    /// (vhost-user inflight recovery), from the copies of its ring descriptors recorded
    /// when it was popped: validated like a pop, counted in flight. The ring positions do
    /// not move: the restored base already covers the chain's slots.
    pub(crate) fn pop_recovered_into(
        &mut self,
        ctx: PopContext<'_>,
        descriptors: &[PackedDescriptor],
        chain: &mut DescriptorChain,
    ) -> Result<()> {
        if self.in_flight >= self.size {
            return Err(Error::TooManyInFlight(self.size));
        }
        let size = self.size;
        let (id, slots) = walk_chain(ctx, chain, size, |k| {
            descriptors
                .get(usize::from(k))
                .map(|d| (d.addr, d.len, d.id, d.flags))
        })?;
        if usize::from(slots) != descriptors.len() {
            return Err(Error::RecoveredChainMismatch {
                id,
                recorded: descriptors.len(),
                walked: slots,
            });
        }
        self.take_slots(id, slots)?;
        chain.set_head(id, slots);
        Ok(())
    }

    /// The flags of a used descriptor: AVAIL and USED both equal to the used wrap counter
    /// (§2.8.1), WRITE when data was written.
    #[inline(always)]
    fn used_flags(wrap: bool, len: u32) -> u16 {
        let mut flags = if wrap {
            VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
        } else {
            0
        };
        if len > 0 {
            flags |= VIRTQ_DESC_F_WRITE;
        }
        flags
    }

    /// One completion: the hot path of [`crate::Queue::add_used`].
    #[inline]
    pub(crate) fn add_used_one(&mut self, id: u16, len: u32) -> Result<()> {
        let slots = std::mem::take(&mut self.slots_by_id[usize::from(id)]);
        if slots == 0 {
            return Err(Error::NotInFlight(id));
        }
        let off = usize::from(self.next_used) * 16;
        let flags = Self::used_flags(self.used_wrap_counter, len);
        self.desc_ring.write_u32(off + DESC_LEN, len);
        self.desc_ring.write_u16(off + DESC_ID, id);
        // §2.8.22: id and len before flags; release orders them.
        self.desc_ring.store_u16_release(off + DESC_FLAGS, flags);
        self.advance_used(slots);
        Ok(())
    }

    pub(crate) fn add_used_batch(&mut self, used: &[(u16, u32)]) -> Result<()> {
        // Take every ID's slot count first, so that an ID not in flight (or repeated)
        // publishes nothing: on failure the counts taken so far are put back.
        self.batch_slots.clear();
        for (i, &(id, _)) in used.iter().enumerate() {
            let slots = std::mem::take(&mut self.slots_by_id[usize::from(id)]);
            if slots == 0 {
                for (&(prev, _), &s) in used[..i].iter().zip(&self.batch_slots) {
                    self.slots_by_id[usize::from(prev)] = s;
                }
                return Err(Error::NotInFlight(id));
            }
            self.batch_slots.push(slots);
        }
        let Some(&(first_id, first_len)) = used.first() else {
            return Ok(());
        };
        let first_off = usize::from(self.next_used) * 16;
        let first_flags = Self::used_flags(self.used_wrap_counter, first_len);
        self.desc_ring.write_u32(first_off + DESC_LEN, first_len);
        self.desc_ring.write_u16(first_off + DESC_ID, first_id);
        self.advance_used(self.batch_slots[0]);
        for (i, &(id, len)) in used.iter().enumerate().skip(1) {
            let off = usize::from(self.next_used) * 16;
            self.desc_ring.write_u32(off + DESC_LEN, len);
            self.desc_ring.write_u16(off + DESC_ID, id);
            // §2.8.22: id and len before flags; release orders them.
            self.desc_ring.store_u16_release(
                off + DESC_FLAGS,
                Self::used_flags(self.used_wrap_counter, len),
            );
            self.advance_used(self.batch_slots[i]);
        }
        // The first descriptor's flags last: the driver walks used descriptors in order, so
        // it sees the whole batch at once. Release orders every write above before it.
        self.desc_ring
            .store_u16_release(first_off + DESC_FLAGS, first_flags);
        Ok(())
    }

    #[inline(always)]
    fn advance_used(&mut self, slots: u16) {
        self.in_flight -= 1;
        self.used_since_signal += u32::from(slots);
        // §2.8.7: the used position advances by the slots the buffer took (never more
        // than the ring size, so one subtraction wraps it).
        let next = u32::from(self.next_used) + u32::from(slots);
        let next = if next >= u32::from(self.size) {
            self.used_wrap_counter = !self.used_wrap_counter;
            next - u32::from(self.size)
        } else {
            next
        };
        self.next_used = u16::try_from(next).unwrap_or(0);
    }

    pub(crate) fn needs_notification(&mut self) -> bool {
        // §2.8.10: read the driver's event suppression after publishing used descriptors;
        // store→load ordering needs the full fence (the driver fences symmetrically).
        fence(Ordering::SeqCst);
        let flags = self.driver_event.read_u16(EVENT_FLAGS) & 0x3;
        let new = (self.next_used, self.used_wrap_counter);
        let old = self.signalled_used.replace(new);
        let advanced = std::mem::take(&mut self.used_since_signal);
        if advanced == 0 {
            return false;
        }
        match flags {
            RING_EVENT_FLAGS_DISABLE => false,
            RING_EVENT_FLAGS_DESC if self.event_idx => {
                let Some(old) = old else { return true };
                if advanced >= u32::from(self.size) {
                    // Every slot was passed: whatever the driver asked for was reached.
                    return true;
                }
                let off_wrap = self.driver_event.read_u16(EVENT_OFF_WRAP);
                desc_event_needs_notification(self.size, off_wrap, new, old.0)
            }
            // ENABLE, DESC without EVENT_IDX (a driver bug) and the reserved value 3:
            // notifying is always safe.
            _ => true,
        }
    }

    pub(crate) fn enable_notification(&mut self) -> bool {
        if self.event_idx {
            // Ask for a kick when the driver makes the descriptor at next_avail available.
            let off_wrap = self.next_avail | (u16::from(self.avail_wrap_counter) << 15);
            self.device_event.write_u16(EVENT_OFF_WRAP, off_wrap);
            self.write_device_event_flags(RING_EVENT_FLAGS_DESC);
        } else {
            self.write_device_event_flags(RING_EVENT_FLAGS_ENABLE);
        }
        // Make the store above visible before re-checking the ring, else a buffer made
        // available in between may come with no kick (lost wake-up); §2.8.10.
        fence(Ordering::SeqCst);
        self.has_available()
    }

    pub(crate) fn disable_notification(&mut self) {
        self.write_device_event_flags(RING_EVENT_FLAGS_DISABLE);
    }

    fn write_device_event_flags(&mut self, flags: u16) {
        // Enabling always writes: guest memory may hold a stale DISABLE from before a reset
        // or a backend restart. Disabling twice in a row skips the redundant store.
        if self.device_event_flags != flags || flags != RING_EVENT_FLAGS_DISABLE {
            // Release: a new off_wrap written just before must be visible with the flags.
            self.device_event.store_u16_release(EVENT_FLAGS, flags);
            self.device_event_flags = flags;
        }
    }
}

/// The DESC-mode decision (§2.8.10), as DPDK computes it: the driver asked for a
/// notification when the device writes the used descriptor at `off_wrap`; `new` is the
/// device's (next_used, used wrap counter) now and `old_used` next_used at the last
/// notification, less than a full ring ago.
pub fn desc_event_needs_notification(
    size: u16,
    off_wrap: u16,
    new: (u16, bool),
    old_used: u16,
) -> bool {
    let (new_used, used_wrap) = new;
    let mut off = off_wrap & 0x7fff;
    let wrap = off_wrap & 0x8000 != 0;
    if wrap != used_wrap {
        off = off.wrapping_sub(size);
    }
    let old = if new_used <= old_used {
        old_used.wrapping_sub(size)
    } else {
        old_used
    };
    vring_need_event(off, new_used, old)
}

/// Walks a packed indirect table (§2.8.19): entries in order; only WRITE matters.
fn walk_indirect(
    mem: &GuestMemoryView,
    hint: &mut usize,
    chain: &mut DescriptorChain,
    addr: u64,
    len: u32,
) -> Result<()> {
    let table = IndirectTable::new(mem, hint, addr, len)?;
    for i in 0..table.entries {
        let (baddr, blen, _id, flags) = table.entry(i, hint)?;
        if flags & VIRTQ_DESC_F_INDIRECT != 0 {
            return Err(Error::NestedIndirect);
        }
        chain.count_descriptor(u32::MAX)?;
        chain.push_buffer(mem, hint, baddr, blen, flags & VIRTQ_DESC_F_WRITE != 0)?;
    }
    Ok(())
}

/// Walks one packed chain (§2.8.6, §2.8.7) into `chain`: `desc_at(k)` gives the k-th ring
/// descriptor of the chain as (addr, len, id, flags), or `None` past the end of a
/// recorded copy. The one walk of a packed chain, for chains read from the ring and
/// chains recovered from an inflight area alike. Returns the buffer ID (in the last
/// descriptor) and the number of ring slots the chain takes.
#[inline(always)]
fn walk_chain(
    ctx: PopContext<'_>,
    chain: &mut DescriptorChain,
    size: u16,
    mut desc_at: impl FnMut(u16) -> Option<(u64, u32, u16, u16)>,
) -> Result<(u16, u16)> {
    chain.reset(ctx.mem);
    let mem: &GuestMemoryView = ctx.mem;
    let mut slots: u16 = 0;
    loop {
        if slots == size {
            return Err(Error::ChainTooLong {
                max: u32::from(size),
            });
        }
        let Some((addr, len, id, flags)) = desc_at(slots) else {
            return Err(Error::RecoveredChainTruncated { slots });
        };
        slots += 1;
        if flags & VIRTQ_DESC_F_INDIRECT != 0 {
            if flags & VIRTQ_DESC_F_NEXT != 0 {
                return Err(Error::IndirectWithNext);
            }
            if !ctx.indirect_desc {
                return Err(Error::IndirectNotNegotiated);
            }
            walk_indirect(mem, ctx.hint, chain, addr, len)?;
            return Ok((id, slots));
        }
        chain.count_descriptor(u32::from(size))?;
        chain.push_buffer(mem, ctx.hint, addr, len, flags & VIRTQ_DESC_F_WRITE != 0)?;
        if flags & VIRTQ_DESC_F_NEXT == 0 {
            // §2.8.6: the buffer ID is in the last descriptor of the chain.
            return Ok((id, slots));
        }
    }
}

#[cfg(test)]
mod event_tests {
    use super::desc_event_needs_notification;

    /// (index, wrap counter) of an absolute ring position; lap 0 has wrap counter 1.
    fn pos(abs: u64, size: u16) -> (u16, bool) {
        let s = u64::from(size);
        (u16::try_from(abs % s).unwrap_or(0), (abs / s) % 2 == 0)
    }

    /// Every case of a DESC-mode decision on small and 128-entry rings, across laps: the
    /// other side waits at absolute position `event` (at most a ring behind `new`); the
    /// batch covers `old..new` (1 to `size` positions). A notification is due exactly
    /// when the batch covers `event`. A wrong answer at a lap boundary is a lost
    /// notification (a hang) or a spurious one.
    #[test]
    fn desc_event_decision_is_exact_at_every_lap_boundary() {
        for size in [1u16, 2, 3, 8, 128] {
            let s = u64::from(size);
            // Start far enough in to have a lap behind, and cover three laps.
            for old in s..4 * s {
                for k in 1..=s {
                    let new = old + k;
                    for event in new.saturating_sub(s)..=new {
                        let (off, wrap) = pos(event, size);
                        let off_wrap = off | (u16::from(wrap) << 15);
                        let got = desc_event_needs_notification(
                            size,
                            off_wrap,
                            pos(new, size),
                            pos(old, size).0,
                        );
                        let want = (old..new).contains(&event);
                        assert_eq!(
                            got, want,
                            "size {size}: batch {old}..{new}, event at {event}"
                        );
                    }
                }
            }
        }
    }
}
