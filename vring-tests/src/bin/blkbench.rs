// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `blkbench`: our vhost-user-blk daemon, qemu-storage-daemon and raw io_uring side by
//! side on the same file, driven by the userspace frontend (`vring_tests::frontend`).
//!
//! Every cell (storage × 4 KiB randread / randwrite × QD1 / QD32 × 1 / 2 queues by
//! default) runs for a fixed time against each backend. Storage is where the file lives,
//! the same for every backend: `tmpfs` (a file in /dev/shm), `pagecache` (a file on the
//! root file system, read once so that it is in the page cache, served buffered) and
//! `disk` (a file on the root file system written in full, served with `O_DIRECT`: our
//! `--direct`, qemu-storage-daemon's `cache.direct=on`, raw io_uring on an `O_DIRECT`
//! fd, so every request reaches the device). The report gives the report gives IOPS, p50/p99 latency, the
//! backend's CPU seconds (utime + stime of the backend process from /proc; for raw
//! io_uring the submitting threads' own CPU time), IOPS per backend CPU-second, and the
//! frontend's CPU, then checks the targets. Output: a Markdown table on stdout (and
//! `--markdown PATH`), and a grouped bar chart of IOPS (`--chart PATH.svg`).
//!
//! Backends run interleaved cell by cell (each daemon is started once per queue count and
//! first passes a short write / flush / read-back verification, unless `--no-verify`). A
//! backend that is missing or fails is reported as unavailable; the others still run.
//! `BLKBENCH_BACKEND_LOG` sets the daemons' `RUST_LOG` (default `warn`).
//!
//! ```text
//! cargo build --release -p vhost-user-blk -p vring-tests
//! target/release/blkbench --markdown bench.md --chart bench.svg
//! ```

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use io_uring::{opcode, types, IoUring};
use vring_tests::e2e::{repo_root, BackgroundProcess, TempDir};
use vring_tests::frontend::stats::{
    process_cpu_seconds, self_cpu_seconds, thread_cpu_time, LatencySummary,
};
use vring_tests::frontend::{
    BlkFrontend, CompletionMode, FrontendOptions, Limit, Workload, WorkloadOp,
};

/// Command line.
#[derive(Parser, Debug)]
#[command(
    name = "blkbench",
    about = "vhost-user-blk backends vs raw io_uring, side by side, through a userspace frontend"
)]
struct Args {
    /// Seconds per cell (measured part).
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Warm-up before each cell, in milliseconds (not measured).
    #[arg(long, default_value_t = 500)]
    warmup_ms: u64,
    /// The `tmpfs` storage's file (created and filled; keep it on tmpfs).
    #[arg(long, default_value = "/dev/shm/blkbench.img")]
    file: PathBuf,
    /// Directory of the `pagecache` and `disk` storages' files (default: `.cache/blkbench`
    /// in the workspace, on the root file system).
    #[arg(long)]
    disk_dir: Option<PathBuf>,
    /// Storages to run.
    #[arg(long, value_delimiter = ',', default_value = "tmpfs,pagecache,disk")]
    storage: Vec<StorageKind>,
    /// Size of the file in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Keep the file afterwards.
    #[arg(long)]
    keep_file: bool,
    /// Our daemon (default: target/release/vhost-user-blk in the workspace).
    #[arg(long)]
    ours: Option<PathBuf>,
    /// Extra argument for our daemon (repeatable), e.g. `--ours-arg=--poll-us=50`.
    #[arg(long = "ours-arg", allow_hyphen_values = true)]
    ours_args: Vec<String>,
    /// qemu-storage-daemon binary.
    #[arg(long, default_value = "/usr/bin/qemu-storage-daemon")]
    qsd: PathBuf,
    /// Backends to run.
    #[arg(long, value_delimiter = ',', default_value = "ours,qsd,raw")]
    backends: Vec<BackendKind>,
    /// Operations.
    #[arg(long, value_delimiter = ',', default_values_t = [OpKind::Randread, OpKind::Randwrite])]
    ops: Vec<OpKind>,
    /// Queue depths (per queue / per io_uring thread).
    #[arg(long, value_delimiter = ',', default_values_t = [1u16, 32])]
    depths: Vec<u16>,
    /// Queue counts (io_uring: thread counts).
    #[arg(long, value_delimiter = ',', default_values_t = [1u16, 2])]
    queues: Vec<u16>,
    /// Block size in bytes.
    #[arg(long, default_value_t = 4096)]
    bs: u32,
    /// Ring size the frontend sets up (our daemon accepts up to its --max-queue-size,
    /// 1024 by default).
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// Use packed rings with our daemon (qemu-storage-daemon has none).
    #[arg(long)]
    packed: bool,
    /// Submit requests as indirect descriptors where offered.
    #[arg(long)]
    indirect: bool,
    /// Frontend polls for completions instead of sleeping on the call eventfd.
    #[arg(long)]
    poll: bool,
    /// Skip the data-verification round run on each daemon before its cells.
    #[arg(long)]
    no_verify: bool,
    /// Write the Markdown report here too.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Write an SVG bar chart of IOPS here.
    #[arg(long)]
    chart: Option<PathBuf>,
}

