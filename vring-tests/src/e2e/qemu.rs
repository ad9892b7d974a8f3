// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Running QEMU (TCG) with the guest kernel + initramfs and capturing the
//! serial console.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{
    E2eError, GuestKernel, InitramfsImage, Result, TempDir, EXIT_MARKER, INSMOD_FAILED_MARKER,
};

/// Kernel command line every VM gets (callers can [`QemuVm::append`] more).
/// `cryptomgr.notests` skips ~0.3 s of crypto self-tests under TCG.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet panic=-1 cryptomgr.notests";

/// Default limit for a whole VM run (boot + test + power-off).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(90);

/// Minimum QEMU major version.
const MIN_QEMU_MAJOR: u32 = 10;

/// Finds `qemu-system-x86_64` and checks that it is QEMU >= 10.
///
/// Uses `$E2E_QEMU` if set, else `/usr/bin/qemu-system-x86_64` (installed
/// from bookworm-backports by the install script), else the first one on
/// `$PATH`. The result is cached for the process.
pub fn qemu_binary() -> Result<PathBuf> {
    static QEMU: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    QEMU.get_or_init(|| {
        find_versioned(
            "E2E_QEMU",
            "qemu-system-x86_64",
            "qemu-system-x86 (bookworm-backports)",
        )
    })
    .clone()
    .map_err(E2eError::missing)
}

/// Locates `name` (env override `env`, then `/usr/bin/<name>`, then `$PATH`)
/// and checks `<binary> --version` reports a version >= 10.
pub(crate) fn find_versioned(
    env: &str,
    name: &str,
    package: &str,
) -> std::result::Result<PathBuf, String> {
    let path = match std::env::var_os(env) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => {
            let usr = Path::new("/usr/bin").join(name);
            if usr.is_file() {
                usr
            } else {
                std::env::var_os("PATH")
                    .and_then(|paths| {
                        std::env::split_paths(&paths)
                            .map(|d| d.join(name))
                            .find(|p| p.is_file())
                    })
                    .ok_or_else(|| format!("`{name}` not found (Debian package {package})"))?
            }
        }
    };
    check_version(&path, package)?;
    Ok(path)
}

/// Checks that `<path> --version` reports a QEMU version >= 10.
pub(crate) fn check_version(path: &Path, package: &str) -> std::result::Result<(), String> {
    let out = Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `{} --version`: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or("").trim().to_owned();
    let major = first
        .split_once("version ")
        .and_then(|(_, v)| v.split('.').next())
        .and_then(|m| m.trim().parse::<u32>().ok());
    match major {
        Some(m) if m >= MIN_QEMU_MAJOR => Ok(()),
        Some(_) => Err(format!(
            "{} is too old (`{first}`); QEMU >= {MIN_QEMU_MAJOR} is required (Debian package {package})",
            path.display()
        )),
        None => Err(format!(
            "cannot parse the version of {} from `{first}`",
            path.display()
        )),
    }
}

/// Escapes a value for QEMU's `key=value,...` option syntax (`,` -> `,,`).
fn qemu_opt_escape(s: &str) -> String {
    s.replace(',', ",,")
}

/// Builder for a QEMU VM booting the e2e guest.
///
/// The command line is
/// `qemu-system-x86_64 -machine q35 -accel tcg -m 256M
///  -object memory-backend-memfd,id=mem,size=256M,share=on
///  -numa node,memdev=mem -smp 1 -kernel .. -initrd ..
///  -append 'console=ttyS0 quiet panic=-1 ..' -nographic -nodefaults
///  -serial stdio -no-reboot` followed by the caller's extra arguments.
/// Guest memory is a shared memfd, as vhost-user requires. `-nodefaults`
/// means no default NIC/VGA/drives: the guest only sees the caller's devices.
#[derive(Debug, Clone)]
pub struct QemuVm {
    qemu: Option<PathBuf>,
    kernel: PathBuf,
    initrd: PathBuf,
    machine: String,
    memory_mib: u32,
    smp: u32,
    cmdline: String,
    args: Vec<OsString>,
    timeout: Duration,
    echo: bool,
    netns: Option<String>,
}

