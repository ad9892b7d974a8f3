// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! # vhost-user-net
//!
//! The building blocks of a virtio network device (virtio 1.2 §5.1) served over
//! vhost-user, either in front of a host TAP interface or as a port of an in-process
//! learning switch. Each module is pure logic (or a thin, tested wrapper of a kernel
//! interface) that a device's queue handlers call; [`device`] puts them together behind
//! virtio-core's vhost-user server.
//!
//! * [`features`]: the offered feature bits, the dependency rules checked on
//!   SET_FEATURES (§5.1.3.1), the vnet header length and queue index helpers.
//! * [`config`]: the configuration space ([`config::VirtioNetConfig`]), MAC addresses and
//!   MTU limits.
//! * [`hdr`]: the vnet header: checking the driver's on transmit (§5.1.6.2), setting
//!   `num_buffers` on receive.
//! * [`ctrl`]: the control virtqueue (§5.1.6.5): command parsing, [`ctrl::NetState`]
//!   (receive modes, MAC filter tables, active queue pairs, guest offloads) and the
//!   receive filter.
//! * [`tap`]: opening a (multi-queue) TAP with a vnet header, offloads, and non-blocking
//!   `readv`/`writev`.
//! * [`switch`]: the MAC learning forwarding table of switch mode (no TAP).
//! * [`switch_port`]: switch mode's vhost-user device, one per socket
//!   ([`switch_port::SwitchPortDevice`]), its lock-free per-port frame queues and the
//!   shared table ([`switch_port::SwitchHub`]).
//! * [`metrics`]: per-queue counters.
//! * [`device`]: the vhost-user device ([`NetDevice`]) in front of a TAP, with one
//!   handler per queue pair ([`NetQueues`]).
//!
//! Guest and frontend input is hostile: every value they control is validated and a
//! malformed one ends in an error value (or VIRTIO_NET_ERR on the control queue), never in
//! a panic. The per-packet paths ([`ctrl::NetState::accepts`],
//! [`switch::Switch::forward`], [`hdr`]) do not allocate.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod config;
pub mod ctrl;
pub mod device;
pub mod features;
pub mod hdr;
pub mod metrics;
pub mod switch;
pub mod switch_port;
pub mod tap;

pub use config::{ConfigError, MacAddr, MacError, VirtioNetConfig};
pub use ctrl::{CtrlOutcome, NetState};
pub use device::{NetDevice, NetError, NetOptions, NetQueues};
pub use features::{FeatureError, Negotiated, OfferOptions, QueueRole};
pub use hdr::{HeaderError, VnetHeader};
pub use metrics::{DropReason, QueueMetrics, QueueMetricsSnapshot};
pub use switch::{Forward, PortId, Switch, SwitchConfig};
pub use tap::{Tap, TapError, TapOffloads, TapQueue};

#[cfg(test)]
mod test_guest;
#[cfg(test)]
mod test_netns;
