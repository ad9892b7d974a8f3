// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! # vhost-user-console
//!
//! A virtio console device (virtio 1.2 §5.3) served over vhost-user: the device
//! ([`device::ConsoleDevice`], a [`virtio_core::vhost_user::Device`]), its queue handler
//! ([`handler::ConsoleQueues`]: every queue in one group, one worker thread) and the
//! building blocks they glue to the virtqueues, each pure or owning only its own file
//! descriptors:
//!
//! * [`device`]: the vhost-user device: features, config space, queue numbering, and
//!   the host sides opened once ([`device::HostPorts`]) and kept across frontends.
//! * [`handler`]: receiveq/transmitq data of every port, control queues, backpressure.
//! * [`config`]: the configuration space (`struct virtio_console_config`, §5.3.4), its
//!   reads and the `emerg_wr` write, feature bits (§5.3.3) and queue numbering (§5.3.2).
//! * [`control`]: multiport control messages (§5.3.6.2), their encoder and decoder, and
//!   [`control::ControlState`], the per-device state machine that answers the driver.
//! * [`backend`]: host sides of a port ([`backend::HostSide`]): a pty, a unix socket
//!   server, the daemon's stdin/stdout, and a rotating log file that can be teed to any
//!   of them ([`backend::PortOutput`]).
//! * [`buffer`]: the bounded byte buffers of the data path (replay of guest output,
//!   host-to-guest input with backpressure).
//! * [`cli`]: command-line options (`--port ...`), flattened into the daemon's parser.
//! * [`metrics`]: per-port counters.
//!
//! Guest input is hostile: malformed control messages and configuration accesses are
//! refused with typed errors, never with a panic.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod backend;
pub mod buffer;
pub mod cli;
pub mod config;
pub mod control;
pub mod device;
pub mod handler;
pub mod metrics;

pub use backend::{HostEvents, HostSide, Interest, PortOutput, Readiness, Watch, WinSize};

pub use buffer::{InputBuffer, ReplayBuffer};
pub use config::{virtio_console_config, ConfigError, ConsoleConfigSpace};
pub use control::{ControlError, ControlState, DeviceMessage, DriverMessage, PortConfig};
pub use device::{ConsoleDevice, HostLocation, HostPorts, SetupError};
pub use handler::ConsoleQueues;
pub use metrics::{PortMetrics, PortMetricsSnapshot};
