// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One request queue of the frontend: request slots, submission, kicks and completions.

use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use virtio_core::driver::{DriverBuffer, DriverQueue};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::blk::{request_header, status_name, BlkOp, STATUS_UNWRITTEN, VIRTIO_BLK_S_OK};
use super::memory::{QueueLayout, META_INDIRECT, META_STATUS, META_STRIDE};
use super::{CompletionMode, FrontendError};

/// Sentinel of `id_to_slot` for an ID that is not in flight.
const NO_SLOT: u16 = u16::MAX;

/// One completed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The slot the request used (its data buffer still holds what the device wrote,
    /// until the slot is allocated again).
    pub slot: u16,
    /// The request type.
    pub op: BlkOp,
    /// The request's first sector.
    pub sector: u64,
    /// Data bytes of the request.
    pub len: u32,
    /// The status byte the device wrote ([`STATUS_UNWRITTEN`] if it wrote none).
    pub status: u8,
    /// The `len` of the used element (bytes the device says it wrote).
    pub used_len: u32,
    /// Time from submission to the frontend seeing the completion.
    pub latency: Duration,
    /// The caller's tag given to [`BlkQueue::submit`].
    pub user: u64,
}

impl Completion {
    /// `Ok` if the status byte is `VIRTIO_BLK_S_OK`, else [`FrontendError::RequestFailed`].
    pub fn check(&self, queue: u16) -> Result<(), FrontendError> {
        if self.status == VIRTIO_BLK_S_OK {
            Ok(())
        } else {
            Err(FrontendError::RequestFailed {
                queue,
                op: self.op,
                sector: self.sector,
                len: self.len,
                status: self.status,
                status_name: status_name(self.status),
            })
        }
    }
}

/// Counters of one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Requests submitted.
    pub submitted: u64,
    /// Requests completed.
    pub completed: u64,
    /// Kicks sent (eventfd writes); `needs_kick` suppressed the rest.
    pub kicks: u64,
    /// Times [`BlkQueue::kick`] found a kick unnecessary.
    pub kicks_suppressed: u64,
    /// Times the frontend slept on the call eventfd.
    pub sleeps: u64,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    meta: u64,
    data: u64,
    busy: bool,
    op: BlkOp,
    sector: u64,
    len: u32,
    user: u64,
    submitted: Instant,
}

/// A driver-side request queue bound to a vhost-user backend's vring.
///
/// Each queue has a fixed number of request *slots* (header, status byte, indirect table
/// and a data buffer of up to the frontend's maximum block size in guest memory); a
/// request occupies one slot from [`BlkQueue::submit`] to its [`Completion`]. Queues are
/// `Send`: drive each from its own thread.
#[derive(Debug)]
pub struct BlkQueue {
    index: u16,
    mem: GuestMemoryMmap,
    driver: DriverQueue,
    kick: EventFd,
    call: EventFd,
    mode: CompletionMode,
    indirect: bool,
    data_cap: u32,
    slots: Vec<Slot>,
    free: Vec<u16>,
    id_to_slot: Vec<u16>,
    timeout: Duration,
    stats: QueueStats,
}

/// What [`super::BlkFrontend`] needs to build a queue.
pub(crate) struct QueueParts {
    pub index: u16,
    pub mem: GuestMemoryMmap,
    pub driver: DriverQueue,
    pub kick: EventFd,
    pub call: EventFd,
    pub mode: CompletionMode,
    pub indirect: bool,
    pub layout: QueueLayout,
    pub slots: u16,
    pub data_stride: u64,
    pub data_cap: u32,
    pub timeout: Duration,
}

impl BlkQueue {
    pub(crate) fn new(p: QueueParts) -> Self {
        let now = Instant::now();
        let slots = (0..p.slots)
            .map(|i| Slot {
                meta: p.layout.meta_base + u64::from(i) * META_STRIDE,
                data: p.layout.data_base + u64::from(i) * p.data_stride,
                busy: false,
                op: BlkOp::Read,
                sector: 0,
                len: 0,
                user: 0,
                submitted: now,
            })
            .collect();
        BlkQueue {
            index: p.index,
            id_to_slot: vec![NO_SLOT; usize::from(p.driver.size())],
            mem: p.mem,
            driver: p.driver,
            kick: p.kick,
            call: p.call,
            mode: p.mode,
            indirect: p.indirect,
            data_cap: p.data_cap,
            slots,
            free: (0..p.slots).rev().collect(),
            timeout: p.timeout,
            stats: QueueStats::default(),
        }
    }

    /// Replaces the kick and call eventfds (after a reconnect to a restarted backend).
    pub(crate) fn replace_eventfds(&mut self, kick: EventFd, call: EventFd) {
        self.kick = kick;
        self.call = call;
    }

    /// The vring index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Number of request slots (the maximum depth).
    pub fn depth(&self) -> u16 {
        u16::try_from(self.slots.len()).unwrap_or(u16::MAX)
    }