/// A backend under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BackendKind {
    /// Our vhost-user-blk daemon.
    Ours,
    /// qemu-storage-daemon's vhost-user-blk export.
    Qsd,
    /// io_uring directly on the file (the limit).
    Raw,
}

impl BackendKind {
    fn label(self) -> &'static str {
        match self {
            BackendKind::Ours => "ours",
            BackendKind::Qsd => "qsd",
            BackendKind::Raw => "raw io_uring",
        }
    }

    fn color(self) -> &'static str {
        match self {
            BackendKind::Ours => "#d9534f",
            BackendKind::Qsd => "#5b8bd9",
            BackendKind::Raw => "#7f7f7f",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// Where the served file lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum StorageKind {
    /// A file on tmpfs.
    Tmpfs,
    /// A page-cached file on the root file system, served buffered.
    Pagecache,
    /// A file on the root file system, served with O_DIRECT.
    Disk,
}

impl std::fmt::Display for StorageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StorageKind::Tmpfs => "tmpfs",
            StorageKind::Pagecache => "pagecache",
            StorageKind::Disk => "disk",
        })
    }
}

/// The file of one storage.
#[derive(Clone, Debug)]
struct StorageFile {
    kind: StorageKind,
    path: PathBuf,
    /// Served with O_DIRECT.
    direct: bool,
}

/// A request type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OpKind {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
}

impl std::fmt::Display for OpKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OpKind::Randread => "randread",
            OpKind::Randwrite => "randwrite",
        })
    }
}

/// One cell of the matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cell {
    storage: StorageKind,
    op: OpKind,
    depth: u16,
    queues: u16,
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} QD{} {}q",
            self.storage, self.op, self.depth, self.queues
        )
    }
}

/// A measured cell.
#[derive(Clone, Debug)]
struct Measure {
    ops: u64,
    elapsed: Duration,
    lat: LatencySummary,
    backend_cpu: f64,
    /// The bench process's CPU besides the backend's (frontend threads; for raw io_uring
    /// kernel io-wq workers).
    other_cpu: f64,
}

