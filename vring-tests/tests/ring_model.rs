// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Model-based property tests of virtio-core's device-side `Queue`, split and packed.
//!
//! The driver is written here with raw guest memory writes (independent of
//! `virtio_core::driver`), the device is the real `Queue`, and the model is a handful of
//! absolute counters (chains or ring slots made available, popped and used, as `u64`s
//! that never wrap). Each invariant of the issue is one or more separately named tests:
//!
//! - (1) ring position == absolute counter mod 2·size (packed: (index, wrap counter);
//!   split: the free-running u16 index), across many wraps, including an exact full-ring
//!   advance: `*_position_tracks_absolute_counter`, `*_exact_full_ring_advance*`,
//!   `split_index_wraps_past_u16_max`;
//! - (2) a zeroed ring exposes no buffers: `zeroed_*`;
//! - (3) chain errors are never silent, no chain exceeds the queue size:
//!   `packed_malformed_chains_are_typed_errors`, `random_*_rings_match_spec_model`;
//! - (4) a packed chain wrapping past the ring end: `packed_chain_wrapping_ring_end_*`;
//! - (5) used elements: `used_elements_carry_id_len_and_flags`, `*add_used_rejects*`;
//! - (9) `split_avail_index_overrun_is_rejected`, `split_avail_index_exactly_size_ahead_*`;
//! - (11) `*vring_base_roundtrips*`, `invalid_vring_base_*`, `restored_queue_continues`,
//!   `split_restore_with_chains_in_flight_continues`;
//! - (12) `writer_stays_inside_writable_buffers`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use proptest::prelude::*;
use virtio_core::{Error, GuestMemoryView, Queue, QueueConfig, RingLayout, Segment};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const F_AVAIL: u16 = 1 << 7;
const F_USED: u16 = 1 << 15;

/// Two adjacent 4 MiB regions: a buffer may cross `REGION` (virtio-core then reports two
/// segments). Nothing is mapped at or above `MEM_END`.
const REGION: u64 = 0x40_0000;
const MEM_END: u64 = 2 * REGION;
/// Rings (up to ~0xd2000 for a split ring of 32768).
const RING: u64 = 0x1000;
/// Indirect tables, 0x100 bytes (16 entries) each.
const TABLES: u64 = 0x10_0000;
/// Buffers.
const BUFS: u64 = 0x20_0000;
/// An ID written in packed descriptors other than a chain's last (the device must take
/// the ID from the last one, §2.8.6).
const JUNK_ID: u16 = 0xbeef;

fn memory() -> Mem {
    Mem::from_ranges(&[
        (GuestAddress(0), REGION as usize),
        (GuestAddress(REGION), REGION as usize),
    ])
    .unwrap()
}

fn view(mem: &Mem) -> Arc<GuestMemoryView> {
    Arc::new(GuestMemoryView::new(Arc::new(mem.clone())).unwrap())
}

/// Where the rings of a queue are.
#[derive(Clone, Copy, Debug)]
struct Rings {
    layout: RingLayout,
    size: u16,
    desc: u64,
    driver: u64,
    device: u64,
}

impl Rings {
    fn new(layout: RingLayout, size: u16) -> Self {
        let desc = RING;
        let driver = desc + 16 * u64::from(size);
        let device = match layout {
            RingLayout::Split => (driver + 6 + 2 * u64::from(size)).div_ceil(4) * 4,
            RingLayout::Packed => driver + 4,
        };
        Rings {
            layout,
            size,
            desc,
            driver,
            device,
        }
    }

    fn config(&self, event_idx: bool, indirect_desc: bool) -> QueueConfig {
        QueueConfig {
            layout: self.layout,
            size: self.size,
            desc_table: self.desc,
            driver_area: self.driver,
            device_area: self.device,
            event_idx,
            indirect_desc,
        }
    }

    /// Bytes from `desc` to the end of the device area.
    fn footprint(&self) -> u64 {
        match self.layout {
            RingLayout::Split => self.device + 6 + 8 * u64::from(self.size) - self.desc,
            RingLayout::Packed => self.device + 4 - self.desc,
        }
    }

    fn split_avail_idx_addr(&self) -> u64 {
        self.driver + 2
    }

    fn split_used_idx_addr(&self) -> u64 {
        self.device + 2
    }
}

/// (slot, wrap counter) of an absolute packed ring position (both counters start at 1).
fn packed_pos(abs: u64, size: u16) -> (u16, bool) {
    let size = u64::from(size);
    ((abs % size) as u16, (abs / size) % 2 == 0)
}

