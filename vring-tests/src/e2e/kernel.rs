// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Locating the cached guest kernel and resolving its modules.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::{cache_dir, read_file, E2eError, Result, BASE_MODULES};

/// The guest kernel extracted by `install-test-deps.sh` into
/// `$E2E_CACHE_DIR/kernel/` (a Debian `linux-image-*-amd64` package unpacked
/// with `dpkg-deb -x`).
#[derive(Debug)]
pub struct GuestKernel {
    version: String,
    root: PathBuf,
    vmlinuz: PathBuf,
    image: PathBuf,
    modules_dir: PathBuf,
    base_modules: &'static [&'static str],
    index: OnceLock<std::result::Result<ModuleIndex, String>>,
}

/// One kernel module file, as resolved by [`GuestKernel::resolve_modules`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelModule {
    /// Module name (underscores, no extension), e.g. `virtio_pci`.
    pub name: String,
    /// Path of the `.ko` / `.ko.xz` / `.ko.zst` / `.ko.gz` file on the host.
    pub path: PathBuf,
}

#[derive(Debug)]
struct ModuleIndex {
    /// Normalized module name -> file.
    files: HashMap<String, PathBuf>,
    /// Normalized names of modules built into the kernel image.
    builtin: HashSet<String>,
}

/// Normalizes a module name the way the kernel does (`-` and `_` are equal).
fn normalize(name: &str) -> String {
    name.trim().replace('-', "_")
}

/// Strips a module file extension; `None` if the name is not a module file.
fn module_stem(file_name: &str) -> Option<&str> {
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file_name.strip_suffix(ext))
}

impl GuestKernel {
    /// Finds the kernel under `$E2E_CACHE_DIR/kernel` (default
    /// `$REPO/.cache/e2e/kernel`). If several versions are present,
    /// `$E2E_KERNEL_VERSION` selects one, else the (lexicographically) last
    /// is used.
    pub fn locate() -> Result<GuestKernel> {
        GuestKernel::locate_in(&cache_dir().join("kernel"))
    }

