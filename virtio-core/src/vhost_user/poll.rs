// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Busy-poll windows of queue workers.
//!
//! After a ring is found empty, or completions were returned to the driver, the next
//! request usually follows within the driver's reaction time (at queue depth 1: the time
//! the guest takes to see the completion and submit again). Sleeping on the kick eventfd
//! costs a kick (the driver's eventfd write, a VM exit for a real guest), a wake-up and
//! the scheduling latency of both; polling the ring with notifications off costs the
//! poll itself. The adaptive policy polls only where that pays: it learns the gaps
//! between "ring empty or completions returned" and "next buffer seen", and polls for
//! a little more than the typical gap if that is short, up to a cap. A queue whose
//! requests come further apart than the cap (idle, or a driver waiting on something
//! else) does not poll at all, so idle queues cost nothing.

use std::time::{Duration, Instant};

/// How a worker polls its rings before sleeping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PollPolicy {
    /// Never poll: re-enable notifications and sleep at once.
    Off,
    /// Always poll this long (`--poll-us`).
    Fixed(Duration),
    /// Poll for a window learned from recent gaps, at most this long.
    Adaptive(Duration),
}

impl PollPolicy {
    /// The policy of a server configuration: a fixed window if `poll_us` is set, else
    /// adaptive up to `adaptive_max_us` (0: off).
    pub(crate) fn from_config(poll_us: u64, adaptive_max_us: u64) -> Self {
        if poll_us > 0 {
            PollPolicy::Fixed(Duration::from_micros(poll_us))
        } else if adaptive_max_us > 0 {
            PollPolicy::Adaptive(Duration::from_micros(adaptive_max_us))
        } else {
            PollPolicy::Off
        }
    }
}

/// Weight of a new gap in the moving average, as a power of 2 (1/8).
const EWMA_SHIFT: u32 = 3;
/// Gaps longer than this many caps count as this many caps (one idle period must not
/// keep a busy queue from polling for long).
const GAP_CLAMP_CAPS: u64 = 4;
/// The window is this many typical gaps (rounded up to the next microsecond).
const WINDOW_GAPS: u64 = 2;

/// The poll state of one ring.
#[derive(Clone, Debug)]
pub(crate) struct Poller {
    policy: PollPolicy,
    /// Moving average of recent gaps, in nanoseconds (adaptive policy).
    avg_gap_ns: u64,
    /// When the ring was last found empty or completions were last returned, if no
    /// buffer was seen since.
    armed_at: Option<Instant>,
}

impl Poller {
    pub(crate) fn new(policy: PollPolicy) -> Self {
        let avg_gap_ns = match policy {
            // Start as if gaps were at the cap: the first windows are short and
            // the average settles within a few requests.
            PollPolicy::Adaptive(cap) => nanos(cap),
            _ => 0,
        };
        Poller {
            policy,
            avg_gap_ns,
            armed_at: None,
        }
    }

    /// The ring was found empty, or completions were returned to the driver, at `now`:
    /// returns how long to poll before sleeping (zero: sleep now).
    pub(crate) fn arm(&mut self, now: Instant) -> Duration {
        self.armed_at = Some(now);
        self.window()
    }

    /// A buffer was seen at `now` (by polling or after a kick): learns the gap since the
    /// ring was armed.
    pub(crate) fn observe(&mut self, now: Instant) {
        let Some(t0) = self.armed_at.take() else {
            return;
        };
        let PollPolicy::Adaptive(cap) = self.policy else {
            return;
        };
        let gap = nanos(now.saturating_duration_since(t0)).min(GAP_CLAMP_CAPS * nanos(cap));
        // avg += (gap - avg) / 8, in integers.
        self.avg_gap_ns = if gap >= self.avg_gap_ns {
            self.avg_gap_ns + ((gap - self.avg_gap_ns) >> EWMA_SHIFT)
        } else {
            self.avg_gap_ns - ((self.avg_gap_ns - gap) >> EWMA_SHIFT)
        };
    }

    /// The poll window now.
    pub(crate) fn window(&self) -> Duration {
        match self.policy {
            PollPolicy::Off => Duration::ZERO,
            PollPolicy::Fixed(d) => d,
            PollPolicy::Adaptive(cap) => {
                if self.avg_gap_ns > nanos(cap) {
                    return Duration::ZERO;
                }
                let w = (WINDOW_GAPS * self.avg_gap_ns).div_ceil(1000).max(1);
                Duration::from_micros(w).min(cap)
            }
        }
    }

    /// True unless the policy is [`PollPolicy::Off`].
    pub(crate) fn enabled(&self) -> bool {
        self.policy != PollPolicy::Off
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Duration = Duration::from_micros(50);

    fn feed(p: &mut Poller, gap: Duration, times: usize) {
        let mut t = Instant::now();
        for _ in 0..times {
            p.arm(t);
            t += gap;
            p.observe(t);
        }
    }

    #[test]
    fn adaptive_window_follows_short_gaps() {
        let mut p = Poller::new(PollPolicy::Adaptive(CAP));
        feed(&mut p, Duration::from_micros(10), 40);
        let w = p.window();
        assert!(
            w >= Duration::from_micros(18) && w <= Duration::from_micros(22),
            "{w:?}"
        );
    }

    #[test]
    fn adaptive_window_closes_for_gaps_beyond_the_cap() {
        let mut p = Poller::new(PollPolicy::Adaptive(CAP));
        feed(&mut p, Duration::from_millis(5), 20);
        assert_eq!(p.window(), Duration::ZERO);
    }

    #[test]
    fn adaptive_window_never_exceeds_the_cap() {
        let mut p = Poller::new(PollPolicy::Adaptive(CAP));
        feed(&mut p, Duration::from_micros(45), 40);
        assert_eq!(p.window(), CAP);
    }

    #[test]
    fn one_idle_period_does_not_stop_polling_for_long() {
        let mut p = Poller::new(PollPolicy::Adaptive(CAP));
        feed(&mut p, Duration::from_micros(10), 40);
        feed(&mut p, Duration::from_secs(10), 1);
        feed(&mut p, Duration::from_micros(10), 8);
        assert!(p.window() > Duration::ZERO, "{:?}", p.window());
    }

    #[test]
    fn fixed_and_off_policies_ignore_gaps() {
        let mut fixed = Poller::new(PollPolicy::Fixed(Duration::from_micros(7)));
        feed(&mut fixed, Duration::from_secs(1), 3);
        assert_eq!(fixed.window(), Duration::from_micros(7));
        let mut off = Poller::new(PollPolicy::Off);
        feed(&mut off, Duration::from_micros(1), 3);
        assert_eq!(off.window(), Duration::ZERO);
        assert!(!off.enabled());
    }

    #[test]
    fn a_gap_is_learned_once_per_arming() {
        let mut p = Poller::new(PollPolicy::Adaptive(CAP));
        let t = Instant::now();
        p.arm(t);
        p.observe(t + Duration::from_micros(1));
        let after_one = p.avg_gap_ns;
        // A second sighting without a new arming changes nothing.
        p.observe(t + Duration::from_micros(2));
        assert_eq!(p.avg_gap_ns, after_one);
    }

    #[test]
    fn policy_from_config() {
        assert_eq!(
            PollPolicy::from_config(20, 50),
            PollPolicy::Fixed(Duration::from_micros(20))
        );
        assert_eq!(
            PollPolicy::from_config(0, 50),
            PollPolicy::Adaptive(Duration::from_micros(50))
        );
        assert_eq!(PollPolicy::from_config(0, 0), PollPolicy::Off);
    }
}
