//! Host sides.
pub use crate::config::WinSize;
