// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The io_uring engine: one ring per queue, with a registered completion eventfd.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use super::Op;

/// Largest io_uring submission ring (IORING_MAX_ENTRIES).
const MAX_ENTRIES: u32 = 32768;

/// io_uring engine of one queue.
pub(crate) struct UringEngine {
    ring: IoUring,
    eventfd: EventFd,
    fd: types::Fd,
}

impl UringEngine {
    /// A ring with room for one operation per queue entry, so that pushing never finds
    /// the submission ring full (each request has at most one operation in flight) and
    /// the completion ring never overflows.
    pub(crate) fn new(fd: RawFd, queue_size: u16) -> io::Result<Self> {
        let entries = u32::from(queue_size)
            .max(1)
            .next_power_of_two()
            .min(MAX_ENTRIES);
        let ring = IoUring::builder()
            .setup_cqsize(entries.saturating_mul(2))
            .build(entries)?;
        let eventfd = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(UringEngine {
            ring,
            eventfd,
            fd: types::Fd(fd),
        })
    }

    pub(crate) fn completion_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn build(&self, user_data: u64, op: &Op) -> squeue::Entry {
        let entry = match *op {
            Op::Read {
                iov,
                iovcnt,
                offset,
            } => opcode::Readv::new(self.fd, iov, iovcnt)
                .offset(offset)
                .build(),
            Op::Write {
                iov,
                iovcnt,
                offset,
                dsync,
            } => opcode::Writev::new(self.fd, iov, iovcnt)
                .offset(offset)
                .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                .build(),
            Op::Flush => opcode::Fsync::new(self.fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Fallocate { mode, offset, len } => opcode::Fallocate::new(self.fd, len)
                .offset(offset)
                .mode(mode)
                .build(),
        };
        entry.user_data(user_data)
    }

    /// Queues `op` in the submission ring.
    ///
    /// # Safety
    ///
    /// See [`super::Engine::push`].
    pub(crate) unsafe fn push(&mut self, user_data: u64, op: &Op) -> io::Result<()> {
        let entry = self.build(user_data, op);
        for _ in 0..2 {
            // SAFETY: the buffers the entry refers to stay valid until its completion is
            // reaped (the caller's contract).
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            // Full (cannot happen while the ring has an entry per request): make room.
            self.submit()?;
        }
        Err(io::Error::other("io_uring submission ring is full"))
    }

    /// Submits everything queued. A busy ring (completion ring overflow) is not an
    /// error: the entries stay queued and are submitted by the next call, made after
    /// completions have been reaped.
    pub(crate) fn submit(&mut self) -> io::Result<()> {
        loop {
            if self.ring.submission().is_empty() {
                return Ok(());
            }
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) | Some(libc::EBUSY) => return Ok(()),
                    _ => return Err(e),
                },
            }
        }
    }

    /// Clears the completion eventfd. Call before [`Self::reap`]: a completion posted
    /// after the clear sets it again, so the next wake-up is not lost.
    pub(crate) fn clear_signal(&mut self) {
        // EAGAIN (nothing to clear) is expected; any other error is harmless here.
        let _ = self.eventfd.read();
    }

    /// Takes every completion in the ring.
    pub(crate) fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        for cqe in self.ring.completion() {
            out.push((cqe.user_data(), cqe.result()));
        }
    }

    /// Submits what is queued, then waits at most `timeout` for the completion eventfd
    /// to become readable (it does not consume the readiness: see
    /// [`Self::clear_signal`]). A signal (`EINTR`) ends the wait early without error.
    pub(crate) fn wait_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.submit()?;
        let mut pfd = libc::pollfd {
            fd: self.eventfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // Round up so that a short remaining time still waits, and cap at a minute (the
        // callers loop against their own deadline).
        let ms =
            libc::c_int::try_from(timeout.as_micros().div_ceil(1000).min(60_000)).unwrap_or(60_000);
        // SAFETY: `pfd` is one valid pollfd, live for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(())
    }
}
