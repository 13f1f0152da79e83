#!/usr/bin/env bash
# STAFF end to end on the shipped DialogSum sample: smollm2-135m (small) → gemma-3-270m (target).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/speccore select \
  --data demo/dialogsum-train-150.jsonl --output-field summary \
  --group-field topic --template $'Summarize the dialogue.\n{dialogue}\nSummary: ' \
  --small smollm2-135m --target gemma-3-270m \
  --prune-rate 0.8 --small-epochs 1 --regions 10 --verify-per-region 5 --max-length 256 \
  --out runs/demo "$@"
