// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Switch mode: every vhost-user connection is a port of one in-process learning
//! [`Switch`]; there is no TAP.
//!
//! # Forwarding path
//!
//! Each port has a bounded multi-producer, single-consumer [`FrameQueue`] of preallocated
//! slots (one contiguous arena, a slot per frame of up to the switch's MTU plus link-layer
//! headers: [`max_frame_len`]) and an eventfd. The worker thread of port A pops a batch of
//! transmit chains (prefetching their headers as it pops), reads their Ethernet headers,
//! takes the forwarding-table mutex **once per batch** to decide every frame's destination
//! ([`Switch::forward`]; a frame with the addresses of the one before it reuses its
//! verdict), releases it, then copies each frame straight from guest memory into the
//! destination port's queue (flooded frames into the queue of every other connected
//! port). Port B's handler drains its queue into receive chains (MRG_RXBUF aware, with a
//! fresh vnet header of its own length) and publishes their used elements once per batch.
//! The queues take no lock (per-slot sequence numbers, Vyukov's bounded queue); the table
//! mutex is shared by all ports but held only for the table lookups of one batch, never
//! while copying.
//!
//! Wake-ups are suppressed as virtio's notifications are: a consumer says it is going to
//! sleep (and re-checks its queue) before its worker waits, and a producer writes the
//! consumer's eventfd only then, once per batch; a busy port costs its senders no system
//! call.
//!
//! # Threads
//!
//! A port's queues are one group, served by a queue worker. By default (the daemon's
//! `--switch-threads 1`) the workers of all ports run on one shared
//! [`virtio_core::vhost_user::WorkerThread`]: a frame is copied out of the sender's
//! transmit chain and into the receiver's chain on the same core, with the slot still in
//! its cache, and a wake-up is an eventfd the same thread polls next. With a thread per
//! port, every frame and every slot sequence number crosses cores. Nothing else changes:
//! the queues, the backpressure and the drops below work the same either way.
//!
//! # Backpressure and drops
//!
//! A unicast frame that finds its destination queue full while the destination is
//! draining it **waits**: the sender keeps that frame and the rest of its batch (its
//! transmit ring fills, as with a TAP that will not take more), registers with the
//! destination queue, and goes on when the destination's worker frees slots and wakes it
//! through its eventfd. Other work of the sender's worker (its own receive queue) goes on
//! meanwhile, so two ports sending to each other never wait for each other.
//!
//! A switch must not let one port stop the others, so there is no waiting for a
//! destination that is **stalled** (its guest posts no receive buffers, or its receive
//! queue is disabled) or disconnected, nor for flooded frames: those frames are dropped
//! and counted on the destination port (`drop_full`). Frames waiting in a stalled port's
//! queue stay there and are delivered, oldest first, when buffers come. Malformed frames
//! (bad vnet header, longer than the MTU allows, group source address, unknown port) are
//! dropped and counted on the ingress port (`drop_bad`).
//!
//! # Offloads
//!
//! No checksum or segmentation offloads are offered, so vnet headers carry nothing but
//! `num_buffers`: the transmit header is checked and stripped, the receiver writes its own.
//!
//! # Ports
//!
//! A port joins the switch when its frontend starts the queues and leaves it (its
//! addresses forgotten, its queued frames discarded) when the frontend disconnects or
//! resets the device.

use std::cell::UnsafeCell;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use log::{info, warn};
use virtio_core::vhost_user::{
    Device, DeviceError, Events, GroupContext, GroupInfo, Interest, Processed, ProtocolFeatures,
    QueueContext, QueueHandler, WorkerThread,
};
use virtio_core::{merged_chains_needed, write_merged, DescriptorChain};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{validate_mtu, MacAddr, VirtioNetConfig};
use crate::features::{self, CtrlVqPolicy, Negotiated, OfferOptions, VNET_HDR_LEN};
use crate::hdr::{set_num_buffers, VnetHeader};
use crate::switch::{Forward, PortId, Switch, SwitchConfig, SwitchError};
use crate::tap::TapOffloads;

/// Slots of each port's frame queue.
pub const QUEUE_SLOTS: usize = 256;

/// Bytes of link-layer header a frame may carry on top of its MTU: the Ethernet header
/// and two VLAN tags (802.1ad).
const L2_OVERHEAD: usize = ETH_HLEN + 8;

/// The longest frame a switch of MTU `mtu` forwards (the length of a queue slot): the MTU
/// plus 22 bytes (the Ethernet header and two VLAN tags), rounded up to a cache line.
pub fn max_frame_len(mtu: u16) -> usize {
    (usize::from(mtu) + L2_OVERHEAD).next_multiple_of(64)
}

/// Transmit chains forwarded per table lookup (one mutex acquisition).
const TX_BATCH: usize = 64;

/// Most receive chains one frame may span with MRG_RXBUF.
const MAX_MERGED_CHAINS: usize = 256;

/// Bytes of a transmitted chain prefetched when it is popped: the vnet and Ethernet
/// headers and a small frame.
const PREFETCH_LEN: usize = 128;

/// Frames delivered in one batch: their receive chains are popped first, then the frames
/// are copied, then their used elements are published together.
const RX_BATCH: usize = 64;

/// Length of an Ethernet header.
const ETH_HLEN: usize = 14;

/// The token of the port's eventfd.
const QUEUE_TOKEN: u32 = 1;

/// Log the first failure of a kind, then one in this many.
const LOG_EVERY: u64 = 1024;

