"""Step-pair rows: the column contract, validation, and how a row becomes text and token ids.

One row is one branch point (see docs/trainer.md): ``prompt`` (+ optional ``images``), the reasoning
``prefix`` already taken (list of steps), a favorable ``chosen`` and an unfavorable ``rejected``
continuation, and optionally the verified ``reference`` path (list of steps). A plain DPO row
(``prompt``/``chosen``/``rejected``, standard or conversational) is a valid row with an empty prefix.

Every function here is shared by the dataset, the collator, the trainer and the exploration code so
that a row is rendered the same way when it is trained on and when the policy is sampled from it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from trl.data_utils import extract_prompt, prepare_multimodal_messages


logger = logging.getLogger(__name__)

STEP_PAIR_COLUMNS = ("prompt", "images", "prefix", "chosen", "rejected", "reference")
DEFAULT_STEP_SEPARATOR = "\n"
_MARKER = "\u2063SRPO_END_MARKER\u2063"


class RowError(ValueError):
    """A step-pair row that cannot be used; the message names the row and the field."""

    def __init__(self, index: Any, field: str, problem: str):
        self.index, self.field, self.problem = index, field, problem
        super().__init__(f"row {index}: field '{field}': {problem}")


def _check_messages(messages: list, index: Any, field: str) -> list:
    """A completion given as chat messages (TRL's conversational chosen / rejected): kept as messages and
    rendered by the chat template, as DPOTrainer does (tool calls, `thinking`, harmony channels)."""
    if not messages:
        raise RowError(index, field, "is an empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("assistant", "tool"):
            role = message.get("role") if isinstance(message, dict) else type(message).__name__
            raise RowError(
                index,
                field,
                f"message {i} is {role!r}: a completion is one assistant turn (assistant and tool "
                "messages); put earlier turns in 'prompt'",
            )
        if message.get("content") is None and not message.get("tool_calls") and not message.get("thinking"):
            raise RowError(index, field, f"message {i} has no content, tool_calls or thinking")
    return list(messages)


def _check_steps(value: Any, index: Any, field: str, allow_empty: bool) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise RowError(index, field, f"must be a list of strings (one per reasoning step), got {type(value).__name__}")
    steps = list(value)
    for i, step in enumerate(steps):
        if not isinstance(step, str):
            raise RowError(index, field, f"step {i} must be a string, got {type(step).__name__}")
        if not step.strip():
            raise RowError(index, field, f"step {i} is empty")
    if not steps and not allow_empty:
        raise RowError(index, field, "is an empty list; omit it (or use None) when the row has no reference path")
    return steps


def normalize_row(row: dict[str, Any], index: Any) -> dict[str, Any]:
    """Validate one row and return it in canonical form.

    Canonical form: ``prompt`` (str or list of messages; an implicit prompt inside chosen / rejected
    is extracted as DPO does), ``images`` (list, possibly empty), ``prefix`` (list of str),
    ``chosen``/``rejected`` (str, or for a conversational prompt a list of assistant / tool messages
    that the chat template renders, see `render_row`), ``reference`` (list of str or None),
    ``branch_point`` (int; defaults to the number of prefix steps).
    Other columns (``id``, ``branch_point``, ...) are kept as they are. Raises :class:`RowError`.
    """
    row = dict(row)
    if "prompt" not in row or row["prompt"] is None:
        chosen, rejected = row.get("chosen"), row.get("rejected")
        # DPO's implicit prompt: the shared start of chosen and rejected (turns, or characters of text)
        if type(chosen) is type(rejected) and isinstance(chosen, (list, str)) and chosen and rejected:
            row = {**row, **extract_prompt({"chosen": chosen, "rejected": rejected})}
        if not row.get("prompt"):
            raise RowError(index, "prompt", "is missing; every row needs the question it answers")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise RowError(index, "prompt", "is empty")
    elif not (isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt)):
        raise RowError(index, "prompt", "must be a string or a non-empty list of chat messages with 'role'")

    for field in ("chosen", "rejected"):
        value = row.get(field)
        if value is None:
            raise RowError(index, field, "is missing")
        if isinstance(value, list):
            row[field] = _check_messages(value, index, field)
            if isinstance(row["prompt"], str):
                raise RowError(
                    index, field, "is a list of messages but 'prompt' is a string; give both as chat messages"
                )
            continue
        if not isinstance(value, str):
            raise RowError(index, field, f"must be a string, got {type(value).__name__}")
        if not value.strip():
            raise RowError(index, field, "is empty; a continuation needs at least one token")
        row[field] = value
    if row["chosen"] == row["rejected"]:
        raise RowError(index, "rejected", "is identical to 'chosen'; a pair needs two different continuations")

    row["prefix"] = _check_steps(row.get("prefix"), index, "prefix", allow_empty=True)
    reference = row.get("reference")
    row["reference"] = (
        _check_steps(reference, index, "reference", allow_empty=False) if reference is not None else None
    )

    branch_point = row.get("branch_point")
    if branch_point is None:
        branch_point = len(row["prefix"])  # a prefix of k steps branches at point k
    if isinstance(branch_point, bool) or not isinstance(branch_point, int) or branch_point < 0:
        raise RowError(index, "branch_point", f"must be a non-negative integer, got {branch_point!r}")
    row["branch_point"] = branch_point

    images = row.pop("image", None)
    if images is not None:
        row["images"] = [images]
    images = row.get("images")
    if images is None:
        images = []
    if not isinstance(images, (list, tuple)):
        raise RowError(index, "images", f"must be a list of images, got {type(images).__name__}")
    row["images"] = list(images)
    return row


def count_image_placeholders(prompt: Any, image_token: str | None) -> int | None:
    """Number of images a prompt asks for, or None when the prompt leaves it to the images given.

    Conversational prompts whose content is plain text get one placeholder per image inserted
    (TRL's ``prepare_multimodal_messages``), so only structured content is counted.
    """
    if isinstance(prompt, str):
        return prompt.count(image_token) if image_token else None
    structured = [m for m in prompt if isinstance(m.get("content"), list)]
    if not structured:
        return None
    return sum(
        1 for m in structured for part in m["content"] if isinstance(part, dict) and part.get("type") == "image"
    )


def check_image_count(row: dict[str, Any], index: Any, image_token: str | None) -> None:
    expected = count_image_placeholders(row["prompt"], image_token)
    if isinstance(row["prompt"], str) and expected == 0 and row["images"]:
        return  # a plain question with images: rendered as one user message (see `as_chat`)
    if expected is not None and expected != len(row["images"]):
        raise RowError(
            index,
            "images",
            f"the prompt has {expected} image placeholder(s) but the row has {len(row['images'])} image(s); "
            "give one image per placeholder",
        )


# ----------------------------------------------------------------------------------------------
# Rendering: rows -> text
# ----------------------------------------------------------------------------------------------


def tokenizer_of(processing_class: Any) -> Any:
    return getattr(processing_class, "tokenizer", processing_class)


def _chat_messages(processing_class: Any, messages: list, images: list) -> list:
    """Messages as the processor's chat template wants them: structured content with image parts.

    TRL's `prepare_multimodal_messages` puts the images before the first plain-string user turn; if
    a structured turn already holds the image placeholders, a later plain turn would get them a
    second time, so plain turns are only wrapped as text then.
    """
    if not hasattr(processing_class, "tokenizer"):  # plain tokenizers take string content
        return messages
    placed = any(
        isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") == "image" for p in m["content"])
        for m in messages
    )
    if placed:
        messages = [
            {**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str) else m
            for m in messages
        ]
    return prepare_multimodal_messages(messages, images=images)


def image_token_of(processing_class: Any) -> str | None:
    return getattr(processing_class, "image_token", None) or getattr(
        tokenizer_of(processing_class), "image_token", None
    )


def as_chat(processing_class: Any, prompt: Any, images: list | None) -> Any:
    """A plain-text question that comes with images but has no image placeholder becomes one user
    message, so the chat template places the images (the record format of exploration and the
    record pipeline). A string that writes its own placeholders stays a standard prompt."""
    if isinstance(prompt, str) and images:
        token = image_token_of(processing_class)
        if token and token not in prompt:
            return [{"role": "user", "content": prompt}]
    return prompt


def template_kwargs(row: dict[str, Any]) -> dict[str, Any]:
    """What a row passes to the chat template besides its messages, as DPOTrainer does: its `tools`
    (a list, or a JSON string) and its per-row `chat_template_kwargs` (e.g. `enable_thinking`)."""
    kwargs = dict(row.get("chat_template_kwargs") or {})
    tools = row.get("tools")
    if isinstance(tools, str):
        tools = json.loads(tools)
    if tools is not None:
        kwargs["tools"] = tools
    return kwargs


def render_prompt(processing_class: Any, prompt: Any, images: list | None = None, **template_kwargs) -> str:
    """The prompt as the model sees it before the assistant's reasoning starts.

    A conversational prompt is rendered with the chat template and the generation prompt (the
    assistant turn is opened, not closed; a prompt ending in an assistant turn is continued); a
    standard prompt is used as it is.
    """
    prompt = as_chat(processing_class, prompt, images)
    if isinstance(prompt, str):
        return prompt
    messages = _chat_messages(processing_class, prompt, images or [])
    continued = prompt[-1].get("role") == "assistant"
    return processing_class.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=not continued,
        continue_final_message=continued,
        **template_kwargs,
    )


def end_of_answer_text(processing_class: Any, prompt: Any, images: list | None = None, **template_kwargs) -> str:
    """What closes a final answer: EOS for a standard prompt, the template's end of turn for a chat.

    Continuations are never closed (a step is not the end of an answer); only the reference path is.
    """
    tokenizer = tokenizer_of(processing_class)
    prompt = as_chat(processing_class, prompt, images)
    if isinstance(prompt, str):
        return tokenizer.eos_token
    messages = _chat_messages(processing_class, [*prompt, {"role": "assistant", "content": _MARKER}], images or [])
    full = processing_class.apply_chat_template(messages, tokenize=False, **template_kwargs)
    if _MARKER not in full:  # a template that rewrites assistant content: fall back to EOS
        logger.warning("The chat template does not render assistant content verbatim; closing answers with EOS.")
        return tokenizer.eos_token
    return full.split(_MARKER, 1)[1]


def _common_prefix(texts: list[str]) -> str:
    import os.path

    return os.path.commonprefix(texts)


def render_row(processing_class: Any, row: dict[str, Any], images: list | None = None) -> dict[str, str]:
    """A row's texts: `prompt` (what precedes the assistant's reasoning), `chosen` / `rejected` (the
    continuations, never closed), `end` (what closes a final answer) and `chosen_end` / `rejected_end`
    (what closes that continuation where it is closed: the fallback reference path `prefix + chosen`,
    and both continuations with `align_eos`).

    Rendered as DPOTrainer renders them, so that for a plain DPO row SRPO's prompt is DPO's, its
    `chosen + chosen_end` (the reference path) is DPO's chosen completion and `rejected + end` DPO's
    rejected one: a standard row's completions are closed with EOS (not twice); a conversational row's
    completions given as messages (tool calls, `thinking`, harmony channels) are what the chat
    template renders after the prompt, the prompt being the common start of the template applied to
    the prompt (with the generation prompt), to prompt + chosen and to prompt + rejected. Tools and
    `chat_template_kwargs` reach every template call.
    """
    if images is None:
        images = row.get("images") or None  # placed by the template; their pixels are not needed here
    kwargs = template_kwargs(row)
    prompt = as_chat(processing_class, row["prompt"], images)
    end = end_of_answer_text(processing_class, prompt, images, **kwargs)
    prompt_text = render_prompt(processing_class, prompt, images, **kwargs)
    completions = {f: row[f] for f in ("chosen", "rejected") if row.get(f) is not None}  # a prompt-only row: none
    if any(isinstance(value, list) for value in completions.values()):
        full = {}
        for field, value in completions.items():
            messages = value if isinstance(value, list) else [{"role": "assistant", "content": value}]
            chat = _chat_messages(processing_class, [*prompt, *messages], images or [])
            full[field] = processing_class.apply_chat_template(chat, tokenize=False, **kwargs)
        prompt_text = _common_prefix([prompt_text, *full.values()])
        completions = {field: text[len(prompt_text) :] for field, text in full.items()}
    out = {"prompt": prompt_text, "end": end, "chosen_end": end, "rejected_end": end}
    for field, text in completions.items():
        closed = bool(end) and text.endswith(end) and len(text) > len(end)
        if isinstance(row[field], list):  # rendered by the template, closed with the end of turn
            if closed:
                text = text[: -len(end)]
            else:  # the template closes this turn otherwise (e.g. a tool call): kept as rendered
                out[f"{field}_end"] = ""
        elif isinstance(prompt, str) and closed:  # a standard completion given with its EOS: not closed twice
            text = text[: -len(end)]
        out[field] = text
    return out


def continuation_prefix_text(prefix: list[str], separator: str = DEFAULT_STEP_SEPARATOR) -> str:
    """The assistant text that precedes a continuation: the prefix steps, each ending in the separator."""
    return "".join(step + separator for step in prefix)


def reference_text(row: dict[str, Any], separator: str = DEFAULT_STEP_SEPARATOR) -> str:
    """The reference path as text (without the end of answer): the row's reference, else prefix + chosen."""
    if row.get("reference"):
        return separator.join(row["reference"])
    return continuation_prefix_text(row["prefix"], separator) + row["chosen"]


# ----------------------------------------------------------------------------------------------
# Encoding: rows -> token ids, segment by segment
# ----------------------------------------------------------------------------------------------


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def steps_ids(tokenizer: Any, steps: list[str], separator: str, close_last: bool) -> list[int]:
    """Token ids of steps tokenized one by one (each step with its separator).

    Tokenizing per step keeps a prefix's ids a prefix of the reference path's ids, so the segments of
    a row (and of all rows of a question) line up token for token.
    """
    ids: list[int] = []
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        ids += _ids(tokenizer, step + (separator if (close_last or not last) else ""))
    return ids


def prefix_text_ids(tokenizer: Any, text: str, separator: str) -> list[int]:
    """Token ids of an assistant prefix given as text: split after each ``separator`` and tokenized
    step by step (:func:`steps_ids`), so that generation continues from the ids the trainer scores."""
    if not text:
        return []
    if not separator:
        return _ids(tokenizer, text)
    return steps_ids(tokenizer, text.split(separator), separator, close_last=False)


def encode_text_segments(
    row: dict[str, Any],
    processing_class: Any,
    separator: str = DEFAULT_STEP_SEPARATOR,
    fallback_reference_eos: bool = True,
    align_eos: bool = False,
) -> dict[str, list[int]]:
    """Token ids of everything after the prompt: prefix, chosen, rejected and the reference path.

    The reference path is closed (EOS / end of turn); continuations are not, unless ``align_eos``
    (RPO / ORPO: both continuations end with EOS). A row without a reference scores ``prefix + chosen``
    as its reference path (RPO), closed unless ``fallback_reference_eos`` is False (one-step
    continuations that are not final answers).
    """
    tokenizer = tokenizer_of(processing_class)
    texts = render_row(processing_class, row)
    prefix_ids = steps_ids(tokenizer, row["prefix"], separator, close_last=True)
    chosen_ids = _ids(tokenizer, texts["chosen"])
    rejected_ids = _ids(tokenizer, texts["rejected"])
    if row.get("reference"):
        reference_ids = steps_ids(tokenizer, row["reference"], separator, close_last=False) + _ids(
            tokenizer, texts["end"]
        )
    else:
        closing = _ids(tokenizer, texts["chosen_end"]) if fallback_reference_eos else []
        reference_ids = prefix_ids + chosen_ids + closing
    if align_eos:
        chosen_ids = chosen_ids + _ids(tokenizer, texts["chosen_end"])
        rejected_ids = rejected_ids + _ids(tokenizer, texts["rejected_end"])
    return {
        "prefix_ids": prefix_ids,
        "chosen_ids": chosen_ids,
        "rejected_ids": rejected_ids,
        "reference_ids": reference_ids,
    }


def shared_start(chosen_ids: list[int], rejected_ids: list[int]) -> int:
    """How many leading tokens the two continuations share (RPO's released loss skips them)."""
    n = 0
    for a, b in zip(chosen_ids, rejected_ids):
        if a != b:
            break
        n += 1
    return n


def align_start(seg: dict[str, list[int]], align_tokens: str, index: Any = "?") -> int:
    """Where the alignment term starts scoring the continuations, counted after the prefix: 0, or with
    ``align_tokens="after_shared"`` the length of their shared start. A continuation that has nothing
    after it (it is the other's start) raises :class:`RowError` naming the row."""
    if align_tokens != "after_shared":
        return 0
    chosen, rejected = list(seg["chosen_ids"]), list(seg["rejected_ids"])
    shared = shared_start(chosen, rejected)
    if shared == min(len(chosen), len(rejected)):
        field = "chosen" if len(chosen) <= len(rejected) else "rejected"
        raise RowError(
            index,
            field,
            f"is the start of the other continuation (all its {shared} tokens are shared), so "
            "align_tokens='after_shared' leaves it nothing to score; set align_eos=True (each continuation then "
            "ends with its own EOS, as in RPO) or remove the row",
        )
    return shared


def encode_prompt_text(row: dict[str, Any], tokenizer: Any) -> list[int]:
    """Prompt ids for a text model (special tokens such as BOS only for a raw string prompt:
    a chat template already writes them)."""
    text = render_row(tokenizer, row)["prompt"]
    return tokenizer(text, add_special_tokens=isinstance(row["prompt"], str))["input_ids"]
