//! The Redis data layout of the ledger: every key name and hash field the [`RedisLedger`]
//! reads or writes, decided here and nowhere else.
//!
//! Per-account keys share the hash tag `{a:<account>}` so every `MULTI/EXEC` of one account
//! touches one slot:
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `cg:{a:<account>}:acct` | hash | the [`Account`] fields ([`account_field`]) |
//! | `cg:{a:<account>}:keys` | zset | unrevoked key ids, scored by the account's key sequence (keys made before it by the old global `cg:keyseq`; new scores continue above them) |
//! | `cg:{a:<account>}:keyseq` | string (int) | the account's key creation sequence |
//! | `cg:{a:<account>}:subs` | hash | Stripe subscription id → `created` of the last event applied for it |
//! | `cg:{a:<account>}:bal:<bucket id>` | string (int) | credits left in one bucket |
//! | `cg:{a:<account>}:spend:<yyyymm>` | string (int) | pay-per-use spend of a UTC month, µ$ |
//! | `cg:{a:<account>}:rsv:<reservation id>` | hash | one reservation ([`rsv_field`]) |
//! | `cg:{a:<account>}:holds` | zset | reservation ids not yet settled, scored by the end of their lease (UTC ms) |
//! | `cg:{a:<account>}:usage` | zset | usage history: one member `<id> <json>` per money movement, scored by its time (UTC ms), trimmed to `billing.usage_retention_days` ([`usage`](super::usage)) |
//! | `<lane>lease:<slot>` | set | accounts with a hold whose lease ends in that 10 s slot (the sweeper's work list); `<lane>` is `cg:` on a single node, `cg:{<lane tag>}:` on a cluster ([`lane`](super::lane)) |
//! | `<lane>lease:due` | zset | the slots that have a `<lane>lease:<slot>` set, scored by slot number |
//! | `cg:lanes` | set | on a cluster: the slot numbers of the lanes in use (every account's, added before it is created) |
//! | `cg:key:<sha256 hex>` | string (JSON) | a [`KeyRecord`] |
//! | `cg:keyid:<key id>` | string | the SHA-256 hex of that key |
//! | `<lane>outbox` | stream | pay-per-use charges to report to Stripe ([`outbox_field`]); `cg:outbox` on a single node |
//! | `<lane>outbox:dead` | stream | outbox entries Stripe refused for good, with the error |
//! | `cg:customer:<stripe customer id>` | string | the account id with that Stripe customer (checked against the account on read) |
//! | `cg:{a:<id>}:idem:<sha256 of key>` | string | an `Idempotency-Key`: the request's fingerprint and, once done, its outcome |
//! | `cg:stripe:evt:<event id>` | string | a Stripe webhook event: `pending` (lease) or `done` |
//! | `cg:{a:<account>}:job:<job id>` | string (JSON) | an async job's hold ([`JobHold`](super::JobHold)): the reservation it settles |
//! | `cg:job:<job id>` | string | the account of that job (the backend callback's lookup) |
//! | `cg:{a:<id>}:alert:<period>:<percent>` | string | the claim of one low-balance alert (its token; `crate::alerts`) |
//! | `cg:alerts` | stream | low-balance alerts to POST to the operator (`crate::alerts`) |
//!
//! Account ids are validated by the admin API, but a `{`, `}` or `%` in one is still escaped
//! (`%7B`, `%7D`, `%25`) so no id can move its keys to another slot or collide with another
//! account's keys.
//!
//! [`RedisLedger`]: super::RedisLedger
//! [`Account`]: super::Account
//! [`KeyRecord`]: super::KeyRecord

/// The low-balance alert outbox stream.
pub const ALERTS: &str = "cg:alerts";
/// The consumer group of the alert delivery workers.
pub const ALERTS_GROUP: &str = "alerts";

/// `cg:{a:<account>}:alert:<period>:<percent>`: claimed once per account, threshold and period
/// (a credit period id or a `YYYYMM` month; the two never collide).
pub fn alert_claim(account_id: &str, period: &str, percent: u8) -> String {
    format!("cg:{}:alert:{period}:{percent}", tag(account_id))
}

/// The Stripe outbox stream of a single node (on a cluster each lane has its own:
/// [`Lane::outbox`](super::lane::Lane::outbox)).
pub const OUTBOX: &str = "cg:outbox";
/// The consumer group of the Stripe outbox workers.
pub const OUTBOX_GROUP: &str = "stripe";
/// Outbox entries Stripe refused for good, with the error (kept for an operator).
pub const OUTBOX_DEAD: &str = "cg:outbox:dead";

