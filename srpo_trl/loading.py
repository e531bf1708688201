"""Load a local model folder and its tokenizer or processor for the CLIs (never the model hub).

One entry point for every command that takes ``--model PATH``: it picks the model class from the
saved config (a vision-language model vs a causal LM), loads the matching processing class, and
optionally puts a PEFT adapter on top. Qwen VL processors cannot be built by ``AutoProcessor``
without torchvision, so those fall back to the image-only processors of :mod:`srpo_trl.processors`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


CONFIG = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
_PROCESSING_FILES = ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def _dtype(dtype):
    """``"float32"`` / ``"bfloat16"`` / ``"auto"`` / a ``torch.dtype`` -> what ``from_pretrained`` takes."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use e.g. 'float32', 'bfloat16', 'float16' or 'auto'")
    return value


def _folder(path, wanted: str, what: str) -> Path:
    """``path`` as a folder holding ``wanted``, or an error naming the path and what was looked for."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"{what} path {str(path)!r} does not exist (looked for a folder with {wanted})")
    if not folder.is_dir() or not (folder / wanted).is_file():
        raise FileNotFoundError(
            f"{what} path {str(path)!r} has no {wanted}: expected a folder saved with save_pretrained"
        )
    return folder


def is_vision_language(config) -> bool:
    """True for configs of image-text-to-text models (Qwen VL, LLaVA-NeXT, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and hasattr(config, "vision_config")


def load_processing_class(path, config=None):
    """The processor of a vision-language folder, or the tokenizer of a text one.

    Qwen VL folders get the stock processor where torchvision is installed and it loads, and the
    image-only subclass from :mod:`srpo_trl.processors` otherwise.
    """
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer
    from transformers.utils import is_torchvision_available

    folder = Path(path)
    if not any((folder / name).is_file() for name in _PROCESSING_FILES):
        raise FileNotFoundError(
            f"{str(path)!r} has no tokenizer or processor (looked for {', '.join(_PROCESSING_FILES)})"
        )
    config = config or AutoConfig.from_pretrained(folder, local_files_only=True)
    if not is_vision_language(config):
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)

    from .processors import IMAGE_ONLY_PROCESSORS

    image_only = IMAGE_ONLY_PROCESSORS.get(config.model_type)
    if image_only is not None and not is_torchvision_available():
        return image_only.from_pretrained(folder, local_files_only=True)
    try:
        return AutoProcessor.from_pretrained(folder, local_files_only=True)
    except Exception:
        if image_only is None:
            raise
        # e.g. a folder saved without a video processor config
        return image_only.from_pretrained(folder, local_files_only=True)


def load_model_and_processor(
    path, adapter: str | None = None, dtype="float32", device=None, merge_adapter: bool = False
):
    """Load a saved model folder and its processing class: ``(model, tokenizer_or_processor)``.

    ``path`` is a folder written by ``save_pretrained`` (a causal LM or a vision-language model;
    the class comes from its config), or a PEFT adapter folder whose base model is a local folder.
    ``adapter`` is a PEFT adapter folder to put on top; ``merge_adapter`` merges it into the
    weights (faster generation, no longer trainable as an adapter). The model is returned in eval
    mode, in ``dtype``, on ``device`` when given. Nothing is ever fetched from a model hub.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    given = Path(str(path)).expanduser()
    if given.is_dir() and not (given / CONFIG).is_file() and (given / ADAPTER_CONFIG).is_file():
        # An adapter folder alone: its base model is named in adapter_config.json.
        if adapter is not None:
            raise ValueError(f"{str(path)!r} is an adapter folder; pass its base model as the path instead")
        adapter, path = str(given), json.loads((given / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    folder = _folder(path, CONFIG, "model")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    auto = AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM
    model = auto.from_pretrained(folder, dtype=_dtype(dtype), local_files_only=True)

    processing_folder = folder
    if adapter is not None:
        from peft import PeftModel

        adapter_folder = _folder(adapter, ADAPTER_CONFIG, "adapter")
        model = PeftModel.from_pretrained(model, adapter_folder, local_files_only=True)
        if merge_adapter:
            model = model.merge_and_unload()
        # Training may have saved the processor beside the adapter; the base folder's is the fallback.
        if any((adapter_folder / name).is_file() for name in _PROCESSING_FILES):
            processing_folder = adapter_folder
    processing_class = load_processing_class(processing_folder, config)
    if device is not None:
        model = model.to(device)
    return model.eval(), processing_class


def save_model_and_processor(model, processing_class, path) -> Path:
    """Save a model (or adapter) and its tokenizer/processor into one folder that
    :func:`load_model_and_processor` reads back."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processing_class.save_pretrained(folder)
    return folder


__all__ = ["load_model_and_processor", "load_processing_class", "save_model_and_processor", "is_vision_language"]
