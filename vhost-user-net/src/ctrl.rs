// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control virtqueue (virtio 1.2 §5.1.6.5) and the receive filter it configures.
//!
//! A control request is
//!
//! ```text
//! struct virtio_net_ctrl {
//!     u8 class;                     // device-readable
//!     u8 command;
//!     u8 command-specific-data[];
//!     u8 ack;                       // device-writable: VIRTIO_NET_OK or VIRTIO_NET_ERR
//! }
//! ```
//!
//! [`NetState::handle`] reads the readable part from any [`io::Read`] (a descriptor chain's
//! `virtio_core::Reader`, or a byte slice) and writes the ack byte to any [`io::Write`]
//! (the chain's `Writer`, or a `&mut [u8]`). Every malformed request (short, too long,
//! unknown class or command, a command whose feature was not negotiated, an out of range
//! value) is answered VIRTIO_NET_ERR with the reason in [`CtrlOutcome::error`]; nothing a
//! driver sends can panic. The resulting device state lives in [`NetState`], whose
//! [`NetState::accepts`] is the per-packet receive filter.

use std::io::{self, Read, Write};

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, VIRTIO_NET_CTRL_GUEST_OFFLOADS,
    VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET,
    VIRTIO_NET_CTRL_MAC_TABLE_SET, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN,
    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI,
    VIRTIO_NET_CTRL_RX_ALLUNI, VIRTIO_NET_CTRL_RX_NOBCAST, VIRTIO_NET_CTRL_RX_NOMULTI,
    VIRTIO_NET_CTRL_RX_NOUNI, VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_ERR,
    VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_RX_EXTRA, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_MQ, VIRTIO_NET_OK,
};

use crate::config::MacAddr;
use crate::features::{Negotiated, GUEST_OFFLOAD_FEATURES};

/// Ack byte: success.
pub const ACK_OK: u8 = 0;
/// Ack byte: failure.
pub const ACK_ERR: u8 = 1;

const _: () = assert!(ACK_OK as u32 == VIRTIO_NET_OK && ACK_ERR as u32 == VIRTIO_NET_ERR);

/// Entries kept in each MAC filter table (unicast, multicast). A longer table sets the
/// table's overflow flag, which accepts every address of its kind (as QEMU does): the
/// spec sets no limit, and accepting too much is the safe failure of a filter.
pub const MAC_TABLE_ENTRIES: usize = 64;

/// Why a control request was answered VIRTIO_NET_ERR.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// The request ended before its class and command bytes.
    #[error("control request of {0} bytes has no class and command header")]
    NoHeader(usize),
    /// The command's data ended early.
    #[error("control command {class}.{command}: data is truncated (needed {needed} more bytes)")]
    Truncated {
        /// Class.
        class: u8,
        /// Command.
        command: u8,
        /// Bytes missing.
        needed: usize,
    },
    /// The command's data is longer than its fixed size.
    #[error("control command {class}.{command}: unexpected bytes after the command data")]
    TrailingBytes {
        /// Class.
        class: u8,
        /// Command.
        command: u8,
    },
    /// The class is not one the device implements.
    #[error("unknown control class {0}")]
    UnknownClass(u8),
    /// The command is not one of its class.
    #[error("unknown control command {command} of class {class}")]
    UnknownCommand {
        /// Class.
        class: u8,
        /// Command.
        command: u8,
    },
    /// The feature that enables this command was not negotiated.
    #[error("control command {class}.{command} needs feature {feature}, which was not negotiated")]
    NotNegotiated {
        /// Class.
        class: u8,
        /// Command.
        command: u8,
        /// Name of the missing feature.
        feature: &'static str,
    },
    /// An RX mode command's value is not 0 or 1.
    #[error("receive mode command {command}: value {value} is neither 0 nor 1")]
    BadBool {
        /// Command.
        command: u8,
        /// The value sent.
        value: u8,
    },
    /// VQ_PAIRS_SET outside 1..=max_virtqueue_pairs (§5.1.6.5.6).
    #[error("VQ_PAIRS_SET {requested}: must be from 1 to {max}")]
    PairsOutOfRange {
        /// Pairs asked.
        requested: u16,
        /// max_virtqueue_pairs.
        max: u16,
    },
    /// GUEST_OFFLOADS_SET with offloads that were not negotiated (§5.1.6.5.8.2).
    #[error("GUEST_OFFLOADS_SET {requested:#x}: only {allowed:#x} were negotiated")]
    OffloadsNotNegotiated {
        /// Offloads asked.
        requested: u64,
        /// Negotiated guest offloads.
        allowed: u64,
    },
    /// The request could not be read.
    #[error("cannot read the control request: {0}")]
    Read(String),
}

