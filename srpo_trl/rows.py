"""Step-pair rows: the column contract, validation, and how a row becomes text and token ids.

One row is one branch point (see docs/trainer.md): ``prompt`` (+ optional ``images``), the reasoning
``prefix`` already taken (list of steps), a favorable ``chosen`` and an unfavorable ``rejected``
continuation, and optionally the verified ``reference`` path (list of steps). A plain DPO row
(``prompt``/``chosen``/``rejected``, standard or conversational) is a valid row with an empty prefix.

Every function here is shared by the dataset, the collator, the trainer and the exploration code so
that a row is rendered the same way when it is trained on and when the policy is sampled from it.
"""

from __future__ import annotations

import logging
from typing import Any

from trl.data_utils import extract_prompt, is_conversational, prepare_multimodal_messages

logger = logging.getLogger(__name__)

STEP_PAIR_COLUMNS = ("prompt", "images", "prefix", "chosen", "rejected", "reference")
DEFAULT_STEP_SEPARATOR = "\n"
_MARKER = "\u2063SRPO_END_MARKER\u2063"


class RowError(ValueError):
    """A step-pair row that cannot be used; the message names the row and the field."""

    def __init__(self, index: Any, field: str, problem: str):
        self.index, self.field, self.problem = index, field, problem
        super().__init__(f"row {index}: field '{field}': {problem}")


def _message_list_text(messages: list, index: Any, field: str) -> str:
    """The text of a completion given as assistant messages (TRL's conversational chosen/rejected)."""
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "assistant":
        raise RowError(
            index,
            field,
            "a conversational completion must be exactly one assistant message "
            f"(got {len(messages)} message(s)); put earlier turns in 'prompt'",
        )
    content = messages[0].get("content")
    if isinstance(content, list):  # structured content: keep the text parts
        content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
    if not isinstance(content, str):
        raise RowError(index, field, f"assistant content must be text, got {type(content).__name__}")
    return content


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

    Canonical form: ``prompt`` (str or list of messages), ``images`` (list, possibly empty),
    ``prefix`` (list of str), ``chosen``/``rejected`` (str), ``reference`` (list of str or None),
    ``branch_point`` (int; defaults to the number of prefix steps).
    Other columns (``id``, ``branch_point``, ...) are kept as they are. Raises :class:`RowError`.
    """
    row = dict(row)
    if "prompt" not in row or row["prompt"] is None:
        if is_conversational(row) and isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list):
            row = {**row, **extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]})}
        else:
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
            value = _message_list_text(value, index, field)
        if not isinstance(value, str):
            raise RowError(index, field, f"must be a string, got {type(value).__name__}")
        if not value.strip():
            raise RowError(index, field, "is empty; a continuation needs at least one token")
        row[field] = value
    if row["chosen"] == row["rejected"]:
        raise RowError(index, "rejected", "is identical to 'chosen'; a pair needs two different continuations")

    row["prefix"] = _check_steps(row.get("prefix"), index, "prefix", allow_empty=True)
    reference = row.get("reference")
    row["reference"] = _check_steps(reference, index, "reference", allow_empty=False) if reference is not None else None

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
    return sum(1 for m in structured for part in m["content"] if isinstance(part, dict) and part.get("type") == "image")


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
        isinstance(m.get("content"), list) and any(isinstance(p, dict) and p.get("type") == "image" for p in m["content"])
        for m in messages
    )
    if placed:
        messages = [
            {**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str) else m
            for m in messages
        ]
    return prepare_multimodal_messages(messages, images=images)


def image_token_of(processing_class: Any) -> str | None:
    return getattr(processing_class, "image_token", None) or getattr(tokenizer_of(processing_class), "image_token", None)


def as_chat(processing_class: Any, prompt: Any, images: list | None) -> Any:
    """A plain-text question that comes with images but has no image placeholder becomes one user
    message, so the chat template places the images (the record format of exploration and the
    record pipeline). A string that writes its own placeholders stays a standard prompt."""
    if isinstance(prompt, str) and images:
        token = image_token_of(processing_class)
        if token and token not in prompt:
            return [{"role": "user", "content": prompt}]
    return prompt


def render_prompt(processing_class: Any, prompt: Any, images: list | None = None) -> str:
    """The prompt as the model sees it before the assistant's reasoning starts.

    A conversational prompt is rendered with the chat template and the generation prompt (the
    assistant turn is opened, not closed); a standard prompt is used as it is.
    """
    prompt = as_chat(processing_class, prompt, images)
    if isinstance(prompt, str):
        return prompt
    messages = _chat_messages(processing_class, prompt, images or [])
    return processing_class.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def end_of_answer_text(processing_class: Any, prompt: Any, images: list | None = None) -> str:
    """What closes a final answer: EOS for a standard prompt, the template's end of turn for a chat.

    Continuations are never closed (a step is not the end of an answer); only the reference path is.
    """
    tokenizer = tokenizer_of(processing_class)
    prompt = as_chat(processing_class, prompt, images)
    if isinstance(prompt, str):
        return tokenizer.eos_token
    messages = _chat_messages(processing_class, [*prompt, {"role": "assistant", "content": _MARKER}], images or [])
    full = processing_class.apply_chat_template(messages, tokenize=False)
    if _MARKER not in full:  # a template that rewrites assistant content: fall back to EOS
        logger.warning("The chat template does not render assistant content verbatim; closing answers with EOS.")
        return tokenizer.eos_token
    return full.split(_MARKER, 1)[1]


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
) -> dict[str, list[int]]:
    """Token ids of everything after the prompt: prefix, chosen, rejected and the reference path.

    The reference path is closed (EOS / end of turn); continuations are not. A row without a
    reference scores ``prefix + chosen`` as its reference path (RPO), closed unless
    ``fallback_reference_eos`` is False (one-step continuations that are not final answers).
    """
    tokenizer = tokenizer_of(processing_class)
    end_ids = _ids(tokenizer, end_of_answer_text(processing_class, row["prompt"], row["images"]))
    prefix_ids = steps_ids(tokenizer, row["prefix"], separator, close_last=True)
    chosen_ids = _ids(tokenizer, row["chosen"])
    rejected_ids = _ids(tokenizer, row["rejected"])
    if row.get("reference"):
        reference_ids = steps_ids(tokenizer, row["reference"], separator, close_last=False) + end_ids
    else:
        reference_ids = prefix_ids + chosen_ids + (end_ids if fallback_reference_eos else [])
    return {
        "prefix_ids": prefix_ids,
        "chosen_ids": chosen_ids,
        "rejected_ids": rejected_ids,
        "reference_ids": reference_ids,
    }


def encode_prompt_text(row: dict[str, Any], tokenizer: Any) -> list[int]:
    """Prompt ids for a text model (special tokens such as BOS only for a raw string prompt:
    a chat template already writes them)."""
    text = render_prompt(tokenizer, row["prompt"])
    return tokenizer(text, add_special_tokens=isinstance(row["prompt"], str))["input_ids"]
