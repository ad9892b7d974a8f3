// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Building (and caching) the busybox guest initramfs.

use std::hash::Hasher;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use super::cpio::CpioWriter;
use super::kernel::module_bytes;
use super::{
    cache_dir, read_file, E2eError, GuestKernel, Result, EXIT_MARKER, INSMOD_FAILED_MARKER,
};

/// The virtio PCI transport modules `/init` always loads first, in order.
pub const BASE_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
];

/// Where the test script lives in the guest.
const GUEST_SCRIPT: &str = "/e2e/test.sh";
/// Directory of the (decompressed) modules in the guest.
const GUEST_MODULE_DIR: &str = "/lib/modules/e2e";
/// Cached images unused for this long are deleted.
const CACHE_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// At most this many cached images are kept (least recently used go first).
const CACHE_MAX_FILES: usize = 64;

/// Builder for a guest initramfs: static busybox with applet symlinks, kernel
/// modules, a generated `/init` and the caller's test script.
///
/// The generated `/init` mounts `/proc`, `/sys`, `/dev` (devtmpfs) and a
/// tmpfs on `/tmp`, `insmod`s the kernel's [`GuestKernel::base_modules`]
/// ([`BASE_MODULES`] for the QEMU guest kernel) and then the caller's modules
/// (dependencies resolved and loaded first), runs the test script with `sh`
/// from `/`, prints `E2E-EXIT=<rc>` and powers off with `poweroff -f`. If an
/// `insmod` fails it prints `E2E-INSMOD-FAILED=<module>` and powers off
/// without an exit marker, so the run fails.
#[derive(Debug, Clone)]
pub struct Initramfs<'k> {
    kernel: &'k GuestKernel,
    modules: Vec<String>,
    script: String,
    files: Vec<(String, Vec<u8>, u32)>,
    busybox: Option<PathBuf>,
}

/// A built initramfs image (cached on disk).
#[derive(Debug, Clone)]
pub struct InitramfsImage {
    /// Path of the uncompressed newc cpio archive, under
    /// `$E2E_CACHE_DIR/initramfs/`.
    pub path: PathBuf,
    /// The modules `/init` loads, in load order.
    pub modules: Vec<String>,
}

impl<'k> Initramfs<'k> {
    /// A builder for `kernel`'s modules with no driver modules and an empty
    /// test script (`true`).
    pub fn new(kernel: &'k GuestKernel) -> Self {
        Initramfs {
            kernel,
            modules: Vec::new(),
            script: "true\n".into(),
            files: Vec::new(),
            busybox: None,
        }
    }

    /// Adds driver modules to load after the kernel's base modules, e.g.
    /// `["virtio_blk"]`, `["virtio_net"]` (pulls in `failover`,
    /// `net_failover`) or `["virtio_console"]`.
    pub fn modules(mut self, names: &[&str]) -> Self {
        self.modules.extend(names.iter().map(|s| (*s).to_owned()));
        self
    }

    /// Sets the test script, run by busybox `sh` (no `set -e` is added;
    /// start the script with `set -e` if wanted). Its exit status becomes the
    /// `E2E-EXIT` code.
    pub fn script(mut self, script: impl Into<String>) -> Self {
        self.script = script.into();
        if !self.script.ends_with('\n') {
            self.script.push('\n');
        }
        self
    }

    /// Adds an extra file at absolute guest path `guest_path` with
    /// permission bits `mode` (e.g. `0o755`).
    pub fn file(mut self, guest_path: &str, contents: impl Into<Vec<u8>>, mode: u32) -> Self {
        self.files
            .push((guest_path.to_owned(), contents.into(), mode));
        self
    }

