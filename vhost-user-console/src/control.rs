// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Multiport control messages (virtio 1.2 §5.3.6.2) and the device's control state
//! machine.
//!
//! With VIRTIO_CONSOLE_F_MULTIPORT, the driver and the device exchange 8-byte
//! [`virtio_console_control`] headers (some followed by a payload) on the control
//! virtqueues: the driver writes to the control transmitq (queue 3), the device to the
//! control receiveq (queue 2).
//!
//! [`ControlState`] is the device's side of that conversation. Feed it every decoded
//! driver message ([`ControlState::handle`]) and the host events of each port
//! ([`ControlState::host_connected`], [`ControlState::resize`]); it queues the messages
//! to send ([`ControlState::peek`] / [`ControlState::pop`]), which the device handler
//! encodes ([`DeviceMessage::encode`]) into buffers of the control receiveq.

use std::collections::VecDeque;
use std::sync::Arc;

use vm_memory::ByteValued;

use crate::config::WinSize;

/// The `id` Linux puts in messages that are about no port (DEVICE_READY).
pub const VIRTIO_CONSOLE_BAD_ID: u32 = !0;

/// Driver: the device is ready (value 1) or failed (value 0).
pub const VIRTIO_CONSOLE_DEVICE_READY: u16 = 0;
/// Device: port `id` was added.
pub const VIRTIO_CONSOLE_DEVICE_ADD: u16 = 1;
/// Device: port `id` was removed.
pub const VIRTIO_CONSOLE_DEVICE_REMOVE: u16 = 2;
/// Driver: port `id` is ready (value 1) or failed (value 0).
pub const VIRTIO_CONSOLE_PORT_READY: u16 = 3;
/// Device: port `id` is a console port.
pub const VIRTIO_CONSOLE_CONSOLE_PORT: u16 = 4;
/// Device: console port `id` changed size (payload [`virtio_console_resize`]).
pub const VIRTIO_CONSOLE_RESIZE: u16 = 5;
/// Both directions: port `id` is open (value 1) or closed (value 0) on the sender's side.
pub const VIRTIO_CONSOLE_PORT_OPEN: u16 = 6;
/// Device: port `id` has a name (payload: the name's bytes).
pub const VIRTIO_CONSOLE_PORT_NAME: u16 = 7;

/// Size of [`virtio_console_control`] in bytes.
pub const CONTROL_HEADER_SIZE: usize = 8;
/// Size of [`virtio_console_resize`] in bytes.
pub const RESIZE_PAYLOAD_SIZE: usize = 4;
/// Longest port name sent. Linux posts page-sized control buffers, and the name must
/// fit one of them with the header.
pub const MAX_PORT_NAME_LEN: usize = 255;

/// The control message header of §5.3.6.2 (fields little-endian on the wire).
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct virtio_console_control {
    /// Port number.
    pub id: u32,
    /// The kind of control event (`VIRTIO_CONSOLE_*`).
    pub event: u16,
    /// Extra information for the event.
    pub value: u16,
}

// SAFETY: repr(C) of u32, u16, u16: naturally aligned, 8 bytes, no padding, and every
// bit pattern is a valid value.
unsafe impl ByteValued for virtio_console_control {}

/// Payload of VIRTIO_CONSOLE_RESIZE (§5.3.6.2): `cols` first, then `rows`, as the spec
/// orders them. Linux before 6.1.162 (and the mainline kernels before the fix it
/// backports) read the two fields swapped (rows first); a guest on such a kernel shows
/// cols and rows exchanged. Since the size message reaches only console ports, the
/// config-space size (F_SIZE without MULTIPORT) is not affected.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct virtio_console_resize {
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
}

// SAFETY: repr(C) of two u16: 4 bytes, no padding, every bit pattern valid.
unsafe impl ByteValued for virtio_console_resize {}

const _: () = assert!(std::mem::size_of::<virtio_console_control>() == CONTROL_HEADER_SIZE);
const _: () = assert!(std::mem::size_of::<virtio_console_resize>() == RESIZE_PAYLOAD_SIZE);

