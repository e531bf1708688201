"""A CPU-only stand-in for "the model and batch are on the GPU": catch tensors that SRPO code
creates without the device of the tensors they meet.

On a GPU, `torch.zeros(shape)` inside the trainer makes a CPU tensor, and the first op that meets a
CUDA tensor fails (`expected self and mask to be on the same device`). CI has no GPU, so the roles
are swapped: while `tensors_made_elsewhere()` is active,

- a factory (`torch.zeros`, `torch.arange`, ...) called *from srpo_trl code* without `device=`
  makes its tensor on the `meta` device, the way such a call makes a CPU tensor next to CUDA data;
  factories inside torch / transformers are left alone (they manage their own devices);
- every op checks that its (non-scalar) tensor arguments share one device, as CUDA kernels do.
  The check is needed: CPU sdpa silently reads a meta mask as garbage instead of failing. Moves
  (`.to`, `copy_`) and indexing with indices on another device are allowed, as on CUDA.

`torch.tensor(data)` / `torch.from_numpy` (host data, then `.to(device)`: the collate pattern) are
not redirected: host-side construction followed by an explicit move is correct on a GPU too.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import srpo_trl


_PROJECT = os.path.dirname(os.path.abspath(srpo_trl.__file__)) + os.sep
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.empty,
    torch.full,
    torch.arange,
    torch.eye,
    torch.linspace,
    torch.rand,
    torch.randn,
    torch.randint,
}
aten = torch.ops.aten
_MOVES = {
    aten._to_copy,
    aten.copy_,
    aten.index,
    aten.index_put_,
    aten._index_put_impl_,
    aten.lift_fresh,
    aten._local_scalar_dense,
}


def _called_from_project() -> bool:
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_TORCH):
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(_PROJECT)


class _ProjectFactoriesElsewhere(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in FACTORIES and kwargs.get("device") is None and _called_from_project():
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


class DeviceMismatch(RuntimeError):
    pass


class _OneDevicePerOp(TorchDispatchMode):
    supports_higher_order_operators = True  # FlexAttention is one: checked like any op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "overloadpacket", func) not in _MOVES:
            devices = {t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0}
            if len(devices) > 1:
                raise DeviceMismatch(
                    f"{func} got tensors on {sorted(map(str, devices))}: a tensor was created without the device "
                    "of the tensors it meets (on a GPU this is a CPU tensor meeting CUDA ones)"
                )
        return func(*args, **kwargs)


@contextlib.contextmanager
def tensors_made_elsewhere():
    """Run SRPO code as if its data lived on another device than the default one (see module doc)."""
    with _ProjectFactoriesElsewhere(), _OneDevicePerOp():
        yield
