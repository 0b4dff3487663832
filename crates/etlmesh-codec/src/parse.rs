//! Scalar parsers over raw bytes: integers, floats, booleans, dates and timestamps
//! (RFC 3339 text or epoch milliseconds). They allocate nothing.

/// Parses a decimal integer (optional sign, optional surrounding spaces).
pub fn parse_i64(b: &[u8]) -> Option<i64> {
    let b = b.trim_ascii();
    let (neg, digits) = match b.first()? {
        b'-' => (true, &b[1..]),
        b'+' => (false, &b[1..]),
        _ => (false, b),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut v: i64 = 0;
    for &c in digits {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(i64::from(d))?;
    }
    Some(if neg { -v } else { v })
}

/// Exact powers of ten as f64 (10^0 to 10^22 are exactly representable).
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// Plain decimals (`-12.345`) with at most 15 significant digits: the digits as an
/// integer divided by an exact power of ten, which IEEE division rounds correctly
/// (Clinger's fast path). `None` sends other shapes to the general parser.
fn parse_simple_decimal(b: &[u8]) -> Option<f64> {
    let (neg, digits) = match b.first()? {
        b'-' => (true, &b[1..]),
        b'+' => (false, &b[1..]),
        _ => (false, b),
    };
    let mut mantissa: u64 = 0;
    let mut count = 0usize;
    let mut frac = None;
    for (i, &c) in digits.iter().enumerate() {
        match c {
            b'0'..=b'9' => {
                count += 1;
                if count > 15 {
                    return None; // more digits than f64 holds exactly (and no overflow)
                }
                mantissa = mantissa * 10 + u64::from(c - b'0');
            }
            b'.' if frac.is_none() => frac = Some(digits.len() - i - 1),
            _ => return None,
        }
    }
    if count == 0 || count > 15 {
        return None;
    }
    let v = mantissa as f64 / POW10[frac.unwrap_or(0)];
    Some(if neg { -v } else { v })
}

/// Parses a float (`21.5`, `-1e3`, `NaN`, `inf`).
pub fn parse_f64(b: &[u8]) -> Option<f64> {
    let b = b.trim_ascii();
    if let Some(v) = parse_simple_decimal(b) {
        return Some(v);
    }
    let s = std::str::from_utf8(b).ok()?;
    if s.is_empty() {
        return None;
    }
    s.parse::<f64>().ok()
}

/// Parses `true`/`false` (any case), `t`/`f`, `yes`/`no`, `1`/`0`.
pub fn parse_bool(b: &[u8]) -> Option<bool> {
    let b = b.trim_ascii();
    if b.eq_ignore_ascii_case(b"true")
        || b.eq_ignore_ascii_case(b"t")
        || b.eq_ignore_ascii_case(b"yes")
        || b == b"1"
    {
        Some(true)
    } else if b.eq_ignore_ascii_case(b"false")
        || b.eq_ignore_ascii_case(b"f")
        || b.eq_ignore_ascii_case(b"no")
        || b == b"0"
    {
        Some(false)
    } else {
        None
    }
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn digits(b: &[u8]) -> Option<u32> {
    let mut v = 0u32;
    for &c in b {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        v = v * 10 + u32::from(d);
    }
    Some(v)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Parses `YYYY-MM-DD` into days since the epoch.
pub fn parse_date(b: &[u8]) -> Option<i32> {
    let b = b.trim_ascii();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let y = i64::from(digits(&b[0..4])?);
    let m = digits(&b[5..7])?;
    let d = digits(&b[8..10])?;
    if !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
        return None;
    }
    i32::try_from(days_from_civil(y, m, d)).ok()
}

/// Parses an RFC 3339 timestamp (also with a space for `T`, without seconds' fraction,
/// or without an offset, read as UTC; a bare date is midnight UTC) into nanoseconds
/// since the epoch.
pub fn parse_rfc3339_nanos(b: &[u8]) -> Option<i64> {
    let b = b.trim_ascii();
    let days = i64::from(parse_date(b.get(..10)?)?);
    let mut secs = days * 86_400;
    let mut nanos: i64 = 0;
    let rest = &b[10..];
    if rest.is_empty() {
        return secs.checked_mul(1_000_000_000);
    }
    if !matches!(rest[0], b'T' | b't' | b' ') || rest.len() < 6 || rest[3] != b':' {
        return None;
    }
    let h = digits(&rest[1..3])?;
    let mi = digits(&rest[4..6])?;
    let mut i = 6;
    let mut s = 0;
    if rest.get(6) == Some(&b':') {
        s = digits(rest.get(7..9)?)?;
        i = 9;
    }
    if h > 23 || mi > 59 || s > 60 {
        return None;
    }
    secs += i64::from(h * 3600 + mi * 60 + s);
    if matches!(rest.get(i), Some(b'.') | Some(b',')) {
        i += 1;
        let start = i;
        let mut scale = 100_000_000i64;
        while let Some(&c) = rest.get(i) {
            if !c.is_ascii_digit() {
                break;
            }
            nanos += i64::from(c - b'0') * scale;
            scale /= 10;
            i += 1;
        }
        if i == start {
            return None;
        }
    }
    match rest.get(i) {
        None => {}
        Some(b'Z' | b'z') if i + 1 == rest.len() => {}
        Some(&sign @ (b'+' | b'-')) => {
            let off = &rest[i + 1..];
            let (oh, om) = match off.len() {
                5 if off[2] == b':' => (digits(&off[0..2])?, digits(&off[3..5])?),
                4 => (digits(&off[0..2])?, digits(&off[2..4])?),
                2 => (digits(off)?, 0),
                _ => return None,
            };
            let offset = i64::from(oh * 3600 + om * 60);
            secs -= if sign == b'+' { offset } else { -offset };
        }
        _ => return None,
    }
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

/// A timestamp as text: RFC 3339, or an integer of epoch milliseconds. Returns
/// nanoseconds since the epoch.
pub fn parse_timestamp_nanos(b: &[u8]) -> Option<i64> {
    let t = b.trim_ascii();
    if t.len() >= 10 && t[4] == b'-' {
        return parse_rfc3339_nanos(t);
    }
    parse_i64(t)?.checked_mul(1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers() {
        assert_eq!(parse_i64(b"42"), Some(42));
        assert_eq!(parse_i64(b" -7 "), Some(-7));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"9223372036854775808"), None);
        assert_eq!(parse_i64(b"4x"), None);
        assert_eq!(parse_i64(b""), None);
    }

    #[test]
    fn the_fast_float_path_agrees_with_std() {
        for s in [
            "0",
            "-0.0",
            "21.5",
            "3.141592653589",
            "999999999999999",
            "0.000000000000001",
            "12.",
            ".5",
            "-273.10",
        ] {
            assert_eq!(
                parse_f64(s.as_bytes()).map(f64::to_bits),
                s.parse::<f64>().ok().map(f64::to_bits),
                "{s}"
            );
        }
        // Shapes the fast path leaves to std.
        for s in [
            "1e3",
            "1234567890123456789.5",
            "NaN",
            "-inf",
            "1.2.3",
            "--1",
            ".",
        ] {
            assert_eq!(
                parse_f64(s.as_bytes()).map(f64::to_bits),
                s.parse::<f64>().ok().map(f64::to_bits),
                "{s}"
            );
        }
    }

    #[test]
    fn floats_and_bools() {
        assert_eq!(parse_f64(b"21.5"), Some(21.5));
        assert_eq!(parse_f64(b"-1e3"), Some(-1000.0));
        assert_eq!(parse_f64(b"abc"), None);
        assert_eq!(parse_bool(b"TRUE"), Some(true));
        assert_eq!(parse_bool(b"0"), Some(false));
        assert_eq!(parse_bool(b"maybe"), None);
    }

    #[test]
    fn dates() {
        assert_eq!(parse_date(b"1970-01-01"), Some(0));
        assert_eq!(parse_date(b"2000-03-01"), Some(11017));
        assert_eq!(parse_date(b"2024-02-29"), Some(19782));
        assert_eq!(parse_date(b"2023-02-29"), None);
        assert_eq!(parse_date(b"2023-13-01"), None);
    }

    #[test]
    fn rfc3339() {
        let ms = |s: &str| parse_timestamp_nanos(s.as_bytes()).map(|n| n / 1_000_000);
        assert_eq!(ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(ms("2026-11-26T10:00:00.123Z"), Some(1_795_687_200_123));
        assert_eq!(ms("2026-11-26T11:00:00.123+01:00"), Some(1_795_687_200_123));
        assert_eq!(ms("2026-11-26 10:00:00.123"), Some(1_795_687_200_123));
        assert_eq!(ms("2026-11-26T10:00Z"), Some(1_795_687_200_000));
        assert_eq!(ms("1795687200123"), Some(1_795_687_200_123));
        assert_eq!(ms("2026-11-26T25:00:00Z"), None);
        assert_eq!(ms("2026-11-26T10:00:00Zjunk"), None);
        assert_eq!(ms("yesterday"), None);
    }

    #[test]
    fn agrees_with_chrono() {
        for s in [
            "2001-09-09T01:46:40.5-07:30",
            "1969-12-31T23:59:59.999Z",
            "2400-02-29T12:00:00+14:00",
        ] {
            let expected = chrono::DateTime::parse_from_rfc3339(s).expect("chrono parses it");
            assert_eq!(
                parse_rfc3339_nanos(s.as_bytes()),
                expected.timestamp_nanos_opt(),
                "{s}"
            );
        }
    }
}
