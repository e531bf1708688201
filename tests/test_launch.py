"""The recipes that ship inside the package and `srpo-trl train --accelerate-config` (srpo_trl/launch.py):
one copy of every file (recipes/ is a link to srpo_trl/recipes) and it is what docs/recipes.md lists;
the command line is split into accelerate launch options and recipe fields the way TRL's CLI does,
and accelerate's own parser accepts the command we build; every packaged accelerate config, the
GPU-only ones included, goes through accelerate's launch preparation (what each process would get);
`srpo-trl recipes list|path|copy`. The launches themselves run in tests/test_distributed.py and
tests/test_installed_launch.py."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from srpo_trl import launch
from srpo_trl.cli import main as cli_main


REPO = Path(__file__).resolve().parents[1]
PACKAGED = REPO / "srpo_trl" / "recipes"


def docs_tree() -> set[str]:
    """The files of the tree drawn at the top of docs/recipes.md (two spaces per level; a name ending
    in '/' is a folder, possibly several levels at once)."""
    text = (REPO / "docs" / "recipes.md").read_text()
    block = re.search(r"```\nrecipes/[^\n]*\n(.*?)```", text, re.S).group(1)
    files, stack = set(), []
    for line in block.splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2 - 1
        name = line.split()[0]
        del stack[depth:]
        if name.endswith("/"):
            stack.append(name.rstrip("/"))
        else:
            files.add("/".join([*stack, name]))
    return files


def test_recipes_is_one_copy_the_package_ships():
    top = REPO / "recipes"
    if (REPO / ".git").exists():  # the repository: a link, so there is nothing to keep in step
        assert top.is_symlink() and top.resolve() == PACKAGED.resolve()
    else:  # an unpacked sdist holds the link's files as copies: the same bytes
        ours = sorted(p.relative_to(top).as_posix() for p in top.rglob("*") if p.is_file())
        assert ours == launch.recipe_files()
        assert all((top / f).read_bytes() == (PACKAGED / f).read_bytes() for f in ours)
    assert launch.recipes_dir().resolve() == PACKAGED.resolve()
    files = launch.recipe_files()
    assert "srpo.py" in files and "launch.slurm" in files and "accelerate_configs/zero3.yaml" in files


def test_docs_show_exactly_the_packaged_files():
    assert docs_tree() == set(launch.recipe_files())


def test_pyproject_package_data_covers_every_recipe_file():
    import fnmatch

    import tomllib

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["srpo_trl"]
    for f in launch.recipe_files():
        path = f"recipes/{f}"
        # setuptools globs: '**/' matches zero or more folders
        assert any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.replace("**/", "")) for p in patterns), f


# ---- resolving names ---------------------------------------------------------------------------------


def test_accelerate_config_by_name_by_file_name_or_by_path(tmp_path):
    assert launch.resolve_accelerate_config("zero3") == PACKAGED / "accelerate_configs" / "zero3.yaml"
    assert (
        launch.resolve_accelerate_config("multi_node_ddp.yaml")
        == PACKAGED / "accelerate_configs" / "multi_node_ddp.yaml"
    )
    own = tmp_path / "zero3"  # a local file wins over the packaged name
    own.write_text("distributed_type: 'NO'\n")
    assert launch.resolve_accelerate_config(str(own)) == own
    with pytest.raises(launch.LaunchError, match=r"'zero4'.*no such file.*Packaged: .*cpu_ddp.*zero3_offload"):
        launch.resolve_accelerate_config("zero4")


def test_config_may_name_a_packaged_recipe(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rel = "qwen2.5-7b-instruct/srpo/config_lora.yaml"
    for given in (rel, f"recipes/{rel}"):
        assert launch.with_packaged_recipe(["--config", given, "--lr", "1"]) == [
            "--config",
            str(PACKAGED / rel),
            "--lr",
            "1",
        ]
    assert "using the packaged recipe" in capsys.readouterr().err
    (tmp_path / "recipes" / "qwen2.5-7b-instruct" / "srpo").mkdir(parents=True)
    (tmp_path / "recipes" / rel).write_text("learning_rate: 1\n")  # a local file of that name wins
    assert launch.with_packaged_recipe([f"--config=recipes/{rel}"]) == [f"--config=recipes/{rel}"]
    assert launch.with_packaged_recipe(["--config", "missing.yaml"]) == ["--config", "missing.yaml"]


# ---- splitting the command line ------------------------------------------------------------------------


def test_recipe_fields_and_launch_options_are_split_like_trl():
    config, launch_args, training = launch.split_args(
        [
            "--num-processes",
            "4",
            "--accelerate-config",
            "multi_node_zero3",
            "--config",
            "r.yaml",
            "--learning_rate",
            "1e-5",
            "--machine_rank=1",
            "--main_process_ip",
            "node-a",
            "--same_network",
            "--use_cpu",
            "true",
            "--gradient_accumulation_steps",
            "2",  # both know it: the recipe gets it (TRL's rule)
            "--rdzv_conf",
            "timeout=60",
        ]
    )
    assert config == PACKAGED / "accelerate_configs" / "multi_node_zero3.yaml"
    assert launch_args == [
        "--num-processes",
        "4",
        "--machine_rank=1",
        "--main_process_ip",
        "node-a",
        "--same_network",
        "--rdzv_conf",
        "timeout=60",
    ]
    assert training == [
        "--config",
        "r.yaml",
        "--learning_rate",
        "1e-5",
        "--use_cpu",
        "true",
        "--gradient_accumulation_steps",
        "2",
    ]


def test_the_built_command_is_what_accelerate_launch_parses():
    from accelerate.commands.launch import launch_command_parser

    cmd = launch.launch_command(
        ["--accelerate_config=cpu_ddp", "--num_processes", "2", "--config", "r.yaml", "--srpo_lambda", "0.5"]
    )
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    args = launch_command_parser().parse_args(cmd[3:])
    assert args.config_file == str(PACKAGED / "accelerate_configs" / "cpu_ddp.yaml")
    assert args.num_processes == 2 and args.module is True
    assert args.training_script == "srpo_trl.cli"
    assert args.training_script_args == ["train", "--config", "r.yaml", "--srpo_lambda", "0.5"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--accelerate-config", "cpu_ddp", "--num_procesess", "2"], "unknown argument(s) --num_procesess"),
        (["--accelerate-config", "cpu_ddp", "--config_file", "x.yaml"], "not --config_file"),
        (["--accelerate-config", "cpu_ddp", "-m", "other"], "chooses what the processes run"),
        (["--accelerate-config"], "needs a value"),
        (["--accelerate-config", "nope"], "no packaged config of that name"),
    ],
)
def test_bad_launch_arguments_exit_2_with_a_message(argv, message, capsys):
    assert cli_main(["train", *argv]) == 2
    assert message in capsys.readouterr().err


# ---- every packaged config through accelerate's launch preparation --------------------------------------


def prepared(config: Path, *options: str):
    """What `accelerate launch` would set up for `config` (its own parsing, validation and environment
    preparation; nothing is started): (args, environment of the processes)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    argv = ["--config_file", str(config), *options, *launch.ENTRY, "--config", "r.yaml"]
    args, defaults, mp_from_config = _validate_launch_command(launch_command_parser().parse_args(argv))
    if args.use_deepspeed:  # as accelerate.commands.launch.launch_command does before deepspeed_launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return args, prepare_deepspeed_cmd_env(args)[1]
    if args.multi_gpu or args.use_fsdp:
        return args, prepare_multi_gpu_env(args)
    return args, {}


