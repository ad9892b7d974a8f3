// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Network namespaces for tests and the demo: everything a network test does on the host
//! side (TAP interfaces, addresses, listeners, the daemon itself) happens inside a
//! namespace it creates, so it never touches the host's interfaces.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

/// Runs a command to completion; its failure is an error with its output.
pub fn run(what: &str, cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what}: {cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates namespace `<prefix>-<pid>-<case>` (a stale one of the same name, left by a
    /// killed run, is deleted first).
    pub fn create(prefix: &str, case: &str) -> Result<NetNs, String> {
        let name = format!("{prefix}-{}-{case}", std::process::id());
        let _ = run(
            "stale namespace",
            Command::new("ip").args(["netns", "del", &name]),
        );
        run(
            "creating the namespace",
            Command::new("ip").args(["netns", "add", &name]),
        )?;
        Ok(NetNs { name })
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec NAME PROGRAM`: a command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// `ip -n NAME ARGS...`.
    pub fn ip(&self, args: &[&str]) -> Result<(), String> {
        run(
            &format!("ip {}", args.join(" ")),
            Command::new("ip").args(["-n", &self.name]).args(args),
        )
    }

    /// Moves the calling thread into the namespace (for listeners a test runs there).
    pub fn enter(&self) -> Result<(), String> {
        enter_named(&self.name)
    }
}

/// Moves the calling thread into namespace `name` (e.g. from a thread that does not own
/// the [`NetNs`]).
pub fn enter_named(name: &str) -> Result<(), String> {
    {
        let f = File::open(format!("/run/netns/{name}"))
            .map_err(|e| format!("opening namespace {name}: {e}"))?;
        // SAFETY: setns takes an fd we keep open during the call and a flag; it changes
        // only the calling thread's network namespace.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        if r != 0 {
            return Err(format!(
                "setns({name}): {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run(
            "deleting the namespace",
            Command::new("ip").args(["netns", "del", &self.name]),
        ) {
            eprintln!("{e}");
        }
    }
}
