// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A userspace vhost-user-blk frontend: the driver ("guest") side of a virtio-blk
//! device served by any vhost-user-blk backend over its unix socket, for tests and
//! benchmarks.
//!
//! It speaks the vhost-user protocol through the `vhost` crate's [`Frontend`] and drives
//! the rings with `virtio_core`'s [`DriverQueue`]:
//!
//! - guest memory is one memfd mapped shared in this process at guest-physical
//!   [`GUEST_BASE`], handed over in SET_MEM_TABLE with its frontend virtual address;
//! - features: VERSION_1 (required), RING_PACKED when asked for (refused with
//!   [`FrontendError::FeatureNotOffered`] if the backend does not offer it), EVENT_IDX
//!   and INDIRECT_DESC when offered and allowed, the informational virtio-blk bits, FLUSH
//!   and MQ; protocol features MQ, CONFIG and REPLY_ACK when offered (REPLY_ACK makes
//!   every request acknowledged, so a refused request fails where it is sent);
//! - the configuration space (capacity, block size, num_queues) is read when CONFIG
//!   was negotiated;
//! - N queues, split or packed, of a given size: SET_VRING_NUM, SET_VRING_BASE,
//!   SET_VRING_ADDR (frontend virtual addresses), SET_VRING_CALL, SET_VRING_KICK, then
//!   SET_VRING_ENABLE;
//! - requests are 16-byte header → data → 1-byte status chains (indirect if asked),
//!   kicked only when the device asks for it, completed by sleeping on the call eventfd
//!   or by polling; [`BlkFrontend::shutdown`] drains, disables and stops every ring with
//!   GET_VRING_BASE and checks the reported base.
//!
//! ```no_run
//! use std::time::Duration;
//! use vring_tests::frontend::{BlkFrontend, FrontendOptions, Limit, Workload, WorkloadOp};
//!
//! # fn main() -> Result<(), vring_tests::frontend::FrontendError> {
//! let opts = FrontendOptions { queues: 2, ..FrontendOptions::default() };
//! let mut fe = BlkFrontend::connect("/tmp/blk.sock", opts)?;
//! let w = Workload::new(WorkloadOp::Verify, 4096, 32, Limit::Count(4096));
//! let report = fe.run_workload(&w)?;
//! println!("{:.0} IOPS, p99 {:?}", report.iops(), report.latency().p99);
//! fe.shutdown()?;
//! # Ok(())
//! # }
//! ```

pub mod blk;
pub mod console;
mod memory;
mod queue;
mod raw;
pub mod stats;
mod workload;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VringConfigData};
use virtio_core::driver::{DriverError, DriverQueue};
use virtio_core::RingLayout;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use blk::{BlkConfig, BlkOp, PatternMismatch};
pub use memory::GUEST_BASE;
pub use queue::{BlkQueue, Completion, QueueStats};
pub use workload::{Limit, QueueReport, Workload, WorkloadOp, WorkloadReport};

use blk::bit;
use memory::MemoryLayout;
use queue::QueueParts;

