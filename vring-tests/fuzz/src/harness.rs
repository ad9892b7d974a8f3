// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The fuzz harness: builds guest memory and a virtio-core [`Queue`] from the input header,
//! runs the command stream, and checks after every device operation that virtio-core
//! agrees with the reference [`Model`] and keeps its invariants. Any disagreement is a
//! panic (a crash for libFuzzer).

use std::collections::{HashSet, VecDeque};
use std::io::{Read, Write};
use std::sync::Arc;

use virtio_core::{DescriptorChain, Error, GuestMemoryView, Queue, QueueConfig, RingLayout};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::format::{split_input, Cmd, Header, Region};
use crate::model::{Chain, Expect, Kind, Model};

/// Most pops per input (enough to wrap a 16-bit index once, and to push the in-flight
/// count of any queue past 2^16).
pub const MAX_POPS: usize = 1 << 17;
/// Most "work units" (descriptors walked, bytes copied / 256) per input, to keep every
/// input fast.
pub const MAX_WORK: u64 = 1 << 22;
/// Bytes of each chain read with `Reader` / written with `Writer`.
const RW_LIMIT: usize = 1 << 16;

/// One popped, not yet completed chain.
#[derive(Clone, Copy, Debug)]
struct Pending {
    id: u16,
    ring_slots: u16,
    writable_len: u32,
}

struct Harness {
    layout: RingLayout,
    mem: GuestMemoryMmap<()>,
    header: Header,
    /// Host address of each region's first byte.
    hosts: Vec<usize>,
    queue: Queue,
    chain: DescriptorChain,
    pending: VecDeque<Pending>,
    /// IDs in flight: packed buffer IDs; split head indexes (a head made available again
    /// while in flight is in flight once).
    ids_in_flight: HashSet<u16>,
    /// Split: chains in flight with unknown heads (restored by `set_vring_base`), which
    /// `add_used` accepts for any head not in `ids_in_flight`.
    unknown_in_flight: u16,
    /// The in-flight count virtio-core must report.
    in_flight: u32,
    pops: usize,
    work: u64,
    buf: Vec<u8>,
    expected: Vec<u8>,
    summary: Summary,
}

/// What one input did (for tests of the seeds).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// `Queue::new` failed.
    pub config_error: bool,
    /// Chains popped.
    pub popped: usize,
    /// Chains returned with add_used.
    pub completed: usize,
    /// Chain-parsing errors, in order (`Broken` not counted).
    pub errors: Vec<Kind>,
}

/// Runs one fuzz input against the given ring layout. Panics on any violated invariant.
pub fn run(layout: RingLayout, data: &[u8]) -> Summary {
    let (header, cmds) = split_input(data);
    let ranges: Vec<_> = header
        .regions
        .iter()
        .map(|r| (GuestAddress(r.start), usize::try_from(r.len).unwrap_or(0)))
        .collect();
    let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).expect("valid regions");
    let hosts = header
        .regions
        .iter()
        .map(|r| mem.get_host_address(GuestAddress(r.start)).expect("mapped") as usize)
        .collect();
    let view = Arc::new(GuestMemoryView::new(Arc::new(mem.clone())).expect("mmap-backed"));
    let config = QueueConfig {
        layout,
        size: header.size,
        desc_table: header.desc_table,
        driver_area: header.driver_area,
        device_area: header.device_area,
        event_idx: header.event_idx,
        indirect_desc: header.indirect_desc,
    };
    let queue = match Queue::new(config, view) {
        Ok(q) => q,
        Err(e) => {
            assert!(
                matches!(
                    e,
                    Error::InvalidSize { .. }
                        | Error::Misaligned { .. }
                        | Error::AreaOutsideMemory { .. }
                ),
                "Queue::new: unexpected error {e:?}"
            );
            assert!(!e.to_string().is_empty());
            return Summary {
                config_error: true,
                ..Summary::default()
            };
        }
    };
    let mut h = Harness {
        layout,
        mem,
        header,
        hosts,
        queue,
        chain: DescriptorChain::new(),
        pending: VecDeque::new(),
        ids_in_flight: HashSet::new(),
        unknown_in_flight: 0,
        in_flight: 0,
        pops: 0,
        work: 0,
        buf: Vec::new(),
        expected: Vec::new(),
        summary: Summary::default(),
    };
    for cmd in cmds {
        if h.pops >= MAX_POPS || h.work >= MAX_WORK {
            break;
        }
        h.command(cmd);
    }
    // Drain: pop what is left (bounded), then return everything.
    let bound = usize::from(h.header.size) + 2;
    for _ in 0..bound {
        if !h.pop_one() {
            break;
        }
    }
    let done = h.pending.drain(..).collect();
    h.complete(done, true, true);
    h.queue.needs_notification();
    h.summary
}

