// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's own stdin/stdout as a host side (`--port stdio`).
//!
//! When stdin is a terminal it is put in raw mode (`cfmakeraw`), so that every key
//! reaches the guest (Ctrl-C included: stop the daemon with a signal from elsewhere, or
//! let the daemon watch for an escape key). Both fds are made non-blocking; since
//! O_NONBLOCK belongs to the open file description, which the shell shares, the previous
//! file status flags are saved too.
//!
//! The terminal is restored on every exit path: when [`Stdio`] is dropped, and through a
//! [`RestoreHandle`] that the daemon keeps for its signal handling (a signal-watching
//! thread, an exit path that skips destructors, or even a signal handler:
//! [`RestoreHandle::restore`] makes only async-signal-safe calls and runs once).
//!
//! Window size: SIGWINCH is delivered to the daemon (it is in the terminal's foreground
//! process group). The daemon sets the flag of [`Stdio::winch_flag`] from its signal
//! handling (e.g. `signal_hook::flag::register(SIGWINCH, flag)`); the next
//! [`HostSide::take_events`] reads TIOCGWINSZ on stdout and reports a change.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::pty::make_raw;
use super::{
    errno, fd_read, fd_write, get_winsize, set_nonblocking, HostEvents, HostSide, Interest,
    Readiness, Watch, WinSize,
};

/// Errors of setting up stdio.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// A step of the set-up failed.
    #[error("cannot set up stdio as a console: {step} failed: {source}")]
    Setup {
        /// The call that failed.
        step: &'static str,
        /// The cause.
        source: io::Error,
    },
}

#[derive(Debug)]
struct Saved {
    input: OwnedFd,
    output: OwnedFd,
    termios: Option<libc::termios>,
    input_flags: libc::c_int,
    output_flags: libc::c_int,
    restored: AtomicBool,
}

/// Restores the terminal modes and file status flags that [`Stdio`] changed. Cheap to
/// clone, `Send + Sync`; restoring more than once does nothing.
#[derive(Clone, Debug)]
pub struct RestoreHandle(Arc<Saved>);

impl RestoreHandle {
    /// Restores the saved terminal modes (TCSANOW, so it never waits for output) and
    /// file status flags, once. Only `tcsetattr`, `fcntl` and an atomic swap are used,
    /// all async-signal-safe.
    pub fn restore(&self) {
        let saved = &*self.0;
        if saved.restored.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(t) = &saved.termios {
            // SAFETY: tcsetattr reads one termios from a live field; the fd is owned by
            // `saved` and open.
            unsafe { libc::tcsetattr(saved.input.as_raw_fd(), libc::TCSANOW, t) };
        }
        // In the reverse order of saving: when stdin and stdout share one open file
        // description, the flags saved first are the original ones and must win.
        // SAFETY: F_SETFL with an integer on fds owned by `saved`.
        unsafe { libc::fcntl(saved.output.as_raw_fd(), libc::F_SETFL, saved.output_flags) };
        // SAFETY: as above.
        unsafe { libc::fcntl(saved.input.as_raw_fd(), libc::F_SETFL, saved.input_flags) };
    }

    /// Makes a panic on any thread restore the terminal before the panic message is
    /// printed (then runs the previous hook). Install it once, early.
    pub fn restore_on_panic(&self) {
        let handle = self.clone();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            handle.restore();
            previous(info);
        }));
    }

    /// Whether the terminal has been restored.
    pub fn is_restored(&self) -> bool {
        self.0.restored.load(Ordering::Acquire)
    }
}

/// stdin/stdout host side.
#[derive(Debug)]
pub struct Stdio {
    input: OwnedFd,
    output: OwnedFd,
    restore: RestoreHandle,
    connected: bool,
    input_eof: bool,
    input_paused: bool,
    want_write: bool,
    pending_connected: Option<bool>,
    size: Option<WinSize>,
    winch: Arc<AtomicBool>,
}

fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new fd or -1; no memory is passed.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(errno());
    }
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

impl Stdio {
    /// Uses the process's stdin (fd 0) and stdout (fd 1), duplicated.
    pub fn from_std() -> Result<Self, StdioError> {
        let input = dup(libc::STDIN_FILENO).map_err(|source| StdioError::Setup {
            step: "dup(stdin)",
            source,
        })?;
        let output = dup(libc::STDOUT_FILENO).map_err(|source| StdioError::Setup {
            step: "dup(stdout)",
            source,
        })?;
        Self::new(input, output)
    }