impl Measure {
    fn iops(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Requests per backend CPU-second (None below one clock tick of CPU).
    fn iops_per_cpu(&self) -> Option<f64> {
        (self.backend_cpu >= 0.01).then(|| self.ops as f64 / self.backend_cpu)
    }

    /// Backend CPU per request, in µs (None below one clock tick of CPU).
    fn cpu_us_per_request(&self) -> Option<f64> {
        (self.backend_cpu >= 0.01 && self.ops > 0).then(|| self.backend_cpu * 1e6 / self.ops as f64)
    }
}

type Outcome = Result<Measure, String>;

/// Results: (backend, cell) → outcome.
struct Results {
    rows: Vec<(BackendKind, Cell, Outcome)>,
}

impl Results {
    fn get(&self, b: BackendKind, c: Cell) -> Option<&Measure> {
        self.rows
            .iter()
            .find(|(rb, rc, _)| *rb == b && *rc == c)
            .and_then(|(_, _, o)| o.as_ref().ok())
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blkbench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let t0 = Instant::now();
    if args.duration.is_nan() || args.duration <= 0.0 {
        return Err("--duration must be positive".into());
    }
    let duration = Duration::from_secs_f64(args.duration);
    let warmup = Duration::from_millis(args.warmup_ms);
    let size = args.size_mib << 20;
    let max_depth = args.depths.iter().copied().max().unwrap_or(1);
    let cells: Vec<Cell> = args
        .storage
        .iter()
        .flat_map(|&storage| {
            args.queues.iter().flat_map(move |&queues| {
                args.ops.iter().flat_map(move |&op| {
                    args.depths.iter().map(move |&depth| Cell {
                        storage,
                        op,
                        depth,
                        queues,
                    })
                })
            })
        })
        .collect();
    let disk_dir = args
        .disk_dir
        .clone()
        .unwrap_or_else(|| repo_root().join(".cache").join("blkbench"));
    eprintln!(
        "blkbench: {} cells x {} backends, {:.1} s each (+{} ms warm-up), {} MiB files",
        cells.len(),
        args.backends.len(),
        args.duration,
        args.warmup_ms,
        args.size_mib
    );
    let tmp = TempDir::new("blkbench").map_err(|e| e.to_string())?;

    // Backends run interleaved, cell by cell, so that a change in the host's load
    // over the run does not favour one of them.
    let mut results = Results { rows: Vec::new() };
    let mut queue_counts: Vec<u16> = Vec::new();
    for &nq in &args.queues {
        if !queue_counts.contains(&nq) {
            queue_counts.push(nq);
        }
    }
    let mut files = Vec::new();
    for &kind in &args.storage {
        let file = match kind {
            StorageKind::Tmpfs => StorageFile {
                kind,
                path: args.file.clone(),
                direct: false,
            },
            StorageKind::Pagecache => StorageFile {
                kind,
                path: disk_dir.join("pagecache.img"),
                direct: false,
            },
            StorageKind::Disk => StorageFile {
                kind,
                path: disk_dir.join("direct.img"),
                direct: true,
            },
        };
        if files.iter().any(|f: &StorageFile| f.kind == kind) {
            continue;
        }
        eprintln!("blkbench: preparing {} ({kind})", file.path.display());
        if let Some(dir) = file.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        prepare_file(&file.path, size, kind)?;
        for &nq in &queue_counts {
            run_storage(
                args,
                &tmp,
                &file,
                nq,
                &cells,
                max_depth,
                warmup,
                duration,
                size,
                &mut results,
            );
        }
        files.push(file);
    }
    if !args.keep_file {
        for f in &files {
            let _ = std::fs::remove_file(&f.path);
        }
    }
    let total = t0.elapsed();
    let md = markdown(args, &cells, &results, total);
    print!("{md}");
    if let Some(p) = &args.markdown {
        std::fs::write(p, &md).map_err(|e| format!("writing {}: {e}", p.display()))?;
    }
    if let Some(p) = &args.chart {
        let svg = chart(args, &cells, &results);
        std::fs::write(p, svg).map_err(|e| format!("writing {}: {e}", p.display()))?;
    }
    eprintln!("blkbench: done in {:.1} s", total.as_secs_f64());
    Ok(())
}

/// Runs every cell of storage `file` with `nq` queues, backends interleaved.
#[allow(clippy::too_many_arguments)]
fn run_storage(
    args: &Args,
    tmp: &TempDir,
    file: &StorageFile,
    nq: u16,
    cells: &[Cell],
    max_depth: u16,
    warmup: Duration,
    duration: Duration,
    size: u64,
    results: &mut Results,
) {
    let mut sessions: Vec<(BackendKind, Result<Session, String>)> = args
        .backends
        .iter()
        .filter(|&&b| b != BackendKind::Raw)
        .map(|&b| {
            let sock = tmp.path().join(format!("{b:?}-{}-{nq}.sock", file.kind));
            let s = Session::open(args, file, b, &sock, nq, max_depth);
            if let Err(e) = &s {
                eprintln!("  {b:>12} ({}, {nq} queues): unavailable: {e}", file.kind);
            }
            (b, s)
        })
        .collect();
    for cell in cells
        .iter()
        .copied()
        .filter(|c| c.queues == nq && c.storage == file.kind)
    {
        for &backend in &args.backends {
            let o = if backend == BackendKind::Raw {
                eprintln!("  {backend:>12} {cell} ...");
                let o = run_raw(file, size, cell, args.bs, warmup, duration);
                report_progress(&o);
                o
            } else {
                match sessions.iter_mut().find(|(b, _)| *b == backend) {
                    Some((_, Ok(session))) => {
                        eprintln!("  {backend:>12} {cell} ...");
                        let o = session.run_cell(cell, args.bs, warmup, duration);
                        report_progress(&o);
                        o
                    }
                    Some((_, Err(e))) => Err(e.clone()),
                    None => continue,
                }
            };
            results.rows.push((backend, cell, o));
        }
    }
    for (_, s) in sessions {
        if let Ok(s) = s {
            s.close();
        }
    }
}

fn report_progress(o: &Outcome) {
    match o {
        Ok(m) => eprintln!(
            "      {:>10.0} IOPS  p50 {:>7.1} us  p99 {:>7.1} us  backend CPU {:.2} s",
            m.iops(),
            us(m.lat.p50),
            us(m.lat.p99),
            m.backend_cpu
        ),
        Err(e) => eprintln!("      unavailable: {e}"),
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Creates the file, allocates it and writes every block (so reads hit real pages, or
/// real blocks on the device). A `pagecache` file is then read once, so that it is in the
/// page cache; a `disk` file is synced and dropped from it.
fn prepare_file(path: &Path, size: u64, kind: StorageKind) -> Result<(), String> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    let len = libc::off_t::try_from(size).map_err(|_| "file size too large".to_string())?;
    // SAFETY: posix_fallocate on an fd we own; no memory is passed.
    let r = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, len) };
    if r != 0 {
        return Err(format!(
            "posix_fallocate {}: {}",
            path.display(),
            std::io::Error::from_raw_os_error(r)
        ));
    }
    let chunk: Vec<u8> = (0..1u32 << 20)
        .map(|i| i.wrapping_mul(131).to_le_bytes()[0] | 1)
        .collect();
    let mut off = 0;
    while off < size {
        f.write_all_at(&chunk, off)
            .map_err(|e| format!("filling {}: {e}", path.display()))?;
        off += chunk.len() as u64;
    }
    if kind != StorageKind::Tmpfs {
        f.sync_all()
            .map_err(|e| format!("syncing {}: {e}", path.display()))?;
    }
    match kind {
        StorageKind::Tmpfs => {}
        StorageKind::Pagecache => {
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0;
            while off < size {
                f.read_exact_at(&mut buf, off)
                    .map_err(|e| format!("reading {}: {e}", path.display()))?;
                off += buf.len() as u64;
            }
        }
        StorageKind::Disk => {
            // SAFETY: posix_fadvise on an fd we own; no memory is passed.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
    Ok(())
}

/// A running daemon with a connected frontend.
struct Session {
    backend: BackendKind,
    daemon: BackgroundProcess,
    pid: u32,
    fe: BlkFrontend,
    /// Set once a cell failed: the connection is then in an unknown state.
    broken: Option<String>,
}

impl Session {
    /// Starts the daemon for `nq` queues, connects, and (unless `--no-verify`) runs a
    /// data-verification round.
    fn open(
        args: &Args,
        file: &StorageFile,
        backend: BackendKind,
        sock: &Path,
        nq: u16,
        max_depth: u16,
    ) -> Result<Session, String> {
        let daemon = start_daemon(args, file, backend, sock, nq)?;
        let pid = daemon.pid().ok_or("the daemon has no pid")?;
        let opts = FrontendOptions {
            queues: nq,
            queue_size: args.queue_size,
            packed: args.packed && backend == BackendKind::Ours,
            indirect: args.indirect,
            slots: max_depth,
            max_block_size: args.bs,
            completion: if args.poll {
                CompletionMode::Poll
            } else {
                CompletionMode::Interrupt
            },
            ..FrontendOptions::default()
        };
        let mut fe = BlkFrontend::connect(sock, opts)
            .map_err(|e| format!("connect: {e}{}", log_tail(&daemon)))?;
        if !args.no_verify {
            // A short write / flush / read-back round first: a backend that loses or
            // misplaces data gets no numbers.
            let mut w = Workload::new(WorkloadOp::Verify, args.bs, max_depth, Limit::Count(4096));
            w.span = Some(16 << 20);
            w.record_latencies = false;
            let r = fe
                .run_workload(&w)
                .map_err(|e| format!("data verification failed: {e}{}", log_tail(&daemon)))?;
            eprintln!(
                "  {backend:>12} ({nq} queues): verified {} blocks written and read back",
                r.verified_blocks
            );
        }
        Ok(Session {
            backend,
            daemon,
            pid,
            fe,
            broken: None,
        })
    }

    fn run_cell(&mut self, cell: Cell, bs: u32, warmup: Duration, duration: Duration) -> Outcome {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let o = run_frontend_cell(&mut self.fe, self.pid, cell, bs, warmup, duration)
            .map_err(|e| format!("{e}{}", log_tail(&self.daemon)));
        if o.is_err() || self.daemon.try_wait().ok().flatten().is_some() {
            self.broken = Some(format!("an earlier cell failed{}", log_tail(&self.daemon)));
        }
        o
    }

    /// Stops the rings (GET_VRING_BASE) and the daemon.
    fn close(self) {
        if self.broken.is_none() {
            if let Err(e) = self.fe.shutdown() {
                eprintln!("  {:>12}: shutdown: {e}", self.backend);
            }
        }
        match self.daemon.stop() {
            // With BLKBENCH_BACKEND_LOG set, the daemon's log is what was asked for.
            Ok((_, log)) if std::env::var_os("BLKBENCH_BACKEND_LOG").is_some() => {
                eprintln!("----- {} log -----\n{log}----- end -----", self.backend);
            }
            _ => {}
        }
    }
}

fn log_tail(p: &BackgroundProcess) -> String {
    let log = p.log();
    let lines: Vec<&str> = log.lines().rev().take(3).collect();
    if lines.is_empty() {
        String::new()
    } else {
        let tail: Vec<&str> = lines.into_iter().rev().collect();
        format!(" [{}: {}]", p.name(), tail.join(" | "))
    }
}

fn start_daemon(
    args: &Args,
    file: &StorageFile,
    backend: BackendKind,
    sock: &Path,
    nq: u16,
) -> Result<BackgroundProcess, String> {
    let _ = std::fs::remove_file(sock);
    let esc = |p: &Path| p.to_string_lossy().replace(',', ",,");
    let (name, mut cmd) = match backend {
        BackendKind::Ours => {
            let bin = args
                .ours
                .clone()
                .unwrap_or_else(|| repo_root().join("target/release/vhost-user-blk"));
            if !bin.is_file() {
                return Err(format!(
                    "{} not found (cargo build --release -p vhost-user-blk)",
                    bin.display()
                ));
            }
            let mut cmd = Command::new(bin);
            cmd.arg("--socket-path")
                .arg(sock)
                .arg("--blk-file")
                .arg(&file.path)
                .arg("--num-queues")
                .arg(nq.to_string())
                .args(&args.ours_args);
            if file.direct {
                cmd.arg("--direct");
            }
            ("vhost-user-blk", cmd)
        }
        BackendKind::Qsd => {
            if !args.qsd.is_file() {
                return Err(format!("{} not found", args.qsd.display()));
            }
            let mut cmd = Command::new(&args.qsd);
            cmd.arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=d,filename={},aio=io_uring,cache.direct={}",
                    esc(&file.path),
                    if file.direct { "on" } else { "off" }
                ))
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={},writable=on,num-queues={nq}",
                    esc(sock)
                ));
            ("qemu-storage-daemon", cmd)
        }
        BackendKind::Raw => return Err("raw io_uring has no daemon".into()),
    };
    cmd.env(
        "RUST_LOG",
        std::env::var("BLKBENCH_BACKEND_LOG").unwrap_or_else(|_| "warn".into()),
    );
    let mut p = BackgroundProcess::spawn(name, cmd).map_err(|e| e.to_string())?;
    match p.wait_for_socket(sock, Duration::from_secs(10)) {
        Ok(()) => Ok(p),
        Err(e) => {
            let first = e.to_string();
            let first = first.lines().next().unwrap_or("").to_string();
            Err(format!("{first}{}", log_tail(&p)))
        }
    }
}

