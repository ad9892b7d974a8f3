// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The server: accepts frontends on a unix socket, one at a time, and serves each until it
//! disconnects; then waits for the next one on the same socket.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use super::backend_channel::{ChannelSlot, ConfigNotifier};
use super::connection::Connection;
use super::device::Device;
use super::error::{Error, Result};

/// How the server runs the queues.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Queues served by one worker thread: queue `i` goes to thread `i / queues_per_thread`
    /// (1, the default: one thread per queue). 0 is taken as 1.
    pub queues_per_thread: usize,
    /// Fixed busy polling: after processing, keep polling the rings (with notifications
    /// off) for this many microseconds before re-enabling notifications and sleeping. 0
    /// (the default): the adaptive window of [`Self::adaptive_poll_max_us`].
    pub poll_us: u64,
    /// Adaptive busy polling (when `poll_us` is 0): after a ring was found empty or
    /// completions were returned, poll for a window learned from the recent gaps until
    /// the next request, at most this many microseconds; rings whose requests come
    /// further apart do not poll. 0 never polls. Default 50.
    pub adaptive_poll_max_us: u64,
    /// How long stopping a ring (GET_VRING_BASE, reset, disconnect) waits for its
    /// in-flight requests before giving up on them (only chains the handler holds are
    /// waited for). The connection waits at most this plus 5 s for a worker's answer,
    /// and leaves behind a worker that does not exit in that time.
    pub drain_timeout: Duration,
    /// Prefix of worker thread names (`<prefix>-q<first queue>`).
    pub thread_name: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            queues_per_thread: 1,
            poll_us: 0,
            adaptive_poll_max_us: 50,
            drain_timeout: Duration::from_secs(30),
            thread_name: "vhost-user".into(),
        }
    }
}

/// Where frontends come from.
#[derive(Debug)]
pub enum FrontendSocket {
    /// A listening socket: serve frontend after frontend.
    Listener(UnixListener),
    /// An already-connected socket (e.g. `--fd` given a connected socket): serve that one
    /// frontend, then stop.
    Connected(UnixStream),
}

/// Stops [`Server::serve`] from another thread or a signal handler (SIGTERM, per the
/// backend program conventions). Cheap to clone.
#[derive(Clone, Debug)]
pub struct ShutdownHandle(Arc<EventFd>);

impl ShutdownHandle {
    /// Makes `serve` close the current connection (stopping its queues) and return.
    /// Async-signal-safe: it is one `write` to an eventfd.
    pub fn shutdown(&self) {
        let _ = self.0.write(1);
    }
}

/// A vhost-user device server. See the [module documentation](super) for a sketch.
pub struct Server<D: Device> {
    device: Arc<D>,
    config: ServerConfig,
    socket: Option<FrontendSocket>,
    channel: ChannelSlot,
    shutdown: Arc<EventFd>,
    unlink_on_drop: Option<PathBuf>,
}

impl<D: Device> std::fmt::Debug for Server<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.config)
            .field("socket", &self.socket)
            .finish()
    }
}

impl<D: Device> Server<D> {
    /// A server for `device` on `socket`.
    pub fn new(socket: FrontendSocket, device: Arc<D>, config: ServerConfig) -> Result<Self> {
        // A frontend that shrinks guest memory must not kill the daemon (see `sigbus`).
        super::sigbus::install();
        let shutdown = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(|source| Error::Os {
            what: "creating the shutdown eventfd",
            source,
        })?;
        Ok(Server {
            device,
            config,
            socket: Some(socket),
            channel: Arc::new(Mutex::new(None)),
            shutdown: Arc::new(shutdown),
            unlink_on_drop: None,
        })
    }

    /// A server listening on a new socket at `path` (a stale socket file left there by a
    /// previous run is replaced). The socket file is removed when the server is dropped.
    pub fn bind(path: impl AsRef<Path>, device: Arc<D>, config: ServerConfig) -> Result<Self> {
        let path = path.as_ref();
        let listener = bind_socket(path)?;
        let mut server = Self::new(FrontendSocket::Listener(listener), device, config)?;
        server.unlink_on_drop = Some(path.to_path_buf());
        Ok(server)
    }

    /// The device.
    pub fn device(&self) -> &Arc<D> {
        &self.device
    }

    /// A handle to send config-change notifications to the connected frontend.
    pub fn config_notifier(&self) -> ConfigNotifier {
        ConfigNotifier::new(self.channel.clone())
    }

