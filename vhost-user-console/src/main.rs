// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-user-console`: serves a virtio console (virtio 1.2 §5.3) to a VM over
//! vhost-user, with ptys, unix sockets, the daemon's own stdin/stdout and log files as
//! host sides.
//!
//! Follows the backend program conventions of QEMU's `docs/interop/vhost-user.rst`
//! (`--socket-path PATH` or `--fd N`, `--print-capabilities`); the ports are given with
//! `--port` (see `--help`, which ends with command lines to copy). The daemon serves one
//! frontend at a time per frontend socket and keeps its ptys and sockets across
//! frontends; `--count N` serves N VMs, each on its own socket (`%d` in the paths is the
//! VM index), with its own ports and its own server thread. SIGTERM/SIGINT
//! stop it, with the terminal restored when a port uses stdio.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use log::{error, info, warn};
use signal_hook::consts::{SIGINT, SIGTERM, SIGWINCH};
use signal_hook::iterator::Signals;
use vhost_user_console::cli::{vm_path, ConsoleArgs, VM_INDEX_PLACEHOLDER};
use vhost_user_console::{ConsoleDevice, HostPorts};
use virtio_core::vhost_user::{BackendArgs, Capabilities, Server, ServerConfig};

/// Shown at the end of `--help`: command lines to copy.
const AFTER_HELP: &str = "\
Examples (start the daemon first; it prints the pty path of each pty port):

  user-mode Linux, a console on a pty (then: screen /dev/pts/N):
    vhost-user-console --socket-path /tmp/vcon.sock --port pty &
    linux mem=256M ubd0=rootfs.img root=/dev/ubda virtio_uml.device=/tmp/vcon.sock:3 console=hvc0

  user-mode Linux, a console on a socket (then: socat -,raw,echo=0 UNIX-CONNECT:/tmp/con0):
    vhost-user-console --socket-path /tmp/vcon.sock --port socket=/tmp/con0,log=/tmp/con0.log &
    linux mem=256M ubd0=rootfs.img root=/dev/ubda virtio_uml.device=/tmp/vcon.sock:3 console=hvc0

  two user-mode Linux VMs on one daemon (VM i: /tmp/vcon-i.sock, its console on /tmp/con-i):
    vhost-user-console --count 2 --socket-path /tmp/vcon-%d.sock --port socket=/tmp/con-%d &
    linux ... virtio_uml.device=/tmp/vcon-0.sock:3 console=hvc0 &
    linux ... virtio_uml.device=/tmp/vcon-1.sock:3 console=hvc0

  QEMU 10.2+ (generic vhost-user-test-device; untested here; guest RAM must be shared; \
num_vqs is 2 for one port, 2 + 2 * PORTS with several):
    vhost-user-console --socket-path /tmp/vcon.sock --port stdio &
    qemu-system-x86_64 -m 1G -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem -chardev socket,id=c,path=/tmp/vcon.sock -device vhost-user-test-device-pci,chardev=c,virtio-id=3,num_vqs=2,config_size=12 -append console=hvc0 ...

Several ports (--port twice or more) offer VIRTIO_CONSOLE_F_MULTIPORT; a named port \
appears in a Linux guest as /dev/virtio-ports/NAME. A socket client resizes the console \
with ESC ] vhost-resize ; COLS ; ROWS BEL. SIGTERM stops the daemon; RUST_LOG=debug for \
more logging.";

/// The daemon's command line: the backend program conventions (vhost-user.rst) and the
/// console options.
#[derive(Parser, Debug)]
#[command(
    name = "vhost-user-console",
    version,
    about = "vhost-user console device backend: a VM's console on a pty, a unix socket or stdio",
    after_help = AFTER_HELP
)]
struct Options {
    #[command(flatten)]
    conventions: BackendArgs,
    #[command(flatten)]
    console: ConsoleArgs,
    /// Busy-poll each ring for this many microseconds before sleeping on its kick (a
    /// fixed window; 0: the adaptive window below).
    #[arg(long, default_value_t = 0)]
    poll_us: u64,
    /// Adaptive polling: poll a ring for a window learned from recent gaps between
    /// requests, at most this many microseconds; 0 disables polling (the default: a
    /// console is not worth a busy CPU).
    #[arg(long, default_value_t = 0)]
    adaptive_poll_max_us: u64,
    /// Serve this many VMs, each on its own frontend socket and with its own ports: every
    /// `%d` in --socket-path and in the ports' socket= and log= paths is replaced by the
    /// VM index (0 to N-1); with more than one, those paths must have a %d and no port
    /// may use stdio. A pty port gets one pty per VM.
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=256))]
    count: u32,
    /// Do not offer VIRTIO_F_RING_PACKED: the frontend gets the split ring. For testing
    /// the split layout with a frontend that prefers packed (user-mode Linux), and for
    /// frontends that mishandle packed rings.
    #[arg(long)]
    no_packed: bool,
}

