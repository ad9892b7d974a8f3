// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! DPDK `testpmd` (Debian `dpdk-dev`, DPDK 22.11) as a vhost-user peer: as a
//! frontend through the `net_virtio_user` PMD (`--vdev
//! net_virtio_user0,path=SOCK,mac=..`) and as a backend through the
//! `net_vhost` PMD (`--vdev net_vhost0,iface=SOCK`), driven interactively.
//!
//! Every instance runs `stdbuf -oL dpdk-testpmd --lcores=0@C,1@C --no-huge
//! --no-pci -m 512 --no-shconf --file-prefix=<unique> --vdev .. -- -i
//! --total-num-mbufs=32768`: no hugepages, no PCI scan, no shared runtime
//! config, both of its lcores (the main one, which reads commands, and the
//! forwarding one, which busy-polls) on host CPU `C`, so two instances on a
//! 2-CPU host do not fight over a CPU. testpmd needs two lcores: with one
//! there is no forwarding core and it exits ("No cores defined for
//! forwarding"). Commands go to its stdin, a pipe held open for its lifetime
//! (with `-a` and an empty stdin it would exit at once); its line-buffered
//! output is captured and each command's output is the text up to the next
//! `testpmd> ` prompt.
//!
//! Start the backend first: `net_virtio_user` connects at start-up and exits
//! when the socket is missing. Every wait is bounded; the process is killed
//! on drop.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{wait_for_socket, E2eError, Result};

/// Environment variable naming the `dpdk-testpmd` binary.
pub const TESTPMD_ENV: &str = "E2E_TESTPMD";

/// testpmd's interactive prompt.
pub const PROMPT: &str = "testpmd> ";

/// The end of [`PROMPT`], what start-up waits for (see [`TestPmd::spawn`]).
const PROMPT_END: &str = "> ";

/// Default limit for one interactive command (and for the start-up prompt).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// Debian package shipping `/usr/bin/dpdk-testpmd` on bookworm.
const TESTPMD_PACKAGE: &str = "dpdk-dev";

/// Finds `dpdk-testpmd`: `$E2E_TESTPMD`, else `/usr/bin/dpdk-testpmd`, else
/// the first on `$PATH`.
pub fn testpmd_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(TESTPMD_ENV).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(E2eError::missing(format!(
                "${TESTPMD_ENV} names {}, which does not exist",
                p.display()
            )))
        };
    }
    let usr = PathBuf::from("/usr/bin/dpdk-testpmd");
    if usr.is_file() {
        return Ok(usr);
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("dpdk-testpmd"))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| {
            E2eError::missing(format!(
                "`dpdk-testpmd` not found (Debian package {TESTPMD_PACKAGE})"
            ))
        })
}

/// The directories DPDK loads its PMDs from by default on Debian
/// (`/usr/lib/<triplet>/dpdk/pmds-<abi>/`).
fn system_pmd_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for lib in ["/usr/lib", "/usr/lib64", "/usr/local/lib"] {
        let Ok(rd) = std::fs::read_dir(lib) else {
            continue;
        };
        let mut cands: Vec<PathBuf> = rd.flatten().map(|e| e.path().join("dpdk")).collect();
        cands.push(Path::new(lib).join("dpdk"));
        for d in cands {
            if let Ok(rd) = std::fs::read_dir(&d) {
                dirs.extend(
                    rd.flatten()
                        .filter(|e| e.file_name().to_string_lossy().starts_with("pmds-"))
                        .map(|e| e.path()),
                );
            }
        }
    }
    dirs
}

/// Whether one of `dirs` has `lib<name>.so*`.
fn has_pmd(dirs: &[PathBuf], name: &str) -> bool {
    let prefix = format!("lib{name}.so");
    dirs.iter().any(|d| {
        std::fs::read_dir(d).is_ok_and(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        })
    })
}

/// Options of a `net_virtio_user` frontend port.
#[derive(Debug, Clone, Default)]
pub struct VirtioUserOptions {
    /// `packed_vq=1`: ask for packed rings.
    pub packed: bool,
    /// `queues=N` (queue pairs; more than one turns on its control queue).
    pub queues: Option<u16>,
    /// `queue_size=N` (default 256).
    pub queue_size: Option<u16>,
    /// `mrg_rxbuf=0|1` (default 1).
    pub mrg_rxbuf: Option<bool>,
}

