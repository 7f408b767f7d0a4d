#!/usr/bin/env bash
# Runs the whole test suite after an idempotent setup. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
