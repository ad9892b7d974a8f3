// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `tapbench`: TCP throughput between a QEMU (TCG) guest and a TAP on the host, with the
//! guest's virtio-net served by (a) our `vhost-user-net` daemon (`-netdev vhost-user`) and
//! (b) QEMU's own built-in virtio-net on the TAP (`-netdev tap,...,vhost=off`), plus
//! (c) QEMU's tap with the kernel's vhost-net (`vhost=on`) when `/dev/vhost-net` exists.
//!
//! Same guest kernel, same initramfs (busybox plus the host's `iperf3` and the shared
//! libraries it needs), same QEMU command line apart from the `-netdev`, same transfer.
//! Each run creates a network namespace (`tapb-<pid>-<backend>-<rep>`) holding the TAP
//! (10.77.0.1/24), our daemon (for (a)), QEMU itself (`ip netns exec`, so that QEMU's
//! tap is created there) and the host's `iperf3` client; the guest (10.77.0.2/24) runs
//! `iperf3 -s -1` twice. The host sends `--mib` MiB to the guest (`iperf3 -c -n`), then
//! receives as many (`-R`). Throughput is iperf3's receiver-side figure. Every run boots
//! a fresh guest (~5 s under TCG), so the repetitions are independent and interleaved
//! between backends (the order alternates between repetitions).
//!
//! CPU: utime + stime from /proc of the QEMU process and of our daemon, sampled around
//! each transfer. QEMU's built-in virtio-net runs inside QEMU, on the same process as the
//! (TCG) vCPU that runs the guest's TCP stack and iperf3, so its share cannot be told
//! apart: the comparable figure is the host CPU of the whole VM side, QEMU plus our daemon
//! for (a) against QEMU alone for (b) (for (c) the kernel's vhost worker threads are not
//! counted). The host's iperf3 client is not counted for any backend.
//!
//! Markdown on stdout, progress on stderr. Needs root (namespaces, TAP), `ip`, QEMU >= 10,
//! `iperf3` and the guest kernel of `vring-tests/scripts/install-test-deps.sh`.
//!
//! ```text
//! cargo build --release -p vhost-user-net -p vring-tests
//! target/release/tapbench --reps 3 --mib 1024   # ~3 min
//! ```
//!
//! SIGINT, SIGTERM and SIGHUP kill the bench's children (QEMU, our daemon, iperf3); the
//! run then unwinds and removes its namespace and temporary directory.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::Parser;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vring_tests::e2e::netns::NetNs;
use vring_tests::e2e::{
    qemu_binary, repo_root, BackgroundProcess, GuestKernel, Initramfs, InitramfsImage, QemuVm,
    RunningVm, TempDir, SCRIPT_PRELUDE,
};
use vring_tests::frontend::stats::process_cpu_seconds;

const HOST_ADDR: &str = "10.77.0.1";
const GUEST_ADDR: &str = "10.77.0.2";
const GUEST_MAC: &str = "52:54:00:77:00:02";
const TAP: &str = "tbtap0";
const PORT: &str = "5201";
/// Printed by the guest once its interface answers pings and the iperf3 server starts.
const READY: &str = "TAPBENCH-READY";
/// Prefix of the guest's interrupt counts around each iperf3 server:
/// `TAPBENCH-IRQ <test> before|after virtio0-input.0=N virtio0-output.0=N ...`.
const IRQ_MARKER: &str = "TAPBENCH-IRQ ";
/// From QEMU's start until [`READY`] (boot ~5 s under TCG, the ping ~1 s).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the host keeps retrying to reach the guest's iperf3 server (it restarts
/// between the two transfers).
const CONNECT_RETRY: Duration = Duration::from_secs(20);
/// Limit for QEMU to create its TAP (the tap peers).
const TAP_TIMEOUT: Duration = Duration::from_secs(30);
/// Virtio feature bit of the packed ring in the guest's `features` string.
const F_RING_PACKED: usize = 34;
const BYTES_PER_GIB: f64 = 1_073_741_824.0;

