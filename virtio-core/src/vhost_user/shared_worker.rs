// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`WorkerThread`]: one thread that runs the queue workers of several queue groups,
//! of one connection or of several, instead of a thread each.
//!
//! Each hosted worker keeps everything a worker thread of its own has (its epoll set,
//! its handler, its command channel, its stop and drain deadlines); the shared thread
//! waits on all their epoll sets at once (an epoll set is itself pollable) and runs one
//! round of each worker whose set is ready or whose deadline is due. A device picks it
//! with [`crate::vhost_user::Device::worker_thread`] when its queues hand data to each
//! other: a switch whose ports are separate connections then forwards a frame from one
//! guest's transmit ring to another's receive ring on one core, with the frame still in
//! that core's cache and no cross-thread wake-up.
//!
//! A hosted handler must never block (no handler does: every fd is non-blocking), since
//! the other workers of the thread wait while it runs. A handler that panics ends its own
//! worker (logged; its connection sees the worker gone, as with a worker thread of its
//! own that panics), not the thread nor the other workers.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use super::error::{Error, Result};

/// What the shared thread needs of a worker (implemented by the queue worker).
pub(crate) trait HostedWorker: Send {
    /// The name a worker thread of its own would have had (for log lines).
    fn name(&self) -> &str;
    /// The worker's epoll set, readable while it has events to handle.
    fn epoll_fd(&self) -> RawFd;
    /// How long the worker may wait: -1 for no deadline, 0 if it has work now.
    fn timeout_ms(&self) -> i32;
    /// One round without waiting; true when the worker is done.
    fn step(&mut self) -> bool;
    /// Releases the handler of a done worker.
    fn finish(&mut self);
}

/// The epoll token of the thread's own wake-up eventfd; worker `i` has token `i + 1`.
const TOKEN_WAKE: u64 = 0;
/// A round of one worker longer than this is logged: the thread's other workers waited.
const SLOW_ROUND: Duration = Duration::from_millis(100);

/// A thread shared by the queue workers of several queue groups (see the module
/// documentation). Created by a daemon and handed to its devices, which return it from
/// [`crate::vhost_user::Device::worker_thread`]; the thread ends once the last handle is
/// dropped and every worker it hosts has stopped.
///
/// ```
/// use virtio_core::vhost_user::WorkerThread;
///
/// let thread = WorkerThread::new("switch")?;
/// assert_eq!(thread.workers(), 0);
/// # Ok::<(), virtio_core::vhost_user::Error>(())
/// ```
#[derive(Debug)]
pub struct WorkerThread {
    name: String,
    adopt: Mutex<Sender<Box<dyn HostedWorker>>>,
    wake: EventFd,
    workers: Arc<AtomicUsize>,
}

impl WorkerThread {
    /// Starts the thread, named `name`.
    pub fn new(name: &str) -> Result<Arc<WorkerThread>> {
        let os = |what| move |source| Error::Os { what, source };
        let wake = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)
            .map_err(os("creating a shared worker eventfd"))?;
        let thread_wake = wake
            .try_clone()
            .map_err(os("cloning a shared worker eventfd"))?;
        let epoll_fd = super::worker::epoll_watching(
            &thread_wake,
            TOKEN_WAKE,
            "creating a shared worker epoll set",
        )?;
        let (tx, rx) = mpsc::channel();
        let workers = Arc::new(AtomicUsize::new(0));
        let host = Host {
            name: name.to_owned(),
            epoll: epoll_fd,
            wake: thread_wake,
            rx,
            workers: Vec::new(),
            count: workers.clone(),
        };
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || host.run())
            .map_err(os("spawning a shared worker thread"))?;
        Ok(Arc::new(WorkerThread {
            name: name.to_owned(),
            adopt: Mutex::new(tx),
            wake,
            workers,
        }))
    }

    /// Workers the thread runs now.
    pub fn workers(&self) -> usize {
        self.workers.load(Ordering::Relaxed)
    }

    /// Hands a worker to the thread.
    pub(crate) fn adopt(&self, worker: Box<dyn HostedWorker>) -> Result<()> {
        let name = worker.name().to_owned();
        // Counted before the thread can see it (and count it out again).
        self.workers.fetch_add(1, Ordering::Relaxed);
        let sent = self
            .adopt
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(worker);
        if sent.is_err() {
            self.workers.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::Os {
                what: "handing a queue worker to a shared thread",
                source: io::Error::other(format!("shared worker thread {} is gone", self.name)),
            });
        }
        log::debug!("queue worker {name} runs on shared thread {}", self.name);
        self.wake.write(1).map_err(|source| Error::Os {
            what: "waking a shared worker thread",
            source,
        })
    }
}

