"""flamingo-pytorch modules and OpenFlamingo checkpoints -> xmodal blocks and resamplers.

Legend: ``b`` batch, ``t`` text tokens, ``m`` media, ``n`` tokens per medium, ``h`` heads,
``d`` head width, ``D`` text width (``dim``), ``E`` image width (``dim_visual``; equal to ``D``
in flamingo-pytorch), ``F`` feed-forward width, ``l`` latents.

OpenFlamingo's ``helpers.py`` grew out of flamingo-pytorch and keeps its parameter names, so one
key table serves both (``attn.*`` and ``ff.*`` of a gated block; ``layers.{k}.0`` /
``layers.{k}.1`` of a resampler):

==============================  ===========================================  ===================
flamingo key                    xmodal key                                   shape
==============================  ===========================================  ===================
**gated block**
``attn.norm.weight`` / ``bias`` ``norm.weight`` / ``bias`` (LayerNorm)       ``(D,)``
``attn.to_q.weight``            ``attn.text_query.weight``                   ``(h·d, D)``
``attn.to_kv.weight``           rows ``[:h·d]`` -> ``attn.image_key.weight``, ``(2·h·d, E)``
                                rows ``[h·d:]`` -> ``attn.image_value.weight``
``attn.to_out.weight``          ``attn.output_proj.weight``                  ``(D, h·d)``
``attn_gate``                   ``attn_gate.alpha``                          ``(1,)``
``ff.0.weight`` / ``bias``      ``ff.norm.weight`` / ``bias`` (LayerNorm)    ``(D,)``
``ff.1.weight``                 ``ff.proj_in.weight`` (then GELU)            ``(F, D)``
``ff.3.weight``                 ``ff.proj_out.weight``                       ``(D, F)``
``ff_gate``                     ``ff_gate.alpha``                            ``(1,)``
**resampler**
``latents``                     ``latents``                                  ``(l, D)``
``media_pos_emb`` (fp) /        ``media_embed`` (flattened)                  ``(m, 1, D)`` ->
``media_time_embs`` (OF)                                                     ``(m, D)``
``frame_embs`` (OF)             ``frame_embed``                              ``(f, D)``
``layers.{k}.0.norm_media.*``   ``layers.{k}.norm_media.*``                  ``(D,)``
``layers.{k}.0.norm_latents.*`` ``layers.{k}.norm_latents.*``                ``(D,)``
``layers.{k}.0.to_q.weight``    ``layers.{k}.attn.text_query.weight``        ``(h·d, D)``
``layers.{k}.0.to_kv.weight``   halves -> ``layers.{k}.attn.image_key`` /    ``(2·h·d, D)``
                                ``image_value.weight``
``layers.{k}.0.to_out.weight``  ``layers.{k}.attn.output_proj.weight``       ``(D, h·d)``
``layers.{k}.1.{0,1,3}.*``      ``layers.{k}.ff.{norm,proj_in,proj_out}.*``
``norm.weight`` / ``bias``      ``norm.weight`` / ``bias``                   ``(D,)``
==============================  ===========================================  ===================

Head counts are not in the weights (only ``h·d`` is): :func:`from_flamingo_pytorch` reads them
from the module, :func:`load_open_flamingo` takes them as arguments (OpenFlamingo: 8 heads of
64 in both places).

Mask policy: ``immediate`` (``only_attend_immediate_media=True``, OpenFlamingo's setting) or
``all_previous`` (``False``); build it with ``xmodal.media_attention_mask(media_locations, n,
num_media=m, policy=...)`` from the same ``media_locations``.

Known differences, on text tokens that see no image (before the first image, or in a row
without images) -- every other token agrees to float rounding:

* flamingo-pytorch and OpenFlamingo still add ``tanh(ff_gate) * ff(x)`` to such a token (and,
  with ``only_attend_immediate_media=False``, a uniform average over all media through the
  attention gate); the converted block passes it through unchanged (xmodal's rule).
* A row with more image markers than media slots makes the originals attend uniformly from the
  extra tokens; ``media_attention_mask`` rejects it with a ``ValueError`` instead.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from xmodal.attention import CrossModalAttention
from xmodal.blocks import GatedCrossAttentionBlock
from xmodal.feedforward import FeedForward
from xmodal.gating import TanhGate
from xmodal.interop._load import Remapper, match_source
from xmodal.resampler import PerceiverResampler

__all__ = [
    "OpenFlamingoWeights",
    "flamingo_media_policy",
    "from_flamingo_pytorch",
    "load_open_flamingo",
]

logger = logging.getLogger(__name__)

# keys of one gated block, flamingo name -> xmodal name (``to_kv`` is split separately)
_BLOCK_KEYS = {
    "attn.norm.weight": "norm.weight",
    "attn.norm.bias": "norm.bias",
    "attn.to_q.weight": "attn.text_query.weight",
    "attn.to_out.weight": "attn.output_proj.weight",
    "attn_gate": "attn_gate.alpha",
    "ff.0.weight": "ff.norm.weight",
    "ff.0.bias": "ff.norm.bias",
    "ff.1.weight": "ff.proj_in.weight",
    "ff.3.weight": "ff.proj_out.weight",
    "ff_gate": "ff_gate.alpha",
}
# keys of one resampler layer, ``layers.{k}.`` stripped
_PERCEIVER_LAYER_KEYS = {
    "0.norm_media.weight": "norm_media.weight",
    "0.norm_media.bias": "norm_media.bias",
    "0.norm_latents.weight": "norm_latents.weight",
    "0.norm_latents.bias": "norm_latents.bias",
    "0.to_q.weight": "attn.text_query.weight",
    "0.to_out.weight": "attn.output_proj.weight",
    "1.0.weight": "ff.norm.weight",
    "1.0.bias": "ff.norm.bias",
    "1.1.weight": "ff.proj_in.weight",
    "1.3.weight": "ff.proj_out.weight",
}
_MEDIA_EMBEDS = ("media_pos_emb", "media_time_embs")  # flamingo-pytorch, OpenFlamingo


def from_flamingo_pytorch(module: nn.Module) -> GatedCrossAttentionBlock | PerceiverResampler:
    """Convert a flamingo-pytorch (or OpenFlamingo ``helpers.py``) ``GatedCrossAttentionBlock``
    or ``PerceiverResampler`` into the xmodal module of the same name.

    The result has the module's dtype, device and train/eval mode. A converted block expects
    the mask ``xmodal.media_attention_mask(media_locations, n, num_media=m, policy=p)`` with
    ``p = "immediate"`` if ``module.attn.only_attend_immediate_media`` else ``"all_previous"``
    (:func:`flamingo_media_policy` returns it). A converted resampler takes the same
    ``(b, m, n, D)`` media (flamingo-pytorch) or ``(b, m, f, n, D)`` (OpenFlamingo).

    Raises:
        TypeError: ``module`` is neither of those classes.
        ValueError: the heads do not divide the inner width.
        ConversionError: a key is missing or unexpected, or a shape does not fit (named).
    """
    kind = _flamingo_kind(module)
    source = f"{type(module).__module__}.{type(module).__name__}"
    foreign: Any = module  # its submodules are read by name
    if kind == "GatedCrossAttentionBlock":
        heads = int(foreign.attn.heads)
        block = _block_from_state(module.state_dict(), num_heads=heads, source=source)
        match_source(block, module)
        return block
    heads = int(foreign.layers[0][0].heads)
    perceiver = _perceiver_from_state(module.state_dict(), num_heads=heads, source=source)
    match_source(perceiver, module)
    return perceiver


def flamingo_media_policy(block: nn.Module) -> str:
    """The xmodal mask policy of a flamingo-pytorch / OpenFlamingo gated block:
    ``"immediate"`` or ``"all_previous"`` (from ``block.attn.only_attend_immediate_media``)."""
    if _flamingo_kind(block) != "GatedCrossAttentionBlock":
        raise TypeError(f"block must be a flamingo GatedCrossAttentionBlock, got {type(block)}")
    foreign: Any = block
    immediate = bool(foreign.attn.only_attend_immediate_media)
    return "immediate" if immediate else "all_previous"


@dataclass
class OpenFlamingoWeights:
    """What :func:`load_open_flamingo` found in a checkpoint.

    Attributes:
        blocks: the gated cross-attention blocks by the index of the language-model layer they
            sit before (OpenFlamingo's ``gated_cross_attn_layers.{j}``; ``j + 1`` is a multiple
            of ``cross_attn_every_n_layers``).
        perceiver: the resampler, or ``None`` if the checkpoint has no ``perceiver.*`` keys.
        policy: the mask policy the blocks were trained with (OpenFlamingo: ``"immediate"``).
        ignored: checkpoint keys outside the perceiver and the gated blocks (language model,
            vision encoder, embeddings), left alone.
    """

    blocks: dict[int, GatedCrossAttentionBlock]
    perceiver: PerceiverResampler | None
    policy: str = "immediate"
    ignored: list[str] = field(default_factory=list)


# ``...gated_cross_attn_layers.{j}.rest`` (the Flamingo LM mixin's list) or
# ``...<container>.{j}.gated_cross_attn_layer.rest`` (the same block seen through FlamingoLayer)
_BLOCK_RE = re.compile(
    r"^(?P<pre>.*?)(?:gated_cross_attn_layers\.(?P<j1>\d+)"
    r"|[A-Za-z_]\w*\.(?P<j2>\d+)\.gated_cross_attn_layer)\.(?P<rest>.+)$"
)
_PERCEIVER_RE = re.compile(r"^(?P<pre>(?:.*\.)?perceiver\.)(?P<rest>.+)$")


def load_open_flamingo(
    state_dict: Mapping[str, Tensor],
    *,
    num_heads: int = 8,
    perceiver_num_heads: int = 8,
) -> OpenFlamingoWeights:
    """Build xmodal modules from an OpenFlamingo ``state_dict`` (a full model's or the released
    ``checkpoint.pt``'s), without OpenFlamingo installed.

    Reads ``perceiver.*`` into a :class:`PerceiverResampler` and every
    ``gated_cross_attn_layers.{j}.*`` (or ``<layers>.{j}.gated_cross_attn_layer.*``, the same
    tensors seen through ``FlamingoLayer``; both may be present and must then agree) into a
    :class:`GatedCrossAttentionBlock`. Widths come from the tensors: the text width ``D`` from
    ``attn.norm``, the visual width ``dim_visual`` from ``to_kv`` (it may differ from ``D``),
    the inner width from ``to_q``, the feed-forward width from ``ff.1``, the resampler's depth,
    latents and media/frame embeddings from its keys. Other keys (language model, vision
    encoder) are listed in ``ignored`` and logged.

    Args:
        state_dict: name -> tensor.
        num_heads: heads of the gated blocks' attention (OpenFlamingo: 8).
        perceiver_num_heads: heads of the resampler's attention (OpenFlamingo: 8).

    Raises:
        ValueError: no perceiver or gated-block keys at all, heads that do not divide an inner
            width, or two copies of a block tensor that differ.
        ConversionError: within the perceiver or a block, keys that are missing or unexpected,
            or shapes that do not fit, all named; nothing is built then.
    """
    blocks: dict[int, dict[str, Tensor]] = {}
    block_prefix: dict[int, str] = {}
    perceiver: dict[str, Tensor] = {}
    perceiver_prefix = ""
    ignored: list[str] = []
    for key, tensor in state_dict.items():
        match = _BLOCK_RE.match(key)
        if match:
            j = int(match["j1"] if match["j1"] is not None else match["j2"])
            rest = match["rest"]
            seen = blocks.setdefault(j, {})
            if rest in seen and not _same(seen[rest], tensor):
                raise ValueError(
                    f"state_dict holds two different tensors for gated block {j}'s {rest!r} "
                    f"(one of them is {key!r})"
                )
            seen.setdefault(rest, tensor)
            block_prefix.setdefault(j, key[: len(key) - len(rest)])
            continue
        match = _PERCEIVER_RE.match(key)
        if match:
            perceiver[match["rest"]] = tensor
            perceiver_prefix = match["pre"]
            continue
        ignored.append(key)
    if not blocks and not perceiver:
        raise ValueError(
            "state_dict has no OpenFlamingo keys: expected 'perceiver.*' and/or "
            "'...gated_cross_attn_layers.{j}.*' (got e.g. "
            f"{list(state_dict)[:3]})"
        )
    source = "OpenFlamingo state_dict"
    out = OpenFlamingoWeights(
        blocks={
            j: _block_from_state(
                blocks[j], num_heads=num_heads, source=source, prefix=block_prefix[j]
            )
            for j in sorted(blocks)
        },
        perceiver=None
        if not perceiver
        else _perceiver_from_state(
            perceiver, num_heads=perceiver_num_heads, source=source, prefix=perceiver_prefix
        ),
        ignored=ignored,
    )
    if ignored:
        logger.info("load_open_flamingo: left %d non-Flamingo keys alone", len(ignored))
    return out


def _block_from_state(
    sd: Mapping[str, Tensor], *, num_heads: int, source: str, prefix: str = ""
) -> GatedCrossAttentionBlock:
    dim = _size(sd, "attn.norm.weight", 0, prefix)
    inner = _size(sd, "attn.to_q.weight", 0, prefix)
    dim_visual = _size(sd, "attn.to_kv.weight", 1, prefix)
    hidden = _size(sd, "ff.1.weight", 0, prefix)
    attn = CrossModalAttention(
        dim,
        num_heads,
        image_dim=dim_visual,
        head_dim=_head_dim(inner, num_heads, prefix + "attn.to_q.weight"),
        dropout=0.0,
        bias=False,
    )
    block = GatedCrossAttentionBlock.from_parts(
        attn=attn,
        ff=FeedForward(dim, hidden_dim=hidden, activation="gelu", norm="layernorm"),
        norm=nn.LayerNorm(dim),
        attn_gate=TanhGate(),
        ff_gate=TanhGate(),
    )
    match_source(block, sd["attn.to_q.weight"])
    rm = Remapper(sd, source=source, prefix=prefix)
    for theirs, ours in _BLOCK_KEYS.items():
        rm.copy(theirs, ours)
    rm.split("attn.to_kv.weight", ["attn.image_key.weight", "attn.image_value.weight"])
    rm.load_into(block)
    return block


def _perceiver_from_state(
    sd: Mapping[str, Tensor], *, num_heads: int, source: str, prefix: str = ""
) -> PerceiverResampler:
    num_latents, dim = (_size(sd, "latents", 0, prefix), _size(sd, "latents", 1, prefix))
    depth = len({key.split(".")[1] for key in sd if key.startswith("layers.")})
    inner = _size(sd, "layers.0.0.to_q.weight", 0, prefix)
    hidden = _size(sd, "layers.0.1.1.weight", 0, prefix)
    media_keys = [k for k in _MEDIA_EMBEDS if k in sd]
    perceiver = PerceiverResampler(
        dim,
        depth=depth,
        num_latents=num_latents,
        num_heads=num_heads,
        head_dim=_head_dim(inner, num_heads, prefix + "layers.0.0.to_q.weight"),
        ff_mult=hidden / dim,
        max_num_media=sd[media_keys[0]].shape[0] if media_keys else None,
        max_num_frames=sd["frame_embs"].shape[0] if "frame_embs" in sd else None,
    )
    for layer in perceiver.layers:  # the exact width, whatever int(mult * dim) rounds to
        layer.ff = FeedForward(dim, hidden_dim=hidden)
    match_source(perceiver, sd["latents"])

    rm = Remapper(sd, source=source, prefix=prefix)
    rm.copy("latents", "latents")
    for key in media_keys:
        embed = rm.take(key)
        rm.put("media_embed", None if embed is None else embed.reshape(embed.shape[0], -1), key)
    if "frame_embs" in sd:
        rm.copy("frame_embs", "frame_embed")
    for k in range(depth):
        for theirs, ours in _PERCEIVER_LAYER_KEYS.items():
            rm.copy(f"layers.{k}.{theirs}", f"layers.{k}.{ours}")
        rm.split(
            f"layers.{k}.0.to_kv.weight",
            [f"layers.{k}.attn.image_key.weight", f"layers.{k}.attn.image_value.weight"],
        )
    rm.copy("norm.weight", "norm.weight")
    rm.copy("norm.bias", "norm.bias")
    rm.load_into(perceiver)
    return perceiver


def _size(sd: Mapping[str, Tensor], key: str, dim: int, prefix: str) -> int:
    tensor = sd.get(key)
    if tensor is None or tensor.dim() <= dim:
        raise ValueError(
            f"cannot infer the module's sizes: {prefix + key!r} is "
            + ("missing" if tensor is None else f"of shape {tuple(tensor.shape)}")
        )
    return int(tensor.shape[dim])


def _head_dim(inner: int, num_heads: int, key: str) -> int:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if inner % num_heads:
        raise ValueError(
            f"num_heads={num_heads} does not divide the inner width {inner} of {key!r}; pass "
            f"the head count the checkpoint was trained with"
        )
    return inner // num_heads


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool((a == b).all())


def _flamingo_kind(module: object) -> str:
    cls = type(module)
    if cls.__module__.split(".")[0] in ("flamingo_pytorch", "open_flamingo") and cls.__name__ in (
        "GatedCrossAttentionBlock",
        "PerceiverResampler",
    ):
        return cls.__name__
    raise TypeError(
        f"module must be a flamingo-pytorch or OpenFlamingo GatedCrossAttentionBlock or "
        f"PerceiverResampler, got {cls.__module__}.{cls.__name__}"
    )
