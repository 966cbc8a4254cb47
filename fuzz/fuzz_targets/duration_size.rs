//! `idem::config::parse_duration` and `parse_size`, the values of `--ttl`, `--lease`,
//! `--max-request-body` and the like (from flags, `IDEM_*` variables or the config file).
//!
//! Input: the text of a value. Checks that neither parser panics, and:
//! - a size it accepts reads the same in upper or lower case, with surrounding whitespace,
//!   and written back as a plain number of bytes;
//! - a size built from the input's first bytes (a number and one of the documented units) is
//!   exactly number x unit, or refused as too large exactly when that overflows a u64;
//! - a duration written with a leading `-` is refused; a duration it accepts, written back by
//!   `humantime`, reads the same;
//! - `N s`, `N m` and `N h` read as N seconds, minutes and hours.
#![no_main]

use std::time::Duration;

use idem::config::{parse_duration, parse_size};
use idem_fuzz::Input;
use libfuzzer_sys::fuzz_target;

/// The documented units and their multipliers.
const UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("B", 1),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("k", 1 << 10),
    ("m", 1 << 20),
    ("g", 1 << 30),
    (" MiB", 1 << 20),
];

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let number = input.u64();
    let (unit, multiplier) = UNITS[input.byte() as usize % UNITS.len()];
    let built = parse_size("fuzz", &format!("{number}{unit}")).ok();
    assert_eq!(built, number.checked_mul(multiplier), "{number}{unit}");

    let Ok(text) = std::str::from_utf8(data) else { return };

    if let Ok(bytes) = parse_size("fuzz", text) {
        for variant in [text.to_ascii_uppercase(), text.to_ascii_lowercase(), format!(" {text}\t")]
        {
            assert_eq!(parse_size("fuzz", &variant).ok(), Some(bytes), "{variant:?}");
        }
        assert_eq!(parse_size("fuzz", &bytes.to_string()).ok(), Some(bytes));
    }

    let duration = parse_duration("fuzz", text);
    if text.trim_start().starts_with('-') {
        assert!(duration.is_err(), "negative {text:?} accepted");
    }
    if let Ok(duration) = duration {
        let written = humantime::format_duration(duration).to_string();
        assert_eq!(parse_duration("fuzz", &written).ok(), Some(duration), "{written:?}");
    }

    let count = number % 1_000_000_000;
    for (suffix, seconds) in [("s", 1), ("m", 60), ("h", 3600)] {
        let parsed = parse_duration("fuzz", &format!("{count}{suffix}")).ok();
        assert_eq!(parsed, Some(Duration::from_secs(count * seconds)), "{count}{suffix}");
    }
});
