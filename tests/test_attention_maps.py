"""record_attention, AttentionMaps and the map helpers (fusion, composition, rollout)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xmodal import CrossModalAttention
from xmodal.attention_maps import (
    AttentionMaps,
    compose,
    fuse_heads,
    record_attention,
    resampler_rollout,
    rollout,
    visible_rows,
)

# float32 probabilities from a float32 softmax: a row sum is exact to a few ulps.
ATOL = 1e-6


class TwoLayer(nn.Module):
    """A toy model that calls its attention modules the way a model would: fused, no weights."""

    def __init__(self, dim: int = 16, heads: int = 4, num_kv_heads: int | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [
                CrossModalAttention(
                    dim, heads, image_dim=8, num_kv_heads=num_kv_heads, dropout=0.0
                ).eval()
                for _ in range(2)
            ]
        )

    def forward(self, text: torch.Tensor, image: torch.Tensor, mask: torch.Tensor | None = None):
        seen = []
        for layer in self.layers:
            out, weights = layer(text, image, mask, need_weights=False)
            seen.append(weights)
            text = text + out
        return text, seen


def _inputs(b: int = 2, t: int = 5, i: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(b, t, 16), torch.randn(b, i, 8)


def _hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_maps_sum_to_one_over_visible_tokens_and_zero_on_blind_rows() -> None:
    model = TwoLayer()
    text, image = _inputs()
    mask = torch.rand(2, 5, 9) > 0.4  # (b, t, i) per-query keep-mask
    mask[0, 1] = False  # this query may see nothing
    mask[1, 4] = False
    mask[0, 0] = False
    mask[0, 0, 3] = True  # this one exactly one token
    with record_attention(model) as maps:
        model(text, image, mask)
    assert maps.names == ["layers.0", "layers.1"]
    for name in maps.names:
        w = maps[name]
        assert w.shape == (2, 4, 5, 9)
        sums = w.sum(-1)  # (b, h, t)
        visible = mask.any(-1)[:, None, :].expand_as(sums)
        torch.testing.assert_close(sums[visible], torch.ones_like(sums[visible]), atol=ATOL, rtol=0)
        assert torch.all(sums[~visible] == 0)
        assert torch.all(w.masked_select(~mask[:, None]) == 0)  # nothing on masked tokens
        assert torch.equal(visible_rows(w), visible)
        torch.testing.assert_close(w[0, :, 0, 3], torch.ones(4))


def test_caller_sees_no_difference_and_outputs_match_the_fused_path() -> None:
    model = TwoLayer()
    text, image = _inputs()
    fused_out, fused_seen = model(text, image)
    assert fused_seen == [None, None]
    with record_attention(model) as maps:
        out, seen = model(text, image)
    assert seen == [None, None]  # the model asked for no weights and got none
    torch.testing.assert_close(out, fused_out, atol=1e-5, rtol=1e-5)  # fused vs explicit, fp32
    assert len(maps) == 2


def test_caller_who_asks_for_weights_gets_the_recorded_ones() -> None:
    attn = CrossModalAttention(16, 4, image_dim=8, dropout=0.0).eval()
    text, image = _inputs()
    with record_attention(attn) as maps:
        _, weights = attn(text, image)  # need_weights defaults to True
    assert maps.names == [""]  # the model is the module itself
    assert weights is not None
    assert torch.equal(maps[""], weights)


def _count_sdpa(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return calls


def test_hooks_are_removed_and_the_fused_path_is_back(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_sdpa(monkeypatch)
    model = TwoLayer()
    text, image = _inputs()
    before = _hook_count(model)
    with record_attention(model):
        assert _hook_count(model) == before + 4  # a pre- and a post-hook per module
        model(text, image)
        assert calls[0] == 0  # explicit path inside the block
    assert _hook_count(model) == before
    _, seen = model(text, image)
    assert calls[0] == 2  # fused again, once per layer
    assert seen == [None, None]


def test_hooks_are_removed_after_an_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_sdpa(monkeypatch)
    model = TwoLayer()
    text, image = _inputs()
    before = _hook_count(model)

    def run_and_fail() -> None:
        with record_attention(model):
            model(text, image)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_and_fail()
    assert _hook_count(model) == before

    def fail_inside_the_module() -> None:
        with record_attention(model):
            model(text[..., :3], image)  # raises between the pre- and the post-hook

    with pytest.raises(ValueError, match="text_features"):
        fail_inside_the_module()
    assert _hook_count(model) == before
    _, seen = model(text, image)
    assert calls[0] == 2
    assert seen == [None, None]


def test_a_module_called_twice_records_twice_in_call_order() -> None:
    model = TwoLayer()
    text, image = _inputs()
    with record_attention(model) as maps:
        model(text, image)
        model(text[:1], image[:1])
    assert [(r.name, r.call) for r in maps] == [
        ("layers.0", 0),
        ("layers.1", 0),
        ("layers.0", 1),
        ("layers.1", 1),
    ]
    assert [w.shape[0] for w in maps.calls("layers.0")] == [2, 1]
    with pytest.raises(ValueError, match=r"called 2 times.*maps\.calls\('layers\.0'\)"):
        maps["layers.0"]
    maps.clear()
    assert len(maps) == 0


def test_names_filter_and_errors() -> None:
    model = TwoLayer()
    text, image = _inputs()
    with record_attention(model, names=["layers.1"]) as maps:
        model(text, image)
    assert maps.names == ["layers.1"]
    assert "layers.0" not in maps
    with pytest.raises(KeyError, match=r"'layers\.0'.*recorded: \['layers\.1'\]"):
        maps["layers.0"]
    with pytest.raises(
        ValueError, match=r"names \['nope'\].*available: \['layers\.0', 'layers\.1'\]"
    ):
        record_attention(model, names=["nope"]).__enter__()
    with pytest.raises(
        ValueError, match=r"model \(Linear\) contains no xmodal\.CrossModalAttention"
    ):
        record_attention(nn.Linear(2, 2)).__enter__()
    with pytest.raises(TypeError, match="names must be a list of module names, got the string"):
        record_attention(model, names="layers.0").__enter__()
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got int"):
        record_attention(3).__enter__()  # type: ignore[arg-type]


def test_gqa_maps_have_the_query_head_count() -> None:
    model = TwoLayer(num_kv_heads=2)
    text, image = _inputs()
    with record_attention(model) as maps:
        model(text, image)
    assert maps["layers.0"].shape == (2, 4, 5, 9)
    torch.testing.assert_close(maps["layers.0"].sum(-1), torch.ones(2, 4, 5), atol=ATOL, rtol=0)


def test_detach_and_device_options() -> None:
    attn = CrossModalAttention(16, 4, image_dim=8, dropout=0.0)
    text, image = _inputs()
    text.requires_grad_(True)
    with record_attention(attn, detach=False, device="cpu") as maps:
        attn(text, image, need_weights=False)
    assert maps[""].requires_grad
    maps[""][0, 0, 0, 0].backward()
    assert text.grad is not None
    with record_attention(attn) as maps:
        attn(text, image, need_weights=False)
    assert not maps[""].requires_grad


def test_fuse_heads() -> None:
    w = torch.softmax(torch.randn(2, 3, 4, 5), dim=-1)
    torch.testing.assert_close(fuse_heads(w), w.mean(1))
    torch.testing.assert_close(fuse_heads(w, "mean").sum(-1), torch.ones(2, 4))
    assert torch.equal(
        fuse_heads(w, "max"), torch.maximum(torch.maximum(w[:, 0], w[:, 1]), w[:, 2])
    )
    assert torch.equal(fuse_heads(w, 1), w[:, 1])
    assert torch.equal(fuse_heads(w, -1), w[:, 2])
    with pytest.raises(ValueError, match=r"head index in \[-3, 3\), got 3"):
        fuse_heads(w, 3)
    with pytest.raises(ValueError, match="'mean', 'max' or an int head index, got 'min'"):
        fuse_heads(w, "min")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(b, h, t, i\), got rank 3"):
        fuse_heads(w[0])


def test_compose_equals_a_direct_computation_on_a_hand_built_example() -> None:
    # 2 text tokens, 2 latents, 3 patches. Token 0 reads latent 0 only; token 1 both equally.
    text_to_latent = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])  # (1, t=2, n=2)
    latent_to_patch = torch.tensor([[[0.2, 0.8, 0.0], [0.0, 0.0, 1.0]]])  # (1, n=2, i=3)
    expected = torch.tensor([[[0.2, 0.8, 0.0], [0.1, 0.4, 0.5]]])  # worked out by hand
    torch.testing.assert_close(compose(text_to_latent, latent_to_patch), expected)


def test_compose_of_recorded_maps_matches_a_loop() -> None:
    a = fuse_heads(torch.softmax(torch.randn(2, 3, 4, 6), -1))  # (b, t, n)
    p = fuse_heads(torch.softmax(torch.randn(2, 3, 6, 9), -1))  # (b, n, i)
    got = compose(a, p)
    direct = torch.zeros(2, 4, 9)
    for bi in range(2):
        for ti in range(4):
            for n in range(6):
                direct[bi, ti] += a[bi, ti, n] * p[bi, n]
    torch.testing.assert_close(got, direct)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"text_to_latent \(b, t, n\) = \(2, 4, 6\) does not fit"):
        compose(a, p[:, :5])


def test_rollout_of_one_layer_is_that_layer() -> None:
    c = fuse_heads(torch.softmax(torch.randn(2, 3, 4, 5), -1))
    torch.testing.assert_close(rollout([c]), c)
    torch.testing.assert_close(rollout([c], residual=0.0), c)


def test_rollout_on_a_hand_built_example() -> None:
    c1 = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # (1, t=2, i=2); token 1 blind at layer 1
    c2 = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])  # token 1 blind at layer 2 as well
    s1 = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])  # token 1 reads token 0 after layer 1
    # r = 0.5. After c1: R = 0.5·c1 = [[.5, 0], [0, 0]]. After s1: R = .5·R + .5·s1@R
    #   = [[.5, 0], [.125, 0]]. After c2: R = .5·R + .5·c2 = [[.25, .5], [.0625, 0]].
    # Normalised rows: [[1/3, 2/3], [1, 0]].
    got = rollout([c1, c2], self_maps=[s1, None])
    torch.testing.assert_close(got, torch.tensor([[[1 / 3, 2 / 3], [1.0, 0.0]]]))
    # Without the self-attention token 1 never sees the image: its row stays zero.
    assert torch.equal(rollout([c1, c2])[0, 1], torch.zeros(2))
    with pytest.raises(ValueError, match="self_maps has 1 entries, expected one per cross map"):
        rollout([c1, c2], self_maps=[s1])
    with pytest.raises(ValueError, match=r"residual must be in \[0, 1\), got 1.0"):
        rollout([c1], residual=1.0)
    with pytest.raises(ValueError, match="cross_maps is empty"):
        rollout([])


def test_resampler_rollout_on_a_hand_built_example() -> None:
    # 1 latent, 2 patches; the latent attends to [patch 0, patch 1, itself].
    a1 = torch.tensor([[[0.5, 0.0, 0.5]]])  # (1, n=1, i+n=3)
    a2 = torch.tensor([[[0.0, 0.5, 0.5]]])
    # r = 0.5: after a1: P = .5·(.5, 0) = (.25, 0). After a2: P = .5·(.25, 0) + .5·((0, .5)
    #   + .5·(.25, 0)) = (.125, 0) + (.0625, .25) = (.1875, .25). Normalised: (3/7, 4/7).
    got = resampler_rollout([a1, a2], num_image_tokens=2)
    torch.testing.assert_close(got, torch.tensor([[[3 / 7, 4 / 7]]]))
    # Image-only keys (b, n, i) are accepted; one layer then gives its own map.
    torch.testing.assert_close(
        resampler_rollout([torch.tensor([[[0.25, 0.75]]])], num_image_tokens=2),
        torch.tensor([[[0.25, 0.75]]]),
    )
    with pytest.raises(
        ValueError, match=r"expected \(b, n, i \+ n\) = \(1, 1, 6\) or \(b, n, i\) = \(1, 1, 5\)"
    ):
        resampler_rollout([a1], num_image_tokens=5)


def test_to_bertviz_shapes() -> None:
    model = TwoLayer()
    text, image = _inputs(b=3, t=5, i=9)
    with record_attention(model) as maps:
        model(text, image)
    layers = maps.to_bertviz(batch_index=1)
    assert isinstance(layers, list)
    assert len(layers) == 2
    for got, name in zip(layers, maps.names, strict=True):
        assert got.shape == (1, 4, 5, 9)  # (1, h, t_text, t_image)
        assert got.dtype == torch.float32
        assert torch.equal(got[0], maps[name][1])
    assert len(maps.to_bertviz(names=["layers.1"])) == 1
    with pytest.raises(ValueError, match=r"batch_index must be in \[-3, 3\) for batch size 3"):
        maps.to_bertviz(batch_index=3)
    with pytest.raises(ValueError, match="no attention maps were recorded"):
        AttentionMaps().to_bertviz()
    with record_attention(model) as mixed:
        model(text, image)
        model(text[:, :2], image)  # a different text length cannot be stacked
    with pytest.raises(ValueError, match=r"must share \(h, t, i\)"):
        mixed.to_bertviz()


def test_gated_block_maps_and_blind_rows() -> None:
    from xmodal import GatedCrossAttentionBlock

    block = GatedCrossAttentionBlock(16, 8, num_heads=2, head_dim=8, gate_init=0.5).eval()
    text, image = torch.randn(2, 4, 16), torch.randn(2, 6, 8)
    mask = torch.ones(2, 4, 6, dtype=torch.bool)
    mask[:, 0] = False  # the first token comes before the image: it sees none
    expected = block(text, image, mask)
    with record_attention(block) as maps:
        out = block(text, image, mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert maps.names == ["attn"]
    w = maps["attn"]
    assert w.shape == (2, 2, 4, 6)
    assert torch.all(w[:, :, 0] == 0)
    torch.testing.assert_close(w[:, :, 1:].sum(-1), torch.ones(2, 2, 3), atol=ATOL, rtol=0)
    assert torch.equal(visible_rows(w), mask.any(-1)[:, None].expand(2, 2, 4))


def test_text_through_a_resampler_maps_back_to_patches() -> None:
    from xmodal import GatedCrossAttentionBlock, PerceiverResampler

    resampler = PerceiverResampler(16, depth=2, num_latents=3, num_heads=2, head_dim=8).eval()
    block = GatedCrossAttentionBlock(16, num_heads=2, head_dim=8, gate_init=0.5).eval()
    model = nn.ModuleDict({"resampler": resampler, "block": block})
    patches, text = torch.randn(2, 9, 16), torch.randn(2, 4, 16)

    def run() -> torch.Tensor:
        latents = resampler(patches)  # (b, m=1, l=3, D)
        return block(text, latents)

    expected = run()
    with record_attention(model) as maps:
        out = run()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert maps.names == ["resampler.layers.0.attn", "resampler.layers.1.attn", "block.attn"]
    layer_maps = [fuse_heads(maps[f"resampler.layers.{k}.attn"]) for k in range(2)]
    assert layer_maps[0].shape == (2, 3, 9 + 3)  # latents attend to [patches; latents]
    latent_to_patch = resampler_rollout(layer_maps, num_image_tokens=9)  # (b, l, i)
    text_to_patch = compose(fuse_heads(maps["block.attn"]), latent_to_patch)
    assert text_to_patch.shape == (2, 4, 9)
    torch.testing.assert_close(text_to_patch.sum(-1), torch.ones(2, 4), atol=1e-5, rtol=0)
    assert torch.all(text_to_patch >= 0)


def test_record_mha_attention_through_the_encoder_fast_path() -> None:
    from xmodal.attention_maps import record_mha_attention

    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True  # the last two tokens of sample 1 are padding
    with torch.no_grad():
        expected = layer(x, src_key_padding_mask=pad)
        before = torch.backends.mha.get_fastpath_enabled()
        with record_mha_attention([layer.self_attn]) as found:
            got = layer(x, src_key_padding_mask=pad)
        assert torch.backends.mha.get_fastpath_enabled() == before
    assert _hook_count(layer) == 0
    # The fast path returns zeros at padded positions (nested tensors); compare real tokens.
    torch.testing.assert_close(got[~pad], expected[~pad], atol=1e-5, rtol=1e-5)
    assert len(found) == 1
    assert found[0].shape == (2, 5, 5)
    torch.testing.assert_close(found[0].sum(-1), torch.ones(2, 5), atol=ATOL, rtol=0)
    assert torch.all(found[0][1, :, 3:] == 0)
    # A caller passing everything positionally, asking for no weights, gets none.
    mha = layer.self_attn
    with record_mha_attention([mha]) as found:
        out, none = mha(x, x, x, pad, False, None, True, False)
    assert none is None
    assert found[0].shape == (2, 5, 5)
    torch.testing.assert_close(out, mha(x, x, x, pad, False)[0])
    # A caller asking for per-head weights gets them; the record is head-averaged.
    with record_mha_attention([mha]) as found:
        _, per_head = mha(x, x, x, key_padding_mask=pad, average_attn_weights=False)
    assert per_head.shape == (2, 2, 5, 5)
    torch.testing.assert_close(found[0], per_head.mean(1))
    with pytest.raises(TypeError, match=r"modules must be nn\.MultiheadAttention, got Linear"):
        record_mha_attention([nn.Linear(2, 2)]).__enter__()  # type: ignore[list-item]


def test_nested_blocks_both_record_and_the_caller_still_gets_none() -> None:
    model = TwoLayer()
    text, image = _inputs()
    with record_attention(model) as outer:
        with record_attention(model, names=["layers.1"]) as inner:
            _, seen = model(text, image)
        model(text, image)
    assert seen == [None, None]
    assert inner.names == ["layers.1"]
    assert len(inner) == 1
    assert [r.name for r in outer] == ["layers.0", "layers.1", "layers.0", "layers.1"]
    assert torch.equal(outer.calls("layers.1")[0], inner["layers.1"])
    assert _hook_count(model) == 0


def test_resampler_rollout_rejects_a_negative_image_token_count() -> None:
    with pytest.raises(ValueError, match=r"num_image_tokens must be non-negative, got -1"):
        resampler_rollout([torch.rand(1, 2, 3)], num_image_tokens=-1)
