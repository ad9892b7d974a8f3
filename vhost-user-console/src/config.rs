// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The console's configuration space (virtio 1.2 §5.3.4), feature bits (§5.3.3) and
//! virtqueue numbering (§5.3.2).

use vm_memory::ByteValued;

/// Feature bit (a bit number, not a mask): `cols` and `rows` of the configuration
/// space are valid (§5.3.3).
pub const VIRTIO_CONSOLE_F_SIZE: u32 = 0;
/// Feature bit: the device supports several ports, `max_nr_ports` is valid and the
/// control virtqueues are used (§5.3.3).
pub const VIRTIO_CONSOLE_F_MULTIPORT: u32 = 1;
/// Feature bit: the driver may write one character at a time to `emerg_wr` (§5.3.3).
/// Linux 6.1 does not use it.
pub const VIRTIO_CONSOLE_F_EMERG_WRITE: u32 = 2;

/// The mask of a feature bit number, for a 64-bit feature word.
pub const fn feature_mask(bit: u32) -> u64 {
    1u64 << bit
}

/// Offset of `cols` in [`virtio_console_config`].
pub const CONFIG_COLS_OFFSET: u32 = 0;
/// Offset of `rows` in [`virtio_console_config`].
pub const CONFIG_ROWS_OFFSET: u32 = 2;
/// Offset of `max_nr_ports` in [`virtio_console_config`].
pub const CONFIG_MAX_NR_PORTS_OFFSET: u32 = 4;
/// Offset of `emerg_wr` in [`virtio_console_config`].
pub const CONFIG_EMERG_WR_OFFSET: u32 = 8;
/// Size of [`virtio_console_config`] in bytes.
pub const CONFIG_SIZE: u32 = 12;

/// Size of a console in character cells.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WinSize {
    /// Columns (characters per line).
    pub cols: u16,
    /// Rows (lines).
    pub rows: u16,
}

/// The configuration layout of §5.3.4, as the driver sees it (all fields little-endian
/// on the wire; [`virtio_console_config::to_le`] gives the wire image of a value that
/// holds native numbers).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct virtio_console_config {
    /// Columns of the console (valid with VIRTIO_CONSOLE_F_SIZE).
    pub cols: u16,
    /// Rows of the console (valid with VIRTIO_CONSOLE_F_SIZE).
    pub rows: u16,
    /// Most ports the device can have (valid with VIRTIO_CONSOLE_F_MULTIPORT).
    pub max_nr_ports: u32,
    /// Emergency write register (VIRTIO_CONSOLE_F_EMERG_WRITE): write-only, reads 0.
    pub emerg_wr: u32,
}

// SAFETY: virtio_console_config is repr(C), made only of integers (u16, u16, u32, u32,
// naturally aligned, so it has no padding: 12 bytes), and every bit pattern is a valid
// value of each field.
unsafe impl ByteValued for virtio_console_config {}

const _: () = assert!(std::mem::size_of::<virtio_console_config>() == CONFIG_SIZE as usize);

impl virtio_console_config {
    /// The same value with every field converted to little-endian (the wire format of
    /// §5.3.4); a no-op on little-endian hosts.
    pub fn to_le(self) -> Self {
        Self {
            cols: self.cols.to_le(),
            rows: self.rows.to_le(),
            max_nr_ports: self.max_nr_ports.to_le(),
            emerg_wr: self.emerg_wr.to_le(),
        }
    }
}

/// Errors of configuration space accesses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The access does not fit in the 12-byte configuration space.
    #[error(
        "config access of {len} bytes at offset {offset} is outside the {CONFIG_SIZE}-byte console configuration space"
    )]
    OutOfRange {
        /// Offset of the access.
        offset: u32,
        /// Length of the access.
        len: usize,
    },
    /// The driver wrote a read-only field.
    #[error(
        "config write of {len} bytes at offset {offset}: only emerg_wr (offset 8) is writable"
    )]
    ReadOnly {
        /// Offset of the write.
        offset: u32,
        /// Length of the write.
        len: usize,
    },
    /// The driver wrote `emerg_wr` although VIRTIO_CONSOLE_F_EMERG_WRITE is not offered.
    #[error("emerg_wr written but VIRTIO_CONSOLE_F_EMERG_WRITE is not offered")]
    EmergWriteNotOffered,
}

