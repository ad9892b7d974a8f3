// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! I/O engines.
//!
//! A queue talks to its engine in operations (`Op`) tagged with a `user_data` (the
//! request's slot index), and gets back `(user_data, result)` pairs where `result` is
//! the io_uring convention: bytes transferred, or `-errno`.
//!
//! * [`EngineKind::IoUring`]: one ring per queue; operations are queued into the
//!   submission ring and submitted in batches with one `io_uring_enter`; an eventfd is
//!   registered with the ring, so the queue's worker wakes up (epoll) on completions,
//!   which arrive in any order.
//! * [`EngineKind::Sync`]: `preadv`/`pwritev2`/`fdatasync`/`fallocate` run inline;
//!   the result is available as soon as the operation was pushed. Used when io_uring is
//!   unavailable (old kernel, seccomp, `io_uring_disabled`).
//! * [`EngineKind::Adaptive`] (the default): per operation, inline where it cannot wait
//!   on a device (memory file systems; page-cache hits with `RWF_NOWAIT`), io_uring
//!   where it does (`O_DIRECT`, cache misses, flushes); see [`adaptive`].

pub mod adaptive;
mod sync;
mod uring;

use std::alloc::{self, Layout};
use std::fmt;
use std::io;
use std::os::unix::io::RawFd;
use std::ptr::NonNull;
use std::str::FromStr;
use std::time::Duration;

use crate::backend::Storage;

pub(crate) use adaptive::AdaptiveEngine;
pub use adaptive::PathCounts;
pub(crate) use sync::SyncEngine;
pub(crate) use uring::UringEngine;

/// Most iovecs passed to one `readv`/`writev` (`IOV_MAX` / `UIO_MAXIOV`); longer
/// transfers are split into several operations.
pub const IOV_MAX: u32 = 1024;

/// A resolved I/O engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// io_uring, one ring per queue.
    IoUring,
    /// Synchronous system calls on the queue's worker thread.
    Sync,
    /// Inline where an operation cannot wait on a device, io_uring where it does.
    Adaptive,
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::IoUring => "io_uring",
            EngineKind::Sync => "sync",
            EngineKind::Adaptive => "auto (inline or io_uring per file and request)",
        })
    }
}

/// The engine asked for on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum EngineChoice {
    /// [`EngineKind::Adaptive`] if the io_uring probe succeeds, else the synchronous
    /// engine.
    #[default]
    Auto,
    /// io_uring or fail.
    IoUring,
    /// The synchronous engine.
    Sync,
}

impl FromStr for EngineChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(EngineChoice::Auto),
            "io_uring" | "io-uring" | "uring" => Ok(EngineChoice::IoUring),
            "sync" => Ok(EngineChoice::Sync),
            _ => Err(format!(
                "unknown I/O engine {s:?} (expected auto, io_uring or sync)"
            )),
        }
    }
}

impl fmt::Display for EngineChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineChoice::Auto => "auto",
            EngineChoice::IoUring => "io_uring",
            EngineChoice::Sync => "sync",
        })
    }
}

impl EngineChoice {
    /// Resolves the choice, probing io_uring where needed, and logs the engine used.
    /// Fails only for [`EngineChoice::IoUring`] when io_uring is unusable.
    pub fn resolve(self) -> io::Result<EngineKind> {
        let kind = match self {
            EngineChoice::Sync => EngineKind::Sync,
            EngineChoice::IoUring => {
                probe_io_uring()?;
                EngineKind::IoUring
            }
            EngineChoice::Auto => match probe_io_uring() {
                Ok(()) => EngineKind::Adaptive,
                Err(e) => {
                    log::warn!("io_uring unavailable ({e}); falling back to synchronous I/O");
                    EngineKind::Sync
                }
            },
        };
        log::info!("block I/O engine: {kind}");
        Ok(kind)
    }
}

/// Checks that io_uring can be set up here and supports every opcode the engine uses
/// (READV, WRITEV, FSYNC, FALLOCATE; the probe itself needs Linux 5.6).
pub fn probe_io_uring() -> io::Result<()> {
    let ring = io_uring::IoUring::new(4)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (name, code) in [
        ("READV", io_uring::opcode::Readv::CODE),
        ("WRITEV", io_uring::opcode::Writev::CODE),
        ("FSYNC", io_uring::opcode::Fsync::CODE),
        ("FALLOCATE", io_uring::opcode::Fallocate::CODE),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring opcode {name} is not supported by this kernel"),
            ));
        }
    }
    Ok(())
}

/// One operation on the backing file.
///
/// The iovec pointers must stay valid, and the memory they describe mapped, until the
/// operation's completion has been reaped (see [`Engine::push`]).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    /// `preadv(fd, iov, iovcnt, offset)`.
    Read {
        iov: *const libc::iovec,
        iovcnt: u32,
        offset: u64,
    },
    /// `pwritev2(fd, iov, iovcnt, offset, dsync ? RWF_DSYNC : 0)`.
    Write {
        iov: *const libc::iovec,
        iovcnt: u32,
        offset: u64,
        dsync: bool,
    },
    /// `fdatasync(fd)`.
    Flush,
    /// `fallocate(fd, mode, offset, len)`.
    Fallocate { mode: i32, offset: u64, len: u64 },
}

/// The engine of one queue.
pub(crate) enum Engine {
    /// io_uring.
    Uring(Box<UringEngine>),
    /// Synchronous.
    Sync(SyncEngine),
    /// Inline or io_uring per operation.
    Adaptive(Box<AdaptiveEngine>),
}

