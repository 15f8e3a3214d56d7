//! `POST /api/quote` against the real binary in front of a real redis-server: for every seed cell
//! (operation × model × quantity, on credit, credit + pay-per-use and pay-per-use-only accounts
//! of every paid plan) the quote names the payer and the amount the same request is then really
//! charged (`X-Credits-Charged` / `X-Charge-Usd`), or the 402 / 400 / 404 it really gets; 1000
//! concurrent quotes change no byte of the account in Redis; the refused cases say
//! `wouldSucceed: false` with the payer the 402 comes from.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use creditgate::demo_backend::DemoBackend;
use creditgate::rules::{self, Unit};
use serde_json::{json, Value};
use support::gateway::{shipped_rules, GatewayProcess};
use support::http::{self, Response};
use support::RedisServer;

/// One generation request, as a client would send it: target (path and query), headers, body.
#[derive(Debug, Clone)]
struct Cell {
    target: String,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Cell {
    fn header_refs(&self) -> Vec<(&str, &str)> {
        self.headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect()
    }

    /// The quote body: the generation body plus `path`.
    fn quote_body(&self) -> Value {
        let mut body = self.body.clone();
        body["path"] = json!(self.target);
        body
    }
}

fn image_cell(op: &str, model: &str, quantity: u64, variant: usize) -> Cell {
    let mut target = format!("/api/v1/images/{op}");
    let mut headers = Vec::new();
    let mut body = json!({"prompt": "a cat"});
    // The model from each of the route's sources in turn, the count from the body or a header.
    match variant % 3 {
        0 => body["model"] = json!(model),
        1 => headers.push(("X-Model".to_string(), model.to_string())),
        _ => target.push_str(&format!("?model={model}")),
    }
    if variant.is_multiple_of(2) {
        body["n"] = json!(quantity);
    } else if quantity > 1 || variant % 4 == 1 {
        headers.push(("X-Num-Images".to_string(), quantity.to_string()));
    }
    Cell {
        target,
        headers,
        body,
    }
}

fn video_cell(seconds: u64, model: &str, variant: usize) -> Cell {
    let mut target = "/api/v1/videos".to_string();
    let mut headers = Vec::new();
    let mut body = json!({"prompt": "a cat", "duration": seconds});
    match variant % 3 {
        0 => body["model"] = json!(model),
        1 => headers.push(("X-Model".to_string(), model.to_string())),
        _ => target.push_str(&format!("?model={model}")),
    }
    Cell {
        target,
        headers,
        body,
    }
}

/// Every seed cell of the shipped catalog: each image operation × model × 1..=4 and each video
/// length × model (the catalog decides which are priced; the rest must be refused alike).
fn seed_cells() -> Vec<Cell> {
    let catalog = rules::load_dir(&shipped_rules()).expect("shipped rules load");
    let mut cells = Vec::new();
    let mut variant = 0;
    for op in catalog.operations() {
        for model in catalog.models() {
            match op.unit {
                Unit::Image => {
                    for quantity in 1..=4 {
                        cells.push(image_cell(&op.id, &model.id, quantity, variant));
                        variant += 1;
                    }
                }
                _ => {
                    let seconds = op
                        .id
                        .strip_prefix("video-")
                        .and_then(|s| s.strip_suffix('s'))
                        .expect("video-<n>s");
                    let seconds: u64 = seconds.parse().expect("seconds");
                    cells.push(video_cell(seconds, &model.id, variant));
                    variant += 1;
                }
            }
        }
    }
    cells
}

async fn quote(proxy: SocketAddr, key: &str, cell: &Cell) -> Response {
    let auth = format!("Bearer {key}");
    let mut headers = cell.header_refs();
    headers.push(("Authorization", &auth));
    http::post_json(proxy, "/api/quote", &headers, &cell.quote_body()).await
}

async fn generate(proxy: SocketAddr, key: &str, cell: &Cell) -> Response {
    let auth = format!("Bearer {key}");
    let mut headers = cell.header_refs();
    headers.push(("Authorization", &auth));
    http::post_json(proxy, &cell.target, &headers, &cell.body).await
}

/// What a quote said, or the error it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Said {
    Pays { payer: String, amount: String },
    Refused { payer: String, code: String },
    Error { status: u16, code: String },
}