/// Why switch mode could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SwitchModeError {
    /// The forwarding table refused its configuration.
    #[error("switch: {0}")]
    Switch(#[from] SwitchError),
    /// Fewer than two ports, or more than the switch takes.
    #[error("switch mode needs 2 to {max} ports, {got} were asked for")]
    PortCount {
        /// Ports asked for.
        got: usize,
        /// Most ports.
        max: usize,
    },
    /// The configuration space refused a value.
    #[error("invalid device configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// An eventfd could not be created.
    #[error("creating a port eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// A slot's sequence number and length, alone on a cache line: producers publishing the
/// next slots do not take the line the consumer is reading from it (false sharing was a
/// tenth of the receive side's time at 64-byte frames).
#[repr(align(64))]
struct Slot {
    seq: AtomicUsize,
    len: UnsafeCell<usize>,
}

/// A value alone on its cache line pair (the adjacent-line prefetcher pulls pairs).
#[repr(align(128))]
#[derive(Debug, Default)]
struct CachePadded<T>(T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// What [`FrameQueue::push_with`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Push {
    /// The frame is queued.
    Queued,
    /// The fill function refused the frame (the slot was given back empty).
    Refused,
    /// The queue is full: nothing was queued.
    Full,
}

/// A bounded multi-producer, single-consumer queue of frames in preallocated slots
/// (D. Vyukov's bounded queue: a sequence number per slot, no lock). Producers copy a
/// frame into a free slot ([`Self::push_with`]); the one [`Consumer`] reads it in place.
///
/// The slots are one contiguous arena of `capacity × slot_len` bytes, sized for the
/// largest frame the switch forwards (its MTU), so that the slots in use stay in the
/// caches and a few TLB entries: at 64-byte frames the copy into a cold 64 KiB slot
/// (one page and several cache misses per frame) was the largest cost of forwarding.
///
/// The consumer can sleep: [`Consumer::prepare_to_sleep`] tells producers to wake it,
/// and [`Self::take_wake_up`] tells a producer whether it has to (notification
/// suppression in the manner of virtio's, so a busy consumer costs its producers no
/// eventfd write per batch).
pub struct FrameQueue {
    slots: Box<[Slot]>,
    arena: Box<[UnsafeCell<u8>]>,
    slot_len: usize,
    mask: usize,
    /// Written by every producer.
    tail: CachePadded<AtomicUsize>,
    /// Written by the consumer only.
    head: CachePadded<AtomicUsize>,
    consumer_taken: AtomicBool,
    consumer_sleeping: CachePadded<AtomicBool>,
    /// Producers waiting for a free slot: bit `port % 64` of each ([`Self::wait_for_space`]).
    waiters: CachePadded<AtomicU64>,
    /// The consumer cannot deliver (its guest posts no receive buffers): producers drop
    /// instead of waiting.
    stalled: AtomicBool,
}

// SAFETY: a slot's `len` and its bytes of `arena` are written only by the producer that
// claimed the slot (CAS on `tail` while `seq == pos`) before it publishes it
// (`seq = pos + 1`, release), and read only by the single consumer (guaranteed by
// `consumer_taken`) after it observed that publication (acquire) and before it frees the
// slot (`seq = pos + capacity`, release). Slots do not overlap in the arena.
unsafe impl Sync for FrameQueue {}

impl std::fmt::Debug for FrameQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameQueue")
            .field("capacity", &self.slots.len())
            .field("slot_len", &self.slot_len)
            .field("head", &self.head.load(Ordering::Relaxed))
            .field("tail", &self.tail.load(Ordering::Relaxed))
            .finish()
    }
}

impl FrameQueue {
    /// A queue of `capacity` (rounded up to a power of two) slots of `slot_len` bytes,
    /// allocated here, once.
    pub fn new(capacity: usize, slot_len: usize) -> FrameQueue {
        let capacity = capacity.max(2).next_power_of_two();
        let slot_len = slot_len.max(1);
        FrameQueue {
            slots: (0..capacity)
                .map(|i| Slot {
                    seq: AtomicUsize::new(i),
                    len: UnsafeCell::new(0),
                })
                .collect(),
            arena: (0..capacity * slot_len)
                .map(|_| UnsafeCell::new(0))
                .collect(),
            slot_len,
            mask: capacity - 1,
            tail: CachePadded(AtomicUsize::new(0)),
            head: CachePadded(AtomicUsize::new(0)),
            consumer_taken: AtomicBool::new(false),
            consumer_sleeping: CachePadded(AtomicBool::new(false)),
            waiters: CachePadded(AtomicU64::new(0)),
            stalled: AtomicBool::new(false),
        }
    }

    /// Bytes of one slot: the longest frame the queue holds.
    pub fn slot_len(&self) -> usize {
        self.slot_len
    }

    /// Claims a free slot and lets `fill` write a frame into it; `fill` returns the bytes
    /// written, or `None` to give the slot back empty (the frame is dropped).
    pub fn push_with(&self, fill: impl FnOnce(&mut [u8]) -> Option<usize>) -> Push {
        let mut pos = self.tail.load(Ordering::Relaxed);
        let slot = loop {
            let slot = self.slot(pos);
            let seq = slot.seq.load(Ordering::Acquire);
            // Wrapping distance between the slot's sequence and our position.
            #[allow(clippy::cast_possible_wrap)]
            let diff = seq.wrapping_sub(pos) as isize;
            if diff == 0 {
                match self.tail.compare_exchange_weak(
                    pos,
                    pos.wrapping_add(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => break slot,
                    Err(now) => pos = now,
                }
            } else if diff < 0 {
                return Push::Full;
            } else {
                pos = self.tail.load(Ordering::Relaxed);
            }
        };
        // SAFETY: this producer claimed the slot (see the `Sync` impl): nobody else
        // touches its bytes or `len` until it is published below. The range lies in the
        // arena: the index is masked below `capacity` and the arena holds `capacity`
        // slots of `slot_len` bytes; `UnsafeCell<u8>` has the layout of `u8`.
        let (data, len) = unsafe {
            let base = self.arena.as_ptr().cast::<u8>().cast_mut();
            (
                std::slice::from_raw_parts_mut(
                    base.add((pos & self.mask) * self.slot_len),
                    self.slot_len,
                ),
                &mut *slot.len.get(),
            )
        };
        let filled = fill(data).map(|n| n.min(self.slot_len));
        // An empty slot (len 0) is skipped by the consumer.
        *len = filled.unwrap_or(0);
        slot.seq.store(pos.wrapping_add(1), Ordering::Release);
        if filled.is_some() {
            Push::Queued
        } else {
            Push::Refused
        }
    }

    /// Whether a producer that queued frames has to wake the consumer (it said it would
    /// sleep); only one producer is told so per sleep.
    pub fn take_wake_up(&self) -> bool {
        // Pairs with the fence in `Consumer::prepare_to_sleep`: either the consumer sees
        // the frames queued before this point, or this load sees it sleeping.
        std::sync::atomic::fence(Ordering::SeqCst);
        self.consumer_sleeping.load(Ordering::Relaxed)
            && self.consumer_sleeping.swap(false, Ordering::AcqRel)
    }

    /// Registers producer `port` as waiting for a free slot, after a push found the queue
    /// full. The caller then tries the push again: either that push finds the slot the
    /// consumer freed meanwhile, or the consumer sees the registration and wakes `port`
    /// ([`Consumer::take_waiters`]). Returns false if the consumer is stalled: do not wait,
    /// drop.
    pub fn wait_for_space(&self, port: usize) -> bool {
        self.waiters.fetch_or(1 << (port % 64), Ordering::SeqCst);
        !self.stalled.load(Ordering::SeqCst)
    }

    /// Whether the consumer said it cannot deliver ([`Consumer::set_stalled`]).
    pub fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::SeqCst)
    }

    /// The single consumer, unless it is taken already.
    pub fn consumer(self: &Arc<Self>) -> Option<Consumer> {
        let taken = self
            .consumer_taken
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok();
        // A new consumer has not looked at the queue yet: the first frame wakes it.
        taken.then(|| {
            self.consumer_sleeping.store(true, Ordering::Release);
            self.stalled.store(false, Ordering::SeqCst);
            Consumer {
                queue: Arc::clone(self),
                head_ready: false,
            }
        })
    }

    fn slot(&self, pos: usize) -> &Slot {
        // The index is masked: always in bounds (the slot count is mask + 1).
        &self.slots[pos & self.mask]
    }

    fn slot_data(&self, pos: usize, len: usize) -> &[u8] {
        // SAFETY: the caller is the consumer and the slot at `pos` is published (see the
        // `Sync` impl): no producer writes it until the consumer frees it. The range lies
        // in the arena (masked index, `len <= slot_len`).
        unsafe {
            let base = self.arena.as_ptr().cast::<u8>();
            std::slice::from_raw_parts(
                base.add((pos & self.mask) * self.slot_len),
                len.min(self.slot_len),
            )
        }
    }
}

