// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Notification suppression (virtio 1.2 §2.7.10, §2.8.10) of virtio-core's `Queue`:
//!
//! - (7) the packed DESC-mode decision (`Queue::needs_notification` with EVENT_IDX and
//!   the driver's event flags = DESC) equals a brute-force walk over every used ring
//!   position passed since the last decision:
//!   `packed_desc_event_decision_matches_brute_force_*`,
//!   `packed_queue_needs_notification_matches_brute_force`;
//! - (8) no lost wake-up across disable → drain → enable (re-check) → sleep, both layouts,
//!   with and without EVENT_IDX, against a driver that kicks only when `needs_kick` says
//!   so: `*_no_lost_wakeup_*`, `*_enable_notification_*_clears_stale_*`;
//! - (10) `vring_need_event` equals the reference formula
//!   `(u16)(new - event - 1) < (u16)(new - old)`, and the split EVENT_IDX decision is that
//!   formula: `vring_need_event_matches_reference_formula*`,
//!   `split_event_idx_decision_matches_reference_formula`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::sync::atomic::Ordering;
use std::sync::Arc;

use proptest::prelude::*;
use virtio_core::driver::{ring_footprint, DriverBuffer, DriverQueue};
use virtio_core::queue::desc_event_needs_notification;
use virtio_core::{vring_need_event, GuestMemoryView, Queue, RingLayout};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

const RING: u64 = 0x1000;
const BUFS: u64 = 0x10_0000;
const MEM_SIZE: usize = 0x20_0000;

const RING_EVENT_FLAGS_ENABLE: u16 = 0;
const RING_EVENT_FLAGS_DISABLE: u16 = 1;
const RING_EVENT_FLAGS_DESC: u16 = 2;
const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

fn memory() -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn view(mem: &Mem) -> Arc<GuestMemoryView> {
    Arc::new(GuestMemoryView::new(Arc::new(mem.clone())).unwrap())
}

fn wr16(mem: &Mem, addr: u64, v: u16) {
    mem.store(v.to_le(), GuestAddress(addr), Ordering::Release)
        .unwrap();
}

fn rd16(mem: &Mem, addr: u64) -> u16 {
    u16::from_le(mem.read_obj(GuestAddress(addr)).unwrap())
}

fn buf(k: u64) -> DriverBuffer {
    DriverBuffer {
        addr: BUFS + 0x100 * (k % 0x100),
        len: 0x80,
        writable: true,
    }
}

// ---------------------------------------------------------------------------------------
// (7) Packed DESC-mode decision against brute force.
// ---------------------------------------------------------------------------------------

/// (slot, wrap counter) of an absolute packed ring position (both counters start at 1).
fn packed_pos(abs: u64, size: u16) -> (u16, bool) {
    let size = u64::from(size);
    ((abs % size) as u16, (abs / size) % 2 == 0)
}

/// Brute force: walks every used ring position from absolute position `old` (inclusive)
/// to `new` (exclusive), each with the wrap counter it is used with, and says whether the
/// driver's event (`off`, `wrap`) is one of them.
fn brute_force_passed(size: u16, old: u64, new: u64, off: u16, wrap: bool) -> bool {
    (old..new).any(|abs| packed_pos(abs, size) == (off, wrap))
}

fn off_wrap(off: u16, wrap: bool) -> u16 {
    off | (u16::from(wrap) << 15)
}

