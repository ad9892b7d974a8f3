// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The handler of the console's one queue group: every virtqueue (§5.3.2), the control
//! state machine (§5.3.6.2) and every port's host side, on one worker thread.
//!
//! * **receiveq** (device to driver, §5.3.6.1): host input is read into the port's
//!   [`crate::InputBuffer`] and copied into receive chains, one used element per chain with the
//!   bytes written. Receive chains are popped only when there are bytes for them, so no
//!   chain is ever held between calls (and [`QueueHandler::drain`] has none to return).
//!   With no receive buffer posted the handler asks [`GroupContext::wait_for_buffers`];
//!   the input buffer fills and the host side's input is paused (backpressure: the socket
//!   client's writes block, nothing is dropped) until the driver posts buffers.
//! * **transmitq** (driver to device): each chain's readable bytes go, in order, to the
//!   port's [`crate::PortOutput`] (host side, log, replay buffer: the guest is never
//!   stalled), and the chain is returned at once with a used length of 0.
//! * **control transmitq/receiveq** (MULTIPORT only): driver messages are decoded and
//!   fed to [`ControlState`]; its answers, host connects and disconnects (PORT_OPEN)
//!   and size changes (RESIZE) go into control receive chains, waiting for buffers when
//!   there are none.
//! * Without MULTIPORT, a size change of port 0 updates the config space (§5.3.4) and
//!   asks for a configuration change notification.
//!
//! Host sides' fds are registered with the worker with the interest they ask for
//! ([`crate::HostSide::watches`]), re-synchronised after every call into the host side. A
//! 500 ms timer polls what no fd reports (pty size changes, pty clients without a held
//! slave) and flushes replay buffers.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_core::vhost_user::{
    DeviceError, Events, GroupContext, Interest, Processed, QueueContext, QueueHandler,
};
use virtio_core::DescriptorChain;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::backend::{self, pump_input, Readiness, Watch};
use crate::config::{self, ConsoleConfigSpace, QueueRole, CONTROL_RECEIVEQ, VIRTIO_CONSOLE_F_SIZE};
use crate::control::{ControlState, DriverMessage, CONTROL_HEADER_SIZE};
use crate::device::{lock, ConsoleDevice, Port, Shared};
use crate::metrics::PortMetrics;

/// Token of the periodic timer.
const TIMER_TOKEN: u32 = u32::MAX;
/// Token of the `emerg_wr` eventfd.
const EMERG_TOKEN: u32 = u32::MAX - 1;
/// How often host sides are polled for what no fd reports.
const TICK: Duration = Duration::from_millis(500);
/// Scratch buffer for guest output and control messages (no allocation per chunk).
const SCRATCH_BYTES: usize = 4096;

/// One registered fd of a host side.
#[derive(Clone, Copy, Debug)]
struct Reg {
    fd: RawFd,
    interest: backend::Interest,
    token: u32,
    /// Registration succeeded (a regular file cannot be watched; it is not retried).
    ok: bool,
}

/// A port while a handler has it: its state plus its registered fds.
struct HostPort {
    port: Port,
    regs: Vec<Reg>,
    watches: Vec<Watch>,
    generation: u16,
}

fn worker_interest(i: backend::Interest) -> Interest {
    Interest {
        readable: i.readable,
        writable: i.writable,
        edge: false,
    }
}

impl HostPort {
    /// A token for port index `index` that no registration of the port uses: the port
    /// index in the high 16 bits, a generation in the low ones, so that a token is not
    /// reused right after the worker dropped a hung-up source.
    fn alloc_token(&mut self, index: u32) -> u32 {
        loop {
            self.generation = self.generation.wrapping_add(1);
            let token = (index << 16) | u32::from(self.generation);
            if !self.regs.iter().any(|r| r.token == token) {
                return token;
            }
        }
    }

