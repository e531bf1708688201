"""Exploration: the output contract, reference sampling, branch points, pair counts, failures,
resume after a real kill, shards and merge, the CLI, and explore -> StepPairDataset -> SRPOTrainer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest
from helpers import srpo_args
from openai_server import Reply

from srpo_trl.backends import GenerationRequest, OpenAICompatibleBackend
from srpo_trl.cli.explore import main
from srpo_trl.exploration import (
    RecordError,
    count_pairs,
    explore,
    load_records,
    merge_shards,
    select_branch_points,
    shard_path,
)
from srpo_trl.rows import continuation_prefix_text
from srpo_trl.verifiers import Verdict


WARN_TEXT = "Sure, but never mix them ({})."
COMPLY_TEXT = "Just mix them ({})."


class ScriptedBackend:
    """Even samples warn, odd samples comply; the texts carry the seed and the sample index."""

    separator = "\n"

    def __init__(self, answer=None, delay: float = 0.0):
        self.calls = []
        self.answer = answer
        self.delay = delay

    def generate(self, requests, *, num_samples=1, temperature=0.5, max_new_tokens=512, seed=None):
        self.calls.append(
            {
                "requests": requests,
                "num_samples": num_samples,
                "temperature": temperature,
                "max_new_tokens": max_new_tokens,
                "seed": seed,
            }
        )
        time.sleep(self.delay)
        out = []
        for r in requests:
            texts = []
            for i in range(num_samples):
                if self.answer is not None:
                    texts.append(self.answer(r, i, seed))
                else:
                    tag = f"{seed}-{i}"
                    texts.append((WARN_TEXT if i % 2 == 0 else COMPLY_TEXT).format(tag))
            out.append(texts)
        return out

    def chat(self, messages, *, images=None, temperature=0.0, max_new_tokens=512):
        return self.generate([GenerationRequest(messages)], num_samples=1)[0][0]


REFERENCE = [
    "The image shows bleach.",
    "The user wants to clean the toilet.",
    "Answer: use bleach alone, never mix it.",
]


def _records(n=3, **extra):
    return [
        {
            "id": f"r{i}",
            "prompt": [{"role": "user", "content": f"How do I clean this? ({i})"}],
            "expected": "warn",
            "reference": list(REFERENCE),
            "category": "dangerous behavior",
            **extra,
        }
        for i in range(n)
    ]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, field, message",
    [
        ('{"prompt": "x", "expected": "warn"}', "id", "missing"),
        ('{"id": "a", "expected": "warn"}', "prompt", "missing"),
        ('{"id": "a", "prompt": "", "expected": "warn"}', "prompt", "empty"),
        ('{"id": "a", "prompt": [{"content": "x"}], "expected": "warn"}', "prompt", "role"),
        ('{"id": "a", "prompt": "x"}', "expected", "the verifier needs it"),
        ('{"id": "a", "prompt": "x", "expected": "maybe"}', "expected", "refuse, warn, comply"),
        ('{"id": "a", "prompt": "x", "expected": "warn", "reference": "one string"}', "reference", "list of steps"),
        ('{"id": "a", "prompt": "x", "expected": "warn", "reference": ["ok", ""]}', "reference", "step 1"),
        ('{"id": "a", "prompt": "x", "expected": "warn", "images": "a.png"}', "images", "list"),
        ('{"id": "a", "prompt": "x", "expected": "warn", "images": ["missing.png"]}', "images[0]", "missing.png"),
    ],
)
def test_bad_record_names_line_and_field(tmp_path, line, field, message):
    path = tmp_path / "records.jsonl"
    path.write_text('{"id": "ok", "prompt": "fine", "expected": "warn"}\n\n' + line + "\n")
    with pytest.raises(RecordError) as info:
        load_records(path, required=("expected",))
    assert info.value.where == f"{path}:3" and info.value.field == field
    assert message in str(info.value) and f"{path}:3" in str(info.value)


def test_malformed_json_and_duplicate_ids(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": \n')
    with pytest.raises(RecordError, match=r"records.jsonl:2: is not valid JSON"):
        load_records(path)
    path.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(RecordError, match=r"records.jsonl:2: field 'id'.*already used at .*records.jsonl:1"):
        load_records(path)


def test_relative_images_resolve_against_the_records_file(tmp_path):
    from srpo_trl.tiny import make_image

    (tmp_path / "data" / "img").mkdir(parents=True)
    make_image(1).save(tmp_path / "data" / "img" / "a.png")
    path = _write_jsonl(tmp_path / "data" / "records.jsonl", [{"id": 1, "prompt": "x", "images": ["img/a.png"]}])
    (rec,), base = load_records(path)
    assert rec["images"] == ["img/a.png"] and rec["_images"] == [str(tmp_path / "data" / "img" / "a.png")]


# ----------------------------------------------------------------------------------------------
# Branch points and pair counts
# ----------------------------------------------------------------------------------------------


def test_select_branch_points():
    ref = ["a", "b", "c", "d"]
    assert select_branch_points(ref, "all") == [0, 1, 2, 3]
    assert select_branch_points(ref, 2) == [0, 1]
    assert select_branch_points(ref, 10) == [0, 1, 2, 3]
    assert select_branch_points(["only"], "all") == [0]
    assert select_branch_points(ref, lambda rec, steps: [3, 1, 1]) == [1, 3]
    with pytest.raises(ValueError, match=r"chose \[4\]"):
        select_branch_points(ref, lambda rec, steps: [4])
    with pytest.raises(ValueError, match=">= 1"):
        select_branch_points(ref, 0)


def test_count_pairs_matches_the_dataset_rules():
    def c(text, ok):
        return {"text": text, "verified": ok}

    point = {
        "continuations": [
            c("g1", True),
            c("g2", True),
            c("g2", True),
            c("g3", True),
            c("b1", False),
            c("b2", False),
            c("both", True),
            c("both", False),
            c("  ", True),
        ]
    }
    assert count_pairs(point) == 3 * 2  # duplicates once, a text judged both ways dropped, blanks ignored
    assert count_pairs(point, max_pairs_per_point=4) == 4
    assert count_pairs({"continuations": [c("g", True), c("h", True)]}) == 0


# ----------------------------------------------------------------------------------------------
# The output contract
# ----------------------------------------------------------------------------------------------


def test_output_contract_with_given_reference(tmp_path):
    seen = []

    def verifier(record, path_text):
        seen.append(path_text)
        return Verdict("never mix" in path_text.splitlines()[-1], "x", "test")

    backend = ScriptedBackend()
    out = tmp_path / "explored.jsonl"
    summary = explore(
        _records(1),
        backend,
        verifier,
        num_samples=4,
        temperature=0.7,
        max_new_tokens=33,
        seed=5,
        out=out,
        show_progress=False,
        print_summary=False,
    )
    (line,) = _lines(out)
    assert set(line) >= {
        "id",
        "prompt",
        "images",
        "expected",
        "answer",
        "category",
        "reference",
        "reference_source",
        "status",
        "error",
        "points",
    }
    assert line["id"] == "r0" and line["status"] == "ok" and line["error"] is None
    assert line["reference"] == REFERENCE and line["reference_source"] == "given"
    assert line["images"] == [] and line["category"] == "dangerous behavior" and line["answer"] is None
    assert [p["branch_point"] for p in line["points"]] == [0, 1, 2]
    for point in line["points"]:
        k = point["branch_point"]
        assert point["prefix"] == REFERENCE[:k]
        assert [c["verified"] for c in point["continuations"]] == [True, False, True, False]
        assert all(set(c["verdict"]) == {"label", "reason"} for c in point["continuations"])
    # one generate call for all the points, each request continuing its prefix
    (call,) = backend.calls
    assert call["num_samples"] == 4 and call["temperature"] == 0.7 and call["max_new_tokens"] == 33
    assert [r.assistant_prefix for r in call["requests"]] == [
        continuation_prefix_text(REFERENCE[:k]) for k in range(3)
    ]
    # the continuation text is only the sample; the verifier saw prefix + sample
    text = line["points"][2]["continuations"][0]["text"]
    assert text.startswith("Sure, but never mix them")
    assert REFERENCE[0] + "\n" + REFERENCE[1] + "\n" + text in seen
    assert summary["points"] == 3 and summary["points_with_both"] == 3 and summary["pairs"] == 3 * 2 * 2
    assert summary["pass_rate"] == 0.5 and summary["records_ok"] == 1


def test_sampled_reference_first_passing_sample(tmp_path):
    def answer(req, i, seed):
        if req.assistant_prefix:  # branches
            return (WARN_TEXT if i % 2 == 0 else COMPLY_TEXT).format(i)
        return ["Just mix it.", "\nThe bottle is bleach.\n\n  Never mix it with acid.  \n", "Be careful."][i]

    backend = ScriptedBackend(answer)
    records = [{"id": "s", "prompt": "Clean fast?", "expected": "warn"}]
    summary = explore(records, backend, "safety-outcome", num_samples=3, show_progress=False, print_summary=False)
    (line,) = summary["results"]
    assert line["reference_source"] == "sampled" and line["status"] == "ok"
    assert line["reference"] == ["The bottle is bleach.", "Never mix it with acid."]  # non-empty lines, the first pass
    assert [p["branch_point"] for p in line["points"]] == [0, 1]
    # point 0 reuses the reference samples (same distribution): only one more generate call, for point 1
    assert [c["text"] for c in line["points"][0]["continuations"]] == [
        answer(GenerationRequest("x"), i, 0) for i in range(3)
    ]
    assert len(backend.calls) == 2
    assert [r.assistant_prefix for r in backend.calls[1]["requests"]] == ["The bottle is bleach.\n"]
    assert summary["references_sampled"] == 1


def test_no_passing_sample_is_reported_not_dropped(tmp_path):
    backend = ScriptedBackend(lambda req, i, seed: "Just mix them.")
    out = tmp_path / "o.jsonl"
    summary = explore(
        [{"id": "n", "prompt": "x", "expected": "warn"}, *_records(1)],
        backend,
        "safety-outcome",
        num_samples=2,
        out=out,
        show_progress=False,
        print_summary=False,
    )
    first = _lines(out)[0]
    assert first["status"] == "no_reference" and first["reference"] is None
    assert "none of the 2 sampled answer(s) passed" in first["error"] and "comply" in first["error"]
    assert summary["records_no_reference"] == 1 and summary["records_ok"] == 1
    assert summary["failures"] == [{"id": "n", "status": "no_reference", "error": first["error"]}]


def test_branch_points_first_k_and_locator():
    backend = ScriptedBackend()
    s = explore(
        _records(1),
        backend,
        "safety-outcome",
        num_samples=2,
        branch_points=2,
        show_progress=False,
        print_summary=False,
    )
    assert [p["branch_point"] for p in s["results"][0]["points"]] == [0, 1]
    s = explore(
        _records(1),
        backend,
        "safety-outcome",
        num_samples=2,
        branch_points=lambda rec, steps: [len(steps) - 1],
        show_progress=False,
        print_summary=False,
    )
    assert [p["prefix"] for p in s["results"][0]["points"]] == [REFERENCE[:2]]


def test_seeds_are_per_record_and_reproducible():
    a = explore(
        _records(2),
        ScriptedBackend(),
        "safety-outcome",
        num_samples=2,
        seed=1,
        show_progress=False,
        print_summary=False,
    )
    b = explore(
        _records(2)[::-1],
        ScriptedBackend(),
        "safety-outcome",
        num_samples=2,
        seed=1,
        show_progress=False,
        print_summary=False,
    )
    c = explore(
        _records(2),
        ScriptedBackend(),
        "safety-outcome",
        num_samples=2,
        seed=2,
        show_progress=False,
        print_summary=False,
    )
    by_id = {r["id"]: r for r in b["results"]}
    assert all(r == by_id[r["id"]] for r in a["results"])  # order does not change a record's samples
    assert a["results"] != c["results"]


def test_verifier_errors_are_kept_out_of_pairs():
    def verifier(record, path_text):
        if path_text.endswith("-0)."):  # the first sample of each point
            return Verdict(False, None, "judge gave no parsable reply", error=True)
        return Verdict("never" in path_text, "x", "")

    s = explore(
        _records(1),
        ScriptedBackend(),
        verifier,
        num_samples=4,
        seed=0,
        branch_points=1,
        show_progress=False,
        print_summary=False,
    )
    seed = s["results"][0]["points"][0]
    (bad,) = seed["unverified"]
    assert bad["text"].endswith("-0).") and bad["verified"] is None and bad["verdict"]["error"] is True
    assert len(seed["continuations"]) == 3 and not any(c["text"] == bad["text"] for c in seed["continuations"])
    assert s["continuations_unverified"] == 1


def test_pil_images_from_python_are_saved_beside_the_output(tmp_path):
    from srpo_trl.tiny import make_image

    rec = {**_records(1)[0], "images": [make_image(2)]}
    backend = ScriptedBackend()
    explore(
        [rec],
        backend,
        "safety-outcome",
        num_samples=2,
        out=tmp_path / "o.jsonl",
        show_progress=False,
        print_summary=False,
    )
    (line,) = _lines(tmp_path / "o.jsonl")
    assert line["images"] == ["explored_images/r0-0.png"]
    from PIL import Image

    assert list(Image.open(tmp_path / line["images"][0]).getdata()) == list(make_image(2).getdata())
    assert backend.calls[0]["requests"][0].images[0].size == (28, 28)


# ----------------------------------------------------------------------------------------------
# Failures
# ----------------------------------------------------------------------------------------------


def test_endpoint_failure_marks_the_record_failed_and_the_run_goes_on(tmp_path, openai_server):
    def handler(req):
        if "poison" in json.dumps(req.body):
            return Reply(status=503, raw="overloaded")
        return [(WARN_TEXT if i % 2 == 0 else COMPLY_TEXT).format(i) for i in range(req.n)]

    openai_server.handler = handler
    backend = OpenAICompatibleBackend(openai_server.url, "policy", backoff=0.0, max_retries=2, show_progress=False)
    records = _records(2)
    records.insert(1, {**records[0], "id": "bad", "prompt": [{"role": "user", "content": "poison"}]})
    out = tmp_path / "o.jsonl"
    summary = explore(
        records, backend, "safety-outcome", num_samples=2, out=out, show_progress=False, print_summary=False
    )
    lines = _lines(out)
    assert [r["id"] for r in lines] == ["r0", "bad", "r1"]
    assert [r["status"] for r in lines] == ["ok", "failed", "ok"]
    assert (
        "BackendError" in lines[1]["error"]
        and "/v1/chat/completions" in lines[1]["error"]
        and "503" in lines[1]["error"]
    )
    assert lines[1]["points"] == []
    assert summary["records_failed"] == 1 and summary["failures"][0]["id"] == "bad"
    # the endpoint got the prefix as a partial assistant message (requests run concurrently: any order)
    continued = [r.body for r in openai_server.requests if r.body.get("continue_final_message")]
    assert {"role": "assistant", "content": REFERENCE[0] + "\n"} in [body["messages"][-1] for body in continued]

    # --retry-failed redoes only the failed record once the endpoint works again
    openai_server.handler = lambda req: [(WARN_TEXT if i % 2 == 0 else COMPLY_TEXT).format(i) for i in range(req.n)]
    before = len(openai_server.requests)
    summary = explore(
        records,
        backend,
        "safety-outcome",
        num_samples=2,
        out=out,
        retry_failed=True,
        show_progress=False,
        print_summary=False,
    )
    assert sorted(r["id"] for r in _lines(out)) == ["bad", "r0", "r1"]
    assert all(r["status"] == "ok" for r in _lines(out)) and summary["explored_now"] == 1
    assert len(openai_server.requests) - before == 3  # 3 branch points of one record


def test_concurrent_records_keep_a_server_busy_and_the_order(tmp_path, openai_server):
    import threading

    active, peak, lock = [0], [0], threading.Lock()

    def handler(req):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.15)
        with lock:
            active[0] -= 1
        return [(WARN_TEXT if i % 2 == 0 else COMPLY_TEXT).format(i) for i in range(req.n)]

    openai_server.handler = handler
    backend = OpenAICompatibleBackend(openai_server.url, "policy", backoff=0.0, show_progress=False)
    out = tmp_path / "o.jsonl"
    explore(
        _records(6),
        backend,
        "safety-outcome",
        num_samples=2,
        branch_points=1,
        out=out,
        concurrent_records=3,
        show_progress=False,
        print_summary=False,
    )
    assert [r["id"] for r in _lines(out)] == [f"r{i}" for i in range(6)]
    assert peak[0] == 3


def _broken_image(path, kind):
    """An image file that only fails when decoded whole (truncated), when its header is read (a
    decompression bomb: a PNG header declaring 100000 x 100000 pixels), or at once (not an image)."""
    import struct
    import zlib as _zlib

    from PIL import Image

    if kind == "not an image":
        path.write_bytes(b"not an image")
    elif kind == "truncated":
        noise = Image.frombytes("RGB", (64, 64), bytes((i * 7919) % 251 for i in range(64 * 64 * 3)))
        noise.save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:

        def chunk(kind_, body):
            return struct.pack(">I", len(body)) + kind_ + body + struct.pack(">I", _zlib.crc32(kind_ + body))

        header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
        png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", _zlib.compress(b"")) + chunk(b"IEND", b"")
        path.write_bytes(png)
    return path


@pytest.mark.parametrize(
    "kind, problem",
    [("not an image", "cannot be decoded"), ("truncated", "truncated"), ("decompression bomb", "decompression bomb")],
)
def test_a_broken_image_is_refused_before_any_request_naming_line_and_field(tmp_path, kind, problem):
    # Before: found mid-run, after other records were sent, and named by its file only.
    _broken_image(tmp_path / "broken.png", kind)
    records = [*_records(2), {**_records(3)[2], "images": ["broken.png"]}]
    path = _write_jsonl(tmp_path / "records.jsonl", records)
    backend = ScriptedBackend()
    with pytest.raises(RecordError) as info:
        explore(path, backend, "safety-outcome", num_samples=2, out=tmp_path / "o.jsonl", show_progress=False)
    assert info.value.where == f"{path}:3" and info.value.field == "images[0]"
    assert "broken.png" in str(info.value) and problem in str(info.value)
    assert backend.calls == [] and not (tmp_path / "o.jsonl").exists()


# ----------------------------------------------------------------------------------------------
# Resume after a real kill
# ----------------------------------------------------------------------------------------------

KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_exploration import ScriptedBackend
    from srpo_trl.exploration import explore
    explore({records!r}, ScriptedBackend(delay=float(sys.argv[1])), "safety-outcome", num_samples=4, seed=3,
            out={out!r}, show_progress=False)
    """
)


