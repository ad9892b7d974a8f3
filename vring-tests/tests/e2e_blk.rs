// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End-to-end tests of the `vhost-user-blk` daemon: a real QEMU (TCG) boots
//! a real Debian Linux guest whose `/dev/vda` is served by the daemon over
//! vhost-user, and the guest drives it with busybox tools (plus two
//! util-linux tools copied from the host, see [`UL_DIR`]).
//!
//! Every case is a function taking the ring layout; the backend is chosen
//! by `E2E_BLK_BACKEND`:
//!
//! * unset / `ours`: our `vhost-user-blk` daemon (the real tests). It is not
//!   built here: run `cargo build --release -p vhost-user-blk` first (CI runs
//!   `cargo build --release --workspace --bins`); `target/debug` is the
//!   fallback and `E2E_VHOST_USER_BLK=/path` overrides the lookup.
//! * `qsd`: `qemu-storage-daemon`, the reference vhost-user-blk backend, to
//!   validate the test logic. It has no packed ring, so with it the packed
//!   cases check that the guest fell back to the split ring instead.
//! * `qemu`: QEMU's built-in `virtio-blk-pci` (no vhost-user at all), to
//!   validate the guest-side checks that need packed rings.
//!
//! Guest tools: busybox `dd` has `iflag=direct`/`oflag=direct` (and
//! `seek_bytes`, `skip_bytes`, `count_bytes`), and busybox has `taskset`,
//! `blockdev` and `blkdiscard` (BLKDISCARD only). It has no `blkdiscard -z`,
//! and its `fallocate` is `posix_fallocate`, which block devices refuse, so
//! util-linux `blkdiscard` and `fallocate` are copied from the host with
//! their shared libraries. Linux refuses every write to a read-only
//! virtio-blk disk itself (EPERM, EOPNOTSUPP), so the read-only case also
//! checks the backend's open mode of the image.
//!
//! Needs what `vring-tests/scripts/install-test-deps.sh` installs. Set
//! `E2E_VERBOSE=1` to see the guest console live.

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vring_tests::e2e::blk::{
    host_program_files, seq_pattern, seq_pattern_cmd, spawn_qsd_blk, spawn_vhost_user_blk,
    GuestFile, ThrottledFile,
};
use vring_tests::e2e::{BackgroundProcess, GuestKernel, Initramfs, QemuVm, TempDir, VmOutput};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// Size of every test disk (a sparse file).
const DISK_SIZE: usize = 64 * MIB;
/// Limit for one VM run (boot ~4 s under TCG, plus the test's I/O).
const VM_TIMEOUT: Duration = Duration::from_secs(120);
/// Guest directory of the util-linux programs copied from the host: busybox
/// has `blkdiscard` (BLKDISCARD) but neither `blkdiscard -z` (BLKZEROOUT)
/// nor a `fallocate` that can punch holes into a block device.
const UL_DIR: &str = "/e2e/ul";
/// Virtio feature bits checked in the guest's `features` string.
const F_RO: usize = 5;
const F_FLUSH: usize = 9;
const F_MQ: usize = 12;
const F_DISCARD: usize = 13;
const F_WRITE_ZEROES: usize = 14;
const F_VERSION_1: usize = 32;
const F_RING_PACKED: usize = 34;

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

/// Who serves the guest's disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BackendKind {
    /// Our `vhost-user-blk` daemon.
    Ours,
    /// `qemu-storage-daemon` (reference vhost-user-blk backend).
    Qsd,
    /// QEMU's built-in virtio-blk device (no vhost-user).
    Builtin,
}

impl BackendKind {
    fn from_env() -> BackendKind {
        match std::env::var("E2E_BLK_BACKEND").as_deref() {
            Err(_) | Ok("" | "ours" | "vhost-user-blk") => BackendKind::Ours,
            Ok("qsd" | "qemu-storage-daemon") => BackendKind::Qsd,
            Ok("qemu" | "builtin") => BackendKind::Builtin,
            Ok(other) => panic!("E2E_BLK_BACKEND={other:?}: expected `ours`, `qsd` or `qemu`"),
        }
    }

    /// Whether the backend offers VIRTIO_F_RING_PACKED.
    fn offers_packed(self) -> bool {
        self != BackendKind::Qsd
    }
}

/// Virtqueue layout the VM asks for (`packed=on|off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ring {
    Split,
    Packed,
}

impl Ring {
    fn qemu_opt(self) -> &'static str {
        match self {
            Ring::Split => "off",
            Ring::Packed => "on",
        }
    }
}

/// How the disk is exported.
#[derive(Clone, Copy, Debug)]
struct DiskOpts {
    read_only: bool,
    num_queues: u16,
    /// The test needs discards to deallocate (qsd: `discard=unmap`, which
    /// slows its writes down; our daemon always does).
    unmap: bool,
    /// Serve the image through a [`ThrottledFile`] of this many writes per
    /// second, so that writes stay in flight in the backend for a while.
    write_iops: Option<u32>,
    /// Keep the image on tmpfs (`/dev/shm`) instead of `/tmp`.
    image_on_tmpfs: bool,
    /// Our daemon opens the image with `--direct` (O_DIRECT).
    direct: bool,
}

impl Default for DiskOpts {
    fn default() -> Self {
        DiskOpts {
            read_only: false,
            num_queues: 1,
            unmap: false,
            write_iops: None,
            image_on_tmpfs: false,
            direct: false,
        }
    }
}

/// One test's disk: a temp dir with the image file and the socket, and the
/// backend serving it (started in [`Disk::new`], killed on drop).
struct Disk {
    /// The case's name, for messages.
    name: String,
    kind: BackendKind,
    opts: DiskOpts,
    _tmp: TempDir,
    /// The directory on tmpfs holding the image, with [`DiskOpts::image_on_tmpfs`].
    _shm: Option<TempDir>,
    image: PathBuf,
    socket: PathBuf,
    backend: Option<BackgroundProcess>,
    /// Arguments our daemon was started with (after `--socket-path`).
    backend_args: Vec<OsString>,
    /// The throttled view of the image the backend serves, if any.
    throttled: Option<ThrottledFile>,
    /// Image contents at start (prefill over zeros).
    initial: Vec<u8>,
}

impl Drop for Disk {
    fn drop(&mut self) {
        // The backend first (it may have the throttled file open), then the
        // throttled file's mount, and only then the temp dir holding both.
        drop(self.backend.take());
        drop(self.throttled.take());
    }
}

