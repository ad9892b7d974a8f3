// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The synchronous engine: each operation runs inline when pushed.

use std::io;
use std::os::unix::io::RawFd;

use super::{Op, IOV_MAX};

/// Synchronous engine of one queue.
pub(crate) struct SyncEngine {
    fd: RawFd,
    completed: Vec<(u64, i32)>,
    /// `pwritev2(RWF_DSYNC)` was refused: use `pwritev` + `fdatasync` instead.
    dsync_fallback: bool,
    /// Reads and writes carry `RWF_NOWAIT` (see [`SyncEngine::try_nowait`]).
    nowait: bool,
    /// Test hook: keep completions back until [`SyncEngine::release`], to return them
    /// in an order other than submission order.
    #[cfg(test)]
    pub(crate) hold: bool,
    #[cfg(test)]
    held: Vec<(u64, i32)>,
    /// Test hook: transfer at most this many bytes per read or write (short I/O).
    #[cfg(test)]
    pub(crate) max_transfer: Option<usize>,
    /// Test hook: every write takes at least this long (a throttled write).
    #[cfg(test)]
    pub(crate) slow_writes: Option<std::time::Duration>,
}

fn neg_errno(e: &io::Error) -> i32 {
    -e.raw_os_error().unwrap_or(libc::EIO)
}

/// Converts a byte count or -1 return value to the io_uring result convention.
fn result(ret: isize) -> i32 {
    if ret < 0 {
        neg_errno(&io::Error::last_os_error())
    } else {
        // A single transfer is at most 0x7fff_f000 bytes (MAX_RW_COUNT).
        i32::try_from(ret).unwrap_or(i32::MAX)
    }
}

impl SyncEngine {
    pub(crate) fn new(fd: RawFd) -> Self {
        SyncEngine {
            fd,
            completed: Vec::new(),
            dsync_fallback: false,
            nowait: false,
            #[cfg(test)]
            hold: false,
            #[cfg(test)]
            held: Vec::new(),
            #[cfg(test)]
            max_transfer: None,
            #[cfg(test)]
            slow_writes: None,
        }
    }

    /// Runs `op` now and records its result.
    ///
    /// # Safety
    ///
    /// The iovecs of `op` must be valid for the duration of the call.
    /// Runs `op` now with `RWF_NOWAIT` on reads and writes (and no retry), and returns
    /// its result: `-EAGAIN` where it would have blocked (e.g. a read of pages not in
    /// the page cache), `-EOPNOTSUPP` where the file system cannot tell. Nothing is
    /// queued for [`Self::reap`].
    ///
    /// # Safety
    ///
    /// As [`Self::push`], for the duration of the call.
    pub(crate) unsafe fn try_nowait(&mut self, op: &Op) -> i32 {
        self.nowait = true;
        // SAFETY: forwarded from the caller.
        let res = unsafe { self.run(op) };
        self.nowait = false;
        res
    }

    /// Queues the result of an operation that was run elsewhere inline (by
    /// [`Self::try_nowait`]), for the next [`Self::reap`].
    pub(crate) fn complete(&mut self, user_data: u64, res: i32) {
        self.completed.push((user_data, res));
    }

    pub(crate) unsafe fn push(&mut self, user_data: u64, op: &Op) {
        // SAFETY: forwarded from the caller.
        let res = unsafe { self.run(op) };
        #[cfg(test)]
        if self.hold {
            self.held.push((user_data, res));
            return;
        }
        self.completed.push((user_data, res));
    }

    /// # Safety
    ///
    /// See [`Self::push`].
    unsafe fn run(&mut self, op: &Op) -> i32 {
        loop {
            // SAFETY: forwarded from the caller.
            let res = unsafe { self.run_once(op) };
            if res != -libc::EINTR {
                return res;
            }
        }
    }

    /// Applies the short-transfer test hook: at most one iovec, shortened.
    #[cfg(test)]
    fn shorten(
        &self,
        iov: *const libc::iovec,
        iovcnt: u32,
        tmp: &mut libc::iovec,
    ) -> (*const libc::iovec, u32) {
        match self.max_transfer {
            Some(max) if iovcnt > 0 => {
                // SAFETY: `iov` points to at least one valid iovec (iovcnt > 0).
                let first = unsafe { *iov };
                tmp.iov_base = first.iov_base;
                tmp.iov_len = first.iov_len.min(max);
                (tmp as *const libc::iovec, 1)
            }
            _ => (iov, iovcnt),
        }
    }

