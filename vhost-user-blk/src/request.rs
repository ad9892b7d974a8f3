// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Parsing one descriptor chain into a block request (§5.2.6).
//!
//! A request is laid out as
//!
//! ```text
//! struct virtio_blk_req {
//!     le32 type; le32 reserved; le64 sector;   // 16 bytes, device-readable
//!     u8 data[];                               // readable (OUT, DISCARD, WRITE_ZEROES)
//!                                              // or writable (IN, GET_ID)
//!     u8 status;                               // the last device-writable byte
//! }
//! ```
//!
//! Any of these parts may span descriptors, and descriptor boundaries carry no meaning:
//! the header is read from the first 16 readable bytes, and the status byte is the last
//! writable byte, wherever the descriptors split. [`parse`] validates everything the
//! guest controls before any I/O is issued: on error it returns a [`RequestError`]
//! whose [`RequestError::status`] goes into the status byte.

use std::io::Read;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_core::DescriptorChain;
use vm_memory::ByteValued;

use crate::backend::SERIAL_LEN;
use crate::{SECTOR_SHIFT, SECTOR_SIZE};

/// Status byte: success.
pub const STATUS_OK: u8 = 0;
/// Status byte: I/O error or malformed request.
pub const STATUS_IOERR: u8 = 1;
/// Status byte: unsupported request.
pub const STATUS_UNSUPP: u8 = 2;

const _: () = {
    assert!(STATUS_OK as u32 == VIRTIO_BLK_S_OK);
    assert!(STATUS_IOERR as u32 == VIRTIO_BLK_S_IOERR);
    assert!(STATUS_UNSUPP as u32 == VIRTIO_BLK_S_UNSUPP);
};

/// Size of [`RequestHeader`].
pub const HEADER_LEN: u32 = 16;
/// Size of [`DiscardWriteZeroesSegment`].
pub const SEGMENT_LEN: u32 = 16;

/// The request header (`struct virtio_blk_outhdr`); fields are little-endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestHeader {
    /// Request type (VIRTIO_BLK_T_*).
    pub request_type: u32,
    /// Reserved.
    pub reserved: u32,
    /// First sector (512 bytes) of IN and OUT requests.
    pub sector: u64,
}

// SAFETY: repr(C) with only integer fields and no padding (4 + 4 + 8 bytes, checked
// below); every bit pattern is a valid value.
unsafe impl ByteValued for RequestHeader {}

/// One range of a DISCARD or WRITE_ZEROES request
/// (`struct virtio_blk_discard_write_zeroes`); fields are little-endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiscardWriteZeroesSegment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Flags (bit 0: VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP).
    pub flags: u32,
}

// SAFETY: repr(C) with only integer fields and no padding (8 + 4 + 4 bytes, checked
// below); every bit pattern is a valid value.
unsafe impl ByteValued for DiscardWriteZeroesSegment {}

const _: () = assert!(std::mem::size_of::<RequestHeader>() == HEADER_LEN as usize);
const _: () = assert!(std::mem::size_of::<DiscardWriteZeroesSegment>() == SEGMENT_LEN as usize);

/// The request type field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// VIRTIO_BLK_T_IN: read.
    In,
    /// VIRTIO_BLK_T_OUT: write.
    Out,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_GET_ID: device serial.
    GetId,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes,
    /// Anything else.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

/// Per-segment and per-request limits of DISCARD and WRITE_ZEROES, as advertised in the
/// configuration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentLimits {
    /// `max_discard_sectors`: most sectors in one discard segment.
    pub max_discard_sectors: u32,
    /// `max_discard_seg`: most segments in one discard request.
    pub max_discard_seg: u32,
    /// `max_write_zeroes_sectors`: most sectors in one write-zeroes segment.
    pub max_write_zeroes_sectors: u32,
    /// `max_write_zeroes_seg`: most segments in one write-zeroes request.
    pub max_write_zeroes_seg: u32,
}

impl Default for SegmentLimits {
    fn default() -> Self {
        SegmentLimits {
            // 2 GiB per segment.
            max_discard_sectors: 1 << 22,
            max_discard_seg: 16,
            max_write_zeroes_sectors: 1 << 22,
            max_write_zeroes_seg: 16,
        }
    }
}

impl SegmentLimits {
    /// The larger of the two segment-count limits (what a request slot must hold).
    pub fn max_segments(&self) -> u32 {
        self.max_discard_seg.max(self.max_write_zeroes_seg)
    }
}

/// What [`parse`] checks a request against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    /// Current capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// The disk is read-only.
    pub read_only: bool,
    /// Logical block size: discard ranges must be aligned to it; with `direct`, so must
    /// reads and writes.
    pub logical_block_size: u32,
    /// The disk is opened with `O_DIRECT`.
    pub direct: bool,
    /// DISCARD and WRITE_ZEROES limits.
    pub segments: SegmentLimits,
}

