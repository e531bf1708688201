"""The launch configs and recipes that ship inside the package, and ``srpo-trl train --accelerate-config``.

The files live in ``srpo_trl/recipes`` (package data, so a wheel installs them); the repository's
top-level ``recipes/`` is a link to that folder, so the files the docs show are the files a
``pip install`` gets, with no second copy to drift.

``srpo-trl train --accelerate-config NAME_OR_PATH [accelerate launch options] --config RECIPE [fields]``
runs ``accelerate launch --config_file CONFIG [options] -m srpo_trl.cli train --config RECIPE [fields]``,
as ``trl dpo --accelerate_config zero3`` does for TRL's scripts: NAME is a packaged config
(``zero3``, ``multi_node_ddp``, ``cpu_ddp``, ...; ``srpo-trl recipes list`` shows them), anything else
a path. Every argument that is a recipe field goes to the training command; the rest must be options
of ``accelerate launch`` (``--num_processes``, ``--num_machines``, ``--machine_rank``,
``--main_process_ip``, ``--main_process_port``, ``--rdzv_conf``, ...; dashes or underscores). Where
both know a name (``--gradient_accumulation_steps``, ``--debug``) the recipe gets it, as in TRL.
``--config`` may also name a packaged recipe (``qwen2.5-7b-instruct/srpo/config_lora.yaml``) when no
such local file exists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


LAUNCH_FLAGS = ("--accelerate-config", "--accelerate_config")
# What the launched processes run: the same command, in process (srpo_trl.cli.train without the flag).
ENTRY = ["-m", "srpo_trl.cli", "train"]


class LaunchError(ValueError):
    """A launch that cannot start: an unknown config or argument; the message says what to pass."""


# ---- the packaged files ---------------------------------------------------------------------------


def recipes_dir() -> Path:
    """The folder of the packaged recipes (installed as files: a wheel or an editable install)."""
    from importlib import resources

    return Path(str(resources.files("srpo_trl").joinpath("recipes")))


def recipe_files() -> list[str]:
    """Every packaged recipe file, as a path relative to :func:`recipes_dir` (sorted, '/'-separated)."""
    root = recipes_dir()
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )


def accelerate_configs() -> dict[str, Path]:
    """Packaged accelerate launch configs by name (the file name without ``.yaml``)."""
    folder = recipes_dir() / "accelerate_configs"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def model_recipes() -> list[str]:
    """Packaged model recipes: ``<model>/srpo/config_*.yaml``, relative to :func:`recipes_dir`."""
    return [f for f in recipe_files() if f.count("/") == 2 and f.split("/")[1] == "srpo" and f.endswith(".yaml")]


def header(path: Path) -> list[str]:
    """The comment lines a packaged file starts with (its hardware assumption and launch command)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#!"):
            continue
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return lines