impl Disk {
    /// Creates a [`DISK_SIZE`] image, writes `prefill` (offset, bytes) into
    /// it and starts the backend.
    /// `tag` names the temp dir (keep it short: the socket lives there).
    fn new(name: &str, tag: &str, opts: DiskOpts, prefill: &[(usize, Vec<u8>)]) -> Disk {
        let kind = BackendKind::from_env();
        let tmp = TempDir::new(tag).unwrap_or_else(|e| panic!("{e}"));
        let shm = opts
            .image_on_tmpfs
            .then(|| TempDir::new_in(Path::new("/dev/shm"), tag).unwrap_or_else(|e| panic!("{e}")));
        let image = shm.as_ref().unwrap_or(&tmp).path().join("disk.img");
        let socket = tmp.path().join("blk.sock");
        let mut initial = vec![0u8; DISK_SIZE];
        {
            let f = must(File::create(&image), "creating the image");
            must(f.set_len(DISK_SIZE as u64), "sizing the image");
            for (off, bytes) in prefill {
                must(f.write_all_at(bytes, *off as u64), "prefilling the image");
                initial[*off..*off + bytes.len()].copy_from_slice(bytes);
            }
            must(f.sync_all(), "syncing the image");
        }
        let throttled = opts.write_iops.map(|iops| {
            ThrottledFile::start(&image, &tmp.path().join("slow.img"), iops)
                .unwrap_or_else(|e| panic!("{e}"))
        });
        let served = throttled
            .as_ref()
            .map_or(image.clone(), |t| t.path().to_path_buf());
        let mut backend_args: Vec<OsString> = Vec::new();
        let backend = match kind {
            BackendKind::Ours => {
                let mut args: Vec<OsString> = vec!["--blk-file".into(), served.into()];
                if opts.read_only {
                    args.push("--read-only".into());
                }
                if opts.direct {
                    args.push("--direct".into());
                }
                args.push("--num-queues".into());
                args.push(opts.num_queues.to_string().into());
                let p = spawn_vhost_user_blk(&socket, &args).unwrap_or_else(|e| panic!("{e}"));
                backend_args = args;
                Some(p)
            }
            BackendKind::Qsd => Some(
                spawn_qsd_blk(
                    &image,
                    &socket,
                    !opts.read_only,
                    opts.num_queues,
                    opts.unmap,
                )
                .unwrap_or_else(|e| panic!("{e}")),
            ),
            BackendKind::Builtin => None,
        };
        let program = match kind {
            BackendKind::Ours => vring_tests::e2e::blk::vhost_user_blk_binary()
                .map(|p| format!(" ({})", p.display()))
                .unwrap_or_default(),
            _ => String::new(),
        };
        eprintln!(
            "{name}: backend {kind:?}{program}, image {}",
            image.display()
        );
        Disk {
            name: name.to_owned(),
            kind,
            opts,
            _tmp: tmp,
            _shm: shm,
            image,
            socket,
            backend,
            backend_args,
            throttled,
            initial,
        }
    }

    /// Kills our daemon with SIGKILL (no chance to finish anything), waits
    /// until it is gone, starts it again on the same socket with the same
    /// arguments, and returns the killed instance's log.
    fn kill_and_restart_backend(&mut self) -> String {
        let Some(mut old) = self.backend.take() else {
            panic!("{}: no backend process to restart", self.name);
        };
        if let Some(pid) = old.pid().and_then(|p| i32::try_from(p).ok()) {
            // SAFETY: kill(2) has no memory effects; `pid` is our unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        match old.wait_timeout(Duration::from_secs(10)) {
            Ok(Some(_)) => {}
            other => panic!("{}: the killed backend did not exit: {other:?}", self.name),
        }
        let log = old.log();
        self.backend = Some(
            spawn_vhost_user_blk(&self.socket, &self.backend_args)
                .unwrap_or_else(|e| panic!("{}: restarting the backend: {e}", self.name)),
        );
        log
    }

    /// A VM with this disk as its only device, using `ring`.
    fn vm(&self, kernel: &GuestKernel, initrd: &Initramfs, ring: Ring, smp: u32) -> QemuVm {
        let initrd = initrd.build().unwrap_or_else(|e| panic!("{e}"));
        let vm = QemuVm::new(kernel, &initrd).smp(smp).timeout(VM_TIMEOUT);
        let nq = self.opts.num_queues;
        let packed = ring.qemu_opt();
        match self.kind {
            BackendKind::Ours if self.opts.write_iops.is_some() => vm
                .chardev_socket_reconnect("c0", &self.socket, 500)
                .device(&format!(
                    "vhost-user-blk-pci,chardev=c0,num-queues={nq},packed={packed}"
                )),
            BackendKind::Ours | BackendKind::Qsd => vm.chardev_socket("c0", &self.socket).device(
                &format!("vhost-user-blk-pci,chardev=c0,num-queues={nq},packed={packed}"),
            ),
            BackendKind::Builtin => {
                let file = self.image.to_string_lossy().replace(',', ",,");
                let ro = if self.opts.read_only { "on" } else { "off" };
                vm.args([
                    "-drive",
                    &format!("file={file},if=none,id=d0,format=raw,discard=unmap,readonly={ro}"),
                ])
                .device(&format!(
                    "virtio-blk-pci,drive=d0,num-queues={nq},packed={packed}"
                ))
            }
        }
    }

    /// The backend's output so far.
    fn backend_log(&self) -> String {
        match &self.backend {
            Some(p) => p.log(),
            None => "(QEMU built-in virtio-blk: no backend process)".into(),
        }
    }

    /// Panics with `what`, the guest log and the backend log.
    #[track_caller]
    fn fail(&self, what: &str, guest_log: &str) -> ! {
        panic!(
            "{}: {what}\n(backend: {:?}, image {})\n----- guest log -----\n{guest_log}\n\
             ----- backend log -----\n{}\n----- end -----",
            self.name,
            self.kind,
            self.image.display(),
            self.backend_log()
        )
    }

    /// Runs `vm` to completion; a failed guest script (or VM) fails the test
    /// with both logs.
    #[track_caller]
    fn run(&self, vm: QemuVm) -> VmOutput {
        match vm.run() {
            Ok(out) if out.success() => {
                eprintln!("{}: VM ran in {:.1}s", self.name, out.elapsed.as_secs_f64());
                out
            }
            Ok(out) => self.fail(
                &format!(
                    "guest script failed (E2E-EXIT={}; see the GUEST-FAIL and E2E-STEP lines)",
                    out.exit_code
                ),
                &out.log,
            ),
            Err(e) => self.fail(&format!("VM run failed: {e}"), e.log().unwrap_or("")),
        }
    }

    /// Fails unless the backend daemon is still running.
    #[track_caller]
    fn assert_backend_alive(&mut self, guest_log: &str) {
        if let Some(p) = self.backend.as_mut() {
            let name = p.name().to_owned();
            match p.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => self.fail(
                    &format!("{name} exited ({status}) after the VM disconnected"),
                    guest_log,
                ),
                Err(e) => self.fail(&format!("checking {name}: {e}"), guest_log),
            }
        }
    }

    fn backend_pid(&self) -> Option<u32> {
        self.backend.as_ref().and_then(BackgroundProcess::pid)
    }

    /// Stops the backend (SIGTERM) and returns its log.
    fn stop_backend(&mut self) -> String {
        match self.backend.take() {
            Some(p) => match p.stop() {
                Ok((_, log)) => log,
                Err(e) => format!("(stopping the backend failed: {e})"),
            },
            None => String::new(),
        }
    }

    /// Checks the whole image: [`Disk::initial`] with `writes` (offset,
    /// bytes) applied on top.
    #[track_caller]
    fn check_image(&self, writes: &[(usize, &[u8])], guest_log: &str) {
        let mut expected = self.initial.clone();
        for (off, bytes) in writes {
            expected[*off..*off + bytes.len()].copy_from_slice(bytes);
        }
        let data = must(std::fs::read(&self.image), "reading the image");
        if let Some(msg) = describe_mismatch(&data, &expected) {
            self.fail(&format!("host-side image check failed: {msg}"), guest_log);
        }
    }

    /// The guest's virtio-blk features string, checked for VERSION_1 and for
    /// the ring layout `ring` (bit 34 set iff packed was requested and the
    /// backend offers it).
    #[track_caller]
    fn check_ring(&self, out: &VmOutput, ring: Ring) -> String {
        let features = kv(&out.log, "features")
            .unwrap_or_else(|| self.fail("the guest printed no virtio features", &out.log));
        if !feature(&features, F_VERSION_1) {
            self.fail("VIRTIO_F_VERSION_1 not negotiated", &out.log);
        }
        let want_packed = ring == Ring::Packed && self.kind.offers_packed();
        if feature(&features, F_RING_PACKED) != want_packed {
            self.fail(
                &format!(
                    "VIRTIO_F_RING_PACKED (bit {F_RING_PACKED}) is {} though the VM asked for a \
                     {ring:?} ring from {:?}: features {features}",
                    if want_packed { "clear" } else { "set" },
                    self.kind
                ),
                &out.log,
            );
        }
        if ring == Ring::Packed && !want_packed {
            eprintln!(
                "note: {:?} does not offer RING_PACKED; checked the split fallback",
                self.kind
            );
        }
        features
    }
}

