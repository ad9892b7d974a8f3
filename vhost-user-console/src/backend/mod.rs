// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Host sides of a console port: where guest output goes and guest input comes from.
//!
//! Every host side is non-blocking and pollable through the same small trait,
//! [`HostSide`]: the daemon asks for the fds to watch ([`HostSide::watches`]), reports
//! their readiness ([`HostSide::on_event`]), collects connection and size changes
//! ([`HostSide::take_events`]) and moves bytes with [`HostSide::read`] (host to guest)
//! and [`HostSide::write`] (guest to host), both returning `WouldBlock` rather than
//! waiting.
//!
//! * [`pty::Pty`]: a pseudo-terminal whose slave path a user opens (`screen`, `minicom`).
//! * [`socket::SocketServer`]: a unix socket server, one writer and read-only viewers.
//! * [`stdio::Stdio`]: the daemon's own stdin/stdout, in raw mode.
//! * [`logfile::LogFile`]: an append-only, rotating log of guest output.
//!
//! [`PortOutput`] is the guest-output path of one port: an optional interactive host
//! side teed with an optional log file, behind a [`ReplayBuffer`].

pub mod logfile;
pub mod pty;
pub mod socket;
pub mod stdio;

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use crate::buffer::{InputBuffer, ReplayBuffer};
pub use crate::config::WinSize;
use crate::metrics::PortMetrics;
use logfile::LogFile;

/// What to watch an fd for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interest {
    /// Wake up when the fd is readable (EPOLLIN).
    pub readable: bool,
    /// Wake up when the fd is writable (EPOLLOUT).
    pub writable: bool,
}

/// One fd of a host side and what to watch it for. Hang-ups and errors are always
/// reported by epoll and poll, whatever the interest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watch {
    /// The fd (owned by the host side; valid until the next change of its watches).
    pub fd: RawFd,
    /// The readiness wanted.
    pub interest: Interest,
}

/// The readiness of an fd, as epoll or poll reported it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    /// EPOLLIN / POLLIN.
    pub readable: bool,
    /// EPOLLOUT / POLLOUT.
    pub writable: bool,
    /// EPOLLHUP / EPOLLRDHUP / POLLHUP.
    pub hangup: bool,
    /// EPOLLERR / POLLERR.
    pub error: bool,
}

impl Readiness {
    /// Decodes `poll(2)` `revents`.
    pub fn from_poll(revents: libc::c_short) -> Self {
        Self {
            readable: revents & libc::POLLIN != 0,
            writable: revents & libc::POLLOUT != 0,
            hangup: revents & (libc::POLLHUP | libc::POLLRDHUP) != 0,
            error: revents & (libc::POLLERR | libc::POLLNVAL) != 0,
        }
    }
}

/// Changes of a host side since the last [`HostSide::take_events`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostEvents {
    /// The host side became connected (`Some(true)`: replay kept output, send
    /// PORT_OPEN(1)) or disconnected (`Some(false)`: PORT_OPEN(0)).
    pub connected: Option<bool>,
    /// The host side's window size changed (send RESIZE or update the config space).
    pub resize: Option<WinSize>,
}

/// A non-blocking, pollable host side of a console port.
pub trait HostSide {
    /// Fills `out` (cleared first) with the fds to watch now and their interest. Call
    /// it again after [`HostSide::on_event`], [`HostSide::read`], [`HostSide::write`]
    /// and [`HostSide::set_input_paused`]: the set changes as clients come and go.
    fn watches(&self, out: &mut Vec<Watch>);

    /// Handles readiness of one of the watched fds (accepts clients, flushes queued
    /// output, notices hang-ups). Data for the guest is not read here: call
    /// [`HostSide::read`].
    fn on_event(&mut self, fd: RawFd, ready: Readiness) -> io::Result<()>;

    /// Takes the connection and size changes noticed since the last call.
    fn take_events(&mut self) -> HostEvents;

    /// Reads host input for the guest into `buf`. `WouldBlock` when there is none now;
    /// never `Ok(0)` for a non-empty `buf` (an end of file disconnects the side).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Writes guest output; returns how much was taken, or `WouldBlock`.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize>;

    /// Whether someone is attached to take guest output and give input.
    fn is_connected(&self) -> bool;

    /// Stops (`true`) or resumes watching for input, for backpressure: the daemon pauses
    /// the side while the guest's input buffer is full.
    fn set_input_paused(&mut self, paused: bool);

    /// The host side's window size, if it has one.
    fn window_size(&self) -> Option<WinSize>;
}

/// Reads from `side` into `input` until either would block, and pauses the side's input
/// while `input` is full (backpressure: nothing is read that cannot be kept).
pub fn pump_input(
    side: &mut dyn HostSide,
    input: &mut InputBuffer,
    metrics: &PortMetrics,
) -> io::Result<usize> {
    let n = input.fill_from(&mut |buf| side.read(buf))?;
    PortMetrics::add(&metrics.bytes_in, n as u64);
    let full = input.is_full();
    if full {
        PortMetrics::add(&metrics.input_backpressure, 1);
    }
    side.set_input_paused(full);
    Ok(n)
}

