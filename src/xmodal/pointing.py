"""The pointing game (Zhang et al., 2016): does the most-attended image location hit the object?

Legend: ``n`` questions (maps), ``i`` image tokens laid out as a ``gh × gw`` patch grid in
row-major order (``i = gh·gw``), ``H × W`` the image size in pixels.

For each question, take the image token with the largest attention weight (the first one on a
tie) and ask whether its patch centre falls inside the named object's bounding box **dilated
by** ``dilation`` **patches** on every side (one patch by default: a patch-level map cannot
point more finely than a patch, and Zhang et al. likewise allow a 15-pixel tolerance). The
score is the fraction of hits. A map row that is all zero (the question saw no image) is a
miss.

Two baselines are reported beside it:

* ``chance`` -- the hit rate of a uniformly random patch under the *same* rule (the fraction of
  patches whose centres lie in the dilated box), averaged over questions. This is the honest
  chance level for the dilated game, and the one to compare with. When the model may attend
  only to some patches (``allowed``, e.g. a foreground mask), the random patch is drawn from
  those: a pointer that can only land on objects deserves no credit for avoiding background.
* ``area_fraction`` -- the object's box area over the image area (the undilated chance level
  of a pixel-level pointer). It is smaller than ``chance``; quoting it alone would flatter the
  score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_POINTING_CHOICE",
    "SELECTION_SEED",
    "PointingResult",
    "pointing_game",
    "pointing_hits",
    "pointing_table_markdown",
    "sort_of_clevr_pointing",
    "stem_patch_centers",
    "text_self_attention",
]


@dataclass(frozen=True)
class PointingResult:
    """The outcome of :func:`pointing_game`.

    Attributes:
        score: fraction of questions whose most-attended patch hits the dilated box.
        chance: a uniformly random patch's expected hit rate under the same rule.
        area_fraction: mean box area over image area (undilated).
        count: number of questions.
        hits: boolean ``(n,)``, one per question.
    """

    score: float
    chance: float
    area_fraction: float
    count: int
    hits: Tensor

    def to_dict(self, prefix: str = "pointing_game") -> dict[str, float | int]:
        """JSON-ready numbers: ``{prefix: score, prefix_chance: ..., ...}``."""
        return {
            prefix: self.score,
            f"{prefix}_chance": self.chance,
            f"{prefix}_area_fraction": self.area_fraction,
            f"{prefix}_count": self.count,
        }


def _pair(name: str, value: object) -> tuple[int, int]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"{name} must be a pair of positive ints (rows, columns), got {value!r}")
    return int(value[0]), int(value[1])


def _grid_centers(grid: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
    """``(i, 2)`` float64 ``(x, y)`` pixel centres of a uniform ``gh × gw`` grid, row-major."""
    gh, gw = grid
    height, width = image_size
    cy = (torch.arange(gh, dtype=torch.float64) + 0.5) * (height / gh)  # (gh,)
    cx = (torch.arange(gw, dtype=torch.float64) + 0.5) * (width / gw)  # (gw,)
    return torch.stack(
        [cx[None, :].expand(gh, gw).reshape(-1), cy[:, None].expand(gh, gw).reshape(-1)], dim=1
    )  # (i, 2)


def _patch_hit_table(
    boxes: Tensor,
    grid: tuple[int, int],
    image_size: tuple[int, int],
    dilation: float,
    centers: Tensor | None,
) -> Tensor:
    """Boolean ``(n, i)``: does patch ``i``'s centre lie inside box ``n`` dilated by patches."""
    ph, pw = image_size[0] / grid[0], image_size[1] / grid[1]  # patch size in pixels
    c = _grid_centers(grid, image_size) if centers is None else centers.to(torch.float64).cpu()
    cx, cy = c[:, 0], c[:, 1]  # (i,)
    b = boxes.to(torch.float64).cpu()
    x0 = b[:, 0:1] - dilation * pw  # (n, 1)
    y0 = b[:, 1:2] - dilation * ph
    x1 = b[:, 2:3] + dilation * pw
    y1 = b[:, 3:4] + dilation * ph
    return (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)  # (n, i)


