#!/usr/bin/env bash
# Install the gateway into .venv and run its demo on the embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/env.sh
exec .venv/bin/gateway demo "$@"
