// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Device-side ring processing cost: pop + walk every descriptor to a host pointer +
//! `add_used`, with one notification check per batch, for chains of 1, 3 and 16
//! descriptors, on
//!
//! * virtio-queue 0.18's split `Queue` (`pop_descriptor_chain`, and `iter` collected per
//!   batch), walking the chain's descriptors and translating each with `get_slice`;
//! * virtio-core's split and packed `Queue` (`pop_into`, which validates and translates
//!   every descriptor).
//!
//! The driver (virtio-core's `DriverQueue`) refills the ring between timed sections
//! (`iter_custom`): each batch makes `BATCH` chains available, untimed, then the device
//! processing of all of them is timed; criterion reports the time per chain. The split
//! rings read by virtio-queue and by virtio-core are laid out and filled by the same
//! driver code, so both see identical rings (checked once before measuring).
//!
//! Run: `cargo bench -p vring-tests --bench rings` (about 90 s: short warm-up and
//! measurement times are set below; criterion flags after `--` override them). After the
//! criterion groups, a `cargo bench` run prints an interleaved cross-check (the variants
//! take turns batch by batch; medians), which is robust to a noisy shared machine.
//! `RINGS_PROFILE=VARIANT:CHAIN_LEN:CHAINS` runs one variant alone, for a profiler.

// A benchmark has nothing to do with a failed setup step but stop: `expect` is the point.
#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use virtio_core::driver::{DriverBuffer, DriverQueue};
use virtio_core::{DescriptorChain, GuestMemoryView, Queue, RingLayout};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Ring size (both layouts): room for `BATCH` chains of 16 descriptors.
const QUEUE_SIZE: u16 = 1024;
/// Chains made available per untimed refill and processed per timed section.
const BATCH: u64 = 64;
/// Chain lengths measured.
const CHAIN_LENS: [usize; 3] = [1, 3, 16];
/// One guest memory region of this size at guest address 0; rings at 0.
const MEM_SIZE: usize = 8 << 20;
/// Data buffers start here.
const DATA_BASE: u64 = 1 << 20;
/// Length of every data buffer.
const BUF_LEN: u32 = 512;

type Mem = GuestMemoryMmap<()>;

/// The buffers of chain number `c` of length `len`: the first half (rounded up)
/// device-readable, the rest device-writable, each in its own 4 KiB page.
fn buffers(c: u64, len: usize) -> Vec<DriverBuffer> {
    let readable = len.div_ceil(2);
    (0..len)
        .map(|i| DriverBuffer {
            addr: DATA_BASE + ((c % BATCH) * 16 + i as u64) * 0x1000,
            len: BUF_LEN,
            writable: i >= readable,
        })
        .collect()
}

/// Guest memory and the driver side of one queue.
struct Rig {
    mem: Mem,
    driver: DriverQueue,
    chains: Vec<Vec<DriverBuffer>>,
}

impl Rig {
    fn new(layout: RingLayout, chain_len: usize) -> Self {
        let mem = Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
        let driver = DriverQueue::new(layout, QUEUE_SIZE, 0, true);
        driver.init(&mem).expect("ring memory");
        let chains = (0..BATCH).map(|c| buffers(c, chain_len)).collect();
        Rig {
            mem,
            driver,
            chains,
        }
    }

    /// Makes `n` chains available (untimed).
    fn refill(&mut self, n: u64) {
        for c in 0..n {
            let bufs = &self.chains[usize::try_from(c).expect("small")];
            self.driver.add_chain(&self.mem, bufs).expect("room");
        }
    }

    /// Takes back every used chain (untimed).
    fn reclaim(&mut self) {
        while self
            .driver
            .pop_used(&self.mem)
            .expect("used ring")
            .is_some()
        {}
    }

    /// virtio-core's device side of this rig's queue.
    fn core_queue(&self) -> Queue {
        let view = GuestMemoryView::new(Arc::new(self.mem.clone())).expect("view");
        Queue::new(self.driver.config(true), Arc::new(view)).expect("queue")
    }

    /// virtio-queue's device side of this rig's (split) queue.
    fn vq_queue(&self) -> virtio_queue::Queue {
        let mut q = virtio_queue::Queue::new(QUEUE_SIZE).expect("queue");
        q.set_size(QUEUE_SIZE);
        q.try_set_desc_table_address(GuestAddress(self.driver.desc_table()))
            .expect("desc table");
        q.try_set_avail_ring_address(GuestAddress(self.driver.driver_area()))
            .expect("avail ring");
        q.try_set_used_ring_address(GuestAddress(self.driver.device_area()))
            .expect("used ring");
        q.set_event_idx(true);
        q.set_ready(true);
        assert!(q.is_valid(&self.mem));
        q
    }

