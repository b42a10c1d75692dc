"""Fixtures of the emulated Raspberry Pi 4 (see rootfs.py): the cached arm64 root and the working tree's edgeq."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from rootfs import ArmUnavailable, build_root, guest_command, install_edgeq


@pytest.fixture(scope="session")
def pi(tmp_path_factory) -> "Pi":
    t0 = time.monotonic()
    try:
        root = build_root()
    except ArmUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    built = time.monotonic() - t0
    app = install_edgeq(root, tmp_path_factory.mktemp("arm-app") / "site")
    return Pi(root, app, built)


class Pi:
    def __init__(self, root: Path, app: Path, setup_seconds: float) -> None:
        self.root, self.app, self.setup_seconds = root, app, setup_seconds

    def edgeq(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        cmd, env = guest_command(self.root, self.app, *args)
        return self._run(cmd, env, timeout)

    def python(self, code: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """``python3.11 -c CODE`` on the emulated Pi, with the same edgeq and dependencies as :meth:`edgeq`."""
        cmd, env = guest_command(self.root, self.app)
        return self._run([*cmd[:cmd.index("-m")], "-c", code], env, timeout)

    def _run(self, cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        # cwd away from the repository: python -m puts the cwd first on sys.path, which would import the host tree
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=self.app.parent)
