//! What usage history costs Redis per billed request: runs the credit reservation's
//! `MULTI/EXEC` as the ledger sends it, without and with its usage entry (`ZREMRANGEBYSCORE`,
//! `ZADD`, `PEXPIRE` and the charge's member in the reservation hash), N times each against a
//! fresh `redis-server`, and prints the server's time per transaction (`INFO commandstats`, the
//! `EXEC` row), the commands' own rows and the client's round trip. `cargo run --release --example usage_cost -- [N]` (README "Performance").

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use creditgate::ledger::{ChargeMeta, UsageEntry, UsageUnit};

fn start_redis(port: u16) -> Child {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server on PATH");
    std::thread::sleep(Duration::from_millis(300));
    child
}

fn reservation(i: u64, with_usage: bool, now: i64) -> redis::Pipeline {
    let account = "acct-cost";
    let rid = format!("req_{i:016}");
    let bal = format!("cg:{{a:{account}}}:bal:p1");
    let rsv = format!("cg:{{a:{account}}}:rsv:{rid}");
    let usage = format!("cg:{{a:{account}}}:usage");
    let meta = ChargeMeta {
        operation: "relight".into(),
        model: "nano-banana-2".into(),
        quantity: 2,
        unit_amount: 2,
        catalog_version: 1,
        created_ms: now + i64::try_from(i).unwrap_or(0),
    };
    let member = UsageEntry::charge(&rid, &meta, UsageUnit::Credits, 4, "p1").member();
    let mut p = redis::pipe();
    p.atomic();
    p.cmd("SET")
        .arg(&bal)
        .arg(1_000_000_000i64)
        .arg("NX")
        .ignore();
    p.cmd("DECRBY").arg(&bal).arg(4);
    let mut fields = vec![
        ("kind", "credits".to_string()),
        ("bucket", "p1".into()),
        ("amount", "4".into()),
    ];
    if with_usage {
        fields.push(("usage", member.clone()));
    }
    p.cmd("HSET").arg(&rsv).arg(&fields).ignore();
    p.cmd("PEXPIRE").arg(&rsv).arg(3_600_000).ignore();
    p.cmd("ZADD")
        .arg(format!("cg:{{a:{account}}}:holds"))
        .arg(now + 180_000)
        .arg(&rid)
        .ignore();
    p.cmd("SADD").arg("cg:lease:1").arg(account).ignore();
    p.cmd("ZADD").arg("cg:lease:due").arg(1).arg(1).ignore();
    if with_usage {
        p.cmd("ZREMRANGEBYSCORE")
            .arg(&usage)
            .arg("-inf")
            .arg(format!("({}", now - 90 * 86_400_000))
            .ignore();
        p.cmd("ZADD")
            .arg(&usage)
            .arg(meta.created_ms)
            .arg(&member)
            .ignore();
        p.cmd("PEXPIRE")
            .arg(&usage)
            .arg(90i64 * 86_400_000)
            .ignore();
    }
    p
}

/// `usec` of `EXEC` in `INFO commandstats`: the server time of the whole transaction (the
/// commands inside it are counted again under their own names).
fn exec_usec(stats: &str) -> u64 {
    stats
        .lines()
        .find(|l| l.starts_with("cmdstat_exec:"))
        .and_then(|l| l.split("usec=").nth(1))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    let port = 16_379;
    let mut server = start_redis(port);
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let now = 1_793_491_200_000i64;
    for with_usage in [false, true, false, true] {
        let _: () = redis::cmd("FLUSHALL")
            .query_async(&mut conn)
            .await
            .expect("flush");
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut conn)
            .await
            .expect("reset");
        let started = Instant::now();
        for i in 0..n {
            let _: (i64,) = reservation(i, with_usage, now)
                .query_async(&mut conn)
                .await
                .expect("tx");
        }
        let wall = started.elapsed();
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .expect("info");
        let memory: String = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg("cg:{a:acct-cost}:usage")
            .query_async::<Option<i64>>(&mut conn)
            .await
            .ok()
            .flatten()
            .map_or("-".into(), |b| {
                format!("{:.0} B/entry", b as f64 / n as f64)
            });
        for line in stats.lines().filter(|l| {
            ["zadd", "zremrangebyscore", "pexpire", "hset", "exec"]
                .iter()
                .any(|c| l.starts_with(&format!("cmdstat_{c}:")))
        }) {
            println!("    {line}");
        }
        println!(
            "usage entry {:5}: server {:.2} µs/tx (EXEC), round trip {:.1} µs/tx, history {}",
            with_usage,
            exec_usec(&stats) as f64 / n as f64,
            wall.as_micros() as f64 / n as f64,
            memory,
        );
    }
    let _ = server.kill();
    let _ = server.wait();
}
