// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A pseudo-terminal host side: the daemon holds the master, a user opens the slave
//! path ([`Pty::slave_path`], e.g. `/dev/pts/7`) with `screen`, `minicom` or `cat`.
//!
//! The pty is opened with `posix_openpt`/`grantpt`/`unlockpt`/`ptsname_r`; the master is
//! non-blocking; the slave's line discipline is put in raw mode (`cfmakeraw`: no echo,
//! no line editing, no CR/NL translation, 8 bits) so that the guest's bytes pass through
//! unchanged. Clients usually set their own modes on top.
//!
//! ## Clients coming and going
//!
//! By default ([`PtyOptions::keep_slave_open`]) the daemon keeps the slave open itself.
//! The pty then survives any number of clients attaching and leaving: the master never
//! reads EIO and never polls POLLHUP (which would make a level-triggered event loop spin
//! while nobody is attached). The price is that the kernel does not tell whether a
//! client is attached: the port counts as connected from the start, guest output fills
//! the pty's buffer (the next client reads up to about 4 KiB of it first) and then waits
//! in the port's replay buffer.
//!
//! Without it, the slave is closed after set-up: reads of the master fail with EIO and
//! poll reports POLLHUP while no client has the slave open. EIO is then "no client": the
//! port is disconnected, its master is taken out of the watched set (so the loop does
//! not spin on POLLHUP) and [`HostSide::take_events`] re-checks with a zero-timeout
//! `poll` whether a client came; the daemon calls it on a timer (QEMU's pty chardev polls
//! once a second the same way).
//!
//! ## Size changes
//!
//! A client resizes the pty with TIOCSWINSZ on the slave. The kernel sends SIGWINCH to
//! the slave's foreground process group, which is not the daemon's, so no signal tells
//! the daemon. Instead [`HostSide::take_events`] compares TIOCGWINSZ with the last size
//! it saw: the daemon calls it after each read from the pty (a resize is usually followed
//! by a redraw request) and on its timer.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use super::{
    errno, fd_read, fd_write, get_winsize, poll_now, set_nonblocking, set_winsize, HostEvents,
    HostSide, Interest, Readiness, Watch, WinSize,
};

/// Errors of opening a pty.
#[derive(Debug, thiserror::Error)]
pub enum PtyError {
    /// A step of setting up the pty failed.
    #[error("cannot set up a pty: {step} failed: {source}")]
    Setup {
        /// The call that failed.
        step: &'static str,
        /// The cause.
        source: io::Error,
    },
}

fn step(step: &'static str) -> impl FnOnce(io::Error) -> PtyError {
    move |source| PtyError::Setup { step, source }
}

/// How to open a [`Pty`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PtyOptions {
    /// Keep the slave open in the daemon so that the pty survives clients leaving (see
    /// the module documentation). Default: `true`.
    pub keep_slave_open: bool,
    /// Initial window size (TIOCSWINSZ), if any.
    pub size: Option<WinSize>,
}

impl Default for PtyOptions {
    fn default() -> Self {
        Self {
            keep_slave_open: true,
            size: None,
        }
    }
}

/// A pty host side.
#[derive(Debug)]
pub struct Pty {
    master: OwnedFd,
    slave: Option<OwnedFd>,
    path: PathBuf,
    connected: bool,
    pending_connected: Option<bool>,
    size: Option<WinSize>,
    input_paused: bool,
    want_write: bool,
}

/// Puts the terminal `fd` in raw mode (`cfmakeraw`).
pub(crate) fn make_raw(fd: RawFd) -> io::Result<libc::termios> {
    // SAFETY: termios is plain data; all-zero is a valid value to be overwritten.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes one termios to a live local.
    if unsafe { libc::tcgetattr(fd, &mut saved) } < 0 {
        return Err(errno());
    }
    let mut raw = saved;
    // SAFETY: cfmakeraw only modifies the termios it is given, a live local.
    unsafe { libc::cfmakeraw(&mut raw) };
    // SAFETY: tcsetattr reads one termios from a live local.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } < 0 {
        return Err(errno());
    }
    Ok(saved)
}