/// The guest-output path of one port: an interactive host side (or none) teed with a
/// log file (or none), behind a replay buffer.
///
/// Output is always taken from the guest: Linux's console driver spins until the device
/// returns a transmitq buffer, so stalling the transmitq would stall the guest's vCPU.
/// Bytes the host side cannot take now (no client attached, or a slow one) wait in the
/// [`ReplayBuffer`], in order; when it is full the oldest are dropped and counted
/// (`dropped_output_bytes`). The log file gets every byte exactly once, as it arrives.
pub struct PortOutput {
    side: Option<Box<dyn HostSide + Send>>,
    log: Option<LogFile>,
    replay: ReplayBuffer,
    metrics: Arc<PortMetrics>,
}

impl std::fmt::Debug for PortOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortOutput")
            .field("side", &self.side.is_some())
            .field("log", &self.log)
            .field("replay", &self.replay)
            .finish()
    }
}

impl PortOutput {
    /// A port output with `replay_bytes` of replay buffer.
    pub fn new(
        side: Option<Box<dyn HostSide + Send>>,
        log: Option<LogFile>,
        replay_bytes: usize,
        metrics: Arc<PortMetrics>,
    ) -> Self {
        Self {
            side,
            log,
            replay: ReplayBuffer::new(replay_bytes),
            metrics,
        }
    }

    /// The interactive host side.
    pub fn side_mut(&mut self) -> Option<&mut (dyn HostSide + Send + 'static)> {
        self.side.as_deref_mut()
    }

    /// The replay buffer (bytes kept for the host side).
    pub fn replay(&self) -> &ReplayBuffer {
        &self.replay
    }

    /// Guest output (the bytes of a transmitq chain): logged, then written to the host
    /// side if it is connected and nothing older is waiting, else kept for replay.
    pub fn output(&mut self, data: &[u8]) {
        PortMetrics::add(&self.metrics.bytes_out, data.len() as u64);
        if let Some(log) = &mut self.log {
            match log.write(data) {
                Ok(()) => PortMetrics::add(&self.metrics.log_bytes, data.len() as u64),
                Err(e) => {
                    PortMetrics::add(&self.metrics.log_errors, 1);
                    log::warn!("console log: {e}");
                }
            }
        }
        let mut rest = data;
        if self.replay.is_empty() {
            if let Some(side) = self.side.as_deref_mut().filter(|s| s.is_connected()) {
                match side.write(rest) {
                    Ok(n) => rest = &rest[n.min(rest.len())..],
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => log::debug!("console host side write: {e}"),
                }
            }
        }
        if !rest.is_empty() {
            let dropped = self.replay.push(rest);
            PortMetrics::add(&self.metrics.dropped_output_bytes, dropped as u64);
        }
    }

    /// Writes kept output to the host side if it is connected (call on connect and when
    /// the side is writable); returns the bytes written.
    pub fn flush(&mut self) -> io::Result<usize> {
        match self.side.as_deref_mut() {
            Some(side) if side.is_connected() => self.replay.replay(&mut |b| side.write(b)),
            _ => Ok(0),
        }
    }

    /// Whether kept output waits for a connected host side (watch it for writability).
    pub fn wants_flush(&self) -> bool {
        !self.replay.is_empty() && self.side.as_ref().is_some_and(|s| s.is_connected())
    }
}

pub(crate) fn errno() -> io::Error {
    io::Error::last_os_error()
}

/// Sets O_NONBLOCK on `fd`; returns the previous file status flags.
pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<libc::c_int> {
    // SAFETY: F_GETFL on an fd the caller owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(errno());
    }
    // SAFETY: F_SETFL with an integer argument on the same fd.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(errno());
    }
    Ok(flags)
}

/// The window size of the terminal `fd` (TIOCGWINSZ).
pub(crate) fn get_winsize(fd: RawFd) -> io::Result<WinSize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one struct winsize to the pointer, which points to a
    // live, properly aligned local of that type.
    if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws as *mut libc::winsize) } < 0 {
        return Err(errno());
    }
    Ok(WinSize {
        cols: ws.ws_col,
        rows: ws.ws_row,
    })
}

/// Sets the window size of the terminal `fd` (TIOCSWINSZ).
pub(crate) fn set_winsize(fd: RawFd, size: WinSize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one struct winsize from the pointer, a live local.
    if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws as *const libc::winsize) } < 0 {
        return Err(errno());
    }
    Ok(())
}

/// `read(2)` into `buf`.
pub(crate) fn fd_read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most buf.len() bytes into buf, which is valid and
    // exclusively borrowed for the call.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| errno())
}

/// `write(2)` from `buf`.
pub(crate) fn fd_write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: the kernel reads at most buf.len() bytes from buf, valid for the call.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| errno())
}

