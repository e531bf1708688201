"""Resume fingerprints and output locks (issue 13, items 2 and 3): each case below used to mix results
silently (rc 0); now the rerun is refused before any work, names what changed and offers --overwrite."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import pytest
from test_exploration import ScriptedBackend, _records, _write_jsonl

from srpo_trl import store
from srpo_trl.cli.explore import main as explore_main
from srpo_trl.exploration import explore


KW = dict(show_progress=False, print_summary=False)


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    from srpo_trl.loading import save_model_and_processor
    from srpo_trl.tiny import build_tokenizer, tiny_causal_lm

    tok = build_tokenizer()
    return save_model_and_processor(tiny_causal_lm(tok, seed=0), tok, tmp_path_factory.mktemp("m") / "model-a")


# -- explore --------------------------------------------------------------------------------------


def test_explore_with_another_model_is_refused(tmp_path, tiny_lm_dir, capsys):
    other = shutil.copytree(tiny_lm_dir, tmp_path / "model-b")
    records = _write_jsonl(tmp_path / "records.jsonl", _records(2))
    out = tmp_path / "explored.jsonl"
    base = [
        "--records",
        str(records),
        "--out",
        str(out),
        "--num-samples",
        "2",
        "--max-new-tokens",
        "3",
        "--branch-points",
        "1",
        "--no-progress",
    ]
    assert explore_main(["--model", str(tiny_lm_dir), *base]) == 0
    before = out.read_bytes()
    assert explore_main(["--model", str(other), *base]) == 2
    err = capsys.readouterr().err
    assert "was written with other settings (policy: saved" in err and "model-b" in err and "--overwrite" in err
    assert out.read_bytes() == before  # nothing added
    assert explore_main(["--model", str(other), *base, "--overwrite"]) == 0
    assert [r["id"] for r in _lines(out)] == ["r0", "r1"]


def test_explore_with_another_records_file_reusing_ids_is_refused(tmp_path):
    first = _write_jsonl(tmp_path / "a.jsonl", _records(2))
    second = _write_jsonl(tmp_path / "b.jsonl", [dict(r, prompt="another question") for r in _records(3)])
    out = tmp_path / "o.jsonl"
    explore(first, ScriptedBackend(), "safety-outcome", num_samples=2, out=out, **KW)
    backend = ScriptedBackend()
    with pytest.raises(store.FingerprintMismatch, match=r"records: saved \"[0-9a-f]{16}"):
        explore(second, backend, "safety-outcome", num_samples=2, out=out, **KW)
    assert backend.calls == [] and len(_lines(out)) == 2  # refused before any work
    s = explore(second, ScriptedBackend(), "safety-outcome", num_samples=2, out=out, overwrite=True, **KW)
    assert s["explored_now"] == 3 and {r["prompt"] for r in _lines(out)} == {"another question"}


def test_explore_with_the_fingerprint_deleted_is_refused(tmp_path):
    records = _write_jsonl(tmp_path / "r.jsonl", _records(2))
    out = tmp_path / "o.jsonl"
    explore(records, ScriptedBackend(), "safety-outcome", num_samples=2, out=out, **KW)
    store.meta_path(out).unlink()
    for n in (4, 2):  # another --num-samples, and even the same arguments: nothing says what made the file
        backend = ScriptedBackend()
        with pytest.raises(store.FingerprintMismatch, match=r"o\.jsonl\.meta\.json .* is missing.*--overwrite"):
            explore(records, backend, "safety-outcome", num_samples=n, out=out, **KW)
        assert backend.calls == []
    s = explore(records, ScriptedBackend(), "safety-outcome", num_samples=4, out=out, overwrite=True, **KW)
    assert s["explored_now"] == 2 and all(len(p["continuations"]) == 4 for r in _lines(out) for p in r["points"])


def test_explore_with_changed_num_samples_is_refused_before_any_work(tmp_path):
    records = _write_jsonl(tmp_path / "r.jsonl", _records(2))
    out = tmp_path / "o.jsonl"
    explore(records, ScriptedBackend(), "safety-outcome", num_samples=2, out=out, **KW)
    backend = ScriptedBackend()
    with pytest.raises(store.FingerprintMismatch, match=r"num_samples: saved 2, now 4"):
        explore(records, backend, "safety-outcome", num_samples=4, out=out, **KW)
    assert backend.calls == []


def test_two_concurrent_explore_runs_on_one_output(tmp_path):
    records = _write_jsonl(tmp_path / "r.jsonl", _records(4))
    out = tmp_path / "o.jsonl"
    result = {}

    def first():
        result["s"] = explore(records, ScriptedBackend(delay=0.3), "safety-outcome", num_samples=2, out=out, **KW)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not (out.exists() and out.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(store.OutputLocked, match=r"another explore run is writing .*o\.jsonl"):
            explore(records, ScriptedBackend(), "safety-outcome", num_samples=2, out=out, **KW)
    finally:
        thread.join(timeout=60)
    assert result["s"]["explored_now"] == 4
    assert sorted(r["id"] for r in _lines(out)) == ["r0", "r1", "r2", "r3"]  # each once
    assert not (tmp_path / "o.jsonl.lock").exists()


def test_from_exploration_keeps_the_first_line_of_each_id_and_reports_duplicates(tmp_path, caplog):
    from srpo_trl.dataset import StepPairDataset

    out = tmp_path / "o.jsonl"
    explore(_records(2), ScriptedBackend(), "safety-outcome", num_samples=2, out=out, **KW)
    lines = _lines(out)
    stale = dict(lines[0], prompt="an older prompt")
    _write_jsonl(out, [*lines, stale])  # what two runs appending to one output left behind
    with caplog.at_level("WARNING"):
        ds = StepPairDataset.from_exploration(out)
    assert ds.report["records_duplicate"] == 1 and ds.report["records"] == 3
    assert {row["prompt"][0]["content"] if isinstance(row["prompt"], list) else row["prompt"] for row in ds} == {
        r["prompt"][0]["content"] for r in lines
    }
    assert len(ds) == len(StepPairDataset.from_exploration(lines))
    assert "repeat an id" in caplog.text and "r0" in caplog.text


# -- evaluate -------------------------------------------------------------------------------------


def test_evaluate_with_new_weights_in_the_same_folder_is_refused(tmp_path, tiny_lm_dir, capsys):
    from srpo_trl.cli import main as cli_main
    from srpo_trl.loading import save_model_and_processor
    from srpo_trl.tiny import build_tokenizer, tiny_causal_lm

    folder = shutil.copytree(tiny_lm_dir, tmp_path / "model")
    data = _write_jsonl(
        tmp_path / "items.jsonl", [{"id": f"q{i}", "prompt": f"question {i}", "expected": "refuse"} for i in range(2)]
    )
    out = tmp_path / "report"
    argv = [
        "evaluate",
        "--model",
        str(folder),
        "--benchmark",
        "records",
        "--data",
        str(data),
        "--samples",
        "1",
        "--temperature",
        "0.5",
        "--max-new-tokens",
        "3",
        "--label",
        "m",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert cli_main(argv) == 0
    state = out / "runs" / "m" / "results.jsonl"
    before = state.read_bytes()
    time.sleep(0.01)
    tok = build_tokenizer()
    save_model_and_processor(tiny_causal_lm(tok, seed=1), tok, folder)  # training saved new weights here
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert "was written with other settings (model: saved" in err and "--overwrite" in err
    assert state.read_bytes() == before
    assert cli_main([*argv, "--overwrite"]) == 0


# -- generate-records -----------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path):
    from PIL import Image

    d = tmp_path / "images"
    d.mkdir()
    Image.new("RGB", (28, 28), (200, 10, 10)).save(d / "bleach.png")
    return d


def test_generate_records_with_changed_max_steps_is_refused(openai_server, images, tmp_path):
    from test_records_pipeline import Agents, run

    agents = Agents()
    openai_server.handler = agents
    out = tmp_path / "records.jsonl"
    run(openai_server, images, out, per_image=1, benign_per_image=0)
    before, calls = out.read_bytes(), sum(agents.calls.values())
    with pytest.raises(store.FingerprintMismatch, match=r"max_steps: saved 8, now 3.*--overwrite"):
        run(openai_server, images, out, per_image=1, benign_per_image=0, max_steps=3)
    assert out.read_bytes() == before and sum(agents.calls.values()) == calls  # no agent was asked
    run(openai_server, images, out, per_image=2, benign_per_image=0)  # more items per image: a plain resume
    assert len(_lines(out)) == 2


@pytest.mark.parametrize("change", ["changed", "added", "removed"])
def test_generate_records_with_other_images_is_refused(openai_server, images, tmp_path, change):
    from PIL import Image
    from test_records_pipeline import Agents, run

    Image.new("RGB", (28, 28), (10, 200, 10)).save(images / "garden.png")
    agents = Agents()
    openai_server.handler = agents
    out = tmp_path / "records.jsonl"
    run(openai_server, images, out, per_image=1, benign_per_image=0)
    before, calls = out.read_bytes(), sum(agents.calls.values())
    if change == "changed":  # same name and size, other pixels: only a content hash sees it
        Image.new("RGB", (28, 28), (10, 10, 200)).save(images / "garden.png")
    elif change == "added":
        (images / "sub").mkdir()
        Image.new("RGB", (28, 28), (90, 90, 90)).save(images / "sub" / "new.png")
    else:
        (images / "garden.png").unlink()
    name = "sub/new.png" if change == "added" else "garden.png"
    with pytest.raises(store.FingerprintMismatch, match=rf"images: saved .*{name}.*--overwrite"):
        run(openai_server, images, out, per_image=1, benign_per_image=0)
    assert out.read_bytes() == before and sum(agents.calls.values()) == calls  # no agent was asked
    s = _run_overwrite(openai_server, images, out)
    assert s["items"]["done"] == {"changed": 2, "added": 3, "removed": 1}[change]


def test_generate_records_cli_with_a_changed_image_is_refused_before_any_call(openai_server, images, tmp_path, capsys):
    from PIL import Image
    from test_records_pipeline import Agents

    from srpo_trl.records import main_generate

    agents = Agents()
    openai_server.handler = agents
    out = tmp_path / "records.jsonl"
    argv = ["--images", str(images), "--endpoint", openai_server.url + "/v1", "--served-model", "m"]
    argv += ["--per-image", "1", "--benign-per-image", "0", "--out", str(out), "--no-progress"]
    assert main_generate(argv) == 0
    calls = sum(agents.calls.values())
    Image.new("RGB", (28, 28), (0, 0, 0)).save(images / "bleach.png")
    capsys.readouterr()
    assert main_generate(argv) == 1
    err = capsys.readouterr().err
    assert "images: saved" in err and "bleach.png" in err and "--overwrite" in err
    assert sum(agents.calls.values()) == calls
    assert main_generate([*argv, "--overwrite"]) == 0 and sum(agents.calls.values()) > calls


def _run_overwrite(server, images, out):
    from srpo_trl.backends import OpenAICompatibleBackend
    from srpo_trl.records.pipeline import PipelineConfig, generate_records

    backend = OpenAICompatibleBackend(
        server.url + "/v1", "agent-model", max_retries=0, backoff=0.0, show_progress=False
    )
    cfg = PipelineConfig(per_image=1, benign_per_image=0, show_progress=False, generator={"model": "agent-model"})
    return generate_records(backend, images, out, cfg, overwrite=True)


def test_generate_records_images_touched_or_copied_still_resume(openai_server, images, tmp_path):
    from test_records_pipeline import Agents, run

    agents = Agents()
    openai_server.handler = agents
    out = tmp_path / "records.jsonl"
    run(openai_server, images, out, per_image=1, benign_per_image=0)
    calls = sum(agents.calls.values())
    os.utime(images / "bleach.png", (1, 1))  # same contents, another mtime (a copied folder)
    s = run(openai_server, images, out, per_image=1, benign_per_image=0)
    assert s["items"]["done"] == 1 and sum(agents.calls.values()) == calls  # a plain resume, nothing redone


def test_generate_records_with_fewer_items_per_image_is_refused(openai_server, images, tmp_path):
    from test_records_pipeline import Agents, run

    agents = Agents()
    openai_server.handler = agents
    out = tmp_path / "records.jsonl"
    run(openai_server, images, out, per_image=2, benign_per_image=1)
    before, calls = out.read_bytes(), sum(agents.calls.values())
    for kw, msg in (
        (dict(per_image=1, benign_per_image=1), r"per_image: saved 2, now 1"),
        (dict(per_image=2, benign_per_image=0), r"benign_per_image: saved 1, now 0"),
    ):
        with pytest.raises(store.FingerprintMismatch, match=msg + ".*--overwrite"):
            run(openai_server, images, out, **kw)
        assert out.read_bytes() == before and sum(agents.calls.values()) == calls
    s = run(openai_server, images, out, per_image=3, benign_per_image=2)  # more: the earlier items are kept
    assert s["items"] == {"planned": 5, "done": 5, "failed": 0, "pending": 0}
    assert out.read_bytes().startswith(before)
    assert json.loads(store.meta_path(out).read_text())["per_image"] == 3  # the larger plan is recorded
    with pytest.raises(store.FingerprintMismatch, match=r"per_image: saved 3, now 2"):
        run(openai_server, images, out, per_image=2, benign_per_image=2)


# -- the store's pieces ----------------------------------------------------------------------------


def test_credentials_are_redacted_from_fingerprints():
    fp = store.endpoint_fingerprint("https://user:s3cret@host:8000/v1?api_key=abc&x=1/", "m")
    assert "s3cret" not in json.dumps(fp) and "abc" not in json.dumps(fp)
    assert fp["endpoint"].startswith("https://***@host:8000/v1?api_key=***")


def test_model_fingerprint_follows_weight_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"a" * 10)
    (tmp_path / "README.md").write_text("x")
    a = store.model_fingerprint(tmp_path)
    (tmp_path / "README.md").write_text("changed")  # not a weight file
    assert store.model_fingerprint(tmp_path) == a
    (tmp_path / "model.safetensors").write_bytes(b"b" * 11)
    assert store.model_fingerprint(tmp_path)["model"]["weights"] != a["model"]["weights"]


def test_from_exploration_leaves_out_a_line_cut_by_a_kill(tmp_path, caplog):
    from srpo_trl.dataset import StepPairDataset

    out = tmp_path / "o.jsonl"
    explore(_records(2), ScriptedBackend(), "safety-outcome", num_samples=2, out=out, **KW)
    whole = len(StepPairDataset.from_exploration(out))
    with out.open("a") as f:
        f.write('{"id": "r9", "points": [{"branch')  # an explore run killed mid-write
    with caplog.at_level("WARNING"):
        ds = StepPairDataset.from_exploration(out)
    assert len(ds) == whole and ds.report["records"] == 2 and "line 3 is incomplete" in caplog.text
    out.write_text(out.read_text().replace('{"id": "r9"', '{"id": "r9"}\n{"id": "r9"', 1) + "\n{}\n")
    with pytest.raises(ValueError, match=r"o\.jsonl:4: not valid JSON"):
        StepPairDataset.from_exploration(out)


# -- curate ---------------------------------------------------------------------------------------


@pytest.fixture
def curation(tmp_path):
    """A records file, its review file (exported, every row accepted) and where the import writes."""
    from PIL import Image
    from test_records_curate import _read_csv, _record, _write_csv

    from srpo_trl.records import export_review

    (tmp_path / "data" / "imgs").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "imgs" / "a.png")
    recs = tmp_path / "data" / "records.jsonl"
    recs.write_text("".join(json.dumps(_record(f"r{i}")) + "\n" for i in range(3)))
    review = tmp_path / "data" / "review.csv"
    export_review(recs, review)
    rows = _read_csv(review)
    _write_csv(review, [dict(r, decision="accept") for r in rows])
    return recs, review, tmp_path / "data" / "curated.jsonl"


def test_curate_export_from_other_records_is_refused_and_a_review_is_never_replaced(curation, capsys):
    from test_records_curate import _record

    from srpo_trl.records import export_review, main_curate

    recs, review, _ = curation
    reviewed = review.read_bytes()  # holds the reviewer's decisions
    with pytest.raises(FileExistsError, match=r"exported from the same records.*nothing written.*--overwrite"):
        export_review(recs, review)
    with recs.open("a") as fh:
        fh.write(json.dumps(_record("r9")) + "\n")
    with pytest.raises(store.FingerprintMismatch, match=r"records_sha256: saved .*--overwrite.*another review file"):
        export_review(recs, review)
    assert main_curate(["export", str(recs), str(review)]) == 1
    assert "records_sha256: saved" in capsys.readouterr().err
    with pytest.raises(store.FingerprintMismatch, match=r"image_root: saved .*, now .*other"):
        export_review(recs, review, image_root=recs.parent.parent / "other")
    assert review.read_bytes() == reviewed
    store.meta_path(review).unlink()  # nothing says what the review was exported from
    with pytest.raises(store.FingerprintMismatch, match=r"review\.csv\.meta\.json .* is missing.*--overwrite"):
        export_review(recs, review)
    assert review.read_bytes() == reviewed
    assert main_curate(["export", str(recs), str(review), "--overwrite"]) == 0
    assert review.read_bytes() != reviewed and "r9" in review.read_text()
    assert json.loads(store.meta_path(review).read_text())["records_sha256"] == store.file_sha256(recs)


def test_curate_import_again_is_idempotent_and_another_review_is_refused_before_any_row(curation, capsys):
    from test_records_curate import _read_csv, _write_csv

    from srpo_trl.records import import_review, main_curate

    _, review, out = curation
    assert len(import_review(review, out).records) == 3
    first = out.read_bytes()
    assert len(import_review(review, out).records) == 3 and out.read_bytes() == first  # same review: same file
    rows = _read_csv(review)
    _write_csv(review, [dict(rows[0], decision="maybe"), *rows[1:]])  # changed, and a bad row in it
    with pytest.raises(store.FingerprintMismatch, match=r"review_sha256: saved .*--overwrite.*another --out"):
        import_review(review, out)  # refused before the rows are read (else: ReviewError for 'maybe')
    assert main_curate(["import", str(review), "--out", str(out)]) == 1
    assert "review_sha256: saved" in capsys.readouterr().err
    _write_csv(review, [dict(rows[0], decision="reject"), *rows[1:]])
    with pytest.raises(store.FingerprintMismatch, match=r"review_sha256: saved"):
        import_review(review, out)
    assert out.read_bytes() == first
    assert main_curate(["import", str(review), "--out", str(out), "--overwrite"]) == 0
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["r1", "r2"]
    with pytest.raises(store.FingerprintMismatch, match=r"skip_invalid: saved false, now true"):
        import_review(review, out, skip_invalid=True)
    store.meta_path(out).unlink()
    with pytest.raises(store.FingerprintMismatch, match=r"curated\.jsonl\.meta\.json .* is missing.*--overwrite"):
        import_review(review, out)
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["r1", "r2"]


def test_curate_refuses_while_another_curate_writes_the_same_output(curation):
    from srpo_trl.records import export_review, import_review

    recs, review, out = curation
    with store.output_lock(out.with_name(out.name + ".lock"), "curate import", out):
        with pytest.raises(store.OutputLocked, match=r"another curate import run is writing .*curated\.jsonl"):
            import_review(review, out)
    other = review.with_name("second.csv")
    with store.output_lock(other.with_name(other.name + ".lock"), "curate export", other):
        with pytest.raises(store.OutputLocked, match=r"another curate export run is writing .*second\.csv"):
            export_review(recs, other)
    assert not out.exists() and not other.exists()
    assert len(import_review(review, out).records) == 3 and export_review(recs, other) == 3
