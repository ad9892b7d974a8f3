// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One frontend connection: the vhost-user request state machine.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserConfig, VhostUserInflight, VhostUserMemory, VhostUserMemoryRegion,
    VhostUserSingleMemoryRegion, VhostUserU64, VhostUserVringAddr, VhostUserVringState,
};
use vm_memory::ByteValued;

use super::backend_channel::{self, ChannelSlot};
use super::device::{packed_slot_flags, Device, GroupInfo, ProtocolFeatures, QueueContext, Vring};
use super::error::{Error, Result};
use super::inflight::{InflightArea, PackedTracker, SplitTracker, Tracker};
use super::memory::{MappedRegion, MemoryTable, RegionDesc, MAX_MEM_SLOTS};
use super::message::{self, always_replies, req, request_name, Message};
use super::notify_fd::NotifyFd;
use super::server::ServerConfig;
use super::sigbus;
use super::worker::{ActiveQueue, Command, WorkerHandle, WorkerSettings};
use super::VHOST_USER_F_PROTOCOL_FEATURES;
use crate::queue::{Queue, QueueConfig, RingLayout, MAX_QUEUE_SIZE};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// Protocol features the server implements for every device.
pub(crate) fn base_protocol_features() -> ProtocolFeatures {
    ProtocolFeatures::MQ
        | ProtocolFeatures::REPLY_ACK
        | ProtocolFeatures::BACKEND_REQ
        | ProtocolFeatures::BACKEND_SEND_FD
        | ProtocolFeatures::RESET_DEVICE
        | ProtocolFeatures::CONFIGURE_MEM_SLOTS
        | ProtocolFeatures::STATUS
}

/// Protocol features a device may add.
fn optional_protocol_features() -> ProtocolFeatures {
    ProtocolFeatures::CONFIG
        | ProtocolFeatures::INFLIGHT_SHMFD
        | ProtocolFeatures::RARP
        | ProtocolFeatures::MTU
}

const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;
const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;
/// Virtio status: DEVICE_NEEDS_RESET.
const STATUS_NEEDS_RESET: u8 = 0x40;
/// SET_VRING_KICK/CALL/ERR payload: the invalid-FD flag.
const VRING_NOFD: u64 = 0x100;
/// VhostUserVringAddr flags: VHOST_VRING_F_LOG.
const VRING_F_LOG: u32 = 0x1;
/// Packed descriptor USED flag.
const DESC_F_USED: u16 = 1 << 15;
/// A fresh packed ring: both positions 0, both wrap counters 1.
const PACKED_FRESH_BASE: u32 = 0x8000_8000;

/// Decodes a packed ring's SET_VRING_BASE value sent in either encoding frontends use,
/// given the flags of the ring's slot 0. Returns the base in the 32-bit encoding and,
/// when it was not taken as sent, why.
///
/// vhost-user.rst gives bits 0–14 the last avail index, bit 15 the avail wrap counter,
/// bits 16–30 the last used index and bit 31 the used wrap counter; QEMU sends and reads
/// all 32 bits (`0x80008000` for a fresh ring). DPDK's virtio_user sends only the avail
/// half (`0x8000` for a fresh ring) and DPDK's backend takes the used position equal to
/// the avail one; user-mode Linux sends `0` for a fresh ring. The encodings overlap when
/// bits 16–31 are 0, and the ring itself decides (§2.8.1: a descriptor the device used
/// in wrap 1 has AVAIL = USED = 1; one the driver made available in wrap 0 has AVAIL = 0,
/// USED = 1; a fresh ring has USED clear in every slot):
///
/// 1. bits 16–31 not 0: the 32-bit encoding, as sent;
/// 2. bits 16–31 are 0 and the avail wrap bit 15 is set: the 16-bit encoding, used =
///    avail. Read as 32 bits it would put the used position a wrap behind the avail
///    one, more than a ring in flight, which no ring reaches;
/// 3. bits 16–31 are 0, bit 15 clear, slot 0 has USED set: as sent. Either the used
///    position really is slot 0 of wrap 0 (slot 0 then holds a descriptor the driver
///    made available in wrap 0, or the one used last in wrap 1), or this is a 16-bit
///    `0` after an odd number of laps, and the two readings agree;
/// 4. bits 16–31 are 0, bit 15 clear, slot 0 has USED clear, avail index 0: a fresh ring
///    (user-mode Linux's `0`): `0x80008000`. After any lap slot 0 would have USED set;
/// 5. bits 16–31 are 0, bit 15 clear, slot 0 has USED clear, avail index not 0: the
///    16-bit encoding, used = avail. Had the device really stopped using at slot 0 of
///    wrap 0, slot 0 would hold a descriptor made available in wrap 0 (USED set).
///
/// A restarted backend with an inflight area takes the position from the area instead
/// (see `PackedTracker::ring_base_after`).
pub(crate) fn decode_packed_base(base: u32, slot0_flags: u16) -> (u32, Option<&'static str>) {
    const AVAIL_WRAP: u32 = 1 << 15;
    if base >> 16 != 0 {
        return (base, None);
    }
    let avail = base & 0xffff;
    let used_eq_avail = avail | (avail << 16);
    if base & AVAIL_WRAP != 0 {
        return (
            used_eq_avail,
            Some("16-bit encoding: the used position is the avail one"),
        );
    }
    if slot0_flags & DESC_F_USED != 0 {
        return (base, None);
    }
    if avail == 0 {
        return (
            PACKED_FRESH_BASE,
            Some("a fresh ring sent without wrap counters"),
        );
    }
    (
        used_eq_avail,
        Some("16-bit encoding: the used position is the avail one"),
    )
}
/// Bound on a worker's answer to a control command (start, memory change), and the
/// margin added to the drain timeout for a stop.
const CONTROL_REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on joining a worker that already missed a deadline.
const STUCK_JOIN_TIMEOUT: Duration = Duration::from_millis(200);
/// Bound on receiving the rest of a message once its first byte arrived, and on sending
/// a reply: a frontend that stops half-way cannot hold the connection thread forever.
pub(crate) const SOCKET_IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Per-queue state kept by the connection.
#[derive(Default)]
struct QueueSlot {
    /// SET_VRING_NUM (0: not set).
    size: u16,
    /// SET_VRING_ADDR: frontend virtual addresses of (descriptor, available, used) areas.
    addr: Option<(u64, u64, u64)>,
    /// SET_VRING_BASE, or the base the ring stopped at.
    base: u32,
    kick: Option<NotifyFd>,
    call: Option<NotifyFd>,
    err: Option<NotifyFd>,
    /// SET_VRING_ENABLE.
    enabled: bool,
    running: bool,
}