/// Errors of the control path.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    /// A driver message shorter than the 8-byte header.
    #[error("control message of {0} bytes is shorter than the 8-byte header")]
    TooShort(usize),
    /// A driver message with bytes after its header (the driver's events carry none).
    #[error("control message event {event} has {extra} unexpected payload bytes")]
    TrailingBytes {
        /// The event number.
        event: u16,
        /// Bytes after the header.
        extra: usize,
    },
    /// An event number that §5.3.6.2 does not define.
    #[error("unknown control event {0}")]
    UnknownEvent(u16),
    /// An event only the device may send, received from the driver.
    #[error("control event {0} is device-to-driver only, but the driver sent it")]
    WrongDirection(u16),
    /// A value other than 0 or 1 where a boolean is expected.
    #[error("control event {event} has value {value}; only 0 and 1 are defined")]
    BadValue {
        /// The event number.
        event: u16,
        /// The value received.
        value: u16,
    },
    /// A message about a port the device does not have.
    #[error("control event {event} names port {id}, which the device has not added")]
    UnknownPort {
        /// The event number.
        event: u16,
        /// The port number received.
        id: u32,
    },
    /// The buffer given to the encoder cannot hold the message.
    #[error("control message needs {needed} bytes but the buffer has {available}")]
    BufferTooSmall {
        /// Bytes the message needs.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// The queue of messages to send is full (the driver posts no control buffers).
    #[error("control output queue is full ({0} messages); message for port {1} dropped")]
    OutputFull(usize, u32),
    /// Invalid port configuration.
    #[error("invalid port configuration: {0}")]
    BadConfig(String),
}

/// A message from the driver (control transmitq), decoded by [`DriverMessage::decode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverMessage {
    /// VIRTIO_CONSOLE_DEVICE_READY: the driver is ready (`true`) or failed to set up.
    /// Its `id` is ignored (Linux sends [`VIRTIO_CONSOLE_BAD_ID`]).
    DeviceReady(bool),
    /// VIRTIO_CONSOLE_PORT_READY: port `id` is ready or failed.
    PortReady {
        /// Port number.
        id: u32,
        /// Whether the port was set up.
        ok: bool,
    },
    /// VIRTIO_CONSOLE_PORT_OPEN: a guest program opened or closed port `id`.
    PortOpen {
        /// Port number.
        id: u32,
        /// Open (`true`) or closed.
        open: bool,
    },
}

fn bool_value(event: u16, value: u16) -> Result<bool, ControlError> {
    match value {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(ControlError::BadValue { event, value }),
    }
}

/// Reads the header at the start of `bytes`.
pub fn decode_header(bytes: &[u8]) -> Result<virtio_console_control, ControlError> {
    let raw = bytes
        .get(..CONTROL_HEADER_SIZE)
        .ok_or(ControlError::TooShort(bytes.len()))?;
    // Copied out: a guest buffer has no alignment guarantee.
    let mut header = virtio_console_control::default();
    header.as_mut_slice().copy_from_slice(raw);
    Ok(virtio_console_control {
        id: u32::from_le(header.id),
        event: u16::from_le(header.event),
        value: u16::from_le(header.value),
    })
}

impl DriverMessage {
    /// Decodes one message the driver wrote (the readable bytes of one control transmitq
    /// chain). Anything but an 8-byte DEVICE_READY, PORT_READY or PORT_OPEN with value
    /// 0 or 1 is refused.
    pub fn decode(bytes: &[u8]) -> Result<Self, ControlError> {
        let h = decode_header(bytes)?;
        let extra = bytes.len() - CONTROL_HEADER_SIZE;
        match h.event {
            VIRTIO_CONSOLE_DEVICE_READY | VIRTIO_CONSOLE_PORT_READY | VIRTIO_CONSOLE_PORT_OPEN => {}
            VIRTIO_CONSOLE_DEVICE_ADD
            | VIRTIO_CONSOLE_DEVICE_REMOVE
            | VIRTIO_CONSOLE_CONSOLE_PORT
            | VIRTIO_CONSOLE_RESIZE
            | VIRTIO_CONSOLE_PORT_NAME => return Err(ControlError::WrongDirection(h.event)),
            other => return Err(ControlError::UnknownEvent(other)),
        }
        if extra != 0 {
            return Err(ControlError::TrailingBytes {
                event: h.event,
                extra,
            });
        }
        let flag = bool_value(h.event, h.value)?;
        Ok(match h.event {
            VIRTIO_CONSOLE_DEVICE_READY => DriverMessage::DeviceReady(flag),
            VIRTIO_CONSOLE_PORT_READY => DriverMessage::PortReady { id: h.id, ok: flag },
            _ => DriverMessage::PortOpen {
                id: h.id,
                open: flag,
            },
        })
    }

