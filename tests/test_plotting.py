"""Figures render under Agg to non-empty PNGs of the expected pixel size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
Image = pytest.importorskip("PIL.Image")

from xmodal.plotting import (  # noqa: E402
    plot_heads_grid,
    plot_token_heatmaps,
    plot_token_patch_matrix,
)


def _png_size(fig, path: Path) -> tuple[int, int]:
    fig.savefig(path)  # no bbox_inches="tight": the size is figsize · dpi
    assert path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_token_heatmaps(tmp_path: Path) -> None:
    image = torch.rand(3, 32, 32)
    maps = torch.softmax(torch.randn(5, 16), -1)
    maps[2] = 0  # a token that saw no image
    fig = plot_token_heatmaps(image, maps, ["what", "is", "the", "red", "?"], dpi=50)
    # 6 panels (image + 5 tokens) in one row of at most 6: 6 · 1.6 in x 1.6 in at 50 dpi.
    assert _png_size(fig, tmp_path / "heat.png") == (480, 80)
    titles = [ax.get_title() for ax in fig.axes]
    assert "the (no image)" in titles
    assert "red" in titles


def test_token_heatmaps_wraps_rows_and_takes_uint8_hwc(tmp_path: Path) -> None:
    image = torch.randint(0, 256, (24, 36, 3), dtype=torch.uint8)
    maps = torch.softmax(torch.randn(4, 6), -1)
    fig = plot_token_heatmaps(
        image,
        maps,
        grid=(2, 3),
        columns=3,
        dpi=40,
        title="q",
        extent=(-6, 42, 30, -6),
        box=(1, 2, 10, 12),
        scale="token",
    )
    # 5 panels in rows of 3: 2 rows; width 3 · 1.6 in, height 2 · 1.6 + 0.3 in at 40 dpi.
    assert _png_size(fig, tmp_path / "wrap.png") == (192, 140)


def test_heads_grid(tmp_path: Path) -> None:
    weights = torch.softmax(torch.randn(4, 3, 16), -1)  # (h, t, i)
    fig = plot_heads_grid(weights, ["a", "b", "c"], dpi=50)
    assert len(fig.axes) == 12
    # width 4 · 0.9 + 0.8 in, height 3 · 0.9 + 0.3 in at 50 dpi.
    assert _png_size(fig, tmp_path / "heads.png") == (220, 150)


def test_token_patch_matrix(tmp_path: Path) -> None:
    maps = torch.softmax(torch.randn(4, 10), -1)
    fig = plot_token_patch_matrix(
        maps, ["w0", "w1", "w2", "w3"], patch_labels=[f"p{k}" for k in range(10)], dpi=50
    )
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["w0", "w1", "w2", "w3"]
    assert _png_size(fig, tmp_path / "matrix.png") == (400, 120)  # 8 in x (0.3·4 + 1.2) in


def test_no_pyplot_and_no_show() -> None:
    fig = plot_token_patch_matrix(torch.rand(2, 4))
    assert not hasattr(fig, "number")  # pyplot numbers the figures it manages


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"cannot guess the patch grid of 6 image tokens"):
        plot_token_heatmaps(torch.rand(8, 8), torch.rand(2, 6))
    with pytest.raises(ValueError, match=r"tokens has 1 labels, but the maps have 2 text tokens"):
        plot_token_heatmaps(torch.rand(8, 8), torch.rand(2, 4), ["x"])
    with pytest.raises(ValueError, match=r"grid must be \(rows, columns\) with rows·columns = 4"):
        plot_heads_grid(torch.rand(2, 2, 4), grid=(3, 2))
    with pytest.raises(ValueError, match=r"maps must have shape \(t, i\), got shape \(2, 2, 4\)"):
        plot_token_patch_matrix(torch.rand(2, 2, 4))
    with pytest.raises(ValueError, match="scale must be 'shared' or 'token', got 'x'"):
        plot_token_heatmaps(torch.rand(8, 8), torch.rand(2, 4), scale="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"image must have shape \(H, W\), \(H, W, C\) or"):
        plot_token_heatmaps(torch.rand(8, 8, 5), torch.rand(2, 4))


def test_xmodal_show_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from xmodal.checkpoint import save_checkpoint
    from xmodal.cli.main import main
    from xmodal.models.vqa import VQAConfig, VQAModel

    config = VQAConfig(
        dim=16, stem_channels=(4, 4, 4), image_layers=1, num_heads=2, ff_mult=1.0, mlp_hidden=8
    )
    ckpt = tmp_path / "model.safetensors"
    save_checkpoint(ckpt, VQAModel(config), config={"model": config.to_dict()})
    out = tmp_path / "show.png"
    assert main(["show", "--checkpoint", str(ckpt), "--seed", "2", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (960, 350)  # 6 x 1.6 in wide, 2 x 1.6 + 0.3 in (title) high, 100 dpi
    printed = capsys.readouterr().out
    assert "truth" in printed
    assert str(out) in printed
    question = ["--question", "Is the red object on the top?", "--layer", "rollout"]
    heads = tmp_path / "heads.png"
    argv = ["show", "--checkpoint", str(ckpt), *question, "--out", str(out)]
    assert main([*argv, "--heads-out", str(heads)]) == 0
    with Image.open(heads) as im:  # 2 heads x 8 words of 0.9-in panels, 100 dpi
        assert im.size == (260, 750)
    assert main(["show", "--checkpoint", str(ckpt), "--layer", "7", "--out", str(out)]) == 2
    assert "--layer must be 'rollout' or a layer index in 0..1" in capsys.readouterr().err
    assert main(["show", "--checkpoint", str(tmp_path / "none.safetensors")]) == 2
    assert "error: no checkpoint at" in capsys.readouterr().err


def test_docs_inspect_code_blocks_run() -> None:
    """Every ```python block of docs/inspect.md runs, in order, in one namespace."""
    import re

    doc = Path(__file__).resolve().parent.parent / "docs" / "inspect.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, str(doc), "exec"), namespace)
