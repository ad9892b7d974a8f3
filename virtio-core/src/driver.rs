// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The driver (guest) side of both ring layouts, for tests, fuzzing, benchmarks and the
//! userspace vhost-user frontend (cargo feature `driver`).
//!
//! It writes rings through `vm-memory`'s `Bytes` interface, follows the driver rules of
//! §2.7.13 / §2.8.21 (descriptors before the avail idx or head flags, with release
//! ordering), and keeps its own bookkeeping so that tests can compare what the device
//! returned against what was made available.

use std::sync::atomic::{fence, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::desc::{
    split_avail_ring_size, split_desc_table_size, split_used_ring_size, vring_need_event,
    PackedDescriptor, SplitDescriptor, RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE,
    VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED, VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY,
};
use crate::queue::{QueueConfig, RingLayout};

/// Errors of the driver side.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DriverError {
    /// Not enough free descriptors (split) or ring slots (packed) for the chain.
    #[error("no room in the ring for a chain of {0} descriptors")]
    RingFull(usize),
    /// A chain of no buffers.
    #[error("empty chain")]
    EmptyChain,
    /// Guest memory access failed.
    #[error("guest memory access at {0:#x} failed")]
    Memory(u64),
    /// The device returned an ID that is not in flight.
    #[error("device returned id {0}, which is not in flight")]
    BadUsedId(u32),
}

/// One buffer of a chain, as the driver describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriverBuffer {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Guest memory the rings of a queue of `size` take in `layout`, from a 4 KiB-aligned base.
pub fn ring_footprint(layout: RingLayout, size: u16) -> u64 {
    let (_, _, device, device_len) = area_offsets(layout, size);
    align_up(device + device_len, 4096)
}

/// Offsets of (descriptor area, driver area, device area, device area length).
fn area_offsets(layout: RingLayout, size: u16) -> (u64, u64, u64, u64) {
    match layout {
        RingLayout::Split => {
            let avail = split_desc_table_size(size);
            let used = align_up(avail + split_avail_ring_size(size), 4096);
            (0, avail, used, split_used_ring_size(size))
        }
        RingLayout::Packed => {
            let driver = align_up(16 * u64::from(size), 64);
            (0, driver, driver + 64, 4)
        }
    }
}

/// A driver-side virtqueue of either layout.
#[derive(Debug)]
pub struct DriverQueue {
    layout: RingLayout,
    size: u16,
    desc_table: u64,
    driver_area: u64,
    device_area: u64,
    event_idx: bool,
    // Split state.
    free_descs: Vec<u16>,
    descs_of_head: Vec<Vec<u16>>,
    avail_idx: u16,
    last_used_idx: u16,
    kicked_avail_idx: u16,
    // Packed state.
    next_avail: u16,
    avail_wrap_counter: bool,
    next_used: u16,
    used_wrap_counter: bool,
    free_ids: Vec<u16>,
    slots_of_id: Vec<u16>,
    free_slots: u16,
    kicked_pos: (u16, bool),
    /// Ring slots made available since the last kick decision: the packed event index
    /// arithmetic holds only within one ring (§2.8.10).
    added_since_kick: u32,
}

impl DriverQueue {
    /// A queue whose rings are laid out from `base` (4 KiB-aligned; see [`ring_footprint`]).
    pub fn new(layout: RingLayout, size: u16, base: u64, event_idx: bool) -> Self {
        let (d, dr, dv, _) = area_offsets(layout, size);
        DriverQueue {
            layout,
            size,
            desc_table: base + d,
            driver_area: base + dr,
            device_area: base + dv,
            event_idx,
            free_descs: (0..size).rev().collect(),
            descs_of_head: vec![Vec::new(); usize::from(size)],
            avail_idx: 0,
            last_used_idx: 0,
            kicked_avail_idx: 0,
            next_avail: 0,
            avail_wrap_counter: true,
            next_used: 0,
            used_wrap_counter: true,
            free_ids: (0..size).rev().collect(),
            slots_of_id: vec![0; usize::from(size)],
            free_slots: size,
            kicked_pos: (0, true),
            added_since_kick: 0,
        }
    }

    /// The device-side configuration matching this queue.
    pub fn config(&self, indirect_desc: bool) -> QueueConfig {
        QueueConfig {
            layout: self.layout,
            size: self.size,
            desc_table: self.desc_table,
            driver_area: self.driver_area,
            device_area: self.device_area,
            event_idx: self.event_idx,
            indirect_desc,
        }
    }