impl QemuVm {
    /// A VM booting `kernel` with `initrd`, with default settings (q35,
    /// 256 MiB, 1 vCPU, [`DEFAULT_TIMEOUT`]). Set `E2E_VERBOSE=1` to echo
    /// the console to stderr live.
    pub fn new(kernel: &GuestKernel, initrd: &InitramfsImage) -> Self {
        QemuVm {
            qemu: None,
            kernel: kernel.image().to_path_buf(),
            initrd: initrd.path.clone(),
            machine: "q35".into(),
            memory_mib: 256,
            smp: 1,
            cmdline: DEFAULT_CMDLINE.into(),
            args: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            echo: std::env::var_os("E2E_VERBOSE").is_some_and(|v| !v.is_empty() && v != "0"),
            netns: None,
        }
    }

    /// Uses a specific QEMU binary (skips [`qemu_binary`]'s lookup, not its
    /// version check).
    pub fn qemu(mut self, path: impl Into<PathBuf>) -> Self {
        self.qemu = Some(path.into());
        self
    }

    /// Boots another kernel image instead of [`GuestKernel::image`] (e.g.
    /// [`GuestKernel::vmlinuz`]); the initramfs modules must match it.
    pub fn kernel_image(mut self, path: impl Into<PathBuf>) -> Self {
        self.kernel = path.into();
        self
    }

    /// Machine type (default `q35`; `pc` also works).
    pub fn machine(mut self, machine: &str) -> Self {
        self.machine = machine.to_owned();
        self
    }

    /// Guest RAM in MiB (default 256); also the size of the shared memfd.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Number of vCPUs (default 1).
    pub fn smp(mut self, cpus: u32) -> Self {
        self.smp = cpus;
        self
    }

    /// Appends to the kernel command line.
    pub fn append(mut self, kernel_args: &str) -> Self {
        self.cmdline.push(' ');
        self.cmdline.push_str(kernel_args);
        self
    }

    /// Appends one raw QEMU argument.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Appends raw QEMU arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Adds `-chardev socket,id=<id>,path=<path>` (QEMU connects as client
    /// to a vhost-user backend listening on `path`).
    pub fn chardev_socket(self, id: &str, path: &Path) -> Self {
        let spec = format!(
            "socket,id={},path={}",
            qemu_opt_escape(id),
            qemu_opt_escape(&path.to_string_lossy())
        );
        self.args(["-chardev", &spec])
    }

    /// [`Self::chardev_socket`] with `reconnect-ms=<ms>`: when the backend goes away,
    /// QEMU keeps the device and connects again every `ms` milliseconds (how a VM
    /// survives a backend restart).
    pub fn chardev_socket_reconnect(self, id: &str, path: &Path, ms: u32) -> Self {
        let spec = format!(
            "socket,id={},path={},reconnect-ms={ms}",
            qemu_opt_escape(id),
            qemu_opt_escape(&path.to_string_lossy())
        );
        self.args(["-chardev", &spec])
    }

    /// Adds `-device <spec>`, e.g.
    /// `vhost-user-blk-pci,chardev=c0,num-queues=1`.
    pub fn device(self, spec: &str) -> Self {
        self.args(["-device", spec])
    }

    /// Overall time limit for [`QemuVm::run`] / [`RunningVm::wait`],
    /// counted from spawn.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Echo the guest console (and QEMU's stderr) to stderr while running.
    pub fn echo(mut self, echo: bool) -> Self {
        self.echo = echo;
        self
    }

