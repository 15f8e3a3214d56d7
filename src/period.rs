//! Calendar arithmetic for billing: monthly periods anchored like Stripe's (an anchor on the 31st
//! gives Jan 31 → Feb 28/29 → Mar 31), calendar-month keys for pay-per-use spend (UTC), and the
//! `2026-05-01T00:00:00.000Z` timestamp format of the billing endpoints.

use time::{Date, Month, OffsetDateTime, PrimitiveDateTime};

/// One billing period, `[start_ms, end_ms)`, UTC milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub start_ms: i64,
    pub end_ms: i64,
}

impl Period {
    /// A stable id for the period, used in ledger key names.
    pub fn id(&self) -> String {
        format!("p{}", self.end_ms)
    }
}

fn to_datetime(ms: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
}

fn days_in_month(year: i32, month: Month) -> u8 {
    time::util::days_in_month(month, year)
}

/// `anchor_ms` moved by `months` calendar months, keeping the anchor's day of month where the
/// target month has it and clamping to the month's last day otherwise.
pub fn add_months(anchor_ms: i64, months: i32) -> Option<i64> {
    let anchor = to_datetime(anchor_ms)?;
    let total = anchor.year() * 12 + i32::from(u8::from(anchor.month())) - 1 + months;
    let year = total.div_euclid(12);
    let month = Month::try_from(u8::try_from(total.rem_euclid(12) + 1).ok()?).ok()?;
    let day = anchor.day().min(days_in_month(year, month));
    let date = Date::from_calendar_date(year, month, day).ok()?;
    let moved = PrimitiveDateTime::new(date, anchor.time()).assume_utc();
    i64::try_from(moved.unix_timestamp_nanos() / 1_000_000).ok()
}

/// The period that contains `now_ms`, for an account whose (first or any) period ends at
/// `anchor_end_ms`. Periods repeat monthly from the anchor in both directions.
pub fn current_period(anchor_end_ms: i64, now_ms: i64) -> Option<Period> {
    // Estimate the number of whole months between anchor and now, then correct by stepping.
    let approx = ((now_ms - anchor_end_ms) / (30 * 24 * 3600 * 1000)) as i32;
    let mut k = approx.saturating_sub(2);
    // Smallest k with end_k > now.
    loop {
        let end = add_months(anchor_end_ms, k)?;
        if end > now_ms {
            let prev = add_months(anchor_end_ms, k - 1)?;
            if prev <= now_ms {
                return Some(Period {
                    start_ms: prev,
                    end_ms: end,
                });
            }
            k -= 1;
        } else {
            k += 1;
        }
    }
}

/// `YYYYMM` of the UTC calendar month containing `now_ms`.
pub fn month_key(now_ms: i64) -> String {
    match to_datetime(now_ms) {
        Some(t) => format!("{:04}{:02}", t.year(), u8::from(t.month())),
        None => "000000".to_string(),
    }
}

/// `2026-05-01T00:00:00.000Z`.
pub fn format_timestamp_ms(ms: i64) -> String {
    match to_datetime(ms) {
        Some(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        ),
        None => String::new(),
    }
}

/// Parses an RFC 3339 timestamp (any offset) into UTC milliseconds.
pub fn parse_timestamp_ms(text: &str) -> Option<i64> {
    let t = OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(text: &str) -> i64 {
        parse_timestamp_ms(text).expect("valid timestamp")
    }

    #[test]
    fn months_are_anchored_like_stripe() {
        let jan31 = ms("2026-01-31T10:00:00Z");
        assert_eq!(add_months(jan31, 1), Some(ms("2026-02-28T10:00:00Z")));
        assert_eq!(add_months(jan31, 2), Some(ms("2026-03-31T10:00:00Z")));
        assert_eq!(
            add_months(ms("2028-01-31T00:00:00Z"), 1),
            Some(ms("2028-02-29T00:00:00Z"))
        );
        assert_eq!(add_months(jan31, -2), Some(ms("2025-11-30T10:00:00Z")));
        assert_eq!(add_months(jan31, 12), Some(ms("2027-01-31T10:00:00Z")));
    }

    #[test]
    fn finds_the_current_period() {
        let end = ms("2026-05-01T00:00:00Z");
        let p = current_period(end, ms("2026-04-15T00:00:00Z")).expect("period");
        assert_eq!(p.start_ms, ms("2026-04-01T00:00:00Z"));
        assert_eq!(p.end_ms, end);
        let later = current_period(end, end).expect("period");
        assert_eq!(later.start_ms, end);
        assert_eq!(later.end_ms, ms("2026-06-01T00:00:00Z"));
        let far = current_period(end, ms("2030-01-10T00:00:00Z")).expect("period");
        assert_eq!(far.end_ms, ms("2030-02-01T00:00:00Z"));
    }

    #[test]
    fn formats_with_milliseconds() {
        assert_eq!(
            format_timestamp_ms(ms("2026-05-01T00:00:00Z")),
            "2026-05-01T00:00:00.000Z"
        );
        assert_eq!(month_key(ms("2026-11-30T23:59:59Z")), "202611");
    }
}