/// A control request that could not be answered at all.
#[derive(Debug, thiserror::Error)]
pub enum CtrlError {
    /// The chain has no writable byte for the ack (the device returns it with a used
    /// length of 0).
    #[error("control request has no writable ack byte")]
    NoAckByte,
    /// Writing the ack failed.
    #[error("cannot write the control ack: {0}")]
    Write(#[source] io::Error),
}

/// What a successful command changed, for the device to act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtrlChange {
    /// A receive mode flag changed (the filter already uses it).
    RxMode,
    /// The MAC filter tables were replaced.
    MacTable,
    /// The device's MAC address changed (a TAP device may follow it).
    MacAddr(MacAddr),
    /// The driver uses this many queue pairs from now on: enable pairs `0..n`, stop the
    /// others (§5.1.6.5.6).
    QueuePairs(u16),
    /// The guest offloads (feature bits of [`GUEST_OFFLOAD_FEATURES`]) changed: apply
    /// them with TUNSETOFFLOAD (§5.1.6.5.8).
    GuestOffloads(u64),
    /// The driver acknowledged an announcement: clear VIRTIO_NET_S_ANNOUNCE (§5.1.6.5.4).
    AnnounceAcked,
}

/// The result of one control request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtrlOutcome {
    /// The ack byte written: [`ACK_OK`] or [`ACK_ERR`].
    pub ack: u8,
    /// What changed, if anything.
    pub change: Option<CtrlChange>,
    /// Why the request was refused (`ack` is then [`ACK_ERR`]).
    pub error: Option<CommandError>,
}

/// Receive modes set by VIRTIO_NET_CTRL_RX (§5.1.6.5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxMode {
    /// Deliver every frame.
    pub promisc: bool,
    /// Deliver every multicast frame.
    pub allmulti: bool,
    /// Deliver every unicast frame.
    pub alluni: bool,
    /// Deliver no multicast frame.
    pub nomulti: bool,
    /// Deliver no unicast frame.
    pub nouni: bool,
    /// Deliver no broadcast frame.
    pub nobcast: bool,
}

impl Default for RxMode {
    /// Promiscuous until the driver says otherwise: a driver without CTRL_RX cannot
    /// configure a filter, and Linux turns promiscuous mode off when it opens the device
    /// (the same default as QEMU).
    fn default() -> Self {
        RxMode {
            promisc: true,
            allmulti: false,
            alluni: false,
            nomulti: false,
            nouni: false,
            nobcast: false,
        }
    }
}

/// A bounded MAC filter table (no allocation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacTable {
    entries: [MacAddr; MAC_TABLE_ENTRIES],
    len: usize,
    overflow: bool,
}

impl Default for MacTable {
    fn default() -> Self {
        MacTable {
            entries: [MacAddr::default(); MAC_TABLE_ENTRIES],
            len: 0,
            overflow: false,
        }
    }
}

impl MacTable {
    /// The addresses kept.
    pub fn entries(&self) -> &[MacAddr] {
        self.entries.get(..self.len).unwrap_or(&[])
    }

    /// Whether the driver sent more addresses than fit (the table then matches everything).
    pub fn overflowed(&self) -> bool {
        self.overflow
    }

    /// Whether `mac` matches.
    pub fn matches(&self, mac: &MacAddr) -> bool {
        self.overflow || self.entries().contains(mac)
    }

    fn push(&mut self, mac: MacAddr) {
        match self.entries.get_mut(self.len) {
            Some(slot) => {
                *slot = mac;
                self.len += 1;
            }
            None => self.overflow = true,
        }
    }
}

/// The device state the control queue configures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetState {
    features: Negotiated,
    max_pairs: u16,
    /// The device's MAC address.
    pub mac: MacAddr,
    /// Receive modes.
    pub rx_mode: RxMode,
    /// Unicast filter table (MAC_TABLE_SET).
    pub unicast: MacTable,
    /// Multicast filter table (MAC_TABLE_SET).
    pub multicast: MacTable,
    /// Queue pairs in use (1 until VQ_PAIRS_SET, §5.1.6.5.6).
    pub active_pairs: u16,
    /// Guest offloads in use, as feature bits (§5.1.6.5.8: initially all negotiated ones).
    pub guest_offloads: u64,
}

