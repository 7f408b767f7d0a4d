"""The lab has no import cycle: each module imports alone, and the static graph of imports between
hintscope.lab modules (top-level and function-level) is acyclic with session.py at the bottom."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parents[1] / "hintscope" / "lab"
MODULES = sorted(p.stem for p in LAB.glob("*.py") if p.stem != "__init__")


def _lab_imports(path: Path) -> set[str]:
    """hintscope.lab modules that ``path`` imports anywhere in its body."""
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.ImportFrom) and n.module:
            if n.module == "hintscope.lab":
                out |= {a.name for a in n.names if (LAB / f"{a.name}.py").exists()}
            elif n.module.startswith("hintscope.lab."):
                out.add(n.module.split(".")[2])
        elif isinstance(n, ast.Import):
            out |= {a.name.split(".")[2] for a in n.names if a.name.startswith("hintscope.lab.")}
    return out - {path.stem}


def test_lab_import_graph_is_acyclic():
    graph = {m: _lab_imports(LAB / f"{m}.py") for m in MODULES}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        if state.get(m) == 2:
            return
        assert state.get(m) != 1, f"import cycle: {' -> '.join(stack + [m])}"
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            visit(d, stack + [m])
        state[m] = 2

    for m in MODULES:
        visit(m, [])
    # the shared driver must not know its runners
    assert not graph["session"] & {"dirtier", "linux", "hintguest", "cli"}
    assert {"dirtier", "linux", "hintguest"} <= graph["cli"]


@pytest.mark.parametrize("mod", MODULES)
def test_lab_module_imports_alone(mod):
    r = subprocess.run([sys.executable, "-c", f"import hintscope.lab.{mod}"], capture_output=True, text=True,
                       cwd=LAB.parents[1], timeout=120)
    assert r.returncode == 0, r.stderr[-800:]