impl Drop for WorkerThread {
    fn drop(&mut self) {
        // The thread sees its channel closed when it wakes, and ends once its workers
        // are done (each stops when its connection stops it).
        let _ = self.wake.write(1);
    }
}

/// The thread's side.
struct Host {
    name: String,
    epoll: OwnedFd,
    wake: EventFd,
    rx: Receiver<Box<dyn HostedWorker>>,
    workers: Vec<Option<Box<dyn HostedWorker>>>,
    count: Arc<AtomicUsize>,
}

impl Host {
    fn run(mut self) {
        let mut events = vec![epoll::Event::new(epoll::Events::empty(), 0); 64];
        let mut ready: Vec<bool> = Vec::new();
        let mut open = true;
        loop {
            open = open && self.adopt_new();
            if !open && self.workers.iter().all(Option::is_none) {
                break;
            }
            let timeout = self
                .workers
                .iter()
                .flatten()
                .map(|w| w.timeout_ms())
                .filter(|&t| t >= 0)
                .min()
                .unwrap_or(-1);
            let n = match epoll::wait(self.epoll.as_raw_fd(), timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Run every worker: each one's own epoll_wait reports what is ready,
                    // and the sleep bounds the loop until the error clears.
                    log::error!("shared worker thread {}: epoll_wait failed: {e}", self.name);
                    std::thread::sleep(Duration::from_millis(10));
                    ready.clear();
                    ready.resize(self.workers.len(), true);
                    self.run_workers(&ready);
                    continue;
                }
            };
            ready.clear();
            ready.resize(self.workers.len(), false);
            for ev in events.iter().take(n) {
                let token = ev.data;
                if token == TOKEN_WAKE {
                    let _ = self.wake.read();
                } else if let Some(r) = usize::try_from(token - 1)
                    .ok()
                    .and_then(|i| ready.get_mut(i))
                {
                    *r = true;
                }
            }
            self.run_workers(&ready);
        }
        log::debug!("shared worker thread {} exits", self.name);
    }

    /// Takes the workers handed over; false once every handle is gone.
    fn adopt_new(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(w) => self.add(w),
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn add(&mut self, w: Box<dyn HostedWorker>) {
        let i = match self.workers.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.workers.push(None);
                self.workers.len() - 1
            }
        };
        let token = u64::try_from(i).unwrap_or(u64::MAX - 1) + 1;
        if let Err(e) = epoll::ctl(
            self.epoll.as_raw_fd(),
            epoll::ControlOptions::EPOLL_CTL_ADD,
            w.epoll_fd(),
            epoll::Event::new(epoll::Events::EPOLLIN, token),
        ) {
            // Dropping the worker tells its connection it is gone.
            log::error!(
                "shared worker thread {}: cannot watch queue worker {}: {e}; dropping it",
                self.name,
                w.name()
            );
            self.count.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        self.workers[i] = Some(w);
    }

    fn run_workers(&mut self, ready: &[bool]) {
        for i in 0..self.workers.len() {
            let Some(w) = self.workers[i].as_mut() else {
                continue;
            };
            if !ready.get(i).copied().unwrap_or(false) && w.timeout_ms() != 0 {
                continue;
            }
            let started = Instant::now();
            let r = catch_unwind(AssertUnwindSafe(|| w.step()));
            let took = started.elapsed();
            if took > SLOW_ROUND {
                // The other workers of the thread waited that long: say who held it.
                log::warn!(
                    "queue worker {} held shared thread {} for {took:?}",
                    w.name(),
                    self.name
                );
            }
            match r {
                Ok(false) => {}
                Ok(true) => {
                    if catch_unwind(AssertUnwindSafe(|| w.finish())).is_err() {
                        log::error!("queue worker {} panicked while stopping", w.name());
                    }
                    self.remove(i);
                }
                Err(_) => {
                    log::error!(
                        "queue worker {} panicked; its queues stop (shared thread {} goes on)",
                        w.name(),
                        self.name
                    );
                    self.remove(i);
                }
            }
        }
    }

    fn remove(&mut self, i: usize) {
        if let Some(w) = self.workers.get_mut(i).and_then(Option::take) {
            // Fails only if the fd is already gone; nothing to undo then.
            let _ = epoll::ctl(
                self.epoll.as_raw_fd(),
                epoll::ControlOptions::EPOLL_CTL_DEL,
                w.epoll_fd(),
                epoll::Event::new(epoll::Events::empty(), 0),
            );
            self.count.fetch_sub(1, Ordering::Relaxed);
            // A handler whose drop panics must not take the other workers along.
            if catch_unwind(AssertUnwindSafe(move || drop(w))).is_err() {
                log::error!("a queue worker panicked while being dropped");
            }
        }
    }
}