impl NetState {
    /// The state after FEATURES_OK (and after a reset): promiscuous, empty tables, one
    /// queue pair, every negotiated guest offload on.
    pub fn new(features: Negotiated, mac: MacAddr, max_pairs: u16) -> Self {
        NetState {
            features,
            max_pairs: max_pairs.max(1),
            mac,
            rx_mode: RxMode::default(),
            unicast: MacTable::default(),
            multicast: MacTable::default(),
            active_pairs: 1,
            guest_offloads: features.guest_offloads(),
        }
    }

    /// The negotiated features.
    pub fn features(&self) -> Negotiated {
        self.features
    }

    /// The receive filter (§5.1.6.5.1, §5.1.6.5.2): whether a frame to `dst` is delivered
    /// to the driver. Allocation-free; at most [`MAC_TABLE_ENTRIES`] comparisons.
    pub fn accepts(&self, dst: &MacAddr) -> bool {
        let m = &self.rx_mode;
        if m.promisc {
            return true;
        }
        if dst.is_broadcast() {
            !m.nobcast
        } else if dst.is_multicast() {
            !m.nomulti && (m.allmulti || self.multicast.matches(dst))
        } else {
            !m.nouni && (m.alluni || *dst == self.mac || self.unicast.matches(dst))
        }
    }

    /// [`Self::accepts`] on the destination of an Ethernet frame; frames shorter than a
    /// destination address are refused.
    pub fn accepts_frame(&self, frame: &[u8]) -> bool {
        match frame.first_chunk::<6>() {
            Some(dst) => self.accepts(&MacAddr(*dst)),
            None => false,
        }
    }

    /// Parses and executes one control request, then writes its ack.
    pub fn handle(
        &mut self,
        request: &mut impl Read,
        ack: &mut impl Write,
    ) -> Result<CtrlOutcome, CtrlError> {
        let outcome = match self.execute(request) {
            Ok(change) => CtrlOutcome {
                ack: ACK_OK,
                change,
                error: None,
            },
            Err(e) => CtrlOutcome {
                ack: ACK_ERR,
                change: None,
                error: Some(e),
            },
        };
        loop {
            match ack.write(&[outcome.ack]) {
                Ok(0) => return Err(CtrlError::NoAckByte),
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WriteZero => return Err(CtrlError::NoAckByte),
                Err(e) => return Err(CtrlError::Write(e)),
            }
        }
        Ok(outcome)
    }

    /// Parses and executes one control request without writing an ack: the state changes
    /// only when the whole request is valid.
    pub fn execute(&mut self, request: &mut impl Read) -> Result<Option<CtrlChange>, CommandError> {
        let mut hdr = [0u8; 2];
        let got = read_full(request, &mut hdr)?;
        if got < 2 {
            return Err(CommandError::NoHeader(got));
        }
        let [class, command] = hdr;
        let mut cmd = Command {
            r: request,
            class,
            command,
        };
        match u32::from(class) {
            VIRTIO_NET_CTRL_RX => self.rx_command(&mut cmd),
            VIRTIO_NET_CTRL_MAC => self.mac_command(&mut cmd),
            VIRTIO_NET_CTRL_ANNOUNCE => {
                cmd.require(self.features, VIRTIO_NET_F_GUEST_ANNOUNCE, "GUEST_ANNOUNCE")?;
                if u32::from(command) != VIRTIO_NET_CTRL_ANNOUNCE_ACK {
                    return Err(cmd.unknown());
                }
                cmd.end()?;
                Ok(Some(CtrlChange::AnnounceAcked))
            }
            VIRTIO_NET_CTRL_MQ => {
                cmd.require(self.features, VIRTIO_NET_F_MQ, "MQ")?;
                // RSS_CONFIG and HASH_CONFIG need RSS / HASH_REPORT, which are not offered.
                if u32::from(command) != VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET {
                    return Err(cmd.unknown());
                }
                let mut b = [0u8; 2];
                cmd.data(&mut b)?;
                cmd.end()?;
                let pairs = u16::from_le_bytes(b);
                if u32::from(pairs) < VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN || pairs > self.max_pairs {
                    return Err(CommandError::PairsOutOfRange {
                        requested: pairs,
                        max: self.max_pairs,
                    });
                }
                self.active_pairs = pairs;
                Ok(Some(CtrlChange::QueuePairs(pairs)))
            }
            VIRTIO_NET_CTRL_GUEST_OFFLOADS => {
                cmd.require(
                    self.features,
                    VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
                    "CTRL_GUEST_OFFLOADS",
                )?;
                if u32::from(command) != VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET {
                    return Err(cmd.unknown());
                }
                let mut b = [0u8; 8];
                cmd.data(&mut b)?;
                cmd.end()?;
                let requested = u64::from_le_bytes(b);
                let allowed = self.features.bits() & GUEST_OFFLOAD_FEATURES;
                // §5.1.6.5.8.2: no offload whose feature was not negotiated.
                if requested & !allowed != 0 {
                    return Err(CommandError::OffloadsNotNegotiated { requested, allowed });
                }
                self.guest_offloads = requested;
                Ok(Some(CtrlChange::GuestOffloads(requested)))
            }
            _ => Err(CommandError::UnknownClass(class)),
        }
    }

