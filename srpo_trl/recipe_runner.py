"""`srpo-trl train` and `recipes/srpo.py`: train SRPO from a recipe YAML, the TRL way.

    accelerate launch --config_file recipes/accelerate_configs/zero3.yaml \\
        recipes/srpo.py --config recipes/qwen2.5-vl-7b-instruct/srpo/config_lora.yaml
    srpo-trl train --config recipes/qwen2.5-7b-instruct/srpo/config_lora.yaml --learning_rate 1e-5

Arguments are TRL's: `TrlParser` over (script arguments, `SRPOConfig`, `ModelConfig`); `--config
file.yaml` sets any field and the command line overrides it (an `env:` mapping in the YAML sets
environment variables). LoRA / QLoRA come from `ModelConfig` (`use_peft`, `lora_*`,
`load_in_4bit`) through `get_peft_config` / `get_quantization_config`.

Before any model weight is read, everything the run needs is checked: the model (a local folder
with config.json, or a Hub id present in the cache / downloadable), the data files and the images
they name, the `report_to` integrations, and that a multi-process launch really formed one
process group. Each failure says what was looked for and where. Then: step pairs are loaded
(`train_file` / `eval_file` JSON-lines or JSON via `StepPairDataset`, or `dataset_name`, a Hub
dataset or a local folder, via `datasets`), the model is loaded with the auto class its config
calls for (`AutoModelForImageTextToText` for a vision-language model, else `AutoModelForCausalLM`),
`SRPOTrainer` trains it, and the adapter or the full model is saved with the processor, a model
card and `trainer_state.json`. A launch of several processes prints which processes joined on which
node, and an FSDP launch that accelerate set up as something else (on CPU it trains plain DDP) stops.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path


logger = logging.getLogger(__name__)

DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
# report_to name -> (module to import, what to install)
REPORTERS = {
    "wandb": ("wandb", "pip install 'srpo-trl[wandb]' (or pip install wandb)"),
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install tensorboard"),
    "trackio": ("trackio", "pip install trackio"),
}


class RecipeError(ValueError):
    """Something a recipe points at is not there or cannot work; raised before any training work."""


try:  # the dataclass extends TRL's ScriptArguments (dataset_name, splits, ...)
    from trl import ScriptArguments as _TrlScriptArguments
except ImportError:  # pragma: no cover
    _TrlScriptArguments = object


@dataclass
class SRPOScriptArguments(_TrlScriptArguments):
    """Script arguments: TRL's `ScriptArguments` (`dataset_name`, `dataset_config`,
    `dataset_train_split`, `dataset_test_split`, `dataset_streaming`) plus local step-pair files."""

    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Local step pairs for training: a JSON-lines (.jsonl) or JSON (.json, a list of rows) file. "
            "Relative image paths are resolved against the file's folder. Takes precedence over dataset_name."
        },
    )
    eval_file: str | None = field(
        default=None, metadata={"help": "Local step pairs for evaluation (same formats as train_file)."}
    )
    data_format: str = field(
        default="pairs",
        metadata={
            "help": "'pairs': rows are step pairs (or plain DPO rows). 'exploration': the output of "
            "`srpo-trl explore`, expanded into every (favorable, unfavorable) pair per branch point.",
            "choices": ["pairs", "exploration"],
        },
    )
    max_pairs_per_point: int | None = field(
        default=None, metadata={"help": "data_format=exploration: keep at most this many pairs per branch point."}
    )
    eval_split_size: float | None = field(
        default=None,
        metadata={
            "help": "Hold out this fraction (or number, if >= 1) of the training rows for evaluation when no "
            "eval_file / test split is given."
        },
    )
    num_logged_pairs: int = field(
        default=8,
        metadata={
            "help": "With report_to wandb: how many evaluation pairs go into the sample-pair table logged at each "
            "evaluation (prompt, prefix, chosen, rejected and their log-probs). 0 turns the table off."
        },
    )

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()


def make_parser():
    from trl import ModelConfig, TrlParser

    from .config import SRPOConfig

    return TrlParser((SRPOScriptArguments, SRPOConfig, ModelConfig), prog="srpo-trl train")


def parse_args(argv=None):
    """(script_args, training_args, model_args) from `--config file.yaml` and command-line overrides.

    On a machine without bf16 (no GPU with bf16 support, or `use_cpu`), a recipe's `bf16: true` and
    bf16 / fp16 `dtype` (written for GPUs) become fp32, with one warning; `--bf16 true` given on the
    command line there is refused (RecipeError), unless `--use_cpu true` asks for bf16 autocast on the CPU.
    """
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    return make_parser().parse_args_and_config(args=argv + _precision_overrides(argv))


_HALF_DTYPES = ("bfloat16", "float16", "bf16", "fp16", "half")


def _flag(argv: list[str], name: str):
    """The value of `--name` on the command line (`--name v`, `--name=v`, or a bare `--name`: "true"), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == f"--{name}":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            value = nxt if nxt is not None and not nxt.startswith("--") else "true"
        elif arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
    return value