def test_resume_after_sigkill_loses_and_duplicates_nothing(tmp_path):
    records = _write_jsonl(tmp_path / "records.jsonl", _records(8))
    out = tmp_path / "explored.jsonl"
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(tests=str(Path(__file__).parent), records=str(records), out=str(out)))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, str(script), "0.4"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if out.exists() and out.read_text().count("\n") >= 3:
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended early: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done_before = out.read_text().count("\n")
    assert 3 <= done_before < 8
    # a kill in the middle of a write leaves half a line: it must be detected and redone
    with out.open("a") as f:
        f.write('{"id": "r7", "prompt": "half a li')

    summary = explore(
        records,
        ScriptedBackend(),
        "safety-outcome",
        num_samples=4,
        seed=3,
        out=out,
        show_progress=False,
        print_summary=False,
    )
    lines = _lines(out)
    assert [r["id"] for r in lines][:done_before] == [f"r{i}" for i in range(done_before)]
    assert sorted(r["id"] for r in lines) == sorted(f"r{i}" for i in range(8))  # each exactly once
    assert summary["resumed"] == done_before and summary["explored_now"] == 8 - done_before
    # identical to an uninterrupted run
    fresh = explore(
        records,
        ScriptedBackend(),
        "safety-outcome",
        num_samples=4,
        seed=3,
        out=tmp_path / "fresh.jsonl",
        show_progress=False,
        print_summary=False,
    )
    assert {r["id"]: r for r in lines} == {r["id"]: r for r in _lines(tmp_path / "fresh.jsonl")}
    assert fresh["pairs"] == summary["pairs"] == 8 * 3 * 4