    /// Brings the worker's registrations in line with what the host side asks for now.
    fn sync_watches(&mut self, ctx: &mut GroupContext<'_>, index: u32) {
        let Some(side) = self.port.output.side_mut() else {
            return;
        };
        side.watches(&mut self.watches);
        let mut k = 0;
        while k < self.regs.len() {
            let r = self.regs[k];
            if self.watches.iter().any(|w| w.fd == r.fd) {
                k += 1;
            } else {
                if r.ok {
                    ctx.unregister(r.token);
                }
                self.regs.swap_remove(k);
            }
        }
        for w in 0..self.watches.len() {
            let watch = self.watches[w];
            match self.regs.iter_mut().find(|r| r.fd == watch.fd) {
                Some(r) if r.interest == watch.interest => {}
                Some(r) => {
                    r.interest = watch.interest;
                    if r.ok {
                        if let Err(e) = ctx.reregister(r.token, worker_interest(watch.interest)) {
                            log::warn!(
                                "console port {}: changing the interest of fd {}: {e}",
                                self.port.id,
                                watch.fd
                            );
                        }
                    }
                }
                None => {
                    let token = self.alloc_token(index);
                    let ok = match ctx.register(watch.fd, worker_interest(watch.interest), token) {
                        Ok(()) => true,
                        Err(e) => {
                            log::warn!(
                                "console port {}: fd {} cannot be watched ({e}); it is ignored",
                                self.port.id,
                                watch.fd
                            );
                            false
                        }
                    };
                    self.regs.push(Reg {
                        fd: watch.fd,
                        interest: watch.interest,
                        token,
                        ok,
                    });
                }
            }
        }
    }
}

/// The console's queue handler (see the module documentation).
pub struct ConsoleQueues {
    ports: Vec<HostPort>,
    control: ControlState,
    multiport: bool,
    size_acked: bool,
    shared: Arc<Mutex<Shared>>,
    config: Arc<Mutex<ConsoleConfigSpace>>,
    config_changed: Option<SyncSender<()>>,
    emerg_event: Arc<EventFd>,
    timer: Option<TimerFd>,
    chain: DescriptorChain,
    scratch: Box<[u8]>,
    sources_registered: bool,
    control_errors: u64,
    /// Port names for the log (`(unnamed)` for ports without one), by port number.
    port_names: Vec<(u32, String)>,
}

impl std::fmt::Debug for ConsoleQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleQueues")
            .field("ports", &self.ports.len())
            .field("multiport", &self.multiport)
            .field("control", &self.control)
            .finish()
    }
}

impl ConsoleQueues {
    /// The handler of a new connection, owning `ports` until it is dropped.
    pub(crate) fn new(
        device: &ConsoleDevice,
        ports: Vec<Port>,
        multiport: bool,
        features: u64,
    ) -> Result<Self, DeviceError> {
        let control = match ControlState::new(device.port_configs.clone(), device.max_nr_ports) {
            Ok(c) => c,
            Err(e) => {
                lock(&device.shared).ports = Some(ports);
                return Err(DeviceError::Other(format!("console control state: {e}")));
            }
        };
        let mut handler = Self {
            ports: ports
                .into_iter()
                .map(|port| HostPort {
                    port,
                    regs: Vec::with_capacity(4),
                    watches: Vec::with_capacity(4),
                    generation: 0,
                })
                .collect(),
            control,
            multiport,
            size_acked: features & config::feature_mask(VIRTIO_CONSOLE_F_SIZE) != 0,
            shared: device.shared.clone(),
            config: device.config.clone(),
            config_changed: lock(&device.config_changed).clone(),
            emerg_event: device.emerg_event.clone(),
            timer: None,
            chain: DescriptorChain::new(),
            scratch: vec![0; SCRATCH_BYTES].into_boxed_slice(),
            sources_registered: false,
            control_errors: 0,
            port_names: device
                .port_configs
                .iter()
                .map(|c| {
                    let name = c.name.as_deref().map_or_else(
                        || "(unnamed)".to_owned(),
                        |n| String::from_utf8_lossy(n).into_owned(),
                    );
                    (c.id, name)
                })
                .collect(),
        };
        let console_size = lock(&device.config).size();
        for hp in &mut handler.ports {
            let id = hp.port.id;
            let Some(side) = hp.port.output.side_mut() else {
                continue;
            };
            let connected = side.is_connected();
            let size = side.window_size().filter(|s| s.cols != 0 && s.rows != 0);
            let size = size.or((console_size.cols != 0).then_some(console_size));
            // Recorded only: nothing is sent before the driver's PORT_READY.
            if let Err(e) = handler.control.host_connected(id, connected) {
                log::warn!("console port {id}: {e}");
            }
            if let Some(size) = size {
                if let Err(e) = handler.control.resize(id, size) {
                    log::warn!("console port {id}: {e}");
                }
            }
        }
        Ok(handler)
    }

