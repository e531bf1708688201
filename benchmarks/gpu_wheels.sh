#!/usr/bin/env bash
# Wheels the lent GPU machine lacks, for benchmarks/gpu_check.sh. Its image has torch 2.11 (CUDA 13),
# transformers 5.17, accelerate, peft, pytest, pyarrow and xxhash, but no trl, datasets, dill or
# multiprocess, and an older transformers than srpo_trl pins. Run once here (PyPI is reachable here,
# not from the GPU machine); the wheels land in .whl/ (git-ignored, about 16 MB):
#
#     bash benchmarks/gpu_wheels.sh
#
# then carry `.whl` with the GPU call (device tool: command "bash benchmarks/gpu_check.sh",
# carry [".whl"]); gpu_check.sh installs them into /tmp/site and puts that first on PYTHONPATH.
# Versions: those CI tests against (pyproject.toml's ranges, the ones `make install` resolves).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(transformers==5.24.0 trl==1.16.0 datasets==5.2.0 peft==0.21.2 dill==0.4.1 multiprocess==0.70.19)
mkdir -p .whl
for wheel in "${WHEELS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$wheel"
done
ls -l .whl
