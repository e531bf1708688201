"""Generation backends: one layer shared by exploration, evaluation and the record-writing agents.

Two implementations of :class:`GenerationBackend`:

* :class:`TransformersBackend` -- in-process ``model.generate`` (text models and VLMs), batched with
  left padding, seeded. The model sees exactly what the trainer scores: the prompt rendered by
  :func:`srpo_trl.rows.render_prompt` followed by the partial assistant reasoning.
* :class:`OpenAICompatibleBackend` -- an OpenAI-compatible HTTP server (vLLM, SGLang, TGI, hosted
  APIs), with retries and exponential backoff, and a small thread pool to keep the server busy.

Both answer two calls::

    backend.generate([GenerationRequest(prompt, images, assistant_prefix)], num_samples=10,
                     temperature=0.5, max_new_tokens=512, seed=0)   # -> list (per request) of lists of str
    backend.chat(messages, images=None, temperature=0.0, seed=None)   # -> str (judges, record agents)

``generate`` returns only the newly generated text (after ``assistant_prefix``), without special
tokens, stopped at EOS / end of turn.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

from . import cost
from .http import RequestFailed, RetryableError, post_json, redact_url, response_cap
from .images import open_image, open_images
from .rows import DEFAULT_STEP_SEPARATOR, end_of_answer_text, prefix_text_ids, render_prompt, tokenizer_of


logger = logging.getLogger(__name__)

__all__ = [
    "BackendError",
    "GenerationRequest",
    "GenerationBackend",
    "TransformersBackend",
    "OpenAICompatibleBackend",
    "load_image",
    "load_images",
    "to_openai_messages",
]


class BackendError(RuntimeError):
    """Generation failed for good (after the retries): the message names the URL / request and the last error."""


@dataclass
class GenerationRequest:
    """What to generate from.

    ``prompt``: plain text, or chat messages in TRL's conversational format.
    ``images``: PIL images or file paths (a path that cannot be read raises an error naming the file).
    ``assistant_prefix``: partial assistant reasoning to continue (the same assistant turn, NOT a new
    turn); typically :func:`srpo_trl.rows.continuation_prefix_text` of the prefix steps.
    ``template_kwargs``: what the chat template gets besides the messages, as the trainer passes it
    (:func:`srpo_trl.rows.template_kwargs` of a row: its ``tools`` and ``chat_template_kwargs``), so
    that a continuation is sampled from the prompt it is later trained on.
    """

    prompt: str | list[dict]
    images: list = field(default_factory=list)
    assistant_prefix: str = ""
    template_kwargs: dict = field(default_factory=dict)


@runtime_checkable
class GenerationBackend(Protocol):
    def generate(
        self,
        requests: list[GenerationRequest],
        *,
        num_samples: int = 1,
        temperature: float = 0.5,
        max_new_tokens: int = 512,
        seed: int | None = None,
    ) -> list[list[str]]:
        """``num_samples`` continuations for each request, in request order."""
        ...

    def chat(
        self,
        messages: list[dict],
        *,
        images: list | None = None,
        temperature: float = 0.0,
        max_new_tokens: int = 512,
        seed: int | None = None,
    ) -> str:
        """One answer to a chat (judges, record agents); ``seed`` makes a sampled answer reproducible."""
        ...


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


# One rule for every stage (srpo_trl.images): RGB, whatever the source.
load_image = open_image
load_images = open_images


# ----------------------------------------------------------------------------------------------
# In-process transformers backend
# ----------------------------------------------------------------------------------------------


def _check_requests(requests: list, num_samples: int) -> bool:
    """Validate a generate() call; False when there is nothing to generate."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    for i, req in enumerate(requests):
        if not isinstance(req, GenerationRequest):
            raise TypeError(f"request {i}: expected a GenerationRequest, got {type(req).__name__}")
    return bool(requests)


