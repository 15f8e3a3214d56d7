//! The in-process [`Ledger`]: the same semantics as the Redis ledger, in plain maps behind one
//! `std::sync::Mutex`, for `store.backend = "memory"` (trying the gateway out, one process, not
//! durable) and for tests of the layers above the store.
//!
//! Every method takes the lock once, does its whole step and releases it before returning; no
//! lock is ever held across an `.await`, so each method is atomic as seen by the others (a key
//! insert counts the slots and claims one, a guarded account change compares and writes, under
//! that one lock).
//!
//! Time: credit buckets never expire here (their `expires_at_ms` is ignored: a new period is a
//! new bucket id, so old buckets only cost memory). Reservation records do honour
//! `record_ttl_ms`, on the monotonic clock, and are pruned as new ones arrive, so a long-running
//! process does not grow without bound. Pay-per-use reports are queued in memory
//! ([`MemoryLedger::drain_outbox`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::JobHold;
use super::{
    Account, AccountChange, CreditBucket, CreditChange, CreditReservation, CreditReserveOutcome,
    GuardedChange, IdempotencyClaim, KeyRecord, KeySlotClaim, Ledger, OrphanPolicy, SettleOutcome,
    SpendReservation, SpendReserveOutcome, StoreResult, StripeEventClaim, StripeReport,
    SubscriptionEvent, SweepReport, UsageEntry, UsageKind, UsagePage, UsageQuery, UsageUnit,
};
use crate::clock::{Clock, SystemClock};

/// Prune expired reservation records every this many new reservations.
const PRUNE_EVERY: u32 = 1024;

/// The in-process ledger.
pub struct MemoryLedger {
    state: Mutex<State>,
}

impl Default for MemoryLedger {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Default)]
struct State {
    accounts: HashMap<String, Account>,
    /// SHA-256 hex → key.
    keys: HashMap<String, KeyRecord>,
    /// key id → SHA-256 hex.
    key_hashes: HashMap<String, String>,
    /// account → (creation sequence → key id) of unrevoked keys.
    key_order: HashMap<String, BTreeMap<u64, String>>,
    key_seq: u64,
    /// (account, bucket id) → credits left.
    balances: HashMap<(String, String), u64>,
    /// (account, YYYYMM) → µ$ spent.
    spend: HashMap<(String, String), u64>,
    /// (account, reservation id) → reservation.
    reservations: HashMap<(String, String), Held>,
    reservations_since_prune: u32,
    outbox: VecDeque<(String, String, StripeReport)>,
    /// Stripe customer id → account id, written by the last create or change naming it.
    customers: HashMap<String, String>,
    /// (account, subscription id) → `created` of the last subscription event applied.
    subscription_events: HashMap<(String, String), i64>,
    /// Stripe webhook event id → (applied, forget at).
    stripe_events: HashMap<String, (bool, Instant)>,
    /// (account, key hash) → (record, forget at).
    idempotency: HashMap<(String, String), (String, Instant)>,
    /// (account, job id) → (the job's hold, forget at).
    jobs: HashMap<(String, String), (JobHold, Instant)>,
    /// job id → account.
    job_index: HashMap<String, String>,
    /// account → (time, entry id) → usage entry.
    usage: HashMap<String, BTreeMap<(i64, String), UsageEntry>>,
    /// How long usage entries are kept (ms, on the UTC clock).
    usage_keep_ms: i64,
}

struct Held {
    target: Target,
    amount: u64,
    settled: bool,
    expires: Instant,
    /// When the hold's lease ends (UTC ms, the ledger callers' clock).
    lease_until_ms: i64,
    /// The charge's usage entry, which a refund is recorded from.
    charge: UsageEntry,
}

enum Target {
    Credits { bucket: String },
    Spend { month: String },
}

impl MemoryLedger {
    pub fn new() -> Self {
        let state = State {
            usage_keep_ms: days_ms(super::usage::DEFAULT_RETENTION_DAYS),
            ..State::default()
        };
        Self {
            state: Mutex::new(state),
        }
    }

