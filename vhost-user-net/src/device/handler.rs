// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The handler of one queue pair (and, for pair 0, the control queue): TAP queue k
//! between receiveq 2k and transmitq 2k + 1.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use log::{debug, info, warn};
use virtio_core::vhost_user::{
    DeviceError, Events, GroupContext, Interest, Processed, QueueContext, QueueHandler,
};
use virtio_core::{merged_chains_needed, write_merged, DescriptorChain};

use super::Shared;
use crate::ctrl::{CtrlChange, NetState};
use crate::features::{Negotiated, QueueRole, VNET_HDR_LEN};
use crate::hdr::{set_num_buffers, VnetHeader};
use crate::metrics::{DropReason, QueueMetrics};
use crate::tap::{is_would_block, MAX_IOVECS};

/// The token of the TAP queue's event source.
const TAP_TOKEN: u32 = 0;

/// The receive buffer: the largest frame a TAP hands out (64 KiB of GSO payload plus
/// link-layer headers) behind a 12-byte vnet header.
const RX_BUF_LEN: usize = 65536 + 256 + VNET_HDR_LEN;

/// Used elements of received frames gathered before they are published.
const RX_BATCH: usize = 64;

/// Most receive chains one frame may span with MRG_RXBUF (64 KiB in 256-byte buffers).
const MAX_MERGED_CHAINS: usize = 256;

/// Most guest buffers (descriptors) a frame is read into directly; held chains with more
/// fragments than this take the bounce buffer. A Linux guest posts one buffer per chain
/// with MRG_RXBUF (at least 1518 bytes: about 44 for 64 KiB) and 19 descriptors per
/// "big packet" chain without it.
const DIRECT_IOVECS: usize = 64;

/// Guest offloads under which the TAP may hand out frames up to [`RX_BUF_LEN`] (GSO): only
/// then is it worth holding chains for the largest frame before each read.
const GSO_OFFLOADS: u64 =
    crate::features::bit(virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_TSO4)
        | crate::features::bit(virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_TSO6)
        | crate::features::bit(virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_UFO)
        | crate::features::bit(virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_USO4)
        | crate::features::bit(virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_USO6);

/// Length of an Ethernet header (destination, source, EtherType).
const ETH_HLEN: usize = 14;

/// Log the first failure of a kind, then one in this many.
const LOG_EVERY: u64 = 1024;

/// The handler of queue pair `pair` (see the module documentation of `device`).
pub struct NetQueues {
    shared: Arc<Shared>,
    pair: u16,
    features: Negotiated,
    hdr_len: usize,
    mrg_rxbuf: bool,
    /// Frames are read straight into held receive chains when they can take the largest
    /// frame (GSO offloads negotiated), saving the copy through `buf`.
    direct_rx: bool,
    metrics: Arc<QueueMetrics>,
    rx: Option<u16>,
    tx: Option<u16>,
    ctrl: Option<u16>,
    /// The TAP is in the worker's epoll set, with `interest`.
    tap_registered: bool,
    interest: Interest,
    /// The TAP is paused: a frame waits for receive buffers, or the receive ring is not
    /// running.
    rx_paused: bool,
    /// The TAP refused a transmitted frame with EAGAIN; waiting for writability.
    tx_blocked: bool,
    /// The last read of the TAP found it empty (EAGAIN), and no receive ran since: with
    /// edge-triggered readiness its next frame raises an event, so nothing waits to be
    /// read until then.
    rx_drained: bool,
    /// The receive buffer and the length of the frame pending in it (0: none).
    buf: Box<[u8]>,
    pending: usize,
    /// Receive chains popped and not yet used (the first `rx_held`).
    rx_chains: Vec<DescriptorChain>,
    rx_held: usize,
    used: Vec<(u16, u32)>,
    lens: Vec<u32>,
    /// The transmit chain (held while `tx_held`: the TAP was full).
    tx_chain: DescriptorChain,
    tx_held: bool,
    ctrl_chain: DescriptorChain,
    /// This handler's copy of the control-queue state (the receive filter) and its
    /// generation.
    state: NetState,
    generation: u64,
    failures: u64,
}

