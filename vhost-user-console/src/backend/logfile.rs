// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! An append-only log of guest output with size-limited rotation.
//!
//! The log is written to `NAME`; when a write would make it larger than the size limit,
//! the bytes that fit are written, then `NAME.N-1` is renamed to `NAME.N-1+1` ... down
//! to `NAME` → `NAME.1` (the oldest, `NAME.max_files-1`, is overwritten), and writing
//! goes on in a new `NAME`. So at most `max_files` files exist: `NAME`, `NAME.1`, ...,
//! `NAME.{max_files-1}`. With `max_files` 1 the log is truncated instead. Any bytes are
//! logged as they are (no UTF-8 assumption, no line splitting).

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Errors of the log file.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Opening the log failed.
    #[error("cannot open log file {path}: {source}")]
    Open {
        /// The log's path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Writing the log failed.
    #[error("cannot write log file {path}: {source}")]
    Write {
        /// The log's path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Renaming a file during rotation failed.
    #[error("cannot rotate log file {from} to {to}: {source}")]
    Rotate {
        /// The file renamed.
        from: PathBuf,
        /// Its new name.
        to: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// An append-only, rotating log file.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    file: File,
    size: u64,
    max_size: u64,
    max_files: u32,
}

impl LogFile {
    /// Opens (creating it if needed) the log at `path` for appending. `max_size` is the
    /// size limit of each file in bytes (0: no limit, no rotation); `max_files` the
    /// number of files kept, the current one included (at least 1).
    pub fn open(path: &Path, max_size: u64, max_files: u32) -> Result<Self, LogError> {
        let file = Self::open_file(path)?;
        let size = file
            .metadata()
            .map_err(|source| LogError::Open {
                path: path.to_owned(),
                source,
            })?
            .len();
        Ok(Self {
            path: path.to_owned(),
            file,
            size,
            max_size,
            max_files: max_files.max(1),
        })
    }

    fn open_file(path: &Path) -> Result<File, LogError> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| LogError::Open {
                path: path.to_owned(),
                source,
            })
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in the current file.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn numbered(&self, n: u32) -> PathBuf {
        let mut name = OsString::from(self.path.as_os_str());
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    /// Moves `NAME` to `NAME.1` (and older ones up by one), then starts a new `NAME`.
    pub fn rotate(&mut self) -> Result<(), LogError> {
        if self.max_files == 1 {
            self.file.set_len(0).map_err(|source| LogError::Write {
                path: self.path.clone(),
                source,
            })?;
            self.size = 0;
            return Ok(());
        }
        for n in (1..self.max_files - 1).rev() {
            let from = self.numbered(n);
            if from.exists() {
                let to = self.numbered(n + 1);
                std::fs::rename(&from, &to).map_err(|source| LogError::Rotate {
                    from: from.clone(),
                    to: to.clone(),
                    source,
                })?;
            }
        }
        let to = self.numbered(1);
        std::fs::rename(&self.path, &to).map_err(|source| LogError::Rotate {
            from: self.path.clone(),
            to: to.clone(),
            source,
        })?;
        self.file = Self::open_file(&self.path)?;
        self.size = 0;
        Ok(())
    }

    /// Appends `data`, rotating whenever the current file reaches the size limit (a
    /// write is split across files so that none exceeds it).
    pub fn write(&mut self, mut data: &[u8]) -> Result<(), LogError> {
        while !data.is_empty() {
            let room = if self.max_size == 0 {
                data.len()
            } else {
                if self.size >= self.max_size {
                    self.rotate()?;
                }
                usize::try_from(self.max_size - self.size).map_or(data.len(), |r| r.min(data.len()))
            };
            let (now, later) = data.split_at(room);
            self.file.write_all(now).map_err(|source| LogError::Write {
                path: self.path.clone(),
                source,
            })?;
            self.size += now.len() as u64;
            data = later;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A directory removed on drop.
    pub(crate) struct TempDir(PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "vuc-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn appends_any_bytes() {
        let dir = TempDir::new("log");
        let path = dir.path().join("console.log");
        std::fs::write(&path, b"old\n").unwrap();
        let mut log = LogFile::open(&path, 0, 3).unwrap();
        assert_eq!(log.size(), 4);
        log.write(&[0xff, 0, 0x1b]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"old\n\xff\x00\x1b");
    }

    #[test]
    fn rotates_at_size_limit_keeping_n_files() {
        let dir = TempDir::new("log");
        let path = dir.path().join("c.log");
        let mut log = LogFile::open(&path, 4, 3).unwrap();
        log.write(b"aaaabbbbccccdd").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"dd");
        assert_eq!(std::fs::read(dir.path().join("c.log.1")).unwrap(), b"cccc");
        assert_eq!(std::fs::read(dir.path().join("c.log.2")).unwrap(), b"bbbb");
        assert!(!dir.path().join("c.log.3").exists(), "aaaa was dropped");
    }

    #[test]
    fn single_file_is_truncated_instead_of_rotated() {
        let dir = TempDir::new("log");
        let path = dir.path().join("c.log");
        let mut log = LogFile::open(&path, 3, 1).unwrap();
        log.write(b"abcdefg").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"g");
        assert!(!dir.path().join("c.log.1").exists());
    }

    #[test]
    fn open_failure_names_the_path() {
        let err = LogFile::open(Path::new("/nonexistent-dir/x.log"), 0, 1).unwrap_err();
        assert!(err.to_string().contains("/nonexistent-dir/x.log"), "{err}");
    }
}
