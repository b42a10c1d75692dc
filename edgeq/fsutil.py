"""Small file-system checks shared by the host and the device rooms."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def probe_writable(folder: str | Path) -> None:
    """Create and remove a file in ``folder``; raise OSError if that fails. access() is not enough: root passes
    every access() check, and some folders (/proc, read-only mounts) refuse files anyway."""
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".edgeq-write-check-")
    os.close(fd)
    os.unlink(probe)


@contextmanager
def atomic_file(path: str | Path, mode: int | None = None) -> Iterator[IO[bytes]]:
    """A temporary file beside ``path`` that replaces it only when the block completes: flushed, fsynced, given
    ``mode``, renamed over ``path``, and the folder fsynced, so a kill at any moment leaves the old file or the new
    one, whole. On any error the temporary file is removed and the error propagates (an OSError of creating,
    writing or renaming it included)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
