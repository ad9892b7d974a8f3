// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Differential property tests: virtio-core's device-side split queue against virtio-queue
//! 0.18 (`Queue` + `pop_descriptor_chain`), both reading the same guest memory, laid out
//! with virtio-queue's `MockSplitQueue` and raw descriptor writes.
//!
//! For valid chains (direct, indirect, direct-then-indirect, zero-length buffers, buffers
//! crossing a guest memory region boundary, indirect tables crossing one) both must yield
//! the same heads, the same buffers in the same order and the same readable / writable
//! lengths. For every malformed chain virtio-core must return the typed [`Error`] named
//! below, where virtio-queue is silent (ends the chain early, yields nothing, or accepts it).
//!
//! Legitimate differences, asserted as such below:
//! - virtio-core leaves zero-length buffers out of `segments()` and splits a buffer that
//!   crosses a guest memory region boundary into one segment per region; virtio-queue
//!   yields descriptors. The comparison normalises virtio-queue's side the same way.
//! - virtio-queue's chain iterator never checks buffer addresses (its `Reader`/`Writer`
//!   constructors do); virtio-core rejects a buffer outside guest memory at pop time.
//! - virtio-queue ignores NEXT on a descriptor that has INDIRECT, and has no notion of
//!   VIRTIO_F_INDIRECT_DESC; virtio-core rejects both (§2.7.5.3.1).
//! - virtio-queue does not check that readable buffers precede writable ones (its `Reader`
//!   and `Writer` just filter by flag); virtio-core rejects the chain (§2.7.4.2).
//! - A descriptor loop: virtio-queue yields exactly `queue size` (or indirect table
//!   length) descriptors and stops; virtio-core reports `ChainTooLong`.
//! - Both accept an indirect table with more entries than the queue size (up to 65535),
//!   as QEMU and Linux vhost do, although virtio 1.2 §2.7.5.3.1 tells drivers not to build
//!   chains longer than the queue size.
//! - Zero-length buffers are never translated by virtio-core, so their address is not
//!   checked (nothing is ever accessed through them).
//!
//! virtio-queue has no packed ring; the packed layout is checked against a model in
//! `ring_model.rs`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::sync::Arc;

use proptest::prelude::*;
use virtio_core::{Error, GuestMemoryView, Queue, QueueConfig, RingLayout, Segment};
use virtio_queue::desc::split::Descriptor as VqDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue as VqQueue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Rings and indirect tables live in region 0; buffers in regions 1 and 2, which are
/// adjacent (a buffer may cross 0x20000, where virtio-core splits it); then a hole
/// (0x30000..0x40000); then a small region.
const REGIONS: [(u64, u64); 4] = [
    (0x0, 0x10000),
    (0x10000, 0x10000),
    (0x20000, 0x10000),
    (0x40000, 0x1000),
];
const BUF_START: u64 = 0x10000;
const BUF_END: u64 = 0x30000;
const REGION_BOUNDARY: u64 = 0x20000;
const HOLE: u64 = 0x30000;
/// Indirect table `k` lives at `TABLES + k * TABLE_STRIDE` (64 entries each).
const TABLES: u64 = 0x4000;
const TABLE_STRIDE: u64 = 0x400;
/// An indirect table crossing the region boundary: 4 entries in region 1, the rest in 2.
const STRADDLING_TABLE: u64 = REGION_BOUNDARY - 0x40;
/// virtio-core's used ring (sizes up to 64 fit the small region).
const CORE_USED_RING: u64 = 0x40000;

fn memory() -> Mem {
    let ranges: Vec<_> = REGIONS
        .iter()
        .map(|&(a, l)| (GuestAddress(a), l as usize))
        .collect();
    Mem::from_ranges(&ranges).unwrap()
}

/// A tiny deterministic generator for permutations (the randomness comes from proptest).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0 | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Buf {
    addr: u64,
    len: u32,
    writable: bool,
}

/// A chain as the driver means it: direct descriptors, then optionally one descriptor
/// pointing to an indirect table.
#[derive(Clone, Debug)]
struct Chain {
    direct: Vec<Buf>,
    table: Option<Vec<Buf>>,
    /// WRITE on the descriptor pointing to the table (the device must ignore it).
    indirect_write_flag: bool,
}

impl Chain {
    fn ring_slots(&self) -> usize {
        self.direct.len() + usize::from(self.table.is_some())
    }

