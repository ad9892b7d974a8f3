// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Command-line options of the console device, to be flattened into the daemon's parser
//! (`#[command(flatten)] console: ConsoleArgs`), as `src/main.rs` does.
//!
//! ```text
//! --port [name=NAME,](pty|socket=PATH|stdio)[,log=PATH][,console]   (repeatable)
//! ```
//!
//! Ports are numbered in the order given, from 0. Port 0 is the console port (an hvc
//! console in a Linux guest) unless some `--port` says `console`. Without any `--port`
//! there is one console port on a pty. More than one port makes the device offer
//! VIRTIO_CONSOLE_F_MULTIPORT (§5.3.3).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use crate::config::WinSize;
use crate::control::{PortConfig, MAX_PORT_NAME_LEN};

/// Most ports accepted (virtqueue indexes of port n are 2(n+1) and 2(n+1)+1, §5.3.2).
pub const MAX_PORTS: usize = 1024;

/// The interactive host side of a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostKind {
    /// A new pty; its slave path is printed at start.
    Pty,
    /// A unix socket server at the path.
    Socket(PathBuf),
    /// The daemon's stdin/stdout.
    Stdio,
}

/// One `--port` option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    /// `name=NAME`: the name announced to the guest (PORT_NAME, §5.3.6.2).
    pub name: Option<String>,
    /// The interactive host side.
    pub host: HostKind,
    /// `log=PATH`: a log file teed with the host side.
    pub log: Option<PathBuf>,
    /// `console`: announce the port as a console port (CONSOLE_PORT).
    pub console: bool,
}

/// Errors of parsing one `--port` value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortSpecError {
    /// An item that is not one of the known keys.
    #[error(
        "unknown item '{0}' (expected name=NAME, pty, socket=PATH, stdio, log=PATH or console)"
    )]
    UnknownItem(String),
    /// A key given twice.
    #[error("'{0}' is given twice")]
    Duplicate(&'static str),
    /// A key without a value.
    #[error("'{0}=' needs a value")]
    EmptyValue(&'static str),
    /// More than one of pty, socket=, stdio.
    #[error("a port has one host side: give only one of pty, socket=PATH, stdio")]
    TwoHosts,
    /// None of pty, socket=, stdio.
    #[error("a port needs a host side: pty, socket=PATH or stdio")]
    NoHost,
    /// A name the guest cannot use.
    #[error(
        "port name '{0}' is invalid: use 1 to {MAX_PORT_NAME_LEN} bytes without '/', spaces or control characters"
    )]
    BadName(String),
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_PORT_NAME_LEN
        && !name
            .chars()
            .any(|c| c == '/' || c.is_whitespace() || c.is_control())
}

impl FromStr for PortSpec {
    type Err = PortSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut name = None;
        let mut host = None;
        let mut log = None;
        let mut console = false;
        let mut set_host = |h: HostKind| {
            if host.replace(h).is_some() {
                Err(PortSpecError::TwoHosts)
            } else {
                Ok(())
            }
        };
        let value = |key: &'static str, v: &str| {
            if v.is_empty() {
                Err(PortSpecError::EmptyValue(key))
            } else {
                Ok(v.to_owned())
            }
        };
        for item in s.split(',') {
            let (key, v) = match item.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (item, None),
            };
            match (key, v) {
                ("name", Some(v)) => {
                    let v = value("name", v)?;
                    if !valid_name(&v) {
                        return Err(PortSpecError::BadName(v));
                    }
                    if name.replace(v).is_some() {
                        return Err(PortSpecError::Duplicate("name"));
                    }
                }
                ("log", Some(v)) => {
                    if log.replace(PathBuf::from(value("log", v)?)).is_some() {
                        return Err(PortSpecError::Duplicate("log"));
                    }
                }
                ("socket", Some(v)) => {
                    set_host(HostKind::Socket(PathBuf::from(value("socket", v)?)))?
                }
                ("pty", None) => set_host(HostKind::Pty)?,
                ("stdio", None) => set_host(HostKind::Stdio)?,
                ("console", None) => {
                    if console {
                        return Err(PortSpecError::Duplicate("console"));
                    }
                    console = true;
                }
                _ => return Err(PortSpecError::UnknownItem(item.to_owned())),
            }
        }
        Ok(Self {
            name,
            host: host.ok_or(PortSpecError::NoHost)?,
            log,
            console,
        })
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(name) = &self.name {
            write!(f, "name={name},")?;
        }
        match &self.host {
            HostKind::Pty => write!(f, "pty")?,
            HostKind::Socket(p) => write!(f, "socket={}", p.display())?,
            HostKind::Stdio => write!(f, "stdio")?,
        }
        if let Some(log) = &self.log {
            write!(f, ",log={}", log.display())?;
        }
        if self.console {
            write!(f, ",console")?;
        }
        Ok(())
    }
}

