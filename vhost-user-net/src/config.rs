// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-net configuration space (virtio 1.2 §5.1.4), MAC addresses and MTU limits.

use std::fmt;
use std::io::Read;
use std::mem::size_of;
use std::str::FromStr;

use virtio_bindings::virtio_net::{virtio_net_config, VIRTIO_NET_S_ANNOUNCE, VIRTIO_NET_S_LINK_UP};
use vm_memory::{ByteValued, Le16, Le32};

use crate::features::MAX_QUEUE_PAIRS;

/// The smallest MTU the device may report (§5.1.4.1: "MUST NOT set mtu below 68").
pub const MIN_MTU: u16 = 68;
/// The largest MTU the device may report (the field is 16 bits wide).
pub const MAX_MTU: u16 = 65535;
/// The default MTU.
pub const DEFAULT_MTU: u16 = 1500;

/// `speed` when unknown (§5.1.4: VIRTIO_NET_F_SPEED_DUPLEX not offered).
pub const SPEED_UNKNOWN: u32 = u32::MAX;
/// `duplex` when unknown.
pub const DUPLEX_UNKNOWN: u8 = 0xff;

/// An Ethernet MAC address.
#[repr(transparent)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

/// The broadcast address ff:ff:ff:ff:ff:ff.
pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

/// A MAC address that cannot be parsed or used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    /// Not six colon-separated pairs of hexadecimal digits.
    #[error(
        "invalid MAC address {0:?}: expected six colon-separated hex pairs like 52:54:00:12:34:56"
    )]
    Syntax(String),
    /// A multicast (group) address cannot be a device's address.
    #[error("MAC address {0} is a multicast address; a device needs a unicast address")]
    Multicast(MacAddr),
    /// All zeros.
    #[error("MAC address 00:00:00:00:00:00 is not a valid device address")]
    Zero,
    /// No random bytes could be read.
    #[error("cannot read random bytes for a MAC address: {0}")]
    Random(String),
}

impl MacAddr {
    /// Whether the group bit (bit 0 of the first byte) is set: multicast or broadcast.
    pub const fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }

    /// Whether this is ff:ff:ff:ff:ff:ff.
    pub const fn is_broadcast(&self) -> bool {
        let b = self.0;
        b[0] & b[1] & b[2] & b[3] & b[4] & b[5] == 0xff
    }

    /// Whether the locally administered bit (bit 1 of the first byte) is set.
    pub const fn is_locally_administered(&self) -> bool {
        self.0[0] & 2 != 0
    }

    /// Whether this can be a device's own address: unicast and not all zeros.
    pub fn validate_unicast(self) -> Result<MacAddr, MacError> {
        if self.is_multicast() {
            Err(MacError::Multicast(self))
        } else if self.0 == [0; 6] {
            Err(MacError::Zero)
        } else {
            Ok(self)
        }
    }

    /// Parses the `--mac` option: a valid unicast address.
    pub fn parse_device_mac(s: &str) -> Result<MacAddr, MacError> {
        s.parse::<MacAddr>()?.validate_unicast()
    }

    /// Makes `bytes` a locally administered unicast address (clears the group bit, sets
    /// the local bit) and never all zeros.
    const fn local_unicast(mut bytes: [u8; 6]) -> MacAddr {
        bytes[0] = (bytes[0] & !1) | 2;
        MacAddr(bytes)
    }

    /// A stable locally administered unicast address derived from `seed` (the socket path):
    /// the same seed gives the same address across restarts, so the guest keeps its
    /// address and its leases. FNV-1a, 64 bits.
    pub fn from_seed(seed: &[u8]) -> MacAddr {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in seed {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let b = h.to_le_bytes();
        Self::local_unicast([b[0], b[1], b[2], b[3], b[4], b[5]])
    }

    /// A random locally administered unicast address.
    pub fn random() -> Result<MacAddr, MacError> {
        let mut b = [0u8; 6];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .map_err(|e| MacError::Random(e.to_string()))?;
        Ok(Self::local_unicast(b))
    }
}

