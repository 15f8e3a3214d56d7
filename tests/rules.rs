//! The shipped rules directory against the seed (`seed/billing-and-credits.txt`) and CONTRACT
//! §3–4: every plan, rate and credit cost, quoting through the shipped routes, path
//! canonicalisation, source precedence and conflicts, and strict loading of broken copies.

use std::path::{Path, PathBuf};

use creditgate::money::MicroUsd;
use creditgate::rules::{
    self, canonicalize, render_json, render_table, Catalog, CreditGrant, PathError, Quote,
    QuoteError, RequestInputs, RuleProblem, Unit,
};
use serde_json::{json, Value};

fn shipped_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("lua-free-rules")
}

fn shipped() -> Catalog {
    match rules::load_dir(&shipped_dir()) {
        Ok(c) => c,
        Err(problems) => panic!("shipped rules do not load: {problems:#?}"),
    }
}

fn usd(text: &str) -> MicroUsd {
    MicroUsd::parse_decimal(text).expect("test decimal")
}

// The seed's tables, transcribed.
const SEED_PLANS: &[(&str, &str, u64, CreditGrant, u32, &str)] = &[
    ("free", "Free", 10, CreditGrant::Once, 0, "0"),
    ("starter", "Starter", 100, CreditGrant::Period, 4, "16"),
    ("pro", "Pro", 300, CreditGrant::Period, 10, "39"),
    ("business", "Business", 700, CreditGrant::Period, 20, "79"),
];

const SEED_RATES: &[(&str, &str, &str)] = &[
    ("ideogram-v3-turbo", "Ideogram V3 Turbo", "0.054"),
    ("seedream-4.5", "SeeDream 4.5", "0.061"),
    ("nano-banana-2", "Nano Banana 2", "0.072"),
    (
        "nano-banana-pro-replicate",
        "Nano Banana Pro (Replicate)",
        "0.072",
    ),
    ("seedream-5-lite", "SeeDream 5 Lite", "0.072"),
    ("seedream-4.0", "SeeDream 4.0", "0.072"),
    ("qwen-image-edit-plus", "Qwen Image Edit Plus", "0.072"),
    ("qwen-image-edit-2511", "Qwen Image Edit 2511", "0.072"),
    ("z-image-turbo", "Z-Image Turbo", "0.072"),
    ("gpt-image-2", "GPT Image 2", "0.095"),
    ("flux-2-pro", "Flux 2 Pro", "0.108"),
    ("ideogram-v3", "Ideogram V3", "0.108"),
    ("nano-banana-pro", "Nano Banana Pro", "0.121"),
    ("ideogram-v3-quality", "Ideogram V3 Quality", "0.162"),
    ("midjourney-v7", "Midjourney V7", "0.324"),
];

/// Columns of the credit table: (model id, heading).
const SEED_COLUMNS: &[(&str, &str)] = &[
    ("nano-banana-pro", "Gemini Pro"),
    ("nano-banana-2", "Nano Banana 2"),
    ("seedream-4.5", "SeeDream 4.5"),
    ("seedream-5-lite", "SeeDream 5"),
];

/// Rows of the credit table: (operation id, name, unit, credits per column).
const SEED_CREDITS: &[(&str, &str, Unit, [u64; 4])] = &[
    (
        "product-enhancement",
        "Product Enhancement",
        Unit::Image,
        [3, 2, 1, 2],
    ),
    (
        "fashion-editorial",
        "Fashion Editorial",
        Unit::Image,
        [3, 2, 1, 2],
    ),
    ("relight", "Relight", Unit::Image, [3, 2, 1, 2]),
    ("video-5s", "Video (5s)", Unit::Video, [10, 10, 10, 10]),
    ("video-10s", "Video (10s)", Unit::Video, [20, 20, 20, 20]),
];

type Header = (&'static str, &'static str);

#[derive(Debug)]
enum Outcome {
    Ambiguous(PathError),
    NoRoute,
    Quoted(Result<Option<Quote>, QuoteError>),
}

fn request(
    c: &Catalog,
    method: &str,
    target: &str,
    body: Option<Value>,
    headers: &[Header],
) -> Outcome {
    let path = match canonicalize(target) {
        Ok(p) => p,
        Err(e) => return Outcome::Ambiguous(e),
    };
    let Some(m) = c.match_route(method, &path) else {
        return Outcome::NoRoute;
    };
    let lookup = |name: &str| -> Option<&'static str> {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    };
    let body = if m.needs_json_body() { body } else { None };
    let inputs = RequestInputs {
        json_body: body.as_ref(),
        header: &lookup,
        query: &path,
    };
    Outcome::Quoted(rules::quote(c, &m, &inputs))
}

fn quoted(o: Outcome) -> Quote {
    match o {
        Outcome::Quoted(Ok(Some(q))) => q,
        other => panic!("expected a quote, got {other:?}"),
    }
}

