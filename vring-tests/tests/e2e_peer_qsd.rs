// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End-to-end check of the e2e harness itself against the reference
//! ("peer") vhost-user-blk backend, `qemu-storage-daemon`: a real QEMU (TCG)
//! boots a real Linux guest whose virtio-blk disk is served by the daemon
//! over vhost-user; data written on either side must be visible on the
//! other.
//!
//! Needs the packages and guest kernel installed by
//! `vring-tests/scripts/install-test-deps.sh`; fails (with that hint) if they
//! are missing.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use vring_tests::e2e::{self, qemu_binary, GuestKernel, Initramfs, QemuVm, QsdBlkExport, TempDir};

const DISK_SIZE: usize = 64 << 20;
const MIB: usize = 1 << 20;
const HOST_PATTERN: &str = "host-pattern-0123456789";
const GUEST_PATTERN: &str = "guest-pattern-abcdef";
/// Where the guest writes (MiB) and how much (MiB).
const GUEST_OFFSET_MIB: usize = 8;
const GUEST_LEN_MIB: usize = 4;

/// Unwraps a harness result, panicking with its `Display` (which carries the
/// install hint or the captured VM log).
fn ok<T>(r: e2e::Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

/// What `yes <line> | head -c <len>` prints.
fn yes_pattern(line: &str, len: usize) -> Vec<u8> {
    let unit = format!("{line}\n");
    unit.as_bytes().iter().copied().cycle().take(len).collect()
}

fn guest_script() -> String {
    format!(
        r#"set -e
echo "guest: kernel $(uname -r)"
test -b /dev/vda
sectors=$(cat /sys/block/vda/size)
if [ "$sectors" != {sectors} ]; then echo "guest: bad size $sectors"; exit 2; fi

# host -> guest: the first MiB was filled by the host before boot.
yes {HOST_PATTERN} | head -c {MIB} > /tmp/host.expected
dd if=/dev/vda of=/tmp/host.read bs=1M count=1 iflag=direct 2>/dev/null
cmp /tmp/host.expected /tmp/host.read
echo "guest: host pattern OK"

# guest -> device -> guest, bypassing the guest page cache.
yes {GUEST_PATTERN} | head -c {glen} > /tmp/pat
dd if=/tmp/pat of=/dev/vda bs=1M seek={GUEST_OFFSET_MIB} oflag=direct conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=1M skip={GUEST_OFFSET_MIB} count={GUEST_LEN_MIB} iflag=direct 2>/dev/null
a=$(md5sum < /tmp/pat)
b=$(md5sum < /tmp/back)
echo "guest: wrote $a read $b"
[ "$a" = "$b" ]
echo "guest: round trip OK"
"#,
        sectors = DISK_SIZE / 512,
        glen = GUEST_LEN_MIB * MIB,
    )
}

#[test]
fn qsd_vhost_user_blk_roundtrip() {
    let t0 = Instant::now();
    let kernel = ok(GuestKernel::locate());
    ok(qemu_binary());

    let tmp = ok(TempDir::new("qsd"));
    let image = tmp.path().join("disk.img");
    let sock = tmp.path().join("vhost-blk.sock");

    let host_pattern = yes_pattern(HOST_PATTERN, MIB);
    {
        let f = File::create(&image).unwrap();
        f.set_len(DISK_SIZE as u64).unwrap();
        f.write_all_at(&host_pattern, 0).unwrap();
        f.sync_all().unwrap();
    }

    let qsd = ok(QsdBlkExport::start(&image, &sock, true, 1));
    let initrd = ok(Initramfs::new(&kernel)
        .modules(&["virtio_blk"])
        .script(guest_script())
        .build());
    assert!(initrd.modules.iter().any(|m| m == "virtio_blk"));

    let out = ok(QemuVm::new(&kernel, &initrd)
        .chardev_socket("c0", &sock)
        .device("vhost-user-blk-pci,chardev=c0,num-queues=1")
        .timeout(Duration::from_secs(60))
        .run());
    let qsd_log = ok(qsd.stop());
    if !out.success() {
        panic!(
            "guest script failed (E2E-EXIT={})\n--- VM log ---\n{}\n--- qemu-storage-daemon log ---\n{qsd_log}",
            out.exit_code, out.log
        );
    }
    assert!(out.log.contains("guest: round trip OK"), "{}", out.log);
    eprintln!(
        "VM run took {:.2}s (test total {:.2}s)\n{}",
        out.elapsed.as_secs_f64(),
        t0.elapsed().as_secs_f64(),
        out.log
    );

    // The host sees what the guest wrote, and the rest is intact.
    let data = std::fs::read(&image).unwrap();
    assert_eq!(data.len(), DISK_SIZE);
    let (off, len) = (GUEST_OFFSET_MIB * MIB, GUEST_LEN_MIB * MIB);
    let range = |a: usize, b: usize| &data[a..b];
    assert!(
        range(off, off + len) == yes_pattern(GUEST_PATTERN, len).as_slice(),
        "guest pattern not found in the image at {off:#x}"
    );
    assert!(
        range(0, MIB) == host_pattern.as_slice(),
        "host pattern damaged"
    );
    assert!(
        range(MIB, off).iter().all(|&b| b == 0)
            && range(off + len, DISK_SIZE).iter().all(|&b| b == 0),
        "unexpected writes outside the guest's range"
    );
}

/// A guest whose test script fails must surface as a non-zero exit code
/// (and `ensure_success` as an error carrying the log), not hang or pass.
#[test]
fn guest_failure_is_reported() {
    let kernel = ok(GuestKernel::locate());
    let initrd = ok(Initramfs::new(&kernel)
        .script("echo about-to-fail; exit 7")
        .build());
    let out = ok(QemuVm::new(&kernel, &initrd)
        .timeout(Duration::from_secs(60))
        .run());
    assert_eq!(out.exit_code, 7, "{}", out.log);
    assert!(out.log.contains("about-to-fail"));
    let err = out.ensure_success().unwrap_err();
    assert!(err.to_string().contains("E2E-EXIT=7"), "{err}");
}

/// A module that fails to load must fail the run with a clear error, not
/// be ignored. (The extra file replaces `virtio_blk.ko` in the archive.)
#[test]
fn insmod_failure_is_reported() {
    let kernel = ok(GuestKernel::locate());
    let initrd = ok(Initramfs::new(&kernel)
        .modules(&["virtio_blk"])
        .file(
            "/lib/modules/e2e/virtio_blk.ko",
            &b"not a module"[..],
            0o644,
        )
        .script("echo should-not-run")
        .build());
    let err = QemuVm::new(&kernel, &initrd)
        .timeout(Duration::from_secs(60))
        .run()
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("failed to load kernel module `virtio_blk`"),
        "{msg}"
    );
    assert!(!msg.contains("should-not-run"), "{msg}");
}

/// A guest that never finishes is killed at the timeout and reported with
/// its log.
#[test]
fn timeout_kills_the_vm() {
    let kernel = ok(GuestKernel::locate());
    let initrd = ok(Initramfs::new(&kernel)
        .script("echo sleeping-forever; sleep 3600")
        .build());
    let limit = Duration::from_secs(10);
    let vm = ok(QemuVm::new(&kernel, &initrd).timeout(limit).spawn());
    // The timeout is enforced by wait(), counted from spawn.
    ok(vm.wait_for_output("sleeping-forever", Duration::from_secs(60)));
    let pid = vm.pid().unwrap();
    let err = vm.wait().unwrap_err();
    match &err {
        e2e::E2eError::Timeout { after, log, .. } => {
            assert_eq!(*after, limit);
            assert!(log.contains("sleeping-forever"), "{log}");
        }
        other => panic!("expected a timeout, got: {other}"),
    }
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU (pid {pid}) still exists after the timeout"
    );
}
