//! A real local Redis Cluster for one test: 6 `redis-server` processes (3 masters + 3
//! replicas) on free loopback TCP ports, each in its own temporary directory, joined with
//! `redis-cli --cluster create … --cluster-replicas 1 --cluster-yes`. `start` returns once every
//! node reports `cluster_state:ok`, every master serves slots and every master has a replica
//! whose link is up. Nodes can be killed (SIGKILL), frozen (SIGSTOP) and thawed (SIGCONT);
//! slots can be moved with their keys (`reshard`, the steps `redis-cli --cluster reshard`
//! takes). Dropping it kills every process. Without `redis-server` / `redis-cli` installed the
//! test panics: it never skips silently.
//!
//! Node commands go over a sync `redis::Connection` per call (with timeouts, so a frozen node
//! answers an error instead of hanging the test); the cluster's layout is read from
//! `CLUSTER NODES`.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Masters, each with one replica.
pub const MASTERS: usize = 3;
pub const NODES: usize = 2 * MASTERS;
pub const SLOTS: u16 = 16384;

/// How long a node gets to answer PING after starting.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the cluster gets to settle (create, failover, slot moves).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connect/read/write timeout of one node command.
const NODE_TIMEOUT: Duration = Duration::from_millis(1500);

/// The cluster bus of a node listens on its port + 10000.
const BUS_OFFSET: u16 = 10000;
/// Node ports are taken from below the ephemeral range (32768..) so that neither a node port
/// nor its bus port (port + 10000) collides with the ports the OS hands out to other tests.
const PORT_RANGE: std::ops::Range<u16> = 12000..22000;

/// What `CLUSTER NODES` says about one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    pub port: u16,
    pub flags: Vec<String>,
    /// The master's node id, for a replica.
    pub master_id: Option<String>,
    /// Slot ranges served (inclusive), for a master.
    pub slots: Vec<(u16, u16)>,
}

impl NodeInfo {
    pub fn is_master(&self) -> bool {
        self.flags.iter().any(|f| f == "master")
    }

    pub fn is_failed(&self) -> bool {
        self.flags.iter().any(|f| f == "fail" || f == "fail?")
    }

    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
    }

    /// A live master with slots.
    pub fn serves_slots(&self) -> bool {
        self.is_master() && !self.is_failed() && !self.slots.is_empty()
    }

    pub fn slot_count(&self) -> usize {
        self.slots
            .iter()
            .map(|&(a, b)| usize::from(b - a) + 1)
            .sum()
    }
}

/// One master as `masters` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Master {
    pub port: u16,
    pub id: String,
    pub slots: Vec<(u16, u16)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Stopped,
    Killed,
}

struct Node {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    state: State,
}

impl Node {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }
}

pub struct RedisCluster {
    nodes: Vec<Node>,
    /// `CLUSTER NODES` once the cluster was whole at start.
    start_layout: Vec<NodeInfo>,
}

impl RedisCluster {
    /// Starts 6 nodes, creates the cluster and waits until it is whole (see the module doc).
    pub fn start() -> Self {
        let mut cluster = Self {
            nodes: Vec::new(),
            start_layout: Vec::new(),
        };
        let mut taken = BTreeSet::new();
        for _ in 0..NODES {
            let node = start_node(&mut taken);
            cluster.nodes.push(node);
        }
        cluster.create();
        cluster.wait_whole();
        cluster.start_layout = cluster.nodes();
        cluster
    }

    fn create(&self) {
        let mut cmd = Command::new("redis-cli");
        cmd.arg("--cluster").arg("create");
        for n in &self.nodes {
            cmd.arg(format!("127.0.0.1:{}", n.port));
        }
        cmd.args(["--cluster-replicas", "1", "--cluster-yes"]);
        let out = match cmd.stdin(Stdio::null()).output() {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-cli is not installed (not found on PATH); the cluster tests need it: \
                 install redis-server (e.g. `apt-get install redis-server`, which brings redis-tools)"
            ),
            Err(e) => panic!("cannot run redis-cli --cluster create: {e}"),
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("All 16384 slots covered"),
            "redis-cli --cluster create failed ({}):\n{stdout}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
    }

