// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Hostile frontends: descriptors that would block or spin a worker, ring states that
//! can never drain, guest memory that disappears. Each case must end with the queue or
//! connection broken (logged), and the next frontend served promptly.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;

use super::*;

/// How soon a new frontend must be served after a hostile one disconnected.
const SERVED_WITHIN: Duration = Duration::from_secs(3);

/// A server on a socket path, serving frontend after frontend on its own thread.
struct Daemon {
    dir: PathBuf,
    path: PathBuf,
    stop: ShutdownHandle,
    done: mpsc::Receiver<VuResult<()>>,
}

fn unique_name(what: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "vu-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::AcqRel)
    )
}

impl Daemon {
    fn start<D: Device>(device: Arc<D>, config: ServerConfig) -> Self {
        init_log();
        let dir = std::env::temp_dir().join(unique_name("hostile"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dev.sock");
        let mut server = Server::bind(&path, device, config).unwrap();
        let stop = server.shutdown_handle();
        let (tx, done) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(server.serve());
        });
        Daemon {
            dir,
            path,
            stop,
            done,
        }
    }

    /// A frontend whose every reply wait is bounded by `bound` (an error, not a hang).
    fn connect(&self, bound: Duration) -> Frontend {
        let s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(bound)).unwrap();
        Frontend::from_stream(s, 8)
    }

    /// A frontend plus a raw handle on the same socket, for requests `Frontend` cannot
    /// send (GET_STATUS); use it only while the frontend waits for nothing.
    fn connect_with_raw(&self, bound: Duration) -> (Frontend, Raw) {
        let s = UnixStream::connect(&self.path).unwrap();
        s.set_read_timeout(Some(bound)).unwrap();
        let raw = Raw(s.try_clone().unwrap());
        (Frontend::from_stream(s, 8), raw)
    }

    /// Connects a new frontend and checks GET_FEATURES is answered within
    /// [`SERVED_WITHIN`], then runs one chain through a split ring.
    fn assert_serves_a_new_frontend(&self) {
        let start = Instant::now();
        let mut fe = self.connect(SERVED_WITHIN);
        fe.set_owner().unwrap();
        let f = fe.get_features();
        assert!(
            f.is_ok() && start.elapsed() < SERVED_WITHIN,
            "the next frontend's GET_FEATURES was not answered within {SERVED_WITHIN:?}: {f:?}"
        );
        let mem = default_mem();
        negotiate(&mut fe, 0, &mem);
        let mut ring = TestRing::new(0, RingLayout::Split, &mem);
        ring.setup(&mut fe, &mem);
        let at = ring.next_buf;
        let id = ring.send(&mem, b"next frontend");
        ring.receive(&mem, id, b"next frontend", at);
        assert_eq!(fe.get_vring_base(0).unwrap(), 1);
    }

    /// SIGTERM's path: shutdown, and `serve` returns within a bound.
    fn shutdown(self) {
        self.stop.shutdown();
        let r = self
            .done
            .recv_timeout(TIMEOUT)
            .expect("serve did not return after shutdown");
        r.unwrap();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits for chain `id` in the used ring without relying on the call fd.
fn poll_used(ring: &mut TestRing, mem: &GuestMem, id: u16, data: &[u8], at: u64) {
    let start = Instant::now();
    loop {
        if let Some((uid, len)) = ring.driver.pop_used(&mem.mem).unwrap() {
            assert_eq!(uid, id);
            assert_eq!(len as usize, data.len());
            let mut out = vec![0u8; data.len()];
            mem.mem
                .read_slice(&mut out, GuestAddress(at + 0x800))
                .unwrap();
            assert_eq!(out, data);
            return;
        }
        assert!(start.elapsed() < TIMEOUT, "chain {id} not returned");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// GET_VRING_BASE, answered within `bound`.
fn vring_base_within(fe: &mut Frontend, q: usize, bound: Duration) -> u32 {
    let start = Instant::now();
    let base = fe.get_vring_base(q);
    assert!(
        start.elapsed() < bound,
        "GET_VRING_BASE took {:?}",
        start.elapsed()
    );
    base.unwrap()
}

fn fd_flags(fd: RawFd) -> i32 {
    // SAFETY: F_GETFL on an open descriptor; no memory is passed.
    let f = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    assert!(f >= 0);
    f
}

/// A blocking pipe: (read end, write end).
fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid out-array of two ints.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors we own.
    unsafe {
        (
            File::from(OwnedFd::from_raw_fd(fds[0])),
            File::from(OwnedFd::from_raw_fd(fds[1])),
        )
    }
}

/// The inode of a descriptor (to look for copies of it left behind).
fn inode(fd: RawFd) -> u64 {
    // SAFETY: all-zero is a valid `stat`, used as an out-parameter.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer, open descriptor.
    assert_eq!(unsafe { libc::fstat(fd, &mut st) }, 0);
    st.st_ino
}

/// Descriptors of this process whose link target contains `needle`.
fn open_fds_matching(needle: &str) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy().contains(needle))
        .count()
}

