//! Test support for the vhost-user suite.

pub mod e2e;
pub mod frontend;
