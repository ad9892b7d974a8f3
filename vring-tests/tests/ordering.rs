// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! (6) Used flags (packed) and used idx (split) never become visible before the id and
//! length of the used elements they publish (virtio 1.2 §2.7.8, §2.7.14, §2.8.22).
//!
//! Two threads share guest memory: a device thread publishes used elements through the
//! real `Queue` (`add_used_batch`, in batches of random sizes and orders), while the driver
//! thread (the test thread) polls the used idx / the packed used flags with acquire loads,
//! exactly as a guest does, and checks that the id and length it then reads are the final
//! values. Before each element can be published its slot holds poison (split: the driver
//! rewrites consumed used elements with poison; packed: the used slot still holds the
//! driver's head descriptor, whose id and length are poison), so reading an element
//! before it is complete reads poison.
//!
//! What it catches: a reordering in virtio-core's publish code that lets the idx or flags
//! store happen before the id / len stores in program order. Verified by mutating
//! `virtio-core/src/queue/split.rs` (`add_used_batch` storing used idx before writing the
//! elements) and `virtio-core/src/queue/packed.rs` (`add_used_batch` storing the first
//! used descriptor's flags before its len / id): each mutation failed its test in 7 and
//! 6 of 8 two-second runs, on a 2-core machine with a load average of 7–10 from other
//! jobs (with the two threads truly in parallel it should be more reliable). Such a
//! window lasts a few nanoseconds, so the device thread is interrupted at random points by
//! a signal whose handler sleeps (`Preemptor`), which stretches a window the signal lands
//! in to 200 microseconds; being probabilistic, a pass is evidence, not proof. On
//! hardware with a weak memory model (aarch64) the test would also catch a `Release`
//! weakened to `Relaxed`; on x86-64 (TSO) stores are never reordered with stores, so that
//! mutation cannot be observed here. loom is not used: it cannot instrument virtio-core's
//! raw accesses to guest memory, so a loom model would test a copy of the publish
//! protocol rather than the implementation.
//!
//! Each test runs for a bounded time (well under 5 s).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_core::{DescriptorChain, GuestMemoryView, Queue, QueueConfig, RingLayout};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

const RING: u64 = 0x1000;
const BUFS: u64 = 0x10_0000;
const RUN_FOR: Duration = Duration::from_millis(2000);
const MAX_USED: u64 = 2_000_000;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_AVAIL: u16 = 1 << 7;
const F_USED: u16 = 1 << 15;

const POISON_ID: u32 = 0xdead_beef;
const POISON_LEN: u32 = 0x0bad_0bad;
/// Packed: the head descriptor's id and length (the used element overwrites them).
const POISON_HEAD_ID: u16 = 0xdead;
const POISON_HEAD_LEN: u32 = 0xbad;

/// The length the device reports for buffer `id` (never a poison value, never 0).
fn used_len(id: u16) -> u32 {
    0x100 + u32::from(id) * 3
}

/// Spins a little, then yields: the two threads may share a CPU (2-core CI machines).
fn idle(spins: &mut u32) {
    *spins += 1;
    if *spins % 1024 == 0 {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

/// Sets a flag when dropped, so that a panicking driver thread stops the device thread.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

fn memory() -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
}

fn load16(mem: &Mem, addr: u64) -> u16 {
    u16::from_le(mem.load(GuestAddress(addr), Ordering::Acquire).unwrap())
}

fn store16(mem: &Mem, addr: u64, v: u16) {
    mem.store(v.to_le(), GuestAddress(addr), Ordering::Release)
        .unwrap();
}

fn rd<T: vm_memory::ByteValued>(mem: &Mem, addr: u64) -> T {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

fn wr<T: vm_memory::ByteValued>(mem: &Mem, addr: u64, v: T) {
    mem.write_obj(v, GuestAddress(addr)).unwrap();
}

/// SIGUSR1 handler: pauses the interrupted thread for 200 microseconds, wherever it
/// was. Async-signal-safe (only `nanosleep`).
extern "C" fn pause_handler(_: libc::c_int) {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 200_000,
    };
    // SAFETY: `nanosleep` is async-signal-safe; `ts` is a valid timespec and the
    // remainder pointer may be null.
    unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
}

fn install_pause_handler() {
    // SAFETY: a zeroed `sigaction` is a valid starting value; the handler only calls
    // async-signal-safe functions; SIGUSR1 is not used by the test harness.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = pause_handler as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
}

/// Preemption injection: interrupts the device thread at random points with SIGUSR1 (while
/// it has buffers to return) so that it stops for a while in the middle of
/// `add_used_batch` now and then, which widens a reordering window of a few nanoseconds
/// to 200 microseconds during which the driver thread runs (even when both share one
/// CPU). Timing only; it changes no result.
struct Preemptor {
    target: AtomicU64,
    busy: AtomicBool,
    stop: AtomicBool,
    done: AtomicBool,
}

impl Preemptor {
    fn new() -> Self {
        install_pause_handler();
        Preemptor {
            target: AtomicU64::new(0),
            busy: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            done: AtomicBool::new(false),
        }
    }

    /// Called by the device thread: makes it the target.
    fn register(&self) {
        // SAFETY: `pthread_self` has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.target.store(me as u64, Ordering::Release);
    }

    /// Called by the device thread before it exits: waits until no signal can be sent to
    /// it any more (its pthread_t must stay valid while the preemptor uses it).
    fn unregister(&self) {
        self.stop.store(true, Ordering::Release);
        while !self.done.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
    }

    fn run(&self) {
        let mut x = 0x853c_49e6_748f_ea9bu64;
        while !self.stop.load(Ordering::Acquire) {
            let t = self.target.load(Ordering::Acquire);
            if t != 0 && self.busy.load(Ordering::Relaxed) {
                // SAFETY: `t` is the device thread's pthread_t, which stays valid until
                // it returns from `unregister`, which waits for `done` below.
                unsafe { libc::pthread_kill(t as libc::pthread_t, libc::SIGUSR1) };
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            std::thread::sleep(Duration::from_micros(20 + x % 150));
        }
        self.done.store(true, Ordering::Release);
    }
}

/// Calls [`Preemptor::unregister`] when dropped.
struct Registered<'a>(&'a Preemptor);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.0.unregister();
    }
}

