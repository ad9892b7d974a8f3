// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Command-line options of the block device, to be flattened into the daemon's parser
//! (`#[command(flatten)] blk: BlockArgs`).

use std::path::PathBuf;

use crate::backend::{BackendOptions, CacheMode};
use crate::device::DeviceOptions;
use crate::io::EngineChoice;

/// Most queues [`default_num_queues`] offers.
pub const MAX_DEFAULT_QUEUES: u16 = 64;

/// The default `--num-queues`: the host's CPU count
/// ([`std::thread::available_parallelism`]), at least 1 and at most
/// [`MAX_DEFAULT_QUEUES`], so that QEMU's default of one queue per vCPU fits a guest
/// with as many vCPUs as the host has CPUs.
pub fn default_num_queues() -> u16 {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    u16::try_from(cpus)
        .unwrap_or(MAX_DEFAULT_QUEUES)
        .clamp(1, MAX_DEFAULT_QUEUES)
}

/// Block device options.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct BlockArgs {
    /// Disk image (regular file) or block device (vhost-user.rst's `--blk-file`).
    #[arg(long = "blk-file", visible_alias = "path")]
    pub path: PathBuf,
    /// Open read-only and offer VIRTIO_BLK_F_RO.
    #[arg(long)]
    pub read_only: bool,
    /// Open with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    pub direct: bool,
    /// Logical block size to report (default: the device's, or 512 for files).
    #[arg(long)]
    pub logical_block_size: Option<u32>,
    /// Physical block size to report (default: the device's, or 4096 for files).
    #[arg(long)]
    pub physical_block_size: Option<u32>,
    /// Serial returned by GET_ID (at most 20 bytes).
    #[arg(long)]
    pub serial: Option<String>,
    /// Initial write cache mode: writeback or writethrough.
    #[arg(long, default_value_t = CacheMode::WriteBack)]
    pub cache: CacheMode,
    /// I/O engine: auto (io_uring if available), io_uring or sync.
    #[arg(long, default_value_t = EngineChoice::Auto)]
    pub engine: EngineChoice,
    /// Number of request queues offered (default: the host's CPU count, at most
    /// 64). QEMU's vhost-user-blk-pci uses one queue per vCPU unless its num-queues= is
    /// set, and refuses a backend with fewer. Only the queues the guest enables cost a
    /// worker thread.
    #[arg(long, default_value_t = default_num_queues(), value_parser = clap::value_parser!(u16).range(1..))]
    pub num_queues: u16,
    /// Largest queue size accepted.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u16).range(1..=32768))]
    pub max_queue_size: u16,
}

impl BlockArgs {
    /// The backend options these arguments describe.
    pub fn backend_options(&self) -> BackendOptions {
        BackendOptions {
            path: self.path.clone(),
            read_only: self.read_only,
            direct: self.direct,
            logical_block_size: self.logical_block_size,
            physical_block_size: self.physical_block_size,
            serial: self.serial.clone(),
            cache_mode: self.cache,
        }
    }

    /// The device options these arguments describe (limits at their defaults).
    pub fn device_options(&self) -> DeviceOptions {
        DeviceOptions {
            num_queues: self.num_queues,
            max_queue_size: self.max_queue_size,
            ..DeviceOptions::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        blk: BlockArgs,
    }

    #[test]
    fn parses_all_options() {
        let cli = Cli::parse_from([
            "x",
            "--blk-file",
            "/dev/null",
            "--read-only",
            "--direct",
            "--logical-block-size",
            "4096",
            "--serial",
            "abc",
            "--cache",
            "writethrough",
            "--engine",
            "sync",
            "--num-queues",
            "4",
        ]);
        let o = cli.blk.backend_options();
        assert!(o.read_only && o.direct);
        assert_eq!(o.logical_block_size, Some(4096));
        assert_eq!(o.cache_mode, CacheMode::WriteThrough);
        assert_eq!(cli.blk.engine, EngineChoice::Sync);
        assert_eq!(cli.blk.device_options().num_queues, 4);
        assert_eq!(cli.blk.device_options().max_queue_size, 1024);
        assert!(Cli::try_parse_from(["x", "--blk-file", "p", "--num-queues", "0"]).is_err());
    }

    #[test]
    fn num_queues_defaults_to_the_cpu_count() {
        let cpus = std::thread::available_parallelism().unwrap().get();
        let expected = cpus.clamp(1, usize::from(MAX_DEFAULT_QUEUES));
        let cli = Cli::parse_from(["x", "--blk-file", "p"]);
        assert_eq!(usize::from(cli.blk.num_queues), expected);
        assert_eq!(usize::from(default_num_queues()), expected);
    }
}
