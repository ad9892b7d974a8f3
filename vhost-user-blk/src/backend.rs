// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The disk behind the device: a regular file or a block device.
//!
//! [`BlockBackend`] owns the open file and everything the device reports about it:
//! capacity, logical and physical block sizes, serial (VIRTIO_BLK_T_GET_ID), read-only
//! mode and the write cache mode. It is shared (`Arc`) by every queue of the device;
//! everything that can change at run time (capacity after a resize, the cache mode
//! toggled by the driver through VIRTIO_BLK_F_CONFIG_WCE) is atomic.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;

use crate::io::AlignedBuf;
use crate::SECTOR_SIZE;

/// Length of the serial returned by VIRTIO_BLK_T_GET_ID (§5.2.6: 20 bytes, zero-padded).
pub const SERIAL_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Default logical block size.
pub const DEFAULT_LOGICAL_BLOCK_SIZE: u32 = 512;
/// Default physical block size (of regular files).
pub const DEFAULT_PHYSICAL_BLOCK_SIZE: u32 = 4096;
/// Largest logical or physical block size accepted.
pub const MAX_BLOCK_SIZE: u32 = 65536;

/// Size of the shared buffer of zeroes used to emulate WRITE_ZEROES with plain writes
/// when the file system supports neither hole punching nor `FALLOC_FL_ZERO_RANGE`.
pub(crate) const ZERO_BUFFER_LEN: usize = 256 * 1024;

mod ioctls {
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t): the size of a block device in bytes.
    vmm_sys_util::ioctl_ior_nr!(BLKGETSIZE64, 0x12, 114, u64);
}
use ioctls::BLKGETSIZE64;

/// The write cache mode of the device (§5.2.6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Writes complete once handed to the host (page cache or device cache); the driver
    /// makes them stable with VIRTIO_BLK_T_FLUSH.
    #[default]
    WriteBack,
    /// Writes complete once stable (each write is issued with `RWF_DSYNC`; discards and
    /// write-zeroes are followed by `fdatasync`).
    WriteThrough,
}

impl CacheMode {
    /// The value of the config space `writeback` field for this mode.
    pub fn writeback_byte(self) -> u8 {
        match self {
            CacheMode::WriteBack => 1,
            CacheMode::WriteThrough => 0,
        }
    }
}

impl FromStr for CacheMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "writeback" | "write-back" | "wb" => Ok(CacheMode::WriteBack),
            "writethrough" | "write-through" | "wt" => Ok(CacheMode::WriteThrough),
            _ => Err(format!(
                "unknown cache mode {s:?} (expected writeback or writethrough)"
            )),
        }
    }
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CacheMode::WriteBack => "writeback",
            CacheMode::WriteThrough => "writethrough",
        })
    }
}

/// How to open the disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendOptions {
    /// Path of a regular file or a block device.
    pub path: PathBuf,
    /// Open read-only and offer VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// Open with `O_DIRECT` (bypass the host page cache).
    pub direct: bool,
    /// Logical block size to report (power of two, 512..=65536). Default: the block
    /// device's (`BLKSSZGET`); for regular files 512, or the file system's direct I/O
    /// alignment when `direct` is set.
    pub logical_block_size: Option<u32>,
    /// Physical block size to report (power of two, at least the logical block size).
    /// Default: the block device's (`BLKPBSZGET`); 4096 for regular files.
    pub physical_block_size: Option<u32>,
    /// Serial returned by VIRTIO_BLK_T_GET_ID (at most 20 bytes; zero-padded).
    pub serial: Option<String>,
    /// Initial write cache mode.
    pub cache_mode: CacheMode,
}

/// Errors opening or querying the disk.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// `open(2)` failed.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// `fstat(2)` failed.
    #[error("cannot stat {path}: {source}")]
    Stat {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The path is neither a regular file nor a block device.
    #[error("{0} is neither a regular file nor a block device")]
    NotFileOrBlockDevice(PathBuf),
    /// A block device ioctl failed.
    #[error("{name} on {path} failed: {source}")]
    Ioctl {
        /// The ioctl.
        name: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A block size that is not a power of two in 512..=65536.
    #[error("invalid {what} block size {size}: must be a power of two from 512 to 65536")]
    InvalidBlockSize {
        /// `logical` or `physical`.
        what: &'static str,
        /// The size.
        size: u32,
    },
    /// A physical block size smaller than the logical one.
    #[error("physical block size {physical} is smaller than the logical block size {logical}")]
    PhysicalSmallerThanLogical {
        /// Physical block size.
        physical: u32,
        /// Logical block size.
        logical: u32,
    },
    /// With `O_DIRECT`, a logical block size smaller than the device's.
    #[error(
        "logical block size {requested} is smaller than the device's {device}, \
         which O_DIRECT requires"
    )]
    BlockSizeBelowDevice {
        /// Requested size.
        requested: u32,
        /// The device's logical block size.
        device: u32,
    },
    /// A serial longer than 20 bytes.
    #[error("serial is {0} bytes long; at most 20 are allowed")]
    SerialTooLong(usize),
}

