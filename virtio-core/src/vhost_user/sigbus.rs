// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Surviving a frontend that shrinks the file behind guest memory.
//!
//! Guest memory is the frontend's file (memfd, /dev/shm, hugetlbfs) mapped shared. If the
//! frontend truncates it after SET_MEM_TABLE, the next access to a page past the new end
//! raises SIGBUS, which kills the whole daemon. Refusing unsealed memory is not an option
//! (QEMU's memory-backend-memfd seals by default, but memory-backend-file, user-mode
//! Linux's memory file and DPDK's memory are not sealed), so instead:
//!
//! - every guest memory (and inflight area) mapping is entered in a fixed-size,
//!   lock-free registry ([`Registration`]) for its lifetime;
//! - a process-wide SIGBUS handler, installed once ([`install`], by `Server::new`), looks
//!   the faulting address up in the registry. Inside a registered mapping, it replaces
//!   the whole mapping with anonymous zero pages (`MAP_FIXED`), marks the mapping
//!   poisoned and bumps a global epoch: the faulting access then completes (reading
//!   zeros; writes go nowhere the guest sees). Anywhere else, it hands the signal to the
//!   handler that was installed before it (Rust's stack-overflow handler, or the default
//!   action, which kills the process as before);
//! - queue workers compare the epoch after each round of events (one atomic load, not
//!   per descriptor); on a change they check whether their memory is poisoned, break
//!   their queues (logged, DEVICE_NEEDS_RESET, error fd) and wake the connection, which
//!   closes: the frontend's memory is no longer shared with the daemon, nothing of that
//!   connection can be trusted any more. Other connections are unaffected.
//!
//! The handler only uses async-signal-safe operations: atomics, `mmap`, `sigaction`.
//! A registration is removed before its mapping is unmapped, and a fault can only hit a
//! mapping that is alive (the faulting thread holds a reference to it), so the handler
//! never remaps memory that is no longer ours.

use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::memory::GuestMemoryView;

/// Mappings the registry holds at once (a memory table has at most 509 regions; several
/// servers may run in one process).
const SLOTS: usize = 2048;

struct Slot {
    /// Claimed by a registration.
    used: AtomicBool,
    /// Seqlock: odd while `start`/`len` are being written.
    seq: AtomicUsize,
    start: AtomicUsize,
    len: AtomicUsize,
    poisoned: AtomicBool,
}

impl Slot {
    const fn new() -> Self {
        Slot {
            used: AtomicBool::new(false),
            seq: AtomicUsize::new(0),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            poisoned: AtomicBool::new(false),
        }
    }

    fn write(&self, start: usize, len: usize) {
        self.seq.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::Release);
        self.start.store(start, Ordering::Relaxed);
        self.len.store(len, Ordering::Relaxed);
        self.poisoned.store(false, Ordering::Relaxed);
        self.seq.fetch_add(1, Ordering::Release);
    }

    /// A consistent (start, len), or `None` if free or being written.
    fn read(&self) -> Option<(usize, usize)> {
        let s1 = self.seq.load(Ordering::Acquire);
        if s1 % 2 == 1 || !self.used.load(Ordering::Acquire) {
            return None;
        }
        let start = self.start.load(Ordering::Relaxed);
        let len = self.len.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        let s2 = self.seq.load(Ordering::Relaxed);
        (s1 == s2 && len != 0).then_some((start, len))
    }
}

static REGISTRY: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];
static EPOCH: AtomicU64 = AtomicU64::new(0);

/// A mapping entered in the registry; removed on drop (drop it before unmapping).
#[derive(Debug)]
pub(crate) struct Registration(usize);

impl Registration {
    /// Registers `start..start + len`. `None` if the registry is full (logged: a SIGBUS
    /// in that mapping then kills the process, as it would without the registry).
    pub fn new(start: *mut libc::c_void, len: usize) -> Option<Self> {
        for (i, slot) in REGISTRY.iter().enumerate() {
            if slot
                .used
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                slot.write(start as usize, len);
                return Some(Registration(i));
            }
        }
        log::error!(
            "the guest memory registry is full ({SLOTS} mappings): a frontend truncating this \
             mapping's file would kill the daemon"
        );
        None
    }

    /// True once a SIGBUS replaced this mapping with anonymous memory.
    pub fn poisoned(&self) -> bool {
        REGISTRY[self.0].poisoned.load(Ordering::Acquire)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let slot = &REGISTRY[self.0];
        slot.write(0, 0);
        slot.used.store(false, Ordering::Release);
    }
}

