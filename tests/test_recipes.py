"""recipes/ and `srpo-trl train` (srpo_trl/recipe_runner.py, the code of recipes/srpo.py), single process:
the shipped recipes parse and say what they assume, fields are overridden from the command line,
text and vision-language models train and save what loads back, a recipe that points at something
missing fails before any work with a message naming what was looked for, and report_to=wandb logs
a table of sample pairs (offline)."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROWS

from srpo_trl import recipe_runner as train_mod
from srpo_trl.cli import main as cli_main
from srpo_trl.loading import load_model_and_processor
from srpo_trl.tiny import build_tokenizer, make_image, tiny_causal_lm, tiny_llava_next, tiny_qwen2_5_vl


REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
MODEL_RECIPES = sorted(RECIPES.glob("*/srpo/config_*.yaml"))
ACCELERATE_CONFIGS = sorted((RECIPES / "accelerate_configs").glob("*.yaml"))
TEXT_LORA = RECIPES / "qwen2.5-7b-instruct" / "srpo" / "config_lora.yaml"
VL_LORA = RECIPES / "qwen2.5-vl-7b-instruct" / "srpo" / "config_lora.yaml"
LLAVA_LORA = RECIPES / "llava-v1.6-mistral-7b-hf" / "srpo" / "config_lora.yaml"

# What a CPU test run changes in a GPU recipe: everything else comes from the recipe file.
CPU = dict(
    use_cpu="true",
    dtype="float32",
    bf16="false",
    activation_checkpointing="false",
    report_to="none",
    dataloader_num_workers=0,
    disable_tqdm="true",
    save_strategy="no",
    logging_steps=1,
    eval_strategy="no",
)


def flags(**fields) -> list[str]:
    """Command-line overrides: the CPU settings above, then `fields`."""
    return [x for k, v in {**CPU, **fields}.items() for x in (f"--{k}", str(v))]


def header(path: Path) -> str:
    lines = path.read_text().splitlines()
    out = []
    for line in lines:
        if not line.startswith("#"):
            break
        out.append(line.lstrip("# "))
    return "\n".join(out)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory, tok):
    """A tiny Qwen2 causal LM + tokenizer saved like a hub checkpoint (the real loading path)."""
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    tiny_causal_lm(tok, seed=3).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 2))
    return path


def run_train(*argv):
    return cli_main(["train", *map(str, argv)])


# ---- the shipped files ---------------------------------------------------------------------------


def test_layout_has_every_launch_config_and_model_recipe():
    names = {p.name for p in ACCELERATE_CONFIGS}
    assert {
        "single_gpu.yaml",
        "multi_gpu.yaml",
        "zero2.yaml",
        "zero3.yaml",
        "zero3_offload.yaml",
        "fsdp2.yaml",
        "cpu_ddp.yaml",
        "cpu_zero2.yaml",
        "cpu_zero3.yaml",
    } <= names
    folders = {p.parents[1].name for p in MODEL_RECIPES}
    assert folders == {
        "qwen2.5-vl-7b-instruct",
        "qwen2.5-vl-3b-instruct",
        "llava-v1.6-mistral-7b-hf",
        "qwen2.5-7b-instruct",
    }
    assert {"config_lora.yaml", "config_full.yaml"} <= {p.name for p in MODEL_RECIPES if "qwen2.5-vl-7b" in str(p)}


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_load_and_state_their_hardware(path):
    from accelerate.commands.config.config_args import load_config_from_file

    text = header(path)
    assert "Hardware:" in text and "accelerate launch --config_file recipes/accelerate_configs/" + path.name in text
    config = load_config_from_file(str(path))
    expected = {
        "single_gpu.yaml": ("NO", 1),
        "multi_gpu.yaml": ("MULTI_GPU", 8),
        "zero2.yaml": ("DEEPSPEED", 8),
        "zero3.yaml": ("DEEPSPEED", 8),
        "zero3_offload.yaml": ("DEEPSPEED", 8),
        "fsdp2.yaml": ("FSDP", 8),
        "cpu_ddp.yaml": ("MULTI_GPU", 2),
        "cpu_zero2.yaml": ("DEEPSPEED", 2),
        "cpu_zero3.yaml": ("DEEPSPEED", 2),
    }[path.name]
    assert (str(config.distributed_type).split(".")[-1], config.num_processes) == expected
    raw = yaml.safe_load(path.read_text())
    if path.name.startswith("cpu_"):
        assert raw["mixed_precision"] == "no"  # fp32 only on CPU
    else:
        assert raw["mixed_precision"] == "bf16"
    stage = {"zero2.yaml": 2, "cpu_zero2.yaml": 2, "zero3.yaml": 3, "cpu_zero3.yaml": 3, "zero3_offload.yaml": 3}
    if path.name in stage:
        assert raw["deepspeed_config"]["zero_stage"] == stage[path.name]
    if "zero3" in path.name:
        assert raw["deepspeed_config"]["zero3_save_16bit_model"] is True  # save gathers the shards
    if path.name == "zero3_offload.yaml":
        assert (
            raw["deepspeed_config"]["offload_param_device"]
            == "cpu"
            == raw["deepspeed_config"]["offload_optimizer_device"]
        )
    if path.name == "fsdp2.yaml":
        assert raw["fsdp_config"]["fsdp_version"] == 2


@pytest.mark.parametrize("path", MODEL_RECIPES, ids=lambda p: f"{p.parents[1].name}/{p.name}")
def test_model_recipes_parse_state_hardware_launch_and_published_defaults(path):
    text = header(path)
    rel = path.relative_to(REPO)
    assert "Hardware:" in text
    launches = re.findall(r"accelerate launch --config_file (recipes/accelerate_configs/\S+)", text)
    assert launches and all((REPO / c).is_file() for c in launches)
    assert f"recipes/srpo.py --config {rel}" in text  # the exact command for this very file
    assert "published recipe" in text

    script, args, model = train_mod.parse_args(["--config", str(path), "--use_cpu", "true", "--bf16", "false"])
    raw = yaml.safe_load(path.read_text())
    assert raw["bf16"] is True  # on GPU; the CPU parse above overrides it
    assert args.lr_scheduler_type.value == "cosine" and args.num_train_epochs == 3 and args.srpo_lambda == 0.3
    assert args.align_loss == "odds_ratio" and args.step_separator == "\n"
    assert model.model_name_or_path == raw["model_name_or_path"] and script.train_file
    if model.use_peft:
        assert (model.lora_r, model.lora_alpha) == (8, 16) and args.learning_rate == 5e-5
    else:
        assert "repository choice" in text  # full fine-tuning's learning rate is not the published one
    if "-vl-" in str(path) or "llava" in str(path):
        assert args.max_length is None  # never cut image tokens


def test_command_line_overrides_any_recipe_field():
    script, args, model = train_mod.parse_args(
        [
            "--config",
            str(TEXT_LORA),
            "--use_cpu",
            "true",
            "--bf16",
            "false",
            "--learning_rate",
            "1e-3",
            "--srpo_lambda",
            "0.7",
            "--lora_r",
            "4",
            "--train_file",
            "x.jsonl",
            "--num_train_epochs",
            "1",
        ]
    )
    assert (args.learning_rate, args.srpo_lambda, model.lora_r, script.train_file, args.num_train_epochs) == (
        1e-3,
        0.7,
        4,
        "x.jsonl",
        1,
    )
    assert model.lora_alpha == 16 and args.lr_scheduler_type.value == "cosine"  # the rest stays from the file
    with pytest.raises(ValueError, match="no_such_field"):  # a field that exists nowhere is refused, not ignored
        train_mod.parse_args(
            ["--config", str(TEXT_LORA), "--use_cpu", "true", "--bf16", "false", "--no_such_field", "1"]
        )


def _adapted_modules(model, model_args):
    from peft import get_peft_model
    from trl import get_peft_config

    peft_model = get_peft_model(model, get_peft_config(model_args))
    return sorted({n.split(".lora_A")[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n})


@pytest.mark.parametrize(
    "recipe,build", [(VL_LORA, tiny_qwen2_5_vl), (LLAVA_LORA, tiny_llava_next)], ids=["qwen2.5-vl", "llava-next"]
)
def test_vlm_lora_targets_only_the_language_models_attention(recipe, build):
    """The real module names: the vision towers (Qwen's attn.qkv / mlp, CLIP's q_proj / k_proj /
    v_proj) must stay frozen; every language-model attention projection gets an adapter."""
    _, _, model_args = train_mod.parse_args(["--config", str(recipe), "--use_cpu", "true", "--bf16", "false"])
    model, _ = build(seed=0)
    expected = sorted(
        n
        for n, m in model.named_modules()
        if "language_model" in n and n.rsplit(".", 1)[-1] in {"q_proj", "k_proj", "v_proj", "o_proj"}
    )
    adapted = _adapted_modules(model, model_args)
    assert expected and [a.replace("base_model.model.", "") for a in adapted] == expected
    assert not any("vision" in a or "visual" in a for a in adapted)


# ---- training through the recipe ---------------------------------------------------------------


def test_text_lora_recipe_trains_and_saves_an_adapter_that_loads_back(tmp_path, text_model_dir, pairs_file, tok):
    out = tmp_path / "out"
    rc = run_train(
        "--config",
        TEXT_LORA,
        *flags(),
        "--model_name_or_path",
        text_model_dir,
        "--train_file",
        pairs_file,
        "--output_dir",
        out,
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "2",
        "--learning_rate",
        "5e-2",
        "--lora_dropout",
        "0",
        "--max_length",
        "512",
    )
    assert rc == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 16)
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert Path(config["base_model_name_or_path"]) == Path(text_model_dir)
    assert not (out / "model.safetensors").exists()  # an adapter, not a full copy
    assert (out / "tokenizer.json").is_file()
    card = (out / "README.md").read_text()
    assert "SRPO" in card and "2509.12060" in card

    model, processing = load_model_and_processor(out)  # adapter folder -> base model + adapter
    trained_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert trained_b and all(p.abs().sum() > 0 for p in trained_b)  # lora_B starts at zero: it trained
    assert processing.get_vocab() == tok.get_vocab()


def test_full_training_saves_weights_that_differ_from_the_base_and_reload_exactly(
    tmp_path, text_model_dir, pairs_file
):
    out = tmp_path / "full"
    rc = run_train(
        "--config",
        TEXT_LORA,
        *flags(),
        "--use_peft",
        "false",
        "--model_name_or_path",
        text_model_dir,
        "--train_file",
        pairs_file,
        "--output_dir",
        out,
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "3",
        "--learning_rate",
        "1e-2",
        "--max_length",
        "512",
    )
    assert rc == 0 and (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    base, _ = load_model_and_processor(text_model_dir)
    trained, tokenizer = load_model_and_processor(out)
    assert type(trained).__name__ == "Qwen2ForCausalLM"
    base_params = dict(base.named_parameters())
    assert all(not torch.equal(p, base_params[n]) for n, p in trained.named_parameters())


def test_vlm_recipe_picks_the_image_text_class_and_trains_on_image_rows(tmp_path):
    model, processor = tiny_qwen2_5_vl(seed=1)
    model_dir = tmp_path / "tiny-qwen2.5-vl"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    (tmp_path / "img").mkdir()
    rows = []
    for i, (q, good, bad) in enumerate(
        [
            ("What should I do with this?", "Store it safely.", "Mix it with acid."),
            ("Is this safe?", "Yes, it is safe.", "Eat it."),
        ]
    ):
        make_image(i).save(tmp_path / "img" / f"{i}.png")
        rows.append(
            {
                "prompt": [{"role": "user", "content": q}],
                "images": [f"img/{i}.png"],
                "prefix": ["The image shows a bottle."],
                "chosen": good,
                "rejected": bad,
            }
        )
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    rc = run_train(
        "--config",
        VL_LORA,
        *flags(),
        "--model_name_or_path",
        model_dir,
        "--train_file",
        data,
        "--output_dir",
        out,
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "1",
        "--learning_rate",
        "5e-2",
        "--lora_dropout",
        "0",
    )
    assert rc == 0
    loaded, processing = load_model_and_processor(out)
    assert type(loaded.get_base_model()).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert hasattr(processing, "image_processor")  # the processor was saved beside the adapter
    lora = [n for n, _ in loaded.named_parameters() if "lora_B" in n]
    assert lora and all("language_model" in n for n in lora)


# ---- failing before any work -------------------------------------------------------------------


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if the model would be loaded (the "work" that must not start)."""

    def refuse(*a, **k):
        raise AssertionError("the model was loaded although the recipe is broken")

    monkeypatch.setattr(train_mod, "load_model", refuse)


