// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a daemon implements: a [`Device`] (features, queues, config space, reset, how
//! queues group onto worker threads) that creates one [`QueueHandler`] per group of
//! queues, which processes the group's [`Vring`]s and its own event sources through a
//! [`GroupContext`].

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use super::error::DeviceError;
use super::inflight::{InflightRequest, Tracker};
use super::notify_fd::NotifyFd;
use super::shared_worker::WorkerThread;
pub use super::worker::GroupContext;
use crate::chain::DescriptorChain;
use crate::desc::PackedDescriptor;
use crate::memory::GuestMemoryView;
use crate::queue::{Queue, RecoveredChain, RingLayout};

pub use vhost::vhost_user::message::VhostUserProtocolFeatures as ProtocolFeatures;

/// What the server tells a device about a queue it starts.
#[derive(Clone, Debug)]
pub struct QueueContext {
    /// Queue index.
    pub index: u16,
    /// Queue size.
    pub size: u16,
    /// Ring layout (from VIRTIO_F_RING_PACKED).
    pub layout: RingLayout,
    /// The virtio features the frontend acked (without VHOST_USER_F_PROTOCOL_FEATURES).
    pub features: u64,
    /// The guest memory at start; later changes arrive through
    /// [`QueueHandler::memory_changed`].
    pub memory: Arc<GuestMemoryView>,
}

/// What the server tells a device about a group of queues whose handler it creates.
#[derive(Clone, Debug)]
pub struct GroupInfo {
    /// The group's number (see [`Device::queue_group`]).
    pub group: u16,
    /// The queues of the group, in increasing order.
    pub queues: Vec<u16>,
    /// The virtio features the frontend acked (without VHOST_USER_F_PROTOCOL_FEATURES).
    pub features: u64,
}

/// How far [`QueueHandler::process`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Processed {
    /// The ring is empty: [`Vring::pop_into`] returned `false`. The worker re-enables
    /// notifications (re-checking the ring) and sleeps until the next kick.
    Empty,
    /// The handler stopped with buffers possibly left in the ring (on purpose: it is out
    /// of resources, e.g. its submission queue is full, or a net RX queue has no packet
    /// to deliver). The worker leaves notifications off and does not call `process`
    /// for this queue on kicks; the handler resumes it from one of its events
    /// ([`GroupContext::schedule`]), or a kick after [`GroupContext::wait_for_buffers`].
    Throttled,
}

/// What a handler's event source is watched for ([`GroupContext::register`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interest {
    /// Wake up when the fd is readable.
    pub readable: bool,
    /// Wake up when the fd is writable (e.g. a TAP that refused a frame with EAGAIN).
    pub writable: bool,
    /// Edge-triggered: wake up when readiness appears, not while it lasts (the handler
    /// must then consume everything, until EAGAIN).
    pub edge: bool,
}

impl Interest {
    /// Level-triggered, readable.
    pub const READABLE: Interest = Interest {
        readable: true,
        writable: false,
        edge: false,
    };
    /// Level-triggered, writable.
    pub const WRITABLE: Interest = Interest {
        readable: false,
        writable: true,
        edge: false,
    };
    /// Nothing: the fd stays registered (hang-up and error are still reported) but
    /// wakes nobody. Pauses a source, e.g. a TAP while its RX ring has no buffers.
    pub const PAUSED: Interest = Interest {
        readable: false,
        writable: false,
        edge: false,
    };

    /// The same, edge-triggered.
    pub const fn edge(self) -> Interest {
        Interest { edge: true, ..self }
    }

    /// The same, plus writable.
    pub const fn and_writable(self) -> Interest {
        Interest {
            writable: true,
            ..self
        }
    }
}

/// What happened on a handler's event source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Events {
    /// Readable.
    pub readable: bool,
    /// Writable.
    pub writable: bool,
    /// The peer hung up (EPOLLHUP / EPOLLRDHUP).
    pub hangup: bool,
    /// An error is pending on the fd (EPOLLERR).
    pub error: bool,
}

