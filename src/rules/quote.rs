//! Decides what a matched request costs: reads the operation, the model and the quantity from
//! the sources the route names (in rule order; two present sources that disagree are refused, so
//! a cheap model in the body cannot hide an expensive one in a header), and prices one unit in
//! credits and in pay-per-use money. Who pays is decided later (CONTRACT §4); this is the price.

use std::borrow::Cow;
use std::sync::Arc;

use serde::de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::canonical::CanonicalPath;
use super::catalog::{Catalog, Unit};
use super::routes::{OperationRule, RouteMatch, Source, SourceKind};
use crate::money::MicroUsd;

/// What the quote reads from the request. `'h` is the lifetime of header values (the request
/// header), which may outlive the other inputs.
pub struct RequestInputs<'a, 'h: 'a> {
    /// The parsed JSON body, when the route needs it and the request has one.
    pub json_body: Option<&'a Value>,
    /// Header lookup by name, ASCII case-insensitive (the first value; `None` when absent or
    /// not text).
    pub header: &'a dyn Fn(&str) -> Option<&'h str>,
    /// The canonical path and query the route was matched with.
    pub query: &'a CanonicalPath,
}

/// The price of one request: `quantity` units of `operation` on `model`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    pub operation: Arc<str>,
    pub model: Arc<str>,
    pub quantity: u64,
    pub unit: Unit,
    /// Credits per unit; `None` when the model is not available with credits.
    pub credits_per_unit: Option<u64>,
    /// Pay-per-use rate per unit; `None` when not available on pay-per-use.
    pub rate_per_unit: Option<MicroUsd>,
    /// The version of the catalog that priced it.
    pub catalog_version: u64,
}

impl Quote {
    /// Credits for the whole request.
    pub fn credits_total(&self) -> Option<u64> {
        self.credits_per_unit?.checked_mul(self.quantity)
    }

    /// Pay-per-use money for the whole request.
    pub fn usd_total(&self) -> Option<MicroUsd> {
        self.rate_per_unit?.checked_mul(self.quantity)
    }
}

/// Why a request cannot be priced. Every one answers 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuoteError {
    #[error("No model was given; send it as {expected}.")]
    MissingModel { expected: String },
    #[error("The model {model:?} is not in the catalog.")]
    UnknownModel { model: String },
    #[error("The operation `{operation}` is not available on the model `{model}`.")]
    OperationNotAvailable { operation: String, model: String },
    #[error("The quantity from the {origin} must be a whole number from 1 to {max}.")]
    InvalidQuantity { origin: String, max: u64 },
    #[error(
        "The {what} is given twice with different values ({first} and {second}); send it once."
    )]
    Conflicting {
        what: &'static str,
        first: String,
        second: String,
    },
    #[error("The {what} from the {origin} must be {expected}.")]
    InvalidValue {
        what: &'static str,
        origin: String,
        expected: &'static str,
    },
    #[error("No operation was chosen; send {expected} as one of {choices}.")]
    MissingOperation { expected: String, choices: String },
    #[error("The {origin} does not choose an operation; expected one of {choices}.")]
    UnknownOperation { origin: String, choices: String },
}

impl QuoteError {
    /// The contract's error code (CONTRACT §7).
    pub fn code(&self) -> &'static str {
        match self {
            QuoteError::UnknownModel { .. } => "unknown_model",
            QuoteError::OperationNotAvailable { .. } => "operation_not_available",
            _ => "invalid_request",
        }
    }
}

