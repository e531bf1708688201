"""The few collectives that sharded exploration and evaluation need: a gloo group and a barrier.

Both stages run under a launcher (``accelerate launch``, ``torchrun``) or as ranks given by hand; a
gloo group works beside NCCL, and its waits are long: the other ranks wait at a barrier while the
slowest one generates (hours, not torch's 30-minute default).
"""

from __future__ import annotations

import os


def gloo_group():
    """A gloo process group (the world's when it is gloo, a new one beside NCCL), or None when no
    launcher set MASTER_ADDR / MASTER_PORT (ranks given by hand, run one after the other)."""
    import torch.distributed as dist

    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
            return None
        from datetime import timedelta

        dist.init_process_group(backend="gloo", timeout=timedelta(hours=12))
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def barrier(group) -> None:
    """Wait for every rank of ``group``; nothing without a group."""
    if group is not None:
        import torch.distributed as dist

        dist.barrier(group=group)