/// The consumer side of a [`FrameQueue`] (one at a time; released on drop).
#[derive(Debug)]
pub struct Consumer {
    queue: Arc<FrameQueue>,
    /// [`Self::front`] saw the head slot published: [`Self::pop`] need not look again.
    head_ready: bool,
}

impl Consumer {
    /// The oldest queued frame, left in the queue (empty slots are skipped).
    pub fn front(&mut self) -> Option<&[u8]> {
        loop {
            let (pos, len) = {
                let q = &*self.queue;
                let pos = q.head.load(Ordering::Relaxed);
                let slot = q.slot(pos);
                if slot.seq.load(Ordering::Acquire) != pos.wrapping_add(1) {
                    return None;
                }
                // SAFETY: the slot was published (acquire above) and only this consumer
                // reads it until `pop` frees it.
                (pos, unsafe { *slot.len.get() })
            };
            self.head_ready = true;
            if len == 0 {
                self.pop();
                continue;
            }
            // The borrow ends before `pop` frees the slot (it takes `&mut self`).
            return Some(self.queue.slot_data(pos, len));
        }
    }

    /// The `i`-th queued frame counting from the oldest (0 is [`Self::front`]'s), left in
    /// the queue; an empty slot (a frame its producer refused) reads as an empty frame.
    /// `None` if fewer than `i + 1` frames are published. Frames stay valid, and several
    /// may be borrowed at once, until [`Self::pop_n`] frees them: a batch is planned over
    /// all of its frames before any is copied out.
    pub fn peek(&self, i: usize) -> Option<&[u8]> {
        let q = &*self.queue;
        if i > q.mask {
            return None;
        }
        let pos = q.head.load(Ordering::Relaxed).wrapping_add(i);
        let slot = q.slot(pos);
        if slot.seq.load(Ordering::Acquire) != pos.wrapping_add(1) {
            return None;
        }
        // SAFETY: the slot was published (acquire above) and only this consumer reads it
        // until `pop_n` frees it.
        let len = unsafe { *slot.len.get() };
        Some(q.slot_data(pos, len))
    }

    /// Frees the `n` oldest slots (after [`Self::peek`] returned them); stops early at a
    /// slot that is not published.
    pub fn pop_n(&mut self, n: usize) {
        let q = &*self.queue;
        let mut pos = q.head.load(Ordering::Relaxed);
        for _ in 0..n {
            let slot = q.slot(pos);
            if slot.seq.load(Ordering::Acquire) != pos.wrapping_add(1) {
                break;
            }
            slot.seq
                .store(pos.wrapping_add(q.mask + 1), Ordering::Release);
            pos = pos.wrapping_add(1);
        }
        self.head_ready = false;
        q.head.store(pos, Ordering::Relaxed);
    }

    /// Frees the oldest slot (after [`Self::front`] returned a frame).
    pub fn pop(&mut self) {
        let q = &*self.queue;
        let pos = q.head.load(Ordering::Relaxed);
        let slot = q.slot(pos);
        if !std::mem::take(&mut self.head_ready)
            && slot.seq.load(Ordering::Acquire) != pos.wrapping_add(1)
        {
            return;
        }
        q.head.store(pos.wrapping_add(1), Ordering::Relaxed);
        slot.seq
            .store(pos.wrapping_add(q.mask + 1), Ordering::Release);
    }

    /// The producers waiting for space (bit `port % 64`; several ports may share a bit, and
    /// all of them are to be woken), cleared. Call after freeing slots.
    pub fn take_waiters(&mut self) -> u64 {
        // Pairs with the read-modify-write in `FrameQueue::wait_for_space`: the slots freed
        // before this point are seen by the producer's retry, or its bit is seen here.
        std::sync::atomic::fence(Ordering::SeqCst);
        let q = &*self.queue;
        if q.waiters.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        q.waiters.swap(0, Ordering::SeqCst)
    }

    /// Says whether the consumer can deliver: a stalled consumer (no receive buffers) makes
    /// producers drop instead of wait. Setting it returns the waiters to wake, as
    /// [`Self::take_waiters`].
    pub fn set_stalled(&mut self, stalled: bool) -> u64 {
        self.queue.stalled.store(stalled, Ordering::SeqCst);
        if stalled {
            self.take_waiters()
        } else {
            0
        }
    }

