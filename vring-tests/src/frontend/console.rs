// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A userspace vhost-user-console frontend: the driver ("guest") side of a single-port
//! virtio-console device served by any vhost-user-console backend over its unix socket,
//! for tests and benchmarks.
//!
//! Like the blk frontend it speaks vhost-user through the `vhost` crate's [`Frontend`]
//! and drives the rings with `virtio_core`'s [`DriverQueue`] on one memfd mapped at
//! [`GUEST_BASE`](super::GUEST_BASE):
//!
//! - features: VERSION_1 (required), RING_PACKED when asked for (refused with
//!   [`FrontendError::FeatureNotOffered`] if the backend does not offer it), EVENT_IDX
//!   when offered and allowed, VIRTIO_CONSOLE_F_EMERG_WRITE and VIRTIO_CONSOLE_F_SIZE when
//!   offered. VIRTIO_CONSOLE_F_MULTIPORT is never acked, whatever the backend offers: the
//!   device then has one port on receiveq 0 and transmitq 1 and no control queues;
//! - protocol features CONFIG, MQ and REPLY_ACK when offered;
//! - two rings of the same size and layout: receiveq (device-writable buffers of
//!   [`ConsoleOptions::rx_buf_len`] bytes, [`ConsoleOptions::rx_depth`] of them kept
//!   posted while receiving) and transmitq (readable buffers of up to
//!   [`ConsoleOptions::tx_buf_len`] bytes, one per chain);
//! - kicks only when the device asks for them (EVENT_IDX), completions noticed by
//!   sleeping on the call eventfd with interrupts enabled only then; every wait is bounded
//!   by [`ConsoleOptions::timeout`].
//!
//! ```no_run
//! use vring_tests::frontend::console::{ConsoleFrontend, ConsoleOptions};
//!
//! # fn main() -> Result<(), vring_tests::frontend::FrontendError> {
//! let mut fe = ConsoleFrontend::connect("/tmp/console.sock", ConsoleOptions::default())?;
//! fe.send(b"hello\n")?;
//! fe.flush()?;
//! let mut input = Vec::new();
//! fe.receive(&mut input, 1)?;
//! fe.shutdown()?;
//! # Ok(())
//! # }
//! ```

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::VhostBackend;
use virtio_core::driver::{ring_footprint, DriverBuffer, DriverQueue};
use virtio_core::RingLayout;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{memory, raw, FrontendError, Result};

/// VIRTIO_CONSOLE_F_SIZE (§5.3.3).
pub const VIRTIO_CONSOLE_F_SIZE: u32 = 0;
/// VIRTIO_CONSOLE_F_MULTIPORT (§5.3.3); never acked by this frontend.
pub const VIRTIO_CONSOLE_F_MULTIPORT: u32 = 1;
/// VIRTIO_CONSOLE_F_EMERG_WRITE (§5.3.3).
pub const VIRTIO_CONSOLE_F_EMERG_WRITE: u32 = 2;
/// VIRTIO_RING_F_EVENT_IDX.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// VIRTIO_F_VERSION_1.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// VIRTIO_F_RING_PACKED.
pub const VIRTIO_F_RING_PACKED: u32 = 34;
/// VHOST_USER_F_PROTOCOL_FEATURES.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

/// Offset of `emerg_wr` in the configuration space (§5.3.4).
pub const EMERG_WR_OFFSET: u32 = 8;

/// Queue index of port 0's receiveq.
const RXQ: u16 = 0;
/// Queue index of port 0's transmitq.
const TXQ: u16 = 1;

const PAGE: u64 = 4096;

fn bit(b: u32) -> u64 {
    1u64 << b
}

/// Options of [`ConsoleFrontend::connect`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleOptions {
    /// Entries per ring (a power of 2 for split rings).
    pub queue_size: u16,
    /// Use packed rings (VIRTIO_F_RING_PACKED; an error if not offered).
    pub packed: bool,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX when offered.
    pub event_idx: bool,
    /// Largest data length of one transmit chain.
    pub tx_buf_len: u32,
    /// Length of every receive buffer.
    pub rx_buf_len: u32,
    /// Receive buffers kept posted while receiving (at most the queue size).
    pub rx_depth: u16,
    /// How long to wait for a reply, a used buffer or data before giving up.
    pub timeout: Duration,
    /// Kick after every batch of new buffers even when the device's event index says
    /// it needs none (a spurious notification, which the spec allows). For devices that
    /// stop updating `avail_event` when they find nothing to do (vhost-device-console
    /// 0.1.0 leaves notifications disabled after a receiveq kick with no input queued,
    /// so a buffer posted later would never be seen).
    pub kick_always: bool,
    /// Kick the receiveq after posting receive buffers. Off, the device finds them only
    /// when it looks by itself (vhost-device-console 0.1.0 without EVENT_IDX pops every
    /// receive buffer on a kick and loses those it has no input for, but looks at the
    /// receiveq whenever host input arrives).
    pub rx_kick: bool,
}

