//! The fake Stripe held to Stripe's published request schema for `POST /v1/billing/meter_events`
//! (`tests/fixtures/stripe/meter_events_request_schema.json`): each rule refuses a request that
//! breaks it with 400 and Stripe's error envelope, records it as an attempt and accepts nothing;
//! requests at the edges of each rule are accepted; and a fake dropped with a refusal no test
//! expected fails the test, which is how every outbox and gateway test also checks that the
//! gateway sends only what Stripe takes.

#[path = "support/fake_stripe.rs"]
mod fake_stripe;
mod support;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use creditgate::clock::FakeClock;
use fake_stripe::{FakeStripe, METER_EVENTS_PATH};
use support::http;

/// 2026-05-14T10:00:00Z
const NOW_S: i64 = 1_778_752_800;
const DAY_S: i64 = 24 * 3600;
const FORM: &str = "application/x-www-form-urlencoded";

async fn fake() -> FakeStripe {
    FakeStripe::start_with_clock(Arc::new(FakeClock::at(NOW_S * 1000))).await
}

async fn post(fake: &FakeStripe, content_type: &str, body: &str) -> http::Response {
    http::request(
        fake.addr(),
        "POST",
        METER_EVENTS_PATH,
        &[
            ("Authorization", "Bearer sk_test_fake"),
            ("Content-Type", content_type),
        ],
        Some(body.as_bytes()),
    )
    .await
}

