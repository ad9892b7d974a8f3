// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A translation table from guest-physical addresses to host pointers.
//!
//! [`GuestMemoryView`] is built once per memory configuration (at start-up, and again
//! after every vhost-user `SET_MEM_TABLE`, `ADD_MEM_REG` or `REM_MEM_REG`). It keeps the
//! guest mappings alive for as long as any queue or descriptor chain holds it, so host
//! pointers and iovecs taken from it stay valid while I/O on them is in flight.
//!
//! Translation is a check of the caller's last-hit region followed, on a miss, by a
//! binary search over the (sorted, non-overlapping) regions: no allocation and no
//! walk over every region per descriptor.

use std::any::Any;
use std::sync::Arc;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// Errors building a [`GuestMemoryView`].
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum MemoryError {
    /// A region of the guest memory has no host mapping (e.g. it is not mmap-backed).
    #[error("guest memory region at {guest_start:#x} (len {len:#x}) has no host mapping")]
    NoHostMapping {
        /// Guest-physical start of the region.
        guest_start: u64,
        /// Length of the region in bytes.
        len: u64,
    },
    /// Two regions overlap in guest-physical address space.
    #[error("guest memory regions overlap at {0:#x}")]
    Overlap(u64),
    /// A region's end does not fit in 64 bits.
    #[error("guest memory region at {0:#x} overflows the address space")]
    Overflow(u64),
}

/// One guest memory region mapped into this process.
#[derive(Clone, Copy, Debug)]
pub struct HostRegion {
    /// Guest-physical address of the first byte.
    pub guest_start: u64,
    /// Length in bytes (never 0).
    pub len: u64,
    /// Host address of the first byte.
    pub host: *mut u8,
}

impl HostRegion {
    #[inline]
    fn contains(&self, gpa: u64) -> bool {
        gpa.wrapping_sub(self.guest_start) < self.len
    }
}

/// A guest-physical to host-virtual translation table that keeps the mappings alive.
pub struct GuestMemoryView {
    regions: Box<[HostRegion]>,
    // Owns the mappings that `regions` points into; never read, only kept alive.
    _owner: Arc<dyn Any + Send + Sync>,
}

// SAFETY: the raw pointers in `regions` point into mappings owned by `_owner`, which is
// `Send + Sync` and lives as long as this view. The view itself never dereferences them;
// users do so through unsafe code that follows the guest-memory rules of this crate.
unsafe impl Send for GuestMemoryView {}
// SAFETY: as above; the view is immutable after construction.
unsafe impl Sync for GuestMemoryView {}

impl std::fmt::Debug for GuestMemoryView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemoryView")
            .field("regions", &self.regions)
            .finish()
    }
}

