"""A row's `tools` and `chat_template_kwargs` reach every place its prompt is rendered: exploration
samples continuations from the same prompt text the trainer later scores them after (a Qwen3
template with `enable_thinking=False` appends an empty think block, with `tools` a tool list;
sampling without them would build pairs on a prompt that is never trained on)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trl
from helpers import srpo_args
from test_backends import _prefill_calls, _spy  # records every model.forward call; the prefills

from srpo_trl import SRPOTrainer, StepPairDataset
from srpo_trl.backends import GenerationRequest, OpenAICompatibleBackend, TransformersBackend
from srpo_trl.contract import RecordError
from srpo_trl.exploration import explore, load_records
from srpo_trl.rows import encode_prompt_text
from srpo_trl.tiny import build_tokenizer, tiny_causal_lm
from srpo_trl.verifiers import Verdict


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CHAT = [{"role": "user", "content": "Is it safe to go out in Paris?"}]
REFERENCE = ["Paris has a storm warning.", "Answer: stay inside."]


@pytest.fixture(scope="module")
def qwen3_tok():
    tok = build_tokenizer()
    tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja").read_text()
    return tok


@pytest.fixture(scope="module")
def lm(qwen3_tok):
    return tiny_causal_lm(qwen3_tok, seed=0)


def _unpadded(call, row):
    return call["input_ids"][row][call["attention_mask"][row].bool()].tolist()


def test_transformers_backend_renders_the_prompt_with_the_rows_template_kwargs(qwen3_tok, lm, monkeypatch):
    calls = _spy(monkeypatch, lm, "forward")
    kwargs = {"enable_thinking": False, "tools": TOOLS}
    backend = TransformersBackend(lm, qwen3_tok, show_progress=False)
    backend.generate([GenerationRequest(CHAT, template_kwargs=kwargs), GenerationRequest(CHAT)], max_new_tokens=2)
    (prefill,) = _prefill_calls(calls)
    with_kwargs, without = _unpadded(prefill, 0), _unpadded(prefill, 1)
    row = {"prompt": CHAT, "tools": json.dumps(TOOLS), "chat_template_kwargs": {"enable_thinking": False}}
    assert with_kwargs == encode_prompt_text(row, qwen3_tok)
    assert without == encode_prompt_text({"prompt": CHAT}, qwen3_tok)
    text = qwen3_tok.decode(with_kwargs)
    assert "get_weather" in text and text.endswith("<think>\n\n</think>\n\n")
    assert "get_weather" not in qwen3_tok.decode(without)


def test_openai_backend_sends_tools_and_chat_template_kwargs(openai_server):
    openai_server.handler = lambda req: "ok"
    backend = OpenAICompatibleBackend(openai_server.url, "m", backoff=0.0, show_progress=False)
    kwargs = {"enable_thinking": False, "tools": TOOLS}
    backend.generate([GenerationRequest(CHAT, assistant_prefix="Step.\n", template_kwargs=kwargs)])
    backend.generate([GenerationRequest(CHAT)])
    first, second = (r.body for r in openai_server.requests)
    assert first["tools"] == TOOLS and first["chat_template_kwargs"] == {"enable_thinking": False}
    assert "tools" not in second and "chat_template_kwargs" not in second


def test_exploration_samples_from_the_prompt_the_trainer_trains_on(tmp_path, qwen3_tok, lm, monkeypatch):
    records = tmp_path / "records.jsonl"
    record = {
        "id": "r0",
        "prompt": CHAT,
        "reference": REFERENCE,
        "tools": json.dumps(TOOLS),  # TRL datasets keep tools as a JSON string
        "chat_template_kwargs": {"enable_thinking": False},
    }
    records.write_text(json.dumps(record) + "\n", encoding="utf-8")
    calls = _spy(monkeypatch, lm, "forward")
    backend = TransformersBackend(lm, qwen3_tok, batch_size=16, show_progress=False)
    out = tmp_path / "explored.jsonl"
    explore(
        records,
        backend,
        lambda rec, text: Verdict(len(text) % 2 == 0, None, "coin"),
        num_samples=6,
        temperature=1.5,
        max_new_tokens=6,
        seed=0,
        out=out,
        show_progress=False,
        print_summary=False,
    )
    prefills = _prefill_calls(calls)
    generated_from = {tuple(_unpadded(call, i)) for call in prefills for i in range(call["input_ids"].shape[0])}

    explored = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert explored[0]["tools"] == json.dumps(TOOLS) and explored[0]["chat_template_kwargs"] == {
        "enable_thinking": False
    }
    # Pairs may be one-sided with a random model: the rows are built from every point by hand here.
    rows = [
        {
            "prompt": CHAT,
            "prefix": point["prefix"],
            "chosen": "a",
            "rejected": "b",
            **{k: explored[0][k] for k in ("tools", "chat_template_kwargs")},
        }
        for point in explored[0]["points"]
    ]
    trainer = SRPOTrainer(
        model=tiny_causal_lm(qwen3_tok, seed=1),
        args=srpo_args(tmp_path / "run"),
        train_dataset=StepPairDataset.from_list(rows),
        processing_class=qwen3_tok,
    )
    scored = {tuple(r["prompt_ids"] + r["prefix_ids"]) for r in trainer.train_dataset}
    assert scored == generated_from  # every prompt + prefix sampled from is one the trainer scores, and back
    assert all("get_weather" in qwen3_tok.decode(ids) for ids in scored)


def test_from_exploration_keeps_the_template_fields(tmp_path):
    line = {
        "id": "r0",
        "prompt": CHAT,
        "status": "ok",
        "reference": REFERENCE,
        "tools": json.dumps(TOOLS),
        "chat_template_kwargs": {"enable_thinking": False},
        "points": [
            {
                "branch_point": 1,
                "prefix": REFERENCE[:1],
                "continuations": [{"text": "Stay in.", "verified": True}, {"text": "Go.", "verified": False}],
            }
        ],
    }
    pairs = StepPairDataset.from_exploration([line])
    assert len(pairs) == 1
    assert pairs[0]["tools"] == json.dumps(TOOLS) and pairs[0]["chat_template_kwargs"] == {"enable_thinking": False}


@pytest.mark.parametrize(
    "extra, field, message",
    [
        ({"tools": "not json"}, "tools", "not JSON"),
        ({"tools": {"name": "f"}}, "tools", "list of tool schemas"),
        ({"chat_template_kwargs": "enable_thinking"}, "chat_template_kwargs", "object of chat-template arguments"),
    ],
)
def test_bad_template_fields_are_named(tmp_path, extra, field, message):
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": CHAT, **extra}) + "\n", encoding="utf-8")
    with pytest.raises(RecordError) as info:
        load_records(path)
    assert info.value.field == field and message in str(info.value) and f"{path}:1" in str(info.value)