impl Default for ConsoleOptions {
    fn default() -> Self {
        ConsoleOptions {
            queue_size: 128,
            packed: false,
            event_idx: true,
            tx_buf_len: 4096,
            rx_buf_len: 4096,
            rx_depth: 128,
            timeout: Duration::from_secs(10),
            kick_always: false,
            rx_kick: true,
        }
    }
}

/// What was negotiated with the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleInfo {
    /// Virtio feature bits the backend offered.
    pub offered_features: u64,
    /// Virtio feature bits acked (SET_FEATURES).
    pub acked_features: u64,
    /// Protocol feature bits the backend offered (0 without PROTOCOL_FEATURES).
    pub offered_protocol_features: u64,
    /// Protocol feature bits acked.
    pub acked_protocol_features: u64,
    /// The ring layout in use.
    pub layout: RingLayout,
}

impl ConsoleInfo {
    /// Whether virtio feature `b` was negotiated.
    pub fn has(&self, b: u32) -> bool {
        self.acked_features & bit(b) != 0
    }

    /// Whether protocol feature `f` was negotiated.
    pub fn has_protocol(&self, f: VhostUserProtocolFeatures) -> bool {
        self.acked_protocol_features & f.bits() != 0
    }
}

/// Counters of a frontend (for benchmarks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsoleStats {
    /// Kicks sent (both queues).
    pub kicks: u64,
    /// Sleeps on a call eventfd.
    pub sleeps: u64,
    /// Transmit chains made available.
    pub tx_chains: u64,
    /// Receive buffers returned used.
    pub rx_used: u64,
}

/// One ring: its driver side, eventfds and buffers.
struct Ring {
    index: u16,
    driver: DriverQueue,
    kick: EventFd,
    call: EventFd,
    /// Guest address of the buffer of each chain in flight, by chain id.
    in_flight: Vec<Option<u64>>,
    /// Buffers not in flight.
    free: Vec<u64>,
    buf_len: u32,
}

impl Ring {
    fn drv(&self) -> impl FnOnce(virtio_core::driver::DriverError) -> FrontendError {
        let queue = self.index;
        move |source| FrontendError::Driver { queue, source }
    }

    fn kick_if_needed(
        &mut self,
        mem: &GuestMemoryMmap,
        always: bool,
        stats: &mut ConsoleStats,
    ) -> Result<()> {
        let need = self.driver.needs_kick(mem).map_err(self.drv())?;
        if need || always {
            self.kick.write(1).map_err(|e| {
                FrontendError::io(format!("queue {}: writing kick eventfd", self.index), e)
            })?;
            stats.kicks += 1;
        }
        Ok(())
    }

    /// Takes one used buffer: its guest address and the length the device reported.
    fn pop(&mut self, mem: &GuestMemoryMmap) -> Result<Option<(u64, u32)>> {
        let Some((id, len)) = self.driver.pop_used(mem).map_err(self.drv())? else {
            return Ok(None);
        };
        let addr = self
            .in_flight
            .get_mut(usize::from(id))
            .and_then(Option::take)
            .ok_or_else(|| {
                FrontendError::Protocol(format!(
                    "queue {}: used id {id} has no buffer in flight",
                    self.index
                ))
            })?;
        self.free.push(addr);
        Ok(Some((addr, len)))
    }

