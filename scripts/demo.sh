#!/usr/bin/env bash
# A complete local demo: its own redis-server, the bundled demo backend, the gateway, and a demo
# account with an API key; then it prints curl lines that work as printed. Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

PROXY_PORT=${PROXY_PORT:-8080}
ADMIN_PORT=${ADMIN_PORT:-8081}
METRICS_PORT=${METRICS_PORT:-9090}
BACKEND_PORT=${BACKEND_PORT:-9000}
REDIS_PORT=${REDIS_PORT:-6399}

cargo build --bin creditgate --example demo_backend
work=$(mktemp -d /tmp/creditgate-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly yes \
  --dir "$work" --daemonize no >"$work/redis.log" 2>&1 &
pids+=($!)
target/debug/examples/demo_backend "127.0.0.1:$BACKEND_PORT" >"$work/backend.log" 2>&1 &
pids+=($!)

cat >"$work/creditgate.toml" <<TOML
[server]
listen = "127.0.0.1:$PROXY_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
metrics_listen = "127.0.0.1:$METRICS_PORT"
[upstream]
address = "127.0.0.1:$BACKEND_PORT"
[store]
url = "redis://127.0.0.1:$REDIS_PORT"
[rules]
dir = "$PWD/lua-free-rules"
TOML

export CREDITGATE_ADMIN_TOKEN=${CREDITGATE_ADMIN_TOKEN:-demo-admin-token}
target/debug/creditgate serve --config "$work/creditgate.toml" >"$work/gateway.log" 2>&1 &
pids+=($!)

for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null || { cat "$work/gateway.log"; exit 1; }

admin=(-H "Authorization: Bearer $CREDITGATE_ADMIN_TOKEN" -H "Content-Type: application/json")
curl -fsS "${admin[@]}" -X POST "http://127.0.0.1:$ADMIN_PORT/admin/accounts" \
  -d '{"id":"demo","plan":"pro","payPerUse":true}' >/dev/null
key=$(curl -fsS "${admin[@]}" -X POST "http://127.0.0.1:$ADMIN_PORT/admin/accounts/demo/keys" \
  -d '{"name":"demo"}' | sed -n 's/.*"key":"\([^"]*\)".*/\1/p')

cat <<TXT

creditgate demo is running (logs in $work). Account "demo" is on the Pro plan (300 credits)
with pay-per-use enabled. Try:

  curl -i -X POST http://127.0.0.1:$PROXY_PORT/api/v1/images/relight \\
       -H 'Authorization: Bearer $key' -H 'Content-Type: application/json' \\
       -d '{"model":"nano-banana-pro","n":2}'
  curl -s http://127.0.0.1:$PROXY_PORT/api/credits/balance -H 'Authorization: Bearer $key'
  curl -s http://127.0.0.1:$PROXY_PORT/api/subscription -H 'Authorization: Bearer $key'
  curl -i -X POST http://127.0.0.1:$PROXY_PORT/api/v1/images/relight \\
       -H 'Authorization: Bearer $key' -H 'Content-Type: application/json' \\
       -d '{"model":"midjourney-v7","n":2}'
  curl -s http://127.0.0.1:$PROXY_PORT/api/spending-limit -H 'Authorization: Bearer $key'
  curl -s -H 'Authorization: Bearer $CREDITGATE_ADMIN_TOKEN' http://127.0.0.1:$ADMIN_PORT/admin/accounts/demo
  curl -s http://127.0.0.1:$METRICS_PORT/metrics | grep creditgate_

Press Ctrl-C to stop.
TXT
wait
