// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The console device's vhost-user face: [`ConsoleDevice`] implements
//! [`virtio_core::vhost_user::Device`] for a virtio console (virtio 1.2 §5.3).
//!
//! ## Ownership of the host sides across connections
//!
//! The host sides (pty, socket server, stdio, log files), their replay and input buffers
//! and metrics are created once, by [`HostPorts::open`], before the server runs, and
//! live as long as the device: a user attached to the pty or the socket keeps the
//! attachment when the guest reboots or the frontend reconnects. The device keeps them
//! in a mutex while no frontend is connected. [`Device::start_group`] *takes* them and
//! hands them to the one [`ConsoleQueues`] handler (every queue of the console is in one
//! group, one worker thread: §5.3.2's control queues and every port's data are then in
//! one place, without locks on the data path); the handler gives them back when it is
//! dropped (end of connection or device reset), so the next frontend gets the same pty
//! and socket, with the output kept meanwhile in the replay buffers.
//!
//! While no frontend is connected nobody watches the host sides: socket clients wait in
//! the listen backlog, pty input waits in the kernel.
//!
//! ## Features (§5.3.3)
//!
//! VIRTIO_F_VERSION_1, VIRTIO_F_RING_PACKED (unless
//! [`ConsoleDevice::with_packed_ring`]`(false)`, `--no-packed`), VIRTIO_RING_F_EVENT_IDX and
//! VIRTIO_RING_F_INDIRECT_DESC; VIRTIO_CONSOLE_F_SIZE when a size is known
//! (`--cols/--rows` or the size of port 0's host side); VIRTIO_CONSOLE_F_MULTIPORT only
//! when more than one port is configured (a single console then needs no control queues,
//! the simplest setup for any driver; its size changes go through the config space and a
//! config-change notification); VIRTIO_CONSOLE_F_EMERG_WRITE always (a write to
//! `emerg_wr` is one byte of port 0 output, §5.3.4). Protocol feature CONFIG.

use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_core::vhost_user::{ConfigNotifier, Device, DeviceError, GroupInfo, ProtocolFeatures};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::backend::logfile::{LogError, LogFile};
use crate::backend::pty::{Pty, PtyError, PtyOptions};
use crate::backend::socket::{SocketError, SocketOptions, SocketServer};
use crate::backend::stdio::{RestoreHandle, Stdio, StdioError};
use crate::backend::{HostSide, PortOutput};
use crate::buffer::InputBuffer;
use crate::cli::{CliError, ConsoleArgs, HostKind};
use crate::config::{self, ConsoleConfigSpace, WinSize};
use crate::control::{ControlError, ControlState, PortConfig};
use crate::handler::ConsoleQueues;
use crate::metrics::PortMetrics;

/// VIRTIO_F_VERSION_1 (§6).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_F_RING_PACKED (§6).
pub const VIRTIO_F_RING_PACKED: u64 = 1 << 34;
/// VIRTIO_RING_F_EVENT_IDX (§6).
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// VIRTIO_RING_F_INDIRECT_DESC (§6).
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;

/// Largest queue size accepted (user-mode Linux uses 256, QEMU 128 by default).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Host input buffered per port while the guest posts no receive buffers; beyond it the
/// host side is not read (backpressure).
pub const INPUT_BUFFER_BYTES: usize = 4096;
/// `emerg_wr` bytes kept while the worker has not taken them yet; beyond it they are
/// dropped and counted.
const EMERG_BUFFER_BYTES: usize = 4096;

