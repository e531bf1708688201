"""
GPU check for issues 11 and 20: the tests/gpu/ suite, the benchmark's Qwen2.5-VL-7B-shaped preset and
the per-family packed/unpacked benchmark, one JSON summary, in under 9.5 minutes on one GPU.

Made for a lent GPU machine with torch (CUDA) preinstalled and this checkout on PYTHONPATH; what
the machine lacks (trl, datasets, ...) comes as wheels that benchmarks/gpu_check.sh installs from
.whl/ (see benchmarks/gpu_wheels.sh). From the repository root:

    PYTHONPATH=$PWD python benchmarks/gpu_check.py --out "$OUT"

writes to $OUT: gpu_check.json (the summary), gpu_tests.xml (pytest's JUnit report), one
bench_<name>.json per benchmark run (absolute numbers, benchmarks/step_pairs.py's format) and a
.log per step. Steps, in order, each with a time budget (the whole run stops at --budget seconds):

  1. tests/gpu/ (pytest; with FSDP2 through accelerate, test_fsdp2_cuda.py)  budget 240 s
  2. benchmark, VLM preset qwen2_5_vl_7b (4 decoder layers), bf16, full fine-tuning:
     SRPO packed, SRPO Step-DPO (+ref), DPOTrainer (+ref) + NLL              budget 150 s
  3. the same with LoRA: SRPO packed, DPOTrainer + NLL                       budget 100 s
  4. packed / unpacked SRPO per model family (every type on the prefix-sharing allow-list, small
     random models: text hidden 512, 4 layers, bf16; one process)            what is left

Each benchmark configuration profiles one extra (untimed) step with torch.profiler: the summary gives
the share of attention, matmuls, optimizer, copies, ... of its device time and its top ops, the
profile of what is left once the targets are compared.

Without a GPU, `--cpu` runs what can run: the suite (skipped, with its reason) and the benchmark's
small preset (`--quick --cpu`, VLM, SRPO packed and DPOTrainer + NLL) and two families, so the
script itself is exercised; its summary says "cpu rehearsal" and claims no GPU number. `--dry-run` prints the plan.

The summary compares the packed VLM run with the issue's targets (step time <= 0.25x DPOTrainer +
NLL, peak memory <= 0.5x, MFU >= 35%): "met", "not met" or "not measured".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "step_pairs.py"
TARGETS = {"step_time_ratio": 0.25, "peak_memory_ratio": 0.5, "mfu": 0.35}
BUDGET_S = 560.0  # the device tool allows 10 minutes a command; this leaves room to install the wheels


def plan(cpu: bool, out: Path, peak_tflops: float) -> list[dict]:
    """The steps: name, command, time budget in seconds (None: what is left)."""
    py = sys.executable
    tests = {
        "name": "gpu_tests",
        "cmd": [
            py,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "tests/gpu",
            f"--junitxml={out / 'gpu_tests.xml'}",
            "-p",
            "no:cacheprovider",
        ],
        "budget": 240,
    }
    if cpu:
        bench = [
            py,
            str(BENCH),
            "--quick",
            "--cpu",
            "--profile",
            "--models",
            "vlm",
            "--configs",
            "srpo_packed,dpo_nll",
        ]
        families = [py, str(BENCH), "--quick", "--cpu", "--in-process", "--families", "qwen2,gemma3"]
        return [
            tests,
            {"name": "bench_small_cpu", "cmd": bench + ["--json", str(out / "bench_small_cpu.json")], "budget": None},
            {
                "name": "bench_families",
                "cmd": families + ["--json", str(out / "bench_families.json")],
                "budget": None,
            },
        ]
    preset = [
        py,
        str(BENCH),
        "--preset",
        "qwen2_5_vl_7b",
        "--layers",
        "4",
        "--models",
        "vlm",
        "--dtype",
        "bf16",
        "--warmup",
        "3",
        "--steps",
        "5",
        "--threads",
        "4",
        "--peak-tflops",
        str(peak_tflops),
        "--profile",  # one more step under torch.profiler: where the packed step's time goes
    ]
    return [
        tests,
        {
            "name": "bench_vlm7b_full",
            "cmd": preset
            + ["--configs", "srpo_packed,srpo_packed_ref,dpo_nll", "--json", str(out / "bench_vlm7b_full.json")],
            "budget": 150,
        },
        {
            "name": "bench_vlm7b_lora",
            "cmd": preset
            + ["--lora", "--configs", "srpo_packed,dpo_nll", "--json", str(out / "bench_vlm7b_lora.json")],
            "budget": 100,
        },
        {
            "name": "bench_families",
            "cmd": [
                py,
                str(BENCH),
                "--families",
                "all",
                "--in-process",  # one process: 40 runs would otherwise pay 40 imports
                "--hidden-size",
                "512",
                "--layers",
                "4",
                "--dtype",
                "bf16",
                "--warmup",
                "2",
                "--steps",
                "3",
                "--threads",
                "4",
                "--json",
                str(out / "bench_families.json"),
            ],
            "budget": None,  # families done before the time runs out are in the JSON
        },
    ]


def summarize_tests(junit: Path) -> dict:
    """Counts, failing test names and skip reasons from pytest's JUnit XML."""
    if not junit.is_file():
        return {"report": "missing"}
    root = ET.parse(junit).getroot()
    cases = root.iter("testcase")
    out = {"passed": 0, "failed": [], "skipped": [], "errors": []}
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None:
            out["failed"].append(name)
        elif case.find("error") is not None:
            out["errors"].append(name)
        elif (skip := case.find("skipped")) is not None:
            out["skipped"].append({"test": name, "reason": skip.get("message")})
        else:
            out["passed"] += 1
    return out


