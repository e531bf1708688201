"""Generation backends: the OpenAI-compatible client against a real local HTTP server, and the
in-process transformers backend on tiny models (seeded, batched, stopped at end of turn)."""

from __future__ import annotations

import base64
import io
import time

import pytest
from openai_server import OpenAITestServer, Reply

from srpo_trl.backends import (
    BackendError,
    GenerationBackend,
    GenerationRequest,
    OpenAICompatibleBackend,
    load_image,
    to_openai_messages,
)


def _png(path, color=(200, 10, 10), size=(8, 8)):
    from PIL import Image

    Image.new("RGB", size, color).save(path)
    return path


def _backend(server, **kw):
    kw.setdefault("backoff", 0.0)
    kw.setdefault("show_progress", False)
    return OpenAICompatibleBackend(server.url, "test-model", **kw)


# ----------------------------------------------------------------------------------------------
# OpenAI-compatible backend
# ----------------------------------------------------------------------------------------------


def test_chat_request_body_and_samples(openai_server):
    openai_server.handler = lambda req: [f"sample {i}" for i in range(req.n)]
    backend = _backend(openai_server, api_key="sk-test")
    assert isinstance(backend, GenerationBackend)
    prompt = [{"role": "system", "content": "be safe"}, {"role": "user", "content": "hello"}]
    out = backend.generate([GenerationRequest(prompt)], num_samples=3, temperature=0.7, max_new_tokens=17, seed=5)
    assert out == [["sample 0", "sample 1", "sample 2"]]
    (req,) = openai_server.requests
    assert req.path == "/v1/chat/completions"
    assert req.headers["Authorization"] == "Bearer sk-test"
    body = req.body
    assert body["model"] == "test-model" and body["n"] == 3 and body["temperature"] == 0.7
    assert body["max_tokens"] == 17 and body["seed"] == 5
    assert body["messages"] == prompt
    assert "continue_final_message" not in body  # a fresh assistant turn


def test_assistant_prefix_continues_the_final_message(openai_server):
    openai_server.handler = lambda req: " step two"
    backend = _backend(openai_server)
    prompt = [{"role": "user", "content": "q"}]
    out = backend.generate([GenerationRequest(prompt, assistant_prefix="step one\n")], num_samples=2)
    assert out == [[" step two", " step two"]]
    body = openai_server.requests[0].body
    assert body["messages"][-1] == {"role": "assistant", "content": "step one\n"}
    assert body["messages"][:-1] == prompt
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False


def test_string_prompt_uses_completions(openai_server):
    openai_server.handler = lambda req: ["a", "b"]
    backend = _backend(openai_server)
    out = backend.generate([GenerationRequest("Q: 1+1?\n", assistant_prefix="Think.\n")], num_samples=2)
    assert out == [["a", "b"]]
    req = openai_server.requests[0]
    assert req.path == "/v1/completions"
    assert req.body["prompt"] == "Q: 1+1?\nThink.\n"
    assert "messages" not in req.body


def test_base_url_with_v1_suffix(openai_server):
    backend = OpenAICompatibleBackend(openai_server.url + "/v1/", "m", backoff=0, show_progress=False)
    assert backend.chat([{"role": "user", "content": "hi"}]) == "ok"
    assert openai_server.requests[0].path == "/v1/chat/completions"


def test_images_sent_as_data_urls(openai_server, tmp_path):
    png = _png(tmp_path / "red.png")
    backend = _backend(openai_server)
    backend.generate([GenerationRequest([{"role": "user", "content": "what is this?"}], images=[str(png)])])
    content = openai_server.requests[0].body["messages"][0]["content"]
    assert [p["type"] for p in content] == ["image_url", "text"]
    assert content[1]["text"] == "what is this?"
    url = content[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    from PIL import Image

    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert img.size == (8, 8) and img.getpixel((0, 0)) == (200, 10, 10)


def test_image_placeholders_take_images_in_order(tmp_path):
    a, b = _png(tmp_path / "a.png", (1, 2, 3)), _png(tmp_path / "b.png", (4, 5, 6))
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image"}, {"type": "image"}]},
    ]
    out = to_openai_messages(messages, [str(a), str(b)])
    parts = out[0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "image_url"]
    from PIL import Image

    colors = [
        Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",", 1)[1]))).getpixel((0, 0))
        for p in parts[1:]
    ]
    assert colors == [(1, 2, 3), (4, 5, 6)]
    with pytest.raises(ValueError, match="2 image placeholder"):
        to_openai_messages(messages, [str(a)])