/// Command line.
#[derive(Parser, Debug)]
#[command(
    name = "tapbench",
    about = "guest<->TAP TCP throughput (iperf3): vhost-user-net vs QEMU's built-in virtio-net"
)]
struct Args {
    /// Repetitions per backend (each boots a fresh guest).
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// MiB moved per direction per repetition (iperf3 -n).
    #[arg(long, default_value_t = 1024)]
    mib: u32,
    /// Packed rings (virtio-net-pci packed=on) for every backend.
    #[arg(long)]
    packed: bool,
    /// Queue pairs (guest vCPUs and iperf3 streams as many).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=8))]
    queue_pairs: u16,
    /// Limit for one transfer, in seconds.
    #[arg(long, default_value_t = 120)]
    transfer_timeout: u64,
    /// Our daemon (default: `$E2E_VHOST_USER_NET`, else target/release/vhost-user-net).
    #[arg(long)]
    ours: Option<PathBuf>,
    /// The iperf3 run on the host and copied into the guest.
    #[arg(long, default_value = "/usr/bin/iperf3")]
    iperf3: PathBuf,
    /// Per transfer, print to stderr where the time goes: the guest's virtio interrupts,
    /// the TAP's frame counts and drops, TCP retransmits, and (with `perf` installed) the
    /// syscalls and context switches of QEMU and of our daemon, all per MiB. `perf stat`
    /// attached to the processes costs some throughput: compare diagnostic runs with each
    /// other, not with plain ones.
    #[arg(long)]
    diag: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    /// Our daemon behind `-netdev vhost-user`.
    Ours,
    /// QEMU's tap netdev, virtio-net in QEMU's userspace.
    QemuTap,
    /// QEMU's tap netdev with the kernel's vhost-net.
    QemuVhostNet,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Ours => "vhost-user-net (ours)",
            Backend::QemuTap => "QEMU tap, vhost=off",
            Backend::QemuVhostNet => "QEMU tap, vhost=on",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Backend::Ours => "ours",
            Backend::QemuTap => "tap",
            Backend::QemuVhostNet => "vhost",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    /// The host's iperf3 client sends.
    HostToGuest,
    /// `iperf3 -R`: the guest's server sends.
    GuestToHost,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::HostToGuest => "host → guest",
            Direction::GuestToHost => "guest → host",
        }
    }
}

const DIRECTIONS: [Direction; 2] = [Direction::HostToGuest, Direction::GuestToHost];

/// One measured transfer.
#[derive(Clone, Copy, Debug)]
struct Transfer {
    /// Receiver-side throughput (iperf3's `sum_received.bits_per_second`), Mbit/s.
    mbit_s: f64,
    /// Bytes sent (iperf3 -n: the amount asked for, rounded up to whole writes).
    bytes: f64,
    /// QEMU's CPU seconds during the transfer.
    qemu_cpu: f64,
    /// Our daemon's CPU seconds during the transfer (ours only).
    daemon_cpu: Option<f64>,
    /// Lifetime of the host's iperf3 client (connection, transfer, results exchange):
    /// the window in which the CPU times are taken.
    wall: Duration,
    /// Connection attempts refused before this one (the guest's server restarting).
    refused: u32,
    /// Busy CPU seconds of the whole host during the transfer not spent by QEMU or our
    /// daemon: the host's iperf3 and its share of the TCP stack (small), and any other
    /// load on the machine, which competes with the guest's vCPU thread.
    others_cpu: f64,
}

/// Syscalls and context switches counted by `perf stat` (`--diag`).
const PERF_EVENTS: &[&str] = &[
    "syscalls:sys_enter_read",
    "syscalls:sys_enter_readv",
    "syscalls:sys_enter_write",
    "syscalls:sys_enter_writev",
    "syscalls:sys_enter_epoll_wait",
    "syscalls:sys_enter_ppoll",
    "syscalls:sys_enter_ioctl",
    "syscalls:sys_enter_futex",
    "context-switches",
];

/// The TAP's counters (the host's view: tx is towards the guest).
#[derive(Clone, Copy, Debug, Default)]
struct TapStats {
    tx_packets: u64,
    tx_bytes: u64,
    tx_dropped: u64,
    rx_packets: u64,
    rx_bytes: u64,
    rx_dropped: u64,
}

impl TapStats {
    fn read(ns: &NetNs) -> TapStats {
        let names = [
            "tx_packets",
            "tx_bytes",
            "tx_dropped",
            "rx_packets",
            "rx_bytes",
            "rx_dropped",
        ];
        let mut cmd = ns.command("cat");
        for n in names {
            cmd.arg(format!("/sys/class/net/{TAP}/statistics/{n}"));
        }
        let (out, err) = cmd
            .output()
            .map(|o| (o.stdout, o.stderr))
            .unwrap_or_default();
        let v: Vec<u64> = String::from_utf8_lossy(&out)
            .lines()
            .map(|l| l.trim().parse().unwrap_or(0))
            .collect();
        if v.len() != names.len() {
            eprintln!(
                "diag: reading the TAP's counters failed: {}",
                String::from_utf8_lossy(&err).trim()
            );
        }
        let g = |i: usize| v.get(i).copied().unwrap_or(0);
        TapStats {
            tx_packets: g(0),
            tx_bytes: g(1),
            tx_dropped: g(2),
            rx_packets: g(3),
            rx_bytes: g(4),
            rx_dropped: g(5),
        }
    }

    fn since(&self, before: &TapStats) -> TapStats {
        TapStats {
            tx_packets: self.tx_packets.saturating_sub(before.tx_packets),
            tx_bytes: self.tx_bytes.saturating_sub(before.tx_bytes),
            tx_dropped: self.tx_dropped.saturating_sub(before.tx_dropped),
            rx_packets: self.rx_packets.saturating_sub(before.rx_packets),
            rx_bytes: self.rx_bytes.saturating_sub(before.rx_bytes),
            rx_dropped: self.rx_dropped.saturating_sub(before.rx_dropped),
        }
    }
}

