// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Errors of ring configuration and descriptor-chain parsing.

use crate::memory::MemoryError;

/// What went wrong configuring or using a virtqueue.
///
/// Any error returned by [`crate::Queue::pop`] leaves the queue *broken*: the ring can no
/// longer be trusted and the device should report `DEVICE_NEEDS_RESET` (§2.1.2). Errors
/// never leave the queue in a state where guest memory outside the guest's regions could
/// be touched.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum Error {
    /// Split queue size not a power of two, or any size 0 or above 32768.
    #[error("invalid queue size {size} for the {layout} layout")]
    InvalidSize {
        /// Requested size.
        size: u32,
        /// `split` or `packed`.
        layout: &'static str,
    },
    /// A ring area is misaligned (§2.7: desc 16, avail 2, used 4; §2.8: ring 16, events 4).
    #[error("{area} at {addr:#x} is not aligned to {align} bytes")]
    Misaligned {
        /// Which area.
        area: &'static str,
        /// Its guest address.
        addr: u64,
        /// Required alignment.
        align: u64,
    },
    /// A ring area is not inside one guest memory region.
    #[error("{area} at {addr:#x} (len {len:#x}) is not inside one guest memory region")]
    AreaOutsideMemory {
        /// Which area.
        area: &'static str,
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// A ring state (vhost-user vring base) that names a position outside the ring.
    #[error("ring base {0:#x} is out of range for this queue")]
    InvalidRingBase(u32),
    /// The driver advanced the avail index by more than the queue size (§2.7.13.3).
    #[error("avail idx {avail_idx} is more than the queue size ahead of next_avail {next_avail}")]
    AvailIndexOverrun {
        /// avail->idx as read.
        avail_idx: u16,
        /// The device's next avail position.
        next_avail: u16,
    },
    /// A split avail ring entry names a descriptor index outside the table.
    #[error("head index {head} is outside the descriptor table of size {size}")]
    HeadOutOfRange {
        /// The index read.
        head: u16,
        /// The queue size.
        size: u16,
    },
    /// A descriptor's `next` index is outside its table.
    #[error("descriptor {index} points to next {next}, outside its table of {table_len}")]
    NextOutOfRange {
        /// Index of the descriptor holding `next`.
        index: u16,
        /// The `next` value.
        next: u16,
        /// Size of the table.
        table_len: u32,
    },
    /// More descriptors in a chain than the queue size (or indirect table) allows; also
    /// catches loops.
    #[error("descriptor chain is longer than {max} descriptors")]
    ChainTooLong {
        /// The limit.
        max: u32,
    },
    /// The sum of buffer lengths exceeds 2^32 - 1 bytes (§2.7.5.3.1).
    #[error("descriptor chain is larger than 4 GiB")]
    ChainTooLarge,
    /// A device-readable descriptor follows a device-writable one (§2.7.4.2).
    #[error("readable descriptor after a writable one at guest address {addr:#x}")]
    ReadableAfterWritable {
        /// Guest address of the offending buffer.
        addr: u64,
    },
    /// A descriptor has both INDIRECT and NEXT (§2.7.5.3.1).
    #[error("descriptor has both INDIRECT and NEXT")]
    IndirectWithNext,
    /// A descriptor inside an indirect table has INDIRECT (§2.7.5.3.1).
    #[error("nested indirect descriptor")]
    NestedIndirect,
    /// INDIRECT used though VIRTIO_F_INDIRECT_DESC was not negotiated.
    #[error("indirect descriptor but VIRTIO_F_INDIRECT_DESC was not negotiated")]
    IndirectNotNegotiated,
    /// An indirect table whose length is 0, not a multiple of 16, or too large.
    #[error("indirect table length {0} is not a non-zero multiple of 16 up to 65535 entries")]
    InvalidIndirectLength(u32),
    /// A buffer address + length overflows or is not entirely inside guest memory.
    #[error("buffer at {addr:#x} (len {len:#x}) is outside guest memory")]
    BufferOutsideMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// Packed: the driver made a buffer available whose ID is still in use (§2.8.5).
    #[error("buffer id {0} is already in flight")]
    BufferIdInUse(u16),
    /// Split: the driver made a head available again while it is still in flight.
    #[error("head {0} is made available again while still in flight")]
    HeadInUse(u16),
    /// The driver made more chains available than the queue size while none were used
    /// (§2.7.13.3, §2.8.21: the ring holds at most `size` buffers).
    #[error("more than {0} chains in flight")]
    TooManyInFlight(u16),
    /// `add_used` for a head or buffer ID that is not in flight (a device bug).
    #[error("add_used for id {0}, which is not in flight")]
    NotInFlight(u16),

    /// A recovered split chain (inflight area) when the restored ring base counts no
    /// chain in flight whose head is unknown.
    #[error("recovered head {0} is not covered by the restored ring base")]
    RecoveredNotInFlight(u16),

    /// A recovered packed chain whose recorded descriptor copies end before a
    /// descriptor without NEXT.
    #[error("recovered chain is truncated after {slots} recorded descriptors")]
    RecoveredChainTruncated {
        /// Recorded descriptors walked.
        slots: u16,
    },

    /// A recovered packed chain that ends before its recorded descriptors do.
    #[error("recovered chain of buffer id {id} ends after {walked} of its {recorded} recorded descriptors")]
    RecoveredChainMismatch {
        /// The buffer ID.
        id: u16,
        /// Descriptors recorded.
        recorded: usize,
        /// Descriptors the chain took.
        walked: u16,
    },

    /// A recovered chain of the other ring layout.
    #[error("recovered chain does not match the queue's ring layout")]
    RecoveredLayoutMismatch,

    /// The queue was broken by an earlier error and must be reset.
    #[error("queue is broken by an earlier error and needs a reset")]
    Broken,
    /// Building the guest memory view failed.
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
}

/// Result type of virtio-core's ring operations.
pub type Result<T> = std::result::Result<T, Error>;