/// Waits until no descriptor of the daemon refers to `needle` any more.
fn assert_released(needle: &str) {
    wait_until(&format!("descriptors of {needle} closed"), || {
        open_fds_matching(needle) == 0
    });
}

/// Sends `n` echo chains through `ring`, each checked in the used ring (no call fd wait).
fn echo_polled(ring: &mut TestRing, mem: &GuestMem, n: u8) {
    for k in 0..n {
        let at = ring.next_buf;
        let id = ring.send(mem, &[k; 24]);
        poll_used(ring, mem, id, &[k; 24], at);
    }
}

/// Configures queue 0 with `call` as its call fd and the test ring's kick.
fn setup_with_call(fe: &mut Frontend, ring: &TestRing, mem: &GuestMem, call: &EventFd) {
    fe.set_vring_num(0, QSIZE).unwrap();
    fe.set_vring_base(0, 0).unwrap();
    fe.set_vring_addr(0, &ring.config_data(mem)).unwrap();
    fe.set_vring_kick(0, &ring.kick).unwrap();
    fe.set_vring_call(0, call).unwrap();
    fe.set_vring_enable(0, true).unwrap();
}

// ---- A: no frontend fd can block the daemon ----

#[test]
fn blocking_eventfd_at_max_counter_as_call_fd_does_not_block_the_worker() {
    let d = Daemon::start(TestDevice::new(false), ServerConfig::default());
    let mem = default_mem();
    let mut fe = d.connect(TIMEOUT);
    negotiate(&mut fe, 0, &mem);
    let call = EventFd::new(0).unwrap();
    call.write(0xffff_ffff_ffff_fffe).unwrap();
    assert_eq!(fd_flags(call.as_raw_fd()) & libc::O_NONBLOCK, 0);
    let mut ring = TestRing::new(0, RingLayout::Split, &mem);
    setup_with_call(&mut fe, &ring, &mem, &call);
    // Every completion signals the saturated counter: the ring keeps going.
    echo_polled(&mut ring, &mem, 5);
    assert_eq!(vring_base_within(&mut fe, 0, SERVED_WITHIN), 5);
    drop(fe);
    d.assert_serves_a_new_frontend();
    d.shutdown();
}

#[test]
fn pipe_never_read_as_call_fd_does_not_block_the_worker() {
    let d = Daemon::start(TestDevice::new(false), ServerConfig::default());
    let mem = default_mem();
    let mut fe = d.connect(TIMEOUT);
    negotiate(&mut fe, 0, &mem);
    let (rd, wr) = pipe();
    let ino = inode(wr.as_raw_fd());
    // Fill the pipe with unread tokens, then make the write end blocking again.
    let fl = fd_flags(wr.as_raw_fd());
    // SAFETY: F_SETFL with an int on an open descriptor.
    unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) };
    let mut filled = 0usize;
    while (&wr).write(&1u64.to_ne_bytes()).is_ok() {
        filled += 8;
    }
    assert!(filled > 0);
    // SAFETY: as above.
    unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETFL, fl) };
    // SAFETY: `wr` stays open while `call` is used; `call` is forgotten, never closed.
    let call = std::mem::ManuallyDrop::new(unsafe { EventFd::from_raw_fd(wr.as_raw_fd()) });
    let mut ring = TestRing::new(0, RingLayout::Split, &mem);
    setup_with_call(&mut fe, &ring, &mem, &call);
    echo_polled(&mut ring, &mem, 5);
    assert_eq!(vring_base_within(&mut fe, 0, SERVED_WITHIN), 5);
    // The daemon used its own description of the pipe: the frontend's end is still
    // blocking, as the frontend made it.
    assert_eq!(fd_flags(wr.as_raw_fd()) & libc::O_NONBLOCK, 0);
    drop(fe);
    d.assert_serves_a_new_frontend();
    drop((rd, wr));
    assert_released(&format!("pipe:[{ino}]"));
    d.shutdown();
}