/// Errors of setting up the ports.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The `--port` options conflict.
    #[error("port options: {0}")]
    Cli(#[from] CliError),
    /// The control state machine refused the port configuration.
    #[error("port configuration: {0}")]
    Control(#[from] ControlError),
    /// A pty could not be opened.
    #[error("port {port}: {source}")]
    Pty {
        /// The port.
        port: u32,
        /// The cause.
        source: PtyError,
    },
    /// A socket could not be bound.
    #[error("port {port}: {source}")]
    Socket {
        /// The port.
        port: u32,
        /// The cause.
        source: SocketError,
    },
    /// stdin/stdout could not be set up.
    #[error("port {port}: {source}")]
    Stdio {
        /// The port.
        port: u32,
        /// The cause.
        source: StdioError,
    },
    /// A log file could not be opened.
    #[error("port {port}: {source}")]
    Log {
        /// The port.
        port: u32,
        /// The cause.
        source: LogError,
    },
    /// The number of ports does not fit the queue numbering of §5.3.2.
    #[error("{0} ports do not fit 16-bit virtqueue indexes")]
    TooManyQueues(u32),
    /// An eventfd could not be created.
    #[error("creating the emerg_wr eventfd: {0}")]
    EventFd(std::io::Error),
}

/// Where a port's host side is, for the user (printed at start).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostLocation {
    /// A pty: the slave's path, for `screen` or `minicom`.
    Pty(std::path::PathBuf),
    /// A unix socket server's path.
    Socket(std::path::PathBuf),
    /// The daemon's stdin/stdout.
    Stdio,
}

impl std::fmt::Display for HostLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostLocation::Pty(p) => write!(f, "pty {}", p.display()),
            HostLocation::Socket(p) => write!(f, "unix socket {}", p.display()),
            HostLocation::Stdio => write!(f, "stdin/stdout"),
        }
    }
}

/// One port's host-side state, kept across frontend connections.
pub(crate) struct Port {
    pub(crate) id: u32,
    pub(crate) output: PortOutput,
    pub(crate) input: InputBuffer,
    pub(crate) metrics: Arc<PortMetrics>,
}

impl std::fmt::Debug for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Port")
            .field("id", &self.id)
            .field("output", &self.output)
            .field("input", &self.input.len())
            .finish()
    }
}

/// The host sides of every port, opened from the command line, before the server runs.
#[derive(Debug)]
pub struct HostPorts {
    ports: Vec<Port>,
    configs: Vec<PortConfig>,
    locations: Vec<(u32, HostLocation)>,
    size: Option<WinSize>,
    restore: Option<RestoreHandle>,
    winch: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl HostPorts {
    /// Opens the host side and log file of every `--port` (ptys are given the
    /// `--cols/--rows` size, if any).
    pub fn open(args: &ConsoleArgs) -> Result<Self, SetupError> {
        let resolved = args.resolve_ports()?;
        let configs = args.port_configs()?;
        let cli_size = args.initial_size();
        let mut ports = Vec::with_capacity(resolved.len());
        let mut locations = Vec::with_capacity(resolved.len());
        let mut restore = None;
        let mut winch = None;
        let mut size = cli_size;
        for p in &resolved {
            let port = p.id;
            let (side, location): (Box<dyn HostSide + Send>, HostLocation) = match &p.spec.host {
                HostKind::Pty => {
                    let pty = Pty::open(PtyOptions {
                        keep_slave_open: true,
                        size: cli_size,
                    })
                    .map_err(|source| SetupError::Pty { port, source })?;
                    let path = pty.slave_path().to_owned();
                    (Box::new(pty), HostLocation::Pty(path))
                }
                HostKind::Socket(path) => {
                    let server = SocketServer::bind(path, SocketOptions::default())
                        .map_err(|source| SetupError::Socket { port, source })?;
                    (Box::new(server), HostLocation::Socket(path.clone()))
                }
                HostKind::Stdio => {
                    let stdio =
                        Stdio::from_std().map_err(|source| SetupError::Stdio { port, source })?;
                    restore = Some(stdio.restore_handle());
                    winch = Some(stdio.winch_flag());
                    (Box::new(stdio), HostLocation::Stdio)
                }
            };
            if size.is_none() && port == 0 {
                size = side.window_size().filter(|s| s.cols != 0 && s.rows != 0);
            }
            let log = match &p.spec.log {
                Some(path) => Some(
                    LogFile::open(path, args.log_size, args.log_files)
                        .map_err(|source| SetupError::Log { port, source })?,
                ),
                None => None,
            };
            let metrics = Arc::new(PortMetrics::default());
            ports.push(Port {
                id: port,
                output: PortOutput::new(Some(side), log, args.replay_bytes, metrics.clone()),
                input: InputBuffer::new(INPUT_BUFFER_BYTES),
                metrics,
            });
            locations.push((port, location));
        }
        Ok(Self {
            ports,
            configs,
            locations,
            size,
            restore,
            winch,
        })
    }

    /// Where each port's host side is (pty paths, socket paths), by port number.
    pub fn locations(&self) -> &[(u32, HostLocation)] {
        &self.locations
    }

    /// The terminal restorer of the stdio port, if there is one (call it from the signal
    /// thread before exiting).
    pub fn stdio_restore_handle(&self) -> Option<RestoreHandle> {
        self.restore.clone()
    }

    /// The flag the stdio port checks for a window size change: register it for
    /// SIGWINCH (`signal_hook::flag::register`).
    pub fn stdio_winch_flag(&self) -> Option<Arc<std::sync::atomic::AtomicBool>> {
        self.winch.clone()
    }

    /// The console size the device starts with (`--cols/--rows`, else port 0's host side).
    pub fn initial_size(&self) -> Option<WinSize> {
        self.size
    }
}

/// What the device and its handler share: the host ports while no handler has them, and
/// `emerg_wr` bytes written while one has.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) ports: Option<Vec<Port>>,
    /// `emerg_wr` bytes for port 0 not yet taken by the handler.
    pub(crate) emerg: InputBuffer,
    pub(crate) emerg_dropped: u64,
}

