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
    "check_resume",
    "build_generate_parser",
    "build_curate_parser",
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
# Command line: srpo_trl/cli/generate_records.py and srpo_trl/cli/curate.py (names kept for importers)
# ----------------------------------------------------------------------------------------------


def build_generate_parser() -> argparse.ArgumentParser:
    from ..cli.generate_records import build_parser

    return build_parser()


def main_generate(argv: list[str] | None = None) -> int:
    """``srpo-trl generate-records`` (:mod:`srpo_trl.cli.generate_records`)."""
    from ..cli.generate_records import main

    return main(argv)


def build_curate_parser() -> argparse.ArgumentParser:
    from ..cli.curate import build_parser

    return build_parser()


def main_curate(argv: list[str] | None = None) -> int:
    """``srpo-trl curate`` (:mod:`srpo_trl.cli.curate`)."""
    from ..cli.curate import main

    return main(argv)