fn run_frontend_cell(
    fe: &mut BlkFrontend,
    pid: u32,
    cell: Cell,
    bs: u32,
    warmup: Duration,
    duration: Duration,
) -> Result<Measure, String> {
    let op = match cell.op {
        OpKind::Randread => WorkloadOp::RandRead,
        OpKind::Randwrite => WorkloadOp::RandWrite,
    };
    if !warmup.is_zero() {
        let mut w = Workload::new(op, bs, cell.depth, Limit::Duration(warmup));
        w.record_latencies = false;
        fe.run_workload(&w).map_err(|e| e.to_string())?;
    }
    let w = Workload::new(op, bs, cell.depth, Limit::Duration(duration));
    let cpu = |pid| process_cpu_seconds(pid).map_err(|e| format!("/proc/{pid}/stat: {e}"));
    let (b0, s0) = (cpu(pid)?, self_cpu_seconds().map_err(|e| e.to_string())?);
    let r = fe.run_workload(&w).map_err(|e| e.to_string())?;
    let (b1, s1) = (cpu(pid)?, self_cpu_seconds().map_err(|e| e.to_string())?);
    Ok(Measure {
        ops: r.ops,
        elapsed: r.elapsed,
        lat: r.latency(),
        backend_cpu: b1 - b0,
        other_cpu: s1 - s0,
    })
}

