// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-blk device model: feature bits, configuration space, and the factory of
//! per-queue processors.
//!
//! [`BlockDevice`] is shared by the vhost-user glue's control thread (features, config
//! reads and writes, resize) and its queue workers (each owns one [`BlockQueue`] made by
//! [`BlockDevice::create_queue`]). All its methods take `&self`.

use std::io;
use std::mem::{offset_of, size_of};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::{VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::ByteValued;

use crate::backend::{BlockBackend, CacheMode};
use crate::io::EngineKind;
use crate::metrics::QueueMetrics;
use crate::queue::BlockQueue;
use crate::request::SegmentLimits;
use crate::SECTOR_SIZE;

/// `struct virtio_blk_geometry` (VIRTIO_BLK_F_GEOMETRY, not offered).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioBlkGeometry {
    /// Cylinders.
    pub cylinders: u16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors: u8,
}

/// `struct virtio_blk_topology` (VIRTIO_BLK_F_TOPOLOGY).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioBlkTopology {
    /// log2 of logical blocks per physical block.
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size, in logical blocks.
    pub min_io_size: u16,
    /// Optimal (suggested maximum) I/O size, in logical blocks.
    pub opt_io_size: u32,
}

/// The virtio-blk configuration space (`struct virtio_blk_config`, virtio 1.2 §5.2.4).
///
/// Multi-byte fields hold little-endian values (as built by [`BlockDevice::config`]),
/// so [`ByteValued::as_slice`] is the wire layout on any host.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioBlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Largest segment size (VIRTIO_BLK_F_SIZE_MAX).
    pub size_max: u32,
    /// Most data segments per request (VIRTIO_BLK_F_SEG_MAX).
    pub seg_max: u32,
    /// Geometry (VIRTIO_BLK_F_GEOMETRY).
    pub geometry: VirtioBlkGeometry,
    /// Logical block size (VIRTIO_BLK_F_BLK_SIZE).
    pub blk_size: u32,
    /// Topology (VIRTIO_BLK_F_TOPOLOGY).
    pub topology: VirtioBlkTopology,
    /// Write cache mode, 1 writeback, 0 writethrough (VIRTIO_BLK_F_CONFIG_WCE).
    pub writeback: u8,
    /// Reserved.
    pub unused0: u8,
    /// Number of request queues (VIRTIO_BLK_F_MQ).
    pub num_queues: u16,
    /// Most sectors per discard segment (VIRTIO_BLK_F_DISCARD).
    pub max_discard_sectors: u32,
    /// Most segments per discard request.
    pub max_discard_seg: u32,
    /// Discard alignment, in sectors.
    pub discard_sector_alignment: u32,
    /// Most sectors per write-zeroes segment (VIRTIO_BLK_F_WRITE_ZEROES).
    pub max_write_zeroes_sectors: u32,
    /// Most segments per write-zeroes request.
    pub max_write_zeroes_seg: u32,
    /// 1 if a write-zeroes request with UNMAP may deallocate.
    pub write_zeroes_may_unmap: u8,
    /// Reserved.
    pub unused1: [u8; 3],
    /// Most sectors per secure-erase segment (VIRTIO_BLK_F_SECURE_ERASE, not offered).
    pub max_secure_erase_sectors: u32,
    /// Most segments per secure-erase request.
    pub max_secure_erase_seg: u32,
    /// Secure-erase alignment, in sectors.
    pub secure_erase_sector_alignment: u32,
}

// SAFETY: repr(C) structs of integer fields only, laid out without padding (the size
// and offsets are checked below against the virtio 1.2 layout); any bit pattern is a
// valid value.
unsafe impl ByteValued for VirtioBlkConfig {}

/// Size of the configuration space.
pub const CONFIG_SPACE_SIZE: usize = size_of::<VirtioBlkConfig>();

const _: () = {
    assert!(size_of::<VirtioBlkGeometry>() == 4);
    assert!(size_of::<VirtioBlkTopology>() == 8);
    assert!(CONFIG_SPACE_SIZE == 72);
    assert!(offset_of!(VirtioBlkConfig, size_max) == 8);
    assert!(offset_of!(VirtioBlkConfig, geometry) == 16);
    assert!(offset_of!(VirtioBlkConfig, blk_size) == 20);
    assert!(offset_of!(VirtioBlkConfig, topology) == 24);
    assert!(offset_of!(VirtioBlkConfig, writeback) == 32);
    assert!(offset_of!(VirtioBlkConfig, num_queues) == 34);
    assert!(offset_of!(VirtioBlkConfig, max_discard_sectors) == 36);
    assert!(offset_of!(VirtioBlkConfig, max_write_zeroes_sectors) == 48);
    assert!(offset_of!(VirtioBlkConfig, write_zeroes_may_unmap) == 56);
    assert!(offset_of!(VirtioBlkConfig, max_secure_erase_sectors) == 60);
};

/// Offset of the only driver-writable field, `writeback`.
pub const WRITEBACK_OFFSET: usize = offset_of!(VirtioBlkConfig, writeback);

const fn bit(b: u32) -> u64 {
    1u64 << b
}

