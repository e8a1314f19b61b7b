"""A small Flamingo-style VQA model for Sort-of-CLEVR, assembled from xmodal's blocks.

Legend: ``b`` images in the batch, ``q`` questions per image, ``t`` words per question,
``i`` image tokens (a ``g_h × g_w`` grid), ``D`` width of text and image tokens, ``a`` answers.

Read this file top to bottom: it is the whole model.

1. **Image encoder** -- a small conv stem (stride-2 3×3 convolutions, 75×75 -> 10×10 by
   default) keeps each 11-pixel object's shape in a few cells; optionally each pixel's
   ``(x, y)`` enters the stem as two more channels (CoordConv), so a cell can say where within
   it an object lies. Each cell's coordinates ``(x, y, x² + y²)`` are appended to its features
   and learned row and column embeddings added, so the tokens say where they are; a few
   self-attention layers over the image tokens let objects see each other, which the
   relational questions need (what is *closest to*, *furthest from*, how many *others* share a
   shape). Optionally their scores get a learned per-head bias ``slope · d²`` in the squared
   distance ``d²`` between cells (plus a learned near-field term), so "nearest first" and
   "furthest first" are one parameter away, and tokens whose patch is plain background are
   masked out of every attention (``foreground_mask``).
2. **Question** -- word embeddings plus 1-D positions. Each layer is Flamingo's pattern: a
   :class:`~xmodal.blocks.GatedCrossAttentionBlock` (text attends to the image tokens, through
   tanh gates whose initial value is a setting, with q/k RMSNorm) followed by a text
   self-attention layer.
3. **Answer head** -- mean over the question's words, then a small MLP to the 10 answers.

Each image is encoded once per batch and all its questions are asked against it: the
cross-attention sees the ``q`` questions as one text of ``q·t`` tokens attending to that image
(cross-attention has no interaction between queries, so this is exact), while text
self-attention runs per question on ``(b·q, t, D)``.

Two controls share the file, selected by :attr:`VQAConfig.kind`:

* ``"cnn_mlp"`` -- the paper's CNN+MLP baseline: the same conv stem, flattened, and the
  question's mean word embedding, through an MLP. No attention at all.
* ``"blind"`` -- the question model without the image (no encoder, no cross-attention):
  what can be answered from the question alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.blocks import GatedCrossAttentionBlock
from xmodal.data.sort_of_clevr import ANSWERS, IMAGE_SIZE, MAX_QUESTION_WORDS, VOCAB

__all__ = [
    "KINDS",
    "VQAConfig",
    "VQAModel",
    "cross_entropy",
    "foreground_cells",
    "images_to_tensor",
    "recalibrate_batchnorm",
]

KINDS = ("flamingo", "cnn_mlp", "blind")


@dataclass(frozen=True)
class VQAConfig:
    """Sizes and variant of :class:`VQAModel` (saved in every checkpoint's metadata)."""

    kind: str = "flamingo"  # "flamingo", "cnn_mlp" (baseline) or "blind" (no image)
    dim: int = 64  # width D of image and text tokens
    stem_channels: tuple[int, ...] = (32, 64, 64)  # conv stem widths, one 3×3 conv each
    stem_strides: tuple[int, ...] = (2, 2, 2)  # their strides: 75 -> 38 -> 19 -> 10
    image_layers: int = 2  # self-attention layers over the image tokens
    text_layers: int = 2  # (gated cross-attention, text self-attention) pairs
    num_heads: int = 4  # heads of every attention layer; head width dim // num_heads
    ff_mult: float = 2.0  # feed-forward hidden width = ff_mult · dim
    gate_init: float = 0.5  # initial tanh-gate alpha (Flamingo: 0, for a frozen LM)
    qk_norm: bool = True  # RMSNorm on cross-attention queries and keys (sharper, stabler early)
    coord_features: bool = True  # append each cell's (x, y, x² + y²) to its conv features
    pixel_coords: bool = False  # CoordConv: feed each pixel's (x, y) to the stem as 2 channels
    foreground_mask: bool = False  # attend only to image tokens whose patch is not all white
    distance_bias: bool = False  # image self-attention scores += slope[head] · squared distance
    distance_ring: bool = False  # ... + weight[head] · exp(-d²/cell²): learned near-field term
    mlp_hidden: int = 256  # hidden width of the CNN+MLP baseline's MLP
    vocab_size: int = len(VOCAB)
    num_answers: int = len(ANSWERS)
    max_words: int = MAX_QUESTION_WORDS

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if len(self.stem_channels) != len(self.stem_strides) or not self.stem_channels:
            raise ValueError(
                f"stem_channels and stem_strides must be non-empty and of equal length, got "
                f"{self.stem_channels} and {self.stem_strides}"
            )
        for name in ("dim", "num_heads", "vocab_size", "num_answers", "max_words", "mlp_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.distance_ring and not self.distance_bias:
            raise ValueError("distance_ring=True needs distance_bias=True")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")

    @property
    def grid(self) -> tuple[int, int]:
        """``(g_h, g_w)``: the image-token grid the stem produces."""
        n = IMAGE_SIZE
        for s in self.stem_strides:
            n = (n - 1) // s + 1  # 3×3 conv, padding 1
        return n, n

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stem_channels"], d["stem_strides"] = list(self.stem_channels), list(self.stem_strides)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQAConfig:
        """Build from a plain dict (TOML or JSON); unknown keys are a ``ValueError``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; known: {sorted(known)}")
        d = dict(d)
        for key in ("stem_channels", "stem_strides"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def images_to_tensor(images: Any) -> Tensor:
    """uint8 RGB ``(b, 75, 75, 3)`` (numpy or torch) -> float ``(b, 3, 75, 75)`` in [0, 1]."""
    x = torch.as_tensor(images)
    if x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must have shape (b, H, W, 3), got {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float().div(255.0)  # (b, 3, H, W)


class ImageEncoder(nn.Module):
    """Conv stem -> ``(b, i, D)`` tokens with 2-D positions -> ``image_layers`` self-attention."""

    coords: Tensor  # (g_h, g_w, 3) buffer: x, y in [-1, 1] and x² + y²
    squared_distances: Tensor  # (i, i) buffer: between cell centres, in those coordinates
    near_field: Tensor  # (i, i) buffer: exp(-d² / cell spacing²)

    def __init__(self, config: VQAConfig) -> None:
        super().__init__()
        self.stem = conv_stem(config)
        g_h, g_w = config.grid
        self.coord_features = config.coord_features
        self.foreground_mask = config.foreground_mask
        self.strides = tuple(config.stem_strides)
        ys, xs = torch.meshgrid(
            torch.linspace(-1, 1, g_h), torch.linspace(-1, 1, g_w), indexing="ij"
        )
        # (x, y) in [-1, 1] and x² + y²: with these, minus the squared distance between two
        # cells is a bilinear form of their features -- what "closest to" attention needs.
        coords = torch.stack([xs, ys, xs**2 + ys**2], dim=-1)  # (g_h, g_w, 3)
        self.register_buffer("coords", coords, persistent=False)
        self.proj = nn.Linear(config.stem_channels[-1] + 3 * config.coord_features, config.dim)
        self.row_embed = nn.Parameter(torch.randn(g_h, 1, config.dim) * 0.02)
        self.col_embed = nn.Parameter(torch.randn(1, g_w, config.dim) * 0.02)
        self.layers = nn.ModuleList(
            _self_attention_layer(config, ImageSelfAttentionLayer)
            for _ in range(config.image_layers)
        )
        self.distance_slopes: nn.Parameter | None = None
        if config.distance_bias:
            # One learned slope per layer and head, spread from "nearest first" (negative) to
            # "furthest first" (positive): the relational questions ask for both.
            slopes = torch.linspace(-4.0, 4.0, config.num_heads).repeat(config.image_layers, 1)
            self.distance_slopes = nn.Parameter(slopes)  # (image_layers, h)
        self.ring_weights: nn.Parameter | None = None
        if config.distance_ring:
            # Starts negative: a token's own object (within about a cell) is pushed back, so
            # the "nearest first" heads see the nearest *other* object.
            self.ring_weights = nn.Parameter(
                torch.full((config.image_layers, config.num_heads), -4.0)
            )
        flat = coords[..., :2].reshape(-1, 2)  # (i, 2)
        d2 = torch.cdist(flat, flat).square()  # (i, i), in [0, 8]
        cell = 2.0 / (max(g_h, g_w) - 1)  # spacing of neighbouring cells
        self.register_buffer("squared_distances", d2, persistent=False)
        self.register_buffer("near_field", torch.exp(-d2 / cell**2), persistent=False)
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(b, 3, 75, 75)`` float in [0, 1] -> image tokens ``(b, i, D)``, row-major, and
        their keep-mask ``(b, i)`` (``True`` = foreground) or ``None`` (all tokens count)."""
        keep = None
        if self.foreground_mask:
            keep = foreground_cells(images, self.strides).flatten(1)  # (b, i)
        x = self.stem(images).permute(0, 2, 3, 1)  # (b, g_h, g_w, C)
        if self.coord_features:  # the RN paper tags each cell with its coordinates, too
            x = torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1)], dim=-1)
        x = self.proj(x)  # (b, g_h, g_w, D)
        x = x + self.row_embed + self.col_embed
        x = x.flatten(1, 2)  # (b, i, D)
        pad = None if keep is None else ~keep  # (b, i): True = ignore (PyTorch's convention)
        for k, layer in enumerate(self.layers):
            if self.distance_slopes is None:
                x = layer(x, src_key_padding_mask=pad)
            else:
                x = layer(x, src_mask=self._distance_bias(k, pad))
        return self.norm(x), keep

    def _distance_bias(self, layer: int, pad: Tensor | None) -> Tensor:
        """Additive scores ``(b·h, i, i)``: slope · squared distance (+ ring · near field), and
        a very negative but finite value on padded keys (no row can become all ``-inf``)."""
        assert self.distance_slopes is not None
        bias = self.distance_slopes[layer, :, None, None] * self.squared_distances  # (h, i, i)
        if self.ring_weights is not None:
            bias = bias + self.ring_weights[layer, :, None, None] * self.near_field
        if pad is None:
            return bias
        hidden = torch.zeros(pad.shape, dtype=bias.dtype, device=bias.device)
        hidden = hidden.masked_fill(pad, -torch.finfo(bias.dtype).max / 4)  # (b, i)
        bias = bias.unsqueeze(0) + hidden[:, None, None, :]  # (b, h, i, i)
        return bias.flatten(0, 1)  # (b·h, i, i), as nn.MultiheadAttention wants


