// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `netbench`: two DPDK testpmd `net_virtio_user` frontends (txonly → rxonly) through
//! (a) our vhost-user-net daemon in switch mode and (b) DPDK's own vhost PMD forwarding
//! between two vhost ports (a third testpmd, `io` forwarding), 64- and 1500-byte frames,
//! large rings (`queue_size=32768 --rxd=32768 --txd=32768`), several repetitions, backends
//! interleaved. Reports received Mpps at the rxonly frontend and packets per backend
//! CPU-second (utime + stime of the backend process from /proc). Markdown on stdout.
//!
//! ```text
//! cargo build --release -p vhost-user-net -p vring-tests
//! target/release/netbench --reps 3 --seconds 2
//! ```
//!
//! On a 2-core host the two busy-polling frontends and the backend share the CPUs: the
//! numbers compare backends under the same contention, not their peak rates. Placement
//! of the frontends is fixed: the sending one runs on CPU 0, the receiving one on CPU 1;
//! DPDK's backend runs on lcore 0 (CPU 0, where DPDK pins it); our daemon runs wherever
//! the scheduler puts it, or with `--ours-cpus 0` (`taskset -c 0`) on CPU 0 as DPDK's
//! backend does. Rows per `--poll-us` and `--switch-threads` value.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use clap::Parser;
use vring_tests::e2e::dpdk::{FwdMode, RunningTestPmd, TestPmd, VirtioUserOptions};
use vring_tests::e2e::{repo_root, BackgroundProcess, TempDir};
use vring_tests::frontend::stats::process_cpu_seconds;

const MAC1: &str = "02:00:00:00:00:11";
const MAC2: &str = "02:00:00:00:00:22";
const RING: u16 = 32768;

/// Command line.
#[derive(Parser, Debug)]
#[command(
    name = "netbench",
    about = "virtio-net switch throughput: our daemon vs DPDK vhost"
)]
struct Args {
    /// Repetitions of every cell.
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// Seconds measured per run.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Frame sizes (bytes, testpmd --txpkts).
    #[arg(long, value_delimiter = ',', default_value = "64,1500")]
    sizes: Vec<u32>,
    /// Our daemon's `--poll-us` values, one row each (0: event-driven workers).
    #[arg(long, value_delimiter = ',', default_value = "0,100")]
    poll_us: Vec<u64>,
    /// Our daemon's `--switch-threads` values, one row each with every `--poll-us` (1:
    /// both ports on one thread; 0: a thread per port).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    switch_threads: Vec<usize>,
    /// CPUs our daemon runs on (`taskset -c`; `0`: where DPDK's backend runs, next to
    /// the sending frontend); empty (the default): wherever the scheduler puts it, as an
    /// operator would run it.
    #[arg(long, default_value = "")]
    ours_cpus: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    /// Our daemon with this `--poll-us` and `--switch-threads`.
    Ours {
        poll_us: u64,
        threads: usize,
    },
    Dpdk,
}

impl Backend {
    fn name(self) -> String {
        match self {
            Backend::Ours { poll_us, threads } => {
                let mut n = format!("vhost-user-net --switch --switch-threads {threads}");
                if poll_us > 0 {
                    n.push_str(&format!(" --poll-us {poll_us}"));
                }
                n
            }
            Backend::Dpdk => "DPDK vhost PMD (testpmd io)".into(),
        }
    }
}

/// `NETBENCH_BACKEND_LOG=1`: our daemon logs at info level (its per-port counters when
/// the frontends leave) and the log is printed after each run.
fn show_log() -> bool {
    std::env::var_os("NETBENCH_BACKEND_LOG").is_some_and(|v| !v.is_empty())
}

fn daemon_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("E2E_VHOST_USER_NET").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    repo_root().join("target/release/vhost-user-net")
}

/// A running backend: the process whose CPU time is counted.
enum Running {
    Ours(BackgroundProcess),
    Dpdk(RunningTestPmd),
}

impl Running {
    fn pid(&self) -> Option<u32> {
        match self {
            Running::Ours(p) => p.pid(),
            Running::Dpdk(p) => p.pid(),
        }
    }
}

