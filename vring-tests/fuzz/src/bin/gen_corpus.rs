// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Writes the seed corpus (`corpus/<target>/seed-*`) and the regression inputs
//! (`regressions/<target>/*`) of this fuzz crate. Deterministic: running it again
//! rewrites the same files.
//!
//! Usage: `cargo run --bin gen_corpus [-- OUT_DIR]` (default: this crate's directory).

use std::fs;
use std::path::PathBuf;

use virtio_core::RingLayout;
use vring_fuzz::seeds;

fn main() -> std::io::Result<()> {
    let root = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    for (target, layout) in [
        ("split_chain", RingLayout::Split),
        ("packed_chain", RingLayout::Packed),
    ] {
        let dir = root.join("corpus").join(target);
        fs::create_dir_all(&dir)?;
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seed-"))
            {
                fs::remove_file(path)?;
            }
        }
        for (name, data) in seeds::seeds(layout) {
            fs::write(dir.join(&name), &data)?;
            println!("{target}/{name}: {} bytes", data.len());
        }
    }
    let dir = root.join("regressions").join("split_chain");
    fs::create_dir_all(&dir)?;
    for (name, data) in [
        ("in-flight-overflow", seeds::split_in_flight_overflow()),
        ("in-flight-leak", seeds::split_in_flight_leak()),
    ] {
        fs::write(dir.join(name), &data)?;
        println!("regressions/split_chain/{name}: {} bytes", data.len());
    }
    Ok(())
}