def foreground_cells(images: Tensor, strides: tuple[int, ...]) -> Tensor:
    """Which image tokens show an object: ``(b, 3, H, W)`` -> ``(b, g_h, g_w)`` bool.

    A pixel is foreground if any channel is below white by more than half a uint8 step. A
    token of a stride-``s`` stem (``s = prod(strides)``) is centred on pixel ``s·k`` (see
    :func:`xmodal.pointing.stem_patch_centers`); it is foreground if any pixel of the
    ``s × s`` patch around that centre is. An image with no foreground at all keeps every
    token (nothing hidden, rather than everything).
    """
    step = math.prod(strides)
    x = (images < 1.0 - 0.5 / 255).any(dim=1, keepdim=True).to(images.dtype)  # (b, 1, H, W)
    x = F.max_pool2d(x, step, stride=step, padding=step // 2)  # (b, 1, g_h, g_w)
    keep = x[:, 0] > 0
    return keep | ~keep.flatten(1).any(-1)[:, None, None]


def conv_stem(config: VQAConfig) -> nn.Sequential:
    """3×3 conv -> BatchNorm -> ReLU per entry of ``stem_channels``: ``(b, 3, 75, 75)`` ->
    ``(b, C, g_h, g_w)``.

    BatchNorm trained much faster here than GroupNorm or no norm (measured). Its running
    statistics lag behind fast-moving weights, so :func:`xmodal.training.train` recomputes them
    on fixed training images before every evaluation (:func:`recalibrate_batchnorm`).

    With ``pixel_coords`` the stem starts with :class:`PixelCoordinates` (CoordConv, Liu et al.
    2018): each pixel's ``(x, y)`` enters as two more input channels, so a cell can say where
    *within* it an object lies -- the 10×10 grid alone places objects only to 7.5 px.
    """
    layers: list[nn.Module] = []
    c_in = 3
    if config.pixel_coords:
        layers.append(PixelCoordinates())
        c_in += 2
    for c_out, stride in zip(config.stem_channels, config.stem_strides, strict=True):
        layers += [
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]
        c_in = c_out
    return nn.Sequential(*layers)


class PixelCoordinates(nn.Module):
    """Append each pixel's ``(x, y)`` in [-1, 1]: ``(b, C, H, W)`` -> ``(b, C + 2, H, W)``."""

    def forward(self, images: Tensor) -> Tensor:
        b, _, h, w = images.shape
        ys = torch.linspace(-1, 1, h, device=images.device, dtype=images.dtype)
        xs = torch.linspace(-1, 1, w, device=images.device, dtype=images.dtype)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))  # (2, H, W): x, then y
        return torch.cat([images, grid.expand(b, -1, -1, -1)], dim=1)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: Tensor, *, batch_size: int = 32) -> None:
    """Recompute every BatchNorm's running mean and variance on ``images`` ``(n, 3, H, W)``.

    The statistics become the plain average over the batches of ``batch_size`` images (what
    the model saw in training mode); nothing else changes. Without this, evaluation used
    running averages of weights long gone and validation accuracy swung by 30 points between
    epochs (measured). Deterministic for fixed ``images``.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    was_training = model.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calls below
        m.train()
    stems = [
        m
        for m in model.modules()
        if isinstance(m, nn.Sequential)
        and any(isinstance(c, nn.modules.batchnorm._BatchNorm) for c in m.children())
    ]
    for start in range(0, len(images), batch_size):
        for stem in stems:
            stem(images[start : start + batch_size])
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)


class ImageSelfAttentionLayer(nn.TransformerEncoderLayer):
    """A pre-norm ``nn.TransformerEncoderLayer`` that always takes the plain path.

    PyTorch's inference fast path returns NaN for a per-head float ``src_mask`` ``(b·h, i, i)``
    (the distance bias; seen with torch 2.13), so these layers compute as in training.
    Same parameters and names as the parent, so checkpoints load either way.
    """

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        x = src + self._sa_block(self.norm1(src), src_mask, src_key_padding_mask, is_causal)
        return x + self._ff_block(self.norm2(x))


def _self_attention_layer(
    config: VQAConfig, layer: type[nn.TransformerEncoderLayer] = nn.TransformerEncoderLayer
) -> nn.TransformerEncoderLayer:
    return layer(
        config.dim,
        config.num_heads,
        dim_feedforward=int(config.ff_mult * config.dim),
        dropout=0.0,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )


class VQAModel(nn.Module):
    """Answer Sort-of-CLEVR questions about images. See the module docstring for the design.

    Args:
        config: a :class:`VQAConfig`.

    Shapes:
        images ``(b, 3, 75, 75)`` float in [0, 1] (see :func:`images_to_tensor`); questions
        ``(b, q, t)`` int64 word ids (``0`` = padding, at the end), ``t <= config.max_words``;
        output logits ``(b, q, a)`` over :data:`~xmodal.data.sort_of_clevr.ANSWERS`.
    """

    def __init__(self, config: VQAConfig) -> None:
        super().__init__()
        if not isinstance(config, VQAConfig):
            raise TypeError(f"config must be a VQAConfig, got {type(config).__name__}")
        self.config = config
        d = config.dim
        self.word_embed = nn.Embedding(config.vocab_size, d, padding_idx=0)
        self.image_encoder: ImageEncoder | None = None
        if config.kind == "flamingo":
            self.image_encoder = ImageEncoder(config)
        if config.kind == "cnn_mlp":
            self.stem = conv_stem(config)
            g_h, g_w = config.grid
            flat = config.stem_channels[-1] * g_h * g_w
            # The MLP's first layer on [image, question] as two halves: the image half is
            # computed once per image, not once per question (the same function).
            self.mlp_image = nn.Linear(flat, config.mlp_hidden)
            self.mlp_question = nn.Linear(d, config.mlp_hidden, bias=False)
            self.mlp = nn.Sequential(
                nn.ReLU(),
                nn.Linear(config.mlp_hidden, config.mlp_hidden),
                nn.ReLU(),
                nn.Linear(config.mlp_hidden, config.num_answers),
            )
            return
        self.pos_embed = nn.Parameter(torch.randn(config.max_words, d) * 0.02)
        self.cross_blocks = nn.ModuleList()
        if config.kind == "flamingo":
            self.cross_blocks.extend(
                GatedCrossAttentionBlock(
                    d,
                    num_heads=config.num_heads,
                    head_dim=d // config.num_heads,
                    ff_mult=config.ff_mult,
                    gate_init=config.gate_init,
                    qk_norm=config.qk_norm,
                )
                for _ in range(config.text_layers)
            )
        self.text_layers = nn.ModuleList(
            _self_attention_layer(config) for _ in range(config.text_layers)
        )
        self.head = nn.Sequential(
            nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, config.num_answers)
        )

    def forward(self, images: Tensor, questions: Tensor) -> Tensor:
        """Logits ``(b, q, a)`` for ``questions`` ``(b, q, t)`` about ``images`` ``(b, 3, H, W)``.

        Word id ``0`` is padding: padded positions are never attended to by the text
        self-attention and are left out of the answer pooling.
        """
        if questions.dim() != 3 or questions.dtype != torch.int64:
            raise ValueError(
                f"questions must be int64 word ids of shape (b, q, t), got {questions.dtype} "
                f"shape {tuple(questions.shape)}"
            )
        b, q, t = questions.shape
        if t > self.config.max_words:
            raise ValueError(
                f"questions have {t} words, more than max_words={self.config.max_words}"
            )
        if images.dim() != 4 or images.shape[0] != b:
            raise ValueError(
                f"images must have shape ({b}, 3, H, W) for questions of shape "
                f"{tuple(questions.shape)}, got {tuple(images.shape)}"
            )
        keep = questions != 0  # (b, q, t): real words
        words = self.word_embed(questions)  # (b, q, t, D)
        if self.config.kind == "cnn_mlp":
            return self._cnn_mlp(images, words, keep)

        d = self.config.dim
        x = words + self.pos_embed[:t]  # (b, q, t, D)
        image, image_keep = None, None
        if self.image_encoder is not None:
            image, image_keep = self.image_encoder(images)  # (b, i, D), (b, i) or None
        pad = ~keep.reshape(b * q, t)  # (b·q, t): True = padding (PyTorch's convention)
        for layer, self_attn in enumerate(self.text_layers):
            if image is not None:
                # All q questions of an image attend to it as one text of q·t tokens.
                x = self.cross_blocks[layer](
                    x.reshape(b, q * t, d), image, image_keep
                )  # (b, q·t, D)
            x = self_attn(x.reshape(b * q, t, d), src_key_padding_mask=pad)  # (b·q, t, D)
        x = x.reshape(b, q, t, d)
        w = keep.unsqueeze(-1).to(x.dtype)  # (b, q, t, 1)
        pooled = (x * w).sum(2) / w.sum(2).clamp_min(1.0)  # (b, q, D)
        return self.head(pooled)  # (b, q, a)

    def _cnn_mlp(self, images: Tensor, words: Tensor, keep: Tensor) -> Tensor:
        w = keep.unsqueeze(-1).to(words.dtype)  # (b, q, t, 1)
        question = (words * w).sum(2) / w.sum(2).clamp_min(1.0)  # (b, q, D)
        image = self.stem(images).flatten(1)  # (b, C·g_h·g_w)
        h = self.mlp_image(image).unsqueeze(1) + self.mlp_question(question)  # (b, q, H)
        return self.mlp(h)  # (b, q, a)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def cross_entropy(logits: Tensor, answers: Tensor) -> Tensor:
    """Mean cross-entropy of logits ``(b, q, a)`` against answers ``(b, q)``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), answers.reshape(-1))