    /// Adds a dynamically linked host program at the same path in the guest, with the
    /// shared libraries and the dynamic loader it needs (as `ldd` lists them on the host,
    /// each at its host path), so that it runs in the guest as on the host (same kernel
    /// ABI, same libc). Fails with [`E2eError::Setup`] (naming `package`, the Debian
    /// package to install) when the program is missing, and when `ldd` cannot resolve a
    /// library.
    pub fn host_program(mut self, program: &Path, package: &str) -> Result<Self> {
        if !program.is_file() {
            return Err(E2eError::missing(format!(
                "{} not found (Debian package {package})",
                program.display()
            )));
        }
        let out = Command::new("ldd")
            .arg(program)
            .output()
            .map_err(|e| E2eError::io(format!("running `ldd {}`", program.display()), e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(E2eError::Setup(format!(
                "`ldd {}` failed: {}{}",
                program.display(),
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let mut paths = vec![program.to_path_buf()];
        for line in text.lines() {
            let line = line.trim();
            if line.contains("not found") {
                return Err(E2eError::missing(format!(
                    "{}: shared library {line} (Debian package {package} and its dependencies)",
                    program.display()
                )));
            }
            // `libx.so.1 => /lib/.../libx.so.1 (0x...)`, or the loader's
            // `/lib64/ld-linux-x86-64.so.2 (0x...)`; `linux-vdso.so.1 (0x...)` has no file.
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line
                    .split_whitespace()
                    .next()
                    .filter(|p| p.starts_with('/')),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                paths.push(PathBuf::from(p));
            }
        }
        for p in paths {
            let data = read_file(&p)?;
            let guest = p.to_string_lossy().into_owned();
            self.files.push((guest, data, 0o755));
        }
        Ok(self)
    }

    /// Uses another static busybox binary (default: `$E2E_BUSYBOX`, else
    /// `/bin/busybox`, as installed by `busybox-static`).
    pub fn busybox(mut self, path: impl Into<PathBuf>) -> Self {
        self.busybox = Some(path.into());
        self
    }

    /// The generated `/init` for the given module load order.
    fn init_script(modules: &[String]) -> String {
        let mut s = String::from(
            "#!/bin/sh\n\
             # Generated by vring_tests::e2e::Initramfs.\n\
             export PATH=/bin:/sbin:/usr/bin:/usr/sbin\n\
             export HOME=/ TERM=dumb\n\
             mount -t proc proc /proc\n\
             mount -t sysfs sysfs /sys\n\
             mount -t devtmpfs devtmpfs /dev\n\
             mount -t tmpfs tmpfs /tmp\n\
             mkdir -p /dev/pts /run\n\
             e2e_insmod() {\n",
        );
        s.push_str(&format!(
            "    if ! insmod {GUEST_MODULE_DIR}/$1.ko; then\n\
             \x20       echo\n\
             \x20       echo \"{INSMOD_FAILED_MARKER}$1\"\n\
             \x20       poweroff -f\n\
             \x20       sleep 60\n\
             \x20   fi\n\
             }}\n"
        ));
        for m in modules {
            s.push_str(&format!("e2e_insmod {m}\n"));
        }
        s.push_str(&format!(
            "echo E2E-MODULES-LOADED\n\
             cd /\n\
             sh {GUEST_SCRIPT}\n\
             rc=$?\n\
             sync\n\
             echo\n\
             echo \"{EXIT_MARKER}$rc\"\n\
             poweroff -f\n\
             sleep 60\n"
        ));
        s
    }

    /// Builds the archive (in memory), and stores it under
    /// `$E2E_CACHE_DIR/initramfs/<hash>.cpio` unless an identical one is
    /// already there. The hash covers every input byte (busybox, modules,
    /// scripts, extra files), so stale images are never reused.
    pub fn build(&self) -> Result<InitramfsImage> {
        let busybox = match &self.busybox {
            Some(p) => p.clone(),
            None => match std::env::var_os("E2E_BUSYBOX") {
                Some(p) if !p.is_empty() => PathBuf::from(p),
                _ => PathBuf::from("/bin/busybox"),
            },
        };
        let bb = read_file(&busybox).map_err(|_| {
            E2eError::missing(format!(
                "static busybox not found at {} (Debian package busybox-static)",
                busybox.display()
            ))
        })?;
        if elf_is_dynamic(&bb) {
            return Err(E2eError::missing(format!(
                "{} is dynamically linked; the guest needs busybox-static",
                busybox.display()
            )));
        }
        let applets = busybox_applets(&busybox)?;

        let mut names: Vec<&str> = self.kernel.base_modules().to_vec();
        names.extend(self.modules.iter().map(String::as_str));
        let modules = self.kernel.resolve_modules(&names)?;

        let mut w = CpioWriter::new();
        for d in [
            "bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "etc", "e2e",
        ] {
            w.dir(d);
        }
        w.file("bin/busybox", 0o755, &bb);
        for applet in &applets {
            if applet != "bin/busybox" {
                w.symlink(applet, "/bin/busybox");
            }
        }
        for m in &modules {
            let bytes = module_bytes(&m.path)?;
            w.file(&format!("{GUEST_MODULE_DIR}/{}.ko", m.name), 0o644, &bytes);
        }
        let load_order: Vec<String> = modules.iter().map(|m| m.name.clone()).collect();
        w.file("init", 0o755, Self::init_script(&load_order).as_bytes());
        w.file(GUEST_SCRIPT, 0o755, self.script.as_bytes());
        for (path, data, mode) in &self.files {
            w.file(path, *mode, data);
        }
        let archive = w.finish();

        let mut h = std::collections::hash_map::DefaultHasher::new();
        h.write(&archive);
        let name = format!("{:016x}-{}.cpio", h.finish(), archive.len());
        let dir = cache_dir().join("initramfs");
        let path = dir.join(&name);
        store_cached(&dir, &path, &archive)?;
        Ok(InitramfsImage {
            path,
            modules: load_order,
        })
    }
}

/// Writes `data` to `path` atomically unless a file of the same size is
/// already there (the name embeds the content hash). Also prunes old images.
fn store_cached(dir: &Path, path: &Path, data: &[u8]) -> Result<()> {
    let len = data.len() as u64;
    if std::fs::metadata(path)
        .map(|m| m.len() == len)
        .unwrap_or(false)
    {
        // Refresh the mtime so pruning keeps images in use.
        let _ = std::fs::File::options()
            .append(true)
            .open(path)
            .and_then(|f| f.set_modified(SystemTime::now()));
        return Ok(());
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| E2eError::io(format!("creating {}", dir.display()), e))?;
    prune(dir);
    let tmp = dir.join(format!(
        ".tmp-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        E2eError::io(format!("writing {}", path.display()), e)
    })
}

/// Deletes images unused for [`CACHE_MAX_AGE`] and, beyond
/// [`CACHE_MAX_FILES`], the least recently used ones (every distinct test
/// script yields a distinct ~2 MiB image).
fn prune(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    let mut images = Vec::new();
    for e in rd.flatten() {
        let Some(mtime) = e.metadata().and_then(|m| m.modified()).ok() else {
            continue;
        };
        let age = now.duration_since(mtime).unwrap_or(Duration::ZERO);
        if age > CACHE_MAX_AGE {
            let _ = std::fs::remove_file(e.path());
        } else if e.file_name().to_string_lossy().ends_with(".cpio") {
            images.push((mtime, e.path()));
        }
    }
    if images.len() >= CACHE_MAX_FILES {
        images.sort();
        for (_, p) in &images[..=images.len() - CACHE_MAX_FILES] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Applet paths (relative, e.g. `bin/sh`, `sbin/insmod`) of a busybox binary.
fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(|e| E2eError::io(format!("running `{} --list-full`", busybox.display()), e))?;
    if !out.status.success() {
        return Err(E2eError::Setup(format!(
            "`{} --list-full` failed: {}",
            busybox.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let list: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().trim_start_matches('/').to_owned())
        .filter(|l| !l.is_empty() && !l.contains(".."))
        .collect();
    for needed in ["sh", "insmod", "mount", "poweroff"] {
        if !list.iter().any(|a| a.rsplit('/').next() == Some(needed)) {
            return Err(E2eError::Setup(format!(
                "busybox {} lacks the `{needed}` applet",
                busybox.display()
            )));
        }
    }
    Ok(list)
}

/// Whether an ELF64 executable has a `PT_INTERP` program header.
fn elf_is_dynamic(elf: &[u8]) -> bool {
    let rd16 = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let rd32 = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let rd64 = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .and_then(|v| usize::try_from(v).ok())
    };
    if elf.get(0..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) {
        // Not ELF64: let the guest fail loudly rather than guess here.
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (rd64(0x20), rd16(0x36), rd16(0x38)) else {
        return false;
    };
    (0..usize::from(phnum))
        .any(|i| phoff.checked_add(i * usize::from(phentsize)).and_then(rd32) == Some(3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_script_shape() {
        let s = Initramfs::init_script(&["virtio_ring".into(), "virtio_blk".into()]);
        assert!(s.starts_with("#!/bin/sh\n"));
        assert!(s.contains("e2e_insmod virtio_ring\ne2e_insmod virtio_blk\n"));
        assert!(s.contains(INSMOD_FAILED_MARKER));
        assert!(s.contains("echo \"E2E-EXIT=$rc\""));
        assert!(s.contains("poweroff -f"));
    }

    #[test]
    fn dynamic_detection() {
        if let Ok(sh) = std::fs::read("/bin/sh") {
            assert!(elf_is_dynamic(&sh), "/bin/sh should be dynamic");
        }
        assert!(!elf_is_dynamic(b"garbage"));
    }
}