/// What a request answers.
enum Reply {
    /// Nothing, or a REPLY_ACK success if the frontend asked for one.
    Ack,
    /// A reply body (and descriptors).
    Body(Vec<u8>, Option<OwnedFd>),
}

fn reply_u64(v: u64) -> Reply {
    Reply::Body(VhostUserU64::new(v).as_slice().to_vec(), None)
}

fn clone_file(f: &Option<NotifyFd>, what: &'static str) -> Result<Option<NotifyFd>> {
    f.as_ref()
        .map(|f| f.try_clone())
        .transpose()
        .map_err(|source| Error::Os { what, source })
}

/// Serves one frontend until it disconnects.
pub(crate) struct Connection<'a, D: Device> {
    device: &'a Arc<D>,
    config: &'a ServerConfig,
    channel: &'a ChannelSlot,
    stream: UnixStream,
    offered_features: u64,
    offered_protocol: u64,
    num_queues: u16,
    max_queue_size: u16,
    acked_features: u64,
    /// SET_FEATURES was received (the ring layout is known).
    features_set: bool,
    acked_protocol: u64,
    /// SET_PROTOCOL_FEATURES was received (protocol features negotiated).
    protocol_features_set: bool,
    status: u8,
    memory: Option<MemoryTable>,
    inflight: Option<InflightArea>,
    queues: Vec<QueueSlot>,
    workers: Vec<Option<WorkerHandle>>,
    /// Each queue's (group, slot in the group).
    queue_slots: Vec<(usize, usize)>,
    /// Each group's queues, in increasing order.
    groups: Vec<Vec<u16>>,
    /// Workers that missed a control-reply deadline: joined with a short bound.
    stuck_workers: Vec<bool>,
    needs_reset: Arc<AtomicBool>,
    /// Workers write it after a SIGBUS poisoned guest memory somewhere.
    alarm: Arc<EventFd>,
    /// `sigbus::epoch()` when last checked.
    seen_epoch: u64,
}

impl<'a, D: Device> Connection<'a, D> {
    pub fn new(
        device: &'a Arc<D>,
        config: &'a ServerConfig,
        channel: &'a ChannelSlot,
        stream: UnixStream,
    ) -> Result<Self> {
        let num_queues = device.num_queues();
        let max_queue_size = device.max_queue_size().min(MAX_QUEUE_SIZE);
        let protocol =
            base_protocol_features() | (device.protocol_features() & optional_protocol_features());
        let per_thread = config.queues_per_thread.max(1);
        let mut queues = Vec::with_capacity(usize::from(num_queues));
        queues.resize_with(usize::from(num_queues), QueueSlot::default);
        // The device's grouping, or the server's: queue / queues_per_thread. Group numbers
        // are compacted in order of first appearance.
        let mut group_ids: Vec<u32> = Vec::new();
        let mut groups: Vec<Vec<u16>> = Vec::new();
        let mut queue_slots = Vec::with_capacity(usize::from(num_queues));
        for q in 0..num_queues {
            let id = device.queue_group(q).map_or_else(
                || u32::try_from(usize::from(q) / per_thread).unwrap_or(u32::MAX),
                u32::from,
            );
            let g = match group_ids.iter().position(|&x| x == id) {
                Some(g) => g,
                None => {
                    group_ids.push(id);
                    groups.push(Vec::new());
                    groups.len() - 1
                }
            };
            queue_slots.push((g, groups[g].len()));
            groups[g].push(q);
        }
        let mut workers = Vec::new();
        workers.resize_with(groups.len(), || None);
        let stuck_workers = vec![false; workers.len()];
        let alarm =
            Arc::new(
                EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(|source| Error::Os {
                    what: "creating the connection's alarm eventfd",
                    source,
                })?,
            );
        Ok(Connection {
            device,
            config,
            channel,
            stream,
            offered_features: device.features() | VHOST_USER_F_PROTOCOL_FEATURES,
            offered_protocol: protocol.bits(),
            num_queues,
            max_queue_size,
            acked_features: 0,
            features_set: false,
            acked_protocol: 0,
            protocol_features_set: false,
            status: 0,
            memory: None,
            inflight: None,
            queues,
            workers,
            queue_slots,
            groups,
            stuck_workers,
            needs_reset: Arc::new(AtomicBool::new(false)),
            alarm,
            seen_epoch: sigbus::epoch(),
        })
    }

    /// Serves requests until the frontend disconnects, a fatal error, or `shutdown`
    /// becomes readable; then stops every queue and resets the device.
    pub fn run(mut self, shutdown: RawFd) -> Result<()> {
        let r = self.serve(shutdown);
        self.teardown();
        r
    }

    fn serve(&mut self, shutdown: RawFd) -> Result<()> {
        let mut msg = Message::default();
        loop {
            let wake = super::server::wait_readable_or_alarm(
                self.stream.as_raw_fd(),
                shutdown,
                self.alarm.as_raw_fd(),
            )?;
            match wake {
                super::server::Wake::Shutdown => {
                    log::info!("shutting down: closing the frontend connection");
                    return Ok(());
                }
                super::server::Wake::Alarm => {
                    let _ = self.alarm.read();
                    self.check_poisoned_memory()?;
                    continue;
                }
                super::server::Wake::Spurious => continue,
                super::server::Wake::Readable => {}
            }
            match message::recv_message(&self.stream, &mut msg) {
                Ok(()) => {}
                Err(Error::Disconnected) => {
                    log::info!("the frontend disconnected");
                    return Ok(());
                }
                Err(e) => {
                    log::error!("closing the frontend connection: {e}");
                    return Err(e);
                }
            }
            self.handle(&mut msg)?;
            // The connection thread touches guest memory too (ring bases, packed flags).
            if sigbus::epoch() != self.seen_epoch {
                self.check_poisoned_memory()?;
            }
        }
    }

