// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest-visible ring layouts (virtio 1.2 §2.7 and §2.8), as `ByteValued` structures.
//!
//! All multi-byte fields are little-endian in guest memory (virtio 1.x, §2.4).

use vm_memory::ByteValued;

/// Descriptor continues via the `next` field (split) or the next ring slot (packed).
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Buffer is device write-only (otherwise device read-only).
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Buffer holds a table of descriptors.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Packed: the AVAIL flag (bit 7), as a mask. `virtio-bindings` gives only the bit position.
pub const VIRTQ_DESC_F_AVAIL: u16 = 1 << 7;
/// Packed: the USED flag (bit 15), as a mask.
pub const VIRTQ_DESC_F_USED: u16 = 1 << 15;

/// Split avail ring flag: the driver does not want interrupts (§2.7.7).
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Split used ring flag: the device does not want notifications (§2.7.10).
pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

/// Packed event suppression: notifications enabled (§2.8.10).
pub const RING_EVENT_FLAGS_ENABLE: u16 = 0;
/// Packed event suppression: notifications disabled.
pub const RING_EVENT_FLAGS_DISABLE: u16 = 1;
/// Packed event suppression: notify at a specific descriptor (needs EVENT_IDX).
pub const RING_EVENT_FLAGS_DESC: u16 = 2;

/// A split-ring descriptor (§2.7.5), also the format of indirect tables in split rings.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SplitDescriptor {
    /// Guest-physical buffer address.
    pub addr: u64,
    /// Buffer length in bytes.
    pub len: u32,
    /// `VIRTQ_DESC_F_*` flags.
    pub flags: u16,
    /// Index of the next descriptor when `flags` has NEXT.
    pub next: u16,
}

// SAFETY: `SplitDescriptor` is `repr(C)`, 16 bytes with no padding, made only of integers,
// so every bit pattern is a valid value.
unsafe impl ByteValued for SplitDescriptor {}

/// A packed-ring descriptor (§2.8.13), also the format of packed indirect tables.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackedDescriptor {
    /// Guest-physical buffer address.
    pub addr: u64,
    /// Buffer length in bytes (used descriptors: bytes written).
    pub len: u32,
    /// Buffer ID.
    pub id: u16,
    /// `VIRTQ_DESC_F_*` flags, including AVAIL and USED.
    pub flags: u16,
}

// SAFETY: `PackedDescriptor` is `repr(C)`, 16 bytes with no padding, made only of integers,
// so every bit pattern is a valid value.
unsafe impl ByteValued for PackedDescriptor {}

/// A split used-ring element (§2.7.8).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsedElement {
    /// Head index of the used chain.
    pub id: u32,
    /// Bytes written into the chain's writable buffers.
    pub len: u32,
}

// SAFETY: `UsedElement` is `repr(C)`, two `u32`s with no padding; every bit pattern is valid.
unsafe impl ByteValued for UsedElement {}

/// A packed-ring event suppression structure (§2.8.10).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventSuppression {
    /// Bits 0..15: descriptor ring offset; bit 15: wrap counter.
    pub off_wrap: u16,
    /// `RING_EVENT_FLAGS_*` in bits 0..2.
    pub flags: u16,
}

// SAFETY: `EventSuppression` is `repr(C)`, two `u16`s with no padding; every bit pattern is
// valid.
unsafe impl ByteValued for EventSuppression {}

/// Size in bytes of one descriptor in either layout.
pub const DESCRIPTOR_SIZE: u64 = 16;

/// Byte size of a split descriptor table for `size` entries.
pub const fn split_desc_table_size(size: u16) -> u64 {
    DESCRIPTOR_SIZE * size as u64
}

/// Byte size of a split avail ring (flags, idx, ring, used_event) for `size` entries.
pub const fn split_avail_ring_size(size: u16) -> u64 {
    6 + 2 * size as u64
}

/// Byte size of a split used ring (flags, idx, ring, avail_event) for `size` entries.
pub const fn split_used_ring_size(size: u16) -> u64 {
    6 + 8 * size as u64
}

/// `vring_need_event` (§2.7.10): true if `event_idx` lies in `[old, new)` modulo 2^16,
/// i.e. the other side asked to be notified at an index that was just passed.
///
/// ```
/// use virtio_core::vring_need_event;
/// assert!(vring_need_event(5, 6, 5));
/// assert!(!vring_need_event(6, 6, 5));
/// assert!(vring_need_event(0xffff, 1, 0xfffe)); // across the u16 wrap
/// ```
#[inline]
pub const fn vring_need_event(event_idx: u16, new_idx: u16, old_idx: u16) -> bool {
    new_idx.wrapping_sub(event_idx).wrapping_sub(1) < new_idx.wrapping_sub(old_idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_spec_sizes() {
        assert_eq!(std::mem::size_of::<SplitDescriptor>(), 16);
        assert_eq!(std::mem::size_of::<PackedDescriptor>(), 16);
        assert_eq!(std::mem::size_of::<UsedElement>(), 8);
        assert_eq!(std::mem::size_of::<EventSuppression>(), 4);
    }

    #[test]
    fn flag_masks_match_virtio_bindings_bit_positions() {
        use virtio_bindings::virtio_ring as vr;
        assert_eq!(VIRTQ_DESC_F_AVAIL, 1 << vr::VRING_PACKED_DESC_F_AVAIL);
        assert_eq!(VIRTQ_DESC_F_USED, 1 << vr::VRING_PACKED_DESC_F_USED);
        assert_eq!(u32::from(VIRTQ_DESC_F_NEXT), vr::VRING_DESC_F_NEXT);
        assert_eq!(u32::from(VIRTQ_DESC_F_WRITE), vr::VRING_DESC_F_WRITE);
        assert_eq!(u32::from(VIRTQ_DESC_F_INDIRECT), vr::VRING_DESC_F_INDIRECT);
    }
}