/// The vhost-user packed ring base encoding.
fn packed_base(avail: (u16, bool), used: (u16, bool)) -> u32 {
    u32::from(avail.0)
        | (u32::from(avail.1) << 15)
        | (u32::from(used.0) << 16)
        | (u32::from(used.1) << 31)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Buf {
    addr: u64,
    len: u32,
    writable: bool,
}

/// Buffers as virtio-core reports them: no zero-length ones, one segment per region.
fn normalise(bufs: &[Buf]) -> Vec<Segment> {
    let mut out = Vec::new();
    for b in bufs.iter().filter(|b| b.len > 0) {
        let end = b.addr + u64::from(b.len);
        let mut addr = b.addr;
        while addr < end {
            let piece_end = if addr < REGION { end.min(REGION) } else { end };
            out.push(Segment {
                guest_addr: addr,
                len: (piece_end - addr) as u32,
                writable: b.writable,
            });
            addr = piece_end;
        }
    }
    out
}

fn wr_desc(mem: &Mem, addr: u64, a: u64, len: u32, x: u16, y: u16) {
    mem.write_obj(a.to_le(), GuestAddress(addr)).unwrap();
    mem.write_obj(len.to_le(), GuestAddress(addr + 8)).unwrap();
    mem.write_obj(x.to_le(), GuestAddress(addr + 12)).unwrap();
    mem.write_obj(y.to_le(), GuestAddress(addr + 14)).unwrap();
}

fn store_u16_release(mem: &Mem, addr: u64, v: u16) {
    mem.store(v.to_le(), GuestAddress(addr), Ordering::Release)
        .unwrap();
}

fn rd_u16(mem: &Mem, addr: u64) -> u16 {
    u16::from_le(mem.read_obj(GuestAddress(addr)).unwrap())
}

fn rd_u32(mem: &Mem, addr: u64) -> u32 {
    u32::from_le(mem.read_obj(GuestAddress(addr)).unwrap())
}

/// Packed AVAIL/USED bits that make a descriptor available in lap `wrap` (§2.8.1).
fn avail_bits(wrap: bool) -> u16 {
    if wrap {
        F_AVAIL
    } else {
        F_USED
    }
}

/// A driver written from the spec with raw guest memory accesses.
struct Driver {
    r: Rings,
    // Split.
    avail_idx: u16,
    free_descs: Vec<u16>,
    descs_of: Vec<Vec<u16>>,
    // Packed: absolute slot position, free slots and IDs.
    pos: u64,
    free_slots: u64,
    free_ids: Vec<u16>,
    slots_of: Vec<u16>,
}

impl Driver {
    /// A driver whose next chain goes at `start` (split: avail idx; packed: absolute slot).
    fn new(r: Rings, start: u64) -> Self {
        Driver {
            r,
            avail_idx: start as u16,
            free_descs: (0..r.size).rev().collect(),
            descs_of: vec![Vec::new(); usize::from(r.size)],
            pos: start,
            free_slots: u64::from(r.size),
            free_ids: (0..r.size).rev().collect(),
            slots_of: vec![0; usize::from(r.size)],
        }
    }

    fn table_addr(id: u16) -> u64 {
        TABLES + 0x100 * u64::from(id % 1024)
    }

    /// Makes a chain available; None if there is no room. Returns (id, ring slots).
    fn add(&mut self, mem: &Mem, bufs: &[Buf], indirect: bool) -> Option<(u16, u16)> {
        assert!(!bufs.is_empty() && (!indirect || bufs.len() <= 16));
        match self.r.layout {
            RingLayout::Split => self.split_add(mem, bufs, indirect),
            RingLayout::Packed => self.packed_add(mem, bufs, indirect),
        }
    }

    fn write_table(mem: &Mem, table: u64, bufs: &[Buf], split: bool) {
        for (i, b) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let mut flags = if b.writable { F_WRITE } else { 0 };
            if split && !last {
                flags |= F_NEXT;
            }
            let (x, y) = if split {
                (flags, if last { 0 } else { i as u16 + 1 })
            } else {
                (JUNK_ID, flags)
            };
            wr_desc(mem, table + 16 * i as u64, b.addr, b.len, x, y);
        }
    }

    fn split_add(&mut self, mem: &Mem, bufs: &[Buf], indirect: bool) -> Option<(u16, u16)> {
        let n = if indirect { 1 } else { bufs.len() };
        if self.free_descs.len() < n {
            return None;
        }
        let idx: Vec<u16> = (0..n).filter_map(|_| self.free_descs.pop()).collect();
        let head = idx[0];
        if indirect {
            let table = Self::table_addr(head);
            Self::write_table(mem, table, bufs, true);
            let d = self.r.desc + 16 * u64::from(head);
            wr_desc(mem, d, table, 16 * bufs.len() as u32, F_INDIRECT, 0);
        } else {
            for (i, b) in bufs.iter().enumerate() {
                let last = i + 1 == n;
                let flags = if b.writable { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
                let next = if last { 0 } else { idx[i + 1] };
                let d = self.r.desc + 16 * u64::from(idx[i]);
                wr_desc(mem, d, b.addr, b.len, flags, next);
            }
        }
        let slot = u64::from(self.avail_idx % self.r.size);
        mem.write_obj(head.to_le(), GuestAddress(self.r.driver + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        store_u16_release(mem, self.r.split_avail_idx_addr(), self.avail_idx);
        self.descs_of[usize::from(head)] = idx;
        Some((head, n as u16))
    }

    fn packed_add(&mut self, mem: &Mem, bufs: &[Buf], indirect: bool) -> Option<(u16, u16)> {
        let n = if indirect { 1 } else { bufs.len() };
        if self.free_slots < n as u64 {
            return None;
        }
        let id = self.free_ids.pop()?;
        let descs: Vec<(u64, u32, u16)> = if indirect {
            let table = Self::table_addr(id);
            Self::write_table(mem, table, bufs, false);
            vec![(table, 16 * bufs.len() as u32, F_INDIRECT)]
        } else {
            bufs.iter()
                .enumerate()
                .map(|(i, b)| {
                    let f =
                        if b.writable { F_WRITE } else { 0 } | if i + 1 < n { F_NEXT } else { 0 };
                    (b.addr, b.len, f)
                })
                .collect()
        };
        write_packed_descs(mem, &self.r, self.pos, &descs, id);
        self.pos += n as u64;
        self.free_slots -= n as u64;
        self.slots_of[usize::from(id)] = n as u16;
        Some((id, n as u16))
    }

    /// The device returned `id`: its descriptors / slots are free again.
    fn complete(&mut self, id: u16) {
        match self.r.layout {
            RingLayout::Split => {
                let d = std::mem::take(&mut self.descs_of[usize::from(id)]);
                assert!(!d.is_empty());
                self.free_descs.extend(d);
            }
            RingLayout::Packed => {
                let s = std::mem::take(&mut self.slots_of[usize::from(id)]);
                assert!(s > 0);
                self.free_slots += u64::from(s);
                self.free_ids.push(id);
            }
        }
    }
}

/// Writes packed descriptors `(addr, len, flags without AVAIL/USED)` at consecutive slots
/// from absolute position `start` (flipping the wrap counter at the ring end), the buffer
/// ID in the last one, the head's flags last with a release store (§2.8.21).
fn write_packed_descs(mem: &Mem, r: &Rings, start: u64, descs: &[(u64, u32, u16)], id: u16) {
    let mut head_flags = 0;
    for (i, &(a, len, f)) in descs.iter().enumerate() {
        let (slot, wrap) = packed_pos(start + i as u64, r.size);
        let addr = r.desc + 16 * u64::from(slot);
        let flags = f | avail_bits(wrap);
        let this_id = if i + 1 == descs.len() { id } else { JUNK_ID };
        if i == 0 {
            head_flags = flags;
            // Keep the old flags until the release store below.
            let old = rd_u16(mem, addr + 14);
            wr_desc(mem, addr, a, len, this_id, old);
        } else {
            wr_desc(mem, addr, a, len, this_id, flags);
        }
    }
    let (slot, _) = packed_pos(start, r.size);
    store_u16_release(mem, r.desc + 16 * u64::from(slot) + 14, head_flags);
}

/// Simple buffers for chain `k` (the contents do not matter for ring state).
fn bufs_for(k: u64, n: usize, writable_from: usize) -> Vec<Buf> {
    (0..n)
        .map(|i| Buf {
            addr: BUFS + ((k * 8 + i as u64) % 0x1000) * 0x40,
            len: 0x20 + i as u32,
            writable: i >= writable_from,
        })
        .collect()
}

#[derive(Clone, Debug)]
enum Op {
    /// Make a chain of `n` buffers available (indirect: one ring slot).
    Add {
        n: usize,
        indirect: bool,
        writable_from: usize,
    },
    /// Device pops one chain (or finds none).
    Pop,
    /// Device returns up to `count` in-flight chains in one batch, in FIFO (0), reverse
    /// (1) or interleaved (2) order, with lengths derived from `len_seed`.
    Complete {
        count: usize,
        order: u8,
        len_seed: u32,
    },
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..=4, any::<bool>(), 0usize..=4).prop_map(|(n, indirect, writable_from)| {
            Op::Add {
                n,
                indirect,
                writable_from,
            }
        }),
        4 => Just(Op::Pop),
        3 => (1usize..=5, 0u8..3, any::<u32>()).prop_map(|(count, order, len_seed)| {
            Op::Complete {
                count,
                order,
                len_seed,
            }
        }),
    ]
}

/// Driver, device and model of one queue.
struct Harness {
    mem: Mem,
    r: Rings,
    driver: Driver,
    queue: Queue,
    /// Made available, not popped: (id, buffers, ring slots).
    pending: VecDeque<(u16, Vec<Buf>, u16)>,
    /// Popped, not used: (id, ring slots, writable length).
    in_flight: Vec<(u16, u16, u32)>,
    /// Absolute counters. Packed: ring slots; split: chains (== ring indexes).
    avail: u64,
    popped: u64,
    used: u64,
    /// Chains popped and used (for `in_flight`).
    popped_chains: u64,
    used_chains: u64,
    chains_added: u64,
}

impl Harness {
    /// A queue whose positions all start at `start` (split: u16 index; packed: absolute
    /// slot position, < 2·size).
    fn new(layout: RingLayout, size: u16, start: u64, event_idx: bool) -> Self {
        let mem = memory();
        let r = Rings::new(layout, size);
        let mut queue = Queue::new(r.config(event_idx, true), view(&mem)).unwrap();
        match layout {
            RingLayout::Split => {
                store_u16_release(&mem, r.split_avail_idx_addr(), start as u16);
                store_u16_release(&mem, r.split_used_idx_addr(), start as u16);
                queue.set_vring_base(u32::from(start as u16)).unwrap();
            }
            RingLayout::Packed => {
                let p = packed_pos(start, size);
                queue.set_vring_base(packed_base(p, p)).unwrap();
            }
        }
        let h = Harness {
            driver: Driver::new(r, start),
            mem,
            r,
            queue,
            pending: VecDeque::new(),
            in_flight: Vec::new(),
            avail: start,
            popped: start,
            used: start,
            popped_chains: 0,
            used_chains: 0,
            chains_added: 0,
        };
        h.check_positions();
        h
    }

    fn size(&self) -> u64 {
        u64::from(self.r.size)
    }

    fn add(&mut self, bufs: &[Buf], indirect: bool) -> Option<u16> {
        let (id, slots) = self.driver.add(&self.mem, bufs, indirect)?;
        self.pending.push_back((id, bufs.to_vec(), slots));
        self.avail += match self.r.layout {
            RingLayout::Split => 1,
            RingLayout::Packed => u64::from(slots),
        };
        self.chains_added += 1;
        Some(id)
    }

    /// Pops one chain and checks it against the model.
    fn pop(&mut self) -> bool {
        let got = self.queue.pop().unwrap();
        let Some((id, bufs, slots)) = self.pending.pop_front() else {
            assert!(
                got.is_none(),
                "device popped a chain that was never made available"
            );
            return false;
        };
        let chain = got.expect("a chain was made available but the device saw none");
        assert_eq!(chain.id(), id);
        assert_eq!(chain.segments().collect::<Vec<_>>(), normalise(&bufs));
        assert_eq!(chain.ring_slots(), slots);
        assert!(
            chain.ring_slots() <= self.r.size,
            "chain longer than the queue"
        );
        self.in_flight.push((id, slots, chain.writable_len()));
        self.popped += match self.r.layout {
            RingLayout::Split => 1,
            RingLayout::Packed => u64::from(slots),
        };
        self.popped_chains += 1;
        true
    }

    /// Returns up to `count` in-flight chains in one batch and checks the used ring.
    fn complete(&mut self, count: usize, order: u8, len_seed: u32) {
        let count = count.min(self.in_flight.len());
        if count == 0 {
            return;
        }
        let mut batch: Vec<(u16, u16, u32)> = match order {
            0 => self.in_flight.drain(..count).collect(),
            1 => {
                let mut b: Vec<_> = self.in_flight.drain(..count).collect();
                b.reverse();
                b
            }
            _ => {
                let mut b = Vec::new();
                for k in 0..count {
                    let i = if k % 2 == 0 {
                        self.in_flight.len() - 1
                    } else {
                        0
                    };
                    b.push(self.in_flight.remove(i));
                }
                b
            }
        };
        // Lengths: 0 sometimes (packed: no WRITE flag), up to the writable length.
        for (k, e) in batch.iter_mut().enumerate() {
            let s = len_seed.rotate_left(k as u32 * 7);
            e.2 = if s % 3 == 0 { 0 } else { s % (e.2 + 1) };
        }
        let used: Vec<(u16, u32)> = batch.iter().map(|&(id, _, len)| (id, len)).collect();
        self.queue.add_used_batch(&used).unwrap();
        // (5) The used ring carries the right id, length (and flags), in order.
        let mut at = self.used;
        for &(id, slots, len) in &batch {
            match self.r.layout {
                RingLayout::Split => {
                    let e = self.r.device + 4 + 8 * (at % self.size());
                    assert_eq!(rd_u32(&self.mem, e), u32::from(id), "used id");
                    assert_eq!(rd_u32(&self.mem, e + 4), len, "used len");
                    at += 1;
                }
                RingLayout::Packed => {
                    let (slot, wrap) = packed_pos(at, self.r.size);
                    let d = self.r.desc + 16 * u64::from(slot);
                    assert_eq!(rd_u16(&self.mem, d + 12), id, "used id");
                    assert_eq!(rd_u32(&self.mem, d + 8), len, "used len");
                    let flags = rd_u16(&self.mem, d + 14);
                    let expect =
                        if wrap { F_AVAIL | F_USED } else { 0 } | if len > 0 { F_WRITE } else { 0 };
                    assert_eq!(flags, expect, "used flags at slot {slot} (wrap {wrap})");
                    at += u64::from(slots);
                }
            }
            self.driver.complete(id);
            self.used_chains += 1;
        }
        if self.r.layout == RingLayout::Split {
            assert_eq!(
                rd_u16(&self.mem, self.r.split_used_idx_addr()),
                at as u16,
                "used idx"
            );
        }
        self.used = at;
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Add {
                n,
                indirect,
                writable_from,
            } => {
                let bufs = bufs_for(self.chains_added, n, writable_from);
                self.add(&bufs, indirect);
            }
            Op::Pop => {
                self.pop();
            }
            Op::Complete {
                count,
                order,
                len_seed,
            } => self.complete(count, order, len_seed),
        }
        self.check_positions();
    }

    /// (1) and (5): device positions against the absolute counters.
    fn check_positions(&self) {
        let q = &self.queue;
        // Model invariants: used <= popped <= avail, avail - used <= size.
        assert!(self.used <= self.popped && self.popped <= self.avail);
        assert!(self.avail - self.used <= self.size());
        assert_eq!(
            u64::from(q.in_flight()),
            self.popped_chains - self.used_chains
        );
        match self.r.layout {
            RingLayout::Split => {
                assert_eq!(q.next_avail(), self.popped as u16, "split next_avail");
                assert_eq!(q.next_used(), self.used as u16, "split next_used");
                assert_eq!(q.vring_base(), u32::from(self.popped as u16));
            }
            RingLayout::Packed => {
                let a = packed_pos(self.popped, self.r.size);
                let u = packed_pos(self.used, self.r.size);
                assert_eq!((q.next_avail(), q.avail_wrap_counter()), a, "packed avail");
                assert_eq!((q.next_used(), q.used_wrap_counter()), u, "packed used");
                assert_eq!(q.vring_base(), packed_base(a, u));
            }
        }
    }

    /// Pops and returns everything: no chain left in flight or pending.
    fn drain(&mut self) {
        while self.pop() {}
        let n = self.in_flight.len();
        self.complete(n, 0, 7);
        self.check_positions();
    }
}