impl std::fmt::Debug for NetQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetQueues")
            .field("pair", &self.pair)
            .field("rx", &self.rx)
            .field("tx", &self.tx)
            .field("ctrl", &self.ctrl)
            .field("pending", &self.pending)
            .field("rx_held", &self.rx_held)
            .finish()
    }
}

/// What became of a direct read ([`NetQueues::receive_direct`]).
enum Direct {
    /// A frame was delivered or dropped.
    Done,
    /// The TAP has no frame (EAGAIN); the chains stay held.
    Empty,
    /// The held chains cannot take the largest frame: read through the buffer.
    Unavailable,
}

/// Copies guest bytes `offset..offset + out.len()` of the buffers `iovs` (as many as
/// they hold) into `out`; returns how many were copied.
fn gather(iovs: &[libc::iovec], mut offset: usize, out: &mut [u8]) -> usize {
    let mut done = 0;
    for iov in iovs {
        if done == out.len() {
            break;
        }
        if offset >= iov.iov_len {
            offset -= iov.iov_len;
            continue;
        }
        let n = (iov.iov_len - offset).min(out.len() - done);
        let Some(dst) = out.get_mut(done..done + n) else {
            break;
        };
        // SAFETY: `iov` is a device-writable buffer of a held receive chain, translated
        // into the guest memory mapping the chain's memory view keeps alive, and
        // `offset + n <= iov_len`; `dst` is a Rust buffer of `n` bytes, which guest
        // memory never overlaps.
        unsafe {
            std::ptr::copy_nonoverlapping(
                iov.iov_base.cast::<u8>().cast_const().add(offset),
                dst.as_mut_ptr(),
                n,
            );
        }
        done += n;
        offset = 0;
    }
    done
}

/// What became of the pending frame.
enum Delivery {
    /// Delivered or dropped: the buffer is free.
    Done,
    /// No receive buffer: keep it.
    NoBuffers,
}

impl NetQueues {
    pub(crate) fn new(
        shared: Arc<Shared>,
        pair: u16,
        features: Negotiated,
    ) -> Result<Self, DeviceError> {
        let metrics = shared
            .metrics
            .get(usize::from(pair))
            .cloned()
            .ok_or(DeviceError::Other(format!("no queue pair {pair}")))?;
        let (state, generation) = shared.state_snapshot();
        let mut rx_chains = Vec::with_capacity(MAX_MERGED_CHAINS);
        rx_chains.resize_with(MAX_MERGED_CHAINS, DescriptorChain::new);
        Ok(NetQueues {
            pair,
            hdr_len: features.vnet_hdr_len(),
            mrg_rxbuf: features.has(virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF),
            direct_rx: features.bits() & GSO_OFFLOADS != 0,
            features,
            metrics,
            rx: None,
            tx: None,
            ctrl: None,
            tap_registered: false,
            interest: Interest::PAUSED,
            rx_paused: false,
            tx_blocked: false,
            rx_drained: false,
            buf: vec![0u8; RX_BUF_LEN].into_boxed_slice(),
            pending: 0,
            rx_chains,
            rx_held: 0,
            // A batch of RX_BATCH elements may end with a frame of MAX_MERGED_CHAINS.
            used: Vec::with_capacity(RX_BATCH + MAX_MERGED_CHAINS),
            lens: vec![0; MAX_MERGED_CHAINS],
            tx_chain: DescriptorChain::new(),
            tx_held: false,
            ctrl_chain: DescriptorChain::new(),
            state,
            generation,
            failures: 0,
            shared,
        })
    }

    fn tap(&self) -> Option<&crate::tap::TapQueue> {
        self.shared.tap.queues().get(usize::from(self.pair))
    }

    /// Logs the first failure and then one in [`LOG_EVERY`] (a guest may cause many).
    fn log_failure(&mut self, what: std::fmt::Arguments<'_>) {
        if self.failures % LOG_EVERY == 0 {
            warn!(
                "queue pair {}: {what} ({} such failures so far)",
                self.pair,
                self.failures + 1
            );
        }
        self.failures += 1;
    }

