"""HF Idefics gated cross-attention layers -> :class:`GatedCrossAttentionBlock`.

Legend: ``b`` batch, ``t`` text tokens, ``i`` image tokens, ``h`` heads, ``d`` head width,
``D`` text width (``hidden_size``), ``E`` image width (``vision_config.embed_dim``, or ``D``),
``F`` MLP width (``intermediate_size``).

Key mapping (``IdeficsGatedCrossAttentionLayer`` -> ``GatedCrossAttentionBlock``):

==================================  ======================================  ====================
HF key                              xmodal key                              shape
==================================  ======================================  ====================
``input_layernorm.weight``          ``norm.weight`` (RMSNorm)               ``(D,)``
``cross_attn.q_proj.weight``        ``attn.text_query.weight``              ``(h·d, D)``
``cross_attn.k_proj.weight``        ``attn.image_key.weight``               ``(h·d, E)``
``cross_attn.v_proj.weight``        ``attn.image_value.weight``             ``(h·d, E)``
``cross_attn.o_proj.weight``        ``attn.output_proj.weight``             ``(D, h·d)``
``cross_attn.q_layer_norm.weight``  ``attn.q_norm.weight`` (if present)     ``(d,)``
``cross_attn.k_layer_norm.weight``  ``attn.k_norm.weight`` (if present)     ``(d,)``
``alpha_cross_attn``                ``attn_gate.alpha``                     see below
``post_attention_layernorm.weight`` ``ff.norm.weight`` (RMSNorm)            ``(D,)``
``mlp.gate_proj.weight``            ``ff.proj_gate.weight``                 ``(F, D)``
``mlp.up_proj.weight``              ``ff.proj_in.weight``                   ``(F, D)``
``mlp.down_proj.weight``            ``ff.proj_out.weight``                  ``(D, F)``
``alpha_dense``                     ``ff_gate.alpha``                       see below
==================================  ======================================  ====================

Gates: ``alpha_type="float"`` gates ``(1,)`` load as they are into scalar :class:`TanhGate` s;
``alpha_type="vector"`` gates ``(1, 1, D)`` are flattened to ``(D,)`` per-channel gates.

Mask policy: ``immediate`` (the Idefics processor lets each text token attend to the last image
before it; the token of the image itself included).

Known differences:

* A text token that sees no image: HF zeroes its attention branch (``cross_attention_gate``)
  but still adds ``tanh(alpha_dense) * mlp(norm(x))``; the converted block passes the token
  through unchanged (xmodal's rule). Tokens that see an image agree to float rounding.
* HF applies ``config.dropout`` to the attention probabilities *and* to both residual
  branches in training; xmodal only to the attention probabilities (no difference in eval).
"""

from __future__ import annotations

from torch import nn

from xmodal.attention import CrossModalAttention
from xmodal.blocks import GatedCrossAttentionBlock
from xmodal.feedforward import FeedForward
from xmodal.gating import TanhGate
from xmodal.interop._load import Remapper, gated_activation, match_source, rms_qk_norm

__all__ = ["from_hf_idefics"]

_SOURCE = "transformers IdeficsGatedCrossAttentionLayer"

_KEYS = {
    "input_layernorm.weight": "norm.weight",
    "cross_attn.q_proj.weight": "attn.text_query.weight",
    "cross_attn.k_proj.weight": "attn.image_key.weight",
    "cross_attn.v_proj.weight": "attn.image_value.weight",
    "cross_attn.o_proj.weight": "attn.output_proj.weight",
    "post_attention_layernorm.weight": "ff.norm.weight",
    "mlp.gate_proj.weight": "ff.proj_gate.weight",
    "mlp.up_proj.weight": "ff.proj_in.weight",
    "mlp.down_proj.weight": "ff.proj_out.weight",
}
_QK_KEYS = {
    "cross_attn.q_layer_norm.weight": "attn.q_norm.weight",
    "cross_attn.k_layer_norm.weight": "attn.k_norm.weight",
}


