//! Decides what the four rules files may contain, structurally: the raw serde shapes of
//! `plans.toml`, `models.toml`, `operations.toml` and `routes.toml` (unknown keys are refused),
//! read entry by entry so that every malformed entry is reported, not just the first one of a
//! file. Meaning (ids, references, amounts) is checked later by `build`.

use std::marker::PhantomData;
use std::ops::Range;

use serde::de::{DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use super::problem::{FileCtx, RuleProblem, WHOLE_FILE};

/// A TOML table read as ordered `(key, value)` pairs (the order operators wrote).
#[derive(Debug, Clone)]
pub(crate) struct Entries<V>(pub Vec<(String, V)>);

impl<V> Default for Entries<V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Entries<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct EntriesVisitor<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for EntriesVisitor<V> {
            type Value = Entries<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, V>()? {
                    out.push((k, v));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(EntriesVisitor(PhantomData))
    }
}

/// How a plan's credits are granted, as written (`"once"` / `"period"`).
#[derive(Debug, Clone, Copy, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RawGrant {
    Once,
    #[default]
    Period,
}

/// `[[plan]]` in `plans.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPlan {
    pub id: String,
    pub name: String,
    pub credits: u64,
    #[serde(default)]
    pub credits_grant: RawGrant,
    pub api_keys: u32,
    pub price_usd: Spanned<toml::Value>,
    pub requests_per_minute: u32,
    #[serde(default)]
    pub stripe_price_ids: Vec<String>,
    #[serde(default)]
    pub alert_credits_left_percent: Vec<i64>,
    #[serde(default)]
    pub alert_spend_percent: Vec<i64>,
}

/// `[pay_per_use]` in `plans.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPayPerUse {
    pub api_keys: u32,
    pub requests_per_minute: u32,
    #[serde(default)]
    pub alert_spend_percent: Vec<i64>,
}

/// `[[model]]` in `models.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModel {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub rate_usd: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub credit_column: Option<String>,
    #[serde(default)]
    pub video: bool,
}

/// The unit of an operation, as written.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RawUnit {
    Image,
    Video,
}

/// `[[operation]]` in `operations.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOperation {
    pub id: String,
    pub name: String,
    pub unit: RawUnit,
    #[serde(default)]
    pub credits: Entries<u64>,
    #[serde(default)]
    pub credits_on_video_models: Option<u64>,
    #[serde(default)]
    pub use_model_rates: bool,
    #[serde(default)]
    pub rates_usd: Entries<Spanned<toml::Value>>,
}

/// `[[route]]` in `routes.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    #[serde(default)]
    pub label: Option<String>,
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub billed: Option<bool>,
    #[serde(default)]
    pub operation: Option<String>,
    #[serde(default)]
    pub operations: Option<Vec<String>>,
    #[serde(default)]
    pub operation_from: Option<Vec<String>>,
    #[serde(default)]
    pub operation_map: Option<Entries<String>>,
    #[serde(default)]
    pub model: Option<Vec<String>>,
    #[serde(default)]
    pub quantity: Option<Vec<String>>,
    #[serde(default)]
    pub quantity_default: Option<u64>,
    #[serde(default)]
    pub quantity_max: Option<u64>,
    /// `request` (default), `job` or `job_status` ([`crate::rules::SettleAt`]).
    #[serde(default)]
    pub settle: Option<String>,
}

/// One successfully read entry of an array of tables, with where it is.
#[derive(Debug)]
pub(crate) struct Entry<T> {
    /// `model[3]`.
    pub field: String,
    pub span: Range<usize>,
    /// Each key of the entry with the span of its value, for line numbers.
    pub keys: Vec<(String, Range<usize>)>,
    pub raw: T,
}

impl<T> Entry<T> {
    /// `model[3].rate_usd`.
    pub fn field(&self, key: &str) -> String {
        format!("{}.{key}", self.field)
    }

    /// The span of a key's value, or of the whole entry.
    pub fn span_of(&self, key: &str) -> &Range<usize> {
        self.keys
            .iter()
            .find(|(k, _)| k == key)
            .map_or(&self.span, |(_, s)| s)
    }

    /// A problem about `key` of this entry.
    pub fn problem(
        &self,
        ctx: &FileCtx<'_>,
        key: &str,
        message: impl std::fmt::Display,
    ) -> RuleProblem {
        ctx.problem(self.field(key), message, Some(self.span_of(key)))
    }

    /// A problem at a nested `field` whose line is that of the entry's key `key`.
    pub(crate) fn problem_at(
        &self,
        ctx: &FileCtx<'_>,
        field: &str,
        key: &str,
        message: impl std::fmt::Display,
    ) -> RuleProblem {
        ctx.problem(self.field(field), message, Some(self.span_of(key)))
    }
}

/// The entries of one array of tables, plus the ids of entries that could not be read (so
/// that references to them are not reported a second time as "unknown").
#[derive(Debug)]
pub(crate) struct EntryList<T> {
    pub entries: Vec<Entry<T>>,
    pub unreadable_ids: Vec<String>,
}

impl<T> Default for EntryList<T> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            unreadable_ids: Vec::new(),
        }
    }
}