    /// Watches the TAP for what the handler waits for now (edge-triggered).
    fn update_interest(&mut self, ctx: &mut GroupContext<'_>) -> Result<(), DeviceError> {
        let want = Interest {
            readable: self.rx.is_some() && !self.rx_paused,
            writable: self.tx_blocked,
            edge: true,
        };
        let want = if want.readable || want.writable {
            want
        } else {
            Interest::PAUSED
        };
        if !self.tap_registered {
            let Some(fd) = self.tap().map(AsRawFd::as_raw_fd) else {
                return Ok(());
            };
            ctx.register(fd, want, TAP_TOKEN)?;
            self.tap_registered = true;
        } else if want != self.interest {
            ctx.reregister(TAP_TOKEN, want)?;
        }
        self.interest = want;
        Ok(())
    }

    /// Refreshes the receive filter if a control command changed it (one atomic load).
    #[inline]
    fn refresh_state(&mut self) {
        if self.shared.generation() != self.generation {
            let (state, generation) = self.shared.state_snapshot();
            self.state = state;
            self.generation = generation;
        }
    }

    /// Receive: reads frames from the TAP until EAGAIN and delivers them, or pauses the
    /// TAP when the receive ring has no buffers.
    fn receive(&mut self, ctx: &mut GroupContext<'_>) -> Result<(), DeviceError> {
        let Some(rx) = self.rx else {
            return Ok(());
        };
        self.rx_drained = false;
        let delivered = self.receive_frames(ctx, rx);
        // Whatever stopped the loop, the frames delivered so far are published.
        let flushed = self.flush_rx(ctx, rx);
        delivered.and(flushed)
    }

    fn receive_frames(&mut self, ctx: &mut GroupContext<'_>, rx: u16) -> Result<(), DeviceError> {
        self.refresh_state();
        // The ring's state changes only between handler calls (the worker applies the
        // frontend's commands between rounds): one check per call.
        if !ctx.is_active(rx) {
            // Disabled (or stopping) ring: leave frames in the kernel until process(rx)
            // runs when it is enabled again.
            return self.pause(ctx);
        }
        loop {
            // Used elements, not frames: one more frame adds at most MAX_MERGED_CHAINS,
            // so `used` never outgrows its capacity.
            if self.used.len() >= RX_BATCH {
                self.flush_rx(ctx, rx)?;
            }
            if self.pending == 0 && self.direct_rx {
                match self.receive_direct(ctx, rx)? {
                    Direct::Done => continue,
                    Direct::Empty => {
                        self.rx_drained = true;
                        return Ok(());
                    }
                    Direct::Unavailable => {}
                }
            }
            if self.pending == 0 {
                let Some(tap) = self.shared.tap.queues().get(usize::from(self.pair)) else {
                    return Ok(());
                };
                match tap.read(&mut self.buf) {
                    Ok(n) if n < self.hdr_len => {
                        self.metrics.record_drop(DropReason::BadHeader);
                        self.log_failure(format_args!("the TAP returned a {n}-byte read"));
                        continue;
                    }
                    Ok(n) if n >= self.buf.len() => {
                        // Possibly truncated: never hand a partial frame to the guest.
                        self.metrics.record_drop(DropReason::TooBig);
                        self.log_failure(format_args!("a TAP frame filled the buffer; dropped"));
                        continue;
                    }
                    Ok(n) => {
                        let frame = self.buf.get(self.hdr_len..n).unwrap_or(&[]);
                        if !self.state.accepts_frame(frame) {
                            self.metrics.record_drop(DropReason::Filtered);
                            continue;
                        }
                        self.pending = n;
                    }
                    Err(e) if is_would_block(&e) => {
                        self.rx_drained = true;
                        return Ok(());
                    }
                    Err(e) => match e.raw_os_error() {
                        // The frame did not fit the buffer (the kernel consumed it).
                        Some(libc::EFAULT | libc::EMSGSIZE | libc::EINVAL) => {
                            self.metrics.record_drop(DropReason::TooBig);
                            self.log_failure(format_args!("a TAP frame was dropped: {e}"));
                        }
                        _ => {
                            warn!("queue pair {}: reading the TAP failed: {e}", self.pair);
                            return Err(DeviceError::Io(e));
                        }
                    },
                }
            }
            match self.deliver(ctx, rx)? {
                Delivery::Done => self.pending = 0,
                Delivery::NoBuffers => {
                    // The driver may be waiting for these before it posts more.
                    self.flush_rx(ctx, rx)?;
                    self.pause(ctx)?;
                    if !ctx.wait_for_buffers(rx)? {
                        // The next kick of the receive queue calls process(rx).
                        return Ok(());
                    }
                    self.rx_paused = false;
                    self.update_interest(ctx)?;
                }
            }
        }
    }

