// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Helpers for the vhost-user-blk end-to-end tests (`tests/e2e_blk.rs`):
//! locating and starting our `vhost-user-blk` daemon, a
//! `qemu-storage-daemon` export with discard enabled, copying dynamically
//! linked host programs into the guest, and reproducible data patterns.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{
    qemu_storage_daemon_binary, read_file, repo_root, BackgroundProcess, E2eError, Result,
};

/// Environment variable naming the `vhost-user-blk` binary to test
/// (overrides the lookup in the workspace target directory).
pub const VHOST_USER_BLK_ENV: &str = "E2E_VHOST_USER_BLK";

/// File name of our daemon in the target directory.
const DAEMON_NAME: &str = "vhost-user-blk";

/// How long a freshly started backend gets to create its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// Target directories that may hold the daemon: `$CARGO_TARGET_DIR`, the one
/// the running test binary was built into (`<target>/<profile>/deps/<exe>`),
/// and `$REPO/target`, without duplicates.
fn target_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        let d = PathBuf::from(d);
        dirs.push(if d.is_relative() {
            repo_root().join(d)
        } else {
            d
        });
    }
    if let Some(t) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
    {
        dirs.push(t);
    }
    dirs.push(repo_root().join("target"));
    let mut unique: Vec<PathBuf> = Vec::new();
    for d in dirs {
        let canon = d.canonicalize().unwrap_or(d);
        if !unique.contains(&canon) {
            unique.push(canon);
        }
    }
    unique
}

/// Locates our `vhost-user-blk` daemon: `$E2E_VHOST_USER_BLK` if set, else
/// `<target>/release/vhost-user-blk` (what CI builds with
/// `cargo build --release --workspace --bins`), else
/// `<target>/debug/vhost-user-blk`. Building it is the caller's job; a
/// missing binary is an [`E2eError::Setup`] saying how to build it.
pub fn vhost_user_blk_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(VHOST_USER_BLK_ENV).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(E2eError::Setup(format!(
                "${VHOST_USER_BLK_ENV} names {}, which does not exist",
                p.display()
            )))
        };
    }
    let mut tried = Vec::new();
    for profile in ["release", "debug"] {
        for dir in target_dirs() {
            let p = dir.join(profile).join(DAEMON_NAME);
            if p.is_file() {
                return Ok(p);
            }
            tried.push(p.display().to_string());
        }
    }
    Err(E2eError::Setup(format!(
        "the `{DAEMON_NAME}` daemon is not built (looked for {}); build it with \
         `cargo build --release -p vhost-user-blk` (or set ${VHOST_USER_BLK_ENV})",
        tried.join(", ")
    )))
}

/// Starts our `vhost-user-blk` daemon with `--socket-path SOCKET` followed
/// by `args`, and waits (up to 10 s) for the socket to appear. The process
/// gets `RUST_LOG=info` unless `RUST_LOG` is already set, so its log says
/// what happened when a test fails.
pub fn spawn_vhost_user_blk(socket: &Path, args: &[OsString]) -> Result<BackgroundProcess> {
    let bin = vhost_user_blk_binary()?;
    let mut cmd = Command::new(&bin);
    cmd.arg("--socket-path").arg(socket).args(args);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    let mut process = BackgroundProcess::spawn(DAEMON_NAME, cmd)?;
    process.wait_for_socket(socket, SOCKET_TIMEOUT)?;
    Ok(process)
}

/// Starts `qemu-storage-daemon` exporting the raw file `image` as a
/// vhost-user-blk device on `socket`, like [`super::QsdBlkExport`], and
/// waits (up to 10 s) for the socket. With `unmap`, the file node gets
/// `discard=unmap`, so guest discards and unmapping write-zeroes punch holes
/// into the image (by default qsd ignores discards). Only ask for it where
/// needed: with it, qsd 10 serves O_DIRECT guest writes about 5x slower.
/// Without `writable`, the file node is opened read-only too.
pub fn spawn_qsd_blk(
    image: &Path,
    socket: &Path,
    writable: bool,
    num_queues: u16,
    unmap: bool,
) -> Result<BackgroundProcess> {
    let qsd = qemu_storage_daemon_binary()?;
    let esc = |p: &Path| p.to_string_lossy().replace(',', ",,");
    let mut cmd = Command::new(qsd);
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=disk0,filename={}{}{}",
            esc(image),
            if unmap { ",discard=unmap" } else { "" },
            if writable { "" } else { ",read-only=on" }
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=export0,node-name=disk0,addr.type=unix,addr.path={},\
             writable={},num-queues={num_queues}",
            esc(socket),
            if writable { "on" } else { "off" }
        ));
    let mut process = BackgroundProcess::spawn("qemu-storage-daemon", cmd)?;
    process.wait_for_socket(socket, SOCKET_TIMEOUT)?;
    Ok(process)
}

