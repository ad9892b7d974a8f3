//! Queue worker threads: each serves a group of queues with its own epoll set over the
//! queues' kick eventfds, their handlers' event fds and a command eventfd.
//!
//! The hot path (kick → pop → process → add_used → signal) touches only state owned by
//! the worker: no lock, no allocation. The connection thread talks to a worker through a
//! channel plus an eventfd, only for control operations (start, stop, memory change,
//! call/err fd change, enable).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use super::device::{Processed, QueueHandler, Vring};
use super::error::{DeviceError, Error, Result};
use super::poll::{PollPolicy, Poller};
use crate::memory::GuestMemoryView;

/// A started queue, as handed to its worker.
pub(crate) struct ActiveQueue<H> {
    pub vring: Vring,
    pub handler: H,
    pub kick: File,
}

/// Control operations sent to a worker.
pub(crate) enum Command<H> {
    /// Start serving a queue in group slot `slot`.
    Start {
        slot: usize,
        queue: Box<ActiveQueue<H>>,
        reply: Sender<io::Result<()>>,
    },
    /// Stop the queue in `slot` once its in-flight chains completed; reply its ring base.
    Stop {
        slot: usize,
        reply: Sender<Option<u32>>,
    },
    /// Switch every queue to a new memory table.
    SetMemory {
        memory: Arc<GuestMemoryView>,
        reply: Sender<()>,
    },
    /// Replace the call eventfd of a queue.
    SetCall { slot: usize, fd: Option<File> },
    /// Replace the error eventfd of a queue.
    SetErr { slot: usize, fd: Option<File> },
    /// Enable or disable a queue.
    SetEnabled { slot: usize, enabled: bool },
    /// Stop every queue (draining) and end the thread.
    Exit,
}

/// Worker tuning.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WorkerSettings {
    /// How long to busy-poll the rings after the last work before sleeping.
    pub poll: PollPolicy,
    /// How long a stopping ring waits for in-flight chains.
    pub drain_timeout: Duration,
}

/// The connection's handle on a worker thread.
pub(crate) struct WorkerHandle<H> {
    id: usize,
    tx: Sender<Command<H>>,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl<H: QueueHandler> WorkerHandle<H> {
    /// Starts worker `id` serving `group_size` queue slots.
    pub fn spawn(
        id: usize,
        name: String,
        group_size: usize,
        settings: WorkerSettings,
        needs_reset: Arc<AtomicBool>,
    ) -> Result<Self> {
        let os = |what| move |source| Error::Os { what, source };
        let wake =
            EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(os("creating a worker eventfd"))?;
        let worker_wake = wake.try_clone().map_err(os("cloning a worker eventfd"))?;
        let raw = epoll::create(true).map_err(os("creating a worker epoll set"))?;
        // SAFETY: `raw` is a fresh epoll descriptor nobody else owns.
        let epoll_fd = unsafe { OwnedFd::from_raw_fd(raw) };
        epoll::ctl(
            epoll_fd.as_raw_fd(),
            epoll::ControlOptions::EPOLL_CTL_ADD,
            worker_wake.as_raw_fd(),
            epoll::Event::new(epoll::Events::EPOLLIN, TOKEN_COMMAND),
        )
        .map_err(os("adding the command eventfd to the worker epoll set"))?;
        let (tx, rx) = mpsc::channel();
        let mut slots = Vec::with_capacity(group_size);
        slots.resize_with(group_size, || None);
        let worker = Worker {
            id,
            epoll: epoll_fd,
            wake: worker_wake,
            rx,
            slots,
            settings,
            needs_reset,
            exiting: false,
        };
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || worker.run())
            .map_err(os("spawning a queue worker thread"))?;
        Ok(WorkerHandle {
            id,
            tx,
            wake,
            thread: Some(thread),
        })
    }

    /// Sends a command and wakes the worker.
    pub fn send(&self, cmd: Command<H>) -> Result<()> {
        self.tx.send(cmd).map_err(|_| Error::WorkerGone(self.id))?;
        self.wake.write(1).map_err(|source| Error::Os {
            what: "waking a queue worker",
            source,
        })
    }

    /// Asks the worker to stop its queues and waits for the thread to end.
    pub fn join(mut self) {
        if self.send(Command::Exit).is_err() {
            log::warn!("queue worker {} was already gone", self.id);
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("queue worker {} panicked", self.id);
            }
        }
    }
}

const TOKEN_COMMAND: u64 = 0;
const KIND_KICK: u64 = 1;
const KIND_EVENT: u64 = 2;

