"""SRPOTrainer: the SRPO objective as a swap-in for TRL's DPOTrainer.

    L = nll_weight * L_ref + srpo_lambda * L_align        (nll_weight defaults to 1)

`L_ref` is the mean token NLL of the reference path (closed with EOS) given the prompt, averaged
over rows. `L_align` compares the favorable and unfavorable continuation from the same reasoning
prefix, on continuation tokens only: the odds ratio of their mean token log-probs (default, no
reference model), or Step-DPO's sigmoid loss on summed log-probs against a frozen reference.
`align_tokens` / `align_eos` select RPO's released conventions (docs/trainer.md compares them).

The constructor, PEFT handling, DeepSpeed / FSDP preparation of the reference model, reference
log-prob precomputation, logging and the model card are DPOTrainer's. What this class replaces:
dataset preparation (step-pair rows, validated and encoded segment by segment), the collator, the
loss, and the reference log-probs of the sigmoid mode. TRL's private surface used here is pinned
by the tested TRL range in pyproject.toml.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import textwrap
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoProcessor, ProcessorMixin
from trl import DPOConfig, DPOTrainer
from trl.models import prepare_deepspeed
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer import dpo_trainer as _dpo_module
from trl.trainer.utils import get_config_model_id, hash_module, use_adapter

from . import guards
from .architectures import BIDIRECTIONAL_IMAGE_TYPES, architecture_problem, attention_windows, packed_router_mask
from .attention import TREE_ATTENTION, choose_tree_attention, ensure_tree_attention, use_tree_attention
from .collator import NON_MODEL_KEYS, PACKED_KEYS, DataCollatorForStepPairs
from .config import SRPOConfig, default_ref_logps_cache_dir
from .dataset import StepPairDataset
from .packing import FLEX_BLOCK_SIZE, image_groups, packed_attention_mask
from .rows import (
    RowError,
    align_start,
    check_image_count,
    encode_prompt_text,
    encode_text_segments,
    normalize_row,
    render_row,
    tokenizer_of,
)
from .store import table_digest


logger = logging.getLogger(__name__)

MAX_BRANCH_BUCKET = 8  # metrics by branch point: k = 0..7 and "8+"


LOG_HALF = -0.6931471805599453


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Maechler, 2012).

    Both branches of `torch.where` are evaluated and differentiated, so each gets an input that is
    safe for it: fed x close to 0, the unused `log1p(-exp(x))` would be log1p(-1) = -inf (exp(x)
    rounds to 1 in float32 for |x| < 3e-8) and its gradient 0 * inf = NaN would poison the sum.
    Half-precision inputs are computed in float32 (the clamp's -1e-12 underflows in float16).
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    x = x.clamp(max=-1e-12)  # a mean log-prob of exactly 0 would make the odds infinite
    near_zero = x > LOG_HALF
    from_expm1 = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, LOG_HALF))))
    from_log1p = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, 2 * LOG_HALF), x)))
    return torch.where(near_zero, from_expm1, from_log1p)


def odds_ratio_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row -log sigmoid(log odds(y+) - log odds(y-)) on mean token log-probs, and the log odds ratio.

    Half-precision means are computed in float32 (a bf16 difference of two means loses ~1e-2)."""
    if chosen_mean.dtype in (torch.float16, torch.bfloat16):
        chosen_mean, rejected_mean = chosen_mean.float(), rejected_mean.float()
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    return -F.logsigmoid(log_odds), log_odds


@contextlib.contextmanager
def _without_reference_model(active: bool, policy_is_path: bool):
    """Keep DPOTrainer.__init__ from loading a reference model that the odds-ratio loss never uses.

    DPOTrainer builds one with `create_model_from_path` when none is given (and no PEFT); a model
    built from a config has no path to reload, and a 7B copy would waste memory. The policy itself,
    when given as a path, is the first call and loads normally.
    """
    if not active:
        yield
        return
    original = _dpo_module.create_model_from_path
    calls = 0

    def create(path, **kwargs):
        nonlocal calls
        calls += 1
        return original(path, **kwargs) if (policy_is_path and calls == 1) else None

    _dpo_module.create_model_from_path = create
    try:
        yield
    finally:
        _dpo_module.create_model_from_path = original


def _as_srpo_config(args: DPOConfig) -> SRPOConfig:
    if isinstance(args, SRPOConfig):
        return args
    logger.warning("SRPOTrainer got a %s; converting it to SRPOConfig with the SRPO defaults.", type(args).__name__)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    return SRPOConfig(**values)


def _attn_implementation(model) -> str | None:
    config = model.config
    text_config = config.get_text_config()
    return getattr(text_config, "_attn_implementation", None) or getattr(config, "_attn_implementation", None)


def prefix_sharing_problem(model, peft_config=None) -> str | None:
    """Why the packed tree forward cannot be used with this model, or None when it can.

    Architectures are an allow-list (see `srpo_trl.architectures`): hybrid models (Mamba, convolution,
    linear attention), chunked attention and model types not verified by `check_prefix_sharing` are
    scored unpacked."""
    attn = _attn_implementation(model)
    if attn not in (None, "sdpa", "eager", "flex_attention", TREE_ATTENTION):
        return f"attention implementation {attn!r} takes no tree mask; use 'sdpa', 'flex_attention' or 'eager'"
    peft_configs = [peft_config] if peft_config is not None else []
    if is_peft_model(model):
        peft_configs += list(model.peft_config.values())
    if any(getattr(c, "is_prompt_learning", False) for c in peft_configs):
        return "prompt-learning PEFT prepends virtual tokens"
    return architecture_problem(model.config)


