//! Stripe webhook events for the tests, built from Stripe's own fixtures in
//! `tests/fixtures/stripe/` (stripe-mock's `resources.event`, `.subscription`, `.invoice`) with
//! only the fields a test needs changed: the event's id, type, created and `data.object`; the
//! subscription's id, customer, status, items (id and price id) and period end; the invoice's
//! id, customer, status, billing reason, created and subscription. Two changes bring the
//! invoice fixture to the 2026-09-30 schema the gateway's async-stripe pins, as the fixtures'
//! README notes: `amount_paid_off_stripe` (required) is added, the top-level `subscription`
//! (no longer defined) is dropped and the id goes under `parent.subscription_details`.
//! [`missing_required`] checks an object against the `required` lists Stripe publishes.
#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::{json, Value};

/// A fixture file, parsed.
pub fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/stripe")
        .join(name);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Stripe's event envelope (`fixture_event.json`) around `object`.
pub fn event(id: &str, kind: &str, created_s: i64, object: Value) -> Value {
    let mut e = fixture("fixture_event.json");
    e["id"] = json!(id);
    e["type"] = json!(kind);
    e["created"] = json!(created_s);
    e["data"]["object"] = object;
    e
}

/// The same, as the bytes Stripe signs and sends.
pub fn event_body(id: &str, kind: &str, created_s: i64, object: Value) -> Vec<u8> {
    event(id, kind, created_s, object).to_string().into_bytes()
}

/// Stripe's subscription (`fixture_subscription.json`) with its id, customer and status set,
/// and one item per `(item id, price id)` — each a copy of the fixture's item — whose period
/// ends at `period_end_s` (where the 2026-09-30 API puts it).
pub fn subscription(
    id: &str,
    customer: &str,
    status: &str,
    items: &[(&str, &str)],
    period_end_s: i64,
) -> Value {
    let mut s = fixture("fixture_subscription.json");
    let template = s["items"]["data"][0].clone();
    let data: Vec<Value> = items
        .iter()
        .map(|(item_id, price_id)| {
            let mut item = template.clone();
            item["id"] = json!(item_id);
            item["price"]["id"] = json!(price_id);
            item["subscription"] = json!(id);
            item["current_period_end"] = json!(period_end_s);
            item
        })
        .collect();
    s["id"] = json!(id);
    s["customer"] = json!(customer);
    s["status"] = json!(status);
    s["items"]["data"] = Value::Array(data);
    s["items"]["url"] = json!(format!("/v1/subscription_items?subscription={id}"));
    s
}

/// Stripe's invoice (`fixture_invoice.json`), paid, for `subscription`, with this billing
/// reason (`None`: Stripe's `null`).
pub fn paid_invoice(
    id: &str,
    customer: &str,
    subscription: &str,
    billing_reason: Option<&str>,
    created_s: i64,
) -> Value {
    let mut i = fixture("fixture_invoice.json");
    i["id"] = json!(id);
    i["customer"] = json!(customer);
    i["status"] = json!("paid");
    i["billing_reason"] = json!(billing_reason);
    i["created"] = json!(created_s);
    i["parent"] = json!({
        "quote_details": null,
        "subscription_details": {"metadata": null, "subscription": subscription},
        "type": "subscription_details",
    });
    i["amount_paid_off_stripe"] = json!(0);
    if let Some(map) = i.as_object_mut() {
        map.remove("subscription");
    }
    i
}

/// The fields of Stripe's published `required` list for `schema` (`subscription`,
/// `subscription_item`, `invoice`) that `object` lacks.
pub fn missing_required(schema: &str, object: &Value) -> Vec<String> {
    let lists = fixture("schema_required_fields.json");
    lists[schema]["required"]
        .as_array()
        .unwrap_or_else(|| panic!("no required list for {schema}"))
        .iter()
        .filter_map(Value::as_str)
        .filter(|field| object.get(*field).is_none())
        .map(str::to_string)
        .collect()
}

/// Stripe's published subscription statuses.
pub fn subscription_statuses() -> Vec<String> {
    fixture("schema_required_fields.json")["subscription"]["status_enum"]
        .as_array()
        .expect("a status enum")
        .iter()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect()
}
