//! vhost-user-net: the network daemon of the suite (TAP on the host side). Its
//! implementation is tracked in the project's issues; until then this binary only reports
//! that it cannot serve yet.

fn main() -> std::process::ExitCode {
    eprintln!("vhost-user-net: the network device is not implemented in this release");
    std::process::ExitCode::FAILURE
}