    /// Fails (closing the connection) if a SIGBUS poisoned this connection's guest memory
    /// or inflight area (see `sigbus`).
    fn check_poisoned_memory(&mut self) -> Result<()> {
        self.seen_epoch = sigbus::epoch();
        let what = if let Some(d) = self.memory.as_ref().and_then(|m| m.poisoned_region()) {
            format!(
                "the guest memory region at guest {:#x} (size {:#x})",
                d.guest_addr, d.size
            )
        } else if self.inflight.as_ref().is_some_and(|a| a.poisoned()) {
            "the inflight area".to_string()
        } else {
            return Ok(());
        };
        self.needs_reset.store(true, Ordering::Release);
        let e = Error::MemoryTruncated(what);
        log::error!("{e}");
        Err(e)
    }

    /// Handles one request and answers it. An error return closes the connection.
    fn handle(&mut self, msg: &mut Message) -> Result<()> {
        let code = msg.header.request;
        let name = request_name(code);
        log::debug!(
            "request {name} ({code}), {} payload bytes, {} fds",
            msg.payload.len(),
            msg.fds.len()
        );
        let result = self.dispatch(msg);
        // Evaluated after dispatch: SET_PROTOCOL_FEATURES may just have negotiated it.
        let reply_ack = msg.header.need_reply()
            && self.acked_protocol & ProtocolFeatures::REPLY_ACK.bits() != 0;
        match result {
            Ok(Reply::Body(body, fd)) => {
                let fds: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
                message::send_reply(&self.stream, code, &body, &fds)
            }
            Ok(Reply::Ack) if reply_ack => {
                message::send_reply(&self.stream, code, VhostUserU64::new(0).as_slice(), &[])
            }
            Ok(Reply::Ack) => Ok(()),
            Err(e) => {
                log::error!("{name} refused: {e}");
                if code == req::GET_CONFIG {
                    // The protocol's failure answer: a config header with size 0.
                    let offset = message::decode_prefix::<VhostUserConfig>(&msg.payload, name)
                        .map_or(0, |c| c.offset);
                    let reply = VhostUserConfig {
                        offset,
                        ..Default::default()
                    };
                    message::send_reply(&self.stream, code, reply.as_slice(), &[])
                } else if always_replies(code) {
                    // The frontend waits for a body the protocol cannot mark as failed:
                    // close rather than leave it hanging.
                    Err(e)
                } else if reply_ack {
                    message::send_reply(&self.stream, code, VhostUserU64::new(1).as_slice(), &[])
                } else {
                    Ok(())
                }
            }
        }
    }

    fn protocol_acked(&self, f: ProtocolFeatures) -> bool {
        self.acked_protocol & f.bits() != 0
    }

    fn require_protocol(&self, f: ProtocolFeatures, code: u32, feature: &str) -> Result<()> {
        if self.protocol_acked(f) {
            Ok(())
        } else {
            Err(Error::Unsupported {
                code,
                name: request_name(code),
                why: format!(": protocol feature {feature} was not negotiated"),
            })
        }
    }

    fn unsupported(code: u32) -> Error {
        Error::Unsupported {
            code,
            name: request_name(code),
            why: String::new(),
        }
    }

    fn layout(&self) -> RingLayout {
        RingLayout::from_features(self.acked_features)
    }

    fn queue_index(&self, index: u32) -> Result<u16> {
        match u16::try_from(index) {
            Ok(i) if i < self.num_queues => Ok(i),
            _ => Err(Error::InvalidQueueIndex {
                index,
                num_queues: self.num_queues,
            }),
        }
    }

    fn stopped_queue(&self, index: u32, request: &'static str) -> Result<u16> {
        let i = self.queue_index(index)?;
        if self.queues[usize::from(i)].running {
            return Err(Error::RingRunning { index: i, request });
        }
        Ok(i)
    }

