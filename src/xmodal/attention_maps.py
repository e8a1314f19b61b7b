"""Look inside: record cross-modal attention maps, fuse heads, compose and roll them out.

Legend: ``b`` batch, ``t`` text tokens (queries), ``i`` image tokens (keys), ``n`` resampler
latents, ``h`` heads, ``L`` layers (recorded calls).

:func:`record_attention` is a context manager. For every :class:`~xmodal.CrossModalAttention`
inside a model it forces the explicit path (``need_weights=True``), keeps the ``(b, h, t, i)``
probabilities and -- where the caller had asked for ``need_weights=False`` -- hands back
``None`` weights as the fused path would, so the model's code sees no difference. It works on
any model that contains xmodal attention modules (gated blocks, resamplers, your own layers)
and needs no change to them. The hooks are removed when the ``with`` block ends, also on an
exception; after it the modules run the fused path again.

:func:`record_mha_attention` does the same for PyTorch's ``nn.MultiheadAttention`` (e.g. the
text self-attention between cross-attention layers, which :func:`rollout` can use).

The other functions are pure tensor helpers:

* :func:`fuse_heads` -- one ``(b, t, i)`` map from ``(b, h, t, i)``: mean, max or one head;
* :func:`visible_rows` -- which queries saw at least one image token (their row sums to 1;
  a query that may see nothing has an all-zero row);
* :func:`compose` -- text->latent maps times latent->patch maps: text mapped back to patches;
* :func:`resampler_rollout` -- latent->patch maps through the layers of a Perceiver resampler,
  whose latents attend to ``[patches, latents]``;
* :func:`rollout` -- attention rollout (Abnar & Zuidema, 2020) across cross-attention layers,
  optionally through text self-attention between them.

How the rollout is defined here. Abnar & Zuidema roll out self-attention by adding the residual
connection to each map (``r·I + (1 - r)·A``, ``r = 0.5``) and multiplying the maps of the
layers. For cross-attention the image tokens are not updated, so the rolled-out map ``R``
(``(b, t, i)``: how much of each query's state comes from each patch) starts at zero and each
attention step with an image part ``A_img`` (``(b, q, i)``) and a query part ``A_q``
(``(b, q, q)``; zero for plain cross-attention) does::

    R <- r·R + (1 - r)·(A_img + A_q @ R)

A text self-attention layer is the step with ``A_img = 0``. The result is renormalised so each
row sums to 1 (rows that never saw an image stay zero).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from xmodal.attention import CrossModalAttention

__all__ = [
    "AttentionMaps",
    "AttentionRecord",
    "compose",
    "fuse_heads",
    "record_attention",
    "record_mha_attention",
    "resampler_rollout",
    "rollout",
    "visible_rows",
]

logger = logging.getLogger(__name__)

HeadFusion = Literal["mean", "max"] | int


@dataclass(frozen=True)
class AttentionRecord:
    """One call of one attention module, as recorded by :func:`record_attention`.

    Attributes:
        name: the module's qualified name in the model (``model.named_modules()``; ``""`` when
            the model *is* the attention module).
        call: how many times this module had been called before, inside the ``with`` block
            (``0`` for the first call).
        weights: ``(b, h, t, i)`` softmax probabilities, before dropout. Each row sums to 1
            over the image tokens the query may see, and is all-zero if it may see none.
    """

    name: str
    call: int
    weights: Tensor


@dataclass
class AttentionMaps:
    """The attention maps recorded inside a :func:`record_attention` block, in call order.

    A module called twice (two forward passes, or a module shared between layers) records
    twice: ``maps[name]`` then refuses to guess and :meth:`calls` gives every call.

    Attributes:
        records: every recorded call, in the order the modules ran.
    """

    records: list[AttentionRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[AttentionRecord]:
        return iter(self.records)

    def __contains__(self, name: object) -> bool:
        return any(r.name == name for r in self.records)

    @property
    def names(self) -> list[str]:
        """The recorded modules' names, in the order of their first call."""
        return list(dict.fromkeys(r.name for r in self.records))

    def calls(self, name: str) -> list[Tensor]:
        """Every ``(b, h, t, i)`` map recorded for module ``name``, in call order."""
        found = [r.weights for r in self.records if r.name == name]
        if not found:
            raise KeyError(f"no attention recorded for module {name!r}; recorded: {self.names}")
        return found

    def __getitem__(self, name: str) -> Tensor:
        """The ``(b, h, t, i)`` map of module ``name``; it must have been called exactly once."""
        found = self.calls(name)
        if len(found) > 1:
            raise ValueError(
                f"module {name!r} was called {len(found)} times inside record_attention; "
                f"use maps.calls({name!r}) to get each call's map"
            )
        return found[0]

    def layers(self) -> list[Tensor]:
        """Every recorded ``(b, h, t, i)`` map, in call order (one per layer for a plain stack)."""
        return [r.weights for r in self.records]

    def clear(self) -> None:
        """Forget what was recorded (e.g. between two forward passes in one ``with`` block)."""
        self.records.clear()

    def to_bertviz(
        self, *, batch_index: int = 0, names: Sequence[str] | None = None
    ) -> list[Tensor]:
        """Export for bertviz's cross-attention views, without importing bertviz.

        bertviz's ``head_view`` / ``model_view`` take ``cross_attention=`` as a list with one
        ``(1, h, t_text, t_image)`` tensor per layer (the Hugging Face ``cross_attentions``
        layout), together with ``decoder_tokens`` (the ``t_text`` words) and
        ``encoder_tokens`` (one label per image token)::

            from bertviz import head_view
            head_view(cross_attention=maps.to_bertviz(), encoder_tokens=patch_labels,
                      decoder_tokens=words)

        Args:
            batch_index: which sample of the batch (bertviz shows one).
            names: the modules to export, as layers, in this order (default: every record,
                in call order).

        Returns:
            a list of ``(1, h, t, i)`` float32 CPU tensors, one per layer.

        Raises:
            ValueError: nothing was recorded, ``batch_index`` is out of range, or the layers
                differ in head count, text length or image length (bertviz stacks them).
        """
        layers = self.layers() if names is None else [self[name] for name in names]
        if not layers:
            raise ValueError("to_bertviz: no attention maps were recorded")
        shapes = {tuple(w.shape[1:]) for w in layers}
        if len(shapes) > 1:
            raise ValueError(
                f"to_bertviz: bertviz stacks the layers, so they must share (h, t, i); got "
                f"{sorted(shapes)}; pass names= to choose layers of one shape"
            )
        b = layers[0].shape[0]
        if not -b <= batch_index < b:
            raise ValueError(
                f"batch_index must be in [{-b}, {b}) for batch size {b}, got {batch_index}"
            )
        return [w[batch_index : batch_index + 1].detach().float().cpu() for w in layers]