/// Errors of the frontend.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// Connecting to the backend's socket failed.
    #[error("connecting to {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A vhost-user request failed (refused by the backend, broken connection, bad reply).
    #[error("vhost-user {step} failed: {source}")]
    Vhost {
        /// What the frontend was doing.
        step: String,
        /// The `vhost` crate's error.
        source: vhost::Error,
    },
    /// The backend broke the protocol in a way the `vhost` crate does not check.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A feature the caller asked for is not offered by the backend.
    #[error("the backend does not offer {feature} (feature bit {bit}; it offers {offered:#x})")]
    FeatureNotOffered {
        /// Feature name.
        feature: &'static str,
        /// Feature bit.
        bit: u32,
        /// The backend's feature bits.
        offered: u64,
    },
    /// The backend has fewer queues than asked for.
    #[error("{requested} queues asked for, the backend supports {available}")]
    NotEnoughQueues {
        /// Queues asked for.
        requested: u16,
        /// What the backend reported (GET_QUEUE_NUM / config num_queues), or 1 without MQ.
        available: u64,
    },
    /// Invalid options or arguments.
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    /// Setting up or accessing the frontend's memory failed.
    #[error("memory: {0}")]
    Memory(String),
    /// The driver side of a ring reported an error (including a device returning an ID
    /// that is not in flight).
    #[error("queue {queue}: {source}")]
    Driver {
        /// Queue index.
        queue: u16,
        /// The driver's error.
        source: DriverError,
    },
    /// An I/O error (eventfds, sockets).
    #[error("{context}: {source}")]
    Io {
        /// What the frontend was doing.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
    /// No completion arrived in time.
    #[error("queue {queue}: no completion within {waited:?} with {in_flight} requests in flight")]
    Timeout {
        /// Queue index.
        queue: u16,
        /// Requests in flight.
        in_flight: u16,
        /// How long the frontend waited.
        waited: Duration,
    },
    /// A request completed with a status other than OK.
    #[error("queue {queue}: {op} of {len} bytes at sector {sector} completed with status {status} ({status_name})")]
    RequestFailed {
        /// Queue index.
        queue: u16,
        /// Request type.
        op: BlkOp,
        /// First sector.
        sector: u64,
        /// Data length.
        len: u32,
        /// The status byte.
        status: u8,
        /// Its name.
        status_name: &'static str,
    },
    /// Data read back differs from what was written.
    #[error("queue {queue}: data verification failed reading {len} bytes at sector {sector} (generation {generation}): {mismatch}")]
    DataMismatch {
        /// Queue index.
        queue: u16,
        /// First sector of the read.
        sector: u64,
        /// Bytes read.
        len: u32,
        /// Generation expected.
        generation: u64,
        /// Where and what differs.
        mismatch: PatternMismatch,
    },
    /// A write workload on a read-only device (VIRTIO_BLK_F_RO).
    #[error("the device is read-only (VIRTIO_BLK_F_RO)")]
    ReadOnly,
    /// The device capacity is unknown (no CONFIG protocol feature) and the workload gave no
    /// span, or the span holds no block.
    #[error("workload span: {0}")]
    Span(String),
    /// GET_VRING_BASE reported a position other than the driver's.
    #[error("queue {queue}: GET_VRING_BASE reported {reported:#x}, the driver made {expected:#x} available")]
    BadVringBase {
        /// Queue index.
        queue: u16,
        /// Reported base.
        reported: u32,
        /// Expected (low 16 bits: split avail index / packed avail index and wrap counter).
        expected: u32,
    },
    /// A workload thread panicked.
    #[error("a workload thread panicked")]
    WorkerPanicked,
}

impl FrontendError {
    /// An [`FrontendError::Io`] with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        FrontendError::Io {
            context: context.into(),
            source,
        }
    }

    fn vhost(step: impl Into<String>) -> impl FnOnce(vhost::Error) -> FrontendError {
        let step = step.into();
        move |source| FrontendError::Vhost { step, source }
    }
}

/// Result of the frontend.
pub type Result<T> = std::result::Result<T, FrontendError>;

/// How the frontend learns about completions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CompletionMode {
    /// Sleep on the call eventfd when nothing is used (interrupts enabled only then).
    #[default]
    Interrupt,
    /// Spin on the used ring (interrupts stay disabled; a call eventfd is still set).
    Poll,
}

/// Options of [`BlkFrontend::connect`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendOptions {
    /// Request queues to set up (1..).
    pub queues: u16,
    /// Entries per ring (a power of 2 for split rings).
    pub queue_size: u16,
    /// Use packed rings (VIRTIO_F_RING_PACKED; an error if not offered).
    pub packed: bool,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX when offered.
    pub event_idx: bool,
    /// Negotiate VIRTIO_RING_F_INDIRECT_DESC when offered and submit every request as one
    /// indirect descriptor.
    pub indirect: bool,
    /// Negotiate VHOST_USER_PROTOCOL_F_REPLY_ACK when offered and ask for an ack of every
    /// request.
    pub reply_ack: bool,
    /// Request slots per queue (the largest depth).
    pub slots: u16,
    /// Largest data length of one request (each slot has a buffer this big).
    pub max_block_size: u32,
    /// How completions are noticed.
    pub completion: CompletionMode,
    /// How long to wait for a reply or a completion before giving up.
    pub timeout: Duration,
    /// Negotiate VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD when offered and hand the backend
    /// an inflight area (GET_INFLIGHT_FD, SET_INFLIGHT_FD), kept across
    /// [`BlkFrontend::reconnect`] as QEMU keeps it across a backend restart.
    pub inflight: bool,
    /// Send a packed ring's SET_VRING_BASE in 16 bits, as DPDK's virtio_user does
    /// (`0x8000` for a fresh ring), instead of QEMU's 32 bits (`0x80008000`).
    pub packed_base_16bit: bool,
}

impl Default for FrontendOptions {
    fn default() -> Self {
        FrontendOptions {
            queues: 1,
            queue_size: 256,
            packed: false,
            event_idx: true,
            indirect: false,
            reply_ack: true,
            slots: 32,
            max_block_size: 64 * 1024,
            completion: CompletionMode::Interrupt,
            timeout: Duration::from_secs(10),
            inflight: false,
            packed_base_16bit: false,
        }
    }
}

