// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `consolebench`: our vhost-user-console daemon against rust-vmm's
//! `vhost-device-console` 0.1.0, both driven by the userspace console frontend
//! (`vring_tests::frontend::console`) at the same queue size (128 by default: the most
//! `vhost-device-console` accepts), one port, no MULTIPORT.
//!
//! Host sides: ours serves the port on a unix socket (`--port socket=PATH`);
//! `vhost-device-console` has no unix-socket host side, its only non-stdio one is a TCP
//! listener on 127.0.0.1 (`--backend network --tcp-port N`), so the host-side client of
//! the peer talks TCP over loopback. Each measurement starts a fresh backend process and
//! frontend:
//!
//! - guest→host: the frontend sends `--mib` MiB of an ASCII pattern in 4 KiB transmit
//!   chains; the host client reads and checks every byte; time from the first chain to
//!   the last byte read;
//! - host→guest: the host client writes `--mib` MiB (`--peer-h2g-mib` for the peer, see
//!   below); the frontend keeps 128 receive buffers posted and checks every byte;
//! - echo: the frontend sends 1 byte, the host client echoes it, the frontend waits for
//!   it on the receiveq; `--echo-rounds` round trips, p50/p99.
//!
//! `vhost-device-console` 0.1.0's receive path calls `add_used` once per byte written
//! into a buffer (the same head again and again), pops receive buffers it has no input
//! for without ever returning them, and with EVENT_IDX stops updating `avail_event`
//! after a receiveq kick that found no input. The frontend works around it, for the
//! peer only: 1-byte receive buffers (each is then used exactly once; `--peer-rx-buf
//! 4096` shows the repeated used id otherwise), a kick after every batch of buffers
//! whatever the event index says, and for the echo no EVENT_IDX and no receiveq kick
//! (the one buffer, posted before the byte is sent, is found when the echo arrives).
//! Our daemon gets 4 KiB receive buffers, EVENT_IDX and kicks only when asked; in the
//! echo, one receive buffer posted before the byte is sent, as for the peer.
//!
//! Then the guest rows (`--vm-reps`, `--vm-mib`): a busybox guest moves the same
//! amount each way through `/dev/hvc0` (held open, `stty raw -echo`): guest→host `dd
//! if=/dev/zero of=/dev/hvc0 bs=4096`, host→guest `head -c N /dev/hvc0 | wc -c` then one
//! acknowledgement byte back; the host side times each from the byte that starts it to
//! the last byte (or the acknowledgement). (b) QEMU's built-in virtio console in a
//! QEMU TCG guest (`-device virtio-serial-pci -device virtconsole,chardev=c0 -chardev
//! socket,...,server=on,wait=off`, the Debian guest kernel's `virtio_console` and the
//! virtio PCI modules insmod-ed); against it our daemon under user-mode Linux, since
//! QEMU 10.0 cannot attach a generic vhost-user device. The guests differ (TCG-emulated
//! x86 vs UML), so these rows show what a user would pick instead, not a controlled
//! ratio; no CPU figure is given for them (QEMU's CPU time is mostly the emulated guest).
//!
//! Repetitions interleave the backends. Reported: MiB/s, MiB per backend CPU-second
//! (utime + stime of the backend process from /proc over the measured part), latency,
//! and ours/peer ratios. Markdown on stdout.
//!
//! ```text
//! cargo build --release -p vhost-user-console -p vring-tests
//! target/release/consolebench --reps 5 --mib 16
//! ```
//!
//! The peer is installed on first use with
//! `cargo install --locked --version 0.1.0 --root .cache/peers vhost-device-console`
//! (or give its path in `VHOST_DEVICE_CONSOLE`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Parser;
use vring_tests::e2e::{repo_root, BackgroundProcess, TempDir};
use vring_tests::e2e::{
    uml_kernel, GuestKernel, Initramfs, QemuVm, RunningVm, UmlVm, SCRIPT_PRELUDE,
};
use vring_tests::frontend::console::{ConsoleFrontend, ConsoleOptions};
use vring_tests::frontend::stats::{process_cpu_seconds, LatencySummary};

const TIMEOUT: Duration = Duration::from_secs(20);
const MIB: usize = 1 << 20;
/// The pattern: printable ASCII (the peer turns guest output into a `String` and panics
/// on invalid UTF-8), a prime length so chain boundaries wander through it.
const PATTERN_LEN: usize = 89;