fn packed_size() -> impl Strategy<Value = u16> {
    prop_oneof![
        Just(1u16),
        Just(3),
        Just(255),
        Just(1000),
        Just(32768),
        1u16..=17,
    ]
}

fn split_size() -> impl Strategy<Value = u16> {
    prop_oneof![
        Just(1u16),
        Just(2),
        Just(32768),
        (0u32..=6).prop_map(|l| 1u16 << l)
    ]
}

/// A packed start position: anywhere, or a few slots before the end of either lap.
fn packed_start(size: u16) -> impl Strategy<Value = u64> {
    let s = u64::from(size);
    prop_oneof![
        0..2 * s,
        (1..=s.min(8)).prop_map(move |k| s - k),
        (1..=s.min(8)).prop_map(move |k| 2 * s - k),
    ]
}

fn split_start() -> impl Strategy<Value = u64> {
    prop_oneof![any::<u16>(), 0xffe0u16..=0xffff].prop_map(u64::from)
}

// ---------------------------------------------------------------------------------------
// (1) Ring positions equal absolute counters.
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// (1) Packed (next_avail, avail wrap) and (next_used, used wrap) equal the absolute
    /// slot counters mod 2·size after every operation, across many wraps.
    #[test]
    fn packed_position_tracks_absolute_counter(
        (size, start) in packed_size().prop_flat_map(|s| (Just(s), packed_start(s))),
        ops in proptest::collection::vec(arb_op(), 1..160),
    ) {
        let mut h = Harness::new(RingLayout::Packed, size, start, false);
        for op in &ops {
            h.apply(op);
        }
        h.drain();
    }

    /// (1) Split next_avail / next_used equal the absolute counters mod 2^16, including
    /// across the u16 wrap of the free-running indexes.
    #[test]
    fn split_position_tracks_absolute_counter(
        size in split_size(),
        start in split_start(),
        ops in proptest::collection::vec(arb_op(), 1..160),
    ) {
        let mut h = Harness::new(RingLayout::Split, size, start, false);
        for op in &ops {
            h.apply(op);
        }
        h.drain();
    }
}

/// (1) Fill the whole packed ring with one chain of `size` descriptors, pop it (the avail
/// position comes back to the same slot with the wrap counter flipped), return it (same
/// for the used position), then the ring is usable again.
#[test]
fn packed_exact_full_ring_advance_one_chain() {
    for size in [1u16, 3, 255, 1000, 32768] {
        for start in [
            0,
            u64::from(size) / 2,
            u64::from(size) + u64::from(size) / 3,
        ] {
            let mut h = Harness::new(RingLayout::Packed, size, start, false);
            let bufs = bufs_for(1, usize::from(size), usize::from(size) / 2);
            h.add(&bufs, false).unwrap();
            assert!(h.pop());
            assert_eq!(h.queue.next_avail(), packed_pos(start, size).0);
            assert_ne!(
                h.queue.avail_wrap_counter(),
                packed_pos(start, size).1,
                "size {size}: a full lap flips the wrap counter"
            );
            h.complete(1, 0, 1);
            h.check_positions();
            assert!(h.add(&bufs_for(2, 1, 0), false).is_some());
            h.drain();
        }
    }
}

/// (1) The same with `size` one-descriptor chains, returned in one batch.
#[test]
fn packed_exact_full_ring_advance_many_chains() {
    for size in [1u16, 3, 255, 1000, 32768] {
        let start = u64::from(size) - 1;
        let mut h = Harness::new(RingLayout::Packed, size, start, false);
        for k in 0..u64::from(size) {
            h.add(&bufs_for(k, 1, 0), false).unwrap();
        }
        assert!(h.add(&bufs_for(0, 1, 0), false).is_none(), "ring is full");
        for _ in 0..size {
            assert!(h.pop());
        }
        assert!(!h.pop());
        h.check_positions();
        h.complete(usize::from(size), 0, 3);
        h.check_positions();
        h.add(&bufs_for(9, 2.min(usize::from(size)), 1), false)
            .unwrap();
        h.drain();
    }
}

/// (1) Split: exactly `size` chains ahead (avail idx - next_avail == size) is a full ring,
/// not an overrun; one chain of `size` descriptors is the longest chain.
#[test]
fn split_exact_full_ring_advance() {
    for size in [1u16, 2, 32768] {
        // One start for the largest ring (each pass is 32768 chains).
        let starts: &[u64] = if size == 32768 {
            &[65536 - 16384]
        } else {
            &[0, 65535, 65536 - u64::from(size) / 2]
        };
        for &start in starts {
            let mut h = Harness::new(RingLayout::Split, size, start, false);
            for k in 0..u64::from(size) {
                h.add(&bufs_for(k, 1, 0), false).unwrap();
            }
            for _ in 0..size {
                assert!(h.pop());
            }
            assert!(!h.pop());
            h.complete(usize::from(size), 1, 5);
            h.check_positions();
            let long = bufs_for(3, usize::from(size), 0);
            h.add(&long, false).unwrap();
            assert!(h.pop());
            h.drain();
        }
    }
}

