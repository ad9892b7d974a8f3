// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Backend program conventions (vhost-user.rst, "Backend program conventions"): the
//! options every back-end program accepts, and the `--print-capabilities` output.
//!
//! Daemons own their command-line parsers: they fill a [`BackendArgs`] from their own
//! options (or call [`BackendArgs::parse_known`]) and turn it into the server's socket.
//!
//! ```no_run
//! use virtio_core::vhost_user::{BackendArgs, Capabilities};
//!
//! let (args, rest) = BackendArgs::parse_known(std::env::args().skip(1)).unwrap();
//! if args.print_capabilities {
//!     Capabilities::new("block").feature("read-only").print().unwrap();
//!     return;
//! }
//! let socket = args.into_socket().unwrap();
//! # let _ = (socket, rest);
//! ```

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use super::server::{bind_socket, FrontendSocket};

/// Errors of the conventional options.
#[derive(Debug, thiserror::Error)]
pub enum ConventionError {
    /// Both `--socket-path` and `--fd` were given.
    #[error("--socket-path and --fd are mutually exclusive")]
    SocketAndFd,
    /// Neither was given.
    #[error("one of --socket-path=PATH or --fd=FDNUM is required")]
    NoSocket,
    /// An option without its value, or a value that does not parse.
    #[error("option {option}: {why}")]
    BadOption {
        /// The option.
        option: String,
        /// What is wrong.
        why: String,
    },
    /// The `--fd` descriptor is not a usable unix stream socket.
    #[error("--fd={fd}: {why}")]
    BadFd {
        /// The descriptor number.
        fd: RawFd,
        /// What is wrong.
        why: String,
    },
    /// `--socket-path` could not be bound.
    #[error(transparent)]
    Bind(#[from] super::Error),
}

/// The conventional options of a vhost-user back-end program.
///
/// With the `clap` feature this is also a [`clap::Args`], to flatten into a daemon's
/// parser (`#[command(flatten)] conventions: BackendArgs`): the options then show in
/// `--help`, and clap requires exactly one of `--socket-path`, `--fd` and
/// `--print-capabilities`. A daemon whose other options are required should look for
/// `--print-capabilities` first with [`BackendArgs::parse_known`], so that it works
/// alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[cfg_attr(
    feature = "clap",
    group(id = "backend-socket", required = true, multiple = false)
)]
pub struct BackendArgs {
    /// `--socket-path=PATH`: the unix socket to listen on.
    #[cfg_attr(
        feature = "clap",
        arg(
            long,
            value_name = "PATH",
            help = "Listen for the frontend (QEMU -chardev socket,path=PATH) on this unix socket"
        )
    )]
    pub socket_path: Option<PathBuf>,
    /// `--fd=FDNUM`: an inherited socket (listening, or already connected).
    #[cfg_attr(
        feature = "clap",
        arg(
            long,
            value_name = "FDNUM",
            help = "Use this inherited unix socket (listening, or connected to the frontend) instead of --socket-path"
        )
    )]
    pub fd: Option<RawFd>,
    /// `--print-capabilities`: print the capabilities JSON and exit.
    #[cfg_attr(
        feature = "clap",
        arg(
            long,
            help = "Print the back-end capabilities JSON (vhost-user.rst) and exit"
        )
    )]
    pub print_capabilities: bool,
}