/// testpmd forwarding modes (`set fwd <mode>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FwdMode {
    /// Generate and send packets, receive nothing.
    TxOnly,
    /// Receive and free packets.
    RxOnly,
    /// Forward received packets unchanged.
    Io,
    /// Forward received packets with the MAC addresses rewritten.
    Mac,
}

impl FwdMode {
    /// The mode's name on testpmd's command line.
    pub fn as_str(self) -> &'static str {
        match self {
            FwdMode::TxOnly => "txonly",
            FwdMode::RxOnly => "rxonly",
            FwdMode::Io => "io",
            FwdMode::Mac => "mac",
        }
    }
}

/// One port's `show port stats` counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Port id.
    pub port: u16,
    /// Packets received.
    pub rx_packets: u64,
    /// Packets the port dropped for lack of room (`RX-missed`).
    pub rx_missed: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Receive errors.
    pub rx_errors: u64,
    /// Receive failures for lack of mbufs.
    pub rx_nombuf: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Transmit errors.
    pub tx_errors: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
}

/// The "Accumulated forward statistics for all ports" that `stop` prints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardStats {
    /// Packets the forwarding cores received.
    pub rx_packets: u64,
    /// Received packets they dropped.
    pub rx_dropped: u64,
    /// Packets they sent.
    pub tx_packets: u64,
    /// Packets the port did not take (ring full): never sent.
    pub tx_dropped: u64,
}

/// `KEY: VALUE` pairs (values that parse as `u64`) in `text`.
fn counters(text: &str) -> Vec<(&str, u64)> {
    let toks: Vec<&str> = text.split_whitespace().collect();
    toks.windows(2)
        .filter_map(|w| {
            let key = w[0].strip_suffix(':')?;
            Some((key, w[1].parse().ok()?))
        })
        .collect()
}

fn counter(pairs: &[(&str, u64)], key: &str) -> u64 {
    pairs
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| *v)
        .unwrap_or(0)
}

/// Parses every "NIC statistics for port N" block of `show port stats`
/// output.
pub fn parse_port_stats(output: &str) -> Vec<PortStats> {
    const HEAD: &str = "NIC statistics for port ";
    output
        .match_indices(HEAD)
        .filter_map(|(i, _)| {
            let rest = &output[i + HEAD.len()..];
            let port = rest
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()?;
            let body = rest.split_once('\n')?.1;
            let end = body
                .lines()
                .position(|l| l.trim().starts_with("####"))
                .map(|n| body.lines().take(n).map(|l| l.len() + 1).sum())
                .unwrap_or(body.len());
            let pairs = counters(&body[..end.min(body.len())]);
            Some(PortStats {
                port,
                rx_packets: counter(&pairs, "RX-packets"),
                rx_missed: counter(&pairs, "RX-missed"),
                rx_bytes: counter(&pairs, "RX-bytes"),
                rx_errors: counter(&pairs, "RX-errors"),
                rx_nombuf: counter(&pairs, "RX-nombuf"),
                tx_packets: counter(&pairs, "TX-packets"),
                tx_errors: counter(&pairs, "TX-errors"),
                tx_bytes: counter(&pairs, "TX-bytes"),
            })
        })
        .collect()
}

/// Parses the "Accumulated forward statistics for all ports" block of
/// `stop` output.
pub fn parse_forward_stats(output: &str) -> Option<ForwardStats> {
    let i = output.find("Accumulated forward statistics")?;
    let body = output[i..].split_once('\n')?.1;
    let block: String = body
        .lines()
        .take_while(|l| !l.trim().starts_with("++++"))
        .collect::<Vec<_>>()
        .join("\n");
    let pairs = counters(&block);
    Some(ForwardStats {
        rx_packets: counter(&pairs, "RX-packets"),
        rx_dropped: counter(&pairs, "RX-dropped"),
        tx_packets: counter(&pairs, "TX-packets"),
        tx_dropped: counter(&pairs, "TX-dropped"),
    })
}

