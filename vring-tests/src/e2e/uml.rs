// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! User-mode Linux (Debian `user-mode-linux`, Linux 6.1 as a host program) as
//! a vhost-user frontend: its `virtio_uml` transport connects to a backend's
//! unix socket for every `virtio_uml.device=SOCKET:DEVICE_ID` on its command
//! line, and the guest's virtio drivers then drive the backend like a QEMU
//! guest's would, without an emulator in between (a boot takes about 1.5 s).
//!
//! The guest runs the same busybox initramfs as the QEMU guests
//! ([`super::Initramfs`], built for [`uml_kernel`]'s modules), with the same
//! protocol: `/init` loads the modules, runs the test script, prints
//! `E2E-EXIT=<rc>` and powers off, which ends the `linux` process.
//!
//! What Debian's UML kernel (6.1um, `/usr/lib/uml/modules/<ver>/`) has:
//! `virtio_ring`, `virtio` and `virtio_uml` are built in (`modules.builtin`);
//! `virtio_blk`, `virtio_net` (needs `failover`, `net_failover`) and
//! `virtio_console` are modules, loaded by `/init` after the devices were
//! registered from the command line. The module lookup reads
//! `modules.builtin` and each module's `depends=`, so a kernel that builds
//! any of these differently still gets a working load order.
//!
//! ```no_run
//! use vring_tests::e2e::{uml_kernel, Initramfs, TempDir, UmlVm};
//!
//! # fn main() -> Result<(), vring_tests::e2e::E2eError> {
//! let kernel = uml_kernel()?;
//! let tmp = TempDir::new("uml")?;
//! let sock = tmp.path().join("blk.sock");
//! // ... start the vhost-user-blk backend listening on `sock` ...
//! let initrd = Initramfs::new(&kernel)
//!     .modules(&["virtio_blk"])
//!     .script("test -b /dev/vda")
//!     .build()?;
//! let out = UmlVm::new(&kernel, &initrd).virtio_blk(&sock).run()?.ensure_success()?;
//! println!("{}", out.log);
//! # Ok(())
//! # }
//! ```

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::qemu::VmKind;
use super::{E2eError, GuestKernel, InitramfsImage, Result, RunningVm, TempDir, VmOutput};

/// The virtio transport modules the initramfs loads first for user-mode
/// Linux, in order. Debian's UML kernel has all three built in, so its
/// initramfs loads none of them; they are listed for kernels built otherwise.
pub const UML_BASE_MODULES: &[&str] = &["virtio_ring", "virtio", "virtio_uml"];

/// Virtio device ID of a network device (`virtio_uml.device=SOCK:1`).
pub const VIRTIO_ID_NET: u32 = 1;
/// Virtio device ID of a block device (`virtio_uml.device=SOCK:2`).
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Virtio device ID of a console (`virtio_uml.device=SOCK:3`).
pub const VIRTIO_ID_CONSOLE: u32 = 3;

/// Default limit for a whole user-mode Linux run (boot + test + halt).
pub const UML_DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Environment variable naming the UML kernel executable.
const UML_ENV: &str = "E2E_UML";
/// Environment variable naming the directory holding `<version>/` module
/// directories (default [`UML_MODULES_ROOT`]).
const UML_MODULES_ENV: &str = "E2E_UML_MODULES";
/// Where Debian's `user-mode-linux` installs its modules.
const UML_MODULES_ROOT: &str = "/usr/lib/uml/modules";
/// Debian package of the UML kernel.
const UML_PACKAGE: &str = "user-mode-linux";
/// Arguments every UML run gets: the console on stdout (its input is null,
/// nothing reads it), other consoles and serial lines off, a quiet boot.
const UML_BASE_ARGS: &[&str] = &["con0=null,fd:1", "con=null", "ssl=null", "quiet"];

/// Finds the user-mode Linux kernel executable: `$E2E_UML` if set, else
/// `/usr/bin/linux.uml` (the file Debian's `user-mode-linux` ships), else
/// `/usr/bin/linux` (its alternatives link).
pub fn uml_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(UML_ENV).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(E2eError::missing(format!(
                "${UML_ENV} names {}, which does not exist",
                p.display()
            )))
        };
    }
    ["/usr/bin/linux.uml", "/usr/bin/linux"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            E2eError::missing(format!(
                "user-mode Linux not found (/usr/bin/linux.uml; Debian package {UML_PACKAGE})"
            ))
        })
}