    fn port_index(&self, id: u32) -> Option<usize> {
        self.ports.iter().position(|p| p.port.id == id)
    }

    /// Whether port `index` is served on this connection (without MULTIPORT only port 0).
    fn served(&self, index: usize) -> bool {
        self.multiport || self.ports.get(index).is_some_and(|p| p.port.id == 0)
    }

    fn register_sources(&mut self, ctx: &mut GroupContext<'_>) {
        if self.sources_registered {
            return;
        }
        self.sources_registered = true;
        match TimerFd::new().and_then(|mut t| {
            backend::set_nonblocking(t.as_raw_fd())
                .map_err(|e| vmm_sys_util::errno::Error::new(e.raw_os_error().unwrap_or(0)))?;
            t.reset(TICK, Some(TICK))?;
            Ok(t)
        }) {
            Ok(timer) => match ctx.register(timer.as_raw_fd(), Interest::READABLE, TIMER_TOKEN) {
                Ok(()) => self.timer = Some(timer),
                Err(e) => log::warn!(
                    "console: watching the poll timer: {e}; pty size changes go unnoticed"
                ),
            },
            Err(e) => {
                log::warn!("console: creating the poll timer: {e}; pty size changes go unnoticed")
            }
        }
        if let Err(e) = ctx.register(
            self.emerg_event.as_raw_fd(),
            Interest::READABLE,
            EMERG_TOKEN,
        ) {
            log::warn!("console: watching the emerg_wr eventfd: {e}");
        }
        for i in 0..self.ports.len() {
            if self.served(i) {
                self.ports[i].sync_watches(ctx, index_u32(i));
            }
        }
    }

    /// Moves host input of port `index` into its receive chains (§5.3.6.1), pausing the
    /// host side while the input buffer is full and no chain is posted.
    fn fill_rx(&mut self, ctx: &mut GroupContext<'_>, index: usize) -> Result<(), DeviceError> {
        if !self.served(index) {
            return Ok(());
        }
        let Some(hp) = self.ports.get_mut(index) else {
            return Ok(());
        };
        let queue = config::receiveq_index(hp.port.id);
        let chain = &mut self.chain;
        loop {
            if !hp.port.input.is_full() {
                let Port {
                    output,
                    input,
                    metrics,
                    ..
                } = &mut hp.port;
                if let Some(side) = output.side_mut() {
                    if let Err(e) = pump_input(side, input, metrics) {
                        log::warn!("console port {}: reading host input: {e}", hp.port.id);
                    }
                }
            }
            if hp.port.input.is_empty() {
                break;
            }
            let Some(q) = queue else { break };
            // A disabled ring (SET_VRING_ENABLE 0, user-mode Linux's teardown) or one
            // not started yet: the input waits in the buffer.
            if !ctx.is_active(q) {
                break;
            }
            let Some(vring) = ctx.vring(q) else { break };
            if !vring.pop_into(chain)? {
                if ctx.wait_for_buffers(q)? {
                    continue;
                }
                // The next kick of the receiveq calls process(); input stays paused while
                // the buffer is full.
                break;
            }
            let mut w = chain.writer();
            let (a, b) = hp.port.input.as_slices();
            let mut n = w.write(a)?;
            if n == a.len() && !b.is_empty() {
                n += w.write(b)?;
            }
            hp.port.input.consume(n);
            let len = u32::try_from(n).unwrap_or(u32::MAX);
            vring.add_used(chain.id(), len)?;
        }
        hp.sync_watches(ctx, index_u32(index));
        Ok(())
    }