/// A zero-timeout `poll(2)` of one fd; returns its `revents`.
pub(crate) fn poll_now(fd: RawFd, events: libc::c_short) -> io::Result<libc::c_short> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1, timeout 0 (no wait).
    if unsafe { libc::poll(&mut pfd, 1, 0) } < 0 {
        return Err(errno());
    }
    Ok(pfd.revents)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted host side: takes at most `budget` bytes per write.
    struct Fake {
        connected: bool,
        budget: usize,
        got: Arc<std::sync::Mutex<Vec<u8>>>,
    }

    impl HostSide for Fake {
        fn watches(&self, out: &mut Vec<Watch>) {
            out.clear();
        }
        fn on_event(&mut self, _: RawFd, _: Readiness) -> io::Result<()> {
            Ok(())
        }
        fn take_events(&mut self) -> HostEvents {
            HostEvents::default()
        }
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.budget == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.budget);
            self.budget -= n;
            self.got.lock().unwrap().extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn is_connected(&self) -> bool {
            self.connected
        }
        fn set_input_paused(&mut self, _: bool) {}
        fn window_size(&self) -> Option<WinSize> {
            None
        }
    }

    type Got = Arc<std::sync::Mutex<Vec<u8>>>;

    fn fake(connected: bool, budget: usize) -> (Box<dyn HostSide + Send>, Got) {
        let got = Got::default();
        let side = Box::new(Fake {
            connected,
            budget,
            got: got.clone(),
        });
        (side, got)
    }

    #[test]
    fn host_sides_can_move_to_a_worker_thread() {
        fn send<T: Send + HostSide>() {}
        send::<pty::Pty>();
        send::<socket::SocketServer>();
        send::<stdio::Stdio>();
    }

    #[test]
    fn output_without_client_is_kept_for_replay() {
        let metrics = Arc::new(PortMetrics::default());
        let (side, got) = fake(false, 100);
        let mut out = PortOutput::new(Some(side), None, 4, metrics.clone());
        out.output(b"abcdef");
        let (a, b) = out.replay().as_slices();
        assert_eq!([a, b].concat(), b"cdef");
        assert_eq!(metrics.snapshot().dropped_output_bytes, 2);
        assert_eq!(metrics.snapshot().bytes_out, 6);
        assert!(!out.wants_flush());
        assert!(got.lock().unwrap().is_empty());
    }

    #[test]
    fn output_to_slow_client_keeps_order() {
        let metrics = Arc::new(PortMetrics::default());
        let (side, got) = fake(true, 2);
        let mut out = PortOutput::new(Some(side), None, 16, metrics);
        out.output(b"abcd");
        out.output(b"ef");
        let (a, b) = out.replay().as_slices();
        assert_eq!([a, b].concat(), b"cdef", "newer output queues behind older");
        assert!(out.wants_flush());
        assert_eq!(out.flush().unwrap(), 0, "the client takes nothing more");
        assert_eq!(*got.lock().unwrap(), b"ab");
    }

    #[test]
    fn output_is_logged_once() {
        let dir = crate::backend::logfile::tests::TempDir::new("tee");
        let path = dir.path().join("log");
        let log = LogFile::open(&path, 0, 1).unwrap();
        let metrics = Arc::new(PortMetrics::default());
        let (side, got) = fake(true, 3);
        let mut out = PortOutput::new(Some(side), Some(log), 16, metrics.clone());
        out.output(b"hello");
        out.flush().unwrap();
        assert_eq!(*got.lock().unwrap(), b"hel");
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");
        assert_eq!(metrics.snapshot().log_bytes, 5);
    }

    #[test]
    fn pump_input_pauses_when_full() {
        struct Endless(bool);
        impl HostSide for Endless {
            fn watches(&self, out: &mut Vec<Watch>) {
                out.clear();
            }
            fn on_event(&mut self, _: RawFd, _: Readiness) -> io::Result<()> {
                Ok(())
            }
            fn take_events(&mut self) -> HostEvents {
                HostEvents::default()
            }
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                buf.fill(b'z');
                Ok(buf.len())
            }
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                Ok(b.len())
            }
            fn is_connected(&self) -> bool {
                true
            }
            fn set_input_paused(&mut self, paused: bool) {
                self.0 = paused;
            }
            fn window_size(&self) -> Option<WinSize> {
                None
            }
        }
        let mut side = Endless(false);
        let mut input = InputBuffer::new(10);
        let metrics = PortMetrics::default();
        assert_eq!(pump_input(&mut side, &mut input, &metrics).unwrap(), 10);
        assert!(side.0, "paused while the buffer is full");
        let mut out = [0u8; 4];
        input.pop_into(&mut out);
        assert_eq!(pump_input(&mut side, &mut input, &metrics).unwrap(), 4);
        assert_eq!(metrics.snapshot().bytes_in, 14);
    }
}