/// What was negotiated with the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Virtio feature bits the backend offered.
    pub offered_features: u64,
    /// Virtio feature bits acked (SET_FEATURES).
    pub acked_features: u64,
    /// Protocol feature bits the backend offered (0 without PROTOCOL_FEATURES).
    pub offered_protocol_features: u64,
    /// Protocol feature bits acked.
    pub acked_protocol_features: u64,
    /// GET_QUEUE_NUM's answer (with the MQ protocol feature).
    pub backend_queue_num: Option<u64>,
    /// The configuration space (with the CONFIG protocol feature).
    pub config: Option<BlkConfig>,
    /// The ring layout in use.
    pub layout: RingLayout,
}

impl DeviceInfo {
    /// Whether virtio feature `b` was negotiated.
    pub fn has(&self, b: u32) -> bool {
        self.acked_features & bit(b) != 0
    }

    /// Whether protocol feature `f` was negotiated.
    pub fn has_protocol(&self, f: VhostUserProtocolFeatures) -> bool {
        self.acked_protocol_features & f.bits() != 0
    }
}

/// A connected, running vhost-user-blk frontend.
pub struct BlkFrontend {
    fe: Frontend,
    /// A duplicate of the frontend's socket (raw requests, watchdog).
    sock: UnixStream,
    opts: FrontendOptions,
    mem: GuestMemoryMmap,
    queues: Vec<BlkQueue>,
    info: DeviceInfo,
    /// The inflight area (with [`FrontendOptions::inflight`]), kept across reconnects.
    inflight: Option<(VhostUserInflight, File)>,
    /// The last ring base each queue was set to or reported (what QEMU resends for a
    /// packed ring after a backend crash).
    bases: Vec<u32>,
}

/// A connection negotiated up to SET_FEATURES.
struct Session {
    fe: Frontend,
    sock: UnixStream,
    info: DeviceInfo,
}

impl std::fmt::Debug for BlkFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkFrontend")
            .field("info", &self.info)
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

impl BlkFrontend {
    /// Connects to `path` and negotiates features, protocol features and the
    /// configuration up to SET_FEATURES.
    fn negotiate(path: &Path, opts: &FrontendOptions) -> Result<Session> {
        // GET_CONFIG, whose refusal by libvhost-user (an empty reply) the `vhost` crate
        // misreads and then waits for forever, also runs under a watchdog that shuts the
        // socket down.
        let (mut fe, raw_sock) = open_frontend(path, opts.timeout, u64::from(opts.queues))?;

        // Virtio features.
        let offered = fe
            .get_features()
            .map_err(FrontendError::vhost("GET_FEATURES"))?;
        let need = |b: u32, name: &'static str| require_feature(offered, b, name);
        need(blk::VIRTIO_F_VERSION_1, "VIRTIO_F_VERSION_1")?;
        let mut want = bit(blk::VIRTIO_F_VERSION_1) | bit(blk::VHOST_USER_F_PROTOCOL_FEATURES);
        for b in blk::ACCEPTED_BLK_FEATURES {
            want |= bit(b);
        }
        if opts.packed {
            need(blk::VIRTIO_F_RING_PACKED, "VIRTIO_F_RING_PACKED")?;
            want |= bit(blk::VIRTIO_F_RING_PACKED);
        }
        if opts.event_idx {
            want |= bit(blk::VIRTIO_RING_F_EVENT_IDX);
        }
        if opts.indirect {
            want |= bit(blk::VIRTIO_RING_F_INDIRECT_DESC);
        }
        let acked = offered & want;
        let layout = if opts.packed {
            RingLayout::Packed
        } else {
            RingLayout::Split
        };
        let mut info = DeviceInfo {
            offered_features: offered,
            acked_features: acked,
            offered_protocol_features: 0,
            acked_protocol_features: 0,
            backend_queue_num: None,
            config: None,
            layout,
        };

        // Protocol features.
        if offered & bit(blk::VHOST_USER_F_PROTOCOL_FEATURES) != 0 {
            let mut want_pf = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG;
            if opts.reply_ack {
                want_pf |= VhostUserProtocolFeatures::REPLY_ACK;
            }
            if opts.inflight {
                want_pf |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
            }
            let (pf, acked_pf, queue_num) = negotiate_protocol(&mut fe, want_pf, opts.queues)?;
            info.offered_protocol_features = pf.bits();
            info.acked_protocol_features = acked_pf.bits();
            info.backend_queue_num = queue_num;
            if acked_pf.contains(VhostUserProtocolFeatures::CONFIG) {
                let len = blk::CONFIG_READ_LEN;
                let zeros = vec![0u8; len as usize];
                let (_, cfg) = raw::with_watchdog(&raw_sock, opts.timeout, || {
                    fe.get_config(0, len, VhostUserConfigFlags::empty(), &zeros)
                })
                .map_err(FrontendError::vhost(format!(
                    "GET_CONFIG (offset 0, {len} bytes)"
                )))?;
                info.config = Some(BlkConfig::parse(&cfg, acked).ok_or_else(|| {
                    FrontendError::Protocol(format!(
                        "GET_CONFIG returned {} bytes, {len} asked for",
                        cfg.len()
                    ))
                })?);
            }
        }
        if opts.queues > 1 {
            let blk_mq = info.has(blk::VIRTIO_BLK_F_MQ);
            let cfg_queues = info.config.and_then(|c| c.num_queues);
            let available = match (blk_mq, cfg_queues, info.backend_queue_num) {
                (false, _, _) => 1,
                (true, Some(n), _) => u64::from(n),
                (true, None, Some(n)) => n,
                (true, None, None) => u64::from(opts.queues),
            };
            if available < u64::from(opts.queues) {
                return Err(FrontendError::NotEnoughQueues {
                    requested: opts.queues,
                    available,
                });
            }
        }
        fe.set_features(acked)
            .map_err(FrontendError::vhost("SET_FEATURES"))?;

        Ok(Session {
            fe,
            sock: raw_sock,
            info,
        })
    }

