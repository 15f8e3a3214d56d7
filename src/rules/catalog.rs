//! The validated catalog and what the gateway reads from it: the [`Catalog`] of plans,
//! pay-per-use settings, models, operations (with their price on every model) and routes, and
//! its read-only accessors. Immutable once built; `build` is the only place that makes one (from
//! the rules files, refusing it with every problem listed).

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;

use super::canonical::CanonicalPath;
use super::routes::{self, Route, RouteMatch};
use super::thresholds::Percents;
use crate::money::MicroUsd;

/// The plan id of accounts without a plan (pay-per-use only); reserved, no plan may use it.
pub const PAY_PER_USE: &str = "pay_per_use";

/// How a plan's credits are granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CreditGrant {
    /// Granted once, when the account is created (`credits_grant = "once"`; the free plan).
    Once,
    /// Reset to the allowance at the start of every billing period, no rollover.
    Period,
}

/// A credit-based plan.
#[derive(Debug, Clone)]
pub struct Plan {
    pub id: Arc<str>,
    pub name: String,
    /// The allowance: per period, or once (see `grant`).
    pub credits: u64,
    pub grant: CreditGrant,
    pub api_keys: u32,
    /// Price per billing period; zero for a free plan.
    pub price: MicroUsd,
    /// Per-key request rate limit; zero means no API access.
    pub requests_per_minute: u32,
    pub stripe_price_ids: Vec<String>,
    /// Low-balance alerts: percent of the allowance left (`alert_credits_left_percent`).
    pub alert_credits_left: Percents,
    /// Alerts on this plan's pay-per-use spend: percent of the limit spent.
    pub alert_spend: Percents,
}

/// Settings of accounts that have no plan (the `pay_per_use` plan id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayPerUse {
    pub api_keys: u32,
    pub requests_per_minute: u32,
    /// Alerts on the spend of accounts without a plan: percent of the limit spent.
    pub alert_spend: Percents,
}

/// A model clients may ask for.
#[derive(Debug, Clone)]
pub struct Model {
    pub id: Arc<str>,
    pub name: String,
    /// Pay-per-use rate per generated unit; `None` when the model is not on pay-per-use.
    pub rate: Option<MicroUsd>,
    /// Heading of this model's column in the credit-cost table.
    pub credit_column: Option<String>,
    /// Whether the model can run video operations.
    pub video: bool,
}

/// What one unit of quantity is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    Image,
    Video,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Image => "image",
            Unit::Video => "video",
        }
    }
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one unit of an operation costs on one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Price {
    /// Credits per unit; `None` when not available with credits.
    pub credits: Option<u64>,
    /// Pay-per-use rate per unit; `None` when not available on pay-per-use.
    pub rate: Option<MicroUsd>,
}

impl Price {
    /// Whether the model can run the operation at all.
    pub fn is_available(&self) -> bool {
        self.credits.is_some() || self.rate.is_some()
    }
}

/// An operation and its price on every model of the catalog.
#[derive(Debug, Clone)]
pub struct Operation {
    pub id: Arc<str>,
    pub name: String,
    pub unit: Unit,
    /// Indexed like `Catalog::models`.
    pub(crate) prices: Vec<Price>,
}

/// The validated, immutable catalog: one version of the rules directory.
#[derive(Debug, Clone)]
pub struct Catalog {
    /// Assigned by the live holder; the loader sets 0.
    pub version: u64,
    /// Short SHA-256 (hex) of the four files' contents.
    pub fingerprint: String,
    pub(crate) plans: Vec<Plan>,
    pub(crate) plan_index: HashMap<Arc<str>, usize>,
    pub(crate) pay_per_use: PayPerUse,
    pub(crate) models: Vec<Model>,
    pub(crate) model_index: HashMap<Arc<str>, usize>,
    pub(crate) operations: Vec<Operation>,
    pub(crate) operation_index: HashMap<Arc<str>, usize>,
    pub(crate) routes: Vec<Route>,
    /// Model indexes of the credit-cost table's columns, in order.
    pub(crate) credit_columns: Vec<usize>,
    /// Stripe price id → plan index.
    pub(crate) stripe_prices: HashMap<String, usize>,
}

impl Catalog {
    /// Plans in file order.
    pub fn plans(&self) -> &[Plan] {
        &self.plans
    }

    pub fn plan(&self, id: &str) -> Option<&Plan> {
        self.plan_index.get(id).and_then(|&i| self.plans.get(i))
    }

    /// The plan a Stripe price id maps to.
    pub fn plan_for_stripe_price(&self, price_id: &str) -> Option<&Plan> {
        self.stripe_prices
            .get(price_id)
            .and_then(|&i| self.plans.get(i))
    }

    /// Settings of accounts without a plan.
    pub fn pay_per_use(&self) -> &PayPerUse {
        &self.pay_per_use
    }

    /// API key slots of a plan id, `pay_per_use` included; `None` for an unknown id.
    pub fn api_keys_for(&self, plan_id: &str) -> Option<u32> {
        if plan_id == PAY_PER_USE {
            return Some(self.pay_per_use.api_keys);
        }
        self.plan(plan_id).map(|p| p.api_keys)
    }