impl GuestMemoryView {
    /// Builds the translation table for `mem`, keeping `mem` alive inside the view.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use vm_memory::{GuestAddress, GuestMemoryMmap};
    /// use virtio_core::GuestMemoryView;
    ///
    /// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x1000), 0x4000)]).unwrap();
    /// let view = GuestMemoryView::new(Arc::new(mem)).unwrap();
    /// assert!(view.translate(0x1000, 0x4000, &mut 0).is_some());
    /// assert!(view.translate(0x4fff, 2, &mut 0).is_none());
    /// ```
    pub fn new<M>(mem: Arc<M>) -> Result<Self, MemoryError>
    where
        M: GuestMemoryBackend + Send + Sync + 'static,
    {
        let mut regions = Vec::with_capacity(mem.num_regions());
        for region in mem.iter() {
            let guest_start = region.start_addr().0;
            let len = region.len();
            if len == 0 {
                continue;
            }
            guest_start
                .checked_add(len)
                .ok_or(MemoryError::Overflow(guest_start))?;
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| MemoryError::NoHostMapping { guest_start, len })?;
            regions.push(HostRegion {
                guest_start,
                len,
                host,
            });
        }
        Self::from_regions(regions, mem)
    }

    /// Builds a view from already mapped regions.
    ///
    /// # Safety
    ///
    /// Each region's `host..host + len` must be a readable and writable mapping that stays
    /// valid for as long as `owner` is alive.
    pub unsafe fn from_raw_regions(
        regions: Vec<HostRegion>,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> Result<Self, MemoryError> {
        Self::from_regions(regions, owner)
    }

    fn from_regions(
        mut regions: Vec<HostRegion>,
        owner: Arc<dyn Any + Send + Sync>,
    ) -> Result<Self, MemoryError> {
        regions.retain(|r| r.len != 0);
        regions.sort_by_key(|r| r.guest_start);
        for pair in regions.windows(2) {
            // Regions are sorted; `len` was checked not to overflow.
            if pair[0].guest_start + pair[0].len > pair[1].guest_start {
                return Err(MemoryError::Overlap(pair[1].guest_start));
            }
        }
        Ok(GuestMemoryView {
            regions: regions.into_boxed_slice(),
            _owner: owner,
        })
    }

    /// The mapped regions, sorted by guest address.
    pub fn regions(&self) -> &[HostRegion] {
        &self.regions
    }

    /// Finds the index of the region holding `gpa`, trying `hint` first.
    #[inline]
    pub fn region_index(&self, gpa: u64, hint: &mut usize) -> Option<usize> {
        if let Some(r) = self.regions.get(*hint) {
            if r.contains(gpa) {
                return Some(*hint);
            }
        }
        let idx = match self.regions.binary_search_by(|r| r.guest_start.cmp(&gpa)) {
            Ok(i) => i,
            Err(0) => return None,
            Err(i) => i - 1,
        };
        if self.regions[idx].contains(gpa) {
            *hint = idx;
            Some(idx)
        } else {
            None
        }
    }

    /// Translates `gpa..gpa + len` to a host pointer if the whole range lies inside one
    /// region. `len` 0 is checked as if it were 1 byte. `hint` caches the last region hit.
    #[inline]
    pub fn translate(&self, gpa: u64, len: u64, hint: &mut usize) -> Option<*mut u8> {
        let idx = self.region_index(gpa, hint)?;
        let r = &self.regions[idx];
        let offset = gpa - r.guest_start;
        if len > r.len - offset {
            return None;
        }
        // `offset < r.len`, and the mapping is `r.len` bytes long, so this stays in bounds
        // of the mapping (pointer arithmetic only; nothing is dereferenced here).
        Some(r.host.wrapping_add(crate::usize_from(offset)))
    }

    /// Calls `f(host_ptr, len, gpa)` for each piece of `gpa..gpa + len`, split at region
    /// boundaries. Fails (having called `f` for a prefix) if any byte is outside guest
    /// memory or the range overflows.
    #[inline]
    pub fn for_each_piece<E>(
        &self,
        mut gpa: u64,
        mut len: u64,
        hint: &mut usize,
        mut f: impl FnMut(*mut u8, u64, u64) -> Result<(), E>,
        outside: impl Fn() -> E,
    ) -> Result<(), E> {
        if gpa.checked_add(len).is_none() {
            return Err(outside());
        }
        while len > 0 {
            let idx = self.region_index(gpa, hint).ok_or_else(&outside)?;
            let r = &self.regions[idx];
            let offset = gpa - r.guest_start;
            let piece = len.min(r.len - offset);
            f(r.host.wrapping_add(crate::usize_from(offset)), piece, gpa)?;
            gpa += piece;
            len -= piece;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn view(ranges: &[(u64, usize)]) -> GuestMemoryView {
        let ranges: Vec<_> = ranges.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
        let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
        GuestMemoryView::new(Arc::new(mem)).unwrap()
    }

    #[test]
    fn translate_rejects_range_crossing_region_end() {
        let v = view(&[(0, 0x1000), (0x1000, 0x1000)]);
        assert!(v.translate(0xff0, 0x20, &mut 0).is_none());
        assert!(v.translate(0xff0, 0x10, &mut 0).is_some());
    }

    #[test]
    fn translate_rejects_gap_between_regions() {
        let v = view(&[(0, 0x1000), (0x3000, 0x1000)]);
        assert!(v.translate(0x2000, 1, &mut 0).is_none());
        let mut hint = 0;
        assert!(v.translate(0x3000, 1, &mut hint).is_some());
        assert_eq!(hint, 1);
    }

    #[test]
    fn for_each_piece_splits_at_region_boundary() {
        let v = view(&[(0, 0x1000), (0x1000, 0x1000)]);
        let mut pieces = Vec::new();
        v.for_each_piece(
            0xff0,
            0x20,
            &mut 0,
            |_, l, g| {
                pieces.push((g, l));
                Ok::<(), ()>(())
            },
            || (),
        )
        .unwrap();
        assert_eq!(pieces, vec![(0xff0, 0x10), (0x1000, 0x10)]);
    }

    #[test]
    fn for_each_piece_rejects_overflowing_range() {
        let v = view(&[(0, 0x1000)]);
        let r = v.for_each_piece(u64::MAX, 2, &mut 0, |_, _, _| Ok(()), || ());
        assert_eq!(r, Err(()));
    }
}