/// One io_uring thread's result.
struct RawThread {
    ops: u64,
    lat: Vec<u64>,
    cpu: Duration,
    last: Instant,
}

fn run_raw(
    file: &StorageFile,
    size: u64,
    cell: Cell,
    bs: u32,
    warmup: Duration,
    duration: Duration,
) -> Outcome {
    if !warmup.is_zero() {
        raw_threads(file, size, cell, bs, warmup, 7)?;
    }
    let s0 = self_cpu_seconds().map_err(|e| e.to_string())?;
    let start = Instant::now();
    let threads = raw_threads(file, size, cell, bs, duration, 11)?;
    let s1 = self_cpu_seconds().map_err(|e| e.to_string())?;
    let end = threads.iter().map(|t| t.last).max().unwrap_or(start);
    let thread_cpu: f64 = threads.iter().map(|t| t.cpu.as_secs_f64()).sum();
    let mut lat: Vec<u64> = threads.iter().flat_map(|t| t.lat.iter().copied()).collect();
    Ok(Measure {
        ops: threads.iter().map(|t| t.ops).sum(),
        elapsed: end.saturating_duration_since(start),
        lat: LatencySummary::from_nanos(&mut lat),
        backend_cpu: thread_cpu,
        other_cpu: (s1 - s0 - thread_cpu).max(0.0),
    })
}

fn raw_threads(
    file: &StorageFile,
    size: u64,
    cell: Cell,
    bs: u32,
    duration: Duration,
    seed: u64,
) -> Result<Vec<RawThread>, String> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..cell.queues)
            .map(|t| {
                s.spawn(move || {
                    raw_thread(file, size, cell, bs, duration, seed ^ (u64::from(t) << 32))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("io_uring thread panicked".into()))
            })
            .collect()
    })
}

