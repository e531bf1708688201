"""The flags every command shares, with the same names everywhere (standard library only).

* the policy: ``--model PATH`` (a local folder) or ``--endpoint URL --served-model NAME`` (an
  OpenAI-compatible server), ``--api-key``;
* sampling: ``--num-samples``, ``--temperature``, ``--max-new-tokens``, ``--seed``;
* HTTP: ``--timeout`` (seconds per request), ``--http-retries`` (retries of a failed request);
* how prompts reach a server (commands that sample the policy): ``--endpoint-mode``, ``--processor``.

Old spellings (``--generation-url``, ``--chat-url``, ``--samples``, ``--max-retries``: HTTP retries
in ``explore``, now ``--http-retries``; agent re-asks in ``generate-records``, now ``--agent-retries``)
still work for one release: they set the new flag and warn (``FutureWarning``).
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any


__all__ = ["DeprecatedFlag", "add_policy_flags", "add_sampling_flags", "add_http_flags", "add_endpoint_mode_flags"]


class DeprecatedFlag(argparse.Action):
    """An old spelling of ``new``: stores into the same destination and warns once per use."""

    def __init__(self, option_strings, dest, new: str, **kwargs: Any):
        self.new = new
        kwargs.setdefault("help", f"deprecated: use {new}")
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(
            f"{parser.prog}: {option_string} is deprecated and will be removed in the next release; use {self.new}",
            FutureWarning,
            stacklevel=2,
        )
        setattr(namespace, self.dest, values)


def add_policy_flags(parser: argparse.ArgumentParser, *, model_help: str, old_endpoint: tuple[str, ...] = ()) -> Any:
    """``--model``, ``--endpoint``, ``--served-model``, ``--api-key`` (``old_endpoint``: deprecated
    spellings of ``--endpoint``)."""
    group = parser.add_argument_group("policy: --model PATH, or --endpoint URL --served-model NAME")
    group.add_argument("--model", help=model_help)
    group.add_argument(
        "--endpoint", help="base URL of an OpenAI-compatible server (vLLM, SGLang, ...), e.g. http://localhost:8000/v1"
    )
    for old in old_endpoint:
        group.add_argument(old, dest="endpoint", action=DeprecatedFlag, new="--endpoint")
    group.add_argument("--served-model", help="the model name the server serves (with --endpoint)")
    group.add_argument("--api-key", default=None, help="API key for --endpoint (default: $OPENAI_API_KEY)")
    return group


def add_sampling_flags(
    parser: argparse.ArgumentParser,
    *,
    num_samples: int | None,
    temperature: float,
    max_new_tokens: int,
    seed: int | None = 0,
    old_samples: bool = False,
    samples_help: str = "samples per input",
) -> Any:
    group = parser.add_argument_group("sampling")
    if num_samples is not None:  # None: a command that samples once per call
        group.add_argument(
            "--num-samples", type=int, default=num_samples, help=f"{samples_help} (default {num_samples})"
        )
    if old_samples:
        group.add_argument("--samples", dest="num_samples", type=int, action=DeprecatedFlag, new="--num-samples")
    group.add_argument(
        "--temperature", type=float, default=temperature, help=f"sampling temperature (default {temperature})"
    )
    group.add_argument(
        "--max-new-tokens", type=int, default=max_new_tokens, help=f"tokens per answer (default {max_new_tokens})"
    )
    if seed is not None:
        group.add_argument("--seed", type=int, default=seed, help=f"sampling seed (default {seed})")
    return group


def add_http_flags(
    parser: argparse.ArgumentParser, *, timeout: float, retries: int, old_max_retries: bool = False
) -> Any:
    group = parser.add_argument_group("HTTP (with --endpoint)")
    group.add_argument(
        "--timeout",
        type=float,
        default=timeout,
        help=f"deadline in seconds of each HTTP request (--endpoint, and a judge URL where the command has one): connect and the whole reply (default {timeout:g})",
    )
    group.add_argument(
        "--http-retries",
        type=int,
        default=retries,
        help=f"retries of a failed HTTP request, with backoff (default {retries})",
    )
    if old_max_retries:
        group.add_argument("--max-retries", dest="http_retries", type=int, action=DeprecatedFlag, new="--http-retries")
    return group


def add_endpoint_mode_flags(parser: argparse.ArgumentParser) -> Any:
    """``--endpoint-mode`` and ``--processor``: how prompts reach the policy's server (srpo_trl.endpoint)."""
    group = parser.add_argument_group("how prompts reach the server (with --endpoint)")
    group.add_argument(
        "--endpoint-mode",
        choices=["auto", "tokens", "text", "chat"],
        default="auto",
        help="tokens / text: prompts rendered here with the policy's processor (exactly as the trainer renders "
        "them) and sent to /v1/completions as token ids / as text; chat: messages to /v1/chat/completions, the "
        "server renders the template (prefixes need continue_final_message: vLLM, SGLang). auto (default): tokens, "
        "else text when a processor is known, else chat, decided by a one-token preflight request. Requests with "
        "images always go as chat messages",
    )
    group.add_argument(
        "--processor",
        default="auto",
        help="the policy's tokenizer / processor for tokens and text modes: a folder or a cached hub name; auto "
        "(default): the --served-model name when it is such a folder or cached name; none: let the server render",
    )
    return group


def endpoint_processor(args: argparse.Namespace) -> Any:
    """The processing class that ``--processor`` names (or None), for the endpoint modes."""
    from ..endpoint import resolve_processor

    processing_class, _ = resolve_processor(getattr(args, "processor", "none"), args.served_model)
    return processing_class


def endpoint_backend(args: argparse.Namespace, model: str | None = None, **kwargs: Any) -> Any:
    """The OpenAI-compatible backend that the shared policy and HTTP flags describe
    (`--endpoint`, `--served-model`, `--api-key`, `--timeout`, `--http-retries`, and where the command
    has them `--endpoint-mode`, `--processor`)."""
    from ..backends import OpenAICompatibleBackend

    if hasattr(args, "endpoint_mode"):
        kwargs.setdefault("mode", args.endpoint_mode)
        kwargs.setdefault("processing_class", endpoint_processor(args))
        if kwargs["mode"] in ("tokens", "text") and kwargs["processing_class"] is None:
            raise ValueError(
                f"--endpoint-mode {args.endpoint_mode} renders prompts here: pass --processor PATH (the policy's "
                "tokenizer or processor folder)"
            )
    return OpenAICompatibleBackend(
        args.endpoint,
        model or args.served_model,
        api_key=args.api_key,
        timeout=args.timeout,
        max_retries=args.http_retries,
        show_progress=False,
        **kwargs,
    )
