#!/usr/bin/env bash
# Load benchmark: creditgate against two baselines on the same machine, same Pingora version,
# same thread count, same fast local upstream (examples/demo_backend.rs), driven by wrk with the
# same connections, threads and duration:
#   - a bare Pingora passthrough (examples/bare_proxy.rs);
#   - the same passthrough plus exactly one Redis transaction per request, of the shape of the
#     credit reservation, on the same Redis (examples/bare_tx_proxy.rs, "bare + 1 tx").
# The headline figures are creditgate's ratios to "bare + 1 tx" (req/s, CPU per request, p99):
# what the gateway costs beyond Pingora and the one round trip that exact billing needs.
#
#   bash scripts/load.sh
#
# One run builds the release binaries, starts its own redis-server (unix socket, appendonly yes,
# no RDB), the upstream(s), the bare proxy and creditgate (config and rules in a temp dir; the
# plans' requests_per_minute raised so rate limits do not interfere), creates accounts and keys
# through the admin API, and prints:
#
#   1. throughput: requests/s, p50, p99, proxy CPU seconds per 1000 requests (utime+stime from
#      /proc/<pid>/stat), Redis CPU per 1000 requests, and the ratios to the bare passthrough,
#      and to "bare + 1 tx", each case run ROUNDS times interleaved with the others (medians
#      reported); the transactions "bare + 1 tx" applied (its balance key read before and after
#      each measured run) against the upstream requests of the same runs; rejected
#      requests (402, 401) must leave the upstream's request count unchanged; and the latency
#      the gateway adds to a billed request at light load (LIGHT_CONNS connections), over bare
#      and over bare + 1 tx;
#   2. memory per in-flight request: RSS before and during INFLIGHT concurrent connections held
#      open by a slow upstream (SLOW_MS per response), bare and creditgate;
#   3. a streamed upload (UPLOAD_MB, application/octet-stream) through both, with peak RSS.
#
#   4. the Redis Cluster case (CLUSTER=1, the default): a local cluster of 3 masters + 3
#      replicas (6 redis-servers on loopback ports, appendonly yes), creditgate on it with
#      `store.cluster = true` — once as is, once with `store.wait_replicas = 1` — in the same
#      rounds as the single-node cases, reported against the single-node creditgate (b).
#
#   QUICK=1: only the throughput of (a), (a1), (b) and (c), no cluster — for iterating on the
#   request path (`ROUNDS=3 QUICK=1 bash scripts/load.sh`: about two minutes).
#
# Everything it starts is stopped and its temp dir removed on exit (also on Ctrl-C).
# Knobs (environment): THREADS=2 CONNS=32 WRK_THREADS=1 DURATION=10 WARMUP=2 ROUNDS=3
# LIGHT_CONNS=1 INFLIGHT=2000 SLOW_MS=5000 UPLOAD_MB=50 CLUSTER=1 QUICK=0.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

THREADS=${THREADS:-2}
CONNS=${CONNS:-32}
WRK_THREADS=${WRK_THREADS:-1}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
ROUNDS=${ROUNDS:-3}
LIGHT_CONNS=${LIGHT_CONNS:-1}
INFLIGHT=${INFLIGHT:-2000}
SLOW_MS=${SLOW_MS:-5000}
UPLOAD_MB=${UPLOAD_MB:-50}
QUICK=${QUICK:-0}
CLUSTER=${CLUSTER:-1}
[ "$QUICK" = 1 ] && CLUSTER=0
LUA=$PWD/scripts/load_wrk.lua

cargo build --release --bin creditgate --example bare_proxy --example bare_tx_proxy \
  --example demo_backend
BIN=${CARGO_TARGET_DIR:-target}/release
[ -x "$BIN/creditgate" ] || { echo "load: $BIN/creditgate not found" >&2; exit 1; }

# Thousands of sockets per process for the in-flight test.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

