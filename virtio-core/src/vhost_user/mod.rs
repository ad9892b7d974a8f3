//! The device side of vhost-user (QEMU `docs/interop/vhost-user.rst`).
//!
//! All protocol mechanics live here; a daemon implements [`Device`] (features, queues,
//! config space, reset) and [`QueueHandler`] (what one queue does with its chains), and
//! runs a [`Server`]:
//!
//! - the **server** listens on a unix socket (or an inherited `--fd`), serves one
//!   frontend at a time, and when it disconnects stops the queues, unmaps guest memory,
//!   resets the device and accepts the next frontend on the same socket;
//! - the **connection** implements the requests: features and protocol features (MQ,
//!   REPLY_ACK, CONFIG, BACKEND_REQ/BACKEND_SEND_FD, INFLIGHT_SHMFD, RESET_DEVICE,
//!   CONFIGURE_MEM_SLOTS, STATUS), the memory table (SET_MEM_TABLE, ADD/REM_MEM_REG), the
//!   vring messages, config space, inflight areas and device status; bad requests are
//!   logged and refused (REPLY_ACK failure, or closing the connection where the frontend
//!   waits for a reply body that cannot carry a failure), never a panic;
//! - a **worker** thread per queue (or per group of queues, [`ServerConfig`]) owns the
//!   queue's [`Vring`] and handler, and waits in its own epoll set on the kick eventfd,
//!   the handler's event fds and a command eventfd. It re-enables notifications with the
//!   re-check that closes the lost-wake-up race, optionally busy-polls, and signals the
//!   call eventfd only when the driver's notification suppression asks for it;
//! - **inflight tracking** records popped chains in the shared area of
//!   `GET_INFLIGHT_FD`/`SET_INFLIGHT_FD`, in the documented split and packed formats.
//! - **hostile frontends** cannot stop the daemon: kick, call and error fds are made
//!   non-blocking when received (`notify_fd`), an fd that hangs up breaks its queue
//!   instead of spinning the worker, every wait of a connection on its workers is bounded
//!   and logged, and a frontend that shrinks the file behind guest memory gets its
//!   connection closed instead of the daemon killed by SIGBUS (`sigbus`: the server
//!   installs a process-wide SIGBUS handler, chaining to the previous one).
//!
//! A block daemon, sketched (completions through io_uring, one ring per queue):
//!
//! ```no_run
//! use std::os::fd::RawFd;
//! use std::sync::Arc;
//! use virtio_core::vhost_user::*;
//! use virtio_core::DescriptorChain;
//!
//! struct Blk { capacity_sectors: std::sync::atomic::AtomicU64 }
//! struct BlkQueue { chains: Vec<DescriptorChain>, free: Vec<u16>, completion_fd: RawFd }
//!
//! impl QueueHandler for BlkQueue {
//!     fn event_fds(&self) -> Vec<RawFd> {
//!         vec![self.completion_fd] // the io_uring's registered eventfd
//!     }
//!     fn process(&mut self, vring: &mut Vring) -> Result<Processed, DeviceError> {
//!         while let Some(slot) = self.free.pop() {
//!             let chain = &mut self.chains[usize::from(slot)];
//!             if !vring.pop_into(chain)? {
//!                 self.free.push(slot);
//!                 return Ok(Processed::Empty);
//!             }
//!             // parse the virtio-blk header with chain.reader(), submit readv/writev on
//!             // chain.writable_iovecs()/readable_iovecs() with user_data = slot
//!         }
//!         Ok(Processed::Throttled) // out of request slots: wait for completions
//!     }
//!     fn handle_event(&mut self, _fd: usize, vring: &mut Vring) -> Result<(), DeviceError> {
//!         // for each CQE: write the status byte, then
//!         // vring.add_used(self.chains[slot].id(), written)?; self.free.push(slot);
//!         # let _ = vring;
//!         Ok(())
//!     }
//!     fn drain(&mut self, _vring: &mut Vring) -> Result<(), DeviceError> {
//!         Ok(()) // submitted I/O completes through handle_event
//!     }
//! }
//!
//! impl Device for Blk {
//!     type Handler = BlkQueue;
//!     fn features(&self) -> u64 { 1 << 32 /* VERSION_1 */ | 1 << 34 /* RING_PACKED */ }
//!     fn protocol_features(&self) -> ProtocolFeatures {
//!         ProtocolFeatures::CONFIG | ProtocolFeatures::INFLIGHT_SHMFD
//!     }
//!     fn num_queues(&self) -> u16 { 4 }
//!     fn max_queue_size(&self) -> u16 { 1024 }
//!     fn read_config(&self, offset: u32, buf: &mut [u8]) -> Result<(), DeviceError> {
//!         # let _ = (offset, buf);
//!         Ok(()) // copy from struct virtio_blk_config
//!     }
//!     fn start_queue(&self, ctx: &QueueContext) -> Result<BlkQueue, DeviceError> {
//!         let n = ctx.size;
//!         Ok(BlkQueue {
//!             chains: (0..n).map(|_| DescriptorChain::new()).collect(),
//!             free: (0..n).collect(),
//!             completion_fd: -1, // create the queue's io_uring + eventfd here
//!         })
//!     }
//! }
//!
//! let (args, _rest) = BackendArgs::parse_known(std::env::args().skip(1)).unwrap();
//! if args.print_capabilities {
//!     Capabilities::new("block").feature("read-only").print().unwrap();
//!     return;
//! }
//! let device = Arc::new(Blk { capacity_sectors: 0.into() });
//! let mut server = Server::new(args.into_socket().unwrap(), device, ServerConfig::default()).unwrap();
//! let notifier = server.config_notifier(); // after a resize: notifier.notify_config_change()
//! let stop = server.shutdown_handle(); // call stop.shutdown() on SIGTERM
//! # let _ = (notifier, stop);
//! server.serve().unwrap();
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
mod sigbus;
mod worker;

#[cfg(test)]
#[cfg(feature = "driver")]
mod tests;

pub use backend_channel::ConfigNotifier;
pub use conventions::{BackendArgs, Capabilities, ConventionError};
pub use device::{Device, Processed, ProtocolFeatures, QueueContext, QueueHandler, Vring};
pub use error::{DeviceError, Error};
pub use server::{FrontendSocket, Server, ServerConfig, ShutdownHandle};

/// VHOST_USER_F_PROTOCOL_FEATURES: the virtio feature bit (30) vhost-user reuses to
/// announce protocol feature negotiation. The server adds it to the device's features.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
