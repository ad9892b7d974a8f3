// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Closed-loop workloads over the frontend's queues: random reads, random writes, and
//! write-then-verify rounds.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::blk::{check_pattern, fill_pattern, BlkOp, SECTOR_SIZE};
use super::queue::{BlkQueue, Completion};
use super::stats::LatencySummary;
use super::{FrontendError, Result};

/// What a workload does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WorkloadOp {
    /// Reads of `block_size` at random block-aligned offsets.
    RandRead,
    /// Writes of `block_size` at random block-aligned offsets (data: whatever the slot
    /// buffers hold).
    RandWrite,
    /// Rounds of: write every block a queue owns (in random order) with the pattern of
    /// (sector, generation), flush (if FLUSH was negotiated), read every block back and
    /// check it. Queue `q` of `n` owns the blocks `b` with `b % n == q`, so queues never
    /// race on a block; within a queue no block is written twice in a round.
    Verify,
}

/// When a workload stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// After this long (a [`WorkloadOp::Verify`] round in progress is finished first).
    Duration(Duration),
    /// After this many requests in all (split evenly over the queues; for
    /// [`WorkloadOp::Verify`], at least one round, then stop at a round boundary).
    Count(u64),
}

/// A workload for [`super::BlkFrontend::run_workload`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// What to do.
    pub op: WorkloadOp,
    /// Bytes per request (a multiple of 512, at most the frontend's max block size).
    pub block_size: u32,
    /// Requests kept in flight per queue (at most the frontend's slots).
    pub depth: u16,
    /// When to stop.
    pub limit: Limit,
    /// Bytes of the device used, from offset 0 (default: the whole capacity).
    pub span: Option<u64>,
    /// Seed of the offsets; for [`WorkloadOp::Verify`] also the first generation.
    pub seed: u64,
    /// Use only the first this-many queues (default: all).
    pub queues: Option<u16>,
    /// Keep every request's latency in the report (else only counts).
    pub record_latencies: bool,
}

impl Workload {
    /// A workload over the whole device and all queues, recording latencies, with a seed
    /// taken from the clock (so that a verify run never accepts a previous run's data).
    pub fn new(op: WorkloadOp, block_size: u32, depth: u16, limit: Limit) -> Workload {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs().wrapping_mul(1_000_000_007) ^ u64::from(d.subsec_nanos()))
            .unwrap_or(1);
        Workload {
            op,
            block_size,
            depth,
            limit,
            span: None,
            seed,
            queues: None,
            record_latencies: true,
        }
    }
}

/// Per-queue results.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueReport {
    /// Requests completed (reads + writes + flushes).
    pub ops: u64,
    /// Kicks sent.
    pub kicks: u64,
    /// Kicks suppressed by the device's notification suppression.
    pub kicks_suppressed: u64,
    /// Sleeps on the call eventfd.
    pub sleeps: u64,
    /// Verify rounds completed.
    pub rounds: u64,
}

/// The result of a workload.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadReport {
    /// Data requests completed (reads and writes; flushes not counted).
    pub ops: u64,
    /// Reads completed.
    pub reads: u64,
    /// Writes completed.
    pub writes: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Data bytes transferred.
    pub bytes: u64,
    /// Blocks read back and verified.
    pub verified_blocks: u64,
    /// Wall time from start to the last completion.
    pub elapsed: Duration,
    /// Latency of every data request in nanoseconds, in no particular order (empty if not
    /// recorded).
    pub latencies_ns: Vec<u64>,
    /// Per queue.
    pub per_queue: Vec<QueueReport>,
    /// The generation of the last verify round per queue (the pattern now on the device
    /// in that queue's blocks), for checks outside the frontend.
    pub last_generation: Vec<u64>,
}

impl WorkloadReport {
    /// Data requests per second.
    pub fn iops(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            #[allow(
                clippy::cast_precision_loss,
                reason = "request counts are far below 2^52"
            )]
            let ops = self.ops as f64;
            ops / s
        } else {
            0.0
        }
    }

    /// Latency percentiles (sorts a copy of the samples).
    pub fn latency(&self) -> LatencySummary {
        let mut v = self.latencies_ns.clone();
        LatencySummary::from_nanos(&mut v)
    }
}

/// xorshift64*: fast, good enough for offsets.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in 0..n (n > 0), by multiply-shift.
    fn below(&mut self, n: u64) -> u64 {
        let wide = u128::from(self.next()) * u128::from(n);
        u64::try_from(wide >> 64).unwrap_or(0)
    }
}

/// What one queue's thread is given.
struct Job<'a> {
    w: &'a Workload,
    blocks: u64,
    sectors_per_block: u64,
    nq: u64,
    count: Option<u64>,
    deadline: Option<Instant>,
    flush: bool,
}