def _truthy(value) -> bool:
    from transformers.utils import strtobool

    return value is True or (isinstance(value, str) and bool(strtobool(value)))


def _precision_overrides(argv: list[str]) -> list[str]:
    """Command-line overrides that put a GPU recipe's precision into fp32 on a machine without bf16."""
    from .config import bf16_supported

    recipe = {}
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        import yaml

        path = Path(argv[argv.index("--config") + 1])
        if path.is_file():
            loaded = yaml.safe_load(path.read_text())
            recipe = loaded if isinstance(loaded, dict) else {}
    use_cpu = _flag(argv, "use_cpu")
    use_cpu = _truthy(use_cpu if use_cpu is not None else recipe.get("use_cpu", False))
    if bf16_supported(use_cpu):
        return []
    cli_bf16, cli_dtype = _flag(argv, "bf16"), _flag(argv, "dtype")
    if cli_bf16 is not None and _truthy(cli_bf16) and not use_cpu:
        raise RecipeError(
            "--bf16 true, but this machine has no GPU with bf16 support. Leave --bf16 out (training then uses "
            "fp32 here and bf16 on a GPU that supports it), or add --use_cpu true for bf16 autocast on the CPU."
        )
    overrides, switched = [], []
    if cli_bf16 is None and _truthy(recipe.get("bf16", False)):
        overrides += ["--bf16", "false"]
        switched.append("bf16: true")
    if cli_dtype is None and str(recipe.get("dtype", "")).lower() in _HALF_DTYPES:
        overrides += ["--dtype", "float32"]
        switched.append(f"dtype: {recipe['dtype']}")
    if switched and int(os.environ.get("RANK", "0")) == 0:
        where = "use_cpu is set" if use_cpu else "this machine has no GPU with bf16 support"
        logger.warning(
            "srpo-trl train: the recipe's %s are meant for GPUs and %s, so this run trains in fp32 (bf16 false, "
            "dtype float32). Pass --bf16 false --dtype float32 to say so, or --use_cpu true --bf16 true for bf16 "
            "autocast on the CPU.",
            " and ".join(switched),
            where,
        )
    return overrides


# ---- checks that run before any work ---------------------------------------------------------------


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith("/") or name.count("/") > 1


def check_reporters(report_to) -> None:
    """Each `report_to` integration must be importable, else fail now (not after loading a 7B model)."""
    import importlib.util

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name in REPORTERS:
            modules, how = REPORTERS[name]
            modules = (modules,) if isinstance(modules, str) else modules
            if not any(importlib.util.find_spec(m) is not None for m in modules):
                raise RecipeError(
                    f"report_to includes {name!r} but {' / '.join(modules)} is not installed ({how}); "
                    "or drop it from report_to."
                )


