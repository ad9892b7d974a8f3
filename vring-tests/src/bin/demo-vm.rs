// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `demo-vm`: boots a Linux guest under QEMU with a disk served by our `vhost-user-blk`
//! daemon, on an embedded default: a sparse 1 GiB image created on first run under
//! `.cache/demo/`, the Debian guest kernel and QEMU 10 installed by
//! `vring-tests/scripts/install-test-deps.sh`.
//!
//! By default the guest shows what it sees of the disk (size, negotiated virtio features,
//! queues), writes 4 MiB of random data, reads it back, compares, and powers off. With
//! `--shell` it drops into a busybox shell on the serial console instead (leave with
//! `poweroff -f`, or Ctrl-A X).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use clap::Parser;
use vring_tests::e2e::blk::spawn_vhost_user_blk;
use vring_tests::e2e::netns::NetNs;
use vring_tests::e2e::{cache_dir, repo_root, GuestKernel, Initramfs, QemuVm, TempDir};

#[derive(Parser, Debug)]
#[command(about = "Boot a demo VM with a vhost-user-blk disk served by our daemon")]
struct Args {
    /// Disk image to serve (created sparse, 1 GiB, if missing).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Use the packed virtqueue layout (`packed=on`).
    #[arg(long)]
    packed: bool,
    /// Number of queues (the guest gets as many vCPUs).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Drop into an interactive shell in the guest instead of the scripted demo.
    #[arg(long)]
    shell: bool,
    /// No NIC (by default, as root, the guest gets a virtio-net NIC served by our
    /// vhost-user-net daemon on a TAP inside a network namespace of its own).
    #[arg(long)]
    no_net: bool,
}