    /// Connects to the backend listening on `socket`, negotiates, sets up the memory and
    /// `opts.queues` rings, and starts them.
    pub fn connect(socket: impl AsRef<Path>, opts: FrontendOptions) -> Result<BlkFrontend> {
        let path = socket.as_ref();
        validate(&opts)?;
        let Session {
            mut fe,
            sock: raw_sock,
            info,
        } = Self::negotiate(path, &opts)?;
        let acked = info.acked_features;
        let layout = info.layout;
        let inflight = Self::setup_inflight(&mut fe, &info, &opts, None)?;

        // Memory.
        let mlayout = MemoryLayout::new(
            layout,
            opts.queues,
            opts.queue_size,
            opts.slots,
            opts.max_block_size,
        );
        let mem = memory::create_memory(mlayout.size)?;
        let table = memory::mem_table(&mem)?;
        fe.set_mem_table(&table)
            .map_err(FrontendError::vhost("SET_MEM_TABLE"))?;

        // Rings.
        let event_idx = info.has(blk::VIRTIO_RING_F_EVENT_IDX);
        let indirect = info.has(blk::VIRTIO_RING_F_INDIRECT_DESC);
        let protocol = acked & bit(blk::VHOST_USER_F_PROTOCOL_FEATURES) != 0;
        let reply_ack = info.has_protocol(VhostUserProtocolFeatures::REPLY_ACK);
        let per_request: u32 = if indirect { 1 } else { 3 };
        if u32::from(opts.slots) * per_request > u32::from(opts.queue_size) {
            return Err(FrontendError::InvalidOptions(format!(
                "{} slots of {per_request} descriptors (indirect {}) do not fit a ring of {}",
                opts.slots,
                if indirect {
                    "negotiated"
                } else {
                    "not negotiated"
                },
                opts.queue_size
            )));
        }
        let mut queues = Vec::with_capacity(usize::from(opts.queues));
        let mut bases = Vec::with_capacity(usize::from(opts.queues));
        for (i, ql) in (0u16..).zip(&mlayout.queues) {
            let driver = DriverQueue::new(layout, opts.queue_size, ql.ring_base, event_idx);
            driver
                .init(&mem)
                .map_err(|source| FrontendError::Driver { queue: i, source })?;
            let base = match layout {
                RingLayout::Split => 0,
                RingLayout::Packed => raw::PACKED_FRESH_BASE,
            };
            let (kick, call) =
                Self::setup_ring(&mut fe, &raw_sock, &opts, reply_ack, &mem, i, &driver, base)?;
            if opts.completion == CompletionMode::Poll {
                driver
                    .disable_interrupts(&mem)
                    .map_err(|source| FrontendError::Driver { queue: i, source })?;
            }
            bases.push(base);
            queues.push(BlkQueue::new(QueueParts {
                index: i,
                mem: mem.clone(),
                driver,
                kick,
                call,
                mode: opts.completion,
                indirect,
                layout: *ql,
                slots: opts.slots,
                data_stride: mlayout.data_stride,
                data_cap: opts.max_block_size,
                timeout: opts.timeout,
            }));
        }
        if protocol {
            for i in 0..opts.queues {
                fe.set_vring_enable(usize::from(i), true)
                    .map_err(FrontendError::vhost(format!(
                        "SET_VRING_ENABLE 1 (queue {i})"
                    )))?;
            }
        }
        log::debug!(
            "connected to {}: features {:#x} (offered {:#x}), protocol {:#x}, config {:?}",
            path.display(),
            info.acked_features,
            info.offered_features,
            info.acked_protocol_features,
            info.config
        );
        Ok(BlkFrontend {
            fe,
            sock: raw_sock,
            opts,
            mem,
            queues,
            info,
            inflight,
            bases,
        })
    }