    /// Says the consumer is about to sleep until a producer wakes it, then re-checks:
    /// returns false, and the consumer must not sleep, if a frame came in meanwhile.
    pub fn prepare_to_sleep(&mut self) -> bool {
        self.queue.consumer_sleeping.store(true, Ordering::Relaxed);
        // Pairs with the fence in `FrameQueue::take_wake_up`.
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.front().is_some() {
            self.queue.consumer_sleeping.store(false, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Discards every queued frame; returns how many.
    pub fn clear(&mut self) -> u64 {
        let mut n = 0;
        while self.front().is_some() {
            self.pop();
            n += 1;
        }
        n
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.queue.consumer_taken.store(false, Ordering::Release);
    }
}

/// Counters of one port (they survive reconnections).
#[derive(Debug, Default)]
pub struct PortCounters {
    /// Frames the port's guest transmitted and the switch forwarded (or flooded).
    pub tx_frames: AtomicU64,
    /// Frames delivered into the port's receive queue.
    pub rx_frames: AtomicU64,
    /// Frames for this port dropped because its queue was full.
    pub drop_full: AtomicU64,
    /// Frames from this port dropped as malformed or undeliverable (bad header, too big,
    /// group source address, destination on the same port).
    pub drop_bad: AtomicU64,
    /// Frames for this port that did not fit its receive buffers.
    pub drop_too_big: AtomicU64,
    /// Frames for this port discarded when its frontend went away.
    pub drop_disconnect: AtomicU64,
}

impl PortCounters {
    /// The counters as text, for the log.
    pub fn summary(&self) -> String {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "tx {} rx {} drop_full {} drop_bad {} drop_too_big {} drop_disconnect {}",
            l(&self.tx_frames),
            l(&self.rx_frames),
            l(&self.drop_full),
            l(&self.drop_bad),
            l(&self.drop_too_big),
            l(&self.drop_disconnect)
        )
    }
}

#[inline]
fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// One switch port: its frame queue, its eventfd, its counters.
#[derive(Debug)]
struct Port {
    queue: Arc<FrameQueue>,
    event: EventFd,
    connected: AtomicBool,
    counters: PortCounters,
}

/// What the ports share: the forwarding table and every port.
#[derive(Debug)]
pub struct SwitchHub {
    table: Mutex<Switch>,
    ports: Vec<Port>,
    mtu: u16,
    max_frame: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SwitchHub {
    /// A switch of `ports` ports (2 or more) forwarding frames of MTU `mtu` (longer ones
    /// are dropped: [`max_frame_len`]), each port with a queue of [`QUEUE_SLOTS`] slots.
    pub fn new(
        ports: usize,
        config: SwitchConfig,
        mtu: u16,
    ) -> Result<Arc<SwitchHub>, SwitchModeError> {
        Self::with_queue_slots(ports, config, mtu, QUEUE_SLOTS)
    }

    /// The same with `slots` slots per port queue.
    pub fn with_queue_slots(
        ports: usize,
        config: SwitchConfig,
        mtu: u16,
        slots: usize,
    ) -> Result<Arc<SwitchHub>, SwitchModeError> {
        if ports < 2 || ports > config.max_ports {
            return Err(SwitchModeError::PortCount {
                got: ports,
                max: config.max_ports,
            });
        }
        let table = Switch::new(config)?;
        validate_mtu(u32::from(mtu))?;
        let ports = (0..ports)
            .map(|_| {
                Ok(Port {
                    queue: Arc::new(FrameQueue::new(slots, max_frame_len(mtu))),
                    event: EventFd::new(EFD_NONBLOCK).map_err(SwitchModeError::EventFd)?,
                    connected: AtomicBool::new(false),
                    counters: PortCounters::default(),
                })
            })
            .collect::<Result<Vec<_>, SwitchModeError>>()?;
        Ok(Arc::new(SwitchHub {
            table: Mutex::new(table),
            ports,
            mtu,
            max_frame: max_frame_len(mtu),
        }))
    }

    /// The MTU (offered to every port's guest).
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// The longest frame forwarded.
    pub fn max_frame_len(&self) -> usize {
        self.max_frame
    }

    /// Number of ports.
    pub fn port_count(&self) -> usize {
        self.ports.len()
    }

    /// The counters of port `port`.
    pub fn counters(&self, port: usize) -> Option<&PortCounters> {
        self.ports.get(port).map(|p| &p.counters)
    }

    /// Whether port `port` has a frontend.
    pub fn is_connected(&self, port: usize) -> bool {
        self.ports
            .get(port)
            .is_some_and(|p| p.connected.load(Ordering::Acquire))
    }

    /// Addresses in the forwarding table.
    pub fn table_len(&self) -> usize {
        lock(&self.table).len()
    }

    /// Wakes the producers of `waiters` ([`Consumer::take_waiters`]) through their
    /// ports' eventfds.
    fn wake_waiters(&self, waiters: u64) {
        if waiters == 0 {
            return;
        }
        for (p, port) in self.ports.iter().enumerate() {
            if waiters & (1 << (p % 64)) != 0 {
                if let Err(e) = port.event.write(1) {
                    warn!("switch port {p}: waking it failed: {e}");
                }
            }
        }
    }

    fn connect(&self, port: usize) {
        let Ok(id) = u32::try_from(port) else { return };
        match lock(&self.table).add_port(PortId(id)) {
            Ok(()) | Err(SwitchError::DuplicatePort(_)) => {}
            Err(e) => warn!("switch port {port}: {e}"),
        }
        if let Some(p) = self.ports.get(port) {
            p.connected.store(true, Ordering::Release);
        }
        info!("switch port {port}: connected");
    }

    fn disconnect(&self, port: usize) {
        let Some(p) = self.ports.get(port) else {
            return;
        };
        if let Ok(id) = u32::try_from(port) {
            lock(&self.table).remove_port(PortId(id));
        }
        p.connected.store(false, Ordering::Release);
        if let Some(mut c) = p.queue.consumer() {
            let n = c.clear();
            p.counters.drop_disconnect.fetch_add(n, Ordering::Relaxed);
            // Senders waiting for this queue now drop (it is not connected).
            let waiters = c.take_waiters();
            self.wake_waiters(waiters);
        }
        info!(
            "switch port {port}: disconnected (addresses forgotten); {}",
            p.counters.summary()
        );
    }
}

/// The vhost-user device of one switch port (one per socket).
#[derive(Debug)]
pub struct SwitchPortDevice {
    hub: Arc<SwitchHub>,
    port: usize,
    offered: u64,
    features: AtomicU64,
    config: Mutex<VirtioNetConfig>,
    max_queue_size: u16,
    rx_poll: Duration,
    worker_thread: Option<Arc<WorkerThread>>,
}

impl SwitchPortDevice {
    /// Port `port` of `hub`, with MAC `mac` in its config space. The port always offers
    /// VIRTIO_NET_F_MTU with the switch's MTU: a switch forwards frames up to its MTU
    /// ([`max_frame_len`]), so the guest must know it (§5.1.4.1: the driver then sends no
    /// longer frame).
    pub fn new(
        hub: Arc<SwitchHub>,
        port: usize,
        mac: MacAddr,
        max_queue_size: u16,
    ) -> Result<SwitchPortDevice, SwitchModeError> {
        if port >= hub.port_count() {
            return Err(SwitchModeError::PortCount {
                got: port + 1,
                max: hub.port_count(),
            });
        }
        let offered = features::offered_features(&OfferOptions {
            max_queue_pairs: 1,
            mtu: true,
            ctrl_vq: false,
            offloads: TapOffloads::default(),
        });
        let config = VirtioNetConfig::new(mac, 1, hub.mtu)?;
        Ok(SwitchPortDevice {
            hub,
            port,
            offered,
            features: AtomicU64::new(0),
            config: Mutex::new(config),
            max_queue_size: max_queue_size.clamp(1, virtio_core::MAX_QUEUE_SIZE),
            rx_poll: Duration::ZERO,
            worker_thread: None,
        })
    }

    /// Runs the port's queues on `thread`, shared with other ports, instead of a thread
    /// of the port's own. Ports on one thread forward to each other on one core: the
    /// frame copied out of the sender's transmit chain is still in that core's cache when
    /// it is copied into the receiver's chain, and waking the receiver costs no
    /// cross-core hand-off (see the module documentation).
    pub fn with_worker_thread(mut self, thread: Arc<WorkerThread>) -> SwitchPortDevice {
        self.worker_thread = Some(thread);
        self
    }

    /// Busy-polls the port's frame queue for `window` after it ran empty before the
    /// worker sleeps on its eventfd (the receive-side counterpart of the server's
    /// `poll_us`, which polls the rings; `--poll-us` sets both). The worker keeps serving
    /// its other queues and events while it polls.
    pub fn with_rx_poll(mut self, window: Duration) -> SwitchPortDevice {
        self.rx_poll = window;
        self
    }

    /// The switch the port belongs to.
    pub fn hub(&self) -> &Arc<SwitchHub> {
        &self.hub
    }
}

impl Device for SwitchPortDevice {
    type Handler = SwitchQueues;

    fn features(&self) -> u64 {
        self.offered
    }

    fn protocol_features(&self) -> ProtocolFeatures {
        ProtocolFeatures::CONFIG
    }

    fn num_queues(&self) -> u16 {
        2
    }

    fn max_queue_size(&self) -> u16 {
        self.max_queue_size
    }

    fn set_features(&self, acked: u64) -> Result<(), DeviceError> {
        let neg = features::validate(acked, self.offered, CtrlVqPolicy::Mask).map_err(|e| {
            warn!(
                "switch port {}: SET_FEATURES {acked:#x} refused: {e}",
                self.port
            );
            DeviceError::Other(e.to_string())
        })?;
        self.features.store(neg.bits(), Ordering::Release);
        info!(
            "switch port {}: features {:#x} negotiated, vnet header {} bytes",
            self.port,
            neg.bits(),
            neg.vnet_hdr_len()
        );
        Ok(())
    }

    fn read_config(&self, offset: u32, buf: &mut [u8]) -> Result<(), DeviceError> {
        lock(&self.config)
            .read(offset, buf)
            .map_err(|_| DeviceError::ConfigOutOfRange {
                offset,
                len: buf.len(),
                size: crate::config::CONFIG_SIZE,
            })
    }

    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        Err(DeviceError::ConfigReadOnly {
            offset,
            len: data.len(),
        })
    }

    fn queue_group(&self, _queue: u16) -> Option<u16> {
        Some(0)
    }

    fn worker_thread(&self, _group: u16) -> Option<Arc<WorkerThread>> {
        self.worker_thread.clone()
    }

    fn start_group(&self, _group: &GroupInfo) -> Result<SwitchQueues, DeviceError> {
        let neg = Negotiated::from_bits_unchecked(self.features.load(Ordering::Acquire));
        let mut handler = SwitchQueues::new(Arc::clone(&self.hub), self.port, neg)?;
        handler.rx_poll = self.rx_poll;
        self.hub.connect(self.port);
        Ok(handler)
    }

    fn reset(&self) {
        self.features.store(0, Ordering::Release);
        self.hub.disconnect(self.port);
    }
}

/// Where one transmitted frame of a batch goes.
#[derive(Clone, Copy, Debug)]
enum Verdict {
    /// Dropped before the lookup (bad header, too big).
    Bad,
    /// The table's decision.
    Table(Forward),
}

/// The receive side's buffers.
struct RxState {
    chains: Vec<DescriptorChain>,
    held: usize,
    /// Used elements of delivered frames, not yet published.
    used: Vec<(u16, u32)>,
    /// Frames behind `used`.
    delivered: usize,
    lens: Vec<u32>,
}

/// The handler of a switch port's queue pair (receiveq 0, transmitq 1).
pub struct SwitchQueues {
    hub: Arc<SwitchHub>,
    port: usize,
    features: Negotiated,
    hdr_len: usize,
    mrg_rxbuf: bool,
    consumer: Consumer,
    rx: Option<u16>,
    tx: Option<u16>,
    registered: bool,
    rx_state: RxState,
    tx_chains: Vec<DescriptorChain>,
    heads: Vec<[u8; ETH_HLEN]>,
    verdicts: Vec<Verdict>,
    touched: Vec<bool>,
    tx_used: Vec<(u16, u32)>,
    failures: u64,
    rx_poll: Duration,
    rx_idle_since: Option<Instant>,
    /// Transmit chains `tx_next..tx_held` of the batch in `tx_chains` wait for space in a
    /// destination queue (backpressure; their verdicts are in `verdicts`).
    tx_next: usize,
    tx_held: usize,
    /// The receive side told producers it is stalled.
    rx_stalled: bool,
}

impl std::fmt::Debug for SwitchQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwitchQueues")
            .field("port", &self.port)
            .field("rx", &self.rx)
            .field("tx", &self.tx)
            .finish()
    }
}

