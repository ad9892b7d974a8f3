// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The per-queue request processor.
//!
//! [`BlockQueue`] is owned by the worker thread of its queue's group, and works on the
//! queue's [`Vring`] (the vhost-user server's, or a [`Vring::standalone`] one). How the
//! vhost-user handler ([`crate::vhost_user::BlkQueues`]) drives it:
//!
//! ```text
//! QueueHandler                       BlockQueue
//! ---------------------------------  ----------------------------------------------
//! queue_started(ctx, q)              BlockQueue::new; register completion_fd() (none
//!                                    with the sync engine)
//! process(ctx, q)                    process_available(vring); Throttled if
//!                                    is_throttled(), else Empty
//! handle_event(ctx, token, _)        process_completions(vring)
//! drain(ctx, q)                      drain(vring) (returns at once; what is still in
//!                                    flight completes through process_completions)
//! queue_stopped(ctx, q)              drop (waits, bounded, for operations in flight)
//! memory_changed(_)                  release_idle_memory()
//! ```
//!
//! Requests live in a slot table with one slot per queue entry, so every chain the
//! driver can make available has a slot, and a slot's [`DescriptorChain`], iovec vector
//! and segment vector are reused: nothing is allocated per request once the vectors have
//! grown to the sizes the driver uses (the `O_DIRECT` bounce buffer is allocated once per
//! slot, on its first unaligned request).
//!
//! Each request has at most one operation in flight; long transfers (more than
//! [`IOV_MAX`] iovecs, bounce-buffer chunks, multi-segment discards, short transfers)
//! proceed as a sequence of operations, each issued when the previous one completes.
//! Requests complete in whatever order their operations do; the used ring receives them
//! in completion order, in one batch per wake-up.

use std::io;
use std::os::unix::io::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_core::vhost_user::Vring;
use virtio_core::DescriptorChain;

use crate::backend::{BlockBackend, CacheMode};
use crate::io::{AlignedBuf, Engine, EngineKind, Op, SyncEngine, IOV_MAX};
use crate::metrics::QueueMetrics;
use crate::ratelimit::RateLimiter;
use crate::request::{
    parse, status_byte, DiscardWriteZeroesSegment, Request, RequestLimits, SegmentLimits,
    STATUS_IOERR, STATUS_OK, STATUS_UNSUPP,
};
use crate::SECTOR_SHIFT;

/// Size of a slot's `O_DIRECT` bounce buffer: unaligned transfers go through it in
/// chunks of this size.
pub const BOUNCE_CHUNK: usize = 256 * 1024;
/// Error log lines per second per queue.
const LOG_BURST: u32 = 10;
/// Consecutive EAGAIN/EINTR results tolerated for one operation.
const MAX_RETRIES: u32 = 1000;
/// Longest time dropping a [`BlockQueue`] waits for operations still in flight before
/// giving up on them (and leaking every buffer they may still touch). The vhost-user
/// worker drops a queue after its drain completed or the server's drain timeout passed,
/// so this bound is only reached by I/O stuck in the kernel.
pub const DROP_WAIT: Duration = Duration::from_secs(5);

/// Errors that stop a queue (request failures are reported to the driver instead).
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The virtqueue is broken (malformed ring; see [`virtio_core::Error`]). The glue
    /// should mark the device as needing a reset.
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_core::Error),
    /// The I/O engine failed (e.g. `io_uring_enter` returned an unexpected error).
    #[error("I/O engine: {0}")]
    Engine(#[source] io::Error),
}

/// What a slot is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    /// `fdatasync` after a discard or write-zeroes in writethrough mode.
    SyncAfter,
}

/// The request type, for metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Other,
}

/// How one write-zeroes segment is being zeroed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ZeroMethod {
    /// `FALLOC_FL_PUNCH_HOLE` (UNMAP set).
    PunchHole,
    /// `FALLOC_FL_ZERO_RANGE`.
    ZeroRange,
    /// Plain writes from the backend's zero buffer.
    Write,
}

/// One request's state.
struct Slot {
    chain: DescriptorChain,
    phase: Phase,
    kind: Kind,
    /// Host address of the status byte (inside guest memory kept mapped by `chain`).
    status: *mut u8,
    /// Data iovecs (guest buffers), consumed from the front as the transfer proceeds.
    iovecs: Vec<libc::iovec>,
    iov_idx: usize,
    /// Byte offset on the disk of the transfer.
    offset: u64,
    /// Transfer length.
    len: u64,
    /// Bytes transferred so far.
    done: u64,
    /// Writethrough: writes carry RWF_DSYNC; discards and write-zeroes end with a sync.
    dsync: bool,
    bounce: Option<AlignedBuf>,
    bounced: bool,
    chunk_len: usize,
    chunk_off: usize,
    /// The single iovec of bounce-buffer and zero-buffer operations (heap-allocated so
    /// that its address is stable while the kernel may read it).
    op_iov: Box<libc::iovec>,
    /// Bytes the operation in flight asked for.
    submitted: u64,
    segments: Vec<DiscardWriteZeroesSegment>,
    seg_idx: usize,
    seg_done: u64,
    zero_method: ZeroMethod,
    retries: u32,
    /// Data bytes written into the guest's buffers (for the used length).
    written_to_guest: u64,
}