    /// Encodes the message (what a driver would send; for tests and drivers).
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, ControlError> {
        let (id, event, value) = match *self {
            DriverMessage::DeviceReady(ok) => {
                (VIRTIO_CONSOLE_BAD_ID, VIRTIO_CONSOLE_DEVICE_READY, ok)
            }
            DriverMessage::PortReady { id, ok } => (id, VIRTIO_CONSOLE_PORT_READY, ok),
            DriverMessage::PortOpen { id, open } => (id, VIRTIO_CONSOLE_PORT_OPEN, open),
        };
        encode_header(buf, id, event, u16::from(value), &[])
    }
}

fn encode_header(
    buf: &mut [u8],
    id: u32,
    event: u16,
    value: u16,
    payload: &[u8],
) -> Result<usize, ControlError> {
    let needed = CONTROL_HEADER_SIZE + payload.len();
    let available = buf.len();
    let out = buf
        .get_mut(..needed)
        .ok_or(ControlError::BufferTooSmall { needed, available })?;
    let header = virtio_console_control {
        id: id.to_le(),
        event: event.to_le(),
        value: value.to_le(),
    };
    out[..CONTROL_HEADER_SIZE].copy_from_slice(header.as_slice());
    out[CONTROL_HEADER_SIZE..].copy_from_slice(payload);
    Ok(needed)
}

/// A message for the driver (control receiveq).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceMessage {
    /// VIRTIO_CONSOLE_DEVICE_ADD: port `id` exists.
    DeviceAdd(u32),
    /// VIRTIO_CONSOLE_DEVICE_REMOVE: port `id` is gone.
    DeviceRemove(u32),
    /// VIRTIO_CONSOLE_CONSOLE_PORT (value 1): port `id` is a console (hvc in Linux).
    ConsolePort(u32),
    /// VIRTIO_CONSOLE_RESIZE: console port `id` has a new size.
    Resize(u32, WinSize),
    /// VIRTIO_CONSOLE_PORT_OPEN: the host side of port `id` connected or went away.
    PortOpen(u32, bool),
    /// VIRTIO_CONSOLE_PORT_NAME: port `id` is called `name` (no NUL; Linux adds one).
    PortName(u32, Arc<[u8]>),
}

impl DeviceMessage {
    /// The port the message is about.
    pub fn port(&self) -> u32 {
        match *self {
            DeviceMessage::DeviceAdd(id)
            | DeviceMessage::DeviceRemove(id)
            | DeviceMessage::ConsolePort(id)
            | DeviceMessage::Resize(id, _)
            | DeviceMessage::PortOpen(id, _)
            | DeviceMessage::PortName(id, _) => id,
        }
    }