fn quote_error(o: Outcome) -> QuoteError {
    match o {
        Outcome::Quoted(Err(e)) => e,
        other => panic!("expected a quote error, got {other:?}"),
    }
}

fn image(c: &Catalog, op: &str, body: Value) -> Outcome {
    request(c, "POST", &format!("/api/v1/images/{op}"), Some(body), &[])
}

#[test]
fn plans_match_the_seed() {
    let c = shipped();
    let ids: Vec<&str> = c.plans().iter().map(|p| &*p.id).collect();
    assert_eq!(ids, SEED_PLANS.iter().map(|p| p.0).collect::<Vec<_>>());
    for (id, name, credits, grant, keys, price) in SEED_PLANS {
        let p = c.plan(id).expect("plan");
        assert_eq!(p.name, *name, "{id}");
        assert_eq!(p.credits, *credits, "{id}");
        assert_eq!(p.grant, *grant, "{id}");
        assert_eq!(p.api_keys, *keys, "{id}");
        assert_eq!(p.price, usd(price), "{id}");
        assert!(p.stripe_price_ids.is_empty(), "{id}");
        if p.api_keys > 0 {
            assert!(p.requests_per_minute > 0, "{id}");
        }
        assert_eq!(c.api_keys_for(id), Some(*keys));
    }
    assert_eq!(c.pay_per_use().api_keys, 4);
    assert!(c.pay_per_use().requests_per_minute > 0);
    assert_eq!(c.api_keys_for(rules::PAY_PER_USE), Some(4));
    assert_eq!(c.plan("pay_per_use").map(|p| p.id.clone()), None);
    assert_eq!(c.plan("enterprise").map(|p| p.id.clone()), None);
    assert_eq!(
        c.plan_for_stripe_price("price_123").map(|p| p.id.clone()),
        None
    );
    assert_eq!(c.version, 0);
    assert_eq!(c.fingerprint.len(), 16);
}

#[test]
fn every_rate_is_exact_and_in_seed_order() {
    let c = shipped();
    let ids: Vec<&str> = c.models().iter().map(|m| &*m.id).collect();
    assert_eq!(ids, SEED_RATES.iter().map(|r| r.0).collect::<Vec<_>>());
    for (id, name, rate) in SEED_RATES {
        let m = c.model(id).expect("model");
        assert_eq!(m.name, *name);
        assert_eq!(m.rate, Some(usd(rate)), "{id}");
        assert_eq!(
            m.rate.map(|r| r.to_string()).as_deref(),
            Some(*rate),
            "{id}"
        );
    }
    // Exactly the four credit models are video-capable and are the credit columns.
    let video: Vec<&str> = c
        .models()
        .iter()
        .filter(|m| m.video)
        .map(|m| &*m.id)
        .collect();
    let mut expect: Vec<&str> = SEED_COLUMNS.iter().map(|c| c.0).collect();
    let mut got = video.clone();
    got.sort_unstable();
    expect.sort_unstable();
    assert_eq!(got, expect);
    let columns: Vec<(&str, &str)> = c
        .credit_columns()
        .map(|m| (&*m.id, m.credit_column.as_deref().unwrap_or("")))
        .collect();
    assert_eq!(columns, SEED_COLUMNS.to_vec());
}

#[test]
fn every_credit_cell_quotes_as_the_seed_says() {
    let c = shipped();
    let ops: Vec<&str> = c.operations().iter().map(|o| &*o.id).collect();
    assert_eq!(ops, SEED_CREDITS.iter().map(|r| r.0).collect::<Vec<_>>());
    for (op, name, unit, credits) in SEED_CREDITS {
        assert_eq!(c.operation(op).map(|o| o.name.as_str()), Some(*name));
        for ((model, _), want) in SEED_COLUMNS.iter().zip(credits) {
            let q = match unit {
                Unit::Image => quoted(image(&c, op, json!({"model": model}))),
                Unit::Video => {
                    let duration = if *op == "video-5s" { 5 } else { 10 };
                    quoted(request(
                        &c,
                        "POST",
                        "/api/v1/videos",
                        Some(json!({"model": model, "duration": duration})),
                        &[],
                    ))
                }
            };
            assert_eq!(&*q.operation, *op);
            assert_eq!(&*q.model, *model);
            assert_eq!(q.unit, *unit);
            assert_eq!(q.quantity, 1);
            assert_eq!(q.credits_per_unit, Some(*want), "{op} on {model}");
            assert_eq!(q.credits_total(), Some(*want), "{op} on {model}");
            match unit {
                // Image operations are also on pay-per-use at the model's rate.
                Unit::Image => assert_eq!(q.rate_per_unit, c.model(model).and_then(|m| m.rate)),
                // Video has no pay-per-use rate in the shipped catalog.
                Unit::Video => assert_eq!(q.rate_per_unit, None),
            }
        }
    }
}

