"""``srpo-trl curate``: human curation of records (the work is :mod:`srpo_trl.records.curate`)::

srpo-trl curate export records.jsonl review.csv
srpo-trl curate import review.csv --out curated.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..contract import RecordError
from ..records.curate import ReviewError, export_review, import_review


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="srpo-trl curate",
        description="Human curation of records: export a review file (CSV or JSONL), fill its 'decision' column "
        "(accept / edit / reject) and edit cells, then import it.",
    )
    sub = p.add_subparsers(dest="action", required=True)
    ex = sub.add_parser("export", help="write a review file for a records file")
    ex.add_argument("records", help="records file (JSONL)")
    ex.add_argument("review", help="review file to write: .csv (spreadsheets) or .jsonl")
    ex.add_argument(
        "--overwrite",
        "--force",
        dest="overwrite",
        action="store_true",
        help="replace an existing review file (and the reviewer's work in it)",
    )
    ex.add_argument(
        "--images", default=None, help="folder the records' images must lie in (default: the records file's folder)"
    )
    ex.add_argument("--allow-outside-root", action="store_true", help="accept image paths outside --images")
    im = sub.add_parser("import", help="read a reviewed file and write the curated records")
    im.add_argument("review", help="the review file (.csv or .jsonl)")
    im.add_argument("--out", required=True, help="curated records file to write (JSONL)")
    im.add_argument("--skip-invalid", action="store_true", help="write the good rows even if some rows are bad")
    im.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out even if it was written from another review or with other arguments",
    )
    im.add_argument("--no-check-images", action="store_true", help="do not check that image files exist")
    im.add_argument(
        "--images", default=None, help="folder the review's images must lie in (default: the review file's folder)"
    )
    im.add_argument("--allow-outside-root", action="store_true", help="accept image paths outside --images")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = f"srpo-trl curate {args.action}"
    if args.action == "export":
        try:
            n = export_review(
                args.records,
                args.review,
                overwrite=args.overwrite,
                image_root=args.images or Path(args.records).parent,
                allow_outside_root=args.allow_outside_root,
            )
        except (FileExistsError, FileNotFoundError, RecordError, ValueError) as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 1
        print(
            f"wrote {n} rows to {args.review}: fill 'decision' with accept, edit or reject (edit cells as needed), "
            f"then: srpo-trl curate import {args.review} --out curated.jsonl"
        )
        return 0
    try:
        result = import_review(
            args.review,
            args.out,
            skip_invalid=args.skip_invalid,
            check_images=not args.no_check_images,
            image_root=args.images or Path(args.review).parent,
            allow_outside_root=args.allow_outside_root,
            overwrite=args.overwrite,
        )
    except ReviewError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        print(
            f"{prog}: nothing written; fix the rows above (or pass --skip-invalid to leave them out)", file=sys.stderr
        )
        return 1
    except (FileNotFoundError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    for err in result.errors:
        print(f"{prog}: left out: {err}", file=sys.stderr)
    pending = (
        f", {len(result.pending)} not reviewed yet ({', '.join(result.pending[:10])}{', ...' if len(result.pending) > 10 else ''})"
        if result.pending
        else ""
    )
    print(
        f"wrote {len(result.records)} records to {args.out} ({result.accepted} accepted, {result.edited} edited); "
        f"{result.rejected} rejected{pending}"
        + (f"; {len(result.errors)} bad row(s) left out" if result.errors else "")
    )
    return 0
