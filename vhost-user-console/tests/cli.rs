// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's command line, run as a program.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vhost-user-console"));
    c.env("RUST_LOG", "off");
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

#[test]
fn print_capabilities_says_console() {
    let o = run(&["--print-capabilities"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("\"type\": \"console\""), "{out}");
}

#[test]
fn help_ends_with_user_mode_linux_and_qemu_command_lines() {
    let o = run(&["--help"]);
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for want in [
        "--socket-path <PATH>",
        "--port <SPEC>",
        "--replay-bytes",
        "--poll-us",
        "virtio_uml.device=/tmp/vcon.sock:3 console=hvc0",
        "vhost-user-test-device-pci,chardev=c,virtio-id=3",
    ] {
        assert!(help.contains(want), "{want} missing from:\n{help}");
    }
}

#[test]
fn bad_port_is_a_usage_error() {
    let o = run(&["--socket-path", "/nonexistent/x.sock", "--port", "tcp=1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown item 'tcp=1'"));
}

#[test]
fn sigterm_stops_the_daemon_and_it_printed_its_ports() {
    let dir = std::env::temp_dir().join(format!("vcon-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("vhost.sock");
    let con = dir.join("con0");
    let mut child = bin()
        .args(["--socket-path", sock.to_str().unwrap()])
        .args(["--port", &format!("socket={}", con.display())])
        .args(["--port", "name=agent,pty"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child's pid; no memory is passed.
    let r = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(r, 0);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "still running");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("port 0: unix socket"), "{err}");
    assert!(err.contains("port 1: pty /dev/pts/"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A pty pair: (master, slave).
fn openpty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    // SAFETY: posix_openpt returns a new fd or -1; checked.
    let m = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    assert!(m >= 0);
    // SAFETY: a fresh fd nothing else owns.
    let master = unsafe { std::fs::File::from_raw_fd(m) };
    // SAFETY: grantpt on the master fd we own; no memory is passed.
    let r = unsafe { libc::grantpt(m) };
    assert_eq!(r, 0);
    // SAFETY: unlockpt on the master fd we own; no memory is passed.
    let r = unsafe { libc::unlockpt(m) };
    assert_eq!(r, 0);
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: ptsname_r writes a NUL-terminated name of at most name.len() bytes.
    let r = unsafe { libc::ptsname_r(m, name.as_mut_ptr(), name.len()) };
    assert_eq!(r, 0);
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path.to_str().unwrap())
        .unwrap();
    (master, slave)
}

fn lflag(f: &std::fs::File) -> libc::tcflag_t {
    use std::os::fd::AsRawFd;
    // SAFETY: termios is plain data; tcgetattr fills it for a terminal fd.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: a valid terminal fd and a live termios.
    let r = unsafe { libc::tcgetattr(f.as_raw_fd(), &mut t) };
    assert_eq!(r, 0);
    t.c_lflag
}

use std::os::unix::fs::OpenOptionsExt;

#[test]
fn sigterm_restores_the_terminal_of_a_stdio_port() {
    let (_master, slave) = openpty();
    let before = lflag(&slave);
    assert_ne!(before & libc::ICANON, 0, "a fresh pty is canonical");
    let dir = std::env::temp_dir().join(format!("vcon-cli-stdio-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("vhost.sock");
    let mut child = bin()
        .args(["--socket-path", sock.to_str().unwrap(), "--port", "stdio"])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(lflag(&slave) & (libc::ICANON | libc::ECHO), 0, "raw mode");
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child's pid; no memory is passed.
    let r = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(r, 0);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "still running");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status}");
    assert_eq!(lflag(&slave), before, "the terminal modes are restored");
    let _ = std::fs::remove_dir_all(&dir);
}
