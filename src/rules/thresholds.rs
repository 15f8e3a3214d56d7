//! Low-balance alert thresholds of a plan (`plans.toml`): which percentages fire an alert, and
//! whether a list written in the rules makes sense. Read by `build::plans` (validation, every
//! problem reported), shown by `creditgate catalog`, used by `crate::alerts` to decide whether
//! a reservation crossed one.
//!
//! - `alert_credits_left_percent` (`[[plan]]`): percent of the period's allowance *left*,
//!   0 ..= 99 (`0` = the balance reached zero);
//! - `alert_spend_percent` (`[[plan]]` and `[pay_per_use]`): percent of the monthly spending
//!   limit *spent*, 1 ..= 100 (`100` = the limit is reached).

use serde::{Serialize, Serializer};

/// A set of whole percentages 0 ..= 100 (a bit set, so it is `Copy` and ordered).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Percents(u128);

/// What an alert threshold measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThresholdKind {
    /// Percent of the credit allowance left.
    CreditsLeft,
    /// Percent of the spending limit spent.
    Spend,
}

impl ThresholdKind {
    /// The smallest and largest percentage that can ever be crossed.
    pub fn range(self) -> (i64, i64) {
        match self {
            Self::CreditsLeft => (0, 99),
            Self::Spend => (1, 100),
        }
    }
}

impl Percents {
    pub const EMPTY: Percents = Percents(0);

    /// The set of `values`, or the problems with them (out of range, repeated), each as
    /// `(index, message)`.
    pub fn parse(kind: ThresholdKind, values: &[i64]) -> Result<Percents, Vec<(usize, String)>> {
        let (lo, hi) = kind.range();
        let mut set = 0u128;
        let mut problems = Vec::new();
        for (i, &v) in values.iter().enumerate() {
            if !(lo..=hi).contains(&v) {
                let why = match kind {
                    ThresholdKind::CreditsLeft => {
                        "percent of the allowance left must be 0 ..= 99 (100 is never crossed)"
                    }
                    ThresholdKind::Spend => {
                        "percent of the spending limit spent must be 1 ..= 100 (0 is never crossed)"
                    }
                };
                problems.push((i, format!("{v}: {why}")));
                continue;
            }
            let bit = 1u128 << v;
            if set & bit != 0 {
                problems.push((i, format!("{v} is listed twice")));
            }
            set |= bit;
        }
        if problems.is_empty() {
            Ok(Percents(set))
        } else {
            Err(problems)
        }
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The percentages, ascending.
    pub fn iter(self) -> impl Iterator<Item = u8> {
        (0u8..=100).filter(move |p| self.0 & (1u128 << p) != 0)
    }
}

impl Serialize for Percents {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_orders() {
        let p = Percents::parse(ThresholdKind::CreditsLeft, &[20, 0, 5]).expect("valid");
        assert_eq!(p.iter().collect::<Vec<_>>(), vec![0, 5, 20]);
        let s = Percents::parse(ThresholdKind::Spend, &[100, 80]).expect("valid");
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![80, 100]);
        assert!(Percents::parse(ThresholdKind::Spend, &[])
            .expect("valid")
            .is_empty());
    }

    #[test]
    fn reports_every_problem() {
        let e = Percents::parse(ThresholdKind::CreditsLeft, &[100, 20, 20, -1]).unwrap_err();
        assert_eq!(e.len(), 3, "{e:?}");
        assert_eq!(e[0].0, 0);
        assert!(e[1].1.contains("twice"));
        assert_eq!(e[2].0, 3);
        let e = Percents::parse(ThresholdKind::Spend, &[0, 101]).unwrap_err();
        assert_eq!(e.len(), 2, "{e:?}");
    }
}