/// The user-mode Linux kernel as a [`GuestKernel`] for [`super::Initramfs`]
/// and [`UmlVm`]: [`uml_binary`], its release from `linux --version`, and its
/// modules in `/usr/lib/uml/modules/<release>/` (`$E2E_UML_MODULES/<release>`
/// if that is set), with [`UML_BASE_MODULES`] as the base modules.
pub fn uml_kernel() -> Result<GuestKernel> {
    let bin = uml_binary()?;
    let tmp = TempDir::new("uml-version")?;
    let out = Command::new(&bin)
        .arg("--version")
        .env("TMPDIR", tmp.path())
        .current_dir(tmp.path())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| E2eError::io(format!("running `{} --version`", bin.display()), e))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.lines().next().unwrap_or("").trim().to_owned();
    if !out.status.success() || version.is_empty() || version.contains(char::is_whitespace) {
        return Err(E2eError::missing(format!(
            "`{} --version` did not print a kernel release ({}; stdout `{}`, stderr `{}`): \
             is it user-mode Linux (Debian package {UML_PACKAGE})?",
            bin.display(),
            out.status,
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let root = match std::env::var_os(UML_MODULES_ENV).filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(UML_MODULES_ROOT),
    };
    let modules_dir = root.join(&version);
    GuestKernel::from_program(version, root, bin, modules_dir, UML_BASE_MODULES)
}

/// Builder for a user-mode Linux run with vhost-user devices.
///
/// The command line is `linux mem=<M>M initrd=<cpio> uml_dir=<dir> umid=e2e
/// con0=null,fd:1 con=null ssl=null quiet [virtio_uml.device=SOCK:ID]...
/// [extra...]`, run with `TMPDIR=<dir>`, where `<dir>` is a fresh directory
/// (under `/dev/shm` when that is an executable tmpfs, else `/tmp`) holding
/// UML's guest memory file, shared with the backends, and its `umid`
/// directory, removed with the VM. Stdout and stderr are captured (stderr
/// lines prefixed `[uml] `); stdin is null.
#[derive(Debug, Clone)]
pub struct UmlVm {
    uml: PathBuf,
    initrd: PathBuf,
    memory_mib: u32,
    devices: Vec<(PathBuf, u32)>,
    extra: Vec<String>,
    timeout: Duration,
    echo: bool,
}

impl UmlVm {
    /// A run of `kernel` (from [`uml_kernel`]) with `initrd` (built for that
    /// kernel), 256 MiB of memory, no devices, [`UML_DEFAULT_TIMEOUT`]. Set
    /// `E2E_VERBOSE=1` to echo the console to stderr live.
    pub fn new(kernel: &GuestKernel, initrd: &InitramfsImage) -> Self {
        UmlVm {
            uml: kernel.image().to_path_buf(),
            initrd: initrd.path.clone(),
            memory_mib: 256,
            devices: Vec::new(),
            extra: Vec::new(),
            timeout: UML_DEFAULT_TIMEOUT,
            echo: std::env::var_os("E2E_VERBOSE").is_some_and(|v| !v.is_empty() && v != "0"),
        }
    }

    /// Guest memory in MiB (default 256): `mem=<mib>M`.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Adds `virtio_uml.device=<socket>:<device_id>`: a virtio device of type
    /// `device_id` ([`VIRTIO_ID_NET`], [`VIRTIO_ID_BLOCK`],
    /// [`VIRTIO_ID_CONSOLE`], ...) served by the vhost-user backend listening
    /// on `socket`. UML connects at boot, before `/init` loads the driver.
    pub fn device(mut self, socket: &Path, device_id: u32) -> Self {
        self.devices.push((socket.to_path_buf(), device_id));
        self
    }

    /// A virtio block device (the guest's `/dev/vda` for the first one).
    pub fn virtio_blk(self, socket: &Path) -> Self {
        self.device(socket, VIRTIO_ID_BLOCK)
    }

    /// A virtio network device.
    pub fn virtio_net(self, socket: &Path) -> Self {
        self.device(socket, VIRTIO_ID_NET)
    }

    /// A virtio console device.
    pub fn virtio_console(self, socket: &Path) -> Self {
        self.device(socket, VIRTIO_ID_CONSOLE)
    }

    /// Appends a kernel / UML command-line argument.
    pub fn append(mut self, arg: &str) -> Self {
        self.extra.extend(arg.split_whitespace().map(str::to_owned));
        self
    }

    /// Overall time limit for [`UmlVm::run`] / [`RunningVm::wait`], counted
    /// from spawn.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Echo the console (and UML's stderr) to stderr while running.
    pub fn echo(mut self, echo: bool) -> Self {
        self.echo = echo;
        self
    }

    /// The full command line (program first) for a run whose temporary
    /// directory is `dir`.
    pub fn command_line(&self, dir: &Path) -> Result<Vec<OsString>> {
        let plain = |what: &str, p: &Path| -> Result<String> {
            let s = p.to_str().ok_or_else(|| {
                E2eError::Setup(format!("{what} path {} is not UTF-8", p.display()))
            })?;
            if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c == ':' || c == ',') {
                return Err(E2eError::Setup(format!(
                    "{what} path `{s}` cannot be passed on the UML command line \
                     (it contains white space, `:` or `,`)"
                )));
            }
            Ok(s.to_owned())
        };
        let mut v: Vec<OsString> = vec![self.uml.clone().into_os_string()];
        v.push(format!("mem={}M", self.memory_mib).into());
        v.push(format!("initrd={}", plain("initrd", &self.initrd)?).into());
        v.push(format!("uml_dir={}", plain("temporary directory", dir)?).into());
        v.push("umid=e2e".into());
        v.extend(UML_BASE_ARGS.iter().map(OsString::from));
        for (socket, id) in &self.devices {
            v.push(format!("virtio_uml.device={}:{id}", plain("socket", socket)?).into());
        }
        v.extend(self.extra.iter().map(OsString::from));
        Ok(v)
    }

    /// Starts user-mode Linux; the console is captured in the background.
    pub fn spawn(self) -> Result<RunningVm> {
        for (what, p) in [("UML kernel", &self.uml), ("initrd", &self.initrd)] {
            if !p.is_file() {
                return Err(E2eError::missing(format!(
                    "{what} {} does not exist",
                    p.display()
                )));
            }
        }
        let dir = TempDir::new_in(memory_file_base(), "uml")?;
        let argv = self.command_line(dir.path())?;
        let (prog, rest) = argv
            .split_first()
            .ok_or_else(|| E2eError::Setup("empty UML command line".into()))?;
        let mut cmd = Command::new(prog);
        cmd.args(rest)
            .env("TMPDIR", dir.path())
            .env("LD_PRELOAD", xstate_shim()?)
            .current_dir(dir.path());
        RunningVm::spawn(cmd, &argv, VmKind::Uml, self.echo, self.timeout, Some(dir))
    }

    /// Spawns user-mode Linux and waits for it to halt (see
    /// [`RunningVm::wait`]).
    pub fn run(self) -> Result<VmOutput> {
        self.spawn()?.wait()
    }
}

/// Source of the `LD_PRELOAD` shim that lets UML 6.1 restore FPU state on
/// hosts with a larger XSAVE area than it knows (AVX-512, AMX); the file says
/// why and how.
const XSTATE_SHIM_SOURCE: &str = include_str!("uml_xstate_shim.c");

/// The shim built from [`XSTATE_SHIM_SOURCE`] with the host's C compiler
/// (`$CC`, else `cc`), cached as `<cache>/uml/xstate-<hash>.so` and built at
/// most once per process. Every UML run preloads it: without it Debian's UML
/// panics before `/init` on such hosts ("ptrace set fp regs failed, errno =
/// 14"); where the host accepts UML's own buffer the shim only passes calls
/// through.
fn xstate_shim() -> Result<PathBuf> {
    static SHIM: std::sync::OnceLock<std::result::Result<PathBuf, String>> =
        std::sync::OnceLock::new();
    SHIM.get_or_init(|| build_xstate_shim().map_err(|e| e.to_string()))
        .clone()
        .map_err(E2eError::Setup)
}

fn build_xstate_shim() -> Result<PathBuf> {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(XSTATE_SHIM_SOURCE.as_bytes());
    let dir = super::cache_dir().join("uml");
    let so = dir.join(format!("xstate-{:016x}.so", h.finish()));
    if so.is_file() {
        return Ok(so);
    }
    std::fs::create_dir_all(&dir)
        .map_err(|e| E2eError::io(format!("creating {}", dir.display()), e))?;
    // Unique names per process so parallel test binaries never share a
    // half-written file; the rename publishes the finished library.
    let tmp_src = dir.join(format!(".xstate-{}.c", std::process::id()));
    let tmp_so = dir.join(format!(".xstate-{}.so", std::process::id()));
    std::fs::write(&tmp_src, XSTATE_SHIM_SOURCE)
        .map_err(|e| E2eError::io(format!("writing {}", tmp_src.display()), e))?;
    let cc = std::env::var_os("CC")
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "cc".into());
    let out = Command::new(&cc)
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-o"])
        .arg(&tmp_so)
        .arg(&tmp_src)
        .arg("-ldl")
        .stdin(Stdio::null())
        .output();
    let _ = std::fs::remove_file(&tmp_src);
    let out = out.map_err(|e| {
        E2eError::io(
            format!(
                "running the C compiler `{}` for the UML xstate shim (install gcc)",
                cc.to_string_lossy()
            ),
            e,
        )
    })?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&tmp_so);
        return Err(E2eError::Setup(format!(
            "building the UML xstate shim with `{}` failed ({}): {}",
            cc.to_string_lossy(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    std::fs::rename(&tmp_so, &so).map_err(|e| {
        let _ = std::fs::remove_file(&tmp_so);
        E2eError::io(format!("renaming the shim to {}", so.display()), e)
    })?;
    Ok(so)
}

/// `/dev/shm` if it is a writable, executable directory (UML maps its
/// memory file executable and warns when it is not on tmpfs), else `/tmp`.
fn memory_file_base() -> &'static Path {
    let shm = Path::new("/dev/shm");
    let Ok(c) = std::ffi::CString::new("/dev/shm") else {
        return Path::new("/tmp");
    };
    // SAFETY: an all-zero `statvfs` is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid, writable
    // `statvfs` that outlives the call.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    // SAFETY: access(2) with a valid NUL-terminated path has no memory effects.
    let writable = unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0;
    if rc == 0 && writable && st.f_flag & libc::ST_NOEXEC == 0 && st.f_flag & libc::ST_RDONLY == 0 {
        shm
    } else {
        Path::new("/tmp")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> UmlVm {
        UmlVm {
            uml: PathBuf::from("/usr/bin/linux.uml"),
            initrd: PathBuf::from("/c/i.cpio"),
            memory_mib: 128,
            devices: Vec::new(),
            extra: Vec::new(),
            timeout: UML_DEFAULT_TIMEOUT,
            echo: false,
        }
    }

    #[test]
    fn command_line_shape() {
        let v = vm()
            .virtio_blk(Path::new("/t/b.sock"))
            .virtio_net(Path::new("/t/n.sock"))
            .append("loglevel=7");
        let argv: Vec<String> = v
            .command_line(Path::new("/t/d"))
            .unwrap()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            argv,
            [
                "/usr/bin/linux.uml",
                "mem=128M",
                "initrd=/c/i.cpio",
                "uml_dir=/t/d",
                "umid=e2e",
                "con0=null,fd:1",
                "con=null",
                "ssl=null",
                "quiet",
                "virtio_uml.device=/t/b.sock:2",
                "virtio_uml.device=/t/n.sock:1",
                "loglevel=7",
            ]
        );
    }

    #[test]
    fn rejects_unparsable_paths() {
        let v = vm().virtio_blk(Path::new("/t/a:b.sock"));
        assert!(matches!(
            v.command_line(Path::new("/t/d")),
            Err(E2eError::Setup(_))
        ));
    }
}