fn run() -> Result<(), String> {
    // --print-capabilities works alone (vhost-user.rst: the frontend runs it to probe).
    let lossy = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned());
    if BackendArgs::parse_known(lossy).is_ok_and(|(a, _)| a.print_capabilities) {
        return Capabilities::new("console")
            .print()
            .map_err(|e| format!("printing capabilities: {e}"));
    }
    let options = Options::parse();
    let count = options.count;
    if count > 1 {
        let Some(path) = &options.conventions.socket_path else {
            return Err("--count needs --socket-path (with a %d), not --fd".into());
        };
        if options.conventions.fd.is_some() {
            return Err("--count needs --socket-path (with a %d), not --fd".into());
        }
        if !path.to_string_lossy().contains(VM_INDEX_PLACEHOLDER) {
            return Err(format!(
                "with --count {count} the socket path {} needs a %d (replaced by the VM index)",
                path.display()
            ));
        }
        options
            .console
            .check_vms(count)
            .map_err(|e| e.to_string())?;
    }
    let config = ServerConfig {
        poll_us: options.poll_us,
        adaptive_poll_max_us: options.adaptive_poll_max_us,
        thread_name: "vcon".into(),
        ..ServerConfig::default()
    };
    // Before any socket exists: a supervisor that sees the socket may signal at once,
    // and a SIGTERM before the handler would kill the daemon with the terminal raw.
    let mut signals =
        Signals::new([SIGTERM, SIGINT]).map_err(|e| format!("installing signal handlers: {e}"))?;
    let mut servers = Vec::new();
    let mut restore = None;
    for index in 0..count {
        let (console, conventions) = if count > 1 {
            let path = options
                .conventions
                .socket_path
                .as_deref()
                .map(|p| vm_path(p, index));
            let conventions = BackendArgs {
                socket_path: path,
                ..BackendArgs::default()
            };
            (options.console.for_vm(index), conventions)
        } else {
            (options.console.clone(), options.conventions.clone())
        };
        let vm = if count > 1 {
            format!("vm {index}: ")
        } else {
            String::new()
        };
        let ports = HostPorts::open(&console).map_err(|e| format!("{vm}{e}"))?;
        if let Some(r) = ports.stdio_restore_handle() {
            r.restore_on_panic();
            restore = Some(r);
        }
        // The stdio port's terminal is in raw mode now: end lines with CR LF.
        for (id, location) in ports.locations() {
            eprint!("vhost-user-console: {vm}port {id}: {location}\r\n");
            info!("{vm}port {id}: {location}");
        }
        let winch = ports.stdio_winch_flag();
        let device = Arc::new(
            ConsoleDevice::new(ports)
                .map_err(|e| format!("{vm}{e}"))?
                .with_packed_ring(!options.no_packed),
        );
        if let Some(path) = &conventions.socket_path {
            info!("{vm}frontend socket {}", path.display());
        }
        let mut config = config.clone();
        let server = match (count > 1, conventions.socket_path) {
            // Several VMs: sockets the daemon made, removed when it exits.
            (true, Some(path)) => {
                config.thread_name = format!("vcon{index}");
                Server::bind(&path, Arc::clone(&device), config)
            }
            (_, socket_path) => {
                let conventions = BackendArgs {
                    socket_path,
                    ..conventions
                };
                let socket = conventions.into_socket().map_err(|e| format!("{vm}{e}"))?;
                Server::new(socket, Arc::clone(&device), config)
            }
        }
        .map_err(|e| format!("{vm}{e}"))?;
        if let Err(e) = device.set_config_notifier(server.config_notifier()) {
            warn!("{vm}console size changes will not reach a single-port guest: {e}");
        }
        if let Some(flag) = winch {
            if let Err(e) = signal_hook::flag::register(SIGWINCH, flag) {
                warn!("SIGWINCH handler: {e}; terminal size changes go unnoticed");
            }
        }
        servers.push((vm, server));
    }
    let stops: Vec<_> = servers.iter().map(|(_, s)| s.shutdown_handle()).collect();
    let signal_restore = restore.clone();
    std::thread::Builder::new()
        .name("vcon-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                if let Some(r) = &signal_restore {
                    r.restore();
                }
                info!("signal {signal}: shutting down");
                for stop in &stops {
                    stop.shutdown();
                }
            }
        })
        .map_err(|e| format!("starting the signal thread: {e}"))?;
    let result = if servers.len() == 1 {
        let (_, mut server) = servers.remove(0);
        server.serve().map_err(|e| e.to_string())
    } else {
        serve_all(servers)
    };
    if let Some(r) = &restore {
        r.restore();
    }
    result
}

/// Serves every VM's socket on its own thread until all of them return (SIGTERM stops
/// them all); the first error is returned, every one is logged.
fn serve_all(servers: Vec<(String, Server<ConsoleDevice>)>) -> Result<(), String> {
    let mut threads = Vec::new();
    for (index, (vm, mut server)) in servers.into_iter().enumerate() {
        let name = vm.clone();
        let t = std::thread::Builder::new()
            .name(format!("vcon-server{index}"))
            .spawn(move || server.serve().map_err(|e| format!("{name}{e}")))
            .map_err(|e| format!("{vm}starting the server thread: {e}"))?;
        threads.push((vm, t));
    }
    let mut first = Ok(());
    for (vm, t) in threads {
        let r = t
            .join()
            .unwrap_or_else(|_| Err(format!("{vm}the server thread panicked")));
        if let Err(e) = &r {
            error!("{e}");
        }
        if first.is_ok() {
            first = r;
        }
    }
    first
}

fn main() -> ExitCode {
    // The thread name says which VM a line is about with --count (`vcon<i>-q0` workers,
    // `vcon-server<i>` connections).
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(|buf, record| {
            use std::io::Write;
            let thread = std::thread::current();
            writeln!(
                buf,
                "[{} {} {} {}] {}",
                buf.timestamp(),
                record.level(),
                record.target(),
                thread.name().unwrap_or("?"),
                record.args()
            )
        })
        .init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}
