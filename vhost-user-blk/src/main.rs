// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-user-blk`: serves a file or block device to a VM as a virtio block device over
//! vhost-user (QEMU `-device vhost-user-blk-pci`, Cloud Hypervisor `--disk vhost_user=on`).
//!
//! Follows the backend program conventions of QEMU's `docs/interop/vhost-user.rst`:
//! `--socket-path PATH` or `--fd N`, `--print-capabilities`, `--blk-file PATH`,
//! `--read-only` (all listed by `--help`, which ends with a QEMU command line). The daemon serves one frontend at a time and, when it disconnects,
//! accepts the next one on the same socket. SIGTERM/SIGINT stop it; SIGHUP re-reads the
//! disk size and, if it changed, tells the frontend with a config-change message.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use log::{error, info, warn};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vhost_user_blk::cli::BlockArgs;
use vhost_user_blk::{BlkDevice, BlockBackend, BlockDevice};
use virtio_core::vhost_user::{BackendArgs, Capabilities, Server, ServerConfig};

/// Shown at the end of `--help`: a command line to copy.
const AFTER_HELP: &str = "\
Example: serve disk.img to a QEMU guest (vhost-user needs the guest RAM in shared memory):

  vhost-user-blk --socket-path /tmp/vublk.sock --blk-file disk.img &
  qemu-system-x86_64 -m 1G -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem -chardev socket,id=blk0,path=/tmp/vublk.sock -device vhost-user-blk-pci,chardev=blk0 ...

(then your usual -machine, -smp, -kernel or boot disk options).
Add packed=on to -device for the packed ring. QEMU gives vhost-user-blk-pci one queue per
vCPU unless num-queues= is set, and refuses a backend with fewer: keep --num-queues at least
that. SIGHUP re-reads the disk size; SIGTERM stops the daemon; RUST_LOG=debug for more logging.";

/// The daemon's command line: the backend program conventions (vhost-user.rst) and the
/// block device options.
#[derive(Parser, Debug)]
#[command(
    name = "vhost-user-blk",
    version,
    about = "vhost-user block device backend: serves a disk image or block device to a VM",
    after_help = AFTER_HELP
)]
struct Options {
    #[command(flatten)]
    conventions: BackendArgs,
    #[command(flatten)]
    blk: BlockArgs,
    /// Busy-poll each ring for this many microseconds before sleeping on its kick (a
    /// fixed window; 0: the adaptive window below).
    #[arg(long, default_value_t = 0)]
    poll_us: u64,
    /// Adaptive polling: after a ring was found empty or completions were returned, poll
    /// for a window learned from recent gaps between requests, at most this many
    /// microseconds; rings whose requests come further apart (idle ones) do not poll.
    /// 0 disables polling.
    #[arg(long, default_value_t = 50)]
    adaptive_poll_max_us: u64,
    /// Queues served by one worker thread (1: a thread per queue).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    queues_per_thread: u16,
}

fn run() -> Result<(), String> {
    // --print-capabilities works alone, without the options the parser requires
    // (vhost-user.rst: the frontend runs it to probe the back-end). Malformed
    // conventional options are reported by the parser below.
    let lossy = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned());
    if BackendArgs::parse_known(lossy).is_ok_and(|(a, _)| a.print_capabilities) {
        return Capabilities::new("block")
            .feature("read-only")
            .feature("blk-file")
            .print()
            .map_err(|e| format!("printing capabilities: {e}"));
    }
    // Prints usage and exits 2 on a bad command line; exactly one of --socket-path and
    // --fd is required.
    let options = Options::parse();
    let engine = options
        .blk
        .engine
        .resolve()
        .map_err(|e| format!("choosing the I/O engine: {e}"))?;
    let backend = BlockBackend::open(&options.blk.backend_options())
        .map_err(|e| format!("opening {}: {e}", options.blk.path.display()))?;
    info!(
        "serving {} ({} sectors, logical block {} B, {}{}), engine {:?}",
        options.blk.path.display(),
        backend.capacity_sectors(),
        backend.logical_block_size(),
        if backend.is_read_only() {
            "read-only"
        } else {
            "read-write"
        },
        if backend.is_direct() {
            ", O_DIRECT"
        } else {
            ""
        },
        engine
    );
    let device = Arc::new(BlkDevice::new(BlockDevice::new(
        Arc::new(backend),
        options.blk.device_options(),
        engine,
    )));
    // Before the socket exists: a supervisor that sees the socket may signal at once.
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| format!("installing signal handlers: {e}"))?;
    let socket = options
        .conventions
        .into_socket()
        .map_err(|e| e.to_string())?;
    let config = ServerConfig {
        queues_per_thread: usize::from(options.queues_per_thread),
        poll_us: options.poll_us,
        adaptive_poll_max_us: options.adaptive_poll_max_us,
        thread_name: "vublk".into(),
        ..ServerConfig::default()
    };
    let mut server = Server::new(socket, Arc::clone(&device), config).map_err(|e| e.to_string())?;
    let notifier = server.config_notifier();
    let stop = server.shutdown_handle();
    let signal_device = Arc::clone(&device);
    std::thread::Builder::new()
        .name("vublk-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal == SIGHUP {
                    match signal_device.block_device().resize() {
                        Ok(true) => {
                            info!("disk size changed; notifying the frontend");
                            if let Err(e) = notifier.notify_config_change() {
                                warn!("config-change notification failed: {e}");
                            }
                        }
                        Ok(false) => info!("SIGHUP: disk size unchanged"),
                        Err(e) => error!("SIGHUP: re-reading the disk size failed: {e}"),
                    }
                } else {
                    info!("signal {signal}: shutting down");
                    stop.shutdown();
                    break;
                }
            }
        })
        .map_err(|e| format!("starting the signal thread: {e}"))?;
    server.serve().map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}
