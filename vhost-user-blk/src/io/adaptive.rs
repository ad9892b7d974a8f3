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
//!   operation type goes to io_uring from then on.
//! * **io_uring**: `O_DIRECT` transfers, flushes and fallocate on files backed by a
//!   device, and writethrough (`RWF_DSYNC`) writes: they wait on the device.

use std::io;
use std::os::unix::io::RawFd;

use super::{Op, SyncEngine, UringEngine};
use crate::backend::Storage;

/// How one kind of operation is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// Run inline (it never waits on a device).
    Inline,
    /// Run inline with `RWF_NOWAIT`; io_uring when that would block.
    NoWait,
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
}

/// The adaptive engine of one queue.
pub(crate) struct AdaptiveEngine {
    inline: SyncEngine,
    uring: UringEngine,
    read: Path,
    write: Path,
    /// Flush and fallocate.
    other: Path,
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
        Ok(AdaptiveEngine {
            inline: SyncEngine::new(fd),
            uring: UringEngine::new(fd, queue_size)?,
            read,
            write,
            other,
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
            Storage::PageCache { fs } => format!(
                "page cache inline with RWF_NOWAIT, io_uring when it would block (buffered \
                 file on {fs})"
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
                    let what = match op {
                        Op::Read { .. } => "reads",
                        _ => "writes",
                    };
                    log::info!(
                        "queue {index}: the file system cannot serve {what} without waiting \
                         (RWF_NOWAIT); they go to io_uring"
                    );
                    *self.path_mut(op) = Path::Uring;
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

    /// Blocks until io_uring has a completion; returns at once if one was served inline.
    pub(crate) fn wait(&mut self) -> io::Result<()> {
        if self.inline.has_completions() {
            return Ok(());
        }
        self.uring.wait()
    }
}