impl Engine {
    /// An engine for a queue of `queue_size` entries on `fd`, a file stored as
    /// `storage`.
    pub(crate) fn new(
        kind: EngineKind,
        fd: RawFd,
        queue_size: u16,
        storage: Storage,
    ) -> io::Result<Self> {
        Ok(match kind {
            EngineKind::IoUring => Engine::Uring(Box::new(UringEngine::new(fd, queue_size)?)),
            EngineKind::Sync => Engine::Sync(SyncEngine::new(fd)),
            EngineKind::Adaptive => {
                Engine::Adaptive(Box::new(AdaptiveEngine::new(fd, queue_size, storage)?))
            }
        })
    }

    pub(crate) fn kind(&self) -> EngineKind {
        match self {
            Engine::Uring(_) => EngineKind::IoUring,
            Engine::Sync(_) => EngineKind::Sync,
            Engine::Adaptive(_) => EngineKind::Adaptive,
        }
    }

    /// Sets the queue index used in log lines.
    pub(crate) fn set_index(&mut self, index: u16) {
        if let Engine::Adaptive(a) = self {
            a.set_index(index);
        }
    }

    /// How a queue on this engine serves a file stored as `storage`, for the log.
    pub fn describe(kind: EngineKind, storage: Storage) -> String {
        match kind {
            EngineKind::Adaptive => AdaptiveEngine::describe(storage),
            EngineKind::IoUring => "io_uring for every request (--engine io_uring)".into(),
            EngineKind::Sync => "inline system calls for every request (--engine sync)".into(),
        }
    }

    /// Operations served inline and by io_uring so far (adaptive engine only).
    pub(crate) fn path_counts(&self) -> Option<PathCounts> {
        match self {
            Engine::Adaptive(a) => Some(a.counts()),
            _ => None,
        }
    }

    /// The eventfd signalled on completions (io_uring only).
    pub(crate) fn completion_fd(&self) -> Option<RawFd> {
        match self {
            Engine::Uring(u) => Some(u.completion_fd()),
            Engine::Adaptive(a) => Some(a.completion_fd()),
            Engine::Sync(_) => None,
        }
    }

    /// Queues `op`; it is submitted by the next [`Self::submit`] (io_uring) or executed
    /// now (sync). Its result is returned by a later [`Self::reap`].
    ///
    /// # Safety
    ///
    /// Every iovec `op` points to, and the memory those iovecs describe, must stay valid
    /// (and the iovec array unchanged) until the completion for `user_data` is reaped.
    pub(crate) unsafe fn push(&mut self, user_data: u64, op: &Op) -> io::Result<()> {
        match self {
            // SAFETY: forwarded from the caller.
            Engine::Uring(u) => unsafe { u.push(user_data, op) },
            // SAFETY: forwarded from the caller.
            Engine::Adaptive(a) => unsafe { a.push(user_data, op) },
            Engine::Sync(s) => {
                // SAFETY: forwarded from the caller.
                unsafe { s.push(user_data, op) };
                Ok(())
            }
        }
    }

    /// Submits queued operations (one system call for the whole batch).
    pub(crate) fn submit(&mut self) -> io::Result<()> {
        match self {
            Engine::Uring(u) => u.submit(),
            Engine::Adaptive(a) => a.submit(),
            Engine::Sync(_) => Ok(()),
        }
    }

    /// Clears the completion signal (io_uring eventfd); call once before a round of
    /// [`Self::reap`] calls.
    pub(crate) fn clear_signal(&mut self) {
        match self {
            Engine::Uring(u) => u.clear_signal(),
            Engine::Adaptive(a) => a.clear_signal(),
            Engine::Sync(_) => {}
        }
    }

    /// Appends the completions available now to `out`.
    pub(crate) fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        match self {
            Engine::Uring(u) => u.reap(out),
            Engine::Adaptive(a) => a.reap(out),
            Engine::Sync(s) => s.reap(out),
        }
    }

    /// Submits queued operations, then waits at most `timeout` for a completion to be
    /// signalled (io_uring: the completion eventfd becomes readable; the caller reaps
    /// after [`Self::clear_signal`]). Returns early, without error, on a signal
    /// (`EINTR`): callers loop against their own deadline. The synchronous engine never
    /// has anything pending and returns at once.
    pub(crate) fn wait_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        match self {
            Engine::Uring(u) => u.wait_timeout(timeout),
            Engine::Adaptive(a) => a.wait_timeout(timeout),
            Engine::Sync(_s) => {
                // Test hook: completions held back are what "in flight" means here.
                #[cfg(test)]
                _s.release(true);
                Ok(())
            }
        }
    }
}

/// A heap buffer aligned for `O_DIRECT`, zero-initialised.
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is plain heap memory owned by this value; it has no thread affinity.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only hand out the pointer and length; writes go through
// `&mut self` or through I/O the owner serialises.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (at least 1) aligned to `align` (a power of two).
    pub(crate) fn new(len: usize, align: usize) -> Self {
        let layout = Layout::from_size_align(len.max(1), align.max(1).next_power_of_two())
            .unwrap_or_else(|_| Layout::new::<u8>());
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, layout }
    }

    pub(crate) fn len(&self) -> usize {
        self.layout.size()
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated by `alloc_zeroed` with exactly `layout`.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}