/// The handler of a group of queues (one worker thread): created by
/// [`Device::start_group`] when the group's first queue starts, owned by the group's
/// worker thread, dropped when the connection ends or the device is reset. It owns its
/// resources (an io_uring per block queue, a TAP queue, console clients), so groups share
/// no lock on the hot path.
///
/// Every call gets a [`GroupContext`]: the group's running [`Vring`]s, the handler's
/// event sources (registered, paused, resumed and removed at run time, readable and/or
/// writable, level- or edge-triggered), and the worker's scheduling.
///
/// An error from [`Self::process`] or [`Self::drain`] breaks that queue; one from
/// [`Self::handle_event`] or [`Self::queue_started`] breaks the queues of the group:
/// the worker logs it, stops processing them, signals their error eventfds and reports
/// DEVICE_NEEDS_RESET through GET_STATUS. Other groups keep running.
pub trait QueueHandler: Send + 'static {
    /// Queue `queue.index` of the group started; its vring is reachable through
    /// `ctx.vring`. Set up per-queue resources here (and register their fds).
    fn queue_started(
        &mut self,
        ctx: &mut GroupContext<'_>,
        queue: &QueueContext,
    ) -> Result<(), DeviceError> {
        let _ = (ctx, queue);
        Ok(())
    }

    /// New buffers may be available on `queue` (kick, busy poll, the ring was just
    /// enabled, or [`GroupContext::schedule`]): pop chains with [`Vring::pop_into`] and
    /// process or submit them. Return [`Processed::Empty`] once `pop_into` returned
    /// `false`, or [`Processed::Throttled`] to leave buffers in the ring.
    fn process(&mut self, ctx: &mut GroupContext<'_>, queue: u16)
        -> Result<Processed, DeviceError>;

    /// Event source `token` ([`GroupContext::register`]) is ready. Consume the readiness
    /// (read the eventfd, read the TAP until EAGAIN with edge triggering) or the worker
    /// is woken again at once. After a hang-up or error the worker removes the source
    /// unless the handler did. The worker signals the drivers afterwards if needed.
    fn handle_event(
        &mut self,
        ctx: &mut GroupContext<'_>,
        token: u32,
        events: Events,
    ) -> Result<(), DeviceError> {
        let _ = (ctx, token, events);
        Ok(())
    }

    /// `queue` is being stopped (GET_VRING_BASE, reset or disconnect): take no new chains
    /// from it and finish the ones in flight. Requests already submitted may complete
    /// later: the worker keeps delivering [`Self::handle_event`] until every chain this
    /// backend popped (or resubmitted) from it is returned (or the server's drain timeout
    /// passes), then reports the ring base and calls [`Self::queue_stopped`]. Chains a
    /// restored ring base counts in flight but nobody popped are not waited for. Chains
    /// held without pending I/O (e.g. RX buffers waiting for data) must be returned here,
    /// with a used length of 0.
    fn drain(&mut self, ctx: &mut GroupContext<'_>, queue: u16) -> Result<(), DeviceError> {
        let _ = (ctx, queue);
        Ok(())
    }

    /// `queue` stopped: its vring is gone. Release its per-queue resources.
    fn queue_stopped(&mut self, ctx: &mut GroupContext<'_>, queue: u16) {
        let _ = (ctx, queue);
    }

    /// The frontend changed the memory table. The vrings already use `memory` for new
    /// chains; chains popped earlier keep the view they were translated with alive. Use
    /// this to refresh anything derived from guest memory (e.g. registered buffers).
    fn memory_changed(&mut self, memory: &Arc<GuestMemoryView>) {
        let _ = memory;
    }
}

