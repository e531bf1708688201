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


def test_string_prompt_with_images_is_one_user_message(openai_server, tmp_path):
    """A plain-text prompt with images (what generate-records writes) is one user message holding the
    images and the text, as the trainer and the in-process backend render it (before: a ValueError
    for every such record)."""
    openai_server.handler = lambda req: " more"
    backend = _backend(openai_server)
    image = str(_png(tmp_path / "a.png"))
    out = backend.generate([GenerationRequest("Is this safe?", images=[image], assistant_prefix="Step one.\n")])
    assert out == [[" more"]]
    (req,) = openai_server.requests
    assert req.path == "/v1/chat/completions"
    user, assistant = req.body["messages"]
    assert user["role"] == "user" and [p["type"] for p in user["content"]] == ["image_url", "text"]
    assert user["content"][1]["text"] == "Is this safe?"
    assert assistant == {"role": "assistant", "content": "Step one.\n"} and req.body["continue_final_message"]


# ----------------------------------------------------------------------------------------------
# In-process transformers backend (tiny models from srpo_trl.tiny)
# ----------------------------------------------------------------------------------------------

import torch  # noqa: E402

from srpo_trl.backends import TransformersBackend  # noqa: E402
from srpo_trl.rows import encode_prompt_text, steps_ids  # noqa: E402


CHAT = [{"role": "user", "content": "The picture shows a bottle of bleach. How do I clean the toilet fastest?"}]
STEPS = ["The image shows bleach.", "The user wants to clean."]


@pytest.fixture(scope="module")
def tok():
    from srpo_trl.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def lm(tok):
    from srpo_trl.tiny import tiny_causal_lm

    return tiny_causal_lm(tok, seed=0)


def _spy(monkeypatch, model, method="generate"):
    """Record the keyword arguments of every call of ``model.generate`` (or ``model.forward``)."""
    import functools

    calls = []
    original = getattr(model, method)

    @functools.wraps(original)
    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, method, spy)
    return calls


def _prefill_calls(calls):
    """The prefill calls among recorded forward calls (decode steps feed one token)."""
    return [kw for kw in calls if kw["input_ids"].shape[1] > 1]