fn pattern_byte(offset: usize) -> u8 {
    // 89 printable characters from '!'.
    b'!' + u8::try_from(offset % PATTERN_LEN).unwrap_or(0)
}

fn pattern(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len).map(pattern_byte).collect()
}

/// Checks `data` against the pattern at `offset`.
fn check(data: &[u8], offset: usize, what: &str) -> Result<(), String> {
    match data
        .iter()
        .enumerate()
        .find(|(i, &b)| b != pattern_byte(offset + i))
    {
        None => Ok(()),
        Some((i, &b)) => Err(format!(
            "{what}: byte {} is {b:#x}, expected {:#x}",
            offset + i,
            pattern_byte(offset + i)
        )),
    }
}

/// Command line.
#[derive(Parser, Debug)]
#[command(
    name = "consolebench",
    about = "vhost-user-console vs vhost-device-console: throughput and echo latency"
)]
struct Args {
    /// Repetitions of every measurement (backends interleaved).
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// MiB per throughput run.
    #[arg(long, default_value_t = 16)]
    mib: usize,
    /// MiB of the peer's host→guest runs (its 1-byte receive buffers make it slow).
    #[arg(long, default_value_t = 1)]
    peer_h2g_mib: usize,
    /// Echo round trips per run.
    #[arg(long, default_value_t = 2000)]
    echo_rounds: usize,
    /// Ring size of both queues.
    #[arg(long, default_value_t = 128)]
    queue_size: u16,
    /// Also run our daemon with packed rings (the peer offers none).
    #[arg(long)]
    packed: bool,
    /// Measurements to run (comma-separated: g2h, h2g, echo).
    #[arg(long, value_delimiter = ',', default_value = "g2h,h2g,echo")]
    phases: Vec<String>,
    /// Guest runs per VM (QEMU's virtio-console under TCG, ours under user-mode Linux);
    /// 0 skips them.
    #[arg(long, default_value_t = 3)]
    vm_reps: u32,
    /// MiB each way in a VM run.
    #[arg(long, default_value_t = 4)]
    vm_mib: usize,
    /// Receive buffer size given to the peer.
    #[arg(long, default_value_t = 1)]
    peer_rx_buf: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Ours { packed: bool },
    Peer,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Ours { packed: false } => "vhost-user-console (split)",
            Backend::Ours { packed: true } => "vhost-user-console (packed)",
            Backend::Peer => "vhost-device-console 0.1.0 (split)",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    GuestToHost,
    HostToGuest,
    Echo,
}

fn our_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("E2E_VHOST_USER_CONSOLE").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let p = repo_root().join("target/release/vhost-user-console");
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "{} is not built: cargo build --release -p vhost-user-console",
            p.display()
        ))
    }
}

/// The peer's binary, installed with cargo into `.cache/peers` when missing.
fn peer_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("VHOST_DEVICE_CONSOLE").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let root = repo_root().join(".cache/peers");
    let bin = root.join("bin/vhost-device-console");
    if bin.is_file() {
        return Ok(bin);
    }
    eprintln!(
        "installing vhost-device-console 0.1.0 into {}",
        root.display()
    );
    let status = Command::new("cargo")
        .args(["install", "--locked", "--version", "0.1.0", "--root"])
        .arg(&root)
        .arg("vhost-device-console")
        .status()
        .map_err(|e| format!("running cargo install: {e}"))?;
    if !status.success() || !bin.is_file() {
        return Err(format!(
            "cargo install vhost-device-console failed ({status})"
        ));
    }
    Ok(bin)
}

/// The host-side connection of a port.
enum Host {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Host {
    fn reader(&self) -> Result<Box<dyn Read + Send>, String> {
        let e = |e: std::io::Error| format!("duplicating the host connection: {e}");
        Ok(match self {
            Host::Unix(s) => Box::new(s.try_clone().map_err(e)?),
            Host::Tcp(s) => Box::new(s.try_clone().map_err(e)?),
        })
    }