/// A byte count with an optional binary suffix: `65536`, `64K`, `1M`, `2G`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 20),
        Some(b'g' | b'G') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size (a number with an optional K, M or G)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

fn parse_replay_bytes(s: &str) -> Result<usize, String> {
    let n = parse_size(s)?;
    usize::try_from(n)
        .ok()
        .filter(|&n| n <= 1 << 30)
        .ok_or_else(|| format!("replay buffer of {n} bytes is larger than 1G"))
}

/// Errors of the options taken together.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    /// Too many `--port`.
    #[error("{0} ports given; at most {MAX_PORTS} are supported")]
    TooManyPorts(usize),
    /// More than one `stdio` port.
    #[error("ports {0} and {1} both use stdio; only one port can")]
    TwoStdio(u32, u32),
    /// Two ports with the same name.
    #[error("ports {0} and {1} are both named '{2}'")]
    DuplicateName(u32, u32, String),
    /// Two ports on the same socket path.
    #[error("ports {0} and {1} both listen on {2}")]
    DuplicateSocket(u32, u32, PathBuf),
    /// Two ports logging to the same file.
    #[error("ports {0} and {1} both log to {2}")]
    DuplicateLog(u32, u32, PathBuf),
    /// Several VMs (`--count`) and a stdio port: there is one stdin.
    #[error("port {0} uses stdio, which several VMs (--count) cannot share")]
    StdioWithVms(u32),
    /// Several VMs (`--count`) and a path without `%d`: the VMs would share it.
    #[error("with several VMs (--count) the {0} path {1} needs a %d (replaced by the VM index)")]
    SharedPath(&'static str, PathBuf),
}

/// The placeholder replaced by the VM index in per-VM paths (`--count`).
pub const VM_INDEX_PLACEHOLDER: &str = "%d";

/// `path` with every `%d` replaced by `index` (the path of VM `index`, `--count`).
pub fn vm_path(path: &std::path::Path, index: u32) -> PathBuf {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let bytes = path.as_os_str().as_bytes();
    let needle = VM_INDEX_PLACEHOLDER.as_bytes();
    let digits = index.to_string();
    let mut out = Vec::with_capacity(bytes.len() + digits.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(needle) {
            out.extend_from_slice(digits.as_bytes());
            i += needle.len();
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

fn has_placeholder(path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str()
        .as_bytes()
        .windows(VM_INDEX_PLACEHOLDER.len())
        .any(|w| w == VM_INDEX_PLACEHOLDER.as_bytes())
}

/// Console device options.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct ConsoleArgs {
    /// The ports, one `--port SPEC` each (the syntax is in the module documentation).
    #[arg(
        long = "port",
        value_name = "SPEC",
        help = "A port: [name=NAME,](pty|socket=PATH|stdio)[,log=PATH][,console]. Repeat for \
                more ports, numbered from 0 in order. Port 0 is the console port unless a \
                port says console. Default: one console port on a pty"
    )]
    pub ports: Vec<PortSpec>,
    /// Size limit of each log file before it rotates (0: no limit); K, M, G suffixes.
    #[arg(long, default_value = "1M", value_parser = parse_size, value_name = "BYTES")]
    pub log_size: u64,
    /// Log files kept per port, the current one included (NAME, NAME.1, ...).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub log_files: u32,
    /// Guest output kept per port while no client is attached, replayed on attach;
    /// the oldest bytes are dropped beyond it. K, M, G suffixes; at most 1G.
    #[arg(long, default_value = "64K", value_parser = parse_replay_bytes, value_name = "BYTES")]
    pub replay_bytes: usize,
    /// Initial console width (with --rows); otherwise the host side's size, if any.
    #[arg(long, requires = "rows", value_parser = clap::value_parser!(u16).range(1..))]
    pub cols: Option<u16>,
    /// Initial console height (with --cols).
    #[arg(long, requires = "cols", value_parser = clap::value_parser!(u16).range(1..))]
    pub rows: Option<u16>,
}