/// Locks `m`, recovering the data if a thread panicked while holding it (the state is
/// plain data, still consistent at every await point).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The vhost-user virtio console device (see the module documentation).
#[derive(Debug)]
pub struct ConsoleDevice {
    pub(crate) shared: Arc<Mutex<Shared>>,
    pub(crate) config: Arc<Mutex<ConsoleConfigSpace>>,
    pub(crate) port_configs: Vec<PortConfig>,
    pub(crate) max_nr_ports: u32,
    multiport: bool,
    num_queues: u16,
    /// Signalled when `emerg_wr` bytes wait in [`Shared::emerg`].
    pub(crate) emerg_event: Arc<EventFd>,
    /// Asks the notifier thread for a config-change message (non-multiport resize).
    pub(crate) config_changed: Mutex<Option<SyncSender<()>>>,
    /// Whether VIRTIO_F_RING_PACKED is offered.
    ring_packed: bool,
}

impl ConsoleDevice {
    /// A console device over `ports`.
    pub fn new(ports: HostPorts) -> Result<Self, SetupError> {
        let n = u32::try_from(ports.ports.len()).unwrap_or(u32::MAX).max(1);
        let multiport = n > 1;
        let num_queues = config::num_queues(n, multiport).ok_or(SetupError::TooManyQueues(n))?;
        // Checked once here, so that start_group cannot fail on it.
        ControlState::new(ports.configs.clone(), n)?;
        let emerg_event = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(SetupError::EventFd)?;
        Ok(Self {
            shared: Arc::new(Mutex::new(Shared {
                ports: Some(ports.ports),
                emerg: InputBuffer::new(EMERG_BUFFER_BYTES),
                emerg_dropped: 0,
            })),
            config: Arc::new(Mutex::new(ConsoleConfigSpace::new(ports.size, n, true))),
            port_configs: ports.configs,
            max_nr_ports: n,
            multiport,
            num_queues,
            emerg_event: Arc::new(emerg_event),
            config_changed: Mutex::new(None),
            ring_packed: true,
        })
    }

    /// Whether to offer VIRTIO_F_RING_PACKED (the default: yes). `false` leaves the
    /// frontend the split ring only: for testing the split layout with a frontend that
    /// prefers packed (user-mode Linux), and for frontends that mishandle packed rings.
    pub fn with_packed_ring(mut self, offer: bool) -> Self {
        self.ring_packed = offer;
        self
    }

