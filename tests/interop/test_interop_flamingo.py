"""flamingo-pytorch modules and OpenFlamingo state dicts -> xmodal, against flamingo-pytorch.

Legend: ``b`` batch, ``t`` text tokens, ``m`` media slots, ``n`` tokens per medium (latents),
``l`` latents, ``D`` text width, ``E`` visual width.

flamingo-pytorch computes in the input dtype throughout, so float64 runs compare to ~1e-12.
OpenFlamingo's ``helpers.py`` is flamingo-pytorch's code with the same parameter names plus a
``dim_visual`` (``to_kv`` reads width ``E``); the reference for an OpenFlamingo block is a
flamingo-pytorch block whose ``to_kv`` is swapped for an ``E``-wide one, which is exactly that.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xmodal import (
    GatedCrossAttentionBlock,
    PerceiverResampler,
    media_attention_mask,
    media_locations_from_ids,
)
from xmodal.interop import (
    ConversionError,
    flamingo_media_policy,
    from_flamingo_pytorch,
    load_open_flamingo,
)

fp = pytest.importorskip("flamingo_pytorch")

IMG, PAD = 99, 0
# Row 0: text first, then two images. Row 1: no image, padded. Row 2: image first, one image
# only (its second media slot is padding), padded.
IDS = [
    [5, 6, IMG, 7, 8, IMG, 9, 10],
    [5, 6, 7, 8, 9, 10, PAD, PAD],
    [IMG, 5, 6, 7, 8, 9, PAD, PAD],
]
B, T, M, N, D = 3, 8, 2, 3, 32
TOL = {torch.float64: {"atol": 1e-12, "rtol": 1e-10}, torch.float32: {"atol": 2e-6, "rtol": 2e-5}}


def _randomize(module: nn.Module) -> nn.Module:
    """Gates off zero, norms off one: a mix-up must show in the output."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gate"):
                p.uniform_(-1.0, 1.0)
            elif p.dim() == 1:  # LayerNorm weights and biases
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.2)
    return module.eval()


def _fp_block(immediate: bool = True, dim_visual: int = D, dtype=torch.float64) -> nn.Module:
    block = fp.GatedCrossAttentionBlock(
        dim=D, dim_head=8, heads=4, ff_mult=2, only_attend_immediate_media=immediate
    )
    if dim_visual != D:  # OpenFlamingo's dim_visual: to_kv reads the visual width
        block.attn.to_kv = nn.Linear(dim_visual, 2 * 32, bias=False)
    return _randomize(block).to(dtype)


