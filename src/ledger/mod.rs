//! The ledger: accounts, API keys, credit balances, pay-per-use spend and reservations, kept
//! atomically in one store. The gateway's admission step reserves through it, `logging` settles
//! through it, the admin and billing APIs read and change accounts through it.
//!
//! The ledger knows nothing of the catalog: callers pass the period, allowance, limit and amount
//! they computed from the catalog snapshot and the clock. Two backends share one conformance
//! suite: [`RedisLedger`] (production, no Lua: `MULTI/EXEC` and apply-then-compensate, `WATCH`
//! on a connection of its own for guarded account changes) and
//! [`MemoryLedger`] (single process, for trying it out and for tests).

mod jobs;
pub mod lane;
mod memory;
mod redis;
pub mod schema;
pub mod usage;

pub use self::jobs::{JobHold, JobPayment};
pub use self::memory::MemoryLedger;
pub use self::redis::{RedisLedger, StoreConn, StoreNodes};
pub use self::usage::{UsageCursor, UsageEntry, UsageKind, UsagePage, UsageQuery, UsageUnit};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// Errors of the store itself. Every one of them fails the request closed (503).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store command timed out")]
    Timeout,
    #[error("store holds unreadable data at {key}: {detail}")]
    Corrupt { key: String, detail: String },
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The plan id of accounts on pay-per-use only.
pub const PAY_PER_USE_PLAN: &str = "pay_per_use";

/// Subscription status, as Stripe names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionStatus {
    Active,
    Trialing,
    PastDue,
    Canceled,
    Incomplete,
}

impl SubscriptionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Trialing => "trialing",
            Self::PastDue => "past_due",
            Self::Canceled => "canceled",
            Self::Incomplete => "incomplete",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "active" => Self::Active,
            "trialing" => Self::Trialing,
            "past_due" => Self::PastDue,
            "canceled" => Self::Canceled,
            "incomplete" => Self::Incomplete,
            _ => return None,
        })
    }

    /// Whether credits may be spent in this status.
    pub fn may_spend_credits(self) -> bool {
        matches!(self, Self::Active | Self::Trialing)
    }
}

/// One customer account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub id: String,
    /// A catalog plan id, or [`PAY_PER_USE_PLAN`].
    pub plan: String,
    pub status: SubscriptionStatus,
    /// The end of one billing period (UTC ms); every other period is a whole number of months
    /// away from it.
    pub period_anchor_ms: i64,
    pub pay_per_use: bool,
    pub spending_limit_cents: u64,
    pub stripe_customer_id: Option<String>,
    pub created_ms: i64,
}

/// The fields of an account one caller changes; `None` leaves a field as it is. Writers of
/// different fields never undo each other ([`Ledger::change_account`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountChange {
    pub plan: Option<String>,
    pub status: Option<SubscriptionStatus>,
    pub period_anchor_ms: Option<i64>,
    pub pay_per_use: Option<bool>,
    pub spending_limit_cents: Option<u64>,
    pub stripe_customer_id: Option<String>,
}

impl AccountChange {
    /// The account as it is after this change.
    pub fn applied_to(&self, account: &Account) -> Account {
        let mut new = account.clone();
        if let Some(plan) = &self.plan {
            new.plan = plan.clone();
        }
        if let Some(status) = self.status {
            new.status = status;
        }
        if let Some(anchor) = self.period_anchor_ms {
            new.period_anchor_ms = anchor;
        }
        if let Some(ppu) = self.pay_per_use {
            new.pay_per_use = ppu;
        }
        if let Some(limit) = self.spending_limit_cents {
            new.spending_limit_cents = limit;
        }
        if let Some(customer) = &self.stripe_customer_id {
            new.stripe_customer_id = Some(customer.clone());
        }
        new
    }
}

/// A credit write made in the same atomic step as a guarded account change (a plan change's
/// top-up, a re-anchored period's balance).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreditChange {
    /// Adds `amount` to the bucket (created at its allowance first), as `grant_credits`.
    Grant { bucket: CreditBucket, amount: u64 },
    /// Sets the bucket to exactly `balance`, as `reset_credits`.
    Reset { bucket: CreditBucket, balance: u64 },
    /// Sets `to` to what `from` holds (its allowance when never touched) plus `add`, read and
    /// written in the same step (a re-anchored period keeps its balance; a reservation from
    /// `from` in between is a conflict, never lost).
    Carry {
        from: CreditBucket,
        to: CreditBucket,
        add: u64,
    },
}

