"""Asking a model for a structured answer: the one loop shared by the verifiers' judge, evaluation's
judges and the record agents (standard library only).

:func:`ask` sends a chat to ``backend.chat``, parses the reply with the caller's ``parse``, and when
the reply cannot be used keeps it in the conversation and follows it with a user turn that says
what was wrong (the error fed back), up to ``retries`` more times. :func:`json_objects` and
:func:`extract_json_object` find the JSON a model wrote among prose and code fences.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


logger = logging.getLogger(__name__)

__all__ = ["ReplyError", "Asked", "AskFailed", "BackendFailed", "ask", "json_objects", "extract_json_object"]


class ReplyError(ValueError):
    """A reply that cannot be used; ``reason`` is a short machine-readable kind (``not_json``, ...)."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


@dataclass
class Asked:
    """A parsed answer, the attempts it took, the raw reply and the errors of the earlier attempts."""

    value: Any
    attempts: int
    raw: str
    errors: list[str] = field(default_factory=list)


class AskFailed(Exception):
    """No usable reply after every attempt: ``error`` is the last parse error, ``raw`` the last reply."""

    def __init__(self, error: ValueError, attempts: int, raw: str | None, errors: list[str]):
        self.error, self.attempts, self.raw, self.errors = error, attempts, raw, errors
        super().__init__(f"no usable reply after {attempts} attempt(s); last error: {error}")


class BackendFailed(Exception):
    """``backend.chat`` raised (its own transport retries spent) at ``attempt``; the cause is chained."""

    def __init__(self, attempt: int, raw: str | None):
        self.attempt, self.raw = attempt, raw
        super().__init__(f"the backend failed at attempt {attempt}")


def ask(
    backend: Any,
    messages: list[dict],
    parse: Callable[[str], Any],
    *,
    retries: int = 2,
    retry_message: Callable[[ValueError], str],
    images: list | None = None,
    temperature: float = 0.0,
    max_new_tokens: int = 512,
    what: str = "reply",
    seed: int | None = None,
) -> Asked:
    """Ask until ``parse(reply)`` stops raising ``ValueError`` (at most ``retries + 1`` times).

    After a bad reply the conversation grows by the reply (assistant) and ``retry_message(error)``
    (user; structured text content when there are images, so that chat templates do not attach the
    images again). Raises :class:`AskFailed` when every attempt failed, :class:`BackendFailed`
    (chained to the backend's exception) when the backend raised. ``seed`` (when not None) is passed
    to ``backend.chat`` so that a sampled reply is reproducible.
    """
    seeded = {} if seed is None else {"seed": seed}
    errors: list[str] = []
    raw: str | None = None
    last: ValueError | None = None
    for attempt in range(1, retries + 2):
        try:
            reply = backend.chat(
                messages, images=images, temperature=temperature, max_new_tokens=max_new_tokens, **seeded
            )
        except Exception as exc:
            raise BackendFailed(attempt, raw) from exc
        raw = reply if isinstance(reply, str) else str(reply)
        try:
            return Asked(parse(raw), attempt, raw, errors)
        except ValueError as exc:
            last = exc
            reason = getattr(exc, "reason", None)
            errors.append(f"{reason}: {exc}" if reason else str(exc))
            logger.info("%s not usable (attempt %d/%d): %s", what, attempt, retries + 1, exc)
            text = retry_message(exc)
            messages = messages + [
                {"role": "assistant", "content": raw},
                {"role": "user", "content": [{"type": "text", "text": text}] if images else text},
            ]
    assert last is not None
    raise AskFailed(last, retries + 1, raw, errors)


def json_objects(text: str) -> list[Any]:
    """Every JSON object that can be decoded from ``text`` (code fences and prose around them are fine)."""
    decoder = json.JSONDecoder()
    out, i = [], 0
    while True:
        i = text.find("{", i)
        if i < 0:
            return out
        try:
            obj, end = decoder.raw_decode(text, i)
            out.append(obj)
            i = end
        except json.JSONDecodeError:
            i += 1


def extract_json_object(text: str) -> dict:
    """The JSON object in a model's answer: the whole answer, a fenced ```json block, or the first
    ``{...}`` that parses. Raises :class:`ReplyError` (``not_json``)."""
    if not isinstance(text, str) or not text.strip():
        raise ReplyError("not_json", "the reply is empty; answer with one JSON object")
    s = text.strip()
    candidates = [m.group(1) for m in re.finditer(r"```(?:json|JSON)?\s*(.*?)```", s, re.S)] + [s]
    for c in candidates:
        try:
            obj = json.loads(c)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
        raise ReplyError("not_json", f"the reply is JSON but a {type(obj).__name__}, not an object {{...}}")
    for obj in json_objects(s):
        if isinstance(obj, dict):
            return obj
    snippet = s[:120].replace("\n", " ")
    raise ReplyError("not_json", f"the reply is not a JSON object (it starts with: {snippet!r})")
