"""``srpo-trl train``: train with a recipe YAML (the code path of ``recipes/srpo.py``)::

    srpo-trl train --config recipes/<model>/srpo/config_*.yaml [--field value ...]
    srpo-trl train --accelerate-config zero3 [--num_processes N ...] --config RECIPE.yaml [--field value ...]

With ``--accelerate-config`` it runs ``accelerate launch`` with that config (a packaged name or a
path) and the same arguments (:mod:`srpo_trl.launch`); without, it trains in this process.

The policy, sampling and HTTP flags are shared by every command (:mod:`srpo_trl.cli.flags`).
"""

from __future__ import annotations

import sys


USAGE = """\
usage: srpo-trl train --config RECIPE.yaml [--FIELD VALUE ...]
       srpo-trl train --accelerate-config NAME_OR_PATH [ACCELERATE LAUNCH OPTIONS] --config RECIPE.yaml [...]
       srpo-trl train --FIELD VALUE ...     (every field on the command line, no recipe)
       srpo-trl train --help                (all fields: script, SRPOConfig, ModelConfig)

A recipe names the model (model_name_or_path), the step pairs (train_file or dataset_name) and the
training settings; recipes/<model>/srpo/config_*.yaml are examples (docs/recipes.md), shipped with the
package: `srpo-trl recipes list` shows them and the accelerate configs --accelerate-config accepts."""


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if not given:  # nothing to train: say how, and exit 2 as argparse does for a usage error
        print(USAGE, file=sys.stderr)
        return 2
    from .. import launch

    if launch.wants_launch(given):  # several processes: accelerate launch runs this command in each
        return launch.main(given)
    from ..recipe_runner import main as run

    return int(run(launch.with_packaged_recipe(given)) or 0)