def check_world(training_args) -> None:
    """A launcher that started N processes must give a process group of N; otherwise every process
    would silently train alone (e.g. `--multi_gpu` on CPU without `use_cpu`)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    formed = training_args.world_size
    if launched > 1 and formed != launched:
        raise RecipeError(
            f"The launcher started {launched} processes (WORLD_SIZE={launched}) but they formed a group of {formed}: "
            "each process would train alone on the whole dataset. On CPU, pass --use_cpu true for DDP, or "
            "--ddp_backend gloo with a DeepSpeed config (see recipes/accelerate_configs/cpu_*.yaml)."
        )


def check_fsdp(accelerator) -> None:
    """An FSDP launch must give an FSDP run. accelerate applies its FSDP plugin only to GPU-type process
    groups (MULTI_GPU and the like): on CPU (MULTI_CPU) it silently trains plain DDP instead."""
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    if accelerator.distributed_type != DistributedType.FSDP:
        raise RecipeError(
            f"The launch config asks for FSDP but accelerate set up {accelerator.distributed_type} "
            f"(device {accelerator.device}): accelerate applies FSDP only to GPU process groups, so this would train "
            "as plain data parallelism with a full model copy per process. Launch FSDP on GPUs, or use a DDP / "
            "DeepSpeed config on this machine (see recipes/accelerate_configs/cpu_*.yaml)."
        )


def describe_world() -> str | None:
    """Which processes joined, by node: "4 processes on 2 nodes: node 0 (host-a) ranks 0-1, node 1
    (host-b) ranks 2-3". Every rank must call it (it gathers); None for a single process."""
    import socket

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    # torchrun's node rank (GROUP_RANK) tells nodes apart even when they share a host name.
    me = (int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", 0))), socket.gethostname(), dist.get_rank())
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, me)
    nodes: dict[int, tuple[str, list[int]]] = {}
    for node, host, rank in everyone:
        nodes.setdefault(node, (host, []))[1].append(rank)
    parts = []
    for node, (host, ranks) in sorted(nodes.items()):
        ranks.sort()
        contiguous = ranks == list(range(ranks[0], ranks[-1] + 1))
        listed = f"{ranks[0]}-{ranks[-1]}" if contiguous and len(ranks) > 1 else ",".join(map(str, ranks))
        parts.append(f"node {node} ({host}) rank{'s' if len(ranks) > 1 else ''} {listed}")
    return f"{len(everyone)} processes on {len(nodes)} node{'s' if len(nodes) > 1 else ''}: " + ", ".join(parts)


def resolve_model(name_or_path: str | None, revision: str = "main") -> tuple[str, bool]:
    """`(source, is_local)` for `model_name_or_path`, or a RecipeError that names what was looked for.

    A local folder must hold config.json. Anything else is a Hub id, whose config.json must be in
    the local cache (offline) or downloadable (online); only that small file is fetched here.
    """
    if not name_or_path:
        raise RecipeError("No model: set model_name_or_path in the recipe or pass --model_name_or_path.")
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise RecipeError(
                f"model_name_or_path {name_or_path!r}: looked for {path.resolve() / 'config.json'} and found none; "
                "expected a folder written by save_pretrained."
            )
        return str(path), True
    if _looks_like_path(name_or_path):
        raise RecipeError(
            f"model_name_or_path {name_or_path!r}: no such folder (looked for {path.resolve() / 'config.json'})."
        )
    from huggingface_hub import constants, hf_hub_download

    try:
        hf_hub_download(name_or_path, "config.json", revision=revision, local_files_only=_offline())
    except Exception as e:  # noqa: BLE001 - every failure becomes one message naming the lookups
        where = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
        how = "downloads are off (HF_HUB_OFFLINE=1)" if _offline() else f"the Hub answered: {type(e).__name__}: {e}"
        raise RecipeError(
            f"model_name_or_path {name_or_path!r} (revision {revision!r}) was not found: it is not a local folder "
            f"(looked for {path.resolve()}) and its config.json is not in {where}; {how}. Point the recipe at a folder "
            "written by save_pretrained, or download the model first."
        ) from e
    return name_or_path, False