/// One value found at a source.
enum Found<'a> {
    Json(&'a Value),
    Text(Cow<'a, [u8]>),
}

/// Calls `each` with every value present at `source` (a repeated query parameter gives more
/// than one). JSON `null` counts as absent.
fn visit<'a>(
    source: &Source,
    inputs: &RequestInputs<'a, '_>,
    each: &mut dyn FnMut(Found<'a>) -> Result<(), QuoteError>,
) -> Result<(), QuoteError> {
    match &source.kind {
        SourceKind::Body(path) => {
            let mut v = match inputs.json_body {
                Some(v) => v,
                None => return Ok(()),
            };
            for name in path {
                v = match v.get(name.as_str()) {
                    Some(next) => next,
                    None => return Ok(()),
                };
            }
            if !v.is_null() {
                each(Found::Json(v))?;
            }
        }
        SourceKind::Header(name) => {
            if let Some(v) = (inputs.header)(name) {
                each(Found::Text(Cow::Borrowed(v.as_bytes())))?;
            }
        }
        SourceKind::Query(name) => {
            for v in inputs.query.query_values(name) {
                let v = match v {
                    Cow::Borrowed(b) => Found::Text(Cow::Borrowed(b)),
                    Cow::Owned(b) => Found::Text(Cow::Owned(b)),
                };
                each(v)?;
            }
        }
        SourceKind::Path(i) => {
            if let Some(seg) = inputs.query.segments.get(*i) {
                each(Found::Text(Cow::Borrowed(seg.as_bytes())))?;
            }
        }
    }
    Ok(())
}

/// The first present value over `sources`, converted; any later present value that converts to
/// something different is a conflict.
fn gather<'a, 's, T: PartialEq>(
    sources: &'s [Source],
    inputs: &RequestInputs<'a, '_>,
    what: &'static str,
    convert: &dyn Fn(Found<'a>, &'s Source) -> Result<T, QuoteError>,
) -> Result<Option<(T, &'s Source)>, QuoteError> {
    let mut first: Option<(T, &'s Source)> = None;
    for source in sources {
        visit(source, inputs, &mut |found| {
            let value = convert(found, source)?;
            match &first {
                None => first = Some((value, source)),
                Some((v, s)) if *v != value => {
                    let second = if std::ptr::eq(*s, source) {
                        format!("a repeated {}", source.description)
                    } else {
                        format!("the {}", source.description)
                    };
                    return Err(QuoteError::Conflicting {
                        what,
                        first: format!("the {}", s.description),
                        second,
                    });
                }
                Some(_) => {}
            }
            Ok(())
        })?;
    }
    Ok(first)
}

fn text_of(b: Cow<'_, [u8]>) -> Option<Cow<'_, str>> {
    match b {
        Cow::Borrowed(b) => std::str::from_utf8(b).ok().map(Cow::Borrowed),
        Cow::Owned(b) => String::from_utf8(b).ok().map(Cow::Owned),
    }
}

fn model_value<'a>(found: Found<'a>, source: &Source) -> Result<Cow<'a, str>, QuoteError> {
    let invalid = || QuoteError::InvalidValue {
        what: "model",
        origin: source.description.clone(),
        expected: "a model id",
    };
    let text = match found {
        Found::Json(Value::String(s)) => Cow::Borrowed(s.as_str()),
        Found::Json(_) => return Err(invalid()),
        Found::Text(b) => text_of(b).ok_or_else(invalid)?,
    };
    if text.is_empty() {
        return Err(invalid());
    }
    Ok(text)
}

fn quantity_value(found: Found<'_>, source: &Source, max: u64) -> Result<u64, QuoteError> {
    let invalid = || QuoteError::InvalidQuantity {
        origin: source.description.clone(),
        max,
    };
    let n = match found {
        Found::Json(Value::Number(n)) => n.as_u64().ok_or_else(invalid)?,
        Found::Json(_) => return Err(invalid()),
        Found::Text(b) => {
            if b.is_empty() || b.len() > 19 || !b.iter().all(u8::is_ascii_digit) {
                return Err(invalid());
            }
            b.iter()
                .try_fold(0u64, |acc, d| {
                    acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
                })
                .ok_or_else(invalid)?
        }
    };
    if n == 0 || n > max {
        return Err(invalid());
    }
    Ok(n)
}

fn selector_value<'a>(found: Found<'a>, source: &Source) -> Result<Cow<'a, str>, QuoteError> {
    let invalid = || QuoteError::InvalidValue {
        what: "operation",
        origin: source.description.clone(),
        expected: "a whole number or a string",
    };
    match found {
        Found::Json(Value::String(s)) => Ok(Cow::Borrowed(s.as_str())),
        Found::Json(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Ok(Cow::Owned(u.to_string())),
            (None, Some(i)) => Ok(Cow::Owned(i.to_string())),
            _ => Err(invalid()),
        },
        Found::Json(Value::Bool(b)) => Ok(Cow::Borrowed(if *b { "true" } else { "false" })),
        Found::Json(_) => Err(invalid()),
        Found::Text(b) => text_of(b).ok_or_else(invalid),
    }
}

fn describe(sources: &[Source]) -> String {
    let parts: Vec<&str> = sources.iter().map(|s| s.description.as_str()).collect();
    match parts.as_slice() {
        [] => "nothing".to_string(),
        [one] => format!("the {one}"),
        [init @ .., last] => format!("the {}, or the {last}", init.join(", the ")),
    }
}

