// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The frontend's "guest memory": one memfd mapped shared into this process, handed to
//! the backend in SET_MEM_TABLE, and its layout (rings, request headers, data buffers).

use std::fs::File;
use std::os::fd::FromRawFd;

use vhost::VhostUserMemoryRegionInfo;
use virtio_core::driver::ring_footprint;
use virtio_core::RingLayout;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::FrontendError;

/// Guest-physical address of the first byte of the frontend's memory. Deliberately not 0
/// and not the process address, so that a backend mixing up guest-physical addresses
/// (descriptors) and frontend virtual addresses (SET_VRING_ADDR) fails loudly.
pub const GUEST_BASE: u64 = 0x4000_0000;

/// Bytes per request of the per-slot metadata area: header at 0 (16 bytes), status at 16
/// (1 byte), indirect descriptor table at 64 (3 descriptors, 48 bytes).
pub(crate) const META_STRIDE: u64 = 128;
/// Offset of the status byte in a slot's metadata.
pub(crate) const META_STATUS: u64 = 16;
/// Offset of the indirect table in a slot's metadata.
pub(crate) const META_INDIRECT: u64 = 64;

const PAGE: u64 = 4096;

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Where one queue's parts live in guest memory.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QueueLayout {
    /// Base of the rings (4 KiB aligned).
    pub ring_base: u64,
    /// Base of the per-slot metadata.
    pub meta_base: u64,
    /// Base of the per-slot data buffers.
    pub data_base: u64,
}

/// The layout of the whole memory.
#[derive(Clone, Debug)]
pub(crate) struct MemoryLayout {
    /// One entry per queue.
    pub queues: Vec<QueueLayout>,
    /// Distance between two data buffers of a queue.
    pub data_stride: u64,
    /// Total size in bytes (a multiple of 4 KiB).
    pub size: u64,
}

impl MemoryLayout {
    /// Lays out `queues` queues of `size` entries in `layout`, each with `slots` request
    /// slots of up to `max_block` data bytes.
    pub fn new(layout: RingLayout, queues: u16, size: u16, slots: u16, max_block: u32) -> Self {
        let data_stride = align_up(u64::from(max_block).max(1), PAGE);
        let ring_len = ring_footprint(layout, size);
        let meta_len = align_up(u64::from(slots) * META_STRIDE, PAGE);
        let data_len = u64::from(slots) * data_stride;
        let mut at = GUEST_BASE;
        let mut qs = Vec::with_capacity(usize::from(queues));
        for _ in 0..queues {
            let ring_base = at;
            let meta_base = ring_base + ring_len;
            let data_base = meta_base + meta_len;
            at = data_base + data_len;
            qs.push(QueueLayout {
                ring_base,
                meta_base,
                data_base,
            });
        }
        MemoryLayout {
            queues: qs,
            data_stride,
            size: at - GUEST_BASE,
        }
    }
}

/// Creates `size` bytes of memfd-backed memory, mapped shared at [`GUEST_BASE`].
pub(crate) fn create_memory(size: u64) -> Result<GuestMemoryMmap, FrontendError> {
    let len = usize::try_from(size)
        .map_err(|_| FrontendError::Memory(format!("{size} bytes do not fit in usize")))?;
    // SAFETY: the name is a valid NUL-terminated string; memfd_create has no other
    // memory-safety preconditions.
    let fd = unsafe { libc::memfd_create(c"vring-frontend".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(FrontendError::Memory(format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| FrontendError::Memory(format!("ftruncate memfd to {size}: {e}")))?;
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(GUEST_BASE),
        len,
        Some(FileOffset::new(file, 0)),
    )])
    .map_err(|e| FrontendError::Memory(format!("mapping {size} bytes of memfd: {e}")))
}

/// The SET_MEM_TABLE regions describing `mem` (frontend virtual addresses, fds).
pub(crate) fn mem_table(
    mem: &GuestMemoryMmap,
) -> Result<Vec<VhostUserMemoryRegionInfo>, FrontendError> {
    mem.iter()
        .map(|r| {
            VhostUserMemoryRegionInfo::from_guest_region(r)
                .map_err(|e| FrontendError::Memory(format!("describing a region: {e}")))
        })
        .collect()
}

/// The frontend virtual address of guest-physical `gpa` (what SET_VRING_ADDR carries).
pub(crate) fn user_addr(mem: &GuestMemoryMmap, gpa: u64) -> Result<u64, FrontendError> {
    mem.get_host_address(GuestAddress(gpa))
        .map(|p| p as u64)
        .map_err(|e| FrontendError::Memory(format!("guest address {gpa:#x}: {e}")))
}
