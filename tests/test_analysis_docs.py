"""docs/bundle.md carries the table reference generated from the schema registry: keep it current.

Regenerate with ``python tests/test_analysis_docs.py --write``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "bundle.md"
BEGIN = "<!-- BEGIN GENERATED TABLE REFERENCE -->"
END = "<!-- END GENERATED TABLE REFERENCE -->"


def _generated() -> str:
    from hintscope import schema

    return schema.markdown().strip()


def _split(text: str) -> tuple[str, str, str]:
    m = re.search(re.escape(BEGIN) + r"\n(.*?)" + re.escape(END), text, flags=re.S)
    assert m, f"{DOC}: markers {BEGIN} / {END} missing"
    return text[: m.start(1)], m.group(1), text[m.end(1):]


def test_bundle_doc_table_reference_is_current():
    _, body, _ = _split(DOC.read_text())
    assert body.strip() == _generated(), \
        "docs/bundle.md table reference is stale: run `python tests/test_analysis_docs.py --write`"


def test_every_registered_table_is_documented():
    from hintscope import schema

    text = DOC.read_text()
    for name in schema.all_tables():
        assert f"#### `{name}`" in text


if __name__ == "__main__" and "--write" in sys.argv:
    sys.path.insert(0, str(DOC.parent.parent))
    head, _, tail = _split(DOC.read_text())
    DOC.write_text(head + _generated() + "\n" + tail)
    print(f"wrote {DOC}")