#[test]
fn models_outside_the_credit_table_are_pay_per_use_only() {
    let c = shipped();
    for (model, _, rate) in SEED_RATES {
        if SEED_COLUMNS.iter().any(|(m, _)| m == model) {
            continue;
        }
        for op in ["product-enhancement", "fashion-editorial", "relight"] {
            let q = quoted(image(&c, op, json!({"model": model})));
            assert_eq!(q.credits_per_unit, None, "{op} on {model}");
            assert_eq!(q.rate_per_unit, Some(usd(rate)), "{op} on {model}");
            assert_eq!(q.usd_total(), Some(usd(rate)));
        }
        for duration in [5, 10] {
            let e = quote_error(request(
                &c,
                "POST",
                "/api/v1/videos",
                Some(json!({"model": model, "duration": duration})),
                &[],
            ));
            assert_eq!(e.code(), "operation_not_available", "video on {model}");
        }
    }
}

#[test]
fn two_midjourney_images_cost_0_648() {
    let c = shipped();
    let q = quoted(image(
        &c,
        "relight",
        json!({"model": "midjourney-v7", "n": 2}),
    ));
    assert_eq!(q.quantity, 2);
    assert_eq!(q.credits_total(), None);
    assert_eq!(q.usd_total(), Some(usd("0.648")));
    assert_eq!(
        q.usd_total().map(|m| m.to_string()).as_deref(),
        Some("0.648")
    );
    let q = quoted(image(
        &c,
        "relight",
        json!({"model": "nano-banana-2", "n": 3}),
    ));
    assert_eq!(q.credits_total(), Some(6));
    assert_eq!(
        q.usd_total().map(|m| m.to_string()).as_deref(),
        Some("0.216")
    );
}

/// Rows of the rendered text as trimmed cells.
fn rendered_rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter(|l| l.contains('|'))
        .map(|l| l.split('|').map(|c| c.trim().to_string()).collect())
        .collect()
}

#[test]
fn the_table_shows_every_seed_row() {
    let c = shipped();
    let text = render_table(&c);
    let rows = rendered_rows(&text);
    let has = |cells: &[&str]| rows.iter().any(|r| r == cells);
    for title in [
        "Credit-Based Plans",
        "Pay Per Use Rates",
        "Credit Costs by Operation",
    ] {
        assert!(text.contains(title), "{title}");
    }
    assert!(has(&["Plan", "Credits/mo", "API Keys", "Price"]));
    assert!(has(&["Free", "10 on signup", "0", "Free"]));
    assert!(has(&["Starter", "100", "4", "$16/mo"]));
    assert!(has(&["Pro", "300", "10", "$39/mo"]));
    assert!(has(&["Business", "700", "20", "$79/mo"]));
    assert!(has(&["Model", "Rate per Image"]));
    for (_, name, rate) in SEED_RATES {
        let price = format!("${rate}");
        assert!(has(&[name, &price]), "{name} {rate}\n{text}");
    }
    assert!(has(&[
        "Operation",
        "Gemini Pro",
        "Nano Banana 2",
        "SeeDream 4.5",
        "SeeDream 5"
    ]));
    for (_, name, _, credits) in SEED_CREDITS {
        let cells: Vec<String> = credits.iter().map(|n| format!("{n} cr")).collect();
        let mut row = vec![*name];
        row.extend(cells.iter().map(String::as_str));
        assert!(has(&row), "{row:?}\n{text}");
    }
    // Columns are aligned: every row of a table has its separators at the same places.
    for block in text.split("\n\n") {
        let lines: Vec<&str> = block.lines().filter(|l| l.contains('|')).collect();
        let bars = |l: &str| -> Vec<usize> {
            l.chars()
                .enumerate()
                .filter(|(_, ch)| *ch == '|')
                .map(|(i, _)| i)
                .collect()
        };
        if let Some(first) = lines.first() {
            for l in &lines {
                assert_eq!(bars(l), bars(first), "{block}");
            }
        }
    }
}

#[test]
fn the_table_marks_unavailable_cells_with_a_dash() {
    let dir = copy_of_shipped();
    edit(dir.path(), "operations.toml", |s| {
        s.replace(
            "credits = { \"nano-banana-pro\" = 3, \"nano-banana-2\" = 2, \"seedream-4.5\" = 1, \"seedream-5-lite\" = 2 }\nuse_model_rates = true\n\n[[operation]]\nid = \"fashion-editorial\"",
            "credits = { \"nano-banana-pro\" = 3, \"seedream-4.5\" = 1 }\nuse_model_rates = true\n\n[[operation]]\nid = \"fashion-editorial\"",
        )
    });
    let c = rules::load_dir(dir.path()).expect("edited rules load");
    let rows = rendered_rows(&render_table(&c));
    assert!(rows.contains(
        &["Product Enhancement", "3 cr", "—", "1 cr", "—"]
            .map(String::from)
            .to_vec()
    ));
}