/// (1) The split free-running indexes pass 65535 and wrap to 0.
#[test]
fn split_index_wraps_past_u16_max() {
    let mut h = Harness::new(RingLayout::Split, 2, 65530, false);
    for k in 0..40 {
        h.add(&bufs_for(k, 1 + (k as usize % 2), 1), k % 3 == 0)
            .unwrap();
        assert!(h.pop());
        h.complete(1, 0, k as u32);
    }
    assert_eq!(h.queue.next_avail(), 65530u16.wrapping_add(40));
    assert_eq!(h.queue.next_used(), 65530u16.wrapping_add(40));
}

// ---------------------------------------------------------------------------------------
// (2) A zeroed ring exposes no buffers.
// ---------------------------------------------------------------------------------------

fn assert_exposes_nothing(q: &mut Queue) {
    assert!(!q.has_available().unwrap());
    assert!(q.pop().unwrap().is_none());
    assert!(!q.enable_notification().unwrap());
    assert!(q.pop().unwrap().is_none());
    assert_eq!(q.in_flight(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// (2) Packed: all-zero descriptors are never available, whatever position and wrap
    /// counters the device was given (set_vring_base(0) included: both counters 0).
    #[test]
    fn zeroed_packed_ring_exposes_nothing_for_any_base_and_wrap(
        size in packed_size(),
        a in any::<u16>(),
        u in any::<u16>(),
        aw in any::<bool>(),
        uw in any::<bool>(),
        event_idx in any::<bool>(),
    ) {
        let mem = memory();
        let r = Rings::new(RingLayout::Packed, size);
        let mut q = Queue::new(r.config(event_idx, true), view(&mem)).unwrap();
        assert_exposes_nothing(&mut q);
        q.set_vring_base(0).unwrap();
        assert_eq!(q.vring_base(), 0);
        assert_exposes_nothing(&mut q);
        let base = packed_base((a % size, aw), (u % size, uw));
        q.set_vring_base(base).unwrap();
        assert_exposes_nothing(&mut q);
    }

    /// (2) Split: a zeroed ring (avail idx 0) with next_avail 0 exposes nothing.
    #[test]
    fn zeroed_split_ring_exposes_nothing(size in split_size(), event_idx in any::<bool>()) {
        let mem = memory();
        let r = Rings::new(RingLayout::Split, size);
        let mut q = Queue::new(r.config(event_idx, true), view(&mem)).unwrap();
        assert_exposes_nothing(&mut q);
        q.set_vring_base(0).unwrap();
        assert_exposes_nothing(&mut q);
    }

    /// (2) After arbitrary traffic (any positions and wrap counters), the driver zeroes
    /// the rings (a reset) and the device is given set_vring_base(0): nothing is exposed.
    #[test]
    fn zeroed_ring_after_traffic_and_set_vring_base_0_exposes_nothing(
        packed in any::<bool>(),
        size_seed in any::<u16>(),
        start_seed in any::<u64>(),
        ops in proptest::collection::vec(arb_op(), 0..60),
    ) {
        let (layout, size) = if packed {
            (RingLayout::Packed, 1 + size_seed % 17)
        } else {
            (RingLayout::Split, 1 << (size_seed % 6))
        };
        let start = start_seed % (2 * u64::from(size));
        let mut h = Harness::new(layout, size, start, size_seed % 2 == 0);
        for op in &ops {
            h.apply(op);
        }
        let zeros = vec![0u8; h.r.footprint() as usize];
        h.mem.write_slice(&zeros, GuestAddress(h.r.desc)).unwrap();
        h.queue.set_vring_base(0).unwrap();
        assert_eq!(h.queue.next_used(), 0);
        assert_exposes_nothing(&mut h.queue);
    }
}

// ---------------------------------------------------------------------------------------
// (3) Chain errors are never silent; no chain exceeds the queue size.
// ---------------------------------------------------------------------------------------

/// A malformed packed chain and the typed error the device must return for it.
#[derive(Clone, Debug)]
enum PackedDefect {
    IndirectWithNext,
    NestedIndirect {
        at: usize,
    },
    IndirectLen {
        kind: u8,
    },
    ReadableAfterWritable {
        zero_len_writable: bool,
    },
    OutsideMemory {
        kind: u8,
    },
    TableOutsideMemory,
    /// Every slot of the ring has NEXT: the chain would be longer than the queue.
    TooLong,
    IdInUse,
    IndirectNotNegotiated,
}

fn arb_packed_defect() -> impl Strategy<Value = PackedDefect> {
    prop_oneof![
        Just(PackedDefect::IndirectWithNext),
        any::<usize>().prop_map(|at| PackedDefect::NestedIndirect { at }),
        (0u8..3).prop_map(|kind| PackedDefect::IndirectLen { kind }),
        any::<bool>().prop_map(|z| PackedDefect::ReadableAfterWritable {
            zero_len_writable: z
        }),
        (0u8..3).prop_map(|kind| PackedDefect::OutsideMemory { kind }),
        Just(PackedDefect::TableOutsideMemory),
        Just(PackedDefect::TooLong),
        Just(PackedDefect::IdInUse),
        Just(PackedDefect::IndirectNotNegotiated),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// (3) Each kind of malformed packed chain, after some valid ones (from any ring
    /// position, so chains wrap), is the typed error named by the spec rule it breaks, and
    /// the queue then stays broken.
    #[test]
    fn packed_malformed_chains_are_typed_errors(
        size in 2u16..=12,
        start_seed in any::<u64>(),
        valid in 0usize..3,
        defect in arb_packed_defect(),
    ) {
        let start = start_seed % (2 * u64::from(size));
        let indirect_desc = !matches!(defect, PackedDefect::IndirectNotNegotiated);
        let mem = memory();
        let r = Rings::new(RingLayout::Packed, size);
        let mut q = Queue::new(r.config(false, indirect_desc), view(&mem)).unwrap();
        let p = packed_pos(start, size);
        q.set_vring_base(packed_base(p, p)).unwrap();
        let mut pos = start;
        // Valid one-slot chains, popped and returned.
        for k in 0..valid as u16 {
            let b = BUFS + 0x1000 * u64::from(k);
            write_packed_descs(&mem, &r, pos, &[(b, 64, F_WRITE)], k);
            pos += 1;
            let c = q.pop().unwrap().unwrap();
            assert_eq!(c.id(), k);
            q.add_used(k, 0).unwrap();
        }
        let id = 7;
        let table = TABLES;
        let ok_buf = |i: u64| (BUFS + 0x100 * i, 0x80u32, 0u16);
        let write_table = |entries: &[(u64, u32, u16)]| {
            for (i, &(a, l, f)) in entries.iter().enumerate() {
                wr_desc(&mem, table + 16 * i as u64, a, l, JUNK_ID, f);
            }
        };
        let expected = match defect {
            PackedDefect::IndirectWithNext => {
                write_table(&[ok_buf(0)]);
                let descs = [(table, 16, F_INDIRECT | F_NEXT), ok_buf(1)];
                write_packed_descs(&mem, &r, pos, &descs, id);
                Error::IndirectWithNext
            }
            PackedDefect::NestedIndirect { at } => {
                let mut entries = vec![ok_buf(0), ok_buf(1), ok_buf(2)];
                entries[at % 3] = (table + 0x100, 16, F_INDIRECT);
                write_table(&entries);
                write_packed_descs(&mem, &r, pos, &[(table, 48, F_INDIRECT)], id);
                Error::NestedIndirect
            }
            PackedDefect::IndirectLen { kind } => {
                write_table(&[ok_buf(0), ok_buf(1)]);
                let len = [0, 24, 16 * 65536][usize::from(kind)];
                write_packed_descs(&mem, &r, pos, &[(table, len, F_INDIRECT)], id);
                Error::InvalidIndirectLength(len)
            }
            PackedDefect::ReadableAfterWritable { zero_len_writable } => {
                let w = (BUFS, if zero_len_writable { 0 } else { 16 }, F_WRITE | F_NEXT);
                let bad = BUFS + 0x800;
                write_packed_descs(&mem, &r, pos, &[w, (bad, 16, 0)], id);
                Error::ReadableAfterWritable { addr: bad }
            }
            PackedDefect::OutsideMemory { kind } => {
                let outside = [(MEM_END, 1u32), (MEM_END - 8, 16), (u64::MAX - 4, 8)];
                let (a, l) = outside[usize::from(kind)];
                let (b, bl, _) = ok_buf(0);
                write_packed_descs(&mem, &r, pos, &[(b, bl, F_NEXT), (a, l, F_WRITE)], id);
                Error::BufferOutsideMemory { addr: a, len: u64::from(l) }
            }
            PackedDefect::TableOutsideMemory => {
                write_packed_descs(&mem, &r, pos, &[(MEM_END - 16, 32, F_INDIRECT)], id);
                Error::BufferOutsideMemory { addr: MEM_END - 16, len: 32 }
            }
            PackedDefect::TooLong => {
                let descs: Vec<_> = (0..u64::from(size)).map(|i| {
                    let (a, l, _) = ok_buf(i);
                    (a, l, F_NEXT)
                }).collect();
                write_packed_descs(&mem, &r, pos, &descs, id);
                Error::ChainTooLong { max: u32::from(size) }
            }
            PackedDefect::IdInUse => {
                write_packed_descs(&mem, &r, pos, &[ok_buf(0)], id);
                pos += 1;
                let c = q.pop().unwrap().unwrap();
                assert_eq!(c.id(), id);
                write_packed_descs(&mem, &r, pos, &[ok_buf(1)], id);
                Error::BufferIdInUse(id)
            }
            PackedDefect::IndirectNotNegotiated => {
                write_table(&[ok_buf(0)]);
                write_packed_descs(&mem, &r, pos, &[(table, 16, F_INDIRECT)], id);
                Error::IndirectNotNegotiated
            }
        };
        assert_eq!(q.pop().unwrap_err(), expected);
        assert!(q.is_broken());
        assert_eq!(q.pop().unwrap_err(), Error::Broken);
        assert_eq!(q.enable_notification().unwrap_err(), Error::Broken);
    }
}

/// A descriptor as read from guest memory.
#[derive(Clone, Copy, Debug)]
struct RawDesc {
    addr: u64,
    len: u32,
    /// Split: flags; packed: id.
    x: u16,
    /// Split: next; packed: flags.
    y: u16,
}

fn rd_desc(mem: &Mem, addr: u64) -> Option<RawDesc> {
    Some(RawDesc {
        addr: u64::from_le(mem.read_obj(GuestAddress(addr)).ok()?),
        len: u32::from_le(mem.read_obj(GuestAddress(addr + 8)).ok()?),
        x: u16::from_le(mem.read_obj(GuestAddress(addr + 12)).ok()?),
        y: u16::from_le(mem.read_obj(GuestAddress(addr + 14)).ok()?),
    })
}

fn in_memory(addr: u64, len: u64) -> bool {
    addr.checked_add(len).is_some_and(|end| end <= MEM_END)
}

/// The spec's chain rules (§2.7.4.2, §2.7.5.2, §2.7.5.3.1, §2.8.6, §2.8.19), written
/// independently of virtio-core: a buffer list, or `Err(())` for a chain the device must
/// reject.
#[derive(Default)]
struct SpecChain {
    bufs: Vec<Buf>,
    seen_writable: bool,
    total: u64,
}

impl SpecChain {
    fn push(&mut self, addr: u64, len: u32, writable: bool) -> Result<(), ()> {
        if !writable && self.seen_writable {
            return Err(());
        }
        self.seen_writable |= writable;
        self.total += u64::from(len);
        if self.total > u64::from(u32::MAX) || (len > 0 && !in_memory(addr, u64::from(len))) {
            return Err(());
        }
        self.bufs.push(Buf {
            addr,
            len,
            writable,
        });
        Ok(())
    }

    /// Validates an indirect table and returns its entries.
    fn table(mem: &Mem, addr: u64, len: u32) -> Result<Vec<RawDesc>, ()> {
        if len == 0 || len % 16 != 0 || len / 16 > 65535 || !in_memory(addr, u64::from(len)) {
            return Err(());
        }
        (0..u64::from(len / 16))
            .map(|i| rd_desc(mem, addr + 16 * i).ok_or(()))
            .collect()
    }
}

/// Split: the chain at `head`, and how many table descriptors it walked.
fn spec_split_chain(
    mem: &Mem,
    r: &Rings,
    head: u16,
    indirect_desc: bool,
) -> Result<(Vec<Buf>, u16), ()> {
    if head >= r.size {
        return Err(());
    }
    let mut c = SpecChain::default();
    let mut i = head;
    let mut walked = 0u16;
    loop {
        if walked == r.size {
            return Err(()); // a chain is at most the queue size long (§2.7.5.2)
        }
        walked += 1;
        let d = rd_desc(mem, r.desc + 16 * u64::from(i)).ok_or(())?;
        let flags = d.x;
        if flags & F_INDIRECT != 0 {
            if flags & F_NEXT != 0 || !indirect_desc {
                return Err(());
            }
            let t = SpecChain::table(mem, d.addr, d.len)?;
            let mut j = 0usize;
            for step in 0.. {
                if step == t.len() {
                    return Err(()); // a loop inside the table
                }
                let e = t[j];
                if e.x & F_INDIRECT != 0 {
                    return Err(());
                }
                c.push(e.addr, e.len, e.x & F_WRITE != 0)?;
                if e.x & F_NEXT == 0 {
                    break;
                }
                if usize::from(e.y) >= t.len() {
                    return Err(());
                }
                j = usize::from(e.y);
            }
            break;
        }
        c.push(d.addr, d.len, flags & F_WRITE != 0)?;
        if flags & F_NEXT == 0 {
            break;
        }
        if d.y >= r.size {
            return Err(());
        }
        i = d.y;
    }
    Ok((c.bufs, walked))
}

/// Packed: None if nothing is available at `pos`; else the chain (buffers, id, slots).
#[allow(clippy::type_complexity)]
fn spec_packed_chain(
    mem: &Mem,
    r: &Rings,
    pos: u64,
    indirect_desc: bool,
    in_use: &HashSet<u16>,
) -> Option<Result<(Vec<Buf>, u16, u16), ()>> {
    let (slot, wrap) = packed_pos(pos, r.size);
    let head = rd_desc(mem, r.desc + 16 * u64::from(slot))?;
    let avail = head.y & F_AVAIL != 0;
    let used = head.y & F_USED != 0;
    if !(avail == wrap && used != wrap) {
        return None;
    }
    let mut c = SpecChain::default();
    let mut n = 0u16;
    let id = loop {
        if n == r.size {
            return Some(Err(()));
        }
        let (s, _) = packed_pos(pos + u64::from(n), r.size);
        n += 1;
        let d = rd_desc(mem, r.desc + 16 * u64::from(s))?;
        let flags = d.y;
        if flags & F_INDIRECT != 0 {
            if flags & F_NEXT != 0 || !indirect_desc {
                return Some(Err(()));
            }
            let t = match SpecChain::table(mem, d.addr, d.len) {
                Ok(t) => t,
                Err(()) => return Some(Err(())),
            };
            for e in t {
                if e.y & F_INDIRECT != 0 || c.push(e.addr, e.len, e.y & F_WRITE != 0).is_err() {
                    return Some(Err(()));
                }
            }
            break d.x;
        }
        if c.push(d.addr, d.len, flags & F_WRITE != 0).is_err() {
            return Some(Err(()));
        }
        if flags & F_NEXT == 0 {
            break d.x;
        }
    };
    if in_use.contains(&id) {
        return Some(Err(()));
    }
    Some(Ok((c.bufs, id, n)))
}

/// Random descriptor fields: good and bad addresses, lengths and flags.
fn arb_raw_desc(next_max: u16) -> impl Strategy<Value = RawDesc> {
    let addr = prop_oneof![
        6 => (0u64..0x1000).prop_map(|x| BUFS + 0x40 * x),
        1 => (1u64..0x100).prop_map(|x| REGION - x),
        1 => (0u64..0x1000).prop_map(|x| MEM_END - 0x10 + x),
        1 => (0u64..0x100).prop_map(|x| u64::MAX - x),
        2 => (0u64..2).prop_map(|t| TABLES + 0x100 * t),
    ];
    let len = prop_oneof![
        2 => Just(0u32),
        4 => 1u32..0x100,
        2 => (1u32..6).prop_map(|k| 16 * k),
        1 => Just(24u32),
        1 => Just(0xffff_fff0u32),
    ];
    let flags = prop_oneof![
        6 => Just(0u16),
        6 => Just(F_NEXT),
        3 => Just(F_WRITE),
        3 => Just(F_WRITE | F_NEXT),
        2 => Just(F_INDIRECT),
        1 => Just(F_INDIRECT | F_NEXT),
        1 => Just(F_INDIRECT | F_WRITE),
    ];
    (addr, len, flags, 0..=next_max).prop_map(|(addr, len, x, y)| RawDesc { addr, len, x, y })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// (3) Random split rings: every pop agrees with the spec model — a chain with the
    /// same head and buffers, or a typed error (then the queue stays broken), never a
    /// chain the model rejects, and never more ring descriptors than the queue size.
    #[test]
    fn random_split_rings_match_spec_model(
        log in 0u32..=4,
        descs in proptest::collection::vec(arb_raw_desc(17), 16),
        tables in proptest::collection::vec(arb_raw_desc(17), 32),
        heads in proptest::collection::vec(0u16..17, 16),
        start in split_start(),
        count_seed in any::<u16>(),
        indirect_desc in any::<bool>(),
    ) {
        let size = 1u16 << log;
        let mem = memory();
        let r = Rings::new(RingLayout::Split, size);
        for (i, d) in descs.iter().take(usize::from(size)).enumerate() {
            wr_desc(&mem, r.desc + 16 * i as u64, d.addr, d.len, d.x, d.y % (size + 1));
        }
        for (i, d) in tables.iter().enumerate() {
            wr_desc(&mem, TABLES + 16 * i as u64, d.addr, d.len, d.x, d.y);
        }
        let start = start as u16;
        let count = count_seed % (size + 1);
        for k in 0..count {
            let slot = u64::from(start.wrapping_add(k) % size);
            let head = if heads[usize::from(k)] > 15 { size } else { heads[usize::from(k)] % size };
            mem.write_obj(head.to_le(), GuestAddress(r.driver + 4 + 2 * slot)).unwrap();
        }
        store_u16_release(&mem, r.split_avail_idx_addr(), start.wrapping_add(count));
        // A consistent restored state: nothing in flight (used idx = next avail).
        store_u16_release(&mem, r.split_used_idx_addr(), start);
        let mut q = Queue::new(r.config(false, indirect_desc), view(&mem)).unwrap();
        q.set_vring_base(u32::from(start)).unwrap();
        let mut popped = std::collections::HashSet::new();
        for k in 0..count {
            let slot = u64::from(start.wrapping_add(k) % size);
            let head = rd_u16(&mem, r.driver + 4 + 2 * slot);
            if head < size && popped.contains(&head) {
                // The driver made a head available again while it is in flight.
                assert_eq!(q.pop().unwrap_err(), Error::HeadInUse(head));
                assert_eq!(q.pop().unwrap_err(), Error::Broken);
                return Ok(());
            }
            match (spec_split_chain(&mem, &r, head, indirect_desc), q.pop()) {
                (Ok((bufs, walked)), Ok(Some(c))) => {
                    popped.insert(head);
                    assert_eq!(c.id(), head);
                    assert_eq!(c.segments().collect::<Vec<_>>(), normalise(&bufs));
                    assert_eq!(c.ring_slots(), walked);
                    assert!(c.ring_slots() <= size);
                }
                (Err(()), Err(e)) => {
                    assert_ne!(e, Error::Broken);
                    assert_eq!(q.pop().unwrap_err(), Error::Broken);
                    return Ok(());
                }
                (model, device) => panic!("model {model:?}, device {device:?}"),
            }
        }
        assert!(q.pop().unwrap().is_none());
    }

    /// (3) Random packed rings, popped (and sometimes returned) from any position and wrap
    /// state: every pop agrees with the spec model, a chain never takes more than the
    /// queue size of slots, and an error is typed and breaks the queue.
    #[test]
    fn random_packed_rings_match_spec_model(
        size in 1u16..=12,
        descs in proptest::collection::vec(
            (arb_raw_desc(0), 0u16..6, prop_oneof![
                4 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8)
            ]),
            12,
        ),
        tables in proptest::collection::vec(arb_raw_desc(0), 32),
        start_seed in any::<u64>(),
        actions in proptest::collection::vec(any::<u8>(), 1..40),
        indirect_desc in any::<bool>(),
    ) {
        let mem = memory();
        let r = Rings::new(RingLayout::Packed, size);
        let start = start_seed % (2 * u64::from(size));
        let (_, start_wrap) = packed_pos(start, size);
        for (i, (d, id, avail_kind)) in descs.iter().take(usize::from(size)).enumerate() {
            // Mostly available in the lap the device reaches the slot in; some available
            // for the other lap, some used, some never written.
            let wrap = if (i as u64) < start % u64::from(size) { !start_wrap } else { start_wrap };
            let bits = match avail_kind {
                0 => avail_bits(wrap),
                1 => avail_bits(!wrap),
                2 => F_AVAIL | F_USED,
                _ => 0,
            };
            wr_desc(&mem, r.desc + 16 * i as u64, d.addr, d.len, *id, d.x | bits);
        }
        for (i, d) in tables.iter().enumerate() {
            wr_desc(&mem, TABLES + 16 * i as u64, d.addr, d.len, JUNK_ID, d.x);
        }
        let mut q = Queue::new(r.config(false, indirect_desc), view(&mem)).unwrap();
        let p = packed_pos(start, size);
        q.set_vring_base(packed_base(p, p)).unwrap();
        let mut pos = start;
        let mut used = start;
        let mut in_use = HashSet::new();
        let mut in_flight: Vec<(u16, u16)> = Vec::new();
        for a in actions {
            if a % 4 == 0 && !in_flight.is_empty() {
                let (id, slots) = in_flight.remove(usize::from(a) % in_flight.len());
                q.add_used(id, u32::from(a)).unwrap();
                in_use.remove(&id);
                used += u64::from(slots);
                continue;
            }
            match (spec_packed_chain(&mem, &r, pos, indirect_desc, &in_use), q.pop()) {
                (None, Ok(None)) => {}
                (Some(Ok((bufs, id, n))), Ok(Some(c))) => {
                    assert_eq!(c.id(), id);
                    assert_eq!(c.segments().collect::<Vec<_>>(), normalise(&bufs));
                    assert_eq!(c.ring_slots(), n);
                    assert!(n <= size);
                    in_use.insert(id);
                    in_flight.push((id, n));
                    pos += u64::from(n);
                }
                (Some(Err(())), Err(e)) => {
                    assert_ne!(e, Error::Broken);
                    assert_eq!(q.pop().unwrap_err(), Error::Broken);
                    return Ok(());
                }
                (model, device) => panic!("model {model:?}, device {device:?}"),
            }
            assert_eq!((q.next_avail(), q.avail_wrap_counter()), packed_pos(pos, size));
            assert_eq!((q.next_used(), q.used_wrap_counter()), packed_pos(used, size));
        }
    }
}

// ---------------------------------------------------------------------------------------
// (4) A packed chain wrapping past the ring end.
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// (4) A chain starting `k` slots before the ring end and `n > k` slots long: its
    /// descriptors after the end carry the flipped wrap counter (as the driver writes
    /// them), its ID is in the last (post-wrap) one, the device's avail wrap counter is
    /// flipped after it, and the next head is looked for with the flipped counter: a
    /// descriptor still marked available for the old lap (an in-flight chain from earlier
    /// in that lap) is not available, the driver's next chain is.
    #[test]
    fn packed_chain_wrapping_ring_end_reads_flipped_wrap_counter(
        (size, k, n) in prop_oneof![Just(3u16), Just(255), Just(1000), Just(32768), 3u16..=20]
            .prop_flat_map(|s| (1..=(s - 2).min(8)).prop_map(move |k| (s, k)))
            .prop_flat_map(|(s, k)| (Just(s), Just(k), (k + 1)..=(k + 8).min(s - 1))),
        wrap in any::<bool>(),
        indirect_next in any::<bool>(),
    ) {
        let mem = memory();
        let r = Rings::new(RingLayout::Packed, size);
        let mut q = Queue::new(r.config(false, true), view(&mem)).unwrap();
        // Absolute position of slot size - k in lap `wrap`.
        let lap = if wrap { 0 } else { u64::from(size) };
        let start = lap + u64::from(size - k);
        let p = packed_pos(start, size);
        q.set_vring_base(packed_base(p, p)).unwrap();
        // Slot n - k (just after the chain) holds a chain made available earlier in this
        // lap and still in flight: flags say "available" for the *old* wrap counter.
        let after = n - k;
        wr_desc(&mem, r.desc + 16 * u64::from(after), BUFS, 8, 99, avail_bits(wrap));
        let bufs: Vec<(u64, u32, u16)> = (0..u64::from(n))
            .map(|i| {
                let w = if i + 1 >= u64::from(n) / 2 { F_WRITE } else { 0 };
                let next = if i + 1 < u64::from(n) { F_NEXT } else { 0 };
                (BUFS + 0x1000 * (i + 1), 0x100, w | next)
            })
            .collect();
        write_packed_descs(&mem, &r, start, &bufs, 5);
        // Mid-chain descriptors after the ring end really carry the flipped counter.
        let f0 = rd_u16(&mem, r.desc + 14);
        assert_eq!(f0 & (F_AVAIL | F_USED), avail_bits(!wrap));
        let c = q.pop().unwrap().unwrap();
        assert_eq!(c.id(), 5, "the ID comes from the last (post-wrap) descriptor");
        assert_eq!(c.ring_slots(), n);
        let segs: Vec<u64> = c.segments().map(|s| s.guest_addr).collect();
        let want: Vec<u64> = bufs.iter().map(|b| b.0).collect();
        assert_eq!(segs, want);
        assert_eq!(q.next_avail(), after);
        assert_eq!(q.avail_wrap_counter(), !wrap, "wrap counter flipped mid-chain");
        assert!(q.pop().unwrap().is_none(), "stale old-lap descriptor seen as available");
        // The in-flight chain at `after` completes (driver side), then the driver puts its
        // next chain there, in the new lap.
        let next = if indirect_next {
            wr_desc(&mem, TABLES, BUFS + 0x40, 0x40, JUNK_ID, F_WRITE);
            vec![(TABLES, 16, F_INDIRECT)]
        } else {
            vec![(BUFS + 0x40, 0x40, F_WRITE)]
        };
        write_packed_descs(&mem, &r, start + u64::from(n), &next, 6);
        let c = q.pop().unwrap().expect("next head found with the flipped wrap counter");
        assert_eq!(c.id(), 6);
        assert_eq!(q.next_avail(), (after + 1) % size);
        // The used side flips too when the chain is returned.
        q.add_used(5, 1).unwrap();
        assert_eq!(q.next_used(), after);
        assert_eq!(q.used_wrap_counter(), !wrap);
        let d = r.desc + 16 * u64::from(size - k);
        assert_eq!(rd_u16(&mem, d + 14), if wrap { F_AVAIL | F_USED | F_WRITE } else { F_WRITE });
    }
}

// ---------------------------------------------------------------------------------------
// (5) Used elements.
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// (5) Every used element carries the chain's ID and the length given (packed: AVAIL
    /// == USED == the used wrap counter, WRITE iff the length is not 0, nothing else), in
    /// completion order; used <= popped <= avail and avail - used <= size throughout.
    #[test]
    fn used_elements_carry_id_len_and_flags(
        packed in any::<bool>(),
        size_seed in any::<u16>(),
        start_seed in any::<u64>(),
        ops in proptest::collection::vec(arb_op(), 1..120),
    ) {
        let (layout, size) = if packed {
            (RingLayout::Packed, 1 + size_seed % 9)
        } else {
            (RingLayout::Split, 1 << (size_seed % 4))
        };
        let start = match layout {
            RingLayout::Packed => start_seed % (2 * u64::from(size)),
            RingLayout::Split => start_seed % 65536,
        };
        let mut h = Harness::new(layout, size, start, false);
        for op in &ops {
            h.apply(op);
        }
        h.drain();
    }
}

