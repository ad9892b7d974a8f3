// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `vhost-user-console` daemon binary driven by the userspace console frontend
//! (`vring_tests::frontend::console`), split and packed: what user-mode Linux cannot
//! drive. EMERG_WRITE (a SET_CONFIG write of `emerg_wr`, §5.3.4) reaches the socket host
//! side in order with the transmitq output around it, and bytes go both ways on the
//! ring layout UML does not pick for us; shutdown checks the transmitq's ring base.
//!
//! Needs the daemon built (`cargo build --release -p vhost-user-console`, or
//! `$E2E_VHOST_USER_CONSOLE`; a debug build under `target/debug` is used otherwise).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use vring_tests::e2e::{repo_root, BackgroundProcess, TempDir};
use vring_tests::frontend::console::{
    ConsoleFrontend, ConsoleOptions, VIRTIO_CONSOLE_F_EMERG_WRITE, VIRTIO_CONSOLE_F_MULTIPORT,
    VIRTIO_F_RING_PACKED,
};

const TIMEOUT: Duration = Duration::from_secs(20);

fn console_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("E2E_VHOST_USER_CONSOLE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    for profile in ["release", "debug"] {
        let p = repo_root()
            .join("target")
            .join(profile)
            .join("vhost-user-console");
        if p.is_file() {
            return p;
        }
    }
    panic!("vhost-user-console is not built: cargo build --release -p vhost-user-console");
}

fn read_exactly(c: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    c.read_exact(&mut out).unwrap();
    out
}

fn case(packed: bool) {
    let tmp = TempDir::new("console-fe").unwrap();
    let sock = tmp.path().join("vhost.sock");
    let port = tmp.path().join("port0.sock");
    let mut cmd = Command::new(console_binary());
    cmd.arg("--socket-path")
        .arg(&sock)
        .arg("--port")
        .arg(format!("socket={}", port.display()))
        .env("RUST_LOG", "info");
    let mut daemon = BackgroundProcess::spawn("vhost-user-console", cmd).unwrap();
    for s in [&sock, &port] {
        daemon
            .wait_for_socket(s, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let mut user = UnixStream::connect(&port).unwrap();
    user.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut fe = ConsoleFrontend::connect(
        &sock,
        ConsoleOptions {
            packed,
            timeout: TIMEOUT,
            ..ConsoleOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log()));
    let info = fe.info().clone();
    assert!(info.has(VIRTIO_CONSOLE_F_EMERG_WRITE), "{info:?}");
    assert_eq!(info.has(VIRTIO_F_RING_PACKED), packed, "{info:?}");
    assert!(!info.has(VIRTIO_CONSOLE_F_MULTIPORT), "{info:?}");

    fe.send(b"normal ").unwrap();
    fe.flush().unwrap();
    assert_eq!(read_exactly(&mut user, 7), b"normal ");
    for &b in b"\xffpanic!" {
        fe.emerg_write(b).unwrap();
    }
    assert_eq!(read_exactly(&mut user, 7), b"\xffpanic!");
    fe.send(b" after").unwrap();
    fe.flush().unwrap();
    assert_eq!(read_exactly(&mut user, 6), b" after");
    // emerg_wr reads as 0; the other fields are read-only.
    assert_eq!(fe.get_config(8, 4).unwrap(), [0; 4]);
    assert!(fe.set_config(0, &[1, 0]).is_err());

    // Host input, more than one ring of buffers' worth of chains in flight.
    let input: Vec<u8> = (0..64 * 1024usize).map(|i| i.to_le_bytes()[0]).collect();
    let writer = {
        let mut w = user.try_clone().unwrap();
        let data = input.clone();
        std::thread::spawn(move || w.write_all(&data).unwrap())
    };
    let mut got = Vec::new();
    fe.receive(&mut got, input.len()).unwrap();
    writer.join().unwrap();
    assert_eq!(got, input);

    let (_, tx_base) = fe.shutdown().unwrap();
    assert_ne!(tx_base, 0);
    let (status, log) = daemon.stop().unwrap();
    assert!(status.success(), "{status}\n{log}");
}

#[test]
fn emerg_write_and_both_directions_split() {
    case(false);
}

#[test]
fn emerg_write_and_both_directions_packed() {
    case(true);
}
