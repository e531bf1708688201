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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

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

    Requests x samples are generated ``batch_size`` sequences at a time (left padding). Sampling
    uses pure temperature sampling: ``top_k``/``top_p`` of the model's generation config are
    overridden (Qwen VL checkpoints ship ``top_k=1``, which would make every sample identical); pass
    ``generation_kwargs`` to change that. ``seed`` makes the samples reproducible for the same
    requests and ``batch_size``; the caller's global RNG state is left untouched.
    """

    def __init__(
        self,
        model: Any,
        processing_class: Any,
        batch_size: int = 8,
        separator: str = DEFAULT_STEP_SEPARATOR,
        generation_kwargs: dict | None = None,
        show_progress: bool = True,
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
        from tqdm.auto import tqdm

        if not _check_requests(requests, num_samples):
            return []
        prepared = []
        for req in requests:
            images = load_images(req.images)
            prepared.append((self._encode(req, images), self._stop_ids(req, images)))
        items = [r for r in range(len(requests)) for _ in range(num_samples)]
        # Group sequences with the same keys (text-only vs with images) so that a batch collates.
        chunks = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        out: list[list[str]] = [[] for _ in requests]
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
        finally:
            if was_training:
                self.model.train()
        return out

    def _generate_chunk(self, encoded, stop_ids, do_sample, temperature, max_new_tokens, device) -> list[str]:
        import torch

        batch = self._collate(encoded)
        batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}
        kwargs = dict(self.generation_kwargs)
        kwargs.update(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            pad_token_id=self._pad_id,
            eos_token_id=stop_ids or None,
        )
        if do_sample:
            kwargs["temperature"] = temperature
        else:
            kwargs.pop("top_k", None)
            kwargs.pop("top_p", None)
            kwargs.update(temperature=None, top_k=None, top_p=None)
        with torch.no_grad():
            generated = self.model.generate(**batch, **kwargs)
        new = generated[:, batch["input_ids"].shape[1] :].tolist()
        stops = set(stop_ids)
        texts = []
        for ids in new:
            for j, tok in enumerate(ids):
                if tok in stops:
                    ids = ids[:j]
                    break
            texts.append(self.tokenizer.decode(ids, skip_special_tokens=True))
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
    """Generation through an OpenAI-compatible server (vLLM, SGLang, TGI, hosted APIs).

    * chat prompts -> ``POST {base_url}/v1/chat/completions`` (images as base64 data-URL
      ``image_url`` parts). A partial assistant reasoning (``assistant_prefix``) is sent as the
      final assistant message with ``continue_final_message: true, add_generation_prompt: false``
      (vLLM / SGLang semantics): the server continues that message instead of opening a new turn.
    * string prompts -> ``POST {base_url}/v1/completions`` with ``prompt + assistant_prefix``.

    ``n``, ``temperature``, ``max_tokens`` and ``seed`` are passed through; when a server returns
    fewer than ``n`` choices, the missing samples are asked for again. Requests go through
    :func:`srpo_trl.http.post_json`: ``timeout`` is a deadline for the whole request (connect and
    the complete reply), a reply larger than ``max_response_bytes`` (default: derived from
    ``max_new_tokens`` and ``n`` by :func:`srpo_trl.http.response_cap`) is cut off; connection
    errors, missed deadlines, too-large replies, HTTP 5xx / 429 and malformed replies are retried
    ``max_retries`` times with exponential backoff (``backoff * 2**attempt`` seconds, or the
    server's ``Retry-After``), then :class:`BackendError` names the URL (credentials redacted) and
    the last error. Other 4xx replies fail at once.
    Requests of one ``generate`` call run on ``concurrency`` threads.

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
    ):
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

    def fingerprint(self) -> dict:
        """The served model's identity for resume checks (credentials redacted from the URL)."""
        from .store import endpoint_fingerprint

        return endpoint_fingerprint(self.base_url, self.model)

    # -- HTTP (srpo_trl.http: deadline, size cap, retries) --------------------------------------

    def url(self, path: str) -> str:
        """The URL of an API ``path`` (``/v1/chat/completions``): appended to the base URL's path, before
        its query string (``https://host/openai?api-version=1`` -> ``https://host/openai/v1/...?api-version=1``)."""
        return urlunsplit(self._base._replace(path=self._base.path + path))

    def _post(self, path: str, body: dict, parse) -> Any:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        cap = self.max_response_bytes or response_cap(body.get("max_tokens"), int(body.get("n") or 1))
        try:
            return post_json(
                self.url(path),
                body,
                headers=headers,
                timeout=self.timeout,
                max_bytes=cap,
                retries=self.max_retries,
                backoff=self.backoff,
                parse=parse,
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

    def _body_for(self, request: GenerationRequest, n: int, temperature: float, max_new_tokens: int, seed):
        body: dict[str, Any] = {"model": self.model, "n": n, "temperature": temperature, "max_tokens": max_new_tokens}
        if seed is not None:
            body["seed"] = seed
        if isinstance(request.prompt, str):
            if request.images:
                raise ValueError("images need a chat prompt (list of messages); /v1/completions takes text only")
            body["prompt"] = request.prompt + request.assistant_prefix
            path, key = "/v1/completions", "text"
        else:
            messages = to_openai_messages(request.prompt, request.images)
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
        # Encode (images included) before any network call, so bad input fails fast.
        for req in requests:
            self._body_for(req, 1, temperature, max_new_tokens, seed)

        def run(req):
            return self._one(req, num_samples, temperature, max_new_tokens, seed)

        if len(requests) == 1 or self.concurrency == 1:
            return [run(r) for r in requests]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            futures = [pool.submit(run, r) for r in requests]
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
        return self._one(request, 1, temperature, max_new_tokens, seed)[0]