    fn logical(&self) -> Vec<Buf> {
        let mut v = self.direct.clone();
        v.extend(self.table.iter().flatten().copied());
        v
    }

    /// Moves the direct buffers into the indirect table (one ring slot).
    fn make_indirect(&mut self) {
        let mut t = std::mem::take(&mut self.direct);
        t.extend(self.table.take().into_iter().flatten());
        self.table = Some(t);
    }
}

#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// Where and how a chain was written.
#[derive(Debug)]
struct Written {
    head: u16,
    /// (table index, descriptor) for the direct descriptors, then the indirect one.
    ring: Vec<(u16, Desc)>,
    table_addr: u64,
    /// Table position of logical table entry `j`.
    pos: Vec<u16>,
    /// Descriptors by table position.
    table: Vec<Desc>,
}

fn lay_out(chain: &Chain, idx: &[u16], table_addr: u64, rng: &mut XorShift) -> Written {
    let n = chain.direct.len();
    let mut ring = Vec::new();
    for (i, b) in chain.direct.iter().enumerate() {
        let has_next = i + 1 < n || chain.table.is_some();
        ring.push((
            idx[i],
            Desc {
                addr: b.addr,
                len: b.len,
                flags: if b.writable { F_WRITE } else { 0 } | if has_next { F_NEXT } else { 0 },
                next: if has_next { idx[i + 1] } else { 0 },
            },
        ));
    }
    let mut pos = Vec::new();
    let mut table = Vec::new();
    if let Some(t) = &chain.table {
        let m = t.len();
        ring.push((
            idx[n],
            Desc {
                addr: table_addr,
                len: 16 * m as u32,
                flags: F_INDIRECT
                    | if chain.indirect_write_flag {
                        F_WRITE
                    } else {
                        0
                    },
                next: 0,
            },
        ));
        // Entry 0 comes first (§2.7.5.3.2); the others anywhere in the table.
        let mut rest: Vec<u16> = (1..m as u16).collect();
        rng.shuffle(&mut rest);
        pos.push(0);
        pos.extend(rest);
        table = vec![
            Desc {
                addr: 0,
                len: 0,
                flags: 0,
                next: 0
            };
            m
        ];
        for (j, b) in t.iter().enumerate() {
            let last = j + 1 == m;
            table[usize::from(pos[j])] = Desc {
                addr: b.addr,
                len: b.len,
                flags: if b.writable { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT },
                next: if last { 0 } else { pos[j + 1] },
            };
        }
    }
    Written {
        head: idx[0],
        ring,
        table_addr,
        pos,
        table,
    }
}

fn raw(d: Desc) -> RawDescriptor {
    RawDescriptor::from(VqDescriptor::new(d.addr, d.len, d.flags, d.next))
}

fn write_chain(mem: &Mem, vq: &MockSplitQueue<'_, Mem>, w: &Written) {
    for &(i, d) in &w.ring {
        vq.desc_table().store(i, raw(d)).unwrap();
    }
    for (p, &d) in w.table.iter().enumerate() {
        let addr = w.table_addr + 16 * p as u64;
        // A table placed partly outside guest memory on purpose: write what fits.
        let _ = mem.write_obj(raw(d), GuestAddress(addr));
    }
}

/// How virtio-core must fail on the malformed chain of a case.
#[derive(Clone, Debug)]
enum Defect {
    NextOutOfRange { at: usize, excess: u16 },
    Loop { back: usize },
    IndirectWithNext { next: u16 },
    NestedIndirect { at: usize },
    IndirectLen { kind: u8, r: u32 },
    ReadableAfterWritable { at: usize, len: u32, addr: u64 },
    OutsideMemory { at: usize, kind: u8, x: u32 },
    TableOutsideMemory { kind: u8, k: usize },
    HeadOutOfRange { x: u16 },
    IndirectNotNegotiated,
    AvailOverrun { x: u16 },
}

/// What virtio-queue does with the malformed chain.
#[derive(Debug)]
enum VqExpect {
    /// Yields exactly these buffers, then ends without complaint.
    Yields(Vec<Buf>),
    /// Yields these buffers, but its `Reader` or `Writer` constructor fails.
    YieldsButRwFails(Vec<Buf>),
    /// Returns no chain at all.
    NoChain,
}

#[derive(Clone, Debug)]
struct Case {
    size: u16,
    start: u16,
    chains: Vec<Chain>,
    defect: Option<Defect>,
    straddle: bool,
    seed: u64,
}