/// Where a disk's data lives, which decides how the adaptive engine serves requests
/// (see [`crate::io::adaptive`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// A file on a memory file system (tmpfs, hugetlbfs, ramfs): every request is a
    /// memory copy that never waits on a device.
    Memory {
        /// The file system.
        fs: &'static str,
    },
    /// A buffered file or block device: the page cache answers some requests without
    /// waiting; the others wait on the device.
    PageCache {
        /// The file system (or "block device").
        fs: &'static str,
        /// A local disk file system (ext4, xfs, btrfs, f2fs) or a block device, where a
        /// buffered write of whole pages is a copy into the page cache unless the kernel
        /// throttles dirty pages; not a network or FUSE file system, whose writes wait
        /// on a server.
        local: bool,
    },
    /// Opened with `O_DIRECT`: every transfer waits on the device.
    Direct,
}

/// What a file system is, for [`Storage`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FsClass {
    Memory,
    LocalDisk,
    Other,
}

/// The file system `file` is on, by `fstatfs` magic.
fn file_system(file: &File) -> (&'static str, FsClass) {
    // SAFETY: `statfs` is plain old data for which all-zeroes is valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a live statfs buffer; the fd is owned by `file`.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return ("an unknown file system", FsClass::Other);
    }
    // f_type's C type differs between architectures; the magics fit in 32 bits.
    #[allow(clippy::unnecessary_cast, clippy::cast_possible_truncation)]
    match st.f_type as u32 {
        0x0102_1994 => ("tmpfs", FsClass::Memory),
        0x9584_58f6 => ("hugetlbfs", FsClass::Memory),
        0x8584_58f6 => ("ramfs", FsClass::Memory),
        0xef53 => ("ext4", FsClass::LocalDisk),
        0x5846_5342 => ("xfs", FsClass::LocalDisk),
        0x9123_683e => ("btrfs", FsClass::LocalDisk),
        0xf2f5_2010 => ("f2fs", FsClass::LocalDisk),
        0x6573_5546 => ("fuse", FsClass::Other),
        0x794c_7630 => ("overlayfs", FsClass::Other),
        0x6969 => ("nfs", FsClass::Other),
        0x2fc1_2fc1 => ("zfs", FsClass::Other),
        _ => ("another file system", FsClass::Other),
    }
}

/// An open disk. See the module documentation.
pub struct BlockBackend {
    file: File,
    path: PathBuf,
    read_only: bool,
    direct: bool,
    block_device: bool,
    capacity_bytes: AtomicU64,
    logical_block_size: u32,
    physical_block_size: u32,
    serial: [u8; SERIAL_LEN],
    writeback: AtomicBool,
    configured_cache_mode: CacheMode,
    punch_hole_unsupported: AtomicBool,
    zero_range_unsupported: AtomicBool,
    zero_buffer: OnceLock<AlignedBuf>,
    storage: Storage,
}

impl fmt::Debug for BlockBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockBackend")
            .field("path", &self.path)
            .field("read_only", &self.read_only)
            .field("direct", &self.direct)
            .field("block_device", &self.block_device)
            .field("capacity_bytes", &self.capacity_bytes())
            .field("logical_block_size", &self.logical_block_size)
            .field("physical_block_size", &self.physical_block_size)
            .field("cache_mode", &self.cache_mode())
            .finish()
    }
}

fn check_block_size(what: &'static str, size: u32) -> Result<u32, BackendError> {
    if size.is_power_of_two() && (512..=MAX_BLOCK_SIZE).contains(&size) {
        Ok(size)
    } else {
        Err(BackendError::InvalidBlockSize { what, size })
    }
}

fn ioctl_error(name: &'static str, path: &Path) -> BackendError {
    BackendError::Ioctl {
        name,
        path: path.to_path_buf(),
        source: io::Error::last_os_error(),
    }
}

/// Size of a block device in bytes.
fn block_device_size(file: &File, path: &Path) -> Result<u64, BackendError> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to `size`,
    // a live u64; the fd is owned by `file`.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64(), &mut size as *mut u64) };
    if ret < 0 {
        return Err(ioctl_error("BLKGETSIZE64", path));
    }
    Ok(size)
}