    /// Largest data length of one request.
    pub fn max_data_len(&self) -> u32 {
        self.data_cap
    }

    /// Requests submitted and not yet completed.
    pub fn in_flight(&self) -> u16 {
        self.depth() - u16::try_from(self.free.len()).unwrap_or(0)
    }

    /// Counters so far.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// The driver-side ring (for its positions, e.g. to check GET_VRING_BASE).
    pub fn driver(&self) -> &DriverQueue {
        &self.driver
    }

    /// Reserves a free slot, or `None` if all are in flight.
    pub fn alloc_slot(&mut self) -> Option<u16> {
        let s = self.free.pop()?;
        if let Some(slot) = self.slots.get_mut(usize::from(s)) {
            slot.busy = true;
        }
        Some(s)
    }

    /// Returns a slot reserved with [`BlkQueue::alloc_slot`] but not submitted.
    pub fn release_slot(&mut self, slot: u16) {
        if let Some(s) = self.slots.get_mut(usize::from(slot)) {
            if s.busy {
                s.busy = false;
                self.free.push(slot);
            }
        }
    }

    fn slot(&self, slot: u16) -> Result<&Slot, FrontendError> {
        self.slots
            .get(usize::from(slot))
            .ok_or_else(|| FrontendError::InvalidOptions(format!("no slot {slot}")))
    }

    /// Guest-physical address of a slot's data buffer.
    pub fn data_addr(&self, slot: u16) -> Result<u64, FrontendError> {
        Ok(self.slot(slot)?.data)
    }

    /// Copies `data` into a slot's data buffer (for a write request).
    pub fn write_data(&self, slot: u16, data: &[u8]) -> Result<(), FrontendError> {
        let s = self.slot(slot)?;
        if data.len() > self.data_cap as usize {
            return Err(FrontendError::InvalidOptions(format!(
                "{} data bytes exceed the slot size {}",
                data.len(),
                self.data_cap
            )));
        }
        self.mem
            .write_slice(data, GuestAddress(s.data))
            .map_err(|e| FrontendError::Memory(format!("writing slot data: {e}")))
    }

    /// Copies a slot's data buffer into `out` (after a read completed).
    pub fn read_data(&self, slot: u16, out: &mut [u8]) -> Result<(), FrontendError> {
        let s = self.slot(slot)?;
        if out.len() > self.data_cap as usize {
            return Err(FrontendError::InvalidOptions(format!(
                "{} bytes exceed the slot size {}",
                out.len(),
                self.data_cap
            )));
        }
        self.mem
            .read_slice(out, GuestAddress(s.data))
            .map_err(|e| FrontendError::Memory(format!("reading slot data: {e}")))
    }

    /// Makes a request available in slot `slot` (from [`BlkQueue::alloc_slot`]): writes
    /// the header and the status sentinel and adds the chain header → data → status
    /// (indirect when negotiated and enabled). For a write, the data must already be in
    /// the slot's buffer. Does not kick: call [`BlkQueue::kick`] after a batch.
    pub fn submit(
        &mut self,
        slot: u16,
        op: BlkOp,
        sector: u64,
        len: u32,
        user: u64,
    ) -> Result<(), FrontendError> {
        let index = self.index;
        let s = *self.slot(slot)?;
        if !s.busy {
            return Err(FrontendError::InvalidOptions(format!(
                "slot {slot} was not allocated"
            )));
        }
        if len > self.data_cap || (op.has_data() && len == 0) {
            return Err(FrontendError::InvalidOptions(format!(
                "data length {len} not in 1..={}",
                self.data_cap
            )));
        }
        let mem_err = |e: vm_memory::GuestMemoryError| {
            FrontendError::Memory(format!("writing request header: {e}"))
        };
        self.mem
            .write_slice(&request_header(op, sector), GuestAddress(s.meta))
            .map_err(mem_err)?;
        self.mem
            .write_obj(STATUS_UNWRITTEN, GuestAddress(s.meta + META_STATUS))
            .map_err(mem_err)?;
        let header = DriverBuffer {
            addr: s.meta,
            len: 16,
            writable: false,
        };
        let data = DriverBuffer {
            addr: s.data,
            len,
            writable: op.device_writes_data(),
        };
        let status = DriverBuffer {
            addr: s.meta + META_STATUS,
            len: 1,
            writable: true,
        };
        let with_data = [header, data, status];
        let without_data = [header, status];
        let bufs: &[DriverBuffer] = if op.has_data() {
            &with_data
        } else {
            &without_data
        };
        let id = if self.indirect {
            self.driver
                .add_indirect_chain(&self.mem, s.meta + META_INDIRECT, bufs)
        } else {
            self.driver.add_chain(&self.mem, bufs)
        }
        .map_err(|source| FrontendError::Driver {
            queue: index,
            source,
        })?;
        if let Some(e) = self.id_to_slot.get_mut(usize::from(id)) {
            *e = slot;
        }
        if let Some(st) = self.slots.get_mut(usize::from(slot)) {
            st.op = op;
            st.sector = sector;
            st.len = len;
            st.user = user;
            st.submitted = Instant::now();
        }
        self.stats.submitted += 1;
        Ok(())
    }