/// The device: pops everything available and returns it in batches of random sizes, in
/// random order, until told to stop.
fn device_loop(mut queue: Queue, stop: &AtomicBool, preemptor: &Preemptor) {
    preemptor.register();
    // Unregisters on the way out, panics included (else the preemptor would never stop).
    let _registered = Registered(preemptor);
    let mut chain = DescriptorChain::new();
    let mut ids = Vec::new();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut spins = 0;
    while !stop.load(Ordering::Acquire) {
        while queue.pop_into(&mut chain).unwrap() {
            ids.push(chain.id());
        }
        if ids.is_empty() {
            preemptor.busy.store(false, Ordering::Relaxed);
            idle(&mut spins);
            continue;
        }
        preemptor.busy.store(true, Ordering::Relaxed);
        if rand() % 2 == 0 {
            ids.reverse();
        }
        while !ids.is_empty() {
            let n = 1 + (rand() as usize) % ids.len();
            let batch: Vec<(u16, u32)> = ids.drain(..n).map(|id| (id, used_len(id))).collect();
            queue.add_used_batch(&batch).unwrap();
        }
    }
}

fn view(mem: &Mem) -> Arc<GuestMemoryView> {
    Arc::new(GuestMemoryView::new(Arc::new(mem.clone())).unwrap())
}

/// (6) Split: after an acquire load of used idx, every element below it holds its final
/// id and length.
#[test]
fn split_used_idx_never_visible_before_used_element() {
    const SIZE: u16 = 8;
    let mem = memory();
    let desc = RING;
    let avail = desc + 16 * u64::from(SIZE);
    let used = (avail + 6 + 2 * u64::from(SIZE)).div_ceil(4) * 4;
    let config = QueueConfig {
        layout: RingLayout::Split,
        size: SIZE,
        desc_table: desc,
        driver_area: avail,
        device_area: used,
        event_idx: false,
        indirect_desc: false,
    };
    let queue = Queue::new(config, view(&mem)).unwrap();
    let poison = |slot: u16| {
        let e = used + 4 + 8 * u64::from(slot);
        wr(&mem, e, POISON_ID.to_le());
        wr(&mem, e + 4, POISON_LEN.to_le());
    };
    for slot in 0..SIZE {
        poison(slot);
    }
    let stop = AtomicBool::new(false);
    let preemptor = Preemptor::new();
    let seen = std::thread::scope(|s| {
        let preemptor = &preemptor;
        s.spawn(|| preemptor.run());
        s.spawn(|| device_loop(queue, &stop, preemptor));
        let _stop = StopOnDrop(&stop);
        let start = Instant::now();
        let mut avail_idx = 0u16;
        let mut last_used = 0u16;
        let mut in_flight = [false; SIZE as usize];
        let mut free_heads: Vec<u16> = (0..SIZE).collect();
        let mut seen = 0u64;
        let mut spins = 0;
        while start.elapsed() < RUN_FOR && seen < MAX_USED {
            // Driver: keep the ring full of one-buffer chains (the device returns them in
            // any order, so heads come from a free list).
            while let Some(head) = free_heads.pop() {
                let d = desc + 16 * u64::from(head);
                wr(&mem, d, (BUFS + 0x100 * u64::from(head)).to_le());
                wr(&mem, d + 8, 0x80u32.to_le());
                wr(&mem, d + 12, F_WRITE.to_le());
                wr(&mem, d + 14, 0u16);
                let slot = avail_idx % SIZE;
                wr(&mem, avail + 4 + 2 * u64::from(slot), head.to_le());
                in_flight[usize::from(head)] = true;
                avail_idx = avail_idx.wrapping_add(1);
                store16(&mem, avail + 2, avail_idx);
            }
            // Poll used idx with acquire, as the guest does.
            let used_idx = load16(&mem, used + 2);
            if used_idx == last_used {
                idle(&mut spins);
                continue;
            }
            // Newest element first: it is the one the device wrote last.
            let n = used_idx.wrapping_sub(last_used);
            for k in (0..n).rev() {
                let i = last_used.wrapping_add(k);
                let e = used + 4 + 8 * u64::from(i % SIZE);
                let id = u32::from_le(rd(&mem, e));
                let len = u32::from_le(rd(&mem, e + 4));
                assert_ne!(
                    id, POISON_ID,
                    "used idx {used_idx} visible before element {i}'s id"
                );
                assert!(
                    id < u32::from(SIZE) && in_flight[id as usize],
                    "bad used id {id:#x}"
                );
                assert_eq!(
                    len,
                    used_len(id as u16),
                    "used idx visible before element {i}'s len"
                );
                in_flight[id as usize] = false;
                free_heads.push(id as u16);
                // Consumed: poison it again before the device can reuse the slot (it
                // cannot before the driver publishes more buffers, below).
                poison(i % SIZE);
            }
            last_used = used_idx;
            seen += u64::from(n);
        }
        seen
    });
    assert!(seen > 100, "only {seen} used elements in {RUN_FOR:?}");
}