/// Accumulates one queue's results.
#[derive(Default)]
struct Acc {
    report: WorkloadReport,
    q: QueueReport,
    last_generation: u64,
    last_completion: Option<Instant>,
}

impl Acc {
    fn record(&mut self, c: &Completion, record_latencies: bool) {
        self.last_completion = Some(Instant::now());
        match c.op {
            BlkOp::Read => self.report.reads += 1,
            BlkOp::Write => self.report.writes += 1,
            BlkOp::Flush => {
                self.report.flushes += 1;
                self.q.ops += 1;
                return;
            }
            BlkOp::GetId => {}
        }
        self.report.ops += 1;
        self.q.ops += 1;
        self.report.bytes += u64::from(c.len);
        if record_latencies {
            self.report
                .latencies_ns
                .push(u64::try_from(c.latency.as_nanos()).unwrap_or(u64::MAX));
        }
    }
}

pub(crate) fn run(
    queues: &mut [BlkQueue],
    w: &Workload,
    span: u64,
    flush: bool,
) -> Result<WorkloadReport> {
    let bs = u64::from(w.block_size);
    if w.block_size == 0 || bs % SECTOR_SIZE != 0 {
        return Err(FrontendError::InvalidOptions(format!(
            "block size {} is not a positive multiple of 512",
            w.block_size
        )));
    }
    let nq = usize::from(w.queues.unwrap_or(u16::MAX)).min(queues.len());
    let queues = &mut queues[..nq];
    let Some(first) = queues.first() else {
        return Err(FrontendError::InvalidOptions("no queue to run on".into()));
    };
    if w.block_size > first.max_data_len() {
        return Err(FrontendError::InvalidOptions(format!(
            "block size {} exceeds the frontend's max block size {}",
            w.block_size,
            first.max_data_len()
        )));
    }
    if w.depth == 0 || w.depth > first.depth() {
        return Err(FrontendError::InvalidOptions(format!(
            "depth {} not in 1..={} (the frontend's slots)",
            w.depth,
            first.depth()
        )));
    }
    let blocks = span / bs;
    let nq64 = nq as u64;
    if blocks < nq64 {
        return Err(FrontendError::Span(format!(
            "{span} bytes hold {blocks} blocks of {bs}, fewer than the {nq} queues"
        )));
    }
    let start = Instant::now();
    let deadline = match w.limit {
        Limit::Duration(d) => Some(start + d),
        Limit::Count(_) => None,
    };
    let results: Vec<Result<Acc>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0u64..)
            .zip(queues.iter_mut())
            .map(|(qi, q)| {
                let count = match w.limit {
                    Limit::Count(n) => Some(n / nq64 + u64::from(qi < n % nq64)),
                    Limit::Duration(_) => None,
                };
                let job = Job {
                    w,
                    blocks,
                    sectors_per_block: bs / SECTOR_SIZE,
                    nq: nq64,
                    count,
                    deadline,
                    flush,
                };
                s.spawn(move || run_queue(q, qi, &job))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(FrontendError::WorkerPanicked)))
            .collect()
    });
    let mut report = WorkloadReport::default();
    let mut end = start;
    for r in results {
        let acc = r?;
        report.ops += acc.report.ops;
        report.reads += acc.report.reads;
        report.writes += acc.report.writes;
        report.flushes += acc.report.flushes;
        report.bytes += acc.report.bytes;
        report.verified_blocks += acc.report.verified_blocks;
        report.latencies_ns.extend(acc.report.latencies_ns);
        report.per_queue.push(acc.q);
        report.last_generation.push(acc.last_generation);
        if let Some(t) = acc.last_completion {
            end = end.max(t);
        }
    }
    report.elapsed = end.saturating_duration_since(start);
    Ok(report)
}

fn run_queue(q: &mut BlkQueue, qi: u64, job: &Job<'_>) -> Result<Acc> {
    let mut acc = Acc::default();
    let before = q.stats();
    match job.w.op {
        WorkloadOp::RandRead | WorkloadOp::RandWrite => random(q, qi, job, &mut acc)?,
        WorkloadOp::Verify => verify(q, qi, job, &mut acc)?,
    }
    let after = q.stats();
    acc.q.kicks = after.kicks - before.kicks;
    acc.q.kicks_suppressed = after.kicks_suppressed - before.kicks_suppressed;
    acc.q.sleeps = after.sleeps - before.sleeps;
    Ok(acc)
}