    fn rx_command<R: Read>(
        &mut self,
        cmd: &mut Command<'_, R>,
    ) -> Result<Option<CtrlChange>, CommandError> {
        cmd.require(self.features, VIRTIO_NET_F_CTRL_RX, "CTRL_RX")?;
        let command = u32::from(cmd.command);
        // §5.1.6.5.1: PROMISC and ALLMULTI come with CTRL_RX, the others with CTRL_RX_EXTRA.
        let extra = matches!(
            command,
            VIRTIO_NET_CTRL_RX_ALLUNI
                | VIRTIO_NET_CTRL_RX_NOMULTI
                | VIRTIO_NET_CTRL_RX_NOUNI
                | VIRTIO_NET_CTRL_RX_NOBCAST
        );
        if !extra && command != VIRTIO_NET_CTRL_RX_PROMISC && command != VIRTIO_NET_CTRL_RX_ALLMULTI
        {
            return Err(cmd.unknown());
        }
        if extra {
            cmd.require(self.features, VIRTIO_NET_F_CTRL_RX_EXTRA, "CTRL_RX_EXTRA")?;
        }
        let mut b = [0u8; 1];
        cmd.data(&mut b)?;
        cmd.end()?;
        let on = match b[0] {
            0 => false,
            1 => true,
            value => {
                return Err(CommandError::BadBool {
                    command: cmd.command,
                    value,
                })
            }
        };
        let m = &mut self.rx_mode;
        let flag = match command {
            VIRTIO_NET_CTRL_RX_PROMISC => &mut m.promisc,
            VIRTIO_NET_CTRL_RX_ALLMULTI => &mut m.allmulti,
            VIRTIO_NET_CTRL_RX_ALLUNI => &mut m.alluni,
            VIRTIO_NET_CTRL_RX_NOMULTI => &mut m.nomulti,
            VIRTIO_NET_CTRL_RX_NOUNI => &mut m.nouni,
            _ => &mut m.nobcast,
        };
        *flag = on;
        Ok(Some(CtrlChange::RxMode))
    }

    fn mac_command<R: Read>(
        &mut self,
        cmd: &mut Command<'_, R>,
    ) -> Result<Option<CtrlChange>, CommandError> {
        match u32::from(cmd.command) {
            VIRTIO_NET_CTRL_MAC_TABLE_SET => {
                // §5.1.6.5.2: TABLE_SET comes with CTRL_RX.
                cmd.require(self.features, VIRTIO_NET_F_CTRL_RX, "CTRL_RX")?;
                let unicast = cmd.mac_table()?;
                let multicast = cmd.mac_table()?;
                cmd.end()?;
                self.unicast = unicast;
                self.multicast = multicast;
                Ok(Some(CtrlChange::MacTable))
            }
            VIRTIO_NET_CTRL_MAC_ADDR_SET => {
                cmd.require(self.features, VIRTIO_NET_F_CTRL_MAC_ADDR, "CTRL_MAC_ADDR")?;
                let mut mac = [0u8; 6];
                cmd.data(&mut mac)?;
                cmd.end()?;
                self.mac = MacAddr(mac);
                Ok(Some(CtrlChange::MacAddr(self.mac)))
            }
            _ => Err(cmd.unknown()),
        }
    }
}

/// Reads as much of `buf` as the reader has; returns the count (short only at the end).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, CommandError> {
    let mut done = 0;
    while let Some(rest) = buf.get_mut(done..).filter(|rest| !rest.is_empty()) {
        match r.read(rest) {
            Ok(0) => break,
            Ok(n) => done += n.min(rest.len()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(CommandError::Read(e.to_string())),
        }
    }
    Ok(done)
}