def summarize_bench(path: Path, cuda: bool) -> dict:
    """Per configuration: ratios to DPOTrainer + NLL and the absolute rates; target checks for the
    packed run."""
    if not path.is_file():
        return {"results": "missing"}
    data = json.loads(path.read_text())
    by = {r["config"]: r for r in data["results"]}
    base = by.get("dpo_nll")
    rows = {}
    for name, r in by.items():
        rows[name] = {
            "tokens_ratio": r["tokens_timed"] / base["tokens_timed"] if base else None,
            "median_step_ratio": r["median_step_s"] / base["median_step_s"] if base else None,
            "mean_step_ratio": r["mean_step_s"] / base["mean_step_s"] if base else None,
            "peak_memory_ratio": r["peak_memory_bytes"] / base["peak_memory_bytes"]
            if base and base["peak_memory_bytes"]
            else None,
            "median_step_s": r["median_step_s"],
            "tflops_per_s": r["tflops_per_s"],
            "mfu": r["mfu"],
            "flex_compiles": r["flex_compiles"],
            "attention": r["attention"],
            "step_times_s": r["step_times_s"],
            "profile_group_share": (r.get("profile") or {}).get("group_share"),
            "profile_top_ops": [op["name"] for op in (r.get("profile") or {}).get("top_ops", [])[:10]],
        }
    packed = rows.get("srpo_packed")

    def check(value, limit, at_most=True):
        if not cuda or value is None:
            return "not measured"
        return "met" if (value <= limit if at_most else value >= limit) else "not met"

    targets = {
        "step_time_ratio<=0.25": check(packed and packed["median_step_ratio"], TARGETS["step_time_ratio"]),
        "peak_memory_ratio<=0.5": check(packed and packed["peak_memory_ratio"], TARGETS["peak_memory_ratio"]),
        "mfu>=0.35": check(packed and packed["mfu"], TARGETS["mfu"], at_most=False),
    }
    return {"device": data.get("device"), "argv": data.get("argv"), "configs": rows, "targets": targets}


def summarize_families(path: Path) -> dict:
    """Per family: packed / unpacked SRPO step-time and token ratios (benchmarks/step_pairs.py --families)."""
    if not path.is_file():
        return {"results": "missing"}
    data = json.loads(path.read_text())
    return {"device": data.get("device"), "argv": data.get("argv"), "families": data.get("families", {})}


def run_step(step: dict, out: Path, seconds: float) -> dict:
    log = out / f"{step['name']}.log"
    t0 = time.time()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    with open(log, "w") as f:
        try:
            proc = subprocess.run(step["cmd"], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=seconds)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timed out"
    return {
        "command": " ".join(step["cmd"]),
        "exit_code": code,
        "seconds": round(time.time() - t0, 1),
        "budget_s": round(seconds),
        "log": log.name,
    }


def environment() -> dict:
    import importlib.metadata as md
    import platform

    import torch

    versions = {"python": platform.python_version()}
    for name in (
        "torch",
        "transformers",
        "trl",
        "peft",
        "accelerate",
        "datasets",
        "dill",
        "multiprocess",
        "pyarrow",
        "fsspec",
        "huggingface_hub",
        "tokenizers",
    ):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    return {
        "cuda": cuda,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch_cuda": torch.version.cuda,
        "versions": versions,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        default=os.environ.get("OUT", "/tmp/srpo_gpu_check"),
        help="folder for the summary and raw results ($OUT)",
    )
    parser.add_argument("--cpu", action="store_true", help="no GPU: the suite (skipped) and the small preset on CPU")
    parser.add_argument("--dry-run", action="store_true", help="print the steps and exit")
    parser.add_argument(
        "--budget",
        type=float,
        default=BUDGET_S,
        help="seconds for everything (the device tool allows 10 minutes a command)",
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for MFU (H100/H200 SXM: 989)"
    )
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    steps = plan(args.cpu, out, args.peak_tflops)
    if args.dry_run:
        for step in steps:
            print(f"[{step['name']}] budget {step['budget'] or 'rest'} s: {' '.join(step['cmd'])}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    env = environment()
    if not env["cuda"] and not args.cpu:
        print("gpu_check: no CUDA device; run with --cpu for the CPU rehearsal", file=sys.stderr)
        return 2
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "mode": "gpu" if env["cuda"] and not args.cpu else "cpu rehearsal (no GPU numbers)",
        **env,
        "steps": {},
    }
    for step in steps:
        left = args.budget - (time.time() - started) - 5
        if left < 30:
            summary["steps"][step["name"]] = {
                "command": " ".join(step["cmd"]),
                "exit_code": "not run (time budget spent)",
            }
            continue
        seconds = min(step["budget"] or left, left)
        print(f"[{step['name']}] up to {seconds:.0f} s", flush=True)
        summary["steps"][step["name"]] = run_step(step, out, seconds)
    summary["tests"] = summarize_tests(out / "gpu_tests.xml")
    cuda_run = env["cuda"] and not args.cpu
    summary["benchmarks"] = {
        step["name"]: summarize_bench(out / f"{step['name']}.json", cuda_run)
        for step in steps
        if step["name"].startswith("bench") and step["name"] != "bench_families"
    }
    summary["families"] = summarize_families(out / "bench_families.json")
    summary["seconds"] = round(time.time() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("mode", "device", "seconds", "tests")}, indent=1))
    print(f"summary: {out / 'gpu_check.json'}")
    failed = summary["tests"].get("failed") or summary["tests"].get("errors")
    codes = [s.get("exit_code") for s in summary["steps"].values()]
    return 1 if failed or any(c not in (0, None) for c in codes) else 0


if __name__ == "__main__":
    sys.exit(main())
