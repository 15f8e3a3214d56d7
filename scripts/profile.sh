#!/usr/bin/env bash
# CPU profile of creditgate under load: where a billed request's time goes, for the "flame
# graph top items" of the performance work. Starts its own redis-server (unix socket, appendonly
# yes), the demo upstream and creditgate (release build, debug info), drives one case with wrk
# and samples creditgate with `perf record -g` meanwhile, then prints the top functions by self
# time and by inclusive time (children), and writes folded stacks (and a flame graph SVG when
# `inferno-flamegraph` is on PATH) to OUT.
#
#   bash scripts/profile.sh                 # credits case
#   CASE=ppu bash scripts/profile.sh        # pay-per-use case
#   CASE=bare_tx bash scripts/profile.sh    # the baseline: bare passthrough + 1 Redis tx
#
# MODE=stat: instead of a profile, syscalls, context switches, migrations and CPU per request.
# Knobs: MODE=record|stat CASE=credits|ppu|bare_tx THREADS=2 CONNS=32 DURATION=10 FREQ=999 TOP=40
# OUT=target/profile KEEP=0 (1 keeps the temp dir with perf.data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v perf >/dev/null 2>&1; then
  echo "profile: installing linux-perf" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends linux-perf >/dev/null
fi

CASE=${CASE:-credits}
THREADS=${THREADS:-2}
CONNS=${CONNS:-32}
DURATION=${DURATION:-10}
FREQ=${FREQ:-999}
TOP=${TOP:-40}
OUT=${OUT:-target/profile}
LUA=$PWD/scripts/load_wrk.lua
mkdir -p "$OUT"

cargo build --release --bin creditgate --example bare_tx_proxy --example demo_backend
BIN=${CARGO_TARGET_DIR:-target}/release

