"""``srpo-trl evaluate``: safety evaluation of reasoning paths (SIUO, MM-SafetyBench, records)::

    srpo-trl evaluate --model PATH | --endpoint URL --served-model NAME --benchmark B --data D --out DIR

The policy, sampling and HTTP flags are shared by every command (:mod:`srpo_trl.cli.flags`).
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from ..evaluation import main as run

    return int(run(argv) or 0)