work=$(mktemp -d /tmp/creditgate-load.XXXXXX)
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------- helpers
used_ports=" "
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 10000))
    case "$used_ports" in *" $p "*) continue ;; esac
    if ! ss -Htln "sport = :$p" | grep -q .; then
      used_ports="$used_ports$p "
      echo "$p"
      return
    fi
  done
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  local i
  for i in $(seq 1 200); do port_open "$1" && return 0; sleep 0.05; done
  echo "load: nothing listens on port $1; logs in $work:" >&2
  tail -n 20 "$work"/*.log >&2 || true
  exit 1
}
# utime+stime of a process (all threads), in clock ticks.
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
rss_kib() { awk '/^VmRSS/{print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM/{print $2}' "/proc/$1/status"; }
TICKS=$(getconf CLK_TCK)
# CPU of the Redis processes serving the case being measured (REDIS_PIDS: the single node's, or
# the cluster's six).
redis_ticks() { local p t=0; for p in $REDIS_PIDS; do t=$((t + $(cpu_ticks "$p"))); done; echo "$t"; }

# The demo backend numbers its answers `job_<n>` with n = requests seen so far (this one
# included): the upstream's request count, read without touching the gateway.
upstream_seen() {
  curl -fsS "http://127.0.0.1:$1/count" | sed -n 's/.*"id":"job_\([0-9]*\)".*/\1/p'
}

start_backend() { # name port [delay ms]
  "$BIN/examples/demo_backend" "127.0.0.1:$2" "${3:-0}" >"$work/$1.log" 2>&1 &
  pids+=($!)
  wait_port "$2"
}

start_bare() { # name port upstream-port; sets LAST_PID
  "$BIN/examples/bare_proxy" "127.0.0.1:$2" "127.0.0.1:$3" "$THREADS" >"$work/$1.log" 2>&1 &
  LAST_PID=$!
  pids+=("$LAST_PID")
  wait_port "$2"
}

start_bare_tx() { # name port upstream-port; sets LAST_PID (Redis: the script's own, below)
  "$BIN/examples/bare_tx_proxy" "127.0.0.1:$2" "127.0.0.1:$3" "redis+unix://$work/redis.sock" \
    "$THREADS" >"$work/$1.log" 2>&1 &
  LAST_PID=$!
  pids+=("$LAST_PID")
  wait_port "$2"
}
# The balance key examples/bare_tx_proxy.rs decrements by BARE_TX_AMOUNT per request (as the
# example's BALANCE and AMOUNT say) and seeds at 2^62 on first use.
BARE_TX_BALANCE='bare:{a:load}:bal:period'
BARE_TX_AMOUNT=8
bare_tx_balance() { redis-cli -s "$work/redis.sock" GET "$BARE_TX_BALANCE"; }

start_gateway() { # name port admin-port metrics-port upstream-port [store toml]; sets LAST_PID
  local store="${6:-url = \"redis+unix://$work/redis.sock\"}"
  cat >"$work/$1.toml" <<TOML
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"
metrics_listen = "127.0.0.1:$4"
threads = $THREADS
shutdown_grace_s = 1
[upstream]
address = "127.0.0.1:$5"
[store]
$(printf '%b' "$store")
[rules]
dir = "$work/rules"
watch = false
TOML
  RUST_LOG=warn "$BIN/creditgate" serve --config "$work/$1.toml" >"$work/$1.log" 2>&1 &
  LAST_PID=$!
  pids+=("$LAST_PID")
  local i
  for i in $(seq 1 200); do
    curl -fsS "http://127.0.0.1:$3/readyz" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "load: creditgate $1 did not become ready:" >&2
  cat "$work/$1.log" >&2
  exit 1
}

# ------------------------------------------------------------------------------------------ setup
export CREDITGATE_ADMIN_TOKEN="load-admin-$RANDOM$RANDOM"

redis-server --port 0 --unixsocket "$work/redis.sock" --unixsocketperm 700 \
  --save "" --appendonly yes --appendfsync everysec --maxmemory-policy noeviction \
  --dir "$work" --daemonize no >"$work/redis.log" 2>&1 &
REDIS_PID=$!
REDIS_PIDS=$REDIS_PID
pids+=("$REDIS_PID")
for _ in $(seq 1 200); do [ -S "$work/redis.sock" ] && break; sleep 0.05; done
[ -S "$work/redis.sock" ] || { cat "$work/redis.log" >&2; exit 1; }

# The shipped rules with every plan's rate limit raised out of the way.
cp -r lua-free-rules "$work/rules"
sed -i -E 's/^(requests_per_minute[[:space:]]*=[[:space:]]*)[1-9][0-9]*/\1100000000/' "$work/rules/plans.toml"

BACKEND=$(free_port)
SLOW=$(free_port)
BARE=$(free_port)
BARE_TX=$(free_port)
BARE_SLOW=$(free_port)
CG=$(free_port) CG_ADMIN=$(free_port) CG_METRICS=$(free_port)
CGS=$(free_port) CGS_ADMIN=$(free_port) CGS_METRICS=$(free_port)

