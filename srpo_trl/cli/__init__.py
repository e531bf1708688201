"""The ``srpo-trl`` command: one subcommand per stage of the SRPO loop.

    srpo-trl demo [--quick] [--seed N] [--out DIR]
    srpo-trl study [--quick] [--grid ...] [--jobs N] --out DIR
    srpo-trl train --config recipes/<model>/srpo/config_*.yaml [--field value ...]
    srpo-trl explore --model PATH --records records.jsonl --out explored.jsonl ...
    srpo-trl evaluate --model PATH --benchmark siuo --data ... --out report/
    srpo-trl generate-records --images DIR --endpoint URL --served-model NAME --out records.jsonl
    srpo-trl curate export|import ...
    srpo-trl --version

Each subcommand has its own module here (``srpo_trl.cli.<command>``), imported only when it runs.
The policy (``--model`` or ``--endpoint URL --served-model NAME``), sampling (``--num-samples``,
``--temperature``, ``--max-new-tokens``, ``--seed``) and HTTP flags (``--timeout``,
``--http-retries``) have the same names in every command (:mod:`srpo_trl.cli.flags`).
"""

from __future__ import annotations

import importlib
import sys


COMMANDS = {
    "demo": ("srpo_trl.cli.demo", "main", "run the SRPO loop end to end on a tiny model (CPU, offline)"),
    "study": (
        "srpo_trl.cli.study",
        "main",
        "the pre-registered grid over data regimes on the demo task (docs/study.md)",
    ),
    "train": ("srpo_trl.cli.train", "main", "train with a recipe YAML (same code path as recipes/srpo.py)"),
    "explore": ("srpo_trl.cli.explore", "main", "sample reasoning branches, verify them, write step pairs"),
    "evaluate": ("srpo_trl.cli.evaluate", "main", "safety evaluation of reasoning paths"),
    "generate-records": ("srpo_trl.cli.generate_records", "main", "agents that write reasoning-path records"),
    "curate": ("srpo_trl.cli.curate", "main", "export records for human review and import the edits"),
}


def _usage() -> str:
    lines = ["usage: srpo-trl COMMAND [ARGS...]", "       srpo-trl --version", "", "commands:"]
    lines += [f"  {name:<18} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        from .. import __version__

        print(f"srpo-trl {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"srpo-trl: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    result = getattr(importlib.import_module(module), func)(rest)
    return int(result or 0)