impl Slot {
    fn new(max_segments: u32) -> Self {
        Slot {
            chain: DescriptorChain::new(),
            phase: Phase::Idle,
            kind: Kind::Other,
            status: std::ptr::null_mut(),
            iovecs: Vec::new(),
            iov_idx: 0,
            offset: 0,
            len: 0,
            done: 0,
            dsync: false,
            bounce: None,
            bounced: false,
            chunk_len: 0,
            chunk_off: 0,
            op_iov: Box::new(libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }),
            submitted: 0,
            segments: Vec::with_capacity(max_segments as usize),
            seg_idx: 0,
            seg_done: 0,
            zero_method: ZeroMethod::ZeroRange,
            retries: 0,
            written_to_guest: 0,
        }
    }

    fn clear(&mut self) {
        self.phase = Phase::Idle;
        self.kind = Kind::Other;
        self.status = std::ptr::null_mut();
        self.iovecs.clear();
        self.iov_idx = 0;
        self.offset = 0;
        self.len = 0;
        self.done = 0;
        self.bounced = false;
        self.chunk_len = 0;
        self.chunk_off = 0;
        self.submitted = 0;
        self.segments.clear();
        self.seg_idx = 0;
        self.seg_done = 0;
        self.retries = 0;
        self.written_to_guest = 0;
    }

    fn set_op_iov(&mut self, base: *mut u8, len: usize) -> *const libc::iovec {
        self.op_iov.iov_base = base.cast();
        self.op_iov.iov_len = len;
        self.submitted = len as u64;
        &*self.op_iov
    }

    fn first_zero_method(&self, backend: &BlockBackend) -> ZeroMethod {
        let unmap = self.segments.get(self.seg_idx).is_some_and(|s| {
            s.flags & virtio_bindings::virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
        });
        if unmap && !backend.punch_hole_unsupported() {
            ZeroMethod::PunchHole
        } else if !backend.zero_range_unsupported() {
            ZeroMethod::ZeroRange
        } else {
            ZeroMethod::Write
        }
    }

    /// The next operation of the request, or the status to complete it with now.
    fn next_op(&mut self, backend: &BlockBackend) -> Result<Op, u8> {
        match self.phase {
            Phase::Idle => Err(STATUS_IOERR),
            Phase::Read | Phase::Write => {
                let is_write = self.phase == Phase::Write;
                let offset = self.offset + self.done;
                if self.bounced {
                    let Some(bounce) = &self.bounce else {
                        return Err(STATUS_IOERR);
                    };
                    let base = bounce.as_ptr();
                    if self.chunk_off == self.chunk_len {
                        // Start the next chunk.
                        let left = usize::try_from(self.len - self.done).unwrap_or(usize::MAX);
                        self.chunk_len = left.min(bounce.len());
                        self.chunk_off = 0;
                        if is_write {
                            // SAFETY: the bounce buffer holds at least `chunk_len` bytes and
                            // nothing else refers to it while no operation is in flight.
                            let dst =
                                unsafe { std::slice::from_raw_parts_mut(base, self.chunk_len) };
                            copy_from_guest(&mut self.iovecs, &mut self.iov_idx, dst);
                        }
                    }
                    let len = self.chunk_len - self.chunk_off;
                    let iov = self.set_op_iov(base.wrapping_add(self.chunk_off), len);
                    Ok(if is_write {
                        Op::Write {
                            iov,
                            iovcnt: 1,
                            offset,
                            dsync: self.dsync,
                        }
                    } else {
                        Op::Read {
                            iov,
                            iovcnt: 1,
                            offset,
                        }
                    })
                } else {
                    let rest = self.iovecs.get(self.iov_idx..).unwrap_or(&[]);
                    let cnt = rest.len().min(IOV_MAX as usize);
                    if cnt == 0 {
                        return Err(STATUS_IOERR);
                    }
                    self.submitted = rest[..cnt].iter().map(|v| v.iov_len as u64).sum();
                    let iov = rest.as_ptr();
                    let iovcnt = u32::try_from(cnt).unwrap_or(IOV_MAX);
                    Ok(if is_write {
                        Op::Write {
                            iov,
                            iovcnt,
                            offset,
                            dsync: self.dsync,
                        }
                    } else {
                        Op::Read {
                            iov,
                            iovcnt,
                            offset,
                        }
                    })
                }
            }
            Phase::Flush | Phase::SyncAfter => {
                self.submitted = 0;
                Ok(Op::Flush)
            }
            Phase::Discard | Phase::WriteZeroes => {
                // Zero-length segments need no operation.
                while self
                    .segments
                    .get(self.seg_idx)
                    .is_some_and(|s| s.num_sectors == 0)
                {
                    self.seg_idx += 1;
                    self.seg_done = 0;
                    self.zero_method = self.first_zero_method(backend);
                }
                let Some(seg) = self.segments.get(self.seg_idx).copied() else {
                    // All segments done.
                    if self.dsync {
                        self.phase = Phase::SyncAfter;
                        self.submitted = 0;
                        return Ok(Op::Flush);
                    }
                    return Err(STATUS_OK);
                };
                // Validated against the capacity: no overflow.
                let offset = seg.sector << SECTOR_SHIFT;
                let len = u64::from(seg.num_sectors) << SECTOR_SHIFT;
                self.submitted = 0;
                let method = if self.phase == Phase::Discard {
                    ZeroMethod::PunchHole
                } else {
                    self.zero_method
                };
                Ok(match method {
                    ZeroMethod::PunchHole => Op::Fallocate {
                        mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        offset,
                        len,
                    },
                    ZeroMethod::ZeroRange => Op::Fallocate {
                        mode: libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                        offset,
                        len,
                    },
                    ZeroMethod::Write => {
                        let zeroes = backend.zero_buffer();
                        let left = usize::try_from(len - self.seg_done).unwrap_or(usize::MAX);
                        let n = left.min(zeroes.len());
                        let iov = self.set_op_iov(zeroes.as_ptr(), n);
                        Op::Write {
                            iov,
                            iovcnt: 1,
                            offset: offset + self.seg_done,
                            dsync: self.dsync,
                        }
                    }
                })
            }
        }
    }

    /// Applies the result of the operation that was in flight. Returns `None` to issue
    /// the next operation, or the status to complete the request with.
    fn on_result(&mut self, res: i32, backend: &BlockBackend) -> Option<u8> {
        if res == -libc::EAGAIN || res == -libc::EINTR {
            self.retries += 1;
            return (self.retries > MAX_RETRIES).then_some(STATUS_IOERR);
        }
        self.retries = 0;
        match self.phase {
            Phase::Idle => Some(STATUS_IOERR),
            Phase::Read | Phase::Write => {
                let Ok(n) = u64::try_from(res) else {
                    return Some(STATUS_IOERR);
                };
                let n = n.min(self.submitted);
                if n == 0 {
                    // End of file or no progress: the image shrank under us.
                    return Some(STATUS_IOERR);
                }
                let n_usize = usize::try_from(n).unwrap_or(usize::MAX);
                if self.bounced {
                    if self.phase == Phase::Read {
                        if let Some(bounce) = &self.bounce {
                            // SAFETY: `chunk_off + n <= chunk_len <= bounce.len()`; the read
                            // that filled these bytes has completed.
                            let src = unsafe {
                                std::slice::from_raw_parts(
                                    bounce.as_ptr().add(self.chunk_off),
                                    n_usize,
                                )
                            };
                            copy_to_guest(&mut self.iovecs, &mut self.iov_idx, src);
                            self.written_to_guest += n;
                        }
                    }
                    self.chunk_off += n_usize;
                } else {
                    advance(&mut self.iovecs, &mut self.iov_idx, n_usize);
                    if self.phase == Phase::Read {
                        self.written_to_guest += n;
                    }
                }
                self.done += n;
                (self.done >= self.len).then_some(STATUS_OK)
            }
            Phase::Flush | Phase::SyncAfter => Some(if res < 0 { STATUS_IOERR } else { STATUS_OK }),
            Phase::Discard => {
                if res == -libc::EOPNOTSUPP {
                    // Discard is a hint (§5.2.6.2: the device MAY deallocate).
                    backend.set_punch_hole_unsupported();
                    self.seg_idx = self.segments.len();
                    return None;
                }
                if res < 0 {
                    return Some(STATUS_IOERR);
                }
                self.seg_idx += 1;
                None
            }
            Phase::WriteZeroes => {
                match self.zero_method {
                    ZeroMethod::PunchHole | ZeroMethod::ZeroRange if res == -libc::EOPNOTSUPP => {
                        if self.zero_method == ZeroMethod::PunchHole {
                            backend.set_punch_hole_unsupported();
                        } else {
                            backend.set_zero_range_unsupported();
                        }
                        self.zero_method = self.first_zero_method(backend);
                        return None;
                    }
                    _ if res < 0 => return Some(STATUS_IOERR),
                    ZeroMethod::PunchHole | ZeroMethod::ZeroRange => {}
                    ZeroMethod::Write => {
                        let n = u64::try_from(res).unwrap_or(0).min(self.submitted);
                        if n == 0 {
                            return Some(STATUS_IOERR);
                        }
                        self.seg_done += n;
                        let seg_len = self
                            .segments
                            .get(self.seg_idx)
                            .map_or(0, |s| u64::from(s.num_sectors) << SECTOR_SHIFT);
                        if self.seg_done < seg_len {
                            return None;
                        }
                    }
                }
                // Segment done.
                self.seg_idx += 1;
                self.seg_done = 0;
                self.zero_method = self.first_zero_method(backend);
                None
            }
        }
    }
}