/// A port after defaults are applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedPort {
    /// Port number.
    pub id: u32,
    /// What the user asked for (`console` resolved).
    pub spec: PortSpec,
}

impl ConsoleArgs {
    /// The initial size from `--cols`/`--rows`.
    pub fn initial_size(&self) -> Option<WinSize> {
        match (self.cols, self.rows) {
            (Some(cols), Some(rows)) => Some(WinSize { cols, rows }),
            _ => None,
        }
    }

    /// The ports, numbered, with the default port and console applied, checked for
    /// conflicts.
    pub fn resolve_ports(&self) -> Result<Vec<ResolvedPort>, CliError> {
        let mut specs = if self.ports.is_empty() {
            vec![PortSpec {
                name: None,
                host: HostKind::Pty,
                log: None,
                console: true,
            }]
        } else {
            self.ports.clone()
        };
        if specs.len() > MAX_PORTS {
            return Err(CliError::TooManyPorts(specs.len()));
        }
        if !specs.iter().any(|p| p.console) {
            specs[0].console = true;
        }
        let ports: Vec<ResolvedPort> = (0u32..)
            .zip(specs)
            .map(|(id, spec)| ResolvedPort { id, spec })
            .collect();
        for (i, a) in ports.iter().enumerate() {
            for b in &ports[i + 1..] {
                if a.spec.host == HostKind::Stdio && b.spec.host == HostKind::Stdio {
                    return Err(CliError::TwoStdio(a.id, b.id));
                }
                if let (Some(x), Some(y)) = (&a.spec.name, &b.spec.name) {
                    if x == y {
                        return Err(CliError::DuplicateName(a.id, b.id, x.clone()));
                    }
                }
                if let (HostKind::Socket(x), HostKind::Socket(y)) = (&a.spec.host, &b.spec.host) {
                    if x == y {
                        return Err(CliError::DuplicateSocket(a.id, b.id, x.clone()));
                    }
                }
                if let (Some(x), Some(y)) = (&a.spec.log, &b.spec.log) {
                    if x == y {
                        return Err(CliError::DuplicateLog(a.id, b.id, x.clone()));
                    }
                }
            }
        }
        Ok(ports)
    }

    /// Checks that the ports can be given to `count` VMs (`--count`): with more than one,
    /// no stdio port and a `%d` in every socket and log path.
    pub fn check_vms(&self, count: u32) -> Result<(), CliError> {
        if count <= 1 {
            return Ok(());
        }
        for p in self.resolve_ports()? {
            if p.spec.host == HostKind::Stdio {
                return Err(CliError::StdioWithVms(p.id));
            }
            if let HostKind::Socket(path) = &p.spec.host {
                if !has_placeholder(path) {
                    return Err(CliError::SharedPath("socket", path.clone()));
                }
            }
            if let Some(path) = &p.spec.log {
                if !has_placeholder(path) {
                    return Err(CliError::SharedPath("log", path.clone()));
                }
            }
        }
        Ok(())
    }