impl SwitchQueues {
    fn new(hub: Arc<SwitchHub>, port: usize, features: Negotiated) -> Result<Self, DeviceError> {
        let consumer = hub
            .ports
            .get(port)
            .and_then(|p| p.queue.consumer())
            .ok_or_else(|| {
                DeviceError::Other(format!("switch port {port}: its queue is still in use"))
            })?;
        // A batch of RX_BATCH frames, and at least one frame spanning MAX_MERGED_CHAINS.
        let rx_chain_count = RX_BATCH + MAX_MERGED_CHAINS;
        let mut rx_chains = Vec::with_capacity(rx_chain_count);
        rx_chains.resize_with(rx_chain_count, DescriptorChain::new);
        let mut tx_chains = Vec::with_capacity(TX_BATCH);
        tx_chains.resize_with(TX_BATCH, DescriptorChain::new);
        let ports = hub.port_count();
        Ok(SwitchQueues {
            port,
            hdr_len: features.vnet_hdr_len(),
            mrg_rxbuf: features.has(virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF),
            features,
            consumer,
            rx: None,
            tx: None,
            registered: false,
            rx_state: RxState {
                chains: rx_chains,
                held: 0,
                // One element per chain of a batch.
                used: Vec::with_capacity(rx_chain_count),
                delivered: 0,
                lens: vec![0; rx_chain_count],
            },
            tx_chains,
            heads: vec![[0; ETH_HLEN]; TX_BATCH],
            verdicts: vec![Verdict::Bad; TX_BATCH],
            touched: vec![false; ports],
            tx_used: Vec::with_capacity(TX_BATCH),
            failures: 0,
            rx_poll: Duration::ZERO,
            rx_idle_since: None,
            tx_next: 0,
            tx_held: 0,
            rx_stalled: false,
            hub,
        })
    }

    fn port(&self) -> Option<&Port> {
        self.hub.ports.get(self.port)
    }

    fn log_failure(&mut self, what: std::fmt::Arguments<'_>) {
        if self.failures % LOG_EVERY == 0 {
            warn!(
                "switch port {}: {what} ({} such failures so far)",
                self.port,
                self.failures + 1
            );
        }
        self.failures += 1;
    }

