// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vnet header that starts every packet buffer (`struct virtio_net_hdr`, virtio 1.2
//! §5.1.6): checking the driver's on transmit (§5.1.6.2), building the device's on
//! receive (§5.1.6.4). Everything here works on the stack, without allocation.

use std::mem::size_of;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_HOST_USO, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP, VIRTIO_NET_HDR_GSO_UDP_L4,
};
use vm_memory::{ByteValued, Le16};

use crate::features::{Negotiated, VNET_HDR_LEN, VNET_HDR_LEN_LEGACY};

/// `struct virtio_net_hdr_mrg_rxbuf` / `virtio_net_hdr_v1` without the hash fields.
/// Multi-byte fields are little-endian (VERSION_1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHeader {
    /// VIRTIO_NET_HDR_F_*.
    pub flags: u8,
    /// VIRTIO_NET_HDR_GSO_*, possibly with VIRTIO_NET_HDR_GSO_ECN.
    pub gso_type: u8,
    /// Length of the headers to copy into each segment.
    pub hdr_len: Le16,
    /// Segment payload size (MSS) for GSO.
    pub gso_size: Le16,
    /// Where checksumming starts (NEEDS_CSUM).
    pub csum_start: Le16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: Le16,
    /// Buffers the frame spans on receive (MRG_RXBUF; else 1).
    pub num_buffers: Le16,
}

// SAFETY: repr(C) with only u8 and Le16 (a repr(transparent) u16) fields, 1 + 1 + 5 × 2 =
// 12 bytes without padding (checked below); every bit pattern is a valid value.
unsafe impl ByteValued for VnetHeader {}

const _: () = assert!(size_of::<VnetHeader>() == VNET_HDR_LEN);

/// A transmit header the device refuses (the frame is dropped as a bad header).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The buffer is shorter than the header.
    #[error("packet of {len} bytes is shorter than its {need}-byte vnet header")]
    Short {
        /// Bytes available.
        len: usize,
        /// Header length.
        need: usize,
    },
    /// Flags other than NEEDS_CSUM (DATA_VALID and RSC_INFO are the device's, §5.1.6.2.1).
    #[error("vnet header flags {0:#x}: a driver may set only NEEDS_CSUM")]
    Flags(u8),
    /// NEEDS_CSUM without VIRTIO_NET_F_CSUM.
    #[error("vnet header asks for checksum offload, but VIRTIO_NET_F_CSUM was not negotiated")]
    CsumNotNegotiated,
    /// The checksum would be written outside the frame.
    #[error("checksum at {csum_start}+{csum_offset} lies outside the {frame_len}-byte frame")]
    CsumOutOfFrame {
        /// csum_start.
        csum_start: u16,
        /// csum_offset.
        csum_offset: u16,
        /// Frame length.
        frame_len: usize,
    },
    /// An unknown gso_type.
    #[error("unknown vnet header gso_type {0:#x}")]
    UnknownGso(u8),
    /// A GSO type whose HOST_* feature was not negotiated (§5.1.6.2.1).
    #[error("vnet header gso_type {0:#x} needs a HOST_* feature that was not negotiated")]
    GsoNotNegotiated(u8),
    /// GSO without NEEDS_CSUM or with a gso_size of 0 (§5.1.6.2.1).
    #[error("GSO frame without NEEDS_CSUM or with gso_size 0")]
    GsoIncomplete,
}

impl VnetHeader {
    /// The header of a frame that needs no offload (flags 0, GSO_NONE).
    pub fn plain(num_buffers: u16) -> VnetHeader {
        VnetHeader {
            num_buffers: Le16::from(num_buffers),
            ..Default::default()
        }
    }

