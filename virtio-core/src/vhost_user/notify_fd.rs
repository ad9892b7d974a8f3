// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Kick, call and error descriptors received from the frontend, made safe for a worker.
//!
//! # The rule: no frontend descriptor can block a worker
//!
//! The frontend chooses what it sends as a kick, call or error fd: usually an eventfd
//! (blocking or not), sometimes a pipe (user-mode Linux's call fd), possibly a socket or
//! anything else. A blocking `write` to an eventfd at its maximum counter
//! (0xffff_ffff_ffff_fffe) or to a pipe nobody reads, or a blocking `read` of a kick fd
//! the frontend drained between our wake-up and the read, would stop the worker forever
//! (and with it GET_VRING_BASE, the disconnect and SIGTERM). So every descriptor is
//! *adopted* once, when the request brings it ([`NotifyFd::adopt`]), and every later
//! read or write is non-blocking:
//!
//! - **pipes and FIFOs** are reopened through `/proc/self/fd/N` with `O_NONBLOCK`: that
//!   gives the daemon its own open file description of the same pipe, so the flag is
//!   ours alone. A descriptor received over SCM_RIGHTS shares its open file description
//!   (and so its `O_NONBLOCK` flag) with the sender; changing the sender's pipe from
//!   blocking to non-blocking could break a frontend that reads it blocking, and the
//!   frontend could clear the flag again behind our back. If the reopen fails, the flag
//!   is set on the shared description instead (and that is logged);
//! - **sockets** are used with `send`/`recv` and `MSG_DONTWAIT` (`MSG_NOSIGNAL` too):
//!   non-blocking per call, whatever the shared flags say; their flags are not touched;
//! - **everything else** (eventfds in practice: they cannot be reopened) gets `O_NONBLOCK`
//!   on the shared description, as qemu-storage-daemon does for every received fd. Every
//!   known frontend creates its eventfds non-blocking already (QEMU's event notifiers,
//!   libvhost-user, DPDK, cloud-hypervisor), so this changes nothing for them.
//!
//! What is left: a frontend that clears `O_NONBLOCK` again on its own eventfd *and*
//! saturates it can still stall the worker of its own queues (nothing in Linux makes one
//! eventfd write non-blocking independently of the shared flag). That harms only that
//! frontend: every wait of the connection on a worker is bounded and logged, a worker
//! that does not exit in time is left behind (it holds only that connection's resources)
//! so the next frontend is served, and SIGTERM still stops the daemon.
//!
//! A write that would block means a notification is pending anyway: it is not an error.
//! A write to a pipe whose reader is gone fails with EPIPE (the daemons ignore SIGPIPE, as
//! every Rust program does by default; sockets use `MSG_NOSIGNAL`).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// How a [`NotifyFd`] is read and written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `send`/`recv` with `MSG_DONTWAIT`.
    Socket,
    /// `read`/`write` on a non-blocking description.
    Plain,
}

/// What [`NotifyFd::drain`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Drained {
    /// Read a notification, or nothing was there (a spurious wake-up, or the frontend
    /// drained it first).
    Open,
    /// End of file: the other side hung up (a pipe's writers or a socket's peer closed).
    HungUp,
}

/// A frontend-supplied notification descriptor whose reads and writes never block.
#[derive(Debug)]
pub(crate) struct NotifyFd {
    file: File,
    kind: Kind,
}

impl AsRawFd for NotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Sets `O_NONBLOCK` on `fd`'s open file description.
fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL on a descriptor we hold open; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK != 0 {
        return Ok(());
    }
    // SAFETY: F_SETFL with an int argument on a descriptor we hold open.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens `/proc/self/fd/<fd>` (a new open file description of the same pipe), non-blocking.
fn reopen_pipe(fd: RawFd, write: bool) -> io::Result<File> {
    let path = std::ffi::CString::new(format!("/proc/self/fd/{fd}"))
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mode = if write {
        libc::O_WRONLY
    } else {
        libc::O_RDONLY
    };
    // SAFETY: `path` is a valid NUL-terminated string; the result is checked.
    let r = unsafe { libc::open(path.as_ptr(), mode | libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `r` is a fresh descriptor nobody else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(r) }))
}

impl NotifyFd {
    /// Adopts a descriptor received for `what` ("kick", "call", "err"): see the module
    /// documentation for the rule. `write`: the daemon writes it (call, err) rather than
    /// reads it (kick).
    pub fn adopt(fd: OwnedFd, what: &'static str, write: bool) -> io::Result<Self> {
        let raw = fd.as_raw_fd();
        // SAFETY: all-zero is a valid `stat`; it is only an out-parameter here.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is a valid out-pointer; `raw` is open.
        if unsafe { libc::fstat(raw, &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        match st.st_mode & libc::S_IFMT {
            libc::S_IFSOCK => Ok(NotifyFd {
                file: File::from(fd),
                kind: Kind::Socket,
            }),
            libc::S_IFIFO => match reopen_pipe(raw, write) {
                Ok(file) => Ok(NotifyFd {
                    file,
                    kind: Kind::Plain,
                }),
                Err(e) => {
                    log::warn!(
                        "{what} fd is a pipe that cannot be reopened ({e}); setting O_NONBLOCK on \
                         the description shared with the frontend"
                    );
                    set_nonblocking(raw)?;
                    Ok(NotifyFd {
                        file: File::from(fd),
                        kind: Kind::Plain,
                    })
                }
            },
            _ => {
                set_nonblocking(raw)?;
                Ok(NotifyFd {
                    file: File::from(fd),
                    kind: Kind::Plain,
                })
            }
        }
    }

    /// Another descriptor for the same description (same non-blocking behaviour).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(NotifyFd {
            file: self.file.try_clone()?,
            kind: self.kind,
        })
    }

    /// Writes the 8-byte token 1 (an eventfd increment). Never blocks: a full eventfd
    /// counter, a full pipe or socket buffer means a notification is pending anyway.
    #[inline]
    pub fn signal(&self) -> io::Result<()> {
        let v = 1u64.to_ne_bytes();
        loop {
            let r = match self.kind {
                // SAFETY: sends 8 bytes from a live local buffer on a descriptor we own.
                Kind::Socket => unsafe {
                    libc::send(
                        self.file.as_raw_fd(),
                        v.as_ptr().cast(),
                        v.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                },
                // SAFETY: writes 8 bytes from a live local buffer to a descriptor we own
                // (non-blocking, see `adopt`).
                Kind::Plain => unsafe {
                    libc::write(self.file.as_raw_fd(), v.as_ptr().cast(), v.len())
                },
            };
            if r >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(()),
                _ => return Err(e),
            }
        }
    }

    /// Consumes what is readable (one eventfd read; up to 256 bytes of a pipe or socket,
    /// the rest on the next level-triggered wake-up). Never blocks.
    #[inline]
    pub fn drain(&self) -> io::Result<Drained> {
        let mut buf = [0u8; 256];
        loop {
            let r = match self.kind {
                // SAFETY: receives at most `buf.len()` bytes into a live local buffer.
                Kind::Socket => unsafe {
                    libc::recv(
                        self.file.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                },
                // SAFETY: reads at most `buf.len()` bytes into a live local buffer from a
                // non-blocking descriptor we own.
                Kind::Plain => unsafe {
                    libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                },
            };
            if r > 0 {
                return Ok(Drained::Open);
            }
            if r == 0 {
                return Ok(Drained::HungUp);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(Drained::Open),
                _ => return Err(e),
            }
        }
    }
}