    /// Transmit: forwards batches of frames until the ring is empty, or until a frame waits
    /// for space in its destination's queue (then `Throttled`: the destination's worker
    /// wakes this one when it frees slots).
    fn transmit(&mut self, ctx: &mut GroupContext<'_>, tx: u16) -> Result<Processed, DeviceError> {
        loop {
            if self.tx_next == self.tx_held {
                let Some(vring) = ctx.vring(tx) else {
                    return Ok(Processed::Empty);
                };
                let mut n = 0;
                while n < TX_BATCH {
                    let Some(chain) = self.tx_chains.get_mut(n) else {
                        break;
                    };
                    if !vring.pop_into(chain)? {
                        break;
                    }
                    // The driver wrote the frame on another CPU: start loading its headers
                    // now, while the rest of the batch is popped.
                    chain.prefetch_readable(PREFETCH_LEN);
                    n += 1;
                }
                if n == 0 {
                    return Ok(Processed::Empty);
                }
                self.classify_batch(n);
                self.tx_next = 0;
                self.tx_held = n;
            }
            let start = self.tx_next;
            let end = self.send_batch(start, self.tx_held);
            self.tx_next = end;
            self.tx_used.clear();
            for c in self.tx_chains.iter().take(end).skip(start) {
                // §5.1.6.2: the device writes nothing into a transmit buffer.
                self.tx_used.push((c.id(), 0));
            }
            if let Some(vring) = ctx.vring(tx) {
                vring.add_used_batch(&self.tx_used)?;
            }
            self.signal_touched();
            if end < self.tx_held {
                return Ok(Processed::Throttled);
            }
            self.tx_next = 0;
            self.tx_held = 0;
        }
    }

    /// Checks the first `n` held transmit chains and decides where they go (one table
    /// lock); the verdicts are left in `verdicts`.
    fn classify_batch(&mut self, n: usize) {
        let hdr_len = self.hdr_len;
        for i in 0..n {
            let (Some(chain), Some(head), Some(verdict)) = (
                self.tx_chains.get(i),
                self.heads.get_mut(i),
                self.verdicts.get_mut(i),
            ) else {
                break;
            };
            *verdict = Verdict::Bad;
            let total = chain.readable_len() as usize;
            let frame_len = total.saturating_sub(hdr_len);
            if frame_len > self.hub.max_frame || frame_len < ETH_HLEN {
                continue;
            }
            let mut buf = [0u8; VNET_HDR_LEN + ETH_HLEN];
            let want = hdr_len + ETH_HLEN;
            let Some(b) = buf.get_mut(..want) else {
                continue;
            };
            if chain.reader().read(b).unwrap_or(0) < want {
                continue;
            }
            let ok = VnetHeader::read(&buf, hdr_len)
                .and_then(|h| h.check_tx(self.features, frame_len))
                .is_ok();
            if !ok {
                continue;
            }
            if let Some(eth) = buf.get(hdr_len..want) {
                head.copy_from_slice(eth);
                *verdict = Verdict::Table(Forward::Flood);
            }
        }
        let ingress = PortId(u32::try_from(self.port).unwrap_or(u32::MAX));
        {
            // One lock per batch: every lookup and learning of the batch.
            let now = Instant::now();
            let mut table = lock(&self.hub.table);
            // A stream repeats its addresses: a frame with the same Ethernet addresses as
            // the previous one of the batch goes where it went (the table cannot have
            // changed in between but for that frame's own learning), without hashing.
            let mut last: Option<([u8; 12], Forward)> = None;
            for (head, verdict) in self.heads.iter().zip(self.verdicts.iter_mut()).take(n) {
                if let Verdict::Table(_) = verdict {
                    let mut addrs = [0u8; 12];
                    addrs.copy_from_slice(&head[..12]);
                    let fwd = match last {
                        Some((a, f)) if a == addrs => f,
                        _ => table.forward(head, ingress, now),
                    };
                    last = Some((addrs, fwd));
                    *verdict = Verdict::Table(fwd);
                }
            }
        }
    }

    /// Copies transmit chains `start..end` (classified) into their destination queues.
    /// Returns where it stopped: `end`, or the first frame whose destination queue is full
    /// while its consumer is draining (backpressure: that frame and the ones after it wait;
    /// the destination wakes this port when it frees slots). A destination that is stalled
    /// (its guest posts no receive buffers) or flooded frames do not wait: they are dropped
    /// and counted.
    fn send_batch(&mut self, start: usize, end: usize) -> usize {
        let hdr_len = self.hdr_len;
        let mut bad = 0u64;
        let mut forwarded = 0u64;
        let mut stopped = end;
        for i in start..end {
            let (Some(chain), Some(&verdict)) = (self.tx_chains.get(i), self.verdicts.get(i))
            else {
                break;
            };
            match verdict {
                Verdict::Bad | Verdict::Table(Forward::Drop(_)) => bad += 1,
                Verdict::Table(Forward::Unicast(PortId(p))) => {
                    let p = p as usize;
                    if p != self.port
                        && !enqueue_or_wait(
                            &self.hub,
                            self.port,
                            p,
                            chain,
                            hdr_len,
                            &mut self.touched,
                        )
                    {
                        stopped = i;
                        break;
                    }
                    forwarded += 1;
                }
                Verdict::Table(Forward::Flood) => {
                    for p in 0..self.hub.ports.len() {
                        if p != self.port {
                            enqueue(&self.hub, p, chain, hdr_len, &mut self.touched);
                        }
                    }
                    forwarded += 1;
                }
            }
        }
        if let Some(port) = self.port() {
            port.counters
                .tx_frames
                .fetch_add(forwarded, Ordering::Relaxed);
        }
        if bad > 0 {
            if let Some(port) = self.port() {
                port.counters.drop_bad.fetch_add(bad, Ordering::Relaxed);
            }
            self.log_failure(format_args!("{bad} transmitted frame(s) dropped"));
        }
        stopped
    }

    /// Signals every port that got frames in this batch, once, if its worker sleeps.
    fn signal_touched(&mut self) {
        for (p, t) in self.touched.iter_mut().enumerate() {
            if std::mem::take(t) {
                if let Some(port) = self.hub.ports.get(p).filter(|p| p.queue.take_wake_up()) {
                    if let Err(e) = port.event.write(1) {
                        warn!("switch port {p}: signalling its queue failed: {e}");
                    }
                }
            }
        }
    }

    /// Receive: delivers queued frames into receive chains until the queue is empty or
    /// the ring has no buffers.
    fn receive(&mut self, ctx: &mut GroupContext<'_>) -> Result<(), DeviceError> {
        let Some(rx) = self.rx else {
            return Ok(());
        };
        let delivered = self.receive_batches(ctx, rx);
        // Whatever stopped the loop, the frames delivered so far are published.
        let flushed = self.flush_rx(ctx, rx);
        delivered.and(flushed)
    }