def test_missing_image_names_the_file(openai_server, tmp_path):
    backend = _backend(openai_server)
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        backend.generate([GenerationRequest([{"role": "user", "content": "x"}], images=[str(missing)])])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_image(str(broken))
    assert openai_server.requests == []  # nothing was sent


def test_retries_5xx_429_malformed_then_succeeds(openai_server):
    openai_server.enqueue(
        Reply(status=503, json={"error": "overloaded"}),
        Reply(status=429, json={"error": "slow down"}, headers={"Retry-After": "0"}),
        Reply(raw="{not json"),
        {"choices": []},
        {"unexpected": 1},
        Reply(drop=True),
        "finally",
    )
    backend = _backend(openai_server, max_retries=6)
    assert backend.chat([{"role": "user", "content": "q"}]) == "finally"
    assert len(openai_server.requests) == 7


def test_gives_up_with_backend_error_naming_url_and_error(openai_server):
    openai_server.handler = lambda req: Reply(status=500, raw="boom")
    backend = _backend(openai_server, max_retries=2)
    with pytest.raises(BackendError) as info:
        backend.generate([GenerationRequest([{"role": "user", "content": "q"}])])
    msg = str(info.value)
    assert openai_server.url + "/v1/chat/completions" in msg and "HTTP 500" in msg and "3 attempt" in msg
    assert len(openai_server.requests) == 3


def test_backoff_is_exponential(openai_server):
    openai_server.enqueue(Reply(status=502), Reply(status=502), "ok")
    backend = _backend(openai_server, backoff=0.1, max_retries=3)
    start = time.monotonic()
    assert backend.chat([{"role": "user", "content": "q"}]) == "ok"
    elapsed = time.monotonic() - start
    assert elapsed >= 0.1 + 0.2  # 0.1 s then 0.2 s


def test_client_errors_are_not_retried(openai_server):
    openai_server.handler = lambda req: Reply(status=400, json={"error": {"message": "bad model"}})
    backend = _backend(openai_server, max_retries=5)
    with pytest.raises(BackendError, match="HTTP 400.*bad model"):
        backend.chat([{"role": "user", "content": "q"}])
    assert len(openai_server.requests) == 1


def test_connection_refused_is_a_backend_error():
    server = OpenAITestServer().start()
    url = server.url
    server.stop()  # nothing listens there any more
    backend = OpenAICompatibleBackend(url, "m", max_retries=1, backoff=0, timeout=2, show_progress=False)
    with pytest.raises(BackendError, match=url.replace(".", r"\.")):
        backend.chat([{"role": "user", "content": "q"}])


def test_server_ignoring_n_is_asked_again(openai_server):
    openai_server.handler = lambda req: [f"s{len(openai_server.requests)}"]  # one choice, whatever n is
    backend = _backend(openai_server)
    out = backend.generate([GenerationRequest("p")], num_samples=3, seed=10)
    assert out == [["s1", "s2", "s3"]]
    assert [r.body["n"] for r in openai_server.requests] == [3, 2, 1]
    assert [r.body["seed"] for r in openai_server.requests] == [10, 11, 12]


def test_concurrent_requests_keep_order(openai_server):
    import threading

    active, peak, lock = [0], [0], threading.Lock()

    def handler(req):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.1)
        with lock:
            active[0] -= 1
        return "answer to " + req.last_user_text()

    openai_server.handler = handler
    backend = _backend(openai_server, concurrency=4)
    requests = [GenerationRequest([{"role": "user", "content": f"q{i}"}]) for i in range(8)]
    start = time.monotonic()
    out = backend.generate(requests)
    assert out == [[f"answer to q{i}"] for i in range(8)]
    assert peak[0] >= 2  # the server was kept busy
    assert time.monotonic() - start < 0.8 * 0.8 + 0.3  # well under 8 sequential 0.1 s calls


def test_string_prompt_with_images_is_refused(openai_server, tmp_path):
    backend = _backend(openai_server)
    with pytest.raises(ValueError, match="chat prompt"):
        backend.generate([GenerationRequest("p", images=[str(_png(tmp_path / "a.png"))])])
