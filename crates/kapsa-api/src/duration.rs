//! Durations as the CRDs accept them: `spec.source.pollInterval` and
//! `spec.previewEnvironments.ttl` of a Project.
//!
//! The language is a subset of Go's `time.ParseDuration` (which is what the
//! API server's CEL `duration()` uses to enforce the minimums): one or more
//! numbers, each followed by a unit `ns`, `us`, `ms`, `s`, `m` or `h`, e.g.
//! `30s`, `5m`, `1h30m`, `1.5h`, `250ms`. A number has 1 to
//! [`MAX_INTEGER_DIGITS`] digits, optionally a `.` and 1 to
//! [`MAX_FRACTION_DIGITS`] digits. No sign, no spaces, no bare `0`, no `µs`,
//! at most [`MAX_DURATION_LEN`] characters. The digit bound keeps every
//! accepted string far below Go's limit (about 2,562,047 hours), so the
//! API server's `duration()` never overflows on a string the pattern accepts.
//!
//! [`parse`] accepts exactly the strings of [`DURATION`] and computes the
//! value the way Go does (fractions with Go's float arithmetic, truncated to
//! the nanosecond). Field minimums are separate: [`MIN_POLL_INTERVAL`] and
//! [`MIN_PREVIEW_TTL`], applied by [`poll_interval`] and [`preview_ttl`] and by
//! the CRD's CEL rules.

use std::time::Duration;

pub use crate::validation::{DURATION, MAX_DURATION_LEN};

/// Most digits before the decimal point of one number.
pub const MAX_INTEGER_DIGITS: usize = 5;
/// Most digits after the decimal point of one number.
pub const MAX_FRACTION_DIGITS: usize = 9;

/// The smallest `spec.source.pollInterval` admission accepts.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_secs(10);
/// The smallest `spec.previewEnvironments.ttl` admission accepts.
pub const MIN_PREVIEW_TTL: Duration = Duration::from_secs(60);

const NANOS_PER_MICRO: u64 = 1_000;
const NANOS_PER_MILLI: u64 = 1_000_000;
const NANOS_PER_SECOND: u64 = 1_000_000_000;
const NANOS_PER_MINUTE: u64 = 60 * NANOS_PER_SECOND;
const NANOS_PER_HOUR: u64 = 60 * NANOS_PER_MINUTE;

/// Parses a duration of the CRD language ([`DURATION`]): `Some` for exactly
/// the strings the pattern accepts, `None` for every other string (never a
/// fallback value).
///
/// ```
/// use std::time::Duration;
/// use kapsa_api::duration::parse;
///
/// assert_eq!(parse("1h30m"), Some(Duration::from_secs(5400)));
/// assert_eq!(parse("1.5s"), Some(Duration::from_millis(1500)));
/// assert_eq!(parse("500us"), Some(Duration::from_micros(500)));
/// assert_eq!(parse("1d"), None);
/// assert_eq!(parse("60"), None);
/// ```
pub fn parse(text: &str) -> Option<Duration> {
    if text.is_empty() || text.len() > MAX_DURATION_LEN {
        return None;
    }
    let bytes = text.as_bytes();
    let mut at = 0;
    let mut total: u64 = 0;
    while at < bytes.len() {
        let (whole, after_whole) = digits(bytes, at, MAX_INTEGER_DIGITS)?;
        at = after_whole;
        // Go: `f` is the fraction's digits as an integer, `scale` 10^digits.
        let mut fraction: u64 = 0;
        let mut scale: f64 = 1.0;
        if bytes.get(at) == Some(&b'.') {
            let (digits_after, after_fraction) = digits(bytes, at + 1, MAX_FRACTION_DIGITS)?;
            fraction = digits_after;
            for _ in at + 1..after_fraction {
                scale *= 10.0;
            }
            at = after_fraction;
        }
        let rest = &bytes[at..];
        let (unit, unit_len) = if rest.starts_with(b"ns") {
            (1, 2)
        } else if rest.starts_with(b"us") {
            (NANOS_PER_MICRO, 2)
        } else if rest.starts_with(b"ms") {
            (NANOS_PER_MILLI, 2)
        } else if rest.starts_with(b"s") {
            (NANOS_PER_SECOND, 1)
        } else if rest.starts_with(b"m") {
            (NANOS_PER_MINUTE, 1)
        } else if rest.starts_with(b"h") {
            (NANOS_PER_HOUR, 1)
        } else {
            return None;
        };
        at += unit_len;
        let mut value = whole.checked_mul(unit)?;
        if fraction > 0 {
            // The same float expression as Go's time.ParseDuration, so that
            // a fraction lands on the same nanosecond as in CEL's duration().
            // The product is below `unit` (at most 3.6e12): no truncation
            // beyond the nanosecond.
            let part = (fraction as f64 * (unit as f64 / scale)) as u64;
            value = value.checked_add(part)?;
        }
        total = total.checked_add(value)?;
    }
    // Go durations are signed 64-bit nanoseconds.
    if total > i64::MAX as u64 {
        return None;
    }
    Some(Duration::from_nanos(total))
}