    /// Reads a header of `hdr_len` (10 or 12) bytes from the start of `buf`;
    /// `num_buffers` is 0 for a 10-byte header.
    pub fn read(buf: &[u8], hdr_len: usize) -> Result<VnetHeader, HeaderError> {
        let short = HeaderError::Short {
            len: buf.len(),
            need: hdr_len,
        };
        if hdr_len != VNET_HDR_LEN && hdr_len != VNET_HDR_LEN_LEGACY {
            return Err(short);
        }
        let src = buf.get(..hdr_len).ok_or(short)?;
        let mut h = VnetHeader::default();
        h.as_mut_slice()[..hdr_len].copy_from_slice(src);
        Ok(h)
    }

    /// Checks a header the driver sent with a frame of `frame_len` bytes (§5.1.6.2.1).
    pub fn check_tx(&self, features: Negotiated, frame_len: usize) -> Result<(), HeaderError> {
        if u32::from(self.flags) & !VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            return Err(HeaderError::Flags(self.flags));
        }
        let needs_csum = u32::from(self.flags) & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
        if needs_csum {
            if !features.has(VIRTIO_NET_F_CSUM) {
                return Err(HeaderError::CsumNotNegotiated);
            }
            let (csum_start, csum_offset) =
                (self.csum_start.to_native(), self.csum_offset.to_native());
            let end = usize::from(csum_start) + usize::from(csum_offset) + 2;
            if end > frame_len {
                return Err(HeaderError::CsumOutOfFrame {
                    csum_start,
                    csum_offset,
                    frame_len,
                });
            }
        }
        let ecn = u32::from(self.gso_type) & VIRTIO_NET_HDR_GSO_ECN != 0;
        let gso = u32::from(self.gso_type) & !VIRTIO_NET_HDR_GSO_ECN;
        let needed = match gso {
            VIRTIO_NET_HDR_GSO_NONE if ecn => return Err(HeaderError::UnknownGso(self.gso_type)),
            VIRTIO_NET_HDR_GSO_NONE => return Ok(()),
            VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_HDR_GSO_UDP => VIRTIO_NET_F_HOST_UFO,
            VIRTIO_NET_HDR_GSO_UDP_L4 => VIRTIO_NET_F_HOST_USO,
            _ => return Err(HeaderError::UnknownGso(self.gso_type)),
        };
        if !features.has(needed) || (ecn && !features.has(VIRTIO_NET_F_HOST_ECN)) {
            return Err(HeaderError::GsoNotNegotiated(self.gso_type));
        }
        if !needs_csum || self.gso_size.to_native() == 0 {
            return Err(HeaderError::GsoIncomplete);
        }
        Ok(())
    }
}