/// A parsed file: its top-level keys, or `None` when the file is not valid TOML.
pub(crate) fn parse_document<'s>(
    ctx: &FileCtx<'s>,
    problems: &mut Vec<RuleProblem>,
) -> Option<DeTable<'s>> {
    let (doc, errors) = DeTable::parse_recoverable(ctx.src);
    if errors.is_empty() {
        return Some(doc.into_inner());
    }
    for e in errors {
        problems.push(ctx.problem(
            "(syntax)",
            format!("not valid TOML: {}", e.message()),
            e.span().as_ref(),
        ));
    }
    None
}

/// Reports every top-level key of `doc` that is not in `allowed`.
pub(crate) fn check_top_level(
    ctx: &FileCtx<'_>,
    doc: &DeTable<'_>,
    allowed: &[&str],
    problems: &mut Vec<RuleProblem>,
) {
    for (k, v) in doc.iter() {
        let key: &str = k.get_ref();
        if !allowed.contains(&key) {
            let expected = allowed
                .iter()
                .map(|a| format!("`{a}`"))
                .collect::<Vec<_>>()
                .join(", ");
            problems.push(ctx.problem(
                quote_key(key),
                format!("unknown key; expected one of {expected}"),
                Some(&v.span()),
            ));
        }
    }
}

/// The value of a top-level key, if present.
pub(crate) fn top<'d, 's>(doc: &'d DeTable<'s>, key: &str) -> Option<&'d Spanned<DeValue<'s>>> {
    doc.iter().find(|(k, _)| k.get_ref() == key).map(|(_, v)| v)
}

/// Reads the array of tables `key` (`[[model]]`) entry by entry.
pub(crate) fn read_entries<T: DeserializeOwned>(
    ctx: &FileCtx<'_>,
    key: &str,
    value: Option<&Spanned<DeValue<'_>>>,
    problems: &mut Vec<RuleProblem>,
) -> EntryList<T> {
    let mut list = EntryList::default();
    let Some(value) = value else {
        return list;
    };
    let DeValue::Array(items) = value.get_ref() else {
        problems.push(ctx.problem(
            key,
            format!(
                "expected an array of tables ([[{key}]]), found a {}",
                value.get_ref().type_str()
            ),
            Some(&value.span()),
        ));
        return list;
    };
    for (i, item) in items.iter().enumerate() {
        let field = format!("{key}[{i}]");
        let span = item.span();
        let DeValue::Table(table) = item.get_ref() else {
            problems.push(ctx.problem(
                field,
                format!("expected a table, found a {}", item.get_ref().type_str()),
                Some(&span),
            ));
            continue;
        };
        let keys: Vec<(String, Range<usize>)> = table
            .iter()
            .map(|(k, v)| (k.get_ref().to_string(), v.span()))
            .collect();
        match T::deserialize(ValueDeserializer::from(item.clone())) {
            Ok(raw) => list.entries.push(Entry {
                field,
                span,
                keys,
                raw,
            }),
            Err(e) => {
                problems.push(serde_problem(ctx, &field, table, &span, &e));
                if let Some(id) = table
                    .iter()
                    .find(|(k, _)| k.get_ref() == "id")
                    .and_then(|(_, v)| v.get_ref().as_str())
                {
                    list.unreadable_ids.push(id.to_string());
                }
            }
        }
    }
    list
}

/// Reads the single value `key` (`[pay_per_use]`, `credit_columns = [...]`). `Ok(None)` when
/// absent, `Err(())` when present but unreadable (the problem is recorded).
pub(crate) fn read_value<T: DeserializeOwned>(
    ctx: &FileCtx<'_>,
    key: &str,
    value: Option<&Spanned<DeValue<'_>>>,
    problems: &mut Vec<RuleProblem>,
) -> Result<Option<T>, ()> {
    let Some(value) = value else {
        return Ok(None);
    };
    let span = value.span();
    let empty = DeTable::new();
    let table = match value.get_ref() {
        DeValue::Table(t) => t,
        _ => &empty,
    };
    match T::deserialize(ValueDeserializer::from(value.clone())) {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            let mut p = serde_problem(ctx, key, table, &span, &e);
            if !matches!(value.get_ref(), DeValue::Table(_)) {
                if let Some(s) = e.span() {
                    p.field = format!("{key}{}", path_in_value(value.get_ref(), &s));
                }
            }
            problems.push(p);
            Err(())
        }
    }
}

