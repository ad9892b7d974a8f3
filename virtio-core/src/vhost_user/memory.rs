// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The frontend's memory table: regions mapped from the file descriptors of
//! `SET_MEM_TABLE` / `ADD_MEM_REG`, and the [`GuestMemoryView`] built over them.
//!
//! Each region is mapped once and shared (`Arc`) between successive tables, so adding or
//! removing one region does not remap the others. A view keeps the mappings it was built
//! from alive, so chains in flight stay valid across table changes.

use std::any::Any;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserMemoryRegion;

use super::error::{Error, Result};
use super::sigbus::Registration;
use crate::memory::{GuestMemoryView, HostRegion};

/// Most regions the table accepts (GET_MAX_MEM_SLOTS; QEMU caps it at its own limit).
pub(crate) const MAX_MEM_SLOTS: u64 = 509;

/// A region as the frontend describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RegionDesc {
    pub guest_addr: u64,
    pub size: u64,
    pub user_addr: u64,
    pub mmap_offset: u64,
}

impl From<&VhostUserMemoryRegion> for RegionDesc {
    fn from(r: &VhostUserMemoryRegion) -> Self {
        RegionDesc {
            guest_addr: r.guest_phys_addr,
            size: r.memory_size,
            user_addr: r.user_addr,
            mmap_offset: r.mmap_offset,
        }
    }
}

impl RegionDesc {
    fn refuse(&self, why: impl Into<String>) -> Error {
        Error::BadMemoryRegion {
            guest_addr: self.guest_addr,
            size: self.size,
            user_addr: self.user_addr,
            why: why.into(),
        }
    }

    /// Checks the region is non-empty and none of its ranges overflow.
    pub fn validate(&self) -> Result<()> {
        if self.size == 0 {
            return Err(self.refuse("size is 0"));
        }
        if self.guest_addr.checked_add(self.size).is_none() {
            return Err(self.refuse("guest range overflows"));
        }
        if self.user_addr.checked_add(self.size).is_none() {
            return Err(self.refuse("user address range overflows"));
        }
        if self.mmap_offset.checked_add(self.size).is_none() {
            return Err(self.refuse("mmap offset + size overflows"));
        }
        Ok(())
    }
}

/// One mapped region.
pub(crate) struct MappedRegion {
    desc: RegionDesc,
    map_base: *mut libc::c_void,
    map_len: usize,
    /// The mapping's entry in the SIGBUS registry (see `sigbus`).
    registration: Option<Registration>,
}

// SAFETY: the mapping is plain shared memory owned by this value; the pointer has no
// thread affinity, and the value never dereferences it itself.
unsafe impl Send for MappedRegion {}
// SAFETY: as above; the value is immutable after construction.
unsafe impl Sync for MappedRegion {}

impl Drop for MappedRegion {
    fn drop(&mut self) {
        // Out of the SIGBUS registry before the address range can be reused.
        drop(self.registration.take());
        // SAFETY: `map_base..map_base + map_len` is a mapping created by `map` and owned by
        // this value; every view using it holds an `Arc` of this value, so none remains.
        if unsafe { libc::munmap(self.map_base, self.map_len) } != 0 {
            log::warn!(
                "munmap of guest memory region at guest {:#x} failed: {}",
                self.desc.guest_addr,
                std::io::Error::last_os_error()
            );
        }
    }
}

impl std::fmt::Debug for MappedRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedRegion")
            .field("desc", &self.desc)
            .field("map_len", &self.map_len)
            .finish()
    }
}

