// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Split-ring descriptor-chain parsing (see the `vring_fuzz` crate documentation).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vring_fuzz::run_split(data));