impl BackendArgs {
    /// Takes the conventional options out of `args` (`--socket-path=PATH` or
    /// `--socket-path PATH`, `--fd=N` or `--fd N`, `--print-capabilities`) and returns the
    /// other arguments in order, for the daemon's own parser.
    pub fn parse_known<I: IntoIterator<Item = String>>(
        args: I,
    ) -> Result<(Self, Vec<String>), ConventionError> {
        let mut out = BackendArgs::default();
        let mut rest = Vec::new();
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let (opt, inline) = match arg.split_once('=') {
                Some((o, v)) if o.starts_with("--") => (o.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            let mut value = |opt: &str| {
                inline
                    .clone()
                    .or_else(|| it.next())
                    .ok_or(ConventionError::BadOption {
                        option: opt.to_string(),
                        why: "missing value".into(),
                    })
            };
            match opt.as_str() {
                "--socket-path" => out.socket_path = Some(PathBuf::from(value(&opt)?)),
                "--fd" => {
                    let v = value(&opt)?;
                    out.fd = Some(v.parse().map_err(|_| ConventionError::BadOption {
                        option: opt.clone(),
                        why: format!("{v:?} is not a file descriptor number"),
                    })?);
                }
                "--print-capabilities" if inline.is_none() => out.print_capabilities = true,
                _ => rest.push(arg),
            }
        }
        Ok((out, rest))
    }

    /// Checks that exactly one of `--socket-path` and `--fd` was given (not needed with
    /// `--print-capabilities`).
    pub fn validate(&self) -> Result<(), ConventionError> {
        match (&self.socket_path, self.fd) {
            (Some(_), Some(_)) => Err(ConventionError::SocketAndFd),
            (None, None) => Err(ConventionError::NoSocket),
            _ => Ok(()),
        }
    }

    /// Opens the frontend socket: binds `--socket-path` (replacing a stale socket file),
    /// or takes ownership of the `--fd` descriptor after checking it is a unix stream
    /// socket. A listening `--fd` socket serves frontend after frontend; a connected one
    /// serves that frontend only.
    pub fn into_socket(self) -> Result<FrontendSocket, ConventionError> {
        self.validate()?;
        if let Some(path) = self.socket_path {
            return Ok(FrontendSocket::Listener(bind_socket(&path)?));
        }
        let fd = self.fd.ok_or(ConventionError::NoSocket)?;
        socket_from_fd(fd)
    }
}

fn sockopt(fd: RawFd, opt: libc::c_int) -> std::io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: `v` and `len` are valid out-pointers of the sizes passed.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            std::ptr::addr_of_mut!(v).cast(),
            &mut len,
        )
    };
    if r == 0 {
        Ok(v)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn socket_from_fd(fd: RawFd) -> Result<FrontendSocket, ConventionError> {
    let bad = |why: String| ConventionError::BadFd { fd, why };
    if fd <= 2 {
        return Err(bad(
            "descriptors 0, 1 and 2 are stdin, stdout and stderr".into()
        ));
    }
    // SAFETY: F_GETFD only queries the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(bad(format!(
            "not an open descriptor: {}",
            std::io::Error::last_os_error()
        )));
    }
    let domain = sockopt(fd, libc::SO_DOMAIN).map_err(|e| bad(format!("not a socket: {e}")))?;
    let ty = sockopt(fd, libc::SO_TYPE).map_err(|e| bad(format!("not a socket: {e}")))?;
    if domain != libc::AF_UNIX || ty != libc::SOCK_STREAM {
        return Err(bad("not a unix stream socket".into()));
    }
    let listening = sockopt(fd, libc::SO_ACCEPTCONN).map_err(|e| bad(e.to_string()))? != 0;
    // Do not leak the descriptor into programs this daemon might start.
    // SAFETY: F_SETFD on an open descriptor (checked above).
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the program conventions hand this descriptor to the back-end; it is open
    // (checked above) and this call consumes `BackendArgs`, so it is taken over once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    debug_assert_eq!(owned.as_raw_fd(), fd);
    Ok(if listening {
        FrontendSocket::Listener(UnixListener::from(owned))
    } else {
        FrontendSocket::Connected(UnixStream::from(owned))
    })
}