def _check_inputs(
    maps: object,
    boxes: object,
    grid: object,
    image_size: object,
    dilation: object,
    centers: object = None,
) -> tuple[Tensor, Tensor, tuple[int, int], tuple[int, int], float]:
    if not isinstance(maps, Tensor):
        raise TypeError(f"maps must be a torch.Tensor (n, i), got {type(maps).__name__}")
    if not maps.is_floating_point():
        raise TypeError(f"maps must be a floating-point tensor, got dtype {maps.dtype}")
    if not isinstance(boxes, Tensor):
        raise TypeError(f"boxes must be a torch.Tensor (n, 4), got {type(boxes).__name__}")
    g = _pair("grid", grid)
    size = _pair("image_size", image_size)
    if maps.dim() != 2 or maps.shape[1] != g[0] * g[1]:
        raise ValueError(
            f"maps must have shape (n, i) with i = gh·gw = {g[0] * g[1]} for grid={g}, got "
            f"shape {tuple(maps.shape)}"
        )
    if boxes.dim() != 2 or boxes.shape != (maps.shape[0], 4):
        raise ValueError(
            f"boxes must have shape (n, 4) = ({maps.shape[0]}, 4) as (x0, y0, x1, y1) pixels, "
            f"got shape {tuple(boxes.shape)}"
        )
    if isinstance(dilation, bool) or not isinstance(dilation, (int, float)) or dilation < 0:
        raise ValueError(f"dilation must be a non-negative number of patches, got {dilation!r}")
    if centers is not None and (
        not isinstance(centers, Tensor) or tuple(centers.shape) != (g[0] * g[1], 2)
    ):
        got = tuple(centers.shape) if isinstance(centers, Tensor) else type(centers).__name__
        raise ValueError(
            f"patch_centers must be a tensor (i, 2) = ({g[0] * g[1]}, 2) of (x, y) pixels, "
            f"got {got}"
        )
    return maps, boxes, g, size, float(dilation)


def pointing_hits(
    maps: Tensor,
    boxes: Tensor,
    *,
    grid: tuple[int, int],
    image_size: tuple[int, int],
    dilation: float = 1.0,
    patch_centers: Tensor | None = None,
) -> Tensor:
    """Per question: does the most-attended patch hit the dilated box? Boolean ``(n,)``.

    Arguments as in :func:`pointing_game`.
    """
    maps, boxes, g, size, dil = _check_inputs(
        maps, boxes, grid, image_size, dilation, patch_centers
    )
    return _hits(maps, _patch_hit_table(boxes, g, size, dil, patch_centers))


def _hits(maps: Tensor, table: Tensor) -> Tensor:
    """``(n,)`` bool: the most-attended patch of each ``(n, i)`` map is a hit in ``table``."""
    best = maps.argmax(dim=-1, keepdim=True)  # (n, 1), first index on a tie
    saw_image = maps.sum(dim=-1) > 0  # (n,)
    return table.to(maps.device).gather(1, best).squeeze(1) & saw_image


