// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A unix socket server host side (`--port socket=PATH`): connect with
//! `socat -,raw,echo=0 UNIX-CONNECT:PATH` or `nc -U PATH`.
//!
//! ## Several clients
//!
//! * The first client to connect is the **writer**: its input goes to the guest, and it
//!   gets the guest's output.
//! * Later clients are read-only **viewers**: they get the guest's output; what they send
//!   is read and discarded.
//! * When the writer leaves, the oldest viewer becomes the writer; when the last client
//!   leaves, the port is disconnected (the guest gets PORT_OPEN(0) and output waits in
//!   the port's replay buffer, which the next client gets first).
//! * At most [`SocketOptions::max_clients`] clients; more are accepted and closed at once.
//!
//! Each client has its own output buffer ([`SocketOptions::client_buffer`] bytes,
//! allocated when it connects). The writer's is bounded without loss: when it is full,
//! [`HostSide::write`] takes less (the rest waits in the port's replay buffer). A viewer
//! never holds the guest back: when its buffer is full its oldest bytes are dropped and
//! counted ([`SocketServer::viewer_dropped`]).
//!
//! ## Resizing
//!
//! The writer resizes the console with an in-band OSC-style sequence, removed from its
//! input before it reaches the guest:
//!
//! ```text
//! ESC ] vhost-resize ; COLS ; ROWS BEL        e.g. "\x1b]vhost-resize;132;43\x07"
//! ```
//!
//! COLS and ROWS are decimal, 1 to 5 digits, 1 to 65535. Anything that does not match
//! exactly (another escape sequence, a zero, a value too large) passes through to the
//! guest unchanged. A client script can send it after `stty size` or on SIGWINCH.
//! Viewers cannot resize.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::{HostEvents, HostSide, Interest, Readiness, Watch, WinSize};
use crate::buffer::ReplayBuffer;

/// The start of the resize sequence.
pub const RESIZE_PREFIX: &[u8] = b"\x1b]vhost-resize;";
/// The end of the resize sequence (BEL).
pub const RESIZE_END: u8 = 0x07;
/// Longest sequence held back while it may still be a resize request.
const MAX_ESCAPE: usize = 32;

/// Errors of setting up the socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Binding or configuring the listening socket failed.
    #[error("cannot listen on unix socket {path}: {source}")]
    Bind {
        /// The socket's path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The path exists and is not a socket.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Another process is listening on the path.
    #[error("{0} is in use by another listening process")]
    InUse(PathBuf),
}

/// Limits of a [`SocketServer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketOptions {
    /// Most clients at once (writer included). Default 16.
    pub max_clients: usize,
    /// Output buffer of each client in bytes. Default 64 KiB.
    pub client_buffer: usize,
}

impl Default for SocketOptions {
    fn default() -> Self {
        Self {
            max_clients: 16,
            client_buffer: 64 * 1024,
        }
    }
}

#[derive(Debug)]
struct Client {
    stream: UnixStream,
    out: ReplayBuffer,
}

impl Client {
    /// Writes queued output until the socket would block; false if the client is gone.
    fn flush(&mut self) -> bool {
        let stream = &mut self.stream;
        match self.out.replay(&mut |b| stream.write(b)) {
            Ok(_) => true,
            Err(e) => {
                log::debug!("console socket client write: {e}");
                false
            }
        }
    }

    /// Writes `data` directly if nothing is queued; returns how much the socket took,
    /// or `None` if the client is gone.
    fn write_direct(&mut self, data: &[u8]) -> Option<usize> {
        if !self.out.is_empty() || data.is_empty() {
            return Some(0);
        }
        match self.stream.write(data) {
            Ok(n) => Some(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Some(0),
            Err(e) => {
                log::debug!("console socket client write: {e}");
                None
            }
        }
    }
}

/// Removes resize sequences from a byte stream.
#[derive(Debug)]
struct ResizeFilter {
    held: [u8; MAX_ESCAPE],
    held_len: usize,
}

enum Match {
    Prefix,
    Complete(WinSize),
    Invalid,
}

fn classify(s: &[u8]) -> Match {
    let p = RESIZE_PREFIX;
    if s.len() <= p.len() {
        return if p.starts_with(s) {
            Match::Prefix
        } else {
            Match::Invalid
        };
    }
    if !s.starts_with(p) {
        return Match::Invalid;
    }
    let rest = &s[p.len()..];
    let mut fields = [0u32; 2];
    let mut digits = [0usize; 2];
    let mut field = 0;
    for &b in rest {
        match b {
            b'0'..=b'9' => {
                digits[field] += 1;
                if digits[field] > 5 {
                    return Match::Invalid;
                }
                fields[field] = fields[field] * 10 + u32::from(b - b'0');
            }
            b';' if field == 0 && digits[0] > 0 => field = 1,
            RESIZE_END if field == 1 && digits[1] > 0 => {
                return match (u16::try_from(fields[0]), u16::try_from(fields[1])) {
                    (Ok(cols), Ok(rows)) if cols > 0 && rows > 0 => {
                        Match::Complete(WinSize { cols, rows })
                    }
                    _ => Match::Invalid,
                };
            }
            _ => return Match::Invalid,
        }
    }
    Match::Prefix
}

impl ResizeFilter {
    fn new() -> Self {
        Self {
            held: [0; MAX_ESCAPE],
            held_len: 0,
        }
    }