    /// Uses `input` and `output` (terminals, pipes or files): raw mode on `input` if it
    /// is a terminal, both non-blocking.
    pub fn new(input: OwnedFd, output: OwnedFd) -> Result<Self, StdioError> {
        let setup = |step| move |source| StdioError::Setup { step, source };
        let saved_in = dup(input.as_raw_fd()).map_err(setup("dup"))?;
        let saved_out = dup(output.as_raw_fd()).map_err(setup("dup"))?;
        let termios = match make_raw(input.as_raw_fd()) {
            Ok(t) => Some(t),
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => None,
            Err(e) => return Err(setup("tcsetattr(raw)")(e)),
        };
        let mut saved = Saved {
            input: saved_in,
            output: saved_out,
            termios,
            input_flags: 0,
            output_flags: 0,
            restored: AtomicBool::new(false),
        };
        let restore_now = |saved: Saved, e| {
            RestoreHandle(Arc::new(saved)).restore();
            e
        };
        saved.input_flags = match set_nonblocking(input.as_raw_fd()) {
            Ok(f) => f,
            Err(e) => return Err(restore_now(saved, setup("fcntl(stdin)")(e))),
        };
        saved.output_flags = match set_nonblocking(output.as_raw_fd()) {
            Ok(f) => f,
            Err(e) => return Err(restore_now(saved, setup("fcntl(stdout)")(e))),
        };
        let size = get_winsize(output.as_raw_fd()).ok();
        Ok(Self {
            input,
            output,
            restore: RestoreHandle(Arc::new(saved)),
            connected: true,
            input_eof: false,
            input_paused: false,
            want_write: false,
            pending_connected: None,
            size,
            winch: Arc::new(AtomicBool::new(false)),
        })
    }

    /// A handle that restores the terminal, for the daemon's signal handling.
    pub fn restore_handle(&self) -> RestoreHandle {
        self.restore.clone()
    }

    /// The flag to set on SIGWINCH; the next [`HostSide::take_events`] re-reads the size.
    pub fn winch_flag(&self) -> Arc<AtomicBool> {
        self.winch.clone()
    }

    /// Whether stdin reached end of file (output still goes to stdout).
    pub fn input_eof(&self) -> bool {
        self.input_eof
    }
}

impl Drop for Stdio {
    fn drop(&mut self) {
        self.restore.restore();
    }
}

impl HostSide for Stdio {
    fn watches(&self, out: &mut Vec<Watch>) {
        out.clear();
        if !self.connected {
            return;
        }
        let reading = !self.input_eof && !self.input_paused;
        if self.input.as_raw_fd() == self.output.as_raw_fd() {
            out.push(Watch {
                fd: self.input.as_raw_fd(),
                interest: Interest {
                    readable: reading,
                    writable: self.want_write,
                },
            });
            return;
        }
        if reading {
            out.push(Watch {
                fd: self.input.as_raw_fd(),
                interest: Interest {
                    readable: true,
                    writable: false,
                },
            });
        }
        if self.want_write {
            out.push(Watch {
                fd: self.output.as_raw_fd(),
                interest: Interest {
                    readable: false,
                    writable: true,
                },
            });
        }
    }

    fn on_event(&mut self, fd: RawFd, ready: Readiness) -> io::Result<()> {
        if fd == self.output.as_raw_fd() && ready.writable {
            self.want_write = false;
        }
        if fd == self.output.as_raw_fd() && ready.error {
            self.connected = false;
            self.pending_connected = Some(false);
        }
        Ok(())
    }

    fn take_events(&mut self) -> HostEvents {
        let mut events = HostEvents {
            connected: self.pending_connected.take(),
            resize: None,
        };
        if self.winch.swap(false, Ordering::AcqRel) {
            if let Ok(size) = get_winsize(self.output.as_raw_fd()) {
                if self.size != Some(size) {
                    self.size = Some(size);
                    events.resize = Some(size);
                }
            }
        }
        events
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.input_eof {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        match fd_read(self.input.as_raw_fd(), buf) {
            Ok(0) => {
                log::info!("console stdin reached end of file; output continues on stdout");
                self.input_eof = true;
                Err(io::ErrorKind::WouldBlock.into())
            }
            other => other,
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match fd_write(self.output.as_raw_fd(), buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.want_write = true;
                Err(e)
            }
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                self.connected = false;
                self.pending_connected = Some(false);
                Err(e)
            }
            other => other,
        }
    }

    fn is_connected(&self) -> bool {
        self.connected
    }

    fn set_input_paused(&mut self, paused: bool) {
        self.input_paused = paused;
    }

