// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End-to-end smoke test of user-mode Linux as a vhost-user frontend: UML
//! (Debian `user-mode-linux`) boots the busybox initramfs with
//! `virtio_uml.device=SOCK:2`, a virtio-blk disk served by our
//! `vhost-user-blk` daemon; the guest writes a pattern to `/dev/vda` with
//! `dd`, reads it back and compares, and the host checks the image file.
//!
//! UML is a frontend unlike QEMU: it asks only the REPLY_ACK, BACKEND_REQ,
//! CONFIG and INBAND_NOTIFICATIONS protocol features, always uses 256-entry
//! rings, signals through a pipe, and reads config by GET_CONFIG alone.
//!
//! Needs what `vring-tests/scripts/install-test-deps.sh` installs
//! (`user-mode-linux`, `busybox-static`) and the daemon built with
//! `cargo build --release -p vhost-user-blk` (or `$E2E_VHOST_USER_BLK`);
//! fails with those hints when they are missing. `E2E_VERBOSE=1` shows the
//! guest console live.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use vring_tests::e2e::blk::{seq_pattern, seq_pattern_cmd, spawn_vhost_user_blk};
use vring_tests::e2e::{uml_kernel, Initramfs, TempDir, UmlVm, SCRIPT_PRELUDE};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// Size of the test disk (a sparse file).
const DISK_SIZE: u64 = 64 << 20;
/// Where the guest writes the pattern, and how much.
const OFFSET: usize = 3 * MIB;
const LEN: usize = 768 * KIB;
/// First number of the pattern ([`seq_pattern`]).
const PATTERN_START: u32 = 4242;
/// Limit for the UML run (boot is about 1.5 s).
const VM_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn uml_virtio_blk_on_vhost_user_blk() {
    let started = Instant::now();
    let kernel = uml_kernel().unwrap_or_else(|e| panic!("{e}"));
    let tmp = TempDir::new("uml-blk").unwrap();
    let image = tmp.path().join("disk.img");
    File::create(&image).unwrap().set_len(DISK_SIZE).unwrap();
    let sock = tmp.path().join("blk.sock");
    let args: Vec<OsString> = vec![
        "--blk-file".into(),
        image.clone().into(),
        "--num-queues".into(),
        "1".into(),
    ];
    let mut daemon = spawn_vhost_user_blk(&sock, &args).unwrap_or_else(|e| panic!("{e}"));

    let bs = 4 * KIB;
    let script = format!(
        "{SCRIPT_PRELUDE}set -e\n\
         test -b /dev/vda || fail \"no /dev/vda\"\n\
         for d in /sys/bus/virtio/devices/*; do step \"virtio device $(cat $d/device) features $(cat $d/features)\"; done\n\
         step \"vda: $(cat /sys/block/vda/size) sectors\"\n\
         [ \"$(cat /sys/block/vda/size)\" = {sectors} ] || fail \"wrong disk size\"\n\
         {pattern} > /tmp/pattern\n\
         step write\n\
         dd if=/tmp/pattern of=/dev/vda bs={bs} seek={seek} oflag=direct conv=fsync 2>/dev/null || fail \"dd write\"\n\
         step read\n\
         dd if=/dev/vda of=/tmp/back bs={bs} skip={seek} count={count} iflag=direct 2>/dev/null || fail \"dd read\"\n\
         cmp /tmp/pattern /tmp/back || fail \"data read back differs from what was written\"\n\
         step done\n",
        sectors = DISK_SIZE / 512,
        pattern = seq_pattern_cmd(PATTERN_START, LEN),
        seek = OFFSET / bs,
        count = LEN / bs,
    );
    let initrd = Initramfs::new(&kernel)
        .modules(&["virtio_blk"])
        .script(script)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        initrd.modules,
        ["virtio_blk"],
        "UML has virtio_uml built in"
    );

    let fail = |what: &str, guest: &str, daemon_log: &str| -> ! {
        panic!(
            "{what}\n----- guest log -----\n{guest}\n----- vhost-user-blk log -----\n\
             {daemon_log}\n----- end -----"
        )
    };
    let out = match UmlVm::new(&kernel, &initrd)
        .virtio_blk(&sock)
        .timeout(VM_TIMEOUT)
        .run()
    {
        Ok(out) if out.success() => out,
        Ok(out) => fail(
            &format!(
                "guest script failed (E2E-EXIT={}; see the GUEST-FAIL and E2E-STEP lines)",
                out.exit_code
            ),
            &out.log,
            &daemon.log(),
        ),
        Err(e) => fail(
            &format!("UML run failed: {e}"),
            e.log().unwrap_or(""),
            &daemon.log(),
        ),
    };
    assert!(
        out.steps().iter().any(|s| s.ends_with(" done")),
        "{:?}",
        out.steps()
    );
    if let Ok(Some(status)) = daemon.try_wait() {
        fail(
            &format!("vhost-user-blk exited ({status}) during the run"),
            &out.log,
            &daemon.log(),
        );
    }

    let mut on_disk = vec![0u8; LEN];
    File::open(&image)
        .unwrap()
        .read_exact_at(&mut on_disk, OFFSET as u64)
        .unwrap();
    if on_disk != seq_pattern(PATTERN_START, LEN) {
        let first = on_disk
            .iter()
            .zip(seq_pattern(PATTERN_START, LEN))
            .position(|(a, b)| *a != b)
            .unwrap_or(0);
        fail(
            &format!(
                "the image file does not hold the pattern the guest wrote (first difference at \
                 byte {first} of the {LEN} written at {OFFSET})"
            ),
            &out.log,
            &daemon.log(),
        );
    }
    eprintln!(
        "uml_virtio_blk_on_vhost_user_blk: UML ran in {:.1}s, test took {:.1}s",
        out.elapsed.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// Process ids whose parent is `ppid` (from `/proc/*/stat`).
fn children_of(ppid: u32) -> Vec<u32> {
    let mut kids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may contain spaces, so split after ')'.
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if parent == Some(ppid) {
            kids.push(pid);
        }
    }
    kids
}

/// A guest that never halts is killed at the timeout, with its helper
/// processes (UML runs guest user space in ptraced child processes), and the
/// error carries the console log.
#[test]
fn uml_timeout_kills_the_vm() {
    let kernel = uml_kernel().unwrap_or_else(|e| panic!("{e}"));
    let initrd = Initramfs::new(&kernel)
        .script("echo sleeping-forever; sleep 3600")
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let limit = Duration::from_secs(5);
    let vm = UmlVm::new(&kernel, &initrd)
        .timeout(limit)
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    vm.wait_for_output("sleeping-forever", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let pid = vm.pid().unwrap();
    let helpers = children_of(pid);
    assert!(
        !helpers.is_empty(),
        "UML (pid {pid}) has no child processes"
    );
    let err = vm.wait().unwrap_err();
    match &err {
        vring_tests::e2e::E2eError::Timeout { after, log, .. } => {
            assert_eq!(*after, limit);
            assert!(log.contains("sleeping-forever"), "{log}");
        }
        other => panic!("expected a timeout, got: {other}"),
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let alive: Vec<u32> = std::iter::once(pid)
            .chain(helpers.iter().copied())
            .filter(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
            .collect();
        if alive.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "UML processes {alive:?} (main pid {pid}) still exist 5 s after the timeout"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
