"""The commands that talk to an endpoint (explore, evaluate --generation-url, generate-records) against a
server that trickles its reply: each ends in bounded time and reports the failure (before srpo_trl.http
they hung forever: the timeout bounded each socket read, not the request)."""

from __future__ import annotations

import json

from openai_server import Reply
from test_exploration import _records, _write_jsonl
from test_http import _bounded


def _trickle(openai_server):
    openai_server.handler = lambda req: Reply(trickle=0.3)


def test_explore_against_a_trickling_server_fails_the_record_in_bounded_time(tmp_path, openai_server):
    from srpo_trl.cli.explore import main

    _trickle(openai_server)
    records = _write_jsonl(tmp_path / "records.jsonl", _records(1))
    out = tmp_path / "o.jsonl"
    argv = [
        "--endpoint",
        openai_server.url,
        "--served-model",
        "p",
        "--records",
        str(records),
        "--out",
        str(out),
        "--num-samples",
        "2",
        "--branch-points",
        "1",
        "--timeout",
        "1",
        "--max-retries",
        "1",
        "--no-progress",
    ]
    result = _bounded(lambda: main(argv), 30)
    assert "error" not in result, result
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert "deadline" in line["error"] and "2 attempt" in line["error"]
    # the preflight's one attempt (does the server sample?), then the record's 2 attempts
    assert len(openai_server.requests) == 3


def test_evaluate_generation_url_against_a_trickling_server_ends_with_an_error(tmp_path, openai_server, capsys):
    from srpo_trl.cli import main as cli_main

    _trickle(openai_server)
    data = tmp_path / "data.jsonl"
    data.write_text('{"id": "a", "prompt": "p", "expected": "refuse"}\n')
    argv = [
        "evaluate",
        "--model",
        "m",
        "--generation-url",
        openai_server.url,
        "--benchmark",
        "records",
        "--data",
        str(data),
        "--samples",
        "1",
        "--out",
        str(tmp_path / "o"),
        "--timeout",
        "1",
        "--http-retries",
        "1",
        "--no-progress",
    ]
    result = _bounded(lambda: cli_main(argv), 30)
    assert result.get("value") == 1, result
    err = capsys.readouterr().err
    assert "deadline" in err and "2 attempt" in err
    assert len(openai_server.requests) == 2


def test_generate_records_against_a_trickling_server_reports_the_item_failed(tmp_path, openai_server):
    from PIL import Image

    from srpo_trl.records import main_generate, output_paths

    _trickle(openai_server)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (28, 28), (9, 9, 9)).save(images / "a.png")
    out = tmp_path / "records.jsonl"
    argv = [
        "--images",
        str(images),
        "--chat-url",
        openai_server.url + "/v1",
        "--model",
        "m",
        "--per-image",
        "1",
        "--benign-per-image",
        "0",
        "--out",
        str(out),
        "--timeout",
        "1",
        "--http-retries",
        "1",
        "--no-progress",
    ]
    result = _bounded(lambda: main_generate(argv), 30)
    assert "error" not in result, result
    failed = output_paths(out)["failed"].read_text()
    assert "deadline" in failed and "2 attempt" in failed
    assert len(openai_server.requests) == 2