/// A validated request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at byte `offset` into the data iovecs.
    Read {
        /// Byte offset on the disk.
        offset: u64,
        /// Bytes (a multiple of 512; the data iovecs cover exactly this).
        len: u64,
    },
    /// Write `len` bytes from the data iovecs at byte `offset`.
    Write {
        /// Byte offset on the disk.
        offset: u64,
        /// Bytes (a multiple of 512; the data iovecs cover exactly this).
        len: u64,
    },
    /// Make completed writes stable.
    Flush,
    /// Write the serial: the first `len` bytes of it (at most 20).
    GetId {
        /// Bytes of the serial that fit in the driver's buffer.
        len: usize,
    },
    /// Discard the validated segments.
    Discard,
    /// Zero the validated segments.
    WriteZeroes,
}

/// Why a request is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No device-writable byte for the status: the request cannot be answered at all.
    #[error("no writable status byte")]
    NoStatusByte,
    /// Fewer than 16 readable bytes.
    #[error("header is {0} bytes, shorter than 16")]
    ShortHeader(u32),
    /// Data buffers in the direction the request type does not use.
    #[error(
        "data buffers in the wrong direction ({readable} readable, {writable} writable bytes)"
    )]
    WrongDirection {
        /// Readable bytes in the chain.
        readable: u32,
        /// Writable bytes in the chain (status byte included).
        writable: u32,
    },
    /// Read or write data length not a multiple of 512.
    #[error("data length {0} is not a multiple of 512")]
    NotSectorMultiple(u64),
    /// Sectors past the capacity (including arithmetic overflow).
    #[error("sectors {sector}+{sectors} are past the capacity of {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
        /// Capacity in sectors.
        capacity: u64,
    },
    /// Write, discard or write-zeroes on a read-only disk.
    #[error("write request on a read-only disk")]
    ReadOnly,
    /// A range not aligned to the logical block size (discards; reads and writes with
    /// O_DIRECT).
    #[error("sectors {sector}+{sectors} are not aligned to the logical block size {block_size}")]
    Unaligned {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
        /// Logical block size.
        block_size: u32,
    },
    /// A segment list whose length is 0 or not a multiple of 16 bytes.
    #[error("segment list of {0} bytes is empty or not a multiple of 16")]
    BadSegmentList(u32),
    /// More segments than advertised.
    #[error("{count} segments, more than the {max} advertised")]
    TooManySegments {
        /// Segments in the request.
        count: u32,
        /// Advertised limit.
        max: u32,
    },
    /// A segment larger than advertised.
    #[error("segment of {sectors} sectors, more than the {max} advertised")]
    SegmentTooLarge {
        /// Sectors in the segment.
        sectors: u32,
        /// Advertised limit.
        max: u32,
    },
    /// Unknown flags in a segment, or UNMAP on a discard (§5.2.6.2: UNSUPP).
    #[error("unsupported segment flags {0:#x}")]
    UnsupportedFlags(u32),
    /// Unknown request type.
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
}

impl RequestError {
    /// The status byte to report, or `None` if there is no status byte to write.
    pub fn status(&self) -> Option<u8> {
        match self {
            RequestError::NoStatusByte => None,
            RequestError::UnsupportedFlags(_) | RequestError::UnsupportedType(_) => {
                Some(STATUS_UNSUPP)
            }
            _ => Some(STATUS_IOERR),
        }
    }
}

/// Host address of the status byte: the last device-writable byte of the chain.
pub fn status_byte(chain: &DescriptorChain) -> Option<*mut u8> {
    // Zero-length buffers are omitted from the iovecs, so the last one holds the byte.
    let last = chain.writable_iovecs().last()?;
    if last.iov_len == 0 {
        return None;
    }
    Some(last.iov_base.cast::<u8>().wrapping_add(last.iov_len - 1))
}

/// Checks `sector..sector + sectors` against the capacity; returns the byte offset.
fn check_range(sector: u64, sectors: u64, capacity: u64) -> Result<u64, RequestError> {
    let out = RequestError::OutOfRange {
        sector,
        sectors,
        capacity,
    };
    let end = sector.checked_add(sectors).ok_or(out)?;
    if end > capacity {
        return Err(out);
    }
    // `end <= capacity < 2^55`, so this cannot overflow.
    Ok(sector << SECTOR_SHIFT)
}