start_backend backend "$BACKEND"
start_bare bare "$BARE" "$BACKEND"
BARE_PID=$LAST_PID
start_bare_tx bare-tx "$BARE_TX" "$BACKEND"
BARE_TX_PID=$LAST_PID
start_gateway creditgate "$CG" "$CG_ADMIN" "$CG_METRICS" "$BACKEND"
CG_PID=$LAST_PID

admin() { # method path [json]
  curl -fsS -X "$1" -H "Authorization: Bearer $CREDITGATE_ADMIN_TOKEN" \
    -H "Content-Type: application/json" "http://127.0.0.1:$CG_ADMIN$2" ${3:+-d "$3"}
}
new_key() { admin POST "/admin/accounts/$1/keys" '{"name":"load"}' | sed -n 's/.*"key":"\([^"]*\)".*/\1/p'; }

admin POST /admin/accounts '{"id":"load-credits","plan":"business","payPerUse":false}' >/dev/null
admin POST /admin/accounts/load-credits/credits '{"amount":100000000,"reason":"load test"}' >/dev/null
admin POST /admin/accounts '{"id":"load-ppu","plan":"pay_per_use","payPerUse":true,"spendingLimitCents":100000000}' >/dev/null
admin POST /admin/accounts '{"id":"load-broke","plan":"pay_per_use","payPerUse":false}' >/dev/null
KEY_CREDITS=$(new_key load-credits)
KEY_PPU=$(new_key load-ppu)
KEY_BROKE=$(new_key load-broke)
KEY_BAD=at_live_UnknownKeyForTheLoadBenchmark0123456789  # well-formed, never issued
for k in "$KEY_CREDITS" "$KEY_PPU" "$KEY_BROKE"; do
  [ -n "$k" ] || { echo "load: could not create API keys" >&2; exit 1; }
done

# ---------------------------------------------------------------------- 4. the Redis Cluster setup
if [ "$CLUSTER" = 1 ]; then
  cluster_ports=()
  CLUSTER_PIDS=""
  for _ in 1 2 3 4 5 6; do
    # A node's cluster bus listens on its port + 10000: both must be free.
    while :; do p=$(free_port); [ "$p" -lt 55000 ] && ! ss -Htln "sport = :$((p + 10000))" | grep -q . && break; done
    mkdir -p "$work/cluster-$p"
    redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes \
      --cluster-config-file "$work/cluster-$p/nodes.conf" --cluster-node-timeout 2000 \
      --save "" --appendonly yes --appendfsync everysec --maxmemory-policy noeviction \
      --dir "$work/cluster-$p" --daemonize no >"$work/cluster-$p.log" 2>&1 &
    pids+=($!)
    CLUSTER_PIDS="$CLUSTER_PIDS $!"
    cluster_ports+=("$p")
  done
  for p in "${cluster_ports[@]}"; do wait_port "$p"; done
  redis-cli --cluster create $(printf '127.0.0.1:%s ' "${cluster_ports[@]}") --cluster-replicas 1 \
    --cluster-yes >"$work/cluster-create.log" 2>&1 || { cat "$work/cluster-create.log" >&2; exit 1; }
  for _ in $(seq 1 200); do
    ok=1
    for p in "${cluster_ports[@]}"; do
      redis-cli -p "$p" cluster info | grep -q '^cluster_state:ok' || ok=0
    done
    [ "$ok" = 1 ] && break
    sleep 0.1
  done
  [ "$ok" = 1 ] || { echo "load: the Redis Cluster did not come up" >&2; tail -n 20 "$work"/cluster-*.log >&2; exit 1; }
  seeds="redis://127.0.0.1:${cluster_ports[0]},redis://127.0.0.1:${cluster_ports[1]},redis://127.0.0.1:${cluster_ports[2]}"
  CGC=$(free_port) CGC_ADMIN=$(free_port) CGC_METRICS=$(free_port)
  CGW=$(free_port) CGW_ADMIN=$(free_port) CGW_METRICS=$(free_port)
  start_gateway creditgate-cluster "$CGC" "$CGC_ADMIN" "$CGC_METRICS" "$BACKEND" \
    "url = \"$seeds\"\ncluster = true"
  CGC_PID=$LAST_PID
  start_gateway creditgate-cluster-wait "$CGW" "$CGW_ADMIN" "$CGW_METRICS" "$BACKEND" \
    "url = \"$seeds\"\ncluster = true\nwait_replicas = 1"
  CGW_PID=$LAST_PID
  cadmin() { # method path [json]
    curl -fsS -X "$1" -H "Authorization: Bearer $CREDITGATE_ADMIN_TOKEN" \
      -H "Content-Type: application/json" "http://127.0.0.1:$CGC_ADMIN$2" ${3:+-d "$3"}
  }
  cadmin POST /admin/accounts '{"id":"load-credits","plan":"business","payPerUse":false}' >/dev/null
  cadmin POST /admin/accounts/load-credits/credits '{"amount":100000000,"reason":"load test"}' >/dev/null
  KEY_CLUSTER=$(cadmin POST /admin/accounts/load-credits/keys '{"name":"load"}' | sed -n 's/.*"key":"\([^"]*\)".*/\1/p')
  [ -n "$KEY_CLUSTER" ] || { echo "load: could not create the cluster API key" >&2; exit 1; }