    /// Runs QEMU inside network namespace `name` (`ip netns exec NAME qemu-system-x86_64
    /// ...`; `ip` execs QEMU, so [`RunningVm::pid`] is QEMU's), e.g. for
    /// `-netdev tap,ifname=...`, whose TAP QEMU creates in its own namespace.
    pub fn netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_owned());
        self
    }

    /// The full command line: program followed by its arguments.
    pub fn command_line(&self) -> Result<Vec<OsString>> {
        let qemu = match &self.qemu {
            Some(q) => q.clone(),
            None => qemu_binary()?,
        };
        let mem = format!("{}M", self.memory_mib);
        let mut v: Vec<OsString> = match &self.netns {
            Some(ns) => ["ip", "netns", "exec", ns.as_str()]
                .iter()
                .map(OsString::from)
                .collect(),
            None => Vec::new(),
        };
        v.push(qemu.into_os_string());
        let mut push = |s: &dyn AsRef<OsStr>| v.push(s.as_ref().to_owned());
        push(&"-machine");
        push(&self.machine);
        push(&"-accel");
        push(&"tcg");
        push(&"-m");
        push(&mem);
        push(&"-object");
        push(&format!("memory-backend-memfd,id=mem,size={mem},share=on"));
        push(&"-numa");
        push(&"node,memdev=mem");
        push(&"-smp");
        push(&self.smp.to_string());
        push(&"-kernel");
        push(&self.kernel);
        push(&"-initrd");
        push(&self.initrd);
        push(&"-append");
        push(&self.cmdline);
        push(&"-nographic");
        push(&"-nodefaults");
        push(&"-serial");
        push(&"stdio");
        push(&"-no-reboot");
        v.extend(self.args.iter().cloned());
        Ok(v)
    }

    /// Starts QEMU; the console is captured in the background.
    pub fn spawn(self) -> Result<RunningVm> {
        if let Some(q) = &self.qemu {
            check_version(q, "qemu-system-x86").map_err(E2eError::missing)?;
        }
        for (what, p) in [("kernel", &self.kernel), ("initrd", &self.initrd)] {
            if !p.is_file() {
                return Err(E2eError::missing(format!(
                    "guest {what} {} does not exist",
                    p.display()
                )));
            }
        }
        let argv = self.command_line()?;
        let (prog, rest) = argv
            .split_first()
            .ok_or_else(|| E2eError::Setup("empty QEMU command line".into()))?;
        let mut cmd = Command::new(prog);
        cmd.args(rest);
        RunningVm::spawn(cmd, &argv, VmKind::Qemu, self.echo, self.timeout, None)
    }

    /// Spawns QEMU and waits for it to exit (see [`RunningVm::wait`]).
    pub fn run(self) -> Result<VmOutput> {
        self.spawn()?.wait()
    }
}

#[derive(Debug, Default)]
struct Shared {
    /// Serial console (QEMU stdout) interleaved with QEMU's stderr, `\r`
    /// removed; stderr lines are prefixed with `[qemu] `.
    log: Mutex<Vec<u8>>,
    cond: Condvar,
}

impl Shared {
    fn snapshot(&self) -> String {
        match self.log.lock() {
            Ok(g) => String::from_utf8_lossy(&g).into_owned(),
            Err(p) => String::from_utf8_lossy(&p.into_inner()).into_owned(),
        }
    }
}

enum Stream {
    Out(ChildStdout),
    Err(ChildStderr),
}

fn spawn_reader(
    stream: Stream,
    shared: Arc<Shared>,
    echo: bool,
    stderr_prefix: &'static str,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let (mut reader, prefix): (Box<dyn Read + Send>, &[u8]) = match stream {
            Stream::Out(o) => (Box::new(o), b""),
            Stream::Err(e) => (Box::new(e), stderr_prefix.as_bytes()),
        };
        let mut buf = [0u8; 4096];
        let mut at_line_start = true;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut chunk = Vec::with_capacity(n + 16);
            for &b in &buf[..n] {
                if b == b'\r' {
                    continue;
                }
                if at_line_start && !prefix.is_empty() {
                    chunk.extend_from_slice(prefix);
                }
                chunk.push(b);
                at_line_start = b == b'\n';
            }
            if echo {
                eprint!("{}", String::from_utf8_lossy(&chunk));
            }
            let mut log = match shared.log.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            log.extend_from_slice(&chunk);
            drop(log);
            shared.cond.notify_all();
        }
        shared.cond.notify_all();
    })
}

/// What kind of VM a [`RunningVm`] is, for its messages and log prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VmKind {
    /// `qemu-system-x86_64`.
    Qemu,
    /// User-mode Linux (`/usr/bin/linux`).
    Uml,
}

impl VmKind {
    fn name(self) -> &'static str {
        match self {
            VmKind::Qemu => "QEMU",
            VmKind::Uml => "user-mode Linux",
        }
    }

    fn stderr_prefix(self) -> &'static str {
        match self {
            VmKind::Qemu => "[qemu] ",
            VmKind::Uml => "[uml] ",
        }
    }
}

/// A running VM (QEMU, or user-mode Linux from [`super::UmlVm`]). Killed on
/// drop.
#[derive(Debug)]
pub struct RunningVm {
    child: Option<Child>,
    shared: Arc<Shared>,
    readers: Vec<JoinHandle<()>>,
    started: Instant,
    timeout: Duration,
    cmdline: String,
    kind: VmKind,
    /// Kept alive (and removed) with the VM: user-mode Linux's `TMPDIR`.
    _dir: Option<TempDir>,
}

