//! A limit on log lines that packets can trigger: at most one line of a kind per period, which
//! reports how many were held back since the last one. A flood of DECLINEs, or a socket that
//! fails on every datagram, then costs a line every few seconds instead of one per packet.
//! Pure: the caller passes the time, in seconds.

/// How often a warning of one kind may be written.
pub const WARN_EVERY_SECS: u64 = 10;

#[derive(Clone, Copy, Debug)]
pub struct Throttle {
    every: u64,
    /// The first second at which the next line may be written.
    next: u64,
    /// Lines held back since the last one written.
    suppressed: u64,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new(WARN_EVERY_SECS)
    }
}

impl Throttle {
    pub const fn new(every_secs: u64) -> Self {
        Throttle { every: every_secs, next: 0, suppressed: 0 }
    }

    /// `Some(held back since the last line)` if a line may be written at `now`; else `None`,
    /// and the line is counted as held back.
    pub fn check(&mut self, now: u64) -> Option<u64> {
        if now >= self.next {
            self.next = now.saturating_add(self.every);
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
    fn one_line_per_period_with_the_count_held_back() {
        let mut t = Throttle::new(10);
        assert_eq!(t.check(100), Some(0));
        let held = (0..1000).filter(|i| t.check(100 + i % 10).is_none()).count();
        assert_eq!(held, 1000);
        assert_eq!(t.check(110), Some(1000));
        assert_eq!(t.check(111), None);
        // A quiet spell: the next line goes out at once.
        assert_eq!(t.check(500), Some(1));
    }

    #[test]
    fn a_clock_near_the_end_of_time_does_not_overflow() {
        let mut t = Throttle::new(10);
        assert_eq!(t.check(u64::MAX - 1), Some(0));
        assert_eq!(t.check(u64::MAX), Some(0));
    }
}