fn raw_thread(
    storage: &StorageFile,
    size: u64,
    cell: Cell,
    bs: u32,
    duration: Duration,
    seed: u64,
) -> Result<RawThread, String> {
    let write = cell.op == OpKind::Randwrite;
    let path = &storage.path;
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(if storage.direct { libc::O_DIRECT } else { 0 })
        .open(path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    let depth = usize::from(cell.depth.max(1));
    let entries = u32::from(cell.depth.max(1)).next_power_of_two();
    let mut ring = IoUring::new(entries).map_err(|e| format!("io_uring setup: {e}"))?;
    // 4 KiB-aligned buffers (O_DIRECT needs them): each slot's buffer starts at the next
    // 4 KiB boundary of its allocation.
    let mut bufs: Vec<Vec<u8>> = (0..depth)
        .map(|_| vec![0xa5u8; bs as usize + 4096])
        .collect();
    let mut submitted_at = vec![Instant::now(); depth];
    let mut free: Vec<usize> = (0..depth).rev().collect();
    let blocks = (size / u64::from(bs)).max(1);
    let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let fd = types::Fd(file.as_raw_fd());
    let mut lat = Vec::with_capacity(1 << 20);
    let mut ops = 0u64;
    let cpu0 = thread_cpu_time();
    let start = Instant::now();
    let deadline = start + duration;
    let mut last = start;
    let mut stop = false;
    loop {
        while let Some(slot) = if stop { None } else { free.pop() } {
            rng ^= rng >> 12;
            rng ^= rng << 25;
            rng ^= rng >> 27;
            let r = rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
            let block = u64::try_from((u128::from(r) * u128::from(blocks)) >> 64).unwrap_or(0);
            let off = block * u64::from(bs);
            let raw = bufs[slot].as_mut_ptr();
            let buf = raw.wrapping_add(raw.align_offset(4096));
            let sqe = if write {
                opcode::Write::new(fd, buf, bs).offset(off).build()
            } else {
                opcode::Read::new(fd, buf, bs).offset(off).build()
            }
            .user_data(slot as u64);
            submitted_at[slot] = Instant::now();
            // SAFETY: the buffer of `slot` stays alive and untouched until its completion
            // is reaped below (the slot is not free until then), and `file` outlives the
            // ring's use of its fd.
            unsafe { ring.submission().push(&sqe) }.map_err(|_| "submission queue full")?;
        }
        let in_flight = depth - free.len();
        if in_flight == 0 {
            break;
        }
        ring.submit_and_wait(1)
            .map_err(|e| format!("io_uring submit: {e}"))?;
        let now = Instant::now();
        for cqe in ring.completion() {
            let slot = usize::try_from(cqe.user_data()).unwrap_or(usize::MAX);
            if cqe.result() != i32::try_from(bs).unwrap_or(-1) {
                return Err(format!("io_uring request returned {}", cqe.result()));
            }
            let Some(t) = submitted_at.get(slot) else {
                return Err("bad io_uring user data".into());
            };
            lat.push(
                u64::try_from(now.saturating_duration_since(*t).as_nanos()).unwrap_or(u64::MAX),
            );
            free.push(slot);
            ops += 1;
            last = now;
        }
        if now >= deadline {
            stop = true;
        }
    }
    drop(bufs);
    Ok(RawThread {
        ops,
        lat,
        cpu: thread_cpu_time().saturating_sub(cpu0),
        last,
    })
}

// ---------------------------------------------------------------------------------------
// Report.

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "—".to_string(), |v| format!("{v:.prec$}"))
}

