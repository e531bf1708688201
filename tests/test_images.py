"""One image rule: the pixels that reach the processor are the same at exploration, training and
evaluation, for every image mode and source (greyscale used to stay greyscale at exploration and
evaluation but become RGB at training)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


def _image(mode):
    rgb = Image.fromarray(np.arange(6 * 5 * 3, dtype=np.uint8).reshape(6, 5, 3) * 3, "RGB")
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "RGB", "LA", "I;16"])
@pytest.mark.parametrize("source", ["path", "pil", "bytes"])
def test_same_pixels_at_every_stage(tmp_path, mode, source):
    import io

    from srpo_trl import backends, exploration
    from srpo_trl.collator import load_images as training_open

    img = _image(mode)
    path = tmp_path / "x.png"
    img.save(path)
    given = {"path": str(path), "pil": Image.open(path), "bytes": {"bytes": path.read_bytes(), "path": None}}[source]
    expected = np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"))  # independent of srpo_trl

    at_exploration = exploration.load_image(given)  # explore_record opens a record's images with it
    (at_evaluation,) = backends.load_images([given])  # TransformersBackend.generate (explore --model, evaluate)
    (at_training,) = training_open([given], 0)  # the collator
    for got in (at_exploration, at_evaluation, at_training):
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), expected)


def test_unreadable_image_names_the_row_at_training(tmp_path):
    from srpo_trl.collator import load_images
    from srpo_trl.rows import RowError

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(RowError, match=r"bad\.png"):
        load_images([str(bad)], 7)
    with pytest.raises(ValueError, match=r"bad\.png cannot be read"):
        from srpo_trl.images import open_image

        open_image(bad)
