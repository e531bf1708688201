"""Records for SRPO: agents that write reasoning-path records from images, and human curation.

    srpo-trl generate-records --images DIR --endpoint http://HOST:PORT/v1 --served-model NAME \\
        --per-image 3 --out records.jsonl
    srpo-trl generate-records --images DIR --model ./local-vlm --out records.jsonl   # in-process
    srpo-trl generate-records --write-templates my_templates/    # then edit, and --templates my_templates/
    srpo-trl curate export records.jsonl review.csv
    srpo-trl curate import review.csv --out curated.jsonl

Python::

    from srpo_trl.records import generate_records, PipelineConfig, export_review, import_review
    summary = generate_records(backend, "images/", "records.jsonl", PipelineConfig(per_image=3))

The records are what ``srpo-trl explore`` reads (see :mod:`srpo_trl.records.schema` and
docs/records.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .agents import (
    AGENT_VARIABLES,
    AGENTS,
    BENIGN,
    CATEGORIES,
    OUTCOMES,
    AgentFailure,
    OutputError,
    TemplateError,
    call_agent,
    load_templates,
    parse_output,
    write_templates,
)
from .curate import ReviewError, export_review, import_review
from .. import store
from ..cli.flags import add_http_flags, add_policy_flags, add_sampling_flags
from .pipeline import (
    PipelineConfig,
    RunAborted,
    check_resume,
    format_summary,
    generate_records,
    output_paths,
    summarize,
)
from .schema import RecordError, load_records, validate_record

__all__ = [
    "AGENTS",
    "AGENT_VARIABLES",
    "BENIGN",
    "CATEGORIES",
    "OUTCOMES",
    "AgentFailure",
    "OutputError",
    "PipelineConfig",
    "RecordError",
    "ReviewError",
    "RunAborted",
    "TemplateError",
    "call_agent",
    "export_review",
    "format_summary",
    "generate_records",
    "import_review",
    "load_records",
    "load_templates",
    "main_curate",
    "main_generate",
    "output_paths",
    "parse_output",
    "summarize",
    "validate_record",
    "write_templates",
]


# ----------------------------------------------------------------------------------------------
# srpo-trl generate-records
# ----------------------------------------------------------------------------------------------


def build_generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="srpo-trl generate-records",
        description="Write SRPO records (request, unsafe scenario, reasoning path, safe answer) from harmless "
        "images with a chain of model agents: Query, Reasoning, Check (with revisions), Summary. "
        "Rerun the same command to resume after a stop.",
    )
    p.add_argument("--images", help="folder of images (searched recursively)")
    p.add_argument("--out", help="records file to write (JSONL); its .failed/.journal/.summary files go beside it")
    backend = add_policy_flags(p, model_help="a local vision-language model folder (or, with the deprecated --chat-url, "
                                             "the served name)", old_endpoint=("--chat-url",))  # fmt: skip
    add_http_flags(p, timeout=120.0, retries=3)
    backend.add_argument("--adapter", default=None, help="local model: a PEFT adapter folder to put on top")
    backend.add_argument("--device", default=None, help="local model: device (default cuda if available, else cpu)")
    backend.add_argument("--dtype", default="auto", help="local model: float32, bfloat16, ... or auto (default)")
    gen = p.add_argument_group("generation")
    gen.add_argument("--per-image", type=int, default=3, help="unsafe items per image (default 3)")
    gen.add_argument("--benign-per-image", type=int, default=1, help="benign control items per image (default 1)")
    gen.add_argument("--categories", default=None, help="comma-separated subset of the nine categories (default: all)")
    gen.add_argument("--templates", default=None, help="folder of template overrides (<agent>.txt; see --write-templates)")
    gen.add_argument("--write-templates", metavar="DIR", default=None, help="write the default templates to DIR and exit")
    gen.add_argument("--max-retries", type=int, default=2, help="re-asks after an invalid answer, per agent call (default 2; "
                                                                 "HTTP retries are --http-retries)")  # fmt: skip
    gen.add_argument("--max-revisions", type=int, default=2, help="times the Check agent may send an item back (default 2)")
    gen.add_argument("--min-steps", type=int, default=3, help="fewest reasoning steps (default 3)")
    gen.add_argument("--max-steps", type=int, default=8, help="most reasoning steps (default 8)")
    add_sampling_flags(p, num_samples=None, temperature=0.7, max_new_tokens=1024, seed=None)  # one answer per agent call
    gen.add_argument("--workers", type=int, default=4, help="images processed at once with --endpoint (default 4)")
    gen.add_argument("--retry-failed", action="store_true", help="retry every failed item from scratch")
    gen.add_argument("--overwrite", action="store_true", help="start again instead of resuming (deletes the earlier records)")
    gen.add_argument("--max-backend-errors", type=int, default=5, help="stop after this many backend failures in a row (default 5)")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _categories(value: str | None, parser: argparse.ArgumentParser) -> tuple[str, ...]:
    from .agents import normalize_category

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
        parser.error("give --endpoint URL --served-model NAME (a server) or --model PATH (a local vision-language model)")
    return {"backend": "transformers", "model": os.path.abspath(args.model)}


def _policy(args) -> dict:
    if args.endpoint:
        return store.endpoint_fingerprint(args.endpoint, args.served_model or args.model)
    policy = store.model_fingerprint(args.model, args.adapter)
    policy["dtype"] = args.dtype
    return policy


def _make_backend(args, parser):
    if args.endpoint:
        from ..backends import OpenAICompatibleBackend

        return OpenAICompatibleBackend(
            args.endpoint,
            args.served_model or args.model,
            api_key=args.api_key,
            timeout=args.timeout,
            max_retries=args.http_retries,
            concurrency=1,
            show_progress=False,
        )
    from ..backends import TransformersBackend
    from ..loading import load_model_and_processor

    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processing_class = load_model_and_processor(args.model, adapter=args.adapter, dtype=args.dtype, device=device)
    backend = TransformersBackend(model, processing_class, batch_size=1, show_progress=False)
    if not backend.is_processor:
        parser.error(f"--model {args.model}: a text-only model; the agents look at images, so use a vision-language model")
    return backend


def main_generate(argv: list[str] | None = None) -> int:
    parser = build_generate_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    prog = "srpo-trl generate-records"
    if args.write_templates:
        try:
            paths = write_templates(args.write_templates)
        except FileExistsError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {len(paths)} templates to {args.write_templates}; edit them and pass --templates {args.write_templates}")
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
            max_retries=args.max_retries,
            max_revisions=args.max_revisions,
            min_steps=args.min_steps,
            max_steps=args.max_steps,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
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
        check_resume(args.out, config, templates, policy, overwrite=args.overwrite)
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    backend = _make_backend(args, parser)
    try:
        summary = generate_records(backend, args.images, args.out, config, templates, policy=policy,
                                   overwrite=args.overwrite)  # fmt: skip
    except RunAborted as exc:
        print(format_summary(summarize(args.out)), file=sys.stderr)
        print(f"{prog}: stopped: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


# ----------------------------------------------------------------------------------------------
# srpo-trl curate
# ----------------------------------------------------------------------------------------------


def build_curate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="srpo-trl curate",
        description="Human curation of records: export a review file (CSV or JSONL), fill its 'decision' column "
        "(accept / edit / reject) and edit cells, then import it.",
    )
    sub = p.add_subparsers(dest="action", required=True)
    ex = sub.add_parser("export", help="write a review file for a records file")
    ex.add_argument("records", help="records file (JSONL)")
    ex.add_argument("review", help="review file to write: .csv (spreadsheets) or .jsonl")
    ex.add_argument("--force", action="store_true", help="overwrite an existing review file")
    im = sub.add_parser("import", help="read a reviewed file and write the curated records")
    im.add_argument("review", help="the review file (.csv or .jsonl)")
    im.add_argument("--out", required=True, help="curated records file to write (JSONL)")
    im.add_argument("--skip-invalid", action="store_true", help="write the good rows even if some rows are bad")
    im.add_argument("--no-check-images", action="store_true", help="do not check that image files exist")
    return p


def main_curate(argv: list[str] | None = None) -> int:
    args = build_curate_parser().parse_args(argv)
    prog = f"srpo-trl curate {args.action}"
    if args.action == "export":
        try:
            n = export_review(args.records, args.review, force=args.force)
        except (FileExistsError, FileNotFoundError, RecordError, ValueError) as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 1
        print(
            f"wrote {n} rows to {args.review}: fill 'decision' with accept, edit or reject (edit cells as needed), "
            f"then: srpo-trl curate import {args.review} --out curated.jsonl"
        )
        return 0
    try:
        result = import_review(args.review, args.out, skip_invalid=args.skip_invalid, check_images=not args.no_check_images)
    except ReviewError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        print(f"{prog}: nothing written; fix the rows above (or pass --skip-invalid to leave them out)", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    for err in result.errors:
        print(f"{prog}: left out: {err}", file=sys.stderr)
    pending = f", {len(result.pending)} not reviewed yet ({', '.join(result.pending[:10])}{', ...' if len(result.pending) > 10 else ''})" if result.pending else ""
    print(
        f"wrote {len(result.records)} records to {args.out} ({result.accepted} accepted, {result.edited} edited); "
        f"{result.rejected} rejected{pending}" + (f"; {len(result.errors)} bad row(s) left out" if result.errors else "")
    )
    return 0