/// A disk image whose I/O is slow, for tests that need requests in flight in the backend
/// at a chosen moment: `qemu-storage-daemon` exports `image` through a throttle group
/// (writes only, [`Self::start`], or all operations, [`Self::start_all_ops`]), over
/// FUSE, as the regular file [`Self::path`] that a backend serves. Dropping it stops
/// qemu-storage-daemon, which unmounts the file (lazily unmounted here if not).
pub struct ThrottledFile {
    process: Option<BackgroundProcess>,
    mountpoint: PathBuf,
}

impl ThrottledFile {
    /// Starts the export at `mountpoint` (created as an empty file) and waits (up to
    /// 10 s) until it is mounted.
    pub fn start(image: &Path, mountpoint: &Path, write_iops: u32) -> Result<Self> {
        Self::start_throttled(image, mountpoint, &format!("x-iops-write={write_iops}"))
    }

    /// [`Self::start`] with reads and writes together limited to `iops` operations a
    /// second.
    pub fn start_all_ops(image: &Path, mountpoint: &Path, iops: u32) -> Result<Self> {
        Self::start_throttled(image, mountpoint, &format!("x-iops-total={iops}"))
    }

    fn start_throttled(image: &Path, mountpoint: &Path, limit: &str) -> Result<Self> {
        let qsd = qemu_storage_daemon_binary()?;
        std::fs::File::create(mountpoint)
            .map_err(|e| E2eError::io(format!("creating {}", mountpoint.display()), e))?;
        let esc = |p: &Path| p.to_string_lossy().replace(',', ",,");
        let mut cmd = Command::new(qsd);
        cmd.arg("--blockdev")
            .arg(format!("driver=file,node-name=f0,filename={}", esc(image)))
            .arg("--object")
            .arg(format!("throttle-group,id=tg0,{limit}"))
            .arg("--blockdev")
            .arg("driver=throttle,throttle-group=tg0,file=f0,node-name=t0")
            .arg("--export")
            .arg(format!(
                "type=fuse,id=e0,node-name=t0,mountpoint={},writable=on",
                esc(mountpoint)
            ));
        let process = BackgroundProcess::spawn("qemu-storage-daemon (throttled FUSE)", cmd)?;
        let mut me = ThrottledFile {
            process: Some(process),
            mountpoint: mountpoint.to_path_buf(),
        };
        let deadline = std::time::Instant::now() + SOCKET_TIMEOUT;
        while !me.mounted() {
            if let Some(p) = me.process.as_mut() {
                if let Some(status) = p.try_wait()? {
                    return Err(E2eError::Setup(format!(
                        "qemu-storage-daemon exited ({status}) before mounting {}:\n{}",
                        mountpoint.display(),
                        p.log()
                    )));
                }
            }
            if std::time::Instant::now() >= deadline {
                return Err(E2eError::Setup(format!(
                    "{} was not mounted within {SOCKET_TIMEOUT:?}",
                    mountpoint.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(me)
    }

    /// The throttled file.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    fn mounted(&self) -> bool {
        let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return false;
        };
        let want = self.mountpoint.to_string_lossy();
        info.lines()
            .any(|l| l.split_whitespace().nth(4) == Some(want.as_ref()))
    }
}

impl Drop for ThrottledFile {
    fn drop(&mut self) {
        if let Some(p) = self.process.take() {
            let _ = p.stop();
        }
        if self.mounted() {
            if let Ok(c) = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes()) {
                // SAFETY: umount2 with a valid NUL-terminated path has no memory effects.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

/// A file to add to the guest initramfs (see
/// [`super::Initramfs::file`]): absolute guest path, contents, mode.
pub type GuestFile = (String, Vec<u8>, u32);

/// The files needed to run the dynamically linked host program `program`
/// in the guest: the program itself at `<guest_dir>/<file name>` and every
/// shared library `ldd` reports (the loader included) at its host path, so
/// the loader's default search path finds them. Used for the util-linux
/// tools busybox lacks (`blkdiscard -z`, `fallocate --punch-hole`); the
/// guest kernel is x86_64 like the host.
pub fn host_program_files(program: &Path, guest_dir: &str) -> Result<Vec<GuestFile>> {
    let name = program
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| E2eError::Setup(format!("{} has no file name", program.display())))?;
    let bytes = read_file(program)
        .map_err(|_| E2eError::missing(format!("host program {} not found", program.display())))?;
    let mut files = vec![(
        format!("{}/{name}", guest_dir.trim_end_matches('/')),
        bytes,
        0o755,
    )];
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .map_err(|e| E2eError::io(format!("running `ldd {}`", program.display()), e))?;
    if !out.status.success() {
        return Err(E2eError::Setup(format!(
            "`ldd {}` failed: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    for lib in parse_ldd(&String::from_utf8_lossy(&out.stdout)) {
        let data = read_file(Path::new(&lib))?;
        files.push((lib, data, 0o755));
    }
    Ok(files)
}

/// The absolute library paths in `ldd` output (`libc.so.6 => /lib/... (0x..)`
/// and `/lib64/ld-linux-x86-64.so.2 (0x..)`; the vDSO has no path).
pub fn parse_ldd(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => line,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| path.to_owned())
        })
        .collect()
}

/// Highest number [`seq_pattern`] can print (`seq -w START 9999999` pads
/// every number to 7 digits).
pub const SEQ_PATTERN_LAST: u32 = 9_999_999;

/// Length of the separator `seq` prints after each 7-digit number in
/// [`seq_pattern`], making each number + separator one 512-byte sector.
const SEQ_SEPARATOR_LEN: usize = 512 - 7;

/// The separator of [`seq_pattern`]: 505 letters without a short period, so
/// data shifted within a sector does not compare equal either.
pub fn seq_separator() -> String {
    const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    (0..SEQ_SEPARATOR_LEN)
        .map(|i| char::from(LETTERS[(i * 7 + i * i / 3) % LETTERS.len()]))
        .collect()
}

/// What the guest's [`seq_pattern_cmd`]`(start, len)` prints: the numbers
/// `start`, `start + 1`, ... zero-padded to 7 digits, each followed by
/// [`seq_separator`], i.e. one 512-byte unit per number, truncated to `len`
/// bytes. Written at a sector-aligned offset, every sector is unique (it
/// starts with its own number), so a sector written to or read from the
/// wrong place never compares equal. Busybox `seq` makes it in the guest
/// about 60 times faster than one short line per number would be (which
/// took ~1.2 s per MiB under TCG).
pub fn seq_pattern(start: u32, len: usize) -> Vec<u8> {
    let sep = seq_separator();
    let mut v = Vec::with_capacity(len + 512);
    let mut n = start;
    while v.len() < len && n <= SEQ_PATTERN_LAST {
        if n != start {
            v.extend_from_slice(sep.as_bytes());
        }
        v.extend_from_slice(format!("{n:07}").as_bytes());
        n += 1;
    }
    if v.len() < len {
        v.push(b'\n');
    }
    v.truncate(len);
    v
}

/// The guest shell command that prints [`seq_pattern`]`(start, len)`.
pub fn seq_pattern_cmd(start: u32, len: usize) -> String {
    format!(
        "seq -w -s {} {start} {SEQ_PATTERN_LAST} | head -c {len}",
        seq_separator()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_parsing() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibblkid.so.1 => /lib/x86_64-linux-gnu/libblkid.so.1 (0x00007f)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(out),
            [
                "/lib/x86_64-linux-gnu/libblkid.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }

    #[test]
    fn seq_pattern_layout() {
        let sep = seq_separator();
        assert_eq!(sep.len(), 505);
        assert!(sep.bytes().all(|b| b.is_ascii_alphabetic()));
        let p = seq_pattern(5, 2048);
        assert_eq!(p.len(), 2048);
        for (i, sector) in p.chunks(512).enumerate() {
            assert_eq!(&sector[..7], format!("{:07}", 5 + i).as_bytes());
            assert_eq!(&sector[7..], sep.as_bytes());
        }
        assert_eq!(seq_pattern(9_999_999, 600), b"9999999\n".to_vec());
        assert_eq!(seq_pattern(1, 3), b"000".to_vec());
    }

    /// The guest command prints exactly [`seq_pattern`] (checked with the
    /// host's busybox, the one the guest gets).
    #[test]
    fn seq_pattern_matches_busybox_seq() {
        let Ok(out) = Command::new("/bin/busybox")
            .args([
                "sh",
                "-c",
                &format!("busybox {}", seq_pattern_cmd(12, 70_000)),
            ])
            .output()
        else {
            return;
        };
        assert!(out.status.success(), "{out:?}");
        assert_eq!(out.stdout, seq_pattern(12, 70_000));
    }
}
