"""``srpo-trl train``: train with a recipe YAML (the code path of ``recipes/srpo.py``)::

    srpo-trl train --config recipes/<model>/srpo/config_*.yaml [--field value ...]

The policy, sampling and HTTP flags are shared by every command (:mod:`srpo_trl.cli.flags`).
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from ..recipe_runner import main as run

    return int(run(argv) or 0)