    fn reset(&mut self) {
        self.held_len = 0;
    }

    /// Feeds one byte; bytes that are not part of a resize sequence go to `emit`.
    fn feed(&mut self, b: u8, emit: &mut dyn FnMut(u8)) -> Option<WinSize> {
        if self.held_len == 0 {
            if b == RESIZE_PREFIX[0] {
                self.held[0] = b;
                self.held_len = 1;
            } else {
                emit(b);
            }
            return None;
        }
        self.held[self.held_len] = b;
        self.held_len += 1;
        match classify(&self.held[..self.held_len]) {
            Match::Prefix if self.held_len < MAX_ESCAPE => None,
            Match::Complete(size) => {
                self.held_len = 0;
                Some(size)
            }
            Match::Prefix | Match::Invalid => {
                let n = self.held_len - 1;
                self.held_len = 0;
                for &h in &self.held[..n] {
                    emit(h);
                }
                if b == RESIZE_PREFIX[0] {
                    self.held[0] = b;
                    self.held_len = 1;
                } else {
                    emit(b);
                }
                None
            }
        }
    }
}

/// A unix socket server host side (see the module documentation for the policy).
#[derive(Debug)]
pub struct SocketServer {
    listener: UnixListener,
    path: PathBuf,
    options: SocketOptions,
    /// Index 0 is the writer, the rest viewers in connection order.
    clients: VecDeque<Client>,
    filter: ResizeFilter,
    raw: Box<[u8]>,
    spill: [u8; 2 * MAX_ESCAPE],
    spill_len: usize,
    pending_connected: Option<bool>,
    pending_resize: Option<WinSize>,
    size: Option<WinSize>,
    input_paused: bool,
    viewer_dropped: u64,
    connects: u64,
}

impl SocketServer {
    /// Listens on `path`. A stale socket file (nobody listening) is replaced; a live
    /// one, or a path that is not a socket, is refused.
    pub fn bind(path: &Path, options: SocketOptions) -> Result<Self, SocketError> {
        let bind_err = |source| SocketError::Bind {
            path: path.to_owned(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
                Ok(_) => return Err(SocketError::InUse(path.to_owned())),
                Err(_) => std::fs::remove_file(path).map_err(bind_err)?,
            },
            Ok(_) => return Err(SocketError::NotASocket(path.to_owned())),
            Err(_) => {}
        }
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(Self {
            listener,
            path: path.to_owned(),
            options: SocketOptions {
                max_clients: options.max_clients.max(1),
                client_buffer: options.client_buffer.max(1),
            },
            clients: VecDeque::with_capacity(options.max_clients.max(1)),
            filter: ResizeFilter::new(),
            raw: vec![0; 4096].into_boxed_slice(),
            spill: [0; 2 * MAX_ESCAPE],
            spill_len: 0,
            pending_connected: None,
            pending_resize: None,
            size: None,
            input_paused: false,
            viewer_dropped: 0,
            connects: 0,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Clients attached now (writer included).
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// Clients accepted since start.
    pub fn connects(&self) -> u64 {
        self.connects
    }

    /// Output bytes viewers missed because they read too slowly.
    pub fn viewer_dropped(&self) -> u64 {
        self.viewer_dropped
    }

    fn accept_all(&mut self) -> io::Result<()> {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.clients.len() >= self.options.max_clients {
                        log::warn!(
                            "console socket {}: {} clients already; closing a new one",
                            self.path.display(),
                            self.clients.len()
                        );
                        continue;
                    }
                    stream.set_nonblocking(true)?;
                    self.clients.push_back(Client {
                        stream,
                        out: ReplayBuffer::new(self.options.client_buffer),
                    });
                    self.connects += 1;
                    if self.clients.len() == 1 {
                        self.filter.reset();
                        self.pending_connected = Some(true);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn remove(&mut self, index: usize) {
        if self.clients.remove(index).is_none() {
            return;
        }
        if index == 0 {
            // The next writer starts with a clean escape parser.
            self.filter.reset();
            self.spill_len = 0;
        }
        if self.clients.is_empty() {
            self.pending_connected = Some(false);
        }
    }

    fn find(&self, fd: RawFd) -> Option<usize> {
        self.clients.iter().position(|c| c.stream.as_raw_fd() == fd)
    }

    /// Reads and discards a viewer's input; false at end of file or on error.
    fn discard_input(client: &mut Client) -> bool {
        let mut sink = [0u8; 256];
        loop {
            match client.stream.read(&mut sink) {
                Ok(0) => return false,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }
}

impl Drop for SocketServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl HostSide for SocketServer {
    fn watches(&self, out: &mut Vec<Watch>) {
        out.clear();
        out.push(Watch {
            fd: self.listener.as_raw_fd(),
            interest: Interest {
                readable: true,
                writable: false,
            },
        });
        for (i, c) in self.clients.iter().enumerate() {
            out.push(Watch {
                fd: c.stream.as_raw_fd(),
                interest: Interest {
                    readable: i != 0 || !self.input_paused,
                    writable: !c.out.is_empty(),
                },
            });
        }
    }

    fn on_event(&mut self, fd: RawFd, ready: Readiness) -> io::Result<()> {
        if fd == self.listener.as_raw_fd() {
            return self.accept_all();
        }
        let Some(i) = self.find(fd) else {
            return Ok(());
        };
        let mut alive = !ready.error;
        if alive && ready.writable {
            alive = self.clients[i].flush();
        }
        if alive && i != 0 && (ready.readable || ready.hangup) {
            alive = Self::discard_input(&mut self.clients[i]);
        }
        // The writer's end of file is found by read(), after its last bytes; while its
        // input is paused nobody reads, so a hang-up ends it now.
        if alive && i == 0 && ready.hangup && (self.input_paused || !ready.readable) {
            alive = false;
        }
        if !alive {
            self.remove(i);
        }
        Ok(())
    }

    fn take_events(&mut self) -> HostEvents {
        HostEvents {
            connected: self.pending_connected.take(),
            resize: self.pending_resize.take(),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut produced = 0;
        loop {
            // Bytes a failed escape match released beyond the last caller's buffer.
            if self.spill_len > 0 {
                let n = self.spill_len.min(buf.len() - produced);
                buf[produced..produced + n].copy_from_slice(&self.spill[..n]);
                self.spill.copy_within(n..self.spill_len, 0);
                self.spill_len -= n;
                produced += n;
            }
            if produced == buf.len() || self.spill_len > 0 {
                return Ok(produced);
            }
            let Some(writer) = self.clients.front_mut() else {
                return if produced > 0 {
                    Ok(produced)
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                };
            };
            let want = self.raw.len().min(buf.len() - produced);
            let n = match writer.stream.read(&mut self.raw[..want]) {
                Ok(0) => {
                    self.remove(0);
                    continue;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return if produced > 0 { Ok(produced) } else { Err(e) };
                }
                Err(e) => {
                    log::debug!("console socket writer read: {e}");
                    self.remove(0);
                    continue;
                }
            };
            let spill = &mut self.spill;
            let spill_len = &mut self.spill_len;
            let mut emit = |b: u8| {
                if produced < buf.len() {
                    buf[produced] = b;
                    produced += 1;
                } else if *spill_len < spill.len() {
                    spill[*spill_len] = b;
                    *spill_len += 1;
                }
            };
            for &b in &self.raw[..n] {
                if let Some(size) = self.filter.feed(b, &mut emit) {
                    self.size = Some(size);
                    self.pending_resize = Some(size);
                }
            }
            if produced > 0 {
                return Ok(produced);
            }
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(writer) = self.clients.front_mut() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let mut gone = Vec::new();
        let mut accepted = 0;
        if !writer.flush() {
            gone.push(0);
        } else {
            match writer.write_direct(buf) {
                Some(n) => accepted = n + writer.out.push_bounded(&buf[n..]),
                None => gone.push(0),
            }
        }
        if gone.is_empty() && accepted == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let data = &buf[..accepted];
        for (i, viewer) in self.clients.iter_mut().enumerate().skip(1) {
            match viewer.write_direct(data) {
                Some(n) => {
                    self.viewer_dropped += viewer.out.push(&data[n..]) as u64;
                }
                None => gone.push(i),
            }
        }
        for &i in gone.iter().rev() {
            self.remove(i);
        }
        if accepted == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(accepted)
    }

    fn is_connected(&self) -> bool {
        !self.clients.is_empty()
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
    use crate::backend::logfile::tests::TempDir;
    use crate::backend::pty::tests::read_exact_with;
    use std::time::Duration;

    fn filter_all(input: &[u8]) -> (Vec<u8>, Vec<WinSize>) {
        let mut f = ResizeFilter::new();
        let mut out = Vec::new();
        let mut sizes = Vec::new();
        for &b in input {
            if let Some(s) = f.feed(b, &mut |x| out.push(x)) {
                sizes.push(s);
            }
        }
        (out, sizes)
    }

    #[test]
    fn resize_escape_is_removed_from_input() {
        let (out, sizes) = filter_all(b"ab\x1b]vhost-resize;132;43\x07cd");
        assert_eq!(out, b"abcd");
        assert_eq!(
            sizes,
            vec![WinSize {
                cols: 132,
                rows: 43
            }]
        );
    }

    #[test]
    fn other_escapes_pass_through_unchanged() {
        for input in [
            &b"\x1b[A\x1b]0;title\x07"[..],
            b"\x1b]vhost-resize;0;43\x07",
            b"\x1b]vhost-resize;70000;1\x07",
            b"\x1b]vhost-resize;123456;1\x07",
            b"\x1b]vhost-resize;1\x07",
            b"\x1b\x1b]vhost-x",
            b"\x1b",
        ] {
            let (out, sizes) = filter_all(input);
            let expected = if input == b"\x1b" { &b""[..] } else { input };
            assert_eq!(out, expected, "{input:?}");
            assert!(sizes.is_empty());
        }
    }

    #[test]
    fn escape_after_failed_escape_is_still_found() {
        let (out, sizes) = filter_all(b"\x1b]v\x1b]vhost-resize;80;24\x07");
        assert_eq!(out, b"\x1b]v");
        assert_eq!(sizes, vec![WinSize { cols: 80, rows: 24 }]);
    }

    fn server(dir: &TempDir, options: SocketOptions) -> SocketServer {
        SocketServer::bind(&dir.path().join("con.sock"), options).unwrap()
    }

    /// Polls every watched fd (up to 50 ms) and dispatches the readiness.
    fn service(s: &mut SocketServer) {
        let mut w = Vec::new();
        s.watches(&mut w);
        let mut pfds: Vec<libc::pollfd> = w
            .iter()
            .map(|w| libc::pollfd {
                fd: w.fd,
                events: (if w.interest.readable { libc::POLLIN } else { 0 })
                    | (if w.interest.writable {
                        libc::POLLOUT
                    } else {
                        0
                    })
                    | libc::POLLRDHUP,
                revents: 0,
            })
            .collect();
        // SAFETY: pfds is a live array of pfds.len() pollfds.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 50) };
        assert!(n >= 0);
        for p in pfds {
            if p.revents != 0 {
                s.on_event(p.fd, Readiness::from_poll(p.revents)).unwrap();
            }
        }
    }

    fn connect(s: &mut SocketServer) -> UnixStream {
        let c = UnixStream::connect(s.path()).unwrap();
        let before = s.clients();
        for _ in 0..100 {
            service(s);
            if s.clients() > before {
                break;
            }
        }
        assert_eq!(s.clients(), before + 1);
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c
    }

    fn read_n(c: &mut UnixStream, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        c.read_exact(&mut v).unwrap();
        v
    }

    fn wait_clients(s: &mut SocketServer, n: usize) {
        for _ in 0..100 {
            if s.clients() == n {
                return;
            }
            service(s);
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf);
        }
        assert_eq!(s.clients(), n);
    }

    #[test]
    fn first_client_is_writer_and_its_input_reaches_guest() {
        let dir = TempDir::new("sock");
        let mut s = server(&dir, SocketOptions::default());
        assert!(!s.is_connected());
        let mut writer = connect(&mut s);
        assert_eq!(s.take_events().connected, Some(true));
        writer.write_all(&[0, 0xff, b'\n', 0x1b]).unwrap();
        writer.write_all(b"[A").unwrap();
        assert_eq!(read_exact_with(6, |b| s.read(b)), b"\0\xff\n\x1b[A");
        assert_eq!(s.write(b"guest").unwrap(), 5);
        assert_eq!(read_n(&mut writer, 5), b"guest");
    }

    #[test]
    fn viewers_get_output_and_their_input_is_discarded() {
        let dir = TempDir::new("sock");
        let mut s = server(&dir, SocketOptions::default());
        let mut writer = connect(&mut s);
        let mut viewer = connect(&mut s);
        assert_eq!(s.take_events().connected, Some(true), "one connect event");
        viewer.write_all(b"ignored").unwrap();
        service(&mut s);
        let mut buf = [0u8; 16];
        assert_eq!(
            s.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        s.write(b"both").unwrap();
        assert_eq!(read_n(&mut writer, 4), b"both");
        assert_eq!(read_n(&mut viewer, 4), b"both");
    }

    #[test]
    fn writer_leaving_promotes_oldest_viewer() {
        let dir = TempDir::new("sock");
        let mut s = server(&dir, SocketOptions::default());
        let writer = connect(&mut s);
        let mut first_viewer = connect(&mut s);
        let _second_viewer = connect(&mut s);
        drop(writer);
        wait_clients(&mut s, 2);
        assert_eq!(s.take_events().connected, Some(true), "still connected");
        first_viewer.write_all(b"now I type").unwrap();
        assert_eq!(read_exact_with(10, |b| s.read(b)), b"now I type");
    }

    #[test]
    fn last_client_leaving_disconnects() {
        let dir = TempDir::new("sock");
        let mut s = server(&dir, SocketOptions::default());
        let writer = connect(&mut s);
        let _ = s.take_events();
        drop(writer);
        wait_clients(&mut s, 0);
        assert_eq!(s.take_events().connected, Some(false));
        assert!(!s.is_connected());
        assert_eq!(s.write(b"x").unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn writer_resize_is_reported_and_removed() {
        let dir = TempDir::new("sock");
        let mut s = server(&dir, SocketOptions::default());
        let mut writer = connect(&mut s);
        writer.write_all(b"a\x1b]vhost-re").unwrap();
        writer.write_all(b"size;100;50\x07b").unwrap();
        assert_eq!(read_exact_with(2, |b| s.read(b)), b"ab");
        let size = WinSize {
            cols: 100,
            rows: 50,
        };
        assert_eq!(s.take_events().resize, Some(size));
        assert_eq!(s.window_size(), Some(size));
    }

    #[test]
    fn released_escape_bytes_survive_a_tiny_read_buffer() {
        let dir = TempDir::new("sock");
        let mut s = server(&dir, SocketOptions::default());
        let mut writer = connect(&mut s);
        writer.write_all(b"\x1b]vhost-resize;1;").unwrap();
        writer.write_all(b"x").unwrap();
        let got = read_exact_with(18, |b| s.read(&mut b[..1]));
        assert_eq!(got, b"\x1b]vhost-resize;1;x");
    }

    #[test]
    fn writer_output_buffer_is_bounded_without_loss() {
        let dir = TempDir::new("sock");
        let mut s = server(
            &dir,
            SocketOptions {
                max_clients: 4,
                client_buffer: 16,
            },
        );
        let mut writer = connect(&mut s);
        let chunk = [b'q'; 4096];
        let mut total = 0;
        loop {
            match s.write(&chunk) {
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
            assert!(total < 64 << 20, "the writer's buffer must fill");
        }
        let received = {
            writer.set_nonblocking(true).unwrap();
            let mut n = 0;
            let mut buf = [0u8; 65536];
            loop {
                match writer.read(&mut buf) {
                    Ok(k) => n += k,
                    Err(_) => {
                        service(&mut s);
                        match writer.read(&mut buf) {
                            Ok(k) => n += k,
                            Err(_) => break,
                        }
                    }
                }
            }
            n
        };
        assert_eq!(received, total, "every accepted byte arrives");
    }

    #[test]
    fn extra_clients_beyond_limit_are_closed() {
        let dir = TempDir::new("sock");
        let mut s = server(
            &dir,
            SocketOptions {
                max_clients: 1,
                client_buffer: 64,
            },
        );
        let _writer = connect(&mut s);
        let mut extra = UnixStream::connect(s.path()).unwrap();
        service(&mut s);
        assert_eq!(s.clients(), 1);
        extra
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(extra.read(&mut buf).unwrap(), 0, "closed at once");
    }

    #[test]
    fn stale_socket_is_replaced_and_live_one_refused() {
        let dir = TempDir::new("sock");
        let path = dir.path().join("s");
        drop(UnixListener::bind(&path).unwrap());
        let live = SocketServer::bind(&path, SocketOptions::default()).unwrap();
        assert!(matches!(
            SocketServer::bind(&path, SocketOptions::default()),
            Err(SocketError::InUse(_))
        ));
        drop(live);
        assert!(!path.exists(), "removed on drop");
        std::fs::write(&path, b"").unwrap();
        let err = SocketServer::bind(&path, SocketOptions::default()).unwrap_err();
        assert!(matches!(err, SocketError::NotASocket(_)), "{err}");
    }
}