/// (5) An ID that is not in flight, or one given twice in a batch, is refused and nothing
/// of the batch is published (packed).
#[test]
fn packed_add_used_rejects_ids_not_in_flight_and_publishes_nothing() {
    let mut h = Harness::new(RingLayout::Packed, 4, 3, false);
    let a = h.add(&bufs_for(0, 1, 0), false).unwrap();
    let b = h.add(&bufs_for(1, 1, 0), false).unwrap();
    assert!(h.pop() && h.pop());
    let ring = |h: &Harness| {
        let mut v = vec![0u8; 64];
        h.mem.read_slice(&mut v, GuestAddress(h.r.desc)).unwrap();
        v
    };
    let before = ring(&h);
    assert_eq!(
        h.queue.add_used(a + b + 1, 1),
        Err(Error::NotInFlight(a + b + 1))
    );
    assert_eq!(
        h.queue.add_used_batch(&[(a, 1), (b, 2), (a, 3)]),
        Err(Error::NotInFlight(a))
    );
    assert_eq!(
        h.queue.add_used_batch(&[(b, 1), (77, 2)]),
        Err(Error::NotInFlight(77))
    );
    assert_eq!(ring(&h), before, "a refused batch published something");
    assert_eq!(h.queue.in_flight(), 2);
    h.check_positions();
    h.complete(2, 1, 9);
    h.check_positions();
}

