"""Pictures of cross-modal attention: where each word looked.

Legend: ``t`` text tokens, ``i`` image tokens laid out as a ``gh × gw`` patch grid in
row-major order (``i = gh·gw``), ``h`` heads, ``H × W`` the image in pixels.

matplotlib (the ``viz`` extra: ``pip install 'xmodal[viz]'``) is imported inside the functions,
so ``import xmodal`` never needs it. The functions build a :class:`matplotlib.figure.Figure`
directly -- no ``pyplot``, no global state, no ``show()`` -- and return it: save it with
``fig.savefig("out.png")``, or display it in a notebook. They work under any backend, Agg
included.

* :func:`plot_token_heatmaps` -- one panel per token: the patch grid upsampled to the image
  and blended over it;
* :func:`plot_heads_grid` -- tokens × heads: each head's map per token;
* :func:`plot_token_patch_matrix` -- the raw ``t × i`` matrix, token labels on the rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_heads_grid", "plot_token_heatmaps", "plot_token_patch_matrix"]


def _figure(width: float, height: float, dpi: int) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "xmodal.plotting needs matplotlib: pip install 'xmodal[viz]' (or matplotlib)"
        ) from err
    return Figure(figsize=(width, height), dpi=dpi)


def _as_map(name: str, x: object, rank: int, shape: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have shape {shape}, got shape {tuple(x.shape)}")
    return x.detach().float().cpu()


def _grid_for(i: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is None:
        side = math.isqrt(i)
        if side * side != i:
            raise ValueError(
                f"cannot guess the patch grid of {i} image tokens (not a square); pass grid="
                f"(rows, columns)"
            )
        return side, side
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(g, int) and g > 0 for g in grid)
        or grid[0] * grid[1] != i
    ):
        raise ValueError(f"grid must be (rows, columns) with rows·columns = {i}, got {grid!r}")
    return int(grid[0]), int(grid[1])


def _check_tokens(tokens: Sequence[str] | None, t: int) -> list[str]:
    if tokens is None:
        return [str(k) for k in range(t)]
    labels = [str(tok) for tok in tokens]
    if len(labels) != t:
        raise ValueError(f"tokens has {len(labels)} labels, but the maps have {t} text tokens")
    return labels


def _image_hwc(image: object) -> Tensor:
    """Any ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` picture as float ``(H, W, 3)`` in [0, 1]."""
    if not isinstance(image, Tensor):
        try:
            image = torch.as_tensor(image)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"image must be a tensor or array (H, W[, C]) or (C, H, W), got "
                f"{type(image).__name__}"
            ) from err
    x = image.detach().cpu()
    if x.dim() == 2:
        x = x[..., None]  # (H, W, 1)
    elif x.dim() == 3 and x.shape[0] in (1, 3, 4) and x.shape[-1] not in (1, 3, 4):
        x = x.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if x.dim() != 3 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"image must have shape (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4; got "
            f"{tuple(image.shape)}"
        )
    x = x[..., :3] if x.shape[-1] != 1 else x.expand(*x.shape[:2], 3)
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    x = x.float()
    return x.clamp(0.0, 1.0)


def plot_token_heatmaps(
    image: object,
    maps: Tensor,
    tokens: Sequence[str] | None = None,
    *,
    grid: tuple[int, int] | None = None,
    extent: tuple[float, float, float, float] | None = None,
    box: Sequence[float] | None = None,
    scale: Literal["shared", "token"] = "shared",
    alpha: float = 0.6,
    columns: int | None = None,
    title: str | None = None,
    dpi: int = 100,
) -> Figure:
    """Where each text token looked: one panel per token, its map blended over the image.

    Each token's patch map is drawn over the picture with the ``inferno`` colour map,
    interpolated bilinearly between patch centres, on one colour scale shared by all tokens
    (``scale="shared"``: a token that spreads its attention looks dim) or scaled by each
    token's own maximum (``scale="token"``). The first panel
    shows the picture alone. A token that saw no image gets the plain picture and
    "(no image)" in its label. Panels are 1.6 inches square.

    Args:
        image: ``(H, W, 3)``, ``(3, H, W)`` or ``(H, W)``; uint8, or float in [0, 1].
        maps: ``(t, i)`` one sample's head-fused map (see :func:`xmodal.fuse_heads`).
        tokens: ``t`` labels (default: the indices).
        grid: ``(gh, gw)`` the patch grid; default square.
        extent: ``(left, right, bottom, top)`` pixel coordinates of the grid's outer edges
            (default ``(0, W, H, 0)``: the grid divides the image evenly). A strided conv stem
            centres cell ``k`` on pixel ``s·k``: its grid spans ``(-s/2, gw·s - s/2, ...)``.
        box: ``(x0, y0, x1, y1)`` pixels: a rectangle drawn on every token's panel (e.g. the
            object the question names).
        scale: ``"shared"`` (default) or ``"token"``, see above.
        alpha: opacity of the heat map over the picture.
        columns: panels per row (default: up to 6).
        title: a title over the figure.
        dpi: dots per inch: the saved PNG is ``columns·1.6·dpi`` pixels wide.

    Returns:
        the :class:`~matplotlib.figure.Figure`.
    """
    maps = _as_map("maps", maps, 2, "(t, i)")
    t, i = maps.shape
    g = _grid_for(i, grid)
    labels = _check_tokens(tokens, t)
    picture = _image_hwc(image).numpy()  # (H, W, 3)
    height, width = picture.shape[:2]
    cells = (0.0, float(width), float(height), 0.0) if extent is None else extent
    if len(cells) != 4:
        raise ValueError(f"extent must be (left, right, bottom, top), got {extent!r}")
    if box is not None and len(box) != 4:
        raise ValueError(f"box must be (x0, y0, x1, y1) pixels, got {box!r}")
    if scale not in ("shared", "token"):
        raise ValueError(f"scale must be 'shared' or 'token', got {scale!r}")
    peak = maps.amax(dim=-1, keepdim=True) if scale == "token" else maps.amax()
    heat = (maps / peak.clamp_min(1e-12)).reshape(t, *g)  # (t, gh, gw) in [0, 1]
    saw = maps.sum(dim=-1) > 0

    panel = 1.6
    panels = t + 1
    cols = min(panels, 6) if columns is None else max(1, int(columns))
    rows = math.ceil(panels / cols)
    fig = _figure(cols * panel, rows * panel + (0.3 if title else 0.0), dpi)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    axes.flat[0].imshow(picture)
    axes.flat[0].set_title("image", fontsize=8)
    for k in range(t):
        ax = axes.flat[k + 1]
        ax.imshow(picture, extent=(0, width, height, 0))
        if saw[k]:
            ax.imshow(
                heat[k].numpy(),
                cmap="inferno",
                alpha=alpha,
                vmin=0.0,
                vmax=1.0,
                extent=cells,
                interpolation="bilinear",
            )
            ax.set_title(labels[k], fontsize=8)
        else:
            ax.set_title(f"{labels[k]} (no image)", fontsize=8)
        if box is not None:
            from matplotlib.patches import Rectangle

            x0, y0, x1, y1 = (float(v) for v in box)
            ax.add_patch(
                Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="cyan", lw=1.0)
            )
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
    if title:
        fig.suptitle(title, fontsize=9)
    top = 1.0 - (0.3 + 0.25) / (rows * panel + 0.3) if title else 1.0 - 0.25 / (rows * panel)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.05, hspace=0.2)
    return fig


def plot_heads_grid(
    weights: Tensor,
    tokens: Sequence[str] | None = None,
    *,
    grid: tuple[int, int] | None = None,
    panel_size: float = 0.9,
    dpi: int = 100,
) -> Figure:
    """Tokens × heads: each head's patch map for each token, on one shared colour scale.

    Args:
        weights: ``(h, t, i)`` one sample's maps of one layer (``maps[name][0]``).
        tokens: ``t`` row labels (default: the indices).
        grid: ``(gh, gw)`` the patch grid; default square.
        panel_size: inches per panel.
        dpi: dots per inch.

    Returns:
        the :class:`~matplotlib.figure.Figure` (``t`` rows, ``h`` columns).
    """
    weights = _as_map("weights", weights, 3, "(h, t, i)")
    h, t, i = weights.shape
    g = _grid_for(i, grid)
    labels = _check_tokens(tokens, t)
    vmax = max(float(weights.max()), 1e-12)
    fig = _figure(h * panel_size + 0.8, t * panel_size + 0.3, dpi)
    axes = fig.subplots(t, h, squeeze=False)
    for row in range(t):
        for head in range(h):
            ax = axes[row, head]
            ax.imshow(weights[head, row].reshape(g).numpy(), cmap="viridis", vmin=0.0, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"head {head}", fontsize=7)
            if head == 0:
                ax.set_ylabel(labels[row], fontsize=7, rotation=0, ha="right", va="center")
    fig.subplots_adjust(left=0.8 / (h * panel_size + 0.8), right=0.99, bottom=0.01, top=0.93)
    return fig


def plot_token_patch_matrix(
    maps: Tensor,
    tokens: Sequence[str] | None = None,
    *,
    patch_labels: Sequence[str] | None = None,
    width: float = 8.0,
    height: float | None = None,
    dpi: int = 100,
) -> Figure:
    """The ``t × i`` attention matrix as an image, one row per token, with token labels.

    Args:
        maps: ``(t, i)`` one sample's map (head-fused, or one head).
        tokens: ``t`` row labels (default: the indices).
        patch_labels: ``i`` column labels (default: the patch index on a sparse axis).
        width, height: inches (height default: from the token count).
        dpi: dots per inch.

    Returns:
        the :class:`~matplotlib.figure.Figure`, with a colour bar.
    """
    maps = _as_map("maps", maps, 2, "(t, i)")
    t, i = maps.shape
    labels = _check_tokens(tokens, t)
    if patch_labels is not None and len(patch_labels) != i:
        raise ValueError(f"patch_labels has {len(patch_labels)} labels, but the maps have {i}")
    fig = _figure(width, 0.3 * t + 1.2 if height is None else height, dpi)
    ax = fig.add_subplot(1, 1, 1)
    image: Any = ax.imshow(maps.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(t))
    ax.set_yticklabels(labels, fontsize=8)
    if patch_labels is not None:
        ax.set_xticks(range(i))
        ax.set_xticklabels([str(p) for p in patch_labels], fontsize=6, rotation=90)
    ax.set_xlabel("image token")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    fig.subplots_adjust(left=0.15, right=0.95, bottom=0.2, top=0.95)
    return fig
