#!/usr/bin/env bash
# GPU check of the training step at the paper profile (224 px, batch 16 + 16, U-Net base 64), bf16 autocast.
#
# Runs `python -m dusss bench --profile paper --steps-only` on one CUDA device: random images, masks and
# text maps of the paper's sizes (no data set or VLM needed), mt and dusss (cached text maps) in turns,
# median of the timed steps; prints images/s and writes results/bench_steps_paper_cuda.json.
# Finishes in well under 5 minutes on any recent GPU (the whole run is capped at 300 s).
#
# Usage (from anywhere):  bash benchmarks/gpu_check.sh [extra `python -m dusss bench` options]
#   e.g. bash benchmarks/gpu_check.sh --repeats 50 --set labelled_bs=32 --set unlabelled_bs=32
# Environment: PYTHON (default: .venv/bin/python if present, else python), CUDA_VISIBLE_DEVICES as usual.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: torch sees no CUDA device on this machine; run it where one is (nothing measured)" >&2
  exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

timeout 300 "$PYTHON" -m dusss bench --profile paper --steps-only --device cuda --repeats 30 --warmup 5 "$@"
