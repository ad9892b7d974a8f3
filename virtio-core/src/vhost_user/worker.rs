// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Queue workers: each serves a group of queues (one [`QueueHandler`]) with its own epoll
//! set over the queues' kick eventfds, the handler's event sources and a command eventfd.
//! A worker runs on a thread of its own, or on a [`WorkerThread`] shared with other
//! workers (of other groups or other connections), which runs a round of each worker
//! whose epoll set is ready.
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

use super::device::{Events, Interest, Processed, QueueContext, QueueHandler, Vring};
use super::error::{DeviceError, Error, Result};
use super::notify_fd::{Drained, NotifyFd};
use super::poll::{PollPolicy, Poller};
use super::shared_worker::{HostedWorker, WorkerThread};
use super::sigbus;
use crate::memory::GuestMemoryView;

/// A started queue, as handed to its worker.
pub(crate) struct ActiveQueue {
    pub vring: Vring,
    pub kick: NotifyFd,
    pub context: QueueContext,
}

/// Control operations sent to a worker.
pub(crate) enum Command {
    /// Start serving a queue in group slot `slot`.
    Start {
        slot: usize,
        queue: Box<ActiveQueue>,
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
pub(crate) struct WorkerHandle {
    id: usize,
    tx: Sender<Command>,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
    /// Disconnected when the thread ends (its sender is dropped as `run` returns or
    /// unwinds): lets [`Self::join`] wait with a bound.
    done: Receiver<()>,
}

impl WorkerHandle {
    /// Starts worker `id` serving `group_size` queue slots with `handler`: on a thread of
    /// its own, or, with `host`, on that shared thread next to other workers.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn<H: QueueHandler>(
        id: usize,
        name: String,
        group_size: usize,
        handler: H,
        settings: WorkerSettings,
        needs_reset: Arc<AtomicBool>,
        alarm: Arc<EventFd>,
        host: Option<&WorkerThread>,
    ) -> Result<Self> {
        let os = |what| move |source| Error::Os { what, source };
        let wake =
            EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(os("creating a worker eventfd"))?;
        let worker_wake = wake.try_clone().map_err(os("cloning a worker eventfd"))?;
        let epoll_fd = epoll_watching(&worker_wake, TOKEN_COMMAND, "creating a worker epoll set")?;
        let (tx, rx) = mpsc::channel();
        let mut slots = Vec::with_capacity(group_size);
        slots.resize_with(group_size, || None);
        let registry = Registry {
            epoll: epoll_fd.as_raw_fd(),
            sources: Vec::new(),
            worker: id,
        };
        let worker = Worker {
            id,
            handler: Some(handler),
            registry,
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
        let thread = match host {
            None => Some(
                std::thread::Builder::new()
                    .name(name)
                    .spawn(move || {
                        let _done = done_tx;
                        worker.run();
                    })
                    .map_err(os("spawning a queue worker thread"))?,
            ),
            Some(host) => {
                host.adopt(Box::new(Hosted {
                    worker,
                    name,
                    events: vec![epoll::Event::new(epoll::Events::empty(), 0); 64],
                    _done: done_tx,
                }))?;
                None
            }
        };
        Ok(WorkerHandle {
            id,
            tx,
            wake,
            thread,
            done,
        })
    }

    /// Sends a command and wakes the worker.
    pub fn send(&self, cmd: Command) -> Result<()> {
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

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        // Wakes the worker to see its channel closed (after `join`, it is gone already
        // and this does nothing).
        let _ = self.wake.write(1);
    }
}

/// A new epoll set watching `wake` (readable) under `token`; `what` says what creating
/// it was for, in errors.
pub(crate) fn epoll_watching(wake: &EventFd, token: u64, what: &'static str) -> Result<OwnedFd> {
    let raw = epoll::create(true).map_err(|source| Error::Os { what, source })?;
    // SAFETY: `raw` is a fresh epoll descriptor nobody else owns.
    let epoll_fd = unsafe { OwnedFd::from_raw_fd(raw) };
    epoll::ctl(
        epoll_fd.as_raw_fd(),
        epoll::ControlOptions::EPOLL_CTL_ADD,
        wake.as_raw_fd(),
        epoll::Event::new(epoll::Events::EPOLLIN, token),
    )
    .map_err(|source| Error::Os {
        what: "adding a wake-up eventfd to a worker epoll set",
        source,
    })?;
    Ok(epoll_fd)
}

const TOKEN_COMMAND: u64 = 0;
const KIND_KICK: u64 = 1;
/// A handler's event source; the token is in the low 32 bits.
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

fn event_token(token: u32) -> u64 {
    (KIND_EVENT << 16) | (u64::from(token) << 32)
}

fn epoll_events(interest: Interest) -> epoll::Events {
    let mut ev = epoll::Events::empty();
    if interest.readable {
        ev |= epoll::Events::EPOLLIN | epoll::Events::EPOLLRDHUP;
    }
    if interest.writable {
        ev |= epoll::Events::EPOLLOUT;
    }
    if interest.edge {
        ev |= epoll::Events::EPOLLET;
    }
    ev
}

/// A handler's registered event sources.
pub(crate) struct Registry {
    epoll: RawFd,
    sources: Vec<Source>,
    worker: usize,
}

#[derive(Clone, Copy, Debug)]
struct Source {
    token: u32,
    fd: RawFd,
}

impl Registry {
    fn find(&self, token: u32) -> Option<usize> {
        self.sources.iter().position(|s| s.token == token)
    }

    fn register(&mut self, fd: RawFd, interest: Interest, token: u32) -> io::Result<()> {
        if self.find(token).is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("event source token {token} is already registered"),
            ));
        }
        epoll::ctl(
            self.epoll,
            epoll::ControlOptions::EPOLL_CTL_ADD,
            fd,
            epoll::Event::new(epoll_events(interest), event_token(token)),
        )?;
        self.sources.push(Source { token, fd });
        Ok(())
    }

    fn reregister(&mut self, token: u32, interest: Interest) -> io::Result<()> {
        let i = self.find(token).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("event source token {token} is not registered"),
            )
        })?;
        epoll::ctl(
            self.epoll,
            epoll::ControlOptions::EPOLL_CTL_MOD,
            self.sources[i].fd,
            epoll::Event::new(epoll_events(interest), event_token(token)),
        )
    }

    fn unregister(&mut self, token: u32) -> bool {
        match self.find(token) {
            Some(i) => {
                let src = self.sources.swap_remove(i);
                epoll_del(self.epoll, src.fd);
                true
            }
            None => false,
        }
    }

    fn fd_of(&self, token: u32) -> Option<RawFd> {
        self.find(token).map(|i| self.sources[i].fd)
    }

    fn clear(&mut self) {
        for src in self.sources.drain(..) {
            epoll_del(self.epoll, src.fd);
        }
    }
}

