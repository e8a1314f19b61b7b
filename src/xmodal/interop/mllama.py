"""HF Mllama (Llama 3.2 Vision) cross-attention decoder layers -> :class:`GatedCrossAttentionBlock`.

Legend: ``b`` batch, ``t`` text tokens, ``i`` image tokens, ``m`` images, ``h`` query heads,
``k`` key/value heads, ``d`` head width, ``D`` text width (Mllama projects the vision features
to ``D`` before the language model, so keys and values are read from width ``D`` too),
``F`` MLP width (``intermediate_size``).

Key mapping (``MllamaCrossAttentionDecoderLayer`` -> ``GatedCrossAttentionBlock``):

==================================  ======================================  =================
HF key                              xmodal key                              shape
==================================  ======================================  =================
``input_layernorm.weight``          ``norm.weight`` (RMSNorm)               ``(D,)``
``cross_attn.q_proj.weight``        ``attn.text_query.weight``              ``(h·d, D)``
``cross_attn.k_proj.weight``        ``attn.image_key.weight``               ``(k·d, D)``
``cross_attn.v_proj.weight``        ``attn.image_value.weight``             ``(k·d, D)``
``cross_attn.o_proj.weight``        ``attn.output_proj.weight``             ``(D, h·d)``
``cross_attn.q_norm.weight``        ``attn.q_norm.weight`` (RMSNorm)        ``(d,)``
``cross_attn.k_norm.weight``        ``attn.k_norm.weight`` (RMSNorm)        ``(d,)``
``cross_attn_attn_gate``            ``attn_gate.alpha``                     ``(1,)``
``post_attention_layernorm.weight`` ``ff.norm.weight`` (RMSNorm)            ``(D,)``
``mlp.gate_proj.weight``            ``ff.proj_gate.weight``                 ``(F, D)``
``mlp.up_proj.weight``              ``ff.proj_in.weight``                   ``(F, D)``
``mlp.down_proj.weight``            ``ff.proj_out.weight``                  ``(D, F)``
``cross_attn_mlp_gate``             ``ff_gate.alpha``                       ``(1,)``
==================================  ======================================  =================

Mask policy: ``grouped`` (consecutive image tokens form a group that the following text attends
to together; text before the first image sees nothing).

Known difference (transformers #39379): HF gives a text token that sees no image a *uniform*
attention over every image token and adds it through the attention gate (it only zeroes the
MLP branch of such a token). The converted block passes such a token through unchanged, as
Meta's reference and torchtune do. Tokens that see at least one image agree to float rounding.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from xmodal.attention import CrossModalAttention
from xmodal.blocks import GatedCrossAttentionBlock
from xmodal.feedforward import FeedForward
from xmodal.gating import TanhGate
from xmodal.interop._load import Remapper, gated_activation, match_source, rms_qk_norm

__all__ = ["from_hf_mllama", "from_hf_mllama_model"]

_SOURCE = "transformers MllamaCrossAttentionDecoderLayer"

# HF key -> xmodal key, one to one.
_KEYS = {
    "input_layernorm.weight": "norm.weight",
    "cross_attn.q_proj.weight": "attn.text_query.weight",
    "cross_attn.k_proj.weight": "attn.image_key.weight",
    "cross_attn.v_proj.weight": "attn.image_value.weight",
    "cross_attn.o_proj.weight": "attn.output_proj.weight",
    "cross_attn.q_norm.weight": "attn.q_norm.weight",
    "cross_attn.k_norm.weight": "attn.k_norm.weight",
    "cross_attn_attn_gate": "attn_gate.alpha",
    "post_attention_layernorm.weight": "ff.norm.weight",
    "mlp.gate_proj.weight": "ff.proj_gate.weight",
    "mlp.up_proj.weight": "ff.proj_in.weight",
    "mlp.down_proj.weight": "ff.proj_out.weight",
    "cross_attn_mlp_gate": "ff_gate.alpha",
}


def from_hf_mllama(layer: nn.Module) -> GatedCrossAttentionBlock:
    """Convert one HF ``MllamaCrossAttentionDecoderLayer`` into a :class:`GatedCrossAttentionBlock`.

    The block has grouped-query attention with ``num_key_value_heads`` key/value heads, RMSNorm
    on queries and keys, RMSNorms before attention and MLP, a SwiGLU MLP of width
    ``intermediate_size``, and scalar gates -- all with the layer's epsilon, dtype, device and
    train/eval mode. Feed it the same ``cross_attention_states`` ``(b, i, D)`` and a keep-mask
    built with ``xmodal.media_attention_mask(..., policy="grouped")``.

    Raises:
        ImportError: ``transformers`` is not installed.
        TypeError: ``layer`` is not an ``MllamaCrossAttentionDecoderLayer``.
        ValueError: the MLP's activation has no xmodal equivalent.
        ConversionError: a key is missing or unexpected, or a shape does not fit (named).
    """
    from transformers.models.mllama.modeling_mllama import MllamaCrossAttentionDecoderLayer

    if not isinstance(layer, MllamaCrossAttentionDecoderLayer):
        raise TypeError(
            f"layer must be a transformers MllamaCrossAttentionDecoderLayer, got "
            f"{type(layer).__name__}"
        )
    ca = layer.cross_attn
    dim = ca.hidden_size
    attn = CrossModalAttention(
        dim,
        ca.num_heads,
        image_dim=ca.k_proj.in_features,
        head_dim=ca.head_dim,
        num_kv_heads=ca.num_key_value_heads,
        qk_norm=True,
        dropout=float(ca.dropout),
        bias=False,
    )
    rms_qk_norm(attn, ca.head_dim, ca.q_norm.variance_epsilon)
    ff = FeedForward(
        dim,
        activation=gated_activation(getattr(ca.config, "hidden_act", None), source=_SOURCE),
        hidden_dim=layer.mlp.intermediate_size,
        norm=nn.RMSNorm(dim, eps=layer.post_attention_layernorm.variance_epsilon),
    )
    block = GatedCrossAttentionBlock.from_parts(
        attn=attn,
        ff=ff,
        norm=nn.RMSNorm(dim, eps=layer.input_layernorm.variance_epsilon),
        attn_gate=TanhGate(),
        ff_gate=TanhGate(),
    )
    match_source(block, layer)

    rm = Remapper(layer.state_dict(), source=_SOURCE)
    for theirs, ours in _KEYS.items():
        rm.copy(theirs, ours)
    rm.load_into(block)
    return block


def from_hf_mllama_model(model: nn.Module) -> dict[int, GatedCrossAttentionBlock]:
    """Convert every cross-attention layer of an HF Mllama model (any module that contains
    ``MllamaCrossAttentionDecoderLayer`` s, e.g. ``MllamaTextModel`` or
    ``MllamaForConditionalGeneration``).

    Returns:
        ``{hf_layer_index: block}``, keyed by the layer's position in HF's ``layers`` list, which
        interleaves self- and cross-attention layers (``config.cross_attention_layers``). Meta's
        checkpoints number the cross-attention layers ``0, 1, ...`` on their own and torchtune
        wraps them as ``layers.{j}.fusion_layer`` of the self-attention layer they precede; see
        ``docs/interop.md``.
    """
    blocks = {index: from_hf_mllama(layer) for index, layer in _cross_layers(model)}
    if not blocks:
        raise ValueError(
            f"model ({type(model).__name__}) contains no MllamaCrossAttentionDecoderLayer"
        )
    return blocks


def _cross_layers(model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
    from transformers.models.mllama.modeling_mllama import MllamaCrossAttentionDecoderLayer

    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList):
            for index, layer in enumerate(layers):
                if isinstance(layer, MllamaCrossAttentionDecoderLayer):
                    yield index, layer