    /// Reads one frame straight into the held receive chains (§5.1.6.4), popping chains
    /// first until together they take [`RX_BUF_LEN`] bytes, the most a read through the
    /// buffer takes: a frame that fills them may be truncated and is dropped, as there.
    /// Chains the frame does not need stay held for the next one.
    fn receive_direct(
        &mut self,
        ctx: &mut GroupContext<'_>,
        rx: u16,
    ) -> Result<Direct, DeviceError> {
        let Some(vring) = ctx.vring(rx) else {
            return Ok(Direct::Unavailable);
        };
        // Without MRG_RXBUF a frame takes exactly one chain (§5.1.6.3.1).
        let max_chains = if self.mrg_rxbuf { MAX_MERGED_CHAINS } else { 1 };
        let chains = loop {
            let held = self
                .rx_chains
                .get(..self.rx_held.min(max_chains))
                .unwrap_or(&[]);
            if let Some(n) = merged_chains_needed(held, RX_BUF_LEN) {
                break n;
            }
            if self.rx_held >= max_chains {
                return Ok(Direct::Unavailable);
            }
            let Some(slot) = self.rx_chains.get_mut(self.rx_held) else {
                return Ok(Direct::Unavailable);
            };
            if !vring.pop_into(slot)? {
                // Too few buffers now: the buffered read delivers what fits.
                return Ok(Direct::Unavailable);
            }
            self.rx_held += 1;
        };
        // The chains' writable buffers, in order, up to RX_BUF_LEN bytes. A stack array:
        // no allocation on the hot path, and the handler stays Send.
        let mut iovs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; DIRECT_IOVECS];
        let mut count = 0;
        let mut room = 0;
        for iov in self
            .rx_chains
            .iter()
            .take(chains)
            .flat_map(|c| c.writable_iovecs())
        {
            if room >= RX_BUF_LEN {
                break;
            }
            let Some(slot) = iovs.get_mut(count) else {
                return Ok(Direct::Unavailable);
            };
            let len = iov.iov_len.min(RX_BUF_LEN - room);
            *slot = libc::iovec {
                iov_base: iov.iov_base,
                iov_len: len,
            };
            count += 1;
            room += len;
        }
        let iovs = iovs.get(..count).unwrap_or(&[]);
        let Some(tap) = self.shared.tap.queues().get(usize::from(self.pair)) else {
            return Ok(Direct::Unavailable);
        };
        // At most DIRECT_IOVECS.
        let iovcnt = libc::c_int::try_from(count).unwrap_or(0);
        let n = loop {
            // SAFETY: `iovs` are device-writable buffers of the held receive chains,
            // translated into the guest memory mapping their memory view keeps alive while
            // they are held; at most DIRECT_IOVECS (below IOV_MAX) of them; readv writes
            // only inside them.
            let r = unsafe { libc::readv(tap.as_raw_fd(), iovs.as_ptr(), iovcnt) };
            if let Ok(n) = usize::try_from(r) {
                break n;
            }
            let e = io::Error::last_os_error();
            if is_would_block(&e) {
                return Ok(Direct::Empty);
            }
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // The frame did not fit (the kernel consumed it).
                Some(libc::EFAULT | libc::EMSGSIZE | libc::EINVAL) => {
                    self.metrics.record_drop(DropReason::TooBig);
                    self.log_failure(format_args!("a TAP frame was dropped: {e}"));
                    return Ok(Direct::Done);
                }
                _ => {
                    warn!("queue pair {}: reading the TAP failed: {e}", self.pair);
                    return Err(DeviceError::Io(e));
                }
            }
        };
        if n < self.hdr_len {
            self.metrics.record_drop(DropReason::BadHeader);
            self.log_failure(format_args!("the TAP returned a {n}-byte read"));
            return Ok(Direct::Done);
        }
        if n >= RX_BUF_LEN {
            // Possibly truncated: never hand a partial frame to the guest.
            self.metrics.record_drop(DropReason::TooBig);
            self.log_failure(format_args!("a TAP frame filled the buffer; dropped"));
            return Ok(Direct::Done);
        }
        // The receive filter looks at the destination address only (§5.1.6.5.1).
        let mut dst = [0u8; 6];
        let got = gather(iovs, self.hdr_len, &mut dst);
        if !self.state.accepts_frame(dst.get(..got).unwrap_or(&[])) {
            // The chains stay held: what was written into them is overwritten.
            self.metrics.record_drop(DropReason::Filtered);
            return Ok(Direct::Done);
        }
        let held = self.rx_chains.get(..chains).unwrap_or(&[]);
        let Some(needed) = merged_chains_needed(held, n) else {
            self.metrics.record_drop(DropReason::TooBig);
            return Ok(Direct::Done);
        };
        // num_buffers: the chains the frame spans with MRG_RXBUF, else 1 (§5.1.6.4). The
        // TAP leaves the field unwritten.
        if self.hdr_len == VNET_HDR_LEN {
            let mut hdr = [0u8; VNET_HDR_LEN];
            set_num_buffers(&mut hdr, u16::try_from(needed).unwrap_or(u16::MAX));
            if let Some(c) = self.rx_chains.first() {
                let mut w = c.writer();
                w.consume(crate::features::VNET_HDR_LEN_LEGACY);
                let _ = w.write_all(
                    hdr.get(crate::features::VNET_HDR_LEN_LEGACY..)
                        .unwrap_or(&[]),
                );
            }
        }
        // readv filled each chain before the next: published with the rest of the batch.
        let mut left = n;
        for c in self.rx_chains.iter().take(needed) {
            let l = left.min(c.writable_len() as usize);
            left -= l;
            self.used
                .push((c.id(), u32::try_from(l).unwrap_or(u32::MAX)));
        }
        if needed < self.rx_held {
            // Chains held but not needed stay for the next frame, in ring order.
            self.rx_chains[..self.rx_held].rotate_left(needed);
        }
        self.rx_held -= needed;
        self.metrics.record_rx(n - self.hdr_len);
        Ok(Direct::Done)
    }

    /// Publishes the used elements of the frames delivered since the last flush (one
    /// used-index update and one notification check per batch).
    fn flush_rx(&mut self, ctx: &mut GroupContext<'_>, rx: u16) -> Result<(), DeviceError> {
        if self.used.is_empty() {
            return Ok(());
        }
        let r = match ctx.vring(rx) {
            Some(vring) => vring.add_used_batch(&self.used).map_err(DeviceError::from),
            None => Ok(()),
        };
        self.used.clear();
        r
    }

    fn pause(&mut self, ctx: &mut GroupContext<'_>) -> Result<(), DeviceError> {
        self.rx_paused = true;
        self.update_interest(ctx)
    }

    /// Delivers the pending frame into receive chains (§5.1.6.4).
    fn deliver(&mut self, ctx: &mut GroupContext<'_>, rx: u16) -> Result<Delivery, DeviceError> {
        let Some(vring) = ctx.vring(rx) else {
            return Ok(Delivery::NoBuffers);
        };
        let len = self.pending;
        let frame_len = len.saturating_sub(self.hdr_len);
        let want_chains = if self.mrg_rxbuf { MAX_MERGED_CHAINS } else { 1 };
        let needed = loop {
            if let Some(n) = merged_chains_needed(&self.rx_chains[..self.rx_held], len) {
                break n;
            }
            if self.rx_held >= want_chains {
                // Without MRG_RXBUF a frame takes exactly one chain (§5.1.6.3.1); one
                // that does not fit is dropped and the chain kept for the next frame.
                self.metrics.record_drop(DropReason::TooBig);
                self.log_failure(format_args!(
                    "a {len}-byte frame does not fit the receive buffers; dropped"
                ));
                return Ok(Delivery::Done);
            }
            let Some(slot) = self.rx_chains.get_mut(self.rx_held) else {
                return Ok(Delivery::Done);
            };
            if !vring.pop_into(slot)? {
                return Ok(Delivery::NoBuffers);
            }
            self.rx_held += 1;
        };
        // num_buffers: the chains the frame spans with MRG_RXBUF, else 1 (§5.1.6.4).
        if self.hdr_len == VNET_HDR_LEN {
            set_num_buffers(&mut self.buf, u16::try_from(needed).unwrap_or(u16::MAX));
        }
        let data = self.buf.get(..len).unwrap_or(&[]);
        let Some(n) = write_merged(&self.rx_chains[..needed], &[data], &mut self.lens) else {
            self.metrics.record_drop(DropReason::TooBig);
            return Ok(Delivery::Done);
        };
        // Published with the rest of the batch (`flush_rx`).
        for (c, &l) in self.rx_chains.iter().zip(&self.lens).take(n) {
            self.used.push((c.id(), l));
        }
        if n < self.rx_held {
            // Chains popped but not needed stay for the next frame, in ring order.
            self.rx_chains[..self.rx_held].rotate_left(n);
        }
        self.rx_held -= n;
        self.metrics.record_rx(frame_len);
        Ok(Delivery::Done)
    }

    /// Transmit: pops chains and writes their frames to the TAP until the ring is empty
    /// or the TAP is full.
    fn transmit(&mut self, ctx: &mut GroupContext<'_>, tx: u16) -> Result<Processed, DeviceError> {
        if self.tx_blocked {
            return Ok(Processed::Throttled);
        }
        loop {
            let Some(vring) = ctx.vring(tx) else {
                return Ok(Processed::Empty);
            };
            if !self.tx_held {
                if !vring.pop_into(&mut self.tx_chain)? {
                    return Ok(Processed::Empty);
                }
                self.tx_held = true;
            }
            let id = self.tx_chain.id();
            match self.write_frame() {
                Ok(Some(frame_len)) => self.metrics.record_tx(frame_len),
                Ok(None) => {}
                Err(e) if is_would_block(&e) => {
                    self.tx_blocked = true;
                    self.update_interest(ctx)?;
                    return Ok(Processed::Throttled);
                }
                Err(e) => {
                    self.metrics.record_drop(DropReason::TapFull);
                    self.log_failure(format_args!("writing a frame to the TAP failed: {e}"));
                }
            }
            self.tx_held = false;
            // §5.1.6.2: the device writes nothing into a transmit buffer.
            if let Some(vring) = ctx.vring(tx) {
                vring.add_used(id, 0)?;
            }
        }
    }

    /// Checks the held chain's vnet header (§5.1.6.2.1) and writes header and frame to the
    /// TAP straight from guest memory. `Ok(None)`: the frame was dropped.
    fn write_frame(&mut self) -> io::Result<Option<usize>> {
        let chain = &self.tx_chain;
        let total = chain.readable_len() as usize;
        let mut hdr = [0u8; VNET_HDR_LEN];
        let hdr_buf = hdr.get_mut(..self.hdr_len).unwrap_or(&mut []);
        let got = chain.reader().read(hdr_buf).unwrap_or(0);
        let frame_len = total.saturating_sub(self.hdr_len);
        let checked = if got < self.hdr_len || frame_len < ETH_HLEN {
            // A header, then at least an Ethernet header.
            Err(crate::hdr::HeaderError::Short {
                len: total,
                need: self.hdr_len + ETH_HLEN,
            })
        } else {
            VnetHeader::read(&hdr, self.hdr_len).and_then(|h| h.check_tx(self.features, frame_len))
        };
        if let Err(e) = checked {
            self.metrics.record_drop(DropReason::BadHeader);
            self.log_failure(format_args!("transmitted frame dropped: {e}"));
            return Ok(None);
        }
        let iovs = self.tx_chain.readable_iovecs();
        if iovs.len() > MAX_IOVECS {
            self.metrics.record_drop(DropReason::TooBig);
            return Ok(None);
        }
        let Some(tap) = self.tap() else {
            return Ok(None);
        };
        let n = libc::c_int::try_from(iovs.len()).unwrap_or(0);
        loop {
            // SAFETY: `iovs` are the chain's device-readable buffers, translated into the
            // guest memory mapping its memory view keeps alive while the chain is held; at
            // most MAX_IOVECS (IOV_MAX) of them; writev only reads them.
            let r = unsafe { libc::writev(tap.as_raw_fd(), iovs.as_ptr(), n) };
            if r >= 0 {
                return Ok(Some(frame_len));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// The control queue (§5.1.6.5): executes each command on the device's state and
    /// acts on what changed.
    fn control(&mut self, ctx: &mut GroupContext<'_>, q: u16) -> Result<Processed, DeviceError> {
        loop {
            let Some(vring) = ctx.vring(q) else {
                return Ok(Processed::Empty);
            };
            if !vring.pop_into(&mut self.ctrl_chain)? {
                return Ok(Processed::Empty);
            }
            let chain = &self.ctrl_chain;
            let outcome = self
                .shared
                .with_state(|s| s.handle(&mut chain.reader(), &mut chain.writer()));
            let written = match outcome {
                Ok(o) => {
                    if let Some(e) = &o.error {
                        info!("control command refused: {e}");
                    }
                    if let Some(change) = o.change {
                        self.apply(change);
                    }
                    1
                }
                Err(e) => {
                    warn!("control request without room for its ack: {e}");
                    0
                }
            };
            vring.add_used(chain.id(), written)?;
        }
    }

    fn apply(&self, change: CtrlChange) {
        debug!("control change: {change:?}");
        match change {
            CtrlChange::QueuePairs(n) => {
                info!("the driver uses {n} queue pair(s) (VQ_PAIRS_SET)");
                self.shared.set_active_pairs(n);
            }
            CtrlChange::GuestOffloads(bits) => self.shared.set_guest_offloads(bits),
            CtrlChange::MacAddr(mac) => self.shared.set_mac(mac),
            CtrlChange::AnnounceAcked => self.shared.announce_acked(),
            CtrlChange::RxMode | CtrlChange::MacTable => {}
        }
    }

    /// Returns the held receive chains unused (length 0) and drops the pending frame.
    fn release_rx(&mut self, ctx: &mut GroupContext<'_>, rx: u16) -> Result<(), DeviceError> {
        self.flush_rx(ctx, rx)?;
        if self.pending != 0 {
            self.metrics.record_drop(DropReason::NoRxBuffers);
            self.pending = 0;
        }
        if self.rx_held == 0 {
            return Ok(());
        }
        self.used.clear();
        for c in self.rx_chains.iter().take(self.rx_held) {
            self.used.push((c.id(), 0));
        }
        self.rx_held = 0;
        if let Some(vring) = ctx.vring(rx) {
            vring.add_used_batch(&self.used)?;
        }
        Ok(())
    }
}

impl QueueHandler for NetQueues {
    fn queue_started(
        &mut self,
        ctx: &mut GroupContext<'_>,
        queue: &QueueContext,
    ) -> Result<(), DeviceError> {
        let role = super::queue_role(queue.index, self.features, self.shared.max_pairs);
        info!(
            "queue {}: started as {role:?} ({:?} ring, {} entries)",
            queue.index, queue.layout, queue.size
        );
        match role {
            Some(QueueRole::Rx(p)) if p == self.pair => {
                self.rx = Some(queue.index);
                self.rx_paused = false;
                self.rx_drained = false;
            }
            Some(QueueRole::Tx(p)) if p == self.pair => self.tx = Some(queue.index),
            Some(QueueRole::Ctrl) => self.ctrl = Some(queue.index),
            _ => {
                return Err(DeviceError::Other(format!(
                    "queue {} has no role under features {:#x} in queue pair {}",
                    queue.index,
                    self.features.bits(),
                    self.pair
                )))
            }
        }
        if self.rx.is_some() || self.tx.is_some() {
            self.update_interest(ctx)?;
        }
        Ok(())
    }

    fn process(
        &mut self,
        ctx: &mut GroupContext<'_>,
        queue: u16,
    ) -> Result<Processed, DeviceError> {
        if !self.tap_registered && (self.rx.is_some() || self.tx.is_some()) {
            self.update_interest(ctx)?;
        }
        if Some(queue) == self.tx {
            return self.transmit(ctx, queue);
        }
        if Some(queue) == self.ctrl {
            return self.control(ctx, queue);
        }
        if Some(queue) == self.rx {
            // Buffers arrived (or the ring was enabled): resume the TAP.
            if self.rx_paused {
                self.rx_paused = false;
                self.update_interest(ctx)?;
                self.receive(ctx)?;
            } else if !self.rx_drained {
                self.receive(ctx)?;
            }
            // Otherwise the TAP was read until EAGAIN and is watched: its next frame
            // raises an event (the worker also calls this after every TAP event, when
            // the receive above has just drained it: one read saved per event).
            // Receive buffers stay in the ring until a frame needs them (with GSO
            // offloads, until the held chains can take the largest frame).
            return Ok(Processed::Throttled);
        }
        Ok(Processed::Empty)
    }

    fn handle_event(
        &mut self,
        ctx: &mut GroupContext<'_>,
        token: u32,
        events: Events,
    ) -> Result<(), DeviceError> {
        if token != TAP_TOKEN {
            return Ok(());
        }
        if events.hangup || events.error {
            warn!(
                "queue pair {}: the TAP queue reported {events:?}",
                self.pair
            );
            return Err(DeviceError::Other(format!(
                "TAP {} queue {} hung up or failed",
                self.shared.tap.name(),
                self.pair
            )));
        }
        if events.writable && self.tx_blocked {
            self.tx_blocked = false;
            self.update_interest(ctx)?;
            if let Some(tx) = self.tx {
                ctx.schedule(tx);
            }
        }
        if events.readable {
            self.receive(ctx)?;
        }
        Ok(())
    }

    fn drain(&mut self, ctx: &mut GroupContext<'_>, queue: u16) -> Result<(), DeviceError> {
        if Some(queue) == self.rx {
            self.release_rx(ctx, queue)?;
        } else if Some(queue) == self.tx && self.tx_held {
            // The TAP stayed full: the frame is dropped, the chain returned.
            self.tx_held = false;
            self.tx_blocked = false;
            self.metrics.record_drop(DropReason::TapFull);
            if let Some(vring) = ctx.vring(queue) {
                vring.add_used(self.tx_chain.id(), 0)?;
            }
        }
        Ok(())
    }

    fn queue_stopped(&mut self, ctx: &mut GroupContext<'_>, queue: u16) {
        if Some(queue) == self.rx {
            self.rx = None;
        } else if Some(queue) == self.tx {
            self.tx = None;
            self.tx_blocked = false;
        } else if Some(queue) == self.ctrl {
            self.ctrl = None;
            info!("queue {queue}: control queue stopped");
            return;
        }
        if self.rx.is_none() && self.tx.is_none() {
            if self.tap_registered {
                ctx.unregister(TAP_TOKEN);
                self.tap_registered = false;
            }
        } else if let Err(e) = self.update_interest(ctx) {
            warn!("queue pair {}: updating TAP interest: {e}", self.pair);
        }
        info!(
            "queue {queue}: stopped; queue pair {} counters: {}",
            self.pair,
            self.metrics.snapshot()
        );
    }
}