/// Width of one lease slot: holds whose lease ends within the same 10 s share a work list.
pub const LEASE_SLOT_MS: i64 = 10_000;
/// How long the stub of a settlement claim on a reservation not (yet) written is kept: a
/// reservation transaction that lands late (its answer was lost to a timeout) merges into it and
/// is then refunded, not charged.
pub const CLAIM_STUB_TTL_MS: i64 = 24 * 3600 * 1000;

/// The lease slot of a lease ending at `until_ms`.
pub fn lease_slot_of(until_ms: i64) -> i64 {
    until_ms.div_euclid(LEASE_SLOT_MS)
}

/// `cg:{a:<account>}:holds`
pub fn holds(account_id: &str) -> String {
    format!("cg:{}:holds", tag(account_id))
}

/// How long a month's spend counter lives after its last change: a month plus grace.
pub const SPEND_TTL_MS: i64 = 40 * 24 * 3600 * 1000;
/// How long a voided (failed and compensated) reservation record is kept: long enough for a
/// retried compensation to find its marker, short enough that a flood of refused requests
/// does not fill the store.
pub const VOID_RECORD_TTL_MS: i64 = 10 * 60 * 1000;

/// `{a:<escaped account>}`: the hash tag of one account.
pub(super) fn tag(account_id: &str) -> String {
    let mut out = String::with_capacity(account_id.len() + 4);
    out.push_str("{a:");
    for c in account_id.chars() {
        match c {
            '%' => out.push_str("%25"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            other => out.push(other),
        }
    }
    out.push('}');
    out
}

/// `cg:{a:<account>}:usage`
pub fn usage(account_id: &str) -> String {
    format!("cg:{}:usage", tag(account_id))
}

/// `cg:{a:<account>}:acct`
pub fn account(account_id: &str) -> String {
    format!("cg:{}:acct", tag(account_id))
}

/// `cg:{a:<account>}:keys`
pub fn account_keys(account_id: &str) -> String {
    format!("cg:{}:keys", tag(account_id))
}

/// `cg:{a:<account>}:keyseq`: the account's key creation sequence (`INCR`), the score of its
/// keys in [`account_keys`].
pub fn key_sequence(account_id: &str) -> String {
    format!("cg:{}:keyseq", tag(account_id))
}

/// `cg:{a:<account>}:subs`
pub fn subscription_events(account_id: &str) -> String {
    format!("cg:{}:subs", tag(account_id))
}

/// `cg:{a:<account>}:bal:<bucket id>`
pub fn balance(account_id: &str, bucket_id: &str) -> String {
    format!("cg:{}:bal:{bucket_id}", tag(account_id))
}

/// `cg:{a:<account>}:spend:<yyyymm>`
pub fn spend(account_id: &str, month: &str) -> String {
    format!("cg:{}:spend:{month}", tag(account_id))
}

/// `cg:{a:<account>}:rsv:<reservation id>`
pub fn reservation(account_id: &str, reservation_id: &str) -> String {
    format!("cg:{}:rsv:{reservation_id}", tag(account_id))
}

/// `cg:key:<sha256 hex>`
pub fn key_record(key_hash: &str) -> String {
    format!("cg:key:{key_hash}")
}

/// `cg:keyid:<key id>`
pub fn key_id(key_id: &str) -> String {
    format!("cg:keyid:{key_id}")
}

/// `cg:customer:<stripe customer id>`
pub fn stripe_customer(customer_id: &str) -> String {
    format!("cg:customer:{customer_id}")
}

/// `cg:{a:<account>}:idem:<sha256 of the Idempotency-Key>`
/// `cg:{a:<account>}:job:<job id>`
pub fn job(account_id: &str, job_id: &str) -> String {
    format!("cg:{}:job:{job_id}", tag(account_id))
}

/// `cg:job:<job id>`
pub fn job_index(job_id: &str) -> String {
    format!("cg:job:{job_id}")
}

pub fn idempotency(account_id: &str, key_hash: &str) -> String {
    format!("{}:idem:{key_hash}", tag(account_id))
}

/// `cg:stripe:evt:<event id>`
pub fn stripe_event(event_id: &str) -> String {
    format!("cg:stripe:evt:{event_id}")
}

/// Values of a Stripe event marker.
pub const EVENT_PENDING: &str = "pending";
pub const EVENT_DONE: &str = "done";

/// Fields of the account hash. Every field is always present (an absent Stripe customer is
/// stored as the empty string), so `HSETNX` on all of them creates an account or changes nothing.
pub mod account_field {
    pub const ID: &str = "id";
    pub const PLAN: &str = "plan";
    pub const STATUS: &str = "status";
    pub const PERIOD_ANCHOR_MS: &str = "period_anchor_ms";
    pub const PAY_PER_USE: &str = "pay_per_use";
    pub const SPENDING_LIMIT_CENTS: &str = "spending_limit_cents";
    pub const STRIPE_CUSTOMER_ID: &str = "stripe_customer_id";
    pub const CREATED_MS: &str = "created_ms";
}

/// Fields of a reservation hash. A credit reservation holds only what settlement reads (`kind`,
/// `bucket`, `bucket_expires_ms`, `amount`); a pay-per-use one also what was priced and reported.
pub mod rsv_field {
    /// `credits` or `spend`.
    pub const KIND: &str = "kind";
    pub const ACCOUNT: &str = "account";
    /// Bucket id (credits) or `YYYYMM` (spend).
    pub const BUCKET: &str = "bucket";
    /// Bucket expiry (UTC ms) when the bucket has one; refunds re-apply it.
    pub const BUCKET_EXPIRES_MS: &str = "bucket_expires_ms";
    pub const AMOUNT: &str = "amount";
    pub const OPERATION: &str = "operation";
    pub const MODEL: &str = "model";
    pub const QUANTITY: &str = "quantity";
    pub const UNIT_AMOUNT: &str = "unit_amount";
    pub const CATALOG_VERSION: &str = "catalog_version";
    pub const CREATED_MS: &str = "created_ms";
    /// Stripe customer and meter value of a reported pay-per-use charge.
    pub const CUSTOMER: &str = "customer";
    pub const REPORT_VALUE: &str = "report_value";
    /// `void` once a refused reservation has been compensated (the Stripe worker skips it).
    pub const STATE: &str = "state";
    /// Counts applications of the compensation of a refused reservation (exactly-once guard).
    pub const UNDONE: &str = "undone";
    /// Settlement claim: UTC ms of the settling call (`HSETNX`).
    pub const SETTLED: &str = "settled";
    /// Who claimed the settlement (a per-settlement token, or `sweeper`).
    pub const SETTLER: &str = "settler";
    /// The refund the settling call asked for (before clamping).
    pub const REFUND_DUE: &str = "refund_due";
    /// The refund actually given back (after clamping).
    pub const REFUNDED: &str = "refunded";
    /// Net applications of the refund: each application and each undo of a surplus one moves
    /// it with the money in one transaction, so the refund stands exactly once when it is 1.
    pub const REFUND_APPLIED: &str = "refund_applied";
    /// The charge's usage entry (its stored member), which its refund entry is made from.
    pub const USAGE: &str = "usage";
    /// The orphan policy the sweeper settled this hold by (`refund` / `keep`), when it did.
    pub const ORPHAN: &str = "orphan";
}

/// Values of [`rsv_field::KIND`] and [`rsv_field::STATE`].
pub const KIND_CREDITS: &str = "credits";
pub const KIND_SPEND: &str = "spend";
pub const STATE_VOID: &str = "void";

/// Fields of one outbox stream entry. A worker delivers `value` (scaled down by
/// `refunded / amount` of the reservation once it is settled) and skips entries whose
/// reservation is `state=void`.
pub mod outbox_field {
    pub const RESERVATION: &str = "rid";
    pub const ACCOUNT: &str = "account";
    pub const CUSTOMER: &str = "customer";
    pub const VALUE: &str = "value";
    pub const AMOUNT: &str = "amount";
    pub const MONTH: &str = "month";
    pub const MODEL: &str = "model";
    pub const TS: &str = "ts";
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash_tag(key: &str) -> &str {
        let open = key.find('{').unwrap_or(0);
        let close = key[open..].find('}').map(|i| open + i).unwrap_or(key.len());
        &key[open + 1..close]
    }

    #[test]
    fn account_keys_share_one_hash_tag() {
        let keys = [
            account("acme"),
            account_keys("acme"),
            key_sequence("acme"),
            subscription_events("acme"),
            balance("acme", "p1777593600000"),
            spend("acme", "202605"),
            reservation("acme", "r1"),
            holds("acme"),
            usage("acme"),
        ];
        for key in &keys {
            assert_eq!(hash_tag(key), "a:acme", "{key}");
        }
        assert_eq!(balance("acme", "signup"), "cg:{a:acme}:bal:signup");
    }

    #[test]
    fn braces_in_account_ids_cannot_break_the_tag() {
        assert_eq!(account("x}y"), "cg:{a:x%7Dy}:acct");
        assert_eq!(hash_tag(&balance("a}b{c", "p1")), "a:a%7Db%7Bc");
        // Escaping is injective: a literal `%7D` differs from an escaped `}`.
        assert_ne!(account("a%7D"), account("a}"));
        assert_eq!(account("a%7D"), "cg:{a:a%257D}:acct");
    }
}
