// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-user-console: the console daemon of the suite (pty, unix socket, stdio or log
//! file on the host side). Its building blocks live in the `vhost_user_console` library;
//! until the device handler is wired, this binary only reports that it cannot serve yet.

fn main() -> std::process::ExitCode {
    eprintln!("vhost-user-console: the console device is not implemented in this release");
    std::process::ExitCode::FAILURE
}
