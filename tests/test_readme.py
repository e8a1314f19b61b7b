"""Every ```python block in README.md runs, in order, in one namespace (as a reader would)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks() -> list[str]:
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def test_readme_has_python_blocks() -> None:
    assert len(python_blocks()) >= 2  # the quickstart and the mask convention at least


def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands in a scratch directory
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for number, source in enumerate(python_blocks(), start=1):
        code = compile(source, f"README.md python block {number}", "exec")
        try:
            exec(code, namespace)
        except Exception as error:  # name the block, keep the original traceback
            raise AssertionError(f"README python block {number} failed:\n{source}") from error
