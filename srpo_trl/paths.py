"""Image paths read from files (records, review files) stay inside a declared root.

A records or review file names images by path; a path such as ``/etc/passwd`` or
``../../../home/me/.ssh/id_rsa`` would otherwise be read and sent to a model server or copied into
curated data. :func:`image_under_root` resolves a path the way the files document (relative to the
file's folder) and refuses it when it lies outside the root. The commands (explore, curate export /
import) always check: the root is the ``--images`` folder when given, else the file's own folder;
``--allow-outside-root`` turns the check off. From Python the check runs when ``image_root`` is
given. The check is lexical (``..`` and absolute paths); a symlink placed inside the root is trusted.
"""

from __future__ import annotations

import os
from pathlib import Path


class OutsideRoot(ValueError):
    """An image path that leaves the declared image root."""


def image_under_root(
    path: str | os.PathLike,
    base_dir: str | os.PathLike,
    root: str | os.PathLike | None = None,
    allow_outside_root: bool = False,
) -> Path:
    """``path`` resolved against ``base_dir`` (if relative); :class:`OutsideRoot` if a ``root`` is given,
    the path is not inside it and ``allow_outside_root`` is false."""
    given = Path(path)
    resolved = given if given.is_absolute() else Path(base_dir) / given
    if root is None or allow_outside_root:
        return resolved
    top = Path(os.path.abspath(root))
    full = Path(os.path.abspath(resolved))
    if full != top and top not in full.parents:
        raise OutsideRoot(
            f"{path}: is outside the image root {top} (resolves to {full}); put the images under the root, "
            "declare the folder they live in with --images DIR, or pass --allow-outside-root"
        )
    return resolved