def pointing_game(
    maps: Tensor,
    boxes: Tensor,
    *,
    grid: tuple[int, int],
    image_size: tuple[int, int],
    dilation: float = 1.0,
    patch_centers: Tensor | None = None,
    allowed: Tensor | None = None,
) -> PointingResult:
    """Score attention maps with the pointing game (see the module docstring).

    Args:
        maps: ``(n, i)`` one attention map over the image tokens per question (e.g. a head-
            fused map of the token that names the object, or a rolled-out map).
        boxes: ``(n, 4)`` the named object's box per question, ``(x0, y0, x1, y1)`` in pixels
            of an ``image_size`` image.
        grid: ``(gh, gw)`` the patch grid of the image tokens (row-major, ``i = gh·gw``).
        image_size: ``(H, W)`` in pixels.
        dilation: grow the box by this many patches on every side (default 1); a patch is
            ``H / gh`` by ``W / gw`` pixels.
        patch_centers: ``(i, 2)`` the ``(x, y)`` pixel centre of each image token, where it is
            not the centre of a uniform grid cell (a strided conv stem's cells are centred on
            its sampling points, not on the cells of the image divided evenly).
        allowed: ``(n, i)`` bool, the tokens each question's map could point at (``True`` =
            attendable); ``chance`` then draws its random patch from these. Default: all.

    Returns:
        a :class:`PointingResult` (``score``, ``chance``, ``area_fraction``, ``count``,
        ``hits``). With ``n = 0`` the fractions are NaN.
    """
    maps, boxes, g, size, dil = _check_inputs(
        maps, boxes, grid, image_size, dilation, patch_centers
    )
    table = _patch_hit_table(boxes, g, size, dil, patch_centers)  # (n, i), checked once
    hits = _hits(maps, table)
    n = maps.shape[0]
    if n == 0:
        nan = float("nan")
        return PointingResult(score=nan, chance=nan, area_fraction=nan, count=0, hits=hits)
    b = boxes.to(torch.float64)
    area = ((b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)) / (
        size[0] * size[1]
    )
    if allowed is None:
        chance = table.double().mean().item()
    else:
        if not isinstance(allowed, Tensor) or allowed.dtype != torch.bool:
            got = allowed.dtype if isinstance(allowed, Tensor) else type(allowed).__name__
            raise TypeError(f"allowed must be a bool tensor, got {got}")
        if allowed.shape != table.shape or not allowed.any(-1).all():
            raise ValueError(
                f"allowed must have shape {tuple(table.shape)} with at least one True per row, "
                f"got shape {tuple(allowed.shape)}"
            )
        hit_allowed = (table & allowed.to(table.device)).double().sum(-1)
        chance = (hit_allowed / allowed.double().sum(-1).to(table.device)).mean().item()
    return PointingResult(
        score=hits.double().mean().item(),
        chance=chance,
        area_fraction=area.mean().item(),
        count=n,
        hits=hits,
    )


# ----------------------------------------------------------------------------------------------
# The pointing game on the Sort-of-CLEVR VQA model

POINTING_SOURCES_DOC = """
Map choices scored by :func:`sort_of_clevr_pointing` (the ``pointing_game_table`` keys,
``"<source>/<token>/<heads>"``):

* source ``layer{k}``: the ``k``-th gated cross-attention block's map; ``rollout``: the
  rollout (:func:`xmodal.rollout`, residual 0.5) through every cross-attention block *and* the
  text self-attention layers between them (recorded from ``nn.MultiheadAttention`` with its
  fast path switched off for the pass);
* token ``color``: the row of the word that names the object (``red`` in "What is the shape of
  the red object?"); ``words``: the mean of the rows of the question's words;
* heads ``mean`` / ``max`` / ``head{h}`` (one head; not for the rollout):
  :func:`xmodal.fuse_heads`.
"""

DEFAULT_POINTING_CHOICE = "auto"
"""What :func:`sort_of_clevr_pointing` reports as ``pointing_game`` by default: the table entry
that scores best on a separate selection split (seed :data:`SELECTION_SEED`)."""


def stem_patch_centers(strides: tuple[int, ...], grid: tuple[int, int]) -> Tensor:
    """``(i, 2)`` ``(x, y)`` pixel centres of the cells of 3×3, padding-1 convolutions.

    Output cell ``k`` of such a convolution is centred on input cell ``stride·k``; through the
    stack, on pixel ``prod(strides)·k``, whose centre is at ``prod(strides)·k + 0.5``.
    """
    step = math.prod(strides)
    gh, gw = grid
    cy = torch.arange(gh, dtype=torch.float64) * step + 0.5
    cx = torch.arange(gw, dtype=torch.float64) * step + 0.5
    return torch.stack(
        [cx[None, :].expand(gh, gw).reshape(-1), cy[:, None].expand(gh, gw).reshape(-1)], dim=1
    )  # (i, 2)


