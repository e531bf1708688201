"""The HTTP layer (srpo_trl.http through OpenAICompatibleBackend): whole-request deadline, response-size
cap, retries, Retry-After, credentials redacted. Servers from tests/openai_server.py (127.0.0.1)."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import threading
import time

import pytest
from openai_server import Reply

from srpo_trl.backends import BackendError, GenerationRequest, OpenAICompatibleBackend


def _bounded(fn, limit: float):
    """Run ``fn`` in a thread; fail the test if it is not done within ``limit`` seconds (a hang)."""
    out: dict = {}

    def target():
        t0 = time.monotonic()
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc
        out["elapsed"] = time.monotonic() - t0

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"the request was still running after {limit} s (no whole-request deadline)"
    return out


def _backend(server, **kw):
    kw.setdefault("backoff", 0.0)
    kw.setdefault("show_progress", False)
    return OpenAICompatibleBackend(server.url, "m", **kw)


def test_trickling_server_hits_the_deadline_and_is_retried(openai_server):
    # 0.3 s per byte: every single read succeeds (a per-read timeout of 1 s never fires), the whole
    # reply (~300 bytes, headers included) would take ~90 s.
    openai_server.handler = lambda req: Reply(trickle=0.3)
    backend = _backend(openai_server, timeout=1.0, max_retries=1)
    out = _bounded(lambda: backend.chat([{"role": "user", "content": "hi"}], max_new_tokens=8), 15)
    assert isinstance(out.get("error"), BackendError), out
    msg = str(out["error"])
    assert "deadline" in msg and "2 attempt" in msg and "/v1/chat/completions" in msg
    assert len(openai_server.requests) == 2  # the retry path was taken
    assert 2.0 <= out["elapsed"] < 10.0  # two attempts of 1 s each (the whole reply would take ~90 s)


def test_trickle_then_good_reply_recovers_on_retry(openai_server):
    openai_server.enqueue(Reply(trickle=0.3), "fine")
    backend = _backend(openai_server, timeout=1.0, max_retries=2)
    out = _bounded(lambda: backend.chat([{"role": "user", "content": "hi"}], max_new_tokens=8), 15)
    assert out.get("value") == "fine", out
    assert len(openai_server.requests) == 2


@pytest.mark.parametrize("declare_length", [False, True])
def test_flooding_server_is_cut_at_the_size_cap(openai_server, declare_length):
    # 20 MB of text for max_new_tokens=12: refused long before it is all read.
    openai_server.handler = lambda req: Reply(flood=20_000_000, declare_length=declare_length)
    backend = _backend(openai_server, timeout=30.0, max_retries=2)
    out = _bounded(lambda: backend.chat([{"role": "user", "content": "hi"}], max_new_tokens=12), 30)
    assert isinstance(out.get("error"), BackendError), out
    msg = str(out["error"])
    assert "too large" in msg and "3 attempt" in msg
    assert len(openai_server.requests) == 3


def test_flood_then_good_reply_recovers_on_retry(openai_server):
    openai_server.enqueue(Reply(flood=5_000_000), "fine")
    backend = _backend(openai_server, max_retries=1)
    out = _bounded(lambda: backend.chat([{"role": "user", "content": "hi"}], max_new_tokens=12), 30)
    assert out.get("value") == "fine", out
    assert len(openai_server.requests) == 2


def test_size_cap_follows_max_new_tokens_and_n():
    from srpo_trl.http import BYTES_PER_TOKEN, ENVELOPE_BYTES, HARD_MAX_RESPONSE_BYTES, response_cap

    assert response_cap(12) == ENVELOPE_BYTES + 12 * BYTES_PER_TOKEN
    assert response_cap(12, n=4) == ENVELOPE_BYTES + 4 * 12 * BYTES_PER_TOKEN
    assert response_cap(10**9) == HARD_MAX_RESPONSE_BYTES
    assert response_cap(None) == HARD_MAX_RESPONSE_BYTES


def test_a_reply_within_the_cap_is_read_whole(openai_server):
    text = "y" * 2000  # 2 kB: well inside the cap for 512 tokens
    openai_server.handler = lambda req: text
    assert _backend(openai_server).chat([{"role": "user", "content": "hi"}], max_new_tokens=512) == text


def test_retry_after_http_date_is_honoured(openai_server):
    when = email.utils.formatdate(time.time() + 2, usegmt=True)
    openai_server.enqueue(Reply(status=429, json={"error": "slow down"}, headers={"Retry-After": when}), "ok")
    backend = _backend(openai_server, max_retries=1)
    t0 = time.monotonic()
    assert backend.chat([{"role": "user", "content": "hi"}]) == "ok"
    assert time.monotonic() - t0 >= 0.9  # waited for the date (1-2 s after second rounding), not 0 s backoff


def test_works_inside_a_running_event_loop(openai_server):
    # Jupyter runs user code inside an event loop; the sync API must still work there.
    backend = _backend(openai_server)

    async def inside():
        return backend.chat([{"role": "user", "content": "hi"}])

    assert asyncio.run(inside()) == "ok"


def test_redact_url():
    from srpo_trl.http import redact_url

    assert redact_url("https://bob:s3cret@host:8000/v1") == "https://***@host:8000/v1"  # the user name too
    assert redact_url("https://tok3n@host/v1") == "https://***@host/v1"
    assert redact_url("http://host/v1?api_key=s3cret&x=1") == "http://host/v1?api_key=***&x=1"
    assert redact_url("http://localhost:8000/v1") == "http://localhost:8000/v1"
    assert redact_url("not a url") == "not a url"


def test_credentials_in_the_url_never_reach_errors_or_logs(openai_server, caplog):
    openai_server.handler = lambda req: Reply(status=503, raw="busy")
    url = openai_server.url.replace("http://", "http://user:s3cretpw@") + "/v1"
    backend = OpenAICompatibleBackend(url, "m", backoff=0.0, max_retries=1, show_progress=False)
    with caplog.at_level(logging.WARNING), pytest.raises(BackendError) as info:
        backend.chat([{"role": "user", "content": "hi"}])
    text = str(info.value) + caplog.text
    assert "503" in str(info.value) and "retry 1/1" in caplog.text
    assert "s3cretpw" not in text and "user:" not in text and "://***@" in str(info.value)


# ---- malformed but parseable replies (JSON Python cannot hold, choices of the wrong types) --------

CHOICE = {"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}
MALFORMED = {
    # nesting deeper than Python's recursion limit: json.loads raises RecursionError (40 kB, under the cap)
    "deeply nested": Reply(raw='{"choices": ' + "[" * 20_000 + "]" * 20_000 + "}"),
    # an integer of 5000 digits: json.loads raises ValueError (int max_str_digits is 4300)
    "5000-digit number": Reply(
        raw='{"choices": [' + json.dumps(CHOICE) + '], "usage": {"total_tokens": ' + "9" * 5000 + "}}"
    ),
    # a non-integer index: sorting the choices compared str with int (TypeError)
    "non-integer index": {"choices": [{**CHOICE, "index": "1"}, CHOICE]},
    # a non-string text part: joining the parts raised TypeError
    "non-string text": {
        "choices": [{**CHOICE, "message": {"role": "assistant", "content": [{"type": "text", "text": 5}]}}]
    },
}


def test_malformed_but_parseable_replies_are_retried_then_recover(openai_server):
    openai_server.enqueue(*MALFORMED.values(), "fine")
    backend = _backend(openai_server, max_retries=len(MALFORMED))
    out = _bounded(lambda: backend.chat([{"role": "user", "content": "hi"}], max_new_tokens=8), 30)
    assert out.get("value") == "fine", out  # each malformed reply took the retry path, none escaped
    assert len(openai_server.requests) == len(MALFORMED) + 1


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_but_parseable_reply_ends_in_a_backend_error(openai_server, kind):
    openai_server.handler = lambda req: MALFORMED[kind]
    backend = _backend(openai_server, max_retries=1)
    out = _bounded(lambda: backend.chat([{"role": "user", "content": "hi"}], max_new_tokens=8), 30)
    error = out.get("error")
    assert isinstance(error, BackendError), out  # not RecursionError / ValueError / TypeError
    assert "2 attempt" in str(error) and "/v1/chat/completions" in str(error)
    assert len(openai_server.requests) == 2


def test_a_base_url_with_a_query_string_gets_the_api_path_before_the_query(openai_server):
    backend = OpenAICompatibleBackend(
        openai_server.url + "/v1?api-version=2024-06-01", "m", backoff=0.0, max_retries=0, show_progress=False
    )
    assert backend.chat([{"role": "user", "content": "hi"}]) == "ok"
    assert backend.generate([GenerationRequest("a text prompt")]) == [["ok"]]
    assert [r.path for r in openai_server.requests] == [
        "/v1/chat/completions?api-version=2024-06-01",
        "/v1/completions?api-version=2024-06-01",
    ]