/// The device's configuration space: its current values and the features that make
/// them meaningful.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleConfigSpace {
    config: virtio_console_config,
    emerg_write: bool,
}

impl ConsoleConfigSpace {
    /// A configuration space with an initial size (`None`: 0 x 0, the driver then uses
    /// its default), `max_nr_ports` (at least 1: port 0 always exists) and whether
    /// VIRTIO_CONSOLE_F_EMERG_WRITE is offered.
    pub fn new(size: Option<WinSize>, max_nr_ports: u32, emerg_write: bool) -> Self {
        let size = size.unwrap_or_default();
        Self {
            config: virtio_console_config {
                cols: size.cols,
                rows: size.rows,
                max_nr_ports: max_nr_ports.max(1),
                emerg_wr: 0,
            },
            emerg_write,
        }
    }

    /// The feature bits to offer (§5.3.3): SIZE when an initial size is known,
    /// MULTIPORT when more than one port may exist, EMERG_WRITE if asked for.
    ///
    /// SIZE is not offered for a 0 x 0 console: Linux applies the config-space size at
    /// probe time, and 0 x 0 is not a size. With MULTIPORT, console sizes travel in
    /// RESIZE control messages, which need no feature bit.
    pub fn features(&self) -> u64 {
        let mut features = 0;
        if self.config.cols != 0 || self.config.rows != 0 {
            features |= feature_mask(VIRTIO_CONSOLE_F_SIZE);
        }
        if self.config.max_nr_ports > 1 {
            features |= feature_mask(VIRTIO_CONSOLE_F_MULTIPORT);
        }
        if self.emerg_write {
            features |= feature_mask(VIRTIO_CONSOLE_F_EMERG_WRITE);
        }
        features
    }

    /// The current values (native byte order).
    pub fn config(&self) -> virtio_console_config {
        self.config
    }

    /// Sets `cols` and `rows`. Without MULTIPORT the caller then sends a configuration
    /// change notification (§2.5); with MULTIPORT a RESIZE control message tells the
    /// driver instead ([`crate::control::ControlState::resize`]).
    pub fn set_size(&mut self, size: WinSize) {
        self.config.cols = size.cols;
        self.config.rows = size.rows;
    }

    /// The current size.
    pub fn size(&self) -> WinSize {
        WinSize {
            cols: self.config.cols,
            rows: self.config.rows,
        }
    }

    fn check(offset: u32, len: usize) -> Result<usize, ConfigError> {
        let start = usize::try_from(offset).map_err(|_| ConfigError::OutOfRange { offset, len })?;
        match start.checked_add(len) {
            Some(end) if end <= CONFIG_SIZE as usize => Ok(start),
            _ => Err(ConfigError::OutOfRange { offset, len }),
        }
    }

    /// Copies `data.len()` bytes of the configuration space, starting at `offset`, into
    /// `data` (any offset and length inside the 12 bytes; `emerg_wr` reads as 0).
    pub fn read(&self, offset: u32, data: &mut [u8]) -> Result<(), ConfigError> {
        let start = Self::check(offset, data.len())?;
        let wire = virtio_console_config {
            emerg_wr: 0,
            ..self.config
        }
        .to_le();
        let bytes = wire.as_slice();
        data.copy_from_slice(&bytes[start..start + data.len()]);
        Ok(())
    }