    /// Waits until every running node says `cluster_state:ok`, 3 masters serve all slots and
    /// each has a replica with its link up.
    fn wait_whole(&self) {
        self.wait_for(
            "the cluster to be whole (3 masters, each with a replica)",
            || {
                if !self.running_ports().iter().all(|&p| self.state_ok(p)) {
                    return false;
                }
                let Some(nodes) = self.try_nodes() else {
                    return false;
                };
                let (masters, covered) = serving_masters(&nodes);
                masters.len() == MASTERS
                    && covered == usize::from(SLOTS)
                    && masters.iter().all(|m| {
                        nodes.iter().any(|r| {
                            r.master_id.as_deref() == Some(m.id.as_str())
                                && !r.is_failed()
                                && self.replica_link_up(r.port)
                        })
                    })
            },
        );
        // A link that is up may still be finishing its first sync: each master must have a
        // write of its own acknowledged by its replica (`WAIT 1`), as `store.wait_replicas`
        // will ask of it.
        for m in self.masters() {
            self.wait_for(
                &format!(
                    "master {} to have a write acknowledged by a replica",
                    m.port
                ),
                || self.replica_acknowledges(m.port),
            );
        }
    }

    /// `SET` of a key in one of the master's own slots, then `WAIT 1` on the same connection.
    fn replica_acknowledges(&self, port: u16) -> bool {
        let Some(master) = self.masters().into_iter().find(|m| m.port == port) else {
            return false;
        };
        let Some(key) = (0..100_000)
            .map(|i| format!("{{harness-sync-{i}}}"))
            .find(|k| {
                let slot = key_slot(k);
                master.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
            })
        else {
            return false;
        };
        let Ok(mut conn) = self.connect(port) else {
            return false;
        };
        let written: redis::RedisResult<()> = redis::cmd("SET").arg(&key).arg(1).query(&mut conn);
        let acked: redis::RedisResult<i64> = redis::cmd("WAIT").arg(1).arg(1000).query(&mut conn);
        written.is_ok() && acked.is_ok_and(|n| n >= 1)
    }

    // ---- addresses -------------------------------------------------------------------------