fn random(q: &mut BlkQueue, qi: u64, job: &Job<'_>, acc: &mut Acc) -> Result<()> {
    let w = job.w;
    let index = q.index();
    let op = if w.op == WorkloadOp::RandRead {
        BlkOp::Read
    } else {
        BlkOp::Write
    };
    let mut rng = Rng::new(w.seed ^ (qi + 1).wrapping_mul(0xa076_1d64_78bd_642f));
    let mut submitted = 0u64;
    let mut stop = false;
    let mut done = Vec::with_capacity(usize::from(w.depth));
    loop {
        while !stop && q.in_flight() < w.depth {
            if job.count.is_some_and(|n| submitted >= n) {
                stop = true;
                break;
            }
            let Some(slot) = q.alloc_slot() else { break };
            let sector = rng.below(job.blocks) * job.sectors_per_block;
            q.submit(slot, op, sector, w.block_size, 0)?;
            submitted += 1;
        }
        q.kick()?;
        if q.in_flight() == 0 {
            return Ok(());
        }
        q.wait(&mut done)?;
        for c in done.drain(..) {
            c.check(index)?;
            acc.record(&c, w.record_latencies);
        }
        if job.deadline.is_some_and(|d| Instant::now() >= d) {
            stop = true;
        }
    }
}

/// Submits `op` on every block of `order` (generation `generation`), `depth` at a time,
/// checking reads against the pattern.
fn verify_pass(
    q: &mut BlkQueue,
    job: &Job<'_>,
    acc: &mut Acc,
    order: &[u64],
    op: BlkOp,
    generation: u64,
) -> Result<()> {
    let w = job.w;
    let index = q.index();
    let len = usize::try_from(w.block_size).unwrap_or(0);
    let mut buf = vec![0u8; len];
    let mut next = order.iter();
    let mut done = Vec::with_capacity(usize::from(w.depth));
    loop {
        while q.in_flight() < w.depth {
            let Some(&block) = next.as_slice().first() else {
                break;
            };
            let Some(slot) = q.alloc_slot() else { break };
            next.next();
            let sector = block * job.sectors_per_block;
            if op == BlkOp::Write {
                fill_pattern(&mut buf, sector, generation);
                q.write_data(slot, &buf)?;
            }
            q.submit(slot, op, sector, w.block_size, 0)?;
        }
        q.kick()?;
        if q.in_flight() == 0 {
            return Ok(());
        }
        q.wait(&mut done)?;
        for c in done.drain(..) {
            c.check(index)?;
            acc.record(&c, w.record_latencies);
            if c.op == BlkOp::Read {
                q.read_data(c.slot, &mut buf)?;
                check_pattern(&buf, c.sector, generation).map_err(|mismatch| {
                    FrontendError::DataMismatch {
                        queue: index,
                        sector: c.sector,
                        len: c.len,
                        generation,
                        mismatch,
                    }
                })?;
                acc.report.verified_blocks += 1;
            }
        }
    }
}

fn verify(q: &mut BlkQueue, qi: u64, job: &Job<'_>, acc: &mut Acc) -> Result<()> {
    let w = job.w;
    let mut rng = Rng::new(w.seed ^ 0x5eed ^ qi);
    let mut order: Vec<u64> = (qi..job.blocks)
        .step_by(usize::try_from(job.nq).unwrap_or(1))
        .collect();
    if let Some(n) = job.count {
        // A count smaller than one round verifies part of the blocks.
        let per_round = usize::try_from((n / 2).max(1)).unwrap_or(usize::MAX);
        order.truncate(per_round);
    }
    let mut issued = 0u64;
    for round in 0u64.. {
        // Fisher-Yates.
        for i in (1..order.len()).rev() {
            let j = usize::try_from(rng.below(i as u64 + 1)).unwrap_or(0);
            order.swap(i, j);
        }
        let generation = w.seed.wrapping_add(round);
        verify_pass(q, job, acc, &order, BlkOp::Write, generation)?;
        if job.flush {
            flush(q, acc, w.record_latencies)?;
        }
        verify_pass(q, job, acc, &order, BlkOp::Read, generation)?;
        acc.last_generation = generation;
        acc.q.rounds += 1;
        issued += 2 * order.len() as u64;
        let over = match (job.count, job.deadline) {
            (Some(n), _) => issued >= n,
            (None, Some(d)) => Instant::now() >= d,
            (None, None) => true,
        };
        if over {
            break;
        }
    }
    Ok(())
}

fn flush(q: &mut BlkQueue, acc: &mut Acc, record: bool) -> Result<()> {
    let index = q.index();
    let slot = q
        .alloc_slot()
        .ok_or_else(|| FrontendError::InvalidOptions("no free slot for a flush".into()))?;
    q.submit(slot, BlkOp::Flush, 0, 0, 0)?;
    q.kick()?;
    let mut done = Vec::with_capacity(1);
    q.drain(&mut done)?;
    for c in done {
        c.check(index)?;
        acc.record(&c, record);
    }
    Ok(())
}