def _check_file(kind: str, name: str) -> Path:
    path = Path(name).expanduser()
    if not path.is_file():
        raise RecipeError(f"{kind} {name!r}: no such file (looked for {path.resolve()}).")
    return path


def _load_file(path: Path, data_format: str, max_pairs_per_point):
    from .dataset import StepPairDataset

    if data_format == "exploration":
        return StepPairDataset.from_exploration(str(path), max_pairs_per_point=max_pairs_per_point)
    if path.suffix == ".json":
        from .dataset import check_utf8

        check_utf8(path)
        rows = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(rows, dict) and isinstance(rows.get("rows"), list):
            rows = rows["rows"]
        if not isinstance(rows, list):
            raise RecipeError(f"{path}: a .json data file must hold a list of rows (or {{'rows': [...]}}).")
        from .dataset import _resolve_images

        rows = [_resolve_images(dict(r), path.parent) if isinstance(r, dict) else r for r in rows]
        return StepPairDataset.from_list(rows, source=str(path))
    return StepPairDataset.from_jsonl(path)


def _load_named_dataset(script_args):
    """`dataset_name` as a local folder / file or a Hub dataset -> a DatasetDict (or a dict of splits)."""
    import datasets

    name = script_args.dataset_name
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(path))  # written by save_to_disk
            return loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        if path.is_file():
            builder = DATA_SUFFIXES.get(path.suffix)
            if builder is None:
                raise RecipeError(
                    f"dataset_name {name!r}: unknown file type {path.suffix!r} ({', '.join(DATA_SUFFIXES)})."
                )
            from .dataset import StepPairDataset, check_utf8

            if builder in ("json", "csv"):
                check_utf8(path)  # a bare codec error names no line
            try:
                return datasets.load_dataset(
                    builder, data_files={"train": str(path)}, streaming=script_args.dataset_streaming
                )
            except Exception:
                if path.suffix == ".jsonl":  # e.g. mixed column types: our reader names the row and field
                    StepPairDataset.from_jsonl(path)
                raise
        return datasets.load_dataset(
            str(path), name=script_args.dataset_config, streaming=script_args.dataset_streaming
        )
    if _looks_like_path(name):
        raise RecipeError(f"dataset_name {name!r}: no such file or folder (looked for {path.resolve()}).")
    try:
        return datasets.load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)
    except Exception as e:  # noqa: BLE001
        how = "downloads are off (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE)" if _offline() else f"{type(e).__name__}: {e}"
        raise RecipeError(
            f"dataset_name {name!r} was not found: it is not a local file or folder (looked for {path.resolve()}) and "
            f"could not be loaded as a Hub dataset ({how})."
        ) from e


def _check_images(dataset, what: str, limit: int | None = None) -> None:
    """Image paths named by the rows must exist (checked now rather than at the first batch that uses them)."""
    if not hasattr(dataset, "column_names") or "images" not in (dataset.column_names or []):
        return
    for i, images in enumerate(dataset["images"] if limit is None else dataset.select(range(limit))["images"]):
        for image in images or []:
            if isinstance(image, str) and not Path(image).is_file():
                raise RecipeError(f"{what} row {i}: image {image!r} not found (looked for {Path(image).resolve()}).")