    /// Takes the guest output of port `index` from its transmitq.
    fn drain_tx(
        &mut self,
        ctx: &mut GroupContext<'_>,
        index: usize,
        queue: u16,
    ) -> Result<(), DeviceError> {
        let served = self.served(index);
        let Some(vring) = ctx.vring(queue) else {
            return Ok(());
        };
        let hp = self.ports.get_mut(index);
        let chain = &mut self.chain;
        let mut hp = hp.filter(|_| served);
        while vring.pop_into(chain)? {
            let mut r = chain.reader();
            loop {
                let n = r.read(&mut self.scratch)?;
                if n == 0 {
                    break;
                }
                if let Some(hp) = hp.as_deref_mut() {
                    hp.port.output.output(&self.scratch[..n]);
                }
            }
            vring.add_used(chain.id(), 0)?;
        }
        if let Some(hp) = hp {
            hp.sync_watches(ctx, index_u32(index));
        }
        Ok(())
    }

    fn control_error(&mut self, port: Option<usize>, what: &dyn std::fmt::Display) {
        self.control_errors = self.control_errors.saturating_add(1);
        if let Some(hp) = port.and_then(|i| self.ports.get(i)) {
            PortMetrics::add(&hp.port.metrics.control_errors, 1);
        } else if let Some(hp) = self.ports.first() {
            PortMetrics::add(&hp.port.metrics.control_errors, 1);
        }
        // Every failure is logged; after the first few at debug level, so that a hostile
        // driver cannot flood the log.
        if self.control_errors <= 16 {
            log::warn!("console control: {what}");
        } else {
            log::debug!("console control: {what}");
        }
    }

    /// Logs the guest opening or closing port `id` (its PORT_OPEN, §5.3.6.2).
    fn log_guest_open(&self, id: u32, open: bool) {
        let name = self
            .port_names
            .iter()
            .find(|(i, _)| *i == id)
            .map_or("(unknown)", |(_, n)| n.as_str());
        let what = if open { "opened" } else { "closed" };
        log::info!("console port {id} ({name}): {what} by the guest");
    }

    /// Decodes the driver's control messages (§5.3.6.2).
    fn drain_control_tx(
        &mut self,
        ctx: &mut GroupContext<'_>,
        queue: u16,
    ) -> Result<(), DeviceError> {
        while let Some(vring) = ctx.vring(queue) {
            if !vring.pop_into(&mut self.chain)? {
                break;
            }
            let readable = self.chain.readable_len();
            let mut msg = [0u8; CONTROL_HEADER_SIZE + 1];
            let mut n = 0;
            let mut r = self.chain.reader();
            while n < msg.len() {
                match r.read(&mut msg[n..])? {
                    0 => break,
                    k => n += k,
                }
            }
            vring.add_used(self.chain.id(), 0)?;
            match DriverMessage::decode(&msg[..n]) {
                Ok(m) => {
                    log::debug!("console control: driver says {m:?}");
                    let was_open = match m {
                        DriverMessage::PortOpen { id, .. } => self.control.guest_open(id),
                        _ => None,
                    };
                    let handled = self.control.handle(m);
                    if let (Ok(()), DriverMessage::PortOpen { id, open }) = (&handled, m) {
                        if was_open != Some(open) {
                            self.log_guest_open(id, open);
                        }
                    }
                    if let Err(e) = handled {
                        let port = match m {
                            DriverMessage::PortReady { id, .. }
                            | DriverMessage::PortOpen { id, .. } => self.port_index(id),
                            DriverMessage::DeviceReady(_) => None,
                        };
                        self.control_error(port, &e);
                    }
                }
                Err(e) => {
                    self.control_error(None, &format_args!("{readable}-byte message refused: {e}"))
                }
            }
        }
        self.flush_control(ctx)
    }