def resolve_accelerate_config(value: str) -> Path:
    """A path to an existing file, else the packaged config called ``value`` (with or without .yaml)."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    configs = accelerate_configs()
    name = value[: -len(".yaml")] if value.endswith(".yaml") else value
    if "/" not in value and name in configs:
        return configs[name]
    raise LaunchError(
        f"--accelerate-config {value!r}: no such file (looked for {path.resolve()}) and no packaged config of that "
        f"name. Packaged: {', '.join(configs)} (srpo-trl recipes list shows what each assumes)."
    )


def resolve_recipe(value: str) -> str:
    """``--config``: a local file as given, else a packaged recipe of that relative path (a leading
    ``recipes/`` is allowed), else ``value`` unchanged (the parser then says the file is missing)."""
    if Path(value).expanduser().exists():
        return value
    relative = value[len("recipes/") :] if value.startswith("recipes/") else value
    packaged = recipes_dir() / relative
    if relative in recipe_files():
        print(f"srpo-trl train: no file {value}; using the packaged recipe {packaged}", file=sys.stderr)
        return str(packaged)
    return value


def with_packaged_recipe(argv: list[str]) -> list[str]:
    """``argv`` with the value of ``--config`` resolved by :func:`resolve_recipe`."""
    argv = list(argv)
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            argv[i + 1] = resolve_recipe(argv[i + 1])
        elif token.startswith("--config="):
            argv[i] = "--config=" + resolve_recipe(token.split("=", 1)[1])
    return argv


def copy_recipes(dest: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    """Copy every packaged recipe file into ``dest`` (the layout of the repository's recipes/).
    Refuses to overwrite an existing file unless ``overwrite``; returns the files written."""
    dest = Path(dest)
    root = recipes_dir()
    files = recipe_files()
    clashes = [f for f in files if (dest / f).exists()]
    if clashes and not overwrite:
        raise LaunchError(
            f"{len(clashes)} file(s) already exist in {dest} (e.g. {dest / clashes[0]}); "
            "pass --overwrite to replace them, or copy into another folder."
        )
    written = []
    for f in files:
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / f, target)
        if os.access(root / f, os.X_OK):
            target.chmod(target.stat().st_mode | 0o111)
        written.append(target)
    return written


# ---- srpo-trl train --accelerate-config -----------------------------------------------------------


def wants_launch(argv: list[str]) -> bool:
    return any(t in LAUNCH_FLAGS or t.split("=", 1)[0] in LAUNCH_FLAGS for t in argv)


def _take_launch_flag(argv: list[str]) -> tuple[str, list[str]]:
    """(the --accelerate-config value, argv without it)."""
    for i, token in enumerate(argv):
        name, eq, value = token.partition("=")
        if name in LAUNCH_FLAGS:
            if eq:
                return value, argv[:i] + argv[i + 1 :]
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise LaunchError(f"{token} needs a value: a packaged config name or a path to a YAML file.")
            return argv[i + 1], argv[:i] + argv[i + 2 :]
    raise LaunchError("no --accelerate-config given")


def _subtract_subsequence(tokens: list[str], sub: list[str]) -> list[str]:
    """``tokens`` without the ordered subsequence ``sub`` (what TRL's CLI does to split its arguments)."""
    it = iter(sub)
    current = next(it, None)
    out = []
    for token in tokens:
        if current is not None and token == current:
            current = next(it, None)
        else:
            out.append(token)
    return out


def split_args(argv: list[str]) -> tuple[Path, list[str], list[str]]:
    """(accelerate config, ``accelerate launch`` options, training arguments) of ``srpo-trl train``'s
    command line. Training arguments are whatever the recipe parser knows (``--config`` included);
    the rest must be ``accelerate launch`` options."""
    from accelerate.commands.launch import launch_command_parser

    from .recipe_runner import make_parser

    value, rest = _take_launch_flag(list(argv))
    config = resolve_accelerate_config(value)
    # The recipe parser consumes its fields; what it leaves over, in order, is for accelerate.
    without_config, recipe_file = [], []
    i = 0
    while i < len(rest):
        if rest[i] == "--config" and i + 1 < len(rest):
            recipe_file = ["--config", rest[i + 1]]
            i += 2
            continue
        if rest[i].startswith("--config="):
            recipe_file = [rest[i]]
        else:
            without_config.append(rest[i])
        i += 1
    _, leftover = make_parser().parse_known_args(without_config)
    known = launch_command_parser()._option_string_actions
    unknown = [t for t in leftover if t.startswith("-") and t.split("=", 1)[0] not in known]
    if unknown:
        raise LaunchError(
            f"unknown argument(s) {' '.join(unknown)}: neither a recipe field (srpo-trl train --help) nor an option "
            "of accelerate launch (accelerate launch --help)."
        )
    for token in leftover:
        name = token.split("=", 1)[0]
        if name in ("--config_file", "--config-file"):
            raise LaunchError("give the accelerate config with --accelerate-config NAME_OR_PATH, not --config_file.")
        if name in ("-m", "--module", "--no_python", "--no-python"):
            raise LaunchError(f"{name}: srpo-trl train chooses what the processes run (srpo_trl.cli train).")
    check_machines(config, leftover)
    training = with_packaged_recipe(recipe_file + _subtract_subsequence(without_config, leftover))
    return config, leftover, training


def check_machines(config: Path, launch_args: list[str]) -> None:
    """Several machines need the main machine's address and, with a packaged config (whose
    machine_rank is 0), this machine's rank: without them accelerate would rendezvous at 'None:PORT',
    or every machine would claim rank 0 and wait for the others until the rendezvous timeout."""
    import yaml
    from accelerate.commands.launch import launch_command_parser

    given = launch_command_parser().parse_args([*launch_args, *ENTRY])
    raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    machines = given.num_machines or raw.get("num_machines", 1)
    if machines <= 1:
        return
    if not (given.main_process_ip or raw.get("main_process_ip")):
        raise LaunchError(
            f"{machines} machines: pass --main_process_ip HOST, the address of the machine with --machine_rank 0 "
            "(every machine must reach it on --main_process_port)."
        )
    packaged = config.resolve() in {p.resolve() for p in accelerate_configs().values()}
    if given.machine_rank is None and packaged:
        raise LaunchError(
            f"{machines} machines: pass --machine_rank R on each (0 on the main machine, 1..{machines - 1} on the "
            "others); on SLURM, --machine_rank $SLURM_NODEID (recipes/launch.slurm does)."
        )


def launch_command(argv: list[str]) -> list[str]:
    """The ``accelerate launch`` command line ``srpo-trl train`` runs for ``argv``."""
    config, launch_args, training = split_args(argv)
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        *launch_args,
        *ENTRY,
        *training,
    ]


def main(argv: list[str]) -> int:
    """``srpo-trl train --accelerate-config ...``: run ``accelerate launch`` and return its exit code."""
    try:
        cmd = launch_command(argv)
    except LaunchError as e:
        print(f"srpo-trl train: {e}", file=sys.stderr)
        return 2
    shown = ["accelerate", "launch", *cmd[3:]]
    print("srpo-trl train: " + " ".join(shown), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the launcher got the same Ctrl-C: let it stop its processes
        return proc.wait()
