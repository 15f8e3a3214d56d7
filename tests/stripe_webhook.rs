//! `POST /webhooks/stripe` through [`webhook::handle`], on both ledgers (memory, and Redis on
//! its own `redis-server`): signatures are checked first, subscription events set plan, status
//! and period, an upgrade adds the allowance difference, `invoice.paid` resets the period's
//! credits, and every event id applies once however often Stripe sends it.

#[path = "support/stripe_fixtures.rs"]
mod stripe_fixtures;
mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use creditgate::clock::{Clock, FakeClock, SharedClock, SystemClock};
use creditgate::config::Config;
use creditgate::entitlement;
use creditgate::error::GatewayError;
use creditgate::gateway::Gateway;
use creditgate::ledger::{
    Account, Ledger, MemoryLedger, RedisLedger, StripeEventClaim, SubscriptionStatus,
};
use creditgate::live_catalog::LiveCatalog;
use creditgate::respond::JsonReply;
use creditgate::stripe::signature::sign_header;
use creditgate::stripe::webhook;
use serde_json::{json, Value};
use support::RedisServer;

const SECRET_ENV: &str = "CG_TEST_STRIPE_WEBHOOK_SECRET";
const SECRET: &str = "whsec_creditgate_test";
const DAY_MS: i64 = 24 * 3600 * 1000;
const CUSTOMER: &str = "cus_Web123";

struct Fixture {
    gw: Gateway,
    clock: Arc<FakeClock>,
    _rules: tempfile::TempDir,
    _server: Option<RedisServer>,
}

/// The shipped rules with Stripe prices `price_<plan>` for every plan.
fn rules_with_prices() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("lua-free-rules");
    for entry in std::fs::read_dir(&shipped).expect("rules dir") {
        let path = entry.expect("entry").path();
        let mut text = std::fs::read_to_string(&path).expect("rules file");
        if path.file_name().and_then(|n| n.to_str()) == Some("plans.toml") {
            for plan in ["free", "starter", "pro", "business"] {
                text = text.replacen(
                    "stripe_price_ids = []",
                    &format!("stripe_price_ids = [\"price_{plan}\"]"),
                    1,
                );
            }
        }
        let name = path.file_name().expect("file name");
        std::fs::write(dir.path().join(name), text).expect("write rules");
    }
    dir
}

fn fixture(ledger: Arc<dyn Ledger>, server: Option<RedisServer>) -> Fixture {
    std::env::set_var(SECRET_ENV, SECRET);
    let rules = rules_with_prices();
    let config = Config::parse(
        "test.toml",
        &format!(
            "[upstream]\naddress = \"127.0.0.1:9\"\n[rules]\ndir = {:?}\n[stripe]\nwebhook_secret_env = \"{SECRET_ENV}\"\n",
            rules.path().display().to_string()
        ),
    )
    .expect("valid config");
    let catalog = LiveCatalog::load(rules.path()).expect("rules load");
    // Real time: the Redis ledger expires buckets on the server's clock.
    let clock = Arc::new(FakeClock::at(SystemClock.now_ms()));
    let shared: SharedClock = clock.clone();
    Fixture {
        gw: Gateway::new(config, catalog, ledger, shared),
        clock,
        _rules: rules,
        _server: server,
    }
}

fn memory() -> Fixture {
    fixture(Arc::new(MemoryLedger::new()), None)
}

fn redis() -> Fixture {
    let server = RedisServer::start();
    let ledger = RedisLedger::new(&server.url(), Duration::from_millis(500)).expect("url");
    fixture(Arc::new(ledger), Some(server))
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod on_memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::memory()).await;
                }
            )*
        }
        mod on_redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::redis()).await;
                }
            )*
        }
    };
}

on_both!(
    subscription_events_set_plan_status_and_period,
    older_api_versions_put_the_period_end_on_the_subscription,
    stripes_fixtures_as_sent_are_read,
    every_stripe_status_maps_onto_five_and_unknown_ones_are_refused,
    an_upgrade_mid_period_adds_the_difference,
    a_re_anchored_period_keeps_its_balance,
    a_deleted_subscription_cancels,
    invoice_paid_resets_the_period_to_the_allowance,
    each_event_applies_once,
    an_event_being_applied_elsewhere_answers_409,
    bad_signatures_are_refused_and_change_nothing,
    unknown_types_and_customers_are_ignored,
    older_subscription_events_are_ignored,
);