    /// Keeps usage history for `days` (`billing.usage_retention_days`) instead of the default.
    pub fn with_usage_retention_days(self, days: u64) -> Self {
        self.lock().usage_keep_ms = days_ms(days);
        self
    }

    /// Pay-per-use reports waiting for delivery.
    pub fn outbox_len(&self) -> usize {
        self.lock().outbox.len()
    }

    /// Takes the queued pay-per-use reports: `(account id, reservation id, report)`.
    pub fn drain_outbox(&self) -> Vec<(String, String, StripeReport)> {
        self.lock().outbox.drain(..).collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-done step behind (every step
        // computes first and writes last), so a poisoned lock is still consistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn days_ms(days: u64) -> i64 {
    i64::try_from(days.saturating_mul(24 * 3600 * 1000)).unwrap_or(i64::MAX)
}

fn pair(a: &str, b: &str) -> (String, String) {
    (a.to_string(), b.to_string())
}

fn expiry(ttl_ms: i64) -> Instant {
    let ttl = Duration::from_millis(u64::try_from(ttl_ms).unwrap_or(0));
    let now = Instant::now();
    now.checked_add(ttl).unwrap_or(now)
}

impl State {
    /// Adds a usage entry (same lock as its money) and forgets those past the retention.
    fn record(&mut self, account_id: &str, entry: UsageEntry) {
        let horizon = entry.time_ms.saturating_sub(self.usage_keep_ms);
        let history = self.usage.entry(account_id.to_string()).or_default();
        let kept = history.split_off(&(horizon, String::new()));
        *history = kept;
        history.insert((entry.time_ms, entry.id.clone()), entry);
    }

    fn balance_entry(&mut self, account_id: &str, bucket: &CreditBucket) -> &mut u64 {
        self.balances
            .entry(pair(account_id, &bucket.id))
            .or_insert(bucket.allowance)
    }

    /// Writes the changed fields of an existing account; the account after, `None` if unknown.
    fn change(&mut self, account_id: &str, change: &AccountChange) -> Option<Account> {
        let account = self.accounts.get_mut(account_id)?;
        *account = change.applied_to(account);
        let account = account.clone();
        if let Some(customer) = &change.stripe_customer_id {
            self.customers.insert(customer.clone(), account.id.clone());
        }
        Some(account)
    }

    /// Settles a reservation once (see [`Ledger::settle`]).
    fn settle(&mut self, account_id: &str, reservation_id: &str, refund: u64) -> SettleOutcome {
        let key = pair(account_id, reservation_id);
        let (target, refund, charge) = match self.reservations.get_mut(&key) {
            None => return SettleOutcome::Unknown,
            Some(held) if held.expires <= Instant::now() => return SettleOutcome::Unknown,
            Some(held) if held.settled => return SettleOutcome::AlreadySettled,
            Some(held) => {
                held.settled = true;
                let target = match &held.target {
                    Target::Credits { bucket } => Target::Credits {
                        bucket: bucket.clone(),
                    },
                    Target::Spend { month } => Target::Spend {
                        month: month.clone(),
                    },
                };
                (target, refund.min(held.amount), held.charge.clone())
            }
        };
        if refund > 0 {
            let entry = charge.refund_of(refund, SystemClock.now_ms());
            self.record(account_id, entry);
            match target {
                Target::Credits { bucket } => {
                    // Buckets are never forgotten here, so the reserved-from bucket exists.
                    let balance = self.balances.entry(pair(account_id, &bucket)).or_insert(0);
                    *balance = balance.saturating_add(refund);
                }
                Target::Spend { month } => {
                    let spent = self.spend.entry(pair(account_id, &month)).or_insert(0);
                    *spent = spent.saturating_sub(refund);
                }
            }
        }
        SettleOutcome::Settled
    }

    /// A grant or reset entry of a credit bucket, now.
    fn record_credit(&mut self, account_id: &str, kind: UsageKind, bucket: &str, amount: u64) {
        let entry = UsageEntry::credit_change(kind, bucket, amount, SystemClock.now_ms());
        self.record(account_id, entry);
    }

    fn hold(&mut self, account_id: &str, reservation_id: &str, held: Held) {
        self.record(account_id, held.charge.clone());
        self.reservations_since_prune += 1;
        if self.reservations_since_prune >= PRUNE_EVERY {
            self.reservations_since_prune = 0;
            let now = Instant::now();
            self.reservations.retain(|_, h| h.expires > now);
        }
        self.reservations
            .insert(pair(account_id, reservation_id), held);
    }
}

#[async_trait]
impl Ledger for MemoryLedger {
    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn create_account(
        &self,
        account: &Account,
        signup: Option<&CreditBucket>,
    ) -> StoreResult<bool> {
        let mut state = self.lock();
        if state.accounts.contains_key(&account.id) {
            return Ok(false);
        }
        state.accounts.insert(account.id.clone(), account.clone());
        if let Some(customer) = &account.stripe_customer_id {
            state.customers.insert(customer.clone(), account.id.clone());
        }
        if let Some(bucket) = signup {
            state.balance_entry(&account.id, bucket);
        }
        Ok(true)
    }

    async fn get_account(&self, id: &str) -> StoreResult<Option<Account>> {
        Ok(self.lock().accounts.get(id).cloned())
    }

    async fn change_account(
        &self,
        account_id: &str,
        change: &AccountChange,
    ) -> StoreResult<Option<Account>> {
        let mut state = self.lock();
        Ok(state.change(account_id, change))
    }

    async fn change_account_if(
        &self,
        expected: &Account,
        change: &AccountChange,
        credits: &[CreditChange],
        event: Option<&SubscriptionEvent>,
    ) -> StoreResult<GuardedChange> {
        let mut state = self.lock();
        if state.accounts.get(&expected.id) != Some(expected) {
            return Ok(GuardedChange::Conflict);
        }
        if let Some(event) = event {
            let last = state
                .subscription_events
                .entry(pair(&expected.id, &event.subscription_id))
                .or_insert(event.created_s);
            if *last > event.created_s {
                return Ok(GuardedChange::Stale {
                    last_created_s: *last,
                });
            }
            *last = event.created_s;
        }
        for credit in credits {
            match credit {
                CreditChange::Grant { bucket, amount } => {
                    let balance = state.balance_entry(&expected.id, bucket);
                    *balance = balance.saturating_add(*amount);
                    state.record_credit(&expected.id, UsageKind::Grant, &bucket.id, *amount);
                }
                CreditChange::Reset { bucket, balance } => {
                    state
                        .balances
                        .insert(pair(&expected.id, &bucket.id), *balance);
                    state.record_credit(&expected.id, UsageKind::Reset, &bucket.id, *balance);
                }
                CreditChange::Carry { from, to, add } => {
                    let left = *state.balance_entry(&expected.id, from);
                    let balance = left.saturating_add(*add);
                    state.balances.insert(pair(&expected.id, &to.id), balance);
                    state.record_credit(&expected.id, UsageKind::Reset, &to.id, balance);
                }
            }
        }
        match state.change(&expected.id, change) {
            Some(account) => Ok(GuardedChange::Applied(account)),
            None => Ok(GuardedChange::Conflict),
        }
    }

    async fn insert_key(
        &self,
        key_hash: &str,
        key: &KeyRecord,
        slots: u64,
    ) -> StoreResult<KeySlotClaim> {
        let mut state = self.lock();
        if !key.revoked {
            let taken = state
                .key_order
                .get(&key.account_id)
                .map_or(0, BTreeMap::len);
            if u64::try_from(taken).unwrap_or(u64::MAX) >= slots {
                return Ok(KeySlotClaim::Full);
            }
        }
        state.key_seq += 1;
        let seq = state.key_seq;
        state.keys.insert(key_hash.to_string(), key.clone());
        state
            .key_hashes
            .insert(key.id.clone(), key_hash.to_string());
        if !key.revoked {
            state
                .key_order
                .entry(key.account_id.clone())
                .or_default()
                .insert(seq, key.id.clone());
        }
        Ok(KeySlotClaim::Claimed)
    }

    async fn key_by_hash(&self, key_hash: &str) -> StoreResult<Option<KeyRecord>> {
        Ok(self.lock().keys.get(key_hash).cloned())
    }

    async fn key_slot(&self, account_id: &str, key_id: &str) -> StoreResult<Option<u64>> {
        let state = self.lock();
        let Some(order) = state.key_order.get(account_id) else {
            return Ok(None);
        };
        Ok(order
            .values()
            .position(|id| id == key_id)
            .and_then(|i| u64::try_from(i).ok()))
    }

    async fn active_keys(&self, account_id: &str) -> StoreResult<Vec<KeyRecord>> {
        let state = self.lock();
        let Some(order) = state.key_order.get(account_id) else {
            return Ok(Vec::new());
        };
        Ok(order
            .values()
            .filter_map(|id| state.key_hashes.get(id))
            .filter_map(|hash| state.keys.get(hash))
            .cloned()
            .collect())
    }

    async fn revoke_key(&self, key_id: &str) -> StoreResult<Option<KeyRecord>> {
        let mut state = self.lock();
        let Some(hash) = state.key_hashes.get(key_id).cloned() else {
            return Ok(None);
        };
        let Some(record) = state.keys.get_mut(&hash) else {
            return Ok(None);
        };
        let before = record.clone();
        record.revoked = true;
        if let Some(order) = state.key_order.get_mut(&before.account_id) {
            order.retain(|_, id| id != key_id);
        }
        Ok(Some(before))
    }

    async fn credit_balance(&self, account_id: &str, bucket: &CreditBucket) -> StoreResult<u64> {
        let state = self.lock();
        Ok(state
            .balances
            .get(&pair(account_id, &bucket.id))
            .copied()
            .unwrap_or(bucket.allowance))
    }

    async fn grant_credits(
        &self,
        account_id: &str,
        bucket: &CreditBucket,
        amount: u64,
    ) -> StoreResult<u64> {
        let mut state = self.lock();
        let balance = state.balance_entry(account_id, bucket);
        *balance = balance.saturating_add(amount);
        let balance = *balance;
        state.record_credit(account_id, UsageKind::Grant, &bucket.id, amount);
        Ok(balance)
    }

    async fn reset_credits(
        &self,
        account_id: &str,
        bucket: &CreditBucket,
        balance: u64,
    ) -> StoreResult<()> {
        let mut state = self.lock();
        state.balances.insert(pair(account_id, &bucket.id), balance);
        state.record_credit(account_id, UsageKind::Reset, &bucket.id, balance);
        Ok(())
    }

    async fn reserve_credits(&self, r: &CreditReservation) -> StoreResult<CreditReserveOutcome> {
        let mut state = self.lock();
        let balance = state.balance_entry(&r.account_id, &r.bucket);
        let Some(remaining) = balance.checked_sub(r.amount) else {
            return Ok(CreditReserveOutcome::Insufficient {
                available: *balance,
            });
        };
        *balance = remaining;
        state.hold(
            &r.account_id,
            &r.reservation_id,
            Held {
                target: Target::Credits {
                    bucket: r.bucket.id.clone(),
                },
                amount: r.amount,
                settled: false,
                expires: expiry(r.record_ttl_ms),
                lease_until_ms: r.lease_until_ms,
                charge: UsageEntry::charge(
                    &r.reservation_id,
                    &r.meta,
                    UsageUnit::Credits,
                    r.amount,
                    &r.bucket.id,
                ),
            },
        );
        Ok(CreditReserveOutcome::Reserved { remaining })
    }

    async fn month_spend(&self, account_id: &str, month: &str) -> StoreResult<u64> {
        let state = self.lock();
        Ok(state
            .spend
            .get(&pair(account_id, month))
            .copied()
            .unwrap_or(0))
    }

    async fn reserve_spend(&self, r: &SpendReservation) -> StoreResult<SpendReserveOutcome> {
        let mut state = self.lock();
        let spent = state
            .spend
            .entry(pair(&r.account_id, &r.month))
            .or_insert(0);
        let new_spent = spent.saturating_add(r.amount_micro);
        if new_spent > r.limit_micro {
            return Ok(SpendReserveOutcome::LimitReached {
                spent_micro: *spent,
            });
        }
        *spent = new_spent;
        state.hold(
            &r.account_id,
            &r.reservation_id,
            Held {
                target: Target::Spend {
                    month: r.month.clone(),
                },
                amount: r.amount_micro,
                settled: false,
                expires: expiry(r.record_ttl_ms),
                lease_until_ms: r.lease_until_ms,
                charge: UsageEntry::charge(
                    &r.reservation_id,
                    &r.meta,
                    UsageUnit::Usd,
                    r.amount_micro,
                    &r.month,
                ),
            },
        );
        if let Some(report) = &r.report {
            state.outbox.push_back((
                r.account_id.clone(),
                r.reservation_id.clone(),
                report.clone(),
            ));
        }
        Ok(SpendReserveOutcome::Reserved {
            spent_micro: new_spent,
        })
    }

    async fn settle(
        &self,
        account_id: &str,
        reservation_id: &str,
        refund: u64,
    ) -> StoreResult<SettleOutcome> {
        Ok(self.lock().settle(account_id, reservation_id, refund))
    }

    async fn settle_as(
        &self,
        account_id: &str,
        reservation_id: &str,
        refund: u64,
        _settler: &str,
    ) -> StoreResult<SettleOutcome> {
        // One lock: a claim and its refund are one step here.
        Ok(self.lock().settle(account_id, reservation_id, refund))
    }

    async fn sweep(
        &self,
        now_ms: i64,
        policy: OrphanPolicy,
        limit: usize,
    ) -> StoreResult<SweepReport> {
        let mut state = self.lock();
        let live = Instant::now();
        let due: Vec<(String, String)> = state
            .reservations
            .iter()
            .filter(|(_, h)| !h.settled && h.lease_until_ms < now_ms && h.expires > live)
            .map(|(k, _)| k.clone())
            .take(limit)
            .collect();
        let mut report = SweepReport::default();
        for (account_id, reservation_id) in due {
            report.checked += 1;
            if state.settle(&account_id, &reservation_id, policy.refund()) == SettleOutcome::Settled
            {
                report.orphans += 1;
                tracing::warn!(account = %account_id, reservation = %reservation_id,
                    policy = policy.as_str(), "hold settled by the sweeper: its lease ended with no settlement");
            }
        }
        Ok(report)
    }

    async fn account_by_stripe_customer(&self, customer_id: &str) -> StoreResult<Option<Account>> {
        // Like Redis: the index names a candidate, the account itself confirms it.
        let state = self.lock();
        Ok(state
            .customers
            .get(customer_id)
            .and_then(|id| state.accounts.get(id))
            .filter(|a| a.stripe_customer_id.as_deref() == Some(customer_id))
            .cloned())
    }

    async fn begin_stripe_event(
        &self,
        event_id: &str,
        lease_ms: i64,
    ) -> StoreResult<StripeEventClaim> {
        let mut state = self.lock();
        let now = Instant::now();
        state.stripe_events.retain(|_, (_, until)| *until > now);
        Ok(match state.stripe_events.get(event_id) {
            Some((true, _)) => StripeEventClaim::Applied,
            Some((false, _)) => StripeEventClaim::InProgress,
            None => {
                state
                    .stripe_events
                    .insert(event_id.to_string(), (false, expiry(lease_ms)));
                StripeEventClaim::Claimed
            }
        })
    }

    async fn finish_stripe_event(&self, event_id: &str, keep_ms: i64) -> StoreResult<()> {
        self.lock()
            .stripe_events
            .insert(event_id.to_string(), (true, expiry(keep_ms)));
        Ok(())
    }

    async fn claim_idempotency_key(
        &self,
        account_id: &str,
        key_hash: &str,
        record: &str,
        lease_ms: i64,
    ) -> StoreResult<IdempotencyClaim> {
        let mut state = self.lock();
        let now = Instant::now();
        state.idempotency.retain(|_, (_, until)| *until > now);
        let id = (account_id.to_string(), key_hash.to_string());
        Ok(match state.idempotency.get(&id) {
            Some((existing, _)) => IdempotencyClaim::Existing(existing.clone()),
            None => {
                state
                    .idempotency
                    .insert(id, (record.to_string(), expiry(lease_ms)));
                IdempotencyClaim::Claimed
            }
        })
    }

    async fn store_idempotency_record(
        &self,
        account_id: &str,
        key_hash: &str,
        record: &str,
        keep_ms: i64,
    ) -> StoreResult<()> {
        self.lock().idempotency.insert(
            (account_id.to_string(), key_hash.to_string()),
            (record.to_string(), expiry(keep_ms)),
        );
        Ok(())
    }

    async fn release_idempotency_key(&self, account_id: &str, key_hash: &str) -> StoreResult<()> {
        self.lock()
            .idempotency
            .remove(&(account_id.to_string(), key_hash.to_string()));
        Ok(())
    }

    async fn record_job(
        &self,
        job: &JobHold,
        lease_until_ms: i64,
        keep_ms: i64,
    ) -> StoreResult<()> {
        let mut state = self.lock();
        let forget = expiry(keep_ms);
        let now = Instant::now();
        state.jobs.retain(|_, (_, at)| *at > now);
        let live: std::collections::HashSet<&String> = state.jobs.keys().map(|(_, j)| j).collect();
        let stale: Vec<String> = state
            .job_index
            .keys()
            .filter(|j| !live.contains(j))
            .cloned()
            .collect();
        for j in stale {
            state.job_index.remove(&j);
        }
        if let Some(held) = state
            .reservations
            .get_mut(&pair(&job.account_id, &job.reservation_id))
        {
            if !held.settled {
                held.lease_until_ms = lease_until_ms;
            }
            held.expires = held.expires.max(forget);
        }
        state
            .jobs
            .insert(pair(&job.account_id, &job.job_id), (job.clone(), forget));
        state
            .job_index
            .insert(job.job_id.clone(), job.account_id.clone());
        Ok(())
    }

    async fn account_job(&self, account_id: &str, job_id: &str) -> StoreResult<Option<JobHold>> {
        let state = self.lock();
        let now = Instant::now();
        Ok(state
            .jobs
            .get(&pair(account_id, job_id))
            .filter(|(_, at)| *at > now)
            .map(|(job, _)| job.clone()))
    }

    async fn find_job(&self, job_id: &str) -> StoreResult<Option<JobHold>> {
        let account = self.lock().job_index.get(job_id).cloned();
        match account {
            Some(account) => self.account_job(&account, job_id).await,
            None => Ok(None),
        }
    }

    async fn usage(&self, account_id: &str, query: &UsageQuery) -> StoreResult<UsagePage> {
        let state = self.lock();
        let Some(history) = state.usage.get(account_id) else {
            return Ok(UsagePage::default());
        };
        // Newest first from the page's upper bound: the cursor or `to`, whichever is lower.
        let mut upper = (i64::MAX, String::new());
        if let Some(to) = query.to_ms {
            upper = (to, String::new());
        }
        if let Some(c) = &query.cursor {
            upper = upper.min((c.time_ms, c.id.clone()));
        }
        let candidates = history
            .range(..upper)
            .rev()
            .map(|(_, e)| e)
            .take_while(|e| query.from_ms.is_none_or(|f| e.time_ms >= f))
            .filter(|e| query.admits(e))
            .take(query.limit.saturating_add(1))
            .cloned()
            .collect();
        Ok(UsagePage::cut(candidates, query.limit))
    }
}
