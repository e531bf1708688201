"""``srpo-trl generate-records``: agents that write reasoning-path records from images (the work is
:func:`srpo_trl.records.generate_records`)::

    srpo-trl generate-records --images DIR --endpoint URL --served-model NAME --out records.jsonl
    srpo-trl generate-records --images DIR --model ./local-vlm --out records.jsonl   # in-process
    srpo-trl generate-records --write-templates my_templates/    # then edit, and --templates my_templates/

The policy, sampling and HTTP flags are shared by every command (:mod:`srpo_trl.cli.flags`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import store
from ..records.agents import CATEGORIES, TemplateError, load_templates, write_templates
from ..records.pipeline import (
    PipelineConfig,
    RunAborted,
    check_resume,
    format_summary,
    generate_records,
    images_fingerprint,
    summarize,
)
from .flags import DeprecatedFlag, add_http_flags, add_policy_flags, add_sampling_flags, endpoint_backend


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="srpo-trl generate-records",
        description="Write SRPO records (request, unsafe scenario, reasoning path, safe answer) from harmless "
        "images with a chain of model agents: Query, Reasoning, Check (with revisions), Summary. "
        "Rerun the same command to resume after a stop.",
    )
    p.add_argument("--images", help="folder of images (searched recursively)")
    p.add_argument("--out", help="records file to write (JSONL); its .failed/.journal/.summary files go beside it")
    backend = add_policy_flags(
        p,
        model_help="a local vision-language model folder (or, with the deprecated --chat-url, the served name)",
        old_endpoint=("--chat-url",),
    )
    add_http_flags(p, timeout=120.0, retries=3)
    backend.add_argument("--adapter", default=None, help="local model: a PEFT adapter folder to put on top")
    backend.add_argument("--device", default=None, help="local model: device (default cuda if available, else cpu)")
    backend.add_argument("--dtype", default="auto", help="local model: float32, bfloat16, ... or auto (default)")
    gen = p.add_argument_group("generation")
    gen.add_argument("--per-image", type=int, default=3, help="unsafe items per image (default 3)")
    gen.add_argument("--benign-per-image", type=int, default=1, help="benign control items per image (default 1)")
    gen.add_argument("--categories", default=None, help="comma-separated subset of the nine categories (default: all)")
    gen.add_argument(
        "--templates", default=None, help="folder of template overrides (<agent>.txt; see --write-templates)"
    )
    gen.add_argument(
        "--write-templates", metavar="DIR", default=None, help="write the default templates to DIR and exit"
    )
    gen.add_argument(
        "--agent-retries",
        type=int,
        default=2,
        help="re-asks after an invalid answer, per agent call (default 2; HTTP retries are --http-retries)",
    )
    # `--max-retries` means HTTP retries in explore: its old meaning here is kept for one release, with a warning.
    gen.add_argument("--max-retries", dest="agent_retries", type=int, action=DeprecatedFlag, new="--agent-retries")
    gen.add_argument(
        "--max-revisions", type=int, default=2, help="times the Check agent may send an item back (default 2)"
    )
    gen.add_argument("--min-steps", type=int, default=3, help="fewest reasoning steps (default 3)")
    gen.add_argument("--max-steps", type=int, default=8, help="most reasoning steps (default 8)")
    add_sampling_flags(p, num_samples=None, temperature=0.7, max_new_tokens=1024, seed=0)  # one answer per agent call
    gen.add_argument("--workers", type=int, default=4, help="images processed at once with --endpoint (default 4)")
    gen.add_argument("--retry-failed", action="store_true", help="retry every failed item from scratch")
    gen.add_argument(
        "--overwrite", action="store_true", help="start again instead of resuming (deletes the earlier records)"
    )
    gen.add_argument(
        "--max-backend-errors", type=int, default=5, help="stop after this many backend failures in a row (default 5)"
    )
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _categories(value: str | None, parser: argparse.ArgumentParser) -> tuple[str, ...]:
    from ..records.agents import normalize_category

    if not value:
        return CATEGORIES
    out = []
    for name in value.split(","):
        if not name.strip():
            continue
        cat = normalize_category(name)
        if cat is None:
            parser.error(f"--categories: {name.strip()!r} is not one of: {', '.join(CATEGORIES)}")
        out.append(cat)
    return tuple(dict.fromkeys(out))


def _generator(args, parser) -> dict:
    """The provenance every record carries (and the identity a resume checks), from the flags alone."""
    if args.served_model and not args.endpoint:
        parser.error("--served-model needs --endpoint (for a local model folder use --model PATH)")
    if args.endpoint:
        name = args.served_model or args.model
        if not name:
            parser.error("--endpoint needs --served-model (the model name the server serves)")
        return {"backend": "openai-compatible", "model": name, "url": store.redact_url(args.endpoint)}
    if not args.model:
        parser.error(
            "give --endpoint URL --served-model NAME (a server) or --model PATH (a local vision-language model)"
        )
    return {"backend": "transformers", "model": os.path.abspath(args.model)}


def _policy(args) -> dict:
    if args.endpoint:
        return store.endpoint_fingerprint(args.endpoint, args.served_model or args.model)
    policy = store.model_fingerprint(args.model, args.adapter)
    policy["dtype"] = args.dtype
    return policy


def _make_backend(args, parser):
    if args.endpoint:
        return endpoint_backend(args, model=args.served_model or args.model, concurrency=1)
    from ..backends import TransformersBackend
    from ..loading import load_model_and_processor

    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processing_class = load_model_and_processor(
        args.model, adapter=args.adapter, dtype=args.dtype, device=device
    )
    backend = TransformersBackend(model, processing_class, batch_size=1, show_progress=False)
    if not backend.is_processor:
        parser.error(
            f"--model {args.model}: a text-only model; the agents look at images, so use a vision-language model"
        )
    return backend


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    prog = "srpo-trl generate-records"
    if args.write_templates:
        try:
            paths = write_templates(args.write_templates)
        except FileExistsError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 1
        print(
            f"wrote {len(paths)} templates to {args.write_templates}; edit them and pass --templates {args.write_templates}"
        )
        return 0
    if not args.images or not args.out:
        parser.error("--images and --out are required")
    categories = _categories(args.categories, parser)
    try:
        templates = load_templates(args.templates)
    except TemplateError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    generator = _generator(args, parser)
    try:
        config = PipelineConfig(
            per_image=args.per_image,
            benign_per_image=args.benign_per_image,
            categories=categories,
            max_retries=args.agent_retries,
            max_revisions=args.max_revisions,
            min_steps=args.min_steps,
            max_steps=args.max_steps,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            workers=args.workers if args.endpoint else 1,
            retry_failed=args.retry_failed,
            max_consecutive_backend_errors=args.max_backend_errors,
            show_progress=not args.no_progress,
            generator=generator,
        )
    except ValueError as exc:
        parser.error(str(exc))
    policy = _policy(args)
    try:  # a mixed resume is refused before the model is loaded
        images = images_fingerprint(args.images)
        check_resume(args.out, config, templates, policy, overwrite=args.overwrite, images=images)
    except (FileNotFoundError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    backend = _make_backend(args, parser)
    try:
        summary = generate_records(
            backend, args.images, args.out, config, templates, policy=policy, overwrite=args.overwrite
        )
    except RunAborted as exc:
        print(format_summary(summarize(args.out)), file=sys.stderr)
        print(f"{prog}: stopped: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0