fn account(f: &Fixture, id: &str, plan: &str, customer: Option<&str>) -> Account {
    let t0 = f.clock.now_ms();
    Account {
        id: id.into(),
        plan: plan.into(),
        status: SubscriptionStatus::Active,
        period_anchor_ms: t0 + 10 * DAY_MS,
        pay_per_use: false,
        spending_limit_cents: 5000,
        stripe_customer_id: customer.map(str::to_string),
        created_ms: t0 - 20 * DAY_MS,
    }
}

async fn create(f: &Fixture, a: &Account) {
    assert!(f.gw.ledger.create_account(a, None).await.expect("store"));
}

async fn stored(f: &Fixture, id: &str) -> Account {
    f.gw.ledger
        .get_account(id)
        .await
        .expect("store")
        .expect("account exists")
}

async fn balance(f: &Fixture, id: &str) -> u64 {
    let a = stored(f, id).await;
    let catalog = f.gw.catalog.snapshot();
    let bucket = entitlement::credit_bucket(&catalog, &a, f.clock.now_ms()).expect("a bucket");
    f.gw.ledger
        .credit_balance(id, &bucket)
        .await
        .expect("store")
}

async fn set_balance(f: &Fixture, id: &str, value: u64) {
    let a = stored(f, id).await;
    let catalog = f.gw.catalog.snapshot();
    let bucket = entitlement::credit_bucket(&catalog, &a, f.clock.now_ms()).expect("a bucket");
    f.gw.ledger
        .reset_credits(id, &bucket, value)
        .await
        .expect("store");
}

/// A signed-to-be event built from Stripe's fixtures (`support/stripe_fixtures.rs`).
fn event(id: &str, kind: &str, object: Value) -> Vec<u8> {
    stripe_fixtures::event_body(id, kind, SystemClock.now_ms() / 1000, object)
}

/// Stripe's fixture subscription for [`CUSTOMER`]: a metered item first, then the plan's.
fn subscription(price: &str, status: &str, period_end_s: i64) -> Value {
    stripe_fixtures::subscription(
        "sub_1",
        CUSTOMER,
        status,
        &[("si_meter", "price_metered_usage"), ("si_plan", price)],
        period_end_s,
    )
}

/// Sends a correctly signed delivery.
async fn deliver(f: &Fixture, body: &[u8]) -> Result<JsonReply, GatewayError> {
    let now_s = f.clock.now_ms() / 1000;
    let header = sign_header(SECRET, now_s, body).expect("sign");
    webhook::handle(&f.gw, Some(&header), body).await
}

fn result_of(reply: &JsonReply) -> String {
    assert_eq!(reply.status, 200);
    let body: Value = serde_json::from_slice(&reply.body).expect("JSON reply");
    assert_eq!(body["received"], true);
    body["result"].as_str().unwrap_or("<none>").to_string()
}

async fn subscription_events_set_plan_status_and_period(f: Fixture) {
    create(&f, &account(&f, "acme", "free", Some(CUSTOMER))).await;
    let end_s = (f.clock.now_ms() + 25 * DAY_MS) / 1000;
    let body = event(
        "evt_created",
        "customer.subscription.created",
        subscription("price_starter", "trialing", end_s),
    );
    assert_eq!(result_of(&deliver(&f, &body).await.expect("ok")), "applied");
    let a = stored(&f, "acme").await;
    assert_eq!(a.plan, "starter");
    assert_eq!(a.status, SubscriptionStatus::Trialing);
    assert_eq!(a.period_anchor_ms, end_s * 1000);
    assert_eq!(balance(&f, "acme").await, 100);

    let body = event(
        "evt_updated",
        "customer.subscription.updated",
        subscription("price_starter", "past_due", end_s),
    );
    assert_eq!(result_of(&deliver(&f, &body).await.expect("ok")), "applied");
    assert_eq!(stored(&f, "acme").await.status, SubscriptionStatus::PastDue);

    // The same state again changes nothing.
    let body = event(
        "evt_updated_again",
        "customer.subscription.updated",
        subscription("price_starter", "past_due", end_s),
    );
    assert_eq!(
        result_of(&deliver(&f, &body).await.expect("ok")),
        "unchanged"
    );
}

