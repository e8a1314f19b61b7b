"""HF ``MllamaCrossAttentionDecoderLayer`` -> ``GatedCrossAttentionBlock``, against the real layer.

Legend: ``b`` batch, ``t`` text tokens, ``m`` images, ``n`` tokens per image (tiles x tokens per
tile), ``i = m·n`` image tokens, ``D`` text width.

HF's numerics set the tolerance: its RMSNorms and its eager softmax run in float32 whatever the
input dtype, so the comparison is in float32 (a float64 run would still be float32-accurate).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xmodal import GatedCrossAttentionBlock, media_attention_mask, media_locations_from_ids
from xmodal.interop import ConversionError, from_hf_mllama, from_hf_mllama_model

transformers = pytest.importorskip("transformers")
mllama = pytest.importorskip("transformers.models.mllama.modeling_mllama")
processing = pytest.importorskip("transformers.models.mllama.processing_mllama")

IMG, PAD = 99, 0  # the <|image|> token id; padding
TILES, TOKENS_PER_TILE = 2, 3  # Mllama's images come as tiles of vision tokens
N = TILES * TOKENS_PER_TILE  # tokens per image after flattening tiles
# Row 0: text first, one image, then a group of two adjacent images (Mllama's "grouped" case).
# Row 1: no image at all, padded. Row 2: an image first and one later; its second image has one
# tile only (the other tile is tile padding); padded.
IDS = [
    [5, IMG, 6, 7, IMG, IMG, 8, 9],
    [5, 6, 7, 8, 9, 10, PAD, PAD],
    [IMG, 5, 6, IMG, 7, 8, PAD, PAD],
]
NUM_TILES = [[2, 2, 2], [], [2, 1]]
M = 3  # media slots: the most images in a row
FLOAT32 = {"atol": 2e-6, "rtol": 2e-5}  # a few float32 ulps over widths <= 48


def _config(**overrides: object) -> object:
    kwargs = {
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # GQA: 2 query heads per key/value head
        "intermediate_size": 48,  # not a multiple of hidden_size: needs hidden_dim=
        "num_hidden_layers": 2,
        "cross_attention_layers": [1],
        "rms_norm_eps": 1e-5,
        "vocab_size": 100,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": PAD,
    }
    kwargs.update(overrides)
    config = transformers.MllamaTextConfig(
        **{k: v for k, v in kwargs.items() if k != "attn_implementation"}
    )
    # What MllamaModel would set; a bare layer has None. Overridable: the tests run both.
    config._attn_implementation = kwargs.get("attn_implementation", "eager")
    return config


def _random_layer(**overrides: object) -> nn.Module:
    layer = mllama.MllamaCrossAttentionDecoderLayer(_config(**overrides), layer_idx=1).eval()
    with torch.no_grad():  # HF initialises gates to 0 and norms to 1, which would hide mix-ups
        for name, p in layer.named_parameters():
            if "gate" in name and "proj" not in name:
                p.uniform_(-1.0, 1.0)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)
    return layer


def _hf_masks() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF's own processor path: token ids -> (b, t, m, tiles) 0/1 -> additive mask + row mask."""
    sparse = [processing.get_cross_attention_token_mask(row, IMG) for row in IDS]
    dense = processing.convert_sparse_cross_attention_mask_to_dense(
        sparse, NUM_TILES, max_num_tiles=TILES, length=len(IDS[0])
    )  # (b, t, m, tiles)
    dense = torch.as_tensor(dense)
    additive, row_mask = mllama._prepare_cross_attention_mask(
        dense, num_vision_tokens=TOKENS_PER_TILE, dtype=torch.float32
    )  # (b, 1, t, m·n), (b, 1, t, 1)
    keep = dense.repeat_interleave(TOKENS_PER_TILE, dim=3).flatten(2) != 0  # (b, t, m·n)
    return additive, row_mask, keep


def _xmodal_mask() -> torch.Tensor:
    """The grouped policy from token ids, and-ed with the tile padding of each image."""
    locations = media_locations_from_ids(torch.tensor(IDS), IMG)
    mask = media_attention_mask(locations, N, num_media=M, policy="grouped")  # (b, t, m·n)
    tiles_present = torch.zeros(len(IDS), M, TILES, TOKENS_PER_TILE, dtype=torch.bool)
    for row, tiles in enumerate(NUM_TILES):
        for image, count in enumerate(tiles):
            tiles_present[row, image, :count] = True
    return mask & tiles_present.flatten(1)[:, None, :]  # (b, t, m·n)


