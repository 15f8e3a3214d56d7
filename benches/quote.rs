//! Per-request cost of the rules layer for a typical image request: canonicalise the target,
//! match the route, and quote (model and quantity from the JSON body, headers consulted for
//! conflicts). Also the strict JSON body parse the gateway does first.

use std::hint::black_box;
use std::path::Path;

use creditgate::rules::{self, canonicalize, RequestInputs};
use criterion::{criterion_group, criterion_main, Criterion};

const TARGET: &str = "/api/v1/images/relight?source=upload&model=nano-banana-2";
const BODY: &[u8] = br#"{"model":"nano-banana-2","n":2,"prompt":"a product photo on a marble table, soft window light","image_url":"https://example.com/in.png"}"#;
const HEADERS: &[(&str, &str)] = &[
    ("host", "api.example.com"),
    ("content-type", "application/json"),
    (
        "authorization",
        "Bearer at_live_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    ),
    ("user-agent", "bench/1.0"),
    ("x-num-images", "2"),
];

fn bench(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("lua-free-rules");
    let catalog = match rules::load_dir(&dir) {
        Ok(c) => c,
        Err(problems) => panic!("shipped rules do not load: {problems:?}"),
    };
    let body = match rules::parse_json_body(BODY) {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    };
    let lookup = |name: &str| -> Option<&'static str> {
        HEADERS
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    };

    c.bench_function("canonicalize + match_route + quote (image)", |b| {
        b.iter(|| {
            let Ok(path) = canonicalize(black_box(TARGET)) else {
                return None;
            };
            let m = catalog.match_route(black_box("POST"), &path)?;
            let inputs = RequestInputs {
                json_body: Some(&body),
                header: &lookup,
                query: &path,
            };
            rules::quote(&catalog, &m, &inputs).ok().flatten()
        })
    });

    c.bench_function("parse_json_body (strict)", |b| {
        b.iter(|| rules::parse_json_body(black_box(BODY)).ok())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