/// Shortens client-sent text for an error message.
fn clip(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Prices a matched request with `catalog` (the catalog `m` was matched in: one catalog
/// version quotes and settles a request). `Ok(None)` for an unbilled route.
pub fn quote(
    catalog: &Catalog,
    m: &RouteMatch<'_>,
    inputs: &RequestInputs<'_, '_>,
) -> Result<Option<Quote>, QuoteError> {
    let route = m.route;
    let operation_id: Cow<'_, str> = match &route.operation {
        OperationRule::Unbilled => return Ok(None),
        OperationRule::Fixed(id) => Cow::Borrowed(&**id),
        OperationRule::FromPath => match m.operation {
            Some(id) => Cow::Borrowed(id),
            None => {
                return Err(QuoteError::MissingOperation {
                    expected: "the operation in the path".to_string(),
                    choices: route.operation_ids().join(", "),
                })
            }
        },
        OperationRule::FromSources { sources, map } => {
            let choices = || {
                map.iter()
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let found = gather(sources, inputs, "operation", &|f, s| selector_value(f, s))?;
            let Some((key, source)) = found else {
                return Err(QuoteError::MissingOperation {
                    expected: describe(sources),
                    choices: choices(),
                });
            };
            match map.iter().find(|(k, _)| **k == *key) {
                Some((_, id)) => Cow::Borrowed(&**id),
                None => {
                    return Err(QuoteError::UnknownOperation {
                        origin: format!("{} value {:?}", source.description, clip(&key)),
                        choices: choices(),
                    })
                }
            }
        }
    };

    let model = gather(&route.model, inputs, "model", &|f, s| model_value(f, s))?;
    let max = route.quantity_max;
    let quantity = gather(&route.quantity, inputs, "quantity", &|f, s| {
        quantity_value(f, s, max)
    })?
    .map_or(route.quantity_default, |(q, _)| q);
    let Some((model, _)) = model else {
        return Err(QuoteError::MissingModel {
            expected: describe(&route.model),
        });
    };

    let Some((model_id, model_index)) = catalog
        .model_index
        .get_key_value(&*model)
        .map(|(k, v)| (k.clone(), *v))
    else {
        return Err(QuoteError::UnknownModel {
            model: clip(&model),
        });
    };
    let not_available = || QuoteError::OperationNotAvailable {
        operation: operation_id.to_string(),
        model: model_id.to_string(),
    };
    let Some(op) = catalog.operation(&operation_id) else {
        return Err(not_available());
    };
    let price = op.prices.get(model_index).copied().unwrap_or_default();
    if !price.is_available() {
        return Err(not_available());
    }
    Ok(Some(Quote {
        operation: op.id.clone(),
        model: model_id,
        quantity,
        unit: op.unit,
        credits_per_unit: price.credits,
        rate_per_unit: price.rate,
        catalog_version: catalog.version,
    }))
}

impl RouteMatch<'_> {
    /// [`quote`] with the catalog this match came from.
    pub fn quote_with(
        &self,
        catalog: &Catalog,
        inputs: &RequestInputs<'_, '_>,
    ) -> Result<Option<Quote>, QuoteError> {
        quote(catalog, self, inputs)
    }
}

/// Why a request body is not an unambiguous JSON document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("The request body is not valid JSON: {0}.")]
pub struct BodyError(pub String);

impl BodyError {
    pub fn code(&self) -> &'static str {
        "invalid_request"
    }
}

/// Parses a JSON request body, refusing duplicate object keys at any depth: with
/// `{"model": "cheap", "model": "dear"}` the gateway and the upstream could each read a
/// different one, so such a body is not priced at all.
pub fn parse_json_body(bytes: &[u8]) -> Result<Value, BodyError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = StrictValue
        .deserialize(&mut de)
        .map_err(|e| BodyError(e.to_string()))?;
    de.end().map_err(|e| BodyError(e.to_string()))?;
    Ok(value)
}

/// Deserializes a `serde_json::Value`, refusing duplicate keys.
struct StrictValue;

impl<'de> DeserializeSeed<'de> for StrictValue {
    type Value = Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictValue {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(StrictValue)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(StrictValue)?;
            if out.contains_key(&key) {
                return Err(A::Error::custom(format!("duplicate key {key:?}")));
            }
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::canonicalize;
    use crate::rules::catalog::tests::{load, MODELS, OPS, PLANS};
    use serde_json::json;

    const ROUTES: &str = "[[route]]\nmethod = \"POST\"\npath = \"/m/{model}/gen\"\noperation = \"gen\"\nmodel = [\"path:model\", \"body:options.model\"]\nquantity = [\"query:n\"]\nquantity_max = 3\nquantity_default = 2\n\n[[route]]\nmethod = \"POST\"\npath = \"/clip\"\noperation_from = [\"header:X-Kind\", \"body:kind\"]\noperation_map = { short = \"clip\", \"7\" = \"clip\", true = \"gen\" }\nmodel = [\"header:X-Model\"]\n";

    fn run(
        target: &str,
        body: Option<Value>,
        headers: &[(&'static str, &'static str)],
    ) -> Result<Option<Quote>, QuoteError> {
        let c = match load(PLANS, MODELS, OPS, ROUTES) {
            Ok(c) => c,
            Err(p) => panic!("{p:#?}"),
        };
        let path = match canonicalize(target) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        let Some(m) = c.match_route("POST", &path) else {
            panic!("no route for {target}");
        };
        let lookup = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
        };
        let inputs = RequestInputs {
            json_body: body.as_ref(),
            header: &lookup,
            query: &path,
        };
        m.quote_with(&c, &inputs)
    }