@contextlib.contextmanager
def record_attention(
    model: nn.Module,
    *,
    names: Iterable[str] | None = None,
    detach: bool = True,
    device: torch.device | str | None = None,
) -> Iterator[AttentionMaps]:
    """Record the attention weights of every xmodal attention module inside ``model``.

    Inside the ``with`` block each :class:`~xmodal.CrossModalAttention` runs its explicit path
    (``need_weights=True``: float32 softmax, probabilities before dropout) and its weights are
    appended to the yielded :class:`AttentionMaps`, keyed by the module's qualified name, in
    call order. A caller that asked for ``need_weights=False`` still gets ``None`` weights, so
    the model runs unchanged (only slower and with more memory: the ``b·h·t·i`` scores are
    materialised). The hooks are removed on exit, also when the block raises; afterwards the
    modules run the fused path again when asked.

    Example::

        with xmodal.record_attention(model) as maps:
            logits = model(image, question)
        maps.names                  # ['blocks.0.attn', 'blocks.1.attn', ...]
        maps['blocks.0.attn']       # (b, h, t, i)

    Args:
        model: any module containing :class:`~xmodal.CrossModalAttention` modules (or one).
        names: record only these modules (qualified names, as in ``model.named_modules()``).
        detach: store the weights detached from the autograd graph (default). Pass ``False``
            to keep the graph, e.g. for gradient-weighted relevance.
        device: move the recorded weights to this device (e.g. ``"cpu"``); default: leave them.

    Yields:
        an :class:`AttentionMaps`, filled as the model runs.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` contains no xmodal attention module, or ``names`` names one that
            is not there -- never a silently empty record.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(names, str):
        raise TypeError(f"names must be a list of module names, got the string {names!r}")
    found = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, CrossModalAttention)
    }
    if not found:
        raise ValueError(
            f"record_attention: model ({type(model).__name__}) contains no "
            f"xmodal.CrossModalAttention module, so there is nothing to record"
        )
    if names is not None:
        wanted = list(names)
        missing = [n for n in wanted if n not in found]
        if missing:
            raise ValueError(
                f"record_attention: names {missing} are not CrossModalAttention modules of the "
                f"model; available: {sorted(found)}"
            )
        found = {n: found[n] for n in wanted}

    maps = AttentionMaps()
    counts: dict[str, int] = {}
    asked: dict[int, bool] = {}  # id(module) -> the caller's need_weights, between the two hooks

    def make_hooks(name: str) -> tuple[Any, Any]:
        def pre_hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
            # need_weights is keyword-only in CrossModalAttention.forward; its default is True.
            asked[id(module)] = bool(kwargs.get("need_weights", True))
            return args, {**kwargs, "need_weights": True}

        def post_hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> Any:
            out, weights = output
            if weights is not None:
                w = weights.detach() if detach else weights
                if device is not None:
                    w = w.to(device)
                call = counts.get(name, 0)
                counts[name] = call + 1
                maps.records.append(AttentionRecord(name=name, call=call, weights=w))
            if not asked.pop(id(module), True):
                return out, None
            return output

        return pre_hook, post_hook

    handles = []
    try:
        for name, module in found.items():
            pre_hook, post_hook = make_hooks(name)
            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            # Post-hooks run newest first (prepend), so nested record_attention blocks on one
            # model unwind like context managers: the inner one records and passes the weights
            # on; the outermost restores what the caller asked for.
            handles.append(module.register_forward_hook(post_hook, with_kwargs=True, prepend=True))
        logger.debug("record_attention: hooked %d modules: %s", len(found), list(found))
        yield maps
    finally:
        for handle in handles:
            handle.remove()
        asked.clear()


# nn.MultiheadAttention.forward's parameters after (query, key, value), in order.
_MHA_ARGS = ("key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")


@contextlib.contextmanager
def record_mha_attention(modules: Sequence[nn.MultiheadAttention]) -> Iterator[list[Tensor]]:
    """Record PyTorch ``nn.MultiheadAttention`` maps: e.g. text self-attention for :func:`rollout`.

    Inside the block each of ``modules`` computes its weights (the caller still gets them only
    if it asked); every call appends a detached, head-averaged ``(b, t, s)`` map to the
    yielded list, in call order. ``nn.TransformerEncoderLayer``'s fast path bypasses its
    ``self_attn`` module, so the fast path is switched off for the block and restored on exit;
    the hooks are removed on exit, also on an exception.

    Args:
        modules: the ``nn.MultiheadAttention`` modules to record (e.g.
            ``[layer.self_attn for layer in encoder.layers]``).
    """
    for m in modules:
        if not isinstance(m, nn.MultiheadAttention):
            raise TypeError(f"modules must be nn.MultiheadAttention, got {type(m).__name__}")
    found: list[Tensor] = []
    asked: dict[int, bool] = {}

    def pre_hook(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # Name every argument after (query, key, value), so need_weights can be set by keyword.
        kwargs = {**dict(zip(_MHA_ARGS, args[3:], strict=False)), **kwargs}
        asked[id(module)] = bool(kwargs.get("need_weights", True))
        if asked[id(module)]:  # the caller wants weights: give it what it asked for
            return args[:3], kwargs
        return args[:3], {**kwargs, "need_weights": True, "average_attn_weights": True}

    def post_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        weights = output[1].detach()
        found.append(weights.mean(dim=-3) if weights.dim() == 4 else weights)  # (b, t, s)
        if not asked.pop(id(module), True):
            return output[0], None
        return output

    handles = []
    before = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        for m in modules:
            handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(m.register_forward_hook(post_hook, prepend=True))
        yield found
    finally:
        for h in handles:
            h.remove()
        torch.backends.mha.set_fastpath_enabled(before)


def _check_map(name: str, x: object, rank: int | tuple[int, ...], shape: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(x).__name__}")
    ranks = (rank,) if isinstance(rank, int) else rank
    if x.dim() not in ranks:
        raise ValueError(
            f"{name} must have shape {shape}, got rank {x.dim()} shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def visible_rows(weights: Tensor) -> Tensor:
    """Which queries saw at least one image token: ``weights.sum(-1) > 0``.

    Args:
        weights: ``(..., t, i)`` attention probabilities (e.g. ``(b, h, t, i)``).

    Returns:
        boolean ``(..., t)``. A query that may see no image token has an all-zero row (see
        :func:`xmodal.attend`); every other row sums to 1.
    """
    weights = _check_map("weights", weights, (2, 3, 4), "(..., t, i)")
    return weights.sum(dim=-1) > 0


def fuse_heads(weights: Tensor, heads: HeadFusion = "mean") -> Tensor:
    """Fuse the head axis of ``(b, h, t, i)`` maps into one ``(b, t, i)`` map.

    Args:
        weights: ``(b, h, t, i)``.
        heads: ``"mean"`` (rows still sum to 1), ``"max"`` (the largest weight any head gives;
            rows no longer sum to 1 -- renormalise before treating them as a distribution), or
            an ``int``: that one head (negative counts from the end).

    Returns:
        ``(b, t, i)``.
    """
    weights = _check_map("weights", weights, 4, "(b, h, t, i)")
    if isinstance(heads, bool):
        raise TypeError(f"heads must be 'mean', 'max' or an int head index, got {heads!r}")
    if isinstance(heads, int):
        h = weights.shape[1]
        if not -h <= heads < h:
            raise ValueError(f"heads must be a head index in [{-h}, {h}), got {heads}")
        return weights[:, heads]
    if heads == "mean":
        return weights.mean(dim=1)
    if heads == "max":
        return weights.amax(dim=1)
    raise ValueError(f"heads must be 'mean', 'max' or an int head index, got {heads!r}")


def _normalize_rows(x: Tensor) -> Tensor:
    total = x.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, x / total.clamp_min(torch.finfo(x.dtype).tiny), x)


def compose(text_to_latent: Tensor, latent_to_patch: Tensor) -> Tensor:
    """Map text back to image patches through a resampler: ``text_to_latent @ latent_to_patch``.

    A text token that puts weight ``a[t, n]`` on latent ``n``, which in turn draws ``p[n, i]``
    from patch ``i``, draws ``sum_n a[t, n]·p[n, i]`` from patch ``i``. If both inputs' rows
    sum to 1, so do the result's (and a text row that saw no latent stays zero).

    Heads of different layers are unrelated, so fuse them first (:func:`fuse_heads`); for a
    resampler with several layers use :func:`resampler_rollout` to get ``latent_to_patch``.

    Args:
        text_to_latent: ``(b, t, n)`` (the text's cross-attention over the resampler's output).
        latent_to_patch: ``(b, n, i)``.

    Returns:
        ``(b, t, i)``.
    """
    a = _check_map("text_to_latent", text_to_latent, 3, "(b, t, n)")
    p = _check_map("latent_to_patch", latent_to_patch, 3, "(b, n, i)")
    if a.shape[0] != p.shape[0] or a.shape[2] != p.shape[1]:
        raise ValueError(
            f"compose: text_to_latent (b, t, n) = {tuple(a.shape)} does not fit latent_to_patch "
            f"(b, n, i) = {tuple(p.shape)}: b and n must match"
        )
    return torch.matmul(a.float(), p.float())  # (b, t, i)


def _check_residual(residual: float) -> float:
    if isinstance(residual, bool) or not isinstance(residual, (int, float)):
        raise TypeError(f"residual must be a float in [0, 1), got {residual!r}")
    if not 0.0 <= residual < 1.0:
        raise ValueError(f"residual must be in [0, 1), got {residual}")
    return float(residual)


def _rollout_step(
    r: Tensor, image_part: Tensor | None, query_part: Tensor | None, res: float
) -> Tensor:
    """``R <- res·R + (1 - res)·(A_img + A_q @ R)`` on ``(b, q, i)`` relevance ``R``."""
    flow = torch.zeros_like(r)
    if image_part is not None:
        flow = flow + image_part
    if query_part is not None:
        flow = flow + torch.matmul(query_part, r)  # (b, q, i)
    return res * r + (1.0 - res) * flow


def rollout(
    cross_maps: Sequence[Tensor],
    *,
    self_maps: Sequence[Tensor | None] | None = None,
    residual: float = 0.5,
) -> Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) across cross-attention layers.

    See the module docstring for the rule. With one layer (and no self-attention) the result
    is that layer's map; with several, later layers weigh more (each earlier contribution is
    scaled by ``residual`` per layer it passes). Rows are renormalised to sum to 1; a text
    token that never saw an image keeps an all-zero row.

    Args:
        cross_maps: per layer, ``(b, t, i)`` head-fused text->image maps, in layer order.
        self_maps: per layer, ``None`` or a ``(b, t, t)`` text self-attention map applied
            *after* that layer's cross-attention (default: no self-attention).
        residual: weight ``r`` of the residual path, ``0 <= r < 1`` (0.5 as in the paper).

    Returns:
        ``(b, t, i)`` float32.
    """
    res = _check_residual(residual)
    if len(cross_maps) == 0:
        raise ValueError("rollout: cross_maps is empty; pass at least one (b, t, i) map")
    if self_maps is not None and len(self_maps) != len(cross_maps):
        raise ValueError(
            f"rollout: self_maps has {len(self_maps)} entries, expected one per cross map "
            f"({len(cross_maps)}; use None for a layer without self-attention)"
        )
    first = _check_map("cross_maps[0]", cross_maps[0], 3, "(b, t, i)")
    relevance = torch.zeros(first.shape, dtype=torch.float32, device=first.device)
    for layer, cross in enumerate(cross_maps):
        cross = _check_map(f"cross_maps[{layer}]", cross, 3, "(b, t, i)")
        if cross.shape != first.shape:
            raise ValueError(
                f"rollout: cross_maps[{layer}] has shape {tuple(cross.shape)}, expected "
                f"{tuple(first.shape)} like cross_maps[0]"
            )
        relevance = _rollout_step(relevance, cross.float(), None, res)
        sa = None if self_maps is None else self_maps[layer]
        if sa is not None:
            b, t, _ = first.shape
            sa = _check_map(f"self_maps[{layer}]", sa, 3, "(b, t, t)")
            if tuple(sa.shape) != (b, t, t):
                raise ValueError(
                    f"rollout: self_maps[{layer}] has shape {tuple(sa.shape)}, expected "
                    f"(b, t, t) = {(b, t, t)}"
                )
            relevance = _rollout_step(relevance, None, sa.float(), res)
    return _normalize_rows(relevance)


