"""Every ```python block of docs/interop.md runs, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "interop.md"
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)


def test_interop_doc_python_blocks_run() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("flamingo_pytorch")
    blocks = BLOCK.findall(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 6  # the mask example and one per converter
    namespace: dict[str, object] = {"__name__": "__interop_doc__"}
    for number, source in enumerate(blocks, start=1):
        try:
            exec(compile(source, f"docs/interop.md python block {number}", "exec"), namespace)
        except Exception as error:  # name the block, keep the traceback
            raise AssertionError(f"docs/interop.md python block {number} failed") from error
