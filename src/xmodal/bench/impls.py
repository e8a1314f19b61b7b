"""The implementations ``xmodal bench`` compares, each built for one cell on shared inputs.

Legend: ``b`` batch, ``t`` text tokens, ``i`` image tokens, ``h`` heads, ``d`` head width,
``D`` text width, ``E`` image width.

Two families:

* ``module`` -- a whole cross-attention layer (projections + attention + output projection)
  called on text ``(b, t, D)`` and image ``(b, i, E)`` features: xmodal's
  :class:`~xmodal.attention.CrossModalAttention` on both paths, the seed notebook's class,
  ``torch.nn.MultiheadAttention(kdim=E, vdim=E)``, Hugging Face's Mllama and Idefics
  cross-attention layers (``sdpa`` and ``eager``), flamingo-pytorch's ``MaskedCrossAttention``.
* ``core`` -- the attention core alone on projected ``q (b, h, t, d)`` and ``k, v (b, h, i, d)``:
  :func:`xmodal.attention.attend` on both paths and ``scaled_dot_product_attention`` called
  directly (on CUDA also pinned to each backend with ``sdpa_kernel``).

Peers are randomly initialised at the cell's shape; a peer that is not installed, or cannot
take the cell (one width for text and image, no key-padding mask, no CUDA) is skipped with a
reason. Attention dropout is off everywhere (``p = 0``) so that training cells time the same
arithmetic in every implementation.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xmodal.bench.grid import Cell

__all__ = ["IMPLS", "Impl", "Inputs", "Prepared", "make_inputs", "select_impls"]

PAD_FRACTION = 0.25  # masked cells pad this share of the image tokens of every other sample


@dataclass
class Inputs:
    """The tensors every implementation of a cell reads (made once per cell, same seed)."""

    text: Tensor  # (b, t, D)
    image: Tensor  # (b, i, E)
    keep: Tensor | None  # (b, i) bool key-padding keep-mask, True = may attend; None unmasked
    q: Tensor  # (b, h, t, d) for the core family
    k: Tensor  # (b, h, i, d)
    v: Tensor  # (b, h, i, d)

    def leaves(self, family: str) -> list[Tensor]:
        """The input tensors that get gradients in training cells."""
        return [self.text, self.image] if family == "module" else [self.q, self.k, self.v]


def make_inputs(cell: Cell, device: torch.device, *, seed: int = 0) -> Inputs:
    """Random inputs for ``cell``; training cells get inputs that require gradients."""
    s = cell.shape
    gen = torch.Generator().manual_seed(seed)

    def randn(*size: int) -> Tensor:
        x = torch.randn(*size, generator=gen).to(device=device, dtype=cell.torch_dtype)
        return x.requires_grad_(cell.mode == "train")

    keep = None
    if cell.masked:
        keep = torch.ones(s.batch, s.image_len, dtype=torch.bool)
        pad = int(s.image_len * PAD_FRACTION)
        keep[::2, s.image_len - pad :] = False  # every other sample is padded at the end
        keep = keep.to(device)
    return Inputs(
        text=randn(s.batch, s.text_len, s.text_dim),
        image=randn(s.batch, s.image_len, s.image_dim),
        keep=keep,
        q=randn(s.batch, s.num_heads, s.text_len, s.head_dim),
        k=randn(s.batch, s.num_heads, s.image_len, s.head_dim),
        v=randn(s.batch, s.num_heads, s.image_len, s.head_dim),
    )


@dataclass
class Prepared:
    """One implementation, built and bound to a cell's inputs."""

    fn: Callable[[], Tensor]  # one call; returns the output whose gradient training cells use
    params: list[Tensor] = field(default_factory=list)  # parameters that get gradients
    module: nn.Module | None = None  # the layer, for tests that copy weights between peers
    context: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext


Builder = Callable[[Cell, Inputs, torch.device], Prepared]
Check = Callable[[Cell, torch.device], "str | None"]


@dataclass(frozen=True)
class Impl:
    """An implementation: how to build it, and when it cannot run."""

    name: str
    family: str  # "module" or "core"
    description: str
    build: Builder
    requires: tuple[str, ...] = ()  # modules that must be importable
    check: Check | None = None  # returns why a cell cannot run, or None
    bias: bool = True  # whether its projections add biases (peers without are compared with
    # xmodal-nobias: a bias costs a copy of the bias into each projection's output on CPU)

    def skip_reason(self, cell: Cell, device: torch.device) -> str | None:
        """Why this implementation does not run in ``cell`` on ``device``; ``None`` if it does."""
        for module in self.requires:
            if importlib.util.find_spec(module) is None:
                return f"{module} not installed"
        return None if self.check is None else self.check(cell, device)