/// The Stripe subscription event a guarded change applies, for ordering by `created`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionEvent {
    pub subscription_id: String,
    /// The event's `created` (Unix seconds).
    pub created_s: i64,
}

/// What became of [`Ledger::change_account_if`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardedChange {
    /// Written; the account as it is now.
    Applied(Account),
    /// The account is not `expected` any more (or is gone): nothing written; read and retry.
    Conflict,
    /// An event of the subscription with a later `created` was applied: nothing written.
    Stale { last_created_s: i64 },
}

/// What became of [`Ledger::insert_key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySlotClaim {
    /// Stored; the key holds a slot.
    Claimed,
    /// Every slot is taken: nothing stored.
    Full,
}

/// An API key as stored: never the key itself, only its SHA-256 (the map key) and display prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    pub account_id: String,
    /// The first characters of the key, for humans (`at_live_AbCd`).
    pub prefix: String,
    pub name: Option<String>,
    pub created_ms: i64,
    pub revoked: bool,
}

/// A credit balance bucket: the balance of one billing period (or the free plan's one-off grant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditBucket {
    /// Period id (`Period::id()`), or `"signup"` for the free plan's grant.
    pub id: String,
    /// What the bucket holds when first touched.
    pub allowance: u64,
    /// When the bucket may be forgotten (period end plus grace), UTC ms; `None` keeps it forever.
    pub expires_at_ms: Option<i64>,
}

/// What a reservation was for: kept with it for settlement, refunds, metrics and Stripe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ChargeMeta {
    pub operation: String,
    pub model: String,
    pub quantity: u64,
    /// Price of one unit (credits, or micro-dollars), so partial refunds are exact.
    pub unit_amount: u64,
    pub catalog_version: u64,
    pub created_ms: i64,
}

/// The durable report of a pay-per-use charge to Stripe, written in the charge's transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeReport {
    pub customer_id: String,
    /// Value reported to the meter (integer; the gateway reports micro-dollars / unit scale).
    pub value: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditReservation {
    pub account_id: String,
    /// Unique per request; settles the reservation exactly once.
    pub reservation_id: String,
    pub bucket: CreditBucket,
    pub amount: u64,
    pub meta: ChargeMeta,
    /// How long the reservation record is kept (ms).
    pub record_ttl_ms: i64,
    /// When the hold's lease ends (UTC ms): unsettled by then, the sweeper settles it.
    pub lease_until_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreditReserveOutcome {
    /// Reserved; `remaining` credits are left in the bucket.
    Reserved { remaining: u64 },
    /// Not enough credits; nothing changed. `available` is what the bucket held.
    Insufficient { available: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendReservation {
    pub account_id: String,
    pub reservation_id: String,
    /// `YYYYMM`, UTC.
    pub month: String,
    /// The account's monthly limit in micro-dollars; spend never passes it.
    pub limit_micro: u64,
    pub amount_micro: u64,
    pub meta: ChargeMeta,
    pub report: Option<StripeReport>,
    pub record_ttl_ms: i64,
    pub lease_until_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpendReserveOutcome {
    /// Reserved; the month's spend is now `spent_micro`.
    Reserved { spent_micro: u64 },
    /// Would pass the limit; nothing changed. `spent_micro` is the month's spend.
    LimitReached { spent_micro: u64 },
}

/// Where a Stripe webhook event stands ([`Ledger::begin_stripe_event`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripeEventClaim {
    /// This caller may apply the event; it holds it for the lease.
    Claimed,
    /// Another caller holds it (applying now, or failed less than a lease ago).
    InProgress,
    /// Applied before: answer it without applying again.
    Applied,
}

/// Where an `Idempotency-Key` stands ([`Ledger::claim_idempotency_key`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyClaim {
    /// New: the caller runs the request; the key holds the caller's record for the lease.
    Claimed,
    /// Seen before: the stored record (opaque text written by the caller).
    Existing(String),
}

/// What the sweeper does with a hold whose lease ended unsettled — its gateway died, or lost
/// the store, before the request's outcome was written: give it back (the client got no result
/// the gateway saw), or keep it as a charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OrphanPolicy {
    #[default]
    Refund,
    Keep,
}

impl OrphanPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refund => "refund",
            Self::Keep => "keep",
        }
    }

    /// The refund to claim an orphan with (clamped to the hold's amount by settlement).
    pub fn refund(self) -> u64 {
        match self {
            Self::Refund => u64::MAX,
            Self::Keep => 0,
        }
    }
}