    /// Times `process(n)` over batches of at most `BATCH` chains, refilling in between.
    fn time(&mut self, iters: u64, mut process: impl FnMut(&Mem, u64)) -> Duration {
        let mut total = Duration::ZERO;
        let mut left = iters;
        while left > 0 {
            let n = left.min(BATCH);
            self.refill(n);
            let start = Instant::now();
            process(&self.mem, n);
            total += start.elapsed();
            self.reclaim();
            left -= n;
        }
        total
    }
}

/// The device work for one virtio-queue chain: walk every descriptor (following
/// `next` and indirect tables), check readable-before-writable as virtio-core does,
/// translate each buffer to a host iovec, and return (head, writable bytes).
#[inline(always)]
fn vq_walk(
    mem: &Mem,
    chain: virtio_queue::DescriptorChain<&Mem>,
    iovecs: &mut Vec<libc::iovec>,
) -> (u16, u32) {
    let head = chain.head_index();
    iovecs.clear();
    let mut writable_len = 0u32;
    for d in chain {
        if d.is_write_only() {
            writable_len += d.len();
        } else {
            assert!(writable_len == 0, "readable after writable");
        }
        let slice = mem
            .get_slice(d.addr(), d.len() as usize)
            .expect("buffer in guest memory");
        iovecs.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: slice.len(),
        });
    }
    (head, writable_len)
}

/// Pops the rig's first batch with both implementations over the same split ring and
/// checks that they see the same chains and host buffers.
fn check_identical_rings(chain_len: usize) {
    let mut rig = Rig::new(RingLayout::Split, chain_len);
    let mut core = rig.core_queue();
    let mut vq = rig.vq_queue();
    rig.refill(BATCH);
    let mut chain = DescriptorChain::new();
    let mut iovecs = Vec::new();
    for _ in 0..BATCH {
        assert!(core.pop_into(&mut chain).expect("valid chain"));
        let vq_chain = vq.pop_descriptor_chain(&rig.mem).expect("chain");
        let (head, writable_len) = vq_walk(&rig.mem, vq_chain, &mut iovecs);
        assert_eq!(head, chain.id());
        assert_eq!(writable_len, chain.writable_len());
        let core_iovecs: Vec<_> = chain
            .readable_iovecs()
            .iter()
            .chain(chain.writable_iovecs())
            .map(|i| (i.iov_base, i.iov_len))
            .collect();
        let vq_iovecs: Vec<_> = iovecs.iter().map(|i| (i.iov_base, i.iov_len)).collect();
        assert_eq!(core_iovecs, vq_iovecs);
        assert_eq!(core_iovecs.len(), chain_len);
    }
}

/// The device implementations measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// virtio-queue split, one `pop_descriptor_chain` per chain.
    VqPop,
    /// virtio-queue split, the whole batch through one `iter`.
    VqIter,
    /// virtio-core split.
    CoreSplit,
    /// virtio-core packed.
    CorePacked,
}

const VARIANTS: [Variant; 4] = [
    Variant::VqPop,
    Variant::VqIter,
    Variant::CoreSplit,
    Variant::CorePacked,
];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::VqPop => "virtio-queue-split-pop",
            Variant::VqIter => "virtio-queue-split-iter",
            Variant::CoreSplit => "virtio-core-split",
            Variant::CorePacked => "virtio-core-packed",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        VARIANTS.into_iter().find(|v| v.name() == name)
    }
}

/// The device side of one queue.
enum Device {
    Vq {
        queue: virtio_queue::Queue,
        iovecs: Vec<libc::iovec>,
        heads: Vec<(u16, u32)>,
        batch_iter: bool,
    },
    Core {
        queue: Queue,
        chain: DescriptorChain,
    },
}

impl Device {
    /// The timed device work for `n` available chains: pop and walk each, add_used each,
    /// one notification check.
    #[inline(never)]
    fn process(&mut self, mem: &Mem, n: u64) {
        match self {
            Device::Vq {
                queue,
                iovecs,
                batch_iter: false,
                ..
            } => {
                for _ in 0..n {
                    let chain = queue.pop_descriptor_chain(mem).expect("available");
                    let (head, len) = vq_walk(mem, chain, iovecs);
                    black_box(&*iovecs);
                    queue.add_used(mem, head, len).expect("add_used");
                }
                black_box(queue.needs_notification(mem).expect("notification"));
            }
            Device::Vq {
                queue,
                iovecs,
                heads,
                batch_iter: true,
            } => {
                heads.clear();
                for chain in queue.iter(mem).expect("ready") {
                    heads.push(vq_walk(mem, chain, iovecs));
                    black_box(&*iovecs);
                }
                for &(head, len) in heads.iter() {
                    queue.add_used(mem, head, len).expect("add_used");
                }
                black_box(queue.needs_notification(mem).expect("notification"));
            }
            Device::Core { queue, chain } => {
                for _ in 0..n {
                    let popped = queue.pop_into(chain).expect("valid chain");
                    debug_assert!(popped);
                    black_box(chain.readable_iovecs());
                    black_box(chain.writable_iovecs());
                    queue
                        .add_used(chain.id(), chain.writable_len())
                        .expect("add_used");
                }
                black_box(queue.needs_notification());
            }
        }
    }
}

