// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Measurement helpers for benchmarks: latency percentiles and CPU time of processes and
//! threads.

use std::io;
use std::time::Duration;

/// Percentiles of a set of latencies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LatencySummary {
    /// Number of samples.
    pub count: usize,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// Mean.
    pub mean: Duration,
    /// Maximum.
    pub max: Duration,
}

impl LatencySummary {
    /// Summarises latencies given in nanoseconds (sorts them in place).
    pub fn from_nanos(samples: &mut [u64]) -> LatencySummary {
        if samples.is_empty() {
            return LatencySummary::default();
        }
        samples.sort_unstable();
        let n = samples.len();
        let at = |q: f64| {
            // Nearest-rank percentile.
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss,
                reason = "q in (0, 1] and n a sample count: the rank is in 1..=n"
            )]
            let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
            Duration::from_nanos(samples[rank - 1])
        };
        let sum: u128 = samples.iter().map(|&s| u128::from(s)).sum();
        let mean = u64::try_from(sum / n as u128).unwrap_or(u64::MAX);
        LatencySummary {
            count: n,
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            mean: Duration::from_nanos(mean),
            max: Duration::from_nanos(samples[n - 1]),
        }
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        #[allow(
            clippy::cast_precision_loss,
            reason = "clock ticks per second are small"
        )]
        let t = t as f64;
        t
    } else {
        100.0
    }
}

/// User + system CPU seconds of process `pid` (all its threads, live and exited) from
/// `/proc/PID/stat`. Resolution: one clock tick (usually 10 ms).
pub fn process_cpu_seconds(pid: u32) -> io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat_cpu(&stat)
        .map(|ticks| {
            #[allow(clippy::cast_precision_loss, reason = "tick counts are far below 2^52")]
            let t = ticks as f64;
            t / clock_ticks()
        })
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unparsable /proc/PID/stat"))
}

/// User + system CPU seconds of this process.
pub fn self_cpu_seconds() -> io::Result<f64> {
    process_cpu_seconds(std::process::id())
}

/// CPU time of the calling thread (CLOCK_THREAD_CPUTIME_ID, nanosecond resolution).
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// utime + stime (fields 14 and 15) in clock ticks.
fn parse_stat_cpu(stat: &str) -> Option<u64> {
    // The command name (field 2) is parenthesised and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // `rest` starts at field 3 (state); utime is field 14.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut v: Vec<u64> = (1..=1000).rev().collect();
        let s = LatencySummary::from_nanos(&mut v);
        assert_eq!(s.p50, Duration::from_nanos(500));
        assert_eq!(s.p99, Duration::from_nanos(990));
        assert_eq!(s.max, Duration::from_nanos(1000));
        assert_eq!(LatencySummary::from_nanos(&mut []).count, 0);
    }

    #[test]
    fn stat_parsing() {
        let s = "42 (a b) c) S 1 2 3 4 5 6 7 8 9 10 111 222 13 14";
        assert_eq!(parse_stat_cpu(s), Some(333));
        assert!(self_cpu_seconds().is_ok());
    }
}