/// The value of `r`, or a panic saying what failed.
#[track_caller]
fn must<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// First difference between `data` and `expected`, with a count of
/// differing 4 KiB blocks.
fn describe_mismatch(data: &[u8], expected: &[u8]) -> Option<String> {
    if data.len() != expected.len() {
        return Some(format!(
            "image is {} bytes, expected {}",
            data.len(),
            expected.len()
        ));
    }
    let bad: Vec<usize> = data
        .chunks(4 * KIB)
        .zip(expected.chunks(4 * KIB))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect();
    let first_block = *bad.first()?;
    let first = first_block * 4 * KIB
        + data[first_block * 4 * KIB..]
            .iter()
            .zip(&expected[first_block * 4 * KIB..])
            .position(|(a, b)| a != b)
            .unwrap_or(0);
    let show = |v: &[u8]| {
        let end = (first + 24).min(v.len());
        format!("{:?}", String::from_utf8_lossy(&v[first..end]))
    };
    Some(format!(
        "{} of {} 4 KiB blocks differ (first at byte {first:#x} = {} MiB + {:#x}, last block at \
         {:#x}); at {first:#x} found {} expected {}",
        bad.len(),
        data.len() / (4 * KIB),
        first / MIB,
        first % MIB,
        bad.last().copied().unwrap_or(0) * 4 * KIB,
        show(data),
        show(expected)
    ))
}

// ---------------------------------------------------------------------------
// Guest side
// ---------------------------------------------------------------------------