    /// Zeroes the ring areas (what a driver does before handing them to the device).
    pub fn init<M: GuestMemoryBackend>(&self, mem: &M) -> Result<(), DriverError> {
        let len = ring_footprint(self.layout, self.size);
        let zeros = vec![0u8; crate::usize_from(len)];
        mem.write_slice(&zeros, GuestAddress(self.desc_table))
            .map_err(|_| DriverError::Memory(self.desc_table))
    }

    /// The layout.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Descriptor area address.
    pub fn desc_table(&self) -> u64 {
        self.desc_table
    }

    /// Driver area address (split avail ring / packed driver event suppression).
    pub fn driver_area(&self) -> u64 {
        self.driver_area
    }

    /// Device area address (split used ring / packed device event suppression).
    pub fn device_area(&self) -> u64 {
        self.device_area
    }

    /// Descriptors (split) or ring slots (packed) free for new chains.
    pub fn free_slots(&self) -> u16 {
        match self.layout {
            RingLayout::Split => u16::try_from(self.free_descs.len()).unwrap_or(u16::MAX),
            RingLayout::Packed => self.free_slots,
        }
    }

    /// Chains made available and not yet returned.
    pub fn in_flight(&self) -> u16 {
        match self.layout {
            RingLayout::Split => self.avail_idx.wrapping_sub(self.last_used_idx),
            RingLayout::Packed => {
                self.size - u16::try_from(self.free_ids.len()).unwrap_or(self.size)
            }
        }
    }

    /// Packed: (next avail slot, avail wrap counter) of the driver.
    pub fn avail_position(&self) -> (u16, bool) {
        match self.layout {
            RingLayout::Split => (self.avail_idx, true),
            RingLayout::Packed => (self.next_avail, self.avail_wrap_counter),
        }
    }

    /// Split: the used ring's `idx` as the device last published it in guest memory (what
    /// QEMU restarts a split ring from when the backend died: it could not ask for the
    /// ring base). Packed: the device's used slot index the driver last saw.
    pub fn used_idx<M: GuestMemoryBackend>(&self, mem: &M) -> Result<u16, DriverError> {
        match self.layout {
            RingLayout::Split => Self::load_u16_acquire(mem, self.device_area + 2),
            RingLayout::Packed => Ok(self.next_used),
        }
    }

    fn write<T: vm_memory::ByteValued, M: GuestMemoryBackend>(
        mem: &M,
        addr: u64,
        v: T,
    ) -> Result<(), DriverError> {
        mem.write_obj(v, GuestAddress(addr))
            .map_err(|_| DriverError::Memory(addr))
    }

    fn read<T: vm_memory::ByteValued, M: GuestMemoryBackend>(
        mem: &M,
        addr: u64,
    ) -> Result<T, DriverError> {
        mem.read_obj(GuestAddress(addr))
            .map_err(|_| DriverError::Memory(addr))
    }

    fn store_u16_release<M: GuestMemoryBackend>(
        mem: &M,
        addr: u64,
        v: u16,
    ) -> Result<(), DriverError> {
        mem.store(v.to_le(), GuestAddress(addr), Ordering::Release)
            .map_err(|_| DriverError::Memory(addr))
    }

    fn load_u16_acquire<M: GuestMemoryBackend>(mem: &M, addr: u64) -> Result<u16, DriverError> {
        mem.load::<u16>(GuestAddress(addr), Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|_| DriverError::Memory(addr))
    }