    /// Like [`GuestKernel::locate`], with an explicit extraction directory
    /// (the one containing `boot/` and `lib/modules/`).
    pub fn locate_in(root: &Path) -> Result<GuestKernel> {
        let boot = root.join("boot");
        let entries = std::fs::read_dir(&boot).map_err(|e| {
            E2eError::missing(format!(
                "guest kernel not found: cannot read {} ({e})",
                boot.display()
            ))
        })?;
        let mut versions: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("vmlinuz-"))
                    .map(str::to_owned)
            })
            .collect();
        versions.sort();
        let version = match std::env::var("E2E_KERNEL_VERSION") {
            Ok(v) if !v.is_empty() => {
                if !versions.contains(&v) {
                    return Err(E2eError::missing(format!(
                        "E2E_KERNEL_VERSION={v} but {} has only {versions:?}",
                        boot.display()
                    )));
                }
                v
            }
            _ => versions.pop().ok_or_else(|| {
                E2eError::missing(format!(
                    "guest kernel not found: no vmlinuz-* in {}",
                    boot.display()
                ))
            })?,
        };
        let vmlinuz = boot.join(format!("vmlinuz-{version}"));
        let modules_dir = root.join("lib").join("modules").join(&version);
        if !modules_dir.join("kernel").is_dir() {
            return Err(E2eError::missing(format!(
                "guest kernel modules not found in {}",
                modules_dir.display()
            )));
        }
        // The install script also extracts the uncompressed ELF `vmlinux`
        // (bootable via PVH), which saves ~3-4 s of in-guest xz
        // decompression under TCG. Fall back to the bzImage otherwise.
        let vmlinux = boot.join(format!("vmlinux-{version}"));
        let image = if is_elf(&vmlinux) {
            vmlinux
        } else {
            vmlinuz.clone()
        };
        Ok(GuestKernel {
            version,
            root: root.to_path_buf(),
            vmlinuz,
            image,
            modules_dir,
            base_modules: BASE_MODULES,
            index: OnceLock::new(),
        })
    }

    /// A kernel that is not a bootable image for QEMU but a program (user-mode
    /// Linux): `image` is the executable, `modules_dir` its `<ver>` modules
    /// directory (with `kernel/` and `modules.builtin`), `root` the directory
    /// holding the modules directories, and `base_modules` the transport
    /// modules the initramfs loads first (those built in are skipped).
    pub(crate) fn from_program(
        version: String,
        root: PathBuf,
        image: PathBuf,
        modules_dir: PathBuf,
        base_modules: &'static [&'static str],
    ) -> Result<GuestKernel> {
        if !modules_dir.join("kernel").is_dir() {
            return Err(E2eError::missing(format!(
                "kernel modules not found in {}",
                modules_dir.display()
            )));
        }
        Ok(GuestKernel {
            version,
            root,
            vmlinuz: image.clone(),
            image,
            modules_dir,
            base_modules,
            index: OnceLock::new(),
        })
    }

    /// Kernel release, e.g. `6.1.0-56-amd64` (user-mode Linux: `6.1.176`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The extraction directory (containing `boot/` and `lib/`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The image passed to QEMU's `-kernel`: the uncompressed PVH-bootable
    /// `vmlinux-<ver>` when present, else `vmlinuz-<ver>`. For user-mode
    /// Linux, the kernel executable.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// The compressed bzImage `boot/vmlinuz-<ver>`.
    pub fn vmlinuz(&self) -> &Path {
        &self.vmlinuz
    }

    /// `lib/modules/<ver>` of the extracted kernel (for user-mode Linux,
    /// `/usr/lib/uml/modules/<ver>`).
    pub fn modules_dir(&self) -> &Path {
        &self.modules_dir
    }

    /// The virtio transport modules the initramfs `/init` loads before the
    /// caller's (skipping the built-in ones): [`BASE_MODULES`] (virtio PCI) for
    /// the QEMU guest kernel, [`super::UML_BASE_MODULES`] for user-mode Linux.
    pub fn base_modules(&self) -> &'static [&'static str] {
        self.base_modules
    }

    fn index(&self) -> Result<&ModuleIndex> {
        self.index
            .get_or_init(|| ModuleIndex::build(&self.modules_dir))
            .as_ref()
            .map_err(|e| E2eError::Setup(e.clone()))
    }

    /// Whether `name` is built into the kernel image (no module to load).
    pub fn is_builtin(&self, name: &str) -> Result<bool> {
        Ok(self.index()?.builtin.contains(&normalize(name)))
    }

    /// Finds the file of module `name` (`-`/`_` insensitive).
    pub fn module_path(&self, name: &str) -> Result<PathBuf> {
        self.index()?
            .files
            .get(&normalize(name))
            .cloned()
            .ok_or_else(|| {
                E2eError::Setup(format!(
                    "kernel module `{name}` not found under {}",
                    self.modules_dir.display()
                ))
            })
    }

    /// Resolves `names` and all their dependencies (read from each module's
    /// `.modinfo` `depends=`; the Debian package ships no `modules.dep`) into
    /// a load order where every module comes after its dependencies, keeping
    /// the given order otherwise. Duplicates and built-in modules are
    /// dropped.
    pub fn resolve_modules(&self, names: &[&str]) -> Result<Vec<KernelModule>> {
        let index = self.index()?;
        let mut order = Vec::new();
        let mut done = HashSet::new();
        for name in names {
            self.visit(
                index,
                &normalize(name),
                &mut Vec::new(),
                &mut done,
                &mut order,
            )?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        index: &ModuleIndex,
        name: &str,
        stack: &mut Vec<String>,
        done: &mut HashSet<String>,
        order: &mut Vec<KernelModule>,
    ) -> Result<()> {
        if done.contains(name) || index.builtin.contains(name) {
            return Ok(());
        }
        if stack.iter().any(|s| s == name) {
            return Err(E2eError::Setup(format!(
                "kernel module dependency cycle: {} -> {name}",
                stack.join(" -> ")
            )));
        }
        let path = self.module_path(name)?;
        let bytes = module_bytes(&path)?;
        let deps = modinfo_depends(&bytes).map_err(|e| {
            E2eError::Setup(format!("cannot read modinfo of {}: {e}", path.display()))
        })?;
        stack.push(name.to_owned());
        for dep in deps {
            self.visit(index, &normalize(&dep), stack, done, order)?;
        }
        stack.pop();
        done.insert(name.to_owned());
        order.push(KernelModule {
            name: name.to_owned(),
            path,
        });
        Ok(())
    }
}