    /// With INFLIGHT_SHMFD negotiated: GET_INFLIGHT_FD (unless an area from an earlier
    /// connection is given back) and SET_INFLIGHT_FD, before the rings are set up (QEMU's
    /// order).
    fn setup_inflight(
        fe: &mut Frontend,
        info: &DeviceInfo,
        opts: &FrontendOptions,
        kept: Option<(VhostUserInflight, File)>,
    ) -> Result<Option<(VhostUserInflight, File)>> {
        if !info.has_protocol(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
            return Ok(None);
        }
        let (area, file) = match kept {
            Some(k) => k,
            None => fe
                .get_inflight_fd(&VhostUserInflight::new(0, 0, opts.queues, opts.queue_size))
                .map_err(FrontendError::vhost("GET_INFLIGHT_FD"))?,
        };
        fe.set_inflight_fd(&area, file.as_raw_fd())
            .map_err(FrontendError::vhost("SET_INFLIGHT_FD"))?;
        Ok(Some((area, file)))
    }

    /// Configures ring `i` with ring base `base` ([`setup_ring`]) and returns the
    /// eventfds.
    #[allow(clippy::too_many_arguments)]
    fn setup_ring(
        fe: &mut Frontend,
        sock: &UnixStream,
        opts: &FrontendOptions,
        reply_ack: bool,
        mem: &GuestMemoryMmap,
        i: u16,
        driver: &DriverQueue,
        base: u32,
    ) -> Result<(EventFd, EventFd)> {
        setup_ring(
            fe,
            sock,
            mem,
            driver,
            RingSetup {
                index: i,
                queue_size: opts.queue_size,
                reply_ack,
                base,
                packed_base_16bit: opts.packed_base_16bit,
            },
        )
    }

    /// Connects again after the backend went away (a restarted backend listening on
    /// `socket`), as QEMU does with `reconnect-ms`: negotiates again, hands over the same
    /// memory and (with [`FrontendOptions::inflight`]) the same inflight area, and
    /// restarts every ring where a frontend that could not stop it knows it to be: a
    /// split ring at the used index in guest memory, a packed ring at the last base it
    /// set or was told (stale after a crash; the inflight area corrects it). Requests in
    /// flight stay in flight: the backend resubmits them.
    pub fn reconnect(&mut self, socket: impl AsRef<Path>) -> Result<()> {
        let path = socket.as_ref();
        let Session { mut fe, sock, info } = Self::negotiate(path, &self.opts)?;
        if info.acked_features != self.info.acked_features {
            return Err(FrontendError::Protocol(format!(
                "the restarted backend negotiated features {:#x}, before {:#x}",
                info.acked_features, self.info.acked_features
            )));
        }
        let kept = self.inflight.take();
        self.inflight = Self::setup_inflight(&mut fe, &info, &self.opts, kept)?;
        let table = memory::mem_table(&self.mem)?;
        fe.set_mem_table(&table)
            .map_err(FrontendError::vhost("SET_MEM_TABLE"))?;
        let reply_ack = info.has_protocol(VhostUserProtocolFeatures::REPLY_ACK);
        for (q, base) in self.queues.iter_mut().zip(self.bases.iter_mut()) {
            let i = q.index();
            if q.driver().layout() == RingLayout::Split {
                *base = u32::from(
                    q.driver()
                        .used_idx(&self.mem)
                        .map_err(|source| FrontendError::Driver { queue: i, source })?,
                );
            }
            let (kick, call) = Self::setup_ring(
                &mut fe,
                &sock,
                &self.opts,
                reply_ack,
                &self.mem,
                i,
                q.driver(),
                *base,
            )?;
            q.replace_eventfds(kick, call);
        }
        if info.has(blk::VHOST_USER_F_PROTOCOL_FEATURES) {
            for q in &self.queues {
                fe.set_vring_enable(usize::from(q.index()), true)
                    .map_err(FrontendError::vhost(format!(
                        "SET_VRING_ENABLE 1 (queue {})",
                        q.index()
                    )))?;
            }
        }
        self.fe = fe;
        self.sock = sock;
        self.info = info;
        Ok(())
    }

    /// What was negotiated.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The device capacity in bytes, if the configuration space was read.
    pub fn capacity_bytes(&self) -> Option<u64> {
        self.info.config.map(|c| c.capacity_bytes())
    }

    /// Whether the device is read-only (VIRTIO_BLK_F_RO).
    pub fn read_only(&self) -> bool {
        self.info.has(blk::VIRTIO_BLK_F_RO)
    }

