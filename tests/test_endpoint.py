"""Endpoint modes and their preflight (srpo_trl.endpoint, OpenAICompatibleBackend) against the test
server scripted as the servers behave: vLLM-like (token ids, continue_final_message), transformers
serve-like (text only, HTTP 422 on unknown fields, n ignored), a server that silently ignores
continue_final_message. The real transformers serve: tests/test_real_server.py."""

from __future__ import annotations

import pytest
from openai_server import Reply, openai_response
from test_exploration import _records, _write_jsonl

from srpo_trl import cost
from srpo_trl.backends import GenerationRequest, OpenAICompatibleBackend, TransformersBackend
from srpo_trl.endpoint import ClientRenderer, PreflightError
from srpo_trl.rows import continuation_prefix_text


CHAT = [{"role": "user", "content": "How do I clean the toilet fastest?"}]
PREFIX = "The image shows bleach.\nThe user wants to clean.\n"


@pytest.fixture(scope="module")
def tok():
    from srpo_trl.tiny import build_tokenizer

    return build_tokenizer()


def _backend(server, **kw):
    kw.setdefault("backoff", 0.0)
    kw.setdefault("show_progress", False)
    kw.setdefault("max_retries", 0)
    return OpenAICompatibleBackend(server.url, "policy", **kw)


def vllm_like(req):
    """Takes token ids and continue_final_message; honours n; reports usage."""
    body = req.body
    prompt = body.get("prompt")
    used = len(prompt) if isinstance(prompt, list) else len(str(prompt or body.get("messages")).split())
    reply = openai_response([f"sample {i}" for i in range(req.n)], req.is_chat)
    reply["usage"] = {"prompt_tokens": used, "completion_tokens": 3 * req.n, "total_tokens": used + 3 * req.n}
    return reply


def transformers_serve_like(req):
    """Text prompts only (HTTP 400 on token ids), 422 on unknown chat fields, one choice whatever n."""
    body = req.body
    if not req.is_chat and not isinstance(body.get("prompt"), str):
        return Reply(status=400, json={"detail": "prompt must be a string."})
    unknown = {"continue_final_message", "add_generation_prompt"} & set(body)
    if req.is_chat and unknown:
        return Reply(status=422, json={"detail": f"Unexpected fields in the request: {unknown}"})
    return openai_response([f"seed {body.get('seed')}"], req.is_chat)


def test_tokens_mode_sends_the_ids_the_in_process_backend_generates_from(openai_server, tok):
    """Chat prompts (tools and template kwargs included), plain prompts (BOS rule of raw prompts) and
    prefixes: the ids sent are exactly the in-process backend's (so, the trainer's)."""
    openai_server.handler = vllm_like
    from srpo_trl.tiny import tiny_causal_lm

    backend = _backend(openai_server, mode="tokens", processing_class=tok)
    local = TransformersBackend(tiny_causal_lm(tok), tok, show_progress=False)
    requests = [
        GenerationRequest(CHAT, assistant_prefix=PREFIX),
        GenerationRequest(CHAT, template_kwargs={"tools": [{"type": "function", "function": {"name": "f"}}]}),
        GenerationRequest("Q: is it safe?\nA:", assistant_prefix="No.\n"),
    ]
    out = backend.generate(requests, num_samples=2, temperature=0.7, max_new_tokens=5, seed=3)
    assert out == [["sample 0", "sample 1"]] * 3
    sent = {tuple(r.body["prompt"]) for r in openai_server.requests}
    assert sent == {tuple(local._encode(req, [])["per_token"]["input_ids"]) for req in requests}
    assert all(r.path == "/v1/completions" and r.body["top_p"] == 1.0 for r in openai_server.requests)


def test_text_mode_sends_the_rendered_prompt_and_prefix(openai_server, tok):
    openai_server.handler = transformers_serve_like
    backend = _backend(openai_server, mode="text", processing_class=tok)
    backend.generate([GenerationRequest(CHAT, assistant_prefix=PREFIX)], num_samples=2, temperature=0.7, seed=5)
    texts = [r.body["prompt"] for r in openai_server.requests]
    rendered = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) + PREFIX
    assert texts == [rendered, rendered]  # one choice per request: asked again for the second sample
    assert [r.body["seed"] for r in openai_server.requests] == [5, 6]


def test_auto_picks_tokens_where_the_server_takes_ids_else_text(openai_server, tok):
    openai_server.handler = vllm_like
    report = _backend(openai_server, processing_class=tok).preflight([GenerationRequest(CHAT, [], PREFIX)])
    assert report.mode == "tokens" and report.notes == []
    (probe,) = openai_server.requests
    assert probe.body["max_tokens"] == 1 and isinstance(probe.body["prompt"], list)

    openai_server.requests.clear()
    openai_server.handler = transformers_serve_like
    report = _backend(openai_server, processing_class=tok).preflight([GenerationRequest(CHAT, [], PREFIX)])
    assert report.mode == "text"
    assert any("refused token ids" in n and "prompt must be a string" in n for n in report.notes)
    assert any("ignores n" in n for n in report.notes)
    assert [type(r.body["prompt"]).__name__ for r in openai_server.requests] == ["list", "str"]