/// Changes every time a mapping is poisoned: compare it cheaply, then look closer.
#[inline]
pub(crate) fn epoch() -> u64 {
    EPOCH.load(Ordering::Acquire)
}

/// True if a host range of `view` lies in a poisoned mapping.
pub(crate) fn view_poisoned(view: &GuestMemoryView) -> bool {
    view.regions()
        .iter()
        .any(|r| address_poisoned(r.host as usize))
}

/// True if `addr` lies in a registered, poisoned mapping.
pub(crate) fn address_poisoned(addr: usize) -> bool {
    REGISTRY.iter().any(|s| {
        s.poisoned.load(Ordering::Acquire)
            && s.read()
                .is_some_and(|(start, len)| addr >= start && addr - start < len)
    })
}

/// Registered mappings marked poisoned (for tests).
#[cfg(all(test, feature = "driver"))]
pub(crate) fn poisoned_count() -> usize {
    REGISTRY
        .iter()
        .filter(|s| s.poisoned.load(Ordering::Acquire) && s.read().is_some())
        .count()
}

/// The SIGBUS action in place before ours.
struct Previous(libc::sigaction);

// SAFETY: a plain C struct of function pointers and flags, written once before the
// handler is installed and only read afterwards.
unsafe impl Sync for Previous {}
// SAFETY: as above.
unsafe impl Send for Previous {}

static PREVIOUS: OnceLock<Previous> = OnceLock::new();

/// Installs the process-wide SIGBUS handler (once; later calls do nothing).
pub(crate) fn install() {
    PREVIOUS.get_or_init(|| {
        // SAFETY: all-zero is a valid `sigaction` (SIG_DFL, no flags, empty mask).
        let mut prev: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            on_sigbus;
        act.sa_sigaction = handler as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: `act.sa_mask` is a valid sigset to initialise.
        unsafe { libc::sigemptyset(&mut act.sa_mask) };
        // SAFETY: valid pointers to a new action and an out-parameter for the old one. The
        // handler is async-signal-safe (see the module documentation). PREVIOUS is being
        // initialised here: a SIGBUS before `get_or_init` returns finds it empty and
        // falls back to the default action, which is what `prev` holds at worst.
        if unsafe { libc::sigaction(libc::SIGBUS, &act, &mut prev) } != 0 {
            log::error!(
                "installing the SIGBUS handler failed: {}; a frontend truncating guest \
                 memory would kill the daemon",
                std::io::Error::last_os_error()
            );
        }
        Previous(prev)
    });
}

/// Replaces the registered mapping holding `addr` with anonymous memory.
fn poison(addr: usize) -> bool {
    for slot in REGISTRY.iter() {
        let Some((start, len)) = slot.read() else {
            continue;
        };
        if addr < start || addr - start >= len {
            continue;
        }
        // SAFETY: `start..start + len` is a live mapping this process owns (registered
        // while mapped; a fault in it means a thread is using it, so it is not being
        // unmapped). Replacing it in place with private anonymous memory of the same
        // size keeps every pointer into it valid.
        let r = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if r == libc::MAP_FAILED {
            return false;
        }
        slot.poisoned.store(true, Ordering::Release);
        EPOCH.fetch_add(1, Ordering::AcqRel);
        return true;
    }
    false
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    if poison(addr) {
        return;
    }
    // Not guest memory: what would have happened without us.
    match PREVIOUS.get().map(|p| p.0) {
        Some(prev) if prev.sa_sigaction != libc::SIG_DFL && prev.sa_sigaction != libc::SIG_IGN => {
            if prev.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed with SA_SIGINFO, so it has
                // this signature; it gets the arguments the kernel gave us.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(prev.sa_sigaction) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a handler installed without SA_SIGINFO takes the signal number.
                let f: extern "C" fn(libc::c_int) =
                    unsafe { std::mem::transmute(prev.sa_sigaction) };
                f(sig);
            }
        }
        _ => {
            // Restore the default action and return: the access faults again and the
            // process dies with SIGBUS, as it would have without this handler.
            // SAFETY: all-zero is SIG_DFL with no flags; sigaction is async-signal-safe.
            let mut dfl: libc::sigaction = unsafe { std::mem::zeroed() };
            dfl.sa_sigaction = libc::SIG_DFL;
            // SAFETY: valid pointer to a new action; the old one is not wanted.
            unsafe { libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut()) };
        }
    }
}