def resampler_rollout(
    layer_maps: Sequence[Tensor], *, num_image_tokens: int, residual: float = 0.5
) -> Tensor:
    """Latent->patch maps through the layers of a Perceiver resampler.

    In a Flamingo Perceiver resampler the latents attend to the concatenation
    ``[image tokens, latents]``: each layer's head-fused map ``(b, n, i + n)`` has an image
    part (the first ``i`` columns) and a latent part (the last ``n``). The latents start with
    no image in them; each layer applies the rollout step of the module docstring with both
    parts. A resampler whose latents attend to the image tokens only (maps ``(b, n, i)``) is
    handled too.

    Args:
        layer_maps: per resampler layer, ``(b, n, i + n)`` or ``(b, n, i)`` head-fused maps.
        num_image_tokens: ``i``, the number of image tokens (the leading columns).
        residual: weight of the residual path, as in :func:`rollout`.

    Returns:
        ``(b, n, i)`` float32, rows summing to 1: feed it to :func:`compose`.
    """
    res = _check_residual(residual)
    if isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, int):
        raise TypeError(f"num_image_tokens must be an int, got {num_image_tokens!r}")
    if num_image_tokens < 0:
        raise ValueError(f"num_image_tokens must be non-negative, got {num_image_tokens}")
    if len(layer_maps) == 0:
        raise ValueError("resampler_rollout: layer_maps is empty; pass one map per layer")
    first = _check_map("layer_maps[0]", layer_maps[0], 3, "(b, n, i + n)")
    b, n, _ = first.shape
    i = num_image_tokens
    relevance = torch.zeros(b, n, i, dtype=torch.float32, device=first.device)
    for layer, a in enumerate(layer_maps):
        a = _check_map(f"layer_maps[{layer}]", a, 3, "(b, n, i + n)")
        if tuple(a.shape) not in ((b, n, i + n), (b, n, i)):
            raise ValueError(
                f"resampler_rollout: layer_maps[{layer}] has shape {tuple(a.shape)}, expected "
                f"(b, n, i + n) = {(b, n, i + n)} or (b, n, i) = {(b, n, i)} for "
                f"num_image_tokens={i}"
            )
        a = a.float()
        latent_part = a[..., i:] if a.shape[-1] == i + n else None  # (b, n, n)
        relevance = _rollout_step(relevance, a[..., :i], latent_part, res)
    return _normalize_rows(relevance)
