// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Per-port counters.
//!
//! Each port owns an `Arc<PortMetrics>` that the daemon keeps. Counters are updated with
//! relaxed atomics by the port's worker and read from any thread with
//! [`PortMetrics::snapshot`]. All but `clients` only go up.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! metrics {
    ($( $(#[$doc:meta])* $name:ident, )*) => {
        /// Live counters of one port.
        #[derive(Debug, Default)]
        pub struct PortMetrics {
            $( $(#[$doc])* pub $name: AtomicU64, )*
        }

        /// A point-in-time copy of [`PortMetrics`].
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct PortMetricsSnapshot {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl PortMetrics {
            /// Reads every counter (each individually atomic).
            pub fn snapshot(&self) -> PortMetricsSnapshot {
                PortMetricsSnapshot {
                    $( $name: self.$name.load(Ordering::Relaxed), )*
                }
            }
        }
    };
}

metrics! {
    /// Bytes from the host side queued for the guest (host to guest input).
    bytes_in,
    /// Bytes of guest output taken from the transmitq.
    bytes_out,
    /// Guest output bytes dropped from the replay buffer (oldest first) because no
    /// client took them in time.
    dropped_output_bytes,
    /// Guest output bytes a slow read-only viewer missed.
    viewer_dropped_bytes,
    /// Bytes written to the port's log file.
    log_bytes,
    /// Failed log file writes or rotations.
    log_errors,
    /// Clients that attached since start (socket accepts, pty or stdio connects).
    client_connects,
    /// Clients attached now (a gauge).
    clients,
    /// Size changes reported by the host side.
    resizes,
    /// Times reading the host side was paused because the input buffer was full.
    input_backpressure,
    /// Malformed control messages or emerg_wr accesses refused.
    control_errors,
}

impl PortMetrics {
    /// Adds `n` to `counter`.
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Sets a gauge.
    #[inline]
    pub fn set(gauge: &AtomicU64, n: u64) {
        gauge.store(n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_reads_counters() {
        let m = PortMetrics::default();
        PortMetrics::add(&m.bytes_out, 5);
        PortMetrics::add(&m.bytes_out, 7);
        PortMetrics::set(&m.clients, 2);
        PortMetrics::set(&m.clients, 1);
        let s = m.snapshot();
        assert_eq!(s.bytes_out, 12);
        assert_eq!(s.clients, 1);
        assert_eq!(s.bytes_in, 0);
    }
}