def question_keys(dataset: Dataset) -> list:
    """Which question each row belongs to: its `id`, else its prompt (token ids or text) and images.

    Images are part of the question: the same request about two images is two questions. They are
    keyed by a digest of their stored (undecoded) bytes or paths.
    """
    if "id" in dataset.column_names:
        return list(dataset["id"])
    if "prompt_ids" in dataset.column_names:
        prompts = [tuple(p) for p in dataset["prompt_ids"]]
    else:
        prompts = [json.dumps(p, sort_keys=True, default=str) for p in dataset.select_columns(["prompt"])["prompt"]]
    image_column = next((c for c in ("images", "image") if c in dataset.column_names), None)
    if image_column is None:
        return prompts
    import hashlib

    # arrow format: the stored bytes / paths, without decoding every image
    stored = dataset.select_columns([image_column]).with_format("arrow")[image_column].to_pylist()
    images = [hashlib.blake2b(repr(v).encode(), digest_size=16).hexdigest() for v in stored]
    return list(zip(prompts, images))


class QuestionGroupedSampler(torch.utils.data.Sampler):
    """Shuffles questions, not rows: the rows of a question come out together (in a random order),
    so a batch holds few questions and the packed forward shares their prompts and prefixes."""

    def __init__(self, keys: list, seed: int = 0):
        self.groups: dict[Any, list[int]] = {}
        for i, key in enumerate(keys):
            self.groups.setdefault(key, []).append(i)
        self.seed, self.epoch, self.length = seed, 0, len(keys)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        groups = list(self.groups.values())
        for gi in torch.randperm(len(groups), generator=g).tolist():
            rows = groups[gi]
            yield from (rows[i] for i in torch.randperm(len(rows), generator=g).tolist())


# DPOTrainer's own words for the refusals SRPOTrainer shares with it (TRL 1.16, trl/trainer/dpo_trainer.py):
# SRPO's messages start with them, so code and tests written against DPOTrainer's errors keep matching.
DPO_KEEP_END_VLM = "truncation_mode='keep_end' is not supported for vision-language models."
DPO_VISION_WITH_TEXT_MODEL = (
    "The dataset appears to be vision-related (contains 'image' or 'images' keys), but the provided "
    "model does not seem to be a vision-language model. Please check your model and dataset."
)
DPO_PRECOMPUTE_ITERABLE = (
    "`precompute_ref_log_probs=True` is not supported with IterableDataset. Please use a map-style "
    "Dataset or set `precompute_ref_log_probs=False`."
)