    /// Whether flush requests may be sent (VIRTIO_BLK_F_FLUSH).
    pub fn can_flush(&self) -> bool {
        self.info.has(blk::VIRTIO_BLK_F_FLUSH)
    }

    /// The queues, to drive directly (one thread each).
    pub fn queues(&mut self) -> &mut [BlkQueue] {
        &mut self.queues
    }

    /// The inflight area handed to the backend (with [`FrontendOptions::inflight`], when
    /// the backend offered INFLIGHT_SHMFD).
    pub fn inflight_area(&self) -> Option<&VhostUserInflight> {
        self.inflight.as_ref().map(|(area, _)| area)
    }

    /// The frontend's guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Reads `len` bytes of the configuration space at `offset` (GET_CONFIG; needs the
    /// CONFIG protocol feature). A backend that does not answer within the frontend's
    /// timeout, or answers with a reply the `vhost` crate misreads (libvhost-user's empty
    /// reply to a refused read), gets its connection shut down and this returns an error;
    /// the frontend is unusable afterwards.
    pub fn get_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>> {
        let zeros = vec![0u8; len as usize];
        let fe = &mut self.fe;
        raw::with_watchdog(&self.sock, self.opts.timeout, || {
            fe.get_config(offset, len, VhostUserConfigFlags::empty(), &zeros)
        })
        .map(|(_, buf)| buf)
        .map_err(FrontendError::vhost(format!(
            "GET_CONFIG (offset {offset}, {len} bytes)"
        )))
    }

    /// The `vhost` frontend (for requests this type does not wrap; mind that its replies
    /// are not under a watchdog, see [`BlkFrontend::get_config`]).
    pub fn vhost_frontend(&mut self) -> &mut Frontend {
        &mut self.fe
    }

    /// Runs one request synchronously on queue `q` and returns its completion (status
    /// checked) and, for reads, the data.
    pub fn request(
        &mut self,
        q: u16,
        op: BlkOp,
        sector: u64,
        data: &[u8],
        read_len: u32,
    ) -> Result<(Completion, Vec<u8>)> {
        let queue = self
            .queues
            .get_mut(usize::from(q))
            .ok_or_else(|| FrontendError::InvalidOptions(format!("no queue {q}")))?;
        let slot = queue
            .alloc_slot()
            .ok_or_else(|| FrontendError::InvalidOptions(format!("queue {q} has no free slot")))?;
        let len = if op == BlkOp::Write {
            queue.write_data(slot, data)?;
            u32::try_from(data.len())
                .map_err(|_| FrontendError::InvalidOptions("data too long".into()))?
        } else {
            read_len
        };
        if let Err(e) = queue.submit(slot, op, sector, len, 0) {
            queue.release_slot(slot);
            return Err(e);
        }
        queue.kick()?;
        let mut out = Vec::with_capacity(1);
        queue.drain(&mut out)?;
        let c = out
            .into_iter()
            .find(|c| c.slot == slot)
            .ok_or_else(|| FrontendError::Protocol(format!("queue {q}: completion lost")))?;
        c.check(q)?;
        let mut back = Vec::new();
        if op.device_writes_data() {
            back = vec![0u8; len as usize];
            queue.read_data(slot, &mut back)?;
        }
        Ok((c, back))
    }

    /// Runs a workload on the queues (one thread per queue) and reports it.
    pub fn run_workload(&mut self, w: &Workload) -> Result<WorkloadReport> {
        let span = match (w.span, self.capacity_bytes()) {
            (Some(s), Some(c)) => s.min(c),
            (Some(s), None) => s,
            (None, Some(c)) => c,
            (None, None) => {
                return Err(FrontendError::Span(
                    "the capacity is unknown (no CONFIG protocol feature): give a span".into(),
                ))
            }
        };
        if w.op != WorkloadOp::RandRead && self.read_only() {
            return Err(FrontendError::ReadOnly);
        }
        let flush = self.can_flush();
        workload::run(&mut self.queues, w, span, flush)
    }