impl MappedRegion {
    /// Maps `desc` from `fd`. The mapping starts at file offset 0 and covers
    /// `mmap_offset + size` bytes (as libvhost-user does), so hugetlbfs files, whose
    /// mappings must start at a huge-page-aligned offset, work for any `mmap_offset`.
    pub fn map(desc: RegionDesc, fd: &OwnedFd) -> Result<Self> {
        desc.validate()?;
        let len64 = desc.mmap_offset + desc.size; // checked by validate()
        let map_len = usize::try_from(len64).map_err(|_| desc.refuse("too large to map"))?;
        // Refuse a region that extends past the end of a regular file: touching it would
        // raise SIGBUS in this process.
        // SAFETY: `st` is a valid out-pointer for fstat; `fd` is an open descriptor.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(desc.refuse(format!(
                "fstat of its file descriptor failed: {}",
                std::io::Error::last_os_error()
            )));
        }
        if st.st_mode & libc::S_IFMT == libc::S_IFREG && (st.st_size as u64) < len64 {
            return Err(desc.refuse(format!(
                "its file is {} bytes, shorter than mmap offset + size ({len64})",
                st.st_size
            )));
        }
        // SAFETY: a fresh shared mapping chosen by the kernel (no fixed address), so no
        // existing memory is affected; the result is checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(Error::Mmap {
                what: "guest memory region",
                len: len64,
                source: std::io::Error::last_os_error(),
            });
        }
        log_seals(fd, &desc);
        Ok(MappedRegion {
            desc,
            map_base: base,
            map_len,
            registration: Registration::new(base, map_len),
        })
    }

    /// True once the frontend shrank the file under this mapping and an access faulted
    /// (the mapping is now anonymous memory; see `sigbus`).
    pub fn poisoned(&self) -> bool {
        self.registration
            .as_ref()
            .is_some_and(Registration::poisoned)
    }

    pub fn desc(&self) -> &RegionDesc {
        &self.desc
    }

    fn host_region(&self) -> HostRegion {
        HostRegion {
            guest_start: self.desc.guest_addr,
            len: self.desc.size,
            // mmap_offset + size == map_len: in bounds.
            host: self
                .map_base
                .cast::<u8>()
                .wrapping_add(crate::usize_from(self.desc.mmap_offset)),
        }
    }
}

/// Logs (debug) whether the region's file is sealed against shrinking. Unsealed memory
/// is accepted (most frontends' is): a truncation is survived through `sigbus`.
fn log_seals(fd: &OwnedFd, desc: &RegionDesc) {
    // SAFETY: F_GET_SEALS takes no argument; it fails (EINVAL) on non-memfd files.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals >= 0 && seals & libc::F_SEAL_SHRINK != 0 {
        log::debug!(
            "memory region at guest {:#x}: sealed against shrinking",
            desc.guest_addr
        );
    } else {
        log::debug!(
            "memory region at guest {:#x}: not sealed against shrinking (a truncation is \
             caught as SIGBUS and closes the connection)",
            desc.guest_addr
        );
    }
}

/// The current memory table.
#[derive(Clone)]
pub(crate) struct MemoryTable {
    regions: Arc<Vec<Arc<MappedRegion>>>,
    view: Arc<GuestMemoryView>,
}

impl std::fmt::Debug for MemoryTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.regions().iter().map(|r| r.desc()))
            .finish()
    }
}

impl MemoryTable {
    /// Builds a table (and its view) from mapped regions.
    pub fn new(regions: Vec<Arc<MappedRegion>>) -> Result<Self> {
        if regions.len() as u64 > MAX_MEM_SLOTS {
            return Err(Error::BadMemoryRegion {
                guest_addr: 0,
                size: 0,
                user_addr: 0,
                why: format!(
                    "{} regions, more than the {MAX_MEM_SLOTS} slots offered",
                    regions.len()
                ),
            });
        }
        let host: Vec<HostRegion> = regions.iter().map(|r| r.host_region()).collect();
        let regions = Arc::new(regions);
        let owner: Arc<dyn Any + Send + Sync> = regions.clone();
        // SAFETY: each host region lies inside a live shared mapping (`map` checked its
        // length) owned by an `Arc<MappedRegion>` in `owner`, which the view keeps alive.
        let view = unsafe { GuestMemoryView::from_raw_regions(host, owner) }?;
        Ok(MemoryTable {
            regions,
            view: Arc::new(view),
        })
    }

    /// The guest memory view over the table.
    pub fn view(&self) -> &Arc<GuestMemoryView> {
        &self.view
    }

    /// The regions.
    pub fn regions(&self) -> &[Arc<MappedRegion>] {
        &self.regions
    }

    /// The first region whose file the frontend shrank (see `sigbus`).
    pub fn poisoned_region(&self) -> Option<&RegionDesc> {
        self.regions.iter().find(|r| r.poisoned()).map(|r| r.desc())
    }