/// A vhost-user device: the part of a daemon the protocol server talks to.
///
/// Methods take `&self` and may be called from the connection thread while queue workers
/// run; keep mutable device-wide state (e.g. a config space a resize changes) behind the
/// device's own synchronisation, off the per-request path.
pub trait Device: Send + Sync + 'static {
    /// The per-queue handler type.
    type Handler: QueueHandler;

    /// Virtio feature bits offered: device-specific bits plus the transport bits the
    /// device supports (VIRTIO_F_VERSION_1, VIRTIO_F_RING_PACKED, VIRTIO_RING_F_EVENT_IDX,
    /// VIRTIO_RING_F_INDIRECT_DESC, ...). The server adds VHOST_USER_F_PROTOCOL_FEATURES.
    fn features(&self) -> u64;

    /// Protocol features the device supports beyond those the server always offers
    /// (MQ, REPLY_ACK, BACKEND_REQ, BACKEND_SEND_FD, RESET_DEVICE, CONFIGURE_MEM_SLOTS,
    /// STATUS): `CONFIG` if it has a config space, `INFLIGHT_SHMFD` if its requests must
    /// survive a backend restart (block). Other bits are ignored.
    fn protocol_features(&self) -> ProtocolFeatures {
        ProtocolFeatures::empty()
    }

    /// Number of queues (GET_QUEUE_NUM).
    fn num_queues(&self) -> u16;

    /// Largest queue size accepted by SET_VRING_NUM.
    fn max_queue_size(&self) -> u16;

    /// The frontend acked `features` (SET_FEATURES; without
    /// VHOST_USER_F_PROTOCOL_FEATURES). An error refuses them.
    fn set_features(&self, features: u64) -> Result<(), DeviceError> {
        let _ = features;
        Ok(())
    }

    /// Reads `buf.len()` bytes of the config space at `offset` (GET_CONFIG).
    fn read_config(&self, offset: u32, buf: &mut [u8]) -> Result<(), DeviceError> {
        let _ = (offset, buf);
        Err(DeviceError::NoConfigSpace)
    }

    /// Writes the config space at `offset` (SET_CONFIG).
    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        Err(DeviceError::ConfigReadOnly {
            offset,
            len: data.len(),
        })
    }

    /// The group (worker thread) of queue `queue`: queues of one group share one
    /// [`QueueHandler`] and one thread, e.g. a network queue pair or every queue of a
    /// console. `None` (the default): the server's [`super::ServerConfig::queues_per_thread`]
    /// decides (`queue / queues_per_thread`). Called once per connection for each queue.
    fn queue_group(&self, queue: u16) -> Option<u16> {
        let _ = queue;
        None
    }

    /// The thread that runs the worker of queue group `group`: `None` (the default)
    /// gives the group a thread of its own; a shared [`WorkerThread`] runs it next to
    /// the workers of other groups and other connections. A device whose queues hand
    /// data to each other's (a switch whose ports are separate connections) keeps the
    /// hand-off on one core that way, with no cross-thread wake-up. Called on the
    /// connection thread when the group's first queue starts.
    fn worker_thread(&self, group: u16) -> Option<Arc<WorkerThread>> {
        let _ = group;
        None
    }

    /// Creates the handler of a group whose first queue is starting. Called on the
    /// connection thread; the handler then moves to the group's worker thread, where
    /// [`QueueHandler::queue_started`] follows for each queue that starts.
    fn start_group(&self, group: &GroupInfo) -> Result<Self::Handler, DeviceError>;

    /// VHOST_USER_SEND_RARP (protocol feature RARP, after a live migration): broadcast a
    /// RARP or gratuitous ARP for `mac` so switches learn the guest's new location. The
    /// default refuses it.
    fn send_rarp(&self, mac: [u8; 6]) -> Result<(), DeviceError> {
        let _ = mac;
        Err(DeviceError::Unsupported("SEND_RARP"))
    }

    /// VHOST_USER_NET_SET_MTU (protocol feature NET_MTU): the frontend's MTU for the
    /// device. The default refuses it.
    fn set_mtu(&self, mtu: u16) -> Result<(), DeviceError> {
        let _ = mtu;
        Err(DeviceError::Unsupported("NET_SET_MTU"))
    }

    /// Returns the device to its initial state: called after RESET_DEVICE and when the
    /// frontend disconnects, once every queue has stopped and its handler was dropped.
    fn reset(&self) {}
}

/// A started virtqueue as its handler sees it: the [`Queue`] plus the vhost-user side
/// (inflight tracking, call and error eventfds, enable state).
///
/// Pop and complete chains through this type, not through the [`Queue`], so that
/// in-flight requests are recorded for a backend restart.
pub struct Vring {
    index: u16,
    queue: Queue,
    call: Option<NotifyFd>,
    err: Option<NotifyFd>,
    /// Signalling the call or error fd failed (logged once, not per request).
    signal_failed: bool,
    enabled: bool,
    used_pending: bool,
    /// Chains popped since the worker last looked (for its poll decision).
    popped: u32,
    tracker: Option<Tracker>,
    /// Packed ring with tracking: host address of the descriptor ring.
    desc_ring: *const u8,
    /// Requests a previous backend instance left in flight, not handed to the handler
    /// yet; in reverse fetch order, so that `pop` takes the earliest.
    recovered: Vec<InflightRequest>,
    /// Restored in-flight chains the handler resubmitted (see [`Self::awaited_in_flight`]).
    resubmitted: u16,
}

