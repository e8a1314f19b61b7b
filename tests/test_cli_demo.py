"""``xmodal demo --notebook``: the notebook's example runs and prints the shapes it printed."""

from __future__ import annotations

import re

import pytest

from xmodal.cli.main import main


def test_demo_prints_the_notebooks_shapes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--notebook"]) == 0
    out = capsys.readouterr().out
    # The two lines the seed notebook printed, character for character.
    assert "Cross-modal attention output shape: torch.Size([4, 20, 256])" in out.splitlines()
    assert "Attention weights shape: torch.Size([4, 8, 20, 196])" in out.splitlines()
    assert "path: explicit" in out
    assert "path: fused" in out


def test_demo_fused_and_explicit_agree_and_padding_is_ignored(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo", "--notebook", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    diff = re.search(r"max \|fused - explicit\| = (\S+)", out)
    assert diff is not None
    assert float(diff.group(1)) < 1e-5
    padding = re.search(r"weight on padded patches = (\S+), rows sum to (\S+)", out)
    assert padding is not None
    assert float(padding.group(1)) == 0.0
    assert float(padding.group(2)) == pytest.approx(1.0, abs=1e-4)


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "demo" in capsys.readouterr().err
