// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The device API for every device type: queue groups whose handler sees all their vrings,
//! waiting for buffers, and event sources registered, paused and resumed at run time.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::driver::DriverBuffer;

fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid out-array of two ints.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert_eq!(r, 0);
    // SAFETY: fresh descriptors we own.
    unsafe {
        (
            File::from(OwnedFd::from_raw_fd(fds[0])),
            File::from(OwnedFd::from_raw_fd(fds[1])),
        )
    }
}

/// Makes a chain of one writable buffer of `len` bytes at `at` available on `ring`, kicks.
fn post_rx_buffer(ring: &mut TestRing, mem: &GuestMem, at: u64, len: u32) -> u16 {
    let id = ring
        .driver
        .add_chain(
            &mem.mem,
            &[DriverBuffer {
                addr: at,
                len,
                writable: true,
            }],
        )
        .unwrap();
    ring.kick.write(1).unwrap();
    id
}

/// Waits for one used chain of `ring` and returns (id, len).
fn used(ring: &mut TestRing, mem: &GuestMem) -> (u16, u32) {
    let start = std::time::Instant::now();
    loop {
        if let Some(u) = ring.driver.pop_used(&mem.mem).unwrap() {
            return u;
        }
        assert!(start.elapsed() < TIMEOUT, "no used chain");
        std::thread::sleep(Duration::from_millis(1));
    }
}

// ---- a pair: what queue 1 (TX) receives is delivered into queue 0's (RX) buffers ----

struct PairDevice;

struct PairHandler {
    pending: Option<Vec<u8>>,
    chain: DescriptorChain,
}

impl PairHandler {
    /// Delivers the pending data into an RX buffer, or waits for one.
    fn deliver(&mut self, ctx: &mut GroupContext<'_>) -> Result<(), DeviceError> {
        while let Some(data) = self.pending.take() {
            let Some(rx) = ctx.vring(0) else {
                self.pending = Some(data);
                return Ok(());
            };
            if rx.pop_into(&mut self.chain)? {
                let n = self.chain.writer().write(&data)?;
                rx.add_used(self.chain.id(), u32::try_from(n).unwrap())?;
                return Ok(());
            }
            self.pending = Some(data);
            if !ctx.wait_for_buffers(0)? {
                // The next RX kick calls process(0).
                return Ok(());
            }
        }
        Ok(())
    }
}

impl QueueHandler for PairHandler {
    fn process(
        &mut self,
        ctx: &mut GroupContext<'_>,
        queue: u16,
    ) -> Result<Processed, DeviceError> {
        if queue == 1 {
            let Some(tx) = ctx.vring(1) else {
                return Ok(Processed::Empty);
            };
            if self.pending.is_none() && tx.pop_into(&mut self.chain)? {
                let mut data = Vec::new();
                self.chain.reader().read_to_end(&mut data)?;
                tx.add_used(self.chain.id(), 0)?;
                self.pending = Some(data);
            }
            self.deliver(ctx)?;
            // One packet in flight at a time: TX waits until it was delivered.
            return Ok(if self.pending.is_some() {
                Processed::Throttled
            } else {
                Processed::Empty
            });
        }
        self.deliver(ctx)?;
        if self.pending.is_none() {
            // TX may have waited for this delivery.
            ctx.schedule(1);
        }
        // RX buffers are left in the ring on purpose until there is data.
        Ok(Processed::Throttled)
    }
}

impl Device for PairDevice {
    type Handler = PairHandler;
    fn features(&self) -> u64 {
        VERSION_1 | RING_PACKED | EVENT_IDX | INDIRECT
    }
    fn num_queues(&self) -> u16 {
        2
    }
    fn max_queue_size(&self) -> u16 {
        256
    }
    fn queue_group(&self, _queue: u16) -> Option<u16> {
        Some(0)
    }
    fn start_group(&self, group: &GroupInfo) -> Result<PairHandler, DeviceError> {
        assert_eq!(group.queues, vec![0, 1], "one group of both queues");
        Ok(PairHandler {
            pending: None,
            chain: DescriptorChain::new(),
        })
    }
}

fn spawn<D: Device>(device: Arc<D>) -> (Frontend, JoinHandle<VuResult<()>>) {
    init_log();
    let (a, b) = UnixStream::pair().unwrap();
    let mut server = Server::new(
        FrontendSocket::Connected(b),
        device,
        ServerConfig::default(),
    )
    .unwrap();
    let t = std::thread::spawn(move || server.serve());
    (Frontend::from_stream(a, 8), t)
}

fn pair_case(layout: RingLayout) {
    let mem = default_mem();
    let (mut fe, t) = spawn(Arc::new(PairDevice));
    let extra = if layout == RingLayout::Packed {
        RING_PACKED
    } else {
        0
    };
    negotiate(&mut fe, extra, &mem);
    let mut rx = TestRing::new(0, layout, &mem);
    let mut tx = TestRing::new(1, layout, &mem);
    rx.setup(&mut fe, &mem);
    tx.setup(&mut fe, &mem);
    for round in 0..3u8 {
        let data = [b'a' + round; 100];
        // TX first: no RX buffer yet, the handler waits for one (no spin, no loss).
        let tx_id = tx.send(&mem, &data);
        assert_eq!(used(&mut tx, &mem), (tx_id, 0));
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            rx.driver.pop_used(&mem.mem).unwrap(),
            None,
            "no RX buffer yet"
        );
        // The RX buffer's kick wakes the group's handler, which delivers.
        let at = 0x9_0000 + 0x1000 * u64::from(round);
        let rx_id = post_rx_buffer(&mut rx, &mem, at, 256);
        assert_eq!(used(&mut rx, &mem), (rx_id, 100));
        let mut back = [0u8; 100];
        mem.mem.read_slice(&mut back, GuestAddress(at)).unwrap();
        assert_eq!(back, data);
    }
    drop(fe);
    t.join().unwrap().unwrap();
}