def test_grouped_policy_is_mllamas_processor_mask() -> None:
    _, _, hf_keep = _hf_masks()
    assert torch.equal(_xmodal_mask(), hf_keep)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_from_hf_mllama_matches_on_rows_that_see_an_image(
    kv_heads: int, implementation: str
) -> None:
    layer = _random_layer(num_key_value_heads=kv_heads, attn_implementation=implementation)
    block = from_hf_mllama(layer)
    b, t, d = len(IDS), len(IDS[0]), 32
    text = torch.randn(b, t, d)
    media = torch.randn(b, M * N, d)  # cross_attention_states, image-major then tile, token
    additive, row_mask, _ = _hf_masks()
    keep = _xmodal_mask()
    with torch.no_grad():
        theirs = layer(
            text,
            cross_attention_states=media,
            cross_attention_mask=additive,
            attention_mask=None,
            full_text_row_masked_out_mask=row_mask,
        )
        theirs = theirs[0] if isinstance(theirs, tuple) else theirs
        ours = block(text, media, keep)
        ours_grouped = block(text, media.view(b, M, N, d), keep)  # (b, m, n, D) media too

    sees = keep.any(dim=-1)  # (b, t)
    assert sees.any()
    assert (~sees).any()
    torch.testing.assert_close(ours[sees], theirs[sees], **FLOAT32)
    assert torch.equal(ours_grouped, ours)
    # Tokens before any image (row 0's first token, all of row 1): xmodal passes them through.
    assert torch.equal(ours[~sees], text[~sees])
    # HF instead lets them attend *uniformly* to every image token and adds that through the
    # attention gate, zeroing only the MLP branch (transformers #39379). Pin down that this is
    # the only difference: HF == x + tanh(g) * attn(norm(x)) with nothing masked.
    with torch.no_grad():
        uniform, _ = block.attn(block.norm(text), media, None, need_weights=False)
        bug = text + block.attn_gate(uniform)
    fixed_upstream = torch.equal(theirs[~sees], text[~sees])
    assert fixed_upstream or torch.allclose(theirs[~sees], bug[~sees], **FLOAT32), (
        "HF Mllama's output on tokens without an image is neither the #39379 uniform "
        "attention nor a pass-through"
    )


def test_converted_block_has_the_layers_parts() -> None:
    layer = _random_layer()
    block = from_hf_mllama(layer)
    assert isinstance(block, GatedCrossAttentionBlock)
    assert (block.num_heads, block.num_kv_heads, block.head_dim) == (4, 2, 8)
    assert block.qk_norm
    assert block.attn.q_norm.eps == block.norm.eps == 1e-5
    assert block.ff.hidden_dim == 48
    assert block.ff.activation == "swiglu"
    assert not block.training
    torch.testing.assert_close(block.attn_gate.alpha, layer.cross_attn_attn_gate, rtol=0, atol=0)


def test_from_hf_mllama_model_keys_blocks_by_hf_layer_index() -> None:
    model = transformers.MllamaForCausalLM(_config(num_hidden_layers=3, cross_attention_layers=[1]))
    blocks = from_hf_mllama_model(model)
    assert list(blocks) == [1]
    hf = model.model.layers[1]
    assert torch.equal(blocks[1].attn.image_key.weight, hf.cross_attn.k_proj.weight)
    with pytest.raises(ValueError, match=r"contains no MllamaCrossAttentionDecoderLayer"):
        from_hf_mllama_model(nn.Linear(2, 2))


def test_errors_name_the_problem() -> None:
    with pytest.raises(TypeError, match=r"MllamaCrossAttentionDecoderLayer, got Linear"):
        from_hf_mllama(nn.Linear(2, 2))
    layer = _random_layer()
    layer.cross_attn.k_proj = nn.Linear(32, 17, bias=False)  # hand-edited: wrong width
    layer.extra_scale = nn.Parameter(torch.ones(1))  # and a parameter nobody maps
    with pytest.raises(ConversionError) as info:
        from_hf_mllama(layer)
    message = str(info.value)
    assert "cross_attn.k_proj.weight has shape (17, 32)" in message
    assert "attn.image_key.weight expects (16, 32)" in message
    assert "unexpected keys: ['extra_scale']" in message
    with pytest.raises(ValueError, match=r"hidden_act='relu'"):
        from_hf_mllama(_random_layer(hidden_act="relu"))
