// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A small, independent reference parser of one descriptor chain (virtio 1.2 §2.7.5,
//! §2.7.5.3, §2.8.6, §2.8.19), written for clarity, not speed: it reads guest memory
//! through `vm-memory`'s `Bytes` interface and checks ranges against the decoded region
//! list, so it shares no code with virtio-core's parser. The harness compares what
//! virtio-core pops with what this model predicts.

use std::collections::HashSet;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::format::Region;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const F_AVAIL: u16 = 1 << 7;
const F_USED: u16 = 1 << 15;

/// The error kinds a chain walk can end in, one per chain-parsing [`virtio_core::Error`]
/// variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `AvailIndexOverrun`.
    AvailIndexOverrun,
    /// `HeadOutOfRange`.
    HeadOutOfRange,
    /// `NextOutOfRange`.
    NextOutOfRange,
    /// `ChainTooLong`.
    ChainTooLong,
    /// `ChainTooLarge`.
    ChainTooLarge,
    /// `ReadableAfterWritable`.
    ReadableAfterWritable,
    /// `IndirectWithNext`.
    IndirectWithNext,
    /// `NestedIndirect`.
    NestedIndirect,
    /// `IndirectNotNegotiated`.
    IndirectNotNegotiated,
    /// `InvalidIndirectLength`.
    InvalidIndirectLength,
    /// `BufferOutsideMemory`.
    BufferOutsideMemory,
    /// `BufferIdInUse`.
    BufferIdInUse,
    /// `HeadInUse`.
    HeadInUse,
    /// `TooManyInFlight`.
    TooManyInFlight,
}

impl Kind {
    /// The kind of a chain-parsing error; `None` for errors `pop` must never return
    /// (configuration errors, `NotInFlight`, `Broken`, ...).
    pub fn of(e: &virtio_core::Error) -> Option<Kind> {
        use virtio_core::Error as E;
        Some(match e {
            E::AvailIndexOverrun { .. } => Kind::AvailIndexOverrun,
            E::HeadOutOfRange { .. } => Kind::HeadOutOfRange,
            E::NextOutOfRange { .. } => Kind::NextOutOfRange,
            E::ChainTooLong { .. } => Kind::ChainTooLong,
            E::ChainTooLarge => Kind::ChainTooLarge,
            E::ReadableAfterWritable { .. } => Kind::ReadableAfterWritable,
            E::IndirectWithNext => Kind::IndirectWithNext,
            E::NestedIndirect => Kind::NestedIndirect,
            E::IndirectNotNegotiated => Kind::IndirectNotNegotiated,
            E::InvalidIndirectLength(_) => Kind::InvalidIndirectLength,
            E::BufferOutsideMemory { .. } => Kind::BufferOutsideMemory,
            E::BufferIdInUse(_) => Kind::BufferIdInUse,
            E::HeadInUse(_) => Kind::HeadInUse,
            E::TooManyInFlight(_) => Kind::TooManyInFlight,
            _ => return None,
        })
    }
}

/// A chain as the model parses it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    /// Split: head index; packed: buffer ID.
    pub id: u16,
    /// Split: descriptors walked in the table; packed: ring slots.
    pub ring_slots: u16,
    /// Buffers counted (indirect entries included, indirect pointers not).
    pub desc_count: u32,
    /// Non-empty buffers split at region boundaries: (guest address, length, writable).
    pub pieces: Vec<(u64, u32, bool)>,
    /// Sum of readable lengths.
    pub readable_len: u64,
    /// Sum of writable lengths.
    pub writable_len: u64,
}

/// What the model expects a pop to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Nothing available.
    Nothing,
    /// A chain.
    Chain(Chain),
    /// A chain-parsing error.
    Error(Kind),
}

/// The model's view of guest memory.
pub struct Model<'a> {
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap<()>,
    /// Its regions.
    pub regions: &'a [Region],
    /// Queue size.
    pub size: u16,
    /// Descriptor area.
    pub desc_table: u64,
    /// Driver area.
    pub driver_area: u64,
    /// VIRTIO_F_INDIRECT_DESC.
    pub indirect_desc: bool,
}

struct Walk<'m, 'a> {
    model: &'m Model<'a>,
    chain: Chain,
    seen_writable: bool,
    total: u64,
}