    fn receive_batches(&mut self, ctx: &mut GroupContext<'_>, rx: u16) -> Result<(), DeviceError> {
        // The ring's state changes only between handler calls (the worker applies the
        // frontend's commands between rounds): one check per call.
        if !ctx.is_active(rx) {
            // Frames wait in the queue until process(rx) runs on enable; senders drop
            // rather than wait for it.
            self.set_rx_stalled(true);
            return Ok(());
        }
        loop {
            let counters = self.hub.ports.get(self.port).map(|p| &p.counters);
            let batch = deliver_batch(
                ctx,
                rx,
                &mut self.rx_state,
                &mut self.consumer,
                self.hdr_len,
                self.mrg_rxbuf,
                counters,
            )?;
            if batch.frames > 0 {
                // The driver may be waiting for these before it posts more; their slots
                // are free for the senders.
                self.flush_rx(ctx, rx)?;
                self.rx_idle_since = None;
                self.set_rx_stalled(false);
            }
            if batch.out_of_buffers {
                if !ctx.wait_for_buffers(rx)? {
                    // The next kick of the receive queue calls process(rx); until then
                    // senders drop frames for this port instead of waiting.
                    self.set_rx_stalled(true);
                    return Ok(());
                }
                continue;
            }
            if batch.frames > 0 {
                continue;
            }
            // The queue is empty.
            if !self.rx_poll.is_zero() {
                // Busy polling: come back next worker round (other queues and events are
                // served in between) until the window since the queue ran empty is over.
                let now = Instant::now();
                let since = *self.rx_idle_since.get_or_insert(now);
                if now.saturating_duration_since(since) < self.rx_poll {
                    ctx.schedule(rx);
                    return Ok(());
                }
            }
            if self.consumer.prepare_to_sleep() {
                // The next producer to queue a frame signals the eventfd.
                return Ok(());
            }
        }
    }

    fn set_rx_stalled(&mut self, stalled: bool) {
        if self.rx_stalled != stalled {
            self.rx_stalled = stalled;
            let waiters = self.consumer.set_stalled(stalled);
            self.hub.wake_waiters(waiters);
        }
    }

    /// Publishes the used elements of the frames delivered since the last flush (one
    /// used-index update and one notification check for the batch).
    fn flush_rx(&mut self, ctx: &mut GroupContext<'_>, rx: u16) -> Result<(), DeviceError> {
        let st = &mut self.rx_state;
        if st.used.is_empty() {
            return Ok(());
        }
        if let Some(vring) = ctx.vring(rx) {
            vring.add_used_batch(&st.used)?;
        }
        st.used.clear();
        let n = std::mem::take(&mut st.delivered) as u64;
        if let Some(p) = self.hub.ports.get(self.port) {
            p.counters.rx_frames.fetch_add(n, Ordering::Relaxed);
        }
        // The frames' slots are free: senders waiting for them go on.
        let waiters = self.consumer.take_waiters();
        self.hub.wake_waiters(waiters);
        Ok(())
    }

    fn register(&mut self, ctx: &mut GroupContext<'_>) -> Result<(), DeviceError> {
        if self.registered {
            return Ok(());
        }
        let Some(fd) = self.port().map(|p| p.event.as_raw_fd()) else {
            return Ok(());
        };
        ctx.register(fd, Interest::READABLE, QUEUE_TOKEN)?;
        self.registered = true;
        Ok(())
    }

    fn release_rx(&mut self, ctx: &mut GroupContext<'_>, rx: u16) -> Result<(), DeviceError> {
        self.flush_rx(ctx, rx)?;
        let st = &mut self.rx_state;
        if st.held == 0 {
            return Ok(());
        }
        for c in st.chains.iter().take(st.held) {
            st.used.push((c.id(), 0));
        }
        st.held = 0;
        let r = match ctx.vring(rx) {
            Some(vring) => vring.add_used_batch(&st.used).map_err(DeviceError::from),
            None => Ok(()),
        };
        st.used.clear();
        r
    }
}

/// Copies the frame of `chain` (without its `hdr_len`-byte vnet header) into `slot`;
/// `None` if it cannot be read or is shorter than an Ethernet header.
fn copy_frame(chain: &DescriptorChain, hdr_len: usize, slot: &mut [u8]) -> Option<usize> {
    let mut r = chain.reader();
    let mut skip = [0u8; VNET_HDR_LEN];
    let skip = skip.get_mut(..hdr_len)?;
    if r.read(skip).ok()? < hdr_len {
        return None;
    }
    let n = r.read(slot).ok()?;
    (n >= ETH_HLEN).then_some(n)
}

/// Copies the frame of `chain` into port `p`'s queue if it is connected; a full queue
/// drops it (counted on `p`).
fn enqueue(
    hub: &SwitchHub,
    p: usize,
    chain: &DescriptorChain,
    hdr_len: usize,
    touched: &mut [bool],
) {
    let Some(port) = hub.ports.get(p) else {
        return;
    };
    if !port.connected.load(Ordering::Acquire) {
        return;
    }
    match port
        .queue
        .push_with(|slot| copy_frame(chain, hdr_len, slot))
    {
        Push::Queued => mark(touched, p),
        Push::Refused => bump(&port.counters.drop_bad),
        Push::Full => bump(&port.counters.drop_full),
    }
}

/// Like [`enqueue`] for a unicast frame from port `from`, with backpressure: returns false
/// (nothing queued) if `p`'s queue is full while its consumer is draining; `from` is then
/// registered to be woken when slots are freed. A stalled or disconnected destination
/// drops the frame (true).
fn enqueue_or_wait(
    hub: &SwitchHub,
    from: usize,
    p: usize,
    chain: &DescriptorChain,
    hdr_len: usize,
    touched: &mut [bool],
) -> bool {
    let Some(port) = hub.ports.get(p) else {
        return true;
    };
    if !port.connected.load(Ordering::Acquire) {
        return true;
    }
    let mut waiting = false;
    loop {
        match port
            .queue
            .push_with(|slot| copy_frame(chain, hdr_len, slot))
        {
            Push::Queued => {
                mark(touched, p);
                return true;
            }
            Push::Refused => {
                bump(&port.counters.drop_bad);
                return true;
            }
            Push::Full if waiting => return false,
            Push::Full => {
                if port.queue.is_stalled() || !port.queue.wait_for_space(from) {
                    bump(&port.counters.drop_full);
                    return true;
                }
                // Registered: one more try closes the race with a consumer that freed
                // slots before it saw the registration.
                waiting = true;
            }
        }
    }
}

fn mark(touched: &mut [bool], p: usize) {
    if let Some(t) = touched.get_mut(p) {
        *t = true;
    }
}

/// What one [`deliver_batch`] did.
struct RxBatch {
    /// Frames taken off the queue (delivered, or dropped and counted).
    frames: usize,
    /// It stopped because the ring had no receive buffer for the next frame.
    out_of_buffers: bool,
}

/// Where a planned frame goes: `count` receive chains from `first` (0: dropped).
#[derive(Clone, Copy, Default)]
struct Placement {
    first: usize,
    count: usize,
}

