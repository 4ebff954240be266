//! Rate limits for LAN replies, so this host cannot be used to amplify
//! traffic towards a spoofed source: a token bucket for all replies and one
//! per source address. Time is passed in, so the rules are tested without
//! sleeping.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

#[derive(Clone, Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn full(capacity: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: capacity,
            updated: now,
        }
    }

    fn take(&mut self, rate: f64, capacity: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(capacity);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Replies per second overall and per source, with bursts of twice that.
pub struct ReplyLimiter {
    total_rate: f64,
    source_rate: f64,
    total: Bucket,
    sources: HashMap<IpAddr, Bucket>,
}

/// Sources remembered at most; past this the table starts afresh, which at
/// worst lets a flood of fresh sources through at the overall rate.
const MAX_SOURCES: usize = 1024;

impl ReplyLimiter {
    pub fn new(total_rate: f64, source_rate: f64, now: Instant) -> ReplyLimiter {
        ReplyLimiter {
            total_rate,
            source_rate,
            total: Bucket::full(total_rate * 2.0, now),
            sources: HashMap::new(),
        }
    }

    /// Whether a reply to `source` may go out now.
    pub fn allow(&mut self, source: IpAddr, now: Instant) -> bool {
        if self.sources.len() >= MAX_SOURCES && !self.sources.contains_key(&source) {
            self.sources.clear();
        }
        let capacity = self.source_rate * 2.0;
        let bucket = self
            .sources
            .entry(source)
            .or_insert_with(|| Bucket::full(capacity, now));
        // Only a reply both buckets allow costs a token from the overall one.
        if !bucket.take(self.source_rate, capacity, now) {
            return false;
        }
        self.total.take(self.total_rate, self.total_rate * 2.0, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn a_source_gets_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut limiter = ReplyLimiter::new(1000.0, 10.0, t0);
        let allowed = (0..100).filter(|_| limiter.allow(ip(1), t0)).count();
        assert_eq!(allowed, 20, "burst of twice the per-source rate");
        assert!(limiter.allow(ip(2), t0), "another source is not held back");
        let later = t0 + Duration::from_millis(500);
        let allowed = (0..100).filter(|_| limiter.allow(ip(1), later)).count();
        assert_eq!(allowed, 5, "10/s refills 5 in half a second");
    }

    #[test]
    fn the_total_is_capped_across_sources() {
        let t0 = Instant::now();
        let mut limiter = ReplyLimiter::new(5.0, 100.0, t0);
        let allowed = (0..50u8).filter(|&n| limiter.allow(ip(n), t0)).count();
        assert_eq!(allowed, 10);
        let allowed = (0..2000u16)
            .filter(|&n| limiter.allow(IpAddr::from([10, 1, (n >> 8) as u8, n as u8]), t0))
            .count();
        assert_eq!(allowed, 0, "a flood of fresh sources is still capped");
    }
}