/// A request the gateway would send, with `changes` applied: `(key, None)` removes the key,
/// `(key, Some(v))` sets or adds it.
fn form(changes: &[(&str, Option<&str>)]) -> String {
    let ts = NOW_S.to_string();
    let mut fields: Vec<(String, String)> = vec![
        ("event_name".into(), "creditgate_usage".into()),
        ("identifier".into(), "res_0001".into()),
        ("payload[stripe_customer_id]".into(), "cus_Test123".into()),
        ("payload[value]".into(), "54000".into()),
        ("timestamp".into(), ts),
    ];
    for (key, value) in changes {
        match (fields.iter().position(|(k, _)| k == key), value) {
            (Some(i), None) => {
                fields.remove(i);
            }
            (Some(i), Some(v)) => fields[i].1 = v.to_string(),
            (None, Some(v)) => fields.push((key.to_string(), v.to_string())),
            (None, None) => {}
        }
    }
    fields
        .iter()
        .map(|(k, v)| {
            let enc = |s: &str| {
                percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC)
                    .to_string()
            };
            format!("{}={}", enc(k), enc(v))
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[tokio::test]
async fn a_request_like_the_gateways_is_accepted() {
    let fake = fake().await;
    let r = post(&fake, FORM, &form(&[])).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["object"], "billing.meter_event");
    assert_eq!(body["identifier"], "res_0001");
    assert_eq!(body["payload"]["value"], "54000");
    assert_eq!(body["timestamp"], NOW_S);
    assert_eq!(fake.accepted().len(), 1);
    assert!(fake.take_refusals().is_empty());
}

#[tokio::test]
async fn each_rule_of_the_schema_refuses_a_request_that_breaks_it() {
    let long = "x".repeat(101);
    let too_old = (NOW_S - 35 * DAY_S - 1).to_string();
    let too_new = (NOW_S + 301).to_string();
    // (what, content type, body, error.code, error.param)
    let cases: Vec<(&str, &str, String, Option<&str>, &str)> = vec![
        (
            "a JSON body",
            "application/json",
            r#"{"event_name":"creditgate_usage","payload":{"stripe_customer_id":"cus_1","value":"1"}}"#
                .to_string(),
            None,
            "",
        ),
        (
            "no event_name",
            FORM,
            form(&[("event_name", None)]),
            Some("parameter_missing"),
            "event_name",
        ),
        (
            "no payload",
            FORM,
            form(&[
                ("payload[stripe_customer_id]", None),
                ("payload[value]", None),
            ]),
            Some("parameter_missing"),
            "payload",
        ),
        (
            "no customer in the payload",
            FORM,
            form(&[("payload[stripe_customer_id]", None)]),
            Some("parameter_missing"),
            "payload[stripe_customer_id]",
        ),
        (
            "no value in the payload",
            FORM,
            form(&[("payload[value]", None)]),
            Some("parameter_missing"),
            "payload[value]",
        ),
        (
            "an identifier of 101 characters",
            FORM,
            form(&[("identifier", Some(&long))]),
            None,
            "identifier",
        ),
        (
            "an event_name of 101 characters",
            FORM,
            form(&[("event_name", Some(&long))]),
            None,
            "event_name",
        ),
        (
            "a payload value that is not a string",
            FORM,
            form(&[
                ("payload[value]", None),
                ("payload[value][amount]", Some("25")),
            ]),
            None,
            "payload[value]",
        ),
        (
            "a payload that is not an object",
            FORM,
            form(&[("payload", Some("25"))]),
            None,
            "payload",
        ),
        (
            "an unknown top-level param",
            FORM,
            form(&[("customer", Some("cus_Test123"))]),
            Some("parameter_unknown"),
            "customer",
        ),
        (
            "the value at the top level",
            FORM,
            form(&[("value", Some("54000"))]),
            Some("parameter_unknown"),
            "value",
        ),
        (
            "a timestamp that is not an integer",
            FORM,
            form(&[("timestamp", Some("1778752800.5"))]),
            Some("parameter_invalid_integer"),
            "timestamp",
        ),
        (
            "a timestamp in milliseconds",
            FORM,
            form(&[("timestamp", Some("1778752800000"))]),
            None,
            "timestamp",
        ),
        (
            "a timestamp 35 days and a second ago",
            FORM,
            form(&[("timestamp", Some(&too_old))]),
            None,
            "timestamp",
        ),
        (
            "a timestamp 5 minutes and a second ahead",
            FORM,
            form(&[("timestamp", Some(&too_new))]),
            None,
            "timestamp",
        ),
    ];
    let fake = fake().await;
    for (i, (what, content_type, body, code, param)) in cases.iter().enumerate() {
        let r = post(&fake, content_type, body).await;
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        let envelope = r.json();
        let error = &envelope["error"];
        assert_eq!(error["type"], "invalid_request_error", "{what}: {envelope}");
        assert_eq!(error["param"], *param, "{what}: {envelope}");
        assert_eq!(error["code"].as_str(), *code, "{what}: {envelope}");
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {envelope}"
        );
        let attempts = fake.attempts();
        assert_eq!(attempts.len(), i + 1, "{what}: recorded as an attempt");
        assert_eq!(attempts[i].status, 400, "{what}");
        assert_eq!(
            attempts[i].refusal.as_ref().map(|r| r.param.as_str()),
            Some(*param),
            "{what}"
        );
        assert!(fake.accepted().is_empty(), "{what} was accepted");
    }
    assert_eq!(fake.take_refusals().len(), cases.len());
    // None of them took the identifier: the good request is still new.
    let r = post(&fake, FORM, &form(&[])).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn requests_at_the_edges_of_each_rule_are_accepted() {
    let exactly_100 = "y".repeat(100);
    let oldest = (NOW_S - 35 * DAY_S).to_string();
    let newest = (NOW_S + 300).to_string();
    let cases: Vec<(&str, String)> = vec![
        (
            "an identifier of 100 characters",
            form(&[("identifier", Some(&exactly_100))]),
        ),
        (
            "an event_name of 100 characters",
            form(&[
                ("identifier", Some("edge-2")),
                ("event_name", Some(&exactly_100)),
            ]),
        ),
        (
            "a timestamp exactly 35 days ago",
            form(&[("identifier", Some("edge-3")), ("timestamp", Some(&oldest))]),
        ),
        (
            "a timestamp exactly 5 minutes ahead",
            form(&[("identifier", Some("edge-4")), ("timestamp", Some(&newest))]),
        ),
        (
            "no timestamp (Stripe uses now)",
            form(&[("identifier", Some("edge-5")), ("timestamp", None)]),
        ),
        (
            "no identifier (Stripe makes one)",
            form(&[("identifier", None)]),
        ),
        (
            "more payload keys and an expand list",
            form(&[
                ("identifier", Some("edge-7")),
                ("payload[region]", Some("eu")),
                ("expand[]", Some("payload")),
            ]),
        ),
    ];
    let fake = fake().await;
    for (what, body) in &cases {
        let r = post(&fake, FORM, body).await;
        assert_eq!(r.status, 200, "{what}: {}", r.text());
    }
    assert_eq!(fake.accepted().len(), cases.len());
}

#[tokio::test]
async fn a_refusal_no_test_expected_fails_the_test() {
    let fake = fake().await;
    let r = post(&fake, FORM, &form(&[("event_name", None)])).await;
    assert_eq!(r.status, 400);
    let dropped = std::panic::catch_unwind(AssertUnwindSafe(|| drop(fake)));
    let message = dropped
        .expect_err("dropping the fake with an unexpected refusal panics")
        .downcast::<String>()
        .map(|s| *s)
        .unwrap_or_default();
    assert!(message.contains("event_name"), "{message}");
    // Once taken, the same refusal is expected and the drop is quiet.
    let fake = self::fake().await;
    post(&fake, FORM, &form(&[("event_name", None)])).await;
    assert_eq!(fake.take_refusals().len(), 1);
    drop(fake);
}
