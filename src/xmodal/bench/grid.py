"""The benchmark grid: shapes, cells and the named presets of ``xmodal bench``.

Legend: ``b`` batch, ``t`` text tokens, ``i`` image tokens, ``h`` heads, ``d`` head width,
``D`` text width, ``E`` image width.

A :class:`Cell` is one point of the grid -- a shape, a dtype, a mode (inference forward or
training forward+backward) and whether a key-padding mask is passed. Every implementation is
timed on the same inputs in a cell. Presets are plain lists of cells, built by the functions at
the end of this file; the documentation (``docs/benchmarks.md``) says why each shape is there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = [
    "DTYPES",
    "MODES",
    "PRESETS",
    "Cell",
    "Shape",
    "attention_flops",
    "cell_flops",
    "make_cells",
    "projection_flops",
]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("infer", "train")


@dataclass(frozen=True)
class Shape:
    """Sizes of one cross-attention call."""

    batch: int  # b
    text_len: int  # t: queries
    image_len: int  # i: keys and values
    text_dim: int  # D: width of the text features and of the output
    image_dim: int  # E: width of the image features
    num_heads: int  # h
    head_dim: int  # d

    def __post_init__(self) -> None:
        for name in (
            "batch",
            "text_len",
            "image_len",
            "text_dim",
            "image_dim",
            "num_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Shape.{name} must be a positive int, got {value!r}")

    @property
    def inner_dim(self) -> int:
        """``h·d``, the width of queries, keys and values."""
        return self.num_heads * self.head_dim

    @property
    def label(self) -> str:
        """A compact name such as ``b4 t20 i196 D256 h8 d32`` (``E`` shown when ``E != D``)."""
        image = "" if self.image_dim == self.text_dim else f" E{self.image_dim}"
        return (
            f"b{self.batch} t{self.text_len} i{self.image_len} D{self.text_dim}{image} "
            f"h{self.num_heads} d{self.head_dim}"
        )


@dataclass(frozen=True)
class Cell:
    """One grid point: every implementation is timed on the same inputs here."""

    shape: Shape
    dtype: str  # "fp32" or "bf16"
    mode: str  # "infer": forward under inference_mode; "train": forward + backward
    masked: bool  # pass a (b, i) key-padding mask (a quarter of the image tokens padded)
    group: str = ""  # the series this cell belongs to (plots draw one panel per group)
    tags: tuple[str, ...] = field(default=())  # e.g. "issue2-notebook": cells a target reads

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"Cell.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.mode not in MODES:
            raise ValueError(f"Cell.mode must be one of {MODES}, got {self.mode!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def label(self) -> str:
        mask = "mask" if self.masked else "nomask"
        return f"{self.shape.label} {self.dtype} {self.mode} {mask}"


def attention_flops(shape: Shape) -> int:
    """Multiply-adds of the attention core, counted as 2 FLOPs each: ``4·b·h·t·i·d``.

    ``Q·Kᵀ`` and ``P·V`` are each ``b·h·t·i·d`` multiply-adds; softmax, scaling and masking
    are not counted (the convention of the FlashAttention papers).
    """
    s = shape
    return 4 * s.batch * s.num_heads * s.text_len * s.image_len * s.head_dim


def projection_flops(shape: Shape) -> int:
    """FLOPs of the four projections: ``2·b·(t·D·hd + 2·i·E·hd + t·hd·D)`` (biases ignored)."""
    s = shape
    hd = s.inner_dim
    return 2 * s.batch * (2 * s.text_len * s.text_dim * hd + 2 * s.image_len * s.image_dim * hd)


def cell_flops(cell: Cell, *, core: bool) -> int:
    """FLOPs of one timed step: forward, or forward + backward (3x forward) in training.

    ``core=True`` counts the attention core alone (implementations that take projected
    ``q, k, v``); otherwise the projections are added.
    """
    forward = attention_flops(cell.shape) + (0 if core else projection_flops(cell.shape))
    return forward * (3 if cell.mode == "train" else 1)


# ---------------------------------------------------------------------------------------------
# Presets

NOTEBOOK = Shape(
    batch=4, text_len=20, image_len=196, text_dim=256, image_dim=256, num_heads=8, head_dim=32
)
LARGE = Shape(
    batch=1, text_len=2048, image_len=4096, text_dim=1024, image_dim=1024, num_heads=16, head_dim=64
)


def _sweep(image_lens: tuple[int, ...], **sizes: int) -> list[Shape]:
    return [Shape(image_len=i, **sizes) for i in image_lens]


def _preset_issue2() -> list[Cell]:
    """Issue 2's comparison: the notebook's shape and the large shape, fp32 and bf16, inference."""
    return [
        Cell(shape, dtype, "infer", False, group=group, tags=(f"issue2-{group}",))
        for group, shape in (("notebook", NOTEBOOK), ("large", LARGE))
        for dtype in DTYPES
    ]


def _preset_quick() -> list[Cell]:
    """About a minute on two cores: the notebook's cell in every mode, and a short sweep."""
    cells = [
        Cell(NOTEBOOK, dtype, mode, masked, group="notebook", tags=("issue2-notebook",))
        for dtype, mode, masked in (
            ("fp32", "infer", False),
            ("bf16", "infer", False),
            ("fp32", "infer", True),
            ("fp32", "train", False),
        )
    ]
    sizes = dict(batch=1, text_len=64, text_dim=256, image_dim=256, num_heads=4, head_dim=64)
    cells += [
        Cell(shape, "fp32", "infer", False, group="sweep-t64-D256")
        for shape in _sweep((64, 256, 576, 1601), **sizes)
    ]
    return cells