    fn window_size(&self) -> Option<WinSize> {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::pty::tests::read_exact_with;
    use crate::backend::set_winsize;

    /// A pty pair standing in for the terminal: (master, slave).
    fn pty_pair() -> (OwnedFd, OwnedFd) {
        let (mut m, mut s) = (-1, -1);
        // SAFETY: openpty writes two fds into the locals; name, termios and winsize
        // pointers may be null.
        let rc = unsafe {
            libc::openpty(
                &mut m,
                &mut s,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", errno());
        // SAFETY: fresh fds.
        unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) }
    }

    fn lflag(fd: RawFd) -> libc::tcflag_t {
        // SAFETY: zeroed termios, filled by tcgetattr.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: live local.
        assert_eq!(unsafe { libc::tcgetattr(fd, &mut t) }, 0);
        t.c_lflag
    }

    fn flags(fd: RawFd) -> libc::c_int {
        // SAFETY: F_GETFL, no memory.
        unsafe { libc::fcntl(fd, libc::F_GETFL) }
    }

    fn stdio_on(slave: &OwnedFd) -> Stdio {
        Stdio::new(
            dup(slave.as_raw_fd()).unwrap(),
            dup(slave.as_raw_fd()).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn stdio_raw_mode_is_restored_on_drop() {
        let (_m, s) = pty_pair();
        assert_ne!(lflag(s.as_raw_fd()) & libc::ICANON, 0);
        let stdio = stdio_on(&s);
        assert_eq!(lflag(s.as_raw_fd()) & (libc::ICANON | libc::ECHO), 0);
        assert_ne!(flags(s.as_raw_fd()) & libc::O_NONBLOCK, 0);
        drop(stdio);
        assert_ne!(lflag(s.as_raw_fd()) & libc::ICANON, 0);
        assert_ne!(lflag(s.as_raw_fd()) & libc::ECHO, 0);
        assert_eq!(
            flags(s.as_raw_fd()) & libc::O_NONBLOCK,
            0,
            "file flags restored"
        );
    }

    #[test]
    fn stdio_restore_handle_restores_once_from_another_thread() {
        let (_m, s) = pty_pair();
        let stdio = stdio_on(&s);
        let handle = stdio.restore_handle();
        std::thread::spawn(move || handle.restore()).join().unwrap();
        assert_ne!(lflag(s.as_raw_fd()) & libc::ICANON, 0);
        assert!(stdio.restore_handle().is_restored());
        drop(stdio);
        assert_ne!(lflag(s.as_raw_fd()) & libc::ICANON, 0);
    }

    #[test]
    fn stdio_panic_on_another_thread_restores_terminal() {
        let (_m, s) = pty_pair();
        let stdio = stdio_on(&s);
        stdio.restore_handle().restore_on_panic();
        let result = std::thread::spawn(|| panic!("test panic")).join();
        assert!(result.is_err());
        assert!(stdio.restore_handle().is_restored());
        assert_ne!(lflag(s.as_raw_fd()) & libc::ICANON, 0);
    }

    #[test]
    fn stdio_moves_bytes_both_ways() {
        let (m, s) = pty_pair();
        let mut stdio = stdio_on(&s);
        let all: Vec<u8> = (0..=255).collect();
        fd_write(m.as_raw_fd(), &all).unwrap();
        assert_eq!(read_exact_with(256, |b| stdio.read(b)), all);
        assert_eq!(stdio.write(b"out\n").unwrap(), 4);
        set_nonblocking(m.as_raw_fd()).unwrap();
        assert_eq!(read_exact_with(4, |b| fd_read(m.as_raw_fd(), b)), b"out\n");
    }

    #[test]
    fn stdio_sigwinch_reads_size_from_stdout() {
        let (m, s) = pty_pair();
        let mut stdio = stdio_on(&s);
        let size = WinSize { cols: 77, rows: 22 };
        set_winsize(m.as_raw_fd(), size).unwrap();
        assert_eq!(stdio.take_events().resize, None, "no SIGWINCH yet");
        stdio.winch_flag().store(true, Ordering::Release);
        assert_eq!(stdio.take_events().resize, Some(size));
        assert_eq!(stdio.window_size(), Some(size));
    }

    #[test]
    fn stdio_input_eof_stops_watching_input() {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two fds into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh fds.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        drop(w);
        let (_m, s) = pty_pair();
        let mut stdio = Stdio::new(r, dup(s.as_raw_fd()).unwrap()).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(
            stdio.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert!(stdio.input_eof());
        assert!(stdio.is_connected());
        let mut w = Vec::new();
        stdio.watches(&mut w);
        assert!(w.iter().all(|w| !w.interest.readable));
    }
}