    /// A driver write at `offset`. The only writable field is `emerg_wr` (§5.3.4), and
    /// only with VIRTIO_CONSOLE_F_EMERG_WRITE: a write of 1 to 4 bytes at offset 8 is one
    /// character for port 0, returned as `Ok(Some(byte))` (the low byte of the
    /// little-endian value). Anything else is refused.
    pub fn write(&mut self, offset: u32, data: &[u8]) -> Result<Option<u8>, ConfigError> {
        Self::check(offset, data.len())?;
        if offset != CONFIG_EMERG_WR_OFFSET || data.is_empty() {
            return Err(ConfigError::ReadOnly {
                offset,
                len: data.len(),
            });
        }
        if !self.emerg_write {
            return Err(ConfigError::EmergWriteNotOffered);
        }
        Ok(data.first().copied())
    }
}

/// Index of port 0's receiveq (device to driver data) (§5.3.2).
pub const PORT0_RECEIVEQ: u16 = 0;
/// Index of port 0's transmitq (driver to device data) (§5.3.2).
pub const PORT0_TRANSMITQ: u16 = 1;
/// Index of the control receiveq (device to driver control messages), MULTIPORT only.
pub const CONTROL_RECEIVEQ: u16 = 2;
/// Index of the control transmitq (driver to device control messages), MULTIPORT only.
pub const CONTROL_TRANSMITQ: u16 = 3;

/// What a virtqueue of the console carries (§5.3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueRole {
    /// The receiveq of a port (device writes guest input).
    Receive(u32),
    /// The transmitq of a port (driver writes guest output).
    Transmit(u32),
    /// The control receiveq (device-to-driver control messages).
    ControlReceive,
    /// The control transmitq (driver-to-device control messages).
    ControlTransmit,
}

/// Index of the receiveq of `port`: 0 for port 0, `2(n+1)` for port n ≥ 1 (§5.3.2);
/// `None` if it does not fit a 16-bit queue index.
pub fn receiveq_index(port: u32) -> Option<u16> {
    if port == 0 {
        return Some(PORT0_RECEIVEQ);
    }
    port.checked_add(1)
        .and_then(|n| n.checked_mul(2))
        .and_then(|q| u16::try_from(q).ok())
}

/// Index of the transmitq of `port`: 1 for port 0, `2(n+1)+1` for port n ≥ 1 (§5.3.2).
pub fn transmitq_index(port: u32) -> Option<u16> {
    receiveq_index(port).and_then(|q| q.checked_add(1))
}

/// The role of queue `index` (§5.3.2).
pub fn queue_role(index: u16) -> QueueRole {
    match index {
        PORT0_RECEIVEQ => QueueRole::Receive(0),
        PORT0_TRANSMITQ => QueueRole::Transmit(0),
        CONTROL_RECEIVEQ => QueueRole::ControlReceive,
        CONTROL_TRANSMITQ => QueueRole::ControlTransmit,
        _ => {
            let port = u32::from(index / 2) - 1;
            if index % 2 == 0 {
                QueueRole::Receive(port)
            } else {
                QueueRole::Transmit(port)
            }
        }
    }
}