    fn dispatch(&mut self, msg: &mut Message) -> Result<Reply> {
        let code = msg.header.request;
        let name = request_name(code);
        match code {
            req::SET_MEM_TABLE
            | req::ADD_MEM_REG
            | req::REM_MEM_REG
            | req::SET_VRING_KICK
            | req::SET_VRING_CALL
            | req::SET_VRING_ERR
            | req::SET_BACKEND_REQ_FD
            | req::SET_INFLIGHT_FD
            | req::SET_LOG_BASE
            | req::SET_LOG_FD => {}
            _ => msg.no_fds(name)?,
        }
        let empty = |msg: &Message| -> Result<()> {
            if msg.payload.is_empty() {
                Ok(())
            } else {
                Err(Error::BadPayloadSize {
                    request: name,
                    got: msg.payload.len(),
                    expected: 0,
                })
            }
        };
        match code {
            req::GET_FEATURES => {
                empty(msg)?;
                Ok(reply_u64(self.offered_features))
            }
            req::SET_FEATURES => {
                let v = msg.body::<VhostUserU64>(name)?.value;
                self.set_features(v)?;
                Ok(Reply::Ack)
            }
            req::SET_OWNER => {
                empty(msg)?;
                Ok(Reply::Ack)
            }
            req::RESET_OWNER => {
                empty(msg)?;
                // Deprecated: the spec recommends disabling all rings, nothing more.
                self.stop_all_rings();
                Ok(Reply::Ack)
            }
            req::RESET_DEVICE => {
                empty(msg)?;
                self.require_protocol(ProtocolFeatures::RESET_DEVICE, code, "RESET_DEVICE")?;
                self.reset_device();
                Ok(Reply::Ack)
            }
            req::GET_PROTOCOL_FEATURES => {
                empty(msg)?;
                Ok(reply_u64(self.offered_protocol))
            }
            req::SET_PROTOCOL_FEATURES => {
                let v = msg.body::<VhostUserU64>(name)?.value;
                let unsupported = v & !self.offered_protocol;
                if unsupported != 0 {
                    return Err(Error::UnofferedFeatures {
                        what: "protocol features",
                        requested: v,
                        unsupported,
                    });
                }
                self.acked_protocol = v;
                self.protocol_features_set = true;
                Ok(Reply::Ack)
            }
            req::GET_QUEUE_NUM => {
                empty(msg)?;
                Ok(reply_u64(u64::from(self.num_queues)))
            }
            req::GET_MAX_MEM_SLOTS => {
                empty(msg)?;
                Ok(reply_u64(MAX_MEM_SLOTS))
            }
            req::SET_MEM_TABLE => {
                self.set_mem_table(msg)?;
                Ok(Reply::Ack)
            }
            req::ADD_MEM_REG => {
                self.require_protocol(
                    ProtocolFeatures::CONFIGURE_MEM_SLOTS,
                    code,
                    "CONFIGURE_MEM_SLOTS",
                )?;
                let r = msg.body::<VhostUserSingleMemoryRegion>(name)?;
                let fd = msg.single_fd(name)?;
                let region: &VhostUserMemoryRegion = &r;
                let mapped = MappedRegion::map(RegionDesc::from(region), &fd)?;
                let table = match &self.memory {
                    Some(t) => t.with_added(mapped)?,
                    None => MemoryTable::new(vec![Arc::new(mapped)])?,
                };
                self.set_memory(table)?;
                Ok(Reply::Ack)
            }
            req::REM_MEM_REG => {
                self.require_protocol(
                    ProtocolFeatures::CONFIGURE_MEM_SLOTS,
                    code,
                    "CONFIGURE_MEM_SLOTS",
                )?;
                let r = msg.body::<VhostUserSingleMemoryRegion>(name)?;
                // "If a file descriptor is passed, the back-end MUST close it": dropped below.
                msg.fds.clear();
                let region: &VhostUserMemoryRegion = &r;
                let desc = RegionDesc::from(region);
                let Some(current) = &self.memory else {
                    return Err(Error::BadMemoryRegion {
                        guest_addr: desc.guest_addr,
                        size: desc.size,
                        user_addr: desc.user_addr,
                        why: "there is no memory table".into(),
                    });
                };
                let table = current.with_removed(&desc)?;
                self.set_memory(table)?;
                Ok(Reply::Ack)
            }
            req::SET_VRING_NUM => {
                let s = msg.body::<VhostUserVringState>(name)?;
                let i = self.stopped_queue(s.index, name)?;
                let size = s.num;
                let why = if size == 0 {
                    Some("0")
                } else if size > u32::from(self.max_queue_size) {
                    Some("larger than the device's maximum queue size")
                } else if self.features_set
                    && self.layout() == RingLayout::Split
                    && !size.is_power_of_two()
                {
                    Some("a split ring's size must be a power of 2")
                } else {
                    None
                };
                if let Some(why) = why {
                    return Err(Error::InvalidQueueSize {
                        index: i,
                        size,
                        why,
                    });
                }
                // Checked above: 1..=max_queue_size (a u16).
                self.queues[usize::from(i)].size = u16::try_from(size).unwrap_or(0);
                Ok(Reply::Ack)
            }
            req::SET_VRING_ADDR => {
                let a = msg.body::<VhostUserVringAddr>(name)?;
                let i = self.stopped_queue(a.index, name)?;
                let flags = a.flags;
                if flags & !VRING_F_LOG != 0 {
                    return Err(Error::RingStart {
                        index: i,
                        why: format!("unknown vring address flags {flags:#x}"),
                    });
                }
                let areas = (a.descriptor, a.available, a.used);
                if let Some(mem) = &self.memory {
                    for (area, addr) in [
                        ("descriptor", areas.0),
                        ("available", areas.1),
                        ("used", areas.2),
                    ] {
                        if mem.user_to_guest(addr).is_none() {
                            return Err(Error::RingAddressNotMapped {
                                index: i,
                                area,
                                addr,
                            });
                        }
                    }
                }
                self.queues[usize::from(i)].addr = Some(areas);
                Ok(Reply::Ack)
            }
            req::SET_VRING_BASE => {
                let s = msg.body::<VhostUserVringState>(name)?;
                let i = self.stopped_queue(s.index, name)?;
                if self.features_set
                    && self.layout() == RingLayout::Split
                    && s.num > u32::from(u16::MAX)
                {
                    return Err(Error::Queue {
                        index: i,
                        source: crate::Error::InvalidRingBase(s.num),
                    });
                }
                self.queues[usize::from(i)].base = s.num;
                Ok(Reply::Ack)
            }
            req::GET_VRING_BASE => {
                let s = msg.body::<VhostUserVringState>(name)?;
                let i = self.queue_index(s.index)?;
                self.stop_rings(&[i]);
                let slot = &mut self.queues[usize::from(i)];
                let base = slot.base;
                log::debug!("queue {i}: GET_VRING_BASE -> {base:#x}");
                Ok(Reply::Body(
                    VhostUserVringState::new(u32::from(i), base)
                        .as_slice()
                        .to_vec(),
                    None,
                ))
            }
            req::SET_VRING_KICK | req::SET_VRING_CALL | req::SET_VRING_ERR => {
                let v = msg.body::<VhostUserU64>(name)?.value;
                let nofd = v & VRING_NOFD != 0;
                let i = self.queue_index(u32::try_from(v & 0xff).unwrap_or(u32::MAX))?;
                let fd = if nofd {
                    msg.no_fds(name)?;
                    None
                } else {
                    let (what, write) = match code {
                        req::SET_VRING_KICK => ("kick", false),
                        req::SET_VRING_CALL => ("call", true),
                        _ => ("err", true),
                    };
                    let fd = msg.single_fd(name)?;
                    Some(
                        NotifyFd::adopt(fd, what, write).map_err(|source| Error::Os {
                            what: "making a vring fd non-blocking",
                            source,
                        })?,
                    )
                };
                match code {
                    req::SET_VRING_KICK => self.set_kick(i, fd)?,
                    req::SET_VRING_CALL => {
                        let slot = &mut self.queues[usize::from(i)];
                        slot.call = fd;
                        if slot.running {
                            let fd = clone_file(&slot.call, "duplicating a call eventfd")?;
                            self.send_to_worker(i, |slot| Command::SetCall { slot, fd })?;
                        }
                    }
                    _ => {
                        let slot = &mut self.queues[usize::from(i)];
                        slot.err = fd;
                        if slot.running {
                            let fd = clone_file(&slot.err, "duplicating an error eventfd")?;
                            self.send_to_worker(i, |slot| Command::SetErr { slot, fd })?;
                        }
                    }
                }
                Ok(Reply::Ack)
            }
            req::SET_VRING_ENABLE => {
                // "Negotiated" as QEMU reads it: offered in GET_FEATURES and followed by
                // SET_PROTOCOL_FEATURES. QEMU's vhost-user-net restores the enable state
                // before it sends SET_FEATURES (hw/net/vhost_net.c, vhost_net_start).
                if self.acked_features & VHOST_USER_F_PROTOCOL_FEATURES == 0
                    && !self.protocol_features_set
                {
                    return Err(Error::Unsupported {
                        code,
                        name,
                        why: ": VHOST_USER_F_PROTOCOL_FEATURES was not negotiated".into(),
                    });
                }
                let s = msg.body::<VhostUserVringState>(name)?;
                let i = self.queue_index(s.index)?;
                let enabled = match s.num {
                    0 => false,
                    1 => true,
                    n => {
                        return Err(Error::BadPayloadSize {
                            request: name,
                            got: n as usize,
                            expected: 1,
                        })
                    }
                };
                let slot = &mut self.queues[usize::from(i)];
                slot.enabled = enabled;
                log::debug!(
                    "queue {i}: {}",
                    if enabled { "enabled" } else { "disabled" }
                );
                if slot.running {
                    self.send_to_worker(i, |slot| Command::SetEnabled { slot, enabled })?;
                }
                Ok(Reply::Ack)
            }
            req::SEND_RARP => {
                self.require_protocol(ProtocolFeatures::RARP, code, "RARP")?;
                let v = msg.body::<VhostUserU64>(name)?.value;
                // vhost-user.rst: the MAC address in the first 6 bytes of the u64.
                let b = v.to_le_bytes();
                let mac = [b[0], b[1], b[2], b[3], b[4], b[5]];
                self.device.send_rarp(mac).map_err(Error::Device)?;
                Ok(Reply::Ack)
            }
            req::NET_SET_MTU => {
                self.require_protocol(ProtocolFeatures::MTU, code, "NET_MTU")?;
                let v = msg.body::<VhostUserU64>(name)?.value;
                let mtu = u16::try_from(v).map_err(|_| {
                    Error::Device(super::error::DeviceError::Other(format!(
                        "MTU {v} does not fit 16 bits"
                    )))
                })?;
                self.device.set_mtu(mtu).map_err(Error::Device)?;
                Ok(Reply::Ack)
            }
            req::GET_CONFIG => {
                self.require_protocol(ProtocolFeatures::CONFIG, code, "CONFIG")?;
                let (hdr, data) = Self::config_payload(msg, name)?;
                let mut buf = data.to_vec();
                let offset = hdr.offset;
                self.device
                    .read_config(offset, &mut buf)
                    .map_err(Error::Config)?;
                let mut body = hdr.as_slice().to_vec();
                body.extend_from_slice(&buf);
                Ok(Reply::Body(body, None))
            }
            req::SET_CONFIG => {
                self.require_protocol(ProtocolFeatures::CONFIG, code, "CONFIG")?;
                let (hdr, data) = Self::config_payload(msg, name)?;
                self.device
                    .write_config(hdr.offset, data)
                    .map_err(Error::Config)?;
                Ok(Reply::Ack)
            }
            req::SET_BACKEND_REQ_FD => {
                self.require_protocol(ProtocolFeatures::BACKEND_REQ, code, "BACKEND_REQ")?;
                empty(msg)?;
                let fd = msg.single_fd(name)?;
                check_stream_socket(&fd)?;
                backend_channel::install(
                    self.channel,
                    UnixStream::from(fd),
                    self.protocol_acked(ProtocolFeatures::REPLY_ACK),
                    self.protocol_acked(ProtocolFeatures::CONFIG),
                );
                log::info!("backend request channel set up");
                Ok(Reply::Ack)
            }
            req::GET_INFLIGHT_FD => {
                self.require_protocol(ProtocolFeatures::INFLIGHT_SHMFD, code, "INFLIGHT_SHMFD")?;
                let r = msg.body::<VhostUserInflight>(name)?;
                let (num_queues, queue_size) = (r.num_queues, r.queue_size);
                if num_queues > self.num_queues || queue_size > MAX_QUEUE_SIZE {
                    return Err(Error::BadInflight(format!(
                        "{num_queues} queues of size {queue_size} requested; the device has {} queues",
                        self.num_queues
                    )));
                }
                let (area, fd, size) = InflightArea::allocate(num_queues, queue_size)?;
                log::info!("inflight area allocated: {num_queues} queues of size {queue_size}, {size} bytes");
                self.inflight = Some(area);
                let reply = VhostUserInflight::new(size, 0, num_queues, queue_size);
                Ok(Reply::Body(reply.as_slice().to_vec(), Some(fd)))
            }
            req::SET_INFLIGHT_FD => {
                self.require_protocol(ProtocolFeatures::INFLIGHT_SHMFD, code, "INFLIGHT_SHMFD")?;
                let r = msg.body::<VhostUserInflight>(name)?;
                let fd = msg.single_fd(name)?;
                let area = InflightArea::from_fd(
                    &fd,
                    r.mmap_size,
                    r.mmap_offset,
                    r.num_queues,
                    r.queue_size,
                )?;
                if self.queues.iter().any(|q| q.running) {
                    log::warn!(
                        "SET_INFLIGHT_FD while rings run: it applies to rings started from now on"
                    );
                }
                log::info!(
                    "inflight area set: {} queues of size {}",
                    area.num_queues(),
                    area.queue_size()
                );
                self.inflight = Some(area);
                Ok(Reply::Ack)
            }
            req::SET_STATUS => {
                self.require_protocol(ProtocolFeatures::STATUS, code, "STATUS")?;
                let v = msg.body::<VhostUserU64>(name)?.value;
                let status = u8::try_from(v).map_err(|_| Error::BadPayloadSize {
                    request: name,
                    got: 8,
                    expected: 1,
                })?;
                if status == 0 {
                    // A virtio reset: stop the rings; the frontend configures them again.
                    self.stop_all_rings();
                    self.needs_reset.store(false, Ordering::Release);
                }
                log::debug!("device status {:#x} -> {status:#x}", self.status);
                self.status = status;
                Ok(Reply::Ack)
            }
            req::GET_STATUS => {
                self.require_protocol(ProtocolFeatures::STATUS, code, "STATUS")?;
                empty(msg)?;
                let mut status = self.status;
                if self.needs_reset.load(Ordering::Acquire) {
                    status |= STATUS_NEEDS_RESET;
                }
                Ok(reply_u64(u64::from(status)))
            }
            _ => Err(Self::unsupported(code)),
        }
    }

