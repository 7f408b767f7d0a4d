"""Static checks over hintscope/: nothing that can turn trace- or guest-derived text into code.

Walks the AST of every .py file (a grep would miss ``getattr(os, "system")``-free spellings such as
``from os import system`` and would trip over comments).  hintscope runs as root on hypervisor
hosts, so code execution from hostile input is the worst failure it can have.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "hintscope"
FILES = sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)

BANNED_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
BANNED_BUILTINS = {"eval", "exec", "compile", "__import__", "input"}
BANNED_ATTR_CALLS = {
    ("os", "system"), ("os", "popen"), ("os", "execl"), ("os", "execle"), ("os", "execlp"), ("os", "spawnl"),
    ("pd", "read_pickle"), ("pandas", "read_pickle"), ("pd", "eval"), ("pandas", "eval"),
    ("asyncio", "create_subprocess_shell"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"),
    ("yaml", "load"), ("yaml", "unsafe_load"), ("torch", "load"),
}
# DataFrame.query / .eval compile their argument: allowed only with a literal string.
STRING_EVAL_METHODS = {"query", "eval"}


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def violations(path: Path) -> list[str]:
    src = path.read_text()
    tree = ast.parse(src, filename=str(path))
    out: list[str] = []
    rel = path.relative_to(PKG.parent) if PKG.parent in path.parents else path.name

    def bad(node: ast.AST, what: str) -> None:
        out.append(f"{rel}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in BANNED_MODULES:
                    bad(node, f"import {a.name}")
        elif isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".")[0]
            if mod in BANNED_MODULES:
                bad(node, f"from {node.module} import ...")
            if mod == "os" and any(a.name in ("system", "popen") for a in node.names):
                bad(node, "from os import system/popen")
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in BANNED_BUILTINS:
                bad(node, f"{f.id}()")
            if isinstance(f, ast.Attribute):
                base = _name(f.value)
                if (base, f.attr) in BANNED_ATTR_CALLS:
                    bad(node, f"{base}.{f.attr}()")
                if f.attr in STRING_EVAL_METHODS and base not in ("re",) and node.args and \
                        not isinstance(node.args[0], ast.Constant):
                    bad(node, f".{f.attr}() with a non-literal expression")
                if f.attr == "load" and base in ("np", "numpy"):
                    for kw in node.keywords:
                        if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and
                                                             kw.value.value is False):
                            bad(node, "np.load(allow_pickle=...)")
            for kw in node.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    bad(node, "shell=True")
    return out


def test_files_found():
    assert len(FILES) > 20, FILES


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PKG)) for p in FILES])
def test_no_code_execution_from_input(path):
    assert violations(path) == []


def test_checker_catches_what_it_claims(tmp_path):
    """The checker itself: every banned spelling in a sample file is reported."""
    p = tmp_path / "sample.py"
    sample = "\n".join([
        "import pickle", "from marshal import loads", "from os import system", "import os, subprocess",
        "eval(x)", "exec(x)", "os.system(cmd)", "subprocess.run(cmd, shell=True)", "df.query(expr)",
        "np.load(f, allow_pickle=True)", "pd.read_pickle(f)", "df.query('a > 1')",
    ])
    p.write_text(sample)
    v = violations(p)
    assert len(v) == 10, v
