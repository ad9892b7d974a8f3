// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! # vhost-user-blk
//!
//! The device side of a virtio block device (virtio 1.2 §5.2), served over vhost-user by
//! `virtio_core::vhost_user`'s server.
//!
//! * [`backend`]: the disk image (regular file or block device), its geometry, serial,
//!   read-only and `O_DIRECT` modes, write cache mode and resize.
//! * [`device`]: the configuration space ([`device::VirtioBlkConfig`]), the offered
//!   feature bits, config reads and writes (including the `writeback` toggle of
//!   VIRTIO_BLK_F_CONFIG_WCE), and a factory for per-queue processors.
//! * [`request`]: parsing and validating one descriptor chain into a block request.
//! * [`io`]: the I/O engines, io_uring (one ring per queue, with a completion eventfd)
//!   and a synchronous fallback.
//! * [`queue`]: [`BlockQueue`], the per-queue processor: it pops chains, submits their
//!   I/O in batches straight from the guest's buffers, reaps completions in any order,
//!   writes status bytes and returns the chains to the driver.
//! * [`metrics`]: per-queue counters.
//! * [`vhost_user`]: the device's vhost-user face on `virtio_core::vhost_user`
//!   ([`BlkDevice`]): what the daemon serves, tested in-process through the server.
//!
//! Guest input is hostile: a malformed request ends with `VIRTIO_BLK_S_IOERR` or
//! `VIRTIO_BLK_S_UNSUPP` in its status byte (or, when it has no status byte at all, is
//! returned with a used length of 0), never with a panic.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod backend;
pub mod cli;
pub mod device;
pub mod io;
pub mod metrics;
pub mod queue;
mod ratelimit;
pub mod request;
pub mod vhost_user;

#[cfg(test)]
mod tests;

pub use backend::{BackendError, BackendOptions, BlockBackend, CacheMode};
pub use device::{BlockDevice, DeviceOptions, VirtioBlkConfig};
pub use io::{EngineChoice, EngineKind};
pub use metrics::{QueueMetrics, QueueMetricsSnapshot};
pub use queue::{BlockQueue, QueueError};
pub use vhost_user::{BlkDevice, BlkQueues};

/// Size of a virtio-blk sector: the unit of `sector` and `capacity`, whatever the logical
/// block size (§5.2.4).
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
