"""Credentials in an endpoint URL never reach logs, journals, failed-item files, records or metadata;
image paths from records and review files stay inside the declared root (--images) unless
--allow-outside-root."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from openai_server import Reply


SECRET = "s3cretpw"


def _with_credentials(url: str) -> str:
    return url.replace("http://", f"http://alice:{SECRET}@")


def _assert_no_secret(folder: Path, logs: str):
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files, "nothing was written"
    for path in files:
        assert SECRET not in path.read_text(errors="replace"), path
    assert SECRET not in logs


def test_generate_records_never_writes_the_url_credentials(tmp_path, openai_server, caplog):
    from PIL import Image
    from test_records_pipeline import Agents

    from srpo_trl.records import main_generate, output_paths

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (28, 28), (9, 9, 9)).save(images / "a.png")
    Image.new("RGB", (28, 28), (90, 9, 9)).save(images / "b.png")
    agents = Agents()
    calls = {"n": 0}

    def handler(req):  # the first image's items succeed, then the server breaks: records and failures both
        calls["n"] += 1
        return agents(req) if calls["n"] <= 5 else Reply(status=503, raw="busy")

    openai_server.handler = handler
    out = tmp_path / "out" / "records.jsonl"
    argv = [
        "--images",
        str(images),
        "--chat-url",
        _with_credentials(openai_server.url) + "/v1",
        "--model",
        "m",
        "--per-image",
        "1",
        "--benign-per-image",
        "0",
        "--workers",
        "1",
        "--http-retries",
        "0",
        "--out",
        str(out),
        "--no-progress",
    ]
    with caplog.at_level(logging.DEBUG):
        main_generate(argv)
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert records and records[0]["generator"]["url"] == openai_server.url.replace("http://", "http://***@") + "/v1"
    failed = output_paths(out)["failed"].read_text()
    assert "503" in failed and "://***@" in failed and "alice" not in failed
    assert openai_server.requests[0].headers.get("Authorization", "").startswith("Basic ")  # still sent, as auth
    _assert_no_secret(out.parent, caplog.text)


def test_explore_never_writes_the_url_credentials(tmp_path, openai_server, caplog):
    from test_exploration import _records, _write_jsonl

    from srpo_trl.cli.explore import main

    openai_server.handler = lambda req: Reply(status=503, raw="busy")
    (tmp_path / "in").mkdir()
    records = _write_jsonl(tmp_path / "in" / "records.jsonl", _records(1))
    out = tmp_path / "out" / "o.jsonl"
    with caplog.at_level(logging.DEBUG):
        main(
            [
                "--endpoint",
                _with_credentials(openai_server.url),
                "--served-model",
                "p",
                "--records",
                str(records),
                "--out",
                str(out),
                "--num-samples",
                "1",
                "--branch-points",
                "1",
                "--max-retries",
                "1",
                "--no-progress",
            ]
        )
    line = json.loads(out.read_text().splitlines()[0])
    assert "503" in line["error"] and "://***@" in line["error"] and "alice" not in line["error"]
    _assert_no_secret(out.parent, caplog.text)


def test_evaluate_never_writes_the_url_credentials(tmp_path, openai_server, caplog):
    from srpo_trl.cli import main as cli_main

    openai_server.handler = lambda req: "I must refuse."
    data = tmp_path / "data.jsonl"
    data.write_text('{"id": "a", "prompt": "p", "expected": "refuse"}\n')
    out = tmp_path / "o"
    with caplog.at_level(logging.DEBUG):
        rc = cli_main(
            [
                "evaluate",
                "--model",
                "m",
                "--generation-url",
                _with_credentials(openai_server.url),
                "--benchmark",
                "records",
                "--data",
                str(data),
                "--samples",
                "1",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
    assert rc == 0
    written = "".join(p.read_text() for p in out.rglob("*.json"))
    assert "://***@" in written and "alice" not in written
    _assert_no_secret(out, caplog.text)


# ---- image paths -----------------------------------------------------------------------------------


def _review(tmp_path, images_cell: str) -> Path:
    from PIL import Image
    from test_records_curate import _record, _write_csv

    from srpo_trl.records import export_review

    (tmp_path / "data" / "imgs").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "imgs" / "a.png")
    records = tmp_path / "data" / "records.jsonl"
    records.write_text(json.dumps(_record("r0")) + "\n")
    review = tmp_path / "data" / "review.csv"
    export_review(records, review)
    import csv

    with open(review, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    rows[0].update(decision="edit", images=images_cell)
    _write_csv(review, rows)
    return review


@pytest.mark.parametrize("cell", ["/etc/passwd", "../../../../../../../../etc/passwd"])
def test_curate_import_refuses_images_outside_the_root(tmp_path, cell, capsys):
    from srpo_trl.records import main_curate

    review = _review(tmp_path, cell)
    out = tmp_path / "curated.jsonl"
    assert main_curate(["import", str(review), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "field 'images'" in err and "outside the image root" in err and "--allow-outside-root" in err
    assert not out.exists()


def test_curate_import_root_is_declared_with_images_or_lifted(tmp_path, capsys):
    from PIL import Image

    from srpo_trl.records import main_curate

    shared = tmp_path / "shared"
    shared.mkdir()
    Image.new("RGB", (8, 8)).save(shared / "x.png")
    review = _review(tmp_path, "../shared/x.png")
    out = tmp_path / "curated.jsonl"
    assert main_curate(["import", str(review), "--out", str(out)]) == 1  # outside data/, the default root
    assert main_curate(["import", str(review), "--out", str(out), "--images", str(tmp_path)]) == 0
    assert json.loads(out.read_text())["images"] == ["shared/x.png"]
    # other arguments than the import that wrote `out`: --overwrite (tests/test_resume_safety.py covers the refusal)
    assert main_curate(["import", str(review), "--out", str(out), "--allow-outside-root", "--overwrite"]) == 0
    capsys.readouterr()
    assert main_curate(["import", str(review), "--out", str(out), "--images", str(shared / "sub"), "--overwrite"]) == 1
    assert "is outside the image root" in capsys.readouterr().err


def test_curate_export_refuses_record_images_outside_the_root(tmp_path, capsys):
    from PIL import Image
    from test_records_curate import _record

    from srpo_trl.records import main_curate

    (tmp_path / "data").mkdir()
    (tmp_path / "pics").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "pics" / "a.png")
    records = tmp_path / "data" / "records.jsonl"
    records.write_text(json.dumps(_record("r0", images=["../pics/a.png"])) + "\n")
    assert main_curate(["export", str(records), str(tmp_path / "review1.csv")]) == 1
    assert "outside the image root" in capsys.readouterr().err
    assert not (tmp_path / "review1.csv").exists()
    assert (
        main_curate(["export", str(records), str(tmp_path / "review2.csv"), "--images", str(tmp_path / "pics")]) == 0
    )
    assert main_curate(["export", str(records), str(tmp_path / "review3.csv"), "--allow-outside-root"]) == 0


def test_explore_refuses_record_images_outside_the_root(tmp_path, openai_server, capsys):
    from PIL import Image
    from test_exploration import _records, _write_jsonl

    from srpo_trl.cli.explore import main

    (tmp_path / "in").mkdir()
    (tmp_path / "pics").mkdir()
    Image.new("RGB", (28, 28)).save(tmp_path / "pics" / "a.png")
    records = _write_jsonl(tmp_path / "in" / "records.jsonl", _records(1, images=["../pics/a.png"]))
    base = [
        "--endpoint",
        openai_server.url,
        "--served-model",
        "p",
        "--records",
        str(records),
        "--num-samples",
        "1",
        "--branch-points",
        "1",
        "--no-progress",
    ]
    assert main([*base, "--out", str(tmp_path / "o1.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "images[0]" in err and "outside the image root" in err
    assert openai_server.requests == []  # refused before any request
    assert main([*base, "--out", str(tmp_path / "o2.jsonl"), "--images", str(tmp_path / "pics")]) == 0
    assert main([*base, "--out", str(tmp_path / "o3.jsonl"), "--allow-outside-root"]) == 0


def test_explore_fingerprint_file_holds_the_endpoint_without_credentials(tmp_path, openai_server):
    """The resume fingerprint (<out>.meta.json) names the endpoint through srpo_trl.http.redact_url."""
    from test_exploration import _records, _write_jsonl

    from srpo_trl import http, store
    from srpo_trl.cli.explore import main

    assert store.redact_url is http.redact_url  # one redaction rule for every file written
    openai_server.handler = lambda req: Reply(status=503, raw="busy")
    (tmp_path / "in").mkdir()
    records = _write_jsonl(tmp_path / "in" / "records.jsonl", _records(1))
    out = tmp_path / "out" / "o.jsonl"
    port = openai_server.url.rsplit(":", 1)[1]
    url = f"http://user:secret@127.0.0.1:{port}"
    main(
        [
            "--endpoint",
            url,
            "--served-model",
            "p",
            "--records",
            str(records),
            "--out",
            str(out),
            "--num-samples",
            "1",
            "--branch-points",
            "1",
            "--http-retries",
            "0",
            "--no-progress",
        ]
    )
    meta = store.meta_path(out)
    text = meta.read_text(encoding="utf-8")
    assert "secret" not in text and "user" not in text
    endpoints = []

    def walk(node):
        if isinstance(node, dict):
            endpoints.extend(v for k, v in node.items() if k == "endpoint")
            for v in node.values():
                walk(v)

    walk(json.loads(text))
    assert endpoints == [f"http://***@127.0.0.1:{port}"]
