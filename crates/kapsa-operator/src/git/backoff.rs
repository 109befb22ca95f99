use std::time::Duration;

/// The longest delay that failures alone back off to.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10 * 60);

/// The smallest base delay after a failure, so that a zero `poll_interval`
/// cannot make a failing remote a hot loop.
const MIN_FAILURE_BASE: Duration = Duration::from_secs(1);

/// The delay before the next poll of a remote.
///
/// - On success (`consecutive_failures == 0`): `poll_interval` ± up to 10%,
///   so that many Projects with the same interval spread out.
/// - After failures: `poll_interval * 2^consecutive_failures`, capped at
///   [`MAX_BACKOFF`] (or at `poll_interval` if that is longer, so failing
///   never polls faster than succeeding), minus up to 10% jitter: the result
///   never exceeds the cap. The base is at least 1 s, even for a zero
///   interval.
///
/// `jitter_seed` picks the jitter deterministically (hash it from the Project
/// and the attempt, or pass a random number); the function is pure.
pub fn backoff_delay(
    poll_interval: Duration,
    consecutive_failures: u32,
    jitter_seed: u64,
) -> Duration {
    // A uniform fraction in [0, 1) with 53 bits of precision.
    let unit = (splitmix64(jitter_seed) >> 11) as f64 / (1u64 << 53) as f64;
    if consecutive_failures == 0 {
        let spread = poll_interval.as_secs_f64() * 0.1;
        let delay = poll_interval.as_secs_f64() - spread + 2.0 * spread * unit;
        return Duration::from_secs_f64(delay.max(0.0));
    }
    let cap = MAX_BACKOFF.max(poll_interval);
    let base = poll_interval.max(MIN_FAILURE_BASE);
    let factor = 2u32.saturating_pow(consecutive_failures.min(31));
    let base = base.checked_mul(factor).map_or(cap, |d| d.min(cap));
    let delay = base.as_secs_f64() * (1.0 - 0.1 * unit);
    Duration::from_secs_f64(delay).min(cap)
}

/// A fast, well-mixed 64-bit hash (SplitMix64's finaliser).
fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn success_stays_within_ten_percent() {
        let (mut lo, mut hi) = (Duration::MAX, Duration::ZERO);
        for seed in 0..10_000u64 {
            let d = backoff_delay(MINUTE, 0, seed);
            assert!(
                d >= Duration::from_secs(54) && d <= Duration::from_secs(66),
                "{d:?}"
            );
            lo = lo.min(d);
            hi = hi.max(d);
        }
        // The jitter really spreads: both ends of the range are reached.
        assert!(lo < Duration::from_secs(55), "{lo:?}");
        assert!(hi > Duration::from_secs(65), "{hi:?}");
    }

    #[test]
    fn same_seed_same_delay_different_seeds_differ() {
        assert_eq!(backoff_delay(MINUTE, 0, 42), backoff_delay(MINUTE, 0, 42));
        assert_eq!(backoff_delay(MINUTE, 3, 42), backoff_delay(MINUTE, 3, 42));
        assert_ne!(backoff_delay(MINUTE, 0, 1), backoff_delay(MINUTE, 0, 2));
    }

    #[test]
    fn failures_back_off_exponentially() {
        let interval = Duration::from_secs(10);
        for failures in 1..=5u32 {
            let base = interval * 2u32.pow(failures);
            for seed in 0..1_000u64 {
                let d = backoff_delay(interval, failures, seed);
                assert!(
                    d <= base && d >= base.mul_f64(0.9),
                    "failures {failures}: {d:?}"
                );
            }
        }
        // Monotonic in expectation: each level's lowest is above the previous level's highest.
        let max_at = |f| {
            (0..1_000u64)
                .map(|s| backoff_delay(interval, f, s))
                .max()
                .unwrap()
        };
        let min_at = |f| {
            (0..1_000u64)
                .map(|s| backoff_delay(interval, f, s))
                .min()
                .unwrap()
        };
        for f in 1..5 {
            assert!(min_at(f + 1) > max_at(f));
        }
    }

    #[test]
    fn failures_are_capped_at_ten_minutes() {
        for failures in [6u32, 10, 31, 32, 64, u32::MAX] {
            for seed in 0..1_000u64 {
                let d = backoff_delay(MINUTE, failures, seed);
                assert!(d <= MAX_BACKOFF, "{failures}: {d:?}");
                assert!(d >= MAX_BACKOFF.mul_f64(0.9), "{failures}: {d:?}");
            }
        }
    }

    #[test]
    fn long_intervals_are_never_shortened_by_failures() {
        let hour = Duration::from_secs(3600);
        for seed in 0..100u64 {
            let d = backoff_delay(hour, 3, seed);
            assert!(d <= hour && d >= hour.mul_f64(0.9), "{d:?}");
        }
    }

    #[test]
    fn zero_interval() {
        assert_eq!(backoff_delay(Duration::ZERO, 0, 7), Duration::ZERO);
        let d = backoff_delay(Duration::ZERO, 1, 7);
        assert!(
            d >= Duration::from_millis(1800) && d <= Duration::from_secs(2),
            "{d:?}"
        );
    }
}
