//! Queue worker threads: each serves a group of queues with its own epoll set over the
//! queues' kick eventfds, their handlers' event fds and a command eventfd.
//!
//! The hot path (kick → pop → process → add_used → signal) touches only state owned by
//! the worker: no lock, no allocation. The connection thread talks to a worker through a
//! channel plus an eventfd, only for control operations (start, stop, memory change,
//! call/err fd change, enable).

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
use super::notify_fd::{Drained, NotifyFd};
use super::poll::{PollPolicy, Poller};
use super::sigbus;
use crate::memory::GuestMemoryView;

/// A started queue, as handed to its worker.
pub(crate) struct ActiveQueue<H> {
    pub vring: Vring,
    pub handler: H,
    pub kick: NotifyFd,
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
    SetCall { slot: usize, fd: Option<NotifyFd> },
    /// Replace the error eventfd of a queue.
    SetErr { slot: usize, fd: Option<NotifyFd> },
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
    /// Disconnected when the thread ends (its sender is dropped as `run` returns or
    /// unwinds): lets [`Self::join`] wait with a bound.
    done: Receiver<()>,
}

impl<H: QueueHandler> WorkerHandle<H> {
    /// Starts worker `id` serving `group_size` queue slots.
    pub fn spawn(
        id: usize,
        name: String,
        group_size: usize,
        settings: WorkerSettings,
        needs_reset: Arc<AtomicBool>,
        alarm: Arc<EventFd>,
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
            alarm,
            seen_epoch: sigbus::epoch(),
            exiting: false,
        };
        let (done_tx, done) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let _done = done_tx;
                worker.run();
            })
            .map_err(os("spawning a queue worker thread"))?;
        Ok(WorkerHandle {
            id,
            tx,
            wake,
            thread: Some(thread),
            done,
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

    /// Asks the worker to stop its queues and waits up to `limit` for the thread to end.
    /// A worker still running then is logged and left behind (detached): it owns only this
    /// connection's queues and memory, and must not keep the daemon from serving the next
    /// frontend or from stopping. Returns false in that case.
    pub fn join(mut self, limit: Duration) -> bool {
        if self.send(Command::Exit).is_err() {
            log::warn!("queue worker {} was already gone", self.id);
        }
        match self.done.recv_timeout(limit) {
            Err(mpsc::RecvTimeoutError::Timeout) => {
                log::error!(
                    "queue worker {} did not exit within {limit:?}; leaving it behind",
                    self.id
                );
                return false;
            }
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {}
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("queue worker {} panicked", self.id);
            }
        }
        true
    }
}

const TOKEN_COMMAND: u64 = 0;
const KIND_KICK: u64 = 1;
const KIND_EVENT: u64 = 2;
/// A call fd, watched (with no event asked) only for hang-up and error.
const KIND_CALL: u64 = 3;
/// An error fd, watched the same way.
const KIND_ERR: u64 = 4;

/// Hang-up or error on a watched descriptor (always reported by epoll).
fn hung_up(events: u32) -> bool {
    events & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
}

/// Whether `fd` reports hang-up or error now (slow path: re-checks a hang-up event, which
/// may have come from a call or error fd replaced earlier in the same epoll batch).
fn fd_hung_up(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    };
    // SAFETY: one live pollfd for the duration of the call; zero timeout.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r > 0 && p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

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