/// Transport and ring features every block device offers.
pub const COMMON_FEATURES: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_F_RING_PACKED)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_RING_F_INDIRECT_DESC);

/// Device options beyond the backend: queue count and size, and the limits advertised
/// in the configuration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceOptions {
    /// Number of request queues (VIRTIO_BLK_F_MQ `num_queues`), at least 1.
    pub num_queues: u16,
    /// Largest queue size accepted (vhost-user SET_VRING_NUM), at most 32768.
    pub max_queue_size: u16,
    /// `seg_max`: most data segments per request the driver should send. Keep it below
    /// the queue size so that a driver without indirect descriptors can place a request;
    /// the device itself accepts any number.
    pub seg_max: u32,
    /// `size_max`: largest segment the driver should send (the device accepts larger).
    pub size_max: u32,
    /// DISCARD and WRITE_ZEROES limits (enforced).
    pub segments: SegmentLimits,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            num_queues: 1,
            max_queue_size: 1024,
            // What QEMU and libvhost-user use for a 128-entry queue.
            seg_max: 128 - 2,
            size_max: 1 << 20,
            segments: SegmentLimits::default(),
        }
    }
}

/// Errors of [`BlockDevice::write_config`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The write touches no writable field.
    #[error("config write at {offset} (len {len}) touches only read-only fields")]
    ReadOnlyField {
        /// Offset of the write.
        offset: u32,
        /// Its length.
        len: usize,
    },
    /// `writeback` written without VIRTIO_BLK_F_CONFIG_WCE negotiated.
    #[error("writeback written but VIRTIO_BLK_F_CONFIG_WCE was not negotiated")]
    WceNotNegotiated,
}

/// A virtio-blk device over one backend. See the module documentation.
#[derive(Debug)]
pub struct BlockDevice {
    backend: Arc<BlockBackend>,
    options: DeviceOptions,
    engine: EngineKind,
    acked_features: AtomicU64,
    metrics: Vec<Arc<QueueMetrics>>,
}