/// `perf stat` attached to a process for the length of a transfer.
struct PerfStat(BackgroundProcess, Watched);

impl PerfStat {
    fn start(pid: u32) -> Option<PerfStat> {
        let mut cmd = Command::new("perf");
        cmd.args(["stat", "-x", ",", "-e", &PERF_EVENTS.join(","), "-p"])
            .arg(pid.to_string());
        let p = BackgroundProcess::spawn("perf", cmd).ok()?;
        let w = watch(p.pid());
        Some(PerfStat(p, w))
    }

    /// Stops counting (SIGINT: perf prints its counts) and returns (event, count).
    fn finish(self) -> Vec<(String, f64)> {
        let PerfStat(mut p, _w) = self;
        if let Some(pid) = p.pid().and_then(|p| libc::pid_t::try_from(p).ok()) {
            // SAFETY: kill(2) has no memory-safety preconditions; `pid` is our unreaped
            // child.
            unsafe {
                libc::kill(pid, libc::SIGINT);
            }
        }
        let _ = p.wait_timeout(Duration::from_secs(5));
        p.log()
            .lines()
            .filter_map(|l| {
                let mut f = l.split(',');
                let count = f.next()?.trim().parse::<f64>().ok()?;
                let _unit = f.next()?;
                let event = f.next()?.trim();
                let event = event.strip_prefix("syscalls:sys_enter_").unwrap_or(event);
                Some((event.to_owned(), count))
            })
            .collect()
    }
}

/// Busy CPU seconds of the whole host (all CPUs) from /proc/stat: everything but idle
/// and iowait.
fn host_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return 0.0;
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (v.iter().sum::<f64>() - idle) / hz
}

/// What `--diag` gathers around one transfer.
#[derive(Default)]
struct Diag {
    tap: TapStats,
    retransmits: Option<f64>,
    qemu: Vec<(String, f64)>,
    daemon: Vec<(String, f64)>,
}

/// Sum of the interrupt counts of lines `<marker><test> <phase> name=N ...` whose name
/// contains `what`.
fn guest_irqs(log: &str, test: usize, phase: &str, what: &str) -> Option<u64> {
    let prefix = format!("{IRQ_MARKER}{test} {phase}");
    let line = log.lines().find_map(|l| l.trim().strip_prefix(&prefix))?;
    Some(
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| k.contains(what))
            .filter_map(|(_, v)| v.parse::<u64>().ok())
            .sum(),
    )
}

fn print_diag(b: Backend, dir: Direction, t: &Transfer, d: &Diag, log: &str, test: usize) {
    let mib = t.bytes / 1_048_576.0;
    let per = |x: f64| x / mib;
    let irq = |what: &str| {
        guest_irqs(log, test, "after", what)
            .zip(guest_irqs(log, test, "before", what))
            .map(|(a, b)| a.saturating_sub(b) as f64)
    };
    let fmt = |v: &[(String, f64)]| {
        v.iter()
            .map(|(e, c)| format!("{e}={:.0}", per(*c)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let avg = |bytes: u64, pkts: u64| bytes.checked_div(pkts).unwrap_or(0);
    eprintln!(
        "diag {}, {}: per MiB: guest irq input={} output={}; TAP to guest {:.1} frames \
         (avg {} B, {} dropped), from guest {:.1} frames (avg {} B, {} dropped); \
         TCP retransmits {} (whole transfer)\n  QEMU: {}\n  daemon: {}",
        b.name(),
        dir.name(),
        fmt_opt(irq("input").map(per), 1),
        fmt_opt(irq("output").map(per), 1),
        per(d.tap.tx_packets as f64),
        avg(d.tap.tx_bytes, d.tap.tx_packets),
        d.tap.tx_dropped,
        per(d.tap.rx_packets as f64),
        avg(d.tap.rx_bytes, d.tap.rx_packets),
        d.tap.rx_dropped,
        fmt_opt(d.retransmits, 0),
        fmt(&d.qemu),
        fmt(&d.daemon),
    );
}

impl Transfer {
    fn gib(&self) -> f64 {
        self.bytes / BYTES_PER_GIB
    }
    fn qemu_per_gib(&self) -> f64 {
        self.qemu_cpu / self.gib()
    }
    fn daemon_per_gib(&self) -> Option<f64> {
        self.daemon_cpu.map(|d| d / self.gib())
    }
    fn total_per_gib(&self) -> f64 {
        (self.qemu_cpu + self.daemon_cpu.unwrap_or(0.0)) / self.gib()
    }
    /// [`Self::others_cpu`] over the transfer's wall time: host CPUs kept busy by others.
    fn others_load(&self) -> f64 {
        self.others_cpu / self.wall.as_secs_f64().max(1e-9)
    }
}

/// What every run shares.
struct Ctx {
    args: Args,
    ours: PathBuf,
    kernel: GuestKernel,
    initrd: InitramfsImage,
}

// ---------------------------------------------------------------------------------------
// Signals: the children are killed through pidfds (no pid reuse race), then the run
// unwinds and its guards remove the namespace and the temporary directory.

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static CHILDREN: Mutex<Vec<(u64, OwnedFd)>> = Mutex::new(Vec::new());

/// A child registered for killing on a signal; unregistered on drop.
struct Watched(Option<u64>);

impl Drop for Watched {
    fn drop(&mut self) {
        if let Some(id) = self.0 {
            let mut v = CHILDREN.lock().unwrap_or_else(|p| p.into_inner());
            v.retain(|(i, _)| *i != id);
        }
    }
}

/// Registers process `pid` (our unreaped child) to be SIGKILLed on a signal.
fn watch(pid: Option<u32>) -> Watched {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let Some(pid) = pid.and_then(|p| libc::pid_t::try_from(p).ok()) else {
        return Watched(None);
    };
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is
    // passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let Ok(fd) = i32::try_from(fd) else {
        return Watched(None);
    };
    if fd < 0 {
        return Watched(None);
    }
    // SAFETY: `fd` was just returned by pidfd_open and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    CHILDREN
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((id, fd));
    Watched(Some(id))
}

/// Handles SIGINT, SIGTERM and SIGHUP on a thread of their own (signal-hook: a handler,
/// not a blocked mask, so the children start with the default dispositions): the first
/// sets [`INTERRUPTED`] and kills the registered children, a second one exits at once.
fn install_signal_thread() -> Result<(), String> {
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| format!("installing signal handlers: {e}"))?;
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                eprintln!("tapbench: second signal {sig}: exiting now (namespaces may be left)");
                std::process::exit(130);
            }
            eprintln!("tapbench: signal {sig}: stopping the children and cleaning up");
            let v = CHILDREN.lock().unwrap_or_else(|p| p.into_inner());
            for (_, fd) in v.iter() {
                // SAFETY: pidfd_send_signal gets a pidfd we own, a signal number and a
                // null siginfo (allowed); no other memory is passed.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd.as_raw_fd(),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    );
                }
            }
        }
    });
    Ok(())
}

