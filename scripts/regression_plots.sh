#!/usr/bin/env bash
# Regenerates the project's regression plots from the committed sample bundles under samples/.
# Usage: scripts/regression_plots.sh [OUT_DIR] [extra hintscope compare args, e.g. --group hint]
# Writes OUT_DIR (default docs/regression): runs.csv, groups.csv, one PNG + SVG per metric.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/regression}"
shift || true
py=.venv/bin/python
[ -x "$py" ] || py=python3
mapfile -t bundles < <(find -L samples -mindepth 2 -maxdepth 2 -name meta.json -printf '%h\n' | sort)
if [ "${#bundles[@]}" -eq 0 ]; then
    echo "regression_plots: no sample bundles under samples/ (each needs a meta.json)" >&2
    exit 2
fi
exec "$py" -m hintscope compare "${bundles[@]}" -o "$out" "$@"