    /// The options of VM `index` of several (`--count`): `%d` in every socket and log
    /// path replaced by `index` ([`vm_path`]).
    pub fn for_vm(&self, index: u32) -> ConsoleArgs {
        let mut args = self.clone();
        for p in &mut args.ports {
            if let HostKind::Socket(path) = &p.host {
                p.host = HostKind::Socket(vm_path(path, index));
            }
            if let Some(log) = &p.log {
                p.log = Some(vm_path(log, index));
            }
        }
        args
    }

    /// The control state machine's view of the ports ([`crate::ControlState::new`]).
    pub fn port_configs(&self) -> Result<Vec<PortConfig>, CliError> {
        Ok(self
            .resolve_ports()?
            .into_iter()
            .map(|p| PortConfig {
                id: p.id,
                name: p.spec.name.map(|n| Arc::from(n.into_bytes())),
                console: p.spec.console,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::path::Path;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        console: ConsoleArgs,
    }

    fn parse(args: &[&str]) -> Result<ConsoleArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("vhost-user-console").chain(args.iter().copied()))
            .map(|c| c.console)
    }

    #[test]
    fn port_spec_parses_every_item() {
        let p: PortSpec = "name=org.qemu.guest_agent.0,socket=/run/ga.sock,log=/var/log/ga,console"
            .parse()
            .unwrap();
        assert_eq!(p.name.as_deref(), Some("org.qemu.guest_agent.0"));
        assert_eq!(p.host, HostKind::Socket("/run/ga.sock".into()));
        assert_eq!(p.log, Some("/var/log/ga".into()));
        assert!(p.console);
        assert_eq!(p.to_string().parse::<PortSpec>().unwrap(), p);
        assert_eq!("stdio".parse::<PortSpec>().unwrap().host, HostKind::Stdio);
        assert_eq!("pty".parse::<PortSpec>().unwrap().host, HostKind::Pty);
    }

    #[test]
    fn port_spec_errors_say_what_is_wrong() {
        let err = |s: &str| s.parse::<PortSpec>().unwrap_err();
        assert_eq!(err("name=x"), PortSpecError::NoHost);
        assert_eq!(err("pty,stdio"), PortSpecError::TwoHosts);
        assert_eq!(err("pty,tcp=1"), PortSpecError::UnknownItem("tcp=1".into()));
        assert_eq!(err("pty,"), PortSpecError::UnknownItem(String::new()));
        assert_eq!(err("socket="), PortSpecError::EmptyValue("socket"));
        assert_eq!(err("pty,log=a,log=b"), PortSpecError::Duplicate("log"));
        assert_eq!(err("pty,name=a/b"), PortSpecError::BadName("a/b".into()));
        assert_eq!(err("pty=1"), PortSpecError::UnknownItem("pty=1".into()));
        assert!(err("pty,name=a b").to_string().contains("without '/'"));
    }

    #[test]
    fn defaults_are_one_console_pty() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.log_size, 1 << 20);
        assert_eq!(a.log_files, 5);
        assert_eq!(a.replay_bytes, 64 << 10);
        assert_eq!(a.initial_size(), None);
        let ports = a.resolve_ports().unwrap();
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].spec.host, HostKind::Pty);
        assert!(ports[0].spec.console);
    }

    #[test]
    fn port_zero_is_console_unless_another_is() {
        let a = parse(&["--port", "pty", "--port", "name=b,stdio"]).unwrap();
        let p = a.port_configs().unwrap();
        assert!(p[0].console && !p[1].console);
        let a = parse(&["--port", "pty", "--port", "name=b,stdio,console"]).unwrap();
        let p = a.port_configs().unwrap();
        assert!(!p[0].console && p[1].console);
        assert_eq!(p[1].name.as_deref(), Some(&b"b"[..]));
    }

    #[test]
    fn bad_port_value_is_a_usage_error_naming_it() {
        let e = parse(&["--port", "tcp=1"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(e.to_string().contains("unknown item 'tcp=1'"), "{e}");
    }

    #[test]
    fn conflicting_ports_are_refused() {
        let r = |args: &[&str]| parse(args).unwrap().resolve_ports().unwrap_err();
        assert_eq!(
            r(&["--port", "stdio", "--port", "stdio"]),
            CliError::TwoStdio(0, 1)
        );
        assert_eq!(
            r(&["--port", "name=a,pty", "--port", "name=a,pty"]),
            CliError::DuplicateName(0, 1, "a".into())
        );
        assert_eq!(
            r(&[
                "--port",
                "socket=/s",
                "--port",
                "pty",
                "--port",
                "socket=/s"
            ]),
            CliError::DuplicateSocket(0, 2, "/s".into())
        );
        assert_eq!(
            r(&["--port", "pty,log=/l", "--port", "pty,log=/l"]),
            CliError::DuplicateLog(0, 1, "/l".into())
        );
    }

    #[test]
    fn sizes_take_suffixes() {
        let a = parse(&[
            "--log-size",
            "10K",
            "--replay-bytes",
            "2m",
            "--log-files",
            "1",
        ])
        .unwrap();
        assert_eq!(a.log_size, 10240);
        assert_eq!(a.replay_bytes, 2 << 20);
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("1T").is_err());
        assert!(parse_size("99999999999G").is_err());
        assert!(parse(&["--replay-bytes", "2G"]).is_err());
        assert!(parse(&["--log-files", "0"]).is_err());
    }

    #[test]
    fn help_shows_the_port_syntax() {
        use clap::CommandFactory;
        let help = Cli::command().render_help().to_string();
        assert!(
            help.contains("[name=NAME,](pty|socket=PATH|stdio)[,log=PATH][,console]"),
            "{help}"
        );
    }

    #[test]
    fn per_vm_paths_replace_the_placeholder() {
        assert_eq!(
            vm_path(Path::new("/t/c%d.sock"), 3),
            Path::new("/t/c3.sock")
        );
        assert_eq!(vm_path(Path::new("/t/%d/%d"), 12), Path::new("/t/12/12"));
        assert_eq!(vm_path(Path::new("/t/plain"), 1), Path::new("/t/plain"));
        let a = parse(&["--port", "socket=/t/c%d,log=/t/l%d", "--port", "pty"]).unwrap();
        assert_eq!(a.check_vms(2), Ok(()));
        let b = a.for_vm(1);
        assert_eq!(b.ports[0].host, HostKind::Socket("/t/c1".into()));
        assert_eq!(b.ports[0].log, Some("/t/l1".into()));
        assert_eq!(b.ports[1].host, HostKind::Pty);
        let a = parse(&["--port", "socket=/t/c"]).unwrap();
        assert_eq!(a.check_vms(1), Ok(()));
        assert_eq!(
            a.check_vms(2),
            Err(CliError::SharedPath("socket", "/t/c".into()))
        );
        let a = parse(&["--port", "pty,log=/t/l"]).unwrap();
        assert_eq!(
            a.check_vms(2),
            Err(CliError::SharedPath("log", "/t/l".into()))
        );
        let a = parse(&["--port", "stdio"]).unwrap();
        assert_eq!(a.check_vms(2), Err(CliError::StdioWithVms(0)));
    }

    #[test]
    fn cols_and_rows_go_together() {
        let a = parse(&["--cols", "132", "--rows", "43"]).unwrap();
        assert_eq!(
            a.initial_size(),
            Some(WinSize {
                cols: 132,
                rows: 43
            })
        );
        let e = parse(&["--cols", "80"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        assert!(parse(&["--cols", "0", "--rows", "1"]).is_err());
        assert!(parse(&["--cols", "70000", "--rows", "1"]).is_err());
    }
}