// SAFETY: `desc_ring` points into guest memory kept mapped by the queue's memory view
// (an `Arc` held by `queue`); a vring is used by one thread at a time.
unsafe impl Send for Vring {}

impl std::fmt::Debug for Vring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vring")
            .field("index", &self.index)
            .field("queue", &self.queue)
            .field("enabled", &self.enabled)
            .field("tracked", &self.tracker.is_some())
            .finish()
    }
}

impl Vring {
    /// A vring outside a vhost-user server, for a device embedded in another program or
    /// driven by tests: queue `index`, enabled, no call or error eventfd (signal the
    /// driver yourself after [`Queue::needs_notification`]), no inflight tracking.
    pub fn standalone(index: u16, queue: Queue) -> Self {
        Self::new(index, queue, true)
    }

    pub(crate) fn new(index: u16, queue: Queue, enabled: bool) -> Self {
        Vring {
            index,
            queue,
            call: None,
            err: None,
            signal_failed: false,
            enabled,
            used_pending: false,
            popped: 0,
            tracker: None,
            desc_ring: std::ptr::null(),
            recovered: Vec::new(),
            resubmitted: 0,
        }
    }

    /// Attaches inflight tracking. `recovered` are the requests a previous backend
    /// instance left in flight, in fetch order: [`Self::pop_into`] hands them to the
    /// handler before any new chain.
    pub(crate) fn set_tracker(&mut self, tracker: Tracker, mut recovered: Vec<InflightRequest>) {
        self.tracker = Some(tracker);
        recovered.reverse();
        self.recovered = recovered;
        self.refresh_desc_ring();
    }

    fn refresh_desc_ring(&mut self) {
        self.desc_ring = std::ptr::null();
        if matches!(self.tracker, Some(Tracker::Packed(_))) {
            let cfg = self.queue.config();
            if let Some(p) =
                self.queue
                    .memory()
                    .translate(cfg.desc_table, 16 * u64::from(cfg.size), &mut 0)
            {
                self.desc_ring = p.cast_const();
            }
        }
    }

    /// Replaces the call fd; returns true if there was none before.
    pub(crate) fn set_call(&mut self, call: Option<NotifyFd>) -> bool {
        self.signal_failed = false;
        std::mem::replace(&mut self.call, call).is_none()
    }

    pub(crate) fn set_err(&mut self, err: Option<NotifyFd>) {
        self.signal_failed = false;
        self.err = err;
    }

    /// The call fd's descriptor, if any (the worker watches it for hang-up).
    pub(crate) fn call_fd(&self) -> Option<RawFd> {
        self.call.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// The error fd's descriptor, if any (the worker watches it for hang-up).
    pub(crate) fn err_fd(&self) -> Option<RawFd> {
        self.err.as_ref().map(AsRawFd::as_raw_fd)
    }

    pub(crate) fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
    }

    /// Switches to a new memory table (the ring areas are translated again).
    pub(crate) fn set_memory(&mut self, memory: Arc<GuestMemoryView>) -> crate::Result<()> {
        self.queue.set_memory(memory)?;
        self.refresh_desc_ring();
        Ok(())
    }

    pub(crate) fn queue_mut(&mut self) -> &mut Queue {
        &mut self.queue
    }

    /// Queue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The queue (read-only: pop and complete through the `Vring`).
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The guest memory new chains are translated with.
    pub fn memory(&self) -> &Arc<GuestMemoryView> {
        self.queue.memory()
    }

    /// Whether the ring is enabled (SET_VRING_ENABLE). The worker only calls
    /// [`QueueHandler::process`] on enabled rings; completions of a disabled ring are
    /// still delivered.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Chains this backend popped (recovered requests included, once popped) and not yet
    /// returned: what a stop waits for.
    ///
    /// A split ring base restored past the used index (SET_VRING_BASE after a restart, or
    /// a frontend's bad base) counts chains in flight that no handler holds; they are not
    /// counted here until [`Self::pop_into`] hands them out as recovered requests, and
    /// those never handed out can never complete, so a stop does not wait for them (the
    /// inflight area, if any, still records them for the next backend instance). A
    /// packed ring counts recovered chains only once they are popped.
    pub fn in_flight(&self) -> u16 {
        self.queue
            .in_flight()
            .saturating_sub(self.unreachable_in_flight())
    }

