// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A deterministic generator of seed inputs: valid and invalid ring states for both
//! layouts, built with virtio-core's driver side on a real guest memory whose changes are
//! recorded as `Write` commands, and a device-side mirror so that later driver steps see
//! the device's used entries.

use std::collections::VecDeque;
use std::sync::Arc;

use virtio_core::driver::{DriverBuffer, DriverQueue};
use virtio_core::{DescriptorChain, GuestMemoryView, Queue, RingLayout};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::format::{Encoder, HeaderSpec, Region};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// A raw 16-byte descriptor: (addr, len, u16 at 12, u16 at 14). For split rings the last
/// two are `flags, next`; for packed rings `id, flags`.
pub fn desc(addr: u64, len: u32, a: u16, b: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&a.to_le_bytes());
    d[14..16].copy_from_slice(&b.to_le_bytes());
    d
}

fn r(addr: u64, len: u32) -> DriverBuffer {
    DriverBuffer {
        addr,
        len,
        writable: false,
    }
}

fn w(addr: u64, len: u32) -> DriverBuffer {
    DriverBuffer {
        addr,
        len,
        writable: true,
    }
}

/// Records a seed: driver-side memory changes become `Write` commands, device operations
/// become commands and are mirrored on a virtio-core queue over the same memory.
pub struct Sim {
    /// Guest memory (the generator's copy).
    pub mem: GuestMemoryMmap<()>,
    /// The driver.
    pub driver: DriverQueue,
    /// Header fields (ring addresses as the driver laid them out).
    pub spec: HeaderSpec,
    regions: Vec<Region>,
    snapshot: Vec<Vec<u8>>,
    enc: Encoder,
    queue: Option<Queue>,
    chain: DescriptorChain,
    popped: VecDeque<(u16, u32)>,
}

