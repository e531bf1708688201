"""How a request reaches an OpenAI-compatible server: the endpoint modes and their preflight.

Exploration continues a partial assistant answer. Servers offer three ways to ask for that:

* ``tokens``: the prompt and prefix rendered and tokenized here, with the policy's own processor,
  exactly as the trainer tokenizes them (:func:`srpo_trl.rows.render_prompt`, the prefix step by
  step), and sent as token ids to ``/v1/completions`` (vLLM, SGLang, llama.cpp accept a list of ids);
* ``text``: the same rendering sent as text to ``/v1/completions`` (any completions server:
  transformers serve, TGI, ...); the server tokenizes it, which gives the trainer's ids when
  tokenizing the whole text equals tokenizing its pieces (:meth:`ClientRenderer.retokenizes_alike`
  checks that for every request);
* ``chat``: chat messages to ``/v1/chat/completions``, the prefix as a final assistant message with
  ``continue_final_message`` (a vLLM / SGLang extension; the server renders the chat template).

Requests with images always use ``chat`` (``/v1/completions`` takes no images). ``auto`` picks
``tokens``, else ``text`` when a processor is known, else ``chat``, after a preflight
(:meth:`srpo_trl.backends.OpenAICompatibleBackend.preflight`) that asks the server once with
``max_tokens=1`` and names what it refused or ignored and what to pass instead.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .rows import prefix_text_ids, render_prompt, tokenizer_of


logger = logging.getLogger(__name__)

__all__ = ["MODES", "PreflightError", "PreflightReport", "ClientRenderer", "resolve_processor"]

MODES = ("auto", "chat", "text", "tokens")

#: What each mode sends, for messages and docs.
DESCRIPTION = {
    "tokens": "token ids rendered by the policy's processor, to /v1/completions",
    "text": "text rendered by the policy's processor, to /v1/completions",
    "chat": "chat messages to /v1/chat/completions (the server renders the template; prefixes with continue_final_message)",
}


class PreflightError(ValueError):
    """The server cannot serve this run as configured; the message names what it refused and what to pass."""


@dataclass
class PreflightReport:
    """The mode chosen and what the preflight found (refused or ignored fields, tokenization)."""

    mode: str
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"endpoint mode: {self.mode} ({DESCRIPTION[self.mode]})", *(f"  {n}" for n in self.notes)]


class ClientRenderer:
    """Prompt + images + prefix rendered with the policy's processor, as the trainer renders them."""

    def __init__(self, processing_class: Any, separator: str):
        self.processing_class = processing_class
        self.tokenizer = tokenizer_of(processing_class)
        self.separator = separator

    def prompt_text(self, request) -> str:
        return render_prompt(self.processing_class, request.prompt, request.images, **request.template_kwargs)

    def text(self, request) -> str:
        """The text the model continues: the rendered prompt, then the prefix."""
        return self.prompt_text(request) + request.assistant_prefix

    def ids(self, request) -> list[int]:
        """The token ids the trainer scores: the prompt on its own (BOS only for a raw string prompt, as
        the in-process backend encodes it), then the prefix step by step."""
        raw = isinstance(request.prompt, str)
        ids = self.tokenizer(self.prompt_text(request), add_special_tokens=raw)["input_ids"]
        return list(ids) + prefix_text_ids(self.tokenizer, request.assistant_prefix, self.separator)

    def server_ids(self, request) -> list[int]:
        """What a completions server makes of :meth:`text` with this tokenizer (special tokens added,
        as vLLM and transformers serve tokenize a text prompt)."""
        return list(self.tokenizer(self.text(request))["input_ids"])

    def retokenizes_alike(self, request) -> bool:
        return self.server_ids(request) == self.ids(request)


def resolve_processor(source: str | None, served_model: str | None) -> tuple[Any, str | None]:
    """The policy's processor for client-side rendering: ``(processing_class, where)`` or ``(None, None)``.

    ``source``: a folder (save_pretrained), a model-hub name already in the local cache, ``"none"``
    (render on the server) or ``None``/``"auto"``: the served model's name when it is such a folder or
    cached name (transformers serve takes a folder as the model name; vLLM usually serves a cached hub
    name). Nothing is downloaded.
    """
    from .loading import load_processing_class

    if source is not None and str(source).lower() == "none":
        return None, None
    explicit = source is not None and str(source).lower() != "auto"
    name = str(source) if explicit else served_model
    if not name:
        return None, None
    folder = _local_folder(name)
    if folder is None:
        if explicit:
            raise FileNotFoundError(
                f"--processor {name!r}: no such folder, and not a model in the local Hugging Face cache"
            )
        return None, None
    try:
        return load_processing_class(folder), str(folder)
    except (OSError, ValueError) as exc:
        if explicit:
            raise FileNotFoundError(f"--processor {name!r}: {exc}") from exc
        logger.info("the served model %r has no loadable processor here (%s): the server renders prompts", name, exc)
        return None, None


def processor_source(source: str | None, served_model: str | None) -> str | None:
    """Where :func:`resolve_processor` would load from, without loading it (for resume checks)."""
    if source is not None and str(source).lower() == "none":
        return None
    name = str(source) if source is not None and str(source).lower() != "auto" else served_model
    folder = _local_folder(name) if name else None
    return str(folder) if folder is not None else None


def _local_folder(name: str) -> Path | None:
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return path.resolve()
    if "/" not in name or name.startswith((".", "/", "~")):
        return None
    try:  # a hub name already downloaded: its snapshot folder (never a download)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        return None