    /// Every node's port, in start order.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    fn running_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.state == State::Running)
            .map(|n| n.port)
            .collect()
    }

    /// `redis://127.0.0.1:p1,redis://127.0.0.1:p2,redis://127.0.0.1:p3`: the masters at start
    /// (the first three nodes) as a comma-separated seed list.
    pub fn seed_url(&self) -> String {
        self.seed_url_of(&self.ports()[..MASTERS])
    }

    /// A comma-separated seed list of the given ports.
    pub fn seed_url_of(&self, ports: &[u16]) -> String {
        ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    // ---- layout ----------------------------------------------------------------------------

    /// `CLUSTER NODES` as seen by the first running node that answers; panics when none does.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        self.try_nodes()
            .unwrap_or_else(|| panic!("no running node answers CLUSTER NODES\n{}", self.logs()))
    }

    fn try_nodes(&self) -> Option<Vec<NodeInfo>> {
        self.running_ports()
            .into_iter()
            .find_map(|p| self.try_nodes_from(p))
    }

    fn try_nodes_from(&self, port: u16) -> Option<Vec<NodeInfo>> {
        let text: String = self
            .try_cmd(port, redis::cmd("CLUSTER").arg("NODES"))
            .ok()?;
        Some(parse_nodes(&text))
    }

    /// The masters serving slots (not failed), by port.
    pub fn masters(&self) -> Vec<Master> {
        let mut masters: Vec<Master> = self
            .nodes()
            .into_iter()
            .filter(NodeInfo::serves_slots)
            .map(|n| Master {
                port: n.port,
                id: n.id,
                slots: n.slots,
            })
            .collect();
        masters.sort_by_key(|m| m.port);
        masters
    }

    /// The node id of the node on `port`.
    pub fn node_id(&self, port: u16) -> String {
        let text: String = self.cmd(port, redis::cmd("CLUSTER").arg("MYID"));
        text.trim().to_string()
    }

    /// The port of the master serving `slot`.
    pub fn master_of_slot(&self, slot: u16) -> u16 {
        self.masters()
            .into_iter()
            .find(|m| m.slots.iter().any(|&(a, b)| a <= slot && slot <= b))
            .map(|m| m.port)
            .unwrap_or_else(|| panic!("no master serves slot {slot}: {:?}", self.nodes()))
    }

    /// The port of the master serving `key`'s slot.
    pub fn master_of_key(&self, key: &str) -> u16 {
        self.master_of_slot(key_slot(key))
    }

    /// The ports of the replicas of the master on `port`.
    pub fn replicas_of(&self, port: u16) -> Vec<u16> {
        let nodes = self.nodes();
        let id = nodes
            .iter()
            .find(|n| n.port == port)
            .map(|n| n.id.clone())
            .unwrap_or_else(|| panic!("no node on port {port}: {nodes:?}"));
        nodes
            .iter()
            .filter(|n| n.master_id.as_deref() == Some(id.as_str()))
            .map(|n| n.port)
            .collect()
    }

    // ---- commands --------------------------------------------------------------------------

    /// Runs one command on the node on `port`; panics with the error.
    pub fn cmd<T: redis::FromRedisValue>(&self, port: u16, cmd: &redis::Cmd) -> T {
        self.try_cmd(port, cmd)
            .unwrap_or_else(|e| panic!("{cmd:?} on 127.0.0.1:{port}: {e}"))
    }

    pub fn try_cmd<T: redis::FromRedisValue>(
        &self,
        port: u16,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        let mut conn = self.connect(port)?;
        cmd.query(&mut conn)
    }

    /// A sync connection to one node, with timeouts.
    pub fn connect(&self, port: u16) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
        let conn = client.get_connection_with_timeout(NODE_TIMEOUT)?;
        conn.set_read_timeout(Some(NODE_TIMEOUT))?;
        conn.set_write_timeout(Some(NODE_TIMEOUT))?;
        Ok(conn)
    }

    /// Runs a single-key command on the master that serves `key` (a direct read of the store
    /// behind the gateway).
    pub fn cmd_on_key<T: redis::FromRedisValue>(&self, key: &str, cmd: &redis::Cmd) -> T {
        self.cmd(self.master_of_key(key), cmd)
    }

    /// `redis-cli -c -p <port> args…` (follows redirects); answers its stdout, trimmed.
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-c", "-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli: {e}"));
        assert!(
            out.status.success(),
            "redis-cli -c -p {port} {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `CLUSTER INFO`'s `cluster_state` of the node on `port` is `ok`.
    pub fn state_ok(&self, port: u16) -> bool {
        self.cluster_info(port)
            .is_some_and(|info| info.contains("cluster_state:ok"))
    }

    pub fn cluster_info(&self, port: u16) -> Option<String> {
        self.try_cmd(port, redis::cmd("CLUSTER").arg("INFO")).ok()
    }

    fn replica_link_up(&self, port: u16) -> bool {
        self.try_cmd::<String>(port, redis::cmd("INFO").arg("replication"))
            .is_ok_and(|info| info.contains("role:slave") && info.contains("master_link_status:up"))
    }

    // ---- faults ----------------------------------------------------------------------------

    fn node_mut(&mut self, port: u16) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    /// SIGKILL of the node on `port` (no shutdown, nothing flushed); it stays dead.
    pub fn sigkill(&mut self, port: u16) {
        let node = self.node_mut(port);
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        node.state = State::Killed;
    }

    /// Starts a killed node again on its port and directory (its `nodes.conf` and AOF): it
    /// rejoins the cluster — a master whose replica took over comes back as that replica's
    /// replica — and this waits until it is a replica with its link to the master up.
    pub fn restart(&mut self, port: u16) {
        let node = self.node_mut(port);
        assert_eq!(
            node.state,
            State::Killed,
            "restart of a node that is not killed"
        );
        let child = spawn_node(port, node.dir.path())
            .unwrap_or_else(|log| panic!("redis-server on {port} did not start again:\n{log}"));
        node.child = Some(child);
        node.state = State::Running;
        self.wait_for(&format!("127.0.0.1:{port} to rejoin as a replica"), || {
            self.replica_link_up(port) && self.state_ok(port)
        });
    }

    /// SIGSTOP of the node on `port`: connections stay open, nothing is answered, its peers
    /// stop hearing from it (after `cluster-node-timeout` it is flagged as failing).
    pub fn sigstop(&mut self, port: u16) {
        signal(self.node_mut(port), "-STOP");
        self.node_mut(port).state = State::Stopped;
    }

    /// SIGCONT of a node frozen with `sigstop`.
    pub fn sigcont(&mut self, port: u16) {
        signal(self.node_mut(port), "-CONT");
        self.node_mut(port).state = State::Running;
    }

    /// Waits until a replica of the (killed or frozen) master `old_master_port` serves its
    /// slots, every slot is served by a master that is not failing, and every running node
    /// says `cluster_state:ok`. Answers the new master's port.
    pub fn wait_failover(&self, old_master_port: u16) -> u16 {
        let old_id = self
            .start_layout
            .iter()
            .find(|n| n.port == old_master_port)
            .map(|n| n.id.clone())
            .unwrap_or_else(|| panic!("no node on port {old_master_port}"));
        let replicas: Vec<u16> = self
            .start_layout
            .iter()
            .filter(|n| n.master_id.as_deref() == Some(old_id.as_str()))
            .map(|n| n.port)
            .collect();
        let mut promoted = None;
        self.wait_for(
            &format!("a replica ({replicas:?}) of 127.0.0.1:{old_master_port} to take over"),
            || {
                let Some(nodes) = self.try_nodes() else {
                    return false;
                };
                let (masters, covered) = serving_masters(&nodes);
                promoted = masters
                    .iter()
                    .find(|m| replicas.contains(&m.port))
                    .map(|m| m.port);
                covered == usize::from(SLOTS)
                    && promoted.is_some()
                    && masters.iter().all(|m| m.port != old_master_port)
                    && self.running_ports().iter().all(|&p| self.state_ok(p))
            },
        );
        promoted.expect("a promoted replica")
    }

    // ---- slot moves ------------------------------------------------------------------------

    /// Moves `slots` with their keys from the master on `from_port` to the master on `to_port`,
    /// the way `redis-cli --cluster reshard` does: `SETSLOT IMPORTING` on the target,
    /// `SETSLOT MIGRATING` on the source, `GETKEYSINSLOT` + `MIGRATE … KEYS` until the slot is
    /// empty on the source, then `SETSLOT NODE` on the target, the source and every other
    /// master. Requests meanwhile get `ASK` / `TRYAGAIN` redirects, then `MOVED`.
    pub fn reshard(&self, from_port: u16, to_port: u16, slots: &[u16]) {
        let from_id = self.node_id(from_port);
        let to_id = self.node_id(to_port);
        for &slot in slots {
            let owner = self.master_of_slot(slot);
            assert_eq!(
                owner, from_port,
                "slot {slot} is served by {owner}, not by {from_port}"
            );
            let _: () = self.cmd(
                to_port,
                redis::cmd("CLUSTER")
                    .arg("SETSLOT")
                    .arg(slot)
                    .arg("IMPORTING")
                    .arg(&from_id),
            );
            let _: () = self.cmd(
                from_port,
                redis::cmd("CLUSTER")
                    .arg("SETSLOT")
                    .arg(slot)
                    .arg("MIGRATING")
                    .arg(&to_id),
            );
            loop {
                let keys: Vec<String> = self.cmd(
                    from_port,
                    redis::cmd("CLUSTER")
                        .arg("GETKEYSINSLOT")
                        .arg(slot)
                        .arg(100),
                );
                if keys.is_empty() {
                    break;
                }
                let mut migrate = redis::cmd("MIGRATE");
                migrate
                    .arg("127.0.0.1")
                    .arg(to_port)
                    .arg("")
                    .arg(0)
                    .arg(5000)
                    .arg("KEYS")
                    .arg(&keys);
                let answer: String = self.cmd(from_port, &migrate);
                assert!(
                    answer == "OK" || answer == "NOKEY",
                    "MIGRATE of slot {slot}: {answer}"
                );
            }
            // The target first (it answers for the slot from now on), then the source (it
            // answers MOVED), then everyone else.
            let node = |port: u16| {
                let _: () = self.cmd(
                    port,
                    redis::cmd("CLUSTER")
                        .arg("SETSLOT")
                        .arg(slot)
                        .arg("NODE")
                        .arg(&to_id),
                );
            };
            node(to_port);
            node(from_port);
            for m in self.masters() {
                if m.port != to_port && m.port != from_port {
                    node(m.port);
                }
            }
        }
        self.wait_for(
            &format!("every node to see slots {slots:?} on 127.0.0.1:{to_port}"),
            || {
                self.running_ports().iter().all(|&p| {
                    self.try_nodes_from(p).is_some_and(|nodes| {
                        slots.iter().all(|&s| {
                            nodes
                                .iter()
                                .any(|n| n.port == to_port && n.is_master() && n.serves(s))
                        })
                    }) && self.state_ok(p)
                })
            },
        );
    }

    // ---- waiting ---------------------------------------------------------------------------

    /// Polls `ok` every 50 ms until it holds; panics with the nodes' state and logs after
    /// `SETTLE_TIMEOUT`.
    pub fn wait_for(&self, what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            if ok() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "waited {SETTLE_TIMEOUT:?} for {what}; CLUSTER NODES: {:?}\n{}",
                    self.try_nodes(),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of every node's log.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let log = n.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            out.push_str(&format!(
                "--- 127.0.0.1:{} ({:?}) redis.log tail:\n{}\n",
                n.port,
                n.state,
                tail.join("\n")
            ));
        }
        out
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut child) = n.child.take() {
                // SIGKILL also ends a frozen process.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn signal(node: &Node, signal: &str) {
    let Some(child) = &node.child else {
        panic!("redis-server on {} is not running", node.port);
    };
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap_or_else(|e| panic!("cannot run kill {signal}: {e}"));
    assert!(status.success(), "kill {signal} {} failed", child.id());
}