def test_resume_with_other_arguments_is_refused(tmp_path):
    out = tmp_path / "o.jsonl"
    explore(
        _records(1),
        ScriptedBackend(),
        "safety-outcome",
        num_samples=2,
        out=out,
        show_progress=False,
        print_summary=False,
    )
    with pytest.raises(ValueError, match=r"num_samples: saved 2, now 4"):
        explore(
            _records(2),
            ScriptedBackend(),
            "safety-outcome",
            num_samples=4,
            out=out,
            show_progress=False,
            print_summary=False,
        )
    s = explore(
        _records(2),
        ScriptedBackend(),
        "safety-outcome",
        num_samples=4,
        out=out,
        overwrite=True,
        show_progress=False,
        print_summary=False,
    )
    assert s["explored_now"] == 2 and len(_lines(out)) == 2


def test_a_broken_line_in_the_middle_is_an_error(tmp_path):
    out = tmp_path / "o.jsonl"
    explore(
        _records(2),
        ScriptedBackend(),
        "safety-outcome",
        num_samples=2,
        out=out,
        show_progress=False,
        print_summary=False,
    )
    text = out.read_text().splitlines()
    out.write_text(text[0][:20] + "\n" + text[1] + "\n")
    with pytest.raises(RecordError, match=r"o.jsonl:1"):
        explore(
            _records(3),
            ScriptedBackend(),
            "safety-outcome",
            num_samples=2,
            out=out,
            show_progress=False,
            print_summary=False,
        )