    /// Makes a direct chain available and publishes it. Returns its ID (split: head index;
    /// packed: buffer ID).
    pub fn add_chain<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        bufs: &[DriverBuffer],
    ) -> Result<u16, DriverError> {
        if bufs.is_empty() {
            return Err(DriverError::EmptyChain);
        }
        match self.layout {
            RingLayout::Split => self.split_add(mem, bufs, None),
            RingLayout::Packed => self.packed_add(mem, bufs, None),
        }
    }

    /// Writes `bufs` as an indirect table at `table_addr` and makes one descriptor pointing
    /// to it available.
    pub fn add_indirect_chain<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        table_addr: u64,
        bufs: &[DriverBuffer],
    ) -> Result<u16, DriverError> {
        if bufs.is_empty() {
            return Err(DriverError::EmptyChain);
        }
        match self.layout {
            RingLayout::Split => self.split_add(mem, bufs, Some(table_addr)),
            RingLayout::Packed => self.packed_add(mem, bufs, Some(table_addr)),
        }
    }

    fn split_add<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        bufs: &[DriverBuffer],
        indirect: Option<u64>,
    ) -> Result<u16, DriverError> {
        let ring_descs = if indirect.is_some() { 1 } else { bufs.len() };
        if self.free_descs.len() < ring_descs {
            return Err(DriverError::RingFull(ring_descs));
        }
        let mut idxs = Vec::with_capacity(ring_descs);
        for _ in 0..ring_descs {
            idxs.extend(self.free_descs.pop());
        }
        if let Some(table) = indirect {
            for (i, b) in bufs.iter().enumerate() {
                let next = u16::try_from(i + 1).unwrap_or(0);
                let last = i + 1 == bufs.len();
                let d = SplitDescriptor {
                    addr: b.addr.to_le(),
                    len: b.len.to_le(),
                    flags: (if b.writable { VIRTQ_DESC_F_WRITE } else { 0 }
                        | if last { 0 } else { VIRTQ_DESC_F_NEXT })
                    .to_le(),
                    next: if last { 0 } else { next.to_le() },
                };
                Self::write(mem, table + 16 * i as u64, d)?;
            }
            let d = SplitDescriptor {
                addr: table.to_le(),
                len: (u32::try_from(bufs.len() * 16).unwrap_or(u32::MAX)).to_le(),
                flags: VIRTQ_DESC_F_INDIRECT.to_le(),
                next: 0,
            };
            Self::write(mem, self.desc_table + 16 * u64::from(idxs[0]), d)?;
        } else {
            for (i, b) in bufs.iter().enumerate() {
                let last = i + 1 == bufs.len();
                let d = SplitDescriptor {
                    addr: b.addr.to_le(),
                    len: b.len.to_le(),
                    flags: (if b.writable { VIRTQ_DESC_F_WRITE } else { 0 }
                        | if last { 0 } else { VIRTQ_DESC_F_NEXT })
                    .to_le(),
                    next: if last { 0 } else { idxs[i + 1].to_le() },
                };
                Self::write(mem, self.desc_table + 16 * u64::from(idxs[i]), d)?;
            }
        }
        let head = idxs[0];
        let slot = u64::from(self.avail_idx & (self.size - 1));
        Self::write(mem, self.driver_area + 4 + 2 * slot, head.to_le())?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // §2.7.13: ring entry and descriptors before idx, with release ordering.
        Self::store_u16_release(mem, self.driver_area + 2, self.avail_idx)?;
        self.descs_of_head[usize::from(head)] = idxs;
        Ok(head)
    }

    fn packed_add<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        bufs: &[DriverBuffer],
        indirect: Option<u64>,
    ) -> Result<u16, DriverError> {
        let slots = if indirect.is_some() { 1 } else { bufs.len() };
        if usize::from(self.free_slots) < slots {
            return Err(DriverError::RingFull(slots));
        }
        let id = self.free_ids.pop().ok_or(DriverError::RingFull(slots))?;
        let avail_flags = |wrap: bool| {
            if wrap {
                VIRTQ_DESC_F_AVAIL
            } else {
                VIRTQ_DESC_F_USED
            }
        };
        let head_slot = self.next_avail;
        let head_wrap = self.avail_wrap_counter;
        let mut head_flags = 0;
        let mut write_slot = |this: &mut Self, d: PackedDescriptor, flags: u16| {
            let addr = this.desc_table + 16 * u64::from(this.next_avail);
            let is_head = this.next_avail == head_slot && this.avail_wrap_counter == head_wrap;
            let res = if is_head {
                // Head flags are written last, below.
                head_flags = flags;
                Self::write(
                    mem,
                    addr,
                    PackedDescriptor { flags: 0, ..d }.with_flags_of(mem, addr),
                )
            } else {
                Self::write(
                    mem,
                    addr,
                    PackedDescriptor {
                        flags: flags.to_le(),
                        ..d
                    },
                )
            };
            this.next_avail += 1;
            if this.next_avail == this.size {
                this.next_avail = 0;
                this.avail_wrap_counter = !this.avail_wrap_counter;
            }
            res
        };
        if let Some(table) = indirect {
            for (i, b) in bufs.iter().enumerate() {
                let d = PackedDescriptor {
                    addr: b.addr.to_le(),
                    len: b.len.to_le(),
                    id: 0,
                    flags: (if b.writable { VIRTQ_DESC_F_WRITE } else { 0 }).to_le(),
                };
                Self::write(mem, table + 16 * i as u64, d)?;
            }
            let flags = VIRTQ_DESC_F_INDIRECT | avail_flags(self.avail_wrap_counter);
            let d = PackedDescriptor {
                addr: table.to_le(),
                len: (u32::try_from(bufs.len() * 16).unwrap_or(u32::MAX)).to_le(),
                id: id.to_le(),
                flags: 0,
            };
            write_slot(self, d, flags)?;
        } else {
            for (i, b) in bufs.iter().enumerate() {
                let last = i + 1 == bufs.len();
                let flags = avail_flags(self.avail_wrap_counter)
                    | if b.writable { VIRTQ_DESC_F_WRITE } else { 0 }
                    | if last { 0 } else { VIRTQ_DESC_F_NEXT };
                let d = PackedDescriptor {
                    addr: b.addr.to_le(),
                    len: b.len.to_le(),
                    id: id.to_le(),
                    flags: 0,
                };
                write_slot(self, d, flags)?;
            }
        }
        // §2.8.21: the head's flags last, with release ordering, so the device sees a
        // complete chain when it sees the head available.
        Self::store_u16_release(
            mem,
            self.desc_table + 16 * u64::from(head_slot) + 14,
            head_flags,
        )?;
        self.free_slots -= u16::try_from(slots).unwrap_or(0);
        self.added_since_kick = self
            .added_since_kick
            .saturating_add(u32::try_from(slots).unwrap_or(u32::MAX));
        self.slots_of_id[usize::from(id)] = u16::try_from(slots).unwrap_or(0);
        Ok(id)
    }

    /// Takes the next used buffer returned by the device: `(id, len)`.
    pub fn pop_used<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
    ) -> Result<Option<(u16, u32)>, DriverError> {
        match self.layout {
            RingLayout::Split => {
                let used_idx = Self::load_u16_acquire(mem, self.device_area + 2)?;
                if used_idx == self.last_used_idx {
                    return Ok(None);
                }
                let slot = u64::from(self.last_used_idx & (self.size - 1));
                let elem_addr = self.device_area + 4 + 8 * slot;
                let id = u32::from_le(Self::read::<u32, M>(mem, elem_addr)?);
                let len = u32::from_le(Self::read::<u32, M>(mem, elem_addr + 4)?);
                let head = u16::try_from(id).map_err(|_| DriverError::BadUsedId(id))?;
                let descs = self
                    .descs_of_head
                    .get_mut(usize::from(head))
                    .map(std::mem::take)
                    .filter(|d| !d.is_empty())
                    .ok_or(DriverError::BadUsedId(id))?;
                self.free_descs.extend(descs.into_iter().rev());
                self.last_used_idx = self.last_used_idx.wrapping_add(1);
                Ok(Some((head, len)))
            }
            RingLayout::Packed => {
                let addr = self.desc_table + 16 * u64::from(self.next_used);
                let flags = Self::load_u16_acquire(mem, addr + 14)?;
                let avail = flags & VIRTQ_DESC_F_AVAIL != 0;
                let used = flags & VIRTQ_DESC_F_USED != 0;
                if avail != used || used != self.used_wrap_counter {
                    return Ok(None);
                }
                let d: PackedDescriptor = Self::read(mem, addr)?;
                let id = u16::from_le(d.id);
                let slots = self
                    .slots_of_id
                    .get_mut(usize::from(id))
                    .map(std::mem::take)
                    .filter(|&s| s != 0)
                    .ok_or(DriverError::BadUsedId(u32::from(id)))?;
                self.free_ids.push(id);
                self.free_slots += slots;
                let next = u32::from(self.next_used) + u32::from(slots);
                if next >= u32::from(self.size) {
                    self.used_wrap_counter = !self.used_wrap_counter;
                }
                self.next_used = u16::try_from(next % u32::from(self.size)).unwrap_or(0);
                Ok(Some((id, u32::from_le(d.len))))
            }
        }
    }

    /// Whether the device asked to be notified of the chains added since the last kick
    /// (§2.7.10, §2.8.10). Records the kick.
    pub fn needs_kick<M: GuestMemoryBackend>(&mut self, mem: &M) -> Result<bool, DriverError> {
        fence(Ordering::SeqCst);
        match self.layout {
            RingLayout::Split => {
                let old = self.kicked_avail_idx;
                let new = self.avail_idx;
                self.kicked_avail_idx = new;
                if self.event_idx {
                    let avail_event: u16 = u16::from_le(Self::read(
                        mem,
                        self.device_area + 4 + 8 * u64::from(self.size),
                    )?);
                    Ok(vring_need_event(avail_event, new, old))
                } else {
                    let flags = u16::from_le(Self::read::<u16, M>(mem, self.device_area)?);
                    Ok(flags & VIRTQ_USED_F_NO_NOTIFY == 0)
                }
            }
            RingLayout::Packed => {
                let old = self.kicked_pos;
                let new = (self.next_avail, self.avail_wrap_counter);
                self.kicked_pos = new;
                let added = std::mem::take(&mut self.added_since_kick);
                if added == 0 {
                    return Ok(false);
                }
                let flags = u16::from_le(Self::read::<u16, M>(mem, self.device_area + 2)?) & 3;
                match flags {
                    RING_EVENT_FLAGS_DISABLE => Ok(false),
                    // A ring or more since the last decision: every slot was passed, so
                    // whatever slot the device asked for was made available. Positions
                    // alone (index and wrap counter) cannot tell a full ring from none,
                    // or two rings from one: a device that kept consuming meanwhile
                    // (polling) would otherwise wait for a kick that never comes.
                    RING_EVENT_FLAGS_DESC if self.event_idx && added >= u32::from(self.size) => {
                        Ok(true)
                    }
                    RING_EVENT_FLAGS_DESC if self.event_idx => {
                        let off_wrap = u16::from_le(Self::read::<u16, M>(mem, self.device_area)?);
                        Ok(crate::queue::desc_event_needs_notification(
                            self.size, off_wrap, new, old.0,
                        ))
                    }
                    _ => Ok(true),
                }
            }
        }
    }

    /// Asks the device to interrupt (split: `used_event` / clears NO_INTERRUPT; packed:
    /// driver event suppression) when the used position reaches `at` (EVENT_IDX), or on
    /// every used buffer (`at` None).
    pub fn enable_interrupts<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        at: Option<(u16, bool)>,
    ) -> Result<(), DriverError> {
        match self.layout {
            RingLayout::Split => {
                let used_event_addr = self.driver_area + 4 + 2 * u64::from(self.size);
                Self::write(
                    mem,
                    used_event_addr,
                    at.map_or(self.last_used_idx, |a| a.0).to_le(),
                )?;
                Self::write(mem, self.driver_area, 0u16)
            }
            RingLayout::Packed => match at {
                Some((off, wrap)) => {
                    Self::write(
                        mem,
                        self.driver_area,
                        (off | (u16::from(wrap) << 15)).to_le(),
                    )?;
                    Self::write(mem, self.driver_area + 2, RING_EVENT_FLAGS_DESC.to_le())
                }
                None => Self::write(mem, self.driver_area + 2, 0u16),
            },
        }
    }

    /// Asks the device not to interrupt.
    pub fn disable_interrupts<M: GuestMemoryBackend>(&self, mem: &M) -> Result<(), DriverError> {
        match self.layout {
            RingLayout::Split => {
                Self::write(mem, self.driver_area, VIRTQ_AVAIL_F_NO_INTERRUPT.to_le())
            }
            RingLayout::Packed => {
                Self::write(mem, self.driver_area + 2, RING_EVENT_FLAGS_DISABLE.to_le())
            }
        }
    }
}

trait WithFlagsOf {
    fn with_flags_of<M: GuestMemoryBackend>(self, mem: &M, addr: u64) -> Self;
}

impl WithFlagsOf for PackedDescriptor {
    /// Keeps the flags currently in memory, so that writing the body of a head descriptor
    /// does not change its availability before the release store of the new flags.
    fn with_flags_of<M: GuestMemoryBackend>(self, mem: &M, addr: u64) -> Self {
        let flags = mem.read_obj::<u16>(GuestAddress(addr + 14)).unwrap_or(0);
        PackedDescriptor { flags, ..self }
    }
}
