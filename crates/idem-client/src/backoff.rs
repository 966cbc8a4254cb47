//! The waiting between attempts, as pure functions of their inputs: exponential backoff with
//! full jitter, and the `Retry-After` header (delay-seconds or an HTTP-date).

use std::time::{Duration, SystemTime};

/// The delay before retry number `retry` (1 for the first retry), with full jitter: a uniform
/// draw from `[0, min(max_delay, base_delay * 2^(retry-1))]`, with `unit` the draw in `[0, 1)`.
///
/// Full jitter (rather than a fixed exponential schedule) spreads the retries of many clients
/// that failed together, so they do not come back as one wave.
pub fn full_jitter(retry: u32, base_delay: Duration, max_delay: Duration, unit: f64) -> Duration {
    ceiling(retry, base_delay, max_delay).mul_f64(unit.clamp(0.0, 1.0))
}

/// The top of the jitter range for retry number `retry`: `base_delay * 2^(retry-1)`, never more
/// than `max_delay` (and no overflow however large `retry` is).
pub fn ceiling(retry: u32, base_delay: Duration, max_delay: Duration) -> Duration {
    let doublings = retry.saturating_sub(1).min(31);
    base_delay.saturating_mul(1u32 << doublings).min(max_delay)
}

/// A uniform draw in `[0, 1)` from the operating system's generator; `0.5` if it fails (a
/// delay in the middle of the range is still a bounded delay).
pub fn random_unit() -> f64 {
    match getrandom::u64() {
        // The top 53 bits: every value exactly representable, the result below 1.
        Ok(bits) => (bits >> 11) as f64 / (1u64 << 53) as f64,
        Err(_) => 0.5,
    }
}

/// Parses a `Retry-After` value (RFC 9110 section 10.2.3): delay-seconds (`120`) or an
/// HTTP-date (`Wed, 21 Oct 2015 07:28:00 GMT`), the latter as the time left from `now` (zero
/// if it has passed). `None` for anything else.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|byte| byte.is_ascii_digit()) {
        // Digits beyond u64 are a delay longer than any cap: saturate rather than refuse.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    #[test]
    fn the_ceiling_doubles_from_the_base_up_to_the_cap() {
        let ceilings: Vec<u128> =
            (1..=8).map(|retry| ceiling(retry, BASE, MAX).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        // Retry 0 (never asked for) is treated as the first.
        assert_eq!(ceiling(0, BASE, MAX), BASE);
        // No overflow, however many retries or however large the base.
        assert_eq!(ceiling(u32::MAX, BASE, MAX), MAX);
        assert_eq!(ceiling(40, Duration::MAX, MAX), MAX);
        assert_eq!(ceiling(3, Duration::from_secs(1), Duration::MAX), Duration::from_secs(4));
    }

    #[test]
    fn full_jitter_stays_within_zero_and_the_ceiling() {
        for retry in 1..=10 {
            let top = ceiling(retry, BASE, MAX);
            assert_eq!(full_jitter(retry, BASE, MAX, 0.0), Duration::ZERO);
            assert_eq!(full_jitter(retry, BASE, MAX, 0.5), top / 2);
            assert!(full_jitter(retry, BASE, MAX, 0.999_999) <= top);
            // A draw outside [0, 1) cannot leave the range either.
            assert_eq!(full_jitter(retry, BASE, MAX, 7.0), top);
            assert_eq!(full_jitter(retry, BASE, MAX, -1.0), Duration::ZERO);
        }
    }

    #[test]
    fn random_units_fall_in_zero_one_and_spread_out() {
        let draws: Vec<f64> = (0..2_000).map(|_| random_unit()).collect();
        assert!(draws.iter().all(|unit| (0.0..1.0).contains(unit)));
        // Spread over the range: each tenth of it gets some draws (the chance that one gets
        // none of 2,000 uniform draws is about 10 * 0.9^2000, nil).
        for tenth in 0..10 {
            let low = f64::from(tenth) / 10.0;
            assert!(
                draws.iter().any(|unit| (low..low + 0.1).contains(unit)),
                "no draw in [{low}, {})",
                low + 0.1
            );
        }
        // Jittered delays of one retry differ from each other: not a fixed schedule.
        let delays: std::collections::HashSet<Duration> =
            draws.iter().map(|unit| full_jitter(4, BASE, MAX, *unit)).collect();
        assert!(delays.len() > 1_000, "{} distinct delays of 2,000", delays.len());
    }

    #[test]
    fn retry_after_in_seconds() {
        let now = SystemTime::now();
        assert_eq!(parse_retry_after("0", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 120 ", now), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(Duration::from_secs(u64::MAX))
        );
        for bad in ["", "-1", "1.5", "3s", "soon", "+3", "0x10"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn retry_after_as_an_http_date() {
        // Wed, 21 Oct 2015 07:28:00 GMT is 1445412480 s after the epoch.
        let date = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        let value = "Wed, 21 Oct 2015 07:28:00 GMT";
        assert_eq!(
            parse_retry_after(value, date - Duration::from_secs(90)),
            Some(Duration::from_secs(90))
        );
        assert_eq!(parse_retry_after(value, date), Some(Duration::ZERO));
        // A date already past means "now", not an error.
        assert_eq!(
            parse_retry_after(value, date + Duration::from_secs(3600)),
            Some(Duration::ZERO)
        );
        // The obsolete forms RFC 9110 still asks recipients to accept.
        assert_eq!(
            parse_retry_after("Wednesday, 21-Oct-15 07:28:00 GMT", date - Duration::from_secs(5)),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            parse_retry_after("Wed Oct 21 07:28:00 2015", date - Duration::from_secs(5)),
            Some(Duration::from_secs(5))
        );
        assert_eq!(parse_retry_after("Wed, 32 Oct 2015 07:28:00 GMT", date), None);
        // One made by the same library round-trips to the second.
        let later = SystemTime::now() + Duration::from_secs(42);
        let now = later - Duration::from_secs(42);
        let parsed = parse_retry_after(&httpdate::fmt_http_date(later), now).unwrap();
        assert!(
            parsed <= Duration::from_secs(42) && parsed > Duration::from_secs(40),
            "{parsed:?}"
        );
    }
}
