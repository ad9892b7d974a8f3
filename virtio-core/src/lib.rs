// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! # virtio-core
//!
//! Device-side virtqueues, split (virtio 1.2 §2.7) and packed (§2.8), over `vm-memory`
//! guest memory, behind one [`Queue`] API chosen at run time from the negotiated
//! VIRTIO_F_RING_PACKED; validated [`DescriptorChain`]s (direct and indirect) with
//! zero-copy iovec export and `io::Read`/`io::Write` access; notification suppression
//! (EVENT_IDX and packed event suppression); and, with the `driver` feature, the driver
//! side of both layouts for tests, fuzzing and benchmarks.
//!
//! Guest input is hostile: every malformed ring or chain ends in a typed [`Error`], never
//! a panic, a silent end of chain, or an access outside the guest's memory regions.

#![deny(clippy::undocumented_unsafe_blocks)]

#[cfg(not(target_pointer_width = "64"))]
compile_error!("virtio-core maps guest memory with 64-bit host addresses");

/// Converts a `u64` known to describe host memory to `usize` (lossless on the 64-bit
/// hosts this crate supports; see the `compile_error!` above).
#[inline(always)]
#[allow(clippy::cast_possible_truncation)]
pub(crate) const fn usize_from(v: u64) -> usize {
    v as usize
}

pub mod chain;
pub mod desc;
#[cfg(feature = "driver")]
pub mod driver;
pub mod error;
pub mod memory;
pub mod queue;
pub mod vhost_user;

pub use chain::{merged_chains_needed, write_merged, DescriptorChain, Reader, Segment, Writer};
pub use desc::vring_need_event;
pub use error::{Error, Result};
pub use memory::{GuestMemoryView, HostRegion, MemoryError};
pub use queue::{Queue, QueueConfig, RecoveredChain, RingLayout, MAX_QUEUE_SIZE};
