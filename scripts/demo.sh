#!/usr/bin/env bash
# STAFF end to end on the shipped DialogSum sample: smollm2-135m (small) → gemma-3-270m (target).
#   bash scripts/demo.sh          first run: 40 rows, under 5 minutes on a 2-core CPU → runs/demo
#   bash scripts/demo.sh --full   all 150 shipped rows, the larger settings     → runs/demo-full
# Any other arguments are passed to `speccore select` (e.g. --overwrite, -q is global: put it first
# by calling .venv/bin/speccore -q select ... yourself).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${1:-}" = "--full" ]; then
  shift
  exec .venv/bin/speccore select \
    --data demo/dialogsum-train-150.jsonl --output-field summary \
    --group-field topic --template $'Summarize the dialogue.\n{dialogue}\nSummary: ' \
    --small smollm2-135m --target gemma-3-270m \
    --prune-rate 0.8 --small-epochs 1 --regions 10 --verify-per-region 5 --max-length 256 \
    --out runs/demo-full --overwrite "$@"
fi
exec .venv/bin/speccore select \
  --data demo/dialogsum-train-40.jsonl --output-field summary \
  --group-field topic --template $'Summarize the dialogue.\n{dialogue}\nSummary: ' \
  --small smollm2-135m --target gemma-3-270m \
  --prune-rate 0.75 --small-epochs 1 --regions 5 --verify-per-region 2 --max-length 128 \
  --out runs/demo --overwrite "$@"