/// Builder for one testpmd instance.
#[derive(Debug, Clone)]
pub struct TestPmd {
    name: String,
    binary: Option<PathBuf>,
    cpu: u32,
    memory_mb: u32,
    vdevs: Vec<String>,
    pmd_dirs: Vec<PathBuf>,
    eal_args: Vec<OsString>,
    app_args: Vec<OsString>,
    startup_timeout: Duration,
    echo: bool,
}

impl TestPmd {
    /// An instance called `name` (in messages and its file prefix) on host
    /// CPU 0 with 512 MiB, no ports yet. `E2E_VERBOSE=1` echoes its output.
    pub fn new(name: &str) -> Self {
        TestPmd {
            name: name.to_owned(),
            binary: None,
            cpu: 0,
            memory_mb: 512,
            vdevs: Vec::new(),
            pmd_dirs: Vec::new(),
            eal_args: Vec::new(),
            app_args: vec!["--total-num-mbufs=32768".into()],
            startup_timeout: DEFAULT_COMMAND_TIMEOUT,
            echo: std::env::var_os("E2E_VERBOSE").is_some_and(|v| !v.is_empty() && v != "0"),
        }
    }

    /// Uses this testpmd binary instead of [`testpmd_binary`]'s.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Runs both lcores on host CPU `cpu` (`--lcores=0@cpu,1@cpu`).
    pub fn cpu(mut self, cpu: u32) -> Self {
        self.cpu = cpu;
        self
    }

    /// Memory in MiB (`-m`, default 512).
    pub fn memory_mb(mut self, mb: u32) -> Self {
        self.memory_mb = mb;
        self
    }

    /// Adds a raw `--vdev` spec.
    pub fn vdev(mut self, spec: &str) -> Self {
        self.vdevs.push(spec.to_owned());
        self
    }

    /// Adds a `net_virtio_user<N>` frontend port (N = number of vdevs so
    /// far) connecting to the backend on `socket`, with MAC address `mac`.
    pub fn virtio_user(self, socket: &Path, mac: &str, opts: &VirtioUserOptions) -> Self {
        let mut spec = format!(
            "net_virtio_user{},path={},mac={mac}",
            self.vdevs.len(),
            socket.display()
        );
        if opts.packed {
            spec.push_str(",packed_vq=1");
        }
        if let Some(q) = opts.queues {
            spec.push_str(&format!(",queues={q}"));
        }
        if let Some(s) = opts.queue_size {
            spec.push_str(&format!(",queue_size={s}"));
        }
        if let Some(m) = opts.mrg_rxbuf {
            spec.push_str(&format!(",mrg_rxbuf={}", u8::from(m)));
        }
        self.vdev(&spec)
    }

    /// Adds a `net_vhost<N>` backend port listening on `socket`.
    pub fn vhost_backend(self, socket: &Path, queues: Option<u16>) -> Self {
        let mut spec = format!("net_vhost{},iface={}", self.vdevs.len(), socket.display());
        if let Some(q) = queues {
            spec.push_str(&format!(",queues={q}"));
        }
        self.vdev(&spec)
    }

