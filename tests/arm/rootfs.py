"""An emulated Raspberry Pi 4 for the tests: a Debian bookworm arm64 root run by qemu-aarch64 in user mode.

- ``debootstrap --foreign --arch=arm64 --variant=minbase`` downloads and unpacks the essential packages; the
  Python packages it fetches but leaves packed are unpacked with ``dpkg-deb -x``. Nothing is configured and no
  chroot is needed: ``qemu-aarch64-static -L ROOT ROOT/usr/bin/python3.11`` finds its libraries under ROOT.
- The aarch64 wheels of ``edgeq[device]`` go in with the host's pip (``--target``, ``--only-binary=:all:``, several
  ``--platform`` tags: ai-edge-litert is tagged manylinux_2_27_aarch64 only). edgeq is built as a pure-Python
  wheel first. Dependencies are cached with the root; edgeq itself is reinstalled
  into a fresh folder for every test session, so the code under test is always the working tree's.
- Two traps: qemu passes the host's x86 /proc/cpuinfo through, which crashes CPU detection, so ROOT/proc/cpuinfo
  holds a Cortex-A72's (qemu's ``-L`` prefix makes the guest read that one); and ``-cpu max`` gives wrong int8
  results, so the CPU is ``cortex-a72``.

The cache lives in ``$EDGEQ_ARM_CACHE`` (default ``~/.cache/edgeq/arm``), keyed on the suite, the package list, the
device requirements in pyproject.toml and this file; a new key builds a new root (about a minute and 300 MB).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
DEB_PACKAGES = ("python3", "libpython3.11-stdlib")
PYTHON = "/usr/bin/python3.11"
PY_TAGS = ("--python-version", "3.11", "--implementation", "cp", "--abi", "cp311")
PLATFORMS = ("manylinux_2_27_aarch64", "manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
CPU = "cortex-a72"
# /proc/cpuinfo of a Raspberry Pi 4 (Cortex-A72, CPU part 0xd08), matching -cpu cortex-a72
CPUINFO = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
    "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n"
    for i in range(4)
) + "Hardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n"


class ArmUnavailable(RuntimeError):
    pass


def device_requirements() -> list[str]:
    """edgeq[device]'s requirements that apply on aarch64 Linux with CPython 3.11."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"]) + list(meta["optional-dependencies"]["device"])
    from packaging.markers import Marker

    env = {"platform_machine": "aarch64", "python_version": "3.11", "sys_platform": "linux",
           "platform_system": "Linux", "implementation_name": "cpython"}
    out = []
    for r in reqs:
        spec, _, marker = r.partition(";")
        if not marker.strip() or Marker(marker.strip()).evaluate(env):
            out.append(spec.strip())
    return out


def cache_key() -> str:
    h = hashlib.sha256()
    for part in (SUITE, MIRROR, *DEB_PACKAGES, *PLATFORMS, *device_requirements(), Path(__file__).read_text()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _tools() -> tuple[str, str]:
    qemu, debootstrap = shutil.which("qemu-aarch64-static"), shutil.which("debootstrap") or (
        "/usr/sbin/debootstrap" if os.path.exists("/usr/sbin/debootstrap") else None)
    if not qemu or not debootstrap:
        raise ArmUnavailable("qemu-user-static and debootstrap are needed for the ARM tests: scripts/setup.sh installs "
                             "them (apt-get install qemu-user-static debootstrap)")
    return qemu, debootstrap


def _run(cmd: list[str], log: Path, **kwargs) -> None:
    with log.open("a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kwargs)
    if r.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise ArmUnavailable(f"{cmd[0]} failed ({r.returncode}); last lines of {log}:\n" + "\n".join(tail))


def _pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]


def build_root(cache: Path | None = None) -> Path:
    """The cached root for the current key, built if missing. Returns its path."""
    _, debootstrap = _tools()
    cache = Path(cache or os.environ.get("EDGEQ_ARM_CACHE") or Path.home() / ".cache" / "edgeq" / "arm")
    root = cache / cache_key()
    if (root / ".complete").is_file():
        return root
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    log = cache / f"{root.name}.log"
    log.write_text("")
    _run([debootstrap, "--foreign", "--arch=arm64", "--variant=minbase", f"--include={','.join(DEB_PACKAGES)}",
          SUITE, str(root), MIRROR], log)
    for deb in sorted((root / "var/cache/apt/archives").glob("*.deb")):  # unpack what --foreign left packed
        _run(["dpkg-deb", "-x", str(deb), str(root)], log)
        deb.unlink()
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc" / "cpuinfo").write_text(CPUINFO)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    _run(_pip("install", "--target", str(root / "opt/edgeq/deps"), "--only-binary=:all:", *PY_TAGS, *platforms,
              "--platform", "any", *device_requirements()), log)
    (root / ".complete").write_text(cache_key() + "\n")
    return root


def install_edgeq(root: Path, dest: Path) -> Path:
    """The working tree's edgeq (pure Python), built as a wheel and unpacked into ``dest``."""
    log = dest.parent / "install.log"
    wheels = dest.parent / "wheel"
    _run(_pip("wheel", "--no-deps", "-w", str(wheels), str(REPO)), log)
    wheel = next(wheels.glob("edgeq-*.whl"))
    _run(_pip("install", "--no-deps", "--target", str(dest), str(wheel)), log)
    return dest


def guest_command(root: Path, app: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run ``python3.11 -m edgeq.cli ARGS`` on the emulated Pi 4.

    ``app`` is a host path; the guest sees host paths that are not shadowed by ROOT, so it is used as is."""
    qemu, _ = _tools()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "EDGEQ_", "TF_", "LD_"))}
    env["PYTHONPATH"] = f"{app}:/opt/edgeq/deps"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return [qemu, "-cpu", CPU, "-L", str(root), str(root) + PYTHON, "-m", "edgeq.cli", *args], env
