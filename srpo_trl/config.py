"""SRPOConfig: DPOConfig plus the fields of the SRPO objective."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig

from .dpo_fields import refuse_unsupported


ALIGN_LOSSES = ("odds_ratio", "sigmoid")


@dataclass
class SRPOConfig(DPOConfig):
    r"""
    Configuration for [`SRPOTrainer`]: every [`~trl.DPOConfig`] field, plus the SRPO objective

        L = L_ref + srpo_lambda * L_align

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
        prefix_sharing (`bool`, defaults to `True`): score each question's sequences as one tree, every
            shared token once (see docs/speed.md).
        group_by_question (`bool`, defaults to `True`): batch the rows of a question together.
        ref_logps_cache_dir (`str`, *optional*): where precomputed reference log-probs are cached on
            disk and found again by later runs (text and vision datasets).
        nonfinite (`str`, defaults to `"stop"`): what a NaN / inf loss or gradient norm does: `"stop"`
            raises `TrainingDiverged` naming the step, `"skip"` skips that optimizer step.
        resume_mismatch (`str`, defaults to `"warn"`): resuming a checkpoint trained on other data or
            loss settings warns (`"warn"`) or raises `ResumeMismatch` (`"error"`).
    """

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
            "Default: $SRPO_TRL_CACHE or ~/.cache/srpo_trl/ref_logps. Set to '' to disable the disk cache."
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
            "align_loss, beta, step_separator, fallback_reference_eos, max_length): 'warn' says what changed and "
            "goes on, 'error' refuses.",
            "choices": ["warn", "error"],
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"`nonfinite` must be 'stop' or 'skip', got {self.nonfinite!r}.")
        if self.resume_mismatch not in ("warn", "error"):
            raise ValueError(f"`resume_mismatch` must be 'warn' or 'error', got {self.resume_mismatch!r}.")
        if self.align_loss not in ALIGN_LOSSES:
            raise ValueError(f"`align_loss` must be one of {list(ALIGN_LOSSES)}, got {self.align_loss!r}.")
        if self.srpo_lambda < 0:
            raise ValueError(f"`srpo_lambda` must be >= 0 (it weights a loss term), got {self.srpo_lambda}.")
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