    /// Per-key requests per minute of a plan id, `pay_per_use` included.
    pub fn requests_per_minute_for(&self, plan_id: &str) -> Option<u32> {
        if plan_id == PAY_PER_USE {
            return Some(self.pay_per_use.requests_per_minute);
        }
        self.plan(plan_id).map(|p| p.requests_per_minute)
    }

    /// Models in file order (the rate table's order).
    pub fn models(&self) -> &[Model] {
        &self.models
    }

    pub fn model(&self, id: &str) -> Option<&Model> {
        self.model_index.get(id).and_then(|&i| self.models.get(i))
    }

    /// Operations in file order (the credit-cost table's rows).
    pub fn operations(&self) -> &[Operation] {
        &self.operations
    }

    pub fn operation(&self, id: &str) -> Option<&Operation> {
        self.operation_index
            .get(id)
            .and_then(|&i| self.operations.get(i))
    }

    /// Route rules in match order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The models that are columns of the credit-cost table, in column order.
    pub fn credit_columns(&self) -> impl Iterator<Item = &Model> + '_ {
        self.credit_columns
            .iter()
            .filter_map(|&i| self.models.get(i))
    }

    /// What one unit of `operation` costs on `model`; `None` when either id is unknown.
    pub fn price(&self, operation: &str, model: &str) -> Option<Price> {
        let op = self.operation(operation)?;
        let m = *self.model_index.get(model)?;
        op.prices.get(m).copied()
    }

    /// The first route (in file order) whose method and path pattern match. Case-sensitive.
    pub fn match_route(&self, method: &str, path: &CanonicalPath) -> Option<RouteMatch<'_>> {
        routes::match_route(&self.routes, method, path)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::rules::{load_sources, RuleProblem, RuleSources};

    pub(crate) const PLANS: &str = "[[plan]]\nid = \"basic\"\nname = \"Basic\"\ncredits = 10\napi_keys = 1\nprice_usd = \"15.50\"\nrequests_per_minute = 10\nstripe_price_ids = [\"price_basic\"]\n\n[pay_per_use]\napi_keys = 2\nrequests_per_minute = 7\n";
    pub(crate) const MODELS: &str = "[[model]]\nid = \"m1\"\nname = \"M1\"\nrate_usd = 0.5\ncredit_column = \"M one\"\nvideo = true\n\n[[model]]\nid = \"m2\"\nname = \"M2\"\ncredit_column = \"M two\"\n\n[[model]]\nid = \"m3\"\nname = \"M3\"\n";
    pub(crate) const OPS: &str = "[[operation]]\nid = \"gen\"\nname = \"Gen\"\nunit = \"image\"\ncredits = { m2 = 4 }\nuse_model_rates = true\n\n[[operation]]\nid = \"clip\"\nname = \"Clip\"\nunit = \"video\"\ncredits_on_video_models = 9\nrates_usd = { m2 = 1.25 }\n";
    pub(crate) const ROUTES: &str = "[[route]]\nmethod = \"POST\"\npath = \"/gen\"\noperation = \"gen\"\nmodel = [\"body:model\"]\n";

    pub(crate) fn load(
        plans: &str,
        models: &str,
        ops: &str,
        routes: &str,
    ) -> Result<Catalog, Vec<RuleProblem>> {
        load_sources(&RuleSources {
            plans,
            models,
            operations: ops,
            routes,
        })
    }

    #[test]
    fn a_small_catalog_resolves_prices() {
        let c = match load(PLANS, MODELS, OPS, ROUTES) {
            Ok(c) => c,
            Err(p) => panic!("{p:#?}"),
        };
        assert_eq!(c.plan("basic").map(|p| p.price), Some(MicroUsd(15_500_000)));
        assert_eq!(c.plan("basic").map(|p| p.grant), Some(CreditGrant::Period));
        assert_eq!(
            c.plan_for_stripe_price("price_basic").map(|p| &*p.id),
            Some("basic")
        );
        assert_eq!(c.api_keys_for(PAY_PER_USE), Some(2));
        assert_eq!(c.requests_per_minute_for(PAY_PER_USE), Some(7));
        assert_eq!(c.requests_per_minute_for("basic"), Some(10));
        assert_eq!(c.api_keys_for("nope"), None);
        let p = |op: &str, m: &str| c.price(op, m);
        assert_eq!(
            p("gen", "m1"),
            Some(Price {
                credits: None,
                rate: Some(MicroUsd(500_000))
            })
        );
        assert_eq!(
            p("gen", "m2"),
            Some(Price {
                credits: Some(4),
                rate: None
            })
        );
        assert_eq!(p("gen", "m3"), Some(Price::default()));
        assert_eq!(
            p("clip", "m1"),
            Some(Price {
                credits: Some(9),
                rate: None
            })
        );
        assert_eq!(
            p("clip", "m2"),
            Some(Price {
                credits: None,
                rate: Some(MicroUsd(1_250_000))
            })
        );
        assert_eq!(p("clip", "nope"), None);
        assert_eq!(p("nope", "m1"), None);
        let cols: Vec<&str> = c.credit_columns().map(|m| &*m.id).collect();
        assert_eq!(cols, vec!["m1", "m2"]);
    }
}
