//! vhost-user-net: the network daemon of the suite (TAP on the host side, or switch mode).
//! The device's building blocks are in the `vhost_user_net` library; the vhost-user glue
//! is tracked in the project's issues. Until it lands this binary only reports that it
//! cannot serve yet.

fn main() -> std::process::ExitCode {
    eprintln!("vhost-user-net: the network device is not implemented in this release");
    std::process::ExitCode::FAILURE
}