def text_self_attention(model: nn.Module) -> list[nn.MultiheadAttention]:
    """The ``nn.MultiheadAttention`` of a VQA model's text layers (``model.text_layers``)."""
    layers = getattr(model, "text_layers", None)
    if not isinstance(layers, nn.ModuleList):
        return []
    return [
        m
        for layer in layers
        for m in [getattr(layer, "self_attn", None)]
        if isinstance(m, nn.MultiheadAttention)
    ]


SELECTION_SEED = 2
"""Seed of the split on which ``choice="auto"`` picks the reported map (never a test seed)."""


def sort_of_clevr_pointing(
    model: nn.Module,
    data: Any,
    *,
    choice: str = "auto",
    dilation: float = 1.0,
    batch_size: int = 200,
    device: str | torch.device = "cpu",
    selection_images: int = 100,
) -> dict[str, Any]:
    """The pointing game of a Sort-of-CLEVR :class:`~xmodal.models.vqa.VQAModel`.

    Asks ``model`` every non-relational question of ``data`` (those name one object, and the
    model must find it), records its cross-attention, and scores each map choice (see
    ``POINTING_SOURCES_DOC``) against the named object's box (its 11 × 11 pixels) dilated by
    ``dilation`` patches. Image tokens are placed at the centres of the conv stem's sampling
    points.

    Args:
        model: a ``"flamingo"`` :class:`~xmodal.models.vqa.VQAModel` (with cross-attention).
        data: a :class:`~xmodal.data.sort_of_clevr.SortOfClevr` split with object positions
            (a fresh :func:`~xmodal.data.sort_of_clevr.generate` split has them).
        choice: the table entry reported as ``pointing_game``: a key such as
            ``"layer1/color/mean"``, or ``"auto"`` (default): the entry that scores best on a
            *separate* selection split (``selection_images`` fresh images of seed
            :data:`SELECTION_SEED`), so the reported number is not picked on ``data``.
        dilation: patches added to each side of the box.
        batch_size: questions per forward pass.
        device: where to run the model.
        selection_images: size of the selection split for ``choice="auto"``.

    Returns:
        a JSON-ready dict: ``pointing_game`` (the chosen entry's score on ``data``),
        ``pointing_game_chance`` (a random patch's hit rate under the same rule),
        ``pointing_game_area_fraction``, ``pointing_game_choice``,
        ``pointing_game_selection`` (how it was chosen, and its score on the selection split),
        ``pointing_game_dilation``, ``pointing_game_count``, ``pointing_game_accuracy`` (answer
        accuracy on these questions), ``pointing_game_any_object`` (a diagnostic: how often
        the chosen map's point lands on *any* of the scene's objects, named or not) and
        ``pointing_game_table`` (every entry's score).
    """
    config = getattr(model, "config", None)
    cross_blocks = getattr(model, "cross_blocks", None)
    if config is None or not cross_blocks:
        raise ValueError(
            f"model must be a VQAModel with cross-attention (kind 'flamingo'), got "
            f"{type(model).__name__} of kind {getattr(config, 'kind', None)!r}"
        )
    if getattr(data, "object_center", None) is None:
        raise ValueError("data has no object positions (object_center); generate() a split")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    choices = _pointing_keys(len(cross_blocks), cross_blocks[0].num_heads)
    if choice != "auto" and choice not in choices:
        raise ValueError(f"choice must be 'auto' or one of {choices}, got {choice!r}")

    kwargs: dict[str, Any] = {"dilation": dilation, "batch_size": batch_size, "device": device}
    if choice == "auto":
        from xmodal.data.sort_of_clevr import generate

        picked, _, _ = _pointing_table(
            model, generate(selection_images, seed=SELECTION_SEED), **kwargs
        )
        choice = max(choices, key=lambda key: picked[key].score)  # first of equals
        selection = (
            f"best of {len(choices)} on {selection_images} images of seed {SELECTION_SEED} "
            f"({picked[choice].score:.3f})"
        )
    else:
        selection = "given"
    table, any_object, accuracy = _pointing_table(model, data, **kwargs)
    chosen = table[choice]
    return {
        "pointing_game": chosen.score,
        "pointing_game_chance": chosen.chance,
        "pointing_game_area_fraction": chosen.area_fraction,
        "pointing_game_choice": choice,
        "pointing_game_selection": selection,
        "pointing_game_dilation": dilation,
        "pointing_game_count": chosen.count,
        "pointing_game_accuracy": accuracy,
        "pointing_game_any_object": any_object[choice],
        "pointing_game_table": {key: table[key].score for key in choices},
    }


