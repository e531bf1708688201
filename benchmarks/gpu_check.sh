#!/usr/bin/env bash
# GPU check (issue 11): tests/gpu/ + the Qwen2.5-VL-7B-shaped benchmark preset (bf16; full and
# LoRA), one JSON summary, in under 8 minutes on one GPU. Nothing is installed or downloaded: the
# machine's torch (CUDA), transformers and trl are used, with this checkout on PYTHONPATH.
#
# Exact command, from the repository root of the checkout, on the GPU machine:
#
#     bash benchmarks/gpu_check.sh                 # writes $OUT/gpu_check.json (+ raw JSON, logs)
#
# Without a GPU (rehearses the script: the suite is skipped with its reason, the small preset
# runs on CPU, and no GPU number is produced):
#
#     bash benchmarks/gpu_check.sh --cpu
#
# Afterwards: copy $OUT/bench_vlm7b_*.json to benchmarks/results/ and fill the GPU table in
# docs/speed.md from $OUT/gpu_check.json. Details: benchmarks/gpu_check.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
OUT="${OUT:-/tmp/srpo_gpu_check}"
exec "${PYTHON:-python}" benchmarks/gpu_check.py --out "$OUT" "$@"