    /// Requests left in flight by a previous backend instance that [`Self::pop_into`]
    /// has not handed to the handler yet.
    pub fn recovered_pending(&self) -> usize {
        self.recovered.len()
    }

    /// The in-flight chains a stop can wait for (see [`Self::in_flight`]).
    pub(crate) fn awaited_in_flight(&self) -> u16 {
        self.in_flight()
    }

    /// Restored in-flight chains no handler holds (see [`Self::in_flight`]).
    pub(crate) fn unreachable_in_flight(&self) -> u16 {
        self.queue
            .restored_in_flight()
            .saturating_sub(self.resubmitted)
    }

    /// True if the driver has made buffers available that were not popped yet.
    pub fn has_available(&mut self) -> crate::Result<bool> {
        self.queue.has_available()
    }

    /// Pops the next available chain into `chain` (reusing its buffers) and, with
    /// inflight tracking, records it before returning. `Ok(false)`: the ring is empty.
    /// An error breaks the queue.
    ///
    /// After a backend restart, the requests the previous instance left in flight
    /// (inflight area) come first, in the order it fetched them (vhost-user.rst,
    /// "Inflight I/O tracking": split by `counter`, packed likewise): each is rebuilt
    /// and validated like a new chain, so a handler resubmits them without knowing.
    #[inline]
    pub fn pop_into(&mut self, chain: &mut DescriptorChain) -> crate::Result<bool> {
        if !self.recovered.is_empty() {
            return self.pop_recovered_into(chain);
        }
        let head_slot = self.queue.next_avail();
        if !self.queue.pop_into(chain)? {
            return Ok(false);
        }
        self.popped = self.popped.wrapping_add(1);
        match &mut self.tracker {
            None => {}
            Some(Tracker::Split(t)) => t.on_pop(chain.id()),
            Some(Tracker::Packed(t)) => {
                let ring = self.desc_ring;
                let size = self.queue.size();
                if ring.is_null() {
                    t.disable("the descriptor ring is not mapped");
                } else {
                    t.on_pop(chain.ring_slots(), chain.id(), |k| {
                        read_packed_descriptor(ring, size, head_slot, k)
                    });
                }
            }
        }
        Ok(true)
    }

    /// Pops the next available chain into a new [`DescriptorChain`] (allocates; prefer
    /// [`Self::pop_into`] on the hot path).
    pub fn pop(&mut self) -> crate::Result<Option<DescriptorChain>> {
        let mut chain = DescriptorChain::new();
        Ok(self.pop_into(&mut chain)?.then_some(chain))
    }

    /// Returns a chain to the driver with `len` bytes written. The worker signals the
    /// driver (if its notification suppression asks for it) after the handler returns.
    #[inline]
    pub fn add_used(&mut self, id: u16, len: u32) -> crate::Result<()> {
        self.add_used_batch(&[(id, len)])
    }

    /// Returns several chains with one publish (see [`Queue::add_used_batch`]).
    pub fn add_used_batch(&mut self, used: &[(u16, u32)]) -> crate::Result<()> {
        match &mut self.tracker {
            None => self.queue.add_used_batch(used)?,
            Some(Tracker::Split(t)) => {
                // The ring's own checks, first, so the area only records accepted batches.
                let size = self.queue.size();
                let in_flight = usize::from(self.queue.in_flight());
                for (i, &(id, _)) in used.iter().enumerate() {
                    if id >= size || in_flight < used.len() - i {
                        return Err(crate::Error::NotInFlight(id));
                    }
                }
                t.before_used(used);
                self.queue.add_used_batch(used)?;
                t.after_used(used, self.queue.next_used());
            }
            Some(Tracker::Packed(t)) => {
                if !t.check_used(used) {
                    let id = used.first().map_or(0, |u| u.0);
                    return Err(crate::Error::NotInFlight(id));
                }
                t.before_used(
                    used,
                    (self.queue.next_used(), self.queue.used_wrap_counter()),
                );
                self.queue.add_used_batch(used)?;
                t.after_used(used);
            }
        }
        if !used.is_empty() {
            self.used_pending = true;
        }
        Ok(())
    }

    /// Chains popped since the last call (the worker's poll decision).
    pub(crate) fn take_popped(&mut self) -> u32 {
        std::mem::take(&mut self.popped)
    }

