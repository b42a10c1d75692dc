"""The unit file passes `systemd-analyze verify`, and its exposure stays at or below 2.0."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import edgeq_exe

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "edgeq.service"


@pytest.fixture(autouse=True)
def _systemd_analyze_installed():
    # scripts/setup.sh installs it (Debian's systemd): a missing tool is a failed setup, not a reason to skip
    assert shutil.which("systemd-analyze"), "systemd-analyze is not installed; run scripts/setup.sh"


def _unit_with_real_binary(tmp_path: Path) -> Path:
    # verify checks that ExecStart's binary exists: point it at this machine's edgeq
    edgeq = edgeq_exe()
    assert edgeq, "edgeq console script not installed"
    out = tmp_path / "edgeq.service"
    out.write_text(UNIT.read_text().replace("/opt/edgeq/bin/edgeq", edgeq))
    return out


def test_unit_verifies(tmp_path):
    unit = _unit_with_real_binary(tmp_path)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    # it passes whole: any complaint, about the unit or about what it names, fails it
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    text = UNIT.read_text()
    for directive in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "StateDirectory=edgeq",
                      "ConfigurationDirectory=edgeq", "SupplementaryGroups=video", "LoadCredential=mqtt-password",
                      "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "NoNewPrivileges=yes",
                      "ExecStartPre=/opt/edgeq/bin/edgeq validate-config"):
        assert directive in text, directive


def test_exposure_at_most_2(tmp_path):
    unit = _unit_with_real_binary(tmp_path)
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True, text=True)
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout + r.stderr)
    assert m, r.stdout[-500:] + r.stderr[-500:]
    exposure = float(m.group(1))
    print(f"systemd-analyze security exposure: {exposure}")
    assert exposure <= 2.0
