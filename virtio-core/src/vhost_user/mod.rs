// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The device side of vhost-user (QEMU `docs/interop/vhost-user.rst`).
//!
//! All protocol mechanics live here; a daemon implements [`Device`] (features, queues,
//! config space, reset, how queues group onto threads) and [`QueueHandler`] (what one
//! group of queues does with its chains and its own event sources), and runs a
//! [`Server`]:
//!
//! - the **server** listens on a unix socket (or an inherited `--fd`), serves one
//!   frontend at a time, and when it disconnects stops the queues, unmaps guest memory,
//!   resets the device and accepts the next frontend on the same socket;
//! - the **connection** implements the requests: features and protocol features (MQ,
//!   REPLY_ACK, CONFIG, BACKEND_REQ/BACKEND_SEND_FD, INFLIGHT_SHMFD, RESET_DEVICE,
//!   CONFIGURE_MEM_SLOTS, STATUS, and RARP / NET_MTU for devices that take them), the
//!   memory table (SET_MEM_TABLE, ADD/REM_MEM_REG), the vring messages, config space,
//!   inflight areas and device status; bad requests are logged and refused (REPLY_ACK
//!   failure, or closing the connection where the frontend waits for a reply body that
//!   cannot carry a failure), never a panic;
//! - a **worker** thread per group of queues ([`Device::queue_group`]; by default
//!   [`ServerConfig::queues_per_thread`]) owns the group's [`Vring`]s and its
//!   [`QueueHandler`], and waits in its own epoll set on the kick eventfds, the
//!   handler's event sources (registered, paused, resumed and removed at run time through
//!   the [`GroupContext`], readable or writable, level- or edge-triggered) and a command
//!   eventfd. It re-enables notifications with the re-check that closes the
//!   lost-wake-up race, busy-polls for a learned window, and signals the call eventfd
//!   only when the driver's notification suppression asks for it;
//! - **inflight tracking** records popped chains in the shared area of
//!   `GET_INFLIGHT_FD`/`SET_INFLIGHT_FD`, in the documented split and packed formats,
//!   and a restarted backend hands the chains its predecessor left in flight to the
//!   handler through the ordinary [`Vring::pop_into`];
//! - **hostile frontends** cannot stop the daemon: kick, call and error fds are made
//!   non-blocking when received (`notify_fd`), an fd that hangs up breaks its queue
//!   instead of spinning the worker, every wait of a connection on its workers is bounded
//!   and logged, and a frontend that shrinks the file behind guest memory gets its
//!   connection closed instead of the daemon killed by SIGBUS (`sigbus`: the server
//!   installs a process-wide SIGBUS handler, chaining to the previous one).
//!
//! A device that echoes each chain's readable bytes into its writable buffers, served to
//! a frontend over a socketpair (a real daemon uses [`BackendArgs`] for `--socket-path`
//! and friends):
//!
//! ```
//! use std::io::{Read, Write};
//! use std::os::unix::net::UnixStream;
//! use std::sync::Arc;
//! use virtio_core::vhost_user::*;
//! use virtio_core::DescriptorChain;
//!
//! struct Echo;
//! struct EchoQueues {
//!     chain: DescriptorChain,
//! }
//!
//! impl QueueHandler for EchoQueues {
//!     fn process(&mut self, ctx: &mut GroupContext<'_>, queue: u16) -> Result<Processed, DeviceError> {
//!         let Some(vring) = ctx.vring(queue) else { return Ok(Processed::Empty) };
//!         while vring.pop_into(&mut self.chain)? {
//!             let mut data = Vec::new();
//!             self.chain.reader().read_to_end(&mut data)?;
//!             let n = self.chain.writer().write(&data)?;
//!             vring.add_used(self.chain.id(), n as u32)?;
//!         }
//!         Ok(Processed::Empty)
//!     }
//! }
//!
//! impl Device for Echo {
//!     type Handler = EchoQueues;
//!     fn features(&self) -> u64 { 1 << 32 /* VERSION_1 */ | 1 << 34 /* RING_PACKED */ }
//!     fn num_queues(&self) -> u16 { 2 }
//!     fn max_queue_size(&self) -> u16 { 256 }
//!     // Both queues on one thread, one handler.
//!     fn queue_group(&self, _queue: u16) -> Option<u16> { Some(0) }
//!     fn start_group(&self, _group: &GroupInfo) -> Result<EchoQueues, DeviceError> {
//!         Ok(EchoQueues { chain: DescriptorChain::new() })
//!     }
//! }
//!
//! let (frontend, backend) = UnixStream::pair().unwrap();
//! let mut server = Server::new(FrontendSocket::Connected(backend), Arc::new(Echo), ServerConfig::default()).unwrap();
//! let stop = server.shutdown_handle(); // call stop.shutdown() on SIGTERM
//! drop(frontend); // a frontend would negotiate, set up memory and rings here
//! server.serve().unwrap();
//! # let _ = stop;
//! ```

mod backend_channel;
mod connection;
pub mod conventions;
mod device;
mod error;
pub mod inflight;
mod memory;
mod message;
mod notify_fd;
mod poll;
mod server;
mod shared_worker;
mod sigbus;
mod worker;

#[cfg(test)]
#[cfg(feature = "driver")]
mod tests;

pub use backend_channel::ConfigNotifier;
pub use conventions::{BackendArgs, Capabilities, ConventionError};
pub use device::{
    Device, Events, GroupContext, GroupInfo, Interest, Processed, ProtocolFeatures, QueueContext,
    QueueHandler, Vring,
};
pub use error::{DeviceError, Error};
pub use server::{FrontendSocket, Server, ServerConfig, ShutdownHandle};
pub use shared_worker::WorkerThread;

/// VHOST_USER_F_PROTOCOL_FEATURES: the virtio feature bit (30) vhost-user reuses to
/// announce protocol feature negotiation. The server adds it to the device's features.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
