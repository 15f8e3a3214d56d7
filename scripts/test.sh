#!/usr/bin/env bash
# The whole test suite: unit tests, the ledger conformance suite against a real redis-server
# (each test starts its own on a unix socket), and the HTTP integration tests that run the real
# gateway binary in front of a recording local backend and a fake Stripe.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --bins --examples
log=$(mktemp /tmp/creditgate-test.XXXXXX)
trap 'rm -f "$log"' EXIT
status=0
cargo test --no-fail-fast -- --test-threads=2 "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "%d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