    /// Stops the device cleanly: waits for requests in flight, disables each ring
    /// (SET_VRING_ENABLE 0 with PROTOCOL_FEATURES) and stops it with GET_VRING_BASE,
    /// checking that the backend consumed exactly what the driver made available. Returns
    /// the reported bases. The connection closes when this returns.
    pub fn shutdown(mut self) -> Result<Vec<u32>> {
        let mut sink = Vec::new();
        for q in &mut self.queues {
            q.drain(&mut sink)?;
        }
        let protocol = self.info.has(blk::VHOST_USER_F_PROTOCOL_FEATURES);
        let mut bases = Vec::with_capacity(self.queues.len());
        for q in &self.queues {
            let i = q.index();
            if protocol {
                self.fe
                    .set_vring_enable(usize::from(i), false)
                    .map_err(FrontendError::vhost(format!(
                        "SET_VRING_ENABLE 0 (queue {i})"
                    )))?;
            }
            let reported = self
                .fe
                .get_vring_base(usize::from(i))
                .map_err(FrontendError::vhost(format!("GET_VRING_BASE (queue {i})")))?;
            let (pos, wrap) = q.driver().avail_position();
            let expected = match self.info.layout {
                RingLayout::Split => u32::from(pos),
                RingLayout::Packed => u32::from(pos) | (u32::from(wrap) << 15),
            };
            if reported & 0xffff != expected {
                return Err(FrontendError::BadVringBase {
                    queue: i,
                    reported,
                    expected,
                });
            }
            bases.push(reported);
        }
        log::debug!("stopped {} rings; bases {bases:x?}", bases.len());
        Ok(bases)
    }
}