impl Sim {
    /// A queue of `size` in `layout` with its rings at `ring_base` (4 KiB aligned), over
    /// `regions` (`(gap pages, pages)` each).
    pub fn new(
        layout: RingLayout,
        size: u16,
        event_idx: bool,
        indirect_desc: bool,
        regions: &[(u8, u8)],
        ring_base: u64,
    ) -> Self {
        let driver = DriverQueue::new(layout, size, ring_base, event_idx);
        let spec = HeaderSpec {
            event_idx,
            indirect_desc,
            size,
            regions: regions.to_vec(),
            desc_table: u32::try_from(driver.desc_table()).expect("small address"),
            driver_area: u32::try_from(driver.driver_area()).expect("small address"),
            device_area: u32::try_from(driver.device_area()).expect("small address"),
        };
        let regions = spec.layout();
        let ranges: Vec<_> = regions
            .iter()
            .map(|r| (GuestAddress(r.start), r.len as usize))
            .collect();
        let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).expect("regions");
        let snapshot = regions.iter().map(|r| vec![0u8; r.len as usize]).collect();
        let queue = GuestMemoryView::new(Arc::new(mem.clone()))
            .ok()
            .and_then(|v| Queue::new(driver.config(indirect_desc), Arc::new(v)).ok());
        let enc = Encoder::new(&spec);
        Sim {
            mem,
            driver,
            spec,
            regions,
            snapshot,
            enc,
            queue,
            chain: DescriptorChain::new(),
            popped: VecDeque::new(),
        }
    }

    /// Compares memory with the last snapshot; `emit`: record the changes as writes.
    fn sync(&mut self, emit: bool) {
        for (ri, reg) in self.regions.iter().enumerate() {
            let mut now = vec![0u8; reg.len as usize];
            self.mem
                .read_slice(&mut now, GuestAddress(reg.start))
                .expect("region");
            if emit {
                let old = &self.snapshot[ri];
                let mut i = 0;
                while i < now.len() {
                    if now[i] == old[i] {
                        i += 1;
                        continue;
                    }
                    // A run of changes, merging gaps of fewer than 8 unchanged bytes.
                    let start = i;
                    let mut end = i + 1;
                    let mut j = end;
                    while j < now.len() && j - end < 8 {
                        if now[j] != old[j] {
                            end = j + 1;
                        }
                        j += 1;
                    }
                    let addr = u32::try_from(reg.start + start as u64).expect("small address");
                    self.enc.write(addr, &now[start..end]);
                    i = end;
                }
            }
            self.snapshot[ri] = now;
        }
    }

    /// Runs driver steps and records what they wrote.
    pub fn driver(&mut self, f: impl FnOnce(&GuestMemoryMmap<()>, &mut DriverQueue)) -> &mut Self {
        f(&self.mem, &mut self.driver);
        self.sync(true);
        self
    }

    /// Adds a direct chain.
    pub fn chain(&mut self, bufs: &[DriverBuffer]) -> &mut Self {
        self.driver(|m, d| {
            d.add_chain(m, bufs).expect("room in the ring");
        })
    }

    /// Adds an indirect chain with its table at `table`.
    pub fn indirect(&mut self, table: u64, bufs: &[DriverBuffer]) -> &mut Self {
        self.driver(|m, d| {
            d.add_indirect_chain(m, table, bufs)
                .expect("room in the ring");
        })
    }

    /// Writes raw bytes (a hostile driver).
    pub fn raw(&mut self, addr: u64, bytes: &[u8]) -> &mut Self {
        self.driver(|m, _| m.write_slice(bytes, GuestAddress(addr)).expect("in memory"))
    }

    /// Records a raw `Repeat` command (not mirrored in the generator's memory).
    pub fn repeat(&mut self, addr: u32, count: u16, item: &[u8]) -> &mut Self {
        self.enc.repeat(addr, count, item);
        self
    }

    /// Device pops up to `max` chains.
    pub fn pop(&mut self, max: u16) -> &mut Self {
        self.enc.pop(max);
        if let Some(q) = &mut self.queue {
            for _ in 0..max {
                match q.pop_into(&mut self.chain) {
                    Ok(true) => self
                        .popped
                        .push_back((self.chain.id(), self.chain.writable_len())),
                    _ => break,
                }
            }
        }
        self.sync(false);
        self
    }

    /// Device completes up to `max` chains; the driver then reclaims them.
    pub fn complete(&mut self, max: u16, batch: bool, lifo: bool, full_len: bool) -> &mut Self {
        self.enc.complete(max, batch, lifo, full_len);
        let n = usize::from(max).min(self.popped.len());
        let done: Vec<_> = if lifo {
            (0..n).filter_map(|_| self.popped.pop_back()).collect()
        } else {
            self.popped.drain(..n).collect()
        };
        let used: Vec<_> = done
            .iter()
            .map(|&(id, len)| (id, if full_len { len } else { 0 }))
            .collect();
        if let Some(q) = &mut self.queue {
            if batch {
                let _ = q.add_used_batch(&used);
            } else {
                for &(id, len) in &used {
                    let _ = q.add_used(id, len);
                }
            }
        }
        self.sync(false);
        while let Ok(Some(_)) = self.driver.pop_used(&self.mem) {}
        self
    }

    /// Notification calls.
    pub fn notify(&mut self, bits: u8) -> &mut Self {
        self.enc.notify(bits);
        if let Some(q) = &mut self.queue {
            if bits & 1 != 0 {
                q.needs_notification();
            }
            if bits & 4 != 0 {
                q.disable_notification();
            }
            if bits & 2 != 0 {
                let _ = q.enable_notification();
            }
            if bits & 8 != 0 {
                let _ = q.has_available();
            }
        }
        self.sync(false);
        self
    }

    /// `set_vring_base` (only recorded; the mirror is not reset).
    pub fn set_base(&mut self, base: u32) -> &mut Self {
        self.enc.set_base(base);
        self
    }

    /// The encoded input.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.enc).finish()
    }
}

/// One region of `pages` pages at guest address 0.
const ONE: &[(u8, u8)] = &[(0, 16)];

