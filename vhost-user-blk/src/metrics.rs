// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Per-queue counters.
//!
//! Each queue owns an `Arc<QueueMetrics>` that the daemon keeps (see
//! [`crate::BlockDevice::queue_metrics`]), so counters survive the queue being stopped
//! and started again. Counters only go up; they are updated with relaxed atomics by the
//! queue's worker thread and can be read from any thread with
//! [`QueueMetrics::snapshot`].

use std::ops::AddAssign;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! metrics {
    ($( $(#[$doc:meta])* $name:ident, )*) => {
        /// Live counters of one queue.
        #[derive(Debug, Default)]
        pub struct QueueMetrics {
            $( $(#[$doc])* pub(crate) $name: AtomicU64, )*
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

        impl AddAssign for QueueMetricsSnapshot {
            fn add_assign(&mut self, other: Self) {
                $( self.$name = self.$name.wrapping_add(other.$name); )*
            }
        }
    };
}

metrics! {
    /// Requests taken from the queue (every type, valid or not).
    requests,
    /// VIRTIO_BLK_T_IN requests.
    read_requests,
    /// VIRTIO_BLK_T_OUT requests.
    write_requests,
    /// VIRTIO_BLK_T_FLUSH requests.
    flush_requests,
    /// VIRTIO_BLK_T_GET_ID requests.
    get_id_requests,
    /// VIRTIO_BLK_T_DISCARD requests.
    discard_requests,
    /// VIRTIO_BLK_T_WRITE_ZEROES requests.
    write_zeroes_requests,
    /// Bytes read from the disk into guest memory by successful reads.
    read_bytes,
    /// Bytes written to the disk by successful writes.
    write_bytes,
    /// Requests completed with VIRTIO_BLK_S_IOERR, or without a status byte.
    errors,
    /// Requests completed with VIRTIO_BLK_S_UNSUPP.
    unsupported,
    /// Malformed requests (a subset of `errors` and `unsupported`).
    bad_requests,
    /// Requests whose data went through an aligned bounce buffer (O_DIRECT).
    bounced_requests,
    /// Operations resubmitted after a short transfer or EAGAIN.
    resubmissions,
    /// Error log lines suppressed by the rate limit.
    suppressed_log_lines,
}

impl QueueMetrics {
    #[inline]
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_and_sum() {
        let m = QueueMetrics::default();
        QueueMetrics::inc(&m.requests);
        QueueMetrics::add(&m.read_bytes, 4096);
        let mut total = m.snapshot();
        assert_eq!(total.requests, 1);
        assert_eq!(total.read_bytes, 4096);
        total += m.snapshot();
        assert_eq!(total.read_bytes, 8192);
    }
}