/// Sets `num_buffers` in a 12-byte receive header at the start of `buf` (the TAP does
/// not: it writes 0 or skips the field). §5.1.6.4: the number of buffers the frame spans with MRG_RXBUF, else 1.
/// Returns false (and writes nothing) if `buf` is shorter than 12 bytes.
pub fn set_num_buffers(buf: &mut [u8], num_buffers: u16) -> bool {
    match buf.get_mut(VNET_HDR_LEN_LEGACY..VNET_HDR_LEN) {
        Some(field) => {
            field.copy_from_slice(&num_buffers.to_le_bytes());
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_DATA_VALID;

    use super::*;
    use crate::features::bit;

    fn tso4_features() -> Negotiated {
        Negotiated::from_bits_unchecked(bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4))
    }

    fn gso(gso_type: u32, size: u16) -> VnetHeader {
        VnetHeader {
            flags: 1,
            gso_type: u8::try_from(gso_type).unwrap(),
            gso_size: Le16::from(size),
            csum_start: Le16::from(34),
            csum_offset: Le16::from(16),
            ..Default::default()
        }
    }

    #[test]
    fn plain_header_is_zero_but_num_buffers() {
        assert_eq!(
            VnetHeader::plain(1).as_slice(),
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]
        );
    }

    #[test]
    fn read_takes_10_or_12_bytes() {
        let bytes = [1u8, 1, 54, 0, 0xa8, 5, 34, 0, 16, 0, 3, 0, 0xee];
        let h = VnetHeader::read(&bytes, 12).unwrap();
        assert_eq!(
            (h.flags, h.gso_size.to_native(), h.num_buffers.to_native()),
            (1, 1448, 3)
        );
        assert_eq!(
            VnetHeader::read(&bytes, 10)
                .unwrap()
                .num_buffers
                .to_native(),
            0
        );
        assert_eq!(
            VnetHeader::read(&bytes[..11], 12),
            Err(HeaderError::Short { len: 11, need: 12 })
        );
        assert!(VnetHeader::read(&bytes, 8).is_err());
    }

    #[test]
    fn plain_tx_header_is_accepted() {
        assert_eq!(
            VnetHeader::plain(0).check_tx(Negotiated::default(), 60),
            Ok(())
        );
    }

    #[test]
    fn needs_csum_requires_csum_and_fits_the_frame() {
        let mut h = VnetHeader {
            flags: 1,
            csum_start: Le16::from(34),
            csum_offset: Le16::from(6),
            ..Default::default()
        };
        assert_eq!(
            h.check_tx(Negotiated::default(), 60),
            Err(HeaderError::CsumNotNegotiated)
        );
        assert_eq!(h.check_tx(tso4_features(), 60), Ok(()));
        h.csum_offset = Le16::from(u16::MAX);
        assert!(matches!(
            h.check_tx(tso4_features(), 60),
            Err(HeaderError::CsumOutOfFrame { .. })
        ));
    }

    #[test]
    fn device_only_flags_are_refused() {
        let h = VnetHeader {
            flags: u8::try_from(VIRTIO_NET_HDR_F_DATA_VALID).unwrap(),
            ..Default::default()
        };
        assert_eq!(h.check_tx(tso4_features(), 60), Err(HeaderError::Flags(2)));
    }

    #[test]
    fn gso_needs_its_host_feature() {
        assert_eq!(
            gso(VIRTIO_NET_HDR_GSO_TCPV4, 1448).check_tx(tso4_features(), 9000),
            Ok(())
        );
        assert_eq!(
            gso(VIRTIO_NET_HDR_GSO_TCPV6, 1448).check_tx(tso4_features(), 9000),
            Err(HeaderError::GsoNotNegotiated(4))
        );
        let ecn = gso(VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN, 1448);
        assert_eq!(
            ecn.check_tx(tso4_features(), 9000),
            Err(HeaderError::GsoNotNegotiated(0x81))
        );
        let with_ecn =
            Negotiated::from_bits_unchecked(tso4_features().bits() | bit(VIRTIO_NET_F_HOST_ECN));
        assert_eq!(ecn.check_tx(with_ecn, 9000), Ok(()));
        assert_eq!(
            gso(0x7f, 1448).check_tx(tso4_features(), 9000),
            Err(HeaderError::UnknownGso(0x7f))
        );
        assert_eq!(
            gso(0x80, 1448).check_tx(with_ecn, 9000),
            Err(HeaderError::UnknownGso(0x80))
        );
    }

    #[test]
    fn gso_without_csum_or_size_is_refused() {
        assert_eq!(
            gso(VIRTIO_NET_HDR_GSO_TCPV4, 0).check_tx(tso4_features(), 9000),
            Err(HeaderError::GsoIncomplete)
        );
        let mut h = gso(VIRTIO_NET_HDR_GSO_TCPV4, 1448);
        h.flags = 0;
        assert_eq!(
            h.check_tx(tso4_features(), 9000),
            Err(HeaderError::GsoIncomplete)
        );
    }

    #[test]
    fn num_buffers_is_written_little_endian() {
        let mut buf = [0xaau8; 14];
        assert!(set_num_buffers(&mut buf, 0x0102));
        assert_eq!(&buf[10..12], &[2, 1]);
        assert_eq!(buf[12], 0xaa);
        assert!(!set_num_buffers(&mut [0u8; 11], 1));
    }
}