def _inputs(e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    locations = media_locations_from_ids(torch.tensor(IDS), IMG)  # (b, t)
    return torch.randn(B, T, D, dtype=dtype), torch.randn(B, M, N, e, dtype=dtype), locations


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("immediate", [True, False], ids=["immediate", "all_previous"])
def test_gated_block_matches_on_rows_that_see_an_image(dtype: torch.dtype, immediate: bool) -> None:
    theirs_block = _fp_block(immediate, dtype=dtype)
    policy = flamingo_media_policy(theirs_block)
    assert policy == ("immediate" if immediate else "all_previous")
    block = from_flamingo_pytorch(theirs_block)
    assert isinstance(block, GatedCrossAttentionBlock)
    text, media, locations = _inputs(D, dtype)
    mask = media_attention_mask(locations, N, num_media=M, policy=policy)  # (b, t, m·n)
    with torch.no_grad():
        theirs = theirs_block(text, media, media_locations=locations)
        ours = block(text, media, mask)

    sees = mask.any(dim=-1)  # (b, t)
    assert sees.any()
    assert (~sees).any()
    torch.testing.assert_close(ours[sees], theirs[sees], **TOL[dtype])
    # Tokens that see no image pass through xmodal unchanged. flamingo-pytorch still adds the
    # gated feed-forward -- and, with all_previous, the plain average of the values of every
    # media token (all scores are filled with -max, so the softmax is uniform).
    assert torch.equal(ours[~sees], text[~sees])
    with torch.no_grad():
        x = text
        if not immediate:
            values = block.attn.image_value(media.flatten(1, 2))  # (b, m·n, h·d)
            average = block.attn.output_proj(values.mean(dim=1, keepdim=True))  # (b, 1, D)
            x = x + block.attn_gate(average)
        reference = x + block.ff_gate(block.ff(x))
    torch.testing.assert_close(theirs[~sees], reference[~sees], **TOL[dtype])


def test_gated_block_without_media_locations_sees_everything() -> None:
    theirs_block = _fp_block()
    block = from_flamingo_pytorch(theirs_block)
    text, media, _ = _inputs(D, torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(
            block(text, media), theirs_block(text, media), **TOL[torch.float64]
        )


@pytest.mark.parametrize("rank", [3, 4])
def test_perceiver_resampler_matches(rank: int) -> None:
    theirs = fp.PerceiverResampler(
        dim=D, depth=2, dim_head=8, heads=4, num_latents=5, num_media_embeds=M, ff_mult=2
    )
    theirs = _randomize(theirs).double()
    ours = from_flamingo_pytorch(theirs)
    assert isinstance(ours, PerceiverResampler)
    media = torch.randn(B, M, 7, D, dtype=torch.float64) if rank == 4 else torch.randn(B, 7, D)
    media = media.double()
    with torch.no_grad():
        torch.testing.assert_close(ours(media), theirs(media), **TOL[torch.float64])


def test_from_flamingo_pytorch_rejects_other_modules() -> None:
    with pytest.raises(
        TypeError, match=r"GatedCrossAttentionBlock or PerceiverResampler, got .*Linear"
    ):
        from_flamingo_pytorch(nn.Linear(2, 2))


# ---- OpenFlamingo state dicts ------------------------------------------------------------------

E, L = 24, 5  # the visual width (!= D) and the resampler's latents


def _open_flamingo_state(
    *, media_embeds: bool = False
) -> tuple[dict[str, torch.Tensor], dict[int, nn.Module], nn.Module]:
    """A full-model OpenFlamingo state_dict with blocks before LM layers 1 and 3, built from
    flamingo-pytorch modules (same key names); blocks appear under both of their names."""
    blocks = {j: _fp_block(dim_visual=E) for j in (1, 3)}
    perceiver = fp.PerceiverResampler(
        dim=E, depth=2, dim_head=8, heads=4, num_latents=L, num_media_embeds=M, ff_mult=2
    )
    perceiver = _randomize(perceiver).double()
    state: dict[str, torch.Tensor] = {
        "vision_encoder.conv1.weight": torch.zeros(2, 2),
        "lang_encoder.model.embed_tokens.weight": torch.zeros(4, D),
    }
    for key, value in perceiver.state_dict().items():
        if key == "media_pos_emb":
            if not media_embeds:  # OpenFlamingo's default: no media embeddings at all
                with torch.no_grad():
                    perceiver.media_pos_emb.zero_()
                continue
            key = "media_time_embs"
        state[f"perceiver.{key}"] = value
    for j, block in blocks.items():
        for key, value in block.state_dict().items():
            state[f"lang_encoder.gated_cross_attn_layers.{j}.{key}"] = value
            state[f"lang_encoder.model.layers.{j}.gated_cross_attn_layer.{key}"] = value
            state[f"lang_encoder.old_decoder_blocks.{j}.self_attn.q_proj.weight"] = torch.ones(1)
    return state, blocks, perceiver


@pytest.mark.parametrize("media_embeds", [False, True], ids=["no_media_embs", "media_time_embs"])
def test_load_open_flamingo_matches_blocks_and_perceiver(media_embeds: bool) -> None:
    state, blocks, perceiver = _open_flamingo_state(media_embeds=media_embeds)
    loaded = load_open_flamingo(state, num_heads=4, perceiver_num_heads=4)
    assert sorted(loaded.blocks) == [1, 3]
    assert loaded.policy == "immediate"
    assert "lang_encoder.model.embed_tokens.weight" in loaded.ignored
    assert not any("gated_cross_attn" in k or k.startswith("perceiver.") for k in loaded.ignored)
    assert loaded.perceiver is not None
    assert (loaded.perceiver.media_embed is not None) == media_embeds

    images = torch.randn(B, M, 7, E, dtype=torch.float64)  # vision features, 7 per image
    with torch.no_grad():
        latents = perceiver(images)  # (b, m, l, E)
        torch.testing.assert_close(loaded.perceiver(images), latents, **TOL[torch.float64])
        text = torch.randn(B, T, D, dtype=torch.float64)
        locations = media_locations_from_ids(torch.tensor(IDS), IMG)
        mask = media_attention_mask(locations, L, num_media=M, policy=loaded.policy)
        sees = mask.any(dim=-1)
        for j, theirs in blocks.items():
            block = loaded.blocks[j]
            assert block.image_dim == E
            assert block.dim == D
            expected = theirs(text, latents, media_locations=locations)
            torch.testing.assert_close(
                block(text, latents, mask)[sees], expected[sees], **TOL[torch.float64]
            )


def test_load_open_flamingo_frame_embeddings() -> None:
    """OpenFlamingo adds ``frame_embs[f]`` to frame ``f`` and flattens ``(f, n)``."""
    state, _, perceiver = _open_flamingo_state()
    frame_embs = torch.randn(3, E, dtype=torch.float64)
    state["perceiver.frame_embs"] = frame_embs
    loaded = load_open_flamingo(state, num_heads=4, perceiver_num_heads=4)
    assert loaded.perceiver is not None
    video = torch.randn(B, M, 2, 4, E, dtype=torch.float64)  # (b, m, f, n, E)
    with torch.no_grad():
        flat = (video + frame_embs[:2, None, :]).flatten(2, 3)  # (b, m, f·n, E)
        torch.testing.assert_close(loaded.perceiver(video), perceiver(flat), **TOL[torch.float64])


def test_load_open_flamingo_names_missing_unexpected_and_misshaped_keys() -> None:
    state, _, _ = _open_flamingo_state()
    del state["perceiver.norm.bias"]
    with pytest.raises(ConversionError, match=r"missing keys: \['perceiver.norm.bias'\]"):
        load_open_flamingo(state, num_heads=4, perceiver_num_heads=4)

    state, _, _ = _open_flamingo_state()
    state["lang_encoder.gated_cross_attn_layers.3.attn.to_k.weight"] = torch.zeros(1)
    with pytest.raises(
        ConversionError,
        match=r"unexpected keys: \['lang_encoder.gated_cross_attn_layers.3.attn.to_k.weight'\]",
    ):
        load_open_flamingo(state, num_heads=4, perceiver_num_heads=4)

    state, _, _ = _open_flamingo_state()
    for name in ("gated_cross_attn_layers.1.", "model.layers.1.gated_cross_attn_layer."):
        state[f"lang_encoder.{name}attn.to_kv.weight"] = torch.zeros(63, E)
    with pytest.raises(ConversionError, match=r"attn.to_kv.weight has shape \(63, 24\)"):
        load_open_flamingo(state, num_heads=4, perceiver_num_heads=4)


def test_load_open_flamingo_rejects_inconsistent_input() -> None:
    state, _, _ = _open_flamingo_state()
    state["lang_encoder.model.layers.1.gated_cross_attn_layer.attn_gate"] = torch.ones(1)
    with pytest.raises(ValueError, match=r"two different tensors for gated block 1's 'attn_gate'"):
        load_open_flamingo(state, num_heads=4, perceiver_num_heads=4)
    state, _, _ = _open_flamingo_state()
    with pytest.raises(ValueError, match=r"num_heads=5 does not divide the inner width 32"):
        load_open_flamingo(state, num_heads=5, perceiver_num_heads=4)
    with pytest.raises(ValueError, match=r"state_dict has no OpenFlamingo keys"):
        load_open_flamingo({"lm_head.weight": torch.zeros(1)})