// ---------------------------------------------------------------------------------------

fn guest_script() -> String {
    format!(
        r#"set -e
{SCRIPT_PRELUDE}for d in /sys/bus/virtio/devices/*; do
    if [ "$(cat "$d/device")" = 0x0001 ]; then echo "E2E-KV features=$(cat "$d/features")"; fi
done
ip link set lo up
ip link show eth0 >/dev/null 2>&1 || fail "no eth0"
echo "E2E-KV queues=$(ls /sys/class/net/eth0/queues | grep -c rx-)"
ip addr add {GUEST_ADDR}/24 dev eth0
ip link set eth0 up
i=0
until ping -c 1 -W 1 {HOST_ADDR} >/dev/null 2>&1; do
    i=$((i + 1)); [ "$i" -lt 30 ] || fail "no ping reply from {HOST_ADDR}"
done
step "eth0 up"
irqs() {{ awk '/virtio[0-9]+-(input|output)/ {{ s = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i; printf " %s=%d", $NF, s }}' /proc/interrupts; }}
echo {READY}
for t in 1 2; do
    echo "{IRQ_MARKER}$t before$(irqs)"
    iperf3 -s -1 -p {PORT} >/tmp/iperf3.log 2>&1 || {{ cat /tmp/iperf3.log; fail "iperf3 server $t"; }}
    echo "{IRQ_MARKER}$t after$(irqs)"
    step "iperf3 test $t done"
done
"#
    )
}

/// Our daemon: `--ours`, `$E2E_VHOST_USER_NET`, else target/release/vhost-user-net.
fn daemon_binary(arg: Option<&Path>) -> Result<PathBuf, String> {
    let p = match (
        arg,
        std::env::var_os("E2E_VHOST_USER_NET").filter(|p| !p.is_empty()),
    ) {
        (Some(a), _) => a.to_path_buf(),
        (None, Some(e)) => PathBuf::from(e),
        (None, None) => std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| repo_root().join("target"), PathBuf::from)
            .join("release/vhost-user-net"),
    };
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "our daemon {} does not exist: run `cargo build --release -p vhost-user-net` \
             (or pass --ours)",
            p.display()
        ))
    }
}

/// The last `lines` lines of `log`.
fn tail(log: &str, lines: usize) -> String {
    let v: Vec<&str> = log.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// The number after `"key":` in `json`, searched from `from`.
fn json_number(json: &str, from: usize, key: &str) -> Option<f64> {
    let pat = format!("\"{key}\":");
    let at = json.get(from..)?.find(&pat)? + from + pat.len();
    let rest = json.get(at..)?.trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')))
        .unwrap_or(rest.len());
    rest.get(..end)?.parse().ok()
}

/// (receiver's bits per second, sender's bytes) from `iperf3 -J` output: the receiver's
/// rate is the one iperf3 reports; its byte count can miss the last bytes in flight when
/// the test ends, all of which crossed the device while the client ran.
fn parse_iperf3(json: &str) -> Option<(f64, f64)> {
    let end = json.find("\"end\":")?;
    let received = end + json.get(end..)?.find("\"sum_received\":")?;
    let sent = end + json.get(end..)?.find("\"sum_sent\":")?;
    Some((
        json_number(json, received, "bits_per_second")?,
        json_number(json, sent, "bytes")?,
    ))
}

fn cpu(pid: u32, what: &str) -> Result<f64, String> {
    process_cpu_seconds(pid).map_err(|e| format!("CPU time of {what} (pid {pid}): {e}"))
}

/// One iperf3 transfer from the host's side, with the CPU used meanwhile.
fn transfer(
    ctx: &Ctx,
    ns: &NetNs,
    dir: Direction,
    qemu_pid: u32,
    daemon_pid: Option<u32>,
) -> Result<(Transfer, Diag), String> {
    let deadline = Instant::now() + CONNECT_RETRY;
    let timeout = Duration::from_secs(ctx.args.transfer_timeout);
    let mut refused = 0;
    loop {
        let mut cmd = ns.command(&ctx.args.iperf3.to_string_lossy());
        cmd.args([
            "-c",
            GUEST_ADDR,
            "-p",
            PORT,
            "-J",
            "--connect-timeout",
            "2000",
        ])
        .args(["-n", &format!("{}M", ctx.args.mib)]);
        if dir == Direction::GuestToHost {
            cmd.arg("-R");
        }
        if ctx.args.queue_pairs > 1 {
            cmd.args(["-P", &ctx.args.queue_pairs.to_string()]);
        }
        let diag = ctx.args.diag;
        let tap0 = diag.then(|| TapStats::read(ns));
        let perf_q = diag.then(|| PerfStat::start(qemu_pid)).flatten();
        let perf_d = daemon_pid.filter(|_| diag).and_then(PerfStat::start);
        let busy0 = host_busy_seconds();
        let q0 = cpu(qemu_pid, "QEMU")?;
        let d0 = daemon_pid.map(|p| cpu(p, "the daemon")).transpose()?;
        let t0 = Instant::now();
        let mut client = BackgroundProcess::spawn("iperf3", cmd).map_err(|e| e.to_string())?;
        let _w = watch(client.pid());
        let status = client.wait_timeout(timeout).map_err(|e| e.to_string())?;
        let wall = t0.elapsed();
        let q1 = cpu(qemu_pid, "QEMU")?;
        let d1 = daemon_pid.map(|p| cpu(p, "the daemon")).transpose()?;
        let busy = host_busy_seconds() - busy0;
        let mut d = Diag {
            qemu: perf_q.map(PerfStat::finish).unwrap_or_default(),
            daemon: perf_d.map(PerfStat::finish).unwrap_or_default(),
            ..Diag::default()
        };
        if let Some(before) = tap0 {
            d.tap = TapStats::read(ns).since(&before);
        }
        let log = client.log();
        let Some(status) = status else {
            return Err(format!(
                "{}: iperf3 did not finish within {timeout:?}\n{}",
                dir.name(),
                tail(&log, 30)
            ));
        };
        // iperf3 -J reports some errors (a refused connection among them) in its JSON
        // `"error"` and still exits with 0.
        let error = log.contains("\"error\":");
        if !status.success() || error {
            if log.contains("unable to connect")
                && Instant::now() < deadline
                && !INTERRUPTED.load(Ordering::SeqCst)
            {
                refused += 1;
                std::thread::sleep(Duration::from_millis(250));
                continue;
            }
            return Err(format!(
                "{}: iperf3 failed ({status})\n{}",
                dir.name(),
                tail(&log, 30)
            ));
        }
        let (bps, bytes) = parse_iperf3(&log).ok_or_else(|| {
            format!(
                "{}: no sum_received in iperf3's output\n{}",
                dir.name(),
                tail(&log, 30)
            )
        })?;
        if bytes <= 0.0 {
            return Err(format!("{}: iperf3 sent nothing", dir.name()));
        }
        d.retransmits = log
            .find("\"sum_sent\":")
            .and_then(|at| json_number(&log, at, "retransmits"));
        let t = Transfer {
            mbit_s: bps / 1e6,
            bytes,
            qemu_cpu: q1 - q0,
            daemon_cpu: d0.zip(d1).map(|(a, b)| b - a),
            wall,
            refused,
            others_cpu: busy - (q1 - q0) - d0.zip(d1).map_or(0.0, |(a, b)| b - a),
        };
        return Ok((t, d));
    }
}

/// Waits until QEMU has created the TAP in the namespace, then gives it the host address.
fn wait_for_tap(ns: &NetNs, vm: &RunningVm) -> Result<(), String> {
    let deadline = Instant::now() + TAP_TIMEOUT;
    while ns.ip(&["link", "show", "dev", TAP]).is_err() {
        if Instant::now() >= deadline || INTERRUPTED.load(Ordering::SeqCst) {
            return Err(format!(
                "QEMU did not create TAP {TAP} within {TAP_TIMEOUT:?}\n{}",
                tail(&vm.output(), 30)
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn configure_tap(ns: &NetNs) -> Result<(), String> {
    ns.ip(&["addr", "add", &format!("{HOST_ADDR}/24"), "dev", TAP])?;
    ns.ip(&["link", "set", TAP, "up"])
}

/// One guest boot against backend `b`: both transfers.
fn run_once(ctx: &Ctx, b: Backend, rep: u32) -> Result<[Transfer; 2], String> {
    let qp = ctx.args.queue_pairs;
    let ns = NetNs::create("tapb", &format!("{}-{rep}", b.tag()))?;
    ns.ip(&["link", "set", "lo", "up"])?;
    let tmp = TempDir::new("tapbench").map_err(|e| e.to_string())?;
    let socket = tmp.path().join("net.sock");
    let mut daemon = None;
    let mut _daemon_watch = Watched(None);
    let transfer_limit = Duration::from_secs(ctx.args.transfer_timeout) + CONNECT_RETRY;
    let vm = QemuVm::new(&ctx.kernel, &ctx.initrd)
        .netns(ns.name())
        .smp(u32::from(qp))
        .timeout(BOOT_TIMEOUT + 2 * transfer_limit + Duration::from_secs(30));
    let queues = if qp > 1 {
        format!(",queues={qp}")
    } else {
        String::new()
    };
    let vm = match b {
        Backend::Ours => {
            let mut cmd = ns.command(&ctx.ours.to_string_lossy());
            cmd.arg("--socket-path")
                .arg(&socket)
                .args(["--tap", TAP, "--mac", GUEST_MAC])
                .args(["--queue-pairs", &qp.to_string()])
                .env("RUST_LOG", if ctx.args.diag { "info" } else { "warn" });
            let mut d =
                BackgroundProcess::spawn("vhost-user-net", cmd).map_err(|e| e.to_string())?;
            _daemon_watch = watch(d.pid());
            d.wait_for_socket(&socket, Duration::from_secs(10))
                .map_err(|e| e.to_string())?;
            configure_tap(&ns).map_err(|e| format!("{e}\n----- daemon -----\n{}", d.log()))?;
            daemon = Some(d);
            vm.chardev_socket("c0", &socket)
                .args(["-netdev", &format!("vhost-user,id=n0,chardev=c0{queues}")])
        }
        Backend::QemuTap | Backend::QemuVhostNet => {
            let vhost = if b == Backend::QemuVhostNet {
                "on"
            } else {
                "off"
            };
            vm.args([
                "-netdev",
                &format!("tap,id=n0,ifname={TAP},script=no,downscript=no,vhost={vhost}{queues}"),
            ])
        }
    };
    let mut device = format!(
        "virtio-net-pci,netdev=n0,mac={GUEST_MAC},packed={},romfile=",
        if ctx.args.packed { "on" } else { "off" }
    );
    if qp > 1 {
        device.push_str(&format!(",mq=on,vectors={}", 2 * qp + 2));
    }
    let running = vm.device(&device).spawn().map_err(|e| e.to_string())?;
    let _vm_watch = watch(running.pid());
    let daemon_log = |daemon: &Option<BackgroundProcess>| {
        daemon.as_ref().map_or_else(String::new, |d| {
            format!("\n----- daemon log -----\n{}", tail(&d.log(), 30))
        })
    };
    let fail = |what: String, vm: &RunningVm, daemon: &Option<BackgroundProcess>| {
        format!(
            "{what}\n----- guest log (end) -----\n{}{}",
            tail(&vm.output(), 40),
            daemon_log(daemon)
        )
    };
    if b != Backend::Ours {
        wait_for_tap(&ns, &running)?;
        configure_tap(&ns).map_err(|e| fail(e, &running, &daemon))?;
    }
    let boot = Instant::now();
    running.wait_for_output(READY, BOOT_TIMEOUT).map_err(|e| {
        let msg = match &e {
            vring_tests::e2e::E2eError::Timeout { what, after, .. } => {
                format!("{what} timed out after {after:?}")
            }
            vring_tests::e2e::E2eError::Guest { reason, .. } => reason.clone(),
            other => other.to_string(),
        };
        fail(msg, &running, &daemon)
    })?;
    let log = running.output();
    let kv = |key: &str| {
        let prefix = format!("E2E-KV {key}=");
        log.lines()
            .find_map(|l| l.trim().strip_prefix(&prefix).map(str::to_owned))
            .unwrap_or_default()
    };
    let features = kv("features");
    let queues = kv("queues");
    if queues != qp.to_string() {
        return Err(fail(
            format!("the guest's eth0 has {queues:?} receive queues, wanted {qp}"),
            &running,
            &daemon,
        ));
    }
    let packed = features.as_bytes().get(F_RING_PACKED) == Some(&b'1');
    if packed != ctx.args.packed {
        return Err(fail(
            format!(
                "guest features {features}: packed ring {packed}, wanted {}",
                ctx.args.packed
            ),
            &running,
            &daemon,
        ));
    }
    eprintln!(
        "{}: guest ready {:.1}s after QEMU's start",
        b.name(),
        boot.elapsed().as_secs_f64()
    );
    let qemu_pid = running.pid().ok_or("QEMU has no pid")?;
    let daemon_pid = daemon.as_ref().and_then(BackgroundProcess::pid);
    let mut out = Vec::with_capacity(2);
    let mut diags = Vec::with_capacity(2);
    for dir in DIRECTIONS {
        let (t, d) = transfer(ctx, &ns, dir, qemu_pid, daemon_pid)
            .map_err(|e| fail(e, &running, &daemon))?;
        out.push(t);
        diags.push(d);
    }
    let vm_out = running.wait().map_err(|e| e.to_string())?;
    if ctx.args.diag {
        eprintln!("diag {}: the guest's virtio features {features}", b.name());
        for (i, ((dir, t), d)) in DIRECTIONS.iter().zip(&out).zip(&diags).enumerate() {
            print_diag(b, *dir, t, d, &vm_out.log, i + 1);
        }
    }
    if !vm_out.success() {
        return Err(format!(
            "guest script failed (E2E-EXIT={})\n{}",
            vm_out.exit_code,
            tail(&vm_out.log, 40)
        ));
    }
    if let Some(d) = daemon.as_mut() {
        if let Ok(Some(s)) = d.try_wait() {
            return Err(format!("our daemon exited ({s}){}", daemon_log(&daemon)));
        }
    }
    drop(_daemon_watch);
    if let Some(d) = daemon {
        let stopped = d.stop();
        if ctx.args.diag {
            if let Ok((_, log)) = &stopped {
                for l in log
                    .lines()
                    .filter(|l| l.contains("negotiated") || l.contains("counters"))
                {
                    eprintln!("diag daemon: {l}");
                }
            }
        }
        match stopped {
            Ok((status, _)) if status.success() => {}
            Ok((status, log)) => eprintln!(
                "{}: warning: our daemon did not exit cleanly on SIGTERM ({status})\n{}",
                b.name(),
                tail(&log, 20)
            ),
            Err(e) => eprintln!("{}: warning: stopping our daemon: {e}", b.name()),
        }
    }
    drop(ns);
    match (out.first(), out.get(1)) {
        (Some(&a), Some(&b)) => Ok([a, b]),
        _ => Err("missing transfers".into()),
    }
}

fn median(mut xs: Vec<f64>) -> Option<f64> {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => xs.get(n / 2).copied(),
        _ => Some((xs.get(n / 2 - 1)? + xs.get(n / 2)?) / 2.0),
    }
}

fn fmt_opt(x: Option<f64>, prec: usize) -> String {
    x.map_or_else(|| "—".to_owned(), |v| format!("{v:.prec$}"))
}

/// First line of `<program> --version` (for the report's header).
fn version(program: &Path, arg: &str) -> String {
    Command::new(program)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "?".into())
}

fn run(args: Args) -> Result<bool, String> {
    install_signal_thread()?;
    if args.reps == 0 || args.mib == 0 {
        return Err("--reps and --mib must be at least 1".into());
    }
    let ours = daemon_binary(args.ours.as_deref())?;
    let qemu = qemu_binary().map_err(|e| e.to_string())?;
    let kernel = GuestKernel::locate().map_err(|e| e.to_string())?;
    let initrd = Initramfs::new(&kernel)
        .modules(&["virtio_net"])
        .host_program(&args.iperf3, "iperf3")
        .map_err(|e| e.to_string())?
        .script(guest_script())
        .build()
        .map_err(|e| e.to_string())?;
    let mut backends = vec![Backend::Ours, Backend::QemuTap];
    let vhost_note = if Path::new("/dev/vhost-net").exists() {
        backends.push(Backend::QemuVhostNet);
        None
    } else {
        Some("QEMU tap with vhost=on was not run: /dev/vhost-net does not exist on this host")
    };
    if let Some(n) = vhost_note {
        eprintln!("tapbench: {n}");
    }
    let header = format!(
        "{} · guest kernel {} · {} · {} MiB per direction per run · {} ring · {} queue pair(s) · {} rep(s)",
        version(&qemu, "--version"),
        kernel.version(),
        version(&args.iperf3, "--version"),
        args.mib,
        if args.packed { "packed" } else { "split" },
        args.queue_pairs,
        args.reps,
    );
    eprintln!("tapbench: {header}");
    let ctx = Ctx {
        args,
        ours,
        kernel,
        initrd,
    };
    let started = Instant::now();
    // results[backend] = per rep [host→guest, guest→host]
    let mut results: Vec<Vec<[Transfer; 2]>> = vec![Vec::new(); backends.len()];
    let mut failures = 0u32;
    'reps: for rep in 0..ctx.args.reps {
        let mut order: Vec<usize> = (0..backends.len()).collect();
        if rep % 2 == 1 {
            order.reverse();
        }
        for i in order {
            if INTERRUPTED.load(Ordering::SeqCst) {
                break 'reps;
            }
            let (Some(&b), Some(res)) = (backends.get(i), results.get_mut(i)) else {
                continue;
            };
            let t0 = Instant::now();
            match run_once(&ctx, b, rep) {
                Ok(t) => {
                    for (dir, x) in DIRECTIONS.iter().zip(&t) {
                        eprintln!(
                            "rep {rep}, {}, {}: {:.0} Mbit/s, {:.1} MiB, client {:.2}s \
                             ({} refused), QEMU {:.2} CPU-s{}, other host load {:.2} CPUs",
                            b.name(),
                            dir.name(),
                            x.mbit_s,
                            x.bytes / 1_048_576.0,
                            x.wall.as_secs_f64(),
                            x.refused,
                            x.qemu_cpu,
                            x.daemon_cpu
                                .map(|d| format!(", daemon {d:.2} CPU-s"))
                                .unwrap_or_default(),
                            x.others_load()
                        );
                    }
                    eprintln!(
                        "rep {rep}, {}: run took {:.1}s",
                        b.name(),
                        t0.elapsed().as_secs_f64()
                    );
                    res.push(t);
                }
                Err(e) => {
                    failures += 1;
                    eprintln!("rep {rep}, {}: failed: {e}", b.name());
                }
            }
        }
    }
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err("interrupted".into());
    }
    eprintln!(
        "tapbench: {} runs in {:.0}s",
        results.iter().map(Vec::len).sum::<usize>(),
        started.elapsed().as_secs_f64()
    );

    println!("{header}\n");
    println!(
        "| direction | backend | Mbit/s (median) | Mbit/s (min–max) | QEMU CPU-s/GiB | \
         daemon CPU-s/GiB | QEMU + daemon CPU-s/GiB | other host load (CPUs) | runs |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    // medians[dir][backend] = (Mbit/s, total CPU-s/GiB, QEMU CPU-s/GiB)
    let mut medians = [Vec::new(), Vec::new()];
    for (d, dir) in DIRECTIONS.iter().enumerate() {
        for (b, runs) in backends.iter().zip(&results) {
            let xs: Vec<Transfer> = runs.iter().filter_map(|t| t.get(d).copied()).collect();
            let mbit: Vec<f64> = xs.iter().map(|x| x.mbit_s).collect();
            let lo = mbit.iter().copied().reduce(f64::min);
            let hi = mbit.iter().copied().reduce(f64::max);
            let m = median(mbit.clone());
            let q = median(xs.iter().map(Transfer::qemu_per_gib).collect());
            let dm = median(xs.iter().filter_map(Transfer::daemon_per_gib).collect());
            let tot = median(xs.iter().map(Transfer::total_per_gib).collect());
            let others = median(xs.iter().map(Transfer::others_load).collect());
            println!(
                "| {} | {} | {} | {}–{} | {} | {} | {} | {} | {} |",
                dir.name(),
                b.name(),
                fmt_opt(m, 0),
                fmt_opt(lo, 0),
                fmt_opt(hi, 0),
                fmt_opt(q, 1),
                fmt_opt(dm, 1),
                fmt_opt(tot, 1),
                fmt_opt(others, 2),
                xs.len()
            );
            if let Some(v) = medians.get_mut(d) {
                v.push((m, tot, q));
            }
        }
    }
    println!();
    for (d, dir) in DIRECTIONS.iter().enumerate() {
        let Some(v) = medians.get(d) else { continue };
        let Some(&(om, ot, oq)) = v.first() else {
            continue;
        };
        for (b, &(pm, pt, pq)) in backends.iter().zip(v).skip(1) {
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
                _ => "—".into(),
            };
            println!(
                "- {}, ours / {}: throughput {}, QEMU + daemon CPU per GiB {} (QEMU alone {})",
                dir.name(),
                b.name(),
                ratio(om, pm),
                ratio(ot, pt),
                ratio(oq, pq)
            );
        }
    }
    if let Some(n) = vhost_note {
        println!("- {n}.");
    }
    if failures > 0 {
        println!("- {failures} run(s) failed (see stderr).");
    }
    Ok(failures == 0)
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tapbench: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iperf3_json() {
        let j = r#"{"start":{},"intervals":[{"sum":{"bytes":5,"bits_per_second":1}}],
            "end":{"streams":[],"sum_sent":{"bytes":67108864,"bits_per_second":3.0e8},
            "sum_received":{"start":0,"end":2.5,"seconds":2.5,"bytes":67100000,
            "bits_per_second":214720000.5,"sender":false}}}"#;
        assert_eq!(parse_iperf3(j), Some((214_720_000.5, 67_108_864.0)));
        assert_eq!(parse_iperf3("{\"error\":\"x\"}"), None);
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
