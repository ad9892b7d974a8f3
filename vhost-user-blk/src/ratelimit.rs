// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A small log rate limiter: at most `burst` lines per second, counting the rest.

use std::time::{Duration, Instant};

/// Decides whether a log line may be written now.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    burst: u32,
    window: Duration,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl RateLimiter {
    /// At most `burst` lines per second.
    pub(crate) fn new(burst: u32) -> Self {
        RateLimiter {
            burst,
            window: Duration::from_secs(1),
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Returns `Some(n)` if a line may be logged now, `n` being the number of lines
    /// suppressed since the last one that was logged; `None` if this one must be
    /// suppressed (it is counted).
    pub(crate) fn check(&mut self, now: Instant) -> Option<u64> {
        let expired = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if expired {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_counts_suppressed_lines() {
        let mut rl = RateLimiter::new(3);
        let t0 = Instant::now();
        assert_eq!(rl.check(t0), Some(0));
        assert_eq!(rl.check(t0), Some(0));
        assert_eq!(rl.check(t0), Some(0));
        assert_eq!(rl.check(t0), None);
        assert_eq!(rl.check(t0 + Duration::from_millis(500)), None);
        assert_eq!(rl.check(t0 + Duration::from_millis(1000)), Some(2));
        assert_eq!(rl.check(t0 + Duration::from_millis(1001)), Some(0));
    }
}
