// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Structured fuzzing of virtio-core's descriptor-chain parsing, split and packed.
//!
//! An input ([`format`]) describes a small multi-region guest memory, a queue placed in it,
//! and a stream of driver writes and device operations. The [`harness`] runs them on
//! `virtio_core::Queue` and compares every pop with an independent reference parser
//! ([`model`]), checking that nothing panics, every segment lies inside guest memory with
//! the right host address, readable buffers come before writable ones, descriptor counts
//! stay within limits, errors are typed and break the queue, and `add_used` publishes
//! exactly what was popped.
//!
//! The fuzz targets (`fuzz_targets/`) are thin wrappers around [`run_split`] and
//! [`run_packed`]; the seed corpus is written by the `gen_corpus` binary.

#![allow(clippy::cast_possible_truncation, clippy::cast_lossless)]

pub mod format;
pub mod harness;
pub mod model;
pub mod seeds;

use virtio_core::RingLayout;

/// Runs an input against a split ring.
pub fn run_split(data: &[u8]) {
    harness::run(RingLayout::Split, data);
}

/// Runs an input against a packed ring.
pub fn run_packed(data: &[u8]) {
    harness::run(RingLayout::Packed, data);
}
