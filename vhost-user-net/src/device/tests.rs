//! In-process tests of the device: see the crate's `tests` directory for the ones
//! through a vhost-user frontend.