async fn older_api_versions_put_the_period_end_on_the_subscription(f: Fixture) {
    create(&f, &account(&f, "acme", "starter", Some(CUSTOMER))).await;
    let end_s = (f.clock.now_ms() + 30 * DAY_MS) / 1000;
    // Before the period moved to the items: on the subscription, and the customer expanded.
    let mut object = subscription("price_business", "active", end_s);
    object["current_period_end"] = json!(end_s);
    object["customer"] = json!({"id": CUSTOMER, "object": "customer"});
    for item in object["items"]["data"].as_array_mut().expect("items") {
        item.as_object_mut()
            .expect("an item")
            .remove("current_period_end");
    }
    let body = event("evt_old_api", "customer.subscription.updated", object);
    assert_eq!(result_of(&deliver(&f, &body).await.expect("ok")), "applied");
    let a = stored(&f, "acme").await;
    assert_eq!(a.plan, "business");
    assert_eq!(a.period_anchor_ms, end_s * 1000);
}

async fn stripes_fixtures_as_sent_are_read(f: Fixture) {
    // The subscription fixture with only its customer changed: its price is none of the
    // catalog's, so the plan stays; status and the item's period end are taken.
    create(&f, &account(&f, "acme", "pro", Some(CUSTOMER))).await;
    let mut sub = stripe_fixtures::fixture("fixture_subscription.json");
    sub["customer"] = json!(CUSTOMER);
    sub["status"] = json!("past_due");
    let item_end_s = sub["items"]["data"][0]["current_period_end"]
        .as_i64()
        .expect("the fixture item has a period end");
    let body = event("evt_fixture_sub", "customer.subscription.updated", sub);
    assert_eq!(result_of(&deliver(&f, &body).await.expect("ok")), "applied");
    let a = stored(&f, "acme").await;
    assert_eq!(a.plan, "pro");
    assert_eq!(a.status, SubscriptionStatus::PastDue);
    assert_eq!(a.period_anchor_ms, item_end_s * 1000);
    // The event fixture itself (`plan.created`) is acknowledged and ignored.
    let body = stripe_fixtures::fixture("fixture_event.json")
        .to_string()
        .into_bytes();
    assert_eq!(result_of(&deliver(&f, &body).await.expect("ok")), "ignored");
}

async fn an_upgrade_mid_period_adds_the_difference(f: Fixture) {
    let a = account(&f, "acme", "starter", Some(CUSTOMER));
    let end_s = a.period_anchor_ms / 1000;
    create(&f, &a).await;
    set_balance(&f, "acme", 70).await; // 30 of 100 spent
    let body = event(
        "evt_upgrade",
        "customer.subscription.updated",
        subscription("price_pro", "active", end_s),
    );
    assert_eq!(result_of(&deliver(&f, &body).await.expect("ok")), "applied");
    assert_eq!(stored(&f, "acme").await.plan, "pro");
    assert_eq!(balance(&f, "acme").await, 270, "300 − 30 spent");

    // A downgrade takes nothing back.
    let body = event(
        "evt_downgrade",
        "customer.subscription.updated",
        subscription("price_starter", "active", end_s),
    );
    assert_eq!(result_of(&deliver(&f, &body).await.expect("ok")), "applied");
    assert_eq!(stored(&f, "acme").await.plan, "starter");
    assert_eq!(balance(&f, "acme").await, 270);
}

async fn a_re_anchored_period_keeps_its_balance(f: Fixture) {
    let a = account(&f, "acme", "starter", Some(CUSTOMER));
    create(&f, &a).await;
    set_balance(&f, "acme", 70).await;
    // Stripe's period ends two days after the anchor the admin API gave: the same period.
    let shifted_s = (a.period_anchor_ms + 2 * DAY_MS) / 1000;
    let body = event(
        "evt_shift",
        "customer.subscription.updated",
        subscription("price_starter", "active", shifted_s),
    );
    assert_eq!(result_of(&deliver(&f, &body).await.expect("ok")), "applied");
    assert_eq!(stored(&f, "acme").await.period_anchor_ms, shifted_s * 1000);
    assert_eq!(
        balance(&f, "acme").await,
        70,
        "nothing gifted by the re-anchoring"
    );

    // A period that ends weeks away from the current one is a new period: full allowance.
    let new_period_s = (f.clock.now_ms() + 29 * DAY_MS) / 1000;
    let body = event(
        "evt_new_cycle",
        "customer.subscription.updated",
        subscription("price_starter", "active", new_period_s),
    );
    assert_eq!(result_of(&deliver(&f, &body).await.expect("ok")), "applied");
    assert_eq!(balance(&f, "acme").await, 100);
}