/// A rig and the device side of its queue.
struct Bench {
    rig: Rig,
    device: Device,
}

impl Bench {
    fn new(variant: Variant, chain_len: usize) -> Self {
        let layout = match variant {
            Variant::CorePacked => RingLayout::Packed,
            _ => RingLayout::Split,
        };
        let rig = Rig::new(layout, chain_len);
        let device = match variant {
            Variant::VqPop | Variant::VqIter => Device::Vq {
                queue: rig.vq_queue(),
                iovecs: Vec::with_capacity(16),
                heads: Vec::with_capacity(usize::from(QUEUE_SIZE)),
                batch_iter: variant == Variant::VqIter,
            },
            Variant::CoreSplit | Variant::CorePacked => Device::Core {
                queue: rig.core_queue(),
                chain: DescriptorChain::new(),
            },
        };
        Bench { rig, device }
    }

    /// Device time for `iters` chains, processed in batches of at most `BATCH` with an
    /// untimed driver refill before each batch.
    fn run(&mut self, iters: u64) -> Duration {
        let device = &mut self.device;
        self.rig.time(iters, |mem, n| device.process(mem, n))
    }
}

fn rings(c: &mut Criterion) {
    for chain_len in CHAIN_LENS {
        check_identical_rings(chain_len);
        let mut group = c.benchmark_group(format!("chain_len_{chain_len}"));
        group.throughput(Throughput::Elements(1));
        for variant in VARIANTS {
            let mut bench = Bench::new(variant, chain_len);
            group.bench_function(BenchmarkId::new(variant.name(), chain_len), |b| {
                b.iter_custom(|iters| bench.run(iters))
            });
        }
        group.finish();
    }
}

/// Median of `v` (sorted in place).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A noise-robust cross-check of criterion's numbers, for a shared machine: the four
/// variants take turns batch by batch (so that they see the same machine conditions),
/// and the median per-chain time over `ROUNDS` batches is reported, with the ratios.
fn interleaved_summary() {
    const ROUNDS: usize = 2000;
    println!();
    println!("interleaved medians ({ROUNDS} batches of {BATCH} chains per variant, ns/chain):");
    println!(
        "{:>9} {:>9} {:>9} {:>11} {:>12} {:>15} {:>16} {:>17}",
        "chain_len",
        "vq-pop",
        "vq-iter",
        "core-split",
        "core-packed",
        "vq-pop/c-split",
        "vq-iter/c-split",
        "c-packed/c-split"
    );
    for chain_len in CHAIN_LENS {
        let mut benches: Vec<Bench> = VARIANTS.iter().map(|&v| Bench::new(v, chain_len)).collect();
        let mut samples = vec![Vec::with_capacity(ROUNDS); VARIANTS.len()];
        for _ in 0..ROUNDS {
            for (b, s) in benches.iter_mut().zip(&mut samples) {
                let t = b.run(BATCH);
                s.push(t.as_secs_f64() * 1e9 / BATCH as f64);
            }
        }
        let m: Vec<f64> = samples.iter_mut().map(|s| median(s)).collect();
        println!(
            "{:>9} {:>9.1} {:>9.1} {:>11.1} {:>12.1} {:>14.2}x {:>15.2}x {:>16.2}x",
            chain_len,
            m[0],
            m[1],
            m[2],
            m[3],
            m[0] / m[2],
            m[1] / m[2],
            m[3] / m[2]
        );
    }
}

/// `RINGS_PROFILE=VARIANT:CHAIN_LEN:CHAINS` runs only that variant's device work for a
/// profiler (callgrind, perf) and exits, e.g. `RINGS_PROFILE=virtio-core-split:16:200000`.
fn profile_mode() -> bool {
    let Ok(spec) = std::env::var("RINGS_PROFILE") else {
        return false;
    };
    let mut parts = spec.split(':');
    let variant = parts
        .next()
        .and_then(Variant::from_name)
        .expect("RINGS_PROFILE: unknown variant");
    let chain_len: usize = parts
        .next()
        .and_then(|p| p.parse().ok())
        .expect("RINGS_PROFILE: chain length");
    let chains: u64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(100_000);
    let mut bench = Bench::new(variant, chain_len);
    let t = bench.run(chains);
    println!(
        "{}: {chains} chains of {chain_len}: {:.1} ns/chain",
        variant.name(),
        t.as_secs_f64() * 1e9 / chains as f64
    );
    true
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
        .configure_from_args()
}

criterion_group! {
    name = benches;
    config = config();
    targets = rings
}

fn main() {
    if profile_mode() {
        return;
    }
    benches();
    // Only for real measurement runs (`cargo bench`), not `cargo test --benches`.
    if std::env::args().any(|a| a == "--bench") && std::env::var_os("RINGS_NO_SUMMARY").is_none() {
        interleaved_summary();
    }
    Criterion::default().configure_from_args().final_summary();
}