/// (5) Split: a head that was never popped (or one given twice) is refused, as
/// `Error::NotInFlight` documents ("add_used for a head or buffer ID that is not in
/// flight"). The split ring only checks the number of chains in flight, so it publishes
/// a used element the driver never made available.
#[test]
fn split_add_used_rejects_head_not_in_flight() {
    let mut h = Harness::new(RingLayout::Split, 4, 0, false);
    let a = h.add(&bufs_for(0, 1, 0), false).unwrap();
    let b = h.add(&bufs_for(1, 1, 0), false).unwrap();
    assert!(h.pop() && h.pop());
    let other = (0..4).find(|&i| i != a && i != b).unwrap();
    assert_eq!(h.queue.add_used(other, 1), Err(Error::NotInFlight(other)));
    assert_eq!(
        h.queue.add_used_batch(&[(a, 1), (a, 2)]),
        Err(Error::NotInFlight(a))
    );
    assert_eq!(h.queue.add_used(4, 1), Err(Error::NotInFlight(4)));
}

// ---------------------------------------------------------------------------------------
// (9) Split avail idx - next_avail <= size.
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// (9) The driver moving avail idx more than the queue size ahead of next_avail is
    /// `AvailIndexOverrun` (from pop, has_available and enable_notification alike), and the
    /// queue is broken; `size` ahead exactly is a full ring.
    #[test]
    fn split_avail_index_overrun_is_rejected(
        size in split_size(),
        start in split_start(),
        popped_seed in any::<u16>(),
        excess_seed in any::<u16>(),
        via in 0u8..3,
    ) {
        let mut h = Harness::new(RingLayout::Split, size, start, false);
        let popped = popped_seed % (size.min(8) + 1);
        for k in 0..u64::from(popped) {
            h.add(&bufs_for(k, 1, 0), false).unwrap();
            assert!(h.pop());
        }
        let next_avail = h.queue.next_avail();
        let excess = u32::from(size) + 1 + u32::from(excess_seed) % (65535 - u32::from(size));
        let avail_idx = next_avail.wrapping_add(excess as u16);
        store_u16_release(&h.mem, h.r.split_avail_idx_addr(), avail_idx);
        let err = Error::AvailIndexOverrun { avail_idx, next_avail };
        match via {
            0 => assert_eq!(h.queue.pop().unwrap_err(), err),
            1 => assert_eq!(h.queue.has_available().unwrap_err(), err),
            _ => assert_eq!(h.queue.enable_notification().unwrap_err(), err),
        }
        assert!(h.queue.is_broken());
        assert_eq!(h.queue.pop().unwrap_err(), Error::Broken);
    }
}

