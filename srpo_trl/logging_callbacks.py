"""Old name of :mod:`srpo_trl.wandb_samples` (kept so that ``srpo_trl.logging_callbacks`` imports keep working)."""

import sys

from . import wandb_samples


sys.modules[__name__] = wandb_samples