/// Result of a finished VM run.
#[derive(Debug, Clone)]
pub struct VmOutput {
    /// Guest serial console interleaved with QEMU's stderr (`[qemu] `
    /// prefixed lines), with `\r` removed.
    pub log: String,
    /// The test script's exit status, from the guest's `E2E-EXIT=<rc>`.
    pub exit_code: i32,
    /// Wall-clock time from spawning QEMU until it exited.
    pub elapsed: Duration,
    /// The VM process's own exit status (QEMU's, or user-mode Linux's).
    pub qemu_status: ExitStatus,
}

impl VmOutput {
    /// Whether the test script exited with 0.
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }

    /// The guest script's progress lines (those starting with
    /// [`super::STEP_MARKER`], printed by [`super::SCRIPT_PRELUDE`]'s `step`).
    pub fn steps(&self) -> Vec<&str> {
        self.log
            .lines()
            .filter(|l| l.starts_with(super::STEP_MARKER))
            .collect()
    }

    /// `Ok(self)` if the test script exited with 0, else an
    /// [`E2eError::Guest`] carrying the log.
    pub fn ensure_success(self) -> Result<VmOutput> {
        if self.success() {
            Ok(self)
        } else {
            Err(E2eError::Guest {
                reason: format!("guest test script failed with E2E-EXIT={}", self.exit_code),
                log: self.log,
            })
        }
    }
}

/// Parses the last `E2E-EXIT=<rc>` in `log`.
pub(crate) fn parse_exit_code(log: &str) -> Option<i32> {
    log.rmatch_indices(EXIT_MARKER).find_map(|(i, _)| {
        let rest = &log[i + EXIT_MARKER.len()..];
        let end = rest
            .find(|c: char| !c.is_ascii_digit() && c != '-')
            .unwrap_or(rest.len());
        rest[..end].parse().ok()
    })
}

/// The module named by an `E2E-INSMOD-FAILED=<module>` marker in `log`.
pub(crate) fn parse_insmod_failure(log: &str) -> Option<&str> {
    log.find(INSMOD_FAILED_MARKER).map(|i| {
        let rest = &log[i + INSMOD_FAILED_MARKER.len()..];
        rest.split_whitespace().next().unwrap_or("")
    })
}

impl RunningVm {
    /// Spawns `cmd` (stdin null, stdout and stderr captured in the background;
    /// `argv` is the same command line, for messages). `dir` is dropped with
    /// the VM.
    pub(crate) fn spawn(
        mut cmd: Command,
        argv: &[OsString],
        kind: VmKind,
        echo: bool,
        timeout: Duration,
        dir: Option<TempDir>,
    ) -> Result<RunningVm> {
        let prog = argv.first().map(|p| Path::new(p).display().to_string());
        if kind == VmKind::Uml {
            // Its own process group, so that its helper processes can be killed.
            cmd.process_group(0);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| E2eError::io(format!("spawning {}", prog.unwrap_or_default()), e))?;
        let shared = Arc::new(Shared::default());
        let mut readers = Vec::new();
        let prefix = kind.stderr_prefix();
        if let Some(out) = child.stdout.take() {
            readers.push(spawn_reader(Stream::Out(out), shared.clone(), echo, prefix));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(spawn_reader(Stream::Err(err), shared.clone(), echo, prefix));
        }
        let cmdline = argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        Ok(RunningVm {
            child: Some(child),
            shared,
            readers,
            started: Instant::now(),
            timeout,
            cmdline,
            kind,
            _dir: dir,
        })
    }

    /// The VM process's id (QEMU's or user-mode Linux's).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The QEMU command line, for diagnostics.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Everything captured so far.
    pub fn output(&self) -> String {
        self.shared.snapshot()
    }