impl FromStr for MacAddr {
    type Err = MacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacError::Syntax(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 || !part.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A configuration value or access the device refuses.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A GET_CONFIG/SET_CONFIG range outside the configuration space.
    #[error("config access of {len} bytes at offset {offset} is outside the {size}-byte virtio-net config space")]
    OutOfRange {
        /// Offset asked.
        offset: u32,
        /// Length asked.
        len: usize,
        /// Size of the config space.
        size: usize,
    },
    /// The driver tried to write the configuration space, which is read-only for a
    /// VERSION_1 device (§5.1.4: only the legacy interface could write `mac`).
    #[error("the virtio-net config space is read-only (write of {len} bytes at offset {offset})")]
    ReadOnly {
        /// Offset asked.
        offset: u32,
        /// Length asked.
        len: usize,
    },
    /// An MTU outside 68..=65535.
    #[error("MTU {0} is out of range: it must be from 68 to 65535")]
    Mtu(u32),
    /// A queue pair count outside 1..=0x8000.
    #[error("{0} queue pairs is out of range: a virtio-net device has from 1 to 32768")]
    QueuePairs(u32),
}

/// Checks an MTU (given as a wider integer, as on a command line).
pub fn validate_mtu(mtu: u32) -> Result<u16, ConfigError> {
    match u16::try_from(mtu) {
        Ok(m) if m >= MIN_MTU => Ok(m),
        _ => Err(ConfigError::Mtu(mtu)),
    }
}

/// The configuration space (`struct virtio_net_config`, §5.1.4).
///
/// Multi-byte fields hold little-endian values, so [`ByteValued::as_slice`] is the wire
/// layout on any host. `mtu` is meaningful with VIRTIO_NET_F_MTU, `status` with
/// VIRTIO_NET_F_STATUS, `max_virtqueue_pairs` with VIRTIO_NET_F_MQ, `speed` and `duplex`
/// with VIRTIO_NET_F_SPEED_DUPLEX (not offered: both read as unknown); the RSS fields are
/// always 0 (no RSS).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetConfig {
    /// The device's MAC address (VIRTIO_NET_F_MAC).
    pub mac: [u8; 6],
    /// VIRTIO_NET_S_LINK_UP, VIRTIO_NET_S_ANNOUNCE.
    pub status: Le16,
    /// Queue pairs the device has.
    pub max_virtqueue_pairs: Le16,
    /// The MTU the driver should use.
    pub mtu: Le16,
    /// Link speed in Mbit/s.
    pub speed: Le32,
    /// 0 half, 1 full duplex, 0xff unknown.
    pub duplex: u8,
    /// RSS: maximum key size (0).
    pub rss_max_key_size: u8,
    /// RSS: maximum indirection table length (0).
    pub rss_max_indirection_table_length: Le16,
    /// RSS / hash report: supported hash types (0).
    pub supported_hash_types: Le32,
}

// SAFETY: repr(C) with only integer fields (Le16/Le32 are repr(transparent) integers) laid
// out without padding: 6 + 2 + 2 + 2 (offset 12, 4-aligned) + 4 + 1 + 1 + 2 + 4 = 24 bytes,
// checked below against the kernel's layout; every bit pattern is a valid value.
unsafe impl ByteValued for VirtioNetConfig {}

/// Size of the configuration space.
pub const CONFIG_SIZE: usize = size_of::<VirtioNetConfig>();

const _: () = assert!(CONFIG_SIZE == 24);
const _: () = assert!(CONFIG_SIZE == size_of::<virtio_net_config>());
const _: () = assert!(std::mem::offset_of!(VirtioNetConfig, speed) == 12);
const _: () = assert!(std::mem::offset_of!(VirtioNetConfig, supported_hash_types) == 20);

impl VirtioNetConfig {
    /// A configuration space with the link up.
    pub fn new(mac: MacAddr, max_virtqueue_pairs: u16, mtu: u16) -> Result<Self, ConfigError> {
        if max_virtqueue_pairs == 0 || max_virtqueue_pairs > MAX_QUEUE_PAIRS {
            return Err(ConfigError::QueuePairs(u32::from(max_virtqueue_pairs)));
        }
        let mtu = validate_mtu(u32::from(mtu))?;
        Ok(VirtioNetConfig {
            mac: mac.0,
            status: Le16::from(link_up_status()),
            max_virtqueue_pairs: Le16::from(max_virtqueue_pairs),
            mtu: Le16::from(mtu),
            speed: Le32::from(SPEED_UNKNOWN),
            duplex: DUPLEX_UNKNOWN,
            ..Default::default()
        })
    }

