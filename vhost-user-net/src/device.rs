// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vhost-user face of the network device (virtio 1.2 §5.1) in front of a host TAP:
//! [`NetDevice`] implements [`virtio_core::vhost_user::Device`] and creates one
//! [`NetQueues`] handler per queue pair.
//!
//! # Queue groups
//!
//! Queue pair k (receiveq 2k, transmitq 2k + 1, §5.1.2) is group k, served by one worker
//! thread and TAP queue k; the control queue (index 2·max_pairs) joins group 0. The
//! server fixes the grouping when a frontend connects, before the features are known, so
//! a driver that negotiates CTRL_VQ without MQ on a multi-pair device finds its control
//! queue at index 2 (§5.1.2), in group 1: every handler can serve a control queue.
//!
//! # Control-queue state
//!
//! The state the control queue configures ([`NetState`]: receive filter, active pairs,
//! guest offloads) lives once per device behind a mutex that only control commands and
//! SET_FEATURES take. Each change bumps a generation counter; a handler keeps its own
//! copy of the state for its receive filter and, once per receive batch, compares the
//! generation (one atomic load) and copies the state again only when it changed. The
//! per-packet path therefore takes no lock and allocates nothing (a [`NetState`] copy is
//! plain data).
//!
//! # Backpressure
//!
//! Receive (TAP → guest): a frame that finds no receive buffer stays pending in the
//! handler, the TAP is paused ([`Interest::PAUSED`](virtio_core::vhost_user::Interest::PAUSED)) and the handler waits for buffers
//! ([`GroupContext::wait_for_buffers`](virtio_core::vhost_user::GroupContext::wait_for_buffers)); the next receive-queue kick resumes the TAP.
//! Frames queue up in the kernel meanwhile (it drops them when the TAP queue is full).
//! Transmit (guest → TAP): a frame the TAP refuses with EAGAIN is kept, the TAP is watched
//! for writability and the transmit queue is throttled until then.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use log::{info, warn};
use virtio_core::vhost_user::{Device, DeviceError, GroupInfo, ProtocolFeatures};

use crate::config::{MacAddr, VirtioNetConfig, DEFAULT_MTU};
use crate::ctrl::NetState;
use crate::features::{self, CtrlVqPolicy, Negotiated, OfferOptions, QueueRole, MAX_QUEUE_PAIRS};
use crate::metrics::QueueMetrics;
use crate::tap::{Tap, TapOffloads};

mod handler;
#[cfg(test)]
mod tests;

pub use handler::NetQueues;

/// Default largest queue size accepted.
pub const DEFAULT_MAX_QUEUE_SIZE: u16 = 1024;

/// How the device is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetOptions {
    /// The device's MAC address (config space `mac`, VIRTIO_NET_F_MAC).
    pub mac: MacAddr,
    /// The MTU to report (VIRTIO_NET_F_MTU is offered only when set).
    pub mtu: Option<u16>,
    /// Queue pairs offered (MQ above 1); the TAP gets as many queues.
    pub queue_pairs: u16,
    /// Largest queue size accepted by SET_VRING_NUM (up to 32768).
    pub max_queue_size: u16,
}

/// Why the device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP could not be opened or probed.
    #[error("TAP {name:?}: {source}")]
    Tap {
        /// The interface name asked for.
        name: String,
        /// What failed.
        #[source]
        source: crate::tap::TapError,
    },
    /// The configuration space refused a value.
    #[error("invalid device configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// The TAP has fewer queues than queue pairs.
    #[error("TAP {name:?} has {got} queues, {want} queue pairs were asked for")]
    TapQueues {
        /// Interface name.
        name: String,
        /// Queues opened.
        got: usize,
        /// Queue pairs.
        want: u16,
    },
}

