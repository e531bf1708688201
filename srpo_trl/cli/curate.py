"""``srpo-trl curate``: human curation of records::

    srpo-trl curate export records.jsonl review.csv
    srpo-trl curate import review.csv --out curated.jsonl

The policy, sampling and HTTP flags are shared by every command (:mod:`srpo_trl.cli.flags`).
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from ..records import main_curate as run

    return int(run(argv) or 0)