    /// Asks the device to interrupt on the next used buffer; the caller re-checks the
    /// ring before sleeping.
    fn arm(&mut self, mem: &GuestMemoryMmap) -> Result<()> {
        self.driver
            .enable_interrupts(mem, None)
            .map_err(self.drv())?;
        // The interrupt request must be visible before the re-check of the used ring.
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Sleeps on the call eventfd for at most `max`, then disables interrupts again.
    fn sleep(
        &mut self,
        mem: &GuestMemoryMmap,
        max: Duration,
        stats: &mut ConsoleStats,
    ) -> Result<()> {
        stats.sleeps += 1;
        super::sleep_on_call(&self.call, self.index, max)?;
        self.disarm(mem)
    }

    fn disarm(&mut self, mem: &GuestMemoryMmap) -> Result<()> {
        self.driver.disable_interrupts(mem).map_err(self.drv())
    }
}

/// A connected, running single-port console frontend.
pub struct ConsoleFrontend {
    fe: Frontend,
    sock: UnixStream,
    opts: ConsoleOptions,
    mem: GuestMemoryMmap,
    rx: Ring,
    tx: Ring,
    /// Receive buffers posted (in flight on the receiveq).
    rx_posted: u16,
    info: ConsoleInfo,
    stats: ConsoleStats,
}

impl std::fmt::Debug for ConsoleFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleFrontend")
            .field("info", &self.info)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn validate(o: &ConsoleOptions) -> Result<()> {
    let bad = |m: String| Err(FrontendError::InvalidOptions(m));
    super::validate_queue_size(o.queue_size, o.packed)?;
    if o.rx_depth == 0 || o.rx_depth > o.queue_size {
        return bad(format!(
            "receive depth {} not in 1..={}",
            o.rx_depth, o.queue_size
        ));
    }
    if o.tx_buf_len == 0 || o.rx_buf_len == 0 {
        return bad("buffer lengths must be positive".into());
    }
    Ok(())
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl ConsoleFrontend {
    /// Connects to the backend listening on `socket`, negotiates, sets up the memory and
    /// the two rings of port 0, and starts them.
    pub fn connect(socket: impl AsRef<Path>, opts: ConsoleOptions) -> Result<ConsoleFrontend> {
        let path = socket.as_ref();
        validate(&opts)?;
        let (mut fe, sock) = super::open_frontend(path, opts.timeout, 2)?;

        let offered = fe
            .get_features()
            .map_err(FrontendError::vhost("GET_FEATURES"))?;
        let need = |b: u32, name: &'static str| super::require_feature(offered, b, name);
        need(VIRTIO_F_VERSION_1, "VIRTIO_F_VERSION_1")?;
        let mut want = bit(VIRTIO_F_VERSION_1)
            | bit(VHOST_USER_F_PROTOCOL_FEATURES)
            | bit(VIRTIO_CONSOLE_F_SIZE)
            | bit(VIRTIO_CONSOLE_F_EMERG_WRITE);
        if opts.packed {
            need(VIRTIO_F_RING_PACKED, "VIRTIO_F_RING_PACKED")?;
            want |= bit(VIRTIO_F_RING_PACKED);
        }
        if opts.event_idx {
            want |= bit(VIRTIO_RING_F_EVENT_IDX);
        }
        let acked = offered & want;
        let layout = if opts.packed {
            RingLayout::Packed
        } else {
            RingLayout::Split
        };
        let mut info = ConsoleInfo {
            offered_features: offered,
            acked_features: acked,
            offered_protocol_features: 0,
            acked_protocol_features: 0,
            layout,
        };
        let protocol = acked & bit(VHOST_USER_F_PROTOCOL_FEATURES) != 0;
        if protocol {
            let want_pf = VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK;
            let (pf, acked_pf, _) = super::negotiate_protocol(&mut fe, want_pf, 2)?;
            info.offered_protocol_features = pf.bits();
            info.acked_protocol_features = acked_pf.bits();
        }
        fe.set_features(acked)
            .map_err(FrontendError::vhost("SET_FEATURES"))?;

        // Memory: two rings, then the receive buffers, then the transmit buffers.
        let qs = opts.queue_size;
        let ring_len = ring_footprint(layout, qs);
        let rx_ring = super::GUEST_BASE;
        let tx_ring = rx_ring + ring_len;
        let rx_bufs = tx_ring + ring_len;
        let rx_area = align_up(u64::from(qs) * u64::from(opts.rx_buf_len), PAGE);
        let tx_bufs = rx_bufs + rx_area;
        let tx_area = align_up(u64::from(qs) * u64::from(opts.tx_buf_len), PAGE);
        let mem = memory::create_memory(tx_bufs + tx_area - super::GUEST_BASE)?;
        let table = memory::mem_table(&mem)?;
        fe.set_mem_table(&table)
            .map_err(FrontendError::vhost("SET_MEM_TABLE"))?;

        let event_idx = info.has(VIRTIO_RING_F_EVENT_IDX);
        let reply_ack = info.has_protocol(VhostUserProtocolFeatures::REPLY_ACK);
        let mut rings = Vec::with_capacity(2);
        for (index, ring_base, bufs, buf_len) in [
            (RXQ, rx_ring, rx_bufs, opts.rx_buf_len),
            (TXQ, tx_ring, tx_bufs, opts.tx_buf_len),
        ] {
            let driver = DriverQueue::new(layout, qs, ring_base, event_idx);
            driver.init(&mem).map_err(|source| FrontendError::Driver {
                queue: index,
                source,
            })?;
            let (kick, call) = super::setup_ring(
                &mut fe,
                &sock,
                &mem,
                &driver,
                super::RingSetup {
                    index,
                    queue_size: opts.queue_size,
                    reply_ack,
                    // A fresh ring (§2.7.13, §2.8.21: both wrap counters 1 when packed).
                    base: match driver.layout() {
                        RingLayout::Split => 0,
                        RingLayout::Packed => raw::PACKED_FRESH_BASE,
                    },
                    packed_base_16bit: false,
                },
            )?;
            rings.push(Ring {
                index,
                driver,
                kick,
                call,
                in_flight: vec![None; usize::from(qs)],
                free: (0..u64::from(qs))
                    .rev()
                    .map(|k| bufs + k * u64::from(buf_len))
                    .collect(),
                buf_len,
            });
        }
        if protocol {
            for i in [RXQ, TXQ] {
                fe.set_vring_enable(usize::from(i), true)
                    .map_err(FrontendError::vhost(format!(
                        "SET_VRING_ENABLE 1 (queue {i})"
                    )))?;
            }
        }
        let tx = rings
            .pop()
            .ok_or_else(|| FrontendError::Protocol("transmitq missing".into()))?;
        let rx = rings
            .pop()
            .ok_or_else(|| FrontendError::Protocol("receiveq missing".into()))?;
        log::debug!(
            "connected to {}: features {:#x} (offered {:#x}), protocol {:#x}",
            path.display(),
            info.acked_features,
            info.offered_features,
            info.acked_protocol_features
        );
        Ok(ConsoleFrontend {
            fe,
            sock,
            opts,
            mem,
            rx,
            tx,
            rx_posted: 0,
            info,
            stats: ConsoleStats::default(),
        })
    }

    /// What was negotiated.
    pub fn info(&self) -> &ConsoleInfo {
        &self.info
    }

    /// The counters so far.
    pub fn stats(&self) -> ConsoleStats {
        self.stats
    }

    /// Transmit chains in flight.
    pub fn tx_in_flight(&self) -> u16 {
        self.tx.driver.in_flight()
    }

    /// Reclaims used transmit chains without waiting; returns how many.
    fn reclaim_tx(&mut self) -> Result<usize> {
        let mut n = 0;
        while self.tx.pop(&self.mem)?.is_some() {
            n += 1;
        }
        Ok(n)
    }

    /// Waits (bounded) for at least one transmit chain to come back.
    fn wait_tx(&mut self) -> Result<()> {
        let start = Instant::now();
        loop {
            if self.reclaim_tx()? > 0 || self.tx.driver.in_flight() == 0 {
                return Ok(());
            }
            let left = self.opts.timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(FrontendError::Timeout {
                    queue: TXQ,
                    in_flight: self.tx.driver.in_flight(),
                    waited: self.opts.timeout,
                });
            }
            self.tx.arm(&self.mem)?;
            if self.reclaim_tx()? > 0 {
                self.tx.disarm(&self.mem)?;
                return Ok(());
            }
            self.tx.sleep(&self.mem, left, &mut self.stats)?;
        }
    }

    /// Queues `data` for transmission in chains of up to
    /// [`ConsoleOptions::tx_buf_len`] bytes, waiting for used chains whenever the ring
    /// or the buffers are full. Returns when every byte is in a chain made available (see
    /// [`ConsoleFrontend::flush`]).
    pub fn send(&mut self, data: &[u8]) -> Result<()> {
        let chunk = usize::try_from(self.tx.buf_len).unwrap_or(usize::MAX);
        for piece in data.chunks(chunk) {
            self.reclaim_tx()?;
            while self.tx.free.is_empty() || self.tx.driver.free_slots() == 0 {
                self.tx
                    .kick_if_needed(&self.mem, self.opts.kick_always, &mut self.stats)?;
                self.wait_tx()?;
            }
            let addr = self
                .tx
                .free
                .pop()
                .ok_or_else(|| FrontendError::Protocol("no free transmit buffer".into()))?;
            self.mem
                .write_slice(piece, GuestAddress(addr))
                .map_err(|e| FrontendError::Memory(format!("writing at {addr:#x}: {e}")))?;
            let len = u32::try_from(piece.len()).unwrap_or(u32::MAX);
            let id = match self.tx.driver.add_chain(
                &self.mem,
                &[DriverBuffer {
                    addr,
                    len,
                    writable: false,
                }],
            ) {
                Ok(id) => id,
                Err(source) => {
                    self.tx.free.push(addr);
                    return Err(FrontendError::Driver { queue: TXQ, source });
                }
            };
            if let Some(slot) = self.tx.in_flight.get_mut(usize::from(id)) {
                *slot = Some(addr);
            }
            self.stats.tx_chains += 1;
        }
        self.tx
            .kick_if_needed(&self.mem, self.opts.kick_always, &mut self.stats)
    }

    /// Waits (bounded) until every transmit chain is used.
    pub fn flush(&mut self) -> Result<()> {
        self.tx
            .kick_if_needed(&self.mem, self.opts.kick_always, &mut self.stats)?;
        while self.tx.driver.in_flight() > 0 {
            self.wait_tx()?;
        }
        Ok(())
    }

    /// Posts receive buffers up to [`ConsoleOptions::rx_depth`] (kicking the receiveq
    /// with [`ConsoleOptions::rx_kick`]); [`ConsoleFrontend::receive`] does it too.
    pub fn post_receive_buffers(&mut self) -> Result<()> {
        self.post_rx()
    }

    fn post_rx(&mut self) -> Result<()> {
        let mut added = false;
        while self.rx_posted < self.opts.rx_depth && self.rx.driver.free_slots() > 0 {
            let Some(addr) = self.rx.free.pop() else {
                break;
            };
            let id = match self.rx.driver.add_chain(
                &self.mem,
                &[DriverBuffer {
                    addr,
                    len: self.rx.buf_len,
                    writable: true,
                }],
            ) {
                Ok(id) => id,
                Err(source) => {
                    self.rx.free.push(addr);
                    return Err(FrontendError::Driver { queue: RXQ, source });
                }
            };
            if let Some(slot) = self.rx.in_flight.get_mut(usize::from(id)) {
                *slot = Some(addr);
            }
            self.rx_posted += 1;
            added = true;
        }
        if added && self.opts.rx_kick {
            self.rx
                .kick_if_needed(&self.mem, self.opts.kick_always, &mut self.stats)?;
        }
        Ok(())
    }

    /// Takes used receive buffers without waiting, appending their bytes to `out`;
    /// returns the bytes taken.
    fn take_rx(&mut self, out: &mut Vec<u8>) -> Result<usize> {
        let mut n = 0;
        while let Some((addr, len)) = self.rx.pop(&self.mem)? {
            self.rx_posted = self.rx_posted.saturating_sub(1);
            self.stats.rx_used += 1;
            if len > self.rx.buf_len {
                return Err(FrontendError::Protocol(format!(
                    "receiveq: the device wrote {len} bytes into a {}-byte buffer",
                    self.rx.buf_len
                )));
            }
            let at = out.len();
            out.resize(at + len as usize, 0);
            self.mem
                .read_slice(&mut out[at..], GuestAddress(addr))
                .map_err(|e| FrontendError::Memory(format!("reading at {addr:#x}: {e}")))?;
            n += len as usize;
        }
        Ok(n)
    }

    /// Receives host input until `out` has grown by at least `at_least` bytes, keeping
    /// [`ConsoleOptions::rx_depth`] buffers posted. Fails with [`FrontendError::Timeout`]
    /// when no byte arrives for the frontend's timeout.
    pub fn receive(&mut self, out: &mut Vec<u8>, at_least: usize) -> Result<()> {
        let goal = out.len() + at_least;
        let mut last = Instant::now();
        while out.len() < goal {
            self.post_rx()?;
            if self.take_rx(out)? > 0 {
                last = Instant::now();
                continue;
            }
            let left = self.opts.timeout.saturating_sub(last.elapsed());
            if left.is_zero() {
                return Err(FrontendError::Timeout {
                    queue: RXQ,
                    in_flight: self.rx.driver.in_flight(),
                    waited: self.opts.timeout,
                });
            }
            self.rx.arm(&self.mem)?;
            if self.take_rx(out)? > 0 {
                self.rx.disarm(&self.mem)?;
                last = Instant::now();
                continue;
            }
            self.rx.sleep(&self.mem, left, &mut self.stats)?;
        }
        Ok(())
    }

    /// Writes one byte to `emerg_wr` in the configuration space (SET_CONFIG; needs
    /// VIRTIO_CONSOLE_F_EMERG_WRITE and the CONFIG protocol feature).
    pub fn emerg_write(&mut self, byte: u8) -> Result<()> {
        if !self.info.has(VIRTIO_CONSOLE_F_EMERG_WRITE) {
            return Err(FrontendError::FeatureNotOffered {
                feature: "VIRTIO_CONSOLE_F_EMERG_WRITE",
                bit: VIRTIO_CONSOLE_F_EMERG_WRITE,
                offered: self.info.offered_features,
            });
        }
        self.set_config(EMERG_WR_OFFSET, &[byte, 0, 0, 0])
    }

    /// SET_CONFIG of `data` at `offset` (needs the CONFIG protocol feature).
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        self.fe
            .set_config(offset, VhostUserConfigFlags::WRITABLE, data)
            .map_err(FrontendError::vhost(format!(
                "SET_CONFIG (offset {offset}, {} bytes)",
                data.len()
            )))
    }