impl Pty {
    /// Opens a new pty (see the module documentation).
    pub fn open(options: PtyOptions) -> Result<Self, PtyError> {
        // SAFETY: posix_openpt takes flags only and returns a new fd or -1.
        let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(step("posix_openpt")(errno()));
        }
        // SAFETY: fd is a fresh fd that nothing else owns.
        let master = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: grantpt and unlockpt take the master fd only.
        if unsafe { libc::grantpt(master.as_raw_fd()) } < 0 {
            return Err(step("grantpt")(errno()));
        }
        // SAFETY: as above.
        if unsafe { libc::unlockpt(master.as_raw_fd()) } < 0 {
            return Err(step("unlockpt")(errno()));
        }
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: ptsname_r writes a NUL-terminated name of at most name.len() bytes
        // into the local array.
        let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
        if rc != 0 {
            return Err(step("ptsname_r")(io::Error::from_raw_os_error(rc)));
        }
        // SAFETY: ptsname_r succeeded, so name holds a NUL-terminated string.
        let cname = unsafe { CStr::from_ptr(name.as_ptr()) };
        let path = PathBuf::from(
            std::str::from_utf8(cname.to_bytes())
                .map_err(|_| step("ptsname_r")(io::ErrorKind::InvalidData.into()))?,
        );
        set_nonblocking(master.as_raw_fd()).map_err(step("fcntl(O_NONBLOCK)"))?;
        // SAFETY: cname is a valid C string; open returns a new fd or -1.
        let sfd = unsafe {
            libc::open(
                cname.as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        if sfd < 0 {
            return Err(step("open slave")(errno()));
        }
        // SAFETY: sfd is a fresh fd that nothing else owns.
        let slave = unsafe { OwnedFd::from_raw_fd(sfd) };
        make_raw(slave.as_raw_fd()).map_err(step("cfmakeraw/tcsetattr"))?;
        if let Some(size) = options.size {
            set_winsize(slave.as_raw_fd(), size).map_err(step("TIOCSWINSZ"))?;
        }
        let size = get_winsize(master.as_raw_fd()).ok();
        let mut pty = Self {
            master,
            slave: Some(slave),
            path,
            connected: true,
            pending_connected: None,
            size,
            input_paused: false,
            want_write: false,
        };
        if !options.keep_slave_open {
            pty.slave = None;
            pty.connected = false;
            pty.refresh_connection();
            pty.pending_connected = None;
        }
        Ok(pty)
    }

    /// The slave's path, for the user to open.
    pub fn slave_path(&self) -> &Path {
        &self.path
    }

    /// The master fd.
    pub fn master_fd(&self) -> RawFd {
        self.master.as_raw_fd()
    }

    /// Sets the pty's window size (e.g. from `--cols/--rows`).
    pub fn set_window_size(&mut self, size: WinSize) -> io::Result<()> {
        set_winsize(self.master.as_raw_fd(), size)?;
        self.size = Some(size);
        Ok(())
    }

    fn set_connected(&mut self, connected: bool) {
        if self.connected != connected {
            self.connected = connected;
            self.pending_connected = Some(connected);
        }
    }

    /// Without a held slave: re-checks whether a client has the slave open (POLLHUP on
    /// the master means none).
    fn refresh_connection(&mut self) {
        if self.slave.is_some() {
            return;
        }
        if let Ok(revents) = poll_now(self.master.as_raw_fd(), libc::POLLIN) {
            self.set_connected(revents & libc::POLLHUP == 0);
        }
    }

    fn is_eio(e: &io::Error) -> bool {
        e.raw_os_error() == Some(libc::EIO)
    }
}

impl HostSide for Pty {
    fn watches(&self, out: &mut Vec<Watch>) {
        out.clear();
        if !self.connected {
            return;
        }
        out.push(Watch {
            fd: self.master.as_raw_fd(),
            interest: Interest {
                readable: !self.input_paused,
                writable: self.want_write,
            },
        });
    }

    fn on_event(&mut self, fd: RawFd, ready: Readiness) -> io::Result<()> {
        if fd != self.master.as_raw_fd() {
            return Ok(());
        }
        if ready.writable {
            self.want_write = false;
        }
        if ready.hangup && self.slave.is_none() {
            self.set_connected(false);
        }
        Ok(())
    }

    fn take_events(&mut self) -> HostEvents {
        self.refresh_connection();
        let mut events = HostEvents {
            connected: self.pending_connected.take(),
            resize: None,
        };
        if let Ok(size) = get_winsize(self.master.as_raw_fd()) {
            if self.size != Some(size) {
                self.size = Some(size);
                events.resize = Some(size);
            }
        }
        events
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        match fd_read(self.master.as_raw_fd(), buf) {
            Ok(0) => Err(io::ErrorKind::WouldBlock.into()),
            Ok(n) => Ok(n),
            Err(e) if Self::is_eio(&e) => {
                self.set_connected(false);
                Err(io::ErrorKind::WouldBlock.into())
            }
            Err(e) => Err(e),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match fd_write(self.master.as_raw_fd(), buf) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.want_write = true;
                Err(e)
            }
            Err(e) if Self::is_eio(&e) => {
                self.set_connected(false);
                Err(io::ErrorKind::WouldBlock.into())
            }
            Err(e) => Err(e),
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
pub(crate) mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::time::{Duration, Instant};

    /// Opens `path` (a pty slave) as a client would.
    pub(crate) fn open_client(path: &Path) -> OwnedFd {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid C string; returns a new fd or -1.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        assert!(fd >= 0, "open {}: {}", path.display(), errno());
        // SAFETY: fresh fd.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    /// Calls `read` until `n` bytes came or 5 s passed.
    pub(crate) fn read_exact_with(
        n: usize,
        mut read: impl FnMut(&mut [u8]) -> io::Result<usize>,
    ) -> Vec<u8> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut out = vec![0u8; n];
        let mut got = 0;
        while got < n {
            match read(&mut out[got..]) {
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < deadline,
                        "timed out after {got} of {n} bytes"
                    );
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("read: {e}"),
            }
        }
        out
    }

