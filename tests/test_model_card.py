"""The model card a run writes: metadata that huggingface_hub accepts, a dataset link only for a Hub
dataset (never for local files), and the SRPO paper cited with its authors and DOI."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import ROWS, srpo_args
from huggingface_hub import ModelCard
from huggingface_hub.utils import validate_repo_id

from srpo_trl import SRPOTrainer, StepPairDataset
from srpo_trl.cli import main as cli_main
from srpo_trl.recipe_runner import hub_dataset_id
from srpo_trl.tiny import build_tokenizer, tiny_causal_lm


def _ids(value) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def check_card(path: Path) -> ModelCard:
    """huggingface_hub's own checks: the card's YAML parses into ModelCardData without ignoring
    metadata errors, and every repository it names (base model, datasets, dataset links in the text)
    is a valid Hub repo id (`validate_repo_id`, what the Hub client checks before any request)."""
    card = ModelCard.load(path, ignore_metadata_errors=False)
    for repo_id in _ids(card.data.base_model) + _ids(card.data.datasets):
        validate_repo_id(repo_id)
    for linked in re.findall(r"huggingface\.co/datasets/([^)\s]+)\)", card.text):
        validate_repo_id(linked)
    return card


def test_a_run_on_local_files_writes_a_valid_card_without_a_dataset_link(tmp_path):
    tok = build_tokenizer()
    model_dir, out = tmp_path / "tiny-model", tmp_path / "out"
    tiny_causal_lm(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    settings = dict(
        model_name_or_path=model_dir,
        train_file=pairs,
        output_dir=out,
        max_steps=1,
        per_device_train_batch_size=3,
        use_cpu="true",
        bf16="false",
        dtype="float32",
        activation_checkpointing="false",
        report_to="none",
        save_strategy="no",
        disable_tqdm="true",
        dataloader_num_workers=0,
        max_length=512,
    )
    assert cli_main(["train", *[x for k, v in settings.items() for x in (f"--{k}", str(v))]]) == 0
    card = check_card(out / "README.md")
    assert card.data.datasets is None
    assert "huggingface.co/datasets" not in card.text and str(pairs) not in card.text
    assert card.data.base_model is None  # a local folder has no Hub page either
    assert {"srpo", "trl"} <= set(card.data.tags)


def test_a_hub_dataset_is_linked(tmp_path):
    tok = build_tokenizer()
    trainer = SRPOTrainer(
        model=tiny_causal_lm(tok),
        args=srpo_args(tmp_path),
        train_dataset=StepPairDataset.from_list(ROWS),
        processing_class=tok,
    )
    name = hub_dataset_id(SimpleNamespace(dataset_name="org/step-pairs", train_file=None))
    trainer.create_model_card(model_name="m", dataset_name=name)
    card = check_card(tmp_path / "README.md")
    assert card.data.datasets == "org/step-pairs"
    assert "(https://huggingface.co/datasets/org/step-pairs)" in card.text
    # The paper, with its authors and DOI (the same BibTeX as README.md and CITATION.cff).
    assert "Cai, Wei and Liu, Shujuan" in card.text and "10.48550/arXiv.2509.12060" in card.text


@pytest.mark.parametrize(
    "dataset_name, train_file, expected",
    [
        ("org/step-pairs", None, "org/step-pairs"),
        ("squad", None, "squad"),  # a canonical dataset has no namespace
        ("org/step-pairs", "pairs.jsonl", None),  # train_file takes precedence: the data was the file
        ("./pairs", None, None),
        ("data/train/pairs.jsonl", None, None),
        (None, "pairs.jsonl", None),
        ("bad name!", None, None),
    ],
)
def test_hub_dataset_id(dataset_name, train_file, expected):
    assert hub_dataset_id(SimpleNamespace(dataset_name=dataset_name, train_file=train_file)) == expected


def test_an_existing_local_folder_is_not_a_hub_dataset(tmp_path, monkeypatch):
    (tmp_path / "org" / "pairs").mkdir(parents=True)  # looks like a repo id but is a folder here
    monkeypatch.chdir(tmp_path)
    assert hub_dataset_id(SimpleNamespace(dataset_name="org/pairs", train_file=None)) is None