fi

BODY_CREDITS='{"model":"nano-banana-pro","n":1,"prompt":"a product photo on a marble table, soft window light"}'
BODY_PPU='{"model":"midjourney-v7","n":1,"prompt":"a product photo on a marble table, soft window light"}'
RELIGHT=/api/v1/images/relight
JSON=application/json

echo
echo "load: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)), $(uname -sr)"
echo "load: wrk -t$WRK_THREADS -c$CONNS -d${DURATION}s (after a ${WARMUP}s warm-up); proxies with $THREADS threads"

# ----------------------------------------------------------------------------- 3. streamed upload
# First, while both proxies are fresh: VmHWM (peak RSS over the process's life) is then the upload's.
[ "$QUICK" = 1 ] || head -c $((UPLOAD_MB * 1024 * 1024)) /dev/urandom >"$work/upload.bin"
upload() { # name port pid key
  local name=$1 port=$2 pid=$3 key=$4 before seen code peak sampled
  curl -sS -o /dev/null -X POST -H "Content-Type: $JSON" -H "Authorization: Bearer $key" \
    --data-binary "$BODY_CREDITS" "http://127.0.0.1:$port$RELIGHT" # warm-up
  before=$(rss_kib "$pid")
  seen=$(upstream_seen "$BACKEND")
  curl -sS -o /dev/null -w '%{http_code} %{time_total}\n' -X POST \
    -H 'Content-Type: application/octet-stream' -H 'X-Model: nano-banana-pro' -H 'Expect:' \
    -H "Authorization: Bearer $key" --data-binary "@$work/upload.bin" \
    "http://127.0.0.1:$port$RELIGHT" >"$work/upload.$name" &
  local curl_pid=$! max=0 r
  while kill -0 "$curl_pid" 2>/dev/null; do
    r=$(rss_kib "$pid")
    [ "$r" -gt "$max" ] && max=$r
    sleep 0.01
  done
  wait "$curl_pid"
  peak=$(hwm_kib "$pid")
  read -r code sampled <"$work/upload.$name"
  local recorded
  recorded=$(($(upstream_seen "$BACKEND") - seen - 1))
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$code" "$sampled" "$before" "$max" "$peak" "$recorded" \
    >>"$work/upload.tsv"
}
: >"$work/upload.tsv"
if [ "$QUICK" != 1 ]; then
  upload "bare passthrough" "$BARE" "$BARE_PID" "$KEY_CREDITS"
  upload "creditgate (credits)" "$CG" "$CG_PID" "$KEY_CREDITS"
fi

