#!/usr/bin/env bash
# Install the gateway with its test tools into .venv, make sure the real peers the tests talk
# to are present (openssl, gpgsm), and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v openssl >/dev/null || need+=(openssl)
command -v gpgsm >/dev/null || need+=(gpgsm)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "note: ${need[*]} not installed; tests that need them will be skipped" >&2
  fi
fi
scripts/env.sh test
exec .venv/bin/python -m pytest "$@"