/// How many virtqueues a device with `max_nr_ports` ports has: 2 without MULTIPORT,
/// `2 + 2 * max_nr_ports` with it (port 0's pair, the control pair, one pair per other
/// port), or `None` if that does not fit 16-bit queue indexes.
pub fn num_queues(max_nr_ports: u32, multiport: bool) -> Option<u16> {
    if !multiport {
        return Some(2);
    }
    max_nr_ports
        .checked_mul(2)
        .and_then(|n| n.checked_add(2))
        .and_then(|n| u16::try_from(n).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> ConsoleConfigSpace {
        ConsoleConfigSpace::new(
            Some(WinSize {
                cols: 0x1234,
                rows: 0x0056,
            }),
            4,
            true,
        )
    }

    #[test]
    fn config_layout_is_12_bytes_little_endian() {
        let mut all = [0xffu8; 12];
        space().read(0, &mut all).unwrap();
        assert_eq!(all, [0x34, 0x12, 0x56, 0x00, 4, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn read_at_any_offset_and_length() {
        let s = space();
        let mut full = [0u8; 12];
        s.read(0, &mut full).unwrap();
        for offset in 0..12u32 {
            for len in 0..=(12 - offset as usize) {
                let mut part = vec![0u8; len];
                s.read(offset, &mut part).unwrap();
                assert_eq!(part[..], full[offset as usize..offset as usize + len]);
            }
        }
    }

    #[test]
    fn read_out_of_range_is_refused() {
        let s = space();
        let mut b = [0u8; 4];
        assert_eq!(
            s.read(10, &mut b),
            Err(ConfigError::OutOfRange { offset: 10, len: 4 })
        );
        assert!(s.read(u32::MAX, &mut b[..1]).is_err());
        assert!(s.read(12, &mut b[..1]).is_err());
    }

    #[test]
    fn emerg_write_of_one_character_is_port0_output() {
        let mut s = space();
        assert_eq!(s.write(8, b"x"), Ok(Some(b'x')));
        assert_eq!(s.write(8, &u32::from(b'y').to_le_bytes()), Ok(Some(b'y')));
        let mut b = [0xffu8; 4];
        s.read(8, &mut b).unwrap();
        assert_eq!(b, [0; 4], "emerg_wr reads as 0");
    }

    #[test]
    fn emerg_write_refused_without_feature() {
        let mut s = ConsoleConfigSpace::new(None, 1, false);
        assert_eq!(s.write(8, b"x"), Err(ConfigError::EmergWriteNotOffered));
        assert_eq!(s.features() & feature_mask(VIRTIO_CONSOLE_F_EMERG_WRITE), 0);
    }

    #[test]
    fn writes_to_read_only_fields_are_refused() {
        let mut s = space();
        assert_eq!(
            s.write(0, &[1, 2]),
            Err(ConfigError::ReadOnly { offset: 0, len: 2 })
        );
        assert!(s.write(9, &[1]).is_err());
        assert!(s.write(8, &[0; 5]).is_err());
        assert_eq!(s.size().cols, 0x1234);
    }

    #[test]
    fn features_follow_configuration() {
        let s = space();
        assert_eq!(s.features(), 0b111);
        let single = ConsoleConfigSpace::new(None, 1, false);
        assert_eq!(single.features(), 0);
        assert_eq!(single.config().max_nr_ports, 1);
    }

    #[test]
    fn queue_indexes_follow_5_3_2() {
        assert_eq!(receiveq_index(0), Some(0));
        assert_eq!(transmitq_index(0), Some(1));
        assert_eq!(receiveq_index(1), Some(4));
        assert_eq!(transmitq_index(1), Some(5));
        assert_eq!(receiveq_index(2), Some(6));
        assert_eq!(transmitq_index(2), Some(7));
        assert_eq!(receiveq_index(u32::MAX), None);
        assert_eq!(transmitq_index(32766), Some(65535));
        assert_eq!(transmitq_index(32767), None);
    }

    #[test]
    fn queue_role_inverts_queue_indexes() {
        assert_eq!(queue_role(2), QueueRole::ControlReceive);
        assert_eq!(queue_role(3), QueueRole::ControlTransmit);
        for port in 0..100u32 {
            assert_eq!(
                queue_role(receiveq_index(port).unwrap()),
                QueueRole::Receive(port)
            );
            assert_eq!(
                queue_role(transmitq_index(port).unwrap()),
                QueueRole::Transmit(port)
            );
        }
    }

    #[test]
    fn num_queues_counts_control_pair_with_multiport() {
        assert_eq!(num_queues(8, false), Some(2));
        assert_eq!(num_queues(1, true), Some(4));
        assert_eq!(num_queues(8, true), Some(18));
        assert_eq!(num_queues(u32::MAX, true), None);
    }
}
