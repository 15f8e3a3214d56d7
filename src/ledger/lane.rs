//! Lanes: where the ledger's work lists live so that each one is written in the same
//! `MULTI/EXEC` as the account money it lists, on a single node and on Redis Cluster alike.
//!
//! A reservation writes its hold's lease onto the sweeper's work lists, and a pay-per-use one its
//! Stripe report onto the outbox, in the transaction of the charge itself (so a crash can never
//! keep one without the other). On Redis Cluster every key of one transaction must hash to one
//! slot, so those lists cannot be global: each of the 16384 cluster slots has a *lane*, a hash
//! tag chosen (once, deterministically, by search) to hash to that slot. An account's lane is the
//! lane of its own slot, so `cg:{<lane>}:lease:<s>`, `cg:{<lane>}:lease:due` and
//! `cg:{<lane>}:outbox` sit next to `cg:{a:<account>}:*`, and move with them when the slot is
//! resharded. The walkers (sweeper, Stripe outbox) read the lanes in use from `cg:lanes` (a set
//! of slot numbers, added to before an account is created, so no account writes to a lane the
//! walkers do not know) and walk each; there are at most 16384, however many accounts there are.
//!
//! On a single node there is one lane, [`Lane::SINGLE`], whose keys are the names the ledger had
//! before lanes existed (`cg:lease:*`, `cg:outbox`), so data written by earlier versions is
//! still found.

use std::sync::OnceLock;

/// The set of lanes in use on a cluster: the slot numbers of the accounts created.
pub const LANES: &str = "cg:lanes";
/// Number of Redis Cluster hash slots.
pub const CLUSTER_SLOTS: u16 = 16384;

/// One lane: the single node's, or the one of a cluster slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lane(Option<u16>);

impl Lane {
    /// The only lane of a single Redis node.
    pub const SINGLE: Lane = Lane(None);

    /// The lane of cluster slot `slot` (taken modulo 16384).
    pub fn of_slot(slot: u16) -> Lane {
        Lane(Some(slot % CLUSTER_SLOTS))
    }

    /// The lane an account's work lists go to.
    pub fn of_account(cluster: bool, account_id: &str) -> Lane {
        match cluster {
            true => Lane::of_slot(key_slot(super::schema::account(account_id).as_bytes())),
            false => Lane::SINGLE,
        }
    }

    /// The cluster slot of this lane (`None` on a single node).
    pub fn slot(self) -> Option<u16> {
        self.0
    }

    /// `cg:` or `cg:{<lane tag>}:`
    fn prefix(self) -> String {
        match self.0 {
            None => "cg:".to_string(),
            Some(slot) => format!("cg:{{{}}}:", tag_of_slot(slot)),
        }
    }

    /// The sweeper's work list of one 10 s lease slot: accounts with a hold whose lease ends then.
    pub fn lease_slot(self, lease_slot: i64) -> String {
        format!("{}lease:{lease_slot}", self.prefix())
    }

    /// The lease slots of this lane that have a work list, scored by slot number.
    pub fn lease_due(self) -> String {
        format!("{}lease:due", self.prefix())
    }

    /// The Stripe outbox stream of this lane.
    pub fn outbox(self) -> String {
        format!("{}outbox", self.prefix())
    }

    /// Outbox entries of this lane Stripe refused for good.
    pub fn outbox_dead(self) -> String {
        format!("{}outbox:dead", self.prefix())
    }

    /// The low-balance alert stream of this lane.
    pub fn alerts(self) -> String {
        format!("{}alerts", self.prefix())
    }
}

/// The Redis Cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag (the part between the
/// first `{` and the next `}` when not empty) or of the whole key, modulo 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16::State::<crc16::XMODEM>::calculate(hashed) % CLUSTER_SLOTS
}

/// The lane tag of `slot`: the first `l<n>` (n = 0, 1, …) that hashes to it. The same on every
/// instance and every version, since it depends on nothing but CRC16.
fn tag_of_slot(slot: u16) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); usize::from(CLUSTER_SLOTS)];
        let mut missing = usize::from(CLUSTER_SLOTS);
        let mut n: u64 = 0;
        while missing > 0 {
            let tag = format!("l{n}");
            let s = usize::from(key_slot(tag.as_bytes()));
            if tags[s].is_empty() {
                tags[s] = tag;
                missing -= 1;
            }
            n += 1;
        }
        tags
    });
    tags.get(usize::from(slot % CLUSTER_SLOTS))
        .map_or("", String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slot_matches_redis() {
        // Values from `CLUSTER KEYSLOT` of Redis 7.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_eq!(
            key_slot(b"{}x"),
            crc16::State::<crc16::XMODEM>::calculate(b"{}x") % 16384
        );
    }

    #[test]
    fn every_slot_has_a_lane_in_its_own_slot() {
        for slot in [0u16, 1, 777, 8191, 16383] {
            let lane = Lane::of_slot(slot);
            for key in [
                lane.lease_due(),
                lane.lease_slot(12),
                lane.outbox(),
                lane.alerts(),
            ] {
                assert_eq!(key_slot(key.as_bytes()), slot, "{key}");
            }
        }
    }

    #[test]
    fn an_account_lane_shares_the_account_slot() {
        for id in ["acme", "globex", "a}b", "x"] {
            let lane = Lane::of_account(true, id);
            let account = super::super::schema::account(id);
            assert_eq!(
                key_slot(lane.outbox().as_bytes()),
                key_slot(account.as_bytes())
            );
            assert_eq!(lane.slot(), Some(key_slot(account.as_bytes())));
        }
    }

    #[test]
    fn the_single_lane_keeps_the_old_names() {
        assert_eq!(Lane::SINGLE.lease_due(), "cg:lease:due");
        assert_eq!(Lane::SINGLE.lease_slot(5), "cg:lease:5");
        assert_eq!(Lane::SINGLE.outbox(), "cg:outbox");
        assert_eq!(Lane::SINGLE.outbox_dead(), "cg:outbox:dead");
        assert_eq!(Lane::SINGLE.alerts(), "cg:alerts");
        assert_eq!(Lane::of_account(false, "acme"), Lane::SINGLE);
    }
}