    /// Loads PMDs from `dir` too (`-d dir`); DPDK refuses a world-writable
    /// directory, so [`TestPmd::spawn`] checks that first.
    pub fn pmd_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.pmd_dirs.push(dir.into());
        self
    }

    /// Appends an EAL argument (before `--`).
    pub fn eal_arg(mut self, arg: impl Into<OsString>) -> Self {
        self.eal_args.push(arg.into());
        self
    }

    /// Appends a testpmd argument (after `--`), e.g. `--rxd=1024`.
    pub fn app_arg(mut self, arg: impl Into<OsString>) -> Self {
        self.app_args.push(arg.into());
        self
    }

    /// Uses `n` RX and `n` TX queues per port (`--rxq=n --txq=n`; testpmd's
    /// default is 1 whatever the port has, e.g. `queues=` of a vdev).
    pub fn queues(self, n: u16) -> Self {
        self.app_arg(format!("--rxq={n}"))
            .app_arg(format!("--txq={n}"))
    }

    /// Limit for the start-up (up to the first prompt); default
    /// [`DEFAULT_COMMAND_TIMEOUT`].
    pub fn startup_timeout(mut self, t: Duration) -> Self {
        self.startup_timeout = t;
        self
    }

    /// Echo testpmd's output to stderr while running.
    pub fn echo(mut self, echo: bool) -> Self {
        self.echo = echo;
        self
    }

    /// The testpmd command line (without the `stdbuf` wrapper) for file
    /// prefix `prefix`.
    pub fn command_line(&self, binary: &Path, prefix: &str) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec![binary.as_os_str().to_owned()];
        v.push(format!("--lcores=0@{0},1@{0}", self.cpu).into());
        v.extend(["--no-huge", "--no-pci", "-m"].map(OsString::from));
        v.push(self.memory_mb.to_string().into());
        v.push("--no-shconf".into());
        v.push(format!("--file-prefix={prefix}").into());
        for d in &self.pmd_dirs {
            v.push("-d".into());
            v.push(d.as_os_str().to_owned());
        }
        for spec in &self.vdevs {
            v.push("--vdev".into());
            v.push(spec.into());
        }
        v.extend(self.eal_args.iter().cloned());
        v.push("--".into());
        v.push("-i".into());
        v.extend(self.app_args.iter().cloned());
        v
    }

    /// Checks the PMD directories and the PMDs the ports need.
    fn check_pmds(&self) -> Result<()> {
        for d in &self.pmd_dirs {
            let meta = std::fs::metadata(d)
                .map_err(|e| E2eError::io(format!("PMD directory {}", d.display()), e))?;
            if meta.permissions().mode() & 0o002 != 0 {
                return Err(E2eError::Setup(format!(
                    "PMD directory {} is world-writable, which DPDK refuses to load from \
                     (use a directory that is not under /tmp, mode 0755)",
                    d.display()
                )));
            }
        }
        let mut dirs = system_pmd_dirs();
        if dirs.is_empty() {
            // Not Debian's layout (a static build?): let testpmd report it.
            return Ok(());
        }
        dirs.extend(self.pmd_dirs.iter().cloned());
        let mut need = vec![("rte_mempool_ring", "librte-mempool-ring23")];
        if self.vdevs.iter().any(|v| v.starts_with("net_vhost")) {
            need.push(("rte_net_vhost", "librte-net-vhost23"));
        }
        if self.vdevs.iter().any(|v| v.starts_with("net_virtio_user")) {
            need.push(("rte_net_virtio", "librte-net-virtio23"));
        }
        for (lib, package) in need {
            if !has_pmd(&dirs, lib) {
                return Err(E2eError::missing(format!(
                    "DPDK PMD lib{lib}.so not found in {dirs:?} (Debian package {package})"
                )));
            }
        }
        Ok(())
    }

    /// Starts testpmd and waits for its first prompt (fails with its output
    /// if it exits first, the start-up timeout passes, or a `--vdev` port
    /// failed to probe, e.g. a `net_virtio_user` port without a backend). For a
    /// `net_vhost` port, also waits for its socket to appear.
    pub fn spawn(self) -> Result<RunningTestPmd> {
        let binary = match &self.binary {
            Some(b) => b.clone(),
            None => testpmd_binary()?,
        };
        self.check_pmds()?;
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let safe: String = self
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let prefix = format!(
            "e2e-{safe}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let argv = self.command_line(&binary, &prefix);
        let stdbuf = Path::new("/usr/bin/stdbuf");
        let mut cmd = if stdbuf.is_file() {
            let mut c = Command::new(stdbuf);
            c.arg("-oL").arg("-eL").args(&argv);
            c
        } else {
            let mut c = Command::new(&binary);
            c.args(&argv[1..]);
            c
        };
        let cmdline = argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| E2eError::io(format!("spawning {} (`{cmdline}`)", self.name), e))?;
        let shared = Arc::new(Shared::default());
        let mut readers = Vec::new();
        let out: Option<Box<dyn Read + Send>> = child.stdout.take().map(|o| Box::new(o) as _);
        let err: Option<Box<dyn Read + Send>> = child.stderr.take().map(|e| Box::new(e) as _);
        for r in [out, err].into_iter().flatten() {
            readers.push(spawn_reader(
                r,
                shared.clone(),
                self.echo,
                self.name.clone(),
            ));
        }
        let stdin = child.stdin.take();
        let mut pmd = RunningTestPmd {
            name: self.name.clone(),
            prefix,
            cmdline,
            child: Some(child),
            stdin,
            shared,
            readers,
            status: None,
        };
        // The end of the prompt only: stdout and stderr share the log, and a port without
        // promiscuous mode (a backend without a control queue) prints its error on stderr
        // anywhere inside testpmd's first prompt (seen: "test" + error + "pmd> " and
        // "testp" + error + "md> "); start-up output before it has no "> ".
        let startup =
            pmd.wait_for_after(0, PROMPT_END, self.startup_timeout, "the first prompt")?;
        // testpmd carries on without the ports that failed to probe.
        if let Some(line) = startup.lines().find(|l| {
            l.contains("failed to initialize")
                || l.contains("No probed ethernet devices")
                || l.contains("Failed to setup backend")
        }) {
            let hint = if self.vdevs.iter().any(|v| v.starts_with("net_virtio_user")) {
                " (a net_virtio_user port needs its backend listening on the socket first)"
            } else {
                ""
            };
            return Err(E2eError::Guest {
                reason: format!(
                    "{}: a --vdev port did not come up: `{}`{hint}; command: {}",
                    pmd.name,
                    line.trim(),
                    pmd.cmdline
                ),
                log: pmd.log(),
            });
        }
        for spec in self.vdevs.iter().filter(|v| v.starts_with("net_vhost")) {
            if let Some(iface) = spec
                .split(',')
                .find_map(|kv| kv.strip_prefix("iface="))
                .map(PathBuf::from)
            {
                wait_for_socket(&iface, self.startup_timeout).map_err(|_| E2eError::Timeout {
                    what: format!("{}: waiting for socket {}", pmd.name, iface.display()),
                    after: self.startup_timeout,
                    log: pmd.log(),
                })?;
            }
        }
        Ok(pmd)
    }
}

