"""The dependency rule of docs/architecture.md: the device side and the CLI's help never import TensorFlow."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("tensorflow", "keras", "tf_keras")

# argparse exits 0 after printing help; anything else means the subcommand does not exist
HELP = """from edgeq.cli import main
try:
    main({args!r})
except SystemExit as exc:
    assert exc.code == 0, exc.code
"""

PROBE = """
import sys
{body}
heavy = sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})
print('HEAVY=' + ','.join(heavy))
"""


def _heavy_modules(body: str) -> str:
    code = PROBE.format(body=body, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "body",
    [
        "import edgeq.device",
        "import edgeq.converter",
        HELP.format(args=["--help"]),
        HELP.format(args=["convert", "--help"]),
        HELP.format(args=["train", "--help"]),
        HELP.format(args=["run", "--help"]),
        HELP.format(args=["validate-config", "--help"]),
        "import edgeq.device.runner, edgeq.device.mqtt, edgeq.device.sources",
    ],
    ids=["import-device", "import-converter-package", "help", "convert-help", "train-help", "run-help", "validate-help",
         "device-modules"],
)
def test_no_tensorflow_import(body):
    assert _heavy_modules(body) == "HEAVY="


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_device_never_imports_tensorflow_or_converter():
    for path in (ROOT / "device").rglob("*.py"):
        bad = {n for n in _imports(path) if n.split(".")[0] in HEAVY or n.startswith("edgeq.converter")}
        assert not bad, f"{path.name} imports {bad}"


def test_core_imports_no_side_except_cli_lazily():
    for path in (ROOT / "edgeq").rglob("*.py"):
        names = _imports(path)
        assert not {n for n in names if n.split(".")[0] in HEAVY}, path.name
        sides = {n for n in names if n.startswith(("edgeq.converter", "edgeq.device"))}
        if path.name not in ("cli.py", "demo.py"):
            assert not sides, f"{path.name} imports {sides}"