fn start_backend(b: Backend, s0: &Path, s1: &Path, cpus: &str) -> Result<Running, String> {
    match b {
        Backend::Ours { poll_us, threads } => {
            let mut cmd = if cpus.is_empty() {
                Command::new(daemon_binary())
            } else {
                let mut c = Command::new("taskset");
                c.args(["-c", cpus]).arg(daemon_binary());
                c
            };
            cmd.arg("--switch")
                .arg(s0)
                .arg("--switch")
                .arg(s1)
                .args(["--queue-size", &RING.to_string()])
                .args(["--poll-us", &poll_us.to_string()])
                .args(["--switch-threads", &threads.to_string()])
                .env("RUST_LOG", if show_log() { "info" } else { "warn" });
            let mut p =
                BackgroundProcess::spawn("vhost-user-net", cmd).map_err(|e| e.to_string())?;
            for s in [s0, s1] {
                p.wait_for_socket(s, Duration::from_secs(10))
                    .map_err(|e| format!("{e}\n{}", p.log()))?;
            }
            Ok(Running::Ours(p))
        }
        Backend::Dpdk => {
            let mut p = TestPmd::new("netbench-vhost")
                .cpu(0)
                .vhost_backend(s0, None)
                .vhost_backend(s1, None)
                .app_arg("--total-num-mbufs=81920")
                .spawn()
                .map_err(|e| e.to_string())?;
            p.set_fwd(FwdMode::Io).map_err(|e| e.to_string())?;
            p.start().map_err(|e| e.to_string())?;
            Ok(Running::Dpdk(p))
        }
    }
}

fn frontend(
    which: u8,
    sock: &Path,
    mac: &str,
    cpu: u32,
    size: u32,
) -> Result<RunningTestPmd, String> {
    let opts = VirtioUserOptions {
        queue_size: Some(RING),
        ..Default::default()
    };
    TestPmd::new(&format!("netbench-fe{which}"))
        .cpu(cpu)
        .memory_mb(1024)
        .virtio_user(sock, mac, &opts)
        .app_arg("--total-num-mbufs=81920")
        .app_arg(format!("--rxd={RING}"))
        .app_arg(format!("--txd={RING}"))
        .app_arg(format!("--txpkts={size}"))
        .spawn()
        .map_err(|e| format!("frontend {which}: {e}"))
}