/// What the handlers share with the device: the control-queue state (locked only by
/// control commands and SET_FEATURES) and what they read on the per-packet path through
/// atomics.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The TAP; TAP queue k serves queue pair k.
    pub(crate) tap: Tap,
    /// The control-queue state.
    state: Mutex<NetState>,
    /// Bumped after every change of `state` (release); handlers compare it (acquire).
    generation: AtomicU64,
    /// The negotiated features (SET_FEATURES).
    features: AtomicU64,
    /// Queue pairs the driver uses (§5.1.6.5.6).
    active_pairs: AtomicU16,
    /// Whether TAP queue k is attached (TUNSETQUEUE); changed under `attach_lock`.
    attached: Vec<AtomicBool>,
    attach_lock: Mutex<()>,
    /// The configuration space (read by GET_CONFIG, changed by MAC_ADDR_SET).
    config: Mutex<VirtioNetConfig>,
    /// Counters of each queue pair; they survive reconnections.
    pub(crate) metrics: Vec<Arc<QueueMetrics>>,
    /// Queue pairs offered.
    pub(crate) max_pairs: u16,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// The current control-queue state and its generation.
    pub(crate) fn state_snapshot(&self) -> (NetState, u64) {
        let s = lock(&self.state);
        (s.clone(), self.generation.load(Ordering::Acquire))
    }

    /// The generation of the control-queue state (one atomic load).
    #[inline]
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The negotiated features.
    pub(crate) fn negotiated(&self) -> Negotiated {
        Negotiated::from_bits_unchecked(self.features.load(Ordering::Acquire))
    }

    /// Runs `f` on the control-queue state (control commands only), then publishes it.
    pub(crate) fn with_state<R>(&self, f: impl FnOnce(&mut NetState) -> R) -> R {
        let mut s = lock(&self.state);
        let r = f(&mut s);
        self.generation.fetch_add(1, Ordering::Release);
        r
    }

    /// VQ_PAIRS_SET (§5.1.6.5.6) or a new negotiation: pairs `0..n` are used, and their
    /// TAP queues attached; the kernel sends frames only to attached queues, so the
    /// queues of unused pairs are detached lest their frames wait unread.
    pub(crate) fn set_active_pairs(&self, n: u16) {
        self.active_pairs.store(n, Ordering::Release);
        if self.tap.queues().len() < 2 {
            return;
        }
        let _guard = lock(&self.attach_lock);
        for (k, (q, attached)) in self.tap.queues().iter().zip(&self.attached).enumerate() {
            let want = k < usize::from(n);
            if attached.load(Ordering::Acquire) == want {
                continue;
            }
            match q.set_enabled(want) {
                Ok(()) => attached.store(want, Ordering::Release),
                Err(e) => warn!(
                    "TAP {}: {} queue {k} failed: {e}",
                    self.tap.name(),
                    if want { "attaching" } else { "detaching" }
                ),
            }
        }
    }

    /// Whether TAP queue `pair` is attached. A detached queue (TUNSETQUEUE) gets no new
    /// frames from the kernel but still reads what it holds and takes writes, so its
    /// handler needs no notice of the change.
    #[cfg(test)]
    pub(crate) fn is_attached(&self, pair: u16) -> bool {
        self.attached
            .get(usize::from(pair))
            .is_none_or(|a| a.load(Ordering::Acquire))
    }

    /// GUEST_OFFLOADS_SET (§5.1.6.5.8): the offloads the kernel may hand to the guest.
    pub(crate) fn set_guest_offloads(&self, bits: u64) {
        let wanted = TapOffloads::from_guest_features(bits);
        match self.tap.set_offloads(wanted) {
            Ok(active) if active != wanted => warn!(
                "TAP {}: guest offloads {bits:#x}: the kernel accepted only {:#x}",
                self.tap.name(),
                active.bits()
            ),
            Ok(_) => {}
            Err(e) => warn!(
                "TAP {}: setting guest offloads {bits:#x}: {e}",
                self.tap.name()
            ),
        }
    }

    /// MAC_ADDR_SET (§5.1.6.5.2): the config space reports the new address.
    pub(crate) fn set_mac(&self, mac: MacAddr) {
        lock(&self.config).mac = mac.0;
    }

    /// ANNOUNCE_ACK (§5.1.6.5.4).
    pub(crate) fn announce_acked(&self) {
        lock(&self.config).set_announce(false);
    }
}