ModuleT = TypeVar("ModuleT", bound=nn.Module)


def _module(m: ModuleT, cell: Cell, device: torch.device) -> ModuleT:
    # Parameters keep their default requires_grad=True in inference cells too (inference_mode
    # makes it moot for autograd): frozen weights send nn.MultiheadAttention(batch_first=True)
    # down a much slower matmul path on CPU (docs/benchmarks.md), which is not its usual state.
    m = m.to(device=device, dtype=cell.torch_dtype)
    m.train(cell.mode == "train")
    return m


def _params(m: nn.Module) -> list[Tensor]:
    return [p for p in m.parameters() if p.requires_grad]


# --- module family ----------------------------------------------------------------------------


def _xmodal(need_weights: bool, bias: bool = True, absorb: bool = True) -> Builder:
    def build(cell: Cell, x: Inputs, device: torch.device) -> Prepared:
        from xmodal.attention import CrossModalAttention
        from xmodal.masks import prepare_attention_mask

        s = cell.shape
        m = CrossModalAttention(
            embed_dim=s.text_dim,
            num_heads=s.num_heads,
            image_dim=s.image_dim,
            head_dim=s.head_dim,
            dropout=0.0,
            bias=bias,
            absorb_projections=absorb,
        )
        m = _module(m, cell, device)
        # Prepared once, outside the timed call, as a model prepares it for all its layers
        # (and as the Hugging Face layers below get an additive mask built outside it).
        mask = prepare_attention_mask(
            x.keep,
            batch_size=s.batch,
            num_heads=s.num_heads,
            text_len=s.text_len,
            image_len=s.image_len,
            dtype=cell.torch_dtype,
            device=device,
        )

        def fn() -> Tensor:
            return m(x.text, x.image, mask, need_weights=need_weights)[0]

        return Prepared(fn, _params(m), module=m)

    return build


def _absorbs(cell: Cell, device: torch.device) -> str | None:
    """``xmodal-projected`` runs only where ``xmodal`` itself takes the absorbed path."""
    from xmodal.attention import absorbed_is_cheaper

    s = cell.shape
    if device.type != "cpu":
        return "xmodal takes the projected path here (the absorbed path is CPU-only)"
    absorbs = absorbed_is_cheaper(
        num_heads=s.num_heads,
        num_kv_heads=s.num_heads,
        head_dim=s.head_dim,
        image_dim=s.image_dim,
        text_len=s.text_len,
        image_len=s.image_len,
        dtype=cell.torch_dtype,
    )
    return None if absorbs else "xmodal takes the projected path here"


def _one_width(cell: Cell, device: torch.device) -> str | None:
    s = cell.shape
    if s.image_dim != s.text_dim:
        return "needs image width == text width"
    if s.inner_dim != s.text_dim:
        return "needs heads x head width == text width"
    return None


def _notebook(cell: Cell, x: Inputs, device: torch.device) -> Prepared:
    from xmodal.bench.notebook import NotebookCrossModalAttention

    s = cell.shape
    m = NotebookCrossModalAttention(embed_dim=s.text_dim, num_heads=s.num_heads)
    m.dropout.p = 0.0  # the class hard-codes 0.1; off so training cells compare like for like
    m = _module(m, cell, device)
    # The notebook's mask must already broadcast against the (b, h, t, i) scores.
    mask = None if x.keep is None else x.keep[:, None, None, :]  # (b, 1, 1, i)

    def fn() -> Tensor:
        return m(x.text, x.image, mask)[0]

    return Prepared(fn, _params(m), module=m)


def _mha_check(cell: Cell, device: torch.device) -> str | None:
    if cell.shape.inner_dim != cell.shape.text_dim:
        return "needs heads x head width == text width"
    return None


def _mha(need_weights: bool) -> Builder:
    def build(cell: Cell, x: Inputs, device: torch.device) -> Prepared:
        s = cell.shape
        m = nn.MultiheadAttention(
            s.text_dim, s.num_heads, dropout=0.0, kdim=s.image_dim, vdim=s.image_dim,
            batch_first=True,
        )  # fmt: skip
        m = _module(m, cell, device)
        pad = None if x.keep is None else ~x.keep  # (b, i): True = ignore, MHA's convention

        def fn() -> Tensor:
            out, _ = m(
                x.text,
                x.image,
                x.image,
                key_padding_mask=pad,
                need_weights=need_weights,
                average_attn_weights=False,  # per-head weights, as xmodal returns
            )
            return out

        return Prepared(fn, _params(m), module=m)

    return build