/// Seeds shared by both layouts: `(name, input)`.
fn common(layout: RingLayout) -> Vec<(&'static str, Vec<u8>)> {
    let packed = layout == RingLayout::Packed;
    let mut out = Vec::new();

    // Valid direct chains of 1, 3 and 2 descriptors, zero-length buffer included.
    let mut s = Sim::new(layout, 16, true, false, ONE, 0);
    s.chain(&[r(0x8000, 64)])
        .chain(&[r(0x8100, 16), r(0x8200, 0), r(0x8300, 48), w(0x9000, 128)])
        .chain(&[w(0xa000, 512), w(0xa400, 8)])
        .pop(8)
        .complete(8, true, false, true)
        .notify(0xf);
    out.push(("valid-direct", s.finish()));

    // Valid indirect chain next to direct ones, completed one by one, newest first.
    let mut s = Sim::new(layout, 8, false, true, ONE, 0);
    s.chain(&[r(0x8000, 32), w(0x8100, 32)])
        .indirect(
            0xc000,
            &[r(0x8200, 10), r(0x8300, 20), w(0x8400, 30), w(0x8500, 40)],
        )
        .chain(&[w(0x8600, 1)])
        .pop(2)
        .complete(2, false, true, true)
        .pop(4)
        .notify(0x5)
        .complete(4, true, false, false);
    out.push(("valid-indirect", s.finish()));

    // Three adjacent regions: buffers crossing the first boundary, an indirect table
    // crossing the second.
    let mut s = Sim::new(layout, 8, true, true, &[(0, 4), (0, 4), (0, 4)], 0);
    s.chain(&[r(0x3ff0, 0x20), w(0x3000, 0x1800)])
        .indirect(0x7ff8, &[r(0x2000, 8), w(0x9000, 8)])
        .pop(4)
        .complete(4, true, false, true);
    out.push(("valid-cross-region", s.finish()));

    // Many rounds on a tiny ring: index and wrap-counter wrap-around, event suppression.
    let size = if packed { 3 } else { 4 };
    let mut s = Sim::new(layout, size, true, true, ONE, 0);
    for round in 0..24u64 {
        let base = 0x8000 + 0x100 * (round % 8);
        if round % 3 == 0 {
            s.driver(|m, d| {
                let at = d.avail_position();
                d.enable_interrupts(m, Some(at)).expect("memory");
            });
        }
        if round % 5 == 4 {
            s.indirect(0xc000 + 0x100 * (round % 4), &[r(base, 4), w(base + 8, 4)]);
        } else if round % 2 == 0 {
            s.chain(&[r(base, 8), w(base + 16, 8)]);
        } else {
            s.chain(&[w(base, 8)]);
        }
        s.pop(2)
            .notify(0xb)
            .complete(2, round % 2 == 0, round % 4 == 1, true);
    }
    s.notify(0x1);
    out.push(("valid-wrap", s.finish()));

    // A device reset half way (SET_VRING_BASE), then more chains.
    let mut s = Sim::new(layout, 8, false, false, ONE, 0);
    s.chain(&[r(0x8000, 8)]).chain(&[w(0x8100, 8)]).pop(1);
    s.set_base(if packed { 1 | 1 << 15 | 1 << 31 } else { 1 });
    s.complete(1, false, false, true).pop(4).notify(0x3);
    out.push(("reset", s.finish()));

    // Readable after writable.
    let mut s = Sim::new(layout, 8, false, false, ONE, 0);
    s.chain(&[r(0x8000, 8)])
        .chain(&[w(0x8100, 16), r(0x8200, 16)])
        .pop(4);
    out.push(("readable-after-writable", s.finish()));

    // A zero-length writable buffer before a readable one.
    let mut s = Sim::new(layout, 8, false, false, ONE, 0);
    s.chain(&[w(0x8100, 0), r(0x8200, 16)]).pop(4);
    out.push(("zero-writable-then-readable", s.finish()));

    // A buffer in the hole between two regions, after a valid chain.
    let mut s = Sim::new(layout, 8, false, false, &[(0, 4), (2, 4)], 0);
    s.chain(&[r(0x1000, 8)]).chain(&[r(0x3ff0, 0x20)]).pop(4);
    out.push(("outside-memory", s.finish()));

    // Indirect descriptors without VIRTIO_F_INDIRECT_DESC.
    let mut s = Sim::new(layout, 8, false, false, ONE, 0);
    s.indirect(0xc000, &[r(0x8000, 8)]).pop(2);
    out.push(("indirect-not-negotiated", s.finish()));

    // Nested indirect: an indirect table entry that is itself INDIRECT.
    let mut s = Sim::new(layout, 8, false, true, ONE, 0);
    s.indirect(0xc000, &[r(0x8000, 8), r(0xd000, 16)]);
    let flags_at = if packed { 14 } else { 12 };
    s.raw(0xc010 + flags_at, &F_INDIRECT.to_le_bytes()).pop(2);
    out.push(("nested-indirect", s.finish()));

    // Indirect table of a length that is not a multiple of 16.
    let mut s = Sim::new(layout, 8, false, true, ONE, 0);
    s.indirect(0xc000, &[r(0x8000, 8)]);
    let desc_len = s.driver.desc_table() + 8;
    s.raw(desc_len, &17u32.to_le_bytes()).pop(2);
    out.push(("indirect-bad-length", s.finish()));

    // INDIRECT together with NEXT.
    let mut s = Sim::new(layout, 8, false, true, ONE, 0);
    s.indirect(0xc000, &[r(0x8000, 8)]);
    let at = s.driver.desc_table() + if packed { 14 } else { 12 };
    let mut flags = [0u8; 2];
    s.mem
        .read_slice(&mut flags, GuestAddress(at))
        .expect("memory");
    let f = u16::from_le_bytes(flags) | F_NEXT;
    s.raw(at, &f.to_le_bytes()).pop(2);
    out.push(("indirect-with-next", s.finish()));

    // More than 4 GiB in one chain: an indirect table filling the memory, every entry the
    // whole memory (3 adjacent regions of 32 pages).
    let regions = [(0, 32), (0, 32), (0, 32)];
    let mut s = Sim::new(layout, 1, false, true, &regions, 0);
    let mem_len = 3 * 32 * 0x1000u32;
    let table = 0x2000u64;
    let entries = (mem_len - 0x2000) / 16;
    let head = if packed {
        desc(table, entries * 16, 0, F_INDIRECT | 1 << 7)
    } else {
        desc(table, entries * 16, F_INDIRECT, 0)
    };
    let entry = if packed {
        desc(0, mem_len, 0, 0)
    } else {
        desc(0, mem_len, F_NEXT, 1)
    };
    s.raw(s.driver.desc_table(), &head);
    if !packed {
        // avail ring: head 0, idx 1.
        let avail = s.driver.driver_area();
        s.raw(avail + 2, &1u16.to_le_bytes());
    }
    s.repeat(
        u32::try_from(table).unwrap_or(0),
        u16::try_from(entries).unwrap_or(u16::MAX),
        &entry,
    )
    .pop(1);
    out.push(("too-large", s.finish()));
    out
}