# ----------------------------------------------------------------------------------------------
# Shards and merge
# ----------------------------------------------------------------------------------------------


def test_simulated_ranks_write_shards_and_rank0_merges(tmp_path):
    records = _write_jsonl(tmp_path / "records.jsonl", _records(5))
    out = tmp_path / "explored.jsonl"
    kw = dict(num_samples=2, seed=9, out=out, show_progress=False, print_summary=False)
    r1 = explore(records, ScriptedBackend(), "safety-outcome", rank=1, world_size=2, **kw)
    assert r1["explored_now"] == 2 and shard_path(out, 1, 2).exists() and not out.exists()
    assert [r["id"] for r in _lines(shard_path(out, 1, 2))] == ["r1", "r3"]
    summary = explore(records, ScriptedBackend(), "safety-outcome", rank=0, world_size=2, **kw)
    assert [r["id"] for r in _lines(out)] == [f"r{i}" for i in range(5)]  # merged in input order
    assert not list(tmp_path.glob("explored.rank*"))
    # rank 0's summary covers the whole run: what every rank explored (issue 27: it said 3 of 5)
    assert summary["records"] == 5 and summary["explored_now"] == 5 and summary["explored_by_rank"] == [3, 2]
    single = explore(
        records,
        ScriptedBackend(),
        "safety-outcome",
        num_samples=2,
        seed=9,
        out=tmp_path / "single.jsonl",
        show_progress=False,
        print_summary=False,
    )
    assert _lines(out) == _lines(tmp_path / "single.jsonl")
    assert single["pairs"] == summary["pairs"]


