// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
// Test helper shared by the device and switch-port tests: guest memory in one
// memfd-backed region at guest address 0, as a vhost-user frontend would share it.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

/// Size of the test guest's memory.
pub(crate) const MEM_SIZE: usize = 4 << 20;

/// Memfd-backed guest memory; the file stays open for `region`'s `mmap_handle`.
pub(crate) struct GuestMem {
    pub(crate) mem: GuestMemoryMmap<()>,
    _file: File,
}

impl GuestMem {
    pub(crate) fn new() -> Self {
        // SAFETY: a valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"vunet-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(MEM_SIZE as u64).unwrap();
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        GuestMem { mem, _file: file }
    }

    /// The region as `VHOST_USER_SET_MEM_TABLE` describes it.
    pub(crate) fn region(&self) -> VhostUserMemoryRegionInfo {
        let r = self.mem.iter().next().unwrap();
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: r.len(),
            userspace_addr: r.get_host_address(MemoryRegionAddress(0)).unwrap() as u64,
            mmap_offset: 0,
            mmap_handle: r.file_offset().unwrap().file().as_raw_fd(),
        }
    }

    /// The frontend's (our) virtual address of guest address `gpa`.
    pub(crate) fn user_addr(&self, gpa: u64) -> u64 {
        self.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
    }
}
