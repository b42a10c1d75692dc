"""README's and docs' figures are the results files' (benchmarks/figures.py renders each table from
benchmarks/results/*.json); every results file records where it was measured; no figure table is left empty."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _figures():
    spec = importlib.util.spec_from_file_location("figures", ROOT / "benchmarks" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FIGURES = _figures()
BLOCKS = FIGURES.blocks()


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_each_table_equals_its_results(name):
    path, rendered = BLOCKS[name]
    written = FIGURES.current_block(path.read_text(), name)
    assert written == rendered, (f"{path.name}'s figures:{name} table differs from benchmarks/results; run "
                                 "python benchmarks/figures.py --write after re-running the benchmark")
    # a header and at least one row; or, while its results file is withdrawn (figures.PENDING), what to run and why
    withdrawn = [n for n in FIGURES.PENDING if f"`python benchmarks/{n}.py` (" in rendered]
    assert rendered.count("\n") >= 2 or (rendered.startswith("Not measured yet: ") and withdrawn), rendered


def test_every_results_file_records_its_machine_and_commit():
    for name, r in FIGURES.results().items():
        env = r.get("environment")
        assert env, f"{name}.json has no environment: re-run benchmarks/{name}.py"
        assert env["cpu"] and env["cores"] >= 1 and isinstance(env["cpu_flags"], list)
        assert env["commit"] != "unknown" and len(env["commit"]) >= 40
        # measured from a clean tree, or saying it was not (python benchmarks/X.py --allow-dirty)
        assert not env["commit"].endswith("+changes") or env.get("dirty_allowed"), (
            f"{name}.json was measured on a tree with uncommitted changes: commit, then re-run benchmarks/{name}.py")
        assert "ai-edge-litert" in env["packages"] and "numpy" in env["packages"]


def test_a_withdrawn_results_file_is_gone_and_has_its_script():
    """figures.PENDING names results files withdrawn until a clean re-run: none of them is back without its entry
    going, and each names a benchmark that exists."""
    assert not set(FIGURES.PENDING) & set(FIGURES.results()), "a results file is back: drop it from PENDING"
    assert all((ROOT / "benchmarks" / f"{name}.py").is_file() for name in FIGURES.PENDING)


def test_every_results_file_has_a_script():
    for name in FIGURES.results():
        assert (ROOT / "benchmarks" / f"{name}.py").is_file(), f"{name}.json has no benchmarks/{name}.py"


def test_a_drifted_figure_is_caught(tmp_path):
    """The checks can fail: one number changed in a rendered table, and one changed in the prose of a copy of its
    file, each fails the comparison the tests here make."""
    path, rendered = BLOCKS["readme"]
    text = FIGURES.replace_block(path.read_text(), "readme", rendered.replace("|", "| 9", 1))
    assert FIGURES.current_block(text, "readme") != rendered
    figures = FIGURES.inline_figures()
    assert figures, "no figure in prose is tied to a results file"
    source, marker, written, value = figures[0]
    assert written == value
    changed = tmp_path / source.name
    changed.write_text(source.read_text().replace(marker, marker.replace(f"-->{written}<!--", f"-->9{written}<!--"), 1))
    res = FIGURES.results()
    drifted = [(m.group(4), FIGURES.inline_value(res, m.group(1), m.group(2), m.group(3)))
               for m in FIGURES.INLINE.finditer(changed.read_text())
               if m.group(4) != FIGURES.inline_value(res, m.group(1), m.group(2), m.group(3))]
    assert drifted == [(f"9{written}", value)]


@pytest.mark.parametrize("where,marker,written,value",
                         [(str(p.relative_to(ROOT)), m, w, v) for p, m, w, v in FIGURES.inline_figures()] or
                         [("none", "", "", "")])
def test_each_figure_in_prose_equals_its_results(where, marker, written, value):
    assert written == value, (f"{where}: {marker} says {written!r}, the results file {value!r}; run python "
                              "benchmarks/figures.py --write after re-running the benchmark")