    /// GET_CONFIG of `len` bytes at `offset` (needs the CONFIG protocol feature), under
    /// a watchdog that shuts the connection down after the frontend's timeout.
    pub fn get_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>> {
        let zeros = vec![0u8; len as usize];
        let fe = &mut self.fe;
        raw::with_watchdog(&self.sock, self.opts.timeout, || {
            fe.get_config(offset, len, VhostUserConfigFlags::empty(), &zeros)
        })
        .map(|(_, buf)| buf)
        .map_err(FrontendError::vhost(format!(
            "GET_CONFIG (offset {offset}, {len} bytes)"
        )))
    }

    /// Stops the device: waits for the transmit chains in flight, disables both rings
    /// (with PROTOCOL_FEATURES) and stops them with GET_VRING_BASE, checking that the
    /// backend consumed exactly what the driver made available on the transmitq.
    /// Returns the reported bases (receiveq, transmitq).
    pub fn shutdown(mut self) -> Result<(u32, u32)> {
        self.flush()?;
        let protocol = self.info.has(VHOST_USER_F_PROTOCOL_FEATURES);
        let mut bases = [0u32; 2];
        for (slot, ring) in bases.iter_mut().zip([&self.rx, &self.tx]) {
            let i = usize::from(ring.index);
            if protocol {
                self.fe
                    .set_vring_enable(i, false)
                    .map_err(FrontendError::vhost(format!(
                        "SET_VRING_ENABLE 0 (queue {i})"
                    )))?;
            }
            *slot = self
                .fe
                .get_vring_base(i)
                .map_err(FrontendError::vhost(format!("GET_VRING_BASE (queue {i})")))?;
        }
        let (pos, wrap) = self.tx.driver.avail_position();
        let expected = match self.info.layout {
            RingLayout::Split => u32::from(pos),
            RingLayout::Packed => u32::from(pos) | (u32::from(wrap) << 15),
        };
        if bases[1] & 0xffff != expected {
            return Err(FrontendError::BadVringBase {
                queue: TXQ,
                reported: bases[1],
                expected,
            });
        }
        Ok((bases[0], bases[1]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_validated() {
        let ok = ConsoleOptions::default();
        assert!(validate(&ok).is_ok());
        let bad = ConsoleOptions {
            queue_size: 100,
            ..ok.clone()
        };
        assert!(validate(&bad).is_err());
        let packed = ConsoleOptions {
            queue_size: 100,
            packed: true,
            rx_depth: 100,
            ..ok.clone()
        };
        assert!(validate(&packed).is_ok());
        let deep = ConsoleOptions {
            rx_depth: 129,
            ..ok
        };
        assert!(validate(&deep).is_err());
    }
}
