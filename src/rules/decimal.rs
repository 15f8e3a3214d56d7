//! Decides how a money literal in a rules file becomes exact integer money. TOML numbers such as
//! `rate_usd = 0.054` are never read through a float: the value is deserialized as a
//! `toml::Spanned<toml::Value>` and its literal text is taken from the file by the span, then
//! parsed by [`MicroUsd::parse_decimal`]. A string (`"0.054"`) is accepted too.

use crate::money::{MicroUsd, MoneyError};
use toml::Spanned;

/// The exact amount a money field's literal denotes, or a sentence saying why it has none.
pub(crate) fn money_literal(value: &Spanned<toml::Value>, src: &str) -> Result<MicroUsd, String> {
    let text: String = match value.get_ref() {
        toml::Value::String(s) => s.trim().to_string(),
        toml::Value::Integer(_) | toml::Value::Float(_) => {
            let literal = src.get(value.span()).unwrap_or("").trim();
            // TOML allows `_` between digits; it carries no value.
            literal.chars().filter(|c| *c != '_').collect()
        }
        other => {
            return Err(format!(
                "expected a decimal amount of USD such as 0.054, found a {}",
                other.type_str()
            ))
        }
    };
    if text.is_empty() {
        return Err("expected a decimal amount of USD such as 0.054, found nothing".to_string());
    }
    MicroUsd::parse_decimal(&text).map_err(|e| match e {
        MoneyError::Negative(t) => format!("{t} is negative"),
        MoneyError::NotADecimal(t) => {
            format!("{t} is not a plain decimal amount of USD (write it like 0.054)")
        }
        MoneyError::TooPrecise(t) => {
            format!("{t} has more than 6 decimal places (the smallest unit is 0.000001 USD)")
        }
        MoneyError::Overflow(t) => format!("{t} is too large"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Doc {
        v: Spanned<toml::Value>,
    }

    fn parse(src: &str) -> Result<MicroUsd, String> {
        let doc: Doc = match toml::from_str(src) {
            Ok(d) => d,
            Err(e) => return Err(e.to_string()),
        };
        money_literal(&doc.v, src)
    }

    #[test]
    fn takes_the_literal_text_not_the_float() {
        assert_eq!(parse("v = 0.054"), Ok(MicroUsd(54_000)));
        assert_eq!(parse("v = 0.072"), Ok(MicroUsd(72_000)));
        assert_eq!(parse("v = 0.1"), Ok(MicroUsd(100_000)));
        assert_eq!(parse("v = 16"), Ok(MicroUsd(16_000_000)));
        assert_eq!(parse("v = 1_000.5"), Ok(MicroUsd(1_000_500_000)));
        assert_eq!(parse("v = \"0.324\""), Ok(MicroUsd(324_000)));
        assert_eq!(parse("v = +0.5"), Ok(MicroUsd(500_000)));
    }

    #[test]
    fn refuses_what_is_not_exact() {
        assert_eq!(parse("v = -0.054"), Err("-0.054 is negative".to_string()));
        assert!(parse("v = 5.4e-2").is_err_and(|e| e.contains("not a plain decimal")));
        assert!(parse("v = 0.0000001").is_err_and(|e| e.contains("6 decimal places")));
        assert!(parse("v = nan").is_err());
        assert!(parse("v = inf").is_err());
        assert!(parse("v = 0x10").is_err());
        assert!(parse("v = true").is_err_and(|e| e.contains("boolean")));
        assert!(parse("v = \"\"").is_err());
        assert!(parse("v = \"abc\"").is_err());
        assert!(parse("v = 99999999999999999.5").is_err_and(|e| e.contains("too large")));
    }
}