class TransformersBackend:
    """In-process generation with ``model.generate`` (text models and VLMs).

    The text generated from is ``render_prompt(processing_class, prompt, images) + assistant_prefix``,
    tokenized the way the trainer tokenizes it: the prompt on its own (with the processor for a VLM,
    BOS only for a raw string prompt), then the assistant prefix step by step (split after each
    ``separator``), so that a prefix's token ids are those the trainer scores.

    With ``shared_prefix`` (the default) each request is prefilled once and its ``num_samples``
    continuations are decoded from copies of that cache; a row leaves the batch as soon as it stops
    (:func:`srpo_trl.sampling.sample_shared_prefix`). A batch then holds ``max(1, batch_size //
    num_samples)`` requests. Each sample draws its tokens from its own random stream, derived from
    ``seed``, its request's index and its sample index: for a given ``seed`` the samples are the same
    whatever ``batch_size``. ``shared_prefix=False`` (or a generation config asking for something the
    loop does not implement, e.g. beam search or ``no_repeat_ngram_size``) uses ``model.generate``:
    requests x samples, ``batch_size`` sequences at a time (left padding), reproducible for the same
    requests and ``batch_size``. Both draw from the same distribution; for one seed they give
    different samples.

    Sampling uses pure temperature sampling: ``top_k``/``top_p`` of the model's generation config are
    overridden (Qwen VL checkpoints ship ``top_k=1``, which would make every sample identical); pass
    ``generation_kwargs`` to change that (other settings of the model's generation config, such as
    ``repetition_penalty``, apply as in ``generate``). The caller's global RNG state is left
    untouched. What each call costs (tokens prefilled and generated) is reported to
    :mod:`srpo_trl.cost`.
    """

    def __init__(
        self,
        model: Any,
        processing_class: Any,
        batch_size: int = 8,
        separator: str = DEFAULT_STEP_SEPARATOR,
        generation_kwargs: dict | None = None,
        show_progress: bool = True,
        shared_prefix: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.processing_class = processing_class
        self.tokenizer = tokenizer_of(processing_class)
        self.batch_size = batch_size
        self.separator = separator
        self.generation_kwargs = {"top_k": 0, "top_p": 1.0, **(generation_kwargs or {})}
        self.show_progress = show_progress
        self.shared_prefix = shared_prefix
        self._fallback_logged = False
        self._decode_state: dict = {}  # srpo_trl.sampling: may decode steps skip the model's wrapper?
        self.is_processor = hasattr(processing_class, "tokenizer") and processing_class is not self.tokenizer
        self._pad_id = self.tokenizer.pad_token_id
        if self._pad_id is None:
            self._pad_id = self.tokenizer.eos_token_id
        if self._pad_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")
        self._special_ids = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        for tid, added in (getattr(self.tokenizer, "added_tokens_decoder", None) or {}).items():
            if getattr(added, "special", False):
                self._special_ids.add(tid)

    def fingerprint(self) -> dict:
        """The model's identity for resume checks: its folder and a hash of its weight files when it
        was loaded from one, else a cheap digest of its parameters (names, shapes, first values)."""
        from .store import model_fingerprint

        path = getattr(self.model, "name_or_path", None) or getattr(
            getattr(self.model, "config", None), "_name_or_path", ""
        )
        if path and os.path.isdir(path):
            return model_fingerprint(path)
        import hashlib

        digest = hashlib.sha256()
        for name, param in self.model.named_parameters():
            head = param.detach().flatten()[:8].float().cpu().tolist()
            digest.update(f"{name}{tuple(param.shape)}{param.dtype}{head}".encode())
        return {"model": {"class": type(self.model).__name__, "parameters": digest.hexdigest()[:16]}}

    # -- tokenization --------------------------------------------------------------------------

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _prefix_ids(self, assistant_prefix: str) -> list[int]:
        return prefix_text_ids(self.tokenizer, assistant_prefix, self.separator)

    def _stop_ids(self, request: GenerationRequest, images: list) -> list[int]:
        stop = set()
        eos = self.tokenizer.eos_token_id
        if eos is not None:
            stop.add(eos)
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if gen_eos is not None:
            stop.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        if not isinstance(request.prompt, str):
            # The end-of-turn token (e.g. <|im_end|>): the first special token of what closes an
            # assistant turn; never a plain-text token such as a newline, which would cut every sample.
            closing = end_of_answer_text(self.processing_class, request.prompt, images, **request.template_kwargs)
            for tid in self._text_ids(closing):
                if tid in self._special_ids:
                    stop.add(tid)
                    break
                if self.tokenizer.decode([tid]).strip():
                    break
        return sorted(stop)

    def _encode(self, request: GenerationRequest, images: list) -> dict:
        """One request as unpadded tensors: ``input_ids`` plus any vision inputs of the processor."""
        text = render_prompt(self.processing_class, request.prompt, images, **request.template_kwargs)
        raw_prompt = isinstance(request.prompt, str)
        if self.is_processor:
            kwargs = {"text": [text], "return_tensors": "pt"}
            if images:
                kwargs["images"] = images
            kwargs["add_special_tokens"] = raw_prompt  # a chat template already writes BOS
            enc = dict(self.processing_class(**kwargs))
            seq_len = enc["input_ids"].shape[1]
            per_token = {
                k: v[0].tolist()
                for k, v in enc.items()
                if hasattr(v, "dim") and v.dim() == 2 and v.shape == (1, seq_len)
            }
            rest = {k: v for k, v in enc.items() if k not in per_token}
        else:
            if images:
                raise ValueError("images were given but the processing class is a tokenizer, not a processor")
            ids = self.tokenizer(text, add_special_tokens=raw_prompt)["input_ids"]
            per_token = {"input_ids": ids, "attention_mask": [1] * len(ids)}
            rest = {}
        prefix_ids = self._prefix_ids(request.assistant_prefix)
        for k in per_token:
            if k == "input_ids":
                per_token[k] = per_token[k] + prefix_ids
            elif k == "attention_mask":
                per_token[k] = per_token[k] + [1] * len(prefix_ids)
            else:  # token type ids / mm_token_type_ids: the prefix is text
                per_token[k] = per_token[k] + [0] * len(prefix_ids)
        return {"per_token": per_token, "rest": rest}

    def _collate(self, encoded: list[dict]) -> dict:
        import torch

        max_len = max(len(e["per_token"]["input_ids"]) for e in encoded)
        batch: dict[str, Any] = {}
        for key in encoded[0]["per_token"]:
            pad = self._pad_id if key == "input_ids" else 0
            rows = [[pad] * (max_len - len(e["per_token"][key])) + e["per_token"][key] for e in encoded]
            batch[key] = torch.tensor(rows, dtype=torch.long)
        for key in {k for e in encoded for k in e["rest"]}:
            # Rows without images contribute nothing (Qwen-style flat pixel/grid tensors).
            values = [e["rest"][key] for e in encoded if key in e["rest"]]
            batch[key] = torch.cat(values, dim=0) if hasattr(values[0], "dim") else values
        return batch

    # -- generation ----------------------------------------------------------------------------

    def generate(
        self,
        requests: list[GenerationRequest],
        *,
        num_samples: int = 1,
        temperature: float = 0.5,
        max_new_tokens: int = 512,
        seed: int | None = None,
    ) -> list[list[str]]:
        import torch

        if not _check_requests(requests, num_samples):
            return []
        prepared = []
        for req in requests:
            images = load_images(req.images)
            prepared.append((self._encode(req, images), self._stop_ids(req, images)))
        device = getattr(self.model, "device", None) or next(self.model.parameters()).device
        do_sample = temperature > 0
        fork_devices = [device] if getattr(device, "type", "cpu") == "cuda" else []
        was_training = getattr(self.model, "training", False)
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=fork_devices, enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                    if fork_devices:
                        torch.cuda.manual_seed_all(seed)
                config = self._generation_config(do_sample, temperature, max_new_tokens)
                if self._can_share(config):
                    return self._generate_shared(
                        prepared, num_samples, max_new_tokens, config, do_sample, seed, device
                    )
                return self._generate_plain(prepared, num_samples, do_sample, temperature, max_new_tokens, device)
        finally:
            if was_training:
                self.model.train()

    def _generation_kwargs(self, do_sample: bool, temperature: float, max_new_tokens: int) -> dict:
        kwargs = dict(self.generation_kwargs)
        kwargs.update(max_new_tokens=max_new_tokens, do_sample=do_sample)
        if do_sample:
            kwargs["temperature"] = temperature
        else:
            kwargs.update(temperature=None, top_k=None, top_p=None)
        return kwargs

    def _generation_config(self, do_sample: bool, temperature: float, max_new_tokens: int):
        """The model's generation config with this call's settings, as ``generate`` would build it."""
        import copy

        from transformers import GenerationConfig

        base = getattr(self.model, "generation_config", None)
        config = copy.deepcopy(base) if isinstance(base, GenerationConfig) else GenerationConfig()
        config.update(**self._generation_kwargs(do_sample, temperature, max_new_tokens))
        return config

    def _can_share(self, config) -> bool:
        from .sampling import unsupported_settings

        if not self.shared_prefix:
            return False
        why = unsupported_settings(config)
        if getattr(getattr(self.model, "config", None), "is_encoder_decoder", False):
            why.append("an encoder-decoder model")
        if not callable(getattr(self.model, "forward", None)) or not hasattr(self.model, "config"):
            why.append("not a transformers model")
        if why and not self._fallback_logged:
            logger.warning(
                "prefix reuse is off for this model (%s are not implemented there); sampling with model.generate",
                ", ".join(why),
            )
            self._fallback_logged = True
        return not why

    def _generate_shared(self, prepared, num_samples, max_new_tokens, config, do_sample, seed, device):
        import torch
        from tqdm.auto import tqdm

        from .sampling import sample_shared_prefix

        if seed is None:  # fresh randomness from the (global) generator, as generate would use
            seed = int(torch.randint(0, 2**62, (1,)).item())
        per_batch = max(1, self.batch_size // num_samples)
        batches = -(-len(prepared) // per_batch)
        bar = tqdm(total=batches, desc="generate", unit="batch", disable=not self.show_progress or batches < 2)
        try:
            result = sample_shared_prefix(
                self.model,
                [p[0] for p in prepared],
                [p[1] for p in prepared],
                num_samples=num_samples,
                max_new_tokens=max_new_tokens,
                generation_config=config,
                do_sample=do_sample,
                seed=seed,
                batch_size=self.batch_size,
                collate=self._collate,
                device=device,
                on_batch=lambda: bar.update(1),
                decode_state=self._decode_state,
            )
        finally:
            bar.close()
        cost.add(result.prefill_tokens, result.generated_tokens, result.prefills)
        return [[self.tokenizer.decode(ids, skip_special_tokens=True) for ids in samples] for samples in result.tokens]

    def _generate_plain(self, prepared, num_samples, do_sample, temperature, max_new_tokens, device):
        from tqdm.auto import tqdm

        items = [r for r in range(len(prepared)) for _ in range(num_samples)]
        chunks = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        out: list[list[str]] = [[] for _ in prepared]
        bar = tqdm(chunks, desc="generate", unit="batch", disable=not self.show_progress or len(chunks) < 2)
        for chunk in bar:
            out_texts = self._generate_chunk(
                [prepared[r][0] for r in chunk],
                sorted({t for r in chunk for t in prepared[r][1]}),
                do_sample,
                temperature,
                max_new_tokens,
                device,
            )
            for r, text in zip(chunk, out_texts):
                out[r].append(text)
        return out

    def _generate_chunk(self, encoded, stop_ids, do_sample, temperature, max_new_tokens, device) -> list[str]:
        import torch

        batch = self._collate(encoded)
        batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}
        kwargs = self._generation_kwargs(do_sample, temperature, max_new_tokens)
        kwargs.update(pad_token_id=self._pad_id, eos_token_id=stop_ids or None)
        with torch.no_grad():
            generated = self.model.generate(**batch, **kwargs)
        new = generated[:, batch["input_ids"].shape[1] :].tolist()
        stops = set(stop_ids)
        texts = []
        produced = 0
        for ids in new:
            for j, tok in enumerate(ids):
                if tok in stops:
                    ids = ids[:j]
                    produced += 1  # the stop token was generated too
                    break
            produced += len(ids)
            texts.append(self.tokenizer.decode(ids, skip_special_tokens=True))
        cost.add(int(batch["attention_mask"].sum()), produced, len(encoded))
        return texts

    def chat(
        self,
        messages: list[dict],
        *,
        images: list | None = None,
        temperature: float = 0.0,
        max_new_tokens: int = 512,
        seed: int | None = None,
    ) -> str:
        request = GenerationRequest(prompt=messages, images=list(images or []))
        return self.generate(
            [request], num_samples=1, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed
        )[0][0]


# ----------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP backend
# ----------------------------------------------------------------------------------------------


def _count(value: Any) -> int:
    """A token count from a server's ``usage`` (0 when absent or not a count)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


_Retryable = RetryableError  # a reply the parser rejects takes the same retry path as a transport error


def _image_data_url(image: Any) -> str:
    img = load_image(image)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def to_openai_messages(messages: list[dict], images: list | None = None) -> list[dict]:
    """TRL conversational messages (+ images) -> OpenAI chat messages with ``image_url`` parts.

    ``{"type": "image"}`` placeholders take the images in order; when the messages carry no
    placeholder, the images go at the start of the first user message (as TRL does for VLMs).
    """
    images = list(images or [])
    urls = [_image_data_url(img) for img in images]
    n_placeholders = sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for p in m["content"]
        if isinstance(p, dict) and p.get("type") == "image"
    )
    if n_placeholders and n_placeholders != len(urls):
        raise ValueError(
            f"the messages have {n_placeholders} image placeholder(s) but {len(urls)} image(s) were given"
        )
    out: list[dict] = []
    next_url = iter(urls)
    placed = n_placeholders > 0
    for m in messages:
        if "role" not in m:
            raise ValueError(f"a chat message needs a 'role': {m!r}")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for p in content:
                if not isinstance(p, dict):
                    parts.append({"type": "text", "text": str(p)})
                elif p.get("type") == "image":
                    if p.get("image") is not None and not urls:
                        parts.append({"type": "image_url", "image_url": {"url": _image_data_url(p["image"])}})
                    else:
                        parts.append({"type": "image_url", "image_url": {"url": next(next_url)}})
                elif p.get("type") == "text":
                    parts.append({"type": "text", "text": p.get("text", "")})
                else:
                    parts.append(p)
            content = parts
        if not placed and urls and m["role"] == "user":
            text_parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
            content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + text_parts
            placed = True
        out.append({"role": m["role"], "content": content})
    if urls and not placed:
        raise ValueError("images were given but the messages have no user message to attach them to")
    return out


class OpenAICompatibleBackend:
    """Generation through an OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, transformers serve).

    How a request is sent depends on ``mode`` (:mod:`srpo_trl.endpoint`):

    * ``"tokens"`` / ``"text"`` (need ``processing_class``, the policy's own tokenizer or processor):
      the prompt is rendered here exactly as the trainer renders it, the assistant prefix appended,
      and the result goes to ``POST {base_url}/v1/completions`` as token ids (the trainer's ids) or
      as text (the server tokenizes it);
    * ``"chat"``: chat prompts go to ``POST {base_url}/v1/chat/completions`` (images as base64
      data-URL ``image_url`` parts); a partial assistant reasoning (``assistant_prefix``) is sent as
      the final assistant message with ``continue_final_message: true, add_generation_prompt:
      false`` (vLLM / SGLang semantics: the server continues that message instead of opening a new
      turn). String prompts go to ``/v1/completions`` as ``prompt + assistant_prefix``;
    * ``"auto"`` (default): ``tokens`` if the server takes token ids, else ``text``, when a
      ``processing_class`` is given; else ``chat``. Decided by one small request (``max_tokens=1``)
      on first use, or by :meth:`preflight`.

    Requests with images always go as chat messages (``/v1/completions`` takes no images); a plain-text
    prompt with images becomes one user message, as the trainer renders it.

    ``n``, ``temperature``, ``max_tokens`` and ``seed`` are passed through; when a server returns
    fewer than ``n`` choices, the missing samples are asked for again. Requests go through
    :func:`srpo_trl.http.post_json`: ``timeout`` is a deadline for the whole request (connect and
    the complete reply), a reply larger than ``max_response_bytes`` (default: derived from
    ``max_new_tokens`` and ``n`` by :func:`srpo_trl.http.response_cap`) is cut off; connection
    errors, missed deadlines, too-large replies, HTTP 5xx / 429 and malformed replies are retried
    ``max_retries`` times with exponential backoff (``backoff * 2**attempt`` seconds, or the
    server's ``Retry-After``), then :class:`BackendError` names the URL (credentials redacted) and
    the last error. Other 4xx replies fail at once.
    Requests of one ``generate`` call run on ``concurrency`` threads. The ``usage`` the server
    reports is counted in :mod:`srpo_trl.cost`.

    ``base_url`` may end in ``/v1`` or not, and may carry a query string (kept after the API path).
    ``api_key`` defaults to ``$OPENAI_API_KEY``.
    ``extra_body`` is merged into every request body (e.g. ``{"top_p": 1.0}``).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 60,
        max_retries: int = 3,
        backoff: float = 0.5,
        concurrency: int = 8,
        extra_body: dict | None = None,
        show_progress: bool = True,
        max_response_bytes: int | None = None,
        mode: str = "auto",
        processing_class: Any = None,
        separator: str = DEFAULT_STEP_SEPARATOR,
    ):
        from .endpoint import MODES, ClientRenderer

        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode in ("text", "tokens") and processing_class is None:
            raise ValueError(
                f"mode {mode!r} renders prompts here: it needs processing_class (the policy's tokenizer or processor)"
            )
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {redact_url(base_url)!r}")
        parts = urlsplit(base_url)
        path = parts.path.rstrip("/")
        if path.endswith("/v1"):
            path = path[: -len("/v1")]
        self._base = parts._replace(path=path, fragment="")
        self.base_url = urlunsplit(self._base)
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.concurrency = max(1, concurrency)
        self.extra_body = dict(extra_body or {})
        self.show_progress = show_progress
        self.max_response_bytes = max_response_bytes
        self.mode = mode
        self.separator = separator
        self.renderer = ClientRenderer(processing_class, separator) if processing_class is not None else None
        self._resolved: str | None = None if mode == "auto" else mode
        self._completions_checked = False
        self._continuation_checked = False
        self._sampling_checked = False
        self._mode_lock = threading.Lock()
        self._retokenized_warned = False

    @property
    def resolved_mode(self) -> str | None:
        """The mode requests are sent in (None while ``"auto"`` is not decided yet)."""
        return self._resolved if self._resolved is not None or self.renderer is not None else "chat"

    def fingerprint(self) -> dict:
        """The served model's identity for resume checks (credentials redacted from the URL)."""
        from .store import endpoint_fingerprint

        return endpoint_fingerprint(self.base_url, self.model)

    # -- HTTP (srpo_trl.http: deadline, size cap, retries) --------------------------------------

    def url(self, path: str) -> str:
        """The URL of an API ``path`` (``/v1/chat/completions``): appended to the base URL's path, before
        its query string (``https://host/openai?api-version=1`` -> ``https://host/openai/v1/...?api-version=1``)."""
        return urlunsplit(self._base._replace(path=self._base.path + path))

    def _post(self, path: str, body: dict, parse, retries: int | None = None) -> Any:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        cap = self.max_response_bytes or response_cap(body.get("max_tokens"), int(body.get("n") or 1))

        def parse_and_count(payload):
            out = parse(payload)
            usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
            cost.add(_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")), 1)
            return out

        try:
            return post_json(
                self.url(path),
                body,
                headers=headers,
                timeout=self.timeout,
                max_bytes=cap,
                retries=self.max_retries if retries is None else retries,
                backoff=self.backoff,
                parse=parse_and_count,
            )
        except RequestFailed as exc:
            raise BackendError(str(exc)) from exc

    @staticmethod
    def _choices(payload: dict, key: str) -> list[str]:
        choices = payload.get("choices")
        if not isinstance(choices, list) or not choices:
            if "error" in payload:
                raise _Retryable(f"the server returned an error: {payload['error']}")
            raise _Retryable(f"the reply has no 'choices': {json.dumps(payload)[:200]}")
        texts = []
        for c in choices:
            index = c.get("index", 0) if isinstance(c, dict) else None
            if not isinstance(index, int) or isinstance(index, bool):
                raise _Retryable(f"malformed choice (no integer 'index'): {str(c)[:200]}")
        for c in sorted(choices, key=lambda c: c.get("index", 0)):
            if key == "message":
                msg = c.get("message")
                content = msg.get("content") if isinstance(msg, dict) else None
                if isinstance(content, list):
                    parts = [p.get("text", "") for p in content if isinstance(p, dict)]
                    content = "".join(parts) if all(isinstance(p, str) for p in parts) else None
            else:
                content = c.get("text")
            if not isinstance(content, str):
                what = "message.content" if key == "message" else "text"
                raise _Retryable(f"malformed choice (no string {what}): {str(c)[:200]}")
            texts.append(content)
        return texts

    # -- requests ------------------------------------------------------------------------------

    def _route(self, request: GenerationRequest) -> str:
        """``"tokens"`` / ``"text"`` (rendered here, to /v1/completions), ``"raw"`` (a string prompt
        as it is, to /v1/completions) or ``"chat"`` (messages, to /v1/chat/completions)."""
        if request.images:
            return "chat"
        mode = self.resolved_mode
        if mode in ("tokens", "text"):
            return mode
        return "raw" if isinstance(request.prompt, str) else "chat"

    def _body_for(self, request: GenerationRequest, n: int, temperature: float, max_new_tokens: int, seed):
        body: dict[str, Any] = {"model": self.model, "n": n, "temperature": temperature, "max_tokens": max_new_tokens}
        if temperature > 0:  # pure temperature sampling, as in process (a served generation_config may set top_p)
            body["top_p"] = 1.0
        if seed is not None:
            body["seed"] = seed
        route = self._route(request)
        if route == "tokens":
            body["prompt"] = self.renderer.ids(request)
            path, key = "/v1/completions", "text"
        elif route == "text":
            body["prompt"] = self.renderer.text(request)
            path, key = "/v1/completions", "text"
        elif route == "raw":
            body["prompt"] = request.prompt + request.assistant_prefix
            path, key = "/v1/completions", "text"
        else:
            prompt = request.prompt
            if isinstance(prompt, str):  # a plain question with images: one user message, as the trainer renders it
                prompt = [{"role": "user", "content": prompt}]
            messages = to_openai_messages(prompt, request.images)
            if request.assistant_prefix:
                messages.append({"role": "assistant", "content": request.assistant_prefix})
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
            body["messages"] = messages
            path, key = "/v1/chat/completions", "message"
            # The OpenAI field `tools`; the rest is vLLM's / SGLang's `chat_template_kwargs`.
            kwargs = dict(request.template_kwargs)
            if kwargs.get("tools") is not None:
                body["tools"] = kwargs.pop("tools")
            if kwargs:
                body["chat_template_kwargs"] = kwargs
        body.update(self.extra_body)
        return path, key, body

    def _one(self, request: GenerationRequest, n: int, temperature: float, max_new_tokens: int, seed) -> list[str]:
        texts: list[str] = []
        for extra in range(n + 1):  # a server that ignores n: ask again for the rest
            want = n - len(texts)
            if want <= 0:
                break
            s = None if seed is None else seed + extra
            path, key, body = self._body_for(request, want, temperature, max_new_tokens, s)
            texts += self._post(path, body, lambda p: self._choices(p, key))
        return texts[:n]

    # -- preflight (srpo_trl.endpoint) ----------------------------------------------------------

    def preflight(self, requests: list[GenerationRequest] | None = None, temperature: float | None = None):
        """Decide ``"auto"`` and check that the server does what these requests need, with one
        ``max_tokens=1`` request per question; returns a :class:`srpo_trl.endpoint.PreflightReport`.
        With ``temperature`` > 0, two short samples with different seeds check that the server
        samples at all (a note when they are the same text).

        Raises :class:`srpo_trl.endpoint.PreflightError` naming what the server refused or ignored
        and what to pass instead, and :class:`BackendError` when the server does not answer.
        Each check runs once per backend."""
        from .endpoint import PreflightReport

        requests = list(requests or [])
        with self._mode_lock:
            notes = self._resolve(requests)
            continued = [r for r in requests if r.assistant_prefix and self._route(r) == "chat"]
            if continued and not self._continuation_checked:
                notes += self._check_continuation(continued[0])
                self._continuation_checked = True
            if temperature and requests and not self._sampling_checked:
                notes += self._check_sampling(requests[0], temperature)
                self._sampling_checked = True
            text_routed = [r for r in requests if self._route(r) == "text"]
            if text_routed and not all(self.renderer.retokenizes_alike(r) for r in text_routed):
                notes.append(
                    "some prompts tokenize differently as one text than as the trainer tokenizes them (prompt, "
                    "then the prefix step by step): sampled text may follow other token ids than those trained "
                    "on; use --endpoint-mode tokens on a server that takes token ids (vLLM, SGLang)"
                )
        return PreflightReport(self.resolved_mode or "chat", notes)

    def _probe(self, path: str, body: dict) -> tuple[dict | None, str | None]:
        """One request; ``(reply, None)``, or ``(None, "HTTP 4xx: ...")`` when the server refuses it.
        Transport failures (after the retries) raise :class:`BackendError`."""
        try:  # one attempt: a preflight that cannot reach the server only logs it (records then fail on their own)
            return self._post(path, {**body, **self.extra_body}, lambda p: p, retries=0), None
        except BackendError as exc:
            refused = re.search(r"failed: (HTTP 4\d\d: .*)", str(exc), re.S)
            if refused is None:
                raise
            return None, refused.group(1).strip()[:300]

    def _resolve(self, requests: list[GenerationRequest]) -> list[str]:
        """Decide ``auto`` (once) and check an explicit ``tokens`` / ``text`` mode (once); notes for the report."""
        from .endpoint import PreflightError

        if self.renderer is None or self._completions_checked:
            return []
        plain = next((r for r in requests if not r.images), None) or GenerationRequest("Hello")
        body = {"model": self.model, "max_tokens": 1, "temperature": 0, "n": 2}
        notes: list[str] = []
        order = ["tokens", "text"] if self.mode == "auto" else [self.mode]
        refusals = []
        for mode in order:
            sent = self.renderer.ids(plain) if mode == "tokens" else self.renderer.text(plain)
            reply, refused = self._probe("/v1/completions", {**body, "prompt": sent})
            if refused is not None:
                refusals.append(
                    f"{mode} mode: the server refused {'token ids' if mode == 'tokens' else 'a text prompt'} at /v1/completions ({refused})"
                )
                continue
            choices = reply.get("choices") if isinstance(reply, dict) else None
            if isinstance(choices, list) and len(choices) == 1:
                notes.append("the server ignores n: each sample is a request of its own (slower, same samples)")
            usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
            counted = usage.get("prompt_tokens")
            expected = len(sent) if mode == "tokens" else len(self.renderer.server_ids(plain))
            if isinstance(counted, int) and counted != expected:
                notes.append(
                    f"the server counted {counted} prompt tokens where the policy's tokenizer gives {expected}: "
                    "check that it serves the same model and tokenizer as --processor"
                )
            self._resolved = mode
            self._completions_checked = True
            return refusals + notes
        if self.mode != "auto":
            raise PreflightError(
                f"{refusals[0]}; use --endpoint-mode {'text' if self.mode == 'tokens' else 'chat'} (or auto)"
            )
        self._resolved = "chat"
        self._completions_checked = True
        return refusals + [
            "the server renders the chat template (chat mode): sampled text is not guaranteed to follow the trainer's token ids"
        ]

    def _check_sampling(self, request: GenerationRequest, temperature: float) -> list[str]:
        """Two 8-token samples with different seeds: the same text means the server ignores
        temperature or seed (transformers serve samples only when the model's generation_config has
        ``do_sample: true``)."""
        texts = []
        for seed in (1, 2):
            path, key, body = self._body_for(request, 1, temperature, 8, seed)
            texts += self._post(path, body, lambda p: self._choices(p, key), retries=0)[:1]
        if len(texts) == 2 and texts[0] == texts[1]:
            return [
                f"the server returned the same text for two seeds at temperature {temperature:g}: it may ignore "
                "temperature or seed, and then every sample is the same (transformers serve samples only when the "
                "model's generation_config.json has do_sample: true)"
            ]
        return []

    def _check_continuation(self, request: GenerationRequest) -> list[str]:
        """Does the server continue a final assistant message (``continue_final_message``)?"""
        from .endpoint import PreflightError

        path, _, body = self._body_for(request, 1, 0.0, 1, None)
        reply, refused = self._probe(path, body)
        if refused is not None:
            if request.images:
                instead = (
                    "records with images are sent as chat messages: serve the policy with a server that continues "
                    "assistant messages (vLLM, SGLang), or explore in process (--model)"
                )
            elif self.renderer is None:
                instead = (
                    "pass --processor PATH (the policy's tokenizer or processor folder) so that prompts are rendered "
                    "here and sent to /v1/completions (--endpoint-mode auto, text or tokens)"
                )
            else:
                instead = "use --endpoint-mode auto, text or tokens (prompts rendered here, sent to /v1/completions)"
            raise PreflightError(
                "the server refused to continue an assistant message over /v1/chat/completions "
                f"({refused}); continue_final_message is a vLLM / SGLang extension: {instead}"
            )
        usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}
        counted = usage.get("prompt_tokens")
        if self.renderer is None or request.images or not isinstance(counted, int):
            return []
        # A server that takes the field but opens a new turn after the prefix counts the new turn's tokens.
        pc, tok = self.renderer.processing_class, self.renderer.tokenizer
        chat = request.prompt if not isinstance(request.prompt, str) else [{"role": "user", "content": request.prompt}]
        final = [*chat, {"role": "assistant", "content": request.assistant_prefix}]
        continued = len(
            tok(render_prompt(pc, final, **request.template_kwargs), add_special_tokens=False)["input_ids"]
        )
        new_turn_text = pc.apply_chat_template(
            final, tokenize=False, add_generation_prompt=True, **request.template_kwargs
        )
        new_turn = len(tok(new_turn_text, add_special_tokens=False)["input_ids"])
        if counted == new_turn != continued:
            raise PreflightError(
                "the server ignored continue_final_message: it counted "
                f"{counted} prompt tokens, what a new assistant turn after the prefix takes (continuing it takes "
                f"{continued}); use --endpoint-mode auto, text or tokens"
            )
        return []

    def generate(
        self,
        requests: list[GenerationRequest],
        *,
        num_samples: int = 1,
        temperature: float = 0.5,
        max_new_tokens: int = 512,
        seed: int | None = None,
    ) -> list[list[str]]:
        from tqdm.auto import tqdm

        if not _check_requests(requests, num_samples):
            return []
        if self.resolved_mode is None:  # "auto" with a processor: one small request decides
            with self._mode_lock:
                self._resolve(requests)
        # Encode (images included) before any network call, so bad input fails fast.
        for req in requests:
            self._body_for(req, 1, temperature, max_new_tokens, seed)
        self._warn_if_retokenized(requests)

        def run(req):
            return self._one(req, num_samples, temperature, max_new_tokens, seed)

        if len(requests) == 1 or self.concurrency == 1:
            return [run(r) for r in requests]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            futures = [pool.submit(cost.bind_context(run, r)) for r in requests]
            bar = tqdm(total=len(futures), desc="generate", unit="req", disable=not self.show_progress)
            results = []
            try:
                for fut in futures:
                    results.append(fut.result())
                    bar.update(1)
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
            finally:
                bar.close()
            return results

    def _warn_if_retokenized(self, requests: list[GenerationRequest]) -> None:
        if self._retokenized_warned:
            return
        for req in requests:
            if self._route(req) == "text" and not self.renderer.retokenizes_alike(req):
                logger.warning(
                    "text mode: a prompt tokenizes differently as one text (as the server tokenizes it) than as "
                    "the trainer tokenizes it; use --endpoint-mode tokens where the server takes token ids"
                )
                self._retokenized_warned = True
                return

    def chat(
        self,
        messages: list[dict],
        *,
        images: list | None = None,
        temperature: float = 0.0,
        max_new_tokens: int = 512,
        seed: int | None = None,
    ) -> str:
        request = GenerationRequest(prompt=list(messages), images=list(images or []))
        if self.resolved_mode is None:
            with self._mode_lock:
                self._resolve([request])
        return self._one(request, 1, temperature, max_new_tokens, seed)[0]