fn token(kind: u64, slot: usize, fd_index: usize) -> u64 {
    (kind << 16) | slot as u64 | ((fd_index as u64) << 32)
}

fn untoken(t: u64) -> (u64, usize, usize) {
    (
        (t >> 16) & 0xffff,
        (t & 0xffff) as usize,
        (t >> 32) as usize,
    )
}

enum State {
    Running,
    Stopping {
        deadline: Instant,
        reply: Option<Sender<Option<u32>>>,
    },
}

struct Slot<H> {
    q: ActiveQueue<H>,
    handler_fds: Vec<RawFd>,
    state: State,
    /// Kicked (or otherwise due) and not processed yet.
    kicked: bool,
    /// The handler returned `Processed::Throttled`.
    throttled: bool,
    broken: bool,
    /// Busy-polling until then, with notifications off.
    poll_deadline: Option<Instant>,
    /// The ring's poll window.
    poller: Poller,
}

struct Worker<H> {
    id: usize,
    epoll: OwnedFd,
    wake: EventFd,
    rx: Receiver<Command<H>>,
    slots: Vec<Option<Slot<H>>>,
    settings: WorkerSettings,
    needs_reset: Arc<AtomicBool>,
    exiting: bool,
}

/// Rounds of `process` one queue gets before the worker looks at its other queues.
const MAX_ROUNDS: usize = 8;

