//! Money and credits as integers. Credits are whole units; money is integer micro-dollars
//! (0.054 USD = 54 000 µ$). Decimal strings from the rules files are parsed exactly, never
//! through a float, and printed back exactly (`0.054`, not `0.05399999`).

use std::fmt;

/// An amount of US dollars in millionths of a dollar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MicroUsd(pub u64);

pub const MICROS_PER_USD: u64 = 1_000_000;
pub const MICROS_PER_CENT: u64 = 10_000;
/// The largest monthly spending limit an account may set (CONTRACT §6).
pub const MAX_SPENDING_LIMIT_CENTS: u64 = 100_000_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("`{0}` is not a decimal number of dollars (expected e.g. 0.054)")]
    NotADecimal(String),
    #[error("`{0}` is negative; amounts cannot be negative")]
    Negative(String),
    #[error("`{0}` has more than 6 decimal places; the smallest unit is 0.000001 USD")]
    TooPrecise(String),
    #[error("`{0}` is too large")]
    Overflow(String),
}

impl MicroUsd {
    /// Parses a plain decimal such as `0.054`, `16`, `16.00` exactly.
    pub fn parse_decimal(text: &str) -> Result<Self, MoneyError> {
        let s = text.trim();
        if s.starts_with('-') {
            return Err(MoneyError::Negative(s.to_string()));
        }
        let s = s.strip_prefix('+').unwrap_or(s);
        let (whole, frac) = match s.split_once('.') {
            Some((w, f)) => (w, f),
            None => (s, ""),
        };
        let digits_only = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
        if (whole.is_empty() && frac.is_empty())
            || !digits_only(whole)
            || !digits_only(frac)
            || (s.contains('.') && frac.is_empty())
        {
            return Err(MoneyError::NotADecimal(text.to_string()));
        }
        let frac_trimmed = frac.trim_end_matches('0');
        if frac_trimmed.len() > 6 {
            return Err(MoneyError::TooPrecise(text.to_string()));
        }
        let overflow = || MoneyError::Overflow(text.to_string());
        let whole_value: u64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| overflow())?
        };
        let mut frac_value: u64 = 0;
        for (i, b) in frac_trimmed.bytes().enumerate() {
            let digit = u64::from(b - b'0');
            frac_value += digit * 10u64.pow(5 - i as u32);
        }
        whole_value
            .checked_mul(MICROS_PER_USD)
            .and_then(|w| w.checked_add(frac_value))
            .map(MicroUsd)
            .ok_or_else(overflow)
    }

    /// Whole cents as micro-dollars (saturating: limits are bounded far below overflow).
    pub fn from_cents(cents: u64) -> Self {
        MicroUsd(cents.saturating_mul(MICROS_PER_CENT))
    }

    /// Whole cents, rounded down.
    pub fn cents_floor(self) -> u64 {
        self.0 / MICROS_PER_CENT
    }

    pub fn checked_mul(self, by: u64) -> Option<Self> {
        self.0.checked_mul(by).map(MicroUsd)
    }
}

/// Prints the shortest exact decimal: `0.054`, `0.648`, `16`, `0.000001`.
impl fmt::Display for MicroUsd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole = self.0 / MICROS_PER_USD;
        let frac = self.0 % MICROS_PER_USD;
        if frac == 0 {
            return write!(f, "{whole}");
        }
        let digits = format!("{frac:06}");
        write!(f, "{whole}.{}", digits.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_seed_rates_exactly() {
        assert_eq!(MicroUsd::parse_decimal("0.054"), Ok(MicroUsd(54_000)));
        assert_eq!(MicroUsd::parse_decimal("0.324"), Ok(MicroUsd(324_000)));
        assert_eq!(MicroUsd::parse_decimal("16"), Ok(MicroUsd(16_000_000)));
        assert_eq!(MicroUsd::parse_decimal("0.000001"), Ok(MicroUsd(1)));
        assert_eq!(MicroUsd::parse_decimal("1.50"), Ok(MicroUsd(1_500_000)));
    }

    #[test]
    fn rejects_bad_decimals() {
        assert!(matches!(
            MicroUsd::parse_decimal("-0.054"),
            Err(MoneyError::Negative(_))
        ));
        assert!(matches!(
            MicroUsd::parse_decimal("0.0000001"),
            Err(MoneyError::TooPrecise(_))
        ));
        assert!(matches!(
            MicroUsd::parse_decimal("abc"),
            Err(MoneyError::NotADecimal(_))
        ));
        assert!(matches!(
            MicroUsd::parse_decimal("1e3"),
            Err(MoneyError::NotADecimal(_))
        ));
        assert!(matches!(
            MicroUsd::parse_decimal("."),
            Err(MoneyError::NotADecimal(_))
        ));
        assert!(matches!(
            MicroUsd::parse_decimal("1."),
            Err(MoneyError::NotADecimal(_))
        ));
        assert!(matches!(
            MicroUsd::parse_decimal("99999999999999999999"),
            Err(MoneyError::Overflow(_))
        ));
    }

    #[test]
    fn prints_exactly() {
        assert_eq!(MicroUsd(54_000).to_string(), "0.054");
        assert_eq!(MicroUsd(648_000).to_string(), "0.648");
        assert_eq!(MicroUsd(16_000_000).to_string(), "16");
        assert_eq!(MicroUsd(72_000 * 3).to_string(), "0.216");
        assert_eq!(MicroUsd(1).to_string(), "0.000001");
    }
}
