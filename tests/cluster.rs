//! Redis Cluster (issue 12): a real local cluster of 3 masters + 3 replicas
//! (`support::cluster`) under the real `creditgate` binary, with real faults — slots that hold
//! busy accounts moved with their keys while requests run, a master killed (SIGKILL) under load
//! and replaced by its replica, a master and its replica frozen (SIGSTOP) so the cluster is
//! not ok. Every test checks conservation: each account's balance + kept charges == granted,
//! never below zero, and the upstream saw no request that was not billed.
//!
//! The first test checks the harness itself (the layout, `redis-cli -c`, a slot move, a
//! failover), so a failure further down is the gateway's, not the harness's.

#[path = "support/fake_stripe.rs"]
mod fake_stripe;
mod support;

use support::cluster::{key_slot, RedisCluster, MASTERS};

// ---- the harness itself ------------------------------------------------------------------

#[test]
fn harness_starts_a_whole_cluster_moves_a_slot_and_fails_over() {
    let mut cluster = RedisCluster::start();

    // 3 masters serving every slot, each with one replica.
    let masters = cluster.masters();
    assert_eq!(masters.len(), MASTERS, "{masters:?}");
    let covered: usize = masters
        .iter()
        .flat_map(|m| m.slots.iter())
        .map(|&(a, b)| usize::from(b - a) + 1)
        .sum();
    assert_eq!(covered, 16384);
    for m in &masters {
        assert_eq!(cluster.replicas_of(m.port).len(), 1, "{m:?}");
    }
    for p in cluster.ports() {
        assert!(cluster.state_ok(p), "{:?}", cluster.cluster_info(p));
    }
    assert_eq!(cluster.seed_url().split(',').count(), MASTERS);

    // The slot function agrees with the server's.
    for key in [
        "cg:{a:acct-1}:acct",
        "plain",
        "{}x",
        "a{b}c{d}",
        "cg:{a:zz}:bal:p",
    ] {
        let server: u16 = cluster.cmd(
            masters[0].port,
            redis::cmd("CLUSTER").arg("KEYSLOT").arg(key),
        );
        assert_eq!(key_slot(key), server, "{key}");
    }
    assert_eq!(key_slot("cg:{a:x}:acct"), key_slot("cg:{a:x}:bal:b"));

    // SET/GET through redis-cli -c from a node that does not serve the key.
    let key = "cg:{a:harness}:acct";
    let owner = cluster.master_of_key(key);
    let other = masters.iter().find(|m| m.port != owner).unwrap().port;
    assert_eq!(cluster.cli(other, &["SET", key, "v1"]), "OK");
    assert_eq!(cluster.cli(other, &["GET", key]), "v1");
    let on_owner: Option<String> = cluster.cmd(owner, redis::cmd("GET").arg(key));
    assert_eq!(on_owner.as_deref(), Some("v1"));

    // Move the key's slot to another master: the key moves with it.
    let slot = key_slot(key);
    cluster.reshard(owner, other, &[slot]);
    assert_eq!(cluster.master_of_slot(slot), other);
    let on_new: Option<String> = cluster.cmd(other, redis::cmd("GET").arg(key));
    assert_eq!(on_new.as_deref(), Some("v1"));
    let on_old: redis::RedisResult<Option<String>> =
        cluster.try_cmd(owner, redis::cmd("GET").arg(key));
    let moved = on_old.expect_err("the old owner answers MOVED");
    assert!(
        moved.to_string().to_ascii_uppercase().contains("MOVED"),
        "old owner answered {moved}"
    );
    assert_eq!(cluster.cli(owner, &["GET", key]), "v1");

    // SIGKILL the master now serving it: its replica takes over with the key.
    let replica = cluster.replicas_of(other)[0];
    // The write has reached the replica before the kill (WAIT 1).
    let acked: i64 = cluster.cmd(other, redis::cmd("WAIT").arg(1).arg(2000));
    assert_eq!(acked, 1);
    cluster.sigkill(other);
    let promoted = cluster.wait_failover(other);
    assert_eq!(promoted, replica);
    assert_eq!(cluster.master_of_slot(slot), promoted);
    let survivor = cluster.ports().into_iter().find(|&p| p != other).unwrap();
    assert_eq!(cluster.cli(survivor, &["GET", key]), "v1");
    assert_eq!(cluster.masters().len(), MASTERS);

    // SIGSTOP of a master and its replica: the others say the cluster is not ok; SIGCONT
    // brings it back.
    let victim = cluster
        .masters()
        .into_iter()
        .find(|m| m.port != promoted && !cluster.replicas_of(m.port).is_empty())
        .expect("a master with a replica")
        .port;
    let its_replica = cluster.replicas_of(victim)[0];
    cluster.sigstop(victim);
    cluster.sigstop(its_replica);
    let watcher = promoted;
    cluster.wait_for("cluster_state:fail on the others", || {
        cluster
            .cluster_info(watcher)
            .is_some_and(|i| i.contains("cluster_state:fail"))
    });
    cluster.sigcont(victim);
    cluster.sigcont(its_replica);
    cluster.wait_for("cluster_state:ok again", || {
        [watcher, victim, its_replica]
            .iter()
            .all(|&p| cluster.state_ok(p))
    });
}
