"""Opening images: the one rule for every stage (exploration, training, evaluation, the record agents).

Every image reaches a processor as an RGB PIL image, whatever its source (a path, an undecoded
``datasets`` Image dict, or a PIL image of any mode: greyscale ``L``, palette ``P``, ``RGBA``, ...), so
that the pixels a policy is sampled from at exploration are the pixels it is trained and evaluated on.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any


__all__ = ["open_image", "open_images", "check_image_file"]


def _rgb(img: Any) -> Any:
    return img if img.mode == "RGB" else img.convert("RGB")


def open_image(image: Any, base_dir: str | os.PathLike | None = None) -> Any:
    """An RGB PIL image from a PIL image, a path (relative paths resolve against ``base_dir``) or an
    undecoded ``datasets`` Image (``{"bytes": ..., "path": ...}``).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file when it is missing or unreadable.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        return _rgb(image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        if not path.is_file():
            raise FileNotFoundError(
                f"image file not found: {path} (paths in records are relative to the records file)"
            )
        try:
            with Image.open(path) as img:
                img.load()
                return img.convert("RGB")  # a copy, detached from the file
        except Exception as exc:  # PIL raises several types for broken files
            raise ValueError(f"image file {path} cannot be read as an image: {exc}") from exc
    if isinstance(image, dict) and ("bytes" in image or "path" in image):  # datasets' Image feature, undecoded
        if image.get("bytes"):
            try:
                with Image.open(io.BytesIO(image["bytes"])) as img:
                    img.load()
                    return img.convert("RGB")
            except Exception as exc:
                raise ValueError(f"image bytes ({image.get('path') or 'no path'}) cannot be read: {exc}") from exc
        return open_image(image["path"], base_dir)
    raise TypeError(f"an image must be a PIL image or a file path, got {type(image).__name__}")


def open_images(images: list | None, base_dir: str | os.PathLike | None = None) -> list:
    return [open_image(img, base_dir) for img in (images or [])]


_decoded: set[tuple[str, int, int]] = set()  # (real path, size, mtime_ns) of files that decoded whole


def check_image_file(path: str | os.PathLike) -> None:
    """Decode the image file at ``path`` completely, so that a file that would fail later fails now:
    a missing or truncated file, one that is no image, or a decompression bomb (more pixels than
    twice Pillow's ``Image.MAX_IMAGE_PIXELS``). Raises ``ValueError`` saying what is wrong (without the
    file name: the caller names the record and field). A file that decoded is not decoded again in
    this process while its size and modification time stay."""
    from PIL import Image

    try:
        st = os.stat(path)
    except OSError as exc:
        raise ValueError(f"cannot read the file ({exc.strerror or exc})") from None
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key in _decoded:
        return
    try:
        with Image.open(path) as img:
            img.load()
    except Image.DecompressionBombError as exc:
        raise ValueError(f"refused as a decompression bomb ({exc})") from None
    except Exception as exc:  # PIL raises several types for broken files  # noqa: BLE001
        raise ValueError(f"cannot be decoded as an image ({type(exc).__name__}: {exc})") from None
    _decoded.add(key)
