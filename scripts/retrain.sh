#!/usr/bin/env bash
# Retrain what changed, with an optional DVC remote; what CI's retrain workflow runs, runnable locally.
#   DVC_REMOTE_URL  a DVC remote (s3://..., /some/folder, ...): pulled before, pushed after; none: local only
#   SET_PARAMS      space-separated `dvc exp run -S` overrides (e.g. "profile=smoke restoration.policy=topk");
#                   empty: a plain `dvc repro`
#   BASE_REV        the revision `dvc metrics diff` compares with (default HEAD)
set -euo pipefail
cd "$(dirname "$0")/.."
dvc=".venv/bin/dvc"
export PATH="$PWD/.venv/bin:$PATH"

if [ -n "${DVC_REMOTE_URL:-}" ]; then
    "$dvc" remote add --local --force --default ci "$DVC_REMOTE_URL"
    "$dvc" pull --allow-missing || echo "retrain: nothing pulled from $DVC_REMOTE_URL (a first run?)"
else
    echo "retrain: no DVC_REMOTE_URL: training locally, nothing pulled or pushed"
fi

if [ -n "${SET_PARAMS:-}" ]; then
    args=()
    for override in $SET_PARAMS; do args+=(-S "$override"); done
    "$dvc" exp run "${args[@]}"
else
    "$dvc" repro
fi

if [ -n "${DVC_REMOTE_URL:-}" ]; then
    "$dvc" push
fi
mkdir -p reports
"$dvc" metrics diff "${BASE_REV:-HEAD}" --md > reports/metrics_diff.md || true
cat reports/metrics_diff.md
