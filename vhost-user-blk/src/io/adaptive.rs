// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The adaptive engine: each operation takes the cheapest path that cannot block the
//! queue's worker on a device.
//!
//! * **Inline**: the system call runs on the worker thread and its result is available
//!   at once. For files on memory file systems (tmpfs, hugetlbfs, ramfs) every
//!   operation is a memory copy (or a no-op flush) that never waits on a device, so it
//!   always runs inline: io_uring would hand each such request to a kernel worker
//!   thread (these file systems do not support `RWF_NOWAIT`, so io_uring cannot try
//!   the copy inline itself), which costs two context switches per request.
//! * **Inline without waiting, then io_uring**: buffered reads and writes of other files
//!   are tried with `RWF_NOWAIT`, which serves them from the page cache and refuses
//!   (`EAGAIN`) where it would have to wait (pages not cached, dirty throttling, locks);
//!   a refused operation goes to io_uring, which does the waiting on its own threads. A
//!   partial inline transfer is a short completion: the request goes on from where it
//!   stopped, so nothing is served twice. Where the file system does not support
//!   `RWF_NOWAIT` for an operation (`EOPNOTSUPP`; ext4 buffered writes, FUSE), that
//!   operation type goes to io_uring from then on, except:
//! * **Guarded inline writes**: buffered writes of whole pages to a local disk file system
//!   that cannot take them with `RWF_NOWAIT` (ext4) are copies into the page cache,
//!   which io_uring would hand to a kernel worker thread each. They run inline and
//!   timed; the one thing that makes them wait is the kernel throttling dirty pages (or
//!   reclaim, or a full journal), so a write that took longer than [`STALL`] sends this
//!   queue's writes to io_uring for [`COOLDOWN`] before inline writes are tried again.
//!   Writes of partial pages (which may have to read the page from the device first)
//!   and writethrough writes always go to io_uring.
//! * **io_uring**: `O_DIRECT` transfers, flushes and fallocate on files backed by a
//!   device, and writethrough (`RWF_DSYNC`) writes: they wait on the device.

use std::io;
use std::os::unix::io::RawFd;
use std::time::{Duration, Instant};

use super::{Op, SyncEngine, UringEngine};
use crate::backend::Storage;

/// An inline write that took longer than this was throttled or waited on the device.
pub const STALL: Duration = Duration::from_millis(1);
/// After a stalled inline write, writes go to io_uring this long.
pub const COOLDOWN: Duration = Duration::from_secs(1);
/// Page size for the whole-page test of guarded writes.
const PAGE: u64 = 4096;

/// How one kind of operation is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// Run inline (it never waits on a device).
    Inline,
    /// Run inline with `RWF_NOWAIT`; io_uring when that would block.
    NoWait,
    /// Whole-page writes inline and timed, io_uring after a stall (see the module
    /// documentation); `Some(t)`: io_uring until `t`.
    Guarded(Option<Instant>),
    /// Submit to io_uring.
    Uring,
}

/// Operations served by each path so far (for the log when the queue stops).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathCounts {
    /// Operations completed inline (including `RWF_NOWAIT` successes).
    pub inline: u64,
    /// Operations submitted to io_uring.
    pub uring: u64,
    /// `RWF_NOWAIT` attempts that would have blocked and went to io_uring.
    pub would_block: u64,
    /// Guarded inline writes that stalled (and sent writes to io_uring for a while).
    pub stalls: u64,
}

/// The adaptive engine of one queue.
pub(crate) struct AdaptiveEngine {
    inline: SyncEngine,
    uring: UringEngine,
    read: Path,
    write: Path,
    /// Flush and fallocate.
    other: Path,
    /// Where `RWF_NOWAIT` writes are refused: guarded inline writes (local disk file
    /// systems) or io_uring.
    guard_writes: bool,
    counts: PathCounts,
    index: u16,
}

impl AdaptiveEngine {
    /// The engine of queue `index` for a file stored as `storage`.
    pub(crate) fn new(fd: RawFd, queue_size: u16, storage: Storage) -> io::Result<Self> {
        let (read, write, other) = match storage {
            Storage::Memory { .. } => (Path::Inline, Path::Inline, Path::Inline),
            Storage::PageCache { .. } => (Path::NoWait, Path::NoWait, Path::Uring),
            Storage::Direct => (Path::Uring, Path::Uring, Path::Uring),
        };
        let guard_writes = matches!(storage, Storage::PageCache { local: true, .. });
        Ok(AdaptiveEngine {
            inline: SyncEngine::new(fd),
            uring: UringEngine::new(fd, queue_size)?,
            read,
            write,
            other,
            guard_writes,
            counts: PathCounts::default(),
            index: 0,
        })
    }

    /// What the log says about the paths of a file stored as `storage`.
    pub fn describe(storage: Storage) -> String {
        match storage {
            Storage::Memory { fs } => format!(
                "inline ({fs} is memory: requests never wait on a device, and io_uring would \
                 hand each one to a kernel worker thread)"
            ),
            Storage::PageCache { fs, local } => format!(
                "page cache inline with RWF_NOWAIT, io_uring when it would block (buffered \
                 file on {fs}){}",
                if local {
                    "; where the file system refuses RWF_NOWAIT writes, whole-page writes \
                     inline and timed, io_uring for a while after one stalls"
                } else {
                    ""
                }
            ),
            Storage::Direct => "io_uring (O_DIRECT: every request waits on the device)".into(),
        }
    }