    /// A handle that stops [`Self::serve`].
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }

    /// Serves frontends until [`ShutdownHandle::shutdown`] (or, for a
    /// [`FrontendSocket::Connected`] socket, until that frontend disconnects). Each
    /// frontend is served until it disconnects; the queues are then stopped, the guest
    /// memory unmapped and the device reset before the next frontend is accepted.
    /// Connection errors are logged and end only that connection.
    pub fn serve(&mut self) -> Result<()> {
        let listener = match self.socket.take() {
            None => return Ok(()),
            Some(FrontendSocket::Connected(stream)) => {
                let r = self.serve_connection(stream);
                return r;
            }
            Some(FrontendSocket::Listener(l)) => l,
        };
        let r = self.accept_loop(&listener);
        self.socket = Some(FrontendSocket::Listener(listener));
        r
    }

    fn accept_loop(&self, listener: &UnixListener) -> Result<()> {
        loop {
            match wait_readable(listener.as_raw_fd(), self.shutdown.as_raw_fd())? {
                Wake::Shutdown => {
                    log::info!("shutdown requested");
                    return Ok(());
                }
                Wake::Spurious | Wake::Alarm => continue,
                Wake::Readable => {}
            }
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    log::error!("accepting a frontend failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            log::info!("frontend connected");
            if let Err(e) = self.serve_connection(stream) {
                log::error!("frontend connection ended with an error: {e}");
            }
            // Level-triggered: a shutdown that ended the connection also ends the loop.
        }
    }

    /// Serves one connected frontend until it disconnects (or shutdown), then stops the
    /// queues and resets the device.
    pub fn serve_connection(&self, stream: UnixStream) -> Result<()> {
        stream.set_nonblocking(false).map_err(Error::Socket)?;
        // Requests are read once the socket polls readable; these bound a frontend that
        // stops in the middle of a message or never reads its replies.
        stream
            .set_read_timeout(Some(super::connection::SOCKET_IO_TIMEOUT))
            .map_err(Error::Socket)?;
        stream
            .set_write_timeout(Some(super::connection::SOCKET_IO_TIMEOUT))
            .map_err(Error::Socket)?;
        let conn = Connection::new(&self.device, &self.config, &self.channel, stream)?;
        conn.run(self.shutdown.as_raw_fd())
    }
}

impl<D: Device> Drop for Server<D> {
    fn drop(&mut self) {
        if let Some(path) = &self.unlink_on_drop {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Binds a listening socket at `path`, replacing a stale socket file.
pub(crate) fn bind_socket(path: &Path) -> Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path).map_err(|source| Error::Os {
                what: "removing a stale socket file",
                source,
            })?;
        }
    }
    UnixListener::bind(path).map_err(|source| Error::Bind {
        path: path.to_path_buf(),
        source,
    })
}

/// What [`wait_readable`] woke up for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wake {
    /// The watched fd is readable (or hung up).
    Readable,
    /// The shutdown eventfd is readable.
    Shutdown,
    /// The alarm eventfd of [`wait_readable_or_alarm`] is readable.
    Alarm,
    /// Interrupted by a signal, or no event on either fd: wait again.
    Spurious,
}

/// Waits until `fd` or the `shutdown` eventfd is readable; shutdown wins when both are.
pub(crate) fn wait_readable(fd: RawFd, shutdown: RawFd) -> Result<Wake> {
    wait_readable_or_alarm(fd, shutdown, -1)
}

/// As [`wait_readable`], also waking for `alarm` (ignored if negative); shutdown wins,
/// then the alarm.
pub(crate) fn wait_readable_or_alarm(fd: RawFd, shutdown: RawFd, alarm: RawFd) -> Result<Wake> {
    let pfd = |fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut fds = [pfd(fd), pfd(shutdown), pfd(alarm)];
    // SAFETY: `fds` is a live array of three pollfd for the duration of the call (poll
    // ignores entries with a negative fd).
    let r = unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(Wake::Spurious);
        }
        return Err(Error::Socket(e));
    }
    Ok(if fds[1].revents != 0 {
        Wake::Shutdown
    } else if fds[2].revents != 0 {
        Wake::Alarm
    } else if fds[0].revents != 0 {
        Wake::Readable
    } else {
        Wake::Spurious
    })
}