/// (9) avail idx exactly `size` ahead (a full ring) is accepted, also across the u16 wrap.
#[test]
fn split_avail_index_exactly_size_ahead_is_accepted() {
    for size in [1u16, 2, 8, 32768] {
        let starts: &[u64] = if size == 32768 {
            &[65535]
        } else {
            &[0, 65535, 65536 - u64::from(size)]
        };
        for &start in starts {
            let mut h = Harness::new(RingLayout::Split, size, start, false);
            for k in 0..u64::from(size) {
                h.add(&bufs_for(k, 1, 0), false).unwrap();
            }
            assert_eq!(
                rd_u16(&h.mem, h.r.split_avail_idx_addr()).wrapping_sub(h.queue.next_avail()),
                size
            );
            h.drain();
        }
    }
}

// ---------------------------------------------------------------------------------------
// (11) Save / restore.
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// (11) Packed: every valid base — both 15-bit positions, bit 15 (avail wrap) and bit
    /// 31 (used wrap) — reads back unchanged, and sets the positions it encodes.
    #[test]
    fn packed_vring_base_roundtrips_bits_15_and_31(
        size in packed_size(),
        a in any::<u16>(),
        u in any::<u16>(),
        aw in any::<bool>(),
        uw in any::<bool>(),
    ) {
        let mem = memory();
        let r = Rings::new(RingLayout::Packed, size);
        let mut q = Queue::new(r.config(true, true), view(&mem)).unwrap();
        assert_eq!(q.vring_base(), packed_base((0, true), (0, true)), "reset state");
        let (a, u) = (a % size, u % size);
        let base = packed_base((a, aw), (u, uw));
        q.set_vring_base(base).unwrap();
        assert_eq!(q.vring_base(), base);
        assert_eq!((q.next_avail(), q.avail_wrap_counter()), (a, aw));
        assert_eq!((q.next_used(), q.used_wrap_counter()), (u, uw));
    }

    /// (11) Split: the base is next_avail (any u16); next_used comes from the used idx in
    /// guest memory.
    #[test]
    fn split_vring_base_roundtrips(
        size in split_size(),
        base in any::<u16>(),
        used in any::<u16>(),
    ) {
        let mem = memory();
        let r = Rings::new(RingLayout::Split, size);
        store_u16_release(&mem, r.split_used_idx_addr(), used);
        let mut q = Queue::new(r.config(true, true), view(&mem)).unwrap();
        q.set_vring_base(u32::from(base)).unwrap();
        assert_eq!(q.vring_base(), u32::from(base));
        assert_eq!(q.next_avail(), base);
        assert_eq!(q.next_used(), used);
        assert_eq!(q.in_flight(), base.wrapping_sub(used).min(size));
    }

    /// (11) A base naming a position outside the ring is refused and changes nothing.
    #[test]
    fn invalid_vring_base_is_rejected_and_changes_nothing(
        packed in any::<bool>(),
        size in 1u16..=64,
        bad_seed in any::<u32>(),
    ) {
        let mem = memory();
        let (layout, size) = if packed {
            (RingLayout::Packed, size)
        } else {
            (RingLayout::Split, size.next_power_of_two())
        };
        let r = Rings::new(layout, size);
        let mut q = Queue::new(r.config(true, true), view(&mem)).unwrap();
        let before = q.vring_base();
        let bad = match layout {
            // Split: more than 16 bits.
            RingLayout::Split => bad_seed | 0x1_0000,
            // Packed: avail or used index >= size (wrap bits anything).
            RingLayout::Packed => {
                let big = size + (bad_seed as u16) % (0x8000 - size);
                let ok = (bad_seed >> 16) as u16 % size;
                if bad_seed % 2 == 0 {
                    u32::from(big) | (u32::from(ok) << 16) | (bad_seed & 0x8000_8000)
                } else {
                    u32::from(ok) | (u32::from(big) << 16) | (bad_seed & 0x8000_8000)
                }
            }
        };
        assert_eq!(q.set_vring_base(bad), Err(Error::InvalidRingBase(bad)));
        assert_eq!(q.vring_base(), before);
    }

    /// (11) Stop a queue (no chain in flight, as GET_VRING_BASE requires), save its base,
    /// restore it into a new queue (or the same one) over the same memory: the base reads
    /// back and the restored queue continues with the same driver — positions, wrap
    /// counters, chains and used elements all as the model says.
    #[test]
    fn restored_queue_continues(
        packed in any::<bool>(),
        size_seed in any::<u16>(),
        start_seed in any::<u64>(),
        before in proptest::collection::vec(arb_op(), 0..80),
        after in proptest::collection::vec(arb_op(), 1..80),
        fresh in any::<bool>(),
    ) {
        let (layout, size) = if packed {
            (RingLayout::Packed, 1 + size_seed % 17)
        } else {
            (RingLayout::Split, 1 << (size_seed % 5))
        };
        let start = match layout {
            RingLayout::Packed => start_seed % (2 * u64::from(size)),
            RingLayout::Split => start_seed % 65536,
        };
        let mut h = Harness::new(layout, size, start, false);
        for op in &before {
            h.apply(op);
        }
        // Finish in-flight chains; chains made available but not popped stay in the ring.
        let n = h.in_flight.len();
        h.complete(n, 0, 1);
        let base = h.queue.vring_base();
        if fresh {
            h.queue = Queue::new(h.r.config(false, true), view(&h.mem)).unwrap();
        }
        h.queue.set_vring_base(base).unwrap();
        assert_eq!(h.queue.vring_base(), base);
        h.check_positions();
        for op in &after {
            h.apply(op);
        }
        h.drain();
    }
}

