"""``srpo-trl train``: train with a recipe YAML (the code path of ``recipes/srpo.py``)::

    srpo-trl train --config recipes/<model>/srpo/config_*.yaml [--field value ...]

The policy, sampling and HTTP flags are shared by every command (:mod:`srpo_trl.cli.flags`).
"""

from __future__ import annotations

import sys


USAGE = """\
usage: srpo-trl train --config RECIPE.yaml [--FIELD VALUE ...]
       srpo-trl train --FIELD VALUE ...     (every field on the command line, no recipe)
       srpo-trl train --help                (all fields: script, SRPOConfig, ModelConfig)

A recipe names the model (model_name_or_path), the step pairs (train_file or dataset_name) and the
training settings; recipes/<model>/srpo/config_*.yaml are examples (docs/recipes.md)."""


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if not given:  # nothing to train: say how, and exit 2 as argparse does for a usage error
        print(USAGE, file=sys.stderr)
        return 2
    from ..recipe_runner import main as run

    return int(run(argv) or 0)