    /// Sets the queue index used in log lines.
    pub(crate) fn set_index(&mut self, index: u16) {
        self.index = index;
    }

    pub(crate) fn completion_fd(&self) -> RawFd {
        self.uring.completion_fd()
    }

    pub(crate) fn counts(&self) -> PathCounts {
        self.counts
    }

    /// Test hook: the inline engine.
    #[cfg(test)]
    pub(crate) fn inline_engine(&mut self) -> &mut SyncEngine {
        &mut self.inline
    }

    fn path_mut(&mut self, op: &Op) -> &mut Path {
        match op {
            Op::Read { .. } => &mut self.read,
            Op::Write { .. } => &mut self.write,
            Op::Flush | Op::Fallocate { .. } => &mut self.other,
        }
    }

    /// Serves `op` by its path (see the module documentation).
    ///
    /// # Safety
    ///
    /// See [`super::Engine::push`].
    pub(crate) unsafe fn push(&mut self, user_data: u64, op: &Op) -> io::Result<()> {
        match *self.path_mut(op) {
            Path::Guarded(until) => {
                let now = Instant::now();
                match until {
                    Some(t) if now < t => {}
                    _ if whole_pages(op) => {
                        self.write = Path::Guarded(None);
                        // SAFETY: forwarded from the caller.
                        unsafe { self.inline.push(user_data, op) };
                        self.counts.inline += 1;
                        let took = now.elapsed();
                        if took > STALL {
                            self.counts.stalls += 1;
                            self.write = Path::Guarded(Some(Instant::now() + COOLDOWN));
                            log::debug!(
                                "queue {}: an inline write took {took:?}; writes go to io_uring \
                                 for {COOLDOWN:?}",
                                self.index
                            );
                        }
                        return Ok(());
                    }
                    _ => {}
                }
            }
            Path::Inline => {
                // SAFETY: forwarded from the caller.
                unsafe { self.inline.push(user_data, op) };
                self.counts.inline += 1;
                return Ok(());
            }
            Path::NoWait => {
                // SAFETY: forwarded from the caller.
                let res = unsafe { self.inline.try_nowait(op) };
                if res == -libc::EOPNOTSUPP || res == -libc::EINVAL {
                    // EINVAL: a kernel without RWF_NOWAIT for this file.
                    let index = self.index;
                    let is_write = matches!(op, Op::Write { .. });
                    let guarded = is_write && self.guard_writes;
                    log::info!(
                        "queue {index}: the file system cannot serve {} without waiting \
                         (RWF_NOWAIT); {}",
                        if is_write { "writes" } else { "reads" },
                        if guarded {
                            "whole-page writes run inline and timed, the others go to io_uring"
                        } else {
                            "they go to io_uring"
                        }
                    );
                    *self.path_mut(op) = if guarded {
                        Path::Guarded(None)
                    } else {
                        Path::Uring
                    };
                    if guarded {
                        // SAFETY: forwarded from the caller.
                        return unsafe { self.push(user_data, op) };
                    }
                } else if res == -libc::EAGAIN {
                    self.counts.would_block += 1;
                } else {
                    self.inline.complete(user_data, res);
                    self.counts.inline += 1;
                    return Ok(());
                }
            }
            Path::Uring => {}
        }
        self.counts.uring += 1;
        // SAFETY: forwarded from the caller.
        unsafe { self.uring.push(user_data, op) }
    }

    pub(crate) fn submit(&mut self) -> io::Result<()> {
        self.uring.submit()
    }

    pub(crate) fn clear_signal(&mut self) {
        self.uring.clear_signal();
    }

    pub(crate) fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        self.inline.reap(out);
        self.uring.reap(out);
    }

    /// Submits, then waits at most `timeout` for io_uring to signal a completion;
    /// returns at once if one was served inline.
    pub(crate) fn wait_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        if self.inline.has_completions() {
            self.uring.submit()?;
            return Ok(());
        }
        self.uring.wait_timeout(timeout)
    }
}

/// True for a buffered write of whole pages at a page-aligned offset, which the page
/// cache takes without reading the page from the device first.
fn whole_pages(op: &Op) -> bool {
    let Op::Write {
        iov,
        iovcnt,
        offset,
        dsync: false,
    } = *op
    else {
        return false;
    };
    if offset % PAGE != 0 || iov.is_null() {
        return false;
    }
    let n = usize::try_from(iovcnt).unwrap_or(0);
    // SAFETY: `iov` points to `iovcnt` iovecs valid while the operation is pushed (the
    // contract of `Engine::push`); only their lengths are read.
    let iovs = unsafe { std::slice::from_raw_parts(iov, n) };
    let len: u64 = iovs.iter().map(|v| v.iov_len as u64).sum();
    len > 0 && len % PAGE == 0
}