/// A port in `PORT_RANGE` whose bus port (+10000) is free too, not in `taken`.
fn pick_port(taken: &BTreeSet<u16>) -> u16 {
    let span = PORT_RANGE.end - PORT_RANGE.start;
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut x = (u64::from(std::process::id()) << 32 | call.wrapping_mul(0x9E37_79B9))
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    for _ in 0..1000 {
        // xorshift
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = PORT_RANGE.start + (x % u64::from(span)) as u16;
        if taken.contains(&port) || taken.contains(&(port + BUS_OFFSET)) {
            continue;
        }
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + BUS_OFFSET) {
            return port;
        }
    }
    panic!("no free port pair (p, p + {BUS_OFFSET}) in {PORT_RANGE:?}");
}

/// Starts one cluster-enabled node on a free port pair (retrying on another pair when the one
/// picked was taken meanwhile) and waits until it answers PING.
fn start_node(taken: &mut BTreeSet<u16>) -> Node {
    let mut last_log = String::new();
    for _ in 0..5 {
        let port = pick_port(taken);
        let dir = tempfile::Builder::new()
            .prefix("cg-cluster-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory for redis: {e}"));
        match spawn_node(port, dir.path()) {
            Ok(child) => {
                taken.insert(port);
                taken.insert(port + BUS_OFFSET);
                return Node {
                    port,
                    dir,
                    child: Some(child),
                    state: State::Running,
                };
            }
            Err(log) => last_log = log,
        }
    }
    panic!("a cluster node did not start on 5 port pairs; last log:\n{last_log}");
}