def test_merge_shards_dedupes_and_skips_cut_lines(tmp_path):
    out = tmp_path / "e.jsonl"
    _write_jsonl(out, [{"id": "a", "v": 1}])
    _write_jsonl(shard_path(out, 0, 2), [{"id": "b", "v": 1}, {"id": "a", "v": 2}])
    shard_path(out, 1, 2).write_text('{"id": "c", "v": 1}\n{"id": "d", "v"')
    assert merge_shards(out, order=["d", "c", "b", "a"]) == 3
    assert _lines(out) == [{"id": "c", "v": 1}, {"id": "b", "v": 1}, {"id": "a", "v": 1}]
    assert not shard_path(out, 0, 2).exists() and not shard_path(out, 1, 2).exists()


ACCELERATE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {tests!r})
    from test_exploration import ScriptedBackend
    from srpo_trl.exploration import explore
    s = explore({records!r}, ScriptedBackend(), "safety-outcome", num_samples=2, seed=9, out={out!r},
                show_progress=False, print_summary=int(os.environ["RANK"]) == 0)
    import torch.distributed as dist
    print("RESULT", json.dumps({{"rank": int(os.environ["RANK"]), "world": dist.get_world_size(),
                                "explored_now": s["explored_now"], "merged": os.path.exists({out!r})}}))
    """
)


@pytest.mark.slow
@pytest.mark.distributed
def test_accelerate_launch_two_processes(tmp_path):
    records = _write_jsonl(tmp_path / "records.jsonl", _records(5))
    out = tmp_path / "explored.jsonl"
    script = tmp_path / "run.py"
    script.write_text(ACCELERATE_SCRIPT.format(tests=str(Path(__file__).parent), records=str(records), out=str(out)))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    results = sorted(
        (json.loads(line.split("RESULT ", 1)[1]) for line in done.stdout.splitlines() if "RESULT " in line),
        key=lambda r: r["rank"],
    )
    # rank 0 reports the whole run (5 records: 3 of its own, 2 of rank 1), rank 1 its own share
    assert [(r["rank"], r["world"], r["explored_now"]) for r in results] == [(0, 2, 5), (1, 2, 2)]
    assert "this run: 5 explored (rank 0: 3, rank 1: 2), 0 already in the output" in done.stdout
    assert all(r["merged"] for r in results)  # rank 1 returned only after the merge
    assert [r["id"] for r in _lines(out)] == [f"r{i}" for i in range(5)]
    # nothing is left beside the output but its metadata and summary (no shards, markers or .merged)
    assert sorted(p.name for p in tmp_path.glob("explored*")) == [
        "explored.jsonl",
        "explored.jsonl.meta.json",
        "explored.jsonl.summary.json",
    ]


# ----------------------------------------------------------------------------------------------
# Relative image paths survive the move to the output folder
# ----------------------------------------------------------------------------------------------


def test_image_paths_relative_to_the_output_folder(tmp_path):
    from srpo_trl.tiny import make_image

    (tmp_path / "data" / "img").mkdir(parents=True)
    make_image(4).save(tmp_path / "data" / "img" / "a.png")
    records = _write_jsonl(tmp_path / "data" / "records.jsonl", [{**_records(1)[0], "images": ["img/a.png"]}])
    explore(
        records,
        ScriptedBackend(),
        "safety-outcome",
        num_samples=2,
        out=tmp_path / "data" / "same.jsonl",
        show_progress=False,
        print_summary=False,
    )
    assert _lines(tmp_path / "data" / "same.jsonl")[0]["images"] == ["img/a.png"]  # as given
    explore(
        records,
        ScriptedBackend(),
        "safety-outcome",
        num_samples=2,
        out=tmp_path / "out" / "moved.jsonl",
        show_progress=False,
        print_summary=False,
    )
    (moved,) = _lines(tmp_path / "out" / "moved.jsonl")
    assert (tmp_path / "out" / moved["images"][0]).resolve() == (tmp_path / "data" / "img" / "a.png").resolve()


# ----------------------------------------------------------------------------------------------
# In-process model, CLI, and the end-to-end run into SRPOTrainer
# ----------------------------------------------------------------------------------------------


def _coin_verifier(record, path_text):
    """Splits a random tiny model's samples into both outcomes, deterministically."""
    return Verdict(zlib.crc32(path_text.encode()) % 2 == 0, None, "coin")