    fn config_payload<'m>(
        msg: &'m Message,
        name: &'static str,
    ) -> Result<(VhostUserConfig, &'m [u8])> {
        let hdr = message::decode_prefix::<VhostUserConfig>(&msg.payload, name)?;
        let data = &msg.payload[std::mem::size_of::<VhostUserConfig>()..];
        let size = hdr.size as usize;
        if data.len() != size || size == 0 {
            return Err(Error::BadPayloadSize {
                request: name,
                got: data.len(),
                expected: size,
            });
        }
        Ok((hdr, data))
    }

    fn set_features(&mut self, v: u64) -> Result<()> {
        let unsupported = v & !self.offered_features;
        if unsupported != 0 {
            return Err(Error::UnofferedFeatures {
                what: "virtio features",
                requested: v,
                unsupported,
            });
        }
        let ring_bits = (1u64 << virtio_bindings::virtio_config::VIRTIO_F_RING_PACKED)
            | VIRTIO_F_RING_EVENT_IDX
            | VIRTIO_F_RING_INDIRECT_DESC;
        if (v ^ self.acked_features) & ring_bits != 0 && self.queues.iter().any(|q| q.running) {
            log::warn!("SET_FEATURES changes ring features while rings run: running rings keep the old ones");
        }
        self.device
            .set_features(v & !VHOST_USER_F_PROTOCOL_FEATURES)
            .map_err(Error::Device)?;
        log::debug!("features acked: {v:#x}");
        self.acked_features = v;
        self.features_set = true;
        Ok(())
    }

    fn set_mem_table(&mut self, msg: &mut Message) -> Result<()> {
        let name = "SET_MEM_TABLE";
        let hdr = message::decode_prefix::<VhostUserMemory>(&msg.payload, name)?;
        let num = hdr.num_regions as usize;
        let region_size = std::mem::size_of::<VhostUserMemoryRegion>();
        let hdr_size = std::mem::size_of::<VhostUserMemory>();
        let needed = hdr_size + num * region_size;
        // user-mode Linux sends a payload sized for more regions than it declares: accept
        // anything at least as large as the declared regions.
        if num == 0 || num > message::MAX_FDS || msg.payload.len() < needed {
            return Err(Error::BadPayloadSize {
                request: name,
                got: msg.payload.len(),
                expected: needed.max(hdr_size + region_size),
            });
        }
        if msg.fds.len() != num {
            return Err(Error::BadFdCount {
                request: name,
                got: msg.fds.len(),
                expected: num,
            });
        }
        let mut regions = Vec::with_capacity(num);
        for (i, fd) in msg.fds.iter().enumerate() {
            let off = hdr_size + i * region_size;
            let r = message::decode_prefix::<VhostUserMemoryRegion>(&msg.payload[off..], name)?;
            let desc = RegionDesc::from(&r);
            log::debug!("memory region {i}: {desc:x?}");
            regions.push(Arc::new(MappedRegion::map(desc, fd)?));
        }
        msg.fds.clear();
        let table = MemoryTable::new(regions)?;
        self.set_memory(table)
    }

    /// Installs a new memory table: running queues switch to it before this returns;
    /// rings that were waiting for memory start.
    fn set_memory(&mut self, table: MemoryTable) -> Result<()> {
        log::info!("memory table: {table:x?}");
        let view = table.view().clone();
        self.memory = Some(table);
        let mut acks = Vec::new();
        for (id, w) in self.workers.iter().enumerate() {
            if let Some(w) = w {
                let (tx, rx) = mpsc::channel();
                match w.send(Command::SetMemory {
                    memory: view.clone(),
                    reply: tx,
                }) {
                    Ok(()) => acks.push((id, rx)),
                    Err(e) => log::error!("{e}"),
                }
            }
        }
        for (id, rx) in acks {
            if rx.recv_timeout(CONTROL_REPLY_TIMEOUT).is_err() {
                log::error!(
                    "queue worker {id} did not acknowledge the memory table change within \
                     {CONTROL_REPLY_TIMEOUT:?}"
                );
                self.stuck_workers[id] = true;
            }
        }
        for i in 0..self.num_queues {
            let slot = &self.queues[usize::from(i)];
            if !slot.running && slot.kick.is_some() {
                if let Err(e) = self.try_start(i) {
                    log::error!("{e}");
                }
            }
        }
        Ok(())
    }

    fn set_kick(&mut self, i: u16, fd: Option<NotifyFd>) -> Result<()> {
        let Some(fd) = fd else {
            return Err(Error::RingStart {
                index: i,
                why: "polling mode (SET_VRING_KICK without a file descriptor) is not supported"
                    .into(),
            });
        };
        if self.queues[usize::from(i)].running {
            // A new kick fd for a running ring: stop it (keeping its state) and restart.
            log::info!("queue {i}: new kick eventfd while running; restarting the ring");
            self.stop_rings(&[i]);
        }
        self.queues[usize::from(i)].kick = Some(fd);
        self.try_start(i)
    }

    fn worker_of(&self, i: u16) -> (usize, usize) {
        self.queue_slots
            .get(usize::from(i))
            .copied()
            .unwrap_or((usize::MAX, 0))
    }

    fn send_to_worker(&self, i: u16, cmd: impl FnOnce(usize) -> Command) -> Result<()> {
        let (w, slot) = self.worker_of(i);
        match self.workers.get(w) {
            Some(Some(h)) => h.send(cmd(slot)),
            _ => Err(Error::WorkerGone(w)),
        }
    }

    /// Starts ring `i` if it has everything it needs (kick fd, size, addresses, memory).
    fn try_start(&mut self, i: u16) -> Result<()> {
        let idx = usize::from(i);
        let slot = &self.queues[idx];
        if slot.running || slot.kick.is_none() {
            return Ok(());
        }
        let (Some(mem), Some((desc_ua, avail_ua, used_ua)), size) =
            (&self.memory, slot.addr, slot.size)
        else {
            log::debug!("queue {i}: kick fd set; waiting for the memory table or ring addresses");
            return Ok(());
        };
        if size == 0 {
            log::debug!("queue {i}: kick fd set; waiting for SET_VRING_NUM");
            return Ok(());
        }
        let translate = |area, addr| {
            mem.user_to_guest(addr).ok_or(Error::RingAddressNotMapped {
                index: i,
                area,
                addr,
            })
        };
        let layout = self.layout();
        let config = QueueConfig {
            layout,
            size,
            desc_table: translate("descriptor", desc_ua)?,
            driver_area: translate("available", avail_ua)?,
            device_area: translate("used", used_ua)?,
            event_idx: self.acked_features & VIRTIO_F_RING_EVENT_IDX != 0,
            indirect_desc: self.acked_features & VIRTIO_F_RING_INDIRECT_DESC != 0,
        };
        let view = mem.view().clone();
        let queue_err = |source| Error::Queue { index: i, source };
        let mut queue = Queue::new(config, view.clone()).map_err(queue_err)?;
        let mut base = slot.base;
        if layout == RingLayout::Packed {
            let (decoded, why) = decode_packed_base(base, packed_slot_flags(&queue, 0));
            if let Some(why) = why {
                log::info!("queue {i}: packed ring base {base:#x} taken as {decoded:#x} ({why})");
            }
            base = decoded;
        }
        queue.set_vring_base(base).map_err(queue_err)?;

        let mut tracked = None;
        if self.protocol_acked(ProtocolFeatures::INFLIGHT_SHMFD) {
            if let Some(area) = self.inflight.as_ref().and_then(|a| a.queue(i)) {
                let attached = match layout {
                    RingLayout::Split => SplitTracker::attach(area, size, queue.next_used(), i)
                        .map(|(t, l)| (Tracker::Split(t), l)),
                    RingLayout::Packed => PackedTracker::attach(
                        area,
                        size,
                        (queue.next_used(), queue.used_wrap_counter()),
                        i,
                        |s| packed_slot_flags(&queue, s),
                    )
                    .map(|(t, l)| (Tracker::Packed(t), l)),
                };
                match attached {
                    Ok((t, list)) => {
                        if !list.is_empty() {
                            log::info!(
                                "queue {i}: {} requests left in flight by a previous backend instance",
                                list.len()
                            );
                            if layout == RingLayout::Split {
                                // Every popped chain is either in the used ring or in flight.
                                let n = u16::try_from(list.len()).unwrap_or(u16::MAX);
                                let want = queue.next_used().wrapping_add(n);
                                if u32::from(want) != base {
                                    log::info!(
                                        "queue {i}: ring base {base:#x} -> {want:#x} to cover them"
                                    );
                                    queue.set_vring_base(u32::from(want)).map_err(queue_err)?;
                                }
                            }
                        }
                        if let Tracker::Packed(p) = &t {
                            // A packed ring's position is the area's, not the frontend's:
                            // QEMU resends a stale base after a backend crash.
                            if let Some(restored) = p.restored_base() {
                                if restored != base {
                                    log::info!(
                                        "queue {i}: ring base {base:#x} -> {restored:#x} from the inflight area"
                                    );
                                    queue.set_vring_base(restored).map_err(queue_err)?;
                                }
                            }
                        }
                        tracked = Some((t, list));
                    }
                    Err(e) => log::error!("queue {i}: inflight tracking disabled: {e}"),
                }
            } else if self.inflight.is_some() {
                log::warn!("queue {i}: the inflight area has no region for it; not tracked");
            }
        }

        let enabled = if self.acked_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            slot.enabled
        } else {
            true
        };
        let ctx = QueueContext {
            index: i,
            size,
            layout,
            features: self.acked_features & !VHOST_USER_F_PROTOCOL_FEATURES,
            memory: view,
        };
        let base = queue.vring_base();
        let mut vring = Vring::new(i, queue, enabled);
        let _ = vring.set_call(clone_file(&slot.call, "duplicating a call eventfd")?);
        vring.set_err(clone_file(&slot.err, "duplicating an error eventfd")?);
        if let Some((t, list)) = tracked {
            vring.set_tracker(t, list);
        }
        let kick =
            clone_file(&slot.kick, "duplicating a kick eventfd")?.ok_or(Error::RingStart {
                index: i,
                why: "no kick eventfd".into(),
            })?;

        let (w, _) = self.worker_of(i);
        let Some(group_queues) = self.groups.get(w).cloned() else {
            return Err(Error::WorkerGone(w));
        };
        if self.workers[w].is_none() {
            let info = GroupInfo {
                group: u16::try_from(w).unwrap_or(u16::MAX),
                queues: group_queues.clone(),
                features: self.acked_features & !VHOST_USER_F_PROTOCOL_FEATURES,
            };
            let handler = self.device.start_group(&info).map_err(Error::Device)?;
            let name = format!(
                "{}-q{}",
                self.config.thread_name,
                group_queues.first().copied().unwrap_or(0)
            );
            let settings = WorkerSettings {
                poll: super::poll::PollPolicy::from_config(
                    self.config.poll_us,
                    self.config.adaptive_poll_max_us,
                ),
                drain_timeout: self.config.drain_timeout,
            };
            let host = self.device.worker_thread(info.group);
            self.workers[w] = Some(WorkerHandle::spawn(
                w,
                name,
                group_queues.len(),
                handler,
                settings,
                self.needs_reset.clone(),
                self.alarm.clone(),
                host.as_deref(),
            )?);
        }
        let (tx, rx) = mpsc::channel();
        self.send_to_worker(i, |slot| Command::Start {
            slot,
            queue: Box::new(ActiveQueue {
                vring,
                kick,
                context: ctx,
            }),
            reply: tx,
        })?;
        match rx.recv_timeout(CONTROL_REPLY_TIMEOUT) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(Error::RingStart {
                    index: i,
                    why: format!("the worker could not watch its fds: {e}"),
                })
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                log::error!("queue {i}: worker {w} did not answer the start within {CONTROL_REPLY_TIMEOUT:?}");
                self.stuck_workers[w] = true;
                return Err(Error::WorkerGone(w));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(Error::WorkerGone(w)),
        }
        self.queues[idx].running = true;
        log::info!(
            "queue {i}: started ({layout:?}, size {size}, base {base:#x}, {})",
            if enabled { "enabled" } else { "disabled" }
        );
        Ok(())
    }

    /// Stops the running rings among `indices` (draining their in-flight requests, in
    /// parallel) and records their bases. Stopped rings need a new kick fd to restart.
    fn stop_rings(&mut self, indices: &[u16]) {
        let mut waits = Vec::new();
        for &i in indices {
            let slot = &mut self.queues[usize::from(i)];
            slot.kick = None;
            if !slot.running {
                continue;
            }
            slot.running = false;
            let (tx, rx) = mpsc::channel();
            match self.send_to_worker(i, |slot| Command::Stop { slot, reply: tx }) {
                Ok(()) => waits.push((i, rx)),
                Err(e) => log::error!("queue {i}: cannot stop: {e}"),
            }
        }
        // One deadline for all: the workers drain in parallel.
        let limit = self.config.drain_timeout + CONTROL_REPLY_TIMEOUT;
        let deadline = std::time::Instant::now() + limit;
        for (i, rx) in waits {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(Some(base)) => self.queues[usize::from(i)].base = base,
                Ok(None) => log::error!("queue {i}: the worker did not know the ring"),
                Err(_) => {
                    let (w, _) = self.worker_of(i);
                    log::error!(
                        "queue {i}: worker {w} did not report the ring stopped within {limit:?}; \
                         reporting base {:#x}",
                        self.queues[usize::from(i)].base
                    );
                    self.stuck_workers[w] = true;
                }
            }
        }
    }

    fn stop_all_rings(&mut self) {
        let all: Vec<u16> = (0..self.num_queues).collect();
        self.stop_rings(&all);
    }

    /// Ends every worker thread, each within a bound (short for one already known not
    /// to answer), so teardown always finishes.
    fn join_workers(&mut self) {
        let limit = self.config.drain_timeout + CONTROL_REPLY_TIMEOUT;
        for (w, stuck) in self.workers.iter_mut().zip(self.stuck_workers.iter_mut()) {
            if let Some(w) = w.take() {
                let bound = if *stuck { STUCK_JOIN_TIMEOUT } else { limit };
                w.join(bound);
            }
            *stuck = false;
        }
    }

    /// RESET_DEVICE: rings stopped and forgotten, features and status cleared, device reset.
    fn reset_device(&mut self) {
        log::info!("device reset requested by the frontend");
        self.stop_all_rings();
        self.join_workers();
        for q in self.queues.iter_mut() {
            *q = QueueSlot::default();
        }
        self.acked_features = 0;
        self.features_set = false;
        self.status = 0;
        self.inflight = None;
        self.needs_reset.store(false, Ordering::Release);
        self.device.reset();
    }

    /// End of connection: stop everything, forget the frontend's memory, reset the device.
    fn teardown(&mut self) {
        self.stop_all_rings();
        self.join_workers();
        *backend_channel::lock(self.channel) = None;
        for q in self.queues.iter_mut() {
            *q = QueueSlot::default();
        }
        self.memory = None;
        self.inflight = None;
        self.device.reset();
        log::info!("connection closed; device reset");
    }
}