/// Runs `redis-server` for one cluster node on `port` with its data (`nodes.conf`, AOF) in
/// `dir` and waits until it answers PING; the log when it does not.
fn spawn_node(port: u16, dir: &std::path::Path) -> Result<Child, String> {
    let log = dir.join("redis.log");
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--protected-mode", "no"])
        .args(["--cluster-enabled", "yes"])
        .args(["--cluster-config-file", "nodes.conf"])
        .args(["--cluster-node-timeout", "1000"])
        // Durable like the single-node tests (and /readyz insists on appendonly yes).
        .args([
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
        ])
        .args(["--maxmemory-policy", "noeviction"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(&log)
        .args(["--daemonize", "no"]);
    let mut child = super::redis_server::spawn_redis_server(&mut cmd);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if ping(port) {
            return Ok(child);
        }
        if matches!(child.try_wait(), Ok(Some(_))) || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::fs::read_to_string(&log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn ping(port: u16) -> bool {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else {
        return false;
    };
    let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(300)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_millis(300)));
    redis::cmd("PING")
        .query::<String>(&mut conn)
        .is_ok_and(|p| p == "PONG")
}

/// `CLUSTER NODES` text → one entry per line.
pub fn parse_nodes(text: &str) -> Vec<NodeInfo> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            assert!(f.len() >= 8, "bad CLUSTER NODES line {line:?}");
            // ip:port@cport[,hostname]
            let port = f[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            let flags: Vec<String> = f[2]
                .split(',')
                .map(|s| s.trim_start_matches("myself").to_string())
                .map(|s| if s.is_empty() { "myself".into() } else { s })
                .collect();
            let master_id = (f[3] != "-").then(|| f[3].to_string());
            let slots = f[8..]
                .iter()
                // Importing/migrating markers look like [slot-<-id] / [slot->-id].
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => {
                        let n = s.parse().ok()?;
                        Some((n, n))
                    }
                })
                .collect();
            NodeInfo {
                id: f[0].to_string(),
                port,
                flags,
                master_id,
                slots,
            }
        })
        .collect()
}

/// The live masters with slots among `nodes`, and how many slots they serve together.
fn serving_masters(nodes: &[NodeInfo]) -> (Vec<&NodeInfo>, usize) {
    let masters: Vec<&NodeInfo> = nodes.iter().filter(|n| n.serves_slots()).collect();
    let covered = masters.iter().map(|m| m.slot_count()).sum();
    (masters, covered)
}

/// The cluster slot of `key`: CRC16 (XMODEM) of its hash tag — the part between the first
/// `{` and the next `}` when that is not empty — or of the whole key, mod 16384.
pub fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = match bytes.iter().position(|&b| b == b'{') {
        Some(open) => match bytes[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    crc16(hashed) % SLOTS
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}