def _pointing_keys(num_layers: int, num_heads: int) -> list[str]:
    """Every ``source/token/heads`` entry: per layer mean, max and each head; rollout mean, max."""
    keys = []
    for k in range(num_layers):
        for heads in ["mean", "max", *(f"head{h}" for h in range(num_heads))]:
            keys += [f"layer{k}/color/{heads}", f"layer{k}/words/{heads}"]
    for heads in ("mean", "max"):
        keys += [f"rollout/color/{heads}", f"rollout/words/{heads}"]
    return keys


def _pointing_table(
    model: nn.Module,
    data: Any,
    *,
    dilation: float,
    batch_size: int,
    device: str | torch.device,
) -> tuple[dict[str, PointingResult], dict[str, float], float]:
    """Score every entry of :func:`_pointing_keys` on ``data``'s non-relational questions.

    Returns ``(results per key, any-object rate per key, answer accuracy)``.
    """
    import numpy as np

    from xmodal.attention_maps import fuse_heads, record_attention, record_mha_attention, rollout
    from xmodal.data.sort_of_clevr import COLOR_NAMES, IMAGE_SIZE, OBJECT_SIZE, encode_words
    from xmodal.data.sort_of_clevr import tokenize as tokenize_words
    from xmodal.models.vqa import images_to_tensor

    config: Any = model.config
    cross_blocks: Any = model.cross_blocks
    num_layers, num_heads = len(cross_blocks), cross_blocks[0].num_heads

    select = np.flatnonzero(~np.asarray(data.relational))  # (N',) non-relational questions
    texts = [str(x) for x in np.asarray(data.question_text)[select]]
    color_pos = []
    color_id = []
    for words in (tokenize_words(x) for x in texts):
        hits = [k for k, w in enumerate(words) if w in COLOR_NAMES]
        if len(hits) != 1:
            raise ValueError(f"expected one color word in a non-relational question, got {words}")
        color_pos.append(hits[0])
        color_id.append(COLOR_NAMES.index(words[hits[0]]))
    image_of = np.asarray(data.image_index)[select]
    everyone = torch.as_tensor(np.asarray(data.object_center)[image_of], dtype=torch.float64)
    r = OBJECT_SIZE
    all_boxes = torch.cat([everyone - r, everyone + r + 1], dim=-1)  # (N', 6, 4) x0 y0 x1 y1
    boxes = all_boxes[torch.arange(len(select)), torch.as_tensor(color_id, dtype=torch.long)]
    words_ids = torch.as_tensor(encode_words(texts, length=config.max_words))  # (N', t)
    answers = torch.as_tensor(np.asarray(data.answers)[select])

    cross_names = [f"cross_blocks.{k}.attn" for k in range(num_layers)]
    self_modules = text_self_attention(model)
    maps: dict[str, list[Tensor]] = {}
    correct: list[Tensor] = []
    allowed: list[Tensor] = []  # (B, i) per batch, when the model hides background tokens
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(select), batch_size):
            rows = slice(start, start + batch_size)
            images = images_to_tensor(data.images[image_of[rows]]).to(device)  # (B, 3, H, W)
            questions = words_ids[rows].to(device)[:, None, :]  # (B, 1, t)
            keep = (questions[:, 0] != 0).float()  # (B, t)
            pos = torch.as_tensor(color_pos[rows], device=device)
            with (
                torch.no_grad(),
                record_attention(model, names=cross_names) as recorded,
                record_mha_attention(self_modules) as self_maps,
            ):
                logits = model(images, questions)  # (B, 1, a)
            correct.append(logits[:, 0].argmax(-1).cpu() == answers[rows])
            if getattr(config, "foreground_mask", False):
                from xmodal.models.vqa import foreground_cells

                allowed.append(
                    foreground_cells(images, tuple(config.stem_strides)).flatten(1).cpu()
                )
            sources: dict[str, Tensor] = {}  # "source/heads" -> (B, t, i)
            for heads in ("mean", "max"):
                layer_maps = [fuse_heads(recorded[n], heads) for n in cross_names]
                for k in range(num_layers):
                    sources[f"layer{k}/{heads}"] = layer_maps[k]
                sources[f"rollout/{heads}"] = rollout(layer_maps, self_maps=self_maps[:num_layers])
            for k, name in enumerate(cross_names):
                for h in range(num_heads):
                    sources[f"layer{k}/head{h}"] = fuse_heads(recorded[name], h)
            for key, m in sources.items():
                source, heads = key.split("/")
                m = m.float()
                color_row = m[torch.arange(m.shape[0], device=m.device), pos]  # (B, i)
                word_rows = (m * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
                for token, row in (("color", color_row), ("words", word_rows)):
                    maps.setdefault(f"{source}/{token}/{heads}", []).append(row.cpu())
    finally:
        model.train(was_training)

    geometry: dict[str, Any] = {
        "grid": config.grid,
        "image_size": (IMAGE_SIZE, IMAGE_SIZE),
        "dilation": dilation,
        "patch_centers": stem_patch_centers(tuple(config.stem_strides), config.grid),
    }
    attendable = torch.cat(allowed) if allowed else None
    table: dict[str, PointingResult] = {}
    any_object: dict[str, float] = {}
    for key, parts in maps.items():
        m = torch.cat(parts)  # (N', i)
        table[key] = pointing_game(m, boxes, **geometry, allowed=attendable)
        on_any = torch.zeros(len(select), dtype=torch.bool)
        for k in range(all_boxes.shape[1]):  # does the point land on any object at all?
            on_any |= pointing_hits(m, all_boxes[:, k], **geometry)
        any_object[key] = on_any.double().mean().item() if len(select) else float("nan")
    accuracy = torch.cat(correct).double().mean().item() if correct else float("nan")
    return table, any_object, accuracy


def _column_label(column: str) -> str:
    token, heads = column.split("/")
    label = f"head {heads[4:]}" if heads.startswith("head") else f"{heads} of heads"
    return f"{token}, {label}"


def pointing_table_markdown(result: dict[str, Any]) -> str:
    """A Markdown table of :func:`sort_of_clevr_pointing`'s result: sources × (token, heads)."""
    table = result["pointing_game_table"]
    sources = list(dict.fromkeys(key.split("/")[0] for key in table))
    columns = list(dict.fromkeys("/".join(key.split("/")[1:]) for key in table))
    lines = [
        "| map | " + " | ".join(_column_label(c) for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for source in sources:
        cells = []
        for column in columns:
            key = f"{source}/{column}"
            mark = "**" if key == result["pointing_game_choice"] else ""
            cells.append(f"{mark}{table[key]:.1%}{mark}" if key in table else "")
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"{result['pointing_game_count']} questions; chance (a random attendable patch, same rule) "
        f"{result['pointing_game_chance']:.1%}; object area fraction "
        f"{result['pointing_game_area_fraction']:.1%}; box dilated by "
        f"{result['pointing_game_dilation']:g} patch; answer accuracy on these questions "
        f"{result['pointing_game_accuracy']:.1%}; the reported choice points at *some* object "
        f"{result.get('pointing_game_any_object', float('nan')):.1%} of the time. "
        f"Bold: the reported `pointing_game` ({result['pointing_game_choice']}, "
        f"{result.get('pointing_game_selection', 'given')})."
    )
    return "\n".join(lines)