    /// Notifies the device of the chains made available since the last kick, if it asked
    /// for it (`needs_kick`: used-ring flags, avail_event, or packed event suppression).
    /// Returns whether it kicked.
    pub fn kick(&mut self) -> Result<bool, FrontendError> {
        let index = self.index;
        let needed = self
            .driver
            .needs_kick(&self.mem)
            .map_err(|source| FrontendError::Driver {
                queue: index,
                source,
            })?;
        if needed {
            self.kick
                .write(1)
                .map_err(|e| FrontendError::io(format!("queue {index}: kick"), e))?;
            self.stats.kicks += 1;
        } else {
            self.stats.kicks_suppressed += 1;
        }
        Ok(needed)
    }

    /// Takes every used buffer the device returned so far, appending to `out`. Returns how
    /// many. Slots are freed (their data stays readable until reallocated).
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> Result<usize, FrontendError> {
        let index = self.index;
        let mut n = 0;
        let mut now = None;
        while let Some((id, used_len)) =
            self.driver
                .pop_used(&self.mem)
                .map_err(|source| FrontendError::Driver {
                    queue: index,
                    source,
                })?
        {
            let slot_idx = self
                .id_to_slot
                .get_mut(usize::from(id))
                .map(|e| std::mem::replace(e, NO_SLOT))
                .unwrap_or(NO_SLOT);
            let Some(slot) = self.slots.get_mut(usize::from(slot_idx)) else {
                return Err(FrontendError::Protocol(format!(
                    "queue {index}: the device returned id {id}, which maps to no request"
                )));
            };
            let status: u8 = self
                .mem
                .read_obj(GuestAddress(slot.meta + META_STATUS))
                .map_err(|e| FrontendError::Memory(format!("reading status: {e}")))?;
            let t = *now.get_or_insert_with(Instant::now);
            out.push(Completion {
                slot: slot_idx,
                op: slot.op,
                sector: slot.sector,
                len: slot.len,
                status,
                used_len,
                latency: t.saturating_duration_since(slot.submitted),
                user: slot.user,
            });
            slot.busy = false;
            self.free.push(slot_idx);
            self.stats.completed += 1;
            n += 1;
        }
        Ok(n)
    }

    /// Waits until at least one request completes (or none is in flight) and takes the
    /// completions like [`BlkQueue::poll`]. In [`CompletionMode::Interrupt`] it re-enables
    /// interrupts, re-checks the ring, and sleeps on the call eventfd; in
    /// [`CompletionMode::Poll`] it spins. Fails with [`FrontendError::Timeout`] after the
    /// frontend's timeout without progress.
    pub fn wait(&mut self, out: &mut Vec<Completion>) -> Result<usize, FrontendError> {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let n = self.poll(out)?;
            if n > 0 || self.in_flight() == 0 {
                return Ok(n);
            }
            match self.mode {
                CompletionMode::Poll => {
                    std::hint::spin_loop();
                    spins = spins.wrapping_add(1);
                    if spins % 4096 == 0 && start.elapsed() > self.timeout {
                        return Err(self.timeout_error());
                    }
                }
                CompletionMode::Interrupt => {
                    let index = self.index;
                    let drv = |source| FrontendError::Driver {
                        queue: index,
                        source,
                    };
                    self.driver
                        .enable_interrupts(&self.mem, None)
                        .map_err(drv)?;
                    // The interrupt request must be visible before the re-check of the
                    // used ring (the device does the mirror image).
                    fence(Ordering::SeqCst);
                    let n = self.poll(out)?;
                    if n > 0 {
                        self.driver.disable_interrupts(&self.mem).map_err(drv)?;
                        return Ok(n);
                    }
                    let left = self.timeout.saturating_sub(start.elapsed());
                    if left.is_zero() {
                        return Err(self.timeout_error());
                    }
                    self.stats.sleeps += 1;
                    self.sleep_on_call(left)?;
                    self.driver.disable_interrupts(&self.mem).map_err(drv)?;
                }
            }
        }
    }

    /// Waits until every request in flight has completed, appending the completions.
    pub fn drain(&mut self, out: &mut Vec<Completion>) -> Result<(), FrontendError> {
        while self.in_flight() > 0 {
            self.wait(out)?;
        }
        Ok(())
    }

    fn sleep_on_call(&mut self, max: Duration) -> Result<(), FrontendError> {
        super::sleep_on_call(&self.call, self.index, max)
    }

    fn timeout_error(&self) -> FrontendError {
        FrontendError::Timeout {
            queue: self.index,
            in_flight: self.in_flight(),
            waited: self.timeout,
        }
    }
}