fn markdown(args: &Args, cells: &[Cell], res: &Results, total: Duration) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# blkbench\n");
    let _ = writeln!(
        s,
        "{} KiB requests on {} MiB files (preallocated and filled): `tmpfs` {}, `pagecache` and `disk` \
         under {} (the root file system: {}), `disk` served with O_DIRECT (ours `--direct`, qsd \
         `cache.direct=on`); {:.1} s per cell after a {} ms warm-up; \
         frontend: `vring_tests::frontend`, {} rings of {} entries{}, EVENT_IDX where offered, completions by {}. \
         Host: {} CPUs, kernel {}. Nothing is pinned: the frontend shares the CPUs with the backend.\n",
        args.bs / 1024,
        args.size_mib,
        args.file.display(),
        args.disk_dir
            .clone()
            .unwrap_or_else(|| repo_root().join(".cache").join("blkbench"))
            .display(),
        root_fs(),
        args.duration,
        args.warmup_ms,
        if args.packed { "packed (ours) / split (qsd)" } else { "split" },
        args.queue_size,
        if args.indirect { ", indirect descriptors" } else { "" },
        if args.poll { "polling" } else { "call eventfd" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    );
    let _ = writeln!(
        s,
        "| cell | backend | IOPS | p50 µs | p99 µs | backend CPU s | backend CPU µs/request | IOPS / backend CPU-s | frontend CPU s |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for &cell in cells {
        for &b in &args.backends {
            let Some((_, _, o)) = res.rows.iter().find(|(rb, rc, _)| *rb == b && *rc == cell)
            else {
                continue;
            };
            match o {
                Ok(m) => {
                    let other = if b == BackendKind::Raw {
                        if m.other_cpu >= 0.01 {
                            format!("— (io-wq {:.2})", m.other_cpu)
                        } else {
                            "—".to_string()
                        }
                    } else {
                        format!("{:.2}", m.other_cpu)
                    };
                    let _ = writeln!(
                        s,
                        "| {cell} | {b} | {:.0} | {:.1} | {:.1} | {:.2} | {} | {} | {other} |",
                        m.iops(),
                        us(m.lat.p50),
                        us(m.lat.p99),
                        m.backend_cpu,
                        fmt_opt(m.cpu_us_per_request(), 1),
                        fmt_opt(m.iops_per_cpu(), 0),
                    );
                }
                Err(e) => {
                    let e = e.replace('|', "\\|").replace('\n', " ");
                    let _ = writeln!(s, "| {cell} | {b} | unavailable: {e} | | | | | | |");
                }
            }
        }
    }
    let _ = writeln!(
        s,
        "\nbackend CPU: utime+stime of the backend process (/proc/PID/stat, 10 ms ticks) over the cell, \
         its io_uring worker threads included (they are threads of the process); \
         raw io_uring: the submitting threads' own CPU time. frontend CPU: this process \
         (the frontend's queue threads) over the cell.\n"
    );
    s.push_str(&targets(args, cells, res));
    let _ = writeln!(s, "\nTotal bench time: {:.1} s.", total.as_secs_f64());
    s
}

fn targets(args: &Args, cells: &[Cell], res: &Results) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## Targets\n");
    let _ = writeln!(s, "| target | cell | ours | reference | ratio | verdict |");
    let _ = writeln!(s, "|---|---|---:|---:|---:|---|");
    let mut summary: Vec<(String, Option<bool>)> = Vec::new();
    let has = |b| args.backends.contains(&b);
    let mut check = |s: &mut String,
                     name: &str,
                     cells: Vec<Cell>,
                     get: &dyn Fn(&Measure) -> Option<f64>,
                     reference: BackendKind,
                     want: &dyn Fn(f64, f64) -> bool,
                     ratio: &dyn Fn(f64, f64) -> f64| {
        let mut all: Option<bool> = None;
        if !has(BackendKind::Ours) || !has(reference) || cells.is_empty() {
            summary.push((name.to_string(), None));
            return;
        }
        for c in cells {
            let ours = res.get(BackendKind::Ours, c).and_then(get);
            let refv = res.get(reference, c).and_then(get);
            let (verdict, r) = match (ours, refv) {
                (Some(o), Some(r)) => {
                    let ok = want(o, r);
                    all = Some(all.unwrap_or(true) && ok);
                    (
                        if ok { "met" } else { "not met" },
                        format!("{:.2}", ratio(o, r)),
                    )
                }
                (None, _) => ("n/a (ours unavailable)", "—".into()),
                (_, None) => ("n/a (reference unavailable)", "—".into()),
            };
            let _ = writeln!(
                s,
                "| {name} | {c} | {} | {} | {r} | {verdict} |",
                fmt_opt(ours, 1),
                fmt_opt(refv, 1)
            );
        }
        summary.push((name.to_string(), all));
    };
    let pick = |storages: &[StorageKind], depth: Option<u16>| -> Vec<Cell> {
        cells
            .iter()
            .copied()
            .filter(|c| storages.contains(&c.storage) && depth.is_none_or(|d| c.depth == d))
            .collect()
    };
    let memory_like = [StorageKind::Tmpfs, StorageKind::Pagecache];
    check(
        &mut s,
        "tmpfs: QD32 IOPS/CPU-s ≥ 5× qsd",
        pick(&[StorageKind::Tmpfs], Some(32)),
        &|m| m.iops_per_cpu(),
        BackendKind::Qsd,
        &|o, r| o >= 5.0 * r,
        &|o, r| o / r,
    );
    check(
        &mut s,
        "pagecache: QD32 IOPS/CPU-s ≥ 3× qsd",
        pick(&[StorageKind::Pagecache], Some(32)),
        &|m| m.iops_per_cpu(),
        BackendKind::Qsd,
        &|o, r| o >= 3.0 * r,
        &|o, r| o / r,
    );
    check(
        &mut s,
        "tmpfs, pagecache: QD1 p50 ≤ 0.8× qsd",
        pick(&memory_like, Some(1)),
        &|m| Some(us(m.lat.p50)),
        BackendKind::Qsd,
        &|o, r| o <= 0.8 * r,
        &|o, r| o / r,
    );
    check(
        &mut s,
        "tmpfs, pagecache: QD1 CPU µs/request ≤ qsd",
        pick(&memory_like, Some(1)),
        &|m| m.cpu_us_per_request(),
        BackendKind::Qsd,
        &|o, r| o <= r,
        &|o, r| o / r,
    );
    check(
        &mut s,
        "disk: IOPS ≥ qsd",
        pick(&[StorageKind::Disk], None),
        &|m| Some(m.iops()),
        BackendKind::Qsd,
        &|o, r| o >= r,
        &|o, r| o / r,
    );
    check(
        &mut s,
        "disk: CPU µs/request ≤ 0.5× qsd",
        pick(&[StorageKind::Disk], None),
        &|m| m.cpu_us_per_request(),
        BackendKind::Qsd,
        &|o, r| o <= 0.5 * r,
        &|o, r| o / r,
    );
    check(
        &mut s,
        "IOPS ≥ 0.8× raw io_uring (informational)",
        cells.to_vec(),
        &|m| Some(m.iops()),
        BackendKind::Raw,
        &|o, r| o >= 0.8 * r,
        &|o, r| o / r,
    );
    let _ = writeln!(s);
    for (name, v) in summary {
        let verdict = match v {
            Some(true) => "**met**",
            Some(false) => "**not met**",
            None => "**n/a** (ours or the reference unavailable)",
        };
        let _ = writeln!(s, "- {name}: {verdict}");
    }
    s
}