/// Parses and validates the request in `chain`.
///
/// For reads and writes, the iovecs covering the data (and nothing else) are appended
/// to `data`; for DISCARD and WRITE_ZEROES, the validated segments (fields in host byte
/// order) are appended to `segments`. Neither grows beyond what the request describes
/// and the advertised limits allow.
pub fn parse(
    chain: &DescriptorChain,
    limits: &RequestLimits,
    data: &mut Vec<libc::iovec>,
    segments: &mut Vec<DiscardWriteZeroesSegment>,
) -> Result<Request, RequestError> {
    let readable = chain.readable_len();
    let writable = chain.writable_len();
    if writable == 0 || status_byte(chain).is_none() {
        return Err(RequestError::NoStatusByte);
    }
    let mut reader = chain.reader();
    let header: RequestHeader = reader
        .read_obj()
        .map_err(|_| RequestError::ShortHeader(readable))?;
    let sector = u64::from_le(header.sector);
    // Bytes after the header, and before the status byte.
    let readable_data = readable - HEADER_LEN;
    let writable_data = writable - 1;
    let wrong_direction = RequestError::WrongDirection { readable, writable };

    match RequestType::from(u32::from_le(header.request_type)) {
        t @ (RequestType::In | RequestType::Out) => {
            let is_read = t == RequestType::In;
            let (len32, other) = if is_read {
                (writable_data, readable_data)
            } else {
                (readable_data, writable_data)
            };
            if other != 0 {
                return Err(wrong_direction);
            }
            if !is_read && limits.read_only {
                return Err(RequestError::ReadOnly);
            }
            let len = u64::from(len32);
            if len % SECTOR_SIZE != 0 {
                return Err(RequestError::NotSectorMultiple(len));
            }
            let sectors = len >> SECTOR_SHIFT;
            let offset = check_range(sector, sectors, limits.capacity_sectors)?;
            let lbs = u64::from(limits.logical_block_size).max(1);
            if limits.direct && (offset % lbs != 0 || len % lbs != 0) {
                return Err(RequestError::Unaligned {
                    sector,
                    sectors,
                    block_size: limits.logical_block_size,
                });
            }
            let n = len32 as usize;
            if is_read {
                chain.writable_iovecs_range(0, n, data);
                Ok(Request::Read { offset, len })
            } else {
                chain.readable_iovecs_range(HEADER_LEN as usize, n, data);
                Ok(Request::Write { offset, len })
            }
        }
        // The sector field is reserved, and any data ignored (as other devices do).
        RequestType::Flush => Ok(Request::Flush),
        RequestType::GetId => {
            if readable_data != 0 {
                return Err(wrong_direction);
            }
            Ok(Request::GetId {
                len: (writable_data as usize).min(SERIAL_LEN),
            })
        }
        t @ (RequestType::Discard | RequestType::WriteZeroes) => {
            let discard = t == RequestType::Discard;
            if writable_data != 0 {
                return Err(wrong_direction);
            }
            if limits.read_only {
                return Err(RequestError::ReadOnly);
            }
            if readable_data == 0 || readable_data % SEGMENT_LEN != 0 {
                return Err(RequestError::BadSegmentList(readable_data));
            }
            let count = readable_data / SEGMENT_LEN;
            let (max_seg, max_sectors) = if discard {
                (
                    limits.segments.max_discard_seg,
                    limits.segments.max_discard_sectors,
                )
            } else {
                (
                    limits.segments.max_write_zeroes_seg,
                    limits.segments.max_write_zeroes_sectors,
                )
            };
            if count > max_seg {
                return Err(RequestError::TooManySegments {
                    count,
                    max: max_seg,
                });
            }
            let align_sectors = (u64::from(limits.logical_block_size) / SECTOR_SIZE).max(1);
            let start = segments.len();
            for _ in 0..count {
                let mut raw = DiscardWriteZeroesSegment::default();
                if reader.read_exact(raw.as_mut_slice()).is_err() {
                    segments.truncate(start);
                    return Err(RequestError::BadSegmentList(readable_data));
                }
                let seg = DiscardWriteZeroesSegment {
                    sector: u64::from_le(raw.sector),
                    num_sectors: u32::from_le(raw.num_sectors),
                    flags: u32::from_le(raw.flags),
                };
                let check = || {
                    let allowed = if discard {
                        0
                    } else {
                        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                    };
                    if seg.flags & !allowed != 0 {
                        return Err(RequestError::UnsupportedFlags(seg.flags));
                    }
                    if seg.num_sectors > max_sectors {
                        return Err(RequestError::SegmentTooLarge {
                            sectors: seg.num_sectors,
                            max: max_sectors,
                        });
                    }
                    let sectors = u64::from(seg.num_sectors);
                    check_range(seg.sector, sectors, limits.capacity_sectors)?;
                    if discard && (seg.sector % align_sectors != 0 || sectors % align_sectors != 0)
                    {
                        return Err(RequestError::Unaligned {
                            sector: seg.sector,
                            sectors,
                            block_size: limits.logical_block_size,
                        });
                    }
                    Ok(())
                };
                if let Err(e) = check() {
                    segments.truncate(start);
                    return Err(e);
                }
                segments.push(seg);
            }
            Ok(if discard {
                Request::Discard
            } else {
                Request::WriteZeroes
            })
        }
        RequestType::Unsupported(t) => Err(RequestError::UnsupportedType(t)),
    }
}