    /// Translates a frontend virtual address to a guest-physical address.
    pub fn user_to_guest(&self, user_addr: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let d = r.desc();
            let off = user_addr.checked_sub(d.user_addr)?;
            (off < d.size).then(|| d.guest_addr + off)
        })
    }

    /// A table with `region` added.
    pub fn with_added(&self, region: MappedRegion) -> Result<Self> {
        let mut regions: Vec<_> = self.regions.iter().cloned().collect();
        regions.push(Arc::new(region));
        Self::new(regions)
    }

    /// A table without the region matching `desc` (by guest address, size and user address;
    /// the mmap offset is ignored, as the protocol says).
    pub fn with_removed(&self, desc: &RegionDesc) -> Result<Self> {
        let mut regions: Vec<_> = self.regions.iter().cloned().collect();
        let before = regions.len();
        regions.retain(|r| {
            let d = r.desc();
            !(d.guest_addr == desc.guest_addr
                && d.size == desc.size
                && d.user_addr == desc.user_addr)
        });
        if regions.len() == before {
            return Err(desc.refuse("no such region in the memory table"));
        }
        Self::new(regions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    pub(crate) fn memfd(len: usize) -> OwnedFd {
        // SAFETY: the name is a valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"test-guest-mem".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh descriptor we own.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let mut f = std::fs::File::from(fd);
        f.write_all(&vec![0u8; len]).unwrap();
        OwnedFd::from(f)
    }

    #[test]
    fn maps_and_translates_user_addresses() {
        let fd = memfd(0x3000);
        let desc = RegionDesc {
            guest_addr: 0x10000,
            size: 0x2000,
            user_addr: 0x7f00_0000_0000,
            mmap_offset: 0x1000,
        };
        let table =
            MemoryTable::new(vec![Arc::new(MappedRegion::map(desc, &fd).unwrap())]).unwrap();
        assert_eq!(table.user_to_guest(0x7f00_0000_0010), Some(0x10010));
        assert_eq!(table.user_to_guest(0x7f00_0000_2000), None);
        assert!(table.view().translate(0x11fff, 1, &mut 0).is_some());
        assert!(table.view().translate(0x12000, 1, &mut 0).is_none());
    }

    #[test]
    fn refuses_region_past_end_of_file_and_empty_region() {
        let fd = memfd(0x1000);
        let desc = RegionDesc {
            guest_addr: 0,
            size: 0x2000,
            user_addr: 0,
            mmap_offset: 0,
        };
        assert!(matches!(
            MappedRegion::map(desc, &fd),
            Err(Error::BadMemoryRegion { .. })
        ));
        let empty = RegionDesc { size: 0, ..desc };
        assert!(MappedRegion::map(empty, &fd).is_err());
        let overflow = RegionDesc {
            guest_addr: u64::MAX,
            size: 0x1000,
            ..desc
        };
        assert!(MappedRegion::map(overflow, &fd).is_err());
    }

    #[test]
    fn add_and_remove_regions() {
        let fd = memfd(0x2000);
        let a = RegionDesc {
            guest_addr: 0,
            size: 0x1000,
            user_addr: 0x1000_0000,
            mmap_offset: 0,
        };
        let b = RegionDesc {
            guest_addr: 0x1000,
            size: 0x1000,
            user_addr: 0x2000_0000,
            mmap_offset: 0x1000,
        };
        let t = MemoryTable::new(vec![Arc::new(MappedRegion::map(a, &fd).unwrap())]).unwrap();
        let t2 = t.with_added(MappedRegion::map(b, &fd).unwrap()).unwrap();
        assert_eq!(t2.regions().len(), 2);
        assert!(t2.view().translate(0x1800, 1, &mut 0).is_some());
        let overlapping = RegionDesc {
            guest_addr: 0x800,
            ..b
        };
        assert!(t2
            .with_added(MappedRegion::map(overlapping, &fd).unwrap())
            .is_err());
        let t3 = t2.with_removed(&a).unwrap();
        assert_eq!(t3.regions().len(), 1);
        assert!(t3.with_removed(&a).is_err());
        // The old table's view still maps the removed region.
        assert!(t2.view().translate(0, 1, &mut 0).is_some());
    }
}