/// Guest buffer placement: anywhere, across the region boundary, or zero-length.
fn arb_span() -> impl Strategy<Value = (u64, u32)> {
    prop_oneof![
        4 => (1u32..=0x2000).prop_flat_map(|len| {
            (BUF_START..=BUF_END - u64::from(len)).prop_map(move |a| (a, len))
        }),
        2 => (2u32..=0x2000).prop_flat_map(|len| {
            (1..u64::from(len)).prop_map(move |x| (REGION_BOUNDARY - x, len))
        }),
        1 => (BUF_START..BUF_END).prop_map(|a| (a, 0)),
    ]
}

/// A valid chain of `d` direct and `t` table buffers (t == 0: no table), readable first.
fn arb_chain_of(d: usize, t: usize) -> impl Strategy<Value = Chain> {
    (
        proptest::collection::vec(arb_span(), d + t),
        0..=d + t,
        any::<bool>(),
    )
        .prop_map(move |(spans, readable, wflag)| {
            let bufs: Vec<Buf> = spans
                .iter()
                .enumerate()
                .map(|(i, &(addr, len))| Buf {
                    addr,
                    len,
                    writable: i >= readable,
                })
                .collect();
            Chain {
                direct: bufs[..d].to_vec(),
                table: (t > 0).then(|| bufs[d..].to_vec()),
                indirect_write_flag: wflag,
            }
        })
}

fn arb_chain() -> impl Strategy<Value = Chain> {
    prop_oneof![
        (1usize..=4).prop_map(|d| (d, 0usize)),
        (1usize..=8).prop_map(|t| (0usize, t)),
        (1usize..=3, 1usize..=8),
    ]
    .prop_flat_map(|(d, t)| arb_chain_of(d, t))
}

fn arb_defect() -> impl Strategy<Value = Defect> {
    prop_oneof![
        (any::<usize>(), any::<u16>())
            .prop_map(|(at, excess)| Defect::NextOutOfRange { at, excess }),
        any::<usize>().prop_map(|back| Defect::Loop { back }),
        any::<u16>().prop_map(|next| Defect::IndirectWithNext { next }),
        any::<usize>().prop_map(|at| Defect::NestedIndirect { at }),
        (0u8..3, 1u32..16).prop_map(|(kind, r)| Defect::IndirectLen { kind, r }),
        (any::<usize>(), 0u32..0x100, any::<u64>())
            .prop_map(|(at, len, addr)| Defect::ReadableAfterWritable { at, len, addr }),
        (any::<usize>(), 0u8..5, any::<u32>()).prop_map(|(at, kind, x)| Defect::OutsideMemory {
            at,
            kind,
            x
        }),
        (0u8..2, any::<usize>()).prop_map(|(kind, k)| Defect::TableOutsideMemory { kind, k }),
        any::<u16>().prop_map(|x| Defect::HeadOutOfRange { x }),
        Just(Defect::IndirectNotNegotiated),
        any::<u16>().prop_map(|x| Defect::AvailOverrun { x }),
    ]
}

fn arb_case(defect: BoxedStrategy<Option<Defect>>) -> impl Strategy<Value = Case> {
    (
        0u32..=6,
        prop_oneof![any::<u16>(), (0xfff0u16..=0xffff)],
        proptest::collection::vec(arb_chain(), 1..=3),
        defect,
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(log, start, chains, defect, straddle, seed)| Case {
            size: 1 << log,
            start,
            chains,
            defect,
            straddle,
            seed,
        })
}

