// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Test support for the vhost-user suite.

pub mod e2e;
pub mod frontend;
