// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The daemon's command line, run as a program.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vhost-user-blk"))
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_lists_the_backend_conventions() {
    let o = run(&["--help"]);
    assert!(o.status.success());
    let help = stdout(&o);
    for opt in [
        "--socket-path <PATH>",
        "--fd <FDNUM>",
        "--print-capabilities",
    ] {
        assert!(help.contains(opt), "{opt} missing from:\n{help}");
    }
}

#[test]
fn help_ends_with_a_qemu_command_line() {
    let help = stdout(&run(&["--help"]));
    let qemu = help
        .lines()
        .find(|l| l.trim_start().starts_with("qemu-system-x86_64 "))
        .unwrap_or_else(|| panic!("no QEMU command line in:\n{help}"));
    for part in [
        "-object memory-backend-memfd,id=mem,size=1G,share=on",
        "-numa node,memdev=mem",
        "-chardev socket,id=blk0,path=/tmp/vublk.sock",
        "-device vhost-user-blk-pci,chardev=blk0",
    ] {
        assert!(qemu.contains(part), "{part} missing from: {qemu}");
    }
    let daemon = help.lines().find(|l| {
        l.trim_start()
            .starts_with("vhost-user-blk --socket-path /tmp/vublk.sock")
    });
    assert!(daemon.is_some(), "no daemon command line in:\n{help}");
}

#[test]
fn help_documents_the_num_queues_default() {
    let help = stdout(&run(&["--help"]));
    let cpus = std::thread::available_parallelism().unwrap().get().min(64);
    assert!(
        help.contains(&format!("[default: {cpus}]")) && help.contains("CPU count"),
        "{help}"
    );
}

#[test]
fn print_capabilities_needs_no_other_option() {
    let o = run(&["--print-capabilities"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("\"type\": \"block\""), "{}", stdout(&o));
}

#[test]
fn missing_socket_is_a_usage_error_naming_both_options() {
    let o = run(&["--blk-file", "/dev/null"]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("--socket-path") && err.contains("--fd"),
        "{err}"
    );
}

#[test]
fn socket_path_and_fd_together_are_refused() {
    let o = run(&[
        "--socket-path",
        "/nonexistent/s",
        "--fd=3",
        "--blk-file",
        "/dev/null",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cannot be used with"), "{}", stderr(&o));
}
