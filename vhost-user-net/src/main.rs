// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vhost-user-net`: serves a virtio network device (virtio 1.2 §5.1) to a VM over
//! vhost-user, in front of a host TAP interface (QEMU `-netdev vhost-user`, DPDK
//! `net_virtio_user`).
//!
//! Follows the backend program conventions of QEMU's `docs/interop/vhost-user.rst`:
//! `--socket-path PATH` or `--fd N`, `--print-capabilities`; plus `--tap NAME` and the
//! device options (all listed by `--help`, which ends with QEMU and DPDK command lines).
//! The daemon serves one frontend at a time and, when it disconnects, accepts the next one
//! on the same socket. SIGTERM/SIGINT stop it.
//!
//! Switch mode (`--switch SOCKET`, two or more, no `--tap`): one server thread per socket,
//! each connection a port of one learning switch ([`vhost_user_net::switch_port`]); the
//! ports' queues run on `--switch-threads` shared worker threads (default 1, so frames
//! go from port to port on one core; 0: a worker thread per port); the per-port counters
//! are logged when the daemon stops.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use log::{error, info};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vhost_user_net::config::{validate_mtu, MacAddr, DEFAULT_MTU};
use vhost_user_net::features::MAX_QUEUE_PAIRS;
use vhost_user_net::switch::SwitchConfig;
use vhost_user_net::switch_port::{SwitchHub, SwitchPortDevice};
use vhost_user_net::tap::MAX_TAP_QUEUES;
use vhost_user_net::{NetDevice, NetOptions};
use virtio_core::vhost_user::{BackendArgs, Capabilities, Server, ServerConfig, WorkerThread};

/// Shown at the end of `--help`: command lines to copy.
const AFTER_HELP: &str = "\
Example: a QEMU guest on TAP vhut0 (vhost-user needs the guest RAM in shared memory):

  vhost-user-net --socket-path /tmp/vunet.sock --tap vhut0 --mac 52:54:00:12:34:56 &
  qemu-system-x86_64 -m 1G -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem -chardev socket,id=c0,path=/tmp/vunet.sock -netdev vhost-user,id=n0,chardev=c0 -device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56 ...

(then your usual -machine, -smp, -kernel or boot disk options). Add packed=on to -device for
the packed ring; for 2 queue pairs: --queue-pairs 2 here, queues=2 on -netdev and
mq=on,vectors=6 on -device. QEMU serves the control queue itself; give it the same mac=.

DPDK testpmd (it emulates the config space and control queue: give it mac=):

  dpdk-testpmd --no-huge --no-pci -m 512 --no-shconf --file-prefix=vunet --vdev net_virtio_user0,path=/tmp/vunet.sock,mac=52:54:00:12:34:56 -- -i

Switch mode (no TAP): two or more sockets, each one port of a learning switch:

  vhost-user-net --switch /tmp/sw0.sock --switch /tmp/sw1.sock &
  dpdk-testpmd ... --file-prefix=a --vdev net_virtio_user0,path=/tmp/sw0.sock,mac=02:00:00:00:00:01 -- -i
  dpdk-testpmd ... --file-prefix=b --vdev net_virtio_user0,path=/tmp/sw1.sock,mac=02:00:00:00:00:02 -- -i

No offloads are offered in switch mode; the per-port counters are logged at SIGTERM.

The TAP is attached to if it exists, created otherwise (CAP_NET_ADMIN); configure its
address and bring it up with ip(8). SIGTERM stops the daemon; RUST_LOG=debug for more logging.";

/// The daemon's command line.
#[derive(Parser, Debug)]
#[command(
    name = "vhost-user-net",
    version,
    about = "vhost-user network device backend: a virtio-net device in front of a host TAP, or the ports of a learning switch",
    after_help = AFTER_HELP
)]
struct Options {
    #[command(flatten)]
    conventions: BackendArgs,
    /// TAP interface to attach to (created if it does not exist).
    #[arg(
        long,
        value_name = "NAME",
        required_unless_present = "switch",
        conflicts_with = "switch"
    )]
    tap: Option<String>,
    /// Switch mode: a vhost-user socket to listen on as one port of a learning switch
    /// (give two or more; no TAP). Conflicts with --tap, --socket-path and --fd.
    #[arg(long, value_name = "SOCKET", group = "backend-socket")]
    switch: Vec<std::path::PathBuf>,
    /// The device's MAC address (config space; default: derived from the socket path or
    /// TAP name, locally administered).
    #[arg(long, value_parser = parse_mac)]
    mac: Option<MacAddr>,
    /// MTU to report to the guest (VIRTIO_NET_F_MTU; 68..=65535). With a TAP: not offered
    /// if unset. In switch mode always offered (default 1500): the switch forwards frames
    /// up to the MTU plus 22 bytes of link-layer headers and drops (and counts) longer ones.
    #[arg(long, value_parser = parse_mtu)]
    mtu: Option<u16>,
    /// Queue pairs offered (MQ above 1); the TAP gets as many queues.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_TAP_QUEUES.min(MAX_QUEUE_PAIRS))))]
    queue_pairs: u16,
    /// Largest queue size accepted (up to 32768).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u16).range(1..=32768))]
    queue_size: u16,
    /// Busy-poll each ring for this many microseconds before sleeping on its kick (a
    /// fixed window; 0: the adaptive window below). In switch mode each port also polls
    /// its frame queue as long after it ran empty.
    #[arg(long, default_value_t = 0)]
    poll_us: u64,
    /// Adaptive polling: poll for a window learned from recent gaps between requests, at
    /// most this many microseconds. 0 disables polling.
    #[arg(long, default_value_t = 50)]
    adaptive_poll_max_us: u64,
    /// Switch mode: threads that serve the ports' queues, port N on thread N modulo
    /// this; 0 gives each port a thread of its own. Ports on one thread forward to each
    /// other without a cross-core hand-off.
    #[arg(long, default_value_t = 1)]
    switch_threads: usize,
}