#[test]
fn json_rendering_carries_exact_money() {
    let c = shipped();
    let v = render_json(&c);
    let models = v["models"].as_array().expect("models");
    assert_eq!(models.len(), SEED_RATES.len());
    for (m, (id, _, rate)) in models.iter().zip(SEED_RATES) {
        assert_eq!(m["id"], *id);
        assert_eq!(m["rateUsd"], *rate);
        assert_eq!(m["rateMicroUsd"], usd(rate).0);
    }
    assert_eq!(v["plans"][1]["priceUsd"], "16");
    assert_eq!(v["plans"][1]["priceMicroUsd"], 16_000_000);
    assert_eq!(v["plans"][0]["creditsGrant"], "once");
    assert_eq!(v["payPerUse"]["apiKeys"], 4);
    assert_eq!(
        v["tables"]["plans"][1],
        json!(["Free", "10 on signup", "0", "Free"])
    );
    assert_eq!(v["version"], 0);
}

#[test]
fn ambiguous_paths_are_refused_before_routing() {
    let c = shipped();
    let cases: &[(&str, PathError)] = &[
        ("/api/v1/images%2Frelight", PathError::EncodedSlash),
        ("/api/v1/images%2frelight", PathError::EncodedSlash),
        ("/api/v1%5Cimages/relight", PathError::EncodedSlash),
        ("/api/v1\\images/relight", PathError::Backslash),
        ("/api/v1/images/relight%00", PathError::ControlCharacter),
        ("/api/v1/images/relight\0", PathError::ControlCharacter),
        ("/api/v1/images/relight\r\n", PathError::ControlCharacter),
        ("/api/v1/jobs/../images/relight", PathError::DotSegment),
        ("/api/v1/images/./relight", PathError::DotSegment),
        ("/api/v1/jobs/%2e%2e/images/relight", PathError::DotSegment),
        ("/api/v1/jobs/%2E%2e/x", PathError::DotSegment),
        ("/api/v1//images/relight", PathError::EmptySegment),
        ("/api/v1/images/relight/", PathError::EmptySegment),
        ("/api/v1/images/relight;model=cheap", PathError::Semicolon),
        ("/api/v1/images/relight%3B", PathError::Semicolon),
        ("/api/v1/images/%252e%252e", PathError::EncodedPercent),
        ("/api/v1/images/%G0", PathError::InvalidPercentEncoding),
        (
            "/api/v1/images/relight%2",
            PathError::InvalidPercentEncoding,
        ),
        ("/api/v1/images/réeclairage", PathError::NonAscii),
        ("api/v1/videos", PathError::NotOriginForm),
        ("http://upstream/api/v1/videos", PathError::NotOriginForm),
        ("*", PathError::NotOriginForm),
    ];
    for (target, want) in cases {
        match request(
            &c,
            "POST",
            target,
            Some(json!({"model": "nano-banana-2"})),
            &[],
        ) {
            Outcome::Ambiguous(e) => {
                assert_eq!(&e, want, "{target}");
                assert_eq!(e.code(), "invalid_request");
            }
            other => panic!("{target}: expected a refusal, got {other:?}"),
        }
    }
}

#[test]
fn decoded_unreserved_characters_still_route_and_price() {
    let c = shipped();
    let q = quoted(request(
        &c,
        "POST",
        "/api/v1/images/%72elight",
        Some(json!({"model": "seedream-4.5"})),
        &[],
    ));
    assert_eq!(&*q.operation, "relight");
    let p = canonicalize("/api/v1/images/%72elight?x=1").expect("canonical");
    assert_eq!(p.path, "/api/v1/images/relight");
    assert_eq!(p.request_target(), "/api/v1/images/relight?x=1");
}

#[test]
fn routing_is_exact() {
    let c = shipped();
    let body = Some(json!({"model": "nano-banana-2"}));
    for (method, target) in [
        ("POST", "/API/v1/images/relight"),
        ("POST", "/api/v1/images/Relight"),
        ("POST", "/api/v1/images/unknown-operation"),
        ("POST", "/api/v1/images/video-5s"),
        ("POST", "/api/v1/images"),
        ("POST", "/api/v1/images/relight/extra"),
        ("GET", "/api/v1/images/relight"),
        ("post", "/api/v1/images/relight"),
        ("POST", "/api/v1/jobs/j1"),
        ("GET", "/api/v1/jobs"),
        ("GET", "/"),
        ("GET", "/api/credits/balance"),
    ] {
        assert!(
            matches!(
                request(&c, method, target, body.clone(), &[]),
                Outcome::NoRoute
            ),
            "{method} {target}"
        );
    }
    let path = canonicalize("/api/v1/jobs/job_123").expect("canonical");
    let m = c.match_route("GET", &path).expect("jobs route");
    assert!(!m.is_billed());
    assert!(!m.needs_json_body());
    assert_eq!(m.capture(&path, "id"), Some("job_123"));
    assert!(matches!(
        request(&c, "GET", "/api/v1/jobs/job_123", None, &[]),
        Outcome::Quoted(Ok(None))
    ));

    let path = canonicalize("/api/v1/images/relight").expect("canonical");
    let m = c.match_route("POST", &path).expect("images route");
    assert!(m.is_billed());
    assert!(m.needs_json_body());
    assert_eq!(m.operation(), Some("relight"));
    assert_eq!(m.label(), "POST /api/v1/images/{operation}");
}

