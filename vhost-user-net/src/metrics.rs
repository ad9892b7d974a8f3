// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Per-queue-pair counters.
//!
//! Each queue pair owns an `Arc<QueueMetrics>` that the daemon keeps, so counters survive
//! the queues being stopped and started again. Counters only go up; they are updated with
//! relaxed atomics by the worker thread and read from any thread with
//! [`QueueMetrics::snapshot`], whose [`QueueMetricsSnapshot::named`] lists them by name
//! for an operator (`rx_packets=… tx_bytes=…`). "rx" is towards the guest (its receive
//! queue), "tx" from it.

use std::fmt;
use std::ops::AddAssign;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! metrics {
    ($( $(#[$doc:meta])* $name:ident, )*) => {
        /// Live counters of one queue pair.
        #[derive(Debug, Default)]
        pub struct QueueMetrics {
            $( $(#[$doc])* pub $name: AtomicU64, )*
        }

        /// A point-in-time copy of [`QueueMetrics`].
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct QueueMetricsSnapshot {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl QueueMetrics {
            /// Reads every counter (each individually atomic).
            pub fn snapshot(&self) -> QueueMetricsSnapshot {
                QueueMetricsSnapshot {
                    $( $name: self.$name.load(Ordering::Relaxed), )*
                }
            }
        }

        impl QueueMetricsSnapshot {
            /// Number of counters.
            pub const COUNT: usize = [$( stringify!($name), )*].len();

            /// Every counter with its name, in a fixed order.
            pub fn named(&self) -> [(&'static str, u64); Self::COUNT] {
                [$( (stringify!($name), self.$name), )*]
            }
        }

        impl AddAssign for QueueMetricsSnapshot {
            fn add_assign(&mut self, other: Self) {
                $( self.$name = self.$name.wrapping_add(other.$name); )*
            }
        }
    };
}

metrics! {
    /// Frames delivered to the guest.
    rx_packets,
    /// Bytes of frames delivered to the guest (without the vnet header).
    rx_bytes,
    /// Frames the guest transmitted that were sent on.
    tx_packets,
    /// Bytes of frames the guest transmitted that were sent on (without the vnet header).
    tx_bytes,
    /// Frames for the guest dropped because its receive queue had no buffers.
    drop_no_rx_buffers,
    /// Guest frames dropped because the TAP (or the switch peer) was full.
    drop_tap_full,
    /// Guest frames dropped for a malformed vnet or Ethernet header.
    drop_bad_header,
    /// Frames dropped for being larger than the buffers or the MTU allow.
    drop_too_big,
    /// Frames for the guest dropped by its receive filter (§5.1.6.5.1).
    drop_filtered,
}

/// Why a frame was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The receive queue had no buffers.
    NoRxBuffers,
    /// The TAP (or switch peer) was full.
    TapFull,
    /// A malformed header.
    BadHeader,
    /// Too large.
    TooBig,
    /// Refused by the receive filter.
    Filtered,
}

impl QueueMetrics {
    /// Counts a frame delivered to the guest.
    #[inline]
    pub fn record_rx(&self, bytes: usize) {
        self.rx_packets.fetch_add(1, Ordering::Relaxed);
        self.rx_bytes
            .fetch_add(u64::try_from(bytes).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Counts a frame transmitted by the guest.
    #[inline]
    pub fn record_tx(&self, bytes: usize) {
        self.tx_packets.fetch_add(1, Ordering::Relaxed);
        self.tx_bytes
            .fetch_add(u64::try_from(bytes).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Counts a dropped frame.
    #[inline]
    pub fn record_drop(&self, reason: DropReason) {
        let counter = match reason {
            DropReason::NoRxBuffers => &self.drop_no_rx_buffers,
            DropReason::TapFull => &self.drop_tap_full,
            DropReason::BadHeader => &self.drop_bad_header,
            DropReason::TooBig => &self.drop_too_big,
            DropReason::Filtered => &self.drop_filtered,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl QueueMetricsSnapshot {
    /// Every dropped frame, whatever the reason.
    pub fn drops(&self) -> u64 {
        self.drop_no_rx_buffers
            .wrapping_add(self.drop_tap_full)
            .wrapping_add(self.drop_bad_header)
            .wrapping_add(self.drop_too_big)
            .wrapping_add(self.drop_filtered)
    }
}

impl fmt::Display for QueueMetricsSnapshot {
    /// `name=value` pairs separated by spaces.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, value)) in self.named().iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{name}={value}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rx_and_tx_count_packets_and_bytes() {
        let m = QueueMetrics::default();
        m.record_rx(60);
        m.record_rx(1514);
        m.record_tx(42);
        let s = m.snapshot();
        assert_eq!((s.rx_packets, s.rx_bytes), (2, 1574));
        assert_eq!((s.tx_packets, s.tx_bytes), (1, 42));
    }

    #[test]
    fn drops_are_counted_by_reason() {
        let m = QueueMetrics::default();
        for r in [
            DropReason::NoRxBuffers,
            DropReason::TapFull,
            DropReason::TapFull,
            DropReason::BadHeader,
            DropReason::TooBig,
            DropReason::Filtered,
        ] {
            m.record_drop(r);
        }
        let s = m.snapshot();
        assert_eq!(s.drop_tap_full, 2);
        assert_eq!(s.drop_no_rx_buffers, 1);
        assert_eq!(s.drop_filtered, 1);
        assert_eq!(s.drops(), 6);
    }

    #[test]
    fn snapshot_lists_named_counters() {
        let m = QueueMetrics::default();
        m.record_tx(10);
        m.record_drop(DropReason::Filtered);
        let s = m.snapshot();
        let named = s.named();
        assert_eq!(named.len(), 9);
        assert_eq!(named[0], ("rx_packets", 0));
        assert!(named.contains(&("tx_bytes", 10)));
        assert!(named.contains(&("drop_filtered", 1)));
        assert!(s
            .to_string()
            .starts_with("rx_packets=0 rx_bytes=0 tx_packets=1 tx_bytes=10"));
    }

    #[test]
    fn snapshots_add_up() {
        let m = QueueMetrics::default();
        m.record_rx(100);
        let mut total = m.snapshot();
        total += m.snapshot();
        assert_eq!((total.rx_packets, total.rx_bytes), (2, 200));
    }
}