def load_datasets(script_args, training_args):
    """(train_dataset, eval_dataset) from the script arguments; eval is None when not evaluating."""
    evaluating = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) != "no"
    fmt, cap = script_args.data_format, script_args.max_pairs_per_point
    train = eval_ = None
    if script_args.train_file:
        train = _load_file(_check_file("train_file", script_args.train_file), fmt, cap)
        if script_args.eval_file:
            eval_ = _load_file(_check_file("eval_file", script_args.eval_file), fmt, cap)
    elif script_args.dataset_name:
        splits = _load_named_dataset(script_args)
        if script_args.dataset_train_split not in splits:
            raise RecipeError(
                f"dataset_name {script_args.dataset_name!r} has no split {script_args.dataset_train_split!r} "
                f"(it has {sorted(splits)}); set dataset_train_split."
            )
        train = splits[script_args.dataset_train_split]
        if script_args.eval_file:
            eval_ = _load_file(_check_file("eval_file", script_args.eval_file), fmt, cap)
        elif evaluating and script_args.dataset_test_split in splits:
            eval_ = splits[script_args.dataset_test_split]
    else:
        raise RecipeError("No training data: set train_file (JSON-lines step pairs) or dataset_name in the recipe.")
    if eval_ is None and evaluating and script_args.eval_split_size:
        size = script_args.eval_split_size
        split = train.train_test_split(test_size=int(size) if size >= 1 else size, seed=training_args.seed)
        train, eval_ = split["train"], split["test"]
    if evaluating and eval_ is None:
        raise RecipeError(
            f"eval_strategy={training_args.eval_strategy!s} but there is no evaluation data: set eval_file, a dataset with "
            f"a {script_args.dataset_test_split!r} split, or eval_split_size."
        )
    _check_images(getattr(train, "dataset", train), "train")
    if eval_ is not None:
        _check_images(getattr(eval_, "dataset", eval_), "eval")
    return train, (eval_ if evaluating else None)


def load_processing(source: str, is_local: bool, model_args, training_args):
    """The processor (vision-language model) or tokenizer (causal LM) of the model."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    from .loading import is_vision_language, load_processing_class

    if is_local:
        return load_processing_class(source)
    kwargs = dict(revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code)
    config = AutoConfig.from_pretrained(source, **kwargs)
    auto = AutoProcessor if is_vision_language(config) else AutoTokenizer
    return auto.from_pretrained(source, **kwargs)


def load_model(source: str, is_local: bool, model_args, training_args):
    """The model, with the auto class picked from its config: `AutoModelForImageTextToText` for a
    vision-language model, `AutoModelForCausalLM` otherwise. Called after the training arguments
    exist, so that under DeepSpeed ZeRO-3 the weights are loaded straight into shards."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from trl import get_quantization_config

    from .loading import _dtype, is_vision_language

    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None and not model_args.use_peft:
        raise RecipeError("load_in_4bit / load_in_8bit (QLoRA) trains adapters only: set use_peft: true.")
    kwargs = dict(revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code)
    if is_local:
        kwargs["local_files_only"] = True
    config = AutoConfig.from_pretrained(source, **kwargs)
    auto = AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM
    kwargs.update(dtype=_dtype(model_args.dtype), attn_implementation=model_args.attn_implementation)
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map=kbit_device_map())
    kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = None  # used here; DPOTrainer would warn that they are ignored
    logger.info("Loading %s with %s", source, auto.__name__)
    model = auto.from_pretrained(source, **{k: v for k, v in kwargs.items() if v is not None})
    if training_args.gradient_checkpointing:  # on the config: `use_cache=` is no init argument of VLM classes
        model.config.use_cache = model.config.get_text_config().use_cache = False
    return model


def kbit_device_map() -> dict:
    """QLoRA: put the whole quantized model on this process's device (what TRL's get_kbit_device_map did)."""
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


# ---- the run -----------------------------------------------------------------------------------------


def build_trainer(script_args, training_args, model_args, callbacks=None):
    """Check everything the recipe names, then load the data, processor and model and build the SRPOTrainer."""
    from trl import get_peft_config

    from .trainer import SRPOTrainer

    check_reporters(training_args.report_to)
    check_world(training_args)
    source, is_local = resolve_model(model_args.model_name_or_path, model_args.model_revision)
    train_dataset, eval_dataset = load_datasets(script_args, training_args)
    processing_class = load_processing(source, is_local, model_args, training_args)

    model = load_model(source, is_local, model_args, training_args)
    trainer = SRPOTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
        peft_config=get_peft_config(model_args),
        callbacks=list(callbacks or []),
    )
    check_fsdp(trainer.accelerator)
    world = describe_world()
    if world:  # how a user sees that every node joined
        trainer.accelerator.print(f"srpo-trl train: {world} ({trainer.accelerator.distributed_type})")
    if hasattr(trainer.train_dataset, "__len__") and len(trainer.train_dataset) == 0:
        raise RecipeError(
            f"Every training row was dropped: none fits max_length={training_args.max_length} "
            f"({len(trainer.dropped_rows.get('train', []))} dropped). Raise max_length (null keeps every row)."
        )
    report = (
        [training_args.report_to] if isinstance(training_args.report_to, str) else list(training_args.report_to or [])
    )
    if "wandb" in report and script_args.num_logged_pairs > 0 and eval_dataset is not None:
        from .wandb_samples import WandbSamplePairsCallback

        trainer.add_callback(WandbSamplePairsCallback(trainer, eval_dataset, num_pairs=script_args.num_logged_pairs))
    return trainer