/// Connects, retrying while the backend has bound its socket but is not listening yet
/// (ECONNREFUSED), for up to `timeout`.
fn connect_socket(path: &Path, timeout: Duration) -> Result<UnixStream> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if e.kind() == io::ErrorKind::ConnectionRefused
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(source) => {
                return Err(FrontendError::Connect {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

fn validate(o: &FrontendOptions) -> Result<()> {
    let bad = |m: String| Err(FrontendError::InvalidOptions(m));
    if o.queues == 0 {
        return bad("queues must be at least 1".into());
    }
    validate_queue_size(o.queue_size, o.packed)?;
    if o.slots == 0 || o.slots > o.queue_size {
        return bad(format!(
            "{} slots do not fit a ring of {}",
            o.slots, o.queue_size
        ));
    }
    if o.max_block_size == 0 || o.max_block_size % 512 != 0 {
        return bad(format!(
            "max block size {} is not a positive multiple of 512",
            o.max_block_size
        ));
    }
    Ok(())
}

/// Connects to the backend at `path` as a frontend of `queues` queues, with `timeout` on
/// every socket read and write (the `vhost` frontend blocks on replies: the timeouts make
/// a silent backend an error), and sends SET_OWNER. Returns the frontend and a second
/// handle on its socket, for the messages the `vhost` crate cannot send.
pub(crate) fn open_frontend(
    path: &Path,
    timeout: Duration,
    queues: u64,
) -> Result<(Frontend, UnixStream)> {
    let stream = connect_socket(path, timeout)?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| FrontendError::io("setting socket timeouts", e))?;
    let raw_sock = stream
        .try_clone()
        .map_err(|e| FrontendError::io("duplicating the socket", e))?;
    let fe = Frontend::from_stream(stream, queues);
    fe.set_owner().map_err(FrontendError::vhost("SET_OWNER"))?;
    Ok((fe, raw_sock))
}

/// Refuses a ring size virtio does not allow: 1 to 32768, a power of 2 for split rings
/// (§2.6, §2.7).
pub(crate) fn validate_queue_size(size: u16, packed: bool) -> Result<()> {
    if size == 0 || size > 32768 {
        return Err(FrontendError::InvalidOptions(format!(
            "queue size {size} not in 1..=32768"
        )));
    }
    if !packed && !size.is_power_of_two() {
        return Err(FrontendError::InvalidOptions(format!(
            "split queue size {size} is not a power of 2"
        )));
    }
    Ok(())
}

/// [`FrontendError::FeatureNotOffered`] unless `offered` has bit `b` (named `name`).
pub(crate) fn require_feature(offered: u64, b: u32, name: &'static str) -> Result<()> {
    if offered & bit(b) == 0 {
        Err(FrontendError::FeatureNotOffered {
            feature: name,
            bit: b,
            offered,
        })
    } else {
        Ok(())
    }
}

/// GET_PROTOCOL_FEATURES, then SET_PROTOCOL_FEATURES with what of `want` is offered;
/// with REPLY_ACK every later request asks for a reply, with MQ the backend must have at
/// least `queues` queues. Returns (offered, acked, the backend's queue count with MQ).
pub(crate) fn negotiate_protocol(
    fe: &mut Frontend,
    want: VhostUserProtocolFeatures,
    queues: u16,
) -> Result<(
    VhostUserProtocolFeatures,
    VhostUserProtocolFeatures,
    Option<u64>,
)> {
    let pf = fe
        .get_protocol_features()
        .map_err(FrontendError::vhost("GET_PROTOCOL_FEATURES"))?;
    let acked = pf & want;
    fe.set_protocol_features(acked)
        .map_err(FrontendError::vhost("SET_PROTOCOL_FEATURES"))?;
    if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    }
    let mut queue_num = None;
    if acked.contains(VhostUserProtocolFeatures::MQ) {
        let n = fe
            .get_queue_num()
            .map_err(FrontendError::vhost("GET_QUEUE_NUM"))?;
        queue_num = Some(n);
        if n < u64::from(queues) {
            return Err(FrontendError::NotEnoughQueues {
                requested: queues,
                available: n,
            });
        }
    }
    Ok((pf, acked, queue_num))
}

/// The end of every ring's set-up, common to the frontends: SET_VRING_ADDR (frontend
/// virtual addresses of `driver`'s areas), then fresh nonblocking call and kick eventfds
/// (SET_VRING_CALL, SET_VRING_KICK). Returns (kick, call).
/// What [`setup_ring`] sends for one ring.
pub(crate) struct RingSetup {
    /// Queue index.
    pub index: u16,
    /// SET_VRING_NUM.
    pub queue_size: u16,
    /// REPLY_ACK negotiated (for the raw SET_VRING_BASE of a packed ring).
    pub reply_ack: bool,
    /// SET_VRING_BASE: the split avail index, or both packed halves with their wrap
    /// counters.
    pub base: u32,
    /// Packed: send the avail half only, as DPDK's virtio_user does.
    pub packed_base_16bit: bool,
}

/// Configures a ring (SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, fresh call and kick
/// eventfds) and returns (kick, call).
pub(crate) fn setup_ring(
    fe: &mut Frontend,
    sock: &UnixStream,
    mem: &GuestMemoryMmap,
    driver: &DriverQueue,
    r: RingSetup,
) -> Result<(EventFd, EventFd)> {
    let i = r.index;
    let qi = usize::from(i);
    let step = |what: &str| format!("{what} (queue {i})");
    fe.set_vring_num(qi, r.queue_size)
        .map_err(FrontendError::vhost(step("SET_VRING_NUM")))?;
    match driver.layout() {
        RingLayout::Split => fe
            .set_vring_base(qi, u16::try_from(r.base).unwrap_or(0))
            .map_err(FrontendError::vhost(step("SET_VRING_BASE")))?,
        // QEMU sends both halves with their wrap counters (the `vhost` crate's
        // set_vring_base takes 16 bits only); DPDK the avail half only.
        RingLayout::Packed => {
            let sent = if r.packed_base_16bit {
                r.base & 0xffff
            } else {
                r.base
            };
            raw::set_vring_base(sock, i, sent, r.reply_ack)?
        }
    }
    set_vring_addr_and_eventfds(fe, mem, i, r.queue_size, driver)
}

pub(crate) fn set_vring_addr_and_eventfds(
    fe: &mut Frontend,
    mem: &GuestMemoryMmap,
    index: u16,
    queue_size: u16,
    driver: &DriverQueue,
) -> Result<(EventFd, EventFd)> {
    let qi = usize::from(index);
    let step = |what: &str| format!("{what} (queue {index})");
    let config = VringConfigData {
        queue_max_size: queue_size,
        queue_size,
        flags: 0,
        desc_table_addr: memory::user_addr(mem, driver.desc_table())?,
        used_ring_addr: memory::user_addr(mem, driver.device_area())?,
        avail_ring_addr: memory::user_addr(mem, driver.driver_area())?,
        log_addr: None,
    };
    fe.set_vring_addr(qi, &config)
        .map_err(FrontendError::vhost(step("SET_VRING_ADDR")))?;
    let eventfd =
        || EventFd::new(EFD_NONBLOCK).map_err(|e| FrontendError::io("creating an eventfd", e));
    let (kick, call) = (eventfd()?, eventfd()?);
    fe.set_vring_call(qi, &call)
        .map_err(FrontendError::vhost(step("SET_VRING_CALL")))?;
    fe.set_vring_kick(qi, &kick)
        .map_err(FrontendError::vhost(step("SET_VRING_KICK")))?;
    Ok((kick, call))
}

/// Sleeps on a queue's call eventfd for at most `max` (poll), then resets it. The read is
/// nonblocking (the backend may have set O_NONBLOCK on the shared file anyway): EAGAIN
/// means another reader got it.
pub(crate) fn sleep_on_call(call: &EventFd, index: u16, max: Duration) -> Result<()> {
    let mut pfd = libc::pollfd {
        fd: call.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(max.as_millis().clamp(1, 60_000)).unwrap_or(60_000);
    // SAFETY: `pfd` is a valid pollfd for the duration of the call, and nfds is 1.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(FrontendError::io(
                format!("queue {index}: poll on call eventfd"),
                e,
            ));
        }
    }
    if r > 0 {
        match call.read() {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                return Err(FrontendError::io(
                    format!("queue {index}: reading call eventfd"),
                    e,
                ))
            }
        }
    }
    Ok(())
}