#[test]
fn kick_fd_drained_by_the_frontend_before_the_worker_reads_it_does_not_block() {
    let d = Daemon::start(TestDevice::new(false), ServerConfig::default());
    let mem = default_mem();
    let mut fe = d.connect(TIMEOUT);
    negotiate(&mut fe, 0, &mem);
    let mut ring = TestRing::new(0, RingLayout::Split, &mem);
    // A blocking kick eventfd.
    ring.kick = EventFd::new(0).unwrap();
    ring.setup(&mut fe, &mem);
    // Rule: an eventfd gets O_NONBLOCK on its (shared) description.
    assert_ne!(fd_flags(ring.kick.as_raw_fd()) & libc::O_NONBLOCK, 0);
    echo_polled(&mut ring, &mem, 1);
    // Kick and take the kick back at once, many times: the worker wakes up to an empty
    // eventfd.
    for _ in 0..500 {
        ring.kick.write(1).unwrap();
        let _ = ring.kick.read();
    }
    // The worker still answers commands and runs the ring.
    echo_polled(&mut ring, &mem, 2);
    for _ in 0..200 {
        ring.kick.write(1).unwrap();
        let _ = ring.kick.read();
    }
    assert_eq!(vring_base_within(&mut fe, 0, SERVED_WITHIN), 3);
    drop(fe);
    d.assert_serves_a_new_frontend();
    d.shutdown();
}

#[test]
fn worker_stalled_by_a_frontend_clearing_o_nonblock_is_left_behind_and_the_next_frontend_served() {
    // The one case the daemon cannot prevent (see `notify_fd`): the frontend makes its
    // own eventfd blocking again and saturates it. Teardown is still bounded.
    let config = ServerConfig {
        drain_timeout: Duration::from_millis(100),
        ..ServerConfig::default()
    };
    let d = Daemon::start(TestDevice::new(false), config);
    let mem = default_mem();
    let mut fe = d.connect(TIMEOUT);
    negotiate(&mut fe, 0, &mem);
    let call = EventFd::new(0).unwrap();
    let mut ring = TestRing::new(0, RingLayout::Split, &mem);
    setup_with_call(&mut fe, &ring, &mem, &call);
    // Saturate the counter (the daemon made the eventfd non-blocking: retry if it
    // signalled in between), then make it blocking again.
    loop {
        let _ = call.read();
        if call.write(0xffff_ffff_ffff_fffe).is_ok() {
            break;
        }
    }
    let fl = fd_flags(call.as_raw_fd());
    // SAFETY: F_SETFL with an int on an open descriptor.
    unsafe { libc::fcntl(call.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) };
    // The worker blocks in its next signal: the one owed for the call fd just set
    // (sent asynchronously), or the completion of this chain.
    ring.send(&mem, b"stall");
    std::thread::sleep(Duration::from_millis(100));
    // Disconnecting must not hang the daemon.
    let start = Instant::now();
    drop(fe);
    let fe = d.connect(Duration::from_secs(15));
    fe.set_owner().unwrap();
    assert!(fe.get_features().is_ok(), "next frontend not served");
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    drop(fe);
    // Let the stalled worker finish (it then sees its exit command).
    let _ = call.read();
    d.assert_serves_a_new_frontend();
    d.shutdown();
}

// ---- B: hostile frontend cases ----

