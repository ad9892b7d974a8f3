// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End-to-end test harness: a real QEMU (>= 10, TCG) booting a real Debian
//! Linux guest from a tiny busybox initramfs, talking to a vhost-user backend
//! over a unix socket.
//!
//! The host needs the packages and the guest kernel that
//! `vring-tests/scripts/install-test-deps.sh` installs (QEMU from
//! bookworm-backports, busybox-static, and a Debian kernel extracted into
//! `$REPO/.cache/e2e/kernel/`). Everything else is built on demand and cached
//! under `$REPO/.cache/e2e/` (override the root with `E2E_CACHE_DIR`).
//!
//! Typical use:
//!
//! ```no_run
//! use std::time::Duration;
//! use vring_tests::e2e::{GuestKernel, Initramfs, QemuVm, TempDir};
//!
//! # fn main() -> Result<(), vring_tests::e2e::E2eError> {
//! let kernel = GuestKernel::locate()?;
//! let tmp = TempDir::new("blk")?;
//! let sock = tmp.path().join("blk.sock");
//! // ... start the backend listening on `sock` ...
//! let initrd = Initramfs::new(&kernel)
//!     .modules(&["virtio_blk"])
//!     .script("test -b /dev/vda")
//!     .build()?;
//! let out = QemuVm::new(&kernel, &initrd)
//!     .chardev_socket("c0", &sock)
//!     .device("vhost-user-blk-pci,chardev=c0,num-queues=1")
//!     .timeout(Duration::from_secs(60))
//!     .run()?
//!     .ensure_success()?;
//! println!("{}", out.log);
//! # Ok(())
//! # }
//! ```
//!
//! Other vhost-user frontends: [`uml`] runs user-mode Linux (Debian
//! `user-mode-linux`) with `virtio_uml` devices on the same initramfs and
//! protocol ([`UmlVm`]), and [`dpdk`] drives DPDK's testpmd as a `net_virtio_user`
//! frontend or a `net_vhost` backend.
//!
//! Guest protocol: the generated `/init` loads the virtio PCI transport
//! modules and the requested driver modules (printing
//! [`INSMOD_FAILED_MARKER`] and powering off if one fails), runs the test
//! script with `sh`, prints `E2E-EXIT=<rc>` ([`EXIT_MARKER`]) and powers off.

pub mod blk;
mod cpio;
pub mod dpdk;
mod initramfs;
mod kernel;
pub mod netns;
mod process;
mod qemu;
pub mod uml;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use initramfs::{Initramfs, InitramfsImage, BASE_MODULES};
pub use kernel::{GuestKernel, KernelModule};
pub use process::{qemu_storage_daemon_binary, wait_for_socket, BackgroundProcess, QsdBlkExport};
pub use qemu::{qemu_binary, QemuVm, RunningVm, VmOutput, DEFAULT_CMDLINE, DEFAULT_TIMEOUT};
pub use uml::{
    uml_binary, uml_kernel, UmlVm, UML_BASE_MODULES, UML_DEFAULT_TIMEOUT, VIRTIO_ID_BLOCK,
    VIRTIO_ID_CONSOLE, VIRTIO_ID_NET,
};

/// Marker line the guest prints after the test script: `E2E-EXIT=<rc>`.
pub const EXIT_MARKER: &str = "E2E-EXIT=";

/// Marker the guest `/init` prints (followed by the module name) when loading
/// a kernel module fails; it then powers off without an [`EXIT_MARKER`].
pub const INSMOD_FAILED_MARKER: &str = "E2E-INSMOD-FAILED=";

/// Prefix of the progress lines a guest script prints with the `step` function
/// of [`SCRIPT_PRELUDE`]: `E2E-STEP [<uptime>] <what>`.
pub const STEP_MARKER: &str = "E2E-STEP ";

/// Shell functions for guest test scripts (QEMU and user-mode Linux alike):
/// `fail MSG` prints `GUEST-FAIL: MSG` and exits 1; `step MSG` prints an
/// [`STEP_MARKER`] line with the guest's uptime, so a failed run's log shows
/// how far the script got.
pub const SCRIPT_PRELUDE: &str = r#"fail() { echo "GUEST-FAIL: $*"; exit 1; }
step() { echo "E2E-STEP [$(cut -d' ' -f1 /proc/uptime)] $*"; }
"#;

