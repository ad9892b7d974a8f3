// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Switch mode: every vhost-user connection is a port of one in-process learning
//! [`Switch`]; there is no TAP.
//!
//! # Forwarding path
//!
//! Each port has a bounded multi-producer, single-consumer [`FrameQueue`] of preallocated
//! slots (a frame of up to 64 KiB plus its vnet header each) and an eventfd. The worker
//! thread of port A pops a batch of transmit chains, reads their Ethernet headers, takes
//! the forwarding-table mutex **once per batch** to decide every frame's destination
//! ([`Switch::forward`]), releases it, then copies each frame straight from guest memory
//! into the destination port's queue (flooded frames into the queue of every other
//! connected port) and signals each destination's eventfd once per batch. Port B's
//! handler, woken by that eventfd, drains its queue into receive chains (MRG_RXBUF aware,
//! with a fresh vnet header of its own length). The queues take no lock (per-slot
//! sequence numbers, Vyukov's bounded queue); the table mutex is shared by all ports but
//! held only for the table lookups of one batch, never while copying.
//!
//! # Drops
//!
//! A switch drops rather than blocks: a frame that finds its destination queue full is
//! dropped and counted on the destination port (`drop_full`). Frames waiting in a queue
//! while the port's guest posts no receive buffers stay there (the queue fills and further
//! frames are dropped). Malformed frames (bad vnet header, too big, group source address,
//! unknown port) are dropped and counted on the ingress port (`drop_bad`).
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
use std::time::Instant;

use log::{info, warn};
use virtio_core::vhost_user::{
    Device, DeviceError, Events, GroupContext, GroupInfo, Interest, Processed, ProtocolFeatures,
    QueueContext, QueueHandler,
};
use virtio_core::{merged_chains_needed, write_merged, DescriptorChain};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{MacAddr, VirtioNetConfig, DEFAULT_MTU};
use crate::features::{self, CtrlVqPolicy, Negotiated, OfferOptions, VNET_HDR_LEN};
use crate::hdr::{set_num_buffers, VnetHeader};
use crate::switch::{Forward, PortId, Switch, SwitchConfig, SwitchError};
use crate::tap::TapOffloads;

/// Slots of each port's frame queue.
pub const QUEUE_SLOTS: usize = 256;

/// Bytes of one slot: a 64 KiB frame plus link-layer headers behind a vnet header.
pub const SLOT_LEN: usize = 65536 + 256 + VNET_HDR_LEN;

/// Transmit chains forwarded per table lookup (one mutex acquisition).
const TX_BATCH: usize = 64;

/// Most receive chains one frame may span with MRG_RXBUF.
const MAX_MERGED_CHAINS: usize = 256;

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

struct Slot {
    seq: AtomicUsize,
    len: UnsafeCell<usize>,
    data: UnsafeCell<Box<[u8]>>,
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
pub struct FrameQueue {
    slots: Box<[Slot]>,
    mask: usize,
    tail: AtomicUsize,
    head: AtomicUsize,
    consumer_taken: AtomicBool,
}

// SAFETY: a slot's `len` and `data` are written only by the producer that claimed the slot
// (CAS on `tail` while `seq == pos`) before it publishes it (`seq = pos + 1`, release), and
// read only by the single consumer (guaranteed by `consumer_taken`) after it observed that
// publication (acquire) and before it frees the slot (`seq = pos + capacity`, release).
unsafe impl Sync for FrameQueue {}

impl std::fmt::Debug for FrameQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameQueue")
            .field("capacity", &self.slots.len())
            .field("head", &self.head.load(Ordering::Relaxed))
            .field("tail", &self.tail.load(Ordering::Relaxed))
            .finish()
    }
}

impl FrameQueue {
    /// A queue of `capacity` (rounded up to a power of two) slots of `slot_len` bytes,
    /// allocated here, once (zeroed pages: memory is touched only as slots are used).
    pub fn new(capacity: usize, slot_len: usize) -> FrameQueue {
        let capacity = capacity.max(2).next_power_of_two();
        FrameQueue {
            slots: (0..capacity)
                .map(|i| Slot {
                    seq: AtomicUsize::new(i),
                    len: UnsafeCell::new(0),
                    data: UnsafeCell::new(vec![0u8; slot_len].into_boxed_slice()),
                })
                .collect(),
            mask: capacity - 1,
            tail: AtomicUsize::new(0),
            head: AtomicUsize::new(0),
            consumer_taken: AtomicBool::new(false),
        }
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
        // touches `data` or `len` until it is published below.
        let (data, len) = unsafe { (&mut *slot.data.get(), &mut *slot.len.get()) };
        let filled = fill(data).map(|n| n.min(data.len()));
        // An empty slot (len 0) is skipped by the consumer.
        *len = filled.unwrap_or(0);
        slot.seq.store(pos.wrapping_add(1), Ordering::Release);
        if filled.is_some() {
            Push::Queued
        } else {
            Push::Refused
        }
    }