#[test]
fn ring_base_past_the_avail_index_breaks_the_queue_and_the_next_frontend_is_served() {
    let d = Daemon::start(TestDevice::new(false), ServerConfig::default());
    let mem = default_mem();
    let mut fe = d.connect(TIMEOUT);
    negotiate(&mut fe, 0, &mem);
    let mut ring = TestRing::new(0, RingLayout::Split, &mem);
    let err = EventFd::new(EFD_NONBLOCK).unwrap();
    fe.set_vring_num(0, QSIZE).unwrap();
    // Base 2 while the guest will only have made one chain available.
    fe.set_vring_base(0, 2).unwrap();
    fe.set_vring_addr(0, &ring.config_data(&mem)).unwrap();
    fe.set_vring_err(0, &err).unwrap();
    fe.set_vring_kick(0, &ring.kick).unwrap();
    fe.set_vring_call(0, &ring.call).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    ring.send(&mem, b"avail idx 1");
    // "avail idx 1 is more than the queue size ahead of next_avail 2": queue broken.
    wait_signal(&err);
    assert_eq!(ring.driver.pop_used(&mem.mem).unwrap(), None);
    // The two chains "in flight" below the base were never popped by this backend: the
    // stop does not wait for them.
    assert_eq!(vring_base_within(&mut fe, 0, SERVED_WITHIN), 2);
    drop(fe);
    d.assert_serves_a_new_frontend();
    d.shutdown();
}

#[test]
fn disconnect_with_a_broken_queue_and_unreachable_in_flight_chains_is_prompt() {
    // Same state, but the frontend disconnects without GET_VRING_BASE.
    let d = Daemon::start(TestDevice::new(false), ServerConfig::default());
    let mem = default_mem();
    let mut fe = d.connect(TIMEOUT);
    negotiate(&mut fe, 0, &mem);
    let mut ring = TestRing::new(0, RingLayout::Split, &mem);
    let err = EventFd::new(EFD_NONBLOCK).unwrap();
    fe.set_vring_num(0, QSIZE).unwrap();
    fe.set_vring_base(0, 2).unwrap();
    fe.set_vring_addr(0, &ring.config_data(&mem)).unwrap();
    fe.set_vring_err(0, &err).unwrap();
    fe.set_vring_kick(0, &ring.kick).unwrap();
    fe.set_vring_call(0, &ring.call).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    ring.send(&mem, b"avail idx 1");
    wait_signal(&err);
    drop(fe);
    d.assert_serves_a_new_frontend();
    d.shutdown();
}

/// Total CPU time (user + system, in clock ticks) of this process's threads named
/// `name`.
fn thread_cpu_ticks(name: &str) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = e.unwrap().path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if comm.trim_end() != name {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        // Fields after the ")" that ends the command name: state is field 3, utime 14,
        // stime 15.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        total += f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    }
    total
}

fn thread_exists(name: &str) -> bool {
    std::fs::read_dir("/proc/self/task").unwrap().any(|e| {
        std::fs::read_to_string(e.unwrap().path().join("comm")).is_ok_and(|c| c.trim_end() == name)
    })
}

const STATUS_NEEDS_RESET: u64 = 0x40;