fn parse_mac(s: &str) -> Result<MacAddr, String> {
    MacAddr::parse_device_mac(s).map_err(|e| e.to_string())
}

fn parse_mtu(s: &str) -> Result<u16, String> {
    let v: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of bytes"))?;
    validate_mtu(v).map_err(|e| e.to_string())
}

fn run() -> Result<(), String> {
    // --print-capabilities works alone, without --tap (vhost-user.rst: the frontend runs
    // it to probe the back-end).
    let lossy = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned());
    if BackendArgs::parse_known(lossy).is_ok_and(|(a, _)| a.print_capabilities) {
        return Capabilities::new("net")
            .print()
            .map_err(|e| format!("printing capabilities: {e}"));
    }
    let options = Options::parse();
    let Some(tap) = options.tap.clone() else {
        return run_switch(&options);
    };
    let seed = options
        .conventions
        .socket_path
        .as_ref()
        .map_or_else(|| tap.clone(), |p| p.display().to_string());
    let mac = options
        .mac
        .unwrap_or_else(|| MacAddr::from_seed(seed.as_bytes()));
    let device = Arc::new(
        NetDevice::open(
            &tap,
            &NetOptions {
                mac,
                mtu: options.mtu,
                queue_pairs: options.queue_pairs,
                max_queue_size: options.queue_size,
            },
        )
        .map_err(|e| e.to_string())?,
    );
    info!(
        "serving TAP {} as MAC {mac}, {} queue pair(s)",
        device.tap_name(),
        options.queue_pairs
    );
    // Before any socket exists: a supervisor that sees the socket may signal at once.
    let mut signals =
        Signals::new([SIGTERM, SIGINT]).map_err(|e| format!("installing signal handlers: {e}"))?;
    let socket = options
        .conventions
        .into_socket()
        .map_err(|e| e.to_string())?;
    let config = ServerConfig {
        poll_us: options.poll_us,
        adaptive_poll_max_us: options.adaptive_poll_max_us,
        thread_name: "vunet".into(),
        ..ServerConfig::default()
    };
    let mut server = Server::new(socket, device, config).map_err(|e| e.to_string())?;
    let stop = server.shutdown_handle();
    std::thread::Builder::new()
        .name("vunet-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                info!("signal {signal}: shutting down");
                stop.shutdown();
            }
        })
        .map_err(|e| format!("starting the signal thread: {e}"))?;
    server.serve().map_err(|e| e.to_string())
}

/// Switch mode: one server (and thread) per `--switch` socket, all ports of one switch.
fn run_switch(options: &Options) -> Result<(), String> {
    let hub = SwitchHub::new(
        options.switch.len(),
        SwitchConfig::default(),
        options.mtu.unwrap_or(DEFAULT_MTU),
    )
    .map_err(|e| e.to_string())?;
    // Before any socket exists: a supervisor that sees the socket may signal at once.
    let mut signals =
        Signals::new([SIGTERM, SIGINT]).map_err(|e| format!("installing signal handlers: {e}"))?;
    let workers = (0..options.switch_threads.min(options.switch.len()))
        .map(|i| WorkerThread::new(&format!("vusw-worker{i}")).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, String>>()?;
    let mut servers = Vec::with_capacity(options.switch.len());
    for (port, path) in options.switch.iter().enumerate() {
        let seed = path.display().to_string();
        let mac = MacAddr::from_seed(seed.as_bytes());
        let mut device = SwitchPortDevice::new(Arc::clone(&hub), port, mac, options.queue_size)
            .map_err(|e| e.to_string())?
            .with_rx_poll(std::time::Duration::from_micros(options.poll_us));
        if let Some(w) = workers.get(port % workers.len().max(1)) {
            device = device.with_worker_thread(Arc::clone(w));
        }
        let device = Arc::new(device);
        let config = ServerConfig {
            poll_us: options.poll_us,
            adaptive_poll_max_us: options.adaptive_poll_max_us,
            thread_name: format!("vusw{port}"),
            ..ServerConfig::default()
        };
        let server = Server::bind(path, device, config)
            .map_err(|e| format!("switch port {port}: binding {}: {e}", path.display()))?;
        info!("switch port {port}: listening on {}", path.display());
        servers.push(server);
    }
    let stops: Vec<_> = servers.iter().map(Server::shutdown_handle).collect();
    std::thread::Builder::new()
        .name("vunet-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                info!("signal {signal}: shutting down");
                for stop in &stops {
                    stop.shutdown();
                }
            }
        })
        .map_err(|e| format!("starting the signal thread: {e}"))?;
    let mut threads = Vec::with_capacity(servers.len());
    for (port, mut server) in servers.into_iter().enumerate() {
        let t = std::thread::Builder::new()
            .name(format!("vusw{port}-conn"))
            .spawn(move || server.serve())
            .map_err(|e| format!("starting the thread of switch port {port}: {e}"))?;
        threads.push(t);
    }
    let mut result = Ok(());
    for (port, t) in threads.into_iter().enumerate() {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!("switch port {port}: {e}");
                result = Err(format!("switch port {port} failed: {e}"));
            }
            Err(_) => {
                error!("switch port {port}: its thread panicked");
                result = Err(format!("switch port {port}: its thread panicked"));
            }
        }
    }
    for port in 0..hub.port_count() {
        if let Some(c) = hub.counters(port) {
            info!("switch port {port} counters: {}", c.summary());
        }
    }
    result
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