/// (11) Split: restored with chains in flight (popped, not returned), the new queue counts
/// them from the used idx and may return them.
#[test]
fn split_restore_with_chains_in_flight_continues() {
    let mut h = Harness::new(RingLayout::Split, 16, 65533, false);
    for k in 0..6 {
        h.add(&bufs_for(k, 2, 1), k % 2 == 0).unwrap();
    }
    for _ in 0..4 {
        assert!(h.pop());
    }
    h.complete(1, 0, 3);
    let base = h.queue.vring_base();
    h.queue = Queue::new(h.r.config(false, true), view(&h.mem)).unwrap();
    h.queue.set_vring_base(base).unwrap();
    assert_eq!(h.queue.in_flight(), 3);
    h.check_positions();
    h.complete(3, 1, 4);
    h.drain();
}

// ---------------------------------------------------------------------------------------
// (12) The writer stays inside the writable buffers.
// ---------------------------------------------------------------------------------------

const CANARY: u8 = 0xa5;
const READABLE: u8 = 0x5a;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// (12) Guest memory around the chain's buffers is filled with a canary, readable
    /// buffers with their own pattern. Writing more than the writable capacity (in random
    /// pieces, after skipping some room) fills exactly the writable buffers in order and
    /// touches nothing else; past the capacity, writes return 0 and `write_obj` fails
    /// without writing.
    #[test]
    fn writer_stays_inside_writable_buffers(
        packed in any::<bool>(),
        indirect in any::<bool>(),
        lens in proptest::collection::vec((0u32..0x180, 1u64..0x40), 1..=8),
        readable_seed in any::<usize>(),
        straddle in any::<bool>(),
        skip_seed in any::<u32>(),
        chunks in proptest::collection::vec(1usize..0x200, 1..12),
    ) {
        let layout = if packed { RingLayout::Packed } else { RingLayout::Split };
        let mut h = Harness::new(layout, 8, 0, false);
        let readable = readable_seed % (lens.len() + 1);
        // Lay the buffers out with gaps, optionally across the region boundary.
        let total: u64 = lens.iter().map(|&(l, g)| u64::from(l) + g).sum();
        let first = if straddle { REGION - total / 2 } else { BUFS + 0x10_0000 };
        let window = (first - 0x100, total + 0x200);
        let mut bufs = Vec::new();
        let mut at = first;
        for (i, &(len, gap)) in lens.iter().enumerate() {
            bufs.push(Buf { addr: at, len, writable: i >= readable });
            at += u64::from(len) + gap;
        }
        let canary = vec![CANARY; window.1 as usize];
        h.mem.write_slice(&canary, GuestAddress(window.0)).unwrap();
        for b in bufs.iter().filter(|b| !b.writable) {
            h.mem.write_slice(&vec![READABLE; b.len as usize], GuestAddress(b.addr)).unwrap();
        }
        h.add(&bufs, indirect).unwrap();
        let chain = h.queue.pop().unwrap().unwrap();
        let cap: usize = bufs.iter().filter(|b| b.writable).map(|b| b.len as usize).sum();
        assert_eq!(chain.writable_len() as usize, cap);
        let mut w = chain.writer();
        let skip = skip_seed as usize % (cap + 1);
        assert_eq!(w.consume(skip), skip);
        // More data than the room left, in pieces.
        let data: Vec<u8> = (0..cap + 0x300).map(|i| (i % 251) as u8).collect();
        let mut written = 0usize;
        let mut ci = 0;
        while written < data.len() {
            let n = chunks[ci % chunks.len()].min(data.len() - written);
            ci += 1;
            let got = w.write(&data[written..written + n]).unwrap();
            assert!(got <= n);
            if got == 0 {
                break;
            }
            written += got;
        }
        assert_eq!(written, cap - skip, "writer wrote past (or short of) its capacity");
        assert_eq!(w.available(), 0);
        assert_eq!(w.bytes_written(), cap);
        assert_eq!(w.write(&[1, 2, 3]).unwrap(), 0);
        assert!(w.write_all(&[1]).is_err());
        assert!(w.write_obj(0xffff_ffff_ffff_ffffu64).is_err());
        // Every byte of the window: writable stream, readable pattern, or canary.
        let mut mem_now = vec![0u8; window.1 as usize];
        h.mem.read_slice(&mut mem_now, GuestAddress(window.0)).unwrap();
        let mut expect = vec![CANARY; window.1 as usize];
        let mut stream = 0usize;
        for b in &bufs {
            for i in 0..b.len as usize {
                let off = (b.addr - window.0) as usize + i;
                expect[off] = if !b.writable {
                    READABLE
                } else if stream < skip {
                    CANARY
                } else {
                    data[stream - skip]
                };
                if b.writable {
                    stream += 1;
                }
            }
        }
        assert_eq!(stream, cap);
        if let Some(i) = (0..expect.len()).find(|&i| mem_now[i] != expect[i]) {
            let at = window.0 + i as u64;
            panic!("guest byte at {at:#x} is {:#x}, expected {:#x}", mem_now[i], expect[i]);
        }
    }
}