/// Hang-up on one of queue 0's notification fds: the queue breaks (err fd signalled,
/// DEVICE_NEEDS_RESET), its worker does not spin, queue 1 keeps working, and the next
/// frontend is served.
fn hang_up_breaks_the_queue_without_spinning(which: &str) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let thread_name = format!("hup{which}{}", N.fetch_add(1, Ordering::AcqRel));
    let config = ServerConfig {
        thread_name: thread_name.clone(),
        ..ServerConfig::default()
    };
    let worker = format!("{thread_name}-q0");
    assert!(worker.len() <= 15, "thread names are cut at 15 bytes");
    let d = Daemon::start(TestDevice::new(false), config);
    let mem = default_mem();
    let (mut fe, raw) = d.connect_with_raw(TIMEOUT);
    negotiate(&mut fe, 0, &mem);
    let mut q0 = TestRing::new(0, RingLayout::Split, &mem);
    let mut q1 = TestRing::new(1, RingLayout::Split, &mem);
    let err = EventFd::new(EFD_NONBLOCK).unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    // SAFETY: `ours` stays open while the wrapper is used; the wrapper is never closed.
    let sock = std::mem::ManuallyDrop::new(unsafe { EventFd::from_raw_fd(ours.as_raw_fd()) });
    let i = 0;
    fe.set_vring_num(i, QSIZE).unwrap();
    fe.set_vring_base(i, 0).unwrap();
    fe.set_vring_addr(i, &q0.config_data(&mem)).unwrap();
    fe.set_vring_err(i, &err).unwrap();
    match which {
        "k" => {
            fe.set_vring_kick(i, &sock).unwrap();
            fe.set_vring_call(i, &q0.call).unwrap();
        }
        _ => {
            fe.set_vring_kick(i, &q0.kick).unwrap();
            fe.set_vring_call(i, &sock).unwrap();
        }
    }
    fe.set_vring_enable(i, true).unwrap();
    q1.setup(&mut fe, &mem);
    assert_eq!(raw.get_u64(req::GET_STATUS) & STATUS_NEEDS_RESET, 0);
    // The frontend closes the socket's other end (and its own copy).
    drop(theirs);
    drop(ours);
    wait_signal(&err);
    wait_until("DEVICE_NEEDS_RESET", || {
        raw.get_u64(req::GET_STATUS) & STATUS_NEEDS_RESET != 0
    });
    assert!(thread_exists(&worker), "worker thread {worker} not found");
    let before = thread_cpu_ticks(&worker);
    std::thread::sleep(Duration::from_millis(500));
    let used = thread_cpu_ticks(&worker) - before;
    assert!(
        used <= 5,
        "worker {worker} used {used} ticks in 0.5 s: it spins"
    );
    // The other queue still works; the broken one processes nothing.
    let at = q1.next_buf;
    let id = q1.send(&mem, b"queue 1 runs");
    q1.receive(&mem, id, b"queue 1 runs", at);
    if which == "k" {
        q0.send(&mem, b"no kick fd");
    } else {
        q0.send(&mem, b"broken");
    }
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(q0.driver.pop_used(&mem.mem).unwrap(), None);
    drop(raw);
    drop(fe);
    d.assert_serves_a_new_frontend();
    d.shutdown();
}

#[test]
fn kick_fd_socket_whose_peer_closed_breaks_the_queue_without_spinning() {
    hang_up_breaks_the_queue_without_spinning("k");
}

#[test]
fn call_fd_socket_whose_peer_closed_breaks_the_queue_without_spinning() {
    hang_up_breaks_the_queue_without_spinning("c");
}