async fn a_deleted_subscription_cancels(f: Fixture) {
    let a = account(&f, "acme", "pro", Some(CUSTOMER));
    create(&f, &a).await;
    let body = event(
        "evt_deleted",
        "customer.subscription.deleted",
        subscription("price_pro", "active", a.period_anchor_ms / 1000),
    );
    assert_eq!(result_of(&deliver(&f, &body).await.expect("ok")), "applied");
    let stored = stored(&f, "acme").await;
    assert_eq!(stored.status, SubscriptionStatus::Canceled);
    assert_eq!(stored.plan, "pro");
}

/// Stripe's fixture invoice, paid, for [`CUSTOMER`]'s subscription.
fn invoice(reason: Option<&str>) -> Value {
    stripe_fixtures::paid_invoice(
        "in_1",
        CUSTOMER,
        "sub_1",
        reason,
        SystemClock.now_ms() / 1000,
    )
}

async fn invoice_paid_resets_the_period_to_the_allowance(f: Fixture) {
    create(&f, &account(&f, "acme", "pro", Some(CUSTOMER))).await;
    set_balance(&f, "acme", 12).await;
    let body = event("evt_manual", "invoice.paid", invoice(Some("manual")));
    assert_eq!(result_of(&deliver(&f, &body).await.expect("ok")), "ignored");
    assert_eq!(balance(&f, "acme").await, 12);

    let body = event(
        "evt_cycle",
        "invoice.paid",
        invoice(Some("subscription_cycle")),
    );
    assert_eq!(result_of(&deliver(&f, &body).await.expect("ok")), "applied");
    assert_eq!(balance(&f, "acme").await, 300);

    // A free account has no periods: nothing to reset.
    create(&f, &account(&f, "freebie", "free", Some("cus_free"))).await;
    let mut object = invoice(None);
    object["customer"] = Value::from("cus_free");
    let body = event("evt_free", "invoice.paid", object);
    assert_eq!(result_of(&deliver(&f, &body).await.expect("ok")), "ignored");
}

async fn each_event_applies_once(f: Fixture) {
    create(&f, &account(&f, "acme", "pro", Some(CUSTOMER))).await;
    set_balance(&f, "acme", 5).await;
    let body = event("evt_once", "invoice.paid", invoice(None));
    assert_eq!(result_of(&deliver(&f, &body).await.expect("ok")), "applied");
    assert_eq!(balance(&f, "acme").await, 300);
    set_balance(&f, "acme", 40).await; // spent since
    for _ in 0..3 {
        assert_eq!(
            result_of(&deliver(&f, &body).await.expect("ok")),
            "duplicate"
        );
    }
    assert_eq!(
        balance(&f, "acme").await,
        40,
        "a re-sent invoice.paid resets nothing"
    );

    // The same for an upgrade: the difference is added once.
    let a = stored(&f, "acme").await;
    let body = event(
        "evt_up_once",
        "customer.subscription.updated",
        subscription("price_business", "active", a.period_anchor_ms / 1000),
    );
    assert_eq!(result_of(&deliver(&f, &body).await.expect("ok")), "applied");
    assert_eq!(balance(&f, "acme").await, 440);
    assert_eq!(
        result_of(&deliver(&f, &body).await.expect("ok")),
        "duplicate"
    );
    assert_eq!(balance(&f, "acme").await, 440);
}

async fn an_event_being_applied_elsewhere_answers_409(f: Fixture) {
    create(&f, &account(&f, "acme", "pro", Some(CUSTOMER))).await;
    assert_eq!(
        f.gw.ledger
            .begin_stripe_event("evt_busy", 60_000)
            .await
            .expect("store"),
        StripeEventClaim::Claimed
    );
    let body = event("evt_busy", "invoice.paid", invoice(None));
    let err = deliver(&f, &body).await.expect_err("in progress");
    assert_eq!(err.status(), 409);
    f.gw.ledger
        .finish_stripe_event("evt_busy", 60_000)
        .await
        .expect("store");
    assert_eq!(
        result_of(&deliver(&f, &body).await.expect("ok")),
        "duplicate"
    );
}