fn read_quote(r: &Response) -> Said {
    if r.status != 200 {
        return Said::Error {
            status: r.status,
            code: r.error_code(),
        };
    }
    let q = r.json();
    let payer = q["payer"].as_str().expect("payer").to_string();
    let amount = match payer.as_str() {
        "credits" => q["credits"].as_u64().expect("credits").to_string(),
        "pay_per_use" => q["usd"].as_str().expect("usd").to_string(),
        "none" => {
            assert!(q.get("credits").is_none() && q.get("usd").is_none(), "{q}");
            String::new()
        }
        other => panic!("payer {other:?}"),
    };
    if payer == "credits" {
        assert!(q.get("usd").is_none(), "{q}");
    }
    if payer == "pay_per_use" {
        assert!(q.get("credits").is_none(), "{q}");
    }
    assert!(q["catalogVersion"].as_u64().is_some(), "{q}");
    assert!(q["operation"].is_string() && q["model"].is_string(), "{q}");
    if q["wouldSucceed"].as_bool().expect("wouldSucceed") {
        assert!(q.get("refusal").is_none(), "{q}");
        Said::Pays { payer, amount }
    } else {
        assert_ne!(amount, "0", "{q}");
        Said::Refused {
            payer,
            code: q["refusal"].as_str().expect("refusal").to_string(),
        }
    }
}

/// What the real request did, in the same terms.
fn read_charge(r: &Response, quoted_payer: Option<&str>) -> Said {
    match r.status {
        // A video is held against its job (`X-Credits-Held`): the quote is the price of the hold.
        200 => match (
            r.header("X-Credits-Charged").or(r.header("X-Credits-Held")),
            r.header("X-Charge-Usd").or(r.header("X-Charge-Usd-Held")),
        ) {
            (Some(c), None) => Said::Pays {
                payer: "credits".into(),
                amount: c.into(),
            },
            (None, Some(u)) => Said::Pays {
                payer: "pay_per_use".into(),
                amount: u.into(),
            },
            other => panic!("a 200 with billing headers {other:?}: {:?}", r.headers),
        },
        // A 402 names no payer: the quote's is checked against the code by the caller.
        402 => Said::Refused {
            payer: quoted_payer.unwrap_or("?").to_string(),
            code: r.error_code(),
        },
        status => Said::Error {
            status,
            code: r.error_code(),
        },
    }
}

/// The payer a 402's code comes from.
fn payer_of_refusal(code: &str) -> &'static [&'static str] {
    match code {
        "spending_limit_reached" => &["pay_per_use"],
        "insufficient_credits" => &["credits", "none"],
        "subscription_inactive" => &["none"],
        other => panic!("not a 402 code: {other}"),
    }
}

/// Quotes `cell`, then sends it for real; asserts they agree and returns what happened.
async fn quote_then_charge(proxy: SocketAddr, key: &str, cell: &Cell) -> Said {
    let quoted = read_quote(&quote(proxy, key, cell).await);
    let payer = match &quoted {
        Said::Refused { payer, .. } => Some(payer.as_str()),
        _ => None,
    };
    let r = generate(proxy, key, cell).await;
    let charged = read_charge(&r, payer);
    assert_eq!(quoted, charged, "{cell:?}: {}", r.text());
    if let Said::Refused { payer, code } = &quoted {
        assert!(
            payer_of_refusal(code).contains(&payer.as_str()),
            "{cell:?}: {code} from {payer}"
        );
    }
    quoted
}

async fn account(gw: &GatewayProcess, id: &str, plan: &str, ppu: bool, limit: u64) -> String {
    gw.create_account_with(json!({
        "id": id, "plan": plan, "payPerUse": ppu, "spendingLimitCents": limit
    }))
    .await;
    gw.create_key(id).await
}

