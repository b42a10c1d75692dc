"""device/install.sh into a temporary root (no systemd as PID 1 here): the venv with a working edgeq, the service
user, the unit enabled offline, a config template that validates, a private credential placeholder; idempotent
(a second run keeps the user's config), and --uninstall / --purge take away what they should."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "device" / "install.sh"

pytestmark = pytest.mark.slow


def _install(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--root", str(root), *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    assert os.geteuid() == 0, "the installer creates users and system folders: run the tests as root (CI does)"
    root = tmp_path_factory.mktemp("image")
    (root / "etc").mkdir()
    for f in ("passwd", "group", "shadow", "gshadow"):  # useradd --prefix edits these
        shutil.copy(f"/etc/{f}", root / "etc" / f)
    r = _install(root, "--package", str(REPO), "--system-site-packages")
    assert r.returncode == 0, r.stdout + r.stderr
    return root


def test_install_lays_out_a_working_service(image):
    edgeq = image / "opt/edgeq/bin/edgeq"
    assert edgeq.is_file() and os.access(edgeq, os.X_OK)
    unit = image / "etc/systemd/system/edgeq.service"
    assert unit.read_text() == (REPO / "systemd/edgeq.service").read_text()
    wants = image / "etc/systemd/system/multi-user.target.wants/edgeq.service"
    assert wants.is_symlink() and os.readlink(wants).endswith("edgeq.service")
    user = [ln.split(":") for ln in (image / "etc/passwd").read_text().splitlines() if ln.startswith("edgeq:")]
    assert len(user) == 1 and user[0][5] == "/var/lib/edgeq" and user[0][6] == "/usr/sbin/nologin"
    state = image / "var/lib/edgeq"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700 and state.stat().st_uid == int(user[0][2])
    cred = image / "etc/edgeq/mqtt-password"
    assert cred.is_file() and stat.S_IMODE(cred.stat().st_mode) == 0o600
    # the template is a valid config, checked by the installed edgeq itself
    r = subprocess.run([str(edgeq), "validate-config", str(image / "etc/edgeq/device.toml")], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_second_run_keeps_the_config_and_upgrades(image):
    cfg = image / "etc/edgeq/device.toml"
    edited = cfg.read_text().replace('device_id = "pi"', 'device_id = "porch"')
    cfg.write_text(edited)
    (image / "etc/edgeq/mqtt-password").write_text("s3cret\n")
    r = _install(image, "--package", str(REPO), "--system-site-packages")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "keeping your config" in r.stdout and "creating the venv" not in r.stdout
    assert cfg.read_text() == edited and (image / "etc/edgeq/mqtt-password").read_text() == "s3cret\n"
    assert sum(ln.startswith("edgeq:") for ln in (image / "etc/passwd").read_text().splitlines()) == 1
    # the doctor ran against the config (no camera, broker or model here: it reports them, the install goes on)
    assert "result:" in r.stdout and "broker" in r.stdout


def test_uninstall_then_purge(image):
    r = _install(image, "--uninstall")
    assert r.returncode == 0, r.stderr
    assert not (image / "opt/edgeq").exists() and not (image / "etc/systemd/system/edgeq.service").exists()
    assert not (image / "etc/systemd/system/multi-user.target.wants/edgeq.service").exists()
    assert (image / "etc/edgeq/device.toml").is_file() and "kept" in r.stdout
    r = _install(image, "--uninstall", "--purge")
    assert r.returncode == 0, r.stderr
    assert not (image / "etc/edgeq").exists() and not (image / "var/lib/edgeq").exists()
    assert not any(ln.startswith("edgeq:") for ln in (image / "etc/passwd").read_text().splitlines())


@pytest.mark.parametrize("args, needle", [(["--purge"], "--purge goes with --uninstall"),
                                          (["--bogus"], "unknown option --bogus")])
def test_bad_options(tmp_path, args, needle):
    r = _install(tmp_path, *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("edgeq install: error: ") and needle in lines[0]


def test_setup_refuses_an_unknown_profile():
    """scripts/setup.sh (README's two commands) takes ``demo`` or nothing; anything else is one line, before any
    install."""
    r = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh"), "tests"], capture_output=True, text=True, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "unknown profile 'tests'" in lines[0] and "demo" in lines[0]
