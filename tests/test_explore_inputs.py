"""explore against inputs that change or misbehave: a malformed but parseable reply fails only its
record, images changed under the same name refuse a resume (content, not path), a symlink to the
output is the same output (one lock), and the policy's API key stays with the policy's endpoint."""

from __future__ import annotations

import os
import threading

import pytest
from openai_server import OpenAITestServer, Reply
from test_exploration import COMPLY_TEXT, WARN_TEXT, ScriptedBackend, _lines, _records, _write_jsonl

from srpo_trl import store
from srpo_trl.backends import OpenAICompatibleBackend
from srpo_trl.cli.explore import main
from srpo_trl.exploration import explore


def _png(path, color):
    from PIL import Image

    Image.new("RGB", (16, 16), color).save(path)
    return path


def _quiet(**kw):
    return dict(num_samples=2, branch_points=1, show_progress=False, print_summary=False, **kw)


MALFORMED = {
    # nesting deeper than the recursion limit: json.loads raised RecursionError
    "deeply nested": (Reply(raw='{"choices": ' + "[" * 20_000 + "]" * 20_000 + "}"), "malformed JSON"),
    # choices with a non-integer index: sorting them raised TypeError
    "non-integer index": (
        {"choices": [{"index": i, "message": {"role": "assistant", "content": "x"}} for i in ("1", 0)]},
        "no integer 'index'",
    ),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_a_malformed_reply_fails_its_record_and_the_run_goes_on(tmp_path, openai_server, kind):
    # Before: the exception escaped the HTTP layer; explore died with a traceback, wrote no failed
    # record and stopped the run.
    reply, problem = MALFORMED[kind]

    def handler(req):
        if "poison" in req.last_user_text():
            return reply
        return [(WARN_TEXT if i % 2 == 0 else COMPLY_TEXT).format(i) for i in range(req.n)]

    openai_server.handler = handler
    backend = OpenAICompatibleBackend(openai_server.url, "policy", backoff=0.0, max_retries=1, show_progress=False)
    records = _records(2)
    records.insert(1, {**records[0], "id": "bad", "prompt": [{"role": "user", "content": "poison"}]})
    out = tmp_path / "o.jsonl"
    summary = explore(records, backend, "safety-outcome", out=out, **_quiet())
    lines = _lines(out)
    assert [(r["id"], r["status"]) for r in lines] == [("r0", "ok"), ("bad", "failed"), ("r1", "ok")]
    assert "BackendError" in lines[1]["error"] and problem in lines[1]["error"] and "2 attempt" in lines[1]["error"]
    assert summary["records_failed"] == 1


def _records_with_image(tmp_path, n=2):
    _png(tmp_path / "a.png", (200, 10, 10))
    return _write_jsonl(tmp_path / "records.jsonl", _records(n, images=["a.png"]))


def test_other_pixels_under_the_same_image_name_refuse_a_resume(tmp_path):
    records = _records_with_image(tmp_path)
    out = tmp_path / "o.jsonl"
    backend = ScriptedBackend()
    explore(records, backend, "safety-outcome", out=out, **_quiet())
    before, calls = out.read_bytes(), len(backend.calls)

    os.utime(tmp_path / "a.png", (1, 1))  # the same pixels, another mtime (a copied folder): a plain resume
    assert explore(records, backend, "safety-outcome", out=out, **_quiet())["explored_now"] == 0

    _png(tmp_path / "a.png", (10, 10, 200))  # same name, same size, other pixels
    with pytest.raises(store.FingerprintMismatch, match=r"images: saved \{\"a.png\": .*--overwrite"):
        explore(records, backend, "safety-outcome", out=out, **_quiet())
    assert out.read_bytes() == before and len(backend.calls) == calls  # refused before any request

    s = explore(records, backend, "safety-outcome", out=out, overwrite=True, **_quiet())
    assert s["explored_now"] == 2


def test_the_cli_refuses_a_resume_after_the_pixels_changed(tmp_path, openai_server, capsys):
    records = _records_with_image(tmp_path, n=1)
    out = tmp_path / "o.jsonl"
    argv = ["--endpoint", openai_server.url, "--served-model", "p", "--records", str(records), "--out", str(out)]
    argv += ["--num-samples", "2", "--branch-points", "1", "--no-progress"]
    assert main(argv) == 0
    sent = len(openai_server.requests)
    _png(tmp_path / "a.png", (0, 0, 0))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "images: saved" in err and "a.png" in err and "--overwrite" in err
    assert len(openai_server.requests) == sent


def test_a_symlink_to_the_output_is_the_same_output(tmp_path):
    """Two runs, one on the file and one on a symlink to it: the second is refused while the first
    runs (before: both ran, every id was written twice)."""
    records = _write_jsonl(tmp_path / "records.jsonl", _records(2))
    out = tmp_path / "o.jsonl"
    link = tmp_path / "link.jsonl"
    same = dict(policy={"backend": "scripted"})  # both backends below stand for one policy
    out.touch()
    link.symlink_to(out)
    started, release = threading.Event(), threading.Event()

    class Held(ScriptedBackend):
        def generate(self, requests, **kw):
            started.set()
            release.wait(30)
            return super().generate(requests, **kw)

    errors = []

    def first():
        try:
            explore(records, Held(), "safety-outcome", out=out, **same, **_quiet())
        except Exception as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert started.wait(30)
        with pytest.raises(store.OutputLocked, match="another explore run is writing"):
            explore(records, ScriptedBackend(), "safety-outcome", out=link, **same, **_quiet())
    finally:
        release.set()
        thread.join(60)
    assert not errors
    assert [r["id"] for r in _lines(out)] == ["r0", "r1"]
    # a resume through the link is the same output (one fingerprint): nothing explored again
    s = explore(records, ScriptedBackend(), "safety-outcome", out=link, **same, **_quiet())
    assert s["explored_now"] == 0 and link.is_symlink()
    # --overwrite through the link starts the file it points to again; the link stays a link
    s = explore(records, ScriptedBackend(), "safety-outcome", out=link, overwrite=True, **same, **_quiet())
    assert s["explored_now"] == 2 and link.is_symlink() and [r["id"] for r in _lines(out)] == ["r0", "r1"]


def test_a_rewrite_through_a_symlink_replaces_the_file_not_the_link(tmp_path):
    from srpo_trl.backends import BackendError

    records = _write_jsonl(tmp_path / "records.jsonl", _records(2))
    out, link = tmp_path / "o.jsonl", tmp_path / "link.jsonl"
    out.touch()
    link.symlink_to(out)
    same = dict(policy={"backend": "scripted"})

    class FailsR1(ScriptedBackend):
        def generate(self, requests, **kw):
            if "(1)" in requests[0].prompt[0]["content"]:
                raise BackendError("down")
            return super().generate(requests, **kw)

    explore(records, FailsR1(), "safety-outcome", out=link, **same, **_quiet())
    assert [r["status"] for r in _lines(out)] == ["ok", "failed"]
    explore(records, ScriptedBackend(), "safety-outcome", out=link, retry_failed=True, **same, **_quiet())
    assert link.is_symlink()  # before: the atomic rewrite put a plain file in the link's place
    assert [(r["id"], r["status"]) for r in _lines(out)] == [("r0", "ok"), ("r1", "ok")]


@pytest.mark.parametrize("judge_on_policy_endpoint", [False, True])
def test_the_policy_api_key_reaches_the_judge_only_on_the_policy_endpoint(
    tmp_path, openai_server, monkeypatch, judge_on_policy_endpoint
):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)

    def handler(req):
        if req.body["model"] == "judge":
            return '{"label": "warn"}'
        return [WARN_TEXT.format(i) for i in range(req.n)]

    openai_server.handler = handler
    records = _write_jsonl(tmp_path / "records.jsonl", _records(1))
    with OpenAITestServer(handler=handler) as judge_server:
        judge_url = (openai_server.url + "/v1/") if judge_on_policy_endpoint else judge_server.url
        argv = ["--endpoint", openai_server.url, "--served-model", "policy", "--api-key", "sk-policy"]
        argv += ["--verifier", "judge", "--judge-endpoint", judge_url, "--judge-model", "judge"]
        argv += ["--records", str(records), "--out", str(tmp_path / "o.jsonl"), "--num-samples", "2"]
        assert main([*argv, "--branch-points", "1", "--no-progress"]) == 0
        judged = [r for s in (openai_server, judge_server) for r in s.requests if r.body["model"] == "judge"]
    assert judged
    keys = {_auth(r) for r in judged}
    assert keys == ({"Bearer sk-policy"} if judge_on_policy_endpoint else {None})
    assert all(_auth(r) == "Bearer sk-policy" for r in openai_server.requests if r.body["model"] == "policy")


def _auth(request):
    return next((v for k, v in request.headers.items() if k.lower() == "authorization"), None)
