"""``srpo-trl recipes``: the launch configs and model recipes that ship with the package::

    srpo-trl recipes list            what there is, with each accelerate config's hardware line
    srpo-trl recipes path            the folder they are installed in
    srpo-trl recipes copy [DEST]     copy them all into DEST (default ./recipes), the repository's layout

The same files are the repository's recipes/ folder (docs/recipes.md). A packaged accelerate config
is launched by name: ``srpo-trl train --accelerate-config zero3 --config RECIPE.yaml``.
"""

from __future__ import annotations

import argparse
import sys

from .. import launch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="srpo-trl recipes", description="The launch configs and recipes of the package.")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="list the packaged accelerate configs, model recipes and scripts")
    sub.add_parser("path", help="print the folder the recipes are installed in")
    copy = sub.add_parser("copy", help="copy every recipe file into a folder (the repository's recipes/ layout)")
    copy.add_argument("dest", nargs="?", default="recipes", help="target folder (default: ./recipes)")
    copy.add_argument("--overwrite", action="store_true", help="overwrite files that exist")
    return p


def _hardware(path) -> str:
    """The first sentence after 'Hardware:' in a config's header (it may wrap), else its first line."""
    lines = launch.header(path)
    for i, line in enumerate(lines):
        if line.startswith("Hardware:"):
            text = " ".join([line[len("Hardware:") :].strip(), *lines[i + 1 :]])
            end = text.find(". ")
            return text if end < 0 else text[: end + 1]
    return lines[0] if lines else ""


def list_recipes() -> str:
    root = launch.recipes_dir()
    configs = launch.accelerate_configs()
    width = max(map(len, configs))
    out = [f"recipes in {root}", "", "accelerate configs (srpo-trl train --accelerate-config NAME):"]
    out += [f"  {name:<{width}}  {_hardware(path)}" for name, path in configs.items()]
    out += ["", "model recipes (srpo-trl train --config PATH; a packaged path works without copying):"]
    out += [f"  {f}" for f in launch.model_recipes()]
    others = [
        f for f in launch.recipe_files() if not f.startswith("accelerate_configs/") and f not in launch.model_recipes()
    ]
    out += ["", "scripts:"] + [f"  {f}" for f in others]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "list":
        print(list_recipes())
    elif args.action == "path":
        print(launch.recipes_dir())
    else:
        try:
            written = launch.copy_recipes(args.dest, overwrite=args.overwrite)
        except launch.LaunchError as e:
            print(f"srpo-trl recipes copy: {e}", file=sys.stderr)
            return 2
        print(f"copied {len(written)} files into {args.dest}")
    return 0