/// Checks that a descriptor is a stream socket (the backend channel must be one).
fn check_stream_socket(fd: &OwnedFd) -> Result<()> {
    let mut ty: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: `ty` and `len` are valid out-pointers of the sizes passed.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            std::ptr::addr_of_mut!(ty).cast(),
            &mut len,
        )
    };
    if r != 0 || ty != libc::SOCK_STREAM {
        return Err(Error::Os {
            what: "SET_BACKEND_REQ_FD: the descriptor is not a stream socket",
            source: std::io::Error::from_raw_os_error(libc::ENOTSOCK),
        });
    }
    Ok(())
}

#[cfg(test)]
mod packed_base_tests {
    use super::decode_packed_base;

    const AVAIL: u16 = 1 << 7;
    const USED: u16 = 1 << 15;

    #[test]
    fn packed_base_with_a_used_half_is_taken_as_sent() {
        assert_eq!(decode_packed_base(0x8000_8000, 0).0, 0x8000_8000);
        assert_eq!(decode_packed_base(0x0003_8005, AVAIL).0, 0x0003_8005);
        assert_eq!(decode_packed_base(0x8005_0005, USED).0, 0x8005_0005);
    }

    #[test]
    fn packed_base_0x8000_is_dpdks_fresh_ring() {
        let (base, why) = decode_packed_base(0x8000, AVAIL);
        assert_eq!(base, 0x8000_8000);
        assert!(why.is_some());
        // Any avail position in wrap 1 without a used half is the 16-bit encoding.
        assert_eq!(decode_packed_base(0x8007, 0).0, 0x8007_8007);
    }