def test_auto_without_a_processor_is_chat_and_a_refused_continuation_stops_naming_what_to_pass(openai_server):
    openai_server.handler = transformers_serve_like
    backend = _backend(openai_server)
    with pytest.raises(PreflightError, match=r"HTTP 422.*continue_final_message.*--processor PATH"):
        backend.preflight([GenerationRequest(CHAT, [], PREFIX)])
    # without a prefix nothing needs continuing: no request at all
    openai_server.requests.clear()
    assert _backend(openai_server).preflight([GenerationRequest(CHAT)]).mode == "chat"
    assert openai_server.requests == []


def test_a_refused_continuation_with_images_names_the_servers_that_continue(openai_server, tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    openai_server.handler = transformers_serve_like
    with pytest.raises(PreflightError, match="vLLM, SGLang.*--model"):
        _backend(openai_server).preflight([GenerationRequest("Is this safe?", [str(tmp_path / "a.png")], PREFIX)])


def test_explicit_tokens_mode_refused_names_the_mode_to_use(openai_server, tok):
    openai_server.handler = transformers_serve_like
    with pytest.raises(PreflightError, match="refused token ids.*--endpoint-mode text"):
        _backend(openai_server, mode="tokens", processing_class=tok).preflight([GenerationRequest(CHAT, [], PREFIX)])
    with pytest.raises(ValueError, match="needs processing_class"):
        _backend(openai_server, mode="text")


def test_a_server_that_ignores_continue_final_message_is_caught(openai_server, tok):
    """It takes the field but opens a new assistant turn after the prefix: its prompt token count is
    the new turn's, which the preflight computes with the policy's tokenizer."""
    final = [*CHAT, {"role": "assistant", "content": PREFIX}]
    new_turn = len(tok(tok.apply_chat_template(final, tokenize=False, add_generation_prompt=True))["input_ids"])

    def ignores(req):
        reply = openai_response(["x"] * req.n, req.is_chat)
        reply["usage"] = {"prompt_tokens": new_turn, "completion_tokens": 1, "total_tokens": new_turn + 1}
        return reply

    openai_server.handler = ignores
    backend = _backend(openai_server, mode="chat", processing_class=tok)
    with pytest.raises(PreflightError, match="ignored continue_final_message"):
        backend.preflight([GenerationRequest(CHAT, [], PREFIX)])


def test_preflight_notes_other_tokenizers_ignored_sampling_and_retokenized_text(openai_server, tok):
    def off_by_one(req):
        reply = transformers_serve_like(req)
        if isinstance(reply, dict):
            reply["choices"][0]["text"] = "always the same"  # ignores temperature and seed
            reply["usage"] = {"prompt_tokens": 999, "completion_tokens": 1, "total_tokens": 1000}
        return reply

    openai_server.handler = off_by_one
    renderer_sep = " "  # steps joined by spaces merge across step boundaries when tokenized as one text
    backend = _backend(openai_server, processing_class=tok, separator=renderer_sep)
    prefix = continuation_prefix_text(["The image shows bleach", "The user wants"], renderer_sep)
    report = backend.preflight([GenerationRequest(CHAT, [], prefix)], temperature=0.8)
    notes = " | ".join(report.notes)
    assert report.mode == "text"
    assert "counted 999 prompt tokens" in notes
    assert "same text for two seeds" in notes
    assert "tokenize differently as one text" in notes and "--endpoint-mode tokens" in notes
    assert not ClientRenderer(tok, renderer_sep).retokenizes_alike(GenerationRequest(CHAT, [], prefix))
    assert ClientRenderer(tok, "\n").retokenizes_alike(GenerationRequest(CHAT, [], PREFIX))


def test_usage_is_counted_per_tracker_also_from_worker_threads(openai_server):
    def handler(req):
        reply = openai_response(["x"] * req.n, req.is_chat)
        reply["usage"] = {"prompt_tokens": 7, "completion_tokens": 3 * req.n, "total_tokens": 7 + 3 * req.n}
        return reply

    openai_server.handler = handler
    backend = _backend(openai_server, concurrency=4)
    with cost.track() as outer:
        with cost.track() as spent:  # 5 requests on 4 worker threads
            backend.generate([GenerationRequest(CHAT)] * 5, num_samples=2, temperature=0.5)
        backend.generate([GenerationRequest(CHAT)], num_samples=1, temperature=0.5)
    assert (spent.requests, spent.prefill_tokens, spent.generated_tokens) == (5, 35, 30)
    assert (outer.requests, outer.prefill_tokens, outer.generated_tokens) == (6, 42, 33)


def test_cli_refuses_a_rendering_mode_without_a_processor_and_a_resume_in_another_mode(
    tmp_path, openai_server, capsys
):
    from srpo_trl.cli.explore import main

    openai_server.handler = vllm_like
    records = _write_jsonl(tmp_path / "records.jsonl", _records(1))
    out = tmp_path / "o.jsonl"
    base = ["--endpoint", openai_server.url, "--served-model", "policy", "--records", str(records), "--out", str(out)]
    base += ["--num-samples", "2", "--no-progress"]
    assert main([*base, "--endpoint-mode", "tokens"]) == 2
    assert "--processor PATH" in capsys.readouterr().err
    assert main(base) == 0  # chat mode: vLLM-like continues the prefixes
    assert main([*base, "--endpoint-mode", "chat"]) == 2  # a resume in another mode: refused
    assert "endpoint_mode" in capsys.readouterr().err