def from_hf_idefics(layer: nn.Module) -> GatedCrossAttentionBlock:
    """Convert an HF ``IdeficsGatedCrossAttentionLayer`` into a :class:`GatedCrossAttentionBlock`.

    Float gates (``alpha_type="float"``, shape ``(1,)``) become scalar :class:`TanhGate` s;
    vector gates (``alpha_type="vector"``, shape ``(1, 1, D)``) become per-channel gates of
    shape ``(D,)``. With ``qk_layer_norms=True`` the q/k RMSNorms come along, with the layer's
    epsilon. The block has the layer's dtype, device and train/eval mode.

    Feed it the same ``image_hidden_states`` ``(b, i, E)`` and, instead of HF's additive
    ``image_attention_mask`` plus ``cross_attention_gate``, one keep-mask ``(b, t, i)`` --
    ``xmodal.media_attention_mask(..., policy="immediate")``, or ``image_attention_mask == 0``
    for an HF mask you already have.

    Raises:
        ImportError: ``transformers`` is not installed.
        TypeError: ``layer`` is not an ``IdeficsGatedCrossAttentionLayer``.
        ValueError: the MLP's activation has no xmodal equivalent.
        ConversionError: a key is missing or unexpected, or a shape does not fit (named).
    """
    from transformers.models.idefics.modeling_idefics import IdeficsGatedCrossAttentionLayer

    if not isinstance(layer, IdeficsGatedCrossAttentionLayer):
        raise TypeError(
            f"layer must be a transformers IdeficsGatedCrossAttentionLayer, got "
            f"{type(layer).__name__}"
        )
    ca = layer.cross_attn
    dim = layer.hidden_size
    attn = CrossModalAttention(
        dim,
        ca.num_heads,
        image_dim=ca.k_proj.in_features,
        head_dim=ca.head_dim,
        qk_norm=bool(ca.qk_layer_norms),
        dropout=float(ca.dropout),
        bias=False,
    )
    if ca.qk_layer_norms:
        rms_qk_norm(attn, ca.head_dim, ca.q_layer_norm.variance_epsilon)
    ff = FeedForward(
        dim,
        activation=gated_activation(getattr(ca.config, "hidden_act", None), source=_SOURCE),
        hidden_dim=layer.mlp.gate_proj.out_features,
        norm=nn.RMSNorm(dim, eps=layer.post_attention_layernorm.variance_epsilon),
    )
    gates = [_gate(layer, name, dim) for name in ("alpha_cross_attn", "alpha_dense")]
    block = GatedCrossAttentionBlock.from_parts(
        attn=attn,
        ff=ff,
        norm=nn.RMSNorm(dim, eps=layer.input_layernorm.variance_epsilon),
        attn_gate=gates[0],
        ff_gate=gates[1],
    )
    match_source(block, layer)

    rm = Remapper(layer.state_dict(), source=_SOURCE)
    for theirs, ours in _KEYS.items():
        rm.copy(theirs, ours)
    if ca.qk_layer_norms:
        for theirs, ours in _QK_KEYS.items():
            rm.copy(theirs, ours)
    for theirs, ours in (("alpha_cross_attn", "attn_gate.alpha"), ("alpha_dense", "ff_gate.alpha")):
        alpha = rm.take(theirs)
        if alpha is not None and alpha.dim() == 3:
            alpha = alpha.reshape(-1)  # a vector gate: (1, 1, D) -> (D,)
        rm.put(ours, alpha, theirs)
    rm.load_into(block)
    return block


def _gate(layer: nn.Module, name: str, dim: int) -> TanhGate:
    # alpha_type="float": (1,) -> scalar gate; alpha_type="vector": (1, 1, D) -> per-channel
    alpha = getattr(layer, name)
    return TanhGate(dim=dim) if alpha.dim() == 3 else TanhGate()