# ---------------------------------------------------------------------------------- 1. throughput
: >"$work/results.tsv"
run_case() { # label port pid method path key body expect [connections] [results file]
  local label=$1 port=$2 pid=$3 method=$4 path=$5 key=$6 body=$7 expect=$8
  local conns=${9:-$CONNS} results=${10:-$work/results.tsv}
  local url="http://127.0.0.1:$port$path" code
  local req=(-X "$method")
  [ -n "$key" ] && req+=(-H "Authorization: Bearer $key")
  [ -n "$body" ] && req+=(-H "Content-Type: $JSON" --data-binary "$body")
  code=$(curl -sS -o "$work/precheck.out" -w '%{http_code}' "${req[@]}" "$url")
  if [ "$code" != "$expect" ]; then
    echo "load: $label: expected HTTP $expect, got $code:" >&2
    cat "$work/precheck.out" >&2
    exit 1
  fi
  local envs=(LOAD_METHOD="$method" LOAD_BODY="$body" LOAD_KEY="$key" LOAD_CTYPE="${body:+$JSON}")
  env "${envs[@]}" wrk -t"$WRK_THREADS" -c"$conns" -d"${WARMUP}s" -s "$LUA" "$url" >/dev/null
  local up0 cpu0 rcpu0 up1 cpu1 rcpu1 out bal0 bal1
  if [ "$port" = "$BARE_TX" ]; then bal0=$(bare_tx_balance); fi
  up0=$(upstream_seen "$BACKEND")
  cpu0=$(cpu_ticks "$pid")
  rcpu0=$(redis_ticks)
  out=$(env "${envs[@]}" wrk -t"$WRK_THREADS" -c"$conns" -d"${DURATION}s" -s "$LUA" "$url")
  cpu1=$(cpu_ticks "$pid")
  rcpu1=$(redis_ticks)
  sleep 0.2
  up1=$(upstream_seen "$BACKEND")
  if [ "$port" = "$BARE_TX" ]; then
    bal1=$(bare_tx_balance)
    # label transactions-applied upstream-requests (same window: from before up0 to after up1)
    printf '%s\t%s\t%s\n' "$label" $(((bal0 - bal1) / BARE_TX_AMOUNT)) $((up1 - up0 - 1)) \
      >>"$work/tx.tsv"
  fi
  local line
  line=$(grep '^LOAD ' <<<"$out") || { echo "$out" >&2; exit 1; }
  # label requests duration_us p50 p99 non2xx sockerr proxy_ticks redis_ticks upstream
  awk -v label="$label" -v pt=$((cpu1 - cpu0)) -v rt=$((rcpu1 - rcpu0)) -v up=$((up1 - up0 - 1)) '
    { for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", label, v["requests"], v["duration_us"],
        v["p50_us"], v["p99_us"], v["non2xx"], v["socket_errors"], pt, rt, up }' \
    <<<"$line" >>"$results"
  echo "load: done: $label (round $round of $ROUNDS, $conns connections)" >&2
}

# Every case once per round, rounds one after the other, so slow spells of a shared machine
# fall on all cases alike; the report takes the median round of each case.
: >"$work/light.tsv"
: >"$work/tx.tsv"
for round in $(seq 1 "$ROUNDS"); do
  run_case "(a) bare passthrough: POST $RELIGHT" "$BARE" "$BARE_PID" POST "$RELIGHT" "$KEY_CREDITS" "$BODY_CREDITS" 200
  run_case "(a1) bare + 1 Redis tx: POST $RELIGHT" "$BARE_TX" "$BARE_TX_PID" POST "$RELIGHT" "$KEY_CREDITS" "$BODY_CREDITS" 200
  run_case "(b) creditgate: credits, nano-banana-pro" "$CG" "$CG_PID" POST "$RELIGHT" "$KEY_CREDITS" "$BODY_CREDITS" 200
  run_case "(c) creditgate: pay-per-use, midjourney-v7" "$CG" "$CG_PID" POST "$RELIGHT" "$KEY_PPU" "$BODY_PPU" 200
  [ "$QUICK" = 1 ] && continue
  run_case "(d) creditgate: GET /api/credits/balance" "$CG" "$CG_PID" GET /api/credits/balance "$KEY_CREDITS" "" 200
  run_case "(e) creditgate: 402 no credits, no pay-per-use" "$CG" "$CG_PID" POST "$RELIGHT" "$KEY_BROKE" "$BODY_CREDITS" 402
  run_case "(e) creditgate: 401 unknown key" "$CG" "$CG_PID" POST "$RELIGHT" "$KEY_BAD" "$BODY_CREDITS" 401
  if [ "$CLUSTER" = 1 ]; then
    REDIS_PIDS=$CLUSTER_PIDS
    run_case "(f) creditgate on Redis Cluster (3+3): credits" "$CGC" "$CGC_PID" POST "$RELIGHT" "$KEY_CLUSTER" "$BODY_CREDITS" 200
    run_case "(g) creditgate on Redis Cluster, wait_replicas = 1: credits" "$CGW" "$CGW_PID" POST "$RELIGHT" "$KEY_CLUSTER" "$BODY_CREDITS" 200
    REDIS_PIDS=$REDIS_PID
  fi
  # Added latency: the same billed request at light load (LIGHT_CONNS connections, so nothing
  # queues for a CPU), where the difference of the latencies is what the gateway adds.
  run_case "bare passthrough" "$BARE" "$BARE_PID" POST "$RELIGHT" "$KEY_CREDITS" "$BODY_CREDITS" 200 "$LIGHT_CONNS" "$work/light.tsv"
  run_case "bare + 1 Redis tx" "$BARE_TX" "$BARE_TX_PID" POST "$RELIGHT" "$KEY_CREDITS" "$BODY_CREDITS" 200 "$LIGHT_CONNS" "$work/light.tsv"
  run_case "creditgate: credits" "$CG" "$CG_PID" POST "$RELIGHT" "$KEY_CREDITS" "$BODY_CREDITS" 200 "$LIGHT_CONNS" "$work/light.tsv"