impl Walk<'_, '_> {
    fn push(&mut self, addr: u64, len: u32, writable: bool) -> Result<(), Kind> {
        // §2.7.4.2 / §2.8.6: every device-writable buffer after every readable one.
        if writable {
            self.seen_writable = true;
        } else if self.seen_writable {
            return Err(Kind::ReadableAfterWritable);
        }
        self.total += u64::from(len);
        if self.total > u64::from(u32::MAX) {
            return Err(Kind::ChainTooLarge);
        }
        if len == 0 {
            return Ok(());
        }
        let pieces = self
            .model
            .pieces(addr, u64::from(len))
            .ok_or(Kind::BufferOutsideMemory)?;
        for (a, l) in pieces {
            self.chain
                .pieces
                .push((a, u32::try_from(l).unwrap_or(u32::MAX), writable));
        }
        if writable {
            self.chain.writable_len += u64::from(len);
        } else {
            self.chain.readable_len += u64::from(len);
        }
        Ok(())
    }

    fn count(&mut self, max: u32) -> Result<(), Kind> {
        self.chain.desc_count += 1;
        if self.chain.desc_count > max {
            return Err(Kind::ChainTooLong);
        }
        Ok(())
    }
}

/// (addr, len, u16 at byte 12, u16 at byte 14) of a raw descriptor.
fn decode(raw: [u8; 16]) -> (u64, u32, u16, u16) {
    let mut a = [0u8; 8];
    a.copy_from_slice(&raw[..8]);
    (
        u64::from_le_bytes(a),
        u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]),
        u16::from_le_bytes([raw[12], raw[13]]),
        u16::from_le_bytes([raw[14], raw[15]]),
    )
}