/// The data part of one command.
struct Command<'a, R> {
    r: &'a mut R,
    class: u8,
    command: u8,
}

impl<R: Read> Command<'_, R> {
    fn unknown(&self) -> CommandError {
        CommandError::UnknownCommand {
            class: self.class,
            command: self.command,
        }
    }

    fn require(
        &self,
        features: Negotiated,
        bit: u32,
        feature: &'static str,
    ) -> Result<(), CommandError> {
        if features.has(bit) {
            Ok(())
        } else {
            Err(CommandError::NotNegotiated {
                class: self.class,
                command: self.command,
                feature,
            })
        }
    }

    fn data(&mut self, buf: &mut [u8]) -> Result<(), CommandError> {
        let got = read_full(self.r, buf)?;
        if got < buf.len() {
            return Err(CommandError::Truncated {
                class: self.class,
                command: self.command,
                needed: buf.len() - got,
            });
        }
        Ok(())
    }

    /// Refuses data after the command's fixed-size part.
    fn end(&mut self) -> Result<(), CommandError> {
        let mut b = [0u8; 1];
        if read_full(self.r, &mut b)? != 0 {
            return Err(CommandError::TrailingBytes {
                class: self.class,
                command: self.command,
            });
        }
        Ok(())
    }

    /// One `struct virtio_net_ctrl_mac { le32 entries; u8 macs[entries][6]; }`. The
    /// entry count is the driver's: addresses are read one at a time into the bounded
    /// table (the rest only set its overflow flag), so a huge count costs no memory and
    /// ends at the end of the request.
    fn mac_table(&mut self) -> Result<MacTable, CommandError> {
        let mut n = [0u8; 4];
        self.data(&mut n)?;
        let entries = u32::from_le_bytes(n);
        let mut table = MacTable::default();
        for _ in 0..entries {
            let mut mac = [0u8; 6];
            self.data(&mut mac)?;
            table.push(MacAddr(mac));
        }
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_net::{
        VIRTIO_NET_CTRL_MQ_RSS_CONFIG, VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_UFO,
    };

    use super::*;
    use crate::features::bit;

    const MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    const OTHER: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
    const MCAST: MacAddr = MacAddr([0x01, 0x00, 0x5e, 0, 0, 1]);

    fn all_ctrl() -> Negotiated {
        Negotiated::from_bits_unchecked(
            bit(VIRTIO_NET_F_CTRL_VQ)
                | bit(VIRTIO_NET_F_CTRL_RX)
                | bit(VIRTIO_NET_F_CTRL_RX_EXTRA)
                | bit(VIRTIO_NET_F_CTRL_MAC_ADDR)
                | bit(VIRTIO_NET_F_MQ)
                | bit(VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
                | bit(VIRTIO_NET_F_GUEST_ANNOUNCE)
                | bit(VIRTIO_NET_F_GUEST_CSUM)
                | bit(VIRTIO_NET_F_GUEST_TSO4),
        )
    }

    fn state() -> NetState {
        NetState::new(all_ctrl(), MAC, 4)
    }

    fn req(class: u32, command: u32, data: &[u8]) -> Vec<u8> {
        let mut v = vec![u8::try_from(class).unwrap(), u8::try_from(command).unwrap()];
        v.extend_from_slice(data);
        v
    }

    fn run(s: &mut NetState, request: &[u8]) -> CtrlOutcome {
        let mut ack = [0xaau8; 1];
        let out = s.handle(&mut &request[..], &mut &mut ack[..]).unwrap();
        assert_eq!(ack[0], out.ack);
        out
    }

    fn table(macs: &[MacAddr]) -> Vec<u8> {
        let mut v = u32::try_from(macs.len()).unwrap().to_le_bytes().to_vec();
        for m in macs {
            v.extend_from_slice(&m.0);
        }
        v
    }

    #[test]
    fn initial_state_is_promiscuous_with_one_pair() {
        let s = state();
        assert!(s.rx_mode.promisc);
        assert_eq!(s.active_pairs, 1);
        assert_eq!(
            s.guest_offloads,
            bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4)
        );
        assert!(s.accepts(&OTHER));
    }

    #[test]
    fn promisc_off_filters_foreign_unicast() {
        let mut s = state();
        let out = run(
            &mut s,
            &req(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, &[0]),
        );
        assert_eq!(
            out,
            CtrlOutcome {
                ack: ACK_OK,
                change: Some(CtrlChange::RxMode),
                error: None
            }
        );
        assert!(s.accepts(&MAC));
        assert!(!s.accepts(&OTHER));
        assert!(s.accepts(&crate::config::BROADCAST));
        assert!(!s.accepts(&MCAST));
    }

    #[test]
    fn allmulti_accepts_every_multicast() {
        let mut s = state();
        run(
            &mut s,
            &req(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, &[0]),
        );
        run(
            &mut s,
            &req(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI, &[1]),
        );
        assert!(s.accepts(&MCAST));
        assert!(!s.accepts(&OTHER));
    }

    #[test]
    fn extra_rx_modes_apply() {
        let mut s = state();
        run(
            &mut s,
            &req(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, &[0]),
        );
        run(
            &mut s,
            &req(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLUNI, &[1]),
        );
        assert!(s.accepts(&OTHER));
        run(
            &mut s,
            &req(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOUNI, &[1]),
        );
        assert!(!s.accepts(&MAC));
        run(
            &mut s,
            &req(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOBCAST, &[1]),
        );
        assert!(!s.accepts(&crate::config::BROADCAST));
        run(
            &mut s,
            &req(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI, &[1]),
        );
        run(
            &mut s,
            &req(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOMULTI, &[1]),
        );
        assert!(!s.accepts(&MCAST));
        assert!(!s.rx_mode.promisc && s.rx_mode.nomulti && s.rx_mode.nobcast);
    }

    #[test]
    fn extra_rx_modes_need_ctrl_rx_extra() {
        let f =
            Negotiated::from_bits_unchecked(bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_CTRL_RX));
        let mut s = NetState::new(f, MAC, 1);
        let out = run(
            &mut s,
            &req(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOBCAST, &[1]),
        );
        assert_eq!(out.ack, ACK_ERR);
        assert!(matches!(
            out.error,
            Some(CommandError::NotNegotiated {
                feature: "CTRL_RX_EXTRA",
                ..
            })
        ));
        assert!(!s.rx_mode.nobcast);
    }

    #[test]
    fn rx_value_other_than_0_or_1_is_refused() {
        let mut s = state();
        let out = run(
            &mut s,
            &req(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, &[2]),
        );
        assert_eq!(
            out.error,
            Some(CommandError::BadBool {
                command: 0,
                value: 2
            })
        );
        assert!(s.rx_mode.promisc);
    }

    #[test]
    fn mac_table_set_filters_by_tables() {
        let mut s = state();
        run(
            &mut s,
            &req(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, &[0]),
        );
        let mut data = table(&[OTHER]);
        data.extend(table(&[MCAST]));
        let out = run(
            &mut s,
            &req(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, &data),
        );
        assert_eq!(out.change, Some(CtrlChange::MacTable));
        assert!(s.accepts(&OTHER));
        assert!(s.accepts(&MCAST));
        assert!(!s.accepts(&MacAddr([0x01, 0x00, 0x5e, 0, 0, 2])));
        assert!(!s.accepts(&MacAddr([0x52, 0x54, 0, 0, 0, 2])));
        assert_eq!(s.unicast.entries(), &[OTHER]);
    }

    #[test]
    fn mac_table_overflow_accepts_all_of_its_kind() {
        let mut s = state();
        run(
            &mut s,
            &req(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, &[0]),
        );
        let many: Vec<MacAddr> = (0..=MAC_TABLE_ENTRIES)
            .map(|i| MacAddr([2, 0, 0, 0, 0, u8::try_from(i).unwrap()]))
            .collect();
        let mut data = table(&many);
        data.extend(table(&[]));
        assert_eq!(
            run(
                &mut s,
                &req(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, &data)
            )
            .ack,
            ACK_OK
        );
        assert!(s.unicast.overflowed());
        assert_eq!(s.unicast.entries().len(), MAC_TABLE_ENTRIES);
        assert!(s.accepts(&MacAddr([2, 9, 9, 9, 9, 9])));
        assert!(!s.accepts(&MCAST));
    }

    #[test]
    fn mac_table_with_huge_count_is_truncated_error() {
        let mut s = state();
        let before = s.clone();
        let mut data = u32::MAX.to_le_bytes().to_vec();
        data.extend_from_slice(&OTHER.0);
        let out = run(
            &mut s,
            &req(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, &data),
        );
        assert!(matches!(
            out.error,
            Some(CommandError::Truncated { needed: 6, .. })
        ));
        assert_eq!(s, before);
    }

    #[test]
    fn mac_table_missing_multicast_part_is_refused() {
        let mut s = state();
        let out = run(
            &mut s,
            &req(
                VIRTIO_NET_CTRL_MAC,
                VIRTIO_NET_CTRL_MAC_TABLE_SET,
                &table(&[OTHER]),
            ),
        );
        assert!(matches!(
            out.error,
            Some(CommandError::Truncated { needed: 4, .. })
        ));
        assert!(s.unicast.entries().is_empty());
    }

    #[test]
    fn mac_addr_set_changes_mac() {
        let mut s = state();
        let out = run(
            &mut s,
            &req(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, &OTHER.0),
        );
        assert_eq!(out.change, Some(CtrlChange::MacAddr(OTHER)));
        assert_eq!(s.mac, OTHER);
        run(
            &mut s,
            &req(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, &[0]),
        );
        assert!(s.accepts(&OTHER) && !s.accepts(&MAC));
    }

    #[test]
    fn mac_addr_set_with_wrong_size_is_refused() {
        let mut s = state();
        let short = run(
            &mut s,
            &req(
                VIRTIO_NET_CTRL_MAC,
                VIRTIO_NET_CTRL_MAC_ADDR_SET,
                &OTHER.0[..5],
            ),
        );
        assert!(matches!(
            short.error,
            Some(CommandError::Truncated { needed: 1, .. })
        ));
        let mut long = OTHER.0.to_vec();
        long.push(0);
        let out = run(
            &mut s,
            &req(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, &long),
        );
        assert_eq!(
            out.error,
            Some(CommandError::TrailingBytes {
                class: 1,
                command: 1
            })
        );
        assert_eq!(s.mac, MAC);
    }

    #[test]
    fn vq_pairs_set_in_range_is_accepted() {
        let mut s = state();
        let out = run(
            &mut s,
            &req(
                VIRTIO_NET_CTRL_MQ,
                VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                &4u16.to_le_bytes(),
            ),
        );
        assert_eq!(out.change, Some(CtrlChange::QueuePairs(4)));
        assert_eq!(s.active_pairs, 4);
    }

    #[test]
    fn vq_pairs_set_out_of_range_is_refused() {
        let mut s = state();
        for pairs in [0u16, 5, u16::MAX] {
            let out = run(
                &mut s,
                &req(
                    VIRTIO_NET_CTRL_MQ,
                    VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                    &pairs.to_le_bytes(),
                ),
            );
            assert_eq!(
                out.error,
                Some(CommandError::PairsOutOfRange {
                    requested: pairs,
                    max: 4
                })
            );
        }
        assert_eq!(s.active_pairs, 1);
    }

    #[test]
    fn mq_command_without_mq_is_refused() {
        let f = Negotiated::from_bits_unchecked(bit(VIRTIO_NET_F_CTRL_VQ));
        let mut s = NetState::new(f, MAC, 4);
        let out = run(
            &mut s,
            &req(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, &[1, 0]),
        );
        assert!(matches!(
            out.error,
            Some(CommandError::NotNegotiated { feature: "MQ", .. })
        ));
    }

    #[test]
    fn rss_config_is_unknown() {
        let mut s = state();
        let out = run(
            &mut s,
            &req(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_RSS_CONFIG, &[0; 16]),
        );
        assert_eq!(
            out.error,
            Some(CommandError::UnknownCommand {
                class: 4,
                command: 1
            })
        );
    }

    #[test]
    fn guest_offloads_set_within_negotiated() {
        let mut s = state();
        let off = bit(VIRTIO_NET_F_GUEST_CSUM);
        let out = run(
            &mut s,
            &req(
                VIRTIO_NET_CTRL_GUEST_OFFLOADS,
                VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET,
                &off.to_le_bytes(),
            ),
        );
        assert_eq!(out.change, Some(CtrlChange::GuestOffloads(off)));
        assert_eq!(s.guest_offloads, off);
        let out = run(
            &mut s,
            &req(
                VIRTIO_NET_CTRL_GUEST_OFFLOADS,
                VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET,
                &0u64.to_le_bytes(),
            ),
        );
        assert_eq!(out.ack, ACK_OK);
        assert_eq!(s.guest_offloads, 0);
    }

    #[test]
    fn guest_offloads_set_beyond_negotiated_is_refused() {
        let mut s = state();
        for off in [
            bit(VIRTIO_NET_F_GUEST_UFO),
            bit(VIRTIO_NET_F_CTRL_VQ),
            u64::MAX,
        ] {
            let out = run(
                &mut s,
                &req(
                    VIRTIO_NET_CTRL_GUEST_OFFLOADS,
                    VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET,
                    &off.to_le_bytes(),
                ),
            );
            assert!(
                matches!(out.error, Some(CommandError::OffloadsNotNegotiated { .. })),
                "{off:#x}"
            );
        }
        assert_eq!(s.guest_offloads, all_ctrl().guest_offloads());
    }

    #[test]
    fn announce_ack_needs_guest_announce() {
        let mut s = state();
        let out = run(
            &mut s,
            &req(VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, &[]),
        );
        assert_eq!(out.change, Some(CtrlChange::AnnounceAcked));
        let f = Negotiated::from_bits_unchecked(bit(VIRTIO_NET_F_CTRL_VQ));
        let mut s = NetState::new(f, MAC, 1);
        let out = run(
            &mut s,
            &req(VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, &[]),
        );
        assert_eq!(out.ack, ACK_ERR);
    }

    #[test]
    fn unknown_class_and_command_are_refused() {
        let mut s = state();
        let out = run(&mut s, &req(VIRTIO_NET_CTRL_VLAN, 0, &[0, 0]));
        assert_eq!(out.error, Some(CommandError::UnknownClass(2)));
        let out = run(&mut s, &[200, 0]);
        assert_eq!(out.error, Some(CommandError::UnknownClass(200)));
        let out = run(&mut s, &req(VIRTIO_NET_CTRL_RX, 9, &[1]));
        assert_eq!(
            out.error,
            Some(CommandError::UnknownCommand {
                class: 0,
                command: 9
            })
        );
    }

    #[test]
    fn short_header_is_refused() {
        let mut s = state();
        assert_eq!(run(&mut s, &[]).error, Some(CommandError::NoHeader(0)));
        assert_eq!(run(&mut s, &[0]).error, Some(CommandError::NoHeader(1)));
        let out = run(
            &mut s,
            &req(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, &[]),
        );
        assert!(matches!(
            out.error,
            Some(CommandError::Truncated { needed: 1, .. })
        ));
    }

    #[test]
    fn missing_ack_byte_is_an_error() {
        let mut s = state();
        let request = req(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, &[0]);
        let mut empty: [u8; 0] = [];
        assert!(matches!(
            s.handle(&mut &request[..], &mut &mut empty[..]),
            Err(CtrlError::NoAckByte)
        ));
    }

    #[test]
    fn request_split_in_one_byte_reads_is_parsed() {
        struct OneByte<'a>(&'a [u8]);
        impl Read for OneByte<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                match (self.0.split_first(), buf.first_mut()) {
                    (Some((b, rest)), Some(out)) => {
                        *out = *b;
                        self.0 = rest;
                        Ok(1)
                    }
                    _ => Ok(0),
                }
            }
        }
        let mut s = state();
        let request = req(
            VIRTIO_NET_CTRL_MQ,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
            &3u16.to_le_bytes(),
        );
        let mut ack = Vec::new();
        let out = s.handle(&mut OneByte(&request), &mut ack).unwrap();
        assert_eq!((out.ack, ack), (ACK_OK, vec![ACK_OK]));
        assert_eq!(s.active_pairs, 3);
    }

    #[test]
    fn arbitrary_requests_never_panic() {
        // A deterministic xorshift stream of random requests: every outcome is OK or ERR.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let bytes = x.to_le_bytes();
            let len = usize::from(bytes[7] % 24);
            let mut request = vec![bytes[0] % 7, bytes[1] % 3];
            request
                .extend((0..len).map(|i| bytes[i % 7].wrapping_mul(u8::try_from(i).unwrap_or(0))));
            let mut s = state();
            let out = run(&mut s, &request);
            assert!(out.ack == ACK_OK || out.ack == ACK_ERR);
        }
    }

    #[test]
    fn handle_takes_virtio_core_reader_and_writer() {
        // Compile-time check: a descriptor chain's Reader and Writer fit `handle`.
        fn takes<'a>(
            s: &mut NetState,
            r: &mut virtio_core::Reader<'a>,
            w: &mut virtio_core::Writer<'a>,
        ) {
            let _ = s.handle(r, w);
        }
        let _ = takes;
    }

    #[test]
    fn accepts_frame_refuses_short_frames() {
        let s = state();
        assert!(!s.accepts_frame(&[0xff; 5]));
        assert!(s.accepts_frame(&[0xff; 14]));
    }
}
