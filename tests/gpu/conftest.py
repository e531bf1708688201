"""tests/gpu/: the CUDA paths (tree attention, bf16, device placement) that CI cannot run.

Every test here is skipped, with that reason, where CUDA is not available; none passes on CPU.
On a GPU machine: `benchmarks/gpu_check.sh` (this suite + the benchmark preset, JSON summary)."""

import os
import sys

import pytest
import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: helpers, test_* modules

NO_CUDA = "needs a CUDA GPU (tests/gpu/ checks the GPU paths; run benchmarks/gpu_check.sh on a GPU machine)"


def pytest_collection_modifyitems(config, items):
    # SRPO_TRL_GPU_TESTS_ON_CPU=1 rehearses this suite on CPU (to check the tests themselves where
    # no GPU is at hand); such a run says nothing about CUDA and is never reported as a GPU result.
    if torch.cuda.is_available() or os.environ.get("SRPO_TRL_GPU_TESTS_ON_CPU") == "1":
        return
    here = os.path.dirname(os.path.abspath(__file__))
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)