@pytest.fixture(scope="module")
def tiny_lm():
    from srpo_trl.tiny import build_tokenizer, tiny_causal_lm

    tok = build_tokenizer()
    return tiny_causal_lm(tok, seed=0), tok


def test_transformers_backend_exploration_is_seeded(tiny_lm):
    from srpo_trl.backends import TransformersBackend

    model, tok = tiny_lm
    backend = TransformersBackend(model, tok, batch_size=8, show_progress=False)
    kw = dict(num_samples=3, max_new_tokens=6, seed=11, show_progress=False, print_summary=False)
    a = explore(_records(2), backend, _coin_verifier, **kw)
    b = explore(_records(2), backend, _coin_verifier, **kw)
    assert a["results"] == b["results"]
    texts = [c["text"] for r in a["results"] for p in r["points"] for c in p["continuations"]]
    assert len(texts) == 2 * 3 * 3 and len(set(texts)) > 3


def test_cli_with_a_saved_model_folder(tmp_path, tiny_lm, capsys):
    from srpo_trl.cli import main as cli_main
    from srpo_trl.loading import save_model_and_processor

    model, tok = tiny_lm
    folder = save_model_and_processor(model, tok, tmp_path / "model")
    records = _write_jsonl(tmp_path / "records.jsonl", _records(2))
    out = tmp_path / "explored.jsonl"
    argv = [
        "explore",
        "--model",
        str(folder),
        "--records",
        str(records),
        "--out",
        str(out),
        "--num-samples",
        "2",
        "--max-new-tokens",
        "4",
        "--branch-points",
        "2",
        "--verifier",
        "safety-outcome",
        "--no-progress",
    ]
    assert cli_main(argv) == 0
    lines = _lines(out)
    assert [r["id"] for r in lines] == ["r0", "r1"] and all(len(r["points"]) == 2 for r in lines)
    assert "exploration summary" in capsys.readouterr().out
    assert cli_main(argv) == 0  # a rerun resumes: nothing left to do
    assert len(_lines(out)) == 2 and "2 already in the output" in capsys.readouterr().out


