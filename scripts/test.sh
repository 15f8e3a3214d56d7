#!/usr/bin/env bash
# The whole test suite: unit tests, the ledger conformance suite against a real redis-server
# (each test starts its own on a unix socket), and the HTTP integration tests that run the real
# gateway binary in front of a recording local backend.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --bins --examples
cargo test --no-fail-fast -- --test-threads=2 "$@"