/// (6) Packed: once the driver sees a used descriptor's flags (acquire), its id and length
/// are the device's, not what the driver wrote there (the head of a two-descriptor
/// chain: poison id and length).
#[test]
fn packed_used_flags_never_visible_before_id_and_len() {
    const SIZE: u16 = 8;
    const SLOTS: u64 = 2;
    let mem = memory();
    let desc = RING;
    let config = QueueConfig {
        layout: RingLayout::Packed,
        size: SIZE,
        desc_table: desc,
        driver_area: desc + 16 * u64::from(SIZE),
        device_area: desc + 16 * u64::from(SIZE) + 4,
        event_idx: false,
        indirect_desc: false,
    };
    let queue = Queue::new(config, view(&mem)).unwrap();
    let pos = |abs: u64| {
        let size = u64::from(SIZE);
        ((abs % size) as u16, (abs / size) % 2 == 0)
    };
    let stop = AtomicBool::new(false);
    let preemptor = Preemptor::new();
    let seen = std::thread::scope(|s| {
        let preemptor = &preemptor;
        s.spawn(|| preemptor.run());
        s.spawn(|| device_loop(queue, &stop, preemptor));
        let _stop = StopOnDrop(&stop);
        let start = Instant::now();
        let mut next_avail = 0u64;
        let mut next_used = 0u64;
        let mut free_ids: Vec<u16> = (0..SIZE / 2).collect();
        let mut in_flight = [false; SIZE as usize];
        let mut seen = 0u64;
        let mut spins = 0;
        while start.elapsed() < RUN_FOR && seen < MAX_USED {
            // Driver: two-descriptor chains; the head carries poison id and length.
            while next_avail - next_used < u64::from(SIZE) {
                let id = free_ids.pop().unwrap();
                let (hs, hw) = pos(next_avail);
                let (ts, tw) = pos(next_avail + 1);
                let bits = |w: bool| if w { F_AVAIL } else { F_USED };
                let t = desc + 16 * u64::from(ts);
                wr(&mem, t, (BUFS + 0x1000 * u64::from(id)).to_le());
                wr(&mem, t + 8, 0x80u32.to_le());
                wr(&mem, t + 12, id.to_le());
                wr(&mem, t + 14, (F_WRITE | bits(tw)).to_le());
                let h = desc + 16 * u64::from(hs);
                wr(&mem, h, (BUFS + 0x1000 * u64::from(id) + 0x800).to_le());
                wr(&mem, h + 8, POISON_HEAD_LEN.to_le());
                wr(&mem, h + 12, POISON_HEAD_ID.to_le());
                in_flight[usize::from(id)] = true;
                store16(&mem, h + 14, F_NEXT | bits(hw));
                next_avail += SLOTS;
            }
            // Poll the next used descriptor's flags with acquire, as the guest does.
            let (slot, wrap) = pos(next_used);
            let d = desc + 16 * u64::from(slot);
            let flags = load16(&mem, d + 14);
            let is_used = (flags & F_AVAIL != 0) == wrap && (flags & F_USED != 0) == wrap;
            if !is_used {
                idle(&mut spins);
                continue;
            }
            let id: u16 = u16::from_le(rd(&mem, d + 12));
            let len: u32 = u32::from_le(rd(&mem, d + 8));
            assert_ne!(id, POISON_HEAD_ID, "used flags visible before the used id");
            assert!(
                id < SIZE && in_flight[usize::from(id)],
                "bad used id {id:#x}"
            );
            assert_eq!(
                len,
                used_len(id),
                "used flags visible before the used length"
            );
            assert_ne!(flags & F_WRITE, 0);
            in_flight[usize::from(id)] = false;
            free_ids.push(id);
            next_used += SLOTS;
            seen += 1;
        }
        seen
    });
    assert!(seen > 100, "only {seen} used elements in {RUN_FOR:?}");
}