    /// Time since spawn.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Blocks until `needle` appears in the captured output (e.g. a marker
    /// the guest script echoes), QEMU's output ends, or `timeout` passes.
    /// On failure the VM is left running (it is killed on drop).
    pub fn wait_for_output(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let needle = needle.as_bytes();
        let mut log = match self.shared.log.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        loop {
            if log.windows(needle.len().max(1)).any(|w| w == needle) {
                return Ok(());
            }
            let finished = self.readers.iter().all(|r| r.is_finished());
            let now = Instant::now();
            if finished || now >= deadline {
                let text = String::from_utf8_lossy(&log).into_owned();
                let what = format!(
                    "waiting for `{}` in the VM output",
                    String::from_utf8_lossy(needle)
                );
                return Err(if finished {
                    E2eError::Guest {
                        reason: format!("VM output ended while {what}"),
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

    /// SIGKILLs the process group `pgid` of a user-mode Linux run (UML runs
    /// guest user space and I/O helpers in child processes, which outlive a
    /// SIGKILLed main process and keep the console pipe open). The caller
    /// guarantees `pgid` is still ours: its leader is our unreaped child, or a
    /// member still holds our pipe.
    fn kill_group(&self, pgid: u32) {
        if self.kind != VmKind::Uml {
            return;
        }
        if let Ok(pgid) = i32::try_from(pgid) {
            if pgid > 1 {
                // SAFETY: kill(2) has no memory-safety preconditions; the group
                // was created for this VM (`process_group(0)` at spawn).
                unsafe {
                    libc::kill(-pgid, libc::SIGKILL);
                }
            }
        }
    }

    /// Joins the output readers; for user-mode Linux, kills the process group
    /// if its output has not ended 5 s after the main process exited.
    fn join_readers(&mut self, pgid: Option<u32>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.readers.iter().any(|r| !r.is_finished()) {
            if let Some(pgid) = pgid {
                self.kill_group(pgid);
            }
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    fn kill_and_reap(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let pid = child.id();
        // Before reaping: the group's id cannot have been reused.
        self.kill_group(pid);
        let _ = child.kill();
        let status = child.wait().ok();
        self.join_readers(Some(pid));
        status
    }

    /// Kills QEMU now and returns what it printed.
    pub fn kill(mut self) -> String {
        self.kill_and_reap();
        self.shared.snapshot()
    }

    /// Waits for QEMU to exit (the guest powers off after the test script)
    /// within the VM's timeout (counted from spawn). On timeout QEMU is
    /// killed and [`E2eError::Timeout`] returned with the log. A run whose
    /// output lacks `E2E-EXIT=<rc>` (module load failure, kernel panic,
    /// QEMU error) is an [`E2eError::Guest`]. A non-zero `rc` is *not* an
    /// error here; use [`VmOutput::ensure_success`].
    pub fn wait(mut self) -> Result<VmOutput> {
        let deadline = self.started + self.timeout;
        let status = loop {
            let Some(child) = self.child.as_mut() else {
                return Err(E2eError::Setup("VM already reaped".into()));
            };
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => return Err(E2eError::io(format!("waiting for {}", self.kind.name()), e)),
            }
            if Instant::now() >= deadline {
                self.kill_and_reap();
                return Err(E2eError::Timeout {
                    what: format!("VM run (`{}`)", self.cmdline),
                    after: self.timeout,
                    log: self.shared.snapshot(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let elapsed = self.started.elapsed();
        let pid = self.child.take().map(|c| c.id());
        self.join_readers(pid);
        let log = self.shared.snapshot();
        if let Some(module) = parse_insmod_failure(&log) {
            return Err(E2eError::Guest {
                reason: format!("guest failed to load kernel module `{module}`"),
                log,
            });
        }
        match parse_exit_code(&log) {
            Some(exit_code) => Ok(VmOutput {
                log,
                exit_code,
                elapsed,
                qemu_status: status,
            }),
            None => {
                let name = self.kind.name();
                let why = if log.contains("Kernel panic") {
                    "the guest kernel panicked".to_owned()
                } else if log.contains(self.kind.stderr_prefix()) {
                    format!("{name} reported an error")
                } else {
                    format!("kernel panic, {name} error or early power-off")
                };
                Err(E2eError::Guest {
                    reason: format!(
                        "guest did not report {EXIT_MARKER}<rc> ({why}); {name} exited with \
                         {status}; command: {}",
                        self.cmdline
                    ),
                    log,
                })
            }
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_parsing() {
        assert_eq!(parse_exit_code("foo\nE2E-EXIT=0\n"), Some(0));
        assert_eq!(
            parse_exit_code("E2E-EXIT=1\nE2E-EXIT=42\n[ 1.0] x"),
            Some(42)
        );
        assert_eq!(parse_exit_code("E2E-EXIT=\n"), None);
        assert_eq!(parse_exit_code("nothing"), None);
        assert_eq!(
            parse_insmod_failure("x\nE2E-INSMOD-FAILED=virtio_blk\n"),
            Some("virtio_blk")
        );
        assert_eq!(parse_insmod_failure("fine"), None);
    }

    #[test]
    fn escape() {
        assert_eq!(qemu_opt_escape("/tmp/a,b"), "/tmp/a,,b");
    }
}