/// Turns a serde error inside the table at `field` into a problem naming the innermost field.
fn serde_problem(
    ctx: &FileCtx<'_>,
    field: &str,
    table: &DeTable<'_>,
    table_span: &Range<usize>,
    e: &toml::de::Error,
) -> RuleProblem {
    let message = e.message();
    // serde's own wording names the field for missing and unknown fields.
    for prefix in ["missing field `", "unknown field `"] {
        if let Some(rest) = message.strip_prefix(prefix) {
            if let Some((name, _)) = rest.split_once('`') {
                let name_span = table
                    .iter()
                    .find(|(k, _)| k.get_ref() == name)
                    .map(|(k, _)| k.span());
                let message = if prefix.starts_with("missing") {
                    "missing (required)".to_string()
                } else {
                    message.to_string()
                };
                return ctx.problem(
                    format!("{field}.{}", quote_key(name)),
                    message,
                    Some(name_span.as_ref().unwrap_or(table_span)),
                );
            }
        }
    }
    match e.span() {
        Some(span) => {
            let inner = path_to_span(table, &span);
            let field = if inner.is_empty() {
                field.to_string()
            } else {
                format!("{field}{inner}")
            };
            ctx.problem(field, message, Some(&span))
        }
        None => ctx.problem(field, message, Some(table_span)),
    }
}

/// `.credits."nano-banana-2"`: the innermost key path inside `table` whose value holds `span`.
fn path_to_span(table: &DeTable<'_>, span: &Range<usize>) -> String {
    for (k, v) in table.iter() {
        let vs = v.span();
        if vs.start <= span.start && span.end <= vs.end {
            let mut path = format!(".{}", quote_key(k.get_ref()));
            path.push_str(&path_in_value(v.get_ref(), span));
            return path;
        }
        let ks = k.span();
        if ks.start <= span.start && span.end <= ks.end {
            return format!(".{}", quote_key(k.get_ref()));
        }
    }
    String::new()
}

fn path_in_value(value: &DeValue<'_>, span: &Range<usize>) -> String {
    match value {
        DeValue::Table(t) => path_to_span(t, span),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let s = item.span();
                if s.start <= span.start && span.end <= s.end {
                    return format!("[{i}]{}", path_in_value(item.get_ref(), span));
                }
            }
            String::new()
        }
        _ => String::new(),
    }
}

/// A key as it would be written in a TOML path: bare when it can be, quoted otherwise.
pub(crate) fn quote_key(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}

/// Checks that the document is readable and has only `allowed` top-level keys; the problems
/// are recorded and `None` is returned when the file is not TOML at all.
pub(crate) fn open<'s>(
    ctx: &FileCtx<'s>,
    allowed: &[&str],
    problems: &mut Vec<RuleProblem>,
) -> Option<DeTable<'s>> {
    let doc = parse_document(ctx, problems)?;
    check_top_level(ctx, &doc, allowed, problems);
    Some(doc)
}

/// A problem about the file as a whole.
pub(crate) fn file_problem(ctx: &FileCtx<'_>, message: impl std::fmt::Display) -> RuleProblem {
    ctx.problem(WHOLE_FILE, message, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(src: &str) -> FileCtx<'_> {
        FileCtx {
            name: "models.toml",
            src,
        }
    }

    #[test]
    fn every_bad_entry_is_reported() {
        let src = "[[model]]\nid = \"a\"\nname = \"A\"\nrate = 1\n\n[[model]]\nid = \"b\"\n\n[[model]]\nid = \"c\"\nname = \"C\"\nvideo = \"yes\"\n";
        let c = ctx(src);
        let mut problems = Vec::new();
        let doc = open(&c, &["model"], &mut problems).expect("valid toml");
        let list: EntryList<RawModel> =
            read_entries(&c, "model", top(&doc, "model"), &mut problems);
        assert!(list.entries.is_empty());
        assert_eq!(list.unreadable_ids, vec!["a", "b", "c"]);
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            vec!["model[0].rate", "model[1].name", "model[2].video"]
        );
        assert!(
            problems[0].message.contains("unknown field"),
            "{:?}",
            problems[0]
        );
        assert!(
            problems[0].message.ends_with("(line 4)"),
            "{:?}",
            problems[0]
        );
        assert!(
            problems[1].message.starts_with("missing"),
            "{:?}",
            problems[1]
        );
    }

    #[test]
    fn nested_field_paths_are_named() {
        let src = "[[operation]]\nid = \"x\"\nname = \"X\"\nunit = \"image\"\ncredits = { \"seedream-4.5\" = -1 }\n";
        let c = FileCtx {
            name: "operations.toml",
            src,
        };
        let mut problems = Vec::new();
        let doc = open(&c, &["operation"], &mut problems).expect("valid toml");
        let _: EntryList<RawOperation> =
            read_entries(&c, "operation", top(&doc, "operation"), &mut problems);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].field, "operation[0].credits.\"seedream-4.5\"");
    }

    #[test]
    fn unknown_top_level_keys_and_syntax_errors() {
        let c = ctx("credit_columns = []\nmodels = 1\n");
        let mut problems = Vec::new();
        let _ = open(&c, &["credit_columns", "model"], &mut problems);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].field, "models");

        let c = ctx("[[model]\nid = ");
        let mut problems = Vec::new();
        assert!(open(&c, &["model"], &mut problems).is_none());
        assert!(!problems.is_empty());
        assert_eq!(problems[0].field, "(syntax)");
    }

    #[test]
    fn keys_are_quoted_when_needed() {
        assert_eq!(quote_key("rate_usd"), "rate_usd");
        assert_eq!(quote_key("seedream-4.5"), "\"seedream-4.5\"");
        assert_eq!(quote_key(""), "\"\"");
    }
}