    /// Sends queued control messages into control receive chains, waiting for buffers
    /// when there are none.
    fn flush_control(&mut self, ctx: &mut GroupContext<'_>) -> Result<(), DeviceError> {
        if !self.multiport {
            return Ok(());
        }
        while let Some(msg) = self.control.peek() {
            if !ctx.is_active(CONTROL_RECEIVEQ) {
                break;
            }
            let Some(vring) = ctx.vring(CONTROL_RECEIVEQ) else {
                break;
            };
            if !vring.pop_into(&mut self.chain)? {
                if ctx.wait_for_buffers(CONTROL_RECEIVEQ)? {
                    continue;
                }
                break;
            }
            let mut w = self.chain.writer();
            let written = match msg.encode(&mut self.scratch) {
                Ok(len) if w.available() >= len => {
                    w.write_all(&self.scratch[..len])?;
                    Ok(len)
                }
                Ok(len) => Err(format!(
                    "a {}-byte control receive buffer cannot hold {msg:?} ({len} bytes); dropped",
                    w.available()
                )),
                Err(e) => Err(format!("encoding {msg:?}: {e}")),
            };
            let id = self.chain.id();
            let used = match written {
                Ok(len) => len,
                Err(what) => {
                    self.control_error(None, &what);
                    0
                }
            };
            if let Some(vring) = ctx.vring(CONTROL_RECEIVEQ) {
                vring.add_used(id, u32::try_from(used).unwrap_or(0))?;
            }
            self.control.pop();
        }
        Ok(())
    }

    /// Collects host events of port `index` (connects, resizes), flushes kept output and
    /// moves input.
    fn host_poll(&mut self, ctx: &mut GroupContext<'_>, index: usize) -> Result<(), DeviceError> {
        if !self.served(index) {
            return Ok(());
        }
        let Some(hp) = self.ports.get_mut(index) else {
            return Ok(());
        };
        let id = hp.port.id;
        let Some(side) = hp.port.output.side_mut() else {
            return Ok(());
        };
        let events = side.take_events();
        if let Some(connected) = events.connected {
            log::info!(
                "console port {id}: host side {}",
                if connected {
                    "connected"
                } else {
                    "disconnected"
                }
            );
            if connected {
                PortMetrics::add(&hp.port.metrics.client_connects, 1);
            }
            if self.multiport {
                if let Err(e) = self.control.host_connected(id, connected) {
                    log::warn!("console port {id}: PORT_OPEN not sent: {e}");
                }
            }
        }
        if let Some(size) = events.resize {
            PortMetrics::add(&hp.port.metrics.resizes, 1);
            if self.multiport {
                if let Err(e) = self.control.resize(id, size) {
                    log::warn!("console port {id}: RESIZE not sent: {e}");
                }
            } else if id == 0 {
                let changed = {
                    let mut cfg = lock(&self.config);
                    let changed = cfg.size() != size;
                    cfg.set_size(size);
                    changed
                };
                if changed && self.size_acked {
                    if let Some(tx) = &self.config_changed {
                        // Coalesced: a full channel already has a notification queued.
                        let _ = tx.try_send(());
                    }
                }
            }
        }
        if hp.port.output.wants_flush() {
            if let Err(e) = hp.port.output.flush() {
                log::warn!("console port {id}: writing kept output: {e}");
            }
        }
        self.fill_rx(ctx, index)?;
        self.flush_control(ctx)
    }

    fn emerg_drain(&mut self) {
        if let Err(e) = self.emerg_event.read() {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                log::warn!("console: reading the emerg_wr eventfd: {e}");
            }
        }
        let n = lock(&self.shared).emerg.pop_into(&mut self.scratch);
        if let Some(hp) = self.ports.iter_mut().find(|p| p.port.id == 0) {
            hp.port.output.output(&self.scratch[..n]);
        }
    }
}

