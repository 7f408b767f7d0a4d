"""Run the report notebook headless (papermill) and render it to a static HTML page (nbconvert).

The page carries no code cells and no scripts: a Content-Security-Policy forbids script
execution, so even a string that slipped past escaping could not run, and nothing is loaded
from the network when the file is opened offline.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from importlib import resources
from pathlib import Path

import jinja2

from hintscope.errors import HintscopeError
from hintscope.report.progress import steps

NOTEBOOK = "report.ipynb"

# Extends nbconvert's lab template: no require.js / MathJax from a CDN, no script execution.
_TEMPLATE = r"""{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; font-src data:">
{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


try:
    from jupyter_client.manager import KernelManager as _KM

    class LocalKernelManager(_KM):
        """Kernel over Unix sockets: no TCP port on the host, and no plain-text-TCP warning."""

        def __init__(self, **kw):
            kw.setdefault("transport", "ipc")
            super().__init__(**kw)
except ImportError:  # pragma: no cover - jupyter_client comes with papermill
    pass


def notebook_path() -> Path:
    return Path(str(resources.files("hintscope.notebooks").joinpath(NOTEBOOK))) \
        if _has_pkg("hintscope.notebooks") else Path(__file__).resolve().parent.parent / "notebooks" / NOTEBOOK


def _has_pkg(name: str) -> bool:
    try:
        resources.files(name)
        return True
    except (ModuleNotFoundError, TypeError):
        return False


@contextlib.contextmanager
def _quiet():
    """papermill/nbclient log to stderr; the CLI shows its own progress."""
    import logging

    lg = logging.getLogger("papermill")
    old = lg.level
    lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lg.setLevel(old)


def _register_engine() -> str:
    """A papermill engine that reports each executed cell (for the progress bar)."""
    from papermill.engines import NBClientEngine, papermill_engines

    class CellProgressEngine(NBClientEngine):
        on_cell = None   # callable(done, total), set around one execution

        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, **kwargs):
            done = nb_man.cell_complete

            def cell_complete(cell, cell_index=None, **kw):
                done(cell, cell_index=cell_index, **kw)
                if cls.on_cell is not None and cell_index is not None:
                    cls.on_cell(cell_index + 1, len(nb_man.nb.cells))
            nb_man.cell_complete = cell_complete
            return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)

    papermill_engines.register("hintscope", CellProgressEngine)
    return "hintscope"


def execute(bundle: str | Path, out_ipynb: str | Path, baseline: str | Path | None = None,
            timeout: int = 600, on_cell=None) -> Path:
    """Execute the report notebook on ``bundle``; raises HintscopeError naming the failing cell."""
    import papermill as pm

    params = {"bundle": str(Path(bundle).resolve()), "baseline": str(Path(baseline).resolve()) if baseline else None}
    # The kernel must import this hintscope even when it is not installed (PYTHONPATH runs).
    root = str(Path(__file__).resolve().parents[2])
    env_path = os.environ.get("PYTHONPATH", "")
    if root not in env_path.split(os.pathsep):
        os.environ["PYTHONPATH"] = root + (os.pathsep + env_path if env_path else "")
    os.environ.setdefault("MPLBACKEND", "Agg")
    engine = _register_engine()
    from papermill.engines import papermill_engines

    papermill_engines.get_engine(engine).on_cell = on_cell
    try:
        with _quiet():
            pm.execute_notebook(str(notebook_path()), str(out_ipynb), parameters=params, kernel_name="python3",
                                progress_bar=False, execution_timeout=timeout, log_output=False,
                                cwd=str(Path(out_ipynb).resolve().parent),
                                kernel_manager_class="hintscope.report.render.LocalKernelManager",
                                engine_name=engine)
    except pm.PapermillExecutionError as e:
        raise HintscopeError(f"report notebook failed on {bundle} in cell {e.exec_count}: {e.ename}: {e.evalue}") \
            from None
    finally:
        papermill_engines.get_engine(engine).on_cell = None
        if env_path:
            os.environ["PYTHONPATH"] = env_path
        else:
            os.environ.pop("PYTHONPATH", None)
    return Path(out_ipynb)


def to_html(executed_ipynb: str | Path, out_html: str | Path, title: str = "hintscope report") -> Path:
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(executed_ipynb), as_version=4)
    nb.metadata["title"] = title
    exp = HTMLExporter(template_name="lab", exclude_input=True, exclude_input_prompt=True,
                       exclude_output_prompt=True, extra_loaders=[jinja2.DictLoader({"hintscope.html.j2": _TEMPLATE})],
                       template_file="hintscope.html.j2")
    body, _ = exp.from_notebook_node(nb)
    out = Path(out_html)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(out)
    return out


def render(bundle: str | Path, out_html: str | Path, baseline: str | Path | None = None,
           keep_notebook: str | Path | None = None, progress: bool | None = None) -> Path:
    """Bundle -> executed notebook -> HTML, with a rich progress display on a terminal."""
    from hintscope.bundle import read_bundle

    read_bundle(bundle)          # fail fast with the bundle's own one-line error
    if baseline:
        read_bundle(baseline)
    out_html = Path(out_html)
    if out_html.is_dir():
        raise HintscopeError(f"{out_html}: is a directory; give a file name such as report.html")
    out_html.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hintscope-report-") as td:
        nb_out = Path(keep_notebook) if keep_notebook else Path(td) / "report.ipynb"
        with steps(progress) as step:
            with step("executing report notebook (papermill)") as update:
                execute(bundle, nb_out, baseline, on_cell=update)
            with step("rendering HTML (nbconvert)"):
                to_html(nb_out, out_html, title=f"hintscope report: {Path(bundle).name}")
    return out_html
