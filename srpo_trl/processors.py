"""Processors for image-only use of Qwen VL models (production code: :mod:`srpo_trl.loading` uses them).

Without torchvision the stock Qwen VL processors cannot be built at all (transformers type-checks the
video processor even when it is None); these subclasses leave the video processor out.
"""

from __future__ import annotations

from transformers.models.qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl import Qwen2VLProcessor
from transformers.models.qwen3_vl import Qwen3VLProcessor


__all__ = [
    "Qwen2_5_VLImageOnlyProcessor",
    "Qwen2VLImageOnlyProcessor",
    "Qwen3VLImageOnlyProcessor",
    "IMAGE_ONLY_PROCESSORS",
]


class _ImageOnly:
    """Mixin for Qwen VL processors that leaves the video processor out.

    Without torchvision the stock processor cannot be built at all (transformers' type check of the
    video processor fails, even with ``video_processor=None``). Image-only use needs no video
    processor, so this works with and without torchvision. Saved folders name the stock class, so
    they load with ``AutoProcessor`` wherever torchvision is installed.
    """

    @classmethod
    def get_attributes(cls):
        return [name for name in super().get_attributes() if name != "video_processor"]

    def to_dict(self):
        out = super().to_dict()
        out["processor_class"] = self.stock_class.__name__
        return out


class Qwen2_5_VLImageOnlyProcessor(_ImageOnly, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` for images only (see :class:`_ImageOnly`)."""

    stock_class = Qwen2_5_VLProcessor


class Qwen2VLImageOnlyProcessor(_ImageOnly, Qwen2VLProcessor):
    """``Qwen2VLProcessor`` for images only (see :class:`_ImageOnly`)."""

    stock_class = Qwen2VLProcessor


class Qwen3VLImageOnlyProcessor(_ImageOnly, Qwen3VLProcessor):
    """``Qwen3VLProcessor`` for images only (see :class:`_ImageOnly`)."""

    stock_class = Qwen3VLProcessor


IMAGE_ONLY_PROCESSORS = {
    "qwen2_5_vl": Qwen2_5_VLImageOnlyProcessor,
    "qwen2_vl": Qwen2VLImageOnlyProcessor,
    "qwen3_vl": Qwen3VLImageOnlyProcessor,
}
