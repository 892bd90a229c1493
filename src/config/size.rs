//! Byte sizes as the command line and the control pipe write them: `512M`, `1536MiB`, `2g`.

/// Why a SIZE could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Not a decimal number with an optional binary-unit suffix.
    #[error(
        "invalid size {0:?} (use a byte count with an optional K, M, G or T suffix, e.g. 1536M)"
    )]
    Invalid(String),
    /// The number does not fit in 64 bits.
    #[error("size {0:?} is too large")]
    Overflow(String),
}

/// Parses a SIZE: decimal digits, then an optional `K`, `M`, `G` or `T` (binary units, any case),
/// then an optional `B` or `iB` (`"512M"`, `"512MiB"`, `"4096b"`). Overflow is an error.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(SizeError::Invalid(s.to_string()));
    }
    let suffix = suffix.to_ascii_lowercase();
    let (shift, rest) = match suffix.as_bytes().first() {
        Some(b'k') => (10, &suffix[1..]),
        Some(b'm') => (20, &suffix[1..]),
        Some(b'g') => (30, &suffix[1..]),
        Some(b't') => (40, &suffix[1..]),
        _ => (0, suffix.as_str()),
    };
    let rest_ok = match rest {
        "" | "b" => true,
        "ib" => shift != 0,
        _ => false,
    };
    if !rest_ok {
        return Err(SizeError::Invalid(s.to_string()));
    }
    let number: u64 = digits
        .parse()
        .map_err(|_| SizeError::Overflow(s.to_string()))?;
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(s.to_string()))
}

/// Formats a byte count with the largest binary unit that divides it exactly:
/// 536870912 -> "512M", 1610612736 -> "1536M", 2147483648 -> "2G", 1024 -> "1K", 1000 -> "1000".
/// `parse_size(&format_size(x)) == Ok(x)` for every `x`.
pub fn format_size(bytes: u64) -> String {
    if bytes == 0 {
        return "0".to_string();
    }
    for (shift, unit) in [(40, 'T'), (30, 'G'), (20, 'M'), (10, 'K')] {
        if bytes.trailing_zeros() >= shift {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_size_accepts_units_and_suffixes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("4096b"), Ok(4096));
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("512mib"), Ok(512 << 20));
        assert_eq!(parse_size("512MB"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2gib"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("007M"), Ok(7 << 20));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(parse_size("16777215T"), Ok(16777215 << 40));
    }

    #[test]
    fn parse_size_rejects_garbage_and_overflow() {
        for bad in [
            "", "M", "12Q", "1.5G", "-1", "+1", " 1", "1 ", "1iB", "1Gb2", "1GG", "1KiBB", "0x10",
            "1e3",
        ] {
            assert_eq!(
                parse_size(bad),
                Err(SizeError::Invalid(bad.to_string())),
                "{bad:?}"
            );
        }
        for big in [
            "18446744073709551616",
            "16777216T",
            "17179869184G",
            "99999999999999999999999K",
        ] {
            assert_eq!(
                parse_size(big),
                Err(SizeError::Overflow(big.to_string())),
                "{big:?}"
            );
        }
        assert_eq!(
            SizeError::Invalid("12Q".into()).to_string(),
            "invalid size \"12Q\" (use a byte count with an optional K, M, G or T suffix, e.g. 1536M)"
        );
        assert_eq!(
            SizeError::Overflow("99999T".into()).to_string(),
            "size \"99999T\" is too large"
        );
    }

    #[test]
    fn format_size_examples_and_round_trip() {
        assert_eq!(format_size(536870912), "512M");
        assert_eq!(format_size(1610612736), "1536M");
        assert_eq!(format_size(2147483648), "2G");
        assert_eq!(format_size(1024), "1K");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(0), "0");
        assert_eq!(format_size(1 << 40), "1T");
        assert_eq!(format_size(3 << 40), "3T");
        assert_eq!(format_size((1 << 40) + (1 << 30)), "1025G");
        assert_eq!(format_size(u64::MAX), u64::MAX.to_string());
        assert_eq!(format_size(1 << 63), "8388608T");
        let mut x: u64 = 1;
        for _ in 0..2000 {
            assert_eq!(parse_size(&format_size(x)), Ok(x), "{x}");
            // A cheap deterministic walk over many magnitudes and bit patterns.
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let shifted = x >> (x % 64);
            assert_eq!(parse_size(&format_size(shifted)), Ok(shifted), "{shifted}");
            assert_eq!(parse_size(&format_size(shifted << 20)), Ok(shifted << 20));
        }
    }
}
