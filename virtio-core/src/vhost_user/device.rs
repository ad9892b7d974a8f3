//! What a daemon implements: a [`Device`] (features, queues, config space, reset) that
//! creates one [`QueueHandler`] per started queue, which processes its [`Vring`].

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use super::error::DeviceError;
use super::inflight::{InflightRequest, Tracker};
use super::notify_fd::NotifyFd;
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

/// How far [`QueueHandler::process`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Processed {
    /// The ring is empty: [`Vring::pop_into`] returned `false`. The worker re-enables
    /// notifications (re-checking the ring) and sleeps until the next kick.
    Empty,
    /// The handler stopped with buffers possibly left in the ring because it is out of
    /// resources (e.g. its submission queue is full, or a net RX queue has no packet to
    /// deliver). The worker leaves notifications off and calls `process` again after the
    /// handler's next event (or the next kick).
    Throttled,
}

/// The per-queue half of a device: created by [`Device::start_queue`] when a ring starts,
/// owned by that queue's worker thread, dropped when the ring stops. It owns its own
/// resources (an io_uring, a tap queue, buffers), so queues share no lock on the hot path.
pub trait QueueHandler: Send + 'static {
    /// File descriptors of the handler's own event sources (an io_uring completion eventfd,
    /// a tap fd, ...). Called once when the queue starts; the worker adds each to its epoll
    /// set (level-triggered, readable) and calls [`Self::handle_event`] with its position
    /// in this list when it becomes readable. The handler keeps them open while it lives,
    /// and `handle_event` must consume the readiness (e.g. read the eventfd), or the
    /// worker is woken again at once.
    fn event_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }

    /// New buffers may be available (kick, busy poll, or the ring was just enabled): pop
    /// chains with [`Vring::pop_into`] and process or submit them. Return
    /// [`Processed::Empty`] once `pop_into` returned `false`.
    ///
    /// An error breaks the queue: the worker logs it, stops processing this queue, signals
    /// its error eventfd and reports DEVICE_NEEDS_RESET through GET_STATUS. Other queues
    /// keep running.
    fn process(&mut self, vring: &mut Vring) -> Result<Processed, DeviceError>;

    /// Event source `fd_index` of [`Self::event_fds`] is readable: reap completions and
    /// return their chains with [`Vring::add_used`]. The worker signals the driver
    /// afterwards if needed.
    fn handle_event(&mut self, fd_index: usize, vring: &mut Vring) -> Result<(), DeviceError> {
        let _ = (fd_index, vring);
        Ok(())
    }

    /// The ring is being stopped (GET_VRING_BASE, reset or disconnect): take no new chains
    /// and finish the ones in flight. Requests already submitted may complete later: the
    /// worker keeps delivering [`Self::handle_event`] until every chain this backend
    /// popped (or resubmitted) is returned (or the server's drain timeout passes), then
    /// reports the ring base and drops the handler. Chains a restored ring base counts in
    /// flight but nobody popped are not waited for. Chains held without pending I/O (e.g. RX buffers waiting for data) must
    /// be returned here, with a used length of 0.
    fn drain(&mut self, vring: &mut Vring) -> Result<(), DeviceError> {
        let _ = vring;
        Ok(())
    }

    /// The frontend changed the memory table. The vring already uses `memory` for new
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

    /// Creates the handler of a queue that is starting. Called on the connection thread;
    /// the handler then moves to the queue's worker thread.
    fn start_queue(&self, ctx: &QueueContext) -> Result<Self::Handler, DeviceError>;

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
    pub(crate) fn new(index: u16, queue: Queue, enabled: bool) -> Self {
        Vring {
            index,
            queue,
            call: None,
            err: None,
            signal_failed: false,
            enabled,
            used_pending: false,
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
