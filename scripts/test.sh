#!/usr/bin/env bash
# Install everything into ./.venv and run every check CI runs: ruff, then the whole pytest
# suite (unit, integration, and the public conformance suite through npm).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[test]'

.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench

set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  # pytest's "no tests collected": a run that tested nothing must not pass.
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$status"
