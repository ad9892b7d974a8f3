//! vhost-user-console: the console daemon of the suite (pty, unix socket, stdio or log
//! file on the host side). Its implementation is tracked in the project's issues; until
//! then this binary only reports that it cannot serve yet.

fn main() -> std::process::ExitCode {
    eprintln!("vhost-user-console: the console device is not implemented in this release");
    std::process::ExitCode::FAILURE
}