async fn bad_signatures_are_refused_and_change_nothing(f: Fixture) {
    create(&f, &account(&f, "acme", "pro", Some(CUSTOMER))).await;
    set_balance(&f, "acme", 7).await;
    let body = event("evt_forged", "invoice.paid", invoice(None));
    let now_s = f.clock.now_ms() / 1000;
    let good = sign_header(SECRET, now_s, &body).expect("sign");
    let cases: Vec<(&str, Option<String>, Vec<u8>)> = vec![
        ("missing", None, body.clone()),
        ("empty", Some(String::new()), body.clone()),
        ("malformed", Some("nonsense".into()), body.clone()),
        (
            "other secret",
            Some(sign_header("whsec_other", now_s, &body).expect("sign")),
            body.clone(),
        ),
        (
            "stale",
            Some(sign_header(SECRET, now_s - 301, &body).expect("sign")),
            body.clone(),
        ),
        ("tampered body", Some(good.clone()), {
            let mut b = body.clone();
            b.push(b' ');
            b
        }),
    ];
    for (what, header, body) in cases {
        let err = webhook::handle(&f.gw, header.as_deref(), &body)
            .await
            .expect_err(what);
        assert_eq!(err.status(), 400, "{what}");
        assert_eq!(err.code(), "invalid_request", "{what}");
    }
    assert_eq!(balance(&f, "acme").await, 7);
    // The genuine delivery still applies: refusals claimed nothing.
    assert_eq!(
        result_of(
            &webhook::handle(&f.gw, Some(&good), &body)
                .await
                .expect("ok")
        ),
        "applied"
    );
    // A signed body that is not an event is a bad request too.
    let junk = b"not json".to_vec();
    let header = sign_header(SECRET, now_s, &junk).expect("sign");
    let err = webhook::handle(&f.gw, Some(&header), &junk)
        .await
        .expect_err("junk");
    assert_eq!(err.status(), 400);
}

async fn unknown_types_and_customers_are_ignored(f: Fixture) {
    create(&f, &account(&f, "acme", "pro", Some(CUSTOMER))).await;
    let plan = stripe_fixtures::fixture("fixture_event.json")["data"]["object"].clone();
    let body = event("evt_other", "plan.created", plan);
    assert_eq!(result_of(&deliver(&f, &body).await.expect("ok")), "ignored");
    let mut object = invoice(None);
    object["customer"] = Value::from("cus_nobody");
    let body = event("evt_nobody", "invoice.paid", object);
    assert_eq!(result_of(&deliver(&f, &body).await.expect("ok")), "ignored");
    // A customer id that moved to another account is found there, not at the old one.
    let moved = creditgate::ledger::AccountChange {
        stripe_customer_id: Some("cus_moved".into()),
        ..Default::default()
    };
    f.gw.ledger
        .change_account("acme", &moved)
        .await
        .expect("store");
    let body = event("evt_old_customer", "invoice.paid", invoice(None));
    assert_eq!(result_of(&deliver(&f, &body).await.expect("ok")), "ignored");
    set_balance(&f, "acme", 1).await;
    let mut object = invoice(None);
    object["customer"] = Value::from("cus_moved");
    let body = event("evt_new_customer", "invoice.paid", object);
    assert_eq!(result_of(&deliver(&f, &body).await.expect("ok")), "applied");
    assert_eq!(balance(&f, "acme").await, 300);
}

async fn every_stripe_status_maps_onto_five_and_unknown_ones_are_refused(f: Fixture) {
    let a = account(&f, "acme", "pro", Some(CUSTOMER));
    let end_s = a.period_anchor_ms / 1000;
    create(&f, &a).await;
    let table = [
        ("active", SubscriptionStatus::Active),
        ("trialing", SubscriptionStatus::Trialing),
        ("past_due", SubscriptionStatus::PastDue),
        ("canceled", SubscriptionStatus::Canceled),
        ("incomplete", SubscriptionStatus::Incomplete),
        ("incomplete_expired", SubscriptionStatus::Canceled),
        ("unpaid", SubscriptionStatus::PastDue),
        ("paused", SubscriptionStatus::Incomplete),
    ];
    let mut published = stripe_fixtures::subscription_statuses();
    published.sort();
    let mut mapped: Vec<String> = table.iter().map(|(s, _)| s.to_string()).collect();
    mapped.sort();
    assert_eq!(
        mapped, published,
        "every status Stripe publishes, and no other"
    );
    for (i, (stripe, want)) in table.iter().enumerate() {
        // From a status other than the expected one, so that each delivery changes something.
        let from = if *want == SubscriptionStatus::Active {
            "trialing"
        } else {
            "active"
        };
        let body = event(
            &format!("evt_from_{i}"),
            "customer.subscription.updated",
            subscription("price_pro", from, end_s),
        );
        deliver(&f, &body).await.expect("ok");
        let body = event(
            &format!("evt_status_{i}"),
            "customer.subscription.updated",
            subscription("price_pro", stripe, end_s),
        );
        assert_eq!(
            result_of(&deliver(&f, &body).await.expect("ok")),
            "applied",
            "{stripe}"
        );
        assert_eq!(stored(&f, "acme").await.status, *want, "{stripe}");
    }

    // An unknown status, or none, is refused and claims nothing.
    let before = stored(&f, "acme").await;
    let mut no_status = subscription("price_business", "active", end_s);
    no_status
        .as_object_mut()
        .expect("an object")
        .remove("status");
    for (id, object) in [
        (
            "evt_unknown",
            subscription("price_business", "frozen", end_s),
        ),
        ("evt_no_status", no_status),
    ] {
        let body = event(id, "customer.subscription.updated", object);
        let err = deliver(&f, &body).await.expect_err("refused");
        assert_eq!(err.status(), 400, "{id}");
        assert_eq!(err.code(), "invalid_request", "{id}");
        assert_eq!(stored(&f, "acme").await, before, "{id} changed the account");
    }
    // Stripe's retry of the same event id, once the status is known, applies.
    let body = event(
        "evt_unknown",
        "customer.subscription.updated",
        subscription("price_business", "active", end_s),
    );
    assert_eq!(result_of(&deliver(&f, &body).await.expect("ok")), "applied");
    assert_eq!(stored(&f, "acme").await.plan, "business");
}