def _additive(keep: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Hugging Face's additive mask, ``(b, 1, 1, i)``: 0 keeps, the dtype's minimum masks."""
    if keep is None:
        return None
    mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    mask = mask.masked_fill(~keep, torch.finfo(dtype).min)
    return mask[:, None, None, :]  # (b, 1, 1, i)


def _mllama(attn_implementation: str) -> Builder:
    def build(cell: Cell, x: Inputs, device: torch.device) -> Prepared:
        from transformers.models.mllama.configuration_mllama import MllamaTextConfig
        from transformers.models.mllama.modeling_mllama import MllamaTextCrossAttention

        s = cell.shape
        config = MllamaTextConfig(
            hidden_size=s.text_dim,
            num_attention_heads=s.num_heads,
            num_key_value_heads=s.num_heads,
        )
        config._attn_implementation = attn_implementation
        m = MllamaTextCrossAttention(config, layer_idx=0)
        # Without this the layer, used on its own with no mask, runs *causal* SDPA (the
        # `is_causal` default of transformers' sdpa_attention_forward) and drops keys past t.
        vars(m)["is_causal"] = False
        m = _module(m, cell, device)
        mask = _additive(x.keep, cell.torch_dtype)

        def fn() -> Tensor:
            return m(x.text, cross_attention_states=x.image, attention_mask=mask)[0]

        return Prepared(fn, _params(m), module=m)

    return build


def _idefics(attn_implementation: str) -> Builder:
    def build(cell: Cell, x: Inputs, device: torch.device) -> Prepared:
        from transformers.models.idefics.configuration_idefics import IdeficsConfig
        from transformers.models.idefics.modeling_idefics import IdeficsAttention

        s = cell.shape
        config = IdeficsConfig(
            hidden_size=s.text_dim,
            num_attention_heads=s.num_heads,
            vision_config={"embed_dim": s.image_dim},
        )
        config._attn_implementation = attn_implementation
        m = IdeficsAttention(
            hidden_size=s.text_dim,
            num_heads=s.num_heads,
            is_cross_attention=True,
            config=config,
            layer_idx=0,
        )
        vars(m)["is_causal"] = False  # as for Mllama: standalone, no mask means causal
        m = _module(m, cell, device)
        mask = _additive(x.keep, cell.torch_dtype)

        def fn() -> Tensor:
            return m(x.text, key_value_states=x.image, attention_mask=mask)[0]

        return Prepared(fn, _params(m), module=m)

    return build


def _hf_check(cell: Cell, device: torch.device) -> str | None:
    if cell.shape.inner_dim != cell.shape.text_dim:
        return "needs heads x head width == text width"
    return None


def _mllama_check(cell: Cell, device: torch.device) -> str | None:
    if cell.shape.image_dim != cell.shape.text_dim:
        return "needs image width == text width (Mllama projects images first)"
    return _hf_check(cell, device)


def _flamingo_check(cell: Cell, device: torch.device) -> str | None:
    if cell.masked:
        return "no key-padding mask (media_locations only)"
    if cell.shape.image_dim != cell.shape.text_dim:
        return "needs image width == text width"
    return None


def _flamingo(cell: Cell, x: Inputs, device: torch.device) -> Prepared:
    from flamingo_pytorch.flamingo_pytorch import MaskedCrossAttention

    s = cell.shape
    m = MaskedCrossAttention(dim=s.text_dim, dim_head=s.head_dim, heads=s.num_heads)
    m = _module(m, cell, device)
    media = x.image[:, None]  # (b, m=1, i, E): one medium per sample

    def fn() -> Tensor:
        return m(x.text, media)

    return Prepared(fn, _params(m), module=m)


# --- core family ------------------------------------------------------------------------------


def _core_xmodal(need_weights: bool) -> Builder:
    def build(cell: Cell, x: Inputs, device: torch.device) -> Prepared:
        from xmodal.attention import attend

        mask = None if x.keep is None else x.keep[:, None, None, :]  # (b, 1, 1, i)

        def fn() -> Tensor:
            return attend(x.q, x.k, x.v, mask, need_weights=need_weights)[0]

        return Prepared(fn)

    return build


def _sdpa(backend: str | None) -> Builder:
    def build(cell: Cell, x: Inputs, device: torch.device) -> Prepared:
        mask = None if x.keep is None else x.keep[:, None, None, :]  # (b, 1, 1, i)

        def fn() -> Tensor:
            return F.scaled_dot_product_attention(x.q, x.k, x.v, attn_mask=mask)

        if backend is None:
            return Prepared(fn)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return Prepared(fn, context=functools.partial(sdpa_kernel, getattr(SDPBackend, backend)))

    return build


def _cuda_only(cell: Cell, device: torch.device) -> str | None:
    return None if device.type == "cuda" else "CUDA only"


def _cuda_unmasked(cell: Cell, device: torch.device) -> str | None:
    if device.type != "cuda":
        return "CUDA only"
    return "takes no arbitrary mask" if cell.masked else None


IMPLS: tuple[Impl, ...] = (
    Impl("xmodal", "module", "CrossModalAttention, need_weights=False (fused)", _xmodal(False)),
    Impl(
        "xmodal-nobias",
        "module",
        "CrossModalAttention(bias=False), need_weights=False: like for like with bias-free peers",
        _xmodal(False, bias=False),
        bias=False,
    ),
    Impl(
        "xmodal-projected",
        "module",
        "CrossModalAttention(absorb_projections=False), need_weights=False: where xmodal "
        "absorbs the K/V projections, the path it would take otherwise",
        _xmodal(False, absorb=False),
        check=_absorbs,
    ),
    Impl(
        "xmodal-weights",
        "module",
        "CrossModalAttention, need_weights=True (explicit, fp32 softmax)",
        _xmodal(True),
    ),
    Impl(
        "notebook",
        "module",
        "the seed notebook's class, verbatim",
        _notebook,
        requires=("numpy",),
        check=_one_width,
    ),
    Impl(
        "torch-mha",
        "module",
        "nn.MultiheadAttention(kdim, vdim), need_weights=False",
        _mha(False),
        check=_mha_check,
    ),
    Impl(
        "torch-mha-weights",
        "module",
        "nn.MultiheadAttention(kdim, vdim), need_weights=True, per-head weights",
        _mha(True),
        check=_mha_check,
    ),
    Impl(
        "hf-mllama-sdpa",
        "module",
        "transformers MllamaTextCrossAttention (q/k RMSNorm, no bias), sdpa",
        _mllama("sdpa"),
        requires=("transformers",),
        check=_mllama_check,
        bias=False,
    ),
    Impl(
        "hf-mllama-eager",
        "module",
        "transformers MllamaTextCrossAttention, eager",
        _mllama("eager"),
        requires=("transformers",),
        check=_mllama_check,
        bias=False,
    ),
    Impl(
        "hf-idefics-sdpa",
        "module",
        "transformers IdeficsAttention(is_cross_attention=True) (no bias), sdpa",
        _idefics("sdpa"),
        requires=("transformers",),
        check=_hf_check,
        bias=False,
    ),
    Impl(
        "hf-idefics-eager",
        "module",
        "transformers IdeficsAttention(is_cross_attention=True), eager",
        _idefics("eager"),
        requires=("transformers",),
        check=_hf_check,
        bias=False,
    ),
    Impl(
        "flamingo-pytorch",
        "module",
        "flamingo_pytorch MaskedCrossAttention (adds a LayerNorm; no bias)",
        _flamingo,
        requires=("flamingo_pytorch",),
        check=_flamingo_check,
        bias=False,
    ),
    Impl("core:xmodal", "core", "xmodal.attend, fused (SDPA)", _core_xmodal(False)),
    Impl(
        "core:xmodal-weights",
        "core",
        "xmodal.attend, explicit (fp32 softmax, returns weights)",
        _core_xmodal(True),
    ),
    Impl("core:sdpa", "core", "F.scaled_dot_product_attention, default dispatch", _sdpa(None)),
    Impl(
        "core:sdpa-flash",
        "core",
        "SDPA pinned to FLASH_ATTENTION",
        _sdpa("FLASH_ATTENTION"),
        check=_cuda_unmasked,
    ),
    Impl(
        "core:sdpa-cudnn",
        "core",
        "SDPA pinned to CUDNN_ATTENTION",
        _sdpa("CUDNN_ATTENTION"),
        check=_cuda_only,
    ),
    Impl(
        "core:sdpa-efficient",
        "core",
        "SDPA pinned to EFFICIENT_ATTENTION",
        _sdpa("EFFICIENT_ATTENTION"),
        check=_cuda_only,
    ),
)


def select_impls(names: tuple[str, ...] | None) -> list[Impl]:
    """The implementations named (all when ``None``), in the order of :data:`IMPLS`."""
    if names is None:
        return list(IMPLS)
    known = {impl.name for impl in IMPLS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown implementation(s) {unknown}; expected some of {sorted(known)}")
    return [impl for impl in IMPLS if impl.name in names]
