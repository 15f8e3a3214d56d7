//! Decides how the catalog is shown to people and tools: the seed's three tables (plans,
//! pay-per-use rates, credit costs) as aligned text for `creditgate catalog`, and the same data
//! as JSON for `--format json` and the admin API. Money is printed exactly (`0.054`).

use serde_json::{json, Map, Value};

use super::catalog::{Catalog, CreditGrant, Plan};
use super::routes::Route;
use crate::money::MicroUsd;

/// Shown where an operation is not available on a model.
pub const UNAVAILABLE: &str = "—";

/// The plans table: header and rows of display cells.
pub fn plans_table(c: &Catalog) -> (Vec<String>, Vec<Vec<String>>) {
    let header = ["Plan", "Credits/mo", "API Keys", "Price"]
        .map(String::from)
        .to_vec();
    let rows = c
        .plans()
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                plan_credits_cell(p),
                p.api_keys.to_string(),
                plan_price_cell(p),
            ]
        })
        .collect();
    (header, rows)
}

fn plan_credits_cell(p: &Plan) -> String {
    match p.grant {
        CreditGrant::Once => format!("{} on signup", p.credits),
        CreditGrant::Period => p.credits.to_string(),
    }
}

fn plan_price_cell(p: &Plan) -> String {
    if p.price == MicroUsd(0) {
        "Free".to_string()
    } else {
        format!("${}/mo", p.price)
    }
}

/// The pay-per-use rates table: every model with a rate, in catalog order.
pub fn rates_table(c: &Catalog) -> (Vec<String>, Vec<Vec<String>>) {
    let header = ["Model", "Rate per Image"].map(String::from).to_vec();
    let rows = c
        .models()
        .iter()
        .filter_map(|m| m.rate.map(|r| vec![m.name.clone(), format!("${r}")]))
        .collect();
    (header, rows)
}

/// The credit-cost table: one row per operation, one column per credit column model.
pub fn credits_table(c: &Catalog) -> (Vec<String>, Vec<Vec<String>>) {
    let mut header = vec!["Operation".to_string()];
    header.extend(
        c.credit_columns()
            .map(|m| m.credit_column.clone().unwrap_or_else(|| m.name.clone())),
    );
    let rows = c
        .operations()
        .iter()
        .map(|op| {
            let mut row = vec![op.name.clone()];
            row.extend(c.credit_columns().map(|m| {
                match c.price(&op.id, &m.id).and_then(|p| p.credits) {
                    Some(n) => format!("{n} cr"),
                    None => UNAVAILABLE.to_string(),
                }
            }));
            row
        })
        .collect();
    (header, rows)
}

/// Aligned text: a title, the header, a rule, the rows; cells separated by ` | `.
fn render_one(out: &mut String, title: &str, header: &[String], rows: &[Vec<String>]) {
    let columns = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(columns) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| -> String {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate().take(columns) {
            if i > 0 {
                s.push_str(" | ");
            }
            s.push_str(cell);
            let pad = widths[i].saturating_sub(cell.chars().count());
            s.extend(std::iter::repeat_n(' ', pad));
        }
        s.trim_end().to_string()
    };
    out.push_str(title);
    out.push('\n');
    out.push('\n');
    out.push_str(&line(header));
    out.push('\n');
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    out.push_str(&rule.join("-+-"));
    out.push('\n');
    for row in rows {
        out.push_str(&line(row));
        out.push('\n');
    }
}

/// The seed's three tables as aligned text.
pub fn render_table(c: &Catalog) -> String {
    let mut out = String::new();
    let (h, r) = plans_table(c);
    render_one(&mut out, "Credit-Based Plans", &h, &r);
    out.push('\n');
    let (h, r) = rates_table(c);
    render_one(&mut out, "Pay Per Use Rates", &h, &r);
    out.push('\n');
    let (h, r) = credits_table(c);
    render_one(&mut out, "Credit Costs by Operation", &h, &r);
    out
}

fn money(m: Option<MicroUsd>) -> (Value, Value) {
    match m {
        Some(m) => (Value::String(m.to_string()), Value::from(m.0)),
        None => (Value::Null, Value::Null),
    }
}

fn route_json(r: &Route) -> Value {
    let texts = |s: &[super::routes::Source]| -> Vec<String> {
        s.iter().map(|x| x.as_str().to_string()).collect()
    };
    let mut map = Map::new();
    map.insert("label".into(), r.label().into());
    map.insert("method".into(), r.method().into());
    map.insert("path".into(), r.path_pattern().into());
    map.insert("billed".into(), r.is_billed().into());
    map.insert("settle".into(), r.settle_at().as_str().into());
    if r.is_billed() {
        map.insert("operations".into(), json!(r.operation_ids()));
        if !r.operation_sources().is_empty() {
            map.insert("operationFrom".into(), json!(texts(r.operation_sources())));
            let m: Map<String, Value> = r
                .operation_map()
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(&**v)))
                .collect();
            map.insert("operationMap".into(), Value::Object(m));
        }
        map.insert("model".into(), json!(texts(r.model_sources())));
        map.insert("quantity".into(), json!(texts(r.quantity_sources())));
        map.insert("quantityDefault".into(), r.quantity_default().into());
        map.insert("quantityMax".into(), r.quantity_max().into());
        map.insert("needsJsonBody".into(), r.needs_json_body().into());
    }
    Value::Object(map)
}