done

# ------------------------------------------------------------------------ 2. memory per in-flight
if [ "$QUICK" != 1 ]; then
start_backend slow "$SLOW" "$SLOW_MS"
: >"$work/inflight.tsv"
inflight() { # name port pid key log-name
  local name=$1 port=$2 pid=$3 key=$4
  # The first wave of INFLIGHT requests is held for SLOW_MS; wrk stops after it has
  # been answered (two seconds after). Only samples taken while the first wave is still held count.
  local secs=$(((SLOW_MS + 999) / 1000 + 2)) before max_rss=0 max_up=0 max_down=0 r u d
  local start_ms now_ms
  before=$(rss_kib "$pid")
  start_ms=$(date +%s%3N)
  LOAD_METHOD=POST LOAD_BODY="$BODY_CREDITS" LOAD_KEY="$key" LOAD_CTYPE=$JSON \
    wrk -t1 -c"$INFLIGHT" -d"${secs}s" --timeout 30s -s "$LUA" \
    "http://127.0.0.1:$port$RELIGHT" >"$work/inflight.$name.out" 2>&1 &
  local wrk_pid=$!
  while kill -0 "$wrk_pid" 2>/dev/null; do
    now_ms=$(date +%s%3N)
    if [ $((now_ms - start_ms)) -lt $((SLOW_MS - 250)) ]; then
      r=$(rss_kib "$pid")
      u=$(ss -Htn state established "( dport = :$SLOW )" | wc -l)
      d=$(ss -Htn state established "( sport = :$port )" | wc -l)
      [ "$r" -gt "$max_rss" ] && max_rss=$r
      [ "$u" -gt "$max_up" ] && max_up=$u
      [ "$d" -gt "$max_down" ] && max_down=$d
    fi
    sleep 0.25
  done
  wait "$wrk_pid" || true
  local line
  line=$(grep '^LOAD ' "$work/inflight.$name.out") || { cat "$work/inflight.$name.out" >&2; exit 1; }
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$before" "$max_rss" "$max_up" "$max_down" "$line" \
    >>"$work/inflight.tsv"
  case "$line" in
    *"non2xx=0 socket_errors=0"*) ;;
    *)
      echo "load: errors with $INFLIGHT in flight through $name; wrk said:" >&2
      cat "$work/inflight.$name.out" >&2
      echo "load: and the proxy's log ends with:" >&2
      tail -n 5 "$work/$5.log" >&2
      ;;
  esac
  echo "load: done: $INFLIGHT in flight through $name" >&2
}

start_bare bare-slow "$BARE_SLOW" "$SLOW"
BS_PID=$LAST_PID
inflight "bare passthrough" "$BARE_SLOW" "$BS_PID" "$KEY_CREDITS" bare-slow
kill "$BS_PID" 2>/dev/null || true
wait "$BS_PID" 2>/dev/null || true

start_gateway creditgate-slow "$CGS" "$CGS_ADMIN" "$CGS_METRICS" "$SLOW"
CGS_PID=$LAST_PID
# Warm the key cache and the Redis connection without waiting for the slow upstream.
curl -fsS -o /dev/null -H "Authorization: Bearer $KEY_CREDITS" "http://127.0.0.1:$CGS/api/credits/balance"
inflight "creditgate (credits)" "$CGS" "$CGS_PID" "$KEY_CREDITS" creditgate-slow
fi