/// Splits buffers the way virtio-core reports them: zero-length ones dropped, one segment
/// per guest memory region crossed.
fn normalise(bufs: &[Buf]) -> Vec<Segment> {
    let mut out = Vec::new();
    for b in bufs.iter().filter(|b| b.len > 0) {
        let mut addr = b.addr;
        let end = b.addr + u64::from(b.len);
        while addr < end {
            let region_end = REGIONS
                .iter()
                .map(|&(s, l)| s + l)
                .filter(|&e| e > addr)
                .min()
                .unwrap_or(end);
            let piece_end = end.min(region_end);
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

fn vq_buffers(chain: &virtio_queue::DescriptorChain<&Mem>) -> Vec<Buf> {
    chain
        .clone()
        .map(|d| Buf {
            addr: d.addr().0,
            len: d.len(),
            writable: d.is_write_only(),
        })
        .collect()
}

fn sum_len(bufs: &[Buf], writable: bool) -> u32 {
    bufs.iter()
        .filter(|b| b.writable == writable)
        .map(|b| b.len)
        .sum()
}

/// Pops one valid chain from both implementations and compares them with `expected`.
fn pop_and_compare(
    mem: &Mem,
    vq_queue: &mut VqQueue,
    queue: &mut Queue,
    expected: &Chain,
    head: u16,
) {
    let bufs = expected.logical();
    let vq_chain = vq_queue
        .pop_descriptor_chain(mem)
        .expect("virtio-queue: chain");
    assert_eq!(vq_chain.head_index(), head);
    assert_eq!(vq_buffers(&vq_chain), bufs, "virtio-queue read the chain");
    let reader = vq_chain.clone().reader(mem).unwrap();
    let writer = vq_chain.writer(mem).unwrap();

    let chain = queue.pop().unwrap().expect("virtio-core: chain");
    assert_eq!(chain.id(), head);
    assert_eq!(chain.segments().collect::<Vec<_>>(), normalise(&bufs));
    assert_eq!(chain.readable_len() as usize, reader.available_bytes());
    assert_eq!(chain.writable_len() as usize, writer.available_bytes());
    assert_eq!(chain.readable_len(), sum_len(&bufs, false));
    assert_eq!(chain.writable_len(), sum_len(&bufs, true));
    assert_eq!(chain.descriptor_count() as usize, bufs.len());
    assert_eq!(usize::from(chain.ring_slots()), expected.ring_slots());
}

/// First readable buffer after a writable one, in chain order.
fn first_readable_after_writable(bufs: &[Buf]) -> Option<u64> {
    let w = bufs.iter().position(|b| b.writable)?;
    bufs[w..].iter().find(|b| !b.writable).map(|b| b.addr)
}

/// Walks `bufs` following a loop back to `back` after the last one, `n` steps.
fn loop_walk(bufs: &[Buf], back: usize, n: usize) -> Vec<Buf> {
    let mut out = Vec::new();
    let mut i = 0;
    while out.len() < n {
        out.push(bufs[i]);
        i = if i + 1 == bufs.len() { back } else { i + 1 };
    }
    out
}

fn run_case(case: &Case) {
    let size = case.size;
    let mut rng = XorShift(case.seed);
    let mut chains = case.chains.clone();
    let defect = case.defect.clone();

    // Per-defect requirements on the chains.
    match &defect {
        Some(Defect::AvailOverrun { .. }) => chains.truncate(1),
        Some(Defect::IndirectNotNegotiated) => {
            let last = chains.pop().unwrap();
            chains.retain(|c| c.table.is_none());
            chains.push(last);
        }
        _ => {}
    }
    // Fit the chains into the descriptor table.
    let mut capacity = usize::from(size);
    let mut fitted = Vec::new();
    for mut c in chains {
        if c.ring_slots() > capacity && capacity > 0 {
            if c.table.is_some() {
                c.make_indirect();
            } else {
                c.direct.truncate(capacity);
            }
        }
        if c.ring_slots() <= capacity && c.ring_slots() > 0 {
            capacity -= c.ring_slots();
            fitted.push(c);
        }
    }
    let mut chains = fitted;
    let last = chains.last_mut().unwrap();
    let needs_table = matches!(
        defect,
        Some(
            Defect::IndirectWithNext { .. }
                | Defect::NestedIndirect { .. }
                | Defect::IndirectLen { .. }
                | Defect::TableOutsideMemory { .. }
                | Defect::IndirectNotNegotiated
        )
    );
    if needs_table && last.table.is_none() {
        last.make_indirect();
    }
    if let Some(Defect::Loop { .. }) = defect {
        // Loops are about length: keep the buffers readable so the only error is the loop.
        for b in last
            .direct
            .iter_mut()
            .chain(last.table.iter_mut().flatten())
        {
            b.writable = false;
        }
    }
    if let Some(Defect::ReadableAfterWritable { at, len, addr }) = defect {
        let bad = Buf {
            addr: BUF_START + addr % (0x20000 - u64::from(len)),
            len,
            writable: false,
        };
        if last.table.is_none() && last.direct.len() >= 2 {
            let n = last.direct.len();
            let w = &mut last.direct[n - 2];
            w.writable = true;
            w.len = w.len.max(1);
            last.direct[n - 1] = bad;
        } else {
            if last.table.is_none() {
                last.make_indirect();
            }
            let d = last.direct.len();
            let all = last.logical();
            let w = match all.iter().position(|b| b.writable && b.len > 0) {
                Some(w) => w,
                None => {
                    // Make the last buffer a non-empty writable one.
                    let t = last.table.as_mut().unwrap();
                    let b = t.last_mut().unwrap();
                    b.writable = true;
                    b.len = b.len.max(1);
                    d + t.len() - 1
                }
            };
            let t = last.table.as_mut().unwrap();
            let lo = if w >= d { w - d + 1 } else { 0 };
            let p = lo + at % (t.len() - lo + 1);
            t.insert(p, bad);
        }
    }

    let mem = memory();
    let vq = MockSplitQueue::new(&mem, size);
    let mut idx: Vec<u16> = (0..size).collect();
    rng.shuffle(&mut idx);
    let mut next_idx = 0;
    let mut first_table = true;
    let mut written = Vec::new();
    for (k, c) in chains.iter().enumerate() {
        let slots = c.ring_slots();
        let table_addr = if c.table.is_some() && first_table && case.straddle {
            STRADDLING_TABLE
        } else {
            TABLES + k as u64 * TABLE_STRIDE
        };
        if c.table.is_some() {
            first_table = false;
        }
        written.push(lay_out(
            c,
            &idx[next_idx..next_idx + slots],
            table_addr,
            &mut rng,
        ));
        next_idx += slots;
    }

    // Apply the defect to the last chain and work out both implementations' answers.
    let last_chain = chains.last().unwrap().clone();
    let w = written.last_mut().unwrap();
    let logical = last_chain.logical();
    let direct = last_chain.direct.clone();
    let m = last_chain.table.as_ref().map_or(0, Vec::len);
    let mut indirect_desc = true;
    let mut avail_idx = case.start.wrapping_add(chains.len() as u16);
    let (vq_expect, core_expect): (VqExpect, Option<Error>) = match defect {
        None => (VqExpect::Yields(logical.clone()), None),
        Some(Defect::NextOutOfRange { at, excess }) => {
            if !direct.is_empty() {
                let at = at % direct.len();
                let next = (u32::from(size) + u32::from(excess) % (65536 - u32::from(size))) as u16;
                let (index, d) = &mut w.ring[at];
                d.flags |= F_NEXT;
                d.next = next;
                (
                    VqExpect::Yields(direct[..=at].to_vec()),
                    Some(Error::NextOutOfRange {
                        index: *index,
                        next,
                        table_len: u32::from(size),
                    }),
                )
            } else {
                let at = at % m;
                let next = (m as u32 + u32::from(excess) % (65536 - m as u32)) as u16;
                let d = &mut w.table[usize::from(w.pos[at])];
                d.flags |= F_NEXT;
                d.next = next;
                (
                    VqExpect::Yields(logical[..=at].to_vec()),
                    Some(Error::NextOutOfRange {
                        index: w.pos[at],
                        next,
                        table_len: m as u32,
                    }),
                )
            }
        }
        Some(Defect::Loop { back }) => {
            if m == 0 {
                let n = direct.len();
                let back = back % n;
                let target = w.ring[back].0;
                let d = &mut w.ring[n - 1].1;
                d.flags |= F_NEXT;
                d.next = target;
                (
                    VqExpect::Yields(loop_walk(&direct, back, usize::from(size))),
                    Some(Error::ChainTooLong {
                        max: u32::from(size),
                    }),
                )
            } else {
                let t = last_chain.table.clone().unwrap();
                let back = back % m;
                let target = w.pos[back];
                let d = &mut w.table[usize::from(w.pos[m - 1])];
                d.flags |= F_NEXT;
                d.next = target;
                let mut yields = direct.clone();
                yields.extend(loop_walk(&t, back, m));
                (
                    VqExpect::Yields(yields),
                    Some(Error::ChainTooLong { max: m as u32 }),
                )
            }
        }
        Some(Defect::IndirectWithNext { next }) => {
            let d = &mut w.ring.last_mut().unwrap().1;
            d.flags |= F_NEXT;
            d.next = next % size;
            (
                VqExpect::Yields(logical.clone()),
                Some(Error::IndirectWithNext),
            )
        }
        Some(Defect::NestedIndirect { at }) => {
            let at = at % m;
            let d = &mut w.table[usize::from(w.pos[at])];
            d.flags |= F_INDIRECT;
            (
                VqExpect::Yields(logical[..direct.len() + at].to_vec()),
                Some(Error::NestedIndirect),
            )
        }
        Some(Defect::IndirectLen { kind, r }) => {
            let len = match kind {
                0 => 0,
                1 => 16 * m as u32 + r,
                _ => 16 * 65536,
            };
            w.ring.last_mut().unwrap().1.len = len;
            (
                VqExpect::Yields(direct.clone()),
                Some(Error::InvalidIndirectLength(len)),
            )
        }
        Some(Defect::ReadableAfterWritable { .. }) => {
            let addr = first_readable_after_writable(&logical).expect("a misordered chain");
            (
                VqExpect::Yields(logical.clone()),
                Some(Error::ReadableAfterWritable { addr }),
            )
        }
        Some(Defect::OutsideMemory { at, kind, x }) => {
            let at = at % logical.len();
            let (addr, len) = match kind {
                0 => (HOLE + u64::from(x % 0x8000), 1 + x % 0x1000),
                1 => {
                    let before = 1 + u64::from(x % 0x100);
                    (HOLE - before, before as u32 + 1 + x % 0x100)
                }
                2 => (u64::MAX - u64::from(x % 0x100), x % 0x100 + 2),
                3 => (0x1_0000_0000 + u64::from(x), 1 + x % 0x1000),
                _ => (0x41000 - 1, 2),
            };
            let writable = logical[at].writable;
            let mut bufs = logical.clone();
            bufs[at] = Buf {
                addr,
                len,
                writable,
            };
            let d = if at < direct.len() {
                &mut w.ring[at].1
            } else {
                &mut w.table[usize::from(w.pos[at - direct.len()])]
            };
            d.addr = addr;
            d.len = len;
            (
                VqExpect::YieldsButRwFails(bufs),
                Some(Error::BufferOutsideMemory {
                    addr,
                    len: u64::from(len),
                }),
            )
        }
        Some(Defect::TableOutsideMemory { kind, k }) => {
            let (addr, inside) = if kind == 0 || m < 2 {
                (HOLE + 0x100, 0)
            } else {
                let k = 1 + k % (m - 1);
                (HOLE - 16 * k as u64, k)
            };
            w.table_addr = addr;
            w.ring.last_mut().unwrap().1.addr = addr;
            // virtio-queue reads entries until the first one outside memory.
            let mut yields = direct.clone();
            let t = last_chain.table.clone().unwrap();
            for (j, b) in t.iter().enumerate() {
                if usize::from(w.pos[j]) >= inside {
                    break;
                }
                yields.push(*b);
            }
            (
                VqExpect::Yields(yields),
                Some(Error::BufferOutsideMemory {
                    addr,
                    len: 16 * m as u64,
                }),
            )
        }
        Some(Defect::HeadOutOfRange { x }) => {
            let head = (u32::from(size) + u32::from(x) % (65536 - u32::from(size))) as u16;
            w.head = head;
            (
                VqExpect::Yields(Vec::new()),
                Some(Error::HeadOutOfRange { head, size }),
            )
        }
        Some(Defect::IndirectNotNegotiated) => {
            indirect_desc = false;
            (
                VqExpect::Yields(logical.clone()),
                Some(Error::IndirectNotNegotiated),
            )
        }
        Some(Defect::AvailOverrun { x }) => {
            let excess = u32::from(size) + 1 + u32::from(x) % (65535 - u32::from(size));
            avail_idx = case.start.wrapping_add(excess as u16);
            (
                VqExpect::NoChain,
                Some(Error::AvailIndexOverrun {
                    avail_idx,
                    next_avail: case.start,
                }),
            )
        }
    };

    for w in &written {
        write_chain(&mem, &vq, w);
    }
    for (k, w) in written.iter().enumerate() {
        let slot = case.start.wrapping_add(k as u16) % size;
        vq.avail()
            .ring()
            .ref_at(usize::from(slot))
            .unwrap()
            .store(w.head.to_le());
    }
    vq.avail().idx().store(avail_idx.to_le());

    let mut vq_queue: VqQueue = vq.create_queue().unwrap();
    vq_queue.set_next_avail(case.start);
    let view = Arc::new(GuestMemoryView::new(Arc::new(mem.clone())).unwrap());
    let config = QueueConfig {
        layout: RingLayout::Split,
        size,
        desc_table: vq.desc_table_addr().0,
        driver_area: vq.avail_addr().0,
        // virtio-queue 0.18's MockSplitQueue lays its used ring over the avail ring
        // (`SplitQueueRing::end` counts elements, not bytes); virtio-core reads the used
        // idx, so it gets a used ring of its own in the small region.
        device_area: CORE_USED_RING,
        event_idx: false,
        indirect_desc,
    };
    // A consistent restored state: nothing in flight, so the used idx equals next_avail
    // (split `set_vring_base` counts the chains between them as in flight).
    mem.write_obj(case.start.to_le(), GuestAddress(CORE_USED_RING + 2))
        .unwrap();
    let mut queue = Queue::new(config, view).unwrap();
    queue.set_vring_base(u32::from(case.start)).unwrap();

    let n = chains.len();
    let valid = if core_expect.is_some() { n - 1 } else { n };
    for (c, w) in chains.iter().zip(&written).take(valid) {
        pop_and_compare(&mem, &mut vq_queue, &mut queue, c, w.head);
    }
    let Some(err) = core_expect else {
        assert!(vq_queue.pop_descriptor_chain(&mem).is_none());
        assert!(queue.pop().unwrap().is_none());
        return;
    };

    match vq_expect {
        VqExpect::NoChain => {
            assert!(vq_queue.iter(&mem).is_err());
            assert!(vq_queue.pop_descriptor_chain(&mem).is_none());
        }
        VqExpect::Yields(bufs) => {
            let c = vq_queue
                .pop_descriptor_chain(&mem)
                .expect("virtio-queue chain");
            assert_eq!(c.head_index(), written[n - 1].head);
            assert_eq!(vq_buffers(&c), bufs, "virtio-queue's reading of {err:?}");
        }
        VqExpect::YieldsButRwFails(bufs) => {
            let c = vq_queue
                .pop_descriptor_chain(&mem)
                .expect("virtio-queue chain");
            assert_eq!(vq_buffers(&c), bufs);
            assert!(c.clone().reader(&mem).is_err() || c.writer(&mem).is_err());
        }
    }
    assert_eq!(queue.pop().unwrap_err(), err);
    assert!(queue.is_broken());
    assert_eq!(queue.pop().unwrap_err(), Error::Broken);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    /// Valid chains: same heads, buffers (in order, with direction) and lengths.
    #[test]
    fn valid_split_chains_match_virtio_queue(case in arb_case(Just(None).boxed())) {
        run_case(&case);
    }

    /// Malformed chains: virtio-core's typed error, where virtio-queue ends the chain
    /// early, yields nothing, or accepts it (see the module documentation).
    #[test]
    fn invalid_split_chain_is_a_typed_error_where_virtio_queue_is_silent(
        case in arb_case(arb_defect().prop_map(Some).boxed())
    ) {
        run_case(&case);
    }
}

/// A single split queue over `mem` with its rings at 0, indirect descriptors negotiated.
fn both_queues(mem: &Mem, size: u16) -> (MockSplitQueue<'_, Mem>, VqQueue, Queue) {
    let vq = MockSplitQueue::new(mem, size);
    let vq_queue: VqQueue = vq.create_queue().unwrap();
    let view = Arc::new(GuestMemoryView::new(Arc::new(mem.clone())).unwrap());
    let config = QueueConfig {
        layout: RingLayout::Split,
        size,
        desc_table: vq.desc_table_addr().0,
        driver_area: vq.avail_addr().0,
        device_area: vq.used_addr().0,
        event_idx: false,
        indirect_desc: true,
    };
    let queue = Queue::new(config, view).unwrap();
    (vq, vq_queue, queue)
}

fn publish(vq: &MockSplitQueue<'_, Mem>, descs: &[(u16, Desc)], head: u16) {
    for &(i, d) in descs {
        vq.desc_table().store(i, raw(d)).unwrap();
    }
    vq.avail().ring().ref_at(0).unwrap().store(head);
    vq.avail().idx().store(1);
}

/// §2.7.5.2: a chain of more than 2^32 - 1 bytes. virtio-queue silently ends the chain
/// when the byte count would overflow; virtio-core says `ChainTooLarge`.
#[test]
fn split_chain_over_4_gib_is_too_large_where_virtio_queue_truncates() {
    const BIG: u64 = 0x1_0000_0000;
    // A 4 GiB region, mapped MAP_NORESERVE: no page of it is ever touched.
    let mem = Mem::from_ranges(&[
        (GuestAddress(0), 0x10000),
        (GuestAddress(BIG), 0x1_0000_0000),
    ])
    .unwrap();
    let (vq, mut vq_queue, mut queue) = both_queues(&mem, 4);
    let half = 0x8000_0000u32;
    publish(
        &vq,
        &[
            (
                0,
                Desc {
                    addr: BIG,
                    len: half,
                    flags: F_NEXT,
                    next: 1,
                },
            ),
            (
                1,
                Desc {
                    addr: BIG + u64::from(half),
                    len: half,
                    flags: 0,
                    next: 0,
                },
            ),
        ],
        0,
    );
    let c = vq_queue.pop_descriptor_chain(&mem).unwrap();
    assert_eq!(
        vq_buffers(&c).len(),
        1,
        "virtio-queue ends the chain silently"
    );
    assert_eq!(queue.pop().unwrap_err(), Error::ChainTooLarge);
}

/// §2.7.4.2: a readable buffer after a *zero-length* writable one is still misordered
/// (virtio-queue accepts it). The generated chains above never put a zero-length writable
/// buffer before a readable one, so this case has its own test.
#[test]
fn split_readable_after_zero_length_writable_is_rejected() {
    let mem = memory();
    let (vq, _vq_queue, mut queue) = both_queues(&mem, 4);
    publish(
        &vq,
        &[
            (
                0,
                Desc {
                    addr: BUF_START,
                    len: 0,
                    flags: F_WRITE | F_NEXT,
                    next: 1,
                },
            ),
            (
                1,
                Desc {
                    addr: BUF_START + 0x100,
                    len: 16,
                    flags: 0,
                    next: 0,
                },
            ),
        ],
        0,
    );
    assert_eq!(
        queue
            .pop()
            .map(|c| c.map(|c| c.segments().collect::<Vec<_>>())),
        Err(Error::ReadableAfterWritable {
            addr: BUF_START + 0x100
        })
    );
}

/// Documents a legitimate difference: a zero-length buffer is never accessed, so
/// virtio-core does not check its address (virtio-queue's iterator does not either).
#[test]
fn zero_length_buffer_outside_memory_is_accepted_by_both() {
    let mem = memory();
    let (vq, mut vq_queue, mut queue) = both_queues(&mem, 2);
    publish(
        &vq,
        &[(
            0,
            Desc {
                addr: HOLE,
                len: 0,
                flags: F_WRITE,
                next: 0,
            },
        )],
        0,
    );
    let c = vq_queue.pop_descriptor_chain(&mem).unwrap();
    assert_eq!(vq_buffers(&c).len(), 1);
    let chain = queue.pop().unwrap().unwrap();
    assert_eq!(chain.segments().count(), 0);
    assert_eq!(chain.descriptor_count(), 1);
}

/// Documents a legitimate difference from §2.7.5.3.1's driver rule: both accept an
/// indirect table with more entries than the queue size (QEMU and Linux vhost do too),
/// while the ring itself never holds more than the queue size of a chain.
#[test]
fn indirect_table_longer_than_queue_size_is_accepted_by_both() {
    let mem = memory();
    let (vq, mut vq_queue, mut queue) = both_queues(&mem, 2);
    let entries = 40u16;
    for j in 0..entries {
        let last = j + 1 == entries;
        mem.write_obj(
            raw(Desc {
                addr: BUF_START + 0x100 * u64::from(j),
                len: 0x100,
                flags: if last { 0 } else { F_NEXT },
                next: if last { 0 } else { j + 1 },
            }),
            GuestAddress(TABLES + 16 * u64::from(j)),
        )
        .unwrap();
    }
    publish(
        &vq,
        &[(
            1,
            Desc {
                addr: TABLES,
                len: 16 * u32::from(entries),
                flags: F_INDIRECT,
                next: 0,
            },
        )],
        1,
    );
    assert_eq!(
        vq_buffers(&vq_queue.pop_descriptor_chain(&mem).unwrap()).len(),
        40
    );
    let chain = queue.pop().unwrap().unwrap();
    assert_eq!(chain.descriptor_count(), 40);
    assert_eq!(chain.ring_slots(), 1);
}