fn index_u32(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

impl QueueHandler for ConsoleQueues {
    fn queue_started(
        &mut self,
        ctx: &mut GroupContext<'_>,
        queue: &QueueContext,
    ) -> Result<(), DeviceError> {
        log::info!(
            "console queue {} ({:?}): started ({:?} ring, {} entries)",
            queue.index,
            config::queue_role(queue.index),
            queue.layout,
            queue.size
        );
        self.register_sources(ctx);
        Ok(())
    }

    fn process(
        &mut self,
        ctx: &mut GroupContext<'_>,
        queue: u16,
    ) -> Result<Processed, DeviceError> {
        match config::queue_role(queue) {
            QueueRole::Receive(id) => {
                if let Some(i) = self.port_index(id) {
                    self.fill_rx(ctx, i)?;
                }
                // Receive chains stay in the ring until there is input for them.
                Ok(Processed::Throttled)
            }
            QueueRole::Transmit(id) => {
                let index = self.port_index(id).unwrap_or(usize::MAX);
                self.drain_tx(ctx, index, queue)?;
                Ok(Processed::Empty)
            }
            QueueRole::ControlTransmit if self.multiport => {
                self.drain_control_tx(ctx, queue)?;
                Ok(Processed::Empty)
            }
            QueueRole::ControlReceive if self.multiport => {
                self.flush_control(ctx)?;
                Ok(Processed::Throttled)
            }
            // Control queues of a device without MULTIPORT: not used (§5.3.2); buffers
            // are left alone.
            QueueRole::ControlTransmit | QueueRole::ControlReceive => Ok(Processed::Throttled),
        }
    }

    fn handle_event(
        &mut self,
        ctx: &mut GroupContext<'_>,
        token: u32,
        events: Events,
    ) -> Result<(), DeviceError> {
        match token {
            TIMER_TOKEN => {
                if let Some(t) = &mut self.timer {
                    // Non-blocking: EAGAIN if the expiration was already read.
                    let _ = t.wait();
                }
                for i in 0..self.ports.len() {
                    self.host_poll(ctx, i)?;
                }
                Ok(())
            }
            EMERG_TOKEN => {
                self.emerg_drain();
                Ok(())
            }
            _ => {
                let index = (token >> 16) as usize;
                let Some(hp) = self.ports.get_mut(index) else {
                    log::debug!("console: event for unknown source {token}");
                    return Ok(());
                };
                let Some(pos) = hp.regs.iter().position(|r| r.token == token) else {
                    return Ok(());
                };
                let fd = hp.regs[pos].fd;
                let ready = Readiness {
                    readable: events.readable,
                    writable: events.writable,
                    hangup: events.hangup,
                    error: events.error,
                };
                if let Some(side) = hp.port.output.side_mut() {
                    if let Err(e) = side.on_event(fd, ready) {
                        log::warn!("console port {}: host side event: {e}", hp.port.id);
                    }
                }
                if events.hangup || events.error {
                    // The worker would drop the source after this call anyway; a fresh
                    // token is registered below if the host side still wants the fd.
                    ctx.unregister(token);
                    hp.regs.swap_remove(pos);
                }
                self.host_poll(ctx, index)
            }
        }
    }

    fn drain(&mut self, _ctx: &mut GroupContext<'_>, _queue: u16) -> Result<(), DeviceError> {
        // No chain is held between calls: receive chains are popped only with data for
        // them, and transmit and control chains are returned as soon as they are read.
        Ok(())
    }

    fn queue_stopped(&mut self, _ctx: &mut GroupContext<'_>, queue: u16) {
        log::info!("console queue {queue}: stopped");
    }
}

impl Drop for ConsoleQueues {
    /// Gives the ports back to the device, for the next connection.
    fn drop(&mut self) {
        let mut shared = lock(&self.shared);
        let n = shared.emerg.pop_into(&mut self.scratch);
        let ports: Vec<Port> = self.ports.drain(..).map(|hp| hp.port).collect();
        let mut ports = ports;
        if n > 0 {
            if let Some(p) = ports.iter_mut().find(|p| p.id == 0) {
                p.output.output(&self.scratch[..n]);
            }
        }
        shared.ports = Some(ports);
    }
}
