//! Bounds on what a client connection may cost (peerix addition), and the
//! bookkeeping that enforces the connection caps.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Bounds on what connections may cost. `Default` gives sane values.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Open connections at most (default 512). Connections past it are
    /// accepted and closed at once.
    pub max_connections: usize,
    /// Of those, connections from non-loopback peers (default 384): loopback
    /// clients always keep the rest.
    pub max_remote_connections: usize,
    /// Connections from one non-loopback IP address (default 64).
    pub max_connections_per_ip: usize,
    /// A request head must arrive whole within this time of its first byte
    /// (default 10 s). It is a deadline over all reads, not a per-read
    /// timeout. On a new connection the first request's head must arrive
    /// within this time of the accept.
    pub head_timeout: Duration,
    /// How long a kept-alive connection waits for the first byte of its next
    /// request (default 60 s).
    pub idle_timeout: Duration,
    /// The request line and each header line at most, checked while reading
    /// (default 8 KiB, line end included).
    pub max_line: usize,
    /// The whole request head at most (default 16 KiB); this also bounds the
    /// number of headers.
    pub max_head: usize,
    /// A request body the application left unread is read and thrown away,
    /// through a small fixed buffer, up to this many bytes (default 64 KiB).
    /// A larger one, or one that does not arrive in time, closes the
    /// connection instead.
    pub max_drain: u64,
    /// Per-read timeout while the application reads a body (default 10 s);
    /// also the deadline for draining an unread body.
    pub body_timeout: Duration,
    /// Queue loopback clients' requests apart from the others (default
    /// false): [`crate::Server::recv`] then returns only non-loopback
    /// requests and [`crate::Server::recv_loopback`] the loopback ones, so
    /// an application can keep workers for itself that no remote client can
    /// hold.
    pub separate_loopback: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 512,
            max_remote_connections: 384,
            max_connections_per_ip: 64,
            head_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_line: 8 * 1024,
            max_head: 16 * 1024,
            max_drain: 64 * 1024,
            body_timeout: Duration::from_secs(10),
            separate_loopback: false,
        }
    }
}

/// Whether a peer counts as local. Unix-socket peers (no address) do;
/// IPv4-mapped IPv6 loopback addresses do.
pub(crate) fn is_loopback(peer: Option<&SocketAddr>) -> bool {
    peer.is_none_or(|p| p.ip().to_canonical().is_loopback())
}

/// Counts open connections against the caps of a [`Limits`].
pub(crate) struct ConnLimiter {
    max_connections: usize,
    max_remote_connections: usize,
    max_connections_per_ip: usize,
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    remote: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Total,
    Remote,
    PerIp,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Total => "open connections at their cap",
            Refusal::Remote => "remote connections at their cap",
            Refusal::PerIp => "connections from this address at their cap",
        })
    }
}

/// One admitted connection; dropping it gives its place back.
pub(crate) struct ConnGuard {
    limiter: Arc<ConnLimiter>,
    /// The peer's address when it is not loopback.
    remote: Option<IpAddr>,
}

impl ConnLimiter {
    pub(crate) fn new(limits: &Limits) -> Arc<ConnLimiter> {
        Arc::new(ConnLimiter {
            max_connections: limits.max_connections,
            max_remote_connections: limits.max_remote_connections,
            max_connections_per_ip: limits.max_connections_per_ip,
            counts: Mutex::new(Counts::default()),
        })
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        // The counts stay consistent under every lock, so a poisoned lock is
        // still good to use.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a place for a connection from `peer`, if the caps allow it.
    pub(crate) fn admit(self: &Arc<Self>, peer: Option<&SocketAddr>) -> Result<ConnGuard, Refusal> {
        let mut counts = self.counts();
        if counts.total >= self.max_connections {
            return Err(Refusal::Total);
        }
        let remote = if is_loopback(peer) {
            None
        } else {
            // not loopback, so there is an address
            let ip = match peer {
                Some(p) => p.ip().to_canonical(),
                None => return Err(Refusal::Remote),
            };
            if counts.remote >= self.max_remote_connections {
                return Err(Refusal::Remote);
            }
            let from_ip = counts.per_ip.get(&ip).copied().unwrap_or(0);
            if from_ip >= self.max_connections_per_ip {
                return Err(Refusal::PerIp);
            }
            counts.per_ip.insert(ip, from_ip + 1);
            counts.remote += 1;
            Some(ip)
        };
        counts.total += 1;
        Ok(ConnGuard {
            limiter: Arc::clone(self),
            remote,
        })
    }

    /// Connections open now.
    pub(crate) fn open(&self) -> usize {
        self.counts().total
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut counts = self.limiter.counts();
        counts.total = counts.total.saturating_sub(1);
        if let Some(ip) = self.remote {
            counts.remote = counts.remote.saturating_sub(1);
            if let Some(n) = counts.per_ip.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    counts.per_ip.remove(&ip);
                }
            }
        }
    }
}