async fn grant(gw: &GatewayProcess, id: &str, amount: u64) {
    let r = gw
        .admin(
            "POST",
            &format!("/admin/accounts/{id}/credits"),
            Some(json!({"amount": amount, "reason": "quote test"})),
        )
        .await;
    assert_eq!(r.status, 200, "grant: {}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_seed_cell_quotes_what_it_is_charged() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.expect("backend");
    let gw = GatewayProcess::start(&redis.url(), backend.addr).await;
    let cells = seed_cells();
    assert_eq!(cells.len(), 3 * 15 * 4 + 2 * 15, "the seed's cells");

    let mut kinds = Vec::new();
    for plan in ["starter", "pro", "business"] {
        for ppu in [false, true] {
            let id = format!("{plan}-{}", if ppu { "ppu" } else { "credits" });
            let key = account(&gw, &id, plan, ppu, 100_000_000).await;
            // Enough credits for every credit cell (360 credits a pass), so no cell is
            // refused for want of credits here (that is `refusals_say_who_refuses`).
            grant(&gw, &id, 1000).await;
            kinds.push((id, key));
        }
    }
    let key = account(&gw, "ppu-only", "pay_per_use", true, 100_000_000).await;
    kinds.push(("ppu-only".to_string(), key));

    let proxy = gw.proxy;
    let mut tasks = Vec::new();
    for (id, key) in kinds {
        let cells = cells.clone();
        tasks.push(tokio::spawn(async move {
            let mut tally: BTreeMap<String, usize> = BTreeMap::new();
            for cell in &cells {
                let said = quote_then_charge(proxy, &key, cell).await;
                let kind = match said {
                    Said::Pays { payer, .. } => format!("pays:{payer}"),
                    Said::Refused { payer, code } => format!("refused:{payer}:{code}"),
                    Said::Error { status, code } => format!("error:{status}:{code}"),
                };
                *tally.entry(kind).or_default() += 1;
            }
            (id, tally)
        }));
    }
    let mut seen = BTreeMap::new();
    for t in tasks {
        let (id, tally) = t.await.expect("account task");
        seen.insert(id, tally);
    }
    // Independently of the gateway: who must have paid how often (4 credit models × 3
    // operations × 4 counts + 4 video models × 2 lengths = 56 credit cells; 15 × 12 = 180
    // image cells with a rate; video on the 11 other models is not available at all).
    let credit_cells = 4 * 3 * 4 + 4 * 2;
    for plan in ["starter", "pro", "business"] {
        let t = &seen[&format!("{plan}-credits")];
        assert_eq!(t.get("pays:credits"), Some(&credit_cells), "{plan}: {t:?}");
        assert_eq!(
            t.get("refused:none:insufficient_credits"),
            Some(&(180 - 48)),
            "{plan}: {t:?}"
        );
        assert_eq!(t.get("error:400:operation_not_available"), Some(&22));
        let t = &seen[&format!("{plan}-ppu")];
        assert_eq!(t.get("pays:credits"), Some(&credit_cells), "{plan}: {t:?}");
        assert_eq!(t.get("pays:pay_per_use"), Some(&(180 - 48)), "{t:?}");
        assert_eq!(t.get("error:400:operation_not_available"), Some(&22));
    }
    let t = &seen["ppu-only"];
    assert_eq!(t.get("pays:pay_per_use"), Some(&180), "{t:?}");
    // Video is priced in credits only; a pay-per-use-only account cannot pay it.
    assert_eq!(
        t.get("refused:none:insufficient_credits"),
        Some(&8),
        "{t:?}"
    );
    assert_eq!(t.get("error:400:operation_not_available"), Some(&22));
}

/// `SCAN` + `DUMP` of every key of the account (`{a:<id>}` hash tag): the bytes of its money.
async fn account_snapshot(
    conn: &mut redis::aio::MultiplexedConnection,
    id: &str,
) -> BTreeMap<String, Vec<u8>> {
    let pattern = format!("*{{a:{id}}}*");
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .expect("SCAN");
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    let mut out = BTreeMap::new();
    for k in keys {
        let dump: Vec<u8> = redis::cmd("DUMP")
            .arg(&k)
            .query_async(conn)
            .await
            .expect("DUMP");
        out.insert(k, dump);
    }
    out
}

/// Quotes in flight at once in [`a_thousand_concurrent_quotes_change_nothing`].
const IN_FLIGHT: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_quotes_change_nothing() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.expect("backend");
    let gw = GatewayProcess::start(&redis.url(), backend.addr).await;
    let key = account(&gw, "q", "starter", true, 100).await;
    // Some credits and some month's spend already used, so both keys exist.
    let pro4 = image_cell("relight", "nano-banana-pro", 4, 0);
    let mj = image_cell("relight", "midjourney-v7", 1, 0);
    assert_eq!(generate(gw.proxy, &key, &pro4).await.status, 200);
    assert_eq!(generate(gw.proxy, &key, &mj).await.status, 200);

    let client = redis::Client::open(redis.url()).expect("redis client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    // The settled holds are tidied off the critical path: wait until the account is still.
    let mut before = account_snapshot(&mut conn, "q").await;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let now = account_snapshot(&mut conn, "q").await;
        if now == before {
            break;
        }
        before = now;
    }
    assert!(
        before.keys().any(|k| k.contains(":bal:")) && before.keys().any(|k| k.contains(":spend:")),
        "{:?}",
        before.keys()
    );
    let balance = gw.balance(&key).await;
    assert_eq!(balance, 100 - 12);
    let spend = || async {
        let r = gw.admin("GET", "/admin/accounts/q", None).await;
        r.json()["monthSpendMicroUsd"].as_u64().expect("spend")
    };
    assert_eq!(spend().await, 324_000);

    // A mix: credits that cover, credits that do not (→ pay-per-use), pay-per-use that
    // passes the limit, nothing that could pay, and priced errors.
    let mix = [
        (image_cell("relight", "seedream-4.5", 2, 0), "credits", true),
        (
            image_cell("relight", "nano-banana-pro", 4, 1),
            "credits",
            true,
        ),
        (
            image_cell("fashion-editorial", "gpt-image-2", 3, 2),
            "pay_per_use",
            true,
        ),
        (
            image_cell("relight", "midjourney-v7", 4, 3),
            "pay_per_use",
            false,
        ),
        (video_cell(10, "seedream-4.5", 4), "credits", true),
    ];
    let proxy = gw.proxy;
    // 1000 quotes, IN_FLIGHT at a time: more at once only measures the 200 ms store timeout
    // of a debug build on two shared cores (503s), for quotes and generation requests alike.
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let (cell, payer, ok) = mix[i % mix.len()].clone();
            let key = key.clone();
            let gate = gate.clone();
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.expect("semaphore");
                let r = quote(proxy, &key, &cell).await;
                assert_eq!(r.status, 200, "{}", r.text());
                let q = r.json();
                assert_eq!(q["payer"], payer, "{cell:?}: {q}");
                assert_eq!(q["wouldSucceed"], ok, "{cell:?}: {q}");
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("quote task");
    }
    let after = account_snapshot(&mut conn, "q").await;
    assert_eq!(before, after, "a quote wrote to the account");
    assert_eq!(gw.balance(&key).await, balance);
    assert_eq!(spend().await, 324_000);
    // And the quote still holds: the next real request is charged what was quoted.
    let cell = &mix[0].0;
    assert_eq!(
        quote_then_charge(proxy, &key, cell).await,
        Said::Pays {
            payer: "credits".into(),
            amount: "2".into()
        }
    );
    assert_eq!(gw.balance(&key).await, balance - 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_say_who_refuses() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.expect("backend");
    let gw = GatewayProcess::start(&redis.url(), backend.addr).await;
    let proxy = gw.proxy;
    let pays = |payer: &str, amount: &str| Said::Pays {
        payer: payer.into(),
        amount: amount.into(),
    };
    let refused = |payer: &str, code: &str| Said::Refused {
        payer: payer.into(),
        code: code.into(),
    };

    // Credits only: spend 96 of 100, then 6 more do not fit, 4 do, then nothing does.
    let key = account(&gw, "starter", "starter", false, 5000).await;
    let pro4 = image_cell("relight", "nano-banana-pro", 4, 0);
    for _ in 0..8 {
        assert_eq!(
            quote_then_charge(proxy, &key, &pro4).await,
            pays("credits", "12")
        );
    }
    let pro2 = image_cell("relight", "nano-banana-pro", 2, 1);
    assert_eq!(
        quote_then_charge(proxy, &key, &pro2).await,
        refused("credits", "insufficient_credits")
    );
    let sd4 = image_cell("product-enhancement", "seedream-4.5", 4, 2);
    assert_eq!(
        quote_then_charge(proxy, &key, &sd4).await,
        pays("credits", "4")
    );
    assert_eq!(gw.balance(&key).await, 0);
    let sd1 = image_cell("relight", "seedream-4.5", 1, 3);
    assert_eq!(
        quote_then_charge(proxy, &key, &sd1).await,
        refused("credits", "insufficient_credits")
    );
    // A model the plan does not price in credits, pay-per-use off: nothing could pay.
    let mj = image_cell("relight", "midjourney-v7", 1, 4);
    assert_eq!(
        quote_then_charge(proxy, &key, &mj).await,
        refused("none", "insufficient_credits")
    );

    // Credits, then pay-per-use up to exactly the limit (27 cents), then no more.
    let key = account(&gw, "overage", "starter", true, 27).await;
    for _ in 0..8 {
        assert_eq!(
            quote_then_charge(proxy, &key, &pro4).await,
            pays("credits", "12")
        );
    }
    let turbo4 = image_cell("relight", "ideogram-v3-turbo", 4, 5);
    assert_eq!(
        quote_then_charge(proxy, &key, &turbo4).await,
        pays("pay_per_use", "0.216")
    );
    // 6 credits > 4 left; 0.216 + 0.242 > 0.27: the 402 comes from the spending limit.
    assert_eq!(
        quote_then_charge(proxy, &key, &pro2).await,
        refused("pay_per_use", "spending_limit_reached")
    );
    assert_eq!(
        quote_then_charge(proxy, &key, &sd4).await,
        pays("credits", "4")
    );
    let turbo1 = image_cell("relight", "ideogram-v3-turbo", 1, 6);
    assert_eq!(
        quote_then_charge(proxy, &key, &turbo1).await,
        pays("pay_per_use", "0.054"),
        "0.216 + 0.054 is exactly the limit"
    );
    assert_eq!(
        quote_then_charge(proxy, &key, &turbo1).await,
        refused("pay_per_use", "spending_limit_reached")
    );
    assert_eq!(
        quote_then_charge(proxy, &key, &sd1).await,
        refused("pay_per_use", "spending_limit_reached")
    );
    let auth = format!("Bearer {key}");
    let r = http::post_json(
        proxy,
        "/api/spending-limit",
        &[("Authorization", &auth)],
        &json!({"limitCents": 100}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        quote_then_charge(proxy, &key, &sd1).await,
        pays("pay_per_use", "0.061")
    );

    // Pay-per-use only: a zero limit refuses everything it could pay; video it cannot pay.
    let key = account(&gw, "zero", "pay_per_use", true, 0).await;
    assert_eq!(
        quote_then_charge(proxy, &key, &mj).await,
        refused("pay_per_use", "spending_limit_reached")
    );
    let clip = video_cell(5, "seedream-4.5", 0);
    assert_eq!(
        quote_then_charge(proxy, &key, &clip).await,
        refused("none", "insufficient_credits")
    );

    // A lapsed subscription: its credits cannot pay; pay-per-use still can.
    for (id, ppu) in [("lapsed", false), ("lapsed-ppu", true)] {
        let key = account(&gw, id, "pro", ppu, 5000).await;
        let r = gw
            .admin(
                "PATCH",
                &format!("/admin/accounts/{id}"),
                Some(json!({"status": "past_due"})),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let expected = if ppu {
            pays("pay_per_use", "0.061")
        } else {
            refused("none", "subscription_inactive")
        };
        assert_eq!(quote_then_charge(proxy, &key, &sd1).await, expected, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_the_generation_requests_errors() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.expect("backend");
    let gw = GatewayProcess::start(&redis.url(), backend.addr).await;
    let proxy = gw.proxy;
    let key = account(&gw, "biz", "business", true, 5000).await;
    let error = |status: u16, code: &str| Said::Error {
        status,
        code: code.into(),
    };
    let cell = |target: &str, headers: &[(&str, &str)], body: Value| Cell {
        target: target.to_string(),
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
        body,
    };
    let relight = "/api/v1/images/relight";
    for (c, expected) in [
        (
            image_cell("relight", "no-such-model", 1, 0),
            error(400, "unknown_model"),
        ),
        (
            video_cell(5, "midjourney-v7", 0),
            error(400, "operation_not_available"),
        ),
        (
            cell(relight, &[], json!({"model": "seedream-4.5", "n": 5})),
            error(400, "invalid_request"),
        ),
        (
            cell(
                relight,
                &[("X-Num-Images", "0")],
                json!({"model": "seedream-4.5"}),
            ),
            error(400, "invalid_request"),
        ),
        (
            cell(
                relight,
                &[("X-Model", "nano-banana-pro")],
                json!({"model": "seedream-4.5"}),
            ),
            error(400, "invalid_request"),
        ),
        (
            cell(
                relight,
                &[("X-Model", "seedream-4.5"), ("X-Model", "seedream-4.5")],
                json!({}),
            ),
            error(400, "invalid_request"),
        ),
        (cell(relight, &[], json!({})), error(400, "invalid_request")),
        (
            cell(
                "/api/v1/videos",
                &[],
                json!({"model": "seedream-4.5", "duration": 7}),
            ),
            error(400, "invalid_request"),
        ),
        (
            cell(
                "/api/v1/images/upscale",
                &[],
                json!({"model": "seedream-4.5"}),
            ),
            error(404, "not_found"),
        ),
        (
            cell(
                "/api/v1//videos",
                &[],
                json!({"model": "seedream-4.5", "duration": 5}),
            ),
            error(400, "invalid_request"),
        ),
        (
            cell(
                "/api/v1/images/%72elight?model=seedream-4.5",
                &[],
                json!({}),
            ),
            Said::Pays {
                payer: "credits".into(),
                amount: "1".into(),
            },
        ),
    ] {
        assert_eq!(quote_then_charge(proxy, &key, &c).await, expected, "{c:?}");
    }

    // The quote's own refusals.
    let auth = format!("Bearer {key}");
    let ask = |target: &'static str, body: Value, with_key: bool| {
        let auth = auth.clone();
        async move {
            let headers: Vec<(&str, &str)> = if with_key {
                vec![("Authorization", auth.as_str())]
            } else {
                vec![]
            };
            http::post_json(proxy, target, &headers, &body).await
        }
    };
    // An unbilled route prices nothing: 404 (`GET /api/v1/jobs/{id}` is proxied, not quoted).
    let r = ask(
        "/api/quote",
        json!({"path": "/api/v1/jobs/j1", "method": "GET"}),
        true,
    )
    .await;
    assert_eq!((r.status, r.error_code().as_str()), (404, "not_found"));
    // The billing endpoints and the quote itself are no priced route either.
    let r = ask("/api/quote", json!({"path": "/api/quote"}), true).await;
    assert_eq!(r.status, 404, "{}", r.text());
    let r = ask("/api/quote", json!({"model": "seedream-4.5"}), true).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "invalid_request")
    );
    let r = ask(
        "/api/quote?model=seedream-4.5",
        json!({"path": relight}),
        true,
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "invalid_request")
    );
    let body = json!({"path": relight, "model": "seedream-4.5"});
    let r = ask("/api/quote", body.clone(), false).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (401, "invalid_api_key")
    );
    let r = http::get(proxy, "/api/quote", &[("Authorization", &auth)]).await;
    assert_eq!(r.status, 404, "{}", r.text());
    let r = ask("/api/quote", body, true).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("Cache-Control"), Some("no-store"));
    assert!(r.header("X-Request-Id").is_some());
    assert_eq!(
        r.json(),
        json!({
            "operation": "relight", "model": "seedream-4.5", "quantity": 1,
            "payer": "credits", "credits": 1, "wouldSucceed": true,
            "catalogVersion": r.json()["catalogVersion"]
        })
    );
}