/// The role of virtqueue `index` (§5.1.2). A frontend that emulates the control queue
/// itself (QEMU, DPDK virtio_user) does not negotiate CTRL_VQ, and
/// [`CtrlVqPolicy::Mask`] then drops MQ too; it still uses every queue pair of the device
/// (choosing them with SET_VRING_ENABLE), so without CTRL_VQ every index below
/// 2·max_pairs is a data queue.
pub(crate) fn queue_role(index: u16, neg: Negotiated, max_pairs: u16) -> Option<QueueRole> {
    if neg.has_ctrl_vq() {
        return features::queue_role(u32::from(index), neg, max_pairs);
    }
    let pair = index / 2;
    (pair < max_pairs).then_some(if index % 2 == 0 {
        QueueRole::Rx(pair)
    } else {
        QueueRole::Tx(pair)
    })
}

/// The vhost-user network device in front of a TAP.
#[derive(Debug)]
pub struct NetDevice {
    shared: Arc<Shared>,
    offered: u64,
    mac: MacAddr,
    max_queue_size: u16,
}

impl NetDevice {
    /// Opens (or creates) TAP `tap_name` with one queue per pair, probes its offloads and
    /// builds the device that offers them.
    pub fn open(tap_name: &str, options: &NetOptions) -> Result<Self, NetError> {
        let tap = Tap::open(tap_name, options.queue_pairs).map_err(|source| NetError::Tap {
            name: tap_name.to_owned(),
            source,
        })?;
        Self::with_tap(tap, options)
    }

    /// The device over an open TAP (with at least `options.queue_pairs` queues).
    pub fn with_tap(tap: Tap, options: &NetOptions) -> Result<Self, NetError> {
        let pairs = options.queue_pairs;
        if pairs == 0 || pairs > MAX_QUEUE_PAIRS || tap.queues().len() < usize::from(pairs) {
            return Err(NetError::TapQueues {
                name: tap.name().to_owned(),
                got: tap.queues().len(),
                want: pairs,
            });
        }
        let offloads = tap.probe_offloads().map_err(|source| NetError::Tap {
            name: tap.name().to_owned(),
            source,
        })?;
        let offered = features::offered_features(&OfferOptions {
            max_queue_pairs: pairs,
            mtu: options.mtu.is_some(),
            ctrl_vq: true,
            offloads,
        });
        let config = VirtioNetConfig::new(options.mac, pairs, options.mtu.unwrap_or(DEFAULT_MTU))?;
        info!(
            "TAP {}: {} queue(s), offloads {:#x}; offering features {offered:#x}",
            tap.name(),
            tap.queues().len(),
            offloads.bits()
        );
        let neg = Negotiated::default();
        let shared = Shared {
            attached: (0..tap.queues().len())
                .map(|_| AtomicBool::new(true))
                .collect(),
            tap,
            state: Mutex::new(NetState::new(neg, options.mac, pairs)),
            generation: AtomicU64::new(0),
            features: AtomicU64::new(0),
            active_pairs: AtomicU16::new(1),
            attach_lock: Mutex::new(()),
            config: Mutex::new(config),
            metrics: (0..pairs)
                .map(|_| Arc::new(QueueMetrics::default()))
                .collect(),
            max_pairs: pairs,
        };
        Ok(NetDevice {
            shared: Arc::new(shared),
            offered,
            mac: options.mac,
            max_queue_size: options.max_queue_size.clamp(1, virtio_core::MAX_QUEUE_SIZE),
        })
    }

    /// The TAP interface's name.
    pub fn tap_name(&self) -> &str {
        self.shared.tap.name()
    }

    /// The counters of queue pair `pair`.
    pub fn metrics(&self, pair: u16) -> Option<&Arc<QueueMetrics>> {
        self.shared.metrics.get(usize::from(pair))
    }
}

