"""SRPOConfig: DPOConfig plus the fields of the SRPO objective."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

from trl import DPOConfig

from .dpo_fields import refuse_unsupported


logger = logging.getLogger(__name__)

ALIGN_LOSSES = ("odds_ratio", "sigmoid")
ALIGN_TOKENS = ("continuation", "after_shared")
_ANNOUNCED: set[bool] = set()  # the automatic precision choice is logged once per process


def _forced_cpu(use_cpu: bool) -> bool:
    from transformers.utils import strtobool

    return bool(use_cpu) or bool(strtobool(os.environ.get("ACCELERATE_USE_CPU", "false")))


def bf16_supported(use_cpu: bool = False) -> bool:
    """Whether training here can use bf16 mixed precision: the run is not forced onto the CPU
    (``use_cpu``, ``ACCELERATE_USE_CPU``) and the accelerator supports bf16 (the test
    transformers' `TrainingArguments` makes before it refuses ``bf16=True``)."""
    if _forced_cpu(use_cpu):
        return False
    from transformers import training_args

    return training_args.is_torch_bf16_gpu_available() or training_args.is_torch_xla_available()


def default_ref_logps_cache_dir() -> str:
    """``$SRPO_TRL_CACHE/ref_logps``, or ``~/.cache/srpo_trl/ref_logps`` when the variable is unset."""
    root = os.environ.get("SRPO_TRL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "srpo_trl")
    return os.path.join(root, "ref_logps")


@dataclass
class SRPOConfig(DPOConfig):
    r"""
    Configuration for [`SRPOTrainer`]: every [`~trl.DPOConfig`] field, plus the SRPO objective

        L = nll_weight * L_ref + srpo_lambda * L_align

    where `L_ref` is the mean token NLL of the verified reference path (closed with EOS) and `L_align`
    prefers the favorable continuation over the unfavorable one from the same reasoning prefix.

    Parameters:
        srpo_lambda (`float`, defaults to `0.3`): weight of the alignment term (RPO's default).
            `0` trains on the reference paths only (plain NLL).
        align_loss (`str`, defaults to `"odds_ratio"`): `"odds_ratio"` (RPO / ORPO style, on mean
            token log-probs, no reference model, no `beta`) or `"sigmoid"` (Step-DPO: DPO on the
            continuation tokens only, summed log-probs, a frozen reference model, `beta`).
        step_separator (`str`, defaults to `"\n"`): joins reasoning steps; each prefix step ends with it.
        fallback_reference_eos (`bool`, defaults to `True`): whether a row without `reference` closes
            its fallback reference path `prefix + chosen` with EOS. Set to `False` when continuations
            are single steps rather than paths to a final answer.
        nll_weight (`float`, defaults to `1.0`): weight of `L_ref`. `0` with `align_loss="sigmoid"` and
            `srpo_lambda=1` is Step-DPO's objective alone (its released code has no NLL term).
        align_tokens (`str`, defaults to `"continuation"`): which continuation tokens `L_align` scores:
            `"continuation"` every token after the prefix, `"after_shared"` only the tokens after the
            longest run of leading tokens chosen and rejected share (RPO's released loss).
        align_eos (`bool`, defaults to `False`): close both continuations with EOS (the chat template's
            end of turn for conversational rows) and score it in `L_align`, as RPO and ORPO do.
        prefix_sharing (`bool`, defaults to `True`): score each question's sequences as one tree, every
            shared token once (see docs/speed.md).
        group_by_question (`bool`, defaults to `True`): batch the rows of a question together.
        ref_logps_cache_dir (`str`, defaults to `$SRPO_TRL_CACHE/ref_logps` or `~/.cache/srpo_trl/ref_logps`):
            where precomputed reference log-probs are cached on disk and found again by later runs (text and
            vision datasets); `""` disables the cache.
        nonfinite (`str`, defaults to `"stop"`): what a NaN / inf loss or gradient norm does: `"stop"`
            raises `TrainingDiverged` naming the step, `"skip"` skips that optimizer step.
        resume_mismatch (`str`, defaults to `"warn"`): resuming a checkpoint trained on other data or
            loss settings warns (`"warn"`) or raises `ResumeMismatch` (`"error"`); so does a checkpoint
            whose `srpo_run.json` is missing or unreadable (its settings are unknown).
        bf16 (`bool`, *optional*): bf16 mixed precision. Unset (the default), it is chosen from the
            hardware: on where the accelerator supports bf16 (and `use_cpu` is off), fp32 otherwise (a CPU-only
            machine), said once in the log. `True` where the accelerator has no bf16 raises, unless
            `use_cpu=True` asks for bf16 autocast on the CPU. (TRL's `DPOConfig` defaults to `True` everywhere
            and fails on a CPU-only machine.)
        activation_checkpointing (`bool`, *optional*): recompute activations in the backward pass to save
            memory (about 20% slower). Unset, `True`: TRL's default, as `DPOConfig`'s
            `gradient_checkpointing=True`, without the deprecation warning transformers 5 gives every
            config built with the old name's default. Passing `gradient_checkpointing` still works (and warns).
    """

    # TRL's configs default the old name to True, so transformers 5 warned on every SRPOConfig(); the
    # old name defaults to unset here and the new one takes TRL's default in __post_init__.
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Recompute activations in the backward pass to save memory (about 20%% slower). "
            "Unset: True (TRL's default)."
        },
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Deprecated alias of `activation_checkpointing` (transformers 5); unset, that one decides."},
    )

    srpo_lambda: float = field(
        default=0.3,
        metadata={
            "help": "Weight lambda of the alignment term in L = L_ref + lambda * L_align (RPO's default 0.3). "
            "0 trains on the reference paths only."
        },
    )
    align_loss: str = field(
        default="odds_ratio",
        metadata={
            "help": "Alignment loss between the favorable and unfavorable continuation: 'odds_ratio' (RPO/ORPO "
            "style on mean token log-probs; reference-free, no beta) or 'sigmoid' (Step-DPO: DPO on continuation "
            "tokens with summed log-probs, a frozen reference model and beta).",
            "choices": list(ALIGN_LOSSES),
        },
    )
    step_separator: str = field(
        default="\n",
        metadata={"help": "String that joins reasoning steps; the same on every path."},
    )
    fallback_reference_eos: bool = field(
        default=True,
        metadata={
            "help": "For rows without a 'reference' column the reference path is prefix + chosen; whether to close "
            "it with EOS. Set False when 'chosen' is a single step rather than the rest of the path."
        },
    )
    nll_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of L_ref (the reference path's mean token NLL) in L = nll_weight * L_ref + srpo_lambda * "
            "L_align. 0 keeps L_ref out of the gradient (it is still logged as loss/reference): with "
            "align_loss='sigmoid' and srpo_lambda=1 that is Step-DPO's objective alone."
        },
    )
    align_tokens: str = field(
        default="continuation",
        metadata={
            "help": "Which continuation tokens the alignment term scores: 'continuation' (every token after the "
            "prefix) or 'after_shared' (only the tokens after the longest run of leading tokens chosen and rejected "
            "share, as RPO's released loss does; the shared ones are context, like the prefix).",
            "choices": list(ALIGN_TOKENS),
        },
    )
    align_eos: bool = field(
        default=False,
        metadata={
            "help": "Close both continuations with EOS (for conversational rows: the chat template's end of turn) and "
            "score it in the alignment term, as RPO's and ORPO's released code do. Default False: a continuation "
            "is a step, not the end of an answer."
        },
    )

    prefix_sharing: bool = field(
        default=True,
        metadata={
            "help": "Score all sequences of a question (chosen, rejected, reference of every row sharing the prompt "
            "and images) in one packed row with a tree attention mask, so shared tokens (image tokens, reasoning "
            "prefix) go through the model once. Same log-probs as separate scoring. Falls back, with one warning, to "
            "the unpacked path where unsupported or not exact: architectures off the verified list (hybrid Mamba / "
            "convolution / linear-attention models, chunked attention, sliding windows longer than max_length allows), "
            "flash-attention, prompt-learning PEFT (see docs/trainer.md)."
        },
    )
    group_by_question: bool = field(
        default=True,
        metadata={
            "help": "With prefix_sharing, shuffle questions rather than rows so that the rows of one question land in "
            "the same batch and share their prompt; rows are grouped by the 'id' column, else by prompt."
        },
    )

    ref_logps_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "With precompute_ref_log_probs (align_loss='sigmoid'), reference log-probs are saved here, keyed by "
            "the dataset's content, the reference model's weights and the encoding settings, and reused by later runs. "
            "Default (unset): $SRPO_TRL_CACHE/ref_logps, or ~/.cache/srpo_trl/ref_logps without the variable. "
            "Set to '' to disable the disk cache."
        },
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision. Unset: on where the accelerator supports bf16, fp32 otherwise (e.g. a "
            "CPU-only machine), said once in the log. True without such an accelerator is refused unless use_cpu "
            "is set (bf16 autocast on the CPU)."
        },
    )

    nonfinite: str = field(
        default="stop",
        metadata={
            "help": "What a NaN or inf loss or gradient norm does: 'stop' raises an error naming the step before the "
            "optimizer applies it (nothing is saved as final); 'skip' skips that optimizer step, counts it in the "
            "logs (nonfinite_skipped) and goes on. Non-finite weights are never saved.",
            "choices": ["stop", "skip"],
        },
    )
    resume_mismatch: str = field(
        default="warn",
        metadata={
            "help": "Resuming a checkpoint that was trained on other data or other loss settings (srpo_lambda, "
            "align_loss, beta, step_separator, fallback_reference_eos, max_length, nll_weight, align_tokens, "
            "align_eos): 'warn' says what changed and goes on, 'error' refuses; 'error' also refuses a "
            "checkpoint without srpo_run.json (settings unknown).",
            "choices": ["warn", "error"],
        },
    )

    def __post_init__(self):
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True
        self.bf16 = self._resolve_bf16()
        if self.ref_logps_cache_dir is None:
            self.ref_logps_cache_dir = default_ref_logps_cache_dir()
        super().__post_init__()
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"`nonfinite` must be 'stop' or 'skip', got {self.nonfinite!r}.")
        if self.resume_mismatch not in ("warn", "error"):
            raise ValueError(f"`resume_mismatch` must be 'warn' or 'error', got {self.resume_mismatch!r}.")
        if self.align_loss not in ALIGN_LOSSES:
            raise ValueError(f"`align_loss` must be one of {list(ALIGN_LOSSES)}, got {self.align_loss!r}.")
        if self.srpo_lambda < 0:
            raise ValueError(f"`srpo_lambda` must be >= 0 (it weights a loss term), got {self.srpo_lambda}.")
        if not (math.isfinite(self.nll_weight) and self.nll_weight >= 0):
            raise ValueError(f"`nll_weight` must be a finite number >= 0 (it weights L_ref), got {self.nll_weight}.")
        if self.nll_weight == 0 and self.srpo_lambda == 0:
            raise ValueError(
                "`nll_weight=0` and `srpo_lambda=0` leave no loss to train on. Set `srpo_lambda` > 0 (e.g. 1 with "
                "align_loss='sigmoid' for Step-DPO alone) or `nll_weight` > 0."
            )
        if self.align_tokens not in ALIGN_TOKENS:
            raise ValueError(
                f"`align_tokens` must be one of {list(ALIGN_TOKENS)}, got {self.align_tokens!r}: 'continuation' scores "
                "every continuation token, 'after_shared' only those after the tokens both continuations start with."
            )
        if not self.step_separator:
            raise ValueError("`step_separator` must be a non-empty string (e.g. '\\n'); steps cannot be joined by ''.")
        # DPO settings SRPO does not compute are refused rather than silently ignored; every DPOConfig field is
        # classified (honoured / refused / not applicable) in srpo_trl/dpo_fields.py.
        refuse_unsupported(self)
        if self.align_loss == "odds_ratio":
            if self.precompute_ref_log_probs:
                raise ValueError(
                    "`precompute_ref_log_probs=True` needs a reference model, which `align_loss='odds_ratio'` does "
                    "not use. Set `align_loss='sigmoid'` (Step-DPO) or drop `precompute_ref_log_probs`."
                )
            if self.sync_ref_model:
                raise ValueError(
                    "`sync_ref_model=True` needs a reference model, which `align_loss='odds_ratio'` does not use. "
                    "Set `align_loss='sigmoid'` or drop `sync_ref_model`."
                )

    def _resolve_bf16(self) -> bool:
        """`bf16` as a bool: the hardware's choice when unset (DPOConfig's `True` would fail without a GPU)."""
        if self.bf16 is None:
            if self.fp16:
                return False
            chosen = bf16_supported(self.use_cpu)
            if chosen not in _ANNOUNCED:
                _ANNOUNCED.add(chosen)
                if chosen:
                    logger.warning("SRPOConfig: bf16 was not set; the accelerator supports it, so training uses bf16.")
                else:
                    where = "use_cpu is set" if _forced_cpu(self.use_cpu) else "this machine has no GPU with bf16"
                    logger.warning(
                        "SRPOConfig: bf16 was not set and %s, so training uses fp32 (set bf16=False to say so, or "
                        "use_cpu=True with bf16=True for bf16 autocast on the CPU).",
                        where,
                    )
            return chosen
        if self.bf16 and not bf16_supported(self.use_cpu) and not _forced_cpu(self.use_cpu):
            raise ValueError(
                "bf16=True, but this machine has no GPU with bf16 support. Leave bf16 unset (SRPOConfig then trains "
                "in bf16 where the GPU supports it and in fp32 here), set bf16=False, or set use_cpu=True for bf16 "
                "autocast on the CPU."
            )
        return bool(self.bf16)
