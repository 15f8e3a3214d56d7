//! Admission in process: `admit::admit` on a real `Gateway` (shipped rules, memory ledger, fake
//! clock) through the `IncomingRequest` seam (`BufferedRequest`), with no Pingora session and no
//! network. Each test checks the decision and what it did (or did not do) to the ledger.

use std::sync::Arc;

use bytes::Bytes;
use pingora::http::RequestHeader;

use creditgate::admit::{admit, Admission};
use creditgate::apikey::ApiKey;
use creditgate::clock::{FakeClock, SharedClock};
use creditgate::config::Config;
use creditgate::entitlement;
use creditgate::error::GatewayError;
use creditgate::gateway::Gateway;
use creditgate::incoming::BufferedRequest;
use creditgate::ledger::{
    Account, KeyRecord, KeySlotClaim, Ledger, MemoryLedger, SubscriptionStatus,
};
use creditgate::live_catalog::LiveCatalog;
use creditgate::reserve::Payment;

/// 2026-11-15T00:00:00Z
const NOW_MS: i64 = 1_794_700_800_000;
const DAY_MS: i64 = 24 * 3600 * 1000;

struct Fixture {
    gw: Gateway,
    clock: Arc<FakeClock>,
}

fn fixture() -> Fixture {
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("lua-free-rules");
    let config = Config::parse(
        "test.toml",
        &format!(
            "[upstream]\naddress = \"127.0.0.1:9\"\n[store]\nbackend = \"memory\"\n[rules]\ndir = {:?}\n",
            rules.display().to_string()
        ),
    )
    .expect("valid config");
    let catalog = LiveCatalog::load(&rules).expect("shipped rules load");
    let clock = Arc::new(FakeClock::at(NOW_MS));
    let shared: SharedClock = clock.clone();
    let ledger: Arc<dyn Ledger> = Arc::new(MemoryLedger::new());
    Fixture {
        gw: Gateway::new(config, catalog, ledger, shared),
        clock,
    }
}

impl Fixture {
    /// An account (period ending in 10 days) with one key; returns the key.
    async fn account(&self, id: &str, plan: &str, pay_per_use: bool) -> ApiKey {
        let account = Account {
            id: id.to_string(),
            plan: plan.to_string(),
            status: SubscriptionStatus::Active,
            period_anchor_ms: NOW_MS + 10 * DAY_MS,
            pay_per_use,
            spending_limit_cents: 5000,
            stripe_customer_id: None,
            created_ms: NOW_MS,
        };
        assert!(self
            .gw
            .ledger
            .create_account(&account, None)
            .await
            .expect("created"));
        let key = ApiKey::generate();
        let record = KeyRecord {
            id: format!("key_{id}"),
            account_id: id.to_string(),
            prefix: key.display_prefix().to_string(),
            name: None,
            created_ms: NOW_MS,
            revoked: false,
        };
        let claim = self
            .gw
            .ledger
            .insert_key(&key.hash_hex(), &record, 1)
            .await
            .expect("key stored");
        assert_eq!(claim, KeySlotClaim::Claimed);
        key
    }

    async fn balance(&self, id: &str) -> u64 {
        let account = self
            .gw
            .ledger
            .get_account(id)
            .await
            .expect("store")
            .expect("account");
        let catalog = self.gw.catalog.snapshot();
        let bucket = entitlement::credit_bucket(&catalog, &account, self.gw.now_ms())
            .expect("a plan with credits");
        self.gw
            .ledger
            .credit_balance(id, &bucket)
            .await
            .expect("store")
    }

    async fn admit(
        &self,
        method: &str,
        target: &str,
        key: Option<&ApiKey>,
        body: &str,
    ) -> (Result<Admission, GatewayError>, String) {
        self.admit_with(method, target, key, body, &[]).await
    }