fn epoll_del(epoll: RawFd, fd: RawFd) {
    let _ = epoll::ctl(
        epoll,
        epoll::ControlOptions::EPOLL_CTL_DEL,
        fd,
        epoll::Event::new(epoll::Events::empty(), 0),
    );
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
    /// The handler's event fds still in the epoll set (-1: removed after a hang-up).
    handler_fds: Vec<RawFd>,
    /// The kick fd is in the epoll set.
    kick_watched: bool,
    /// The call and error fds registered in the epoll set (for hang-up).
    call_watched: Option<RawFd>,
    err_watched: Option<RawFd>,
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
    /// Written to wake the connection when guest memory was found poisoned.
    alarm: Arc<EventFd>,
    /// `sigbus::epoch()` when last checked.
    seen_epoch: u64,
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
                let (data, flags) = (ev.data, ev.events);
                self.dispatch(data, flags);
            }
            self.run_queues();
            // One atomic load per round; a closer look only after a SIGBUS somewhere.
            let epoch = sigbus::epoch();
            if epoch != self.seen_epoch {
                self.seen_epoch = epoch;
                self.check_poisoned_memory();
            }
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

    fn dispatch(&mut self, data: u64, events: u32) {
        if data == TOKEN_COMMAND {
            let _ = self.wake.read();
            while let Ok(cmd) = self.rx.try_recv() {
                self.command(cmd);
            }
            return;
        }
        let (kind, slot, fd_index) = untoken(data);
        let epoll = self.epoll.as_raw_fd();
        let Some(Some(s)) = self.slots.get_mut(slot) else {
            return;
        };
        // Rule: a kick, call, error or handler fd that reports hang-up or error (or EOF)
        // breaks its queue and leaves the epoll set, so a level-triggered hang-up cannot
        // keep the worker spinning.
        match kind {
            KIND_KICK => {
                let why = if hung_up(events) {
                    Some("the kick fd reported hang-up or error".to_string())
                } else {
                    match s.q.kick.drain() {
                        Ok(Drained::Open) => None,
                        Ok(Drained::HungUp) => Some("the kick fd reached end of file".into()),
                        Err(e) => Some(format!("reading the kick fd failed: {e}")),
                    }
                };
                match why {
                    None => s.kicked = true,
                    Some(why) => {
                        epoll_del(epoll, s.q.kick.as_raw_fd());
                        s.kick_watched = false;
                        Self::break_queue(&self.needs_reset, s, &DeviceError::Other(why));
                    }
                }
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
                if hung_up(events) {
                    if let Some(fd) = s.handler_fds.get_mut(fd_index) {
                        epoll_del(epoll, *fd);
                        *fd = -1;
                    }
                    let why =
                        format!("the handler's event fd {fd_index} reported hang-up or error");
                    Self::break_queue(&self.needs_reset, s, &DeviceError::Other(why));
                }
            }
            KIND_CALL | KIND_ERR if hung_up(events) => {
                let current = if kind == KIND_CALL {
                    s.call_watched
                } else {
                    s.err_watched
                };
                if !current.is_some_and(fd_hung_up) {
                    return;
                }
                let what = if kind == KIND_CALL {
                    if let Some(fd) = s.call_watched.take() {
                        epoll_del(epoll, fd);
                    }
                    let _ = s.q.vring.set_call(None);
                    "call"
                } else {
                    if let Some(fd) = s.err_watched.take() {
                        epoll_del(epoll, fd);
                    }
                    s.q.vring.set_err(None);
                    "error"
                };
                let why = format!("the {what} fd reported hang-up or error; it is closed");
                Self::break_queue(&self.needs_reset, s, &DeviceError::Other(why));
            }
            KIND_CALL | KIND_ERR => {}
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
        epoll_del(self.epoll.as_raw_fd(), fd);
    }

    /// Watches a call or error fd for hang-up and error only (no event asked: a call
    /// fd's readiness belongs to the frontend). `None` if it cannot be watched (e.g. a
    /// regular file): it is then simply not watched.
    fn watch_notify_fd(&self, fd: Option<RawFd>, kind: u64, slot: usize) -> Option<RawFd> {
        let fd = fd?;
        let ev = epoll::Event::new(epoll::Events::empty(), token(kind, slot, 0));
        match epoll::ctl(
            self.epoll.as_raw_fd(),
            epoll::ControlOptions::EPOLL_CTL_ADD,
            fd,
            ev,
        ) {
            Ok(()) => Some(fd),
            Err(e) => {
                log::debug!(
                    "queue worker {}: not watching a notification fd: {e}",
                    self.id
                );
                None
            }
        }
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
                let raw = fd.as_ref().map(AsRawFd::as_raw_fd);
                let watched = self.watch_notify_fd(raw, KIND_CALL, slot);
                let epoll = self.epoll.as_raw_fd();
                if let Some(Some(s)) = self.slots.get_mut(slot) {
                    if let Some(old) = std::mem::replace(&mut s.call_watched, watched) {
                        epoll_del(epoll, old);
                    }
                    // Notifications due while there was no call fd were lost: signal
                    // once when one arrives.
                    if s.q.vring.set_call(fd) {
                        s.q.vring.notify_driver();
                    }
                } else if let Some(w) = watched {
                    epoll_del(epoll, w);
                }
            }
            Command::SetErr { slot, fd } => {
                let raw = fd.as_ref().map(AsRawFd::as_raw_fd);
                let watched = self.watch_notify_fd(raw, KIND_ERR, slot);
                let epoll = self.epoll.as_raw_fd();
                if let Some(Some(s)) = self.slots.get_mut(slot) {
                    if let Some(old) = std::mem::replace(&mut s.err_watched, watched) {
                        epoll_del(epoll, old);
                    }
                    s.q.vring.set_err(fd);
                } else if let Some(w) = watched {
                    epoll_del(epoll, w);
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
        let call_watched = self.watch_notify_fd(q.vring.call_fd(), KIND_CALL, slot);
        let err_watched = self.watch_notify_fd(q.vring.err_fd(), KIND_ERR, slot);
        self.slots[slot] = Some(Slot {
            q,
            handler_fds,
            kick_watched: true,
            call_watched,
            err_watched,
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
        let unreachable = s.q.vring.unreachable_in_flight();
        if unreachable > 0 {
            log::warn!(
                "queue {}: {unreachable} chains counted in flight by the restored ring base were \
                 never popped by this backend; not waiting for them",
                s.q.vring.index()
            );
        }
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
                    let in_flight = q.vring.awaited_in_flight();
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
            // Explicitly: the connection holds duplicates of these descriptors, so closing
            // ours does not take them out of the epoll set.
            if s.kick_watched {
                self.epoll_del(s.q.kick.as_raw_fd());
            }
            for &fd in s.handler_fds.iter().filter(|&&fd| fd >= 0) {
                self.epoll_del(fd);
            }
            for fd in [s.call_watched, s.err_watched].into_iter().flatten() {
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

    /// A guest memory mapping somewhere was replaced after a SIGBUS: break the queues
    /// whose memory it is, and wake the connection (which checks its own mappings, the
    /// inflight area included, and closes).
    fn check_poisoned_memory(&mut self) {
        for s in self.slots.iter_mut().flatten() {
            if sigbus::view_poisoned(s.q.vring.memory()) {
                let e = DeviceError::Other(
                    "the frontend shrank the file behind guest memory (SIGBUS caught; the \
                     mapping is now anonymous memory)"
                        .into(),
                );
                Self::break_queue(&self.needs_reset, s, &e);
            }
        }
        if let Err(e) = self.alarm.write(1) {
            log::error!(
                "queue worker {}: waking the connection failed: {e}",
                self.id
            );
        }
    }

    fn break_queue(needs_reset: &AtomicBool, s: &mut Slot<H>, e: &DeviceError) {
        if !s.broken {
            // After a SIGBUS the ring reads zeros: name the cause, not its symptom.
            // (Slow path: a break is rare, and `epoch` is 0 until a SIGBUS was caught.)
            let poisoned = sigbus::epoch() != 0 && sigbus::view_poisoned(s.q.vring.memory());
            log::error!(
                "queue {}: {}; the queue is stopped until the device is reset",
                s.q.vring.index(),
                if poisoned {
                    "the frontend shrank the file behind guest memory (SIGBUS caught; the mapping \
                     is now anonymous memory)"
                        .to_string()
                } else {
                    e.to_string()
                }
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
