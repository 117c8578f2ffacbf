"""Writing a file so that readers see the old content or the new, never half of either.

Every file the project writes for another process to read (weights and their card,
checkpoints, the decoded-data cache, calibration images, exported ONNX) is written under a
temporary name beside its final path and then renamed onto it: `os.replace` is atomic on
POSIX within one file system, so a reader, or a run killed mid-write, never meets a torn
file. The temporary name is unique per call, so two processes writing the same path at once
do not write into each other's temporary file; the last rename wins, whole.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def staging_path(path: Path) -> Path:
    """A fresh hidden name beside `path` (same folder, so same file system: the rename onto
    `path` is atomic). Creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write the new content of `path` to, by any writer.

    On a clean exit the temporary file is flushed to disk and renamed onto `path`; if the
    block raises, the temporary file is removed and `path` keeps its old content (or stays
    absent). Raises FileNotFoundError when the block wrote nothing at the temporary path.
    """
    path = Path(path)
    staging = staging_path(path)
    try:
        yield staging
        # The data reaches the disk before the rename does, so a power cut cannot leave a
        # renamed but empty file (a killed process needs only the rename).
        with open(staging, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def write_atomically(path: Path, content: bytes | Callable[[Path], object]) -> Path:
    """Replace `path` with `content` atomically (see `replacing`); returns `path`.

    `content` is the bytes to write, or a function that writes the file at the path it is
    given (e.g. `lambda temporary: torch.save(state, temporary)`). An exception from it
    propagates and leaves `path` as it was.
    """
    with replacing(path) as temporary:
        if isinstance(content, bytes):
            temporary.write_bytes(content)
        else:
            content(temporary)
    return Path(path)