    /// Bytes [`DeviceMessage::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        CONTROL_HEADER_SIZE
            + match self {
                DeviceMessage::Resize(..) => RESIZE_PAYLOAD_SIZE,
                DeviceMessage::PortName(_, name) => name.len(),
                _ => 0,
            }
    }

    /// Writes the message (header, then payload) at the start of `buf` and returns its
    /// length; refused if `buf` is too small.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, ControlError> {
        match self {
            DeviceMessage::DeviceAdd(id) => {
                encode_header(buf, *id, VIRTIO_CONSOLE_DEVICE_ADD, 0, &[])
            }
            DeviceMessage::DeviceRemove(id) => {
                encode_header(buf, *id, VIRTIO_CONSOLE_DEVICE_REMOVE, 0, &[])
            }
            DeviceMessage::ConsolePort(id) => {
                encode_header(buf, *id, VIRTIO_CONSOLE_CONSOLE_PORT, 1, &[])
            }
            DeviceMessage::Resize(id, size) => {
                let payload = virtio_console_resize {
                    cols: size.cols.to_le(),
                    rows: size.rows.to_le(),
                };
                encode_header(buf, *id, VIRTIO_CONSOLE_RESIZE, 0, payload.as_slice())
            }
            DeviceMessage::PortOpen(id, open) => {
                encode_header(buf, *id, VIRTIO_CONSOLE_PORT_OPEN, u16::from(*open), &[])
            }
            DeviceMessage::PortName(id, name) => {
                encode_header(buf, *id, VIRTIO_CONSOLE_PORT_NAME, 1, name)
            }
        }
    }
}

/// The configuration of one port, as the daemon sets it up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortConfig {
    /// Port number (0 ..= max_nr_ports - 1).
    pub id: u32,
    /// Name announced with PORT_NAME (Linux: `/dev/virtio-ports/NAME`), any bytes but
    /// NUL, at most [`MAX_PORT_NAME_LEN`].
    pub name: Option<Arc<[u8]>>,
    /// Announced with CONSOLE_PORT (the guest makes it an hvc console).
    pub console: bool,
}

#[derive(Debug)]
struct PortState {
    config: PortConfig,
    added: bool,
    guest_ready: bool,
    guest_open: bool,
    host_connected: bool,
    size: Option<WinSize>,
}

/// The device's side of the multiport control protocol (§5.3.6.2), for one device.
#[derive(Debug)]
pub struct ControlState {
    ports: Vec<PortState>,
    device_ready: bool,
    out: VecDeque<DeviceMessage>,
    out_capacity: usize,
}

impl ControlState {
    /// A state machine for `ports` (distinct ids below `max_nr_ports`). The output queue
    /// holds at most 8 messages per port (more than one full announcement of each).
    pub fn new(ports: Vec<PortConfig>, max_nr_ports: u32) -> Result<Self, ControlError> {
        let mut states: Vec<PortState> = Vec::with_capacity(ports.len());
        for config in ports {
            if config.id >= max_nr_ports {
                return Err(ControlError::BadConfig(format!(
                    "port {} is not below max_nr_ports {max_nr_ports}",
                    config.id
                )));
            }
            if states.iter().any(|p| p.config.id == config.id) {
                return Err(ControlError::BadConfig(format!(
                    "port {} is configured twice",
                    config.id
                )));
            }
            if let Some(name) = &config.name {
                if name.is_empty() || name.len() > MAX_PORT_NAME_LEN || name.contains(&0) {
                    return Err(ControlError::BadConfig(format!(
                        "port {} name must be 1 to {MAX_PORT_NAME_LEN} bytes without NUL",
                        config.id
                    )));
                }
            }
            states.push(PortState {
                config,
                added: false,
                guest_ready: false,
                guest_open: false,
                host_connected: false,
                size: None,
            });
        }
        let out_capacity = 8 * states.len().max(1);
        Ok(Self {
            ports: states,
            device_ready: false,
            out: VecDeque::with_capacity(out_capacity),
            out_capacity,
        })
    }

    fn port_mut(&mut self, event: u16, id: u32) -> Result<&mut PortState, ControlError> {
        self.ports
            .iter_mut()
            .find(|p| p.config.id == id)
            .ok_or(ControlError::UnknownPort { event, id })
    }

    fn push(&mut self, msg: DeviceMessage) -> Result<(), ControlError> {
        if self.out.len() >= self.out_capacity {
            return Err(ControlError::OutputFull(self.out_capacity, msg.port()));
        }
        self.out.push_back(msg);
        Ok(())
    }