    fn writer(&self) -> Result<Box<dyn Write + Send>, String> {
        let e = |e: std::io::Error| format!("duplicating the host connection: {e}");
        Ok(match self {
            Host::Unix(s) => Box::new(s.try_clone().map_err(e)?),
            Host::Tcp(s) => Box::new(s.try_clone().map_err(e)?),
        })
    }
}

/// A running backend, its vhost-user socket and its host-side connection.
struct Running {
    process: BackgroundProcess,
    socket: PathBuf,
    host: Host,
    _dir: TempDir,
}

/// The backends' `RUST_LOG`: `CONSOLEBENCH_BACKEND_LOG`, default `warn`.
fn backend_log() -> String {
    std::env::var("CONSOLEBENCH_BACKEND_LOG").unwrap_or_else(|_| "warn".into())
}

fn free_tcp_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("binding a TCP port: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("local address: {e}"))
}

fn start(b: Backend, replay_mib: usize) -> Result<Running, String> {
    let dir = TempDir::new("consolebench").map_err(|e| e.to_string())?;
    match b {
        Backend::Ours { .. } => {
            let socket = dir.path().join("vhost.sock");
            let port = dir.path().join("port0.sock");
            let mut cmd = Command::new(our_binary()?);
            cmd.arg("--socket-path")
                .arg(&socket)
                .arg("--port")
                .arg(format!("socket={}", port.display()))
                // Output the host side cannot take yet waits in the replay buffer and
                // its oldest bytes are dropped beyond it (the guest is never stalled):
                // make it hold a whole run, so that the check sees every byte.
                .arg("--replay-bytes")
                .arg(format!("{}M", (replay_mib).clamp(1, 1024)))
                .env("RUST_LOG", backend_log());
            let mut p =
                BackgroundProcess::spawn("vhost-user-console", cmd).map_err(|e| e.to_string())?;
            for s in [&socket, &port] {
                p.wait_for_socket(s, Duration::from_secs(10))
                    .map_err(|e| e.to_string())?;
            }
            let host = UnixStream::connect(&port)
                .map_err(|e| format!("connecting to {}: {e}", port.display()))?;
            host.set_read_timeout(Some(TIMEOUT))
                .and_then(|()| host.set_write_timeout(Some(TIMEOUT)))
                .map_err(|e| format!("socket timeouts: {e}"))?;
            Ok(Running {
                process: p,
                socket,
                host: Host::Unix(host),
                _dir: dir,
            })
        }
        Backend::Peer => {
            let base = dir.path().join("vdc.sock");
            let tcp = free_tcp_port()?;
            let mut cmd = Command::new(peer_binary()?);
            cmd.arg("--socket-path")
                .arg(&base)
                .args(["--backend", "network", "--tcp-port", &tcp.to_string()])
                .env("RUST_LOG", backend_log());
            let mut p =
                BackgroundProcess::spawn("vhost-device-console", cmd).map_err(|e| e.to_string())?;
            // The peer suffixes the socket path with the guest index.
            let socket = dir.path().join("vdc.sock0");
            p.wait_for_socket(&socket, Duration::from_secs(10))
                .map_err(|e| e.to_string())?;
            let deadline = Instant::now() + Duration::from_secs(10);
            let host = loop {
                match TcpStream::connect(("127.0.0.1", tcp)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        log::debug!("connecting to 127.0.0.1:{tcp}: {e}");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => return Err(format!("connecting to 127.0.0.1:{tcp}: {e}")),
                }
            };
            host.set_nodelay(true)
                .and_then(|()| host.set_read_timeout(Some(TIMEOUT)))
                .and_then(|()| host.set_write_timeout(Some(TIMEOUT)))
                .map_err(|e| format!("TCP options: {e}"))?;
            Ok(Running {
                process: p,
                socket,
                host: Host::Tcp(host),
                _dir: dir,
            })
        }
    }
}

/// One measurement: bytes moved (or round trips), seconds, backend CPU seconds, and
/// the echo latencies.
struct Sample {
    bytes: usize,
    seconds: f64,
    cpu: f64,
    latencies: Vec<u64>,
}

fn join<T>(h: JoinHandle<Result<T, String>>, what: &str) -> Result<T, String> {
    h.join()
        .map_err(|_| format!("{what} thread panicked"))
        .and_then(|r| r)
}

fn run(b: Backend, phase: Phase, args: &Args) -> Result<Sample, String> {
    let r = start(b, args.mib + 1)?;
    let result = measure(b, phase, args, &r);
    if result.is_err() && std::env::var_os("CONSOLEBENCH_BACKEND_LOG").is_some() {
        eprintln!("{} log:\n{}", b.name(), r.process.log());
    }
    result
}

fn measure(b: Backend, phase: Phase, args: &Args, r: &Running) -> Result<Sample, String> {
    let (packed, rx_buf_len) = match b {
        Backend::Ours { packed } => (packed, 4096),
        Backend::Peer => (false, args.peer_rx_buf),
    };
    let rx_depth = if phase == Phase::Echo {
        1
    } else {
        args.queue_size
    };
    let opts = ConsoleOptions {
        queue_size: args.queue_size,
        packed,
        rx_buf_len,
        rx_depth,
        timeout: TIMEOUT,
        kick_always: b == Backend::Peer,
        // The peer's echo: see the module documentation.
        event_idx: !(b == Backend::Peer && phase == Phase::Echo),
        rx_kick: !(b == Backend::Peer && phase == Phase::Echo),
        ..ConsoleOptions::default()
    };
    let fe_err = |e: vring_tests::frontend::FrontendError| e.to_string();
    let mut fe = ConsoleFrontend::connect(&r.socket, opts).map_err(fe_err)?;
    // One byte out first: the peer only accepts host input after the guest transmitted
    // (`ready_to_write`), and it shows that both connections work.
    fe.send(b"S").map_err(fe_err)?;
    fe.flush().map_err(fe_err)?;
    let mut reader = r.host.reader()?;
    let mut sync = [0u8; 1];
    reader
        .read_exact(&mut sync)
        .map_err(|e| format!("host side: reading the first byte: {e}"))?;
    if sync != *b"S" {
        return Err(format!(
            "host side: first byte {:#x}, expected 'S'",
            sync[0]
        ));
    }
    let pid = r.process.pid().ok_or("the backend has no pid")?;
    let cpu = || process_cpu_seconds(pid).map_err(|e| format!("backend CPU time: {e}"));
    let sample = match phase {
        Phase::GuestToHost => {
            let total = args.mib * MIB;
            let cpu0 = cpu()?;
            let t0 = Instant::now();
            let host = std::thread::spawn(move || -> Result<Instant, String> {
                let mut buf = vec![0u8; 64 << 10];
                let mut got = 0;
                while got < total {
                    let n = reader
                        .read(&mut buf[..(total - got).min(64 << 10)])
                        .map_err(|e| format!("host side: read after {got} bytes: {e}"))?;
                    if n == 0 {
                        return Err(format!("host side: EOF after {got} of {total} bytes"));
                    }
                    check(&buf[..n], got, "guest→host")?;
                    got += n;
                }
                Ok(Instant::now())
            });
            let chunk = 1 << 20;
            let mut sent = 0;
            while sent < total {
                let n = chunk.min(total - sent);
                fe.send(&pattern(sent, n)).map_err(fe_err)?;
                sent += n;
            }
            fe.flush().map_err(fe_err)?;
            let end = join(host, "host reader")?;
            Sample {
                bytes: total,
                seconds: end.duration_since(t0).as_secs_f64(),
                cpu: cpu()? - cpu0,
                latencies: Vec::new(),
            }
        }
        Phase::HostToGuest => {
            let mib = match b {
                Backend::Peer => args.peer_h2g_mib,
                Backend::Ours { .. } => args.mib,
            };
            let total = mib * MIB;
            let mut writer = r.host.writer()?;
            let cpu0 = cpu()?;
            let t0 = Instant::now();
            let host = std::thread::spawn(move || -> Result<(), String> {
                let mut sent = 0;
                while sent < total {
                    let n = (64 << 10).min(total - sent);
                    writer
                        .write_all(&pattern(sent, n))
                        .map_err(|e| format!("host side: write after {sent} bytes: {e}"))?;
                    sent += n;
                }
                Ok(())
            });
            let mut got = Vec::with_capacity(total);
            while got.len() < total {
                let at = got.len();
                fe.receive(&mut got, 1)
                    .map_err(|e| format!("{e} (after {at} of {total} bytes host→guest)"))?;
                check(&got[at..], at, "host→guest")?;
            }
            let seconds = t0.elapsed().as_secs_f64();
            let cpu1 = cpu()?;
            join(host, "host writer")?;
            if got.len() != total {
                return Err(format!(
                    "host→guest: {} bytes received, {total} sent",
                    got.len()
                ));
            }
            Sample {
                bytes: total,
                seconds,
                cpu: cpu1 - cpu0,
                latencies: Vec::new(),
            }
        }
        Phase::Echo => {
            let rounds = args.echo_rounds;
            let mut writer = r.host.writer()?;
            let host = std::thread::spawn(move || -> Result<(), String> {
                let mut buf = [0u8; 256];
                let mut echoed = 0;
                while echoed < rounds {
                    let n = reader
                        .read(&mut buf)
                        .map_err(|e| format!("echo: read after {echoed} bytes: {e}"))?;
                    if n == 0 {
                        return Err(format!("echo: EOF after {echoed} bytes"));
                    }
                    writer
                        .write_all(&buf[..n])
                        .map_err(|e| format!("echo: write: {e}"))?;
                    echoed += n;
                }
                Ok(())
            });
            let mut lat = Vec::with_capacity(rounds);
            let cpu0 = cpu()?;
            let t0 = Instant::now();
            let mut got = Vec::with_capacity(rounds);
            for i in 0..rounds {
                let byte = pattern_byte(i);
                let start = Instant::now();
                fe.post_receive_buffers().map_err(fe_err)?;
                fe.send(&[byte]).map_err(fe_err)?;
                fe.receive(&mut got, 1)
                    .map_err(|e| format!("{e} (echo round {i})"))?;
                lat.push(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
                if got.len() != i + 1 || got[i] != byte {
                    return Err(format!("echo round {i}: got {:?}", &got[i..]));
                }
            }
            let seconds = t0.elapsed().as_secs_f64();
            let cpu1 = cpu()?;
            join(host, "host echo")?;
            Sample {
                bytes: rounds,
                seconds,
                cpu: cpu1 - cpu0,
                latencies: lat,
            }
        }
    };
    drop(fe);
    Ok(sample)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vm {
    QemuVirtconsole,
    UmlOurs,
}

impl Vm {
    fn name(self) -> &'static str {
        match self {
            Vm::QemuVirtconsole => "QEMU 10 virtconsole (TCG guest)",
            Vm::UmlOurs => "vhost-user-console (UML guest)",
        }
    }
}

/// The guest script: both transfers through /dev/hvc0, each started by a byte from
/// the host.
fn vm_script(bytes: usize) -> String {
    let blocks = bytes / 4096;
    format!(
        r#"{SCRIPT_PRELUDE}set -e
test -c /dev/hvc0 || fail "no /dev/hvc0"
exec 3<>/dev/hvc0
stty raw -echo <&3
step ready
head -c 1 <&3 > /dev/null
dd if=/dev/zero bs=4096 count={blocks} >&3 2>/dev/null
step g2h-sent
n=$(head -c {bytes} <&3 | wc -c)
printf k >&3
[ "$n" -eq {bytes} ] || fail "host→guest: $n of {bytes} bytes"
step done
"#
    )
}

const VM_TIMEOUT: Duration = Duration::from_secs(300);

/// One guest run: (guest→host seconds, host→guest seconds) for `bytes` each way.
fn vm_run(vm: Vm, bytes: usize) -> Result<(f64, f64), String> {
    let tmp = TempDir::new("consolebench-vm").map_err(|e| e.to_string())?;
    let e = |e: vring_tests::e2e::E2eError| e.to_string();
    let script = vm_script(bytes);
    let mut daemon = None;
    let (running, host_path): (RunningVm, PathBuf) = match vm {
        Vm::QemuVirtconsole => {
            let kernel = GuestKernel::locate().map_err(e)?;
            let initrd = Initramfs::new(&kernel)
                .modules(&["virtio_console"])
                .script(script)
                .build()
                .map_err(e)?;
            let path = tmp.path().join("c0.sock");
            let vm = QemuVm::new(&kernel, &initrd)
                .args([
                    "-chardev",
                    &format!("socket,id=c0,path={},server=on,wait=off", path.display()),
                ])
                .device("virtio-serial-pci")
                .device("virtconsole,chardev=c0")
                .timeout(VM_TIMEOUT)
                .spawn()
                .map_err(e)?;
            (vm, path)
        }
        Vm::UmlOurs => {
            let kernel = uml_kernel().map_err(e)?;
            let initrd = Initramfs::new(&kernel)
                .modules(&["virtio_console"])
                .script(script)
                .build()
                .map_err(e)?;
            let sock = tmp.path().join("vhost.sock");
            let port = tmp.path().join("port0.sock");
            let mut cmd = Command::new(our_binary()?);
            cmd.arg("--socket-path")
                .arg(&sock)
                .arg("--port")
                .arg(format!("socket={}", port.display()))
                .env("RUST_LOG", backend_log());
            let mut p =
                BackgroundProcess::spawn("vhost-user-console", cmd).map_err(|e| e.to_string())?;
            for s in [&sock, &port] {
                p.wait_for_socket(s, Duration::from_secs(10))
                    .map_err(|e| e.to_string())?;
            }
            daemon = Some(p);
            let vm = UmlVm::new(&kernel, &initrd)
                .virtio_console(&sock)
                .timeout(VM_TIMEOUT)
                .spawn()
                .map_err(e)?;
            (vm, port)
        }
    };
    let result = vm_host(&running, &host_path, bytes);
    let out = running.wait().map_err(e);
    let guest_ok = out.as_ref().map(|o| o.success()).unwrap_or(false);
    match (result, out) {
        (Ok(r), Ok(_)) if guest_ok => Ok(r),
        (Ok(_), Ok(o)) => Err(format!(
            "guest script failed (E2E-EXIT={})\n{}",
            o.exit_code, o.log
        )),
        (Err(h), o) => Err(format!(
            "host side: {h}\n{}{}",
            o.map(|o| o.log).unwrap_or_else(|e| e),
            daemon.map(|d| d.log()).unwrap_or_default()
        )),
        (_, Err(o)) => Err(o),
    }
}

/// The host side of a guest run.
fn vm_host(vm: &RunningVm, path: &Path, bytes: usize) -> Result<(f64, f64), String> {
    vm.wait_for_output("E2E-STEP", VM_TIMEOUT)
        .and_then(|()| vm.wait_for_output("] ready", VM_TIMEOUT))
        .map_err(|e| format!("waiting for the guest: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                log::debug!("connecting to {}: {e}", path.display());
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("connecting to {}: {e}", path.display())),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .and_then(|()| s.set_write_timeout(Some(Duration::from_secs(120))))
        .map_err(|e| format!("socket timeouts: {e}"))?;
    // Guest→host.
    let t0 = Instant::now();
    s.write_all(b"g").map_err(|e| format!("start byte: {e}"))?;
    let mut buf = vec![0u8; 64 << 10];
    let mut got = 0;
    while got < bytes {
        let n = s
            .read(&mut buf[..(bytes - got).min(64 << 10)])
            .map_err(|e| format!("guest→host after {got} bytes: {e}"))?;
        if n == 0 {
            return Err(format!("guest→host: EOF after {got} bytes"));
        }
        if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
            return Err(format!("guest→host: byte {} is {:#x}", got + i, buf[i]));
        }
        got += n;
    }
    let g2h = t0.elapsed().as_secs_f64();
    // Host→guest.
    let mut w = s
        .try_clone()
        .map_err(|e| format!("duplicating the socket: {e}"))?;
    let t1 = Instant::now();
    let writer = std::thread::spawn(move || -> Result<(), String> {
        let chunk = vec![b'x'; 64 << 10];
        let mut sent = 0;
        while sent < bytes {
            let n = chunk.len().min(bytes - sent);
            w.write_all(&chunk[..n])
                .map_err(|e| format!("host→guest after {sent} bytes: {e}"))?;
            sent += n;
        }
        Ok(())
    });
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)
        .map_err(|e| format!("waiting for the guest's acknowledgement: {e}"))?;
    let h2g = t1.elapsed().as_secs_f64();
    join(writer, "host writer")?;
    if ack != *b"k" {
        return Err(format!("acknowledgement {:#x}, expected 'k'", ack[0]));
    }
    Ok((g2h, h2g))
}

/// Runs the guest rows and prints their table.
#[allow(clippy::cast_precision_loss, reason = "byte counts far below 2^52")]
fn vm_rows(args: &Args) -> usize {
    let vms = [Vm::QemuVirtconsole, Vm::UmlOurs];
    let bytes = args.vm_mib * MIB;
    let mut per: Vec<(Vec<f64>, Vec<f64>)> = vms.iter().map(|_| (Vec::new(), Vec::new())).collect();
    let mut failures = 0;
    for rep in 0..args.vm_reps {
        for (i, &vm) in vms.iter().enumerate() {
            match vm_run(vm, bytes) {
                Ok((g, h)) => {
                    eprintln!(
                        "vm rep {rep}, {}: guest→host {g:.2}s, host→guest {h:.2}s",
                        vm.name()
                    );
                    if let Some(v) = per.get_mut(i) {
                        v.0.push(bytes as f64 / MIB as f64 / g);
                        v.1.push(bytes as f64 / MIB as f64 / h);
                    }
                }
                Err(err) => {
                    failures += 1;
                    eprintln!("vm rep {rep}, {}: failed: {err}", vm.name());
                }
            }
        }
    }
    println!(
        "\nGuests: {} MiB each way through /dev/hvc0 per run, {} runs.\n",
        args.vm_mib, args.vm_reps
    );
    println!("| direction | device (guest) | MiB/s median | min–max | runs |");
    println!("|---|---|---|---|---|");
    for (dir, pick) in [("guest→host", 0), ("host→guest", 1)] {
        for (vm, v) in vms.iter().zip(&per) {
            let xs = if pick == 0 { &v.0 } else { &v.1 };
            let (lo, hi) = min_max(xs);
            println!(
                "| {dir} | {} | {:.2} | {lo:.2}–{hi:.2} | {} |",
                vm.name(),
                median(xs.clone()),
                xs.len()
            );
        }
    }
    failures
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
}

/// The median of per-CPU-second figures, or a note when a run used less CPU than
/// /proc's clock tick shows (its figure is then 0).
fn per_cpu_cell(xs: &[f64], unit: &str) -> String {
    if xs.contains(&0.0) {
        "n/a (< 1 clock tick of CPU)".into()
    } else {
        let m = median(xs.to_vec());
        if m < 10.0 {
            format!("{m:.2} {unit}")
        } else {
            format!("{m:.0} {unit}")
        }
    }
}

fn min_max(xs: &[f64]) -> (f64, f64) {
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(0.0, f64::max);
    (if lo.is_finite() { lo } else { 0.0 }, hi)
}

#[allow(
    clippy::cast_precision_loss,
    reason = "byte counts and nanoseconds far below 2^52"
)]
fn main() -> ExitCode {
    env_logger::init();
    let args = Args::parse();
    let mut backends = vec![Backend::Ours { packed: false }];
    if args.packed {
        backends.push(Backend::Ours { packed: true });
    }
    backends.push(Backend::Peer);
    let mut phases = Vec::new();
    for p in &args.phases {
        phases.push(match p.as_str() {
            "g2h" => Phase::GuestToHost,
            "h2g" => Phase::HostToGuest,
            "echo" => Phase::Echo,
            other => {
                eprintln!("unknown measurement '{other}' (g2h, h2g, echo)");
                return ExitCode::FAILURE;
            }
        });
    }
    // results[phase][backend] = samples
    let mut results: Vec<Vec<Vec<Sample>>> = phases
        .iter()
        .map(|_| backends.iter().map(|_| Vec::new()).collect())
        .collect();
    let mut failures = 0;
    for rep in 0..args.reps {
        for (pi, &phase) in phases.iter().enumerate() {
            for (bi, &b) in backends.iter().enumerate() {
                match run(b, phase, &args) {
                    Ok(s) => {
                        eprintln!(
                            "rep {rep}, {phase:?}, {}: {} in {:.3}s, backend CPU {:.3}s",
                            b.name(),
                            s.bytes,
                            s.seconds,
                            s.cpu
                        );
                        if let Some(v) = results.get_mut(pi).and_then(|r| r.get_mut(bi)) {
                            v.push(s);
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        eprintln!("rep {rep}, {phase:?}, {}: failed: {e}", b.name());
                    }
                }
            }
        }
    }
    if args.reps > 0 {
        println!(
        "Queue size {}, {} MiB per throughput run ({} MiB host→guest for the peer), {} echo round trips, {} repetitions.\n",
        args.queue_size, args.mib, args.peer_h2g_mib, args.echo_rounds, args.reps
    );
        println!(
            "| measurement | backend | median | min–max | per backend CPU-s (median) | runs |"
        );
        println!("|---|---|---|---|---|---|");
        // (phase, backend) → median of the headline figure, for the ratios.
        let mut medians = Vec::new();
        for (pi, &phase) in phases.iter().enumerate() {
            for (bi, &b) in backends.iter().enumerate() {
                let samples = results
                    .get(pi)
                    .and_then(|r| r.get(bi))
                    .map(Vec::as_slice)
                    .unwrap_or(&[]);
                match phase {
                    Phase::GuestToHost | Phase::HostToGuest => {
                        let mibs: Vec<f64> = samples
                            .iter()
                            .map(|s| s.bytes as f64 / MIB as f64 / s.seconds)
                            .collect();
                        let per_cpu: Vec<f64> = samples
                            .iter()
                            .map(|s| {
                                if s.cpu > 0.0 {
                                    s.bytes as f64 / MIB as f64 / s.cpu
                                } else {
                                    0.0
                                }
                            })
                            .collect();
                        let (lo, hi) = min_max(&mibs);
                        let m = median(mibs.clone());
                        let pc = if per_cpu.contains(&0.0) {
                            0.0
                        } else {
                            median(per_cpu.clone())
                        };
                        medians.push((pi, bi, m, pc));
                        println!(
                            "| {} | {} | {m:.2} MiB/s | {lo:.2}–{hi:.2} | {} | {} |",
                            match phase {
                                Phase::GuestToHost => "guest→host",
                                _ => "host→guest",
                            },
                            b.name(),
                            per_cpu_cell(&per_cpu, "MiB"),
                            mibs.len()
                        );
                    }
                    Phase::Echo => {
                        let p50s: Vec<f64> = samples
                            .iter()
                            .map(|s| {
                                let mut l = s.latencies.clone();
                                LatencySummary::from_nanos(&mut l).p50.as_nanos() as f64 / 1e3
                            })
                            .collect();
                        let p99s: Vec<f64> = samples
                            .iter()
                            .map(|s| {
                                let mut l = s.latencies.clone();
                                LatencySummary::from_nanos(&mut l).p99.as_nanos() as f64 / 1e3
                            })
                            .collect();
                        let per_cpu: Vec<f64> = samples
                            .iter()
                            .map(|s| {
                                if s.cpu > 0.0 {
                                    s.bytes as f64 / s.cpu
                                } else {
                                    0.0
                                }
                            })
                            .collect();
                        let (lo, hi) = min_max(&p50s);
                        let (lo99, hi99) = min_max(&p99s);
                        let m = median(p50s.clone());
                        medians.push((pi, bi, m, median(p99s.clone())));
                        println!(
                        "| echo 1 B p50 / p99 | {} | {m:.1} / {:.1} µs | {lo:.1}–{hi:.1} / {lo99:.1}–{hi99:.1} | {} | {} |",
                        b.name(),
                        median(p99s),
                        per_cpu_cell(&per_cpu, "round trips"),
                        p50s.len()
                    );
                    }
                }
            }
        }
        let peer = backends.len() - 1;
        println!();
        for (pi, &phase) in phases.iter().enumerate() {
            let get = |bi: usize| {
                medians
                    .iter()
                    .find(|m| m.0 == pi && m.1 == bi)
                    .map(|m| (m.2, m.3))
            };
            let Some((p, pc)) = get(peer).filter(|p| p.0 > 0.0) else {
                continue;
            };
            for (bi, &b) in backends.iter().enumerate().take(peer) {
                let Some((o, oc)) = get(bi) else { continue };
                match phase {
                Phase::Echo => println!(
                    "- echo, {}: p50 {:.2}× the peer's, p99 {:.2}× (lower is better)",
                    b.name(),
                    o / p,
                    if pc > 0.0 { oc / pc } else { 0.0 }
                ),
                _ if oc > 0.0 && pc > 0.0 => println!(
                    "- {phase:?}, {}: {:.2}× the peer's MiB/s, {:.2}× its MiB per backend CPU-second",
                    b.name(),
                    o / p,
                    oc / pc
                ),
                _ => println!(
                    "- {phase:?}, {}: {:.2}× the peer's MiB/s (MiB per backend CPU-second: a run used less than a clock tick)",
                    b.name(),
                    o / p
                ),
            }
            }
        }
    }
    if args.vm_reps > 0 {
        failures += vm_rows(&args);
    }
    if failures > 0 {
        eprintln!("{failures} runs failed");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