/// Shell helpers every guest script starts with. `kv K V` prints
/// `E2E-KV K=V` for the host ([`kv`]); `st N` prints field N of
/// /sys/block/vda/stat (1 read I/Os, 3 read sectors, 5 write I/Os, 7 write
/// sectors, 12 discard I/Os, 16 flush I/Os).
const PRELUDE: &str = r#"set -e
fail() { echo "GUEST-FAIL: $*"; exit 1; }
step() { echo "E2E-STEP [$(cut -d' ' -f1 /proc/uptime)] $*"; }
kv() { echo "E2E-KV $1=$2"; }
st() { awk -v n="$1" '{ print $n }' /sys/block/vda/stat; }
zeros() { head -c "$1" /dev/zero; }
test -b /dev/vda || fail "no /dev/vda"
for d in /sys/bus/virtio/devices/*; do
    if [ "$(cat "$d/device")" = 0x0002 ]; then kv features "$(cat "$d/features")"; fi
done
q=/sys/block/vda/queue
kv size_sectors "$(cat /sys/block/vda/size)"
kv ro "$(cat /sys/block/vda/ro)"
kv write_cache "$(cat $q/write_cache)"
kv max_segments "$(cat $q/max_segments)"
kv max_segment_size "$(cat $q/max_segment_size)"
kv max_sectors_kb "$(cat $q/max_sectors_kb)"
kv max_hw_sectors_kb "$(cat $q/max_hw_sectors_kb)"
kv discard_max_bytes "$(cat $q/discard_max_bytes)"
kv write_zeroes_max_bytes "$(cat $q/write_zeroes_max_bytes)"
kv hw_queues "$(ls /sys/block/vda/mq | wc -l)"
step "start"
"#;

/// The last `E2E-KV key=value` the guest printed for `key`.
fn kv(log: &str, key: &str) -> Option<String> {
    let prefix = format!("E2E-KV {key}=");
    log.lines()
        .rev()
        .find_map(|l| l.trim_end().strip_prefix(&prefix).map(str::to_owned))
}

/// [`kv`] parsed as a number (fails the test if missing).
#[track_caller]
fn kv_u64(disk: &Disk, out: &VmOutput, key: &str) -> u64 {
    kv(&out.log, key)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| disk.fail(&format!("the guest printed no numeric `{key}`"), &out.log))
}

/// Bit `bit` of a sysfs `features` string ('0'/'1' per bit, bit 0 first).
fn feature(features: &str, bit: usize) -> bool {
    features.as_bytes().get(bit) == Some(&b'1')
}

/// The guest kernel (panics with the install hint if it is missing).
fn kernel() -> GuestKernel {
    GuestKernel::locate().unwrap_or_else(|e| panic!("{e}"))
}

/// An initramfs with virtio_blk running `PRELUDE` + `body`.
fn initramfs<'k>(kernel: &'k GuestKernel, body: &str) -> Initramfs<'k> {
    Initramfs::new(kernel)
        .modules(&["virtio_blk"])
        .script(format!("{PRELUDE}{body}step done\n"))
}

/// Adds util-linux `blkdiscard` and `fallocate` (and their libraries) under
/// [`UL_DIR`].
fn with_util_linux(mut initrd: Initramfs<'_>) -> Initramfs<'_> {
    for name in ["blkdiscard", "fallocate"] {
        let program = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("util-linux `{name}` not found on the host"));
        let files: Vec<GuestFile> =
            host_program_files(&program, UL_DIR).unwrap_or_else(|e| panic!("{e}"));
        for (path, data, mode) in files {
            initrd = initrd.file(&path, data, mode);
        }
    }
    initrd
}

/// Guest commands picking `$bs_kb`: the smallest power-of-two KiB count of
/// at least 1 MiB that exceeds `max_segments` x 4 KiB, so an O_DIRECT
/// request of that size from user pages carries more segments than the
/// device takes in one request and the guest must split it (or merge
/// physically contiguous pages).
const PICK_BS: &str = r#"segs=$(cat /sys/block/vda/queue/max_segments)
bs_kb=1024
while [ "$bs_kb" -le $(( segs * 4 )) ]; do bs_kb=$(( bs_kb * 2 )); done
kv bs_kb "$bs_kb"
"#;

/// Guest commands writing `seq_pattern(start, len)` to `/dev/vda` at byte
/// `off` with O_DIRECT in blocks of `$bs_kb` KiB (see [`PICK_BS`]), reading
/// it back with O_DIRECT and comparing. Prints the request counts and
/// sector totals (`<tag>_write_ios`, `<tag>_write_sectors`,
/// `<tag>_read_ios`).
fn direct_roundtrip(tag: &str, start: u32, off: usize, len: usize) -> String {
    let pat = seq_pattern_cmd(start, len);
    format!(
        r#"step "{tag}: O_DIRECT write of {len} bytes at {off} in $bs_kb KiB blocks"
{pat} > /tmp/{tag}
w0=$(st 5); s0=$(st 7)
dd if=/tmp/{tag} of=/dev/vda bs=${{bs_kb}}k seek={off} oflag=direct,seek_bytes conv=notrunc 2>/tmp/dd.err || {{ cat /tmp/dd.err; fail "{tag}: dd oflag=direct failed"; }}
kv {tag}_write_ios $(( $(st 5) - w0 )); kv {tag}_write_sectors $(( $(st 7) - s0 ))
step "{tag}: O_DIRECT read back"
r0=$(st 1)
dd if=/dev/vda of=/tmp/{tag}.back bs=${{bs_kb}}k skip={off} count={len} iflag=direct,skip_bytes,count_bytes 2>/tmp/dd.err || {{ cat /tmp/dd.err; fail "{tag}: dd iflag=direct failed"; }}
kv {tag}_read_ios $(( $(st 1) - r0 ))
cmp /tmp/{tag} /tmp/{tag}.back || fail "{tag}: the O_DIRECT read-back differs from what was written"
rm -f /tmp/{tag} /tmp/{tag}.back
"#
    )
}

/// Guest commands checking (with O_DIRECT) that `len` bytes at `off` read
/// as zeros.
fn reads_zeros(what: &str, off: usize, len: usize) -> String {
    format!(
        "zeros {len} > /tmp/zeros\n\
         dd if=/dev/vda of=/tmp/z bs=64k skip={off} count={len} iflag=direct,skip_bytes,count_bytes 2>/dev/null\n\
         cmp /tmp/zeros /tmp/z || fail \"{what}: the range does not read back as zeros\"\n"
    )
}

/// What the host writes to let a waiting guest go on.
const GO_TOKEN: &str = "E2EGOGO1";

/// Guest commands polling the sector at byte `off` (O_DIRECT, so each read
/// reaches the backend) until the host writes [`GO_TOKEN`] there.
fn wait_for_host_go(off: usize) -> String {
    format!(
        r#"i=0
while [ "$(dd if=/dev/vda bs=512 count=1 skip={sector} iflag=direct 2>/dev/null | head -c 8)" != {GO_TOKEN} ]; do
    i=$(( i + 1 ))
    [ "$i" -lt 600 ] || fail "the host never wrote the go token"
    usleep 100000
done
step "the host said go"
"#,
        sector = off / 512
    )
}

fn finished(name: &str, t0: Instant) {
    eprintln!("{name}: passed in {:.1}s", t0.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------------------
// Cases 1 and 2: data round trip, O_DIRECT and buffered, split and packed
// ---------------------------------------------------------------------------

const DATA_LEN: usize = 4 * MIB;
const DATA_DIRECT_OFF: usize = 4 * MIB;
const DATA_BUFFERED_OFF: usize = 16 * MIB;
const DATA_HOST_START: u32 = 100;
const DATA_DIRECT_START: u32 = 1_000_000;
const DATA_BUFFERED_START: u32 = 3_000_000;

fn case_data_roundtrip(ring: Ring) {
    case_data_roundtrip_with(ring, DiskOpts::default(), None);
}

/// The data round trip on a disk exported with `opts`; with `path`, our daemon's log
/// must show that every queue took that I/O path.
fn case_data_roundtrip_with(ring: Ring, opts: DiskOpts, path: Option<&str>) {
    let name = format!(
        "data_roundtrip({ring:?}{}{})",
        if opts.image_on_tmpfs { ", tmpfs" } else { "" },
        if opts.direct { ", O_DIRECT" } else { "" }
    );
    let t0 = Instant::now();
    let host = seq_pattern(DATA_HOST_START, MIB);
    let disk = Disk::new(&name, "blkdata", opts, &[(0, host)]);
    let kernel = kernel();
    let script = format!(
        r#"step "host -> guest: the host's pattern in the first MiB"
{host_pat} > /tmp/host
dd if=/dev/vda of=/tmp/host.back bs=1M count=1 iflag=direct 2>/dev/null
cmp /tmp/host /tmp/host.back || fail "the host's pattern reads back wrong"
{PICK_BS}{direct}step "buffered write of {DATA_LEN} bytes at {DATA_BUFFERED_OFF}"
{buf_pat} > /tmp/b
w0=$(st 5)
dd if=/tmp/b of=/dev/vda bs=1M seek={DATA_BUFFERED_OFF} oflag=seek_bytes conv=notrunc,fsync 2>/tmp/dd.err || {{ cat /tmp/dd.err; fail "buffered dd failed"; }}
kv buffered_write_ios $(( $(st 5) - w0 ))
echo 3 > /proc/sys/vm/drop_caches
step "buffered read back"
dd if=/dev/vda of=/tmp/b.back bs=1M skip={DATA_BUFFERED_OFF} count={DATA_LEN} iflag=skip_bytes,count_bytes 2>/tmp/dd.err || {{ cat /tmp/dd.err; fail "buffered read failed"; }}
cmp /tmp/b /tmp/b.back || fail "the buffered read-back differs from what was written"
"#,
        host_pat = seq_pattern_cmd(DATA_HOST_START, MIB),
        direct = direct_roundtrip("direct", DATA_DIRECT_START, DATA_DIRECT_OFF, DATA_LEN),
        buf_pat = seq_pattern_cmd(DATA_BUFFERED_START, DATA_LEN),
    );
    let out = disk.run(disk.vm(&kernel, &initramfs(&kernel, &script), ring, 1));
    disk.check_ring(&out, ring);

    // The O_DIRECT requests were large, and split where the limits demand:
    // each dd block needs more than max_segments 4 KiB pages.
    let segs = kv_u64(&disk, &out, "max_segments");
    let max_kb = kv_u64(&disk, &out, "max_sectors_kb");
    let bs = kv_u64(&disk, &out, "bs_kb") * 1024;
    let ios = kv_u64(&disk, &out, "direct_write_ios");
    let sectors = kv_u64(&disk, &out, "direct_write_sectors");
    let read_ios = kv_u64(&disk, &out, "direct_read_ios");
    let len = DATA_LEN as u64;
    let avg = sectors * 512 / ios.max(1);
    eprintln!(
        "{name}: max_segments {segs}, max_sectors_kb {max_kb}, dd bs {} KiB: {ios} write \
         requests (avg {} KiB), {read_ios} read requests",
        bs / 1024,
        avg / 1024
    );
    if bs <= segs * 4096 || sectors * 512 != len {
        disk.fail(
            &format!(
                "bad O_DIRECT accounting: bs {bs}, max_segments {segs}, {sectors} sectors written"
            ),
            &out.log,
        );
    }
    let min_ios = len.div_ceil(bs.min(max_kb * 1024));
    if ios < min_ios || read_ios < min_ios {
        disk.fail(
            &format!(
                "expected >= {min_ios} requests each way, saw {ios} writes and {read_ios} reads"
            ),
            &out.log,
        );
    }
    if avg < 64 * KIB as u64 {
        disk.fail(
            &format!(
                "O_DIRECT writes averaged {avg} bytes a request; expected large multi-segment \
                 requests"
            ),
            &out.log,
        );
    }

    let direct = seq_pattern(DATA_DIRECT_START, DATA_LEN);
    let buffered = seq_pattern(DATA_BUFFERED_START, DATA_LEN);
    disk.check_image(
        &[(DATA_DIRECT_OFF, &direct), (DATA_BUFFERED_OFF, &buffered)],
        &out.log,
    );
    if let (Some(path), BackendKind::Ours) = (path, disk.kind) {
        let log = disk.backend_log();
        let paths: Vec<&str> = log
            .lines()
            .filter_map(|l| l.split("I/O path: ").nth(1))
            .collect();
        if paths.is_empty() || !paths.iter().all(|p| p.starts_with(path)) {
            disk.fail(
                &format!(
                    "expected every queue on the I/O path `{path}...`, the log says {paths:?}"
                ),
                &out.log,
            );
        }
    }
    finished(&name, t0);
}

/// The default engine on an image on tmpfs serves every request inline.
#[test]
fn data_roundtrip_image_on_tmpfs_default_engine() {
    let opts = DiskOpts {
        image_on_tmpfs: true,
        ..DiskOpts::default()
    };
    case_data_roundtrip_with(Ring::Split, opts, Some("inline (tmpfs"));
}

/// The default engine on a disk-backed image opened with O_DIRECT uses io_uring.
#[test]
fn data_roundtrip_direct_disk_file_default_engine() {
    let opts = DiskOpts {
        direct: true,
        ..DiskOpts::default()
    };
    case_data_roundtrip_with(Ring::Packed, opts, Some("io_uring (O_DIRECT"));
}

/// Case 1: dd with and without O_DIRECT over several MiB, in requests larger
/// than seg_max x 4 KiB; read back in the guest and checked on the host.
#[test]
fn data_roundtrip_split() {
    case_data_roundtrip(Ring::Split);
}

/// Case 2: the same over a packed ring; the guest's features show bit 34.
#[test]
fn data_roundtrip_packed() {
    case_data_roundtrip(Ring::Packed);
}

// ---------------------------------------------------------------------------
// Case 3: two queues, I/O from both vCPUs
// ---------------------------------------------------------------------------

const MQ_LEN: usize = 2 * MIB;
const MQ_OFF: [usize; 2] = [8 * MIB, 16 * MIB];
const MQ_START: [u32; 2] = [2_000_000, 4_000_000];

fn case_multiqueue(ring: Ring) {
    let name = format!("multiqueue({ring:?})");
    let t0 = Instant::now();
    let opts = DiskOpts {
        num_queues: 2,
        ..DiskOpts::default()
    };
    let disk = Disk::new(&name, "blkmq", opts, &[]);
    let kernel = kernel();
    let mut script = String::from(
        r#"kv cpus "$(nproc)"
for q in /sys/block/vda/mq/*; do kv "cpu_list_$(basename "$q")" "$(cat "$q/cpu_list")"; done
irqs() { grep "virtio0-req.$1\$" /proc/interrupts | awk '{ s = 0; for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) s += $i; print s }'; }
grep virtio0 /proc/interrupts || true
i0=$(irqs 0); i1=$(irqs 1)
"#,
    );
    for (cpu, &start) in MQ_START.iter().enumerate() {
        script.push_str(&format!(
            "{} > /tmp/p{cpu}\n",
            seq_pattern_cmd(start, MQ_LEN)
        ));
    }
    script.push_str("step \"concurrent O_DIRECT writes pinned to CPU 0 and CPU 1\"\n");
    for (cpu, off) in MQ_OFF.iter().enumerate() {
        script.push_str(&format!(
            "taskset -c {cpu} dd if=/tmp/p{cpu} of=/dev/vda bs=64k seek={off} \
             oflag=direct,seek_bytes conv=notrunc 2>/tmp/w{cpu}.err & pid{cpu}=$!\n"
        ));
    }
    script.push_str(
        "wait $pid0 || { cat /tmp/w0.err; fail \"dd on CPU 0 failed\"; }\n\
         wait $pid1 || { cat /tmp/w1.err; fail \"dd on CPU 1 failed\"; }\n\
         step \"concurrent O_DIRECT reads, each region from the other CPU\"\n",
    );
    for (cpu, off) in MQ_OFF.iter().enumerate() {
        script.push_str(&format!(
            "taskset -c {other} dd if=/dev/vda of=/tmp/r{cpu} bs=64k skip={off} count={MQ_LEN} \
             iflag=direct,skip_bytes,count_bytes 2>/tmp/r{cpu}.err & rpid{cpu}=$!\n",
            other = 1 - cpu,
        ));
    }
    script.push_str(
        "wait $rpid0 || { cat /tmp/r0.err; fail \"read on CPU 1 failed\"; }\n\
         wait $rpid1 || { cat /tmp/r1.err; fail \"read on CPU 0 failed\"; }\n\
         cmp /tmp/p0 /tmp/r0 || fail \"the region written from CPU 0 reads back wrong\"\n\
         cmp /tmp/p1 /tmp/r1 || fail \"the region written from CPU 1 reads back wrong\"\n\
         grep virtio0 /proc/interrupts || true\n\
         kv irqs_q0 $(( $(irqs 0) - i0 )); kv irqs_q1 $(( $(irqs 1) - i1 ))\n",
    );
    let out = disk.run(disk.vm(&kernel, &initramfs(&kernel, &script), ring, 2));
    let features = disk.check_ring(&out, ring);
    if !feature(&features, F_MQ) {
        disk.fail("VIRTIO_BLK_F_MQ not negotiated", &out.log);
    }
    let queues = kv_u64(&disk, &out, "hw_queues");
    let cpus = kv_u64(&disk, &out, "cpus");
    if queues != 2 || cpus != 2 {
        disk.fail(
            &format!("the guest has {queues} hardware queues and {cpus} CPUs, expected 2 and 2"),
            &out.log,
        );
    }
    // Each queue completed requests: its own MSI-X vector fired.
    let (q0, q1) = (
        kv_u64(&disk, &out, "irqs_q0"),
        kv_u64(&disk, &out, "irqs_q1"),
    );
    eprintln!("{name}: interrupts during the I/O: queue 0 {q0}, queue 1 {q1}");
    if q0 == 0 || q1 == 0 {
        disk.fail(
            &format!("a queue completed nothing (interrupts: queue 0 {q0}, queue 1 {q1})"),
            &out.log,
        );
    }
    let p0 = seq_pattern(MQ_START[0], MQ_LEN);
    let p1 = seq_pattern(MQ_START[1], MQ_LEN);
    disk.check_image(&[(MQ_OFF[0], &p0), (MQ_OFF[1], &p1)], &out.log);
    finished(&name, t0);
}

/// Case 3: `num-queues=2` with 2 vCPUs: two blk-mq hardware queues, and I/O
/// issued from each CPU completes on its own queue.
#[test]
fn multiqueue_two_queues_io_from_both_cpus() {
    case_multiqueue(Ring::Split);
}

// ---------------------------------------------------------------------------
// Case 4: read-only disk
// ---------------------------------------------------------------------------

const RO_LEN: usize = 4 * MIB;
const RO_START: u32 = 500;

fn case_read_only(ring: Ring) {
    let name = format!("read_only({ring:?})");
    let t0 = Instant::now();
    let opts = DiskOpts {
        read_only: true,
        ..DiskOpts::default()
    };
    let disk = Disk::new(&name, "blkro", opts, &[(0, seq_pattern(RO_START, RO_LEN))]);
    let kernel = kernel();
    let script = format!(
        r#"step "reads work"
{pat} > /tmp/exp
dd if=/dev/vda of=/tmp/got bs=1M count=4 iflag=direct 2>/dev/null || fail "reading the read-only disk failed"
cmp /tmp/exp /tmp/got || fail "the read-only disk reads back wrong"
yes junk | head -c 65536 > /tmp/junk
try() {{
    name=$1; shift
    if "$@" 2>/tmp/try.err; then kv "$name" succeeded; else kv "$name" refused; fi
    cat /tmp/try.err
}}
step "write attempts"
try direct_write dd if=/tmp/junk of=/dev/vda bs=64k seek=1 oflag=direct conv=notrunc
try buffered_write dd if=/tmp/junk of=/dev/vda bs=64k seek=2 conv=notrunc,fsync
try setrw blockdev --setrw /dev/vda
kv ro_after_setrw "$(cat /sys/block/vda/ro)"
try direct_write_after_setrw dd if=/tmp/junk of=/dev/vda bs=64k seek=3 oflag=direct conv=notrunc
try buffered_write_after_setrw dd if=/tmp/junk of=/dev/vda bs=64k seek=4 conv=notrunc,fsync
try discard blkdiscard -o 1048576 -l 65536 /dev/vda
try zeroout {UL_DIR}/blkdiscard -z -o 2097152 -l 65536 /dev/vda
try punch_hole {UL_DIR}/fallocate -p -o 3145728 -l 65536 /dev/vda
dmesg | tail -n 20
"#,
        pat = seq_pattern_cmd(RO_START, RO_LEN),
    );
    let initrd = with_util_linux(initramfs(&kernel, &script));
    let out = disk.run(disk.vm(&kernel, &initrd, ring, 1));
    let features = disk.check_ring(&out, ring);
    if !feature(&features, F_RO) || kv(&out.log, "ro").as_deref() != Some("1") {
        disk.fail(
            "the guest does not see a read-only disk (VIRTIO_BLK_F_RO, /sys/block/vda/ro)",
            &out.log,
        );
    }
    let results: Vec<String> = [
        "direct_write",
        "buffered_write",
        "direct_write_after_setrw",
        "buffered_write_after_setrw",
        "discard",
        "zeroout",
        "punch_hole",
    ]
    .iter()
    .map(|a| format!("{a}={}", kv(&out.log, a).unwrap_or_else(|| "?".into())))
    .collect();
    eprintln!("{name}: {}", results.join(" "));
    if results.iter().any(|r| !r.ends_with("=refused")) {
        disk.fail(
            &format!(
                "writes to a read-only disk were not all refused: {}",
                results.join(" ")
            ),
            &out.log,
        );
    }
    disk.check_image(&[], &out.log);
    // Linux refuses all of the above itself (EPERM / EOPNOTSUPP) before a
    // request reaches the device, so also check that the backend cannot
    // write: it holds the image open read-only.
    if let Some(pid) = disk.backend_pid() {
        let fds = open_fds(pid, &disk.image);
        let shown: Vec<String> = fds
            .iter()
            .map(|(fd, flags)| format!("fd {fd} flags {flags:#o}"))
            .collect();
        eprintln!("{name}: the backend has the image open: {shown:?}");
        // O_ACCMODE is 3; O_RDONLY is 0.
        if fds.is_empty() || fds.iter().any(|&(_, flags)| flags & 3 != 0) {
            disk.fail(
                &format!(
                    "the backend (pid {pid}) should hold the image open read-only, and only \
                     read-only: {shown:?}"
                ),
                &out.log,
            );
        }
    }
    finished(&name, t0);
}

/// The descriptors process `pid` has open on `path`, with their open flags
/// (from /proc/PID/fdinfo).
fn open_fds(pid: u32, path: &Path) -> Vec<(u32, u32)> {
    let target = must(path.canonicalize(), "resolving the image path");
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut fds: Vec<(u32, u32)> = dir
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == target))
        .filter_map(|e| {
            let fd: u32 = e.file_name().to_str()?.parse().ok()?;
            let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())?;
            Some((fd, flags))
        })
        .collect();
    fds.sort_unstable();
    fds
}

/// Case 4: `--read-only`: the guest sees a read-only disk that reads fine,
/// every kind of write fails, the image is unchanged, and the backend holds
/// it open read-only.
#[test]
fn read_only_disk_refuses_writes() {
    case_read_only(Ring::Split);
}

// ---------------------------------------------------------------------------
// Case 5: discard and write-zeroes
// ---------------------------------------------------------------------------

const ZERO_PREFILL_LEN: usize = 16 * MIB;
const ZERO_PREFILL_START: u32 = 5_000_000;
const ZERO_LEN: usize = 2 * MIB;

/// Boots a guest that runs `body` over a disk whose first 16 MiB hold a
/// pattern; the `ZERO_LEN` ranges at `zeroed` must be zeros afterwards and
/// everything else unchanged. Returns the disk (backend still running) and
/// the guest output.
fn case_zeroing(name: &str, ring: Ring, body: &str, zeroed: &[usize]) -> (Disk, VmOutput) {
    let prefill = seq_pattern(ZERO_PREFILL_START, ZERO_PREFILL_LEN);
    let opts = DiskOpts {
        unmap: true,
        ..DiskOpts::default()
    };
    let disk = Disk::new(name, "blkzero", opts, &[(0, prefill)]);
    let kernel = kernel();
    let blocks_before = must(std::fs::metadata(&disk.image), "stat image").blocks();
    let initrd = with_util_linux(initramfs(&kernel, body));
    let out = disk.run(disk.vm(&kernel, &initrd, ring, 1));
    let features = disk.check_ring(&out, ring);
    for (bit, what) in [(F_DISCARD, "DISCARD"), (F_WRITE_ZEROES, "WRITE_ZEROES")] {
        if !feature(&features, bit) {
            disk.fail(&format!("VIRTIO_BLK_F_{what} not negotiated"), &out.log);
        }
    }
    let zeros = vec![0u8; ZERO_LEN];
    let writes: Vec<(usize, &[u8])> = zeroed.iter().map(|&off| (off, &zeros[..])).collect();
    disk.check_image(&writes, &out.log);
    let blocks_after = must(std::fs::metadata(&disk.image), "stat image").blocks();
    eprintln!(
        "{name}: image allocation {} KiB before, {} KiB after",
        blocks_before / 2,
        blocks_after / 2
    );
    (disk, out)
}

const DISCARD_OFF: usize = 2 * MIB;

/// Case 5a: busybox `blkdiscard` (BLKDISCARD) over a written range: the
/// guest reads zeros back and the host file holds zeros there; nothing else
/// changed.
#[test]
fn discard_reads_back_zeros() {
    let body = format!(
        r#"[ "$(cat /sys/block/vda/queue/discard_max_bytes)" -gt 0 ] || fail "the guest sees no discard support"
step "blkdiscard {ZERO_LEN} bytes at {DISCARD_OFF}"
d0=$(st 12)
blkdiscard -o {DISCARD_OFF} -l {ZERO_LEN} /dev/vda || fail "blkdiscard failed"
kv discard_ios $(( $(st 12) - d0 ))
{check}"#,
        check = reads_zeros("discard", DISCARD_OFF, ZERO_LEN)
    );
    let t0 = Instant::now();
    let (disk, out) = case_zeroing("discard", Ring::Split, &body, &[DISCARD_OFF]);
    if kv_u64(&disk, &out, "discard_ios") == 0 {
        disk.fail("the guest completed no discard request", &out.log);
    }
    finished("discard", t0);
}

const ZEROOUT_OFF: usize = 6 * MIB;
const PUNCH_OFF: usize = 10 * MIB;

/// Case 5b: write-zeroes, issued two ways with util-linux tools: `blkdiscard
/// -z` (BLKZEROOUT: write-zeroes without unmap; the kernel may fall back to
/// writing zero pages) and `fallocate --punch-hole` on the block device
/// (write-zeroes with unmap and no fallback, so it only succeeds through a
/// real VIRTIO_BLK_T_WRITE_ZEROES). Both ranges read back as zeros in the
/// guest and on the host; nothing else changed.
#[test]
fn write_zeroes_clears_range() {
    let body = format!(
        r#"[ "$(cat /sys/block/vda/queue/write_zeroes_max_bytes)" -gt 0 ] || fail "the guest sees no write-zeroes support"
step "blkdiscard -z (BLKZEROOUT) {ZERO_LEN} bytes at {ZEROOUT_OFF}"
w0=$(st 5)
{UL_DIR}/blkdiscard -z -o {ZEROOUT_OFF} -l {ZERO_LEN} /dev/vda || fail "blkdiscard -z failed"
kv zeroout_write_ios $(( $(st 5) - w0 ))
{check1}step "fallocate --punch-hole (write-zeroes, unmap, no fallback) {ZERO_LEN} bytes at {PUNCH_OFF}"
w0=$(st 5)
{UL_DIR}/fallocate -p -o {PUNCH_OFF} -l {ZERO_LEN} /dev/vda || fail "fallocate --punch-hole on /dev/vda failed"
kv punch_write_ios $(( $(st 5) - w0 ))
{check2}"#,
        check1 = reads_zeros("write-zeroes", ZEROOUT_OFF, ZERO_LEN),
        check2 = reads_zeros("write-zeroes with unmap", PUNCH_OFF, ZERO_LEN),
    );
    let t0 = Instant::now();
    let (disk, out) = case_zeroing(
        "write_zeroes",
        Ring::Split,
        &body,
        &[ZEROOUT_OFF, PUNCH_OFF],
    );
    // Write-zeroes requests count as writes in the guest's statistics.
    eprintln!(
        "write_zeroes: write requests: {} for blkdiscard -z, {} for the punch-hole",
        kv_u64(&disk, &out, "zeroout_write_ios"),
        kv_u64(&disk, &out, "punch_write_ios")
    );
    finished("write_zeroes", t0);
}

// ---------------------------------------------------------------------------
// Case 6: flush
// ---------------------------------------------------------------------------

const FLUSH_OFF: usize = 12 * MIB;
const FLUSH_LEN: usize = 2 * MIB;
const FLUSH_START: u32 = 6_000_000;
const GO_OFF: usize = 60 * MIB;

/// Case 6: the guest writes through its page cache and syncs; while the VM
/// still runs, the host finds the data in the image, and the guest counted
/// completed FLUSH requests (the backend's own count too, if it logs one).
#[test]
fn flush_after_sync_data_in_host_file() {
    let name = "flush";
    let t0 = Instant::now();
    let mut disk = Disk::new(name, "blkflush", DiskOpts::default(), &[]);
    let kernel = kernel();
    let script = format!(
        r#"if [ "$(cat /sys/block/vda/queue/write_cache)" != "write back" ]; then
    step "write-through cache: switching to write back (config space write)"
    echo "write back" > /sys/block/vda/cache_type || fail "cannot enable the write cache"
    kv write_cache "$(cat /sys/block/vda/queue/write_cache)"
fi
[ "$(cat /sys/block/vda/queue/write_cache)" = "write back" ] || fail "the guest sees no volatile write cache, so it would never flush"
{pat} > /tmp/f
step "buffered write, then sync"
f0=$(st 16)
dd if=/tmp/f of=/dev/vda bs=1M seek={FLUSH_OFF} oflag=seek_bytes conv=notrunc 2>/tmp/dd.err || {{ cat /tmp/dd.err; fail "dd failed"; }}
sync /dev/vda
sync
kv flush_ios $(( $(st 16) - f0 ))
echo E2E-SYNCED
{wait}"#,
        pat = seq_pattern_cmd(FLUSH_START, FLUSH_LEN),
        wait = wait_for_host_go(GO_OFF),
    );
    let vm = disk
        .vm(&kernel, &initramfs(&kernel, &script), Ring::Split, 1)
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    if let Err(e) = vm.wait_for_output("E2E-SYNCED", VM_TIMEOUT) {
        let log = vm.kill();
        disk.fail(&format!("the guest never synced: {e}"), &log);
    }
    // The VM still runs (it waits for the go token): the data must already
    // be in the file.
    let expected = seq_pattern(FLUSH_START, FLUSH_LEN);
    let mut got = vec![0u8; FLUSH_LEN];
    File::open(&disk.image)
        .and_then(|f| f.read_exact_at(&mut got, FLUSH_OFF as u64))
        .unwrap();
    if got != expected {
        let log = vm.kill();
        let msg = describe_mismatch(&got, &expected).unwrap_or_default();
        disk.fail(
            &format!("after the guest's sync the data is not in the image: {msg}"),
            &log,
        );
    }
    File::options()
        .write(true)
        .open(&disk.image)
        .and_then(|f| f.write_all_at(GO_TOKEN.as_bytes(), GO_OFF as u64))
        .unwrap();
    let out = match vm.wait() {
        Ok(out) if out.success() => out,
        Ok(out) => disk.fail(
            &format!("guest script failed (E2E-EXIT={})", out.exit_code),
            &out.log,
        ),
        Err(e) => disk.fail(&format!("VM run failed: {e}"), e.log().unwrap_or("")),
    };
    let features = disk.check_ring(&out, Ring::Split);
    if !feature(&features, F_FLUSH) {
        disk.fail("VIRTIO_BLK_F_FLUSH not negotiated", &out.log);
    }
    let flushes = kv_u64(&disk, &out, "flush_ios");
    if flushes == 0 {
        disk.fail("the guest completed no FLUSH request", &out.log);
    }
    let log = disk.stop_backend();
    let backend_flushes = backend_flush_count(&log);
    eprintln!(
        "{name}: the guest completed {flushes} FLUSH requests; the backend logged: {}",
        backend_flushes.map_or_else(|| "no flush count".into(), |n| format!("{n} flushes"))
    );
    if backend_flushes == Some(0) {
        disk.fail(
            &format!("the backend logged 0 FLUSH requests:\n{log}"),
            &out.log,
        );
    }
    disk.check_image(
        &[(FLUSH_OFF, &expected), (GO_OFF, GO_TOKEN.as_bytes())],
        &out.log,
    );
    finished(name, t0);
}

/// A flush counter in the backend's log, if it prints one: the number after
/// the last `flush_requests` (our daemon's metric name).
fn backend_flush_count(log: &str) -> Option<u64> {
    let (_, rest) = log.rsplit_once("flush_requests")?;
    let digits: String = rest
        .chars()
        .skip_while(|c| !c.is_ascii_digit() && *c != '\n')
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

// ---------------------------------------------------------------------------
// Case 7: a second VM on the same socket
// ---------------------------------------------------------------------------

const RECONNECT_LEN: usize = MIB;
const RECONNECT_OFF: [usize; 2] = [4 * MIB, 24 * MIB];
const RECONNECT_START: [u32; 2] = [7_000_000, 8_000_000];

fn case_second_vm(first: Ring, second: Ring) {
    let name = format!("second_vm({first:?} then {second:?})");
    let t0 = Instant::now();
    let mut disk = Disk::new(&name, "blkreconn", DiskOpts::default(), &[]);
    let kernel = kernel();
    let pid = disk.backend_pid();

    let vm1 = format!(
        "{PICK_BS}{}",
        direct_roundtrip("vm1", RECONNECT_START[0], RECONNECT_OFF[0], RECONNECT_LEN)
    );
    let out1 = disk.run(disk.vm(&kernel, &initramfs(&kernel, &vm1), first, 1));
    disk.check_ring(&out1, first);
    disk.assert_backend_alive(&out1.log);
    let p1 = seq_pattern(RECONNECT_START[0], RECONNECT_LEN);
    disk.check_image(&[(RECONNECT_OFF[0], &p1)], &out1.log);

    let vm2 = format!(
        r#"step "the first VM's data is there"
{pat1} > /tmp/p1
dd if=/dev/vda of=/tmp/p1.back bs=1M skip={off1} count={RECONNECT_LEN} iflag=direct,skip_bytes,count_bytes 2>/dev/null
cmp /tmp/p1 /tmp/p1.back || fail "the first VM's data reads back wrong"
{PICK_BS}{direct}"#,
        pat1 = seq_pattern_cmd(RECONNECT_START[0], RECONNECT_LEN),
        off1 = RECONNECT_OFF[0],
        direct = direct_roundtrip("vm2", RECONNECT_START[1], RECONNECT_OFF[1], RECONNECT_LEN),
    );
    let out2 = disk.run(disk.vm(&kernel, &initramfs(&kernel, &vm2), second, 1));
    disk.check_ring(&out2, second);
    disk.assert_backend_alive(&out2.log);
    if disk.backend_pid() != pid {
        disk.fail("the backend was restarted", &out2.log);
    }
    let p2 = seq_pattern(RECONNECT_START[1], RECONNECT_LEN);
    disk.check_image(
        &[(RECONNECT_OFF[0], &p1), (RECONNECT_OFF[1], &p2)],
        &out2.log,
    );
    finished(&name, t0);
}

/// Case 7: after the first VM powers off, a second VM is served on the same
/// socket by the same daemon process and sees the first VM's data.
#[test]
fn second_vm_served_after_first_exits_split() {
    case_second_vm(Ring::Split, Ring::Split);
}

/// Case 7 over packed rings.
#[test]
fn second_vm_served_after_first_exits_packed() {
    case_second_vm(Ring::Packed, Ring::Packed);
}

/// Case 7 with the ring layout changing between the connections (packed,
/// then split): nothing of the first connection's rings may leak into the
/// second.
#[test]
fn second_vm_with_other_ring_layout() {
    case_second_vm(Ring::Packed, Ring::Split);
}

// ---------------------------------------------------------------------------
// Resize: the host grows the image and sends SIGHUP; the daemon re-reads the size and
// announces it with a config-change message (BACKEND_REQ); QEMU relays it to the guest.
// ---------------------------------------------------------------------------

#[test]
fn resize_on_sighup_reaches_the_guest() {
    let name = "resize";
    let t0 = Instant::now();
    let disk = Disk::new(name, "blkresize", DiskOpts::default(), &[]);
    if disk.backend_pid().is_none() {
        eprintln!("{name}: the backend under test has no process to signal; skipped");
        return;
    }
    let kernel = kernel();
    let old_sectors = DISK_SIZE / 512;
    let new_sectors = 2 * old_sectors;
    let script = format!(
        r#"[ "$(cat /sys/block/vda/size)" = {old_sectors} ] || fail "unexpected initial size $(cat /sys/block/vda/size)"
echo E2E-READY
i=0
while [ "$(cat /sys/block/vda/size)" != {new_sectors} ]; do
    i=$(( i + 1 ))
    [ "$i" -lt 600 ] || fail "the guest never saw the new size (still $(cat /sys/block/vda/size))"
    usleep 100000
done
step "new size seen"
dd if=/dev/zero of=/dev/vda bs=4096 count=1 seek=$(( {new_sectors} / 8 - 1 )) oflag=direct 2>/tmp/dd.err || {{ cat /tmp/dd.err; fail "writing the last block of the grown disk failed"; }}
kv resized "$(cat /sys/block/vda/size)"
"#
    );
    let vm = disk
        .vm(&kernel, &initramfs(&kernel, &script), Ring::Split, 1)
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    if let Err(e) = vm.wait_for_output("E2E-READY", VM_TIMEOUT) {
        let log = vm.kill();
        disk.fail(&format!("the guest never got ready: {e}"), &log);
    }
    File::options()
        .write(true)
        .open(&disk.image)
        .and_then(|f| f.set_len(2 * DISK_SIZE as u64))
        .unwrap();
    let pid = disk.backend_pid().unwrap_or(0);
    // SAFETY: kill(2) with a pid we spawned and a valid signal number has no memory effects.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
    assert_eq!(rc, 0, "sending SIGHUP to the backend failed");
    let out = match vm.wait() {
        Ok(out) if out.success() => out,
        Ok(out) => disk.fail(
            &format!("guest script failed (E2E-EXIT={})", out.exit_code),
            &out.log,
        ),
        Err(e) => disk.fail(&format!("VM run failed: {e}"), e.log().unwrap_or("")),
    };
    assert_eq!(kv_u64(&disk, &out, "resized"), new_sectors as u64);
    finished(name, t0);
}

// ---------------------------------------------------------------------------
// Crash recovery: the backend is killed (SIGKILL) twice in the middle of the
// guest's writes and restarted on the same socket; QEMU reconnects
// (`reconnect-ms`) and hands the new instance the inflight area, which
// resubmits the requests the killed one left in flight. The guest never sees
// an error and reads back exactly what it wrote.
// ---------------------------------------------------------------------------

/// Parallel O_DIRECT writers in the guest, and 64 KiB blocks each writes.
const RESTART_WRITERS: usize = 16;
const RESTART_BLOCKS: usize = 8;
const RESTART_LEN: usize = RESTART_WRITERS * RESTART_BLOCKS * 64 * KIB;
const RESTART_START: u32 = 4_000_000;
/// Writes per second the image takes: 128 writes take several seconds, so
/// requests are in flight in the backend whenever it is killed.
const RESTART_WRITE_IOPS: u32 = 20;
const RESTART_KILLS: usize = 2;

/// The number of requests the restarted backend's log says the killed one
/// left in flight (queue 0), once the ring started; `None` if it started
/// without any.
fn recovered_requests(log: &str) -> Option<u64> {
    log.lines().find_map(|l| {
        let rest = l.split("queue 0: ").nth(1)?;
        let n = rest.strip_suffix(" requests left in flight by a previous backend instance")?;
        n.trim().parse().ok()
    })
}

fn case_restart_recovers_inflight_writes(ring: Ring) {
    let name = format!("restart_recovery({ring:?})");
    let t0 = Instant::now();
    let opts = DiskOpts {
        write_iops: Some(RESTART_WRITE_IOPS),
        ..DiskOpts::default()
    };
    let mut disk = Disk::new(&name, "blkrestart", opts, &[]);
    if disk.kind != BackendKind::Ours {
        eprintln!("{name}: only our daemon is restarted by this case; skipped");
        return;
    }
    let kernel = kernel();
    let script = format!(
        r#"step "pattern of {RESTART_LEN} bytes"
{pat} > /tmp/pat
echo E2E-WRITING
step "{RESTART_WRITERS} parallel O_DIRECT writers"
pids=""
for i in $(seq 0 {last}); do
    dd if=/tmp/pat of=/dev/vda bs=64k skip=$(( i * {RESTART_BLOCKS} )) seek=$(( i * {RESTART_BLOCKS} )) count={RESTART_BLOCKS} oflag=direct conv=notrunc 2>/tmp/dd$i.err &
    pids="$pids $!"
done
for p in $pids; do wait $p || {{ cat /tmp/dd*.err; fail "a writer failed"; }}; done
step "writes done"
dd if=/dev/vda of=/tmp/back bs=64k count={blocks} iflag=direct 2>/tmp/dd.err || {{ cat /tmp/dd.err; fail "reading back failed"; }}
cmp /tmp/pat /tmp/back || fail "the read-back differs from what was written"
"#,
        pat = seq_pattern_cmd(RESTART_START, RESTART_LEN),
        last = RESTART_WRITERS - 1,
        blocks = RESTART_WRITERS * RESTART_BLOCKS,
    );
    let vm = disk
        .vm(&kernel, &initramfs(&kernel, &script), ring, 1)
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    if let Err(e) = vm.wait_for_output("E2E-WRITING", VM_TIMEOUT) {
        let log = vm.kill();
        disk.fail(&format!("the guest never started writing: {e}"), &log);
    }
    let mut recovered = Vec::new();
    for kill in 1..=RESTART_KILLS {
        // Let the writers fill the backend with requests.
        std::thread::sleep(Duration::from_millis(1500));
        let old_log = disk.kill_and_restart_backend();
        eprintln!("{name}: kill {kill}: backend killed and restarted");
        // Wait until QEMU reconnected and the ring runs on the new instance.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = disk.backend_log();
            if log.contains("queue 0: started (") {
                match recovered_requests(&log) {
                    Some(n) if n > 0 => {
                        eprintln!(
                            "{name}: kill {kill}: {n} requests were in flight and were recovered"
                        );
                        recovered.push(n);
                        break;
                    }
                    _ => {
                        let log = vm.kill();
                        disk.fail(
                            &format!(
                                "kill {kill}: the restarted backend found no request in flight, so \
                                 the kill proved nothing\n----- killed instance's log -----\n{old_log}"
                            ),
                            &log,
                        );
                    }
                }
            }
            if Instant::now() >= deadline {
                let log = vm.kill();
                disk.fail(
                    &format!("kill {kill}: QEMU did not restart the ring on the new backend"),
                    &log,
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let out = match vm.wait() {
        Ok(out) if out.success() => out,
        Ok(out) => disk.fail(
            &format!("guest script failed (E2E-EXIT={})", out.exit_code),
            &out.log,
        ),
        Err(e) => disk.fail(&format!("VM run failed: {e}"), e.log().unwrap_or("")),
    };
    disk.check_ring(&out, ring);
    let backend_log = disk.backend_log();
    if !backend_log
        .contains("every request left in flight by the previous backend instance was resubmitted")
    {
        disk.fail(
            "the last instance did not resubmit every recovered request",
            &out.log,
        );
    }
    let pattern = seq_pattern(RESTART_START, RESTART_LEN);
    disk.check_image(&[(0, &pattern)], &out.log);
    eprintln!("{name}: requests in flight at each kill, all completed: {recovered:?}");
    finished(&name, t0);
}

/// A backend killed twice mid-write (split ring) loses no write.
#[test]
fn restart_recovers_inflight_writes_split() {
    case_restart_recovers_inflight_writes(Ring::Split);
}

/// A backend killed twice mid-write (packed ring) loses no write.
#[test]
fn restart_recovers_inflight_writes_packed() {
    case_restart_recovers_inflight_writes(Ring::Packed);
}
