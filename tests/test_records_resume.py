"""`srpo-trl generate-records` killed with SIGKILL mid-run, then rerun: nothing lost, nothing duplicated."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from test_records_pipeline import Agents, read_lines

from srpo_trl.records import main_generate, output_paths


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a second process (about 10 s of imports)
def test_resume_after_a_real_kill(openai_server, tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (28, 28), (40 * i, 0, 0)).save(images / f"img{i}.png")
    agents = Agents(delay=0.03)  # slow enough to be killed mid-run
    openai_server.handler = agents
    out = tmp_path / "out" / "records.jsonl"
    argv = [
        "--images",
        str(images),
        "--chat-url",
        openai_server.url + "/v1",
        "--model",
        "m",
        "--per-image",
        "2",
        "--benign-per-image",
        "1",
        "--workers",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    planned = {f"img{i}-png-{k}" for i in range(4) for k in ("u0", "u1", "b0")}

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "srpo_trl.cli", "generate-records", *argv],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            done = out.read_text().count("\n") if out.exists() else 0
            if done >= 3 or proc.poll() is not None:
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.communicate()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    text = out.read_text()
    first_run = [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]  # a torn last line is dropped
    assert 3 <= len(first_run) < len(planned)
    calls_first = Counter(agents.calls)

    assert main_generate(argv) == 0  # the same command resumes

    records = read_lines(out)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) and set(ids) == planned  # nothing lost, nothing twice
    assert records[: len(first_run)] == first_run  # earlier records untouched
    assert not output_paths(out)["failed"].exists() or not read_lines(output_paths(out)["failed"])
    # Work done before the kill is not asked again: every (item, stage) was answered once, except
    # at most the call in flight when the process died.
    items = {"query": 8, "benign_query": 4, "reasoning": 12, "reflection": 12, "summary": 12}
    extra = {a: agents.calls[a] - n for a, n in items.items()}
    assert all(v >= 0 for v in extra.values()) and sum(extra.values()) <= 1, (extra, calls_first)
    journal = [e for e in read_lines(output_paths(out)["journal"]) if "stage" in e]
    keys = [(e["id"], e["stage"], e["round"]) for e in journal]
    assert len(keys) == len(set(keys)) == sum(items.values())
    summary = json.loads(output_paths(out)["summary"].read_text())
    assert summary["items"] == {"planned": 12, "done": 12, "failed": 0, "pending": 0}
    assert not output_paths(out)["lock"].exists()