/// One run of 1..=`max` ASCII digits starting at `at`: its value and the
/// index after it.
fn digits(bytes: &[u8], at: usize, max: usize) -> Option<(u64, usize)> {
    let len = bytes
        .get(at..)?
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    if len == 0 || len > max {
        return None;
    }
    let value = bytes[at..at + len]
        .iter()
        .fold(0u64, |acc, b| acc * 10 + u64::from(b - b'0'));
    Some((value, at + len))
}

/// A `spec.source.pollInterval` as admission accepts it: [`parse`], and at
/// least [`MIN_POLL_INTERVAL`].
pub fn poll_interval(text: &str) -> Option<Duration> {
    parse(text).filter(|d| *d >= MIN_POLL_INTERVAL)
}

/// A `spec.previewEnvironments.ttl` as admission accepts it: [`parse`], and
/// at least [`MIN_PREVIEW_TTL`].
pub fn preview_ttl(text: &str) -> Option<Duration> {
    parse(text).filter(|d| *d >= MIN_PREVIEW_TTL)
}

/// `d` as a duration string of the CRD language in whole seconds, e.g.
/// `10s` (for CEL rules that compare with a minimum).
pub fn as_seconds(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(n: u64) -> Option<Duration> {
        Some(Duration::from_nanos(n))
    }

    #[test]
    fn values() {
        let s = NANOS_PER_SECOND;
        for (text, want) in [
            ("60s", ns(60 * s)),
            ("10s", ns(10 * s)),
            ("5m", ns(300 * s)),
            ("72h", ns(72 * 3600 * s)),
            ("1h30m", ns(5400 * s)),
            ("1h1h", ns(7200 * s)),
            ("1.5s", ns(1_500_000_000)),
            ("1.5h", ns(5400 * s)),
            ("0.5m", ns(30 * s)),
            ("1.000000001s", ns(1_000_000_001)),
            ("250ms", ns(250_000_000)),
            ("9999ms", ns(9_999_000_000)),
            ("10000ms", ns(10 * s)),
            ("500us", ns(500_000)),
            ("7ns", ns(7)),
            ("1.9ns", ns(1)),
            ("0.001us", ns(1)),
            ("0s", ns(0)),
            ("00010s", ns(10 * s)),
            ("9s999ms999us1000ns", ns(10 * s)),
            ("1m0.000000001s", ns(60 * s + 1)),
            ("99999h", ns(99_999 * 3600 * s)),
            (
                "99999.999999999h",
                ns(99_999 * 3600 * s + 3_599_999_996_400),
            ),
        ] {
            assert_eq!(parse(text), want, "{text}");
        }
    }

    #[test]
    fn refusals() {
        for text in [
            "",
            "0",
            "60",
            "s",
            "h1",
            "1d",
            "1w",
            "1y",
            "1S",
            "1H",
            "1 s",
            " 1s",
            "1s ",
            "+1s",
            "-1s",
            ".5s",
            "1.s",
            "1..5s",
            "1.5.5s",
            "1e3s",
            "1µs",
            "1μs",
            "1sec",
            "1mus",
            "1mh",
            "1hm",
            "100000s",
            "1.0000000001s",
            "1h 30m",
            "1h,30m",
            "ten seconds",
            "0x10s",
            "99999h99999h99999h99999h99999h9h9",
        ] {
            assert_eq!(parse(text), None, "{text:?}");
        }
        // At most MAX_DURATION_LEN characters, even when well formed.
        let long = "1s".repeat(MAX_DURATION_LEN / 2 + 1);
        assert_eq!(parse(&long), None);
        assert!(parse(&"1s".repeat(MAX_DURATION_LEN / 2)).is_some());
    }

    #[test]
    fn minimums() {
        assert_eq!(poll_interval("10s"), Some(MIN_POLL_INTERVAL));
        assert_eq!(poll_interval("9.999999999s"), None);
        assert_eq!(poll_interval("9999ms"), None);
        assert_eq!(poll_interval("1d"), None);
        assert_eq!(preview_ttl("1m"), Some(MIN_PREVIEW_TTL));
        assert_eq!(preview_ttl("59s999ms"), None);
        assert_eq!(preview_ttl("72h"), Some(Duration::from_secs(72 * 3600)));
        assert_eq!(as_seconds(MIN_POLL_INTERVAL), "10s");
        assert_eq!(as_seconds(MIN_PREVIEW_TTL), "60s");
    }

    /// A small deterministic generator (SplitMix64), so that the property
    /// tests below need no extra crate and fail reproducibly.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % n as u64).expect("small")
        }

        fn digits(&mut self, max: usize) -> String {
            (0..=self.below(max))
                .map(|_| char::from(b'0' + u8::try_from(self.below(10)).expect("digit")))
                .collect()
        }
    }

    const UNITS: [(&str, u64); 6] = [
        ("ns", 1),
        ("us", NANOS_PER_MICRO),
        ("ms", NANOS_PER_MILLI),
        ("s", NANOS_PER_SECOND),
        ("m", NANOS_PER_MINUTE),
        ("h", NANOS_PER_HOUR),
    ];

    /// A random string of the pattern's language and its exact value in
    /// nanoseconds, computed with integers (floor of each fraction).
    fn generate(rng: &mut Rng) -> (String, u128) {
        loop {
            let mut text = String::new();
            let mut exact: u128 = 0;
            for _ in 0..=rng.below(4) {
                let whole = rng.digits(MAX_INTEGER_DIGITS);
                let (unit, nanos) = UNITS[rng.below(UNITS.len())];
                let mut value = whole.parse::<u128>().expect("digits") * u128::from(nanos);
                text.push_str(&whole);
                if rng.below(3) == 0 {
                    let fraction = rng.digits(MAX_FRACTION_DIGITS);
                    let scale = 10u128.pow(u32::try_from(fraction.len()).expect("short"));
                    value += fraction.parse::<u128>().expect("digits") * u128::from(nanos) / scale;
                    text.push('.');
                    text.push_str(&fraction);
                }
                text.push_str(unit);
                exact += value;
            }
            if text.len() <= MAX_DURATION_LEN {
                return (text, exact);
            }
        }
    }

    #[test]
    fn every_string_of_the_language_parses_to_its_value() {
        let mut rng = Rng(0x4B41_5053);
        for _ in 0..20_000 {
            let (text, exact) = generate(&mut rng);
            let parsed = parse(&text).unwrap_or_else(|| panic!("{text:?} refused"));
            let got = parsed.as_nanos();
            // Go computes fractions of ms, us and ns in floating point; the
            // difference to exact integer arithmetic stays below 1 ns per
            // number. Fractions of s, m and h are exact.
            assert!(
                got.abs_diff(exact) <= 4,
                "{text:?}: parsed {got} ns, exact {exact} ns"
            );
            assert!(got <= i64::MAX as u128, "{text:?} overflows Go");
        }
    }

    #[test]
    fn mutations_outside_the_language_are_refused() {
        // Each mutation leaves the language: a character that never occurs,
        // a sign, a unit after a unit, a number without unit, a number
        // with too many digits.
        let mut rng = Rng(7);
        for _ in 0..5_000 {
            let (text, _) = generate(&mut rng);
            let cut = rng.below(text.len() + 1);
            let (head, tail) = text.split_at(cut);
            let broken = [
                format!("{head} {tail}"),
                format!("{head}d{tail}"),
                format!("-{text}"),
                format!("{text}5"),
                format!("{text}h"),
                format!("{text}.5s"),
                format!("{head}+{tail}"),
                format!("{}{text}", "1".repeat(MAX_INTEGER_DIGITS + 1)),
                format!("{text}1.{}s", "1".repeat(MAX_FRACTION_DIGITS + 1)),
            ];
            for candidate in broken {
                assert_eq!(parse(&candidate), None, "{candidate:?} (from {text:?})");
            }
        }
    }

    #[test]
    fn the_longest_strings_stay_far_below_go_overflow() {
        // The largest value per character is a 5-digit number of hours.
        let biggest = "99999h".repeat(MAX_DURATION_LEN / 6) + "9m";
        assert_eq!(biggest.len(), MAX_DURATION_LEN);
        let d = parse(&biggest).expect("in the language");
        assert!(d.as_nanos() < i64::MAX as u128 / 4, "{d:?}");
    }
}