#[test]
fn model_sources_in_precedence_order() {
    let c = shipped();
    // Body only, header only, query only.
    let q = quoted(image(&c, "relight", json!({"model": "seedream-4.5"})));
    assert_eq!(&*q.model, "seedream-4.5");
    let q = quoted(request(
        &c,
        "POST",
        "/api/v1/images/relight",
        None,
        &[("x-model", "nano-banana-2")],
    ));
    assert_eq!(&*q.model, "nano-banana-2");
    let q = quoted(request(
        &c,
        "POST",
        "/api/v1/images/relight?model=nano-banana-pro",
        Some(json!({})),
        &[],
    ));
    assert_eq!(&*q.model, "nano-banana-pro");
    // Header name case does not matter.
    let q = quoted(request(
        &c,
        "POST",
        "/api/v1/images/relight",
        None,
        &[("X-MODEL", "seedream-5-lite")],
    ));
    assert_eq!(&*q.model, "seedream-5-lite");
    // Agreeing sources are fine.
    let q = quoted(request(
        &c,
        "POST",
        "/api/v1/images/relight?model=seedream-4.5",
        Some(json!({"model": "seedream-4.5"})),
        &[("X-Model", "seedream-4.5")],
    ));
    assert_eq!(&*q.model, "seedream-4.5");
    // JSON null is absent.
    let q = quoted(request(
        &c,
        "POST",
        "/api/v1/images/relight",
        Some(json!({"model": null})),
        &[("X-Model", "seedream-4.5")],
    ));
    assert_eq!(&*q.model, "seedream-4.5");
}