#[test]
fn queue_pair_group_delivers_tx_into_rx_buffers_posted_later_split() {
    pair_case(RingLayout::Split);
}

#[test]
fn queue_pair_group_delivers_tx_into_rx_buffers_posted_later_packed() {
    pair_case(RingLayout::Packed);
}

// ---- an event source registered at start, paused after each event, resumed on a kick ----

#[derive(Default)]
struct SourceDevice {
    /// Bytes the handler read from its pipe.
    seen: Arc<AtomicUsize>,
    /// The pipe's write end, for the test.
    writer: Mutex<Option<File>>,
}

struct SourceHandler {
    pipe: File,
    paused: bool,
    seen: Arc<AtomicUsize>,
    chain: DescriptorChain,
}

const PIPE: u32 = 7;

impl QueueHandler for SourceHandler {
    fn queue_started(
        &mut self,
        ctx: &mut GroupContext<'_>,
        _queue: &QueueContext,
    ) -> Result<(), DeviceError> {
        ctx.register(self.pipe.as_raw_fd(), Interest::READABLE, PIPE)?;
        Ok(())
    }

    fn queue_stopped(&mut self, ctx: &mut GroupContext<'_>, _queue: u16) {
        ctx.unregister(PIPE);
    }

    fn process(
        &mut self,
        ctx: &mut GroupContext<'_>,
        queue: u16,
    ) -> Result<Processed, DeviceError> {
        if self.paused {
            ctx.reregister(PIPE, Interest::READABLE)?;
            self.paused = false;
        }
        let Some(vring) = ctx.vring(queue) else {
            return Ok(Processed::Empty);
        };
        while vring.pop_into(&mut self.chain)? {
            echo(&self.chain, vring)?;
        }
        Ok(Processed::Empty)
    }

    fn handle_event(
        &mut self,
        ctx: &mut GroupContext<'_>,
        token: u32,
        events: Events,
    ) -> Result<(), DeviceError> {
        assert_eq!(token, PIPE);
        assert!(events.readable);
        let mut b = [0u8; 64];
        let mut got = 0;
        while let Ok(n) = (&self.pipe).read(&mut b) {
            if n == 0 {
                break;
            }
            got += n;
        }
        // Paused until the next kick: readable data must not wake the worker.
        ctx.reregister(PIPE, Interest::PAUSED)?;
        self.paused = true;
        // Counted once paused: a test that sees the count may write more, and must not
        // race with this loop's next read.
        self.seen.fetch_add(got, Ordering::AcqRel);
        Ok(())
    }
}

impl Device for SourceDevice {
    type Handler = SourceHandler;
    fn features(&self) -> u64 {
        VERSION_1 | EVENT_IDX | INDIRECT
    }
    fn num_queues(&self) -> u16 {
        1
    }
    fn max_queue_size(&self) -> u16 {
        256
    }
    fn start_group(&self, _group: &GroupInfo) -> Result<SourceHandler, DeviceError> {
        let (rd, wr) = pipe();
        *self.writer.lock().unwrap() = Some(wr);
        Ok(SourceHandler {
            pipe: rd,
            paused: false,
            seen: self.seen.clone(),
            chain: DescriptorChain::new(),
        })
    }
}

#[test]
fn paused_event_source_wakes_nobody_until_resumed() {
    let device = Arc::new(SourceDevice::default());
    let mem = default_mem();
    let (mut fe, t) = spawn(device.clone());
    negotiate(&mut fe, 0, &mem);
    let mut ring = TestRing::new(0, RingLayout::Split, &mem);
    ring.setup(&mut fe, &mem);
    let write = |b: &[u8]| {
        let g = device.writer.lock().unwrap();
        g.as_ref().unwrap().write_all(b).unwrap();
    };
    // A round trip first: the worker has then applied the ring's enable (which
    // processes the queue, and so would resume the source).
    let at = ring.next_buf;
    let id = ring.send(&mem, b"ready");
    ring.receive(&mem, id, b"ready", at);
    write(b"x");
    wait_until("the first byte is seen", || {
        device.seen.load(Ordering::Acquire) == 1
    });
    // Paused: more data stays unread.
    write(b"yz");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        device.seen.load(Ordering::Acquire),
        1,
        "a paused source woke the worker"
    );
    // A kick resumes it.
    let at = ring.next_buf;
    let id = ring.send(&mem, b"resume");
    ring.receive(&mem, id, b"resume", at);
    wait_until("the rest is seen after the resume", || {
        device.seen.load(Ordering::Acquire) == 3
    });
    drop(fe);
    t.join().unwrap().unwrap();
}