/// Consumes `n` bytes from the front of `iovecs[*idx..]`, shortening the first partly
/// consumed iovec in place.
fn advance(iovecs: &mut [libc::iovec], idx: &mut usize, mut n: usize) {
    while n > 0 {
        let Some(v) = iovecs.get_mut(*idx) else {
            return;
        };
        if n < v.iov_len {
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
            v.iov_len -= n;
            return;
        }
        n -= v.iov_len;
        v.iov_len = 0;
        *idx += 1;
    }
}

/// Copies `src` into the guest buffers at the front of `iovecs[*idx..]` and consumes
/// them.
fn copy_to_guest(iovecs: &mut [libc::iovec], idx: &mut usize, src: &[u8]) {
    let mut copied = 0;
    for v in iovecs.iter().skip(*idx) {
        if copied == src.len() {
            break;
        }
        let n = v.iov_len.min(src.len() - copied);
        // SAFETY: `v` describes a device-writable guest buffer validated when the chain
        // was popped and kept mapped by the chain's memory reference; `src[copied..]` has
        // at least `n` bytes; guest memory never overlaps our heap buffers.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(copied), v.iov_base.cast(), n) };
        copied += n;
    }
    advance(iovecs, idx, copied);
}

/// Copies the guest buffers at the front of `iovecs[*idx..]` into `dst` and consumes
/// them.
fn copy_from_guest(iovecs: &mut [libc::iovec], idx: &mut usize, dst: &mut [u8]) {
    let mut copied = 0;
    for v in iovecs.iter().skip(*idx) {
        if copied == dst.len() {
            break;
        }
        let n = v.iov_len.min(dst.len() - copied);
        // SAFETY: `v` describes a device-readable guest buffer validated when the chain
        // was popped and kept mapped by the chain's memory reference; `dst[copied..]` has
        // room for `n` bytes; guest memory never overlaps our heap buffers.
        unsafe {
            std::ptr::copy_nonoverlapping(v.iov_base.cast::<u8>(), dst.as_mut_ptr().add(copied), n)
        };
        copied += n;
    }
    advance(iovecs, idx, copied);
}

