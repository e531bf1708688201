"""``srpo-trl explore``: sample reasoning branches from a policy, verify them, write what step pairs are built from::

    srpo-trl explore --model PATH | --endpoint URL --served-model NAME --records R.jsonl --out O.jsonl

The policy, sampling and HTTP flags are shared by every command (:mod:`srpo_trl.cli.flags`).
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from ..exploration import main as run

    return int(run(argv) or 0)