def _preset_full() -> list[Cell]:
    """The grid of ``docs/benchmarks.md``: 28 cells, about 15 minutes on one core."""
    cells = [
        Cell(NOTEBOOK, dtype, mode, masked, group="notebook", tags=("issue2-notebook",))
        for dtype in DTYPES
        for mode in MODES
        for masked in (False, True)
    ]
    # The image-length sweep: a 1024-wide model with 256 text tokens against 64 (a resampler's
    # latents) to 4096 image tokens; 576 = LLaVA's 24x24 patches, 1601 = Llama 3.2 Vision's tile.
    sizes = dict(batch=1, text_len=256, text_dim=1024, image_dim=1024, num_heads=16, head_dim=64)
    for shape in _sweep((64, 256, 576, 1601, 4096), **sizes):
        for dtype in DTYPES:
            cells.append(Cell(shape, dtype, "infer", False, group="sweep-t256-D1024"))
            if shape.image_len == 576:
                cells.append(Cell(shape, dtype, "train", False, group="train-t256-D1024"))
            if shape.image_len == 1601:
                cells.append(Cell(shape, dtype, "infer", True, group="mask-t256-D1024"))
    wide = Shape(
        batch=1, text_len=32, image_len=1601, text_dim=4096, image_dim=4096, num_heads=32,
        head_dim=128,
    )  # fmt: skip
    long_text = Shape(
        batch=1, text_len=2048, image_len=576, text_dim=1024, image_dim=1024, num_heads=8,
        head_dim=128,
    )  # fmt: skip
    for dtype in DTYPES:
        cells.append(Cell(LARGE, dtype, "infer", False, group="large", tags=("issue2-large",)))
        cells.append(Cell(wide, dtype, "infer", False, group="wide-t32-D4096"))
        cells.append(Cell(long_text, dtype, "infer", False, group="d128-t2048"))
    return cells


def _preset_gpu() -> list[Cell]:
    """bf16 part of the full grid plus H100-typical shapes: head width 128, t and i up to 8192."""
    cells = [c for c in _preset_full() if c.dtype == "bf16"]
    for t, i in ((2048, 2048), (2048, 8192), (8192, 2048), (8192, 8192)):
        shape = Shape(
            batch=1, text_len=t, image_len=i, text_dim=2048, image_dim=2048, num_heads=16,
            head_dim=128,
        )  # fmt: skip
        cells.append(Cell(shape, "bf16", "infer", False, group="h100-d128"))
    for t, i in ((2048, 8192), (8192, 8192)):
        shape = Shape(
            batch=1, text_len=t, image_len=i, text_dim=2048, image_dim=2048, num_heads=32,
            head_dim=64,
        )  # fmt: skip
        cells.append(Cell(shape, "bf16", "infer", False, group="h100-d64"))
    shape = Shape(
        batch=1, text_len=4096, image_len=4096, text_dim=2048, image_dim=2048, num_heads=16,
        head_dim=128,
    )  # fmt: skip
    cells.append(Cell(shape, "bf16", "train", False, group="h100-train"))
    return cells


def _preset_smoke() -> list[Cell]:
    """Tiny shapes (dims <= 32) that exercise every code path in a second: for tests."""
    tiny = dict(batch=2, text_len=5, text_dim=32, image_dim=32, num_heads=4, head_dim=8)
    cells = [
        Cell(Shape(image_len=12, **tiny), dtype, mode, masked, group="smoke")
        for dtype, mode, masked in (
            ("fp32", "infer", False),
            ("fp32", "infer", True),
            ("bf16", "infer", False),
            ("fp32", "train", True),
        )
    ]
    cells += [
        Cell(Shape(image_len=i, **tiny), "fp32", "infer", False, group="smoke-sweep")
        for i in (4, 16)
    ]
    return cells


PRESETS = {
    "smoke": _preset_smoke,
    "quick": _preset_quick,
    "issue2": _preset_issue2,
    "full": _preset_full,
    "gpu": _preset_gpu,
}


def make_cells(
    preset: str,
    *,
    dtypes: tuple[str, ...] | None = None,
    modes: tuple[str, ...] | None = None,
) -> list[Cell]:
    """The cells of a preset, optionally restricted to some dtypes and modes."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    cells = PRESETS[preset]()
    if dtypes is not None:
        cells = [c for c in cells if c.dtype in dtypes]
    if modes is not None:
        cells = [c for c in cells if c.mode in modes]
    return cells