    /// # Safety
    ///
    /// See [`Self::push`].
    unsafe fn run_once(&mut self, op: &Op) -> i32 {
        let fd = self.fd;
        let offset_of = |off: u64| libc::off64_t::try_from(off).ok();
        match *op {
            Op::Read {
                iov,
                iovcnt,
                offset,
            } => {
                let Some(off) = offset_of(offset) else {
                    return -libc::EINVAL;
                };
                #[cfg(test)]
                let mut tmp = libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                };
                #[cfg(test)]
                let (iov, iovcnt) = self.shorten(iov, iovcnt, &mut tmp);
                let cnt = libc::c_int::try_from(iovcnt.min(IOV_MAX)).unwrap_or(1);
                let flags = if self.nowait { libc::RWF_NOWAIT } else { 0 };
                // SAFETY: the iovecs describe writable memory valid for this call (the
                // caller's contract); `cnt` does not exceed their number.
                result(unsafe { libc::preadv64v2(fd, iov, cnt, off, flags) })
            }
            Op::Write {
                iov,
                iovcnt,
                offset,
                dsync,
            } => {
                let Some(off) = offset_of(offset) else {
                    return -libc::EINVAL;
                };
                #[cfg(test)]
                if let Some(d) = self.slow_writes {
                    std::thread::sleep(d);
                }
                #[cfg(test)]
                let mut tmp = libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                };
                #[cfg(test)]
                let (iov, iovcnt) = self.shorten(iov, iovcnt, &mut tmp);
                let cnt = libc::c_int::try_from(iovcnt.min(IOV_MAX)).unwrap_or(1);
                if self.nowait {
                    // Only plain buffered writes are tried without waiting: a
                    // writethrough write waits for the device by definition.
                    if dsync {
                        return -libc::EAGAIN;
                    }
                    // SAFETY: as for the read above, the iovecs describe readable memory.
                    return result(unsafe {
                        libc::pwritev64v2(fd, iov, cnt, off, libc::RWF_NOWAIT)
                    });
                }
                if dsync && !self.dsync_fallback {
                    // SAFETY: as for the read above, the iovecs describe readable memory.
                    let res =
                        result(unsafe { libc::pwritev64v2(fd, iov, cnt, off, libc::RWF_DSYNC) });
                    if res != -libc::EOPNOTSUPP && res != -libc::ENOSYS {
                        return res;
                    }
                    log::info!("pwritev2(RWF_DSYNC) unsupported; using pwritev + fdatasync");
                    self.dsync_fallback = true;
                }
                // SAFETY: as above.
                let res = result(unsafe { libc::pwritev64(fd, iov, cnt, off) });
                if dsync && res > 0 {
                    // SAFETY: plain system call on an fd we hold.
                    if unsafe { libc::fdatasync(fd) } < 0 {
                        return neg_errno(&io::Error::last_os_error());
                    }
                }
                res
            }
            Op::Flush => {
                // SAFETY: plain system call on an fd we hold.
                if unsafe { libc::fdatasync(fd) } < 0 {
                    neg_errno(&io::Error::last_os_error())
                } else {
                    0
                }
            }
            Op::Fallocate { mode, offset, len } => {
                let (Some(off), Some(len)) = (offset_of(offset), offset_of(len)) else {
                    return -libc::EINVAL;
                };
                // SAFETY: plain system call on an fd we hold; no memory is passed.
                if unsafe { libc::fallocate64(fd, mode, off, len) } < 0 {
                    neg_errno(&io::Error::last_os_error())
                } else {
                    0
                }
            }
        }
    }

    /// True if completions wait for [`Self::reap`].
    pub(crate) fn has_completions(&self) -> bool {
        !self.completed.is_empty()
    }

    pub(crate) fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        out.append(&mut self.completed);
    }

    /// Test hook: makes the held completions available, newest first if `reverse`.
    #[cfg(test)]
    pub(crate) fn release(&mut self, reverse: bool) {
        if reverse {
            self.held.reverse();
        }
        self.completed.append(&mut self.held);
    }
}
