// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! virtio-blk request format (virtio 1.2 §5.2.6), feature bits, configuration space
//! layout (§5.2.4), and the data-verification pattern.

use std::fmt;

/// Sector size of the virtio-blk request header's `sector` field.
pub const SECTOR_SIZE: u64 = 512;

/// `VIRTIO_BLK_F_SIZE_MAX`: `size_max` is valid.
pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
/// `VIRTIO_BLK_F_SEG_MAX`: `seg_max` is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
/// `VIRTIO_BLK_F_GEOMETRY`: `geometry` is valid.
pub const VIRTIO_BLK_F_GEOMETRY: u32 = 4;
/// `VIRTIO_BLK_F_RO`: the device is read-only.
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// `VIRTIO_BLK_F_BLK_SIZE`: `blk_size` is valid.
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
/// `VIRTIO_BLK_F_FLUSH`: the device supports cache flush.
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
/// `VIRTIO_BLK_F_TOPOLOGY`: topology fields are valid.
pub const VIRTIO_BLK_F_TOPOLOGY: u32 = 10;
/// `VIRTIO_BLK_F_MQ`: `num_queues` is valid.
pub const VIRTIO_BLK_F_MQ: u32 = 12;
/// `VIRTIO_BLK_F_DISCARD`: the device supports discard.
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
/// `VIRTIO_BLK_F_WRITE_ZEROES`: the device supports write zeroes.
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// `VHOST_USER_F_PROTOCOL_FEATURES` (vhost-user only).
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// `VIRTIO_F_RING_PACKED`.
pub const VIRTIO_F_RING_PACKED: u32 = 34;

/// The device-specific feature bits the frontend accepts when offered (informational
/// ones, plus FLUSH and MQ which it uses). CONFIG_WCE is not accepted: the frontend never
/// changes the cache mode.
pub const ACCEPTED_BLK_FEATURES: [u32; 10] = [
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_GEOMETRY,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_WRITE_ZEROES,
];

/// `1 << bit` as a feature mask.
pub const fn bit(b: u32) -> u64 {
    1u64 << b
}

/// Request status `VIRTIO_BLK_S_OK`.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Request status `VIRTIO_BLK_S_IOERR`.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Request status `VIRTIO_BLK_S_UNSUPP`.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// What the frontend writes into the status byte before submitting, so that a device
/// that never writes it is caught.
pub const STATUS_UNWRITTEN: u8 = 0xff;

/// Length of the device ID string returned by `VIRTIO_BLK_T_GET_ID`.
pub const GET_ID_LEN: u32 = 20;

/// A virtio-blk request type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlkOp {
    /// `VIRTIO_BLK_T_IN`: read `len` bytes from `sector`.
    Read,
    /// `VIRTIO_BLK_T_OUT`: write `len` bytes at `sector`.
    Write,
    /// `VIRTIO_BLK_T_FLUSH`: flush the device's write cache (no data).
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: read the 20-byte device ID.
    GetId,
}

impl BlkOp {
    /// The request header's `type` value.
    pub const fn request_type(self) -> u32 {
        match self {
            BlkOp::Read => 0,
            BlkOp::Write => 1,
            BlkOp::Flush => 4,
            BlkOp::GetId => 8,
        }
    }

    /// Whether the data buffer is written by the device.
    pub const fn device_writes_data(self) -> bool {
        matches!(self, BlkOp::Read | BlkOp::GetId)
    }

    /// Whether the request carries a data buffer.
    pub const fn has_data(self) -> bool {
        !matches!(self, BlkOp::Flush)
    }
}

impl fmt::Display for BlkOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlkOp::Read => "read",
            BlkOp::Write => "write",
            BlkOp::Flush => "flush",
            BlkOp::GetId => "get-id",
        })
    }
}

/// A human-readable name of a status byte.
pub fn status_name(status: u8) -> &'static str {
    match status {
        VIRTIO_BLK_S_OK => "OK",
        VIRTIO_BLK_S_IOERR => "IOERR",
        VIRTIO_BLK_S_UNSUPP => "UNSUPP",
        STATUS_UNWRITTEN => "not written by the device",
        _ => "invalid status",
    }
}

/// The 16-byte request header (`struct virtio_blk_outhdr`), little endian.
pub fn request_header(op: BlkOp, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&op.request_type().to_le_bytes());
    // Bytes 4..8: `reserved` (ioprio in legacy), zero.
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// How many bytes of the configuration space the frontend reads: up to and including
/// `num_queues` (offset 34). Asking for less than a backend's whole space keeps clear of
/// backends that refuse larger reads (libvhost-user then answers with an empty reply,
/// which the `vhost` 0.18 frontend misreads).
pub const CONFIG_READ_LEN: u32 = 36;

/// The fields of the virtio-blk configuration space the frontend uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Maximum segment size (valid with `VIRTIO_BLK_F_SIZE_MAX`).
    pub size_max: Option<u32>,
    /// Maximum number of segments (valid with `VIRTIO_BLK_F_SEG_MAX`).
    pub seg_max: Option<u32>,
    /// Logical block size (valid with `VIRTIO_BLK_F_BLK_SIZE`).
    pub blk_size: Option<u32>,
    /// Number of request queues (valid with `VIRTIO_BLK_F_MQ`).
    pub num_queues: Option<u16>,
}

