"""HF ``IdeficsGatedCrossAttentionLayer`` -> ``GatedCrossAttentionBlock``, against the real layer.

Legend: ``b`` batch, ``t`` text tokens, ``m`` images, ``n`` tokens per image, ``i = m·n``,
``D`` text width, ``E`` image width.

HF's RMSNorm takes its variance in float32 and its eager softmax runs in float32 whatever the
input dtype, so the comparison is in float32 (a float64 run would still be float32-accurate).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xmodal import media_attention_mask, media_locations_from_ids
from xmodal.interop import ConversionError, from_hf_idefics

transformers = pytest.importorskip("transformers")
idefics = pytest.importorskip("transformers.models.idefics.modeling_idefics")
processing = pytest.importorskip("transformers.models.idefics.processing_idefics")

IMG, EOS, PAD = 99, 2, 0
# Row 0: text first, then two images. Row 1: no image, padded. Row 2: image first, padded.
IDS = [
    [5, 6, IMG, 7, 8, IMG, 9, 10],
    [5, 6, 7, 8, 9, 10, PAD, PAD],
    [IMG, 5, 6, 7, 8, 9, PAD, PAD],
]
M, N, D, E = 2, 3, 32, 24  # E != D: Idefics' keys/values read the vision width
FLOAT32 = {"atol": 2e-6, "rtol": 2e-5}  # a few float32 ulps over widths <= 48


class _Tokenizer:
    """The two attributes Idefics' mask helper reads from a tokenizer."""

    eos_token_id = EOS

    def convert_tokens_to_ids(self, token: str) -> int:
        assert token == processing.IMAGE_TOKEN
        return IMG


def _layer(
    alpha_type: str, qk_layer_norms: bool, implementation: str = "eager", **overrides: object
) -> nn.Module:
    config = transformers.IdeficsConfig(
        hidden_size=D,
        num_attention_heads=4,
        intermediate_size=48,
        rms_norm_eps=1e-6,
        qk_layer_norms=qk_layer_norms,
        alpha_type=alpha_type,
        vision_config={
            "embed_dim": E,
            "image_size": 8,
            "patch_size": 4,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 16,
        },
        **overrides,
    )
    config._attn_implementation = implementation  # IdeficsModel would set it; a bare layer: None
    layer = idefics.IdeficsGatedCrossAttentionLayer(config, layer_idx=0).eval()
    with torch.no_grad():  # HF's zero gates / unit norms would hide mix-ups
        for name, p in layer.named_parameters():
            if name.startswith("alpha"):
                p.uniform_(-1.0, 1.0)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)
    return layer


def _hf_masks() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What IdeficsProcessor + IdeficsModel make of the token ids: an additive (b, 1, t, m·n)
    mask, the (b, t) cross_attention_gate, and the keep-mask they stand for."""
    incremental, _ = processing.image_attention_mask_for_packed_input_ids(
        torch.tensor(IDS), _Tokenizer(), "pt"
    )
    per_image = processing.incremental_to_binary_attention_mask(
        incremental, "pt", num_classes=M
    )  # (b, t, m)
    keep = per_image.repeat_interleave(N, dim=-1).bool()  # (b, t, m·n), image-major
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    gate = keep.any(dim=-1).float()  # (b, t): 1 if the token attends to some image
    return additive[:, None], gate, keep


def test_immediate_policy_is_idefics_processor_mask() -> None:
    locations = media_locations_from_ids(torch.tensor(IDS), IMG)
    ours = media_attention_mask(locations, N, num_media=M, policy="immediate")
    assert torch.equal(ours, _hf_masks()[2])


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("alpha_type", ["float", "vector"])
@pytest.mark.parametrize("qk_layer_norms", [False, True], ids=["no_qk_norm", "qk_norm"])
def test_from_hf_idefics_matches_on_rows_that_see_an_image(
    alpha_type: str, qk_layer_norms: bool, implementation: str
) -> None:
    layer = _layer(alpha_type, qk_layer_norms, implementation)
    block = from_hf_idefics(layer)
    b, t = len(IDS), len(IDS[0])
    text = torch.randn(b, t, D)
    media = torch.randn(b, M * N, E)  # image_hidden_states, image-major
    additive, gate, _ = _hf_masks()
    keep = media_attention_mask(
        media_locations_from_ids(torch.tensor(IDS), IMG), N, num_media=M, policy="immediate"
    )
    with torch.no_grad():
        theirs = layer(
            text,
            image_hidden_states=media,
            image_attention_mask=additive,
            cross_attention_gate=gate,
        )
        theirs = theirs[0] if isinstance(theirs, tuple) else theirs
        ours = block(text, media, keep)

    sees = keep.any(dim=-1)  # (b, t)
    assert sees.any()
    assert (~sees).any()
    torch.testing.assert_close(ours[sees], theirs[sees], **FLOAT32)
    # A token that sees no image: xmodal passes it through; HF zeroes only its attention
    # branch and still adds tanh(alpha_dense) * mlp(norm(x)) -- which the converted ff and
    # ff_gate reproduce, so the feed-forward mapping is checked on these rows too.
    assert torch.equal(ours[~sees], text[~sees])
    with torch.no_grad():
        ff_only = text + block.ff_gate(block.ff(text))
    torch.testing.assert_close(theirs[~sees], ff_only[~sees], **FLOAT32)


def test_converted_gates_and_norms() -> None:
    vector = from_hf_idefics(_layer("vector", True))
    assert vector.attn_gate.alpha.shape == (D,)
    assert vector.ff_gate.dim == D
    assert vector.attn.q_norm.eps == vector.norm.eps == 1e-6
    assert vector.image_dim == E
    scalar = from_hf_idefics(_layer("float", False))
    assert scalar.attn_gate.alpha.shape == (1,)
    assert scalar.attn.q_norm is None


def test_errors_name_the_problem() -> None:
    with pytest.raises(TypeError, match=r"IdeficsGatedCrossAttentionLayer, got Linear"):
        from_hf_idefics(nn.Linear(2, 2))
    layer = _layer("vector", False)
    layer.alpha_dense = nn.Parameter(torch.zeros(1, 1, D + 1))  # hand-edited gate width
    with pytest.raises(ConversionError, match=r"alpha_dense has shape \(33,\)"):
        from_hf_idefics(layer)
    layer = _layer("float", False)
    del layer.post_attention_layernorm.weight  # a missing tensor
    layer.post_attention_layernorm.weight = torch.ones(D)  # a plain attribute: not in state_dict
    with pytest.raises(ConversionError, match=r"missing keys: \['post_attention_layernorm"):
        from_hf_idefics(layer)
    with pytest.raises(ValueError, match=r"hidden_act='relu'"):
        from_hf_idefics(_layer("float", False, hidden_act="relu"))