/// The request processor of one virtqueue. See the module documentation.
pub struct BlockQueue {
    index: u16,
    backend: Arc<BlockBackend>,
    segment_limits: SegmentLimits,
    engine: Engine,
    slots: Vec<Slot>,
    /// Indices of idle slots (a stack: recently used slots are reused first).
    free: Vec<u16>,
    /// Used elements waiting to be published.
    used: Vec<(u16, u32)>,
    /// Scratch space for reaped completions.
    completions: Vec<(u64, i32)>,
    ops_in_flight: usize,
    /// Popping stopped because every slot was busy.
    throttled: bool,
    /// [`BlockQueue::drain`] was called: pop nothing more.
    draining: bool,
    metrics: Arc<QueueMetrics>,
    log_limit: RateLimiter,
}

// SAFETY: the raw pointers held in slots (status bytes, iovecs) point into guest memory
// kept mapped by each slot's `DescriptorChain` (which holds an `Arc` of the memory view),
// or into heap buffers owned by the slot; none has thread affinity. A `BlockQueue` is
// used by one thread at a time (`&mut self` everywhere).
unsafe impl Send for BlockQueue {}

impl std::fmt::Debug for BlockQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockQueue")
            .field("index", &self.index)
            .field("engine", &self.engine.kind())
            .field("slots", &self.slots.len())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl BlockQueue {
    /// A processor for a queue of `queue_size` entries (1..=32768) on `backend`, with
    /// an `engine` ring of its own. Index 0, fresh metrics, default segment limits; see
    /// the `with_*` methods (or use [`crate::BlockDevice::create_queue`]).
    pub fn new(
        backend: Arc<BlockBackend>,
        queue_size: u16,
        engine: EngineKind,
    ) -> io::Result<Self> {
        if queue_size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "queue size must not be 0",
            ));
        }
        let engine = Engine::new(engine, backend.raw_fd(), queue_size, backend.storage())?;
        let segment_limits = SegmentLimits::default();
        let slots = (0..queue_size)
            .map(|_| Slot::new(segment_limits.max_segments()))
            .collect();
        Ok(BlockQueue {
            index: 0,
            backend,
            segment_limits,
            engine,
            slots,
            free: (0..queue_size).rev().collect(),
            used: Vec::with_capacity(usize::from(queue_size)),
            completions: Vec::with_capacity(usize::from(queue_size)),
            ops_in_flight: 0,
            throttled: false,
            draining: false,
            metrics: Arc::new(QueueMetrics::default()),
            log_limit: RateLimiter::new(LOG_BURST),
        })
    }

    /// Sets the queue index (for log messages).
    pub fn with_index(mut self, index: u16) -> Self {
        self.index = index;
        self.engine.set_index(index);
        self
    }

    /// Uses `metrics` (e.g. kept by the device across queue restarts).
    pub fn with_metrics(mut self, metrics: Arc<QueueMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Enforces `limits` on DISCARD and WRITE_ZEROES (they must match the advertised
    /// configuration space).
    pub fn with_segment_limits(mut self, limits: SegmentLimits) -> Self {
        self.segment_limits = limits;
        let max = limits.max_segments() as usize;
        for slot in &mut self.slots {
            slot.segments.reserve(max);
        }
        self
    }

    /// The queue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The I/O engine in use.
    pub fn engine_kind(&self) -> EngineKind {
        self.engine.kind()
    }

    /// Operations the adaptive engine served inline and through io_uring so far
    /// (`None` with the other engines).
    pub fn path_counts(&self) -> Option<crate::io::PathCounts> {
        self.engine.path_counts()
    }

    /// The eventfd to watch for completions (io_uring), to be added to the worker's
    /// epoll set; on readiness call [`Self::process_completions`]. `None` for the
    /// synchronous engine, whose requests complete within [`Self::process_available`].
    pub fn completion_fd(&self) -> Option<RawFd> {
        self.engine.completion_fd()
    }

    /// Requests taken from the queue and not yet returned to it.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// The counters of this queue.
    pub fn metrics(&self) -> &Arc<QueueMetrics> {
        &self.metrics
    }

    /// True if the last [`Self::process_available`] stopped because every request slot
    /// was busy with I/O still in flight (possible when the queue has more entries than
    /// the processor has slots, or when exactly all are in use): popping resumes in
    /// [`Self::process_completions`], which the completion eventfd triggers. A vhost-user
    /// handler reports this as "throttled". Also true once [`Self::drain`] was called:
    /// the chains left in the ring stay there.
    pub fn is_throttled(&self) -> bool {
        self.throttled || self.draining
    }

    /// Pops every available request, validates it, and submits its first operation;
    /// the operations of the whole batch are submitted with one system call. Requests
    /// that fail validation or complete at once (GET_ID, errors; every request with the
    /// synchronous engine) are returned to the driver before this returns, in one batch.
    ///
    /// Returns true if chains were returned to the driver (the vhost-user worker then
    /// signals it if its notification suppression asks for it).
    pub fn process_available(&mut self, ring: &mut Vring) -> Result<bool, QueueError> {
        let mut returned = false;
        loop {
            let popped = self.pop_and_start(ring);
            let submitted = self.engine.submit();
            let completed = self.run_completions();
            returned |= self.publish(ring)?;
            popped?;
            submitted.map_err(QueueError::Engine)?;
            completed.map_err(QueueError::Engine)?;
            // Out of slots, but completions reaped just now freed some: go on popping.
            // (Stopping here could wait forever: those completions will not signal
            // again, and the synchronous engine never signals.)
            if !self.throttled || self.free.is_empty() {
                return Ok(returned);
            }
        }
    }

    /// Reaps completed operations (call when [`Self::completion_fd`] is readable),
    /// issues the next operation of requests that are not finished (short transfers,
    /// further chunks or segments), writes the status of finished ones and returns them
    /// to the driver in one batch. If popping was throttled, pops again now that slots
    /// are free. Returns true if chains were returned to the driver.
    pub fn process_completions(&mut self, ring: &mut Vring) -> Result<bool, QueueError> {
        let completed = self.run_completions();
        let mut returned = self.publish(ring)?;
        completed.map_err(QueueError::Engine)?;
        if self.throttled && !self.free.is_empty() {
            returned |= self.process_available(ring)?;
        }
        Ok(returned)
    }

    /// Stops the queue without blocking (vhost-user `QueueHandler::drain`: GET_VRING_BASE,
    /// device stop or reset): from now on nothing new is popped; operations still queued
    /// are submitted, those already complete are reaped, and the requests they finish are
    /// returned to the driver. Returns true if chains were returned.
    ///
    /// Requests whose I/O is still in flight ([`Self::in_flight`] > 0 afterwards)
    /// complete later: keep calling [`Self::process_completions`] when
    /// [`Self::completion_fd`] is readable, as the vhost-user worker does until the ring's
    /// in-flight count is 0 or its drain timeout passes. Nothing here waits, so the other
    /// queues of the same worker thread keep running. A draining processor is not
    /// restarted: a restarted ring gets a new one.
    pub fn drain(&mut self, ring: &mut Vring) -> Result<bool, QueueError> {
        self.draining = true;
        self.throttled = false;
        let result = self.engine.submit().and_then(|()| self.run_completions());
        let returned = self.publish(ring)?;
        result.map_err(QueueError::Engine)?;
        Ok(returned)
    }

    /// True once [`Self::drain`] was called: the processor takes no new chains.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Drops the guest memory references held by idle slots (their chains keep the
    /// memory view they were popped from alive). Call after the guest memory table
    /// changed so that unmapped regions are released promptly; the slots' chains
    /// then grow their buffers again on next use.
    pub fn release_idle_memory(&mut self) {
        for &i in &self.free {
            if let Some(slot) = self.slots.get_mut(usize::from(i)) {
                slot.chain = DescriptorChain::new();
            }
        }
    }

    fn pop_and_start(&mut self, ring: &mut Vring) -> Result<(), QueueError> {
        self.throttled = false;
        if self.draining {
            return Ok(());
        }
        loop {
            let Some(&idx) = self.free.last() else {
                self.throttled = true;
                return Ok(());
            };
            let slot = &mut self.slots[usize::from(idx)];
            if !ring.pop_into(&mut slot.chain)? {
                return Ok(());
            }
            self.free.pop();
            self.start_request(idx);
        }
    }

    fn limits(&self) -> RequestLimits {
        RequestLimits {
            capacity_sectors: self.backend.capacity_sectors(),
            read_only: self.backend.is_read_only(),
            logical_block_size: self.backend.logical_block_size(),
            direct: self.backend.is_direct(),
            segments: self.segment_limits,
        }
    }

    /// Validates the request just popped into slot `idx` and starts it.
    fn start_request(&mut self, idx: u16) {
        let limits = self.limits();
        let dsync = self.backend.cache_mode() == CacheMode::WriteThrough;
        let m = &*self.metrics;
        QueueMetrics::inc(&m.requests);
        let slot = &mut self.slots[usize::from(idx)];
        slot.clear();
        slot.dsync = dsync;
        let Some(status) = status_byte(&slot.chain) else {
            QueueMetrics::inc(&m.bad_requests);
            let id = slot.chain.id();
            self.log_bad_request(id, &"no writable status byte");
            self.complete(idx, None);
            return;
        };
        slot.status = status;
        let parsed = parse(&slot.chain, &limits, &mut slot.iovecs, &mut slot.segments);
        let request = match parsed {
            Ok(r) => r,
            Err(e) => {
                QueueMetrics::inc(&m.bad_requests);
                let id = slot.chain.id();
                self.log_bad_request(id, &e);
                self.complete(idx, Some(e.status().unwrap_or(STATUS_IOERR)));
                return;
            }
        };
        match request {
            Request::Read { offset, len } | Request::Write { offset, len } => {
                let is_read = matches!(request, Request::Read { .. });
                if is_read {
                    QueueMetrics::inc(&m.read_requests);
                    slot.kind = Kind::Read;
                    slot.phase = Phase::Read;
                } else {
                    QueueMetrics::inc(&m.write_requests);
                    slot.kind = Kind::Write;
                    slot.phase = Phase::Write;
                }
                slot.offset = offset;
                slot.len = len;
                if len == 0 {
                    self.complete(idx, Some(STATUS_OK));
                    return;
                }
                if limits.direct {
                    let align = limits.logical_block_size as usize;
                    let unaligned = slot
                        .iovecs
                        .iter()
                        .any(|v| (v.iov_base as usize) % align != 0 || v.iov_len % align != 0);
                    if unaligned {
                        QueueMetrics::inc(&m.bounced_requests);
                        slot.bounced = true;
                        if slot.bounce.is_none() {
                            slot.bounce = Some(AlignedBuf::new(BOUNCE_CHUNK, align.max(4096)));
                        }
                    }
                }
            }
            Request::Flush => {
                QueueMetrics::inc(&m.flush_requests);
                slot.kind = Kind::Flush;
                slot.phase = Phase::Flush;
            }
            Request::GetId { len } => {
                QueueMetrics::inc(&m.get_id_requests);
                slot.kind = Kind::GetId;
                let serial = self.backend.serial();
                let mut writer = slot.chain.writer();
                let n =
                    io::Write::write(&mut writer, &serial[..len.min(serial.len())]).unwrap_or(0);
                slot.written_to_guest = n as u64;
                self.complete(idx, Some(STATUS_OK));
                return;
            }
            Request::Discard => {
                QueueMetrics::inc(&m.discard_requests);
                slot.kind = Kind::Discard;
                if self.backend.punch_hole_unsupported() {
                    // Discard is only a hint.
                    self.complete(idx, Some(STATUS_OK));
                    return;
                }
                slot.phase = Phase::Discard;
            }
            Request::WriteZeroes => {
                QueueMetrics::inc(&m.write_zeroes_requests);
                slot.kind = Kind::WriteZeroes;
                slot.phase = Phase::WriteZeroes;
                slot.zero_method = slot.first_zero_method(&self.backend);
            }
        }
        self.issue(idx);
    }

    /// Issues the next operation of slot `idx`, or completes it.
    fn issue(&mut self, idx: u16) {
        let slot = &mut self.slots[usize::from(idx)];
        let op = match slot.next_op(&self.backend) {
            Ok(op) => op,
            Err(status) => {
                self.complete(idx, Some(status));
                return;
            }
        };
        // SAFETY: the iovecs of `op` are the slot's data iovecs (guest buffers kept
        // mapped by the slot's chain), its heap `op_iov`, its bounce buffer, or the
        // backend's zero buffer (kept alive by our `Arc` of the backend). None of them is
        // modified or freed until this operation's completion is reaped: the slot stays
        // busy until then, and `Drop` waits for operations in flight.
        match unsafe { self.engine.push(u64::from(idx), &op) } {
            Ok(()) => self.ops_in_flight += 1,
            Err(e) => {
                self.log_io_error(idx, &format!("cannot queue the operation: {e}"));
                self.complete(idx, Some(STATUS_IOERR));
            }
        }
    }

    /// Reaps completions until none is left, continuing or completing their requests.
    fn run_completions(&mut self) -> io::Result<()> {
        self.engine.clear_signal();
        loop {
            let mut batch = std::mem::take(&mut self.completions);
            batch.clear();
            self.engine.reap(&mut batch);
            if batch.is_empty() {
                self.completions = batch;
                return Ok(());
            }
            for &(user_data, res) in &batch {
                self.ops_in_flight = self.ops_in_flight.saturating_sub(1);
                self.on_completion(user_data, res);
            }
            batch.clear();
            self.completions = batch;
            self.engine.submit()?;
        }
    }

    fn on_completion(&mut self, user_data: u64, res: i32) {
        let Some(idx) = u16::try_from(user_data).ok().filter(|&i| {
            self.slots
                .get(usize::from(i))
                .is_some_and(|s| s.phase != Phase::Idle)
        }) else {
            log::error!(
                "queue {}: completion for unknown request slot {user_data}",
                self.index
            );
            return;
        };
        let slot = &mut self.slots[usize::from(idx)];
        let phase = slot.phase;
        let resubmit = res == -libc::EAGAIN
            || res == -libc::EINTR
            || (res > 0
                && matches!(phase, Phase::Read | Phase::Write)
                && u64::try_from(res).unwrap_or(0) < slot.submitted);
        match slot.on_result(res, &self.backend) {
            None => {
                if resubmit {
                    QueueMetrics::inc(&self.metrics.resubmissions);
                }
                self.issue(idx);
            }
            Some(status) => {
                if status != STATUS_OK {
                    let what = if res < 0 {
                        io::Error::from_raw_os_error(-res).to_string()
                    } else {
                        "no progress (end of file?)".to_string()
                    };
                    self.log_io_error(idx, &what);
                }
                self.complete(idx, Some(status));
            }
        }
    }

    /// Writes the status byte (if any), queues the used element and frees the slot.
    fn complete(&mut self, idx: u16, status: Option<u8>) {
        let slot = &mut self.slots[usize::from(idx)];
        let m = &*self.metrics;
        let used_len = match status {
            Some(status) => {
                // SAFETY: `slot.status` is the last device-writable byte of the chain,
                // inside guest memory validated at pop time and kept mapped by the chain.
                unsafe { std::ptr::write_volatile(slot.status, status) };
                match status {
                    STATUS_OK => match slot.kind {
                        Kind::Read => QueueMetrics::add(&m.read_bytes, slot.len),
                        Kind::Write => QueueMetrics::add(&m.write_bytes, slot.len),
                        _ => {}
                    },
                    STATUS_UNSUPP => QueueMetrics::inc(&m.unsupported),
                    _ => QueueMetrics::inc(&m.errors),
                }
                // Data bytes written, plus the status byte; bounded by the writable length.
                u32::try_from(slot.written_to_guest + 1)
                    .unwrap_or(u32::MAX)
                    .min(slot.chain.writable_len())
            }
            None => {
                QueueMetrics::inc(&m.errors);
                0
            }
        };
        self.used.push((slot.chain.id(), used_len));
        slot.clear();
        self.free.push(idx);
    }

    /// Returns the completed requests to the driver. True if there were any.
    fn publish(&mut self, ring: &mut Vring) -> Result<bool, QueueError> {
        if self.used.is_empty() {
            return Ok(false);
        }
        let result = ring.add_used_batch(&self.used);
        self.used.clear();
        result?;
        Ok(true)
    }

    fn log_bad_request(&mut self, id: u16, what: &dyn std::fmt::Display) {
        if let Some(suppressed) = self.check_log() {
            log::warn!(
                "queue {}: bad request (descriptor {id}): {what}{}",
                self.index,
                suppressed_note(suppressed)
            );
        }
    }

    fn log_io_error(&mut self, idx: u16, what: &str) {
        let slot = &self.slots[usize::from(idx)];
        let (kind, offset, len) = (
            slot.kind,
            slot.offset + slot.done,
            slot.len - slot.done.min(slot.len),
        );
        if let Some(suppressed) = self.check_log() {
            log::warn!(
                "queue {}: {kind:?} request failed at offset {offset} ({len} bytes left): {what}{}",
                self.index,
                suppressed_note(suppressed)
            );
        }
    }

    fn check_log(&mut self) -> Option<u64> {
        let r = self.log_limit.check(Instant::now());
        if r.is_none() {
            QueueMetrics::inc(&self.metrics.suppressed_log_lines);
        }
        r
    }

    /// Test hook: the synchronous engine, to hold back or shorten its completions.
    #[cfg(test)]
    pub(crate) fn sync_engine(&mut self) -> Option<&mut crate::io::SyncEngine> {
        match &mut self.engine {
            Engine::Sync(s) => Some(s),
            Engine::Adaptive(a) => Some(a.inline_engine()),
            Engine::Uring(_) => None,
        }
    }
}

fn suppressed_note(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} similar messages suppressed)")
    }
}