    #[test]
    fn path_and_nested_body_sources() {
        let q = run("/m/m2/gen", None, &[]);
        let q = q.ok().flatten().expect("quote");
        assert_eq!(
            (&*q.model, q.quantity, q.credits_total()),
            ("m2", 2, Some(8))
        );
        let q = run(
            "/m/m2/gen?n=3",
            Some(json!({"options": {"model": "m2"}})),
            &[],
        );
        assert_eq!(q.ok().flatten().map(|q| q.quantity), Some(3));
        let e = run("/m/m2/gen", Some(json!({"options": {"model": "m1"}})), &[]);
        assert!(
            matches!(e, Err(QuoteError::Conflicting { what: "model", .. })),
            "{e:?}"
        );
        let e = run("/m/m2/gen?n=1&n=2", None, &[]);
        let e = e.expect_err("conflict");
        assert_eq!(
            e.to_string(),
            "The quantity is given twice with different values (the query parameter `n` and a repeated query parameter `n`); send it once."
        );
        let e = run("/m/m3/gen", None, &[]).expect_err("not available");
        assert_eq!(e.code(), "operation_not_available");
        assert_eq!(
            e.to_string(),
            "The operation `gen` is not available on the model `m3`."
        );
    }

    #[test]
    fn operation_selectors() {
        let q = run("/clip", None, &[("X-Kind", "short"), ("X-Model", "m1")]);
        assert_eq!(
            q.ok().flatten().map(|q| q.operation.to_string()).as_deref(),
            Some("clip")
        );
        let q = run("/clip", Some(json!({"kind": 7})), &[("X-Model", "m1")]);
        assert_eq!(
            q.ok().flatten().map(|q| q.operation.to_string()).as_deref(),
            Some("clip")
        );
        let q = run("/clip", Some(json!({"kind": true})), &[("X-Model", "m1")]);
        assert_eq!(
            q.ok().flatten().map(|q| q.operation.to_string()).as_deref(),
            Some("gen")
        );
        // Header "7" and body 7 agree.
        let q = run(
            "/clip",
            Some(json!({"kind": 7})),
            &[("X-Kind", "7"), ("X-Model", "m1")],
        );
        assert!(q.is_ok(), "{q:?}");
        let e = run(
            "/clip",
            Some(json!({"kind": "short"})),
            &[("X-Kind", "7"), ("X-Model", "m1")],
        );
        assert!(
            matches!(
                e,
                Err(QuoteError::Conflicting {
                    what: "operation",
                    ..
                })
            ),
            "{e:?}"
        );
        let e = run("/clip", None, &[("X-Kind", "long"), ("X-Model", "m1")]).expect_err("unknown");
        assert!(matches!(e, QuoteError::UnknownOperation { .. }));
        assert_eq!(e.code(), "invalid_request");
        let e = run("/clip", None, &[("X-Model", "m1")]).expect_err("missing");
        assert_eq!(
            e.to_string(),
            "No operation was chosen; send the header `X-Kind`, or the JSON body field `kind` as one of short, 7, true."
        );
        let e = run("/clip", None, &[("X-Kind", "short")]).expect_err("missing model");
        assert_eq!(
            e.to_string(),
            "No model was given; send it as the header `X-Model`."
        );
    }

    #[test]
    fn client_text_in_messages_is_clipped() {
        let long: &'static str = Box::leak("x".repeat(500).into_boxed_str());
        let e = run("/clip", None, &[("X-Kind", "short"), ("X-Model", long)])
            .expect_err("unknown model");
        assert_eq!(e.code(), "unknown_model");
        assert!(e.to_string().len() < 120, "{e}");
    }

    #[test]
    fn totals_use_checked_math() {
        let q = Quote {
            operation: Arc::from("gen"),
            model: Arc::from("m1"),
            quantity: u64::MAX,
            unit: Unit::Image,
            credits_per_unit: Some(2),
            rate_per_unit: Some(MicroUsd(2)),
            catalog_version: 0,
        };
        assert_eq!(q.credits_total(), None);
        assert_eq!(q.usd_total(), None);
    }

    #[test]
    fn strict_json() {
        assert_eq!(
            parse_json_body(br#"{"a":[1,{"b":null}],"c":1.5}"#),
            Ok(json!({"a":[1,{"b":null}],"c":1.5}))
        );
        let e = parse_json_body(br#"{"n":1,"n":1}"#).expect_err("duplicate");
        assert!(e.to_string().contains("duplicate key"), "{e}");
        assert_eq!(e.code(), "invalid_request");
    }
}