impl BlockDevice {
    /// A device over `backend` whose queues use `engine` (resolve it once at start-up
    /// with [`crate::EngineChoice::resolve`]). `num_queues` 0 is taken as 1.
    pub fn new(backend: Arc<BlockBackend>, mut options: DeviceOptions, engine: EngineKind) -> Self {
        options.num_queues = options.num_queues.max(1);
        options.max_queue_size = options.max_queue_size.clamp(1, virtio_core::MAX_QUEUE_SIZE);
        options.seg_max = options.seg_max.max(1);
        let metrics = (0..options.num_queues)
            .map(|_| Arc::new(QueueMetrics::default()))
            .collect();
        BlockDevice {
            backend,
            options,
            engine,
            acked_features: AtomicU64::new(0),
            metrics,
        }
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<BlockBackend> {
        &self.backend
    }

    /// The device options.
    pub fn options(&self) -> &DeviceOptions {
        &self.options
    }

    /// Number of request queues.
    pub fn num_queues(&self) -> u16 {
        self.options.num_queues
    }

    /// Largest queue size accepted.
    pub fn max_queue_size(&self) -> u16 {
        self.options.max_queue_size
    }

    /// The I/O engine the queues use.
    pub fn engine_kind(&self) -> EngineKind {
        self.engine
    }

    /// The virtio feature bits offered: [`COMMON_FEATURES`], SIZE_MAX, SEG_MAX,
    /// BLK_SIZE, TOPOLOGY, FLUSH, CONFIG_WCE, MQ; DISCARD and WRITE_ZEROES unless
    /// read-only; RO if read-only. (GET_ID has no feature bit: it is always served.)
    /// The vhost-user glue adds VHOST_USER_F_PROTOCOL_FEATURES itself.
    pub fn features(&self) -> u64 {
        let mut f = COMMON_FEATURES
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_TOPOLOGY)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_CONFIG_WCE)
            | bit(VIRTIO_BLK_F_MQ);
        if self.backend.is_read_only() {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    /// Records the features the driver acknowledged (restricted to those offered) and
    /// sets the cache mode they imply (§5.2.5.2, §5.2.6.3): writethrough if FLUSH was
    /// not negotiated (the driver could not flush), else the configured mode, which the
    /// driver may then change through `writeback` if CONFIG_WCE was negotiated.
    pub fn set_acked_features(&self, features: u64) {
        let acked = features & self.features();
        self.acked_features.store(acked, Ordering::Relaxed);
        let mode = if acked & bit(VIRTIO_BLK_F_FLUSH) == 0 {
            CacheMode::WriteThrough
        } else {
            self.backend.configured_cache_mode()
        };
        self.backend.set_cache_mode(mode);
    }

    /// The features acknowledged by the driver.
    pub fn acked_features(&self) -> u64 {
        self.acked_features.load(Ordering::Relaxed)
    }

    /// Back to the state after start-up (device reset): no features acknowledged, the
    /// configured cache mode.
    pub fn reset(&self) {
        self.acked_features.store(0, Ordering::Relaxed);
        self.backend
            .set_cache_mode(self.backend.configured_cache_mode());
    }

    /// The configuration space as it reads now.
    pub fn config(&self) -> VirtioBlkConfig {
        let b = &self.backend;
        let lbs = b.logical_block_size();
        let pbs = b.physical_block_size();
        let blocks_per_physical = (pbs / lbs).max(1);
        let lbs_sectors = (u64::from(lbs) / SECTOR_SIZE).max(1);
        let read_only = b.is_read_only();
        let (discard, write_zeroes) = if read_only {
            (
                SegmentLimits {
                    max_discard_sectors: 0,
                    max_discard_seg: 0,
                    max_write_zeroes_sectors: 0,
                    max_write_zeroes_seg: 0,
                },
                false,
            )
        } else {
            (self.options.segments, true)
        };
        VirtioBlkConfig {
            capacity: b.capacity_sectors().to_le(),
            size_max: self.options.size_max.to_le(),
            seg_max: self.options.seg_max.to_le(),
            geometry: VirtioBlkGeometry::default(),
            blk_size: lbs.to_le(),
            topology: VirtioBlkTopology {
                // A power of two's trailing zeros; at most 7 (65536 / 512).
                physical_block_exp: u8::try_from(blocks_per_physical.trailing_zeros()).unwrap_or(0),
                alignment_offset: 0,
                min_io_size: u16::try_from(blocks_per_physical).unwrap_or(1).to_le(),
                opt_io_size: 0,
            },
            writeback: b.cache_mode().writeback_byte(),
            unused0: 0,
            num_queues: self.options.num_queues.to_le(),
            max_discard_sectors: discard.max_discard_sectors.to_le(),
            max_discard_seg: discard.max_discard_seg.to_le(),
            discard_sector_alignment: u32::try_from(lbs_sectors).unwrap_or(1).to_le(),
            max_write_zeroes_sectors: discard.max_write_zeroes_sectors.to_le(),
            max_write_zeroes_seg: discard.max_write_zeroes_seg.to_le(),
            write_zeroes_may_unmap: u8::from(write_zeroes),
            unused1: [0; 3],
            max_secure_erase_sectors: 0,
            max_secure_erase_seg: 0,
            secure_erase_sector_alignment: 0,
        }
    }

    /// Reads `data.len()` bytes of the configuration space at `offset` (vhost-user
    /// GET_CONFIG). Bytes past the end of the space read as zero.
    pub fn read_config(&self, offset: u32, data: &mut [u8]) {
        data.fill(0);
        let config = self.config();
        let bytes = config.as_slice();
        let Some(src) = usize::try_from(offset).ok().and_then(|o| bytes.get(o..)) else {
            return;
        };
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }

    /// Writes the configuration space (vhost-user SET_CONFIG). Only `writeback` is
    /// writable, and only with VIRTIO_BLK_F_CONFIG_WCE negotiated (§5.2.4): 0 selects
    /// writethrough, anything else writeback (writethrough stays if VIRTIO_BLK_F_FLUSH
    /// was not negotiated). Other bytes of the write are ignored.
    pub fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), ConfigError> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let Some(value) = WRITEBACK_OFFSET
            .checked_sub(start)
            .and_then(|i| data.get(i))
        else {
            return Err(ConfigError::ReadOnlyField {
                offset,
                len: data.len(),
            });
        };
        let acked = self.acked_features();
        if acked & bit(VIRTIO_BLK_F_CONFIG_WCE) == 0 {
            return Err(ConfigError::WceNotNegotiated);
        }
        // Without FLUSH the driver could never make writes stable: stay writethrough.
        let mode = if *value == 0 || acked & bit(VIRTIO_BLK_F_FLUSH) == 0 {
            CacheMode::WriteThrough
        } else {
            CacheMode::WriteBack
        };
        self.backend.set_cache_mode(mode);
        Ok(())
    }

    /// Reads the backend's size again. Returns true if the capacity changed: the glue
    /// must then send a configuration change notification.
    pub fn resize(&self) -> io::Result<bool> {
        let old = self.backend.capacity_sectors();
        let new = self.backend.refresh_capacity()?;
        Ok(old != new)
    }

    /// The counters of queue `index` (kept across queue restarts).
    pub fn queue_metrics(&self, index: u16) -> Option<&Arc<QueueMetrics>> {
        self.metrics.get(usize::from(index))
    }

    /// A processor for queue `index` of `queue_size` entries (when the queue starts).
    /// Fails for an index or size out of range, or if the engine cannot be set up.
    pub fn create_queue(&self, index: u16, queue_size: u16) -> io::Result<BlockQueue> {
        if queue_size > self.options.max_queue_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "queue size {queue_size} exceeds the maximum {}",
                    self.options.max_queue_size
                ),
            ));
        }
        let metrics = self.queue_metrics(index).cloned().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "queue {index} out of range (device has {})",
                    self.num_queues()
                ),
            )
        })?;
        log::info!(
            "queue {index}: I/O path: {}",
            crate::io::Engine::describe(self.engine, self.backend.storage())
        );
        Ok(
            BlockQueue::new(Arc::clone(&self.backend), queue_size, self.engine)?
                .with_index(index)
                .with_metrics(metrics)
                .with_segment_limits(self.options.segments),
        )
    }
}