impl Drop for BlockQueue {
    fn drop(&mut self) {
        // The kernel may still be reading or writing the buffers of operations in flight
        // (guest memory, iovec arrays, bounce buffers): wait for them, bounded, before
        // freeing. Their requests are not returned to the driver (the ring is gone).
        if self.ops_in_flight == 0 {
            return;
        }
        log::info!(
            "queue {}: waiting up to {DROP_WAIT:?} for {} operations in flight",
            self.index,
            self.ops_in_flight
        );
        let deadline = Instant::now() + DROP_WAIT;
        loop {
            self.engine.clear_signal();
            let mut batch = std::mem::take(&mut self.completions);
            batch.clear();
            self.engine.reap(&mut batch);
            self.ops_in_flight = self.ops_in_flight.saturating_sub(batch.len());
            batch.clear();
            self.completions = batch;
            if self.ops_in_flight == 0 {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let failure = if left.is_zero() {
                Some(format!("still running after {DROP_WAIT:?}"))
            } else {
                self.engine.wait_timeout(left).err().map(|e| e.to_string())
            };
            if let Some(why) = failure {
                log::error!(
                    "queue {}: {} operations in flight ({why}); leaking their buffers",
                    self.index,
                    self.ops_in_flight
                );
                // Keep everything the kernel may still touch: the slots (guest memory
                // references, iovec arrays, bounce buffers), the backend (zero buffer,
                // file) and the ring itself.
                std::mem::forget(std::mem::take(&mut self.slots));
                std::mem::forget(Arc::clone(&self.backend));
                let engine = std::mem::replace(&mut self.engine, Engine::Sync(SyncEngine::new(-1)));
                std::mem::forget(engine);
                return;
            }
        }
    }
}