impl BlkConfig {
    /// Parses the first [`CONFIG_READ_LEN`] bytes of the configuration space, keeping the
    /// optional fields whose feature bit is in `features` (negotiated features).
    pub fn parse(buf: &[u8], features: u64) -> Option<BlkConfig> {
        let u64_at = |o: usize| -> Option<u64> {
            Some(u64::from_le_bytes(buf.get(o..o + 8)?.try_into().ok()?))
        };
        let u32_at = |o: usize| -> Option<u32> {
            Some(u32::from_le_bytes(buf.get(o..o + 4)?.try_into().ok()?))
        };
        let u16_at = |o: usize| -> Option<u16> {
            Some(u16::from_le_bytes(buf.get(o..o + 2)?.try_into().ok()?))
        };
        let has = |b: u32| features & bit(b) != 0;
        Some(BlkConfig {
            capacity: u64_at(0)?,
            size_max: if has(VIRTIO_BLK_F_SIZE_MAX) {
                u32_at(8)
            } else {
                None
            },
            seg_max: if has(VIRTIO_BLK_F_SEG_MAX) {
                u32_at(12)
            } else {
                None
            },
            blk_size: if has(VIRTIO_BLK_F_BLK_SIZE) {
                u32_at(20)
            } else {
                None
            },
            num_queues: if has(VIRTIO_BLK_F_MQ) {
                u16_at(34)
            } else {
                None
            },
        })
    }

    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity.saturating_mul(SECTOR_SIZE)
    }
}

/// splitmix64 finaliser.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The 8-byte word at `word` (0..64) of 512-byte sector `sector` in generation
/// `generation`. Words 0 and 1 hold the sector and the generation in clear, so that a
/// mismatch can say what was found instead (stale data, misplaced data).
fn pattern_word(sector: u64, generation: u64, word: u64) -> u64 {
    match word {
        0 => sector,
        1 => generation,
        _ => mix(sector ^ generation.rotate_left(29) ^ word.wrapping_mul(0x1000_0000_01b3)),
    }
}

/// Fills `buf` (a multiple of 512 bytes, starting at `sector`) with the verification
/// pattern of `generation`.
pub fn fill_pattern(buf: &mut [u8], sector: u64, generation: u64) {
    for (s, chunk) in (sector..).zip(buf.chunks_mut(512)) {
        for (w, word) in (0u64..).zip(chunk.chunks_mut(8)) {
            let v = pattern_word(s, generation, w).to_le_bytes();
            word.copy_from_slice(&v[..word.len()]);
        }
    }
}

/// Where data read back differs from the pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatternMismatch {
    /// Byte offset of the first differing byte in the checked buffer.
    pub offset: usize,
    /// The sector that holds it.
    pub sector: u64,
    /// The sector number found in that sector's first word.
    pub found_sector: u64,
    /// The generation found in that sector's second word.
    pub found_generation: u64,
}

impl fmt::Display for PatternMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "first difference at byte {} (sector {}); that sector's header says sector {} generation {}",
            self.offset, self.sector, self.found_sector, self.found_generation
        )
    }
}

/// Checks that `buf` (starting at `sector`) holds the pattern of `generation`.
pub fn check_pattern(buf: &[u8], sector: u64, generation: u64) -> Result<(), PatternMismatch> {
    let mut expected = vec![0u8; buf.len()];
    fill_pattern(&mut expected, sector, generation);
    match buf.iter().zip(&expected).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(offset) => {
            let sector_start = offset - offset % 512;
            let word = |i: usize| {
                buf.get(sector_start + 8 * i..sector_start + 8 * i + 8)
                    .and_then(|b| b.try_into().ok())
                    .map_or(0, u64::from_le_bytes)
            };
            Err(PatternMismatch {
                offset,
                sector: sector + (offset / 512) as u64,
                found_sector: word(0),
                found_generation: word(1),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_round_trip_and_mismatch() {
        let mut b = vec![0u8; 4096];
        fill_pattern(&mut b, 80, 7);
        assert_eq!(check_pattern(&b, 80, 7), Ok(()));
        let e = check_pattern(&b, 80, 8).unwrap_err();
        assert_eq!((e.offset, e.found_generation), (8, 7));
        let e = check_pattern(&b, 88, 7).unwrap_err();
        assert_eq!((e.offset, e.found_sector), (0, 80));
        b[1030] ^= 1;
        let e = check_pattern(&b, 80, 7).unwrap_err();
        assert_eq!((e.offset, e.sector), (1030, 82));
    }

    #[test]
    fn header_and_config() {
        let h = request_header(BlkOp::Write, 0x1122);
        assert_eq!(&h[0..4], &[1, 0, 0, 0]);
        assert_eq!(&h[8..10], &[0x22, 0x11]);
        let mut cfg = [0u8; 36];
        cfg[0..8].copy_from_slice(&2048u64.to_le_bytes());
        cfg[20..24].copy_from_slice(&512u32.to_le_bytes());
        cfg[34..36].copy_from_slice(&4u16.to_le_bytes());
        let c = BlkConfig::parse(&cfg, bit(VIRTIO_BLK_F_MQ)).unwrap();
        assert_eq!(c.capacity_bytes(), 1 << 20);
        assert_eq!((c.blk_size, c.num_queues), (None, Some(4)));
    }
}