/// (7) Every small ring size, every last-decision position (both laps), every advance up
/// to a full ring, every event position and wrap bit.
#[test]
fn packed_desc_event_decision_matches_brute_force_exhaustive_small_rings() {
    for size in 1u16..=9 {
        for old in 0..2 * u64::from(size) {
            for advanced in 1..=u64::from(size) {
                let new = old + advanced;
                for off in 0..size {
                    for wrap in [false, true] {
                        let code = desc_event_needs_notification(
                            size,
                            off_wrap(off, wrap),
                            packed_pos(new, size),
                            packed_pos(old, size).0,
                        );
                        let brute = brute_force_passed(size, old, new, off, wrap);
                        assert_eq!(
                            code, brute,
                            "size {size} old {old} new {new} event ({off}, {wrap})"
                        );
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// (7) Large and odd ring sizes, random positions, advances and events.
    #[test]
    fn packed_desc_event_decision_matches_brute_force_large_rings(
        size in prop_oneof![Just(255u16), Just(1000), Just(32768), 1u16..=32768],
        old_seed in any::<u64>(),
        adv_seed in any::<u64>(),
        near in any::<bool>(),
        off_seed in any::<u16>(),
        wrap in any::<bool>(),
    ) {
        let s = u64::from(size);
        let old = old_seed % (2 * s);
        let advanced = 1 + adv_seed % s;
        let new = old + advanced;
        // Events near the window's edges are the interesting ones.
        let off = if near {
            let edge = if off_seed % 2 == 0 { old } else { new };
            packed_pos(edge + s - 2 + u64::from(off_seed % 4), size).0
        } else {
            off_seed % size
        };
        let code = desc_event_needs_notification(
            size,
            off_wrap(off, wrap),
            packed_pos(new, size),
            packed_pos(old, size).0,
        );
        let brute = (0..advanced).any(|i| packed_pos(old + i, size) == (off, wrap));
        assert_eq!(code, brute);
    }
}

/// Sets up a packed queue (EVENT_IDX) with a `DriverQueue` over fresh memory.
fn packed_setup(size: u16, event_idx: bool) -> (Mem, DriverQueue, Queue) {
    let mem = memory();
    let driver = DriverQueue::new(RingLayout::Packed, size, RING, event_idx);
    driver.init(&mem).unwrap();
    let queue = Queue::new(driver.config(true), view(&mem)).unwrap();
    (mem, driver, queue)
}

#[derive(Clone, Debug)]
enum NOp {
    /// The driver adds a chain of `n` buffers (indirect: one ring slot).
    Add { n: usize, indirect: bool },
    /// The device pops everything available.
    Pop,
    /// The device returns up to `count` in-flight chains in one batch.
    Complete { count: usize },
    /// The driver reclaims used buffers.
    Reclaim,
    /// The driver writes its event suppression (flags, off, wrap), then the device decides.
    Decide { flags: u16, off: u16, wrap: bool },
}

fn arb_nop() -> impl Strategy<Value = NOp> {
    prop_oneof![
        3 => (1usize..=4, any::<bool>()).prop_map(|(n, indirect)| NOp::Add { n, indirect }),
        3 => Just(NOp::Pop),
        3 => (1usize..=4).prop_map(|count| NOp::Complete { count }),
        2 => Just(NOp::Reclaim),
        4 => (prop_oneof![
            1 => Just(RING_EVENT_FLAGS_ENABLE),
            1 => Just(RING_EVENT_FLAGS_DISABLE),
            6 => Just(RING_EVENT_FLAGS_DESC),
            1 => Just(3u16),
        ], any::<u16>(), any::<bool>())
            .prop_map(|(flags, off, wrap)| NOp::Decide { flags, off, wrap }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// (7) Through the real queue: buffers of random slot counts are used in random
    /// batches and the driver asks for an event at random positions; each decision equals
    /// brute force over the used positions passed since the previous decision (model:
    /// absolute used-slot counter). DISABLE never notifies, ENABLE (and the reserved value)
    /// notifies when anything was used, and nothing used since the last decision means no
    /// notification. Where a full ring or more was used since the last decision,
    /// virtio-core notifies unconditionally: that can only add a (spurious but harmless)
    /// notification to what brute force says, never drop one — asserted as such.
    #[test]
    fn packed_queue_needs_notification_matches_brute_force(
        size in prop_oneof![Just(1u16), Just(3), Just(255), 2u16..=12],
        ops in proptest::collection::vec(arb_nop(), 1..150),
    ) {
        let (mem, mut driver, mut queue) = packed_setup(size, true);
        let mut in_flight: Vec<(u16, u64)> = Vec::new();
        let mut slots_of = std::collections::HashMap::new();
        let mut used_abs = 0u64;
        let mut last: Option<u64> = None;
        let mut added = 0u64;
        for op in &ops {
            match *op {
                NOp::Add { n, indirect } => {
                    let bufs: Vec<_> = (0..n as u64).map(|i| buf(added + i)).collect();
                    let r = if indirect {
                        driver.add_indirect_chain(&mem, 0x8_0000 + 0x100 * (added % 64), &bufs)
                    } else {
                        driver.add_chain(&mem, &bufs)
                    };
                    if let Ok(id) = r {
                        slots_of.insert(id, if indirect { 1 } else { n as u64 });
                        added += 1;
                    }
                }
                NOp::Pop => {
                    while let Some(c) = queue.pop().unwrap() {
                        assert_eq!(u64::from(c.ring_slots()), slots_of[&c.id()]);
                        in_flight.push((c.id(), u64::from(c.ring_slots())));
                    }
                }
                NOp::Complete { count } => {
                    let count = count.min(in_flight.len());
                    let batch: Vec<(u16, u64)> = in_flight.drain(..count).collect();
                    let used: Vec<(u16, u32)> = batch.iter().map(|&(id, _)| (id, 1)).collect();
                    queue.add_used_batch(&used).unwrap();
                    used_abs += batch.iter().map(|&(_, s)| s).sum::<u64>();
                }
                NOp::Reclaim => while driver.pop_used(&mem).unwrap().is_some() {},
                NOp::Decide { flags, off, wrap } => {
                    let off = off % size;
                    wr16(&mem, driver.driver_area(), off_wrap(off, wrap));
                    wr16(&mem, driver.driver_area() + 2, flags);
                    let advanced = used_abs - last.unwrap_or(0);
                    let brute = match last {
                        Some(old) => brute_force_passed(size, old, used_abs, off, wrap),
                        None => true,
                    };
                    let expect = if advanced == 0 {
                        false
                    } else {
                        match flags {
                            RING_EVENT_FLAGS_DISABLE => false,
                            RING_EVENT_FLAGS_DESC => {
                                last.is_none() || advanced >= u64::from(size) || brute
                            }
                            _ => true,
                        }
                    };
                    let got = queue.needs_notification();
                    assert_eq!(
                        got, expect,
                        "flags {flags} event ({off}, {wrap}) advanced {advanced}"
                    );
                    if flags == RING_EVENT_FLAGS_DESC && advanced > 0 {
                        assert!(got || !brute, "a notification the driver asked for was dropped");
                        if advanced < u64::from(size) && last.is_some() {
                            assert_eq!(got, brute);
                        }
                    }
                    last = Some(used_abs);
                }
            }
        }
    }
}

/// (7) Without EVENT_IDX, DESC is a driver bug; notifying is the safe answer.
#[test]
fn packed_desc_flags_without_event_idx_notify() {
    let (mem, mut driver, mut queue) = packed_setup(4, false);
    driver.add_chain(&mem, &[buf(0)]).unwrap();
    let c = queue.pop().unwrap().unwrap();
    queue.add_used(c.id(), 1).unwrap();
    wr16(&mem, driver.driver_area(), off_wrap(3, false));
    wr16(&mem, driver.driver_area() + 2, RING_EVENT_FLAGS_DESC);
    assert!(queue.needs_notification());
}

/// The driver's packed kick decision after more than a ring of additions since its last
/// one: the device consumed them while polling (notifications off), then enabled
/// notifications at a slot the driver passed since. Ring positions alone alias here (13
/// slots since the last decision on an 8-slot ring look like 5), and the driver must
/// still kick (§2.8.10): the console bench once hung this way with a 128-slot ring.
#[test]
fn packed_driver_kicks_after_more_than_a_ring_of_additions_since_its_last_decision() {
    let (mem, mut driver, mut queue) = packed_setup(8, true);
    driver.add_chain(&mem, &[buf(0)]).unwrap();
    assert!(driver.needs_kick(&mem).unwrap());
    queue.disable_notification();
    // Absolute positions 0..=4: popped and used as they come, no kick decision.
    for k in 0..5u64 {
        if k > 0 {
            driver.add_chain(&mem, &[buf(k)]).unwrap();
        }
        let c = queue.pop().unwrap().unwrap();
        queue.add_used(c.id(), 0).unwrap();
        assert!(driver.pop_used(&mem).unwrap().is_some());
    }
    // The device sleeps, asking for a kick at position 5 (slot 5, first lap).
    assert!(!queue.enable_notification().unwrap());
    // Eight more (a full ring): positions 5..=12, 12 slots after the last decision.
    for k in 5..13u64 {
        driver.add_chain(&mem, &[buf(k)]).unwrap();
    }
    assert!(
        driver.needs_kick(&mem).unwrap(),
        "the device waits at a slot made available since the last kick decision"
    );
}

// ---------------------------------------------------------------------------------------
// (8) No lost wake-up.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dev {
    Disable,
    Drain,
    Enable,
    Sleep,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Drv {
    Add,
    Kick,
}

/// A device thread (disable → drain → enable, re-check → sleep until kicked) and a
/// driver (add a buffer, then kick iff `needs_kick`), advanced one step at a time in an
/// order chosen by the test.
struct World {
    mem: Mem,
    driver: DriverQueue,
    queue: Queue,
    dev: Dev,
    drv: Drv,
    kick_pending: bool,
    to_add: u64,
    added: u64,
    consumed: u64,
}

impl World {
    fn new(
        mem: &Mem,
        view: &Arc<GuestMemoryView>,
        layout: RingLayout,
        size: u16,
        event_idx: bool,
        buffers: u64,
    ) -> Self {
        let driver = DriverQueue::new(layout, size, RING, event_idx);
        driver.init(mem).unwrap();
        let mut queue = Queue::new(driver.config(true), Arc::clone(view)).unwrap();
        // The device starts by asking for kicks, then sleeps (a started ring).
        assert!(!queue.enable_notification().unwrap());
        World {
            mem: mem.clone(),
            driver,
            queue,
            dev: Dev::Sleep,
            drv: Drv::Add,
            kick_pending: false,
            to_add: buffers,
            added: 0,
            consumed: 0,
        }
    }

    fn device_can_step(&self) -> bool {
        self.dev != Dev::Sleep || self.kick_pending
    }

    fn driver_can_step(&mut self) -> bool {
        match self.drv {
            Drv::Kick => true,
            Drv::Add => {
                while self.driver.pop_used(&self.mem).unwrap().is_some() {}
                self.to_add > 0 && self.driver.free_slots() > 0
            }
        }
    }

    fn device_step(&mut self) {
        match self.dev {
            Dev::Disable => {
                self.queue.disable_notification();
                self.dev = Dev::Drain;
            }
            Dev::Drain => match self.queue.pop().unwrap() {
                Some(c) => {
                    self.queue.add_used(c.id(), 1).unwrap();
                    self.consumed += 1;
                }
                None => self.dev = Dev::Enable,
            },
            Dev::Enable => {
                // Re-check after enabling: buffers that arrived meanwhile are processed.
                self.dev = if self.queue.enable_notification().unwrap() {
                    Dev::Disable
                } else {
                    Dev::Sleep
                };
            }
            Dev::Sleep => {
                if self.kick_pending {
                    self.kick_pending = false;
                    self.dev = Dev::Disable;
                }
            }
        }
    }

    fn driver_step(&mut self) {
        match self.drv {
            Drv::Add => {
                let k = self.added;
                self.driver.add_chain(&self.mem, &[buf(k)]).unwrap();
                self.added += 1;
                self.to_add -= 1;
                self.drv = Drv::Kick;
            }
            Drv::Kick => {
                if self.driver.needs_kick(&self.mem).unwrap() {
                    self.kick_pending = true;
                }
                self.drv = Drv::Add;
            }
        }
    }

    /// Runs `schedule` (true: device, false: driver; an actor that cannot move yields to
    /// the other), then both to quiescence, and checks that nothing was lost.
    fn run(&mut self, schedule: impl Iterator<Item = bool>) {
        for device_first in schedule {
            let dev = self.device_can_step();
            let drv = self.driver_can_step();
            match (device_first, dev, drv) {
                (true, true, _) | (false, true, false) => self.device_step(),
                (_, _, true) => self.driver_step(),
                (_, false, false) => break,
            }
        }
        // Quiescence: the driver finishes, then the device runs until it sleeps.
        for _ in 0..100_000 {
            if self.driver_can_step() {
                self.driver_step();
            } else if self.device_can_step() {
                self.device_step();
            } else {
                break;
            }
        }
        assert_eq!(
            self.to_add, 0,
            "driver blocked on a full ring: device never woke"
        );
        assert_eq!(self.dev, Dev::Sleep);
        assert!(!self.kick_pending);
        assert_eq!(
            self.consumed, self.added,
            "lost wake-up: the device sleeps, no kick is pending, buffers are waiting"
        );
        assert!(!self.queue.has_available().unwrap());
    }
}

/// (8) Every interleaving of the first `depth` steps of the device's disable → drain →
/// enable → sleep loop with a driver adding `buffers` buffers to a ring of `size`.
fn exhaustive_no_lost_wakeup(
    layout: RingLayout,
    size: u16,
    event_idx: bool,
    buffers: u64,
    depth: u32,
) {
    let mem = memory();
    let view = view(&mem);
    let zeros = vec![0u8; ring_footprint(layout, size) as usize];
    for schedule in 0u32..(1 << depth) {
        mem.write_slice(&zeros, GuestAddress(RING)).unwrap();
        let mut w = World::new(&mem, &view, layout, size, event_idx, buffers);
        w.run((0..depth).map(|i| schedule & (1 << i) != 0));
    }
}

#[test]
fn split_no_lost_wakeup_every_interleaving() {
    exhaustive_no_lost_wakeup(RingLayout::Split, 2, false, 3, 14);
}

#[test]
fn split_event_idx_no_lost_wakeup_every_interleaving() {
    exhaustive_no_lost_wakeup(RingLayout::Split, 2, true, 3, 14);
}

#[test]
fn packed_no_lost_wakeup_every_interleaving() {
    exhaustive_no_lost_wakeup(RingLayout::Packed, 2, false, 3, 14);
}

#[test]
fn packed_event_idx_no_lost_wakeup_every_interleaving() {
    exhaustive_no_lost_wakeup(RingLayout::Packed, 3, true, 3, 14);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// (8) Longer random interleavings over more buffers than the ring holds (so both
    /// sides wrap), every layout and EVENT_IDX setting.
    #[test]
    fn no_lost_wakeup_random_interleavings(
        packed in any::<bool>(),
        event_idx in any::<bool>(),
        size_seed in any::<u16>(),
        buffers in 1u64..40,
        schedule in proptest::collection::vec(any::<bool>(), 0..300),
    ) {
        let (layout, size) = if packed {
            (RingLayout::Packed, 1 + size_seed % 5)
        } else {
            (RingLayout::Split, 1 << (size_seed % 3))
        };
        let mem = memory();
        let view = view(&mem);
        let mut w = World::new(&mem, &view, layout, size, event_idx, buffers);
        w.run(schedule.into_iter());
    }
}

/// Adds one buffer after the device enabled notifications and slept: the driver must be
/// told to kick.
fn assert_kick_after_enable(mem: &Mem, driver: &mut DriverQueue, queue: &mut Queue) {
    assert!(
        !queue.enable_notification().unwrap(),
        "nothing available yet"
    );
    driver.add_chain(mem, &[buf(1)]).unwrap();
    assert!(
        driver.needs_kick(mem).unwrap(),
        "device sleeps after enable_notification, but the driver is told not to kick"
    );
}

/// (8) Split without EVENT_IDX: the device polled (VIRTQ_USED_F_NO_NOTIFY set), was
/// stopped and restarted with `set_vring_base` (vhost-user GET/SET_VRING_BASE), then
/// enables notifications and sleeps. `set_vring_base` forgets that the flag is set in
/// guest memory, so `enable_notification` does not clear it: the driver never kicks.
#[test]
fn split_enable_notification_after_set_vring_base_clears_stale_no_notify() {
    let mem = memory();
    let mut driver = DriverQueue::new(RingLayout::Split, 4, RING, false);
    driver.init(&mem).unwrap();
    let mut queue = Queue::new(driver.config(true), view(&mem)).unwrap();
    queue.disable_notification();
    assert_eq!(rd16(&mem, driver.device_area()), VIRTQ_USED_F_NO_NOTIFY);
    let base = queue.vring_base();
    queue.set_vring_base(base).unwrap();
    assert_kick_after_enable(&mem, &mut driver, &mut queue);
}

/// (8) Split without EVENT_IDX: a new `Queue` over a ring whose used flags still say
/// VIRTQ_USED_F_NO_NOTIFY (written by a previous backend instance that was polling, e.g.
/// before a vhost-user reconnect) must clear it when enabling notifications.
#[test]
fn split_enable_notification_on_new_queue_clears_stale_no_notify() {
    let mem = memory();
    let mut driver = DriverQueue::new(RingLayout::Split, 4, RING, false);
    driver.init(&mem).unwrap();
    wr16(&mem, driver.device_area(), VIRTQ_USED_F_NO_NOTIFY);
    let mut queue = Queue::new(driver.config(true), view(&mem)).unwrap();
    assert_kick_after_enable(&mem, &mut driver, &mut queue);
}

/// (8) Packed without EVENT_IDX: the same with the device event suppression flags left at
/// DISABLE by a previous backend instance.
#[test]
fn packed_enable_notification_on_new_queue_clears_stale_disable() {
    let mem = memory();
    let mut driver = DriverQueue::new(RingLayout::Packed, 4, RING, false);
    driver.init(&mem).unwrap();
    wr16(&mem, driver.device_area() + 2, RING_EVENT_FLAGS_DISABLE);
    let mut queue = Queue::new(driver.config(true), view(&mem)).unwrap();
    assert_kick_after_enable(&mem, &mut driver, &mut queue);
}

/// (8) With EVENT_IDX the enable always rewrites the event (both layouts), so a stale
/// value left in guest memory does not matter.
#[test]
fn event_idx_enable_notification_on_new_queue_overrides_stale_event() {
    for layout in [RingLayout::Split, RingLayout::Packed] {
        let mem = memory();
        let mut driver = DriverQueue::new(layout, 4, RING, true);
        driver.init(&mem).unwrap();
        match layout {
            RingLayout::Split => wr16(&mem, driver.device_area() + 4 + 8 * 4, 0x8000),
            RingLayout::Packed => {
                wr16(&mem, driver.device_area(), off_wrap(3, false));
                wr16(&mem, driver.device_area() + 2, RING_EVENT_FLAGS_DISABLE);
            }
        }
        let mut queue = Queue::new(driver.config(true), view(&mem)).unwrap();
        assert_kick_after_enable(&mem, &mut driver, &mut queue);
    }
}

// ---------------------------------------------------------------------------------------
// (10) vring_need_event and the split EVENT_IDX decision.
// ---------------------------------------------------------------------------------------

/// The reference formula, in u32 arithmetic reduced mod 2^16.
fn reference_need_event(event: u16, new: u16, old: u16) -> bool {
    let m = 1u32 << 16;
    let a = (u32::from(new) + 2 * m - u32::from(event) - 1) % m;
    let b = (u32::from(new) + m - u32::from(old)) % m;
    a < b
}

/// (10) Exhaustive over `event` for a sample of (new, old): edges (0, 1, 0x7fff, 0x8000,
/// 0xffff, equal, adjacent, half-ring apart) and pseudo-random pairs.
#[test]
fn vring_need_event_matches_reference_formula_for_every_event() {
    let mut pairs = Vec::new();
    let edges = [0u16, 1, 2, 0x7ffe, 0x7fff, 0x8000, 0x8001, 0xfffe, 0xffff];
    for &n in &edges {
        for &o in &edges {
            pairs.push((n, o));
        }
    }
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..120 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let new = x as u16;
        let d = (x >> 16) as u16;
        let old = new.wrapping_sub(if x & (1 << 40) != 0 { d % 64 } else { d });
        pairs.push((new, old));
    }
    for (new, old) in pairs {
        for event in 0..=u16::MAX {
            assert_eq!(
                vring_need_event(event, new, old),
                reference_need_event(event, new, old),
                "event {event} new {new} old {old}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// (10) Random inputs; and for windows shorter than half the index space, the formula
    /// means "event was passed": event ∈ [old, new) walking the u16 indexes.
    #[test]
    fn vring_need_event_matches_reference_formula(
        event in any::<u16>(),
        new in any::<u16>(),
        old in any::<u16>(),
    ) {
        assert_eq!(vring_need_event(event, new, old), reference_need_event(event, new, old));
        let window = new.wrapping_sub(old);
        if window < 0x8000 {
            let passed = (0..window).any(|i| old.wrapping_add(i) == event);
            assert_eq!(vring_need_event(event, new, old), passed);
        }
    }
}

#[derive(Clone, Debug)]
enum SOp {
    /// The driver adds `n` one-buffer chains.
    Add(u16),
    /// The device pops everything and returns up to `count` chains in one batch.
    Complete(usize),
    /// The driver sets used_event (to used idx + `delta`) and NO_INTERRUPT, then the device
    /// decides.
    Decide {
        delta: i16,
        any: Option<u16>,
        no_interrupt: bool,
    },
}

fn arb_sop() -> impl Strategy<Value = SOp> {
    prop_oneof![
        2 => (1u16..4).prop_map(SOp::Add),
        3 => (1usize..5).prop_map(SOp::Complete),
        4 => (
            -6i16..6,
            prop_oneof![3 => Just(None), 1 => any::<u16>().prop_map(Some)],
            any::<bool>(),
        )
            .prop_map(|(delta, any, no_interrupt)| SOp::Decide { delta, any, no_interrupt }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// (10) The split decision: with EVENT_IDX, notify iff the reference formula says
    /// used_event lies in [used idx at the last decision, used idx now) — the first decision
    /// always notifies; without it, notify iff something was used since the last decision
    /// and NO_INTERRUPT is clear. Used indexes start anywhere, so they wrap past 65535.
    #[test]
    fn split_event_idx_decision_matches_reference_formula(
        event_idx in any::<bool>(),
        log in 0u32..4,
        start in prop_oneof![any::<u16>(), 0xfff0u16..=0xffff],
        ops in proptest::collection::vec(arb_sop(), 1..120),
    ) {
        let size = 1u16 << log;
        let mem = memory();
        let desc = RING;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size)).div_ceil(4) * 4;
        wr16(&mem, avail + 2, start);
        wr16(&mem, used + 2, start);
        let config = virtio_core::QueueConfig {
            layout: RingLayout::Split,
            size,
            desc_table: desc,
            driver_area: avail,
            device_area: used,
            event_idx,
            indirect_desc: false,
        };
        let mut queue = Queue::new(config, view(&mem)).unwrap();
        queue.set_vring_base(u32::from(start)).unwrap();
        let mut avail_idx = start;
        let mut outstanding = 0u16;
        let mut in_flight = Vec::new();
        let mut used_idx = start;
        let mut last: Option<u16> = None;
        for op in &ops {
            match *op {
                SOp::Add(n) => {
                    for _ in 0..n.min(size - outstanding) {
                        let head = avail_idx % size;
                        let d = desc + 16 * u64::from(head);
                        mem.write_obj(BUFS.to_le(), GuestAddress(d)).unwrap();
                        mem.write_obj(16u32.to_le(), GuestAddress(d + 8)).unwrap();
                        mem.write_obj(0u32, GuestAddress(d + 12)).unwrap();
                        let entry = avail + 4 + 2 * u64::from(avail_idx % size);
                        mem.write_obj(head.to_le(), GuestAddress(entry)).unwrap();
                        avail_idx = avail_idx.wrapping_add(1);
                        wr16(&mem, avail + 2, avail_idx);
                        outstanding += 1;
                    }
                }
                SOp::Complete(count) => {
                    while let Some(c) = queue.pop().unwrap() {
                        in_flight.push(c.id());
                    }
                    let count = count.min(in_flight.len());
                    let batch: Vec<(u16, u32)> =
                        in_flight.drain(..count).map(|id| (id, 4)).collect();
                    queue.add_used_batch(&batch).unwrap();
                    used_idx = used_idx.wrapping_add(count as u16);
                    outstanding -= count as u16;
                    assert_eq!(rd16(&mem, used + 2), used_idx);
                }
                SOp::Decide { delta, any, no_interrupt } => {
                    let used_event = any.unwrap_or(used_idx.wrapping_add_signed(delta));
                    wr16(&mem, avail + 4 + 2 * u64::from(size), used_event);
                    wr16(&mem, avail, if no_interrupt { VIRTQ_AVAIL_F_NO_INTERRUPT } else { 0 });
                    let expect = if last == Some(used_idx) {
                        false
                    } else if event_idx {
                        match last {
                            None => true,
                            Some(old) => reference_need_event(used_event, used_idx, old),
                        }
                    } else {
                        !no_interrupt
                    };
                    assert_eq!(
                        queue.needs_notification(),
                        expect,
                        "used_event {used_event} new {used_idx} old {last:?}"
                    );
                    last = Some(used_idx);
                }
            }
        }
    }
}