impl ModuleIndex {
    fn build(modules_dir: &Path) -> std::result::Result<ModuleIndex, String> {
        let mut files = HashMap::new();
        let mut stack = vec![modules_dir.join("kernel")];
        // Also look at updates/ extra/ etc. if they exist.
        for extra in ["updates", "extra"] {
            let p = modules_dir.join(extra);
            if p.is_dir() {
                stack.push(p);
            }
        }
        while let Some(dir) = stack.pop() {
            let rd =
                std::fs::read_dir(&dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
            for entry in rd {
                let entry = entry.map_err(|e| format!("reading {}: {e}", dir.display()))?;
                let ft = entry
                    .file_type()
                    .map_err(|e| format!("stat {}: {e}", entry.path().display()))?;
                if ft.is_dir() {
                    stack.push(entry.path());
                } else if let Some(stem) = entry.file_name().to_str().and_then(module_stem) {
                    files.entry(normalize(stem)).or_insert_with(|| entry.path());
                }
            }
        }
        if files.is_empty() {
            return Err(format!("no kernel modules under {}", modules_dir.display()));
        }
        // modules.builtin lists e.g. `kernel/drivers/virtio/virtio_anchor.ko`.
        let mut builtin = HashSet::new();
        if let Ok(text) = std::fs::read_to_string(modules_dir.join("modules.builtin")) {
            for line in text.lines() {
                let file = line.rsplit('/').next().unwrap_or(line);
                if let Some(stem) = module_stem(file) {
                    builtin.insert(normalize(stem));
                }
            }
        }
        Ok(ModuleIndex { files, builtin })
    }
}

fn is_elf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map(|()| magic == *b"\x7fELF")
        .unwrap_or(false)
}

/// Reads a module file, decompressing `.ko.xz` / `.ko.zst` / `.ko.gz` with
/// the host's `xz` / `zstd` / `gzip` (busybox `insmod` only loads plain
/// `.ko` files). Debian bookworm's 6.1 kernel ships uncompressed modules.
pub(crate) fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        "xz"
    } else if name.ends_with(".ko.zst") {
        "zstd"
    } else if name.ends_with(".ko.gz") {
        "gzip"
    } else {
        return read_file(path);
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .map_err(|e| E2eError::io(format!("running `{tool} -dc {name}`"), e))?;
    if !out.status.success() {
        return Err(E2eError::Setup(format!(
            "`{tool} -dc {name}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

fn read_u16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn read_u32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn read_u64(b: &[u8], off: usize) -> Option<usize> {
    usize::try_from(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?)).ok()
}

/// Returns the contents of the `.modinfo` section of an ELF64 little-endian
/// relocatable object.
fn modinfo_section(elf: &[u8]) -> std::result::Result<&[u8], String> {
    if elf.get(0..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err("not an ELF64 little-endian object".into());
    }
    let bad = || "truncated ELF header".to_string();
    let shoff = read_u64(elf, 0x28).ok_or_else(bad)?;
    let shentsize = usize::from(read_u16(elf, 0x3a).ok_or_else(bad)?);
    let shnum = usize::from(read_u16(elf, 0x3c).ok_or_else(bad)?);
    let shstrndx = usize::from(read_u16(elf, 0x3e).ok_or_else(bad)?);
    if shentsize < 40 {
        return Err("bad section header size".into());
    }
    let section = |i: usize| -> Option<(u32, &[u8])> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = read_u32(elf, h)?;
        let off = read_u64(elf, h + 24)?;
        let size = read_u64(elf, h + 32)?;
        Some((name, elf.get(off..off.checked_add(size)?)?))
    };
    let (_, strtab) = section(shstrndx).ok_or("bad section string table")?;
    for i in 0..shnum {
        let (name_off, data) = section(i).ok_or("bad section header")?;
        let name = usize::try_from(name_off)
            .ok()
            .and_then(|o| strtab.get(o..))
            .map(|s| s.split(|&c| c == 0).next().unwrap_or(s));
        if name == Some(b".modinfo".as_slice()) {
            return Ok(data);
        }
    }
    Err("no .modinfo section".into())
}

/// The module names in a `.ko`'s `depends=` modinfo entry.
pub(crate) fn modinfo_depends(elf: &[u8]) -> std::result::Result<Vec<String>, String> {
    let info = modinfo_section(elf)?;
    Ok(info
        .split(|&c| c == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|deps| {
            String::from_utf8_lossy(deps)
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(normalize)
                .collect::<Vec<_>>()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems() {
        assert_eq!(module_stem("virtio_blk.ko"), Some("virtio_blk"));
        assert_eq!(module_stem("virtio-rng.ko.xz"), Some("virtio-rng"));
        assert_eq!(module_stem("modules.dep"), None);
        assert_eq!(normalize("virtio-rng"), "virtio_rng");
    }

    #[test]
    fn modinfo_rejects_garbage() {
        assert!(modinfo_depends(b"not an elf").is_err());
        assert!(modinfo_depends(b"\x7fELF\x02\x01").is_err());
    }
}