impl Harness {
    fn model(&self) -> Model<'_> {
        Model {
            mem: &self.mem,
            regions: &self.header.regions,
            size: self.header.size,
            desc_table: self.header.desc_table,
            driver_area: self.header.driver_area,
            indirect_desc: self.header.indirect_desc,
        }
    }

    fn region_of(&self, gpa: u64) -> Option<(usize, &Region)> {
        self.header
            .regions
            .iter()
            .enumerate()
            .find(|(_, r)| r.contains(gpa))
    }

    fn command(&mut self, cmd: Cmd<'_>) {
        match cmd {
            Cmd::Write { addr, data } => self.write(addr, data),
            Cmd::Repeat { addr, count, item } => {
                // Only as many repetitions as can land in guest memory.
                let end = self.header.regions.last().map_or(0, Region::end);
                let room = end.saturating_sub(addr).div_ceil(item.len() as u64);
                let count = usize::from(count).min(usize::try_from(room).unwrap_or(0));
                let data = item.repeat(count);
                self.write(addr, &data);
            }
            Cmd::Pop { max } => {
                for _ in 0..max {
                    if !self.pop_one() {
                        break;
                    }
                }
            }
            Cmd::Complete {
                max,
                batch,
                lifo,
                full_len,
            } => {
                let n = usize::from(max).min(self.pending.len());
                let done: Vec<Pending> = if lifo {
                    (0..n).filter_map(|_| self.pending.pop_back()).collect()
                } else {
                    self.pending.drain(..n).collect()
                };
                self.complete(done, batch, full_len);
            }
            Cmd::Notify { bits } => self.notify(bits),
            Cmd::SetBase { base } => self.set_base(base),
            Cmd::Nop => {}
        }
    }

    /// A driver write, clipped to guest memory (bytes outside every region are dropped).
    fn write(&mut self, addr: u64, data: &[u8]) {
        let end = addr + data.len() as u64;
        for r in &self.header.regions {
            let (s, e) = (addr.max(r.start), end.min(r.end()));
            if s < e {
                let off = usize::try_from(s - addr).unwrap_or(0);
                let len = usize::try_from(e - s).unwrap_or(0);
                self.mem
                    .write_slice(&data[off..off + len], GuestAddress(s))
                    .expect("inside a region");
            }
        }
        self.work += data.len() as u64 / 256;
    }

    /// Pops one chain and checks it against the model. Returns false when the queue had
    /// nothing, failed, or the budget is spent.
    fn pop_one(&mut self) -> bool {
        if self.pops >= MAX_POPS || self.work >= MAX_WORK {
            return false;
        }
        self.pops += 1;
        self.work += 1;
        let was_broken = self.queue.is_broken();
        let next_avail = self.queue.next_avail();
        let (available, expect) = if was_broken {
            (Some(false), Expect::Nothing)
        } else {
            match self.layout {
                RingLayout::Split => {
                    self.model()
                        .split(next_avail, &self.ids_in_flight, self.in_flight)
                }
                RingLayout::Packed => {
                    let e = self.model().packed(
                        next_avail,
                        self.queue.avail_wrap_counter(),
                        &self.ids_in_flight,
                    );
                    (Some(e != Expect::Nothing), e)
                }
            }
        };
        let r = self.queue.pop_into(&mut self.chain);
        match r {
            Err(e) if was_broken => {
                assert_eq!(e, Error::Broken, "a broken queue must only say Broken");
                false
            }
            Err(e) => {
                let kind = Kind::of(&e)
                    .unwrap_or_else(|| panic!("pop returned a non-parsing error {e:?}"));
                assert!(!e.to_string().is_empty());
                match (self.layout, kind) {
                    (RingLayout::Split, Kind::AvailIndexOverrun) => {
                        assert_eq!(available, None, "overrun, but the model sees the idx fine")
                    }
                    // (Split: virtio-core may walk a chain published by an avail idx it read
                    // earlier, so `available` is not checked here.)
                    _ => assert_eq!(expect, Expect::Error(kind), "virtio-core said {e:?}"),
                }
                assert!(self.queue.is_broken(), "an error must break the queue");
                assert_eq!(self.queue.pop_into(&mut self.chain), Err(Error::Broken));
                assert_eq!(self.queue.has_available(), Err(Error::Broken));
                assert_eq!(self.queue.enable_notification(), Err(Error::Broken));
                assert_eq!(self.queue.next_avail(), next_avail, "a failed pop consumed");
                self.summary.errors.push(kind);
                // The walk that failed may have visited up to a queue's worth of
                // descriptors (plus an indirect table) before the error.
                self.work += u64::from(self.header.size);
                false
            }
            Ok(false) => {
                assert!(!was_broken);
                assert_eq!(available, Some(false), "nothing popped; model: {expect:?}");
                assert_eq!(self.queue.next_avail(), next_avail);
                false
            }
            Ok(true) => {
                assert!(!was_broken);
                let Expect::Chain(model) = expect else {
                    panic!("virtio-core popped {:?}; model: {expect:?}", self.chain);
                };
                // (Split: the model may see nothing available when virtio-core pops from an
                // avail idx it read earlier and the driver since lowered; the chain itself
                // must still be what the ring holds.)
                self.check_chain(&model);
                self.pending.push_back(Pending {
                    id: self.chain.id(),
                    ring_slots: self.chain.ring_slots(),
                    writable_len: self.chain.writable_len(),
                });
                let fresh = self.ids_in_flight.insert(self.chain.id());
                assert!(fresh, "{:?}: ID popped while in flight", self.layout);
                self.in_flight += 1;
                self.summary.popped += 1;
                assert_eq!(
                    u32::from(self.queue.in_flight()),
                    self.in_flight,
                    "in-flight count"
                );
                true
            }
        }
    }

    fn check_chain(&mut self, model: &Chain) {
        let size = self.header.size;
        let c = &self.chain;
        assert_eq!(c.id(), model.id, "id");
        assert_eq!(c.ring_slots(), model.ring_slots, "ring slots");
        assert_eq!(c.descriptor_count(), model.desc_count, "descriptor count");
        assert!(model.ring_slots >= 1 && model.ring_slots <= size);
        assert!(c.descriptor_count() <= u32::from(size) + u32::from(u16::MAX));
        assert_eq!(
            u64::from(c.readable_len()),
            model.readable_len,
            "readable len"
        );
        assert_eq!(
            u64::from(c.writable_len()),
            model.writable_len,
            "writable len"
        );
        // Segments: exactly the model's pieces, readable ones first.
        let segs: Vec<_> = c
            .segments()
            .map(|s| (s.guest_addr, s.len, s.writable))
            .collect();
        assert_eq!(segs, model.pieces, "segments");
        let iovecs: Vec<_> = c
            .readable_iovecs()
            .iter()
            .chain(c.writable_iovecs())
            .copied()
            .collect();
        assert_eq!(iovecs.len(), segs.len());
        assert_eq!(
            c.readable_iovecs().len(),
            segs.iter().filter(|s| !s.2).count()
        );
        let mut readable = 0u64;
        let mut writable = 0u64;
        for (iov, &(gpa, len, w)) in iovecs.iter().zip(&segs) {
            let (ri, r) = self
                .region_of(gpa)
                .unwrap_or_else(|| panic!("segment {gpa:#x} outside guest memory"));
            assert!(len > 0, "empty segment");
            assert!(
                gpa + u64::from(len) <= r.end(),
                "segment {gpa:#x}+{len:#x} crosses the end of its region"
            );
            let host = self.hosts[ri] + usize::try_from(gpa - r.start).unwrap_or(usize::MAX);
            assert_eq!(iov.iov_base as usize, host, "host address of {gpa:#x}");
            assert_eq!(iov.iov_len, len as usize);
            if w {
                writable += u64::from(len);
            } else {
                readable += u64::from(len);
            }
        }
        assert_eq!(readable, u64::from(c.readable_len()));
        assert_eq!(writable, u64::from(c.writable_len()));
        assert!(c.memory().is_some());

        // Reader: the readable bytes, in order.
        let n = (c.readable_len() as usize).min(RW_LIMIT);
        self.expected.clear();
        for &(gpa, len, w) in &segs {
            if w || self.expected.len() >= n {
                continue;
            }
            let take = (len as usize).min(n - self.expected.len());
            let start = self.expected.len();
            self.expected.resize(start + take, 0);
            self.mem
                .read_slice(&mut self.expected[start..], GuestAddress(gpa))
                .expect("segment is guest memory");
        }
        self.buf.clear();
        self.buf.resize(n, 0);
        let mut reader = c.reader();
        assert_eq!(reader.available(), c.readable_len() as usize);
        reader
            .read_exact(&mut self.buf)
            .expect("reader has the bytes");
        assert_eq!(self.buf, self.expected, "reader bytes");

        // Writer: fills (a prefix of) the writable buffers and never more.
        let n = (c.writable_len() as usize).min(RW_LIMIT);
        let mut writer = c.writer();
        assert_eq!(writer.available(), c.writable_len() as usize);
        let pattern = vec![c.id() as u8 ^ 0xa5; n];
        writer.write_all(&pattern).expect("writer has the room");
        assert_eq!(writer.bytes_written(), n);
        if n == c.writable_len() as usize {
            assert_eq!(writer.write(&[0]).expect("write"), 0, "wrote past the end");
        }
        self.work += u64::from(c.descriptor_count()) + (c.readable_len() as u64 + n as u64) / 256;
    }

    /// Takes `ids` out of the in-flight bookkeeping the way virtio-core must: each ID in
    /// flight (split: or, failing that, one of the unknown heads), none twice. Returns the
    /// first ID that is not in flight, leaving the bookkeeping unchanged in that case.
    fn take_in_flight(&mut self, ids: &[u16]) -> Result<(), u16> {
        let mut set = self.ids_in_flight.clone();
        let mut unknown = self.unknown_in_flight;
        for &id in ids {
            if !set.remove(&id) {
                if self.layout == RingLayout::Split && unknown > 0 {
                    unknown -= 1;
                } else {
                    return Err(id);
                }
            }
        }
        self.ids_in_flight = set;
        self.unknown_in_flight = unknown;
        self.in_flight -= ids.len() as u32;
        Ok(())
    }

    /// add_used's `done` (in order, as one batch or one by one) and checks the result and
    /// what the driver sees.
    fn complete(&mut self, done: Vec<Pending>, batch: bool, full_len: bool) {
        if done.is_empty() {
            return;
        }
        let used: Vec<(u16, u32, u16)> = done
            .iter()
            .map(|p| {
                let len = if full_len { p.writable_len } else { 0 };
                (p.id, len, p.ring_slots)
            })
            .collect();
        if batch {
            let before = (self.queue.next_used(), self.queue.used_wrap_counter());
            let ids: Vec<u16> = used.iter().map(|u| u.0).collect();
            let pairs: Vec<(u16, u32)> = used.iter().map(|u| (u.0, u.1)).collect();
            let expect = self.take_in_flight(&ids);
            let r = self.queue.add_used_batch(&pairs);
            match expect {
                Ok(()) => {
                    assert_eq!(r, Ok(()), "add_used_batch of popped chains");
                    self.check_used(before, &used);
                }
                Err(id) => {
                    assert_eq!(r, Err(Error::NotInFlight(id)), "add_used_batch");
                    let after = (self.queue.next_used(), self.queue.used_wrap_counter());
                    assert_eq!(after, before, "a failed batch published something");
                }
            }
        } else {
            for &u in &used {
                let before = (self.queue.next_used(), self.queue.used_wrap_counter());
                let expect = self.take_in_flight(&[u.0]);
                let r = self.queue.add_used(u.0, u.1);
                match expect {
                    Ok(()) => {
                        assert_eq!(r, Ok(()), "add_used({})", u.0);
                        self.check_used(before, &[u]);
                    }
                    Err(id) => assert_eq!(r, Err(Error::NotInFlight(id)), "add_used"),
                }
            }
        }
        assert_eq!(
            u32::from(self.queue.in_flight()),
            self.in_flight,
            "in-flight count"
        );
    }

    /// Checks the used ring after `used` ((id, len, ring slots), in order) was published
    /// starting at `before` (next used position, used wrap counter).
    fn check_used(&mut self, before: (u16, bool), used: &[(u16, u32, u16)]) {
        self.summary.completed += used.len();
        let size = self.header.size;
        let (before_used, before_wrap) = before;
        match self.layout {
            RingLayout::Split => {
                let k = u16::try_from(used.len()).unwrap_or(u16::MAX);
                let after = before_used.wrapping_add(k);
                assert_eq!(self.queue.next_used(), after);
                let used_idx: u16 = self
                    .mem
                    .read_obj(GuestAddress(self.header.device_area + 2))
                    .expect("used ring");
                assert_eq!(u16::from_le(used_idx), after, "published used idx");
                if used.len() <= usize::from(size) {
                    for (i, &(id, len, _)) in used.iter().enumerate() {
                        let pos = before_used.wrapping_add(i as u16) & (size - 1);
                        let elem = self.header.device_area + 4 + 8 * u64::from(pos);
                        let got_id: u32 = self.mem.read_obj(GuestAddress(elem)).expect("used");
                        let got_len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).expect("used");
                        assert_eq!(
                            (u32::from_le(got_id), u32::from_le(got_len)),
                            (u32::from(id), len),
                            "used element"
                        );
                    }
                }
            }
            RingLayout::Packed => {
                let total_slots: u32 = used.iter().map(|u| u32::from(u.2)).sum();
                let mut pos = before_used;
                let mut wrap = before_wrap;
                for &(id, len, slots) in used {
                    if total_slots <= u32::from(size) {
                        let d = self.header.desc_table + 16 * u64::from(pos);
                        let got_len: u32 =
                            self.mem.read_obj(GuestAddress(d + 8)).expect("desc ring");
                        let got_id: u16 =
                            self.mem.read_obj(GuestAddress(d + 12)).expect("desc ring");
                        let flags: u16 =
                            self.mem.read_obj(GuestAddress(d + 14)).expect("desc ring");
                        let flags = u16::from_le(flags);
                        assert_eq!(
                            (u16::from_le(got_id), u32::from_le(got_len)),
                            (id, len),
                            "used descriptor"
                        );
                        assert_eq!(flags & (1 << 7) != 0, wrap, "used AVAIL bit");
                        assert_eq!(flags & (1 << 15) != 0, wrap, "used USED bit");
                        assert_eq!(flags & 2 != 0, len > 0, "used WRITE bit");
                    }
                    let next = u32::from(pos) + u32::from(slots);
                    if next >= u32::from(size) {
                        wrap = !wrap;
                    }
                    pos = u16::try_from(next % u32::from(size)).unwrap_or(0);
                }
                assert_eq!(self.queue.next_used(), pos);
                assert_eq!(self.queue.used_wrap_counter(), wrap);
            }
        }
    }

    fn notify(&mut self, bits: u8) {
        if bits & 1 != 0 {
            self.queue.needs_notification();
        }
        if bits & 4 != 0 {
            self.queue.disable_notification();
        }
        for (bit, f) in [
            (
                2u8,
                Queue::enable_notification as fn(&mut Queue) -> virtio_core::Result<bool>,
            ),
            (8, Queue::has_available),
        ] {
            if bits & bit == 0 {
                continue;
            }
            let was_broken = self.queue.is_broken();
            match f(&mut self.queue) {
                Ok(_) => assert!(!was_broken),
                Err(Error::Broken) => assert!(was_broken),
                Err(Error::AvailIndexOverrun { .. }) if self.layout == RingLayout::Split => {
                    assert!(self.queue.is_broken());
                    self.summary.errors.push(Kind::AvailIndexOverrun);
                }
                Err(e) => panic!("notification call: unexpected {e:?}"),
            }
        }
    }

    fn set_base(&mut self, base: u32) {
        // Split: the chains between the guest's used idx and the new next_avail count as in
        // flight, heads unknown.
        let used_idx: u16 = match self.layout {
            RingLayout::Split => u16::from_le(
                self.mem
                    .read_obj(GuestAddress(self.header.device_area + 2))
                    .expect("used ring"),
            ),
            RingLayout::Packed => 0,
        };
        match self.queue.set_vring_base(base) {
            Ok(()) => {
                assert!(!self.queue.is_broken());
                assert_eq!(self.queue.vring_base(), base, "vring_base round trip");
                self.pending.clear();
                self.ids_in_flight.clear();
                self.unknown_in_flight = match self.layout {
                    RingLayout::Split => {
                        let next_avail = u16::try_from(base).expect("accepted split base");
                        next_avail.wrapping_sub(used_idx).min(self.header.size)
                    }
                    RingLayout::Packed => 0,
                };
                self.in_flight = u32::from(self.unknown_in_flight);
                assert_eq!(u32::from(self.queue.in_flight()), self.in_flight);
            }
            Err(e) => assert!(
                matches!(e, Error::InvalidRingBase(b) if b == base),
                "set_vring_base: {e:?}"
            ),
        }
    }
}
