// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Minimal writer for the `newc` cpio format the kernel unpacks as
//! initramfs. Deterministic: fixed inode numbers, uid/gid 0, mtime 0.

use std::collections::BTreeSet;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

/// An in-memory newc archive.
#[derive(Debug, Default)]
pub(crate) struct CpioWriter {
    buf: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl CpioWriter {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn pad4(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, data: &[u8]) {
        self.ino += 1;
        let name_len = name.len() + 1;
        let fields: [usize; 13] = [
            self.ino as usize,
            mode as usize,
            0,
            0,
            nlink as usize,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name_len,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad4();
        self.buf.extend_from_slice(data);
        self.pad4();
    }

    /// Adds the parent directories of `path` (relative, no leading `/`).
    fn parents(&mut self, path: &str) {
        let mut acc = String::new();
        let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        for comp in comps.iter().take(comps.len().saturating_sub(1)) {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(comp);
            self.dir(&acc.clone());
        }
    }

    /// Adds a directory (mode 0755) and its parents, once.
    pub(crate) fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/').to_owned();
        if path.is_empty() || self.dirs.contains(&path) {
            return;
        }
        self.parents(&path);
        self.dirs.insert(path.clone());
        self.entry(&path, S_IFDIR | 0o755, 2, &[]);
    }

    /// Adds a regular file with permission bits `perm`.
    pub(crate) fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        let path = path.trim_start_matches('/');
        self.parents(path);
        self.entry(path, S_IFREG | (perm & 0o7777), 1, data);
    }

    /// Adds a symlink `path` -> `target`.
    pub(crate) fn symlink(&mut self, path: &str, target: &str) {
        let path = path.trim_start_matches('/');
        self.parents(path);
        self.entry(path, S_IFLNK | 0o777, 1, target.as_bytes());
    }

    /// Appends the trailer and returns the archive.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, &[]);
        // Pad to 512 bytes like GNU cpio does.
        while self.buf.len() % 512 != 0 {
            self.buf.push(0);
        }
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let mut w = CpioWriter::new();
        w.file("a/b/c", 0o644, b"xyz");
        w.symlink("a/l", "b/c");
        let out = w.finish();
        assert_eq!(out.len() % 512, 0);
        assert!(out.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&out);
        // Parents come first, once.
        let a = text.find("a\0").unwrap_or(usize::MAX);
        let ab = text.find("a/b\0").unwrap_or(usize::MAX);
        let abc = text.find("a/b/c\0").unwrap_or(usize::MAX);
        assert!(a < ab && ab < abc);
        assert_eq!(text.matches("a/b\0").count(), 1);
        assert!(text.contains("TRAILER!!!"));
    }
}