def test_shipped_recipe_without_the_model_fails_naming_it_before_any_work(tmp_path, pairs_file):
    """recipes/srpo.py as a user runs it: offline, the 7B model is not in the cache."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [
            sys.executable,
            str(RECIPES / "srpo.py"),
            "--config",
            str(VL_LORA),
            "--use_cpu",
            "true",
            "--bf16",
            "false",
            "--train_file",
            str(pairs_file),
            "--output_dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "'Qwen/Qwen2.5-VL-7B-Instruct'" in proc.stderr and "not found" in proc.stderr
    assert str(tmp_path / "hf") in proc.stderr  # where it looked: the cache
    assert "HF_HUB_OFFLINE" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_missing_local_model_folder_is_named(tmp_path, pairs_file, no_model_loading, capsys):
    missing = tmp_path / "models" / "nope"
    assert (
        run_train(
            "--config",
            TEXT_LORA,
            *flags(),
            "--model_name_or_path",
            missing,
            "--train_file",
            pairs_file,
            "--output_dir",
            tmp_path / "o",
        )
        == 2
    )
    err = capsys.readouterr().err
    assert str(missing / "config.json") in err and "no such folder" in err
    (tmp_path / "empty").mkdir()
    assert (
        run_train(
            "--config",
            TEXT_LORA,
            *flags(),
            "--model_name_or_path",
            tmp_path / "empty",
            "--train_file",
            pairs_file,
            "--output_dir",
            tmp_path / "o",
        )
        == 2
    )
    assert str(tmp_path / "empty" / "config.json") in capsys.readouterr().err


def test_missing_data_is_named_before_the_model_is_loaded(tmp_path, text_model_dir, no_model_loading, capsys):
    common = ["--config", TEXT_LORA, *flags(), "--model_name_or_path", text_model_dir, "--output_dir", tmp_path / "o"]
    assert run_train(*common, "--train_file", tmp_path / "absent.jsonl") == 2
    assert f"train_file '{tmp_path / 'absent.jsonl'}': no such file" in capsys.readouterr().err

    assert run_train(*common, "--train_file", "", "--dataset_name", tmp_path / "no-dir/") == 2
    assert "dataset_name" in (err := capsys.readouterr().err) and str(tmp_path / "no-dir") in err

    assert run_train(*common, "--train_file", "", "--dataset_name", "someone/no-such-dataset") == 2
    err = capsys.readouterr().err
    assert "'someone/no-such-dataset' was not found" in err and "Hub dataset" in err

    rows = tmp_path / "with_images.jsonl"
    rows.write_text(
        json.dumps({"prompt": "What is it?", "images": ["img/gone.png"], "chosen": "a", "rejected": "b"}) + "\n"
    )
    assert run_train(*common, "--train_file", rows) == 2
    assert str(tmp_path / "img" / "gone.png") in capsys.readouterr().err

    assert run_train(*common, "--train_file", "") == 2
    assert "No training data" in capsys.readouterr().err


def test_dataset_name_loads_a_local_folder_and_its_test_split(tmp_path, text_model_dir):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "pairs_ds"
    DatasetDict({"train": Dataset.from_list(ROWS * 2), "test": Dataset.from_list(ROWS[:2])}).save_to_disk(folder)
    script, args, _ = train_mod.parse_args(
        ["--config", str(TEXT_LORA), *flags(train_file="", dataset_name=folder, eval_strategy="steps")]
    )
    train, eval_ = train_mod.load_datasets(script, args)
    assert len(train) == 6 and len(eval_) == 2 and eval_[1]["chosen"] == ROWS[1]["chosen"]


def test_rows_all_too_long_fail_instead_of_training_zero_steps(tmp_path, text_model_dir, pairs_file, capsys):
    rc = run_train(
        "--config",
        TEXT_LORA,
        *flags(),
        "--model_name_or_path",
        text_model_dir,
        "--train_file",
        pairs_file,
        "--output_dir",
        tmp_path / "o",
        "--max_length",
        "4",
        "--max_steps",
        "1",
    )
    assert rc == 2 and "Every training row was dropped" in capsys.readouterr().err


def test_reporter_that_is_not_installed_fails_before_any_work(
    tmp_path, text_model_dir, pairs_file, monkeypatch, no_model_loading, capsys
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a))
    rc = run_train(
        "--config",
        TEXT_LORA,
        *flags(
            report_to="trackio", model_name_or_path=text_model_dir, train_file=pairs_file, output_dir=tmp_path / "o"
        ),
    )
    assert rc == 2 and "pip install trackio" in capsys.readouterr().err


def test_a_launch_whose_processes_did_not_join_one_group_is_refused(monkeypatch):
    """`--multi_gpu` on CPU without use_cpu starts 2 processes that each train alone, exit 0."""
    _, args, _ = train_mod.parse_args(["--config", str(TEXT_LORA), "--use_cpu", "true", "--bf16", "false"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(train_mod.RecipeError, match="started 2 processes .* formed a group of 1"):
        train_mod.check_world(args)


# ---- logging -------------------------------------------------------------------------------------


def test_wandb_offline_logs_a_table_of_sample_pairs_at_eval(tmp_path, text_model_dir, pairs_file, monkeypatch):
    import wandb  # noqa: F401  (part of the dev install: a missing wandb is a broken install, not a skip)

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "srpo-test")
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    script, args, model_args = train_mod.parse_args(
        [
            "--config",
            str(TEXT_LORA),
            *flags(
                report_to="wandb",
                model_name_or_path=text_model_dir,
                train_file=pairs_file,
                eval_file=eval_file,
                output_dir=tmp_path / "o",
                max_steps=2,
                eval_strategy="steps",
                eval_steps=2,
                per_device_train_batch_size=2,
                per_device_eval_batch_size=3,
                learning_rate=1e-2,
                max_length=512,
                num_logged_pairs=3,
            ),
        ]
    )
    trainer = train_mod.build_trainer(script, args, model_args)
    train_mod.train_and_save(trainer, script, args)
    train_mod.finish(trainer)

    evals = [h for h in trainer.state.log_history if "eval_logps/chosen" in h]
    assert len(evals) == 1
    tables = list(tmp_path.glob("wandb/offline-run-*/files/media/table/eval/sample_pairs_*.table.json"))
    assert len(tables) == 1, list(tmp_path.rglob("*"))
    table = json.loads(tables[0].read_text())
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert [r["chosen"] for r in rows] == [r["chosen"] for r in ROWS]
    assert [r["rejected"] for r in rows] == [r["rejected"] for r in ROWS]
    assert rows[0]["prefix"] == "\n".join(ROWS[0]["prefix"]) and rows[0]["prompt"] == ROWS[0]["prompt"]
    assert all(r["step"] == 2 for r in rows)
    # The table's log-probs are the ones the evaluation measured (independent forwards, same model).
    # logps/* are DPO's summed log-probs; mean_logps/* SRPO's mean token log-probs (issue 16).
    mean_chosen = sum(r["logp_chosen"] for r in rows) / 3
    mean_rejected = sum(r["logp_rejected"] for r in rows) / 3
    assert mean_chosen == pytest.approx(evals[0]["eval_mean_logps/chosen"], abs=1e-4)
    assert mean_rejected == pytest.approx(evals[0]["eval_mean_logps/rejected"], abs=1e-4)
    assert sum(r["sum_logp_chosen"] for r in rows) / 3 == pytest.approx(evals[0]["eval_logps/chosen"], abs=1e-3)
    assert sum(r["sum_logp_rejected"] for r in rows) / 3 == pytest.approx(evals[0]["eval_logps/rejected"], abs=1e-3)
    assert all(r["margin"] == pytest.approx(r["logp_chosen"] - r["logp_rejected"]) for r in rows)
    # The run's own record (written offline, nothing sent) holds the SRPO metrics and the table.
    run_dir = tables[0].parents[4]
    (record,) = run_dir.glob("run-*.wandb")
    keys = (b"train/loss/reference", b"train/loss/align", b"eval/logps/chosen", b"eval/sample_pairs")
    # wandb's service process writes this file; under load it may still be flushing after finish() returns.
    deadline = time.monotonic() + 60
    while not all(k in record.read_bytes() for k in keys) and time.monotonic() < deadline:
        time.sleep(0.5)
    data = record.read_bytes()
    for key in keys:
        assert key in data, key


def test_json_list_exploration_output_and_held_out_eval_split(tmp_path):
    rows = tmp_path / "pairs.json"
    rows.write_text(json.dumps(ROWS * 2))
    explored = tmp_path / "explored.jsonl"
    record = {
        "id": "q1",
        "prompt": "Is this safe?",
        "reference": ["It is a plant.", "Answer: yes."],
        "points": [
            {
                "branch_point": 1,
                "prefix": ["It is a plant."],
                "continuations": [
                    {"text": "Yes.", "verified": True},
                    {"text": "Eat it.", "verified": False},
                    {"text": "Burn it.", "verified": False},
                ],
            }
        ],
    }
    explored.write_text(json.dumps(record) + "\n")

    script, args, _ = train_mod.parse_args(
        ["--config", str(TEXT_LORA), *flags(train_file=rows, eval_split_size=2, eval_strategy="steps")]
    )
    train, eval_ = train_mod.load_datasets(script, args)
    assert (len(train), len(eval_)) == (4, 2)  # 2 of the 6 rows held out, seeded
    assert sorted(r["chosen"] for r in list(train) + list(eval_)) == sorted(r["chosen"] for r in ROWS * 2)

    script, args, _ = train_mod.parse_args(
        ["--config", str(TEXT_LORA), *flags(train_file=explored, data_format="exploration")]
    )
    train, eval_ = train_mod.load_datasets(script, args)
    assert eval_ is None
    assert sorted((r["prefix"][0], r["chosen"], r["rejected"], r["branch_point"]) for r in train) == [
        ("It is a plant.", "Yes.", "Burn it.", 1),
        ("It is a plant.", "Yes.", "Eat it.", 1),
    ]


def test_qlora_recipe_builds_a_4bit_config_and_refuses_without_lora(tmp_path, text_model_dir):
    from trl import get_quantization_config

    qlora = RECIPES / "qwen2.5-7b-instruct" / "srpo" / "config_qlora.yaml"
    _, args, model_args = train_mod.parse_args(["--config", str(qlora), *flags()])
    quant = get_quantization_config(model_args)
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert model_args.use_peft and train_mod.kbit_device_map() == {"": 0}  # the whole model on this process's device
    _, args, model_args = train_mod.parse_args(["--config", str(qlora), *flags(use_peft="false")])
    with pytest.raises(train_mod.RecipeError, match="QLoRA.*trains adapters only"):
        train_mod.load_model(str(text_model_dir), True, model_args, args)