/// Mappings of this process whose line contains `needle`.
fn mappings_matching(needle: &str) -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// Guest memory in one memfd named `name` (to find its descriptors and mappings).
fn named_mem(name: &str, len: usize) -> (GuestMem, File) {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C string; result checked.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor we own.
    let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.set_len(len as u64).unwrap();
    let mem = GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        len,
        Some(FileOffset::new(f.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    (
        GuestMem {
            mem,
            _files: vec![f.try_clone().unwrap()],
        },
        f,
    )
}

#[test]
fn guest_memory_shrunk_by_the_frontend_is_survived_and_closes_the_connection() {
    let d = Daemon::start(TestDevice::new(false), ServerConfig::default());
    // Repeated: each round's mappings and descriptors must be gone afterwards.
    for round in 0..3u8 {
        let name = unique_name("shrunk");
        let (mem, file) = named_mem(&name, MEM_SIZE);
        let mut fe = d.connect(TIMEOUT);
        negotiate(&mut fe, 0, &mem);
        let mut ring = TestRing::new(0, RingLayout::Split, &mem);
        let err = EventFd::new(EFD_NONBLOCK).unwrap();
        ring.setup(&mut fe, &mem);
        fe.set_vring_err(0, &err).unwrap();
        let at = ring.next_buf;
        let id = ring.send(&mem, &[round; 16]);
        ring.receive(&mem, id, &[round; 16], at);
        // The frontend shrinks the file below the buffers (the rings stay), then makes a
        // chain whose buffers are past the new end available. (The test must not touch
        // those pages itself: it would die of SIGBUS.)
        let cut = 0x20000u64;
        assert!(ring.next_buf > cut);
        file.set_len(cut).unwrap();
        let bufs = [
            crate::driver::DriverBuffer {
                addr: ring.next_buf,
                len: 16,
                writable: false,
            },
            crate::driver::DriverBuffer {
                addr: ring.next_buf + 0x800,
                len: 16,
                writable: true,
            },
        ];
        ring.driver.add_chain(&mem.mem, &bufs).unwrap();
        ring.kick.write(1).unwrap();
        // The daemon survives the SIGBUS, breaks the queue and closes the connection.
        wait_signal(&err);
        // The error fd is signalled as the queue breaks; the connection closes just after.
        let start = Instant::now();
        while fe.get_features().is_ok() {
            assert!(
                start.elapsed() < SERVED_WITHIN,
                "the connection was not closed"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(fe);
        d.assert_serves_a_new_frontend();
        drop(ring);
        drop(mem);
        drop(file);
        assert_released(&name);
        wait_until("the poisoned mapping unmapped", || {
            mappings_matching(&name) == 0 && super::super::sigbus::poisoned_count() == 0
        });
    }
    d.shutdown();
}

#[test]
fn sigbus_outside_guest_memory_still_kills_the_process() {
    const CHILD: &str = "VU_SIGBUS_CHILD";
    if std::env::var_os(CHILD).is_some() {
        // In the child: the handler is installed, the fault is in memory nobody
        // registered, so the previous action (Rust's handler, then the default) applies.
        super::super::sigbus::install();
        let (mem, file) = named_mem(&unique_name("unregistered"), 0x2000);
        file.set_len(0).unwrap();
        let mut b = [0u8; 1];
        let _ = mem.mem.read_slice(&mut b, GuestAddress(0x1000));
        std::process::exit(0);
    }
    use std::os::unix::process::ExitStatusExt;
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "vhost_user::tests::hostile::sigbus_outside_guest_memory_still_kills_the_process",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}");
}

#[test]
fn ring_base_with_a_flipped_bit_breaks_the_queue_and_the_next_frontend_is_served() {
    // A valid setup sequence with one bit flipped: SET_VRING_BASE 0x100 instead of 0.
    let d = Daemon::start(TestDevice::new(false), ServerConfig::default());
    let mem = default_mem();
    let mut fe = d.connect(TIMEOUT);
    negotiate(&mut fe, 0, &mem);
    let mut ring = TestRing::new(0, RingLayout::Split, &mem);
    let err = EventFd::new(EFD_NONBLOCK).unwrap();
    fe.set_vring_num(0, QSIZE).unwrap();
    fe.set_vring_base(0, 0x100).unwrap();
    fe.set_vring_addr(0, &ring.config_data(&mem)).unwrap();
    fe.set_vring_err(0, &err).unwrap();
    fe.set_vring_kick(0, &ring.kick).unwrap();
    fe.set_vring_call(0, &ring.call).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    ring.send(&mem, b"avail idx 1");
    wait_signal(&err);
    assert_eq!(vring_base_within(&mut fe, 0, SERVED_WITHIN), 0x100);
    drop(fe);
    d.assert_serves_a_new_frontend();
    d.shutdown();
}

/// Descriptors of this process referring to any of `inodes` ("pipe:[N]", "socket:[N]").
fn open_fds_of(inodes: &[u64]) -> usize {
    inodes
        .iter()
        .map(|i| open_fds_matching(&format!(":[{i}]")))
        .sum()
}

/// Threads of this process whose name starts with `prefix`.
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter(|e| {
            std::fs::read_to_string(e.as_ref().unwrap().path().join("comm"))
                .is_ok_and(|c| c.starts_with(prefix))
        })
        .count()
}

#[test]
fn hostile_sequences_repeated_leave_no_descriptors_or_threads_behind() {
    let config = ServerConfig {
        thread_name: "vuleak".into(),
        ..ServerConfig::default()
    };
    let d = Daemon::start(TestDevice::new(false), config);
    for round in 0..5u16 {
        let mem = default_mem();
        let mut fe = d.connect(TIMEOUT);
        negotiate(&mut fe, 0, &mem);
        // Queue 0: a pipe as kick fd, a socket as call fd, a pipe as error fd, and a bad
        // base; queue 1: a socket kick fd whose peer then closes.
        let (kick_rd, kick_wr) = pipe();
        let (call_ours, call_theirs) = UnixStream::pair().unwrap();
        let (err_rd, err_wr) = pipe();
        let (k1_ours, k1_theirs) = UnixStream::pair().unwrap();
        let inodes = [
            inode(kick_rd.as_raw_fd()),
            inode(call_ours.as_raw_fd()),
            inode(call_theirs.as_raw_fd()),
            inode(err_rd.as_raw_fd()),
            inode(k1_ours.as_raw_fd()),
            inode(k1_theirs.as_raw_fd()),
        ];
        let as_evt = |fd: RawFd| {
            // SAFETY: the wrapped descriptors stay open while the wrappers are used, and
            // the wrappers are never closed.
            std::mem::ManuallyDrop::new(unsafe { EventFd::from_raw_fd(fd) })
        };
        let (kick, call, err, k1) = (
            as_evt(kick_rd.as_raw_fd()),
            as_evt(call_ours.as_raw_fd()),
            as_evt(err_wr.as_raw_fd()),
            as_evt(k1_ours.as_raw_fd()),
        );
        let ring = TestRing::new(0, RingLayout::Split, &mem);
        fe.set_vring_num(0, QSIZE).unwrap();
        fe.set_vring_base(0, 3 + round).unwrap();
        fe.set_vring_addr(0, &ring.config_data(&mem)).unwrap();
        fe.set_vring_err(0, &err).unwrap();
        fe.set_vring_kick(0, &kick).unwrap();
        fe.set_vring_call(0, &call).unwrap();
        fe.set_vring_enable(0, true).unwrap();
        let ring1 = TestRing::new(1, RingLayout::Split, &mem);
        fe.set_vring_num(1, QSIZE).unwrap();
        fe.set_vring_base(1, 0).unwrap();
        fe.set_vring_addr(1, &ring1.config_data(&mem)).unwrap();
        fe.set_vring_kick(1, &k1).unwrap();
        fe.set_vring_call(1, &ring1.call).unwrap();
        fe.set_vring_enable(1, true).unwrap();
        let mut driver = ring.driver;
        let bufs = [crate::driver::DriverBuffer {
            addr: 0x80000,
            len: 8,
            writable: true,
        }];
        driver.add_chain(&mem.mem, &bufs).unwrap();
        (&kick_wr).write_all(&1u64.to_ne_bytes()).unwrap();
        drop(k1_theirs);
        // The bad base breaks queue 0: its error pipe gets a token.
        let mut p = libc::pollfd {
            fd: err_rd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd.
        let r = unsafe { libc::poll(&mut p, 1, 10_000) };
        assert_eq!(r, 1, "no error signal");
        drop(fe);
        d.assert_serves_a_new_frontend();
        drop((
            kick_rd,
            kick_wr,
            call_ours,
            call_theirs,
            err_rd,
            err_wr,
            k1_ours,
        ));
        wait_until("every descriptor of the round closed", || {
            open_fds_of(&inodes) == 0
        });
        wait_until("the round's workers exited", || {
            threads_named("vuleak") == 0
        });
    }
    d.shutdown();
}

/// The test device, whose queues also watch a pipe the test can hang up.
#[derive(Default)]
struct HupDevice {
    inner: TestDevice,
    /// Write ends of the queues' pipes, by start order.
    writers: Mutex<Vec<File>>,
}

struct HupQueue {
    inner: TestQueue,
    pipe: File,
}

/// Token of a [`HupQueue`]'s pipe.
const PIPE_TOKEN: u32 = 1;

impl QueueHandler for HupQueue {
    fn queue_started(
        &mut self,
        ctx: &mut GroupContext<'_>,
        queue: &QueueContext,
    ) -> Result<(), DeviceError> {
        self.inner.queue_started(ctx, queue)?;
        ctx.register(self.pipe.as_raw_fd(), Interest::READABLE, PIPE_TOKEN)?;
        Ok(())
    }
    fn process(
        &mut self,
        ctx: &mut GroupContext<'_>,
        queue: u16,
    ) -> Result<Processed, DeviceError> {
        self.inner.process(ctx, queue)
    }
    fn handle_event(
        &mut self,
        ctx: &mut GroupContext<'_>,
        token: u32,
        events: Events,
    ) -> Result<(), DeviceError> {
        if token != PIPE_TOKEN {
            return self.inner.handle_event(ctx, token, events);
        }
        if events.hangup || events.error {
            // What a real device does when its own source goes away: fail the queues.
            return Err(DeviceError::Other("the device's pipe hung up".into()));
        }
        let mut b = [0u8; 8];
        let _ = (&self.pipe).read(&mut b);
        Ok(())
    }
}

impl Device for HupDevice {
    type Handler = HupQueue;
    fn features(&self) -> u64 {
        self.inner.features()
    }
    fn protocol_features(&self) -> ProtocolFeatures {
        self.inner.protocol_features()
    }
    fn num_queues(&self) -> u16 {
        self.inner.num_queues()
    }
    fn max_queue_size(&self) -> u16 {
        self.inner.max_queue_size()
    }
    fn start_group(&self, group: &GroupInfo) -> Result<HupQueue, DeviceError> {
        let (rd, wr) = pipe();
        self.writers.lock().unwrap().push(wr);
        Ok(HupQueue {
            inner: self.inner.start_group(group)?,
            pipe: rd,
        })
    }
}

#[test]
fn handler_fd_that_hangs_up_breaks_the_queue_without_spinning() {
    let device = Arc::new(HupDevice::default());
    let config = ServerConfig {
        thread_name: "hupdev".into(),
        ..ServerConfig::default()
    };
    let d = Daemon::start(device.clone(), config);
    let mem = default_mem();
    let (mut fe, raw) = d.connect_with_raw(TIMEOUT);
    negotiate(&mut fe, 0, &mem);
    let mut q0 = TestRing::new(0, RingLayout::Split, &mem);
    let err = EventFd::new(EFD_NONBLOCK).unwrap();
    q0.setup(&mut fe, &mem);
    fe.set_vring_err(0, &err).unwrap();
    let at = q0.next_buf;
    let id = q0.send(&mem, b"before");
    q0.receive(&mem, id, b"before", at);
    // The handler's pipe loses its writer: level-triggered EPOLLHUP from now on.
    device.writers.lock().unwrap().clear();
    wait_signal(&err);
    wait_until("DEVICE_NEEDS_RESET", || {
        raw.get_u64(req::GET_STATUS) & STATUS_NEEDS_RESET != 0
    });
    assert!(thread_exists("hupdev-q0"));
    let before = thread_cpu_ticks("hupdev-q0");
    std::thread::sleep(Duration::from_millis(500));
    let used = thread_cpu_ticks("hupdev-q0") - before;
    assert!(used <= 5, "worker used {used} ticks in 0.5 s: it spins");
    drop(raw);
    drop(fe);
    d.assert_serves_a_new_frontend();
    d.shutdown();
}

#[test]
fn shutdown_returns_while_a_worker_is_stalled_by_its_frontend() {
    let config = ServerConfig {
        drain_timeout: Duration::from_millis(100),
        ..ServerConfig::default()
    };
    let d = Daemon::start(TestDevice::new(false), config);
    let mem = default_mem();
    let mut fe = d.connect(TIMEOUT);
    negotiate(&mut fe, 0, &mem);
    let call = EventFd::new(0).unwrap();
    let mut ring = TestRing::new(0, RingLayout::Split, &mem);
    setup_with_call(&mut fe, &ring, &mem, &call);
    loop {
        let _ = call.read();
        if call.write(0xffff_ffff_ffff_fffe).is_ok() {
            break;
        }
    }
    let fl = fd_flags(call.as_raw_fd());
    // SAFETY: F_SETFL with an int on an open descriptor.
    unsafe { libc::fcntl(call.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) };
    ring.send(&mem, b"stall");
    std::thread::sleep(Duration::from_millis(100));
    // SIGTERM's path, with the frontend still connected and its worker stalled.
    let start = Instant::now();
    d.stop.shutdown();
    let r = d
        .done
        .recv_timeout(Duration::from_secs(15))
        .expect("serve did not return after shutdown");
    assert!(r.is_ok(), "{r:?}");
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    // Let the stalled worker finish.
    let _ = call.read();
    drop(fe);
    let _ = std::fs::remove_dir_all(&d.dir);
}