impl Device for NetDevice {
    type Handler = NetQueues;

    fn features(&self) -> u64 {
        self.offered
    }

    fn protocol_features(&self) -> ProtocolFeatures {
        ProtocolFeatures::CONFIG
    }

    fn num_queues(&self) -> u16 {
        u16::try_from(features::queue_count(self.shared.max_pairs, true)).unwrap_or(u16::MAX)
    }

    fn max_queue_size(&self) -> u16 {
        self.max_queue_size
    }

    fn set_features(&self, acked: u64) -> Result<(), DeviceError> {
        // DPDK virtio_user strips CTRL_VQ (it emulates the control queue): drop what
        // needs it rather than refuse (§5.1.3.1).
        let neg = features::validate(acked, self.offered, CtrlVqPolicy::Mask).map_err(|e| {
            warn!("SET_FEATURES {acked:#x} refused: {e}");
            DeviceError::Other(e.to_string())
        })?;
        if neg.bits() != acked & !features::VHOST_USER_F_PROTOCOL_FEATURES {
            info!(
                "features {acked:#x} without CTRL_VQ: the control-queue features are masked ({:#x})",
                neg.bits()
            );
        }
        let tap = &self.shared.tap;
        tap.configure(neg).map_err(|e| {
            warn!(
                "configuring TAP {} for features {:#x}: {e}",
                tap.name(),
                neg.bits()
            );
            DeviceError::Other(format!("configuring TAP {}: {e}", tap.name()))
        })?;
        self.shared.features.store(neg.bits(), Ordering::Release);
        let mac = MacAddr(lock(&self.shared.config).mac);
        self.shared
            .with_state(|s| *s = NetState::new(neg, mac, self.shared.max_pairs));
        // With a control queue the driver starts with one pair (§5.1.6.5.6); without
        // one the frontend (QEMU, DPDK) chooses pairs by enabling rings.
        let active = if neg.has_ctrl_vq() {
            1
        } else {
            self.shared.max_pairs
        };
        self.shared.set_active_pairs(active);
        info!(
            "features {:#x} negotiated: vnet header {} bytes, {} queue pair(s) active",
            neg.bits(),
            neg.vnet_hdr_len(),
            active
        );
        Ok(())
    }

    fn read_config(&self, offset: u32, buf: &mut [u8]) -> Result<(), DeviceError> {
        lock(&self.shared.config)
            .read(offset, buf)
            .map_err(|_| DeviceError::ConfigOutOfRange {
                offset,
                len: buf.len(),
                size: crate::config::CONFIG_SIZE,
            })
    }

    fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), DeviceError> {
        // §5.1.4: the configuration space is read-only for the driver.
        Err(DeviceError::ConfigReadOnly {
            offset,
            len: data.len(),
        })
    }

    fn queue_group(&self, queue: u16) -> Option<u16> {
        // Pair k = group k; the control queue (2·max_pairs) joins pair 0.
        let pair = queue / 2;
        Some(if pair >= self.shared.max_pairs {
            0
        } else {
            pair
        })
    }

    fn start_group(&self, group: &GroupInfo) -> Result<NetQueues, DeviceError> {
        let neg = self.shared.negotiated();
        let pair = group
            .queues
            .iter()
            .find_map(|&q| match queue_role(q, neg, self.shared.max_pairs) {
                Some(QueueRole::Rx(p) | QueueRole::Tx(p)) => Some(p),
                _ => None,
            })
            .unwrap_or_else(|| group.queues.first().map_or(0, |q| q / 2))
            .min(self.shared.max_pairs.saturating_sub(1));
        NetQueues::new(Arc::clone(&self.shared), pair, neg)
    }

    fn reset(&self) {
        self.shared.features.store(0, Ordering::Release);
        let mac = self.mac;
        self.shared.set_mac(mac);
        self.shared
            .with_state(|s| *s = NetState::new(Negotiated::default(), mac, self.shared.max_pairs));
    }
}
