"""Guards around SRPOTrainer.train(): divergence, resume consistency, an empty dataset.

* :class:`NonFiniteGuard` -- a non-finite loss (any process, any micro-batch) or gradient norm stops
  training with :class:`TrainingDiverged` naming the step and its likely cause (found by
  :mod:`srpo_trl.diagnosis`: weights already broken, float16 overflow, a loss term overflowing, too
  large updates, ...) (``nonfinite="stop"``, the default) before
  the optimizer applies it, or drops that step's gradients so the optimizer skips it
  (``nonfinite="skip"``; counted in the logs as ``nonfinite_skipped``, and a logging window whose
  losses were all NaN logs ``loss`` NaN, never 0). Weights are checked before every checkpoint and at the
  end of training: non-finite weights are never saved as the final model.
* :class:`RunSettingsCallback` -- writes :data:`RUN_SETTINGS_FILE` (a content hash of the training
  data and the loss settings) into every checkpoint, atomically; :func:`check_resume` compares them
  with the current run before resuming and warns (``resume_mismatch="warn"``) or refuses with
  :class:`ResumeMismatch` (``"error"``). A checkpoint without a readable file (a kill between the
  checkpoint and the file) cannot be checked: warned about, or refused under ``"error"``.
* :func:`check_before_train` -- also refuses a training set with no rows (every row dropped by
  ``max_length``), in the Python API as on the command line.
* :func:`read_row` / :func:`open_images` -- used when a vision dataset is prepared: every image is
  opened then, and a missing or unreadable one is named by its dataset row.

SRPOTrainer calls :func:`install` from ``train()`` and forwards three hooks (``training_step``,
``_get_grad_norm``, ``log``) to the guard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from . import diagnosis
from .store import table_digest


logger = logging.getLogger(__name__)

RUN_SETTINGS_FILE = "srpo_run.json"
#: SRPOConfig fields that change what the loss is; a resume with other values mixes two objectives.
LOSS_SETTINGS = (
    "srpo_lambda",
    "align_loss",
    "beta",
    "step_separator",
    "fallback_reference_eos",
    "max_length",
    "nll_weight",
    "align_tokens",
    "align_eos",
)


class TrainingStopped(RuntimeError):
    """Training was stopped on purpose by a guard (the message says why and what to do)."""


class TrainingDiverged(TrainingStopped):
    """The loss, the gradient norm or the weights stopped being finite."""


class ResumeMismatch(TrainingStopped):
    """The checkpoint to resume was trained on other data or with other loss settings."""


def _finite(value) -> bool:
    if value is None:
        return True
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value.detach()).all())
    return math.isfinite(float(value))


def _loss_scale_can_drop(trainer) -> bool:
    """Whether a float16 GradScaler runs and its scale is still above 1 (it halves it on an overflow)."""
    scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
    return scaler is not None and scaler.is_enabled() and scaler.get_scale() > 1


def nonfinite_parameters(model) -> list[str]:
    """Names of the parameters holding NaN or inf (under ZeRO-3: in this rank's shard)."""
    bad = []
    for name, p in model.named_parameters():
        held = getattr(p, "ds_tensor", p)
        if held.numel() and not torch.isfinite(held.detach()).all():
            bad.append(name)
    return bad


class NonFiniteGuard(TrainerCallback):
    def __init__(self, mode: str = "stop", trainer=None):
        self.mode = mode
        self.trainer = trainer
        self.skipped_steps: list[int] = []  # global step numbers (1-based) skipped in "skip" mode
        self._bad_loss: str | None = None
        self._window_finite = 0  # micro-batch losses since the last log
        self._window_nonfinite = 0
        self._micro_batches: list[diagnosis.MicroBatch] = []  # since the last optimizer step

    def remember(self, terms: dict, counts: tuple, inputs: dict) -> None:
        """Called by SRPOTrainer._compute_loss with each training micro-batch's per-row log-prob terms and
        token counts, so that a non-finite loss or gradient can be explained (srpo_trl/diagnosis.py)."""
        self._micro_batches.append(diagnosis.remember(terms, counts, inputs))

    # -- hooks forwarded by SRPOTrainer ------------------------------------------------------------

    def after_micro_step(self, trainer, loss: torch.Tensor) -> None:
        """Called with each micro-batch's loss, on every process."""
        value = loss.detach().float().reshape(1)
        if trainer.accelerator.num_processes > 1:  # every process must take the same decision
            value = trainer.accelerator.gather(value)
        if bool(torch.isfinite(value).all()):
            self._window_finite += 1
            return
        self._window_nonfinite += 1
        step = trainer.state.global_step + 1
        metrics = trainer._metrics["train"]
        terms = {k: metrics[k][-1] for k in ("loss/reference", "loss/align") if metrics.get(k)}
        detail = ", ".join(f"{k.split('/')[1]} term {v:.4g}" for k, v in terms.items())
        self._bad_loss = f"the loss is {value.tolist()}" + (f" ({detail})" if detail else "")
        if self.mode == "stop":
            why = diagnosis.explain(trainer, self._micro_batches[-1:], loss_finite=False)
            raise TrainingDiverged(self._message(trainer, step, self._bad_loss, why))

    def check_grad_norm(self, trainer, grad_norm):
        """Called with the step's gradient norm right before the optimizer step; returns it."""
        bad, loss_finite, batches = self._bad_loss, self._bad_loss is None, self._micro_batches
        if not _finite(grad_norm) and loss_finite and _loss_scale_can_drop(trainer):
            # fp16 mixed precision: the GradScaler skips this step and halves its scale itself, which is how it
            # finds its scale (the first steps of a run overflow on purpose). Left to it while it can go lower.
            self._micro_batches = []
            return grad_norm
        if not _finite(grad_norm):
            bad = (bad + "; " if bad else "") + f"the gradient norm is {float(grad_norm)}"
        self._bad_loss, self._micro_batches = None, []
        step = trainer.state.global_step + 1
        if bad is None:
            return grad_norm
        why = diagnosis.explain(trainer, batches, loss_finite=loss_finite)
        if self.mode == "stop":
            raise TrainingDiverged(self._message(trainer, step, bad, why))
        # No gradients -> torch optimizers leave every parameter (and its moments) as it is.
        trainer.model.zero_grad(set_to_none=True)
        trainer.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps.append(step)
        logger.warning(
            "Step %d skipped (nonfinite='skip'): %s. %d step(s) skipped so far. %s.",
            step,
            bad,
            len(self.skipped_steps),
            why,
        )
        return grad_norm

    def annotate(self, logs: dict) -> None:
        """Called with each training log. The Trainer logs a NaN loss as the mean of the earlier finite
        ones (0 when there are none): a window whose losses were all non-finite logs NaN instead."""
        if "loss" not in logs:
            return
        if self.skipped_steps:
            logs["nonfinite_skipped"] = len(self.skipped_steps)
        if self._window_nonfinite and not self._window_finite:
            logs["loss"] = float("nan")
        self._window_finite = self._window_nonfinite = 0

    # -- callbacks ---------------------------------------------------------------------------------

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save and model is not None:
            self._check_weights(model, state.global_step, "before saving the checkpoint")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._check_weights(model, state.global_step, "at the end of training")

    def _check_weights(self, model, step: int, when: str) -> None:
        bad = nonfinite_parameters(model)
        accelerator = getattr(self.trainer, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1:  # shards differ: every rank decides alike
            counts = accelerator.gather(torch.tensor([len(bad)], device=accelerator.device))
            if int(counts.sum()) and not bad:
                bad = [f"{int(counts.sum())} on other ranks"]
        if bad:
            shown = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
            raise TrainingDiverged(
                f"Training diverged: after step {step}, {len(bad)} parameter tensor(s) hold NaN or inf ({shown}), "
                f"found {when}; they are not saved. Lower learning_rate or resume from an earlier checkpoint."
            )

    @staticmethod
    def _message(trainer, step: int, what: str, why: diagnosis.Diagnosis) -> str:
        return (
            f"Training diverged at step {step} (of {trainer.state.max_steps}): {what}. The optimizer did not apply "
            f"this step and nothing was saved as final. {why}; or set nonfinite='skip' to skip such steps."
        )


# ---- resume -----------------------------------------------------------------------------------------


def run_settings(trainer) -> dict:
    """What a checkpoint must agree on with the run that resumes it."""
    dataset = trainer.train_dataset
    digest = None
    if hasattr(dataset, "data") and hasattr(dataset.data, "table"):
        if getattr(trainer, "_srpo_dataset_digest", None) is None:
            rows = hashlib.blake2b(digest_size=8)
            if dataset._indices is not None:  # a selection (dropped rows) of the table
                rows.update(dataset._indices.column(0).to_numpy().tobytes())
            trainer._srpo_dataset_digest = f"{table_digest(dataset.data.table)}-{rows.hexdigest()}"
        digest = trainer._srpo_dataset_digest
    return {"dataset": digest, "loss": {k: getattr(trainer.args, k, None) for k in LOSS_SETTINGS}}


class RunSettingsCallback(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            # A temporary file renamed into place: a kill leaves no file or the whole file, never half.
            path = os.path.join(folder, RUN_SETTINGS_FILE)
            tmp = f"{path}.{os.getpid()}.tmp"
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(run_settings(self.trainer), f, indent=2)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)


def check_resume(trainer, resume_from_checkpoint) -> None:
    """Compare the checkpoint's data hash and loss settings with this run's; warn or refuse."""
    if not resume_from_checkpoint:
        return
    folder = resume_from_checkpoint
    if folder is True:
        folder = get_last_checkpoint(trainer.args.output_dir) if os.path.isdir(trainer.args.output_dir) else None
        if folder is None:
            return  # the Trainer reports the missing checkpoint
    path = os.path.join(str(folder), RUN_SETTINGS_FILE)
    saved, unknown = None, None
    if not os.path.isfile(path):
        unknown = (
            f"{folder} has no {RUN_SETTINGS_FILE} (a run stopped between saving the checkpoint and writing it, "
            "or a checkpoint from another trainer)"
        )
    else:
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError) as exc:
            saved = None
            unknown = f"{path} cannot be read ({type(exc).__name__}: {exc})"
        if unknown is None and not isinstance(saved, dict):
            unknown = f"{path} is not a JSON object"
    if unknown is not None:
        message = f"{unknown}, so nothing shows that it was trained on the same data and loss settings."
        if trainer.args.resume_mismatch == "error":
            raise ResumeMismatch(
                f"{message} Resume from an earlier checkpoint that has the file, start a new output_dir, or set "
                "resume_mismatch='warn' to resume it unchecked."
            )
        logger.warning("%s Resuming unchecked (resume_mismatch='warn').", message)
        return
    now = run_settings(trainer)
    changes = [
        f"{k}: {saved.get('loss', {}).get(k)!r} in the checkpoint, {v!r} now"
        for k, v in now["loss"].items()
        if k in saved.get("loss", {}) and saved["loss"][k] != v
    ]
    if saved.get("dataset") and now["dataset"] and saved["dataset"] != now["dataset"]:
        changes.append("the training data differ from the checkpoint's (content hash)")
    if not changes:
        return
    message = f"Resuming {folder} with other settings than it was trained with: " + "; ".join(changes) + "."
    if trainer.args.resume_mismatch == "error":
        raise ResumeMismatch(
            message + " Resume with the same settings, start a new output_dir, or set resume_mismatch='warn'."
        )
    logger.warning("%s Continuing (resume_mismatch='warn'); set resume_mismatch='error' to refuse.", message)


# ---- before training ---------------------------------------------------------------------------------


def install(trainer) -> NonFiniteGuard:
    """Add the guards' callbacks once; return the trainer's NonFiniteGuard."""
    guard = getattr(trainer, "_nonfinite_guard", None)
    if guard is None:
        if getattr(trainer.args, "nonfinite", "stop") == "skip" and getattr(trainer, "is_deepspeed_enabled", False):
            raise ValueError(
                "nonfinite='skip' cannot skip a step under DeepSpeed (the engine owns the optimizer step); use 'stop'."
            )
        guard = trainer._nonfinite_guard = NonFiniteGuard(getattr(trainer.args, "nonfinite", "stop"), trainer)
        trainer.add_callback(guard)
        trainer.add_callback(RunSettingsCallback(trainer))
    return guard


def check_before_train(trainer, resume_from_checkpoint) -> None:
    dataset = trainer.train_dataset
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        dropped = len(getattr(trainer, "dropped_rows", {}).get("train", []))
        raise ValueError(
            f"The training dataset has no rows: every row was dropped ({dropped} dropped), none fits "
            f"max_length={trainer.args.max_length}. Raise max_length (None keeps every row)."
        )
    install(trainer)
    check_resume(trainer, resume_from_checkpoint)


def read_row(dataset, index: int) -> dict:
    """Row `index` of a dataset; an image stored in it that cannot be decoded is named by the row."""
    from .rows import RowError

    try:
        return dataset[index]
    except (OSError, ValueError) as e:
        raise RowError(index, "images", f"cannot be decoded: {type(e).__name__}: {e}") from e


def open_images(images: list, index: int) -> list:
    """Open (decode) a row's images now, so that a missing or broken file fails before training, naming
    the dataset row rather than a position in some later batch."""
    from .collator import load_images
    from .rows import RowError

    try:
        return load_images(images, index)
    except RowError:
        raise
    except (OSError, ValueError) as e:  # an undecodable datasets Image
        raise RowError(index, "images", f"cannot read an image: {type(e).__name__}: {e}") from e


def guard_of(trainer) -> Any:
    """The trainer's NonFiniteGuard, or None before train() (evaluation-only use)."""
    return getattr(trainer, "_nonfinite_guard", None)