#[test]
fn disagreeing_sources_are_refused() {
    let c = shipped();
    type Case = (&'static str, Option<Value>, Vec<Header>);
    let cases: Vec<Case> = vec![
        // Cheap model in the body, expensive one in a header.
        (
            "/api/v1/images/relight",
            Some(json!({"model": "seedream-4.5"})),
            vec![("X-Model", "midjourney-v7")],
        ),
        (
            "/api/v1/images/relight?model=midjourney-v7",
            Some(json!({"model": "seedream-4.5"})),
            vec![],
        ),
        (
            "/api/v1/images/relight?model=midjourney-v7",
            None,
            vec![("X-Model", "seedream-4.5")],
        ),
        (
            "/api/v1/images/relight?model=seedream-4.5&model=midjourney-v7",
            None,
            vec![],
        ),
        // Quantities.
        (
            "/api/v1/images/relight",
            Some(json!({"model": "seedream-4.5", "n": 1})),
            vec![("X-Num-Images", "4")],
        ),
        (
            "/api/v1/videos",
            Some(json!({"model": "seedream-4.5", "duration": 5})),
            vec![("X-Model", "nano-banana-pro")],
        ),
    ];
    for (target, body, headers) in cases {
        let e = quote_error(request(&c, "POST", target, body.clone(), &headers));
        assert!(
            matches!(e, QuoteError::Conflicting { .. }),
            "{target} {body:?} {headers:?}: {e:?}"
        );
        assert_eq!(e.code(), "invalid_request");
        assert!(!e.to_string().is_empty());
    }
    // Agreeing quantity from the body and the header.
    let q = quoted(request(
        &c,
        "POST",
        "/api/v1/images/relight",
        Some(json!({"model": "seedream-4.5", "n": 3})),
        &[("X-Num-Images", "3")],
    ));
    assert_eq!(q.quantity, 3);
    assert_eq!(q.credits_total(), Some(3));
}

#[test]
fn quantity_rules() {
    let c = shipped();
    let q = quoted(image(&c, "relight", json!({"model": "seedream-4.5"})));
    assert_eq!(q.quantity, 1);
    let q = quoted(request(
        &c,
        "POST",
        "/api/v1/images/relight",
        Some(json!({"model": "nano-banana-pro"})),
        &[("X-Num-Images", "4")],
    ));
    assert_eq!(q.quantity, 4);
    assert_eq!(q.credits_total(), Some(12));
    for n in [
        json!(0),
        json!(5),
        json!(-1),
        json!(2.0),
        json!(2.5),
        json!("2"),
        json!(true),
        json!([2]),
        json!(u64::MAX),
    ] {
        let e = quote_error(image(
            &c,
            "relight",
            json!({"model": "seedream-4.5", "n": n}),
        ));
        assert!(
            matches!(e, QuoteError::InvalidQuantity { .. }),
            "n = {n}: {e:?}"
        );
        assert_eq!(e.code(), "invalid_request");
    }
    for h in [
        "0",
        "5",
        "-1",
        "+2",
        " 2",
        "2.0",
        "two",
        "",
        "99999999999999999999999",
    ] {
        let headers = [("X-Num-Images", h)];
        let e = quote_error(request(
            &c,
            "POST",
            "/api/v1/images/relight",
            Some(json!({"model": "seedream-4.5"})),
            &headers,
        ));
        assert!(
            matches!(e, QuoteError::InvalidQuantity { .. }),
            "header {h:?}: {e:?}"
        );
    }
    // Videos are always one.
    let q = quoted(request(
        &c,
        "POST",
        "/api/v1/videos",
        Some(json!({"model": "seedream-4.5", "duration": 10, "n": 3})),
        &[],
    ));
    assert_eq!(q.quantity, 1);
    assert_eq!(q.credits_total(), Some(20));
}

#[test]
fn model_errors() {
    let c = shipped();
    let e = quote_error(image(&c, "relight", json!({})));
    assert!(matches!(e, QuoteError::MissingModel { .. }), "{e:?}");
    assert_eq!(e.code(), "invalid_request");
    let e = quote_error(image(&c, "relight", json!({"model": "dall-e-9"})));
    assert!(matches!(e, QuoteError::UnknownModel { .. }), "{e:?}");
    assert_eq!(e.code(), "unknown_model");
    let e = quote_error(image(&c, "relight", json!({"model": "Seedream-4.5"})));
    assert_eq!(e.code(), "unknown_model");
    for bad in [
        json!(""),
        json!(3),
        json!(["seedream-4.5"]),
        json!({"id": "x"}),
    ] {
        let e = quote_error(image(&c, "relight", json!({"model": bad})));
        assert_eq!(e.code(), "invalid_request", "{bad}");
    }
}

#[test]
fn video_duration_chooses_the_operation() {
    let c = shipped();
    let video = |body: Value| request(&c, "POST", "/api/v1/videos", Some(body), &[]);
    assert_eq!(
        &*quoted(video(json!({"model": "nano-banana-2", "duration": 5}))).operation,
        "video-5s"
    );
    assert_eq!(
        &*quoted(video(json!({"model": "nano-banana-2", "duration": 10}))).operation,
        "video-10s"
    );
    for d in [
        json!(7),
        json!(0),
        json!(5.5),
        json!(null),
        json!([5]),
        json!("15"),
    ] {
        let e = quote_error(video(json!({"model": "nano-banana-2", "duration": d})));
        assert_eq!(e.code(), "invalid_request", "duration {d}: {e:?}");
    }
    let e = quote_error(video(json!({"model": "nano-banana-2"})));
    assert!(matches!(e, QuoteError::MissingOperation { .. }), "{e:?}");
    let e = quote_error(video(json!({"model": "midjourney-v7", "duration": 5})));
    assert!(
        matches!(e, QuoteError::OperationNotAvailable { .. }),
        "{e:?}"
    );
    assert_eq!(e.code(), "operation_not_available");
}

#[test]
fn duplicate_json_keys_are_refused() {
    assert!(rules::parse_json_body(br#"{"model":"seedream-4.5","n":2}"#).is_ok());
    let e = rules::parse_json_body(br#"{"model":"seedream-4.5","model":"midjourney-v7"}"#);
    assert!(e.is_err());
    assert!(rules::parse_json_body(br#"{"a":{"b":1,"b":2}}"#).is_err());
    assert!(rules::parse_json_body(br#"{"a":1} x"#).is_err());
    assert!(rules::parse_json_body(b"").is_err());
}

// ---- broken copies -------------------------------------------------------------------------

fn copy_of_shipped() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in rules::RULE_FILES {
        std::fs::copy(shipped_dir().join(name), dir.path().join(name)).expect("copy");
    }
    dir
}

fn edit(dir: &Path, file: &str, f: impl FnOnce(String) -> String) {
    let path = dir.join(file);
    let before = std::fs::read_to_string(&path).expect("read");
    let after = f(before.clone());
    assert_ne!(before, after, "the edit of {file} changed nothing");
    std::fs::write(&path, after).expect("write");
}

fn problems_of(dir: &Path) -> Vec<RuleProblem> {
    match rules::load_dir(dir) {
        Ok(_) => panic!("broken rules loaded"),
        Err(p) => p,
    }
}

fn has_problem(problems: &[RuleProblem], file: &str, field: &str, words: &str) -> bool {
    problems
        .iter()
        .any(|p| p.file == file && p.field == field && p.message.contains(words))
}

#[test]
fn every_problem_is_reported_together() {
    let dir = copy_of_shipped();
    // model[3] is nano-banana-pro-replicate: make its rate negative.
    edit(dir.path(), "models.toml", |s| {
        s.replace(
            "id = \"nano-banana-pro-replicate\"\nname = \"Nano Banana Pro (Replicate)\"\nrate_usd = 0.072",
            "id = \"nano-banana-pro-replicate\"\nname = \"Nano Banana Pro (Replicate)\"\nrate_usd = -0.072",
        )
    });
    // A duplicate model id.
    edit(dir.path(), "models.toml", |s| {
        s + "\n[[model]]\nid = \"midjourney-v7\"\nname = \"Midjourney V7 again\"\nrate_usd = 0.5\n"
    });
    // An operation naming an unknown model.
    edit(dir.path(), "operations.toml", |s| {
        s.replacen("\"seedream-5-lite\" = 2 }", "\"seedream-9\" = 2 }", 1)
    });
    // A route naming an unknown operation.
    edit(dir.path(), "routes.toml", |s| {
        s.replace("\"relight\"]", "\"relight\", \"upscale\"]")
    });
    // A duplicate plan id and the reserved id.
    edit(dir.path(), "plans.toml", |s| {
        s.replacen("id = \"pro\"", "id = \"starter\"", 1).replacen(
            "id = \"business\"",
            "id = \"pay_per_use\"",
            1,
        )
    });

    let problems = problems_of(dir.path());
    let listing: Vec<String> = problems.iter().map(ToString::to_string).collect();
    let listing = listing.join("\n");
    assert!(
        has_problem(
            &problems,
            "models.toml",
            "model[3].rate_usd",
            "-0.072 is negative"
        ),
        "{listing}"
    );
    assert!(
        has_problem(
            &problems,
            "models.toml",
            "model[15].id",
            "duplicate model id"
        ),
        "{listing}"
    );
    assert!(
        has_problem(
            &problems,
            "operations.toml",
            "operation[0].credits.seedream-9",
            "unknown model"
        ),
        "{listing}"
    );
    assert!(
        has_problem(
            &problems,
            "routes.toml",
            "route[0].operations[3]",
            "unknown operation"
        ),
        "{listing}"
    );
    assert!(
        has_problem(&problems, "plans.toml", "plan[2].id", "duplicate plan id"),
        "{listing}"
    );
    assert!(
        has_problem(&problems, "plans.toml", "plan[3].id", "reserved"),
        "{listing}"
    );
    // Display is "file: field: message".
    assert!(
        listing.contains("models.toml: model[3].rate_usd: -0.072 is negative"),
        "{listing}"
    );
    // Every problem carries a line number to find it.
    assert!(
        problems.iter().all(|p| p.message.contains("(line ")),
        "{listing}"
    );
}

#[test]
fn structural_problems_in_several_files_are_all_reported() {
    let dir = copy_of_shipped();
    edit(dir.path(), "plans.toml", |s| {
        s.replacen("price_usd = 39", "price_usd = \"thirty\"", 1)
    });
    edit(dir.path(), "plans.toml", |s| {
        s.replacen("price_usd = 79\n", "", 1)
    });
    edit(dir.path(), "models.toml", |s| {
        s.replacen("rate_usd = 0.054", "rate_usd = 0.054\ncolour = \"red\"", 1)
    });
    edit(dir.path(), "models.toml", |s| {
        s.replacen("rate_usd = 0.324", "rate_usd = 3.24e-1", 1)
    });
    edit(dir.path(), "operations.toml", |s| {
        s.replacen("unit = \"video\"", "unit = \"audio\"", 1)
    });
    edit(dir.path(), "routes.toml", |s| {
        s.replacen("quantity_max = 4", "quantity_max = 0", 1)
            .replacen("method = \"GET\"", "method = \"FETCH\"", 1)
            .replacen("\"header:X-Model\"", "\"cookie:model\"", 1)
    });
    let problems = problems_of(dir.path());
    let listing = problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        has_problem(
            &problems,
            "plans.toml",
            "plan[2].price_usd",
            "not a plain decimal"
        ),
        "{listing}"
    );
    assert!(
        has_problem(&problems, "plans.toml", "plan[3].price_usd", "missing"),
        "{listing}"
    );
    assert!(
        has_problem(&problems, "models.toml", "model[0].colour", "unknown field"),
        "{listing}"
    );
    assert!(
        has_problem(
            &problems,
            "models.toml",
            "model[14].rate_usd",
            "not a plain decimal"
        ),
        "{listing}"
    );
    assert!(
        has_problem(&problems, "operations.toml", "operation[3].unit", "audio"),
        "{listing}"
    );
    assert!(
        has_problem(
            &problems,
            "routes.toml",
            "route[0].quantity_max",
            "at least 1"
        ),
        "{listing}"
    );
    assert!(
        has_problem(&problems, "routes.toml", "route[2].method", "FETCH"),
        "{listing}"
    );
    assert!(
        has_problem(&problems, "routes.toml", "route[0].model[1]", "cookie"),
        "{listing}"
    );
}

#[test]
fn a_missing_file_is_a_problem_and_the_rest_is_still_checked() {
    let dir = copy_of_shipped();
    std::fs::remove_file(dir.path().join("operations.toml")).expect("remove");
    edit(dir.path(), "models.toml", |s| {
        s.replacen("rate_usd = 0.061", "rate_usd = -0.061", 1)
    });
    let problems = problems_of(dir.path());
    assert!(
        has_problem(&problems, "operations.toml", "(file)", "cannot read"),
        "{problems:#?}"
    );
    assert!(
        has_problem(&problems, "models.toml", "model[1].rate_usd", "negative"),
        "{problems:#?}"
    );
    // Routes name operations of the missing file: not reported again as unknown.
    assert!(
        !problems
            .iter()
            .any(|p| p.message.contains("unknown operation")),
        "{problems:#?}"
    );
}

#[test]
fn amounts_that_could_overflow_are_refused() {
    let dir = copy_of_shipped();
    edit(dir.path(), "routes.toml", |s| {
        s.replacen("quantity_max = 4", "quantity_max = 4000000000000000000", 1)
    });
    let problems = problems_of(dir.path());
    assert!(
        has_problem(
            &problems,
            "routes.toml",
            "route[0].quantity_max",
            "overflows"
        ),
        "{problems:#?}"
    );

    let dir = copy_of_shipped();
    edit(dir.path(), "operations.toml", |s| {
        s.replacen(
            "credits_on_video_models = 10",
            "credits_on_video_models = 18446744073709551615",
            1,
        )
    });
    let problems = problems_of(dir.path());
    assert!(
        has_problem(
            &problems,
            "operations.toml",
            "operation[3].credits_on_video_models",
            ""
        ),
        "{problems:#?}"
    );

    let dir = copy_of_shipped();
    edit(dir.path(), "models.toml", |s| {
        s.replacen("rate_usd = 0.324", "rate_usd = 99999999999999.5", 1)
    });
    let problems = problems_of(dir.path());
    assert!(
        has_problem(&problems, "models.toml", "model[14].rate_usd", "too large"),
        "{problems:#?}"
    );
}

#[test]
fn operators_can_extend_the_rules_without_code() {
    let dir = copy_of_shipped();
    edit(dir.path(), "plans.toml", |s| {
        s.replacen(
            "stripe_price_ids = []\n\n[[plan]]\nid = \"pro\"",
            "stripe_price_ids = [\"price_starter_m\"]\n\n[[plan]]\nid = \"pro\"",
            1,
        )
    });
    edit(dir.path(), "models.toml", |s| {
        s + "\n[[model]]\nid = \"veo-3\"\nname = \"Veo 3\"\nrate_usd = \"0.5\"\nvideo = true\n"
    });
    edit(dir.path(), "operations.toml", |s| {
        s + "\n[[operation]]\nid = \"upscale\"\nname = \"Upscale\"\nunit = \"image\"\ncredits = { \"seedream-4.5\" = 1 }\nrates_usd = { \"seedream-4.5\" = 0.01 }\n"
    });
    edit(dir.path(), "routes.toml", |s| {
        s + "\n[[route]]\nmethod = \"POST\"\npath = \"/api/v1/models/{model}/upscale\"\noperation = \"upscale\"\nmodel = [\"path:model\"]\nquantity = [\"query:count\"]\nquantity_max = 10\n"
    });
    let c = rules::load_dir(dir.path()).expect("extended rules load");
    assert_eq!(
        c.plan_for_stripe_price("price_starter_m").map(|p| &*p.id),
        Some("starter")
    );
    assert_eq!(c.model("veo-3").and_then(|m| m.rate), Some(usd("0.5")));
    // The new video-capable model gets the video credit costs.
    let q = quoted(request(
        &c,
        "POST",
        "/api/v1/videos",
        Some(json!({"model": "veo-3", "duration": 10})),
        &[],
    ));
    assert_eq!(q.credits_per_unit, Some(20));
    let q = quoted(request(
        &c,
        "POST",
        "/api/v1/models/seedream-4.5/upscale?count=7",
        None,
        &[],
    ));
    assert_eq!(
        (&*q.operation, &*q.model, q.quantity),
        ("upscale", "seedream-4.5", 7)
    );
    assert_eq!(q.credits_total(), Some(7));
    assert_eq!(
        q.usd_total().map(|m| m.to_string()).as_deref(),
        Some("0.07")
    );
    assert_ne!(c.fingerprint, shipped().fingerprint);
}