    /// The MAC address.
    pub fn mac(&self) -> MacAddr {
        MacAddr(self.mac)
    }

    /// Whether VIRTIO_NET_S_LINK_UP is set.
    pub fn link_up(&self) -> bool {
        u32::from(self.status.to_native()) & VIRTIO_NET_S_LINK_UP != 0
    }

    /// Sets or clears VIRTIO_NET_S_LINK_UP (the device then signals a config change).
    pub fn set_link_up(&mut self, up: bool) {
        self.set_status_bit(VIRTIO_NET_S_LINK_UP, up);
    }

    /// Sets or clears VIRTIO_NET_S_ANNOUNCE (§5.1.6.5.4; cleared on ANNOUNCE_ACK).
    pub fn set_announce(&mut self, on: bool) {
        self.set_status_bit(VIRTIO_NET_S_ANNOUNCE, on);
    }

    fn set_status_bit(&mut self, flag: u32, on: bool) {
        let mut s = self.status.to_native();
        let flag = u16::try_from(flag).unwrap_or(0);
        if on {
            s |= flag;
        } else {
            s &= !flag;
        }
        self.status = Le16::from(s);
    }

    /// GET_CONFIG: copies `data.len()` bytes at `offset`. A range that does not lie inside
    /// the configuration space is refused and `data` is left untouched.
    pub fn read(&self, offset: u32, data: &mut [u8]) -> Result<(), ConfigError> {
        let src = config_range(self.as_slice(), offset, data.len())?;
        data.copy_from_slice(src);
        Ok(())
    }

    /// SET_CONFIG: always refused (§5.1.4: read-only for a VERSION_1 driver); a range
    /// outside the space is reported as such.
    pub fn write(&self, offset: u32, data: &[u8]) -> Result<(), ConfigError> {
        config_range(self.as_slice(), offset, data.len())?;
        Err(ConfigError::ReadOnly {
            offset,
            len: data.len(),
        })
    }
}

fn link_up_status() -> u16 {
    u16::try_from(VIRTIO_NET_S_LINK_UP).unwrap_or(1)
}