/// What a [`QueueHandler`] sees of its worker: the group's vrings, its event sources and
/// the worker's scheduling. See [`QueueHandler`].
pub struct GroupContext<'a> {
    slots: &'a mut [Option<Slot>],
    registry: &'a mut Registry,
}

impl std::fmt::Debug for GroupContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupContext")
            .field("queues", &self.queues().collect::<Vec<_>>())
            .field("sources", &self.registry.sources.len())
            .finish()
    }
}

impl GroupContext<'_> {
    fn slot(&mut self, queue: u16) -> Option<&mut Slot> {
        self.slots
            .iter_mut()
            .flatten()
            .find(|s| s.vring.index() == queue)
    }

    /// The vring of `queue`, if it belongs to this group and is running (or stopping:
    /// completions of a draining ring are still returned through it).
    pub fn vring(&mut self, queue: u16) -> Option<&mut Vring> {
        self.slot(queue).map(|s| &mut s.vring)
    }

    /// The group's queues that are running or stopping.
    pub fn queues(&self) -> impl Iterator<Item = u16> + '_ {
        self.slots.iter().flatten().map(|s| s.vring.index())
    }

    /// Whether `queue` is running (not stopping, not broken) and enabled.
    pub fn is_active(&mut self, queue: u16) -> bool {
        self.slot(queue)
            .is_some_and(|s| matches!(s.state, State::Running) && !s.broken && s.vring.enabled())
    }

    /// Watches `fd` for `interest`; [`QueueHandler::handle_event`] gets `token`. The
    /// handler keeps `fd` open while registered (the worker never closes it).
    pub fn register(&mut self, fd: RawFd, interest: Interest, token: u32) -> io::Result<()> {
        self.registry.register(fd, interest, token)
    }

    /// Changes what source `token` is watched for: pause it with [`Interest::PAUSED`],
    /// resume it, or wait for writability.
    pub fn reregister(&mut self, token: u32, interest: Interest) -> io::Result<()> {
        self.registry.reregister(token, interest)
    }

    /// Stops watching source `token`. Returns false if it was not registered.
    pub fn unregister(&mut self, token: u32) -> bool {
        self.registry.unregister(token)
    }

    /// Asks for [`QueueHandler::process`] on `queue` soon (in this worker round), e.g.
    /// after an event freed the resources a throttled queue waited for.
    pub fn schedule(&mut self, queue: u16) {
        if let Some(s) = self.slot(queue) {
            s.kicked = true;
            s.throttled = false;
        }
    }

    /// Waits for the driver to make buffers available on `queue` (a net RX queue with a
    /// packet to deliver and no buffer): turns notifications on and re-checks the ring,
    /// closing the race with a driver that added buffers before it saw them on. Returns
    /// true if buffers are available now (go on popping); else the next kick calls
    /// [`QueueHandler::process`] on `queue`. No busy waiting, no lost wake-up.
    pub fn wait_for_buffers(&mut self, queue: u16) -> crate::Result<bool> {
        let Some(s) = self.slot(queue) else {
            return Ok(false);
        };
        s.throttled = false;
        s.poll_deadline = None;
        s.vring.queue_mut().enable_notification()
    }
}

