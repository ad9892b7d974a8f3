// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Host-side helper processes: backends under test and the
//! `qemu-storage-daemon` peer.

use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::qemu::find_versioned;
use super::{E2eError, Result};

/// A child process with stdout and stderr captured into one log, killed
/// (SIGKILL) on drop if still running.
#[derive(Debug)]
pub struct BackgroundProcess {
    name: String,
    child: Option<Child>,
    log: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl BackgroundProcess {
    /// Spawns `cmd` (stdin null, stdout+stderr captured). `name` is used in
    /// messages.
    pub fn spawn(name: &str, mut cmd: Command) -> Result<BackgroundProcess> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| E2eError::io(format!("spawning {name} ({cmd:?})"), e))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        let out: Option<Box<dyn Read + Send>> = child.stdout.take().map(|o| Box::new(o) as _);
        let err: Option<Box<dyn Read + Send>> = child.stderr.take().map(|e| Box::new(e) as _);
        for mut r in [out, err].into_iter().flatten() {
            let log = log.clone();
            readers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    match log.lock() {
                        Ok(mut g) => g.extend_from_slice(&buf[..n]),
                        Err(p) => p.into_inner().extend_from_slice(&buf[..n]),
                    }
                }
            }));
        }
        Ok(BackgroundProcess {
            name: name.to_owned(),
            child: Some(child),
            log,
            readers,
            status: None,
        })
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Process id (while not reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Output captured so far (stdout and stderr interleaved).
    pub fn log(&self) -> String {
        match self.log.lock() {
            Ok(g) => String::from_utf8_lossy(&g).into_owned(),
            Err(p) => String::from_utf8_lossy(&p.into_inner()).into_owned(),
        }
    }

    /// `Some(status)` if the process has exited, `None` if still running.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        let Some(child) = self.child.as_mut() else {
            return Ok(self.status);
        };
        let status = child
            .try_wait()
            .map_err(|e| E2eError::io(format!("waiting for {}", self.name), e))?;
        if let Some(s) = status {
            self.status = Some(s);
            self.child = None;
            self.join_readers();
        }
        Ok(status)
    }

    /// Waits (polling) until `path` exists and is a unix socket. Fails early
    /// with the process log if the process exits first.
    ///
    /// Deliberately does not connect to the socket: many vhost-user backends
    /// serve exactly one frontend connection.
    pub fn wait_for_socket(&mut self, path: &Path, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if is_socket(path) {
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                return Err(E2eError::Guest {
                    reason: format!(
                        "{} exited ({status}) before creating socket {}",
                        self.name,
                        path.display()
                    ),
                    log: self.log(),
                });
            }
            if Instant::now() >= deadline {
                return Err(E2eError::Timeout {
                    what: format!(
                        "waiting for {} to create socket {}",
                        self.name,
                        path.display()
                    ),
                    after: timeout,
                    log: self.log(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `timeout` for the process to exit by itself; returns its
    /// status, or `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM, waits up to 5 s, then SIGKILLs. Returns the exit
    /// status and the captured log.
    pub fn stop(mut self) -> Result<(ExitStatus, String)> {
        if self.try_wait()?.is_none() {
            if let Some(pid) = self.pid().and_then(|p| i32::try_from(p).ok()) {
                // SAFETY: kill(2) has no memory-safety preconditions; `pid`
                // is our own unreaped child, so it cannot have been recycled.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
            if self.wait_timeout(Duration::from_secs(5))?.is_none() {
                self.kill_and_reap();
            }
        }
        let status = self.status.ok_or_else(|| {
            E2eError::io(
                format!("reaping {}", self.name),
                std::io::Error::other("no exit status"),
            )
        })?;
        Ok((status, self.log()))
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    fn kill_and_reap(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            self.status = child.wait().ok();
        }
        self.join_readers();
    }
}

impl Drop for BackgroundProcess {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

fn is_socket(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

/// Waits (polling) until `path` exists and is a unix socket.
pub fn wait_for_socket(path: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !is_socket(path) {
        if Instant::now() >= deadline {
            return Err(E2eError::Timeout {
                what: format!("waiting for socket {}", path.display()),
                after: timeout,
                log: String::new(),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Finds `qemu-storage-daemon` (`$E2E_QSD`, `/usr/bin`, `$PATH`) and checks
/// it is version >= 10. In Debian's QEMU 10 packages it ships in
/// `qemu-utils`.
pub fn qemu_storage_daemon_binary() -> Result<PathBuf> {
    static QSD: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    QSD.get_or_init(|| {
        find_versioned(
            "E2E_QSD",
            "qemu-storage-daemon",
            "qemu-utils (bookworm-backports)",
        )
    })
    .clone()
    .map_err(E2eError::missing)
}

/// A `qemu-storage-daemon` exporting a raw image file as a vhost-user-blk
/// device: the reference ("peer") backend.
///
/// Runs `qemu-storage-daemon --blockdev
/// driver=file,node-name=disk0,filename=IMAGE --export
/// type=vhost-user-blk,id=export0,node-name=disk0,addr.type=unix,
/// addr.path=SOCKET,writable=on|off,num-queues=N`.
#[derive(Debug)]
pub struct QsdBlkExport {
    process: BackgroundProcess,
    socket: PathBuf,
}

impl QsdBlkExport {
    /// Starts the daemon and waits (up to 10 s) for the socket to appear.
    pub fn start(image: &Path, socket: &Path, writable: bool, num_queues: u16) -> Result<Self> {
        let qsd = qemu_storage_daemon_binary()?;
        let esc = |p: &Path| p.to_string_lossy().replace(',', ",,");
        let mut cmd = Command::new(qsd);
        cmd.arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk0,filename={}",
                esc(image)
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=export0,node-name=disk0,addr.type=unix,addr.path={},writable={},num-queues={num_queues}",
                esc(socket),
                if writable { "on" } else { "off" }
            ));
        let mut process = BackgroundProcess::spawn("qemu-storage-daemon", cmd)?;
        process.wait_for_socket(socket, Duration::from_secs(10))?;
        Ok(QsdBlkExport {
            process,
            socket: socket.to_path_buf(),
        })
    }

    /// The vhost-user socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The daemon process (for its log or status).
    pub fn process(&mut self) -> &mut BackgroundProcess {
        &mut self.process
    }

    /// Stops the daemon (SIGTERM, then SIGKILL after 5 s); returns its log.
    pub fn stop(self) -> Result<String> {
        self.process.stop().map(|(_, log)| log)
    }
}