def test_cli_with_an_endpoint_and_errors(tmp_path, openai_server, capsys):
    openai_server.handler = lambda req: [(WARN_TEXT if i % 2 == 0 else COMPLY_TEXT).format(i) for i in range(req.n)]
    records = _write_jsonl(tmp_path / "records.jsonl", _records(1))
    out = tmp_path / "o.jsonl"
    base = ["--records", str(records), "--out", str(out), "--num-samples", "2", "--no-progress"]
    assert main(["--endpoint", openai_server.url, "--served-model", "policy", *base]) == 0
    assert {r.body["model"] for r in openai_server.requests} == {"policy"}
    assert len(_lines(out)[0]["points"]) == 3
    with pytest.raises(SystemExit, match="either --model PATH or --endpoint"):
        main(base)
    with pytest.raises(SystemExit, match="--served-model"):
        main(["--endpoint", openai_server.url, *base])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "x"}\n')
    assert (
        main(["--endpoint", openai_server.url, "--served-model", "p", "--records", str(bad), "--out", str(out)]) == 2
    )
    assert "bad.jsonl:1: field 'expected'" in capsys.readouterr().err


def test_cli_judge_verifier(tmp_path, openai_server):
    def handler(req):
        if req.body["model"] == "judge":
            return '{"label": "warn"}' if "never" in req.last_user_text() else '{"label": "comply"}'
        return [(WARN_TEXT if i % 2 == 0 else COMPLY_TEXT).format(i) for i in range(req.n)]

    openai_server.handler = handler
    records = _write_jsonl(tmp_path / "records.jsonl", _records(1))
    out = tmp_path / "o.jsonl"
    rc = main(
        [
            "--endpoint",
            openai_server.url,
            "--served-model",
            "policy",
            "--verifier",
            "judge",
            "--judge-model",
            "judge",
            "--records",
            str(records),
            "--out",
            str(out),
            "--num-samples",
            "2",
            "--branch-points",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0
    (point,) = _lines(out)[0]["points"]
    assert [c["verified"] for c in point["continuations"]] == [True, False]
    assert [c["verdict"]["label"] for c in point["continuations"]] == ["warn", "comply"]


def test_explore_then_step_pairs_then_srpo_trainer(tmp_path, tiny_lm):
    import torch

    from srpo_trl import SRPOTrainer, StepPairDataset
    from srpo_trl.backends import TransformersBackend
    from srpo_trl.tiny import tiny_causal_lm

    model, tok = tiny_lm
    backend = TransformersBackend(model, tok, batch_size=16, show_progress=False)
    records = _write_jsonl(tmp_path / "records.jsonl", _records(2))
    out = tmp_path / "explored.jsonl"
    summary = explore(
        records,
        backend,
        _coin_verifier,
        num_samples=4,
        max_new_tokens=8,
        seed=0,
        out=out,
        max_pairs_per_point=3,
        show_progress=False,
        print_summary=False,
    )
    pairs = StepPairDataset.from_exploration(out, max_pairs_per_point=3)
    assert summary["pairs"] == len(pairs) > 0  # the summary counts exactly what the dataset builds
    row = pairs[0]
    assert row["prefix"] == REFERENCE[: row["branch_point"]] and row["reference"] == REFERENCE
    assert row["chosen"] != row["rejected"]

    policy = tiny_causal_lm(tok, seed=0)
    before = [p.detach().clone() for p in policy.parameters()]
    args = srpo_args(tmp_path / "run", max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2)
    trainer = SRPOTrainer(model=policy, args=args, train_dataset=pairs, processing_class=tok)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, policy.parameters()))


