#!/usr/bin/env bash
# GPU check (issues 11, 20, 23): tests/gpu/ (with FSDP2 through accelerate's CUDA path) + the
# Qwen2.5-VL-7B-shaped benchmark preset (bf16; full and LoRA) + packed/unpacked SRPO per model family,
# one JSON summary, in under 9.5 minutes on one GPU. Nothing is downloaded there: the machine's
# torch (CUDA) is used, with this checkout on PYTHONPATH, and the wheels it lacks (trl, datasets,
# dill, multiprocess, the pinned transformers and peft) come from .whl/ when it is there: made here
# by `bash benchmarks/gpu_wheels.sh`, carried along, installed into /tmp/site (first on PYTHONPATH).
#
# Exact command, from the repository root of the checkout, on the GPU machine (device tool: this
# command with carry [".whl"] and timeout_s 590):
#
#     bash benchmarks/gpu_check.sh                 # writes $OUT/gpu_check.json (+ raw JSON, logs)
#
# Without a GPU (rehearses the script: the suite is skipped with its reason, the small preset
# runs on CPU, and no GPU number is produced):
#
#     bash benchmarks/gpu_check.sh --cpu
#
# Afterwards: copy $OUT/bench_vlm7b_*.json and $OUT/bench_families.json to benchmarks/results/ and
# fill the GPU tables in docs/speed.md from $OUT/gpu_check.json. Details: benchmarks/gpu_check.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && [[ " $* " != *" --cpu "* ]] && [[ " $* " != *" --dry-run "* ]]; then
  "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
OUT="${OUT:-/tmp/srpo_gpu_check}"
exec "${PYTHON:-python3}" benchmarks/gpu_check.py --out "$OUT" "$@"