    #[test]
    fn packed_base_0_on_a_fresh_ring_has_both_wrap_counters_set() {
        // user-mode Linux: slot 0 empty, or made available in wrap 1 (AVAIL, not USED).
        assert_eq!(decode_packed_base(0, 0).0, 0x8000_8000);
        assert_eq!(decode_packed_base(0, AVAIL | 1).0, 0x8000_8000);
    }

    #[test]
    fn packed_base_0_after_a_lap_is_slot_0_of_wrap_0() {
        // Slot 0 used in wrap 1, or made available again in wrap 0: USED set.
        assert_eq!(decode_packed_base(0, AVAIL | USED).0, 0);
        assert_eq!(decode_packed_base(0, USED).0, 0);
    }

    #[test]
    fn packed_base_in_wrap_0_without_used_half_reads_slot_0() {
        // Used in wrap 0 at slot 0 (AVAIL = USED = 0), or made available in wrap 1 again:
        // only a 16-bit sender reaches this, with used = avail.
        assert_eq!(decode_packed_base(5, 0).0, 0x0005_0005);
        assert_eq!(decode_packed_base(5, AVAIL).0, 0x0005_0005);
        // Slot 0 made available in wrap 0 and not used yet: the used position really is
        // slot 0 of wrap 0, with 5 slots in flight.
        assert_eq!(decode_packed_base(5, USED).0, 5);
    }
}