/// What one [`Ledger::sweep`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Holds past their lease that were looked at.
    pub checked: u64,
    /// Unsettled holds this sweep settled by the policy.
    pub orphans: u64,
    /// Refunds claimed by someone else but not (or not exactly once) applied, now exact.
    pub refunds_finished: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleOutcome {
    /// This call settled the reservation (and refunded `refund` if non-zero).
    Settled,
    /// Someone settled it before; nothing changed.
    AlreadySettled,
    /// No such reservation (expired or never made); nothing changed.
    Unknown,
}

/// Where accounts, keys and money live. Every method is one atomic step as seen by others.
#[async_trait]
pub trait Ledger: Send + Sync + 'static {
    /// Liveness of the store.
    async fn ping(&self) -> StoreResult<()>;

    /// Creates the account; `false` (and nothing changed) when the id exists. `signup` is
    /// created with its allowance in the same step (the free plan's one-off credits).
    async fn create_account(
        &self,
        account: &Account,
        signup: Option<&CreditBucket>,
    ) -> StoreResult<bool>;
    async fn get_account(&self, id: &str) -> StoreResult<Option<Account>>;
    /// Writes only the fields `change` names, in one atomic step, so it cannot undo a
    /// concurrent change of another field. Answers the account after the change, `None` (and
    /// nothing written) when there is no such account (accounts are never deleted).
    async fn change_account(
        &self,
        account_id: &str,
        change: &AccountChange,
    ) -> StoreResult<Option<Account>>;
    /// A change that depends on what its caller read: applies `change` and `credits` in one
    /// atomic step only if the account is still exactly `expected` and `event` (when given) is
    /// not older than the last one applied for its subscription (then records it as the last).
    /// [`GuardedChange::Conflict`] means the account changed meanwhile: read again, decide
    /// again, retry ([`crate::plan_change::MAX_ATTEMPTS`]).
    async fn change_account_if(
        &self,
        expected: &Account,
        change: &AccountChange,
        credits: &[CreditChange],
        event: Option<&SubscriptionEvent>,
    ) -> StoreResult<GuardedChange>;

    /// Stores a new key under its SHA-256 hex hash if the account has fewer than `slots`
    /// unrevoked keys, atomically: N concurrent inserts with S free slots store exactly S keys.
    /// Its slot order is its insertion order. A refused insert leaves nothing behind.
    async fn insert_key(
        &self,
        key_hash: &str,
        key: &KeyRecord,
        slots: u64,
    ) -> StoreResult<KeySlotClaim>;
    async fn key_by_hash(&self, key_hash: &str) -> StoreResult<Option<KeyRecord>>;
    /// 0-based position of the key among the account's unrevoked keys in creation order.
    async fn key_slot(&self, account_id: &str, key_id: &str) -> StoreResult<Option<u64>>;
    /// The account's unrevoked keys in creation order.
    async fn active_keys(&self, account_id: &str) -> StoreResult<Vec<KeyRecord>>;
    /// Revokes; returns the key as it was, `None` when unknown.
    async fn revoke_key(&self, key_id: &str) -> StoreResult<Option<KeyRecord>>;

    /// The bucket's balance (its allowance when not yet touched).
    async fn credit_balance(&self, account_id: &str, bucket: &CreditBucket) -> StoreResult<u64>;
    /// Adds credits to the bucket (creating it at its allowance first); returns the new balance.
    async fn grant_credits(
        &self,
        account_id: &str,
        bucket: &CreditBucket,
        amount: u64,
    ) -> StoreResult<u64>;
    /// Sets the bucket to exactly `balance` (a new period paid for).
    async fn reset_credits(
        &self,
        account_id: &str,
        bucket: &CreditBucket,
        balance: u64,
    ) -> StoreResult<()>;
    /// Reserves credits: one round trip when they suffice; never leaves a negative balance.
    async fn reserve_credits(&self, r: &CreditReservation) -> StoreResult<CreditReserveOutcome>;

    /// Pay-per-use spend of the month in micro-dollars.
    async fn month_spend(&self, account_id: &str, month: &str) -> StoreResult<u64>;
    /// Reserves pay-per-use spend: one round trip when within the limit; never passes it.
    async fn reserve_spend(&self, r: &SpendReservation) -> StoreResult<SpendReserveOutcome>;

    /// Settles a reservation exactly once: gives back `refund` (credits or micro-dollars, at
    /// most the reserved amount) and marks it settled. Repeats are no-ops.
    async fn settle(
        &self,
        account_id: &str,
        reservation_id: &str,
        refund: u64,
    ) -> StoreResult<SettleOutcome>;

    /// [`Ledger::settle`] by a named settler: the retries of one settlement pass the same
    /// `settler`, so a retry whose first answer was lost finishes its own refund (exactly once);
    /// a call by another settler never applies a refund it did not claim (only the sweeper
    /// finishes a claim gone stale).
    async fn settle_as(
        &self,
        account_id: &str,
        reservation_id: &str,
        refund: u64,
        settler: &str,
    ) -> StoreResult<SettleOutcome>;

    /// Settles every hold whose lease ended before `now_ms` and that nobody settled, by
    /// `policy`, and finishes refunds that were claimed but not applied exactly once (a crash
    /// or lost answer between claim and refund). At most `limit` holds per call. Safe to run
    /// concurrently on every instance: each hold is claimed once, each refund converges to one.
    async fn sweep(
        &self,
        now_ms: i64,
        policy: OrphanPolicy,
        limit: usize,
    ) -> StoreResult<SweepReport>;

    /// The account whose `stripe_customer_id` is `customer_id` (the Stripe webhooks' lookup),
    /// kept by `create_account` and the account changes.
    async fn account_by_stripe_customer(&self, customer_id: &str) -> StoreResult<Option<Account>>;

    /// Claims a Stripe webhook event for applying, once across every instance: `Claimed` holds
    /// it for `lease_ms` (a caller that fails lets the lease lapse so Stripe's re-send applies
    /// it), `InProgress` while held, `Applied` after [`Ledger::finish_stripe_event`].
    async fn begin_stripe_event(
        &self,
        event_id: &str,
        lease_ms: i64,
    ) -> StoreResult<StripeEventClaim>;

    /// Marks a claimed event applied; it is remembered for `keep_ms`.
    async fn finish_stripe_event(&self, event_id: &str, keep_ms: i64) -> StoreResult<()>;

    /// Claims an idempotency key of the account with `record` for `lease_ms`, or returns what
    /// is stored under it. One atomic step: two concurrent claims never both succeed.
    async fn claim_idempotency_key(
        &self,
        account_id: &str,
        key_hash: &str,
        record: &str,
        lease_ms: i64,
    ) -> StoreResult<IdempotencyClaim>;

    /// Replaces the key's record (the finished outcome), kept for `keep_ms`.
    async fn store_idempotency_record(
        &self,
        account_id: &str,
        key_hash: &str,
        record: &str,
        keep_ms: i64,
    ) -> StoreResult<()>;

    /// Forgets the key, so the same request may run again.
    async fn release_idempotency_key(&self, account_id: &str, key_hash: &str) -> StoreResult<()>;

    /// Records an accepted job's hold, in one atomic step: the job under its account and in the
    /// job-id index (both kept `keep_ms`), the hold's lease extended to `lease_until_ms` (so the
    /// sweeper leaves it to the job until then) and its reservation record kept at least
    /// `keep_ms`. A hold already settled stays settled (the lease of a settled hold is not
    /// revived).
    async fn record_job(&self, job: &JobHold, lease_until_ms: i64, keep_ms: i64)
        -> StoreResult<()>;

    /// The account's job, `None` when it has no such job (or it was forgotten).
    async fn account_job(&self, account_id: &str, job_id: &str) -> StoreResult<Option<JobHold>>;

    /// A job by its id alone (the backend callback), through the job-id index.
    async fn find_job(&self, job_id: &str) -> StoreResult<Option<JobHold>>;

    /// One page of the account's usage history, newest first: every charge, refund, grant and
    /// reset, each written in the same atomic step as the money it describes (a refused
    /// reservation's charge is removed in its compensation), kept for the retention the ledger
    /// was built with ([`usage`]).
    async fn usage(&self, account_id: &str, query: &UsageQuery) -> StoreResult<UsagePage>;
}
