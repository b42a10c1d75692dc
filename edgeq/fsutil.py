"""Small file-system checks shared by the host and the device rooms."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def probe_writable(folder: str | Path) -> None:
    """Create and remove a file in ``folder``; raise OSError if that fails. access() is not enough: root passes
    every access() check, and some folders (/proc, read-only mounts) refuse files anyway."""
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".edgeq-write-check-")
    os.close(fd)
    os.unlink(probe)
