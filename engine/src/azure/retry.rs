//! When to try a request again, and how long to wait first.
//!
//! Job: sort every outcome of one attempt into "done", "try again" or "fatal", and choose the
//! pause before the next attempt. Retried: the statuses [`crate::http_error::is_transient`]
//! names (408, 429, 500, 502, 503, 504), and attempts that got
//! no whole answer (connection refused, reset, timed out, a body cut short). Every other
//! status is reported at once as what it is (a 403 is "access denied", never "no answer after
//! N tries"). The pause is exponential backoff with full jitter, except that a `Retry-After`
//! from the service (seconds or an HTTP date) is honoured, up to [`RETRY_AFTER_CAP`].

use std::time::Duration;

/// The longest `Retry-After` obeyed; a longer one is taken as this (the service asked for a
/// pause, not for the backup to hang).
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(120);

/// How hard to try.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub tries: u32,
    /// First backoff; doubles per retry, with full jitter.
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Time limit of one attempt (connect, send, receive).
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            tries: 6,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(30),
            timeout: Duration::from_secs(120),
        }
    }
}

/// The pause a `Retry-After` header asks for: delta-seconds or an HTTP date, capped at
/// [`RETRY_AFTER_CAP`]; `None` when absent or unreadable.
#[cfg(feature = "azure")]
pub fn retry_after(value: Option<&str>, now: std::time::SystemTime) -> Option<Duration> {
    let value = value?.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(wait.min(RETRY_AFTER_CAP))
}

impl RetryPolicy {
    /// The pause after failed attempt number `attempt` (1-based): the service's `Retry-After`
    /// when it sent one, otherwise full jitter, uniform in
    /// `[0, min(max_delay, base_delay * 2^(attempt-1))]`.
    pub fn delay(&self, attempt: u32, asked: Option<Duration>) -> Duration {
        if let Some(asked) = asked {
            return asked;
        }
        let cap = self
            .base_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.max_delay);
        let mut r = [0u8; 8];
        let frac = match getrandom::fill(&mut r) {
            Ok(()) => (u64::from_le_bytes(r) >> 11) as f64 / (1u64 << 53) as f64,
            Err(_) => 0.5,
        };
        cap.mul_f64(frac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(feature = "azure")]
    fn retry_after_reads_seconds_and_dates() {
        use std::time::SystemTime;
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(retry_after(Some("3"), now), Some(Duration::from_secs(3)));
        assert_eq!(
            retry_after(Some("Sun, 06 Nov 1994 08:49:42 GMT"), now),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            retry_after(Some("Sun, 06 Nov 1994 08:49:00 GMT"), now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(Some("86400"), now), Some(RETRY_AFTER_CAP));
        assert_eq!(retry_after(Some("soon"), now), None);
        assert_eq!(retry_after(None, now), None);
    }

    #[test]
    fn backoff_grows_within_its_cap_and_yields_to_retry_after() {
        let p = RetryPolicy {
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(40),
            ..Default::default()
        };
        for attempt in 1..40 {
            assert!(p.delay(attempt, None) <= Duration::from_millis(40));
        }
        assert!(p.delay(1, None) <= Duration::from_millis(10));
        let asked = Some(Duration::from_secs(2));
        assert_eq!(p.delay(1, asked), Duration::from_secs(2));
    }
}
