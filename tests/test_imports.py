"""The dependency rule of docs/architecture.md, read from the code and checked by running it:

- no import cycle among edgeq's modules, counting imports inside functions, ``importlib.import_module`` calls and
  ``if TYPE_CHECKING:`` imports (a type-only circle is still two modules that cannot be read apart);
- the device room and every core module it reaches import nothing of the host room, TensorFlow or Keras;
- the core imports neither side, except the CLI, which loads a side's subcommand module when it runs;
- ``edgeq --help``, the help of every subcommand and a real ``edgeq run`` load no host module and no TensorFlow.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = {"edgeq": ROOT / "edgeq", "edgeq.converter": ROOT / "converter", "edgeq.device": ROOT / "device"}
HEAVY = ("tensorflow", "keras", "tf_keras")


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in ROOMS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, type_only: bool = False) -> set[str]:
    """Every module ``name`` imports, at any depth of its code, resolved to full names; with ``type_only`` the
    imports under ``if TYPE_CHECKING:`` too."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(module: str | None, level: int) -> str:
        if level == 0:
            return module or ""
        base = package.split(".")
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node) and not type_only:
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = resolve(node.module, node.level)
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.add(sub if sub in MODULES else target)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.add(arg.value)
            elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                prefix = str(arg.values[0].value)  # f"edgeq.converter.commands.{name}": every module it can be
                found.update(m for m in MODULES if m.startswith(prefix))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}
# what the cycle check reads: the imports that run, and the type-only ones
GRAPH_ALL = {name: _imports(name, path, type_only=True) for name, path in MODULES.items()}


def _edges(name: str, graph: dict[str, set[str]] | None = None) -> set[str]:
    return {m for m in (GRAPH if graph is None else graph)[name] if m in MODULES and m != name}


def _cycles(graph: dict[str, set[str]] | None = None) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in _edges(v, graph):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in MODULES:
        if v not in index:
            strong(v)
    return out


def _reach(start: set[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(_edges(m))
    return seen


def test_the_graph_sees_lazy_and_dynamic_imports():
    """The checks below are only as good as the graph: it must hold the imports made inside functions and by
    importlib, or they would pass on code that breaks the rule."""
    assert "edgeq.converter.commands.convert" in GRAPH["edgeq.cli"]  # importlib.import_module(f"...{name}")
    assert "edgeq.inspect" in GRAPH["edgeq.cli"]  # inside a function
    assert "edgeq.converter.stages.taps" in GRAPH["edgeq.converter.tasks.base"]
    assert len(MODULES) > 60


def test_no_import_cycle():
    assert _cycles(GRAPH_ALL) == []


def test_a_cycle_would_be_found(monkeypatch):
    monkeypatch.setitem(GRAPH, "edgeq.bundle", GRAPH["edgeq.bundle"] | {"edgeq.inspect"})
    # the cycle found may run through other modules on its way back (edgeq.inspect -> edgeq.signing -> edgeq.bundle)
    assert any({"edgeq.bundle", "edgeq.inspect"} <= set(c) for c in _cycles()), _cycles()


def test_device_reaches_no_host_code():
    device = {m for m in MODULES if m.startswith("edgeq.device")}
    reached = _reach(device)
    bad = sorted(m for m in reached if m.startswith("edgeq.converter"))
    assert not bad, f"the device room reaches host modules: {bad}"
    heavy = sorted({i for m in reached if m in GRAPH for i in GRAPH[m] if i.split(".")[0] in HEAVY})
    assert not heavy, f"the device room reaches {heavy}"


def test_core_imports_no_side_except_the_cli():
    for name in MODULES:
        if name.startswith(("edgeq.converter", "edgeq.device")):
            continue
        sides = {m for m in GRAPH[name] if m.startswith(("edgeq.converter", "edgeq.device"))}
        heavy = {m for m in GRAPH[name] if m.split(".")[0] in HEAVY}
        assert not heavy, f"{name} imports {heavy}"
        if name != "edgeq.cli":
            assert not sides, f"{name} imports {sides}"


def test_host_imports_device_code_only_through_the_core():
    for name in MODULES:
        if name.startswith("edgeq.converter"):
            assert not {m for m in GRAPH[name] if m.startswith("edgeq.device")}, name


PROBE = """
import sys
{body}
loaded = sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r} or m.startswith('edgeq.converter'))
print('LOADED=' + ','.join(loaded))
"""
HELP = """from edgeq.cli import main
try:
    main({args!r})
except SystemExit as exc:
    assert exc.code == 0, exc.code
"""


def _loaded(body: str) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE.format(body=body, heavy=HEAVY)], capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["validate-config", "--help"], ["doctor", "--help"],
                                  ["inspect", "--help"], ["bench", "--help"]], ids=lambda a: "-".join(a))
def test_device_and_core_commands_load_no_host_code(args):
    assert _loaded(HELP.format(args=args)) == "LOADED="


@pytest.mark.parametrize("command", ["convert", "train", "eval", "datasets", "demo"])
def test_host_command_help_loads_no_tensorflow(command):
    loaded = _loaded(HELP.format(args=[command, "--help"])).removeprefix("LOADED=").split(",")
    assert not [m for m in loaded if m.split(".")[0] in HEAVY]


def test_edgeq_run_on_a_video_loads_no_host_code(tiny_bundle, tmp_path):
    """A real run, not only its help: the modules in memory after ``edgeq run`` processed a clip."""
    from edgeq.converter.data.shapes import moving_shapes_frames, write_video

    video = write_video(tmp_path / "clip.avi", moving_shapes_frames(5, 64, 64))
    body = (f"from edgeq.cli import main\nrc = main(['run', '--model', {str(tiny_bundle)!r}, '--source', "
            f"{str(video)!r}, '--output', {str(tmp_path / 'out.jsonl')!r}, '--spool', "
            f"{str(tmp_path / 'spool.db')!r}])\nassert rc == 0, rc")
    assert _loaded(body) == "LOADED="
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) >= 5


def test_long_functions_in_the_host_room_say_why():
    """docs/architecture.md: a converter function over 60 lines carries a comment saying why it is not split."""
    long = []
    for name, path in MODULES.items():
        if not name.startswith("edgeq.converter"):
            continue
        source = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(source))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                body = source[node.lineno - 1:node.end_lineno]
                if not any(line.strip().startswith("# over 60 lines:") for line in body):
                    long.append(f"{name}.{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, f"split these or say why in a '# over 60 lines:' comment: {long}"