/// Lets one message through per interval and counts the ones held back, so a
/// storm of errors does not flood the log.
pub(crate) struct RateLimitedLog {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    pub(crate) fn new(interval: Duration) -> Self {
        RateLimitedLog {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` if a message may be logged now, `n` being how many were held
    /// back since the last one; `None` if this one is to be held back.
    pub(crate) fn admit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// How long the accept loop waits after `accept` failed with `error`.
///
/// Errors that concern only the connection being accepted (it was reset
/// before `accept`, or a signal came) are retried at once: sleeping on them
/// would let a client that resets its connections slow everybody else's
/// down. Everything else (EMFILE, ENFILE, ENOBUFS, ENOMEM, ...) leaves the
/// connection in the backlog and would fail again at once, so the loop
/// sleeps briefly: 50 ms after a first error, 100 ms after several in a row.
pub(crate) fn accept_retry_delay(error: &io::Error, consecutive: u32) -> Duration {
    match error.kind() {
        io::ErrorKind::ConnectionAborted
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::Interrupted
        | io::ErrorKind::WouldBlock => Duration::ZERO,
        _ if consecutive <= 1 => Duration::from_millis(50),
        _ => Duration::from_millis(100),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn loopback_includes_mapped_and_unix() {
        assert!(is_loopback(Some(&addr("127.0.0.1:1"))));
        assert!(is_loopback(Some(&addr("127.3.2.1:1"))));
        assert!(is_loopback(Some(&addr("[::1]:1"))));
        assert!(is_loopback(Some(&addr("[::ffff:127.0.0.1]:1"))));
        assert!(is_loopback(None));
        assert!(!is_loopback(Some(&addr("192.0.2.1:1"))));
        assert!(!is_loopback(Some(&addr("[::ffff:192.0.2.1]:1"))));
        assert!(!is_loopback(Some(&addr("[2001:db8::1]:1"))));
    }

    #[test]
    fn caps_and_release() {
        let limits = Limits {
            max_connections: 5,
            max_remote_connections: 3,
            max_connections_per_ip: 2,
            ..Limits::default()
        };
        let limiter = ConnLimiter::new(&limits);
        // Addresses are only counted here; nothing is sent to them.
        let a = addr("192.0.2.1:1000");
        let a_mapped = addr("[::ffff:192.0.2.1]:1001");
        let b = addr("192.0.2.2:1000");
        let c = addr("192.0.2.3:1000");
        let lo = addr("127.0.0.1:1000");

        let a1 = limiter.admit(Some(&a)).unwrap();
        let _a2 = limiter.admit(Some(&a_mapped)).unwrap();
        assert_eq!(limiter.admit(Some(&a)).err(), Some(Refusal::PerIp));
        let _b1 = limiter.admit(Some(&b)).unwrap();
        assert_eq!(limiter.admit(Some(&c)).err(), Some(Refusal::Remote));
        // loopback keeps the rest
        let l1 = limiter.admit(Some(&lo)).unwrap();
        let _l2 = limiter.admit(None).unwrap();
        assert_eq!(limiter.admit(Some(&lo)).err(), Some(Refusal::Total));
        assert_eq!(limiter.open(), 5);

        drop(l1);
        let _l3 = limiter.admit(Some(&lo)).unwrap();
        assert_eq!(limiter.admit(Some(&lo)).err(), Some(Refusal::Total));
        drop(a1);
        // a remote place is free again
        let _c1 = limiter.admit(Some(&c)).unwrap();
        assert_eq!(limiter.open(), 5);
        assert_eq!(limiter.admit(Some(&lo)).err(), Some(Refusal::Total));
    }

    #[test]
    fn guards_release_every_count() {
        let limiter = ConnLimiter::new(&Limits::default());
        let guards: Vec<_> = (0..10)
            .map(|i| {
                limiter
                    .admit(Some(&addr(&format!("198.51.100.{}:80", i % 3))))
                    .unwrap()
            })
            .collect();
        assert_eq!(limiter.open(), 10);
        drop(guards);
        let counts = limiter.counts();
        assert_eq!((counts.total, counts.remote), (0, 0));
        assert!(counts.per_ip.is_empty());
    }

    #[test]
    fn rate_limited_log() {
        let mut log = RateLimitedLog::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert_eq!(log.admit(t0), Some(0));
        for i in 0..1000 {
            assert_eq!(log.admit(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(log.admit(t0 + Duration::from_secs(5)), Some(1000));
        assert_eq!(log.admit(t0 + Duration::from_secs(6)), None);
    }

    #[test]
    fn accept_retry_policy() {
        let emfile = io::Error::from_raw_os_error(24);
        let enfile = io::Error::from_raw_os_error(23);
        let enobufs = io::Error::from_raw_os_error(105);
        for e in [&emfile, &enfile, &enobufs] {
            let first = accept_retry_delay(e, 1);
            let later = accept_retry_delay(e, 50);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            assert!(later >= Duration::from_millis(50) && later <= Duration::from_millis(100));
        }
        let aborted = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(accept_retry_delay(&aborted, 7), Duration::ZERO);
    }
}