impl Model<'_> {
    /// Splits `addr..addr + len` at region boundaries; `None` if any byte is outside
    /// guest memory or the range overflows.
    pub fn pieces(&self, addr: u64, len: u64) -> Option<Vec<(u64, u64)>> {
        let end = addr.checked_add(len)?;
        let mut out = Vec::new();
        let mut cur = addr;
        while cur < end {
            let r = self.regions.iter().find(|r| r.contains(cur))?;
            let piece_end = end.min(r.end());
            out.push((cur, piece_end - cur));
            cur = piece_end;
        }
        Some(out)
    }

    fn read16(&self, addr: u64) -> [u8; 16] {
        let mut raw = [0u8; 16];
        // The caller checked the range is guest memory (possibly across adjacent regions).
        self.mem
            .read_slice(&mut raw, GuestAddress(addr))
            .expect("model reads only checked guest memory");
        raw
    }

    fn read_u16(&self, addr: u64) -> u16 {
        let v: u16 = self
            .mem
            .read_obj(GuestAddress(addr))
            .expect("ring areas were checked by Queue::new");
        u16::from_le(v)
    }

    fn indirect_table(&self, addr: u64, len: u32) -> Result<u32, Kind> {
        if len == 0 || !len.is_multiple_of(16) || len / 16 > u32::from(u16::MAX) {
            return Err(Kind::InvalidIndirectLength);
        }
        if self.pieces(addr, u64::from(len)).is_none() {
            return Err(Kind::BufferOutsideMemory);
        }
        Ok(len / 16)
    }

    /// What popping the split ring at free-running avail position `next_avail` should do.
    /// Also returns whether, by the avail idx currently in memory, something is available
    /// (`None`: the avail idx is more than a queue size ahead).
    ///
    /// `known_in_flight` are the heads popped and not used since the ring state was last
    /// set; `in_flight` counts those plus the chains a restored state left in flight.
    pub fn split(
        &self,
        next_avail: u16,
        known_in_flight: &HashSet<u16>,
        in_flight: u32,
    ) -> (Option<bool>, Expect) {
        let size = self.size;
        let avail_idx = self.read_u16(self.driver_area + 2);
        let ahead = avail_idx.wrapping_sub(next_avail);
        let available = if ahead > size { None } else { Some(ahead != 0) };
        let slot = u64::from(next_avail & (size - 1));
        let head = self.read_u16(self.driver_area + 4 + 2 * slot);
        let expect = if head >= size {
            Expect::Error(Kind::HeadOutOfRange)
        } else if in_flight >= u32::from(size) {
            // The ring holds at most `size` buffers.
            Expect::Error(Kind::TooManyInFlight)
        } else if known_in_flight.contains(&head) {
            Expect::Error(Kind::HeadInUse)
        } else {
            self.split_chain(head)
        };
        (available, expect)
    }

    fn split_chain(&self, head: u16) -> Expect {
        let size = self.size;
        if head >= size {
            return Expect::Error(Kind::HeadOutOfRange);
        }
        let mut w = Walk {
            model: self,
            chain: Chain::default(),
            seen_writable: false,
            total: 0,
        };
        let mut index = head;
        let mut walked: u16 = 0;
        let r: Result<(), Kind> = (|| loop {
            if walked == size {
                return Err(Kind::ChainTooLong);
            }
            walked += 1;
            let (addr, len, flags, next) =
                decode(self.read16(self.desc_table + 16 * u64::from(index)));
            if flags & F_INDIRECT != 0 {
                if flags & F_NEXT != 0 {
                    return Err(Kind::IndirectWithNext);
                }
                if !self.indirect_desc {
                    return Err(Kind::IndirectNotNegotiated);
                }
                let entries = self.indirect_table(addr, len)?;
                let mut i: u32 = 0;
                let mut seen: u32 = 0;
                loop {
                    if seen == entries {
                        return Err(Kind::ChainTooLong);
                    }
                    seen += 1;
                    let (baddr, blen, bflags, bnext) =
                        decode(self.read16(addr + 16 * u64::from(i)));
                    if bflags & F_INDIRECT != 0 {
                        return Err(Kind::NestedIndirect);
                    }
                    w.count(u32::MAX)?;
                    w.push(baddr, blen, bflags & F_WRITE != 0)?;
                    if bflags & F_NEXT == 0 {
                        return Ok(());
                    }
                    if u32::from(bnext) >= entries {
                        return Err(Kind::NextOutOfRange);
                    }
                    i = u32::from(bnext);
                }
            }
            w.count(u32::from(size))?;
            w.push(addr, len, flags & F_WRITE != 0)?;
            if flags & F_NEXT == 0 {
                return Ok(());
            }
            if next >= size {
                return Err(Kind::NextOutOfRange);
            }
            index = next;
        })();
        match r {
            Ok(()) => {
                w.chain.id = head;
                w.chain.ring_slots = walked;
                Expect::Chain(w.chain)
            }
            Err(k) => Expect::Error(k),
        }
    }

    /// True if packed descriptor flags mean "available" for driver wrap counter `wrap`.
    pub fn packed_available(flags: u16, wrap: bool) -> bool {
        (flags & F_AVAIL != 0) == wrap && (flags & F_USED != 0) != wrap
    }

    /// What popping the packed ring at slot `next_avail` with avail wrap counter `wrap`
    /// should do, given the buffer IDs in flight.
    pub fn packed(&self, next_avail: u16, wrap: bool, in_flight: &HashSet<u16>) -> Expect {
        let size = self.size;
        let head_flags = self.read_u16(self.desc_table + 16 * u64::from(next_avail) + 14);
        if !Self::packed_available(head_flags, wrap) {
            return Expect::Nothing;
        }
        if in_flight.len() >= usize::from(size) {
            // Each buffer takes at least one slot: the ring holds at most `size`.
            return Expect::Error(Kind::TooManyInFlight);
        }
        let mut w = Walk {
            model: self,
            chain: Chain::default(),
            seen_writable: false,
            total: 0,
        };
        let mut slot = next_avail;
        let mut slots: u16 = 0;
        let r: Result<u16, Kind> = (|| loop {
            if slots == size {
                return Err(Kind::ChainTooLong);
            }
            slots += 1;
            let (addr, len, id, flags) =
                decode(self.read16(self.desc_table + 16 * u64::from(slot)));
            slot = if slot + 1 == size { 0 } else { slot + 1 };
            if flags & F_INDIRECT != 0 {
                if flags & F_NEXT != 0 {
                    return Err(Kind::IndirectWithNext);
                }
                if !self.indirect_desc {
                    return Err(Kind::IndirectNotNegotiated);
                }
                let entries = self.indirect_table(addr, len)?;
                // §2.8.19: entries in order; NEXT and `id` are ignored inside the table.
                for i in 0..entries {
                    let (baddr, blen, _, bflags) = decode(self.read16(addr + 16 * u64::from(i)));
                    if bflags & F_INDIRECT != 0 {
                        return Err(Kind::NestedIndirect);
                    }
                    w.count(u32::MAX)?;
                    w.push(baddr, blen, bflags & F_WRITE != 0)?;
                }
                return Ok(id);
            }
            w.count(u32::from(size))?;
            w.push(addr, len, flags & F_WRITE != 0)?;
            if flags & F_NEXT == 0 {
                // §2.8.6: the buffer ID is in the chain's last descriptor.
                return Ok(id);
            }
        })();
        match r {
            Ok(id) if in_flight.contains(&id) => Expect::Error(Kind::BufferIdInUse),
            Ok(id) => {
                w.chain.id = id;
                w.chain.ring_slots = slots;
                Expect::Chain(w.chain)
            }
            Err(k) => Expect::Error(k),
        }
    }
}