    /// Handles one message from the driver, queueing the answers:
    /// * DEVICE_READY(1): DEVICE_ADD for every configured port not yet added;
    /// * PORT_READY(id, 1): CONSOLE_PORT (console ports), PORT_NAME (named ports),
    ///   RESIZE (console ports with a known size), PORT_OPEN(1) (host side connected);
    /// * PORT_OPEN(id, v): records whether a guest program has the port open.
    pub fn handle(&mut self, msg: DriverMessage) -> Result<(), ControlError> {
        match msg {
            DriverMessage::DeviceReady(false) => {
                log::warn!("virtio-console driver reports that the device failed to set up");
                self.device_ready = false;
                Ok(())
            }
            DriverMessage::DeviceReady(true) => {
                self.device_ready = true;
                for i in 0..self.ports.len() {
                    if !self.ports[i].added {
                        let id = self.ports[i].config.id;
                        self.push(DeviceMessage::DeviceAdd(id))?;
                        self.ports[i].added = true;
                    }
                }
                Ok(())
            }
            DriverMessage::PortReady { id, ok } => {
                let port = self.port_mut(VIRTIO_CONSOLE_PORT_READY, id)?;
                if !port.added {
                    return Err(ControlError::UnknownPort {
                        event: VIRTIO_CONSOLE_PORT_READY,
                        id,
                    });
                }
                port.guest_ready = ok;
                if !ok {
                    log::warn!("virtio-console driver failed to set up port {id}");
                    return Ok(());
                }
                let console = port.config.console;
                let name = port.config.name.clone();
                let size = port.size;
                let connected = port.host_connected;
                if console {
                    self.push(DeviceMessage::ConsolePort(id))?;
                }
                if let Some(name) = name {
                    self.push(DeviceMessage::PortName(id, name))?;
                }
                if let (true, Some(size)) = (console, size) {
                    self.push(DeviceMessage::Resize(id, size))?;
                }
                if connected {
                    self.push(DeviceMessage::PortOpen(id, true))?;
                }
                Ok(())
            }
            DriverMessage::PortOpen { id, open } => {
                let port = self.port_mut(VIRTIO_CONSOLE_PORT_OPEN, id)?;
                port.guest_open = open;
                Ok(())
            }
        }
    }

    /// The host side of port `id` connected or went away: tells the driver with
    /// PORT_OPEN once the port is ready (before that, PORT_READY handling sends it).
    pub fn host_connected(&mut self, id: u32, connected: bool) -> Result<(), ControlError> {
        let port = self.port_mut(VIRTIO_CONSOLE_PORT_OPEN, id)?;
        if port.host_connected == connected {
            return Ok(());
        }
        port.host_connected = connected;
        if port.guest_ready {
            self.push(DeviceMessage::PortOpen(id, connected))?;
        }
        Ok(())
    }

    /// Console port `id` changed size: sends RESIZE once the port is ready (only console
    /// ports get one; the size of others is recorded and ignored).
    pub fn resize(&mut self, id: u32, size: WinSize) -> Result<(), ControlError> {
        let port = self.port_mut(VIRTIO_CONSOLE_RESIZE, id)?;
        if port.size == Some(size) {
            return Ok(());
        }
        port.size = Some(size);
        if port.guest_ready && port.config.console {
            self.push(DeviceMessage::Resize(id, size))?;
        }
        Ok(())
    }

    /// Whether a guest program has port `id` open (its last PORT_OPEN); `None` for an
    /// unknown port.
    pub fn guest_open(&self, id: u32) -> Option<bool> {
        self.ports
            .iter()
            .find(|p| p.config.id == id)
            .map(|p| p.guest_open)
    }

    /// Whether the driver reported port `id` ready.
    pub fn port_ready(&self, id: u32) -> Option<bool> {
        self.ports
            .iter()
            .find(|p| p.config.id == id)
            .map(|p| p.guest_ready)
    }

    /// Whether the driver sent DEVICE_READY(1).
    pub fn device_ready(&self) -> bool {
        self.device_ready
    }