    /// The single consumer, unless it is taken already.
    pub fn consumer(self: &Arc<Self>) -> Option<Consumer> {
        self.consumer_taken
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
            .then(|| Consumer {
                queue: Arc::clone(self),
            })
    }

    fn slot(&self, pos: usize) -> &Slot {
        // The index is masked: always in bounds (the slot count is mask + 1).
        &self.slots[pos & self.mask]
    }
}

/// The consumer side of a [`FrameQueue`] (one at a time; released on drop).
#[derive(Debug)]
pub struct Consumer {
    queue: Arc<FrameQueue>,
}

impl Consumer {
    /// The oldest queued frame, left in the queue (empty slots are skipped).
    pub fn front(&mut self) -> Option<&[u8]> {
        loop {
            let q = &*self.queue;
            let pos = q.head.load(Ordering::Relaxed);
            let slot = q.slot(pos);
            if slot.seq.load(Ordering::Acquire) != pos.wrapping_add(1) {
                return None;
            }
            // SAFETY: the slot was published (acquire above) and only this consumer reads
            // it until `pop` frees it.
            let len = unsafe { *slot.len.get() };
            if len == 0 {
                self.pop();
                continue;
            }
            // SAFETY: as above; the borrow ends before `pop` (it takes `&mut self`).
            let data = unsafe { &*slot.data.get() };
            return data.get(..len);
        }
    }