const DEMO_SCRIPT: &str = r#"
echo "== vhost-user-blk demo =="
echo "disk /dev/vda: $(cat /sys/block/vda/size) sectors of 512 bytes, read-only=$(cat /sys/block/vda/ro)"
for d in /sys/bus/virtio/devices/*; do
  echo "virtio device $(basename $d): id $(cat $d/device), features $(cat $d/features)"
done
echo "hardware queues: $(ls /sys/block/vda/mq | wc -l)"
dd if=/dev/urandom of=/tmp/pattern bs=1M count=4 2>/dev/null
dd if=/tmp/pattern of=/dev/vda bs=1M count=4 conv=fsync 2>/dev/null || exit 1
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=1M count=4 2>/dev/null || exit 1
cmp /tmp/pattern /tmp/back || exit 1
echo "wrote, read back and verified 4 MiB: $(md5sum /tmp/back | cut -d' ' -f1)"
if ip link show eth0 >/dev/null 2>&1; then
  echo "== vhost-user-net: eth0 $(cat /sys/class/net/eth0/address), TAP 10.78.0.1 in the demo's network namespace =="
  ip addr add 10.78.0.2/24 dev eth0
  ip link set eth0 up
  ping -c 3 -W 10 10.78.0.1 || exit 1
fi
"#;

const SHELL_SCRIPT: &str = r#"
echo "== vhost-user-blk demo: /dev/vda is served by vhost-user-blk; 'poweroff -f' to leave =="
setsid cttyhack sh
"#;

/// Starts our vhost-user-net daemon inside a new network namespace on TAP `vudemo0`
/// (10.78.0.1/24), listening on `<tmp>/net.sock`.
fn start_net(
    tmp: &TempDir,
) -> Result<(NetNs, vring_tests::e2e::BackgroundProcess, PathBuf), String> {
    // SAFETY: geteuid takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("a TAP in a network namespace needs root".into());
    }
    let bin = repo_root().join("target/release/vhost-user-net");
    if !bin.is_file() {
        return Err(format!("{} is not built", bin.display()));
    }
    let ns = NetNs::create("vudemo", "net")?;
    let sock = tmp.path().join("net.sock");
    let mut cmd = ns.command(&bin.to_string_lossy());
    cmd.arg("--socket-path")
        .arg(&sock)
        .args(["--tap", "vudemo0", "--mac", "52:54:00:de:00:02"]);
    let mut daemon = vring_tests::e2e::BackgroundProcess::spawn("vhost-user-net", cmd)
        .map_err(|e| e.to_string())?;
    daemon
        .wait_for_socket(&sock, std::time::Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    ns.ip(&["addr", "add", "10.78.0.1/24", "dev", "vudemo0"])?;
    ns.ip(&["link", "set", "vudemo0", "up"])?;
    Ok((ns, daemon, sock))
}

fn run(args: Args) -> Result<(), String> {
    let image = match args.image {
        Some(p) => p,
        None => cache_dir()
            .parent()
            .map(|c| c.join("demo"))
            .unwrap_or_else(|| PathBuf::from(".cache/demo"))
            .join("disk.img"),
    };
    if !image.exists() {
        if let Some(dir) = image.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
        let f = std::fs::File::create(&image)
            .map_err(|e| format!("creating {}: {e}", image.display()))?;
        f.set_len(1 << 30)
            .map_err(|e| format!("sizing {}: {e}", image.display()))?;
        println!("created sparse 1 GiB image {}", image.display());
    }
    let kernel = GuestKernel::locate().map_err(|e| e.to_string())?;
    let script = if args.shell {
        SHELL_SCRIPT
    } else {
        DEMO_SCRIPT
    };
    let initrd = Initramfs::new(&kernel)
        .modules(&["virtio_blk", "virtio_net"])
        .script(script)
        .build()
        .map_err(|e| e.to_string())?;
    let tmp = TempDir::new("demo").map_err(|e| e.to_string())?;
    let sock = tmp.path().join("blk.sock");
    let daemon_args: Vec<OsString> = vec![
        "--blk-file".into(),
        image.clone().into_os_string(),
        "--num-queues".into(),
        args.queues.to_string().into(),
    ];
    let daemon = spawn_vhost_user_blk(&sock, &daemon_args).map_err(|e| e.to_string())?;
    let mut device = format!("vhost-user-blk-pci,chardev=c0,num-queues={}", args.queues);
    if args.packed {
        device.push_str(",packed=on");
    }
    let mut vm = QemuVm::new(&kernel, &initrd)
        .smp(u32::from(args.queues))
        .chardev_socket("c0", &sock)
        .device(&device);
    // The NIC: our net daemon on a TAP inside a namespace of the demo's own (needs root);
    // kept alive (namespace and daemon) until QEMU exits.
    let _net = if args.no_net {
        None
    } else {
        match start_net(&tmp) {
            Ok((ns, daemon, net_sock)) => {
                vm = vm
                    .chardev_socket("n0c", &net_sock)
                    .args(["-netdev", "vhost-user,id=n0,chardev=n0c"])
                    .device("virtio-net-pci,netdev=n0,mac=52:54:00:de:00:02");
                println!(
                    "net: vhost-user-net --socket-path {} --tap vudemo0 in network namespace {}",
                    net_sock.display(),
                    ns.name()
                );
                Some((ns, daemon))
            }
            Err(e) => {
                println!("net: no NIC ({e})");
                None
            }
        }
    };
    println!(
        "daemon: vhost-user-blk --socket-path {} {}",
        sock.display(),
        daemon_args
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let result = if args.shell {
        let argv = vm.command_line().map_err(|e| e.to_string())?;
        let (prog, rest) = argv.split_first().ok_or("empty QEMU command line")?;
        let status = Command::new(prog)
            .args(rest)
            .status()
            .map_err(|e| format!("running QEMU: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("QEMU exited with {status}"))
        }
    } else {
        let out = vm.echo(true).run().map_err(|e| e.to_string())?;
        if out.success() {
            println!("demo finished in {:.1} s", out.elapsed.as_secs_f64());
            Ok(())
        } else {
            Err(format!(
                "the guest's demo script failed (exit {})",
                out.exit_code
            ))
        }
    };
    let (_, log) = daemon.stop().map_err(|e| e.to_string())?;
    if result.is_err() {
        eprintln!("--- vhost-user-blk log ---\n{log}");
    }
    result
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo-vm: {e}");
            ExitCode::FAILURE
        }
    }
}
