#!/usr/bin/env bash
# Make (or reuse) the project virtualenv in .venv and install the gateway into it.
# Usage: scripts/env.sh [extra]     e.g. scripts/env.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: Python 3.11 or newer is required (found: $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
extra=${1:+[$1]}
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extra}"