@pytest.mark.parametrize("name", sorted(launch.accelerate_configs()))
def test_every_packaged_config_prepares_a_launch(name):
    config = launch.accelerate_configs()[name]
    multi_node = name.startswith("multi_node_")
    # machine rank 1: accelerate checks that the port is free only on the main machine
    options = ["--machine_rank", "1", "--main_process_ip", "10.1.2.3"] if multi_node else []
    args, env = prepared(config, *options)
    gpu = not name.startswith("cpu_")
    assert env.get("ACCELERATE_MIXED_PRECISION", "bf16" if gpu else "no") == ("bf16" if gpu else "no")
    if "zero" in name:
        stage = 2 if "zero2" in name else 3
        assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage) and env["ACCELERATE_USE_DEEPSPEED"] == "true"
        if "offload" in name:
            assert env["ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"] == "cpu"
        if stage == 3:
            assert env["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"
    if "fsdp" in name:
        assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
        assert (
            env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
            and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
        )
    if multi_node:  # 2 machines x 8 GPUs, this one second; torchrun meets the main machine there
        assert (args.num_machines, args.num_processes, args.machine_rank) == (2, 16, 1)
        assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
        assert args.rdzv_endpoint == "10.1.2.3:29500" and args.rdzv_backend == "static"
    elif name != "single_gpu":
        assert args.num_machines == 1 and args.num_processes == (2 if not gpu else 8)


@pytest.mark.parametrize(
    "options, message",
    [
        # accelerate itself would rendezvous at "None:29500"
        (["--machine_rank", "1"], "pass --main_process_ip HOST"),
        # every machine would take the packaged config's rank 0
        (["--main_process_ip", "node-a"], "pass --machine_rank R on each"),
        (["--num_machines", "3", "--main_process_ip", "node-a"], "1..2 on the others"),
    ],
)
def test_a_multi_node_launch_needs_the_main_host_and_this_machines_rank(options, message, capsys):
    assert cli_main(["train", "--accelerate-config", "multi_node_ddp", *options, "--config", "r.yaml"]) == 2
    assert message in capsys.readouterr().err
    single = ["train", "--accelerate-config", "cpu_ddp", "--num_machines", "2", "--machine_rank", "0"]
    assert cli_main([*single, "--config", "r.yaml"]) == 2  # --num_machines on the command line counts too
    assert "pass --main_process_ip HOST" in capsys.readouterr().err


# ---- the SLURM script ------------------------------------------------------------------------------------


def test_slurm_script_parses_and_launches_one_accelerate_launch_per_node():
    script = PACKAGED / "launch.slurm"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert re.search(r"^#SBATCH --ntasks-per-node=1$", text, re.M)
    assert '--machine_rank "$SLURM_NODEID"' in text and "srun " in text
    assert "scontrol show hostnames" in text and "MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}" in text
    assert "Hardware:" in "\n".join(launch.header(script))


# ---- srpo-trl recipes ------------------------------------------------------------------------------------


def test_recipes_list_names_every_config_and_recipe(capsys):
    assert cli_main(["recipes", "list"]) == 0
    out = capsys.readouterr().out
    for name in launch.accelerate_configs():
        assert re.search(rf"^  {re.escape(name)} +\S", out, re.M), name
    for f in launch.model_recipes():
        assert f"  {f}\n" in out
    assert "  launch.slurm" in out and "  srpo.py" in out
    assert re.search(r"^  zero3_offload +1-8 CUDA GPUs on one machine plus plenty of host RAM", out, re.M)
    assert cli_main(["recipes", "path"]) == 0
    assert Path(capsys.readouterr().out.strip()) == launch.recipes_dir()


def test_recipes_copy_writes_the_packaged_files_and_keeps_existing_ones(tmp_path, capsys):
    dest = tmp_path / "mine"
    assert cli_main(["recipes", "copy", str(dest)]) == 0
    copied = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert copied == launch.recipe_files()
    assert all((dest / f).read_bytes() == (PACKAGED / f).read_bytes() for f in copied)
    assert (dest / "launch.slurm").stat().st_mode & 0o100  # still executable
    (dest / "srpo.py").write_text("# mine\n")
    assert cli_main(["recipes", "copy", str(dest)]) == 2
    assert "already exist" in capsys.readouterr().err and (dest / "srpo.py").read_text() == "# mine\n"
    assert cli_main(["recipes", "copy", str(dest), "--overwrite"]) == 0
    assert (dest / "srpo.py").read_bytes() == (PACKAGED / "srpo.py").read_bytes()