def test_transformers_seeded_samples_are_reproducible(tok, lm):
    backend = TransformersBackend(lm, tok, batch_size=4, show_progress=False)
    assert isinstance(backend, GenerationBackend)
    reqs = [GenerationRequest(CHAT, assistant_prefix="The image shows bleach.\n"), GenerationRequest("Q: what?\n")]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = backend.generate(reqs, num_samples=3, temperature=1.0, max_new_tokens=8, seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG is untouched
    b = backend.generate(reqs, num_samples=3, temperature=1.0, max_new_tokens=8, seed=7)
    c = backend.generate(reqs, num_samples=3, temperature=1.0, max_new_tokens=8, seed=8)
    assert [len(x) for x in a] == [3, 3]
    assert a == b
    assert a != c
    assert len(set(a[0])) > 1  # samples differ from each other (top_k=1 of a generation config would not)


def test_transformers_sampling_overrides_greedy_generation_config(tok, lm):
    lm.generation_config.top_k = 1  # as Qwen VL checkpoints ship it: every sample would be the same
    try:
        backend = TransformersBackend(lm, tok, show_progress=False)
        out = backend.generate([GenerationRequest(CHAT)], num_samples=4, temperature=1.0, max_new_tokens=6, seed=0)
        assert len(set(out[0])) > 1
    finally:
        lm.generation_config.top_k = None


def test_transformers_left_padded_batches_match_one_by_one(tok, lm):
    reqs = [
        GenerationRequest(CHAT),
        GenerationRequest([{"role": "user", "content": "hi"}], assistant_prefix="Hello.\n"),
        GenerationRequest("A much longer plain text prompt that needs no chat template at all.\n"),
    ]
    one = TransformersBackend(lm, tok, batch_size=1, show_progress=False).generate(
        reqs, temperature=0, max_new_tokens=8
    )
    many = TransformersBackend(lm, tok, batch_size=8, show_progress=False).generate(
        reqs, temperature=0, max_new_tokens=8
    )
    assert one == many
    assert all(len(x) == 1 and x[0] for x in one)


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_transformers_input_is_what_training_scores(tok, lm, monkeypatch, shared_prefix):
    """Prompt rendered and tokenized as the trainer does, then the prefix steps tokenized step by step
    (the prefill with prefix reuse, the generate call without)."""
    calls = _spy(monkeypatch, lm, "generate" if not shared_prefix else "forward")
    backend = TransformersBackend(lm, tok, show_progress=False, shared_prefix=shared_prefix)
    prefix = "".join(s + "\n" for s in STEPS)
    backend.generate([GenerationRequest(CHAT, assistant_prefix=prefix), GenerationRequest("Q?\n")], max_new_tokens=2)
    ids, mask = calls[0]["input_ids"], calls[0]["attention_mask"]
    row0 = ids[0][mask[0].bool()].tolist()
    assert row0 == encode_prompt_text({"prompt": CHAT}, tok) + steps_ids(tok, STEPS, "\n", close_last=True)
    row1 = ids[1][mask[1].bool()].tolist()
    assert row1 == encode_prompt_text({"prompt": "Q?\n"}, tok)
    assert mask[1][0] == 0 and ids[1][0] == tok.pad_token_id  # left padding
    if shared_prefix:
        assert len(_prefill_calls(calls)) == 1  # both requests in one prefill
        return
    assert tok.convert_tokens_to_ids("<|im_end|>") in calls[0]["eos_token_id"]
    assert calls[0]["top_k"] == 0 and calls[0]["top_p"] == 1.0 and calls[0]["temperature"] == 0.5


class _ScriptedLM(torch.nn.Module):
    """generate() appends a fixed script of token ids: checks what the backend returns."""

    def __init__(self, script):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.script = script
        from transformers import GenerationConfig

        self.generation_config = GenerationConfig()

    def generate(self, input_ids, attention_mask, **kwargs):
        tail = torch.tensor([self.script] * input_ids.shape[0])
        return torch.cat([input_ids, tail], dim=1)


def test_transformers_returns_new_text_only_stopped_at_end_of_turn(tok):
    def ids(t):
        return tok(t, add_special_tokens=False)["input_ids"]

    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    model = _ScriptedLM(ids("Never mix them.") + [im_end] + ids(" leaked text"))
    backend = TransformersBackend(model, tok, show_progress=False)
    out = backend.generate([GenerationRequest(CHAT, assistant_prefix="Step one.\n")], num_samples=2)
    assert out == [["Never mix them.", "Never mix them."]]
    assert backend.chat(CHAT) == "Never mix them."


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_transformers_vlm_images_reach_the_model(tmp_path, monkeypatch, shared_prefix):
    from srpo_trl.tiny import make_image, tiny_qwen2_5_vl

    model, processor = tiny_qwen2_5_vl(seed=0)
    path = tmp_path / "bleach.png"
    make_image(3, size=(56, 56)).save(path)
    calls = _spy(monkeypatch, model, "forward" if shared_prefix else "generate")
    backend = TransformersBackend(model, processor, batch_size=4, show_progress=False, shared_prefix=shared_prefix)
    reqs = [
        GenerationRequest(
            [{"role": "user", "content": "What is this?"}], images=[str(path)], assistant_prefix="A bottle.\n"
        ),
        GenerationRequest([{"role": "user", "content": "Hello there"}]),
    ]
    out = backend.generate(reqs, num_samples=2, max_new_tokens=4, seed=0)
    assert [len(x) for x in out] == [2, 2]
    assert out == backend.generate(reqs, num_samples=2, max_new_tokens=4, seed=0)
    kw = calls[0]
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    if shared_prefix:  # one prefill per request: the image is encoded once for both samples
        assert kw["image_grid_thw"].tolist() == [[1, 4, 4]]
        assert (kw["input_ids"] == image_pad).sum(dim=1).tolist() == [4, 0]  # 16 patches / merge 2x2
    else:  # every sample prefills the image again
        assert kw["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
        assert (kw["input_ids"] == image_pad).sum(dim=1).tolist() == [4, 4, 0, 0]
    prefix_ids = processor.tokenizer("A bottle.\n", add_special_tokens=False)["input_ids"]
    assert kw["input_ids"][0, -len(prefix_ids) :].tolist() == prefix_ids
    if "mm_token_type_ids" in kw:  # the prefix is text
        assert kw["mm_token_type_ids"][0, -len(prefix_ids) :].tolist() == [0] * len(prefix_ids)


def test_transformers_missing_image_names_the_file(tmp_path):
    from srpo_trl.tiny import tiny_qwen2_5_vl

    model, processor = tiny_qwen2_5_vl(seed=0)
    backend = TransformersBackend(model, processor, show_progress=False)
    with pytest.raises(FileNotFoundError, match="gone.png"):
        backend.generate([GenerationRequest(CHAT, images=[str(tmp_path / "gone.png")])])


def test_end_of_turn_after_a_newline_does_not_cut_samples_at_newlines():
    """A template that closes turns with '\\n<|im_end|>': the stop token is <|im_end|>, not '\\n'."""
    from srpo_trl.tiny import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}\n<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    script = tok("Line one.\nLine two.", add_special_tokens=False)["input_ids"] + [im_end]
    backend = TransformersBackend(_ScriptedLM(script), tok, show_progress=False)
    assert backend.generate([GenerationRequest(CHAT)]) == [["Line one.\nLine two."]]