/// The script that installs the e2e dependencies, relative to the repo root.
pub const INSTALL_SCRIPT: &str = "vring-tests/scripts/install-test-deps.sh";

/// Errors from the e2e harness.
#[derive(Debug)]
pub enum E2eError {
    /// The host lacks something the e2e tests need (QEMU, kernel, busybox...).
    /// The message says what and how to install it.
    Setup(String),
    /// An I/O operation failed.
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The VM (or another waited-for event) did not finish in time; the VM
    /// was killed.
    Timeout {
        /// What timed out.
        what: String,
        /// The time limit.
        after: Duration,
        /// Output captured so far (guest serial console + QEMU stderr).
        log: String,
    },
    /// The guest did not complete the protocol: a module failed to load,
    /// the kernel panicked, QEMU failed, or the test script failed (see
    /// [`VmOutput::ensure_success`]).
    Guest {
        /// Why the run is considered failed.
        reason: String,
        /// Full captured output (guest serial console + QEMU stderr).
        log: String,
    },
}

impl E2eError {
    /// Wraps an [`io::Error`] with a description of what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        E2eError::Io {
            context: context.into(),
            source,
        }
    }

    /// A [`E2eError::Setup`] error whose message ends with the hint to run
    /// the install script.
    pub fn missing(what: impl fmt::Display) -> Self {
        E2eError::Setup(format!(
            "{what}\n  -> run `{}/{INSTALL_SCRIPT}` (as root) to install the e2e test dependencies",
            repo_root().display()
        ))
    }

    /// The captured VM log, if this error carries one.
    pub fn log(&self) -> Option<&str> {
        match self {
            E2eError::Timeout { log, .. } | E2eError::Guest { log, .. } => Some(log),
            _ => None,
        }
    }
}

impl fmt::Display for E2eError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            E2eError::Setup(msg) => write!(f, "e2e setup: {msg}"),
            E2eError::Io { context, source } => write!(f, "e2e: {context}: {source}"),
            E2eError::Timeout { what, after, log } => write!(
                f,
                "e2e: {what} timed out after {:.1}s\n----- captured log -----\n{log}\n----- end of log -----",
                after.as_secs_f64()
            ),
            E2eError::Guest { reason, log } => write!(
                f,
                "e2e: {reason}\n----- captured log -----\n{log}\n----- end of log -----"
            ),
        }
    }
}

impl std::error::Error for E2eError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            E2eError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Result type of the e2e harness.
pub type Result<T> = std::result::Result<T, E2eError>;

/// The workspace root (parent of the `vring-tests` crate directory).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Root of the e2e cache: `$E2E_CACHE_DIR` if set, else `$REPO/.cache/e2e`.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("E2E_CACHE_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => repo_root().join(".cache").join("e2e"),
    }
}

/// A uniquely named temporary directory, removed (recursively) on drop.
///
/// Created directly under `/tmp` (not `$TMPDIR`) with a short name, so unix
/// socket paths inside it stay well below the 108-byte `sun_path` limit.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    /// Creates `/tmp/e2e-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> Result<TempDir> {
        Self::new_in(Path::new("/tmp"), tag)
    }

    /// Creates `<base>/e2e-<tag>-<pid>-<n>` (e.g. under `/dev/shm` for a file on tmpfs).
    pub fn new_in(base: &Path, tag: &str) -> Result<TempDir> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        for _ in 0..100 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let path = base.join(format!(
                "e2e-{tag}-{}-{n}-{:x}",
                std::process::id(),
                nanos & 0xffff
            ));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(TempDir { path, keep: false }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(E2eError::io(
                        format!("creating temp dir {}", path.display()),
                        e,
                    ))
                }
            }
        }
        Err(E2eError::io(
            "creating temp dir",
            io::Error::new(io::ErrorKind::AlreadyExists, "no free name"),
        ))
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the directory on drop (for post-mortem debugging).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Reads a file, mapping the error to [`E2eError::Io`] with the path.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| E2eError::io(format!("reading {}", path.display()), e))
}