    /// Frees the oldest slot (after [`Self::front`] returned a frame).
    pub fn pop(&mut self) {
        let q = &*self.queue;
        let pos = q.head.load(Ordering::Relaxed);
        let slot = q.slot(pos);
        if slot.seq.load(Ordering::Acquire) != pos.wrapping_add(1) {
            return;
        }
        q.head.store(pos.wrapping_add(1), Ordering::Relaxed);
        slot.seq
            .store(pos.wrapping_add(q.mask + 1), Ordering::Release);
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
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SwitchHub {
    /// A switch of `ports` ports (2 or more), each with a queue of [`QUEUE_SLOTS`] slots.
    pub fn new(ports: usize, config: SwitchConfig) -> Result<Arc<SwitchHub>, SwitchModeError> {
        Self::with_queue_slots(ports, config, QUEUE_SLOTS)
    }

    /// The same with `slots` slots per port queue.
    pub fn with_queue_slots(
        ports: usize,
        config: SwitchConfig,
        slots: usize,
    ) -> Result<Arc<SwitchHub>, SwitchModeError> {
        if ports < 2 || ports > config.max_ports {
            return Err(SwitchModeError::PortCount {
                got: ports,
                max: config.max_ports,
            });
        }
        let table = Switch::new(config)?;
        let ports = (0..ports)
            .map(|_| {
                Ok(Port {
                    queue: Arc::new(FrameQueue::new(slots, SLOT_LEN)),
                    event: EventFd::new(EFD_NONBLOCK).map_err(SwitchModeError::EventFd)?,
                    connected: AtomicBool::new(false),
                    counters: PortCounters::default(),
                })
            })
            .collect::<Result<Vec<_>, SwitchModeError>>()?;
        Ok(Arc::new(SwitchHub {
            table: Mutex::new(table),
            ports,
        }))
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
}

impl SwitchPortDevice {
    /// Port `port` of `hub`, with MAC `mac` in its config space and an optional MTU.
    pub fn new(
        hub: Arc<SwitchHub>,
        port: usize,
        mac: MacAddr,
        mtu: Option<u16>,
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
            mtu: mtu.is_some(),
            ctrl_vq: false,
            offloads: TapOffloads::default(),
        });
        let config = VirtioNetConfig::new(mac, 1, mtu.unwrap_or(DEFAULT_MTU))?;
        Ok(SwitchPortDevice {
            hub,
            port,
            offered,
            features: AtomicU64::new(0),
            config: Mutex::new(config),
            max_queue_size: max_queue_size.clamp(1, virtio_core::MAX_QUEUE_SIZE),
        })
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

    fn start_group(&self, _group: &GroupInfo) -> Result<SwitchQueues, DeviceError> {
        let neg = Negotiated::from_bits_unchecked(self.features.load(Ordering::Acquire));
        let handler = SwitchQueues::new(Arc::clone(&self.hub), self.port, neg)?;
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
    used: Vec<(u16, u32)>,
    lens: Vec<u32>,
}

/// What became of the frame at the front of the queue.
enum Delivery {
    /// Delivered or dropped: pop it.
    Done,
    /// No receive buffer: keep it.
    NoBuffers,
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
        let mut rx_chains = Vec::with_capacity(MAX_MERGED_CHAINS);
        rx_chains.resize_with(MAX_MERGED_CHAINS, DescriptorChain::new);
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
                used: Vec::with_capacity(MAX_MERGED_CHAINS),
                lens: vec![0; MAX_MERGED_CHAINS],
            },
            tx_chains,
            heads: vec![[0; ETH_HLEN]; TX_BATCH],
            verdicts: vec![Verdict::Bad; TX_BATCH],
            touched: vec![false; ports],
            tx_used: Vec::with_capacity(TX_BATCH),
            failures: 0,
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

    /// Transmit: forwards batches of frames until the ring is empty.
    fn transmit(&mut self, ctx: &mut GroupContext<'_>, tx: u16) -> Result<Processed, DeviceError> {
        loop {
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
                n += 1;
            }
            if n == 0 {
                return Ok(Processed::Empty);
            }
            self.forward_batch(n);
            self.tx_used.clear();
            for c in self.tx_chains.iter().take(n) {
                // §5.1.6.2: the device writes nothing into a transmit buffer.
                self.tx_used.push((c.id(), 0));
            }
            if let Some(vring) = ctx.vring(tx) {
                vring.add_used_batch(&self.tx_used)?;
            }
            self.signal_touched();
        }
    }

    /// Checks the first `n` held transmit chains, decides where they go (one table lock)
    /// and copies them into the destination queues.
    fn forward_batch(&mut self, n: usize) {
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
            if total > SLOT_LEN || frame_len < ETH_HLEN {
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
        let mut bad = 0u64;
        let ingress = PortId(u32::try_from(self.port).unwrap_or(u32::MAX));
        {
            // One lock per batch: every lookup and learning of the batch.
            let now = Instant::now();
            let mut table = lock(&self.hub.table);
            for (head, verdict) in self.heads.iter().zip(self.verdicts.iter_mut()).take(n) {
                if let Verdict::Table(_) = verdict {
                    *verdict = Verdict::Table(table.forward(head, ingress, now));
                }
            }
        }
        for i in 0..n {
            let (Some(chain), Some(&verdict)) = (self.tx_chains.get(i), self.verdicts.get(i))
            else {
                break;
            };
            match verdict {
                Verdict::Bad | Verdict::Table(Forward::Drop(_)) => bad += 1,
                Verdict::Table(Forward::Unicast(PortId(p))) => {
                    let p = p as usize;
                    if p != self.port {
                        enqueue(&self.hub, p, chain, hdr_len, &mut self.touched);
                    }
                    self.count_tx();
                }
                Verdict::Table(Forward::Flood) => {
                    for p in 0..self.hub.ports.len() {
                        if p != self.port {
                            enqueue(&self.hub, p, chain, hdr_len, &mut self.touched);
                        }
                    }
                    self.count_tx();
                }
            }
        }
        if bad > 0 {
            if let Some(port) = self.port() {
                port.counters.drop_bad.fetch_add(bad, Ordering::Relaxed);
            }
            self.log_failure(format_args!("{bad} transmitted frame(s) dropped"));
        }
    }

    fn count_tx(&self) {
        if let Some(port) = self.port() {
            bump(&port.counters.tx_frames);
        }
    }

    /// Signals every port that got frames in this batch, once.
    fn signal_touched(&mut self) {
        for (p, t) in self.touched.iter_mut().enumerate() {
            if std::mem::take(t) {
                if let Some(port) = self.hub.ports.get(p) {
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
        loop {
            if !ctx.is_active(rx) {
                // Frames wait in the queue until process(rx) runs on enable.
                return Ok(());
            }
            let Some(frame) = self.consumer.front() else {
                return Ok(());
            };
            let counters = self.hub.ports.get(self.port).map(|p| &p.counters);
            match deliver(
                ctx,
                rx,
                &mut self.rx_state,
                frame,
                self.hdr_len,
                self.mrg_rxbuf,
                counters,
            )? {
                Delivery::Done => self.consumer.pop(),
                Delivery::NoBuffers => {
                    if !ctx.wait_for_buffers(rx)? {
                        // The next kick of the receive queue calls process(rx).
                        return Ok(());
                    }
                }
            }
        }
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
        let st = &mut self.rx_state;
        if st.held == 0 {
            return Ok(());
        }
        st.used.clear();
        for c in st.chains.iter().take(st.held) {
            st.used.push((c.id(), 0));
        }
        st.held = 0;
        if let Some(vring) = ctx.vring(rx) {
            vring.add_used_batch(&st.used)?;
        }
        Ok(())
    }
}

/// Copies the frame of `chain` (without its `hdr_len`-byte vnet header) into port `p`'s
/// queue if it is connected; a full queue drops it (counted on `p`).
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
    let pushed = port.queue.push_with(|slot| {
        let mut r = chain.reader();
        let mut skip = [0u8; VNET_HDR_LEN];
        let skip = skip.get_mut(..hdr_len)?;
        if r.read(skip).ok()? < hdr_len {
            return None;
        }
        let n = r.read(slot).ok()?;
        (n >= ETH_HLEN).then_some(n)
    });
    match pushed {
        Push::Queued => {
            if let Some(t) = touched.get_mut(p) {
                *t = true;
            }
        }
        Push::Refused => bump(&port.counters.drop_bad),
        Push::Full => bump(&port.counters.drop_full),
    }
}

/// Delivers `frame` behind a plain vnet header into receive chains (§5.1.6.4).
fn deliver(
    ctx: &mut GroupContext<'_>,
    rx: u16,
    st: &mut RxState,
    frame: &[u8],
    hdr_len: usize,
    mrg_rxbuf: bool,
    counters: Option<&PortCounters>,
) -> Result<Delivery, DeviceError> {
    let Some(vring) = ctx.vring(rx) else {
        return Ok(Delivery::NoBuffers);
    };
    let len = hdr_len + frame.len();
    let want_chains = if mrg_rxbuf { MAX_MERGED_CHAINS } else { 1 };
    let needed = loop {
        if let Some(n) = merged_chains_needed(&st.chains[..st.held], len) {
            break n;
        }
        if st.held >= want_chains {
            // Without MRG_RXBUF a frame takes exactly one chain (§5.1.6.3.1): one that
            // does not fit is dropped, the chain kept for the next frame.
            if let Some(c) = counters {
                bump(&c.drop_too_big);
            }
            return Ok(Delivery::Done);
        }
        let Some(slot) = st.chains.get_mut(st.held) else {
            return Ok(Delivery::Done);
        };
        if !vring.pop_into(slot)? {
            return Ok(Delivery::NoBuffers);
        }
        st.held += 1;
    };
    let mut hdr = [0u8; VNET_HDR_LEN];
    if hdr_len == VNET_HDR_LEN {
        set_num_buffers(&mut hdr, u16::try_from(needed).unwrap_or(u16::MAX));
    }
    let hdr = hdr.get(..hdr_len).unwrap_or(&[]);
    let Some(n) = write_merged(&st.chains[..needed], &[hdr, frame], &mut st.lens) else {
        if let Some(c) = counters {
            bump(&c.drop_too_big);
        }
        return Ok(Delivery::Done);
    };
    st.used.clear();
    for (c, &l) in st.chains.iter().zip(&st.lens).take(n) {
        st.used.push((c.id(), l));
    }
    vring.add_used_batch(&st.used)?;
    st.chains[..st.held].rotate_left(n);
    st.held -= n;
    if let Some(c) = counters {
        bump(&c.rx_frames);
    }
    Ok(Delivery::Done)
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
        }
        Ok(())
    }

    fn drain(&mut self, ctx: &mut GroupContext<'_>, queue: u16) -> Result<(), DeviceError> {
        if Some(queue) == self.rx {
            self.release_rx(ctx, queue)?;
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
