#!/usr/bin/env bash
# Installs what building and testing creditgate needs on a fresh Debian machine, only when missing:
# a C toolchain and cmake (Pingora's zlib), pkg-config, redis-server, curl, wrk (load benchmark),
# and schemathesis (PyPI, pinned) in its own venv for tests/openapi_fuzz.rs.
set -euo pipefail

need=()
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v python3 >/dev/null 2>&1 || need+=(python3)
# Debian's python3 makes venvs (with pip) only with python3-venv.
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then need+=(python3-venv); fi

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# schemathesis, pinned, where tests/openapi_fuzz.rs looks for it (CREDITGATE_CACHE overrides).
SCHEMATHESIS_VERSION=4.32.5
st_venv="${CREDITGATE_CACHE:-$HOME/.cache/creditgate}/schemathesis-venv"
if ! "$st_venv/bin/schemathesis" --version 2>/dev/null | grep -qF "$SCHEMATHESIS_VERSION"; then
  echo "setup: installing schemathesis==$SCHEMATHESIS_VERSION into $st_venv" >&2
  rm -rf "$st_venv"
  python3 -m venv "$st_venv"
  "$st_venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

# Debian starts a system redis-server on install; the project never uses it (tests and the demo
# start their own), so leave it alone.
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is missing; install a Rust toolchain (rustup) first" >&2
  exit 1
fi