/// The `--print-capabilities` output (schema `VHostUserBackendCapabilities` of QEMU's
/// vhost-user.json): `{"type": "block"}`, with `"features"` when there are any.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Back-end type: "block", "net", "console", ...
    pub device_type: String,
    /// Optional features, e.g. "read-only" and "blk-file" for block.
    pub features: Vec<String>,
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl Capabilities {
    /// Capabilities of a back-end of `device_type`.
    pub fn new(device_type: impl Into<String>) -> Self {
        Capabilities {
            device_type: device_type.into(),
            features: Vec::new(),
        }
    }

    /// Adds a feature.
    pub fn feature(mut self, feature: impl Into<String>) -> Self {
        self.features.push(feature.into());
        self
    }

    /// The JSON document.
    pub fn to_json(&self) -> String {
        let mut s = format!("{{\n  \"type\": {}", json_string(&self.device_type));
        if !self.features.is_empty() {
            s.push_str(",\n  \"features\": [\n");
            let items: Vec<String> = self
                .features
                .iter()
                .map(|f| format!("    {}", json_string(f)))
                .collect();
            s.push_str(&items.join(",\n"));
            s.push_str("\n  ]");
        }
        s.push_str("\n}\n");
        s
    }

    /// Prints the JSON document to stdout.
    pub fn print(&self) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        out.write_all(self.to_json().as_bytes())?;
        out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_conventional_options_and_keeps_the_rest() {
        let (a, rest) = BackendArgs::parse_known(args(&[
            "--socket-path=/tmp/x.sock",
            "--blk-file",
            "disk.img",
            "--read-only",
        ]))
        .unwrap();
        assert_eq!(a.socket_path, Some(PathBuf::from("/tmp/x.sock")));
        assert_eq!(a.fd, None);
        assert!(!a.print_capabilities);
        assert_eq!(rest, args(&["--blk-file", "disk.img", "--read-only"]));
        a.validate().unwrap();

        let (a, rest) =
            BackendArgs::parse_known(args(&["--fd", "7", "--print-capabilities"])).unwrap();
        assert_eq!(a.fd, Some(7));
        assert!(a.print_capabilities);
        assert!(rest.is_empty());

        let (a, _) = BackendArgs::parse_known(args(&["--fd=3", "--socket-path", "p"])).unwrap();
        assert!(matches!(a.validate(), Err(ConventionError::SocketAndFd)));
        assert!(matches!(
            BackendArgs::default().validate(),
            Err(ConventionError::NoSocket)
        ));
        assert!(BackendArgs::parse_known(args(&["--fd=x"])).is_err());
        assert!(BackendArgs::parse_known(args(&["--socket-path"])).is_err());
    }

    #[cfg(feature = "clap")]
    mod clap_args {
        use super::*;
        use clap::Parser;

        #[derive(Parser, Debug)]
        struct Cli {
            #[command(flatten)]
            conventions: BackendArgs,
            #[arg(long)]
            other: Option<String>,
        }

        fn parse(v: &[&str]) -> Result<BackendArgs, clap::Error> {
            Cli::try_parse_from(std::iter::once("x").chain(v.iter().copied()))
                .map(|c| c.conventions)
        }

        #[test]
        fn accepts_both_socket_path_forms_and_fd() {
            let p = Some(PathBuf::from("/tmp/x.sock"));
            assert_eq!(
                parse(&["--socket-path=/tmp/x.sock"]).unwrap().socket_path,
                p
            );
            assert_eq!(
                parse(&["--socket-path", "/tmp/x.sock"])
                    .unwrap()
                    .socket_path,
                p
            );
            assert_eq!(parse(&["--fd=7"]).unwrap().fd, Some(7));
            assert_eq!(parse(&["--fd", "7"]).unwrap().fd, Some(7));
        }

        #[test]
        fn print_capabilities_needs_no_socket() {
            let a = parse(&["--print-capabilities"]).unwrap();
            assert!(a.print_capabilities);
            assert_eq!((a.socket_path, a.fd), (None, None));
        }

        #[test]
        fn exactly_one_of_socket_path_and_fd() {
            let e = parse(&["--other", "v"]).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
            let msg = e.to_string();
            assert!(
                msg.contains("--socket-path") && msg.contains("--fd"),
                "{msg}"
            );
            let e = parse(&["--socket-path", "p", "--fd", "3"]).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict);
            assert!(parse(&["--fd=x"]).is_err());
        }

        #[test]
        fn options_show_in_help() {
            let help = <Cli as clap::CommandFactory>::command()
                .render_help()
                .to_string();
            for opt in [
                "--socket-path <PATH>",
                "--fd <FDNUM>",
                "--print-capabilities",
            ] {
                assert!(help.contains(opt), "{opt} missing from:\n{help}");
            }
        }
    }

    #[test]
    fn capabilities_json() {
        assert_eq!(
            Capabilities::new("net").to_json(),
            "{\n  \"type\": \"net\"\n}\n"
        );
        let j = Capabilities::new("block")
            .feature("read-only")
            .feature("blk-file")
            .to_json();
        assert_eq!(
            j,
            "{\n  \"type\": \"block\",\n  \"features\": [\n    \"read-only\",\n    \"blk-file\"\n  ]\n}\n"
        );
        assert_eq!(json_string("a\"b\\"), "\"a\\\"b\\\\\"");
    }

    #[test]
    fn fd_must_be_a_unix_stream_socket() {
        assert!(matches!(
            socket_from_fd(1),
            Err(ConventionError::BadFd { .. })
        ));
        let f = std::fs::File::open("/dev/null").unwrap();
        let fd = f.as_raw_fd();
        assert!(matches!(
            socket_from_fd(fd),
            Err(ConventionError::BadFd { .. })
        ));
        let dir = std::env::temp_dir().join(format!("vu-conv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let l = UnixListener::bind(&path).unwrap();
        let raw = std::os::fd::IntoRawFd::into_raw_fd(l);
        assert!(matches!(
            socket_from_fd(raw),
            Ok(FrontendSocket::Listener(_))
        ));
        let (a, b) = UnixStream::pair().unwrap();
        let raw = std::os::fd::IntoRawFd::into_raw_fd(a);
        assert!(matches!(
            socket_from_fd(raw),
            Ok(FrontendSocket::Connected(_))
        ));
        drop(b);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