def hub_dataset_id(script_args) -> str | None:
    """The Hub dataset a run trained on, for the model card (its `datasets` metadata and link), or None.

    Only a `dataset_name` that is a Hub id counts: a run on `train_file` (which takes precedence) or on
    a local file or folder has no Hub page, and a card naming one links to a page that does not exist
    and carries metadata the Hub refuses.
    """
    name = script_args.dataset_name
    if script_args.train_file or not name or _looks_like_path(name) or Path(name).expanduser().exists():
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def resume_target(value):
    """``resume_from_checkpoint`` as ``Trainer.train`` takes it. The command line and YAML give a
    string: ``true`` (any case) means the latest checkpoint in ``output_dir`` (``True``, as the Trainer
    reads it), ``false`` or empty means none; anything else is a checkpoint folder (``./true`` for a
    folder of that name)."""
    if isinstance(value, bool):
        return value or None
    if isinstance(value, str) and value.strip().lower() in ("true", "false", ""):
        return value.strip().lower() == "true" or None
    return value


def train_and_save(trainer, script_args, training_args):
    """Train (resuming if asked), save the adapter or full model with the processor and a model card."""
    trainer.train(resume_from_checkpoint=resume_target(training_args.resume_from_checkpoint))
    trainer.save_model(training_args.output_dir)  # adapter (PEFT) or full weights; gathers ZeRO-3 / FSDP shards
    trainer.save_state()  # trainer_state.json: the logged losses of every step (rank 0 writes it)
    dataset_name = hub_dataset_id(script_args)
    if trainer.accelerator.is_main_process:
        trainer.processing_class.save_pretrained(training_args.output_dir)
        trainer.create_model_card(model_name=Path(training_args.output_dir).name, dataset_name=dataset_name)
    trainer.accelerator.wait_for_everyone()
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
    trainer.accelerator.print(f"Saved to {training_args.output_dir}")
    return trainer


def finish(trainer) -> None:
    """End the run: close the trackers (a wandb run is finished, so its files are complete) and the
    process group. Call once, after everything that needs the other processes."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None and trainer.is_world_process_zero():
            wandb.finish()
    if hasattr(trainer, "end"):
        # Every rank arrives before any tears down: a rank that destroys its process group and exits while
        # another still talks to it can abort at exit ("terminate called without an active exception").
        trainer.accelerator.wait_for_everyone()
        trainer.end()


def main(argv=None) -> int:
    try:
        script_args, training_args, model_args = parse_args(argv)
    except (RecipeError, ValueError) as e:  # a bad recipe or flag: a message and exit 2, not a traceback
        print(f"srpo-trl train: {e}", file=sys.stderr)
        return 2
    try:
        trainer = build_trainer(script_args, training_args, model_args)
    except RecipeError as e:
        print(f"srpo-trl train: {e}", file=sys.stderr)
        return 2
    from .guards import TrainingStopped

    try:
        train_and_save(trainer, script_args, training_args)
    except TrainingStopped as e:  # divergence / resume mismatch: a clear message, no final save
        print(f"srpo-trl train: {e}", file=sys.stderr)
        finish(trainer)
        return 3
    finish(trainer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