/// The events these tests send keep every field Stripe's published schema requires.
#[test]
fn the_built_events_keep_every_field_stripe_requires() {
    let sub = subscription("price_pro", "active", 1_800_000_000);
    assert_eq!(
        stripe_fixtures::missing_required("subscription", &sub),
        Vec::<String>::new()
    );
    for item in sub["items"]["data"].as_array().expect("items") {
        assert_eq!(
            stripe_fixtures::missing_required("subscription_item", item),
            Vec::<String>::new()
        );
    }
    assert_eq!(
        stripe_fixtures::missing_required("invoice", &invoice(None)),
        Vec::<String>::new()
    );
    // The invoice fixture as published lacks one (its README says so): the check can fail.
    assert_eq!(
        stripe_fixtures::missing_required(
            "invoice",
            &stripe_fixtures::fixture("fixture_invoice.json")
        ),
        vec!["amount_paid_off_stripe".to_string()]
    );
    let e: Value =
        serde_json::from_slice(&event("evt_1", "invoice.paid", invoice(None))).expect("JSON");
    for field in [
        "id",
        "object",
        "type",
        "created",
        "api_version",
        "livemode",
        "pending_webhooks",
        "request",
    ] {
        assert!(e.get(field).is_some(), "the envelope has {field}");
    }
    assert_eq!(e["data"]["object"]["object"], "invoice");
}

async fn older_subscription_events_are_ignored(f: Fixture) {
    create(&f, &account(&f, "acme", "starter", Some(CUSTOMER))).await;
    let end_s = (f.clock.now_ms() + 10 * DAY_MS) / 1000;
    let at = |id: &str, price: &str, status: &str, created_s: i64| {
        let mut body: Value = serde_json::from_slice(&event(
            id,
            "customer.subscription.updated",
            subscription(price, status, end_s),
        ))
        .expect("json");
        body["created"] = Value::from(created_s);
        body.to_string().into_bytes()
    };
    let now_s = f.clock.now_ms() / 1000;
    let newer = at("evt_new", "price_pro", "past_due", now_s);
    assert_eq!(
        result_of(&deliver(&f, &newer).await.expect("ok")),
        "applied"
    );
    let before = stored(&f, "acme").await;
    let credits = balance(&f, "acme").await;
    // Older (an upgrade to business sent before the one applied): no plan, status or credits.
    let older = at("evt_old", "price_business", "active", now_s - 5);
    assert_eq!(result_of(&deliver(&f, &older).await.expect("ok")), "stale");
    assert_eq!(stored(&f, "acme").await, before);
    assert_eq!(balance(&f, "acme").await, credits);
    assert_eq!(
        result_of(&deliver(&f, &older).await.expect("ok")),
        "duplicate"
    );
    assert_eq!(
        result_of(&deliver(&f, &newer).await.expect("ok")),
        "duplicate"
    );
    // Equal `created`: applied.
    let same = at("evt_same", "price_pro", "active", now_s);
    assert_eq!(result_of(&deliver(&f, &same).await.expect("ok")), "applied");
    assert_eq!(stored(&f, "acme").await.status, SubscriptionStatus::Active);
}