    /// Whether VIRTIO_CONSOLE_F_MULTIPORT is offered (more than one port).
    pub fn multiport(&self) -> bool {
        self.multiport
    }

    /// The metrics of every port, by port number (empty while a handler holds the
    /// ports: take them at start).
    pub fn port_metrics(&self) -> Vec<(u32, Arc<PortMetrics>)> {
        lock(&self.shared)
            .ports
            .as_ref()
            .map(|ports| ports.iter().map(|p| (p.id, p.metrics.clone())).collect())
            .unwrap_or_default()
    }

    /// The current configuration space (for tests and diagnostics).
    pub fn config_space(&self) -> ConsoleConfigSpace {
        lock(&self.config).clone()
    }

    /// Lets the device tell the frontend about console size changes of a single-port
    /// console (VIRTIO_CONSOLE_F_SIZE without MULTIPORT: the config space changes, §5.3.4,
    /// and a configuration change notification follows). Starts a thread that sends
    /// the notifications: [`ConfigNotifier`] must not be used from the worker, which
    /// would wait up to 5 s for the frontend's answer.
    pub fn set_config_notifier(&self, notifier: ConfigNotifier) -> std::io::Result<()> {
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("vcon-config".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    if let Err(e) = notifier.notify_config_change() {
                        log::warn!("console: config-change notification failed: {e}");
                    }
                }
            })?;
        *lock(&self.config_changed) = Some(tx);
        Ok(())
    }
}

impl Device for ConsoleDevice {
    type Handler = ConsoleQueues;

    fn features(&self) -> u64 {
        let packed = if self.ring_packed {
            VIRTIO_F_RING_PACKED
        } else {
            0
        };
        VIRTIO_F_VERSION_1
            | packed
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | lock(&self.config).features()
    }

    fn protocol_features(&self) -> ProtocolFeatures {
        ProtocolFeatures::CONFIG
    }

    fn num_queues(&self) -> u16 {
        self.num_queues
    }

    fn max_queue_size(&self) -> u16 {
        MAX_QUEUE_SIZE
    }

    fn read_config(&self, offset: u32, buf: &mut [u8]) -> Result<(), DeviceError> {
        lock(&self.config)
            .read(offset, buf)
            .map_err(|e| DeviceError::Other(e.to_string()))
    }

    /// `emerg_wr` (§5.3.4): the byte goes to port 0's output, directly if no handler
    /// holds the ports, else through a small buffer the handler drains when the emerg
    /// eventfd fires.
    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        let byte = lock(&self.config).write(offset, data).map_err(|e| {
            log::warn!("console: refused config write: {e}");
            DeviceError::Other(e.to_string())
        })?;
        let Some(byte) = byte else {
            return Ok(());
        };
        let mut shared = lock(&self.shared);
        if let Some(port) = shared.ports.as_mut().and_then(|p| p.first_mut()) {
            port.output.output(&[byte]);
            return Ok(());
        }
        if shared.emerg.push(&[byte]) == 0 {
            shared.emerg_dropped = shared.emerg_dropped.saturating_add(1);
            log::warn!(
                "console: emerg_wr byte dropped ({} so far): the worker is not draining them",
                shared.emerg_dropped
            );
        }
        drop(shared);
        if let Err(e) = self.emerg_event.write(1) {
            log::warn!("console: signalling the emerg_wr eventfd failed: {e}");
        }
        Ok(())
    }

    /// Every queue in one group: one handler and one thread for the control queues and
    /// every port (§5.3.2).
    fn queue_group(&self, _queue: u16) -> Option<u16> {
        Some(0)
    }

    fn start_group(&self, group: &GroupInfo) -> Result<ConsoleQueues, DeviceError> {
        let ports = lock(&self.shared).ports.take().ok_or_else(|| {
            DeviceError::Other(
                "the console's host sides are still held by the previous connection's handler"
                    .into(),
            )
        })?;
        let multiport = self.multiport
            && group.features & config::feature_mask(config::VIRTIO_CONSOLE_F_MULTIPORT) != 0;
        ConsoleQueues::new(self, ports, multiport, group.features)
    }
}
