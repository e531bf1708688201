"""``srpo-trl explore``: sample reasoning branches from a policy, verify them, write what step pairs
are built from (the work is :func:`srpo_trl.exploration.explore`)::

    srpo-trl explore --model PATH | --endpoint URL --served-model NAME --records R.jsonl --out O.jsonl

The policy, sampling and HTTP flags are shared by every command (:mod:`srpo_trl.cli.flags`).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from .. import store
from ..contract import RecordError
from ..exploration import explore, load_records, output_fingerprint, verifier_label
from ..verifiers import as_verifier
from .flags import add_endpoint_mode_flags, add_http_flags, add_policy_flags, add_sampling_flags, endpoint_backend


def _load_verifier_factory(spec: str):
    """``module:callable`` -> the callable (a user's own verifier factory or function)."""
    import importlib

    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(
            f"srpo-trl explore: --verifier {spec!r}: cannot import {name!r} from {module!r} ({exc})"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="srpo-trl explore",
        description="Sample reasoning branches from a policy, verify them, and write what step pairs are built from.",
    )
    src = add_policy_flags(p, model_help="a local model folder (save_pretrained; a PEFT adapter folder works too)")
    src.add_argument("--adapter", help="a PEFT adapter folder to put on --model")
    p.add_argument("--records", required=True, help="input records, JSON lines")
    p.add_argument("--out", required=True, help="output JSON lines (appended; a restart resumes)")
    p.add_argument(
        "--images", default=None, help="folder the records' images must lie in (default: the records file's folder)"
    )
    p.add_argument("--allow-outside-root", action="store_true", help="accept image paths outside --images")
    add_sampling_flags(
        p, num_samples=10, temperature=0.5, max_new_tokens=512, seed=0, samples_help="continuations per branch point"
    )
    p.add_argument("--branch-points", default="all", help="'all' or K (the first K points)")
    p.add_argument("--max-pairs-per-point", type=int, default=None, help="cap used for the pair count in the summary")
    p.add_argument("--separator", default="\\n", help="step separator (escape sequences allowed; default \\n)")
    p.add_argument(
        "--verifier",
        default="safety-outcome",
        help="safety-outcome | final-answer | judge | any registered name | module:factory",
    )
    p.add_argument("--answer-extract", default="auto", choices=["auto", "boxed", "answer", "last-line", "regex"])
    p.add_argument("--answer-pattern", default=None, help="regex with one group (final-answer verifier)")
    p.add_argument("--judge-endpoint", default=None, help="judge server (default: --endpoint)")
    p.add_argument("--judge-model", default=None, help="judge model name (default: --served-model)")
    p.add_argument("--judge-template", default=None, help="a file with the judge prompt (str.format fields)")
    p.add_argument(
        "--judge-api-key",
        default=None,
        help="API key for the judge (default: --api-key when the judge is --endpoint itself, else $OPENAI_API_KEY)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="sequences per model.generate call (--model)")
    p.add_argument("--dtype", default="float32", help="model dtype (--model), e.g. bfloat16")
    p.add_argument(
        "--device", default=None, help="device for --model (default: cuda:LOCAL_RANK if available, else cpu)"
    )
    add_http_flags(p, timeout=60.0, retries=3, old_max_retries=True)
    add_endpoint_mode_flags(p)
    p.add_argument("--concurrency", type=int, default=8, help="parallel HTTP requests per record (--endpoint)")
    p.add_argument(
        "--concurrent-records",
        type=int,
        default=None,
        help="records explored at once (default: 4 with --endpoint, 1 with --model)",
    )
    p.add_argument("--retry-failed", action="store_true", help="redo records whose status is 'failed'")
    p.add_argument("--overwrite", action="store_true", help="start again instead of resuming")
    p.add_argument("--no-progress", action="store_true")
    return p


def _make_verifier(args) -> Any:
    from ..verifiers import get_verifier

    name = args.verifier
    if ":" in name and not name.startswith(("http:", "https:")):
        made = _load_verifier_factory(name)
        try:
            return made() if isinstance(made, type) or made.__code__.co_argcount == 0 else made
        except AttributeError:
            return made
    if name == "final-answer":
        return get_verifier(name, extract=args.answer_extract, pattern=args.answer_pattern)
    if name == "judge":
        url = args.judge_endpoint or args.endpoint
        model = args.judge_model or args.served_model
        if not url or not model:
            raise SystemExit(
                "srpo-trl explore: --verifier judge needs --judge-endpoint and --judge-model (or --endpoint/--served-model)"
            )
        kwargs = {}
        if args.judge_template:
            kwargs["template"] = Path(args.judge_template).read_text(encoding="utf-8")
        return get_verifier(
            name,
            base_url=url,
            model=model,
            api_key=_judge_api_key(args),
            timeout=args.timeout,
            max_retries=args.http_retries,
            **kwargs,
        )
    try:
        return get_verifier(name)
    except KeyError as exc:
        raise SystemExit(f"srpo-trl explore: {exc.args[0]}") from None


def _same_endpoint(a: str, b: str) -> bool:
    def norm(url: str) -> str:
        url = url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url

    return norm(a) == norm(b)


def _judge_api_key(args) -> str | None:
    """--judge-api-key; else the policy's --api-key only when the judge is the policy's own endpoint
    (a key is never sent to a server it was not given for); else None ($OPENAI_API_KEY)."""
    if args.judge_api_key:
        return args.judge_api_key
    if args.api_key and (
        not args.judge_endpoint or (args.endpoint and _same_endpoint(args.judge_endpoint, args.endpoint))
    ):
        return args.api_key
    return None


def _check_policy_args(args) -> None:
    if bool(args.model) == bool(args.endpoint):
        raise SystemExit("srpo-trl explore: give either --model PATH or --endpoint URL --served-model NAME")
    if args.endpoint and not args.served_model:
        raise SystemExit("srpo-trl explore: --endpoint needs --served-model (the model name the server serves)")


def _make_backend(args):
    from ..backends import TransformersBackend

    _check_policy_args(args)
    if args.endpoint:
        return endpoint_backend(args, concurrency=args.concurrency, separator=args.separator)
    from ..loading import load_model_and_processor

    device = args.device
    if device is None:
        import torch

        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    model, processing_class = load_model_and_processor(
        args.model, adapter=args.adapter, dtype=args.dtype, device=device
    )
    return TransformersBackend(
        model, processing_class, batch_size=args.batch_size, separator=args.separator, show_progress=False
    )


def _cli_fingerprint(args) -> tuple[dict, dict]:
    """The policy's identity (model folder and weights, or endpoint and served model) and the
    arguments beyond explore()'s own that change the output."""
    if args.model and not args.endpoint:
        policy = store.model_fingerprint(args.model, args.adapter)
        policy["dtype"] = args.dtype
    else:
        from ..endpoint import processor_source

        policy = store.endpoint_fingerprint(args.endpoint or "", args.served_model)
        # how prompts reach the server changes what is sampled
        policy["endpoint_mode"] = args.endpoint_mode
        policy["processor"] = processor_source(args.processor, args.served_model)
    extra = {"answer_extract": args.answer_extract, "answer_pattern": args.answer_pattern}
    if args.verifier == "judge":
        template = Path(args.judge_template).read_bytes() if args.judge_template else b""
        extra["judge"] = {
            **store.endpoint_fingerprint(
                args.judge_endpoint or args.endpoint or "", args.judge_model or args.served_model
            ),
            "template_sha256": hashlib.sha256(template).hexdigest()[:16],
        }
    return policy, extra


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.separator = args.separator.encode("utf-8").decode("unicode_escape")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    bp = args.branch_points
    if bp != "all":
        if not bp.isdigit() or int(bp) < 1:
            raise SystemExit(f"srpo-trl explore: --branch-points must be 'all' or a positive integer, got {bp!r}")
        bp = int(bp)
    _check_policy_args(args)
    image_root = args.images or Path(args.records).parent
    try:
        verifier = _make_verifier(args)
        policy, extra = _cli_fingerprint(args)
        if not args.overwrite:  # refuse a mixed resume before the model is loaded
            recs, _ = load_records(
                args.records,
                tuple(getattr(as_verifier(verifier), "required_fields", ())),
                image_root,
                args.allow_outside_root,
            )
            settings = dict(
                num_samples=args.num_samples,
                temperature=args.temperature,
                max_new_tokens=args.max_new_tokens,
                seed=args.seed,
                separator=args.separator,
            )
            fingerprint = output_fingerprint(args.records, recs, policy, verifier_label(verifier), bp, settings, extra)
            store.check_fingerprint(store.real_path(args.out), fingerprint, write=False)
        backend = _make_backend(args)
        summary = explore(
            args.records,
            backend,
            verifier,
            num_samples=args.num_samples,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            branch_points=bp,
            max_pairs_per_point=args.max_pairs_per_point,
            seed=args.seed,
            out=args.out,
            separator=args.separator,
            retry_failed=args.retry_failed,
            overwrite=args.overwrite,
            show_progress=not args.no_progress,
            concurrent_records=args.concurrent_records or (4 if args.endpoint else 1),
            policy=policy,
            fingerprint_extra=extra,
            image_root=image_root,
            allow_outside_root=args.allow_outside_root,
        )
    except (RecordError, FileNotFoundError, ValueError, store.StoreError) as exc:
        print(f"srpo-trl explore: {exc}", file=sys.stderr)
        return 2
    if "records" in summary and summary["records"] and summary["records_ok"] == 0:
        return 1
    return 0