#[derive(Debug, Default)]
struct Shared {
    log: Mutex<Vec<u8>>,
    cond: Condvar,
    /// Readers still running.
    open: Mutex<usize>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        match self.log.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

fn spawn_reader(
    mut r: Box<dyn Read + Send>,
    shared: Arc<Shared>,
    echo: bool,
    name: String,
) -> JoinHandle<()> {
    match shared.open.lock() {
        Ok(mut n) => *n += 1,
        Err(p) => *p.into_inner() += 1,
    }
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if echo {
                eprint!("[{name}] {}", String::from_utf8_lossy(&buf[..n]));
            }
            shared.lock().extend_from_slice(&buf[..n]);
            shared.cond.notify_all();
        }
        match shared.open.lock() {
            Ok(mut n) => *n -= 1,
            Err(p) => *p.into_inner() -= 1,
        }
        shared.cond.notify_all();
    })
}

/// A running testpmd, killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct RunningTestPmd {
    name: String,
    prefix: String,
    cmdline: String,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    shared: Arc<Shared>,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl RunningTestPmd {
    /// The name given to the builder.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The command line (without the `stdbuf` wrapper).
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Process id (of `stdbuf`, which execs testpmd), while not reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything testpmd printed so far (stdout and stderr).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&self.shared.lock()).into_owned()
    }

    /// Waits until `needle` appears in the output after byte `offset`;
    /// returns the output from `offset` up to the end of `needle`.
    fn wait_for_after(
        &mut self,
        offset: usize,
        needle: &str,
        timeout: Duration,
        what: &str,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut log = self.shared.lock();
        loop {
            let tail = log.get(offset..).unwrap_or(&[]);
            if let Some(i) = tail
                .windows(needle.len().max(1))
                .position(|w| w == needle.as_bytes())
            {
                return Ok(String::from_utf8_lossy(&tail[..i + needle.len()]).into_owned());
            }
            let ended = match self.shared.open.lock() {
                Ok(n) => *n == 0,
                Err(p) => *p.into_inner() == 0,
            };
            let now = Instant::now();
            if ended || now >= deadline {
                let text = String::from_utf8_lossy(&log).into_owned();
                drop(log);
                let what = format!("{}: waiting for {what}", self.name);
                return Err(if ended {
                    let status = self.reap_status();
                    E2eError::Guest {
                        reason: format!(
                            "{what}: testpmd's output ended (exit status {status}); command: {}",
                            self.cmdline
                        ),
                        log: text,
                    }
                } else {
                    E2eError::Timeout {
                        what,
                        after: timeout,
                        log: text,
                    }
                });
            }
            let wait = (deadline - now).min(Duration::from_millis(100));
            log = match self.shared.cond.wait_timeout(log, wait) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Waits (up to `timeout`) until `needle` appears anywhere in the output.
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        self.wait_for_after(0, needle, timeout, &format!("`{needle}` in its output"))
            .map(|_| ())
    }

    /// A short description of the exit status, reaping the process if it
    /// has exited within a second.
    fn reap_status(&mut self) -> String {
        if self.status.is_none() {
            if let Some(child) = self.child.as_mut() {
                let deadline = Instant::now() + Duration::from_secs(1);
                while Instant::now() < deadline {
                    if let Ok(Some(s)) = child.try_wait() {
                        self.status = Some(s);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        self.status
            .map_or_else(|| "unknown (still running)".into(), |s| s.to_string())
    }

    fn send(&mut self, line: &str) -> Result<()> {
        let name = self.name.clone();
        let stdin = self.stdin.as_mut().ok_or_else(|| {
            E2eError::io(
                format!("{name}: sending `{line}`"),
                std::io::Error::other("stdin already closed"),
            )
        })?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(|e| E2eError::io(format!("{name}: sending `{line}`"), e))
    }

    /// Sends one interactive command and returns its output (up to and
    /// including the next prompt), waiting at most `timeout`.
    pub fn command_timeout(&mut self, line: &str, timeout: Duration) -> Result<String> {
        let offset = self.shared.lock().len();
        self.send(line)?;
        self.wait_for_after(
            offset,
            PROMPT,
            timeout,
            &format!("the prompt after `{line}`"),
        )
    }

    /// [`Self::command_timeout`] with [`DEFAULT_COMMAND_TIMEOUT`].
    pub fn command(&mut self, line: &str) -> Result<String> {
        self.command_timeout(line, DEFAULT_COMMAND_TIMEOUT)
    }

    /// `set fwd <mode>`.
    pub fn set_fwd(&mut self, mode: FwdMode) -> Result<String> {
        let out = self.command(&format!("set fwd {}", mode.as_str()))?;
        if !out.contains("packet forwarding mode") {
            return Err(E2eError::Guest {
                reason: format!("{}: `set fwd {}` was refused", self.name, mode.as_str()),
                log: self.log(),
            });
        }
        Ok(out)
    }

    /// `start` (forwarding).
    pub fn start(&mut self) -> Result<String> {
        self.command("start")
    }

    /// `stop` (forwarding); returns the forward statistics it prints.
    pub fn stop(&mut self) -> Result<ForwardStats> {
        let out = self.command("stop")?;
        parse_forward_stats(&out).ok_or_else(|| E2eError::Guest {
            reason: format!("{}: no forward statistics after `stop`", self.name),
            log: self.log(),
        })
    }

    /// `show port stats all`, parsed.
    pub fn port_stats(&mut self) -> Result<Vec<PortStats>> {
        let out = self.command("show port stats all")?;
        let stats = parse_port_stats(&out);
        if stats.is_empty() {
            return Err(E2eError::Guest {
                reason: format!("{}: no port statistics in `show port stats all`", self.name),
                log: self.log(),
            });
        }
        Ok(stats)
    }

    /// The statistics of port `port`.
    pub fn port(&mut self, port: u16) -> Result<PortStats> {
        let stats = self.port_stats()?;
        stats
            .into_iter()
            .find(|s| s.port == port)
            .ok_or_else(|| E2eError::Guest {
                reason: format!("{}: no statistics for port {port}", self.name),
                log: self.log(),
            })
    }

    /// The last virtio feature set a `net_vhost` port negotiated
    /// (`VHOST_CONFIG: ... negotiated Virtio features: 0x...`), if any.
    pub fn negotiated_features(&self) -> Option<u64> {
        const KEY: &str = "negotiated Virtio features: 0x";
        let log = self.log();
        let i = log.rfind(KEY)?;
        let hex: String = log[i + KEY.len()..]
            .chars()
            .take_while(char::is_ascii_hexdigit)
            .collect();
        u64::from_str_radix(&hex, 16).ok()
    }

    /// Sends `quit`, closes stdin and waits up to `timeout` for testpmd to
    /// exit (killing it after that). Returns the whole output.
    pub fn quit(mut self, timeout: Duration) -> Result<String> {
        let sent = self.send("quit");
        self.stdin = None;
        let deadline = Instant::now() + timeout;
        let mut timed_out = false;
        if let Some(mut child) = self.child.take() {
            loop {
                match child.try_wait() {
                    Ok(Some(s)) => {
                        self.status = Some(s);
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    _ => {
                        timed_out = true;
                        let _ = child.kill();
                        self.status = child.wait().ok();
                        break;
                    }
                }
            }
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let log = self.log();
        sent?;
        if timed_out {
            return Err(E2eError::Timeout {
                what: format!("{}: waiting for testpmd to exit after `quit`", self.name),
                after: timeout,
                log,
            });
        }
        Ok(log)
    }
}

impl Drop for RunningTestPmd {
    fn drop(&mut self) {
        self.stdin = None;
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        // With --no-shconf DPDK still makes an (empty) runtime directory.
        let mut roots = vec![PathBuf::from("/var/run/dpdk"), PathBuf::from("/tmp/dpdk")];
        if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").filter(|x| !x.is_empty()) {
            roots.push(PathBuf::from(x).join("dpdk"));
        }
        for root in roots {
            let _ = std::fs::remove_dir_all(root.join(&self.prefix));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORT_STATS: &str = "show port stats all\n\n  \
        ######################## NIC statistics for port 0  ########################\n  \
        RX-packets: 15066976   RX-missed: 3          RX-bytes:  964286464\n  \
        RX-errors: 1\n  RX-nombuf:  2         \n  \
        TX-packets: 7   TX-errors: 0          TX-bytes:  448\n\n  \
        Throughput (since last show)\n  Rx-pps:            5          Rx-bps:            0\n  \
        Tx-pps:            0          Tx-bps:            0\n  \
        ############################################################################\n\
        testpmd> ";

    const STOP: &str = "stop\nTelling cores to stop...\nWaiting for lcores to finish...\n\n  \
        ---------------------- Forward statistics for port 0  ----------------------\n  \
        RX-packets: 0              RX-dropped: 0             RX-total: 0\n  \
        TX-packets: 15066976       TX-dropped: 1049408       TX-total: 16116384\n  \
        ----------------------------------------------------------------------------\n\n  \
        +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++\n  \
        RX-packets: 0              RX-dropped: 0             RX-total: 0\n  \
        TX-packets: 15066976       TX-dropped: 1049408       TX-total: 16116384\n  \
        ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++\n\n\
        Done.\ntestpmd> ";

    #[test]
    fn port_stats_parsing() {
        assert_eq!(
            parse_port_stats(PORT_STATS),
            [PortStats {
                port: 0,
                rx_packets: 15_066_976,
                rx_missed: 3,
                rx_bytes: 964_286_464,
                rx_errors: 1,
                rx_nombuf: 2,
                tx_packets: 7,
                tx_errors: 0,
                tx_bytes: 448,
            }]
        );
        assert!(parse_port_stats("testpmd> ").is_empty());
    }

    #[test]
    fn forward_stats_parsing() {
        assert_eq!(
            parse_forward_stats(STOP),
            Some(ForwardStats {
                rx_packets: 0,
                rx_dropped: 0,
                tx_packets: 15_066_976,
                tx_dropped: 1_049_408,
            })
        );
        assert_eq!(parse_forward_stats("nothing"), None);
    }

    #[test]
    fn command_line_shape() {
        let t = TestPmd::new("fe").cpu(1).virtio_user(
            Path::new("/t/s.sock"),
            "52:54:00:00:00:01",
            &VirtioUserOptions {
                packed: true,
                queues: Some(2),
                ..Default::default()
            },
        );
        let argv: Vec<String> = t
            .command_line(Path::new("/usr/bin/dpdk-testpmd"), "p")
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            argv.join(" "),
            "/usr/bin/dpdk-testpmd --lcores=0@1,1@1 --no-huge --no-pci -m 512 --no-shconf \
             --file-prefix=p --vdev net_virtio_user0,path=/t/s.sock,mac=52:54:00:00:00:01,\
             packed_vq=1,queues=2 -- -i --total-num-mbufs=32768"
        );
    }
}