work=$(mktemp -d /tmp/creditgate-profile.XXXXXX)
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  [ "${KEEP:-0}" = 1 ] && echo "profile: kept $work" >&2 || rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 10000))
    ss -Htln "sport = :$p" | grep -q . || { echo "$p"; return; }
  done
}
wait_port() {
  local i
  for i in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "profile: nothing listens on port $1" >&2
  tail -n 20 "$work"/*.log >&2 || true
  exit 1
}

redis-server --port 0 --unixsocket "$work/redis.sock" --unixsocketperm 700 \
  --save "" --appendonly yes --appendfsync everysec --maxmemory-policy noeviction \
  --dir "$work" --daemonize no >"$work/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 200); do [ -S "$work/redis.sock" ] && break; sleep 0.05; done

BACKEND=$(free_port)
"$BIN/examples/demo_backend" "127.0.0.1:$BACKEND" 0 >"$work/backend.log" 2>&1 &
pids+=($!)
wait_port "$BACKEND"

BODY_CREDITS='{"model":"nano-banana-pro","n":1,"prompt":"a product photo on a marble table, soft window light"}'
BODY_PPU='{"model":"midjourney-v7","n":1,"prompt":"a product photo on a marble table, soft window light"}'
PORT=$(free_port)
if [ "$CASE" = bare_tx ]; then
  "$BIN/examples/bare_tx_proxy" "127.0.0.1:$PORT" "127.0.0.1:$BACKEND" \
    "redis+unix://$work/redis.sock" "$THREADS" >"$work/proxy.log" 2>&1 &
  PID=$!
  pids+=("$PID")
  wait_port "$PORT"
  KEY=unused
  BODY=$BODY_CREDITS
else
  export CREDITGATE_ADMIN_TOKEN="profile-admin-$RANDOM$RANDOM"
  ADMIN=$(free_port)
  METRICS=$(free_port)
  cp -r lua-free-rules "$work/rules"
  sed -i -E 's/^(requests_per_minute[[:space:]]*=[[:space:]]*)[1-9][0-9]*/\1100000000/' "$work/rules/plans.toml"
  cat >"$work/creditgate.toml" <<TOML
[server]
listen = "127.0.0.1:$PORT"
admin_listen = "127.0.0.1:$ADMIN"
metrics_listen = "127.0.0.1:$METRICS"
threads = $THREADS
[upstream]
address = "127.0.0.1:$BACKEND"
[store]
url = "redis+unix://$work/redis.sock"
[rules]
dir = "$work/rules"
watch = false
TOML
  RUST_LOG=warn "$BIN/creditgate" serve --config "$work/creditgate.toml" >"$work/proxy.log" 2>&1 &
  PID=$!
  pids+=("$PID")
  for _ in $(seq 1 200); do
    curl -fsS "http://127.0.0.1:$ADMIN/readyz" >/dev/null 2>&1 && break
    sleep 0.05
  done
  admin() {
    curl -fsS -X "$1" -H "Authorization: Bearer $CREDITGATE_ADMIN_TOKEN" \
      -H "Content-Type: application/json" "http://127.0.0.1:$ADMIN$2" ${3:+-d "$3"}
  }
  if [ "$CASE" = ppu ]; then
    admin POST /admin/accounts '{"id":"p","plan":"pay_per_use","payPerUse":true,"spendingLimitCents":100000000}' >/dev/null
    BODY=$BODY_PPU
  else
    admin POST /admin/accounts '{"id":"p","plan":"business","payPerUse":false}' >/dev/null
    admin POST /admin/accounts/p/credits '{"amount":100000000,"reason":"profile"}' >/dev/null
    BODY=$BODY_CREDITS
  fi
  KEY=$(admin POST /admin/accounts/p/keys '{"name":"profile"}' | sed -n 's/.*"key":"\([^"]*\)".*/\1/p')
fi

URL="http://127.0.0.1:$PORT/api/v1/images/relight"
code=$(curl -sS -o /dev/null -w '%{http_code}' -X POST -H "Authorization: Bearer $KEY" \
  -H 'Content-Type: application/json' --data-binary "$BODY" "$URL")
[ "$code" = 200 ] || { echo "profile: the request answers $code, not 200" >&2; cat "$work/proxy.log" >&2; exit 1; }

envs=(LOAD_METHOD=POST LOAD_BODY="$BODY" LOAD_KEY="$KEY" LOAD_CTYPE=application/json)
env "${envs[@]}" wrk -t1 -c"$CONNS" -d2s -s "$LUA" "$URL" >/dev/null
env "${envs[@]}" wrk -t1 -c"$CONNS" -d"$((DURATION + 2))s" -s "$LUA" "$URL" >"$work/wrk.out" &
wrk_pid=$!
sleep 1
if [ "${MODE:-record}" = stat ]; then
  # Syscalls, context switches and migrations per request instead of a profile.
  perf stat -e raw_syscalls:sys_enter,context-switches,cpu-migrations,task-clock -p "$PID" \
    -o "$work/stat.txt" -- sleep "$DURATION" >/dev/null 2>&1
  wait "$wrk_pid"
  line=$(grep '^LOAD ' "$work/wrk.out")
  echo "$line"
  rps=$(sed -n 's/.*requests=\([0-9]*\) duration_us=\([0-9]*\).*/\1 \2/p' <<<"$line" | awk '{print $1 / ($2 / 1e6)}')
  awk -v rps="$rps" -v secs="$DURATION" '
    /raw_syscalls:sys_enter|context-switches|cpu-migrations/ { gsub(",", "", $1); printf "%s per request: %.2f\n", $2, $1 / (rps * secs) }
    /task-clock/ { gsub(",", "", $1); printf "CPU ms per request: %.4f\n", $1 / (rps * secs) }' "$work/stat.txt"
  exit 0
fi
perf record -F "$FREQ" -g --call-graph dwarf,16384 -p "$PID" -o "$work/perf.data" -- sleep "$DURATION" \
  2>"$work/perf.err" >/dev/null
wait "$wrk_pid"
grep '^LOAD ' "$work/wrk.out"

# perf's table without comments, blank lines and its padding, first TOP rows (reading it all).
tidy() { sed -E -e '/^#/d' -e '/^[[:space:]]*$/d' -e 's/[[:space:]]+(-[[:space:]]+)*$//' | sed -n "1,${TOP}p"; }
perf report -i "$work/perf.data" --no-children --stdio --percent-limit 0.5 -g none \
  --sort symbol 2>/dev/null | tidy >"$OUT/$CASE.self.txt"
perf report -i "$work/perf.data" --children --stdio --percent-limit 2 -g none \
  --sort symbol 2>/dev/null | tidy >"$OUT/$CASE.children.txt"
perf script -i "$work/perf.data" 2>/dev/null >"$work/perf.script"
if command -v inferno-collapse-perf >/dev/null 2>&1; then
  inferno-collapse-perf "$work/perf.script" >"$OUT/$CASE.folded"
  if command -v inferno-flamegraph >/dev/null 2>&1; then
    inferno-flamegraph "$OUT/$CASE.folded" >"$OUT/$CASE.svg"
  fi
fi
echo "== $CASE: top by self time =="
cat "$OUT/$CASE.self.txt"
echo "== $CASE: top by inclusive time =="
cat "$OUT/$CASE.children.txt"
echo "profile: written to $OUT/$CASE.*"