    async fn admit_with(
        &self,
        method: &str,
        target: &str,
        key: Option<&ApiKey>,
        body: &str,
        extra: &[(&'static str, &str)],
    ) -> (Result<Admission, GatewayError>, String) {
        let mut header = RequestHeader::build(method, target.as_bytes(), None).expect("request");
        for (name, value) in extra {
            header.insert_header(*name, *value).expect("header");
        }
        header
            .insert_header("content-type", "application/json")
            .expect("header");
        if let Some(key) = key {
            header
                .insert_header("authorization", format!("Bearer {}", key.expose()))
                .expect("header");
        }
        let mut req = BufferedRequest {
            header,
            body: Bytes::from(body.to_string()),
        };
        let mut route = String::from("-");
        let admitted = admit(&self.gw, &mut req, &mut route).await;
        (admitted, route)
    }
}

const RELIGHT: &str = "/api/v1/images/relight";

#[tokio::test]
async fn a_priced_request_reserves_its_credits_once() {
    let f = fixture();
    let key = f.account("acme", "pro", false).await;
    let (admitted, route) = f
        .admit(
            "POST",
            RELIGHT,
            Some(&key),
            r#"{"model":"nano-banana-pro","n":2}"#,
        )
        .await;
    let Ok(Admission::Forward(forward)) = admitted else {
        panic!("not forwarded: {:?}", admitted.err());
    };
    assert_eq!(route, "POST /api/v1/images/{operation}");
    let reservation = forward.reservation.as_ref().expect("billed");
    assert_eq!(
        reservation.payment,
        Payment::Credits {
            charged: 6,
            remaining: 294
        }
    );
    assert_eq!(reservation.meta.operation, "relight");
    assert_eq!(reservation.meta.model, "nano-banana-pro");
    assert_eq!(forward.upstream_path, RELIGHT);
    assert_eq!(f.balance("acme").await, 294);
}

#[tokio::test]
async fn refusals_reserve_nothing() {
    let f = fixture();
    let key = f.account("acme", "starter", false).await;
    let cases: [(&str, &str, Option<&ApiKey>, &str, &str); 6] = [
        (
            "POST",
            "/api/v1/images/../videos",
            Some(&key),
            "{}",
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/nothing-here",
            Some(&key),
            "{}",
            "not_found",
        ),
        (
            "POST",
            RELIGHT,
            None,
            r#"{"model":"nano-banana-pro"}"#,
            "invalid_api_key",
        ),
        (
            "POST",
            RELIGHT,
            Some(&key),
            r#"{"model":"no-such-model"}"#,
            "unknown_model",
        ),
        (
            "POST",
            RELIGHT,
            Some(&key),
            r#"{"model":"nano-banana-pro","n":9}"#,
            "invalid_request",
        ),
        // Credits cannot pay for this model and pay-per-use is off.
        (
            "POST",
            RELIGHT,
            Some(&key),
            r#"{"model":"midjourney-v7"}"#,
            "insufficient_credits",
        ),
    ];
    for (method, target, key, body, code) in cases {
        let (admitted, _) = f.admit(method, target, key, body).await;
        match admitted {
            Err(e) => assert_eq!(e.code(), code, "{target} {body}"),
            Ok(_) => panic!("{target} {body} was admitted"),
        }
    }
    assert_eq!(f.balance("acme").await, 100);
}

#[tokio::test]
async fn credits_run_out_then_pay_per_use_pays() {
    let f = fixture();
    let key = f.account("acme", "starter", true).await;
    for _ in 0..33 {
        let (admitted, _) = f
            .admit(
                "POST",
                RELIGHT,
                Some(&key),
                r#"{"model":"nano-banana-pro"}"#,
            )
            .await;
        assert!(matches!(admitted, Ok(Admission::Forward(_))));
    }
    assert_eq!(f.balance("acme").await, 1);
    let (admitted, _) = f
        .admit(
            "POST",
            RELIGHT,
            Some(&key),
            r#"{"model":"nano-banana-pro"}"#,
        )
        .await;
    let Ok(Admission::Forward(forward)) = admitted else {
        panic!("not forwarded: {:?}", admitted.err());
    };
    let Some(Payment::Spend { charged, .. }) = forward.reservation.map(|r| r.payment) else {
        panic!("not paid by pay-per-use");
    };
    assert_eq!(charged.0, 121_000, "Nano Banana Pro at $0.121");
    assert_eq!(f.balance("acme").await, 1);
}

#[tokio::test]
async fn credits_are_whole_again_in_the_next_period() {
    let f = fixture();
    let key = f.account("acme", "starter", false).await;
    let (admitted, _) = f
        .admit(
            "POST",
            RELIGHT,
            Some(&key),
            r#"{"model":"nano-banana-pro","n":4}"#,
        )
        .await;
    assert!(matches!(admitted, Ok(Admission::Forward(_))));
    assert_eq!(f.balance("acme").await, 88);
    f.clock.advance_ms(11 * DAY_MS);
    assert_eq!(f.balance("acme").await, 100);
}

#[tokio::test]
async fn billing_endpoints_are_answered_and_webhooks_need_post() {
    let f = fixture();
    let key = f.account("acme", "pro", false).await;
    let (admitted, route) = f.admit("GET", "/api/credits/balance", Some(&key), "").await;
    let Ok(Admission::Reply(reply)) = admitted else {
        panic!("not answered here");
    };
    assert_eq!(route, "GET /api/credits/balance");
    assert_eq!(reply.status, 200);
    assert_eq!(&reply.body[..], br#"{"balance":300}"#);

    let (admitted, _) = f.admit("GET", "/webhooks/stripe", None, "").await;
    assert_eq!(admitted.err().map(|e| e.code()), Some("not_found"));
}

#[tokio::test]
async fn an_idempotency_key_in_flight_is_not_charged_twice() {
    let f = fixture();
    let key = f.account("acme", "pro", false).await;
    let body = r#"{"model":"nano-banana-pro"}"#;
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        let extra = [("idempotency-key", "order-1")];
        let (admitted, _) = f
            .admit_with("POST", RELIGHT, Some(&key), body, &extra)
            .await;
        outcomes.push(admitted);
    }
    assert!(matches!(outcomes[0], Ok(Admission::Forward(_))));
    assert_eq!(
        outcomes[1].as_ref().err().map(|e| e.code()),
        Some("idempotency_in_progress")
    );
    assert_eq!(f.balance("acme").await, 297);
}