class SRPOTrainer(DPOTrainer):
    """Trainer for SRPO (Safety-aware Reasoning Path Optimization, arXiv 2509.12060).

    Same constructor as [`~trl.DPOTrainer`]. `train_dataset` holds step-pair rows (`prompt`,
    optional `images`, `prefix`, `chosen`, `rejected`, optional `reference`): a
    [`StepPairDataset`], a `datasets.Dataset` / `IterableDataset`, or plain DPO data (which is a
    step-pair dataset with an empty prefix, the chosen answer serving as reference path).

    With `align_loss="odds_ratio"` (default) no reference model is created or run. With
    `align_loss="sigmoid"` the reference is `ref_model`, else the PEFT model with adapters
    disabled, else a copy of the policy reloaded from its path (or precomputed log-probs).
    """

    _tag_names = ["trl", "srpo"]
    _name = "SRPO"
    _paper = {
        "title": "When Safe Unimodal Inputs Collide: Optimizing Reasoning Chains for Cross-Modal Safety in "
        "Multimodal Large Language Models",
        "id": "2509.12060",
        "citation": textwrap.dedent("""\
            @inproceedings{cai2026srpo,
                title        = {{When Safe Unimodal Inputs Collide: Optimizing Reasoning Chains for Cross-Modal Safety in Multimodal Large Language Models}},
                author       = {Cai, Wei and Liu, Shujuan and Zhao, Jian and Shi, Ziyan and Zhao, Yusheng and Yuan, Yuchen and Zhang, Tianle and Zhang, Chi and Li, Xuelong},
                booktitle    = {Proceedings of the AAAI Conference on Artificial Intelligence},
                volume       = 40,
                number       = 42,
                pages        = {35322--35330},
                year         = 2026,
                doi          = {10.48550/arXiv.2509.12060},
                eprint       = {2509.12060},
                archivePrefix = {arXiv},
                url          = {https://doi.org/10.1609/aaai.v40i42.40840},
            }"""),
    }

    def __init__(
        self,
        model,
        ref_model=None,
        args: SRPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        if args is None:
            name = model if isinstance(model, str) else get_config_model_id(model.config) or "model"
            args = SRPOConfig(f"{name.rstrip('/').split('/')[-1]}-SRPO")
        args = _as_srpo_config(args)
        train_dataset = self._unwrap(train_dataset)
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: self._unwrap(v) for k, v in eval_dataset.items()}
        else:
            eval_dataset = self._unwrap(eval_dataset)

        odds_ratio = args.align_loss == "odds_ratio"
        if odds_ratio and ref_model is not None:
            logger.warning(
                "align_loss='odds_ratio' is reference-free: the `ref_model` you passed is not used or kept."
            )
            ref_model = None
        if (
            not odds_ratio
            and ref_model is None
            and peft_config is None
            and not args.precompute_ref_log_probs
            and not isinstance(model, str)  # a path or hub id: DPOTrainer reloads the reference from it
            and not is_peft_model(model)
            and not get_config_model_id(model.config)
        ):
            raise ValueError(
                "align_loss='sigmoid' needs a reference model, and this model has no path to reload one from "
                "(it was built from a config). Pass `ref_model=`, train with `peft_config=` (the reference is the "
                "model with adapters disabled), save the model and pass its folder, or set "
                "`precompute_ref_log_probs=True`."
            )

        if processing_class is None:
            source = model if isinstance(model, str) else get_config_model_id(model.config)
            if not source:
                raise ValueError(
                    "Pass `processing_class=` (a tokenizer or processor): the model has no path to load one from."
                )
            processing_class = AutoProcessor.from_pretrained(source, trust_remote_code=args.trust_remote_code)
        self._is_processor = isinstance(processing_class, ProcessorMixin)
        if args.pad_token is not None:  # DPOTrainer applies it in its own collators only; SRPO's reads the tokenizer's
            tokenizer = tokenizer_of(processing_class)
            if args.pad_token not in tokenizer.get_vocab():
                raise ValueError(
                    f"The specified `pad_token` ('{args.pad_token}') is not found in the vocabulary of the given "
                    f"`processing_class` ({processing_class.__class__.__name__}). Ensure that the `pad_token` exists "
                    "in the vocabulary before using it as a padding token."
                )
            tokenizer.pad_token = args.pad_token
        if args.align_eos and tokenizer_of(processing_class).eos_token is None:
            raise ValueError(
                "align_eos=True closes each continuation with EOS, but the tokenizer has no eos_token. Set "
                "`tokenizer.eos_token` (the token that ends an answer) or leave align_eos=False."
            )

        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        first = next(iter(train_dataset))
        if args.max_length is not None and args.truncation_mode != "keep_start":
            # DPOTrainer refuses keep_end for vision data only; its sentence comes first there, so that code
            # written for DPOTrainer recognises the error.
            dpo = f"{DPO_KEEP_END_VLM} " if self._is_vision_rows(first) and args.truncation_mode == "keep_end" else ""
            raise ValueError(
                f"{dpo}truncation_mode={args.truncation_mode!r} is not supported: SRPO keeps the start of every "
                "sequence (the prompt, its image tokens and the reasoning prefix are the context a question's "
                "sequences share) and cuts the ends of continuations. Use truncation_mode='keep_start' (the default) "
                "or max_length=None."
            )
        self.dropped_rows: dict[str, list] = {}
        if self._is_vision_rows(first):
            if not self._is_processor:
                raise ValueError(
                    f"{DPO_VISION_WITH_TEXT_MODEL} SRPO: the rows have images but `processing_class` is a tokenizer; "
                    "pass the model's processor (e.g. AutoProcessor.from_pretrained(...))."
                )
            train_dataset = self._prepare_vision_dataset(train_dataset, processing_class, args, "train")
            if isinstance(eval_dataset, dict):
                eval_dataset = {
                    k: self._prepare_vision_dataset(v, processing_class, args, k) for k, v in eval_dataset.items()
                }
            elif eval_dataset is not None:
                eval_dataset = self._prepare_vision_dataset(eval_dataset, processing_class, args, "eval")

        if data_collator is None:
            data_collator = DataCollatorForStepPairs(
                processing_class=processing_class,
                step_separator=args.step_separator,
                max_length=args.max_length,
                fallback_reference_eos=args.fallback_reference_eos,
                align_eos=args.align_eos,
                align_tokens=args.align_tokens,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )
        self._mrope_model = None
        if not isinstance(model, str):  # decide now, so that reference precomputation packs too
            self._setup_prefix_sharing(model, data_collator, args, peft_config)

        # DPOTrainer refuses to precompute reference log-probs for vision datasets; SRPO does it (packed, cached),
        # so the flag is hidden from DPOTrainer.__init__ and the precomputation runs below.
        vision_precompute = self._is_vision_rows(first) and args.precompute_ref_log_probs
        if vision_precompute:
            args.precompute_ref_log_probs = False
        skip_reference = ref_model is None and (odds_ratio or vision_precompute)
        with _without_reference_model(skip_reference, isinstance(model, str)):
            super().__init__(
                model=model,
                ref_model=ref_model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
            )
        if isinstance(model, str):
            self._setup_prefix_sharing(self.model, data_collator, args, peft_config)
        if self.prefix_sharing:
            self._load_packed_batches_per_process()
        if vision_precompute:
            args.precompute_ref_log_probs = self.precompute_ref_logps = True
            batch_size = args.precompute_ref_batch_size or args.per_device_train_batch_size
            self.train_dataset = self._precompute_ref_logps(self.train_dataset, "train", batch_size)
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {
                    k: self._precompute_ref_logps(v, k, batch_size) for k, v in self.eval_dataset.items()
                }
            elif self.eval_dataset is not None:
                self.eval_dataset = self._precompute_ref_logps(self.eval_dataset, "eval", batch_size)
        self.srpo_lambda = args.srpo_lambda
        self.nll_weight = args.nll_weight
        self.align_loss = args.align_loss

    # ---- prefix sharing ----------------------------------------------------------------------------

    def _setup_prefix_sharing(self, model, collator, args: SRPOConfig, peft_config) -> None:
        """Turn on the packed (tree) forward where the model supports it, else warn once and don't."""
        self.prefix_sharing = False
        if not args.prefix_sharing:
            return
        problem = prefix_sharing_problem(model, peft_config)
        if problem is None and not isinstance(collator, DataCollatorForStepPairs):
            problem = "a custom data_collator was given"
        if problem:
            logger.warning(
                "Prefix sharing is off (%s); sequences are scored separately, with the same results.", problem
            )
            return
        self.prefix_sharing = collator.prefix_sharing = True
        # How the packed tree attends: a block-sparse FlexAttention mask (CUDA, bf16/fp16) or a dense one.
        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else next(model.parameters()).dtype
        choice = choose_tree_attention(model, args.device.type, dtype)
        if choice.switch_to_tree:
            use_tree_attention(model)
        collator.dense_mask = not choice.block_mask
        collator.bucket_multiple = FLEX_BLOCK_SIZE if choice.block_mask else None  # one compiled shape per bucket
        if choice.why:
            logger.warning(
                "Packed batches use a dense [L, L] tree mask, not block-sparse tree attention: %s.", choice.why
            )
        base = model.get_base_model() if is_peft_model(model) else model
        inner = getattr(base, "model", None)
        self._mrope_model = inner if hasattr(inner, "get_rope_index") else None

    def _load_packed_batches_per_process(self) -> None:
        """Each process loads and packs its own batches: accelerate's dispatching dataloader (its default
        for an IterableDataset, e.g. a streamed eval set) cuts every tensor of a batch to the batch size,
        but a packed batch's tensors have per-question, per-position and per-token first dimensions."""
        config = self.accelerator.dataloader_config
        if config.dispatch_batches:
            logger.warning(
                "dispatch_batches=True is turned off: with prefix sharing each process loads its own batches "
                "(packed batches cannot be sliced across processes). Set prefix_sharing=False to dispatch."
            )
        config.dispatch_batches = False

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if not (self.prefix_sharing and self.args.group_by_question and isinstance(dataset, Dataset)):
            return super()._get_train_sampler(train_dataset)
        # The Trainer hands over the dataset after dropping the columns the model does not take (the
        # `id` among them); the rows are the same, so the questions are read from the full dataset.
        full = self.train_dataset
        source = full if isinstance(full, Dataset) and len(full) == len(dataset) else dataset
        return QuestionGroupedSampler(question_keys(source), seed=self.args.seed)

    # ---- data ------------------------------------------------------------------------------------

    @staticmethod
    def _is_vision_rows(example: dict) -> bool:
        return "image" in example or "images" in example

    @staticmethod
    def _unwrap(dataset):
        if isinstance(dataset, StepPairDataset):
            return dataset.dataset
        if isinstance(dataset, list):
            return StepPairDataset.from_list(dataset).dataset
        return dataset

    def _report_dropped(self, name: str, dropped: list[tuple[int, str]], total: int, max_length) -> None:
        """Every dropped row is counted and named (the first few) in a warning, and kept in `dropped_rows`."""
        self.dropped_rows[name] = dropped
        if dropped:
            shown = "; ".join(f"row {i}: {why}" for i, why in dropped[:5])
            logger.warning(
                "%s dataset: dropped %d of %d rows that do not fit max_length=%s (%s%s). Raise max_length to keep them.",
                name,
                len(dropped),
                total,
                max_length,
                shown,
                " ..." if len(dropped) > 5 else "",
            )

    @staticmethod
    def _fit_problem(prompt_len: int, seg: dict, max_length: int | None, shared: int = 0) -> str | None:
        """Why a row cannot be trained on at `max_length` (its continuation or reference cut away), or None.
        `shared`: leading continuation tokens that are context only (align_tokens="after_shared")."""
        if max_length is None:
            return None
        context = prompt_len + len(seg["prefix_ids"]) + shared
        if context >= max_length:
            what = "prompt + prefix" + (f" + the {shared} tokens both continuations start with" if shared else "")
            return f"{what} is {context} tokens, no room for the continuations"
        if prompt_len >= max_length:
            return f"prompt is {prompt_len} tokens, no room for the reference path"
        return None

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Validate and encode text step-pair rows (cached by `datasets`); drop and report rows that
        do not fit `max_length`."""
        if isinstance(dataset, Dataset) and "chosen_ids" in dataset.column_names:
            return dataset  # already prepared (evaluate() calls this again)
        tokenizer = tokenizer_of(processing_class)
        separator, eos_fallback = args.step_separator, args.fallback_reference_eos
        align_eos, align_tokens = args.align_eos, args.align_tokens

        def encode(example, idx):
            row = normalize_row(example, idx)
            seg = encode_text_segments(row, processing_class, separator, eos_fallback, align_eos)
            seg["prompt_ids"] = encode_prompt_text(row, tokenizer)
            shared = align_start(seg, align_tokens, idx)
            seg["_drop"] = self._fit_problem(len(seg["prompt_ids"]), seg, args.max_length, shared) or ""
            return seg

        map_kwargs = {"with_indices": True}
        if isinstance(dataset, Dataset):
            map_kwargs.update(num_proc=args.dataset_num_proc, desc=f"Encoding {dataset_name} step pairs")
        dataset = dataset.map(encode, **map_kwargs)
        if isinstance(dataset, Dataset):
            reasons = dataset["_drop"]
            dropped = [(i, why) for i, why in enumerate(reasons) if why]
            self._report_dropped(dataset_name, dropped, len(dataset), args.max_length)
            if dropped:
                dataset = dataset.select([i for i, why in enumerate(reasons) if not why])
        else:  # streaming: rows cannot be counted ahead; the collator raises on a row that does not fit
            dataset = dataset.filter(lambda ex: not ex["_drop"])
        return dataset.remove_columns("_drop")

    def _prepare_vision_dataset(self, dataset, processor, args: SRPOConfig, name: str):
        """Vision rows are encoded on the fly (pixels are too large to store). Here they are only
        validated (every image opened), and, with `max_length`, measured so that rows that cannot fit are dropped and
        reported before training rather than failing mid-run."""
        if isinstance(dataset, IterableDataset):
            return dataset
        image_token = getattr(processor, "image_token", None)
        dropped = []
        for i in range(len(dataset)):
            row = normalize_row(guards.read_row(dataset, i), i)
            check_image_count(row, i, image_token)
            images = guards.open_images(row["images"], i)  # every image opened now, errors name the dataset row
            if args.max_length is not None or args.align_tokens != "continuation":
                seg = encode_text_segments(
                    row, processor, args.step_separator, args.fallback_reference_eos, args.align_eos
                )
                shared = align_start(seg, args.align_tokens, i)
            if args.max_length is not None:
                text = render_row(processor, row, images)["prompt"]
                kwargs = {"images": [images]} if images else {}
                prompt_len = len(processor(text=[text], add_special_tokens=False, **kwargs)["input_ids"][0])
                why = self._fit_problem(prompt_len, seg, args.max_length, shared)
                if why:
                    dropped.append((i, why))
        self._report_dropped(name, dropped, len(dataset), args.max_length)
        if dropped:
            keep = set(range(len(dataset))) - {i for i, _ in dropped}
            dataset = dataset.select(sorted(keep))
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [
                "prompt_ids",
                "prefix_ids",
                "chosen_ids",
                "rejected_ids",
                "reference_ids",
                "prompt",
                "images",
                "image",
                "prefix",
                "chosen",
                "rejected",
                "reference",
                "tools",
                "chat_template_kwargs",
                "branch_point",
                "ref_chosen_logps",
                "ref_rejected_logps",
            ]

    # ---- log-probs -------------------------------------------------------------------------------

    @staticmethod
    def _model_kwargs(inputs: dict) -> dict:
        kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS and k not in PACKED_KEYS}
        kwargs["use_cache"] = False
        return kwargs

    def _sequence_logps(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Summed log-probs and scored-token counts of the 3B sequences of a batch, and the outputs.

        Unpacked batches hold the 3B sequences as rows with a `loss_mask`. Packed (prefix-sharing)
        batches hold one tree per question; `score_seq` / `score_pos` map packed positions back to
        the sequences they score.
        """
        if "score_seq" in inputs:
            with packed_router_mask(inputs):  # MoE: the router loss counts the packed rows' real tokens
                return self._packed_sequence_logps(model, inputs)
        loss_mask = inputs["loss_mask"]
        labels = inputs["input_ids"].masked_fill(loss_mask == 0, -100)
        outputs = model(**self._model_kwargs(inputs), labels=labels, fused_lm_head=True)
        shift_mask = loss_mask[:, 1:]
        # Prompt-learning PEFT prepends virtual tokens; keep the positions of the real tokens.
        per_token = outputs.log_probs[:, -shift_mask.size(1) :]
        mask = shift_mask.to(per_token.dtype)
        return (per_token * mask).sum(dim=1), mask.sum(dim=1), outputs

    def _packed_sequence_logps(self, model, inputs: dict):
        kwargs = self._model_kwargs(inputs)
        kwargs["attention_mask"] = self._tree_attention_mask(model, inputs)
        if "tree_mask" not in inputs:  # FlexAttention BlockMasks (never materialized): a reference model too
            ensure_tree_attention(self.accelerator.unwrap_model(model))
        if self._mrope_model is not None:
            kwargs["position_ids"] = self._mrope_positions(inputs)
        outputs = model(**kwargs, shift_labels=inputs["shift_labels"], fused_lm_head=True)
        per_position = outputs.log_probs.reshape(-1)
        num_sequences = int(inputs["score_seq"].max().item()) + 1
        sums = per_position.new_zeros(num_sequences).index_add(
            0, inputs["score_seq"], per_position[inputs["score_pos"]]
        )
        counts = torch.bincount(inputs["score_seq"], minlength=num_sequences).to(sums.dtype)
        return sums, counts, outputs

    def _tree_attention_mask(self, model, inputs: dict):
        """The packed batch's mask: one per kind of attention layer (sliding windows counted along each
        token's own path), with Gemma3's bidirectional image attention; see `packing.packed_attention_mask`."""
        config = self.accelerator.unwrap_model(model).config
        groups = None
        if config.model_type in BIDIRECTIONAL_IMAGE_TYPES and "token_type_ids" in inputs:
            groups = image_groups(inputs["token_type_ids"])
        windows = attention_windows(config.get_text_config())
        return packed_attention_mask(inputs, windows, self._compute_dtype(model), groups)

    def _compute_dtype(self, model) -> torch.dtype:
        """The dtype attention runs in: the autocast dtype under mixed precision, else the weights'."""
        device_type = self.accelerator.device.type
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return next(p for p in model.parameters()).dtype

    def _mrope_positions(self, inputs: dict) -> torch.Tensor:
        """3-axis (mRoPE) positions for Qwen2-VL / Qwen2.5-VL packed rows.

        The prompt's positions come from the model's own `get_rope_index` (image tokens get their
        grid positions); every later token is text, so all three axes equal its depth plus the
        prompt's offset (`mrope_position_deltas`), continuing from its branch point.
        """
        depth, prompt_length = inputs["position_ids"], inputs["prompt_length"]
        width = int(prompt_length.max().item())
        in_prompt = torch.arange(width, device=depth.device)[None, :] < prompt_length[:, None]
        mm_token_type_ids = inputs.get("mm_token_type_ids")
        if mm_token_type_ids is None:  # text-only rows (tokenized without the processor): every token is text
            mm_token_type_ids = torch.zeros_like(inputs["input_ids"])
        prompt_positions, deltas = self._mrope_model.get_rope_index(
            input_ids=inputs["input_ids"][:, :width],
            mm_token_type_ids=mm_token_type_ids[:, :width],
            image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=in_prompt.long(),
        )
        positions = (depth + deltas.to(depth.device).view(-1, 1)).unsqueeze(0).repeat(3, 1, 1)
        positions[:, :, :width] = torch.where(
            in_prompt[None], prompt_positions.to(depth.device), positions[:, :, :width]
        )
        return positions

    @staticmethod
    def _num_rows(inputs: dict) -> int:
        if "score_seq" in inputs:
            return (int(inputs["score_seq"].max().item()) + 1) // 3
        return inputs["input_ids"].size(0) // 3

    def compute_ref_log_probs(self, model, inputs):
        """Reference summed log-probs of the chosen and rejected continuations (sigmoid mode).

        Only the first two thirds of the batch (chosen, rejected) are scored: the reference-path
        sequences are not needed by the reference model.
        """
        packed = "score_seq" in inputs
        n = self._num_rows(inputs)
        if packed:  # the tree holds every sequence; score it whole and keep chosen / rejected
            sub = inputs
        else:
            sub = {}
            for key, value in inputs.items():
                if not isinstance(value, torch.Tensor) or key in {
                    "ref_chosen_logps",
                    "ref_rejected_logps",
                    "branch_point",
                }:
                    continue
                # Sequence-major tensors and vision tensors are both stored as three equal copies / groups.
                sub[key] = value[: value.size(0) * 2 // 3]
        adapter_context = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter_context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            adapter_context,
            self.accelerator.autocast(),
        ):
            sums, _, _ = self._sequence_logps(model, sub)
        return sums[:n], sums[n : 2 * n]

    def _ref_logps_cache_file(self, dataset: Dataset, name: str) -> Path | None:
        """Where this dataset's reference log-probs live on disk, keyed by what they depend on."""
        directory = self.args.ref_logps_cache_dir
        if directory == "":
            return None
        if directory is None:  # SRPOConfig fills the default in; a config changed after construction may not
            directory = default_ref_logps_cache_dir()
        if getattr(self, "_ref_model_hash", None) is None:
            self._ref_model_hash = self._precompute_model_hash or hash_module(self.ref_model or self.model)
        indices = dataset._indices.column(0).to_pylist() if dataset._indices is not None else None
        # Which continuation tokens are scored; only when not the default, so caches written before these
        # settings existed keep their keys.
        defaults = {"align_eos": False, "align_tokens": "continuation"}
        scored = {k: getattr(self.args, k) for k, v in defaults.items() if getattr(self.args, k) != v}
        key = Hasher.hash(
            (
                table_digest(dataset.data.table),  # the rows' content (text, token ids, image bytes)
                indices,
                self._ref_model_hash,
                self.args.step_separator,
                self.args.max_length,
                self.args.fallback_reference_eos,
                type(self.processing_class).__name__,
                self.processing_class.__class__.__module__,
                len(tokenizer_of(self.processing_class)),
                *([scored] if scored else []),
            )
        )
        return Path(directory) / f"{name}-{key}.json"

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        """Reference log-probs of every row's chosen / rejected continuation, computed once (with the
        same packed forward as training), cached on disk, and added to the dataset as columns."""
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                f"{DPO_PRECOMPUTE_ITERABLE} SRPO precomputes them once for a dataset's rows in order and caches them "
                "by content, which a stream has neither of (no length, no fixed order)."
            )
        if "ref_chosen_logps" in dataset.column_names:
            return dataset
        cache_file = self._ref_logps_cache_file(dataset, name)
        if cache_file is not None and cache_file.exists():
            cached = json.loads(cache_file.read_text())
            if len(cached["chosen"]) == len(dataset):
                logger.warning("Reusing reference log-probs for the %s dataset from %s", name, cache_file)
                return dataset.add_column("ref_chosen_logps", cached["chosen"]).add_column(
                    "ref_rejected_logps", cached["rejected"]
                )
        loader = self.accelerator.prepare(
            DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False, num_workers=0)
        )
        if self.ref_model is None and self.is_deepspeed_enabled:
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        else:
            model = self.ref_model or self.model
        chosen, rejected = [], []
        for batch in tqdm(
            loader, desc=f"Reference log-probs ({name})", disable=not self.accelerator.is_local_main_process
        ):
            ref_chosen, ref_rejected = self.compute_ref_log_probs(model, batch)
            ref_chosen, ref_rejected = self.accelerator.gather_for_metrics((ref_chosen, ref_rejected))
            chosen += ref_chosen.float().cpu().tolist()
            rejected += ref_rejected.float().cpu().tolist()
        if cache_file is not None and self.accelerator.is_main_process:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"chosen": chosen, "rejected": rejected}))
            tmp.replace(cache_file)  # atomic: a killed run never leaves a half-written cache
        self.accelerator.wait_for_everyone()
        return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)

    # ---- the loss --------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        n = self._num_rows(inputs)
        policy_inputs = dict(inputs)
        if self.aux_loss_enabled:  # MoE: the model returns its router load-balancing loss (as in DPOTrainer)
            policy_inputs["output_router_logits"] = True
        sums, counts, outputs = self._sequence_logps(model, policy_inputs)
        means = sums / counts.clamp(min=1)
        chosen_mean, rejected_mean, reference_mean = means.split(n)
        chosen_sum, rejected_sum, _ = sums.split(n)
        terms = {
            "chosen_mean": chosen_mean,
            "rejected_mean": rejected_mean,
            "reference_mean": reference_mean,
            "chosen_sum": chosen_sum,
            "rejected_sum": rejected_sum,
        }
        if self.align_loss == "odds_ratio":
            # No reference model: DPO's rewards as reference-free DPO defines them (log pi_ref = 0).
            ref_chosen = ref_rejected = torch.zeros_like(chosen_sum)
        else:
            if self.precompute_ref_logps:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model or self.model, inputs)
            ref_chosen, ref_rejected = ref_chosen.to(chosen_sum.device), ref_rejected.to(chosen_sum.device)
            terms.update(ref_chosen=ref_chosen, ref_rejected=ref_rejected)
        loss, align, log_odds = self._loss_from_terms(terms)
        guard = guards.guard_of(self)
        if guard is not None and mode == "train":  # what a non-finite loss or gradient would be explained from
            guard.remember(terms, counts.split(n), inputs)

        metrics: dict[str, torch.Tensor] = {}
        chosen_rewards = self.beta * (chosen_sum.detach() - ref_chosen)
        rejected_rewards = self.beta * (rejected_sum.detach() - ref_rejected)
        if log_odds is not None:
            metrics["log_odds_ratio"] = log_odds.detach()
            preferred = chosen_mean > rejected_mean
        else:
            preferred = chosen_rewards > rejected_rewards
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            metrics["aux_loss"] = outputs.aux_loss.detach()

        # DPOTrainer's metrics, with DPO's meaning (the completion is the continuation; logps are sums).
        metrics["rewards/chosen"] = chosen_rewards
        metrics["rewards/rejected"] = rejected_rewards
        metrics["rewards/margins"] = chosen_rewards - rejected_rewards
        metrics["rewards/accuracies"] = (chosen_rewards > rejected_rewards).float()
        metrics["logps/chosen"] = chosen_sum.detach()
        metrics["logps/rejected"] = rejected_sum.detach()
        # SRPO's own.
        metrics["loss/reference"] = -reference_mean.detach()
        metrics["loss/align"] = align.detach()
        metrics["mean_logps/chosen"] = chosen_mean.detach()
        metrics["mean_logps/rejected"] = rejected_mean.detach()
        metrics["margin"] = (chosen_mean - rejected_mean).detach()
        metrics["accuracy"] = preferred.float()
        self._log_metrics(mode, metrics, inputs, self._token_metrics(outputs, inputs, n))

        if return_outputs:
            with torch.no_grad():
                outputs = model(**self._model_kwargs(inputs))
            return loss, outputs
        return loss

    def _loss_from_terms(self, terms: dict[str, torch.Tensor]):
        """The SRPO loss from per-row log-probs: `(loss, per-row L_align, log odds ratio or None)`.

        `terms` holds `chosen_mean`, `rejected_mean`, `reference_mean`, `chosen_sum`, `rejected_sum`
        and, in the sigmoid mode, `ref_chosen` / `ref_rejected`. A term whose weight is 0 stays out of
        the graph, so nothing in it (an infinite odds for a memorized continuation, say) can reach the
        gradient as 0 x inf. The non-finite diagnosis (srpo_trl/diagnosis.py) replays this function.
        """
        nll = -terms["reference_mean"].mean()
        log_odds = None
        if self.align_loss == "odds_ratio":
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.srpo_lambda != 0):
                align, log_odds = odds_ratio_loss(terms["chosen_mean"], terms["rejected_mean"])
        else:
            chosen = terms["chosen_sum"] - terms["ref_chosen"]
            rejected = terms["rejected_sum"] - terms["ref_rejected"]
            align = -F.logsigmoid(self.beta * (chosen - rejected))
        weighted = []
        if self.nll_weight != 0:
            weighted.append(self.nll_weight * nll)
        if self.srpo_lambda != 0:
            weighted.append(self.srpo_lambda * align.mean())
        loss = weighted[0] if len(weighted) == 1 else weighted[0] + weighted[1]
        return loss, align, log_odds

    def _scored_tokens(self, values: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A per-position output of the fused LM head at the scored tokens, and each token's sequence index."""
        if "score_seq" in inputs:
            return values.reshape(-1)[inputs["score_pos"]], inputs["score_seq"]
        shift_mask = inputs["loss_mask"][:, 1:].bool()
        values = values[:, -shift_mask.size(1) :]  # prompt-learning PEFT prepends virtual tokens
        rows = torch.arange(shift_mask.size(0), device=shift_mask.device)[:, None].expand_as(shift_mask)
        return values[shift_mask], rows[shift_mask]

    def _token_metrics(self, outputs, inputs: dict, n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """DPO's token-level metrics over the continuation tokens, as (sum, count) pairs: `entropy` over
        chosen and rejected, `logits/*` (mean logit), `mean_token_accuracy` over chosen tokens."""
        out = {}
        fields = {"entropy": outputs.entropy, "logits": outputs.mean_logits, "top1": outputs.is_top1}
        for name, values in fields.items():
            if values is None:
                continue
            values, seq = self._scored_tokens(values.detach(), inputs)
            values = values.float()
            chosen, rejected = seq < n, (seq >= n) & (seq < 2 * n)
            if name == "entropy":
                out["entropy"] = (values[chosen | rejected].sum(), (chosen | rejected).sum())
            elif name == "logits":
                out["logits/chosen"] = (values[chosen].sum(), chosen.sum())
                out["logits/rejected"] = (values[rejected].sum(), rejected.sum())
            else:
                out["mean_token_accuracy"] = (values[chosen].sum(), chosen.sum())
        return out

    def _log_metrics(self, mode: str, metrics: dict[str, torch.Tensor], inputs: dict, token_metrics=None) -> None:
        gather = self.accelerator.gather_for_metrics
        for key, value in metrics.items():
            self._metrics[mode][key].append(gather(value).float().mean().item())
        for key, (total, count) in (token_metrics or {}).items():  # token-weighted over all processes, as DPO
            count = gather(count).sum().item()
            self._metrics[mode][key].append(gather(total).sum().item() / count if count > 0 else 0.0)
        if "branch_point" in inputs:  # where in the chain the pair sits: accuracy per branch point
            k = gather(inputs["branch_point"]).clamp(max=MAX_BRANCH_BUCKET)
            acc = gather(metrics["accuracy"])
            for bucket in k.unique().tolist():
                label = f"{bucket}" if bucket < MAX_BRANCH_BUCKET else f"{MAX_BRANCH_BUCKET}+"
                self._metrics[mode][f"accuracy/branch_{label}"].append(acc[k == bucket].mean().item())
        if mode == "train":
            real = inputs["packed_length"] if "packed_length" in inputs else inputs["attention_mask"]
            tokens = gather(real.sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    # ---- guards (srpo_trl/guards.py): divergence, resume settings, empty data ----------------------

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        guards.check_before_train(self, resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if guards.guard_of(self) is not None:
            guards.guard_of(self).after_micro_step(self, loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):  # the step's norm, right before optimizer.step()
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        guard = guards.guard_of(self)
        return grad_norm if guard is None else guard.check_grad_norm(self, grad_norm)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if guards.guard_of(self) is not None:
            guards.guard_of(self).annotate(logs)
        super().log(logs, start_time)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        try:
            return self._compute_loss(model, inputs, return_outputs)
        except ValueError as e:
            if "Image features and image tokens do not match" in str(e):
                raise ValueError(
                    f"Image tokens and image features do not match ({e}). Check that each row's prompt has one "
                    "image placeholder per image, and that max_length (now "
                    f"{self.args.max_length}) does not cut image tokens (max_length=None is safest with images)."
                ) from e
            raise


__all__ = ["SRPOTrainer", "odds_ratio_loss", "log1mexp", "RowError"]