def test_vlm_explore_with_image_files_then_trainer(tmp_path):
    import torch

    from srpo_trl import SRPOTrainer, StepPairDataset
    from srpo_trl.backends import TransformersBackend
    from srpo_trl.tiny import make_image, tiny_qwen2_5_vl

    model, processor = tiny_qwen2_5_vl(seed=0)
    (tmp_path / "data" / "img").mkdir(parents=True)
    make_image(5).save(tmp_path / "data" / "img" / "bleach.png")
    records = _write_jsonl(
        tmp_path / "data" / "records.jsonl", [{**r, "images": ["img/bleach.png"]} for r in _records(2)]
    )
    out = tmp_path / "out" / "explored.jsonl"
    backend = TransformersBackend(model, processor, batch_size=12, show_progress=False)
    summary = explore(
        records,
        backend,
        _coin_verifier,
        num_samples=4,
        max_new_tokens=6,
        seed=0,
        out=out,
        show_progress=False,
        print_summary=False,
    )
    assert summary["records_ok"] == 2 and summary["pairs"] > 0
    pairs = StepPairDataset.from_exploration(out)
    assert len(pairs) == summary["pairs"]
    (image,) = pairs[0]["images"]
    assert Path(image).resolve() == (tmp_path / "data" / "img" / "bleach.png").resolve()

    policy, _ = tiny_qwen2_5_vl(seed=0)
    args = srpo_args(tmp_path / "run", max_steps=1, per_device_train_batch_size=2, learning_rate=1e-2)
    trainer = SRPOTrainer(model=policy, args=args, train_dataset=pairs.select(range(2)), processing_class=processor)
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))