enum State {
    Running,
    Stopping {
        deadline: Instant,
        reply: Option<Sender<Option<u32>>>,
    },
}

pub(crate) struct Slot {
    vring: Vring,
    kick: NotifyFd,
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
    /// The group's handler (taken only while the thread ends).
    handler: Option<H>,
    registry: Registry,
    epoll: OwnedFd,
    wake: EventFd,
    rx: Receiver<Command>,
    slots: Vec<Option<Slot>>,
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
/// A ring whose `process` round popped more chains than this is throughput-bound, and
/// does not busy-poll.
const POLL_BATCH_MAX: u32 = 4;

fn break_slot(needs_reset: &AtomicBool, s: &mut Slot, e: &DeviceError) {
    if !s.broken {
        // After a SIGBUS the ring reads zeros: name the cause, not its symptom.
        // (Slow path: a break is rare, and `epoch` is 0 until a SIGBUS was caught.)
        let poisoned = sigbus::epoch() != 0 && sigbus::view_poisoned(s.vring.memory());
        log::error!(
            "queue {}: {}; the queue is stopped until the device is reset",
            s.vring.index(),
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
    s.vring.set_broken();
    needs_reset.store(true, Ordering::Release);
    s.vring.notify_error();
}

/// Signals every driver of the group that has returned chains waiting for a signal.
fn signal_all(slots: &mut [Option<Slot>]) {
    for s in slots.iter_mut().flatten() {
        s.vring.signal_used();
    }
}

/// A worker run by a [`WorkerThread`] rather than a thread of its own.
struct Hosted<H> {
    worker: Worker<H>,
    name: String,
    events: Vec<epoll::Event>,
    /// Dropped with the worker: tells [`WorkerHandle::join`] it is gone.
    _done: Sender<()>,
}

impl<H: QueueHandler> HostedWorker for Hosted<H> {
    fn name(&self) -> &str {
        &self.name
    }

    fn epoll_fd(&self) -> RawFd {
        self.worker.epoll.as_raw_fd()
    }

    fn timeout_ms(&self) -> i32 {
        self.worker.timeout_ms()
    }

    fn step(&mut self) -> bool {
        // The shared thread waited on this worker's epoll set (or a deadline of it
        // passed): take what is ready without waiting again.
        self.worker.step(0, &mut self.events)
    }

    fn finish(&mut self) {
        self.worker.finish();
    }
}

impl<H: QueueHandler> Worker<H> {
    fn run(mut self) {
        let mut events = vec![epoll::Event::new(epoll::Events::empty(), 0); 64];
        loop {
            let timeout = self.timeout_ms();
            if self.step(timeout, &mut events) {
                break;
            }
        }
        self.finish();
    }

    /// One round: waits up to `timeout` ms for events, handles them, runs the due
    /// queues and advances stopping ones. Returns true when the worker is done (asked to
    /// exit and every queue stopped); [`Self::finish`] comes next.
    fn step(&mut self, timeout: i32, events: &mut [epoll::Event]) -> bool {
        let n = match epoll::wait(self.epoll.as_raw_fd(), timeout, events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return false,
            Err(e) => {
                log::error!(
                    "queue worker {}: epoll_wait failed: {e}; stopping its queues",
                    self.id
                );
                self.begin_exit();
                // Bounded: the stopping queues' drain deadline ends the worker.
                std::thread::sleep(Duration::from_millis(10));
                0
            }
        };
        for ev in events.iter().take(n) {
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
        self.exiting && self.slots.iter().all(Option::is_none)
    }

    /// Releases the handler once the worker is done.
    fn finish(&mut self) {
        // The handler's sources leave the epoll set before the handler (and its fds)
        // goes.
        self.registry.clear();
        drop(self.handler.take());
        log::debug!("queue worker {} exits", self.id);
    }

    fn timeout_ms(&self) -> i32 {
        let mut timeout: Option<Duration> = None;
        let now = Instant::now();
        for s in self.slots.iter().flatten() {
            let due = match &s.state {
                State::Running if s.kicked && s.vring.enabled() && !s.broken => {
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
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => self.command(cmd),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        // The connection dropped its handle without `join`: nobody can
                        // stop this worker any more, so it stops by itself (bounded by
                        // the drain timeout) rather than live on, on its thread or on a
                        // shared one.
                        if !self.exiting {
                            log::warn!(
                                "queue worker {}: its connection is gone; stopping",
                                self.id
                            );
                            self.begin_exit();
                        }
                        break;
                    }
                }
            }
            return;
        }
        let (kind, slot, _) = untoken(data);
        if kind == KIND_EVENT {
            let token = u32::try_from(data >> 32).unwrap_or(u32::MAX);
            return self.handler_event(token, events);
        }
        let epoll = self.epoll.as_raw_fd();
        let Some(Some(s)) = self.slots.get_mut(slot) else {
            return;
        };
        // Rule: a kick, call or error fd that reports hang-up or error (or EOF) breaks
        // its queue and leaves the epoll set, so a level-triggered hang-up cannot keep the
        // worker spinning.
        match kind {
            KIND_KICK => {
                let why = if hung_up(events) {
                    Some("the kick fd reported hang-up or error".to_string())
                } else {
                    match s.kick.drain() {
                        Ok(Drained::Open) => None,
                        Ok(Drained::HungUp) => Some("the kick fd reached end of file".into()),
                        Err(e) => Some(format!("reading the kick fd failed: {e}")),
                    }
                };
                match why {
                    None => s.kicked = true,
                    Some(why) => {
                        epoll_del(epoll, s.kick.as_raw_fd());
                        s.kick_watched = false;
                        break_slot(&self.needs_reset, s, &DeviceError::Other(why));
                    }
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
                    let _ = s.vring.set_call(None);
                    "call"
                } else {
                    if let Some(fd) = s.err_watched.take() {
                        epoll_del(epoll, fd);
                    }
                    s.vring.set_err(None);
                    "error"
                };
                let why = format!("the {what} fd reported hang-up or error; it is closed");
                break_slot(&self.needs_reset, s, &DeviceError::Other(why));
            }
            KIND_CALL | KIND_ERR => {}
            _ => log::warn!("queue worker {}: unknown epoll token {data:#x}", self.id),
        }
    }

    /// Delivers an event of the handler's source `token`.
    fn handler_event(&mut self, token: u32, events: u32) {
        let Worker {
            handler,
            slots,
            registry,
            needs_reset,
            ..
        } = self;
        let Some(h) = handler.as_mut() else {
            return;
        };
        let fd = registry.fd_of(token);
        if fd.is_none() {
            // Unregistered earlier in this epoll batch.
            return;
        }
        let ev = Events {
            readable: events & libc::EPOLLIN as u32 != 0,
            writable: events & libc::EPOLLOUT as u32 != 0,
            hangup: events & (libc::EPOLLHUP | libc::EPOLLRDHUP) as u32 != 0,
            error: events & libc::EPOLLERR as u32 != 0,
        };
        let r = h.handle_event(&mut GroupContext { slots, registry }, token, ev);
        if let Err(e) = r {
            for s in slots.iter_mut().flatten() {
                break_slot(needs_reset, s, &e);
            }
        }
        if hung_up(events) && registry.fd_of(token) == fd {
            // A level-triggered hang-up would wake the worker again at once.
            registry.unregister(token);
            log::debug!(
                "queue worker {}: event source {token} hung up; it is no longer watched",
                registry.worker
            );
        }
        let now = Instant::now();
        for s in slots.iter_mut().flatten() {
            if s.throttled {
                // An event may have freed what a throttled queue waited for.
                s.kicked = true;
            } else if s.poller.enabled()
                && matches!(s.state, State::Running)
                && s.vring.enabled()
                && !s.broken
                && s.vring.has_unsignalled_used()
                && s.vring.in_flight() == 0
            {
                // The last completions go back to the driver now: its next request
                // usually follows within its reaction time, so poll for it
                // (notifications off) if recent gaps were short. With requests still in
                // flight their completions wake the worker anyway: no poll.
                let window = s.poller.arm(now);
                if !window.is_zero() {
                    s.vring.queue_mut().disable_notification();
                    s.poll_deadline = Some(now + window);
                }
            }
        }
        signal_all(slots);
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

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Start { slot, queue, reply } => {
                let r = self.start(slot, *queue);
                let _ = reply.send(r);
            }
            Command::Stop { slot, reply } => {
                let deadline = Instant::now() + self.settings.drain_timeout;
                if matches!(self.slots.get(slot), Some(Some(_))) {
                    self.begin_stop(slot, deadline, Some(reply));
                } else {
                    let _ = reply.send(None);
                }
            }
            Command::SetMemory { memory, reply } => {
                for s in self.slots.iter_mut().flatten() {
                    if let Err(e) = s.vring.set_memory(memory.clone()) {
                        break_slot(&self.needs_reset, s, &DeviceError::Queue(e));
                        continue;
                    }
                    s.kicked = true;
                }
                if let Some(h) = self.handler.as_mut() {
                    h.memory_changed(&memory);
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
                    if s.vring.set_call(fd) {
                        s.vring.notify_driver();
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
                    s.vring.set_err(fd);
                } else if let Some(w) = watched {
                    epoll_del(epoll, w);
                }
            }
            Command::SetEnabled { slot, enabled } => {
                if let Some(Some(s)) = self.slots.get_mut(slot) {
                    s.vring.set_enabled(enabled);
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
        for i in 0..self.slots.len() {
            if matches!(
                self.slots[i],
                Some(Slot {
                    state: State::Running,
                    ..
                })
            ) {
                self.begin_stop(i, deadline, None);
            }
        }
    }

    fn start(&mut self, slot: usize, q: ActiveQueue) -> io::Result<()> {
        if slot >= self.slots.len() || self.slots[slot].is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("worker slot {slot} is busy or out of range"),
            ));
        }
        let ActiveQueue {
            vring,
            kick,
            context,
        } = q;
        self.epoll_add(kick.as_raw_fd(), token(KIND_KICK, slot, 0))?;
        let call_watched = self.watch_notify_fd(vring.call_fd(), KIND_CALL, slot);
        let err_watched = self.watch_notify_fd(vring.err_fd(), KIND_ERR, slot);
        self.slots[slot] = Some(Slot {
            vring,
            kick,
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
        let Worker {
            handler,
            slots,
            registry,
            needs_reset,
            ..
        } = self;
        if let Some(h) = handler.as_mut() {
            let r = h.queue_started(&mut GroupContext { slots, registry }, &context);
            if let (Err(e), Some(Some(s))) = (r, slots.get_mut(slot)) {
                break_slot(needs_reset, s, &e);
            }
        }
        Ok(())
    }

    fn begin_stop(&mut self, i: usize, deadline: Instant, reply: Option<Sender<Option<u32>>>) {
        let Worker {
            handler,
            slots,
            registry,
            needs_reset,
            ..
        } = self;
        let Some(Some(s)) = slots.get_mut(i) else {
            return;
        };
        if let State::Stopping { reply: r, .. } = &mut s.state {
            if reply.is_some() {
                *r = reply;
            }
            return;
        }
        s.state = State::Stopping { deadline, reply };
        s.poll_deadline = None;
        let queue = s.vring.index();
        let unreachable = s.vring.unreachable_in_flight();
        if unreachable > 0 {
            log::warn!(
                "queue {queue}: {unreachable} chains counted in flight by the restored ring base \
                 were never popped by this backend; not waiting for them"
            );
        }
        if let Some(h) = handler.as_mut() {
            if let Err(e) = h.drain(&mut GroupContext { slots, registry }, queue) {
                log::error!("queue {queue}: draining failed: {e}");
                needs_reset.store(true, Ordering::Release);
            }
        }
        signal_all(slots);
    }

    fn finish_stopping(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            let done = match &self.slots[i] {
                Some(Slot {
                    state: State::Stopping { deadline, .. },
                    vring,
                    ..
                }) => {
                    let in_flight = vring.awaited_in_flight();
                    if in_flight > 0 && now >= *deadline {
                        log::error!(
                            "queue {}: {in_flight} requests still in flight after {:?}; stopping the ring anyway \
                             (their chains are not returned to the driver)",
                            vring.index(),
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
                self.epoll_del(s.kick.as_raw_fd());
            }
            for fd in [s.call_watched, s.err_watched].into_iter().flatten() {
                self.epoll_del(fd);
            }
            let queue = s.vring.index();
            let base = s.vring.queue().vring_base();
            let reply = match s.state {
                State::Stopping { reply, .. } => reply,
                State::Running => None,
            };
            log::debug!("queue {queue}: stopped at base {base:#x}");
            drop(s.vring);
            // The handler releases the queue's resources before the ring is reported
            // stopped.
            let Worker {
                handler,
                slots,
                registry,
                ..
            } = self;
            if let Some(h) = handler.as_mut() {
                h.queue_stopped(&mut GroupContext { slots, registry }, queue);
            }
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
            if sigbus::view_poisoned(s.vring.memory()) {
                let e = DeviceError::Other(
                    "the frontend shrank the file behind guest memory (SIGBUS caught; the \
                     mapping is now anonymous memory)"
                        .into(),
                );
                break_slot(&self.needs_reset, s, &e);
            }
        }
        if let Err(e) = self.alarm.write(1) {
            log::error!(
                "queue worker {}: waking the connection failed: {e}",
                self.id
            );
        }
    }

    fn run_queues(&mut self) {
        let polling = self.settings.poll != PollPolicy::Off;
        for i in 0..self.slots.len() {
            let now = if polling { Some(Instant::now()) } else { None };
            let Some(s) = self.slots[i].as_mut() else {
                continue;
            };
            if !matches!(s.state, State::Running) || s.broken {
                continue;
            }
            if !s.vring.enabled() {
                s.kicked = false;
                s.poll_deadline = None;
                continue;
            }
            if s.kicked {
                self.process(i);
            } else if let (Some(deadline), Some(now)) = (s.poll_deadline, now) {
                match s.vring.has_available() {
                    Ok(true) if !s.throttled => self.process(i),
                    Ok(_) if now >= deadline => {
                        s.poll_deadline = None;
                        match s.vring.queue_mut().enable_notification() {
                            Ok(true) => self.process(i),
                            Ok(false) => {}
                            Err(e) => break_slot(&self.needs_reset, s, &DeviceError::Queue(e)),
                        }
                    }
                    Ok(_) => {}
                    Err(e) => break_slot(&self.needs_reset, s, &DeviceError::Queue(e)),
                }
            }
        }
        signal_all(&mut self.slots);
    }

    /// Processes queue slot `i` until its ring is empty with notifications re-enabled
    /// (or, when busy polling, until the next poll check), or the handler is throttled.
    fn process(&mut self, i: usize) {
        let Worker {
            handler,
            slots,
            registry,
            needs_reset,
            ..
        } = self;
        let Some(h) = handler.as_mut() else {
            return;
        };
        let queue = match slots.get_mut(i) {
            Some(Some(s)) => {
                s.kicked = false;
                if s.poller.enabled() {
                    s.poller.observe(Instant::now());
                }
                s.vring.index()
            }
            _ => return,
        };
        for _ in 0..MAX_ROUNDS {
            if let Some(Some(s)) = slots.get_mut(i) {
                s.vring.queue_mut().disable_notification();
            }
            let r = h.process(&mut GroupContext { slots, registry }, queue);
            signal_all(slots);
            let Some(Some(s)) = slots.get_mut(i) else {
                return;
            };
            match r {
                Err(e) => return break_slot(needs_reset, s, &e),
                Ok(_) if s.vring.queue().is_broken() => {
                    return break_slot(
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
            // Poll only a latency-bound ring: one with nothing in flight (else the
            // completions wake the worker, and the next request follows them) whose
            // driver sends a few requests at a time (a deep queue is throughput-bound:
            // its requests come in batches, and polling would only cost CPU).
            let popped = s.vring.take_popped();
            if s.poller.enabled() && s.vring.in_flight() == 0 && popped <= POLL_BATCH_MAX {
                let now = Instant::now();
                let window = s.poller.arm(now);
                if !window.is_zero() {
                    s.poll_deadline = Some(now + window);
                    return;
                }
            }
            // Re-enable notifications, then re-check: buffers made available before the
            // driver saw notifications on would otherwise come with no kick.
            match s.vring.queue_mut().enable_notification() {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => return break_slot(needs_reset, s, &DeviceError::Queue(e)),
            }
        }
        // Still busy: let the other queues of this worker run, come back next round.
        if let Some(Some(s)) = slots.get_mut(i) {
            s.kicked = true;
        }
    }
}
