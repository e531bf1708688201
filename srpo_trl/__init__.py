"""srpo_trl: SRPO (Safety-aware Reasoning Path Optimization) on the Hugging Face stack.

    from srpo_trl import SRPOConfig, SRPOTrainer, StepPairDataset

is a swap-in for TRL's ``DPOConfig`` / ``DPOTrainer``. Imports are lazy so that the light modules
(verifiers, evaluation metrics, record tools) do not pay for importing the trainer stack.
"""

__version__ = "0.1.0"

_LAZY = {
    "SRPOConfig": "srpo_trl.config",
    "SRPOTrainer": "srpo_trl.trainer",
    "StepPairDataset": "srpo_trl.dataset",
    "DataCollatorForStepPairs": "srpo_trl.collator",
    "check_prefix_sharing": "srpo_trl.prefix_check",
    "allow_prefix_sharing": "srpo_trl.prefix_check",
    "PrefixSharingCheck": "srpo_trl.prefix_check",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'srpo_trl' has no attribute {name!r}")
