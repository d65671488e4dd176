"""Atomic file writes: readers see the old file or the whole new one, never half of it."""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Callable


def save_atomically(path: os.PathLike | str, write: Callable[[pathlib.Path], None]) -> None:
    """Call ``write`` on a temporary file in ``path``'s folder, flush it to disk, and rename it
    over ``path``. On any error the temporary file is removed and ``path`` is untouched."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would outlive the rename
    try:
        write(pathlib.Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