    fn client_read(fd: RawFd, n: usize) -> Vec<u8> {
        set_nonblocking(fd).unwrap();
        read_exact_with(n, |b| fd_read(fd, b))
    }

    #[test]
    fn pty_passes_every_byte_both_ways() {
        let mut pty = Pty::open(PtyOptions::default()).unwrap();
        assert!(pty.slave_path().starts_with("/dev/pts"));
        let client = open_client(pty.slave_path());
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(fd_write(client.as_raw_fd(), &all).unwrap(), 256);
        assert_eq!(read_exact_with(256, |b| pty.read(b)), all);
        assert_eq!(pty.write(&all).unwrap(), 256);
        assert_eq!(client_read(client.as_raw_fd(), 256), all);
    }

    #[test]
    fn pty_with_no_input_would_block() {
        let mut pty = Pty::open(PtyOptions::default()).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(
            pty.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let mut w = Vec::new();
        pty.watches(&mut w);
        assert_eq!(w.len(), 1);
        assert!(w[0].interest.readable);
        pty.set_input_paused(true);
        pty.watches(&mut w);
        assert!(!w[0].interest.readable, "paused input is not watched");
    }

    #[test]
    fn pty_survives_client_leaving_and_coming_back() {
        let mut pty = Pty::open(PtyOptions::default()).unwrap();
        drop(open_client(pty.slave_path()));
        let mut buf = [0u8; 8];
        assert_eq!(
            pty.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert!(pty.is_connected());
        pty.write(b"kept").unwrap();
        let client = open_client(pty.slave_path());
        assert_eq!(client_read(client.as_raw_fd(), 4), b"kept");
        assert_eq!(pty.take_events().connected, None);
    }

    #[test]
    fn pty_eio_without_held_slave_means_no_client() {
        let mut pty = Pty::open(PtyOptions {
            keep_slave_open: false,
            size: None,
        })
        .unwrap();
        assert!(!pty.is_connected());
        let mut w = Vec::new();
        pty.watches(&mut w);
        assert!(w.is_empty(), "no POLLHUP spin while nobody is attached");
        let mut buf = [0u8; 8];
        assert_eq!(
            pty.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let client = open_client(pty.slave_path());
        assert_eq!(pty.take_events().connected, Some(true));
        fd_write(client.as_raw_fd(), b"hi").unwrap();
        assert_eq!(read_exact_with(2, |b| pty.read(b)), b"hi");
        drop(client);
        let deadline = Instant::now() + Duration::from_secs(5);
        while pty.is_connected() {
            let _ = pty.read(&mut buf);
            assert!(Instant::now() < deadline);
        }
        assert_eq!(pty.take_events().connected, Some(false));
    }

    #[test]
    fn pty_initial_size_is_applied() {
        let size = WinSize {
            cols: 120,
            rows: 40,
        };
        let pty = Pty::open(PtyOptions {
            keep_slave_open: true,
            size: Some(size),
        })
        .unwrap();
        assert_eq!(pty.window_size(), Some(size));
        let client = open_client(pty.slave_path());
        assert_eq!(get_winsize(client.as_raw_fd()).unwrap(), size);
    }

    #[test]
    fn pty_client_resize_is_detected_without_sigwinch() {
        let mut pty = Pty::open(PtyOptions::default()).unwrap();
        let _ = pty.take_events();
        let client = open_client(pty.slave_path());
        let size = WinSize { cols: 91, rows: 33 };
        set_winsize(client.as_raw_fd(), size).unwrap();
        assert_eq!(pty.take_events().resize, Some(size));
        assert_eq!(pty.take_events().resize, None, "reported once");
    }

    #[test]
    fn pty_slave_is_raw() {
        let pty = Pty::open(PtyOptions::default()).unwrap();
        let client = open_client(pty.slave_path());
        // SAFETY: zeroed termios, filled by tcgetattr.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: live local.
        assert_eq!(unsafe { libc::tcgetattr(client.as_raw_fd(), &mut t) }, 0);
        assert_eq!(t.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG), 0);
        assert_eq!(t.c_oflag & libc::OPOST, 0);
    }
}