fn rows_json(header: Vec<String>, rows: Vec<Vec<String>>) -> Value {
    let mut all = vec![header];
    all.extend(rows);
    json!(all)
}

/// The catalog as JSON: plans, pay-per-use settings, models, operations (with every model's
/// price), routes, and the three tables as rows of display cells. Money is an exact decimal
/// string (`"0.054"`) plus integer micro-dollars.
pub fn render_json(c: &Catalog) -> Value {
    let plans: Vec<Value> = c
        .plans()
        .iter()
        .map(|p| {
            json!({
                "id": &*p.id,
                "name": p.name,
                "credits": p.credits,
                "creditsGrant": p.grant,
                "apiKeys": p.api_keys,
                "priceUsd": p.price.to_string(),
                "priceMicroUsd": p.price.0,
                "requestsPerMinute": p.requests_per_minute,
                "stripePriceIds": p.stripe_price_ids,
                "alertCreditsLeftPercent": p.alert_credits_left,
                "alertSpendPercent": p.alert_spend,
            })
        })
        .collect();
    let models: Vec<Value> = c
        .models()
        .iter()
        .map(|m| {
            let (usd, micro) = money(m.rate);
            json!({
                "id": &*m.id,
                "name": m.name,
                "rateUsd": usd,
                "rateMicroUsd": micro,
                "creditColumn": m.credit_column,
                "video": m.video,
            })
        })
        .collect();
    let operations: Vec<Value> = c
        .operations()
        .iter()
        .map(|op| {
            let prices: Vec<Value> = c
                .models()
                .iter()
                .filter_map(|m| {
                    let p = c.price(&op.id, &m.id)?;
                    if !p.is_available() {
                        return None;
                    }
                    let (usd, micro) = money(p.rate);
                    Some(json!({
                        "model": &*m.id,
                        "credits": p.credits,
                        "rateUsd": usd,
                        "rateMicroUsd": micro,
                    }))
                })
                .collect();
            json!({
                "id": &*op.id,
                "name": op.name,
                "unit": op.unit,
                "prices": prices,
            })
        })
        .collect();
    let routes: Vec<Value> = c.routes().iter().map(route_json).collect();
    let (ph, pr) = plans_table(c);
    let (rh, rr) = rates_table(c);
    let (ch, cr) = credits_table(c);
    json!({
        "version": c.version,
        "fingerprint": c.fingerprint,
        "plans": plans,
        "payPerUse": {
            "apiKeys": c.pay_per_use().api_keys,
            "requestsPerMinute": c.pay_per_use().requests_per_minute,
            "alertSpendPercent": c.pay_per_use().alert_spend,
        },
        "models": models,
        "creditColumns": c.credit_columns().map(|m| m.id.to_string()).collect::<Vec<_>>(),
        "operations": operations,
        "routes": routes,
        "tables": {
            "plans": rows_json(ph, pr),
            "payPerUseRates": rows_json(rh, rr),
            "creditCosts": rows_json(ch, cr),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::catalog::tests::{load, MODELS, OPS, PLANS, ROUTES};

    #[test]
    fn cells_follow_the_catalog() {
        let c = match load(PLANS, MODELS, OPS, ROUTES) {
            Ok(c) => c,
            Err(p) => panic!("{p:#?}"),
        };
        let (_, plans) = plans_table(&c);
        assert_eq!(plans, vec![vec!["Basic", "10", "1", "$15.5/mo"]]);
        let (_, rates) = rates_table(&c);
        assert_eq!(rates, vec![vec!["M1", "$0.5"]]);
        let (header, credits) = credits_table(&c);
        assert_eq!(header, vec!["Operation", "M one", "M two"]);
        assert_eq!(
            credits,
            vec![
                vec!["Gen", UNAVAILABLE, "4 cr"],
                vec!["Clip", "9 cr", UNAVAILABLE]
            ]
        );
        let text = render_table(&c);
        // The dash is one character wide: the bars still line up.
        let lines: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("Operation"))
            .filter(|l| l.contains('|'))
            .collect();
        let bars = |l: &str| l.chars().position(|ch| ch == '|');
        assert_eq!(lines.len(), 3);
        assert!(lines.iter().all(|l| bars(l) == bars(lines[0])), "{text}");
        let json = render_json(&c);
        assert_eq!(json["operations"][1]["prices"][1]["rateUsd"], "1.25");
        assert_eq!(
            json["operations"][1]["prices"][1]["rateMicroUsd"],
            1_250_000
        );
        assert_eq!(json["plans"][0]["priceUsd"], "15.5");
    }
}