impl<H: QueueHandler> Worker<H> {
    fn run(mut self) {
        let mut events = vec![epoll::Event::new(epoll::Events::empty(), 0); 64];
        loop {
            let timeout = self.timeout_ms();
            let n = match epoll::wait(self.epoll.as_raw_fd(), timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!(
                        "queue worker {}: epoll_wait failed: {e}; stopping its queues",
                        self.id
                    );
                    self.begin_exit();
                    std::thread::sleep(Duration::from_millis(10));
                    0
                }
            };
            for ev in &events[..n] {
                let data = ev.data;
                self.dispatch(data);
            }
            self.run_queues();
            self.finish_stopping();
            if self.exiting && self.slots.iter().all(Option::is_none) {
                break;
            }
        }
        log::debug!("queue worker {} exits", self.id);
    }

    fn timeout_ms(&self) -> i32 {
        let mut timeout: Option<Duration> = None;
        let now = Instant::now();
        for s in self.slots.iter().flatten() {
            let due = match &s.state {
                State::Running if s.kicked && s.q.vring.enabled() && !s.broken => {
                    Some(Duration::ZERO)
                }
                State::Running => s.poll_deadline.map(|_| Duration::ZERO),
                State::Stopping { deadline, .. } => Some(deadline.saturating_duration_since(now)),
            };
            if let Some(d) = due {
                timeout = Some(timeout.map_or(d, |t| t.min(d)));
            }
        }
        match timeout {
            None => -1,
            // Round up so a deadline is not missed by a truncated wait.
            Some(d) => i32::try_from(d.as_micros().div_ceil(1000)).unwrap_or(i32::MAX),
        }
    }

    fn dispatch(&mut self, data: u64) {
        if data == TOKEN_COMMAND {
            let _ = self.wake.read();
            while let Ok(cmd) = self.rx.try_recv() {
                self.command(cmd);
            }
            return;
        }
        let (kind, slot, fd_index) = untoken(data);
        let Some(Some(s)) = self.slots.get_mut(slot) else {
            return;
        };
        match kind {
            KIND_KICK => {
                let mut v = [0u8; 8];
                // SAFETY: reads at most 8 bytes into a live local buffer from an eventfd
                // we hold open. Failure (EAGAIN on a spurious wake-up) is harmless.
                let _ = unsafe { libc::read(s.q.kick.as_raw_fd(), v.as_mut_ptr().cast(), v.len()) };
                s.kicked = true;
            }
            KIND_EVENT => {
                if let Err(e) = s.q.handler.handle_event(fd_index, &mut s.q.vring) {
                    Self::break_queue(&self.needs_reset, s, &e);
                } else if s.throttled {
                    s.kicked = true;
                } else if s.poller.enabled()
                    && matches!(s.state, State::Running)
                    && s.q.vring.enabled()
                    && s.q.vring.has_unsignalled_used()
                {
                    // Completions go back to the driver now: its next request usually
                    // follows within its reaction time, so poll for it (notifications
                    // off) if recent gaps were short.
                    let now = Instant::now();
                    let window = s.poller.arm(now);
                    if !window.is_zero() {
                        s.q.vring.queue_mut().disable_notification();
                        s.poll_deadline = Some(now + window);
                    }
                }
                s.q.vring.signal_used();
            }
            _ => log::warn!("queue worker {}: unknown epoll token {data:#x}", self.id),
        }
    }

    fn epoll_add(&self, fd: RawFd, tok: u64) -> io::Result<()> {
        epoll::ctl(
            self.epoll.as_raw_fd(),
            epoll::ControlOptions::EPOLL_CTL_ADD,
            fd,
            epoll::Event::new(epoll::Events::EPOLLIN, tok),
        )
    }

    fn epoll_del(&self, fd: RawFd) {
        let _ = epoll::ctl(
            self.epoll.as_raw_fd(),
            epoll::ControlOptions::EPOLL_CTL_DEL,
            fd,
            epoll::Event::new(epoll::Events::empty(), 0),
        );
    }

    fn command(&mut self, cmd: Command<H>) {
        match cmd {
            Command::Start { slot, queue, reply } => {
                let r = self.start(slot, *queue);
                let _ = reply.send(r);
            }
            Command::Stop { slot, reply } => {
                let deadline = Instant::now() + self.settings.drain_timeout;
                match self.slots.get_mut(slot) {
                    Some(Some(s)) => Self::begin_stop(&self.needs_reset, s, deadline, Some(reply)),
                    _ => {
                        let _ = reply.send(None);
                    }
                }
            }
            Command::SetMemory { memory, reply } => {
                for s in self.slots.iter_mut().flatten() {
                    if let Err(e) = s.q.vring.set_memory(memory.clone()) {
                        Self::break_queue(&self.needs_reset, s, &DeviceError::Queue(e));
                        continue;
                    }
                    s.q.handler.memory_changed(&memory);
                    s.kicked = true;
                }
                let _ = reply.send(());
            }
            Command::SetCall { slot, fd } => {
                if let Some(Some(s)) = self.slots.get_mut(slot) {
                    // Notifications due while there was no call fd were lost: signal
                    // once when one arrives.
                    if s.q.vring.set_call(fd) {
                        s.q.vring.notify_driver();
                    }
                }
            }
            Command::SetErr { slot, fd } => {
                if let Some(Some(s)) = self.slots.get_mut(slot) {
                    s.q.vring.set_err(fd);
                }
            }
            Command::SetEnabled { slot, enabled } => {
                if let Some(Some(s)) = self.slots.get_mut(slot) {
                    s.q.vring.set_enabled(enabled);
                    if enabled {
                        s.kicked = true;
                    }
                }
            }
            Command::Exit => self.begin_exit(),
        }
    }

    fn begin_exit(&mut self) {
        self.exiting = true;
        let deadline = Instant::now() + self.settings.drain_timeout;
        for s in self.slots.iter_mut().flatten() {
            if matches!(s.state, State::Running) {
                Self::begin_stop(&self.needs_reset, s, deadline, None);
            }
        }
    }

    fn start(&mut self, slot: usize, q: ActiveQueue<H>) -> io::Result<()> {
        if slot >= self.slots.len() || self.slots[slot].is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("worker slot {slot} is busy or out of range"),
            ));
        }
        let handler_fds = q.handler.event_fds();
        self.epoll_add(q.kick.as_raw_fd(), token(KIND_KICK, slot, 0))?;
        for (i, &fd) in handler_fds.iter().enumerate() {
            if let Err(e) = self.epoll_add(fd, token(KIND_EVENT, slot, i)) {
                self.epoll_del(q.kick.as_raw_fd());
                for &added in &handler_fds[..i] {
                    self.epoll_del(added);
                }
                return Err(e);
            }
        }
        self.slots[slot] = Some(Slot {
            q,
            handler_fds,
            state: State::Running,
            // Look at the ring once: buffers may have been made available before the
            // kick fd was watched.
            kicked: true,
            throttled: false,
            broken: false,
            poll_deadline: None,
            poller: Poller::new(self.settings.poll),
        });
        Ok(())
    }

    fn begin_stop(
        needs_reset: &AtomicBool,
        s: &mut Slot<H>,
        deadline: Instant,
        reply: Option<Sender<Option<u32>>>,
    ) {
        if let State::Stopping { reply: r, .. } = &mut s.state {
            if reply.is_some() {
                *r = reply;
            }
            return;
        }
        s.state = State::Stopping { deadline, reply };
        s.poll_deadline = None;
        if let Err(e) = s.q.handler.drain(&mut s.q.vring) {
            log::error!("queue {}: draining failed: {e}", s.q.vring.index());
            needs_reset.store(true, Ordering::Release);
        }
        s.q.vring.signal_used();
    }

    fn finish_stopping(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            let done = match &self.slots[i] {
                Some(Slot {
                    state: State::Stopping { deadline, .. },
                    q,
                    ..
                }) => {
                    let in_flight = q.vring.in_flight();
                    if in_flight > 0 && now >= *deadline {
                        log::error!(
                            "queue {}: {in_flight} requests still in flight after {:?}; stopping the ring anyway \
                             (their chains are not returned to the driver)",
                            q.vring.index(),
                            self.settings.drain_timeout
                        );
                    }
                    in_flight == 0 || now >= *deadline
                }
                _ => false,
            };
            if !done {
                continue;
            }
            let Some(s) = self.slots[i].take() else {
                continue;
            };
            self.epoll_del(s.q.kick.as_raw_fd());
            for &fd in &s.handler_fds {
                self.epoll_del(fd);
            }
            let base = s.q.vring.queue().vring_base();
            let reply = match s.state {
                State::Stopping { reply, .. } => reply,
                State::Running => None,
            };
            log::debug!("queue {}: stopped at base {base:#x}", s.q.vring.index());
            // Drop the handler (and its resources) before reporting the ring stopped.
            drop(s.q);
            if let Some(r) = reply {
                let _ = r.send(Some(base));
            }
        }
    }

    fn break_queue(needs_reset: &AtomicBool, s: &mut Slot<H>, e: &DeviceError) {
        if !s.broken {
            log::error!(
                "queue {}: {e}; the queue is stopped until the device is reset",
                s.q.vring.index()
            );
        }
        s.broken = true;
        s.poll_deadline = None;
        s.kicked = false;
        s.q.vring.set_broken();
        needs_reset.store(true, Ordering::Release);
        s.q.vring.notify_error();
    }

    fn run_queues(&mut self) {
        let polling = self.settings.poll != PollPolicy::Off;
        let now = if polling { Some(Instant::now()) } else { None };
        for s in self.slots.iter_mut().flatten() {
            if !matches!(s.state, State::Running) || s.broken {
                continue;
            }
            if !s.q.vring.enabled() {
                s.kicked = false;
                s.poll_deadline = None;
                continue;
            }
            if s.kicked {
                Self::process(&self.needs_reset, s);
            } else if let (Some(deadline), Some(now)) = (s.poll_deadline, now) {
                match s.q.vring.has_available() {
                    Ok(true) if !s.throttled => Self::process(&self.needs_reset, s),
                    Ok(_) if now >= deadline => {
                        s.poll_deadline = None;
                        match s.q.vring.queue_mut().enable_notification() {
                            Ok(true) => Self::process(&self.needs_reset, s),
                            Ok(false) => {}
                            Err(e) => {
                                Self::break_queue(&self.needs_reset, s, &DeviceError::Queue(e))
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => Self::break_queue(&self.needs_reset, s, &DeviceError::Queue(e)),
                }
            }
            s.q.vring.signal_used();
        }
    }

    /// Processes a queue until its ring is empty with notifications re-enabled (or, when
    /// busy polling, until the next poll check), or the handler is throttled.
    fn process(needs_reset: &AtomicBool, s: &mut Slot<H>) {
        s.kicked = false;
        if s.poller.enabled() {
            s.poller.observe(Instant::now());
        }
        for _ in 0..MAX_ROUNDS {
            s.q.vring.queue_mut().disable_notification();
            let r = s.q.handler.process(&mut s.q.vring);
            s.q.vring.signal_used();
            match r {
                Err(e) => return Self::break_queue(needs_reset, s, &e),
                Ok(_) if s.q.vring.queue().is_broken() => {
                    return Self::break_queue(
                        needs_reset,
                        s,
                        &DeviceError::Other("the handler broke the queue".into()),
                    )
                }
                Ok(Processed::Throttled) => {
                    s.throttled = true;
                    s.poll_deadline = None;
                    return;
                }
                Ok(Processed::Empty) => s.throttled = false,
            }
            if s.poller.enabled() {
                let now = Instant::now();
                let window = s.poller.arm(now);
                if !window.is_zero() {
                    s.poll_deadline = Some(now + window);
                    return;
                }
            }
            // Re-enable notifications, then re-check: buffers made available before the
            // driver saw notifications on would otherwise come with no kick.
            match s.q.vring.queue_mut().enable_notification() {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => return Self::break_queue(needs_reset, s, &DeviceError::Queue(e)),
            }
        }
        // Still busy: let the other queues of this worker run, come back next round.
        s.kicked = true;
    }
}