/// Split-only seeds.
fn split_only() -> Vec<(&'static str, Vec<u8>)> {
    let l = RingLayout::Split;
    let mut out = Vec::new();

    // A `next` loop: 0 -> 1 -> 0.
    let mut s = Sim::new(l, 8, false, false, ONE, 0);
    let avail = s.driver.driver_area();
    s.raw(0, &desc(0x8000, 8, F_NEXT, 1))
        .raw(16, &desc(0x8100, 8, F_NEXT, 0))
        .raw(avail + 2, &1u16.to_le_bytes())
        .pop(1);
    out.push(("loop", s.finish()));

    // A `next` outside the table.
    let mut s = Sim::new(l, 8, false, false, ONE, 0);
    let avail = s.driver.driver_area();
    s.raw(0, &desc(0x8000, 8, F_NEXT, 8))
        .raw(avail + 2, &1u16.to_le_bytes())
        .pop(1);
    out.push(("next-out-of-range", s.finish()));

    // A head index outside the table.
    let mut s = Sim::new(l, 8, false, false, ONE, 0);
    s.chain(&[r(0x8000, 8)]);
    let avail = s.driver.driver_area();
    s.raw(avail + 4, &9u16.to_le_bytes()).pop(1);
    out.push(("head-out-of-range", s.finish()));

    // avail idx more than a queue size ahead.
    let mut s = Sim::new(l, 8, false, false, ONE, 0);
    s.chain(&[r(0x8000, 8)]).pop(1);
    let avail = s.driver.driver_area();
    s.raw(avail + 2, &10u16.to_le_bytes()).notify(0x2).pop(1);
    out.push(("avail-overrun", s.finish()));

    // An indirect table whose `next` loops back (ChainTooLong inside the table).
    let mut s = Sim::new(l, 8, false, true, ONE, 0);
    s.indirect(0xc000, &[r(0x8000, 8), r(0x8100, 8)]);
    s.raw(0xc010, &desc(0x8100, 8, F_NEXT, 0)).pop(1);
    out.push(("indirect-loop", s.finish()));

    // The same head made available twice while in flight (a driver bug): both pop, and
    // the head can be returned once; the second add_used is NotInFlight.
    let mut s = Sim::new(l, 8, true, false, ONE, 0);
    s.chain(&[r(0x8000, 8)]);
    let avail = s.driver.driver_area();
    s.raw(avail + 6, &0u16.to_le_bytes())
        .raw(avail + 2, &2u16.to_le_bytes())
        .pop(4)
        .complete(4, false, false, false)
        .notify(0x1);
    out.push(("duplicate-head", s.finish()));
    out
}