/// The root file system's type, from /proc/mounts.
fn root_fs() -> String {
    std::fs::read_to_string("/proc/mounts")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(1) == Some(&"/"))
                    .then(|| format!("{} on {}", f.get(2).unwrap_or(&"?"), f[0]))
            })
        })
        .unwrap_or_else(|| "unknown".into())
}

/// A grouped bar chart: one group per cell, one bar per backend, height = IOPS.
fn chart(args: &Args, cells: &[Cell], res: &Results) -> String {
    let backends = &args.backends;
    let bar_w = 22.0;
    let gap = 34.0;
    let group_w = bar_w * backends.len() as f64 + gap;
    let (left, top, plot_h, bottom) = (80.0, 50.0, 300.0, 90.0);
    let width = left + group_w * cells.len() as f64 + 20.0;
    let height = top + plot_h + bottom;
    let max = res
        .rows
        .iter()
        .filter_map(|(_, _, o)| o.as_ref().ok().map(Measure::iops))
        .fold(0.0f64, f64::max);
    let step = nice_step(max / 5.0);
    let ymax = (max / step).ceil().max(1.0) * step;
    let y = |v: f64| top + plot_h - plot_h * v / ymax;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="20" font-size="14" font-weight="bold">IOPS, {} KiB requests, {:.0} s per cell</text>"#,
        args.bs / 1024,
        args.duration
    );
    let mut v = 0.0;
    while v <= ymax + step / 2.0 {
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            width - 20.0,
            left - 6.0,
            yy + 4.0,
            kilo(v)
        );
        v += step;
    }
    for (gi, &cell) in cells.iter().enumerate() {
        let gx = left + gap / 2.0 + group_w * gi as f64;
        for (bi, &b) in backends.iter().enumerate() {
            let x = gx + bar_w * bi as f64;
            match res.get(b, cell) {
                Some(m) => {
                    let h = m.iops();
                    let _ = writeln!(
                        s,
                        r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{b} {cell}: {:.0} IOPS</title></rect>"#,
                        y(h),
                        bar_w - 2.0,
                        top + plot_h - y(h),
                        b.color(),
                        h
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        r##"<text x="{:.1}" y="{:.1}" font-size="9" fill="#999" transform="rotate(-90 {:.1} {:.1})">n/a</text>"##,
                        x + bar_w / 2.0 + 3.0,
                        top + plot_h - 4.0,
                        x + bar_w / 2.0 + 3.0,
                        top + plot_h - 4.0
                    );
                }
            }
        }
        let cx = gx + bar_w * backends.len() as f64 / 2.0;
        let _ = writeln!(
            s,
            r#"<text x="{cx:.1}" y="{:.1}" text-anchor="middle">{} {}</text><text x="{cx:.1}" y="{:.1}" text-anchor="middle">QD{} {}q</text>"#,
            top + plot_h + 16.0,
            cell.storage,
            cell.op,
            top + plot_h + 30.0,
            cell.depth,
            cell.queues
        );
    }
    let _ = writeln!(
        s,
        r#"<line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"#,
        top + plot_h,
        width - 20.0,
        top + plot_h
    );
    for (bi, &b) in backends.iter().enumerate() {
        let lx = left + 150.0 * bi as f64;
        let ly = top + plot_h + 55.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="{ly:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{:.1}">{b}</text>"#,
            b.color(),
            lx + 16.0,
            ly + 10.0
        );
    }
    let _ = writeln!(s, "</svg>");
    s
}

fn nice_step(raw: f64) -> f64 {
    if raw.is_nan() || raw <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let n = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    n * mag
}

fn kilo(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.0}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}