    /// The next message to send, left queued (pop it once it is in a buffer).
    pub fn peek(&self) -> Option<&DeviceMessage> {
        self.out.front()
    }

    /// Takes the next message to send.
    pub fn pop(&mut self) -> Option<DeviceMessage> {
        self.out.pop_front()
    }

    /// Messages waiting to be sent.
    pub fn pending(&self) -> usize {
        self.out.len()
    }

    /// Forgets everything the driver told (device reset), keeping the host side state.
    pub fn reset(&mut self) {
        self.device_ready = false;
        self.out.clear();
        for p in &mut self.ports {
            p.added = false;
            p.guest_ready = false;
            p.guest_open = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(s: &mut ControlState) -> Vec<DeviceMessage> {
        std::iter::from_fn(|| s.pop()).collect()
    }

    fn two_ports() -> ControlState {
        ControlState::new(
            vec![
                PortConfig {
                    id: 0,
                    name: None,
                    console: true,
                },
                PortConfig {
                    id: 1,
                    name: Some(Arc::from(&b"org.test.0"[..])),
                    console: false,
                },
            ],
            4,
        )
        .unwrap()
    }

    #[test]
    fn decode_driver_messages() {
        let mut buf = [0u8; 8];
        for msg in [
            DriverMessage::DeviceReady(true),
            DriverMessage::PortReady { id: 3, ok: false },
            DriverMessage::PortOpen { id: 7, open: true },
        ] {
            let n = msg.encode(&mut buf).unwrap();
            assert_eq!(DriverMessage::decode(&buf[..n]), Ok(msg));
        }
        assert_eq!(
            DriverMessage::decode(&[9, 0, 0, 0, 6, 0, 1, 0]),
            Ok(DriverMessage::PortOpen { id: 9, open: true })
        );
    }

    #[test]
    fn decode_device_ready_ignores_id() {
        let mut msg = [0xffu8; 8];
        msg[4..].copy_from_slice(&[0, 0, 1, 0]);
        assert_eq!(
            DriverMessage::decode(&msg),
            Ok(DriverMessage::DeviceReady(true))
        );
    }

    #[test]
    fn decode_rejects_short_message() {
        assert_eq!(
            DriverMessage::decode(&[0; 7]),
            Err(ControlError::TooShort(7))
        );
        assert_eq!(DriverMessage::decode(&[]), Err(ControlError::TooShort(0)));
    }

    #[test]
    fn decode_rejects_trailing_bytes() {
        assert_eq!(
            DriverMessage::decode(&[0, 0, 0, 0, 0, 0, 1, 0, 0]),
            Err(ControlError::TrailingBytes { event: 0, extra: 1 })
        );
    }

    #[test]
    fn decode_rejects_unknown_and_device_only_events() {
        assert_eq!(
            DriverMessage::decode(&[0, 0, 0, 0, 8, 0, 0, 0]),
            Err(ControlError::UnknownEvent(8))
        );
        assert_eq!(
            DriverMessage::decode(&[0, 0, 0, 0, 0xff, 0xff, 0, 0]),
            Err(ControlError::UnknownEvent(0xffff))
        );
        for event in [1u8, 2, 4, 5, 7] {
            assert_eq!(
                DriverMessage::decode(&[0, 0, 0, 0, event, 0, 1, 0]),
                Err(ControlError::WrongDirection(u16::from(event)))
            );
        }
    }

    #[test]
    fn decode_rejects_non_boolean_value() {
        assert_eq!(
            DriverMessage::decode(&[1, 0, 0, 0, 3, 0, 2, 0]),
            Err(ControlError::BadValue { event: 3, value: 2 })
        );
    }

    #[test]
    fn decode_never_panics_on_any_short_input() {
        let mut buf = [0u8; 12];
        for len in 0..=12 {
            for byte in 0..=255u8 {
                buf.iter_mut().for_each(|b| *b = byte);
                let _ = DriverMessage::decode(&buf[..len]);
            }
        }
    }

    #[test]
    fn encode_resize_puts_cols_first() {
        let mut buf = [0u8; 16];
        let msg = DeviceMessage::Resize(2, WinSize { cols: 80, rows: 25 });
        let n = msg.encode(&mut buf).unwrap();
        assert_eq!(n, msg.encoded_len());
        assert_eq!(&buf[..n], &[2, 0, 0, 0, 5, 0, 0, 0, 80, 0, 25, 0]);
    }

    #[test]
    fn encode_port_name_without_nul() {
        let mut buf = [0u8; 32];
        let msg = DeviceMessage::PortName(1, Arc::from(&b"abc"[..]));
        let n = msg.encode(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[1, 0, 0, 0, 7, 0, 1, 0, b'a', b'b', b'c']);
    }

    #[test]
    fn encode_header_only_messages() {
        let mut buf = [0u8; 8];
        let cases = [
            (DeviceMessage::DeviceAdd(1), (1, 1, 0)),
            (DeviceMessage::DeviceRemove(1), (1, 2, 0)),
            (DeviceMessage::ConsolePort(0), (0, 4, 1)),
            (DeviceMessage::PortOpen(3, true), (3, 6, 1)),
            (DeviceMessage::PortOpen(3, false), (3, 6, 0)),
        ];
        for (msg, (id, event, value)) in cases {
            assert_eq!(msg.encode(&mut buf), Ok(8));
            let h = decode_header(&buf).unwrap();
            assert_eq!((h.id, h.event, h.value), (id, event, value));
        }
    }

    #[test]
    fn encode_refuses_small_buffer() {
        let mut buf = [0u8; 10];
        assert_eq!(
            DeviceMessage::Resize(0, WinSize::default()).encode(&mut buf),
            Err(ControlError::BufferTooSmall {
                needed: 12,
                available: 10
            })
        );
    }

    #[test]
    fn device_ready_announces_every_port() {
        let mut s = two_ports();
        s.handle(DriverMessage::DeviceReady(true)).unwrap();
        assert_eq!(
            drain(&mut s),
            vec![DeviceMessage::DeviceAdd(0), DeviceMessage::DeviceAdd(1)]
        );
        s.handle(DriverMessage::DeviceReady(true)).unwrap();
        assert!(drain(&mut s).is_empty(), "ports are announced once");
    }

    #[test]
    fn device_ready_failure_announces_nothing() {
        let mut s = two_ports();
        s.handle(DriverMessage::DeviceReady(false)).unwrap();
        assert!(!s.device_ready());
        assert_eq!(s.pending(), 0);
    }

    #[test]
    fn port_ready_of_console_port_sends_console_resize_open() {
        let mut s = two_ports();
        s.host_connected(0, true).unwrap();
        s.resize(
            0,
            WinSize {
                cols: 100,
                rows: 30,
            },
        )
        .unwrap();
        s.handle(DriverMessage::DeviceReady(true)).unwrap();
        drain(&mut s);
        s.handle(DriverMessage::PortReady { id: 0, ok: true })
            .unwrap();
        assert_eq!(
            drain(&mut s),
            vec![
                DeviceMessage::ConsolePort(0),
                DeviceMessage::Resize(
                    0,
                    WinSize {
                        cols: 100,
                        rows: 30
                    }
                ),
                DeviceMessage::PortOpen(0, true),
            ]
        );
    }

    #[test]
    fn port_ready_of_named_port_sends_name_only_when_host_absent() {
        let mut s = two_ports();
        s.handle(DriverMessage::DeviceReady(true)).unwrap();
        drain(&mut s);
        s.handle(DriverMessage::PortReady { id: 1, ok: true })
            .unwrap();
        assert_eq!(
            drain(&mut s),
            vec![DeviceMessage::PortName(1, Arc::from(&b"org.test.0"[..]))]
        );
    }

    #[test]
    fn port_ready_before_device_add_is_refused() {
        let mut s = two_ports();
        assert_eq!(
            s.handle(DriverMessage::PortReady { id: 0, ok: true }),
            Err(ControlError::UnknownPort { event: 3, id: 0 })
        );
        s.handle(DriverMessage::DeviceReady(true)).unwrap();
        assert_eq!(
            s.handle(DriverMessage::PortReady { id: 2, ok: true }),
            Err(ControlError::UnknownPort { event: 3, id: 2 })
        );
    }

    #[test]
    fn port_ready_failure_sends_nothing() {
        let mut s = two_ports();
        s.handle(DriverMessage::DeviceReady(true)).unwrap();
        drain(&mut s);
        s.handle(DriverMessage::PortReady { id: 0, ok: false })
            .unwrap();
        assert_eq!(s.pending(), 0);
        assert_eq!(s.port_ready(0), Some(false));
    }

    #[test]
    fn host_connect_and_disconnect_send_port_open_after_ready() {
        let mut s = two_ports();
        s.host_connected(1, true).unwrap();
        assert_eq!(s.pending(), 0, "not ready: remembered, not sent");
        s.handle(DriverMessage::DeviceReady(true)).unwrap();
        s.handle(DriverMessage::PortReady { id: 1, ok: true })
            .unwrap();
        drain(&mut s);
        s.host_connected(1, false).unwrap();
        s.host_connected(1, false).unwrap();
        s.host_connected(1, true).unwrap();
        assert_eq!(
            drain(&mut s),
            vec![
                DeviceMessage::PortOpen(1, false),
                DeviceMessage::PortOpen(1, true)
            ]
        );
    }

    #[test]
    fn resize_is_sent_to_ready_console_ports_only() {
        let mut s = two_ports();
        s.handle(DriverMessage::DeviceReady(true)).unwrap();
        s.handle(DriverMessage::PortReady { id: 0, ok: true })
            .unwrap();
        s.handle(DriverMessage::PortReady { id: 1, ok: true })
            .unwrap();
        drain(&mut s);
        let size = WinSize {
            cols: 132,
            rows: 43,
        };
        s.resize(1, size).unwrap();
        s.resize(0, size).unwrap();
        s.resize(0, size).unwrap();
        assert_eq!(drain(&mut s), vec![DeviceMessage::Resize(0, size)]);
    }

    #[test]
    fn guest_port_open_is_tracked() {
        let mut s = two_ports();
        assert_eq!(s.guest_open(1), Some(false));
        s.handle(DriverMessage::PortOpen { id: 1, open: true })
            .unwrap();
        assert_eq!(s.guest_open(1), Some(true));
        s.handle(DriverMessage::PortOpen { id: 1, open: false })
            .unwrap();
        assert_eq!(s.guest_open(1), Some(false));
        assert_eq!(s.guest_open(9), None);
        assert!(s
            .handle(DriverMessage::PortOpen { id: 9, open: true })
            .is_err());
    }

    #[test]
    fn output_queue_is_bounded() {
        let mut s = two_ports();
        s.handle(DriverMessage::DeviceReady(true)).unwrap();
        let mut result = Ok(());
        for _ in 0..100 {
            result = s.handle(DriverMessage::PortReady { id: 0, ok: true });
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(ControlError::OutputFull(16, 0)));
        assert_eq!(s.pending(), 16);
    }

    #[test]
    fn reset_forgets_driver_state() {
        let mut s = two_ports();
        s.handle(DriverMessage::DeviceReady(true)).unwrap();
        s.reset();
        assert_eq!(s.pending(), 0);
        s.handle(DriverMessage::DeviceReady(true)).unwrap();
        assert_eq!(s.pending(), 2, "ports are announced again after a reset");
    }

    #[test]
    fn bad_port_configuration_is_refused() {
        let port = |id, name: Option<&[u8]>| PortConfig {
            id,
            name: name.map(Arc::from),
            console: false,
        };
        assert!(ControlState::new(vec![port(4, None)], 4).is_err());
        assert!(ControlState::new(vec![port(1, None), port(1, None)], 4).is_err());
        assert!(ControlState::new(vec![port(1, Some(b"a\0b"))], 4).is_err());
        assert!(ControlState::new(vec![port(1, Some(b""))], 4).is_err());
    }
}