fn config_range(space: &[u8], offset: u32, len: usize) -> Result<&[u8], ConfigError> {
    let err = ConfigError::OutOfRange {
        offset,
        len,
        size: space.len(),
    };
    let start = usize::try_from(offset).map_err(|_| err.clone())?;
    let end = start.checked_add(len).ok_or_else(|| err.clone())?;
    space.get(start..end).ok_or(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VirtioNetConfig {
        VirtioNetConfig::new(MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]), 4, 9000).unwrap()
    }

    #[test]
    fn layout_matches_the_spec() {
        let c = config();
        let b = c.as_slice();
        assert_eq!(b.len(), 24);
        assert_eq!(&b[0..6], &[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(&b[6..8], &[1, 0]); // status: LINK_UP
        assert_eq!(&b[8..10], &[4, 0]); // max_virtqueue_pairs
        assert_eq!(&b[10..12], &9000u16.to_le_bytes()); // mtu
        assert_eq!(&b[12..16], &[0xff; 4]); // speed unknown
        assert_eq!(b[16], 0xff); // duplex unknown
        assert_eq!(&b[17..24], &[0; 7]);
    }

    #[test]
    fn read_at_any_offset_and_length() {
        let c = config();
        let mut mtu = [0u8; 2];
        c.read(10, &mut mtu).unwrap();
        assert_eq!(u16::from_le_bytes(mtu), 9000);
        let mut one = [0u8; 1];
        c.read(7, &mut one).unwrap();
        assert_eq!(one, [0]);
        let mut all = [0u8; 24];
        c.read(0, &mut all).unwrap();
        assert_eq!(&all, c.as_slice());
        c.read(24, &mut []).unwrap();
    }

    #[test]
    fn read_out_of_range_is_refused() {
        let c = config();
        let mut buf = [7u8; 4];
        assert_eq!(
            c.read(22, &mut buf),
            Err(ConfigError::OutOfRange {
                offset: 22,
                len: 4,
                size: 24
            })
        );
        assert_eq!(buf, [7; 4]);
        assert!(c.read(u32::MAX, &mut buf).is_err());
        assert!(c.read(25, &mut []).is_err());
    }

    #[test]
    fn write_is_refused() {
        let c = config();
        assert_eq!(
            c.write(0, &[0; 6]),
            Err(ConfigError::ReadOnly { offset: 0, len: 6 })
        );
        assert!(matches!(
            c.write(30, &[0]),
            Err(ConfigError::OutOfRange { .. })
        ));
    }

    #[test]
    fn link_up_bit_toggles() {
        let mut c = config();
        assert!(c.link_up());
        c.set_announce(true);
        c.set_link_up(false);
        assert!(!c.link_up());
        assert_eq!(c.status.to_native(), 2);
        c.set_link_up(true);
        c.set_announce(false);
        assert_eq!(c.status.to_native(), 1);
    }

    #[test]
    fn queue_pairs_and_mtu_are_checked() {
        let mac = MacAddr([2, 0, 0, 0, 0, 1]);
        assert_eq!(
            VirtioNetConfig::new(mac, 0, 1500),
            Err(ConfigError::QueuePairs(0))
        );
        assert_eq!(
            VirtioNetConfig::new(mac, 0x8001, 1500),
            Err(ConfigError::QueuePairs(0x8001))
        );
        assert_eq!(VirtioNetConfig::new(mac, 1, 67), Err(ConfigError::Mtu(67)));
        assert!(VirtioNetConfig::new(mac, 0x8000, 65535).is_ok());
    }

    #[test]
    fn mtu_limits_are_68_to_65535() {
        assert_eq!(validate_mtu(68), Ok(68));
        assert_eq!(validate_mtu(65535), Ok(65535));
        assert_eq!(validate_mtu(67), Err(ConfigError::Mtu(67)));
        assert_eq!(validate_mtu(65536), Err(ConfigError::Mtu(65536)));
        assert_eq!(validate_mtu(0), Err(ConfigError::Mtu(0)));
    }

    #[test]
    fn mac_parses_and_formats() {
        let m: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        assert_eq!(m, MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(m.to_string(), "52:54:00:12:34:56");
        assert_eq!(
            "AA:bb:CC:00:11:22".parse::<MacAddr>().unwrap().to_string(),
            "aa:bb:cc:00:11:22"
        );
    }

    #[test]
    fn mac_syntax_errors_are_refused() {
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:5",
            "52:54:00:12:34:567",
            "52-54-00-12-34-56",
            "52:54:00:12:34:zz",
            "+2:54:00:12:34:56",
            "52:54:00:12:34:56:",
            "５２:54:00:12:34:56",
        ] {
            assert_eq!(
                bad.parse::<MacAddr>(),
                Err(MacError::Syntax(bad.to_owned())),
                "{bad}"
            );
        }
    }

    #[test]
    fn device_mac_must_be_unicast_and_nonzero() {
        assert!(matches!(
            MacAddr::parse_device_mac("01:00:5e:00:00:01"),
            Err(MacError::Multicast(_))
        ));
        assert_eq!(
            MacAddr::parse_device_mac("00:00:00:00:00:00"),
            Err(MacError::Zero)
        );
        assert!(MacAddr::parse_device_mac("52:54:00:12:34:56").is_ok());
    }

    #[test]
    fn seeded_mac_is_stable_local_unicast() {
        let a = MacAddr::from_seed(b"/run/vhost-user-net0.sock");
        assert_eq!(a, MacAddr::from_seed(b"/run/vhost-user-net0.sock"));
        assert_ne!(a, MacAddr::from_seed(b"/run/vhost-user-net1.sock"));
        for m in [a, MacAddr::from_seed(b"")] {
            assert!(m.is_locally_administered() && !m.is_multicast());
            assert!(m.validate_unicast().is_ok());
        }
    }

    #[test]
    fn random_mac_is_local_unicast() {
        let m = MacAddr::random().unwrap();
        assert!(m.is_locally_administered() && !m.is_multicast());
    }

    #[test]
    fn broadcast_is_multicast() {
        assert!(BROADCAST.is_broadcast() && BROADCAST.is_multicast());
        assert!(!MacAddr([0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]).is_broadcast());
    }
}