/// Delivers up to [`RX_BATCH`] queued frames behind a plain vnet header into receive
/// chains (§5.1.6.4), in two passes: first every frame of the batch gets its chains
/// (descriptor reads only), then all the frames are copied, back to back. Interleaving
/// the two made each frame's stores into the guest's buffers (lines the driver's CPU
/// holds) wait behind the next frame's ring walk; in one run the copies' cache misses
/// overlap. The used elements are left in `st.used` for the caller to publish.
fn deliver_batch(
    ctx: &mut GroupContext<'_>,
    rx: u16,
    st: &mut RxState,
    consumer: &mut Consumer,
    hdr_len: usize,
    mrg_rxbuf: bool,
    counters: Option<&PortCounters>,
) -> Result<RxBatch, DeviceError> {
    let Some(vring) = ctx.vring(rx) else {
        return Ok(RxBatch {
            frames: 0,
            out_of_buffers: true,
        });
    };
    // Without MRG_RXBUF a frame takes exactly one chain (§5.1.6.3.1).
    let most_chains = if mrg_rxbuf { MAX_MERGED_CHAINS } else { 1 };
    let mut frames: [&[u8]; RX_BATCH] = [&[]; RX_BATCH];
    let mut placements = [Placement::default(); RX_BATCH];
    // Chains `..assigned` of `st.chains` belong to the frames planned so far.
    let mut assigned = 0usize;
    let mut planned = 0usize;
    let mut out_of_buffers = false;
    'plan: while planned < RX_BATCH {
        let Some(frame) = consumer.peek(planned) else {
            break;
        };
        let len = hdr_len + frame.len();
        let count = loop {
            let spare = st.chains.get(assigned..st.held).unwrap_or(&[]);
            if let Some(n) = merged_chains_needed(spare, len) {
                break n;
            }
            if spare.len() >= most_chains {
                // It does not fit in as many chains as it may take: dropped, the chains
                // kept for the next frame.
                if let Some(c) = counters {
                    bump(&c.drop_too_big);
                }
                break 0;
            }
            let Some(chain) = st.chains.get_mut(st.held) else {
                // The batch holds as many chains as it can: the frame waits for the next.
                break 'plan;
            };
            if !vring.pop_into(chain)? {
                out_of_buffers = true;
                break 'plan;
            }
            // The frame is copied in after the whole batch is planned: take its lines
            // from the driver's CPU now.
            chain.prefetch_writable(len.min(PREFETCH_LEN));
            st.held += 1;
        };
        if let (Some(f), Some(p)) = (frames.get_mut(planned), placements.get_mut(planned)) {
            *f = frame;
            *p = Placement {
                first: assigned,
                count,
            };
        }
        assigned += count;
        planned += 1;
    }
    for (frame, p) in frames.iter().zip(&placements).take(planned) {
        if p.count == 0 {
            continue;
        }
        let mut hdr = [0u8; VNET_HDR_LEN];
        if hdr_len == VNET_HDR_LEN {
            set_num_buffers(&mut hdr, u16::try_from(p.count).unwrap_or(u16::MAX));
        }
        let hdr = hdr.get(..hdr_len).unwrap_or(&[]);
        let end = p.first + p.count;
        let (Some(chains), Some(lens)) =
            (st.chains.get(p.first..end), st.lens.get_mut(p.first..end))
        else {
            continue;
        };
        match write_merged(chains, &[hdr, frame], lens) {
            Some(n) => {
                for (c, &l) in chains.iter().zip(lens.iter()).take(n) {
                    st.used.push((c.id(), l));
                }
                st.delivered += 1;
            }
            None => {
                if let Some(c) = counters {
                    bump(&c.drop_too_big);
                }
            }
        }
    }
    consumer.pop_n(planned);
    if assigned > 0 {
        // Chains popped but not needed stay for the next frame, in ring order.
        if assigned < st.held {
            st.chains[..st.held].rotate_left(assigned);
        }
        st.held -= assigned;
    }
    Ok(RxBatch {
        frames: planned,
        out_of_buffers,
    })
}

impl QueueHandler for SwitchQueues {
    fn queue_started(
        &mut self,
        ctx: &mut GroupContext<'_>,
        queue: &QueueContext,
    ) -> Result<(), DeviceError> {
        info!(
            "switch port {}: queue {} started ({:?} ring, {} entries)",
            self.port, queue.index, queue.layout, queue.size
        );
        match queue.index {
            0 => {
                self.rx = Some(queue.index);
                self.register(ctx)?;
            }
            1 => self.tx = Some(queue.index),
            i => {
                return Err(DeviceError::Other(format!(
                    "switch port {}: no queue {i}",
                    self.port
                )))
            }
        }
        Ok(())
    }

    fn process(
        &mut self,
        ctx: &mut GroupContext<'_>,
        queue: u16,
    ) -> Result<Processed, DeviceError> {
        if Some(queue) == self.tx {
            return self.transmit(ctx, queue);
        }
        if Some(queue) == self.rx {
            self.receive(ctx)?;
            // Receive buffers stay in the ring until a frame needs them.
            return Ok(Processed::Throttled);
        }
        Ok(Processed::Empty)
    }

    fn handle_event(
        &mut self,
        ctx: &mut GroupContext<'_>,
        token: u32,
        events: Events,
    ) -> Result<(), DeviceError> {
        if token != QUEUE_TOKEN {
            return Ok(());
        }
        if events.readable {
            if let Some(port) = self.port() {
                // Consume the readiness; EAGAIN (already read) is fine.
                let _ = port.event.read();
            }
            self.receive(ctx)?;
            // The eventfd also wakes a transmit side waiting for space elsewhere.
            if self.tx_next < self.tx_held {
                if let Some(tx) = self.tx {
                    ctx.schedule(tx);
                }
            }
        }
        Ok(())
    }

    fn drain(&mut self, ctx: &mut GroupContext<'_>, queue: u16) -> Result<(), DeviceError> {
        if Some(queue) == self.rx {
            self.release_rx(ctx, queue)?;
        }
        if Some(queue) == self.tx && self.tx_next < self.tx_held {
            // Frames waiting for a destination's space are given back unsent.
            self.tx_used.clear();
            for c in self.tx_chains.iter().take(self.tx_held).skip(self.tx_next) {
                self.tx_used.push((c.id(), 0));
            }
            let n = (self.tx_held - self.tx_next) as u64;
            self.tx_next = 0;
            self.tx_held = 0;
            if let Some(port) = self.port() {
                port.counters
                    .drop_disconnect
                    .fetch_add(n, Ordering::Relaxed);
            }
            if let Some(vring) = ctx.vring(queue) {
                vring.add_used_batch(&self.tx_used)?;
            }
        }
        Ok(())
    }

    fn queue_stopped(&mut self, ctx: &mut GroupContext<'_>, queue: u16) {
        if Some(queue) == self.rx {
            self.rx = None;
            if self.registered {
                ctx.unregister(QUEUE_TOKEN);
                self.registered = false;
            }
        } else if Some(queue) == self.tx {
            self.tx = None;
            // Held chains belonged to the stopped ring (drain returned them).
            self.tx_next = 0;
            self.tx_held = 0;
        }
        let summary = self
            .port()
            .map(|p| p.counters.summary())
            .unwrap_or_default();
        info!(
            "switch port {}: queue {queue} stopped; {summary}",
            self.port
        );
    }
}

#[cfg(test)]
mod tests;
