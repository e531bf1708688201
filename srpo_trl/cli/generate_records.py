"""``srpo-trl generate-records``: agents that write reasoning-path records from images::

    srpo-trl generate-records --images DIR --endpoint URL --served-model NAME --out records.jsonl

The policy, sampling and HTTP flags are shared by every command (:mod:`srpo_trl.cli.flags`).
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from ..records import main_generate as run

    return int(run(argv) or 0)