/// Packed-only seeds.
fn packed_only() -> Vec<(&'static str, Vec<u8>)> {
    let l = RingLayout::Packed;
    let avail = 1u16 << 7;
    let mut out = Vec::new();

    // Every descriptor of the ring has NEXT: the chain never ends.
    let mut s = Sim::new(l, 4, false, false, ONE, 0);
    for i in 0..4u64 {
        s.raw(16 * i, &desc(0x8000 + 0x100 * i, 8, 0, avail | F_NEXT));
    }
    s.pop(1);
    out.push(("ring-long-chain", s.finish()));

    // Two available buffers with the same ID.
    let mut s = Sim::new(l, 4, false, false, ONE, 0);
    s.raw(0, &desc(0x8000, 8, 3, avail))
        .raw(16, &desc(0x8100, 8, 3, avail | F_WRITE))
        .pop(2);
    out.push(("id-in-use", s.finish()));

    // Event suppression in DESC mode and DISABLE, odd ring size.
    let mut s = Sim::new(l, 5, true, false, ONE, 0);
    for round in 0..12u64 {
        s.driver(|m, d| {
            if round % 4 == 3 {
                d.disable_interrupts(m).expect("memory");
            } else {
                let (off, wrap) = d.avail_position();
                d.enable_interrupts(m, Some(((off + 2) % 5, wrap)))
                    .expect("memory");
            }
        });
        s.chain(&[r(0x8000 + 0x40 * round, 16), w(0x9000, 16)])
            .chain(&[w(0xa000, 4)])
            .pop(3)
            .complete(2, round % 2 == 1, false, true)
            .notify(0x3);
    }
    out.push(("event-desc", s.finish()));
    out
}

/// Every seed for `layout`: `(file name, input)`.
pub fn seeds(layout: RingLayout) -> Vec<(String, Vec<u8>)> {
    let mut all = common(layout);
    all.extend(match layout {
        RingLayout::Split => split_only(),
        RingLayout::Packed => packed_only(),
    });
    all.into_iter()
        .enumerate()
        .map(|(i, (name, data))| (format!("seed-{i:02}-{name}"), data))
        .collect()
}

/// A split-ring input that makes the device pop 65536 chains (a zero-length chain at
/// descriptor 0, its head made available 256 times per round by a driver that never waits
/// for the used ring) without completing any: more chains in flight than a 16-bit count
/// holds. Each pop is individually valid.
pub fn split_in_flight_overflow() -> Vec<u8> {
    let s = Sim::new(RingLayout::Split, 256, false, false, &[(0, 4)], 0);
    let avail_idx = s.driver.driver_area() + 2;
    let mut enc = Encoder::new(&s.spec);
    for round in 1..=256u32 {
        let idx = u16::try_from((round * 256) & 0xffff).unwrap_or(0);
        enc.write(u32::try_from(avail_idx).unwrap_or(0), &idx.to_le_bytes());
        enc.pop(256);
    }
    enc.finish()
}

/// Like [`split_in_flight_overflow`], but the device completes everything it popped: the
/// driver makes head 0 available 256 times per round; the first `add_used(0)` of each
/// round succeeds and the other 255 are `NotInFlight` (the head is in flight once), yet
/// each of those pops stays counted in flight, so the count grows by 255 per round and
/// overflows in round 258.
pub fn split_in_flight_leak() -> Vec<u8> {
    let s = Sim::new(RingLayout::Split, 256, false, false, &[(0, 4)], 0);
    let avail_idx = s.driver.driver_area() + 2;
    let mut enc = Encoder::new(&s.spec);
    for round in 1..=260u32 {
        let idx = u16::try_from((round * 256) & 0xffff).unwrap_or(0);
        enc.write(u32::try_from(avail_idx).unwrap_or(0), &idx.to_le_bytes());
        enc.pop(256);
        enc.complete(256, false, false, false);
    }
    enc.finish()
}