/// One run: (packets received by frontend 2 in the window, seconds, backend CPU seconds).
fn run(b: Backend, size: u32, seconds: f64, cpus: &str) -> Result<(u64, f64, f64), String> {
    let tmp = TempDir::new("netbench").map_err(|e| e.to_string())?;
    let s0 = tmp.path().join("s0.sock");
    let s1 = tmp.path().join("s1.sock");
    let backend = start_backend(b, &s0, &s1, cpus)?;
    let mut fe1 = frontend(1, &s0, MAC1, 0, size)?;
    let mut fe2 = frontend(2, &s1, MAC2, 1, size)?;
    let e = |e: vring_tests::e2e::E2eError| e.to_string();
    // Frontend 2 makes itself known (switch learning), then receives.
    fe2.command(&format!("set eth-peer 0 {MAC1}")).map_err(e)?;
    fe2.set_fwd(FwdMode::TxOnly).map_err(e)?;
    fe2.start().map_err(e)?;
    std::thread::sleep(Duration::from_millis(100));
    fe2.stop().map_err(e)?;
    fe2.set_fwd(FwdMode::RxOnly).map_err(e)?;
    fe2.start().map_err(e)?;
    fe1.command(&format!("set eth-peer 0 {MAC2}")).map_err(e)?;
    fe1.set_fwd(FwdMode::TxOnly).map_err(e)?;
    fe1.start().map_err(e)?;
    // Warm-up, then the measured window.
    std::thread::sleep(Duration::from_millis(500));
    let pid = backend.pid().ok_or("the backend has no pid")?;
    let rx0 = fe2.port(0).map_err(e)?.rx_packets;
    let cpu0 = process_cpu_seconds(pid).map_err(|e| e.to_string())?;
    let t0 = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let rx1 = fe2.port(0).map_err(e)?.rx_packets;
    let cpu1 = process_cpu_seconds(pid).map_err(|e| e.to_string())?;
    let dt = t0.elapsed().as_secs_f64();
    let _ = fe1.stop();
    let _ = fe2.stop();
    let _ = fe1.quit(Duration::from_secs(10));
    let _ = fe2.quit(Duration::from_secs(10));
    if let (true, Running::Ours(p)) = (show_log(), &backend) {
        std::thread::sleep(Duration::from_millis(200));
        eprintln!("--- {} log ---\n{}", b.name(), p.log());
    }
    drop(backend);
    Ok((rx1.saturating_sub(rx0), dt, cpu1 - cpu0))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut backends: Vec<Backend> = args
        .switch_threads
        .iter()
        .flat_map(|&threads| {
            args.poll_us
                .iter()
                .map(move |&poll_us| Backend::Ours { poll_us, threads })
        })
        .collect();
    backends.push(Backend::Dpdk);
    // results[size][backend] = (Mpps, pkts per CPU-second) per rep
    let mut rows = Vec::new();
    for &size in &args.sizes {
        let mut per: Vec<Vec<(f64, f64)>> = vec![Vec::new(); backends.len()];
        for rep in 0..args.reps {
            for (i, &b) in backends.iter().enumerate() {
                match run(b, size, args.seconds, &args.ours_cpus) {
                    Ok((pkts, dt, cpu)) => {
                        let mpps = pkts as f64 / dt / 1e6;
                        let per_cpu = if cpu > 0.0 { pkts as f64 / cpu } else { 0.0 };
                        eprintln!(
                            "{size} B, rep {rep}, {}: {pkts} packets in {dt:.2}s = {mpps:.3} Mpps, backend CPU {cpu:.2}s",
                            b.name()
                        );
                        if let Some(v) = per.get_mut(i) {
                            v.push((mpps, per_cpu));
                        }
                    }
                    Err(err) => eprintln!("{size} B, rep {rep}, {}: failed: {err}", b.name()),
                }
            }
        }
        rows.push((size, per));
    }
    println!(
        "| frame | backend | Mpps (median) | Mpps (min–max) | Gbit/s (median) | packets / backend CPU-s (median) | Mpps vs DPDK | packets/CPU-s vs DPDK | runs |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let med = |mut xs: Vec<f64>| {
        xs.sort_by(f64::total_cmp);
        xs.get(xs.len() / 2).copied().unwrap_or(0.0)
    };
    for (size, per) in rows {
        // The medians of DPDK's row, the reference of the ratios.
        let dpdk = backends
            .iter()
            .zip(&per)
            .find(|(b, _)| **b == Backend::Dpdk)
            .map(|(_, v)| {
                (
                    med(v.iter().map(|x| x.0).collect()),
                    med(v.iter().map(|x| x.1).collect()),
                )
            });
        for (b, v) in backends.iter().zip(per) {
            let mpps: Vec<f64> = v.iter().map(|x| x.0).collect();
            let pc: Vec<f64> = v.iter().map(|x| x.1).collect();
            let lo = mpps.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = mpps.iter().copied().fold(0.0, f64::max);
            let (m, c) = (med(mpps.clone()), med(pc));
            // Ethernet frame bits (testpmd's --txpkts is the frame without FCS).
            let gbits = m * 1e6 * f64::from(size) * 8.0 / 1e9;
            let ratio = |x: f64, r: f64| {
                if r > 0.0 {
                    format!("{:.2}×", x / r)
                } else {
                    "–".into()
                }
            };
            let (rm, rc) = match (b, dpdk) {
                (Backend::Ours { .. }, Some((dm, dc))) => (ratio(m, dm), ratio(c, dc)),
                _ => ("–".into(), "–".into()),
            };
            println!(
                "| {size} B | {} | {m:.3} | {:.3}–{hi:.3} | {gbits:.2} | {c:.0} | {rm} | {rc} | {} |",
                b.name(),
                if lo.is_finite() { lo } else { 0.0 },
                mpps.len()
            );
        }
    }
    ExitCode::SUCCESS
}
