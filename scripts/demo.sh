#!/usr/bin/env bash
# The main job on the bundled real samples: report, regression plots, Perfetto trace.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/hintscope demo "$@"