    /// True if chains were returned since the last [`Self::signal_used`].
    pub(crate) fn has_unsignalled_used(&self) -> bool {
        self.used_pending
    }

    /// Signals the driver now, if chains were returned since the last signal and its
    /// notification suppression asks for it. The worker does this after every handler
    /// call; handlers may call it earlier to cut latency in a long batch.
    pub fn signal_used(&mut self) {
        if !std::mem::take(&mut self.used_pending) {
            return;
        }
        if self.queue.needs_notification() {
            self.notify_driver();
        }
    }

    /// Signals the call fd unconditionally. Never blocks (see `notify_fd`).
    pub(crate) fn notify_driver(&mut self) {
        if let Some(call) = &self.call {
            if let Err(e) = call.signal() {
                if !std::mem::replace(&mut self.signal_failed, true) {
                    log::warn!("queue {}: signalling the call fd failed: {e}", self.index);
                }
            }
        }
    }

    /// Signals the error fd (SET_VRING_ERR), if the frontend gave one. Never blocks.
    pub(crate) fn notify_error(&mut self) {
        if let Some(err) = &self.err {
            if let Err(e) = err.signal() {
                if !std::mem::replace(&mut self.signal_failed, true) {
                    log::warn!("queue {}: signalling the error fd failed: {e}", self.index);
                }
            }
        }
    }

    /// Marks the queue broken (e.g. the device found a chain it cannot accept).
    pub fn set_broken(&mut self) {
        self.queue.set_broken();
    }

    /// Hands out the earliest recovered request (see [`Self::pop_into`]). It is already
    /// recorded in the inflight area, with its original fetch counter.
    #[cold]
    fn pop_recovered_into(&mut self, chain: &mut DescriptorChain) -> crate::Result<bool> {
        let Some(req) = self.recovered.pop() else {
            return Ok(false);
        };
        let recovered = match self.queue.layout() {
            RingLayout::Split => RecoveredChain::Split { head: req.id },
            RingLayout::Packed => RecoveredChain::Packed {
                descriptors: &req.descriptors,
            },
        };
        if let Err(e) = self.queue.pop_recovered_into(chain, recovered) {
            log::error!(
                "queue {}: request {} left in flight by the previous backend instance is invalid: {e}",
                self.index,
                req.id
            );
            return Err(e);
        }
        log::debug!(
            "queue {}: resubmitting request {} (fetch counter {})",
            self.index,
            req.id,
            req.counter
        );
        if self.recovered.is_empty() {
            log::info!(
                "queue {}: every request left in flight by the previous backend instance was resubmitted",
                self.index
            );
        }
        if self.queue.layout() == RingLayout::Split {
            self.resubmitted = self.resubmitted.saturating_add(1);
        }
        Ok(true)
    }
}

/// Reads descriptor `k` of a packed chain whose head is at `head_slot`.
fn read_packed_descriptor(ring: *const u8, size: u16, head_slot: u16, k: u16) -> PackedDescriptor {
    let slot = (u32::from(head_slot) + u32::from(k)) % u32::from(size.max(1));
    let off = slot as usize * 16;
    // SAFETY: `ring` is the host address of the packed descriptor ring, `16 * size` bytes
    // inside one mapped region of the vring's memory view (translated when the view was
    // set), 16-aligned (the queue checked the ring alignment); `off + 16 <= 16 * size`.
    // The fields are read with volatile loads because the driver owns the memory.
    unsafe {
        let p = ring.add(off);
        PackedDescriptor {
            addr: u64::from_le(p.cast::<u64>().read_volatile()),
            len: u32::from_le(p.add(8).cast::<u32>().read_volatile()),
            id: u16::from_le(p.add(12).cast::<u16>().read_volatile()),
            flags: u16::from_le(p.add(14).cast::<u16>().read_volatile()),
        }
    }
}

/// Reads the flags of packed ring slot `slot` (for the inflight reconnect procedure).
pub(crate) fn packed_slot_flags(queue: &Queue, slot: u16) -> u16 {
    let cfg = queue.config();
    let Some(ring) = queue
        .memory()
        .translate(cfg.desc_table, 16 * u64::from(cfg.size), &mut 0)
    else {
        return 0;
    };
    if slot >= cfg.size {
        return 0;
    }
    read_packed_descriptor(ring, cfg.size, slot, 0).flags
}