/// Logical and physical block sizes of a block device.
fn block_device_block_sizes(file: &File, path: &Path) -> Result<(u32, u32), BackendError> {
    let mut logical: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to `logical`.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut logical) };
    if ret < 0 {
        return Err(ioctl_error("BLKSSZGET", path));
    }
    let mut physical: libc::c_uint = 0;
    // SAFETY: BLKPBSZGET writes one unsigned int through the pointer, which points to
    // `physical`.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKPBSZGET, &mut physical) };
    if ret < 0 {
        return Err(ioctl_error("BLKPBSZGET", path));
    }
    let logical = u32::try_from(logical).unwrap_or(0);
    Ok((logical, physical))
}

/// The file system's offset alignment for `O_DIRECT` on this file (statx
/// `STATX_DIOALIGN`, Linux 6.1+), if it reports one.
fn file_dio_alignment(file: &File) -> Option<u32> {
    // SAFETY: `statx` is a plain-old-data C struct for which all-zeroes is valid.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: `empty` is a valid NUL-terminated string, `stx` a live statx buffer, and
    // AT_EMPTY_PATH makes the call describe the open fd itself.
    let ret = unsafe {
        libc::statx(
            file.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if ret != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some(stx.stx_dio_offset_align)
}

impl BlockBackend {
    /// Opens the disk described by `opts` and reads its geometry.
    pub fn open(opts: &BackendOptions) -> Result<Self, BackendError> {
        let serial = match &opts.serial {
            Some(s) if s.len() > SERIAL_LEN => return Err(BackendError::SerialTooLong(s.len())),
            Some(s) => {
                let mut serial = [0u8; SERIAL_LEN];
                serial[..s.len()].copy_from_slice(s.as_bytes());
                serial
            }
            None => [0u8; SERIAL_LEN],
        };
        if let Some(size) = opts.logical_block_size {
            check_block_size("logical", size)?;
        }
        if let Some(size) = opts.physical_block_size {
            check_block_size("physical", size)?;
        }

        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        let mut flags = libc::O_CLOEXEC;
        if opts.direct {
            flags |= libc::O_DIRECT;
        }
        oo.custom_flags(flags);
        let file = oo.open(&opts.path).map_err(|source| BackendError::Open {
            path: opts.path.clone(),
            source,
        })?;
        let meta = file.metadata().map_err(|source| BackendError::Stat {
            path: opts.path.clone(),
            source,
        })?;
        let file_type = meta.file_type();

        let (block_device, capacity_bytes, logical, physical) = if file_type.is_block_device() {
            let size = block_device_size(&file, &opts.path)?;
            let (dev_logical, dev_physical) = block_device_block_sizes(&file, &opts.path)?;
            let logical = match opts.logical_block_size {
                Some(l) if opts.direct && l < dev_logical => {
                    return Err(BackendError::BlockSizeBelowDevice {
                        requested: l,
                        device: dev_logical,
                    })
                }
                Some(l) => l,
                None => check_block_size("logical", dev_logical)?,
            };
            let physical = match opts.physical_block_size {
                Some(p) => p,
                None => check_block_size("physical", dev_physical.max(logical))?,
            };
            (true, size, logical, physical)
        } else if file_type.is_file() {
            let logical = match opts.logical_block_size {
                Some(l) => l,
                None if opts.direct => file_dio_alignment(&file)
                    .filter(|a| a.is_power_of_two() && *a <= MAX_BLOCK_SIZE)
                    .unwrap_or(DEFAULT_LOGICAL_BLOCK_SIZE)
                    .max(DEFAULT_LOGICAL_BLOCK_SIZE),
                None => DEFAULT_LOGICAL_BLOCK_SIZE,
            };
            let physical = opts
                .physical_block_size
                .unwrap_or(DEFAULT_PHYSICAL_BLOCK_SIZE.max(logical));
            (false, meta.len(), logical, physical)
        } else {
            return Err(BackendError::NotFileOrBlockDevice(opts.path.clone()));
        };
        if physical < logical {
            return Err(BackendError::PhysicalSmallerThanLogical { physical, logical });
        }
        if capacity_bytes % u64::from(logical) != 0 {
            log::warn!(
                "{}: size {capacity_bytes} is not a multiple of the logical block size \
                 {logical}; the tail is not addressable",
                opts.path.display()
            );
        }

        let storage = if opts.direct {
            Storage::Direct
        } else if block_device {
            Storage::PageCache {
                fs: "block device",
                local: true,
            }
        } else {
            match file_system(&file) {
                (fs, FsClass::Memory) => Storage::Memory { fs },
                (fs, class) => Storage::PageCache {
                    fs,
                    local: class == FsClass::LocalDisk,
                },
            }
        };
        Ok(BlockBackend {
            storage,
            file,
            path: opts.path.clone(),
            read_only: opts.read_only,
            direct: opts.direct,
            block_device,
            capacity_bytes: AtomicU64::new(capacity_bytes),
            logical_block_size: logical,
            physical_block_size: physical,
            serial,
            writeback: AtomicBool::new(opts.cache_mode == CacheMode::WriteBack),
            configured_cache_mode: opts.cache_mode,
            punch_hole_unsupported: AtomicBool::new(false),
            zero_range_unsupported: AtomicBool::new(false),
            zero_buffer: OnceLock::new(),
        })
    }

    /// Where the disk's data lives.
    pub fn storage(&self) -> Storage {
        self.storage
    }

    /// The path the disk was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// True if opened read-only (VIRTIO_BLK_F_RO is offered).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// True if opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// True for a block device, false for a regular file.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// Usable size in bytes (as last read; see [`Self::refresh_capacity`]).
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes.load(Ordering::Relaxed)
    }

    /// Capacity in 512-byte sectors, rounded down to whole logical blocks (the value
    /// of the config space `capacity` field).
    pub fn capacity_sectors(&self) -> u64 {
        let bytes = self.capacity_bytes();
        (bytes - bytes % u64::from(self.logical_block_size)) / SECTOR_SIZE
    }

    /// Logical block size in bytes (config `blk_size`).
    pub fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }

    /// Physical block size in bytes (config `topology.physical_block_exp`).
    pub fn physical_block_size(&self) -> u32 {
        self.physical_block_size
    }

    /// The 20-byte, zero-padded serial.
    pub fn serial(&self) -> &[u8; SERIAL_LEN] {
        &self.serial
    }

    /// The current write cache mode.
    pub fn cache_mode(&self) -> CacheMode {
        if self.writeback.load(Ordering::Relaxed) {
            CacheMode::WriteBack
        } else {
            CacheMode::WriteThrough
        }
    }

    /// The cache mode the backend was opened with (what a device reset returns to).
    pub fn configured_cache_mode(&self) -> CacheMode {
        self.configured_cache_mode
    }

    /// Switches the write cache mode; requests started afterwards follow the new mode.
    pub fn set_cache_mode(&self, mode: CacheMode) {
        let old = self.cache_mode();
        self.writeback
            .store(mode == CacheMode::WriteBack, Ordering::Relaxed);
        if old != mode {
            log::info!("{}: write cache mode {old} -> {mode}", self.path.display());
        }
    }

    /// Reads the size of the disk again (after the image or device was resized) and
    /// returns the new capacity in sectors. The caller announces the change to the
    /// driver with a configuration change notification.
    pub fn refresh_capacity(&self) -> io::Result<u64> {
        let bytes = if self.block_device {
            block_device_size(&self.file, &self.path).map_err(|e| match e {
                BackendError::Ioctl { source, .. } => source,
                other => io::Error::other(other.to_string()),
            })?
        } else {
            self.file.metadata()?.len()
        };
        let old = self.capacity_bytes.swap(bytes, Ordering::Relaxed);
        if old != bytes {
            log::info!("{}: capacity {old} -> {bytes} bytes", self.path.display());
        }
        Ok(self.capacity_sectors())
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub(crate) fn punch_hole_unsupported(&self) -> bool {
        self.punch_hole_unsupported.load(Ordering::Relaxed)
    }

    pub(crate) fn set_punch_hole_unsupported(&self) {
        if !self.punch_hole_unsupported.swap(true, Ordering::Relaxed) {
            log::info!(
                "{}: hole punching is not supported; discards are ignored",
                self.path.display()
            );
        }
    }

    pub(crate) fn zero_range_unsupported(&self) -> bool {
        self.zero_range_unsupported.load(Ordering::Relaxed)
    }

    pub(crate) fn set_zero_range_unsupported(&self) {
        if !self.zero_range_unsupported.swap(true, Ordering::Relaxed) {
            log::info!(
                "{}: FALLOC_FL_ZERO_RANGE is not supported; write-zeroes falls back to writes",
                self.path.display()
            );
        }
    }

    /// A shared, never written buffer of zeroes, aligned for `O_DIRECT`.
    pub(crate) fn zero_buffer(&self) -> &AlignedBuf {
        self.zero_buffer.get_or_init(|| {
            AlignedBuf::new(
                ZERO_BUFFER_LEN,
                (self.logical_block_size as usize).max(4096),
            )
        })
    }
}

impl AsRawFd for BlockBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
