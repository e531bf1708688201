"""A new user's path: the wheel built from this checkout (sdist first, then the wheel from it, as
`python -m build` does), installed into a fresh venv, launches a 2-process CPU training with a
packaged accelerate config and a packaged model recipe, from a folder outside the checkout.

To keep it fast the wheel is installed with --no-deps and the dependencies already installed in the
development venv are made visible through a .pth file naming its site-packages. A path line in a .pth
file only extends sys.path: the .pth files inside that folder (among them the editable install's
finder, which would import srpo_trl from the checkout) are not run. The test checks that: srpo_trl
is imported from the new venv and no finder of the editable install is active.
"""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from test_packaging import _build, unpacked_sdist

from srpo_trl.tiny import build_tokenizer, tiny_causal_lm


pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[1]
ROWS = [
    {
        "prompt": f"Question {i}: is this safe?",
        "prefix": ["Step 1: look."] if i % 2 else [],
        "chosen": "Yes, stay safe.",
        "rejected": "Mix them all.",
    }
    for i in range(8)
]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A fresh venv holding the wheel (and only the wheel) of srpo-trl: its paths."""
    root = tmp_path_factory.mktemp("installed")
    source = unpacked_sdist(root)
    wheel = _build("wheel", source, root)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index"]
    subprocess.run([*pip, str(wheel)], check=True)
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "dev_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = root / "work"  # outside the checkout: nothing of it is on the path through the current folder
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        PATH=f"{venv / 'bin'}:{env['PATH']}",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    return dict(venv=venv, python=python, site=site, work=work, env=env)


def run(installed, *cmd, timeout=120):
    return subprocess.run(
        [str(c) for c in cmd],
        cwd=installed["work"],
        env=installed["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_installed_package_is_the_wheel_not_the_checkout(installed):
    probe = (
        "import json, sys, srpo_trl, accelerate; "
        "print(json.dumps({'file': srpo_trl.__file__, 'path': sys.path, "
        "'finders': [type(f).__name__ + repr(f) for f in sys.meta_path]}))"
    )
    done = run(installed, installed["python"], "-c", probe)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout)
    assert Path(seen["file"]).is_relative_to(installed["site"])
    assert not any("editable" in f.lower() for f in seen["finders"]), seen["finders"]
    dev_site = sysconfig.get_paths()["purelib"]  # the dependencies; the only entry inside the checkout
    inside = [p for p in seen["path"] if p and Path(p).resolve().is_relative_to(REPO) and p != dev_site]
    assert inside == [], inside


def test_the_wheel_holds_the_recipes_of_the_checkout(installed):
    done = run(installed, installed["venv"] / "bin" / "srpo-trl", "recipes", "path")
    assert done.returncode == 0, done.stderr[-3000:]
    packaged = Path(done.stdout.strip())
    assert packaged == installed["site"] / "srpo_trl" / "recipes"
    ours = REPO / "recipes"
    theirs = sorted(
        p.relative_to(packaged).as_posix() for p in packaged.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    assert theirs == sorted(
        p.relative_to(ours).as_posix() for p in ours.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    assert all((packaged / f).read_bytes() == (ours / f).read_bytes() for f in theirs)


def test_two_process_training_from_the_packaged_config_and_recipe(installed):
    work = installed["work"]
    tok = build_tokenizer()
    tiny_causal_lm(tok, seed=4).save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    done = run(
        installed,
        installed["venv"] / "bin" / "srpo-trl",
        "train",
        "--accelerate-config",
        "cpu_ddp",
        "--config",
        "qwen2.5-7b-instruct/srpo/config_lora.yaml",  # a packaged recipe: no file of that name here
        "--model_name_or_path",
        "model",
        "--train_file",
        "pairs.jsonl",
        "--output_dir",
        "out",
        "--use_cpu",
        "true",
        "--bf16",
        "false",
        "--dtype",
        "float32",
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "1",
        "--learning_rate",
        "1e-2",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--activation_checkpointing",
        "false",
        "--max_length",
        "512",
        "--disable_tqdm",
        "true",
        timeout=600,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0 and "terminate called" not in log, log[-6000:]
    packaged = installed["site"] / "srpo_trl" / "recipes"
    assert f"using the packaged recipe {packaged}/qwen2.5-7b-instruct/srpo/config_lora.yaml" in log
    assert f"accelerate launch --config_file {packaged}/accelerate_configs/cpu_ddp.yaml -m srpo_trl.cli train" in log
    assert "srpo-trl train: 2 processes on 1 node: node 0 (" in log and "ranks 0-1 (DistributedType.MULTI_CPU)" in log
    state = json.loads((work / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3]
    assert json.loads((work / "out" / "adapter_config.json").read_text())["r"] == 8  # the recipe's LoRA rank
    from safetensors.torch import load_file

    adapter = load_file(work / "out" / "adapter_model.safetensors")
    assert any("lora_B" in n and t.abs().sum() > 0 for n, t in adapter.items())  # lora_B starts at 0: it trained