# ------------------------------------------------------------------------------------- the report
# Per case (in first-seen order): the median round's req/s, p50 and p99 (each its own median),
# CPU per request over all rounds, and totals. mawk has no asort: a small insertion sort.
summarise() { # results file
  awk -F'\t' -v ticks="$TICKS" '
    function median(list,   n, a, i, j, t) {
      n = split(list, a, " ")
      for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
      return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    {
      if (!($1 in seen)) { seen[$1] = 1; order[++cases] = $1 }
      rps[$1] = rps[$1] " " $2 / ($3 / 1e6); p50[$1] = p50[$1] " " $4; p99[$1] = p99[$1] " " $5
      req[$1] += $2; non2xx[$1] += $6; sockerr[$1] += $7; pt[$1] += $8; rt[$1] += $9; up[$1] += $10
      rounds[$1]++
    }
    END {
      for (i = 1; i <= cases; i++) {
        c = order[i]
        printf "%s\t%.0f\t%.0f\t%.0f\t%.4f\t%.4f\t%d\t%d\t%d\t%d\t%d\n", c, median(rps[c]),
          median(p50[c]), median(p99[c]), (pt[c] / ticks) / req[c] * 1000,
          (rt[c] / ticks) / req[c] * 1000, req[c], non2xx[c], sockerr[c], up[c], rounds[c]
      }
    }' "$1"
}

echo
echo "Throughput (wrk -t$WRK_THREADS -c$CONNS -d${DURATION}s per round, median of $ROUNDS rounds; $THREADS proxy threads, $(nproc) CPUs shared by wrk, proxy, upstream and Redis)"
echo
# Ratios to the bare passthrough and to "bare + 1 tx" (the rows labelled (a) and (a1)).
summarise "$work/results.tsv" >"$work/summary.tsv"
awk -F'\t' '
  function ms(us) { return sprintf("%.2f ms", us / 1000) }
  function ratio(a, b) { return (b > 0) ? sprintf("%.2f", a / b) : "" }
  {
    label[NR] = $1; rps[NR] = $2; p50[NR] = $3; p99[NR] = $4; cpu[NR] = $5; rcpu[NR] = $6
    req[NR] = $7; non2xx[NR] = $8; sockerr[NR] = $9; up[NR] = $10
    if ($1 ~ /^\(a\) /) { b = NR }
    if ($1 ~ /^\(a1\) /) { t = NR }
  }
  END {
    print "| case | req/s | p50 | p99 | proxy CPU s / 1k req | Redis CPU s / 1k req | req/s vs bare | CPU vs bare | req/s vs 1 tx | CPU vs 1 tx | CPU+Redis vs 1 tx | p99 vs 1 tx | requests | non-2xx | socket errors | upstream requests |"
    print "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for (i = 1; i <= NR; i++)
      printf "| %s | %.0f | %s | %s | %.4f | %.4f | %s | %s | %s | %s | %s | %s | %d | %d | %d | %d |\n",
        label[i], rps[i], ms(p50[i]), ms(p99[i]), cpu[i], rcpu[i], ratio(rps[i], rps[b]),
        ratio(cpu[i], cpu[b]), ratio(rps[i], rps[t]), ratio(cpu[i], cpu[t]),
        ratio(cpu[i] + rcpu[i], cpu[t] + rcpu[t]), ratio(p99[i], p99[t]), req[i], non2xx[i],
        sockerr[i], up[i]
    for (i = 1; i <= NR; i++) if (label[i] ~ /^\(b\) /) cg = i
    for (i = 1; i <= NR; i++) {
      if (label[i] !~ /^\((f|g)\) /) continue
      if (!shown++) { print ""; print "Redis Cluster against the single-node creditgate (b): req/s, p99" ; print "" }
      printf "- %s: %s× req/s, %s× p99\n", label[i], ratio(rps[i], rps[cg]), ratio(p99[i], p99[cg])
    }
    print ""
    print "Headline: creditgate against bare + 1 Redis tx (against bare in brackets)"
    print ""
    print "| case | req/s | proxy CPU / req | proxy+Redis CPU / req | p99 |"
    print "| --- | ---: | ---: | ---: | ---: |"
    for (i = 1; i <= NR; i++) {
      if (label[i] !~ /^\((b|c)\) /) continue
      printf "| %s | %s× (%s×) | %s× (%s×) | %s× (%s×) | %s× (%s×) |\n", label[i],
        ratio(rps[i], rps[t]), ratio(rps[i], rps[b]), ratio(cpu[i], cpu[t]), ratio(cpu[i], cpu[b]),
        ratio(cpu[i] + rcpu[i], cpu[t] + rcpu[t]), ratio(cpu[i] + rcpu[i], cpu[b] + rcpu[b]),
        ratio(p99[i], p99[t]), ratio(p99[i], p99[b])
    }
  }' "$work/summary.tsv"

# "bare + 1 tx" really did its transaction for every request it proxied: what its balance lost
# in its measured runs against the upstream requests of the same runs (a transaction whose
# client went away before the request was forwarded counts on the left only).
echo
read -r tx_applied tx_upstream < <(awk -F'\t' '{ tx += $2; up += $3 } END { print tx + 0, up + 0 }' "$work/tx.tsv")
echo "load: bare + 1 Redis tx: $tx_applied transactions applied for $tx_upstream upstream requests in its measured runs"
[ "$QUICK" = 1 ] && exit 0

echo
echo "Added latency at light load (wrk -t1 -c$LIGHT_CONNS -d${DURATION}s per round, median of $ROUNDS rounds; billed credits request)"
echo
summarise "$work/light.tsv" | awk -F'\t' '
  function ms(us) { return sprintf("%.3f ms", us / 1000) }
  {
    if (NR == 1) { b50 = $3; b99 = $4 }
    if ($1 ~ /1 Redis tx/) { t50 = $3; t99 = $4; t = NR }
    label[NR] = $1; rps[NR] = $2; p50[NR] = $3; p99[NR] = $4; non2xx[NR] = $8; sockerr[NR] = $9
  }
  END {
    print "| proxy | req/s | p50 | p99 | p50 added | p99 added | p50 added over 1 tx | p99 added over 1 tx | non-2xx | socket errors |"
    print "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    for (i = 1; i <= NR; i++)
      printf "| %s | %.0f | %s | %s | %s | %s | %s | %s | %d | %d |\n", label[i], rps[i],
        ms(p50[i]), ms(p99[i]), (i == 1 ? "" : ms(p50[i] - b50)), (i == 1 ? "" : ms(p99[i] - b99)),
        (t == 0 || i <= t ? "" : ms(p50[i] - t50)), (t == 0 || i <= t ? "" : ms(p99[i] - t99)),
        non2xx[i], sockerr[i]
  }'

echo
echo "Memory per in-flight request ($INFLIGHT connections, upstream answers after ${SLOW_MS} ms)"
echo
awk -F'\t' '
  {
    split($6, f, " "); for (i in f) { split(f[i], kv, "="); v[kv[1]] = kv[2] }
    per = ($4 > 0) ? ($3 - $2) / $4 : 0
    printf "| %s | %d | %d | %d | %d | %.1f | %d | %.2f s | %d | %d |\n", $1, $2, $3, $5, $4, per,
      v["requests"], v["p50_us"] / 1e6, v["non2xx"], v["socket_errors"]
  }
  BEGIN {
    print "| proxy | RSS before (KiB) | peak RSS in flight (KiB) | client conns open | upstream conns in flight | KiB per in-flight request | answered | p50 | non-2xx | socket errors |"
    print "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  }' "$work/inflight.tsv"

echo
echo "Streamed upload (${UPLOAD_MB} MiB, application/octet-stream, model from X-Model)"
echo
awk -F'\t' '
  BEGIN {
    print "| proxy | status | time | RSS before (KiB) | peak RSS sampled (KiB) | VmHWM (KiB) | upstream requests |"
    print "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
  }
  { printf "| %s | %s | %.2f s | %d | %d | %d | %d |\n", $1, $2, $3, $4, $5, $6, $7 }' "$work/upload.tsv"
echo

# Rejected requests must never reach the upstream.
leaked=$(awk -F'\t' '$1 ~ /^\(e\)/ { n += $10 } END { print n + 0 }' "$work/results.tsv")
echo "load: rejected requests (402, 401) that reached the upstream: $leaked"
[ "$leaked" -eq 0 ] || { echo "load: FAILED: rejected requests were proxied" >&2; exit 1; }
[ "$tx_upstream" -gt 0 ] && [ "$tx_applied" -ge "$tx_upstream" ] || {
  echo "load: FAILED: bare + 1 Redis tx proxied requests without their transaction" >&2
  exit 1
}
