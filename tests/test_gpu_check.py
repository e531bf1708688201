"""benchmarks/gpu_check.py (the one-command GPU check of issue 11), as far as it runs without a GPU:
its plan, and a full CPU rehearsal whose summary claims no GPU number."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def test_gpu_plan_runs_the_suite_and_the_7b_preset_full_and_lora_and_the_families(tmp_path):
    steps = gpu_check.plan(cpu=False, out=tmp_path, peak_tflops=989.0)
    assert [s["name"] for s in steps] == ["gpu_tests", "bench_vlm7b_full", "bench_vlm7b_lora", "bench_families"]
    assert "tests/gpu" in steps[0]["cmd"] and f"--junitxml={tmp_path / 'gpu_tests.xml'}" in steps[0]["cmd"]
    families = " ".join(steps[3]["cmd"])
    assert "--families all" in families and "--dtype bf16" in families and "--in-process" in families
    assert f"--json {tmp_path / 'bench_families.json'}" in families and steps[3]["budget"] is None
    for step in steps[1:3]:
        cmd = " ".join(step["cmd"])
        assert "--preset qwen2_5_vl_7b" in cmd and "--dtype bf16" in cmd and "--models vlm" in cmd
        assert f"--json {tmp_path / (step['name'] + '.json')}" in cmd and "dpo_nll" in cmd
        assert "--profile" in step["cmd"]  # where the time goes, one untimed step per configuration
    assert "--lora" in steps[2]["cmd"] and "--lora" not in steps[1]["cmd"]
    assert sum(s["budget"] or 0 for s in steps) <= gpu_check.BUDGET_S - 60  # a minute or more for the families


@pytest.mark.slow  # the small preset trains two configurations on CPU: a few minutes
def test_cpu_rehearsal_writes_a_summary_without_gpu_numbers(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["mode"].startswith("cpu rehearsal") and summary["cuda"] is False
    tests = summary["tests"]
    assert tests["passed"] == 0 and not tests["failed"] and len(tests["skipped"]) >= 10
    assert all("needs a CUDA GPU" in s["reason"] for s in tests["skipped"])
    bench = summary["benchmarks"]["bench_small_cpu"]
    assert set(bench["configs"]) == {"srpo_packed", "dpo_nll"}
    assert bench["configs"]["dpo_nll"]["tokens_ratio"] == 1.0
    assert 0 < bench["configs"]["srpo_packed"]["tokens_ratio"] < 0.3
    assert set(bench["targets"].values()) == {"not measured"}
    for config in bench["configs"].values():  # the profiled extra step: shares of one total
        assert sum(config["profile_group_share"].values()) == pytest.approx(1.0) and config["profile_top_ops"]
    assert (tmp_path / "bench_small_cpu.json").is_file() and (tmp_path / "gpu_tests.log").is_file()
    families = summary["families"]["families"]
    assert set(families) == {"qwen2", "gemma3"}
    for family in families.values():  # tokens are counted, not timed: packing shares most of them
        assert 0 < family["token_ratio"] < 0.3 and family["step_time_ratio"] > 0
