"""The image K/V cache, GQA/MQA and q/k-norm in generation.

Decoding ``T`` tokens one at a time against a filled :class:`ImageKV` must give, token by
token, what one forward over all ``T`` tokens gives; grouped-query attention must be plain
multi-head attention with the key/value weights shared per group; a second image appended
mid-conversation with :meth:`ImageKV.extend` must not disturb anything.

Tolerances: the cached and uncached computations do the same arithmetic row by row, but the
matrix products may be blocked differently for ``t = 1`` and ``t = T`` queries, so sums can
be reordered. In float64 that bounds the difference by a few ulp of the O(1) outputs; we
allow ``1e-12``. The single float32 test uses torch's float32 defaults (``1.3e-6`` relative).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_absorbed import count_absorbed_calls
from torch import Tensor

from xmodal import CrossModalAttention, GatedCrossAttentionBlock, ImageKV

B, T, N, D, E, H, HD = 2, 6, 7, 16, 12, 4, 8  # N: image tokens
F64 = {"rtol": 1e-12, "atol": 1e-12}

# (num_kv_heads, name): MHA, GQA with two query heads per K/V head, MQA
KV_HEADS = [pytest.param(4, id="mha"), pytest.param(2, id="gqa"), pytest.param(1, id="mqa")]
MASKS = ["none", "padding", "per_query", "per_head"]


def _mask(kind: str, t: int = T, i: int = N) -> Tensor | None:
    """A keep-mask of the given kind with some fully masked rows (tokens that see nothing)."""
    if kind == "none":
        return None
    if kind == "padding":  # (b, i): row 1 has two padded image tokens
        mask = torch.ones(B, i, dtype=torch.bool)
        mask[1, -2:] = False
        return mask
    if kind == "per_query":  # (b, t, i): random, token 0 of row 0 sees nothing
        mask = torch.rand(B, t, i) < 0.6
        mask[0, 0] = False
        return mask
    if kind == "per_head":  # (b, h, t, i)
        mask = torch.rand(B, H, t, i) < 0.6
        mask[1, :, 2] = False
        return mask
    raise AssertionError(kind)


def _step_mask(mask: Tensor | None, s: int) -> Tensor | None:
    """The mask row(s) of text token ``s`` alone."""
    if mask is None or mask.dim() == 2:
        return mask
    if mask.dim() == 3:
        return mask[:, s : s + 1]  # (b, 1, i)
    return mask[:, :, s : s + 1]  # (b, h, 1, i)


def _attention(num_kv_heads: int, qk_norm: bool) -> CrossModalAttention:
    module = CrossModalAttention(
        D, H, image_dim=E, head_dim=HD, num_kv_heads=num_kv_heads, qk_norm=qk_norm, dropout=0.0
    ).double()
    if qk_norm:  # non-trivial norm weights, so a missing or misplaced norm shows
        with torch.no_grad():
            module.q_norm.weight.uniform_(0.5, 1.5)  # type: ignore[union-attr]
            module.k_norm.weight.uniform_(0.5, 1.5)  # type: ignore[union-attr]
    return module.eval()


def _block(num_kv_heads: int, qk_norm: bool) -> GatedCrossAttentionBlock:
    # Open gates: a zero-initialised block is the identity and would prove nothing.
    block = GatedCrossAttentionBlock(
        D,
        E,
        num_heads=H,
        head_dim=HD,
        ff_mult=2,
        num_kv_heads=num_kv_heads,
        qk_norm=qk_norm,
        gate_init=0.7,
    )
    return block.double().eval()


# --------------------------------------------------------------------------------------------
# Decoding one token at a time with a filled cache == one forward over all tokens
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "explicit"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
@pytest.mark.parametrize("num_kv_heads", KV_HEADS)
def test_attention_decode_with_cache_equals_full_forward(
    num_kv_heads: int, qk_norm: bool, mask_kind: str, need_weights: bool
) -> None:
    module = _attention(num_kv_heads, qk_norm)
    text = torch.randn(B, T, D, dtype=torch.float64)
    image = torch.randn(B, N, E, dtype=torch.float64)
    mask = _mask(mask_kind)

    full, full_w = module(text, image, mask, need_weights=need_weights)  # no cache at all
    kv = module.encode_image(image)
    assert (kv.num_kv_heads, kv.image_len, kv.head_dim) == (num_kv_heads, N, HD)
    for s in range(T):
        step, step_w = module(
            text[:, s : s + 1], None, _step_mask(mask, s), need_weights=need_weights, image_kv=kv
        )
        torch.testing.assert_close(step, full[:, s : s + 1], **F64)
        if need_weights:
            assert step_w is not None
            assert full_w is not None
            torch.testing.assert_close(step_w, full_w[:, :, s : s + 1], **F64)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("num_kv_heads", KV_HEADS[:2])  # MQA here: FLOP ratio 0.804 > 0.8
def test_uncached_step_is_absorbed_and_equals_the_cached_step(
    monkeypatch: pytest.MonkeyPatch, num_kv_heads: int, mask_kind: str
) -> None:
    # Without a cache, a one-token step on CPU takes the absorbed path (no keys or values:
    # docs/benchmarks.md); it must give the cached step's output, token by token.
    absorbed = count_absorbed_calls(monkeypatch)
    module = _attention(num_kv_heads, qk_norm=False)
    text = torch.randn(B, T, D, dtype=torch.float64)
    image = torch.randn(B, N, E, dtype=torch.float64)
    mask = _mask(mask_kind)
    kv = module.encode_image(image)
    for s in range(T):
        token, step_mask = text[:, s : s + 1], _step_mask(mask, s)
        uncached, _ = module(token, image, step_mask, need_weights=False)
        cached, _ = module(token, None, step_mask, need_weights=False, image_kv=kv)
        torch.testing.assert_close(uncached, cached, **F64)
    assert len(absorbed) == T


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
@pytest.mark.parametrize("num_kv_heads", KV_HEADS)
def test_block_decode_with_cache_equals_full_forward(
    num_kv_heads: int, qk_norm: bool, mask_kind: str
) -> None:
    block = _block(num_kv_heads, qk_norm)
    text = torch.randn(B, T, D, dtype=torch.float64)
    media = torch.randn(B, N, E, dtype=torch.float64)
    mask = _mask(mask_kind)

    full = block(text, media, mask)
    kv = block.encode_image(media)
    steps = [block(text[:, s : s + 1], None, _step_mask(mask, s), image_kv=kv) for s in range(T)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **F64)
    if mask is not None and mask.dim() == 3:  # the blind token passes through, cached too
        assert torch.equal(steps[0][0, 0], text[0, 0])


def test_block_cache_of_four_d_media_equals_full_forward() -> None:
    # (b, m, n, E) media: the cache holds the flattened m·n tokens, medium-major.
    block = _block(2, qk_norm=True)
    text = torch.randn(B, T, D, dtype=torch.float64)
    media = torch.randn(B, 3, 4, E, dtype=torch.float64)
    mask = torch.rand(B, T, 12) < 0.5
    kv = block.encode_image(media)
    assert kv.image_len == 12
    steps = [block(text[:, s : s + 1], None, mask[:, s : s + 1], image_kv=kv) for s in range(T)]
    torch.testing.assert_close(torch.cat(steps, dim=1), block(text, media, mask), **F64)


def test_decode_float32_within_float32_tolerance() -> None:
    module = CrossModalAttention(D, H, image_dim=E, num_kv_heads=2, qk_norm=True, dropout=0.0)
    text, image = torch.randn(B, T, D), torch.randn(B, N, E)
    mask = _mask("per_query")
    full, _ = module(text, image, mask, need_weights=False)
    kv = module.encode_image(image)
    for s in range(T):
        step, _ = module(
            text[:, s : s + 1], None, _step_mask(mask, s), image_kv=kv, need_weights=False
        )
        torch.testing.assert_close(step, full[:, s : s + 1])  # float32 defaults


def test_cache_is_not_modified_by_decoding() -> None:
    module = _attention(2, qk_norm=True)
    kv = module.encode_image(torch.randn(B, N, E, dtype=torch.float64))
    key, value = kv.key.clone(), kv.value.clone()
    for _ in range(3):
        module(torch.randn(B, 1, D, dtype=torch.float64), image_kv=kv, need_weights=False)
    assert torch.equal(kv.key, key)
    assert torch.equal(kv.value, value)


def test_cached_step_does_not_touch_the_key_value_projections() -> None:
    # The point of the cache: a decoding step never runs image_key / image_value (or k_norm).
    module = _attention(2, qk_norm=True)
    kv = module.encode_image(torch.randn(B, N, E, dtype=torch.float64))
    calls: list[str] = []
    for name in ("image_key", "image_value", "k_norm"):
        getattr(module, name).register_forward_hook(lambda *_, n=name: calls.append(n))
    module(torch.randn(B, 1, D, dtype=torch.float64), image_kv=kv)
    assert calls == []
    module(torch.randn(B, 1, D, dtype=torch.float64), torch.randn(B, N, E, dtype=torch.float64))
    assert sorted(calls) == ["image_key", "image_value", "k_norm"]


# --------------------------------------------------------------------------------------------
# GQA / MQA are MHA with shared key/value weights
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
def test_gqa_with_as_many_kv_heads_as_heads_is_mha(qk_norm: bool) -> None:
    mha = CrossModalAttention(D, H, image_dim=E, qk_norm=qk_norm, dropout=0.0).double()
    gqa = CrossModalAttention(
        D, H, image_dim=E, num_kv_heads=H, qk_norm=qk_norm, dropout=0.0
    ).double()
    gqa.load_state_dict(mha.state_dict())
    text, image = (
        torch.randn(B, T, D, dtype=torch.float64),
        torch.randn(B, N, E, dtype=torch.float64),
    )
    for kind in MASKS:
        mask = _mask(kind)
        for need_weights in (False, True):
            got, got_w = gqa(text, image, mask, need_weights=need_weights)
            want, want_w = mha(text, image, mask, need_weights=need_weights)
            torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same code path
            if need_weights:
                torch.testing.assert_close(got_w, want_w, rtol=0, atol=0)


def _mha_from_gqa(gqa: CrossModalAttention) -> CrossModalAttention:
    """The MHA layer that GQA is: K/V weight rows of head ``j // g`` copied to head ``j``."""
    h, k, d = gqa.num_heads, gqa.num_kv_heads, gqa.head_dim
    g = h // k
    mha = CrossModalAttention(
        gqa.embed_dim,
        h,
        image_dim=gqa.image_dim,
        head_dim=d,
        qk_norm=gqa.q_norm is not None,
        dropout=0.0,
    ).to(gqa.text_query.weight.dtype)
    state = dict(gqa.state_dict())
    for name in ("image_key", "image_value"):
        weight = state[f"{name}.weight"]  # (k·d, E)
        state[f"{name}.weight"] = (
            weight.reshape(k, d, -1).repeat_interleave(g, 0).reshape(h * d, -1)
        )
        bias = state[f"{name}.bias"]  # (k·d,)
        state[f"{name}.bias"] = bias.reshape(k, d).repeat_interleave(g, 0).reshape(h * d)
    mha.load_state_dict(state)
    return mha.eval()


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "explicit"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
@pytest.mark.parametrize("num_kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_gqa_equals_mha_with_kv_weights_repeated_per_group(
    num_kv_heads: int, qk_norm: bool, mask_kind: str, need_weights: bool
) -> None:
    # Covers both GQA routes of the fused path: folded query groups (no mask, key padding) and
    # SDPA's enable_gqa (per-query and per-head masks on CPU).
    gqa = _attention(num_kv_heads, qk_norm)
    mha = _mha_from_gqa(gqa)
    text, image = (
        torch.randn(B, T, D, dtype=torch.float64),
        torch.randn(B, N, E, dtype=torch.float64),
    )
    mask = _mask(mask_kind)
    got, got_w = gqa(text, image, mask, need_weights=need_weights)
    want, want_w = mha(text, image, mask, need_weights=need_weights)
    torch.testing.assert_close(got, want, **F64)
    if need_weights:
        torch.testing.assert_close(got_w, want_w, **F64)


@pytest.mark.parametrize(
    ("mask_kind", "text_len", "want_gqa"),
    [("none", T, False), ("padding", T, False), ("per_query", T, True), ("per_head", T, True),
     ("per_query", 1, False)],
)  # fmt: skip
def test_cpu_fused_gqa_route(
    monkeypatch: pytest.MonkeyPatch, mask_kind: str, text_len: int, want_gqa: bool
) -> None:
    # CPU, fused path: fold the query groups unless the mask varies per query (t > 1) or head,
    # then SDPA's enable_gqa reads the mask without a g-fold copy (see attention._fold_groups).
    seen: list[tuple[bool, tuple[int, ...], tuple[int, ...] | None]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, **kw: Any) -> Tensor:
        mask_shape = None if attn_mask is None else tuple(attn_mask.shape)
        seen.append((bool(kw.get("enable_gqa", False)), tuple(q.shape), mask_shape))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    module = _attention(2, qk_norm=False)
    module.absorb_projections = False  # the route into SDPA, not the absorbed path's (t = 1)
    mask = _mask(mask_kind, t=text_len)
    text, image = (
        torch.randn(B, text_len, D, dtype=torch.float64),
        torch.randn(B, N, E, dtype=torch.float64),
    )
    module(text, image, mask, need_weights=False)
    ((gqa, q_shape, mask_shape),) = seen
    assert gqa is want_gqa
    if want_gqa:
        assert q_shape == (B, H, text_len, HD)  # queries as they are
        assert mask_shape is not None
        assert mask_shape[2] == text_len  # the mask as given, no g-fold copy
    else:
        assert q_shape == (B, 2, 2 * text_len, HD)  # (b, k, g·t, d): groups folded


def test_gqa_cache_holds_kv_heads_not_query_heads() -> None:
    for num_kv_heads in (4, 2, 1):
        kv = _attention(num_kv_heads, qk_norm=False).encode_image(
            torch.randn(B, N, E, dtype=torch.float64)
        )
        assert kv.key.shape == kv.value.shape == (B, num_kv_heads, N, HD)


# --------------------------------------------------------------------------------------------
# A new image mid-conversation: ImageKV.extend
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_kv_heads", KV_HEADS)
def test_extend_mid_conversation_equals_full_forward(num_kv_heads: int) -> None:
    # Tokens 0..2 see image 1; image 2 arrives before token 3; tokens 3..5 see both (the
    # "all_previous" policy). Decoding with kv1, then kv1.extend(kv2), equals one forward over
    # the concatenated images with the matching mask.
    module = _attention(num_kv_heads, qk_norm=True)
    i1, i2, switch = 5, 3, 3
    text = torch.randn(B, T, D, dtype=torch.float64)
    image1 = torch.randn(B, i1, E, dtype=torch.float64)
    image2 = torch.randn(B, i2, E, dtype=torch.float64)
    mask = torch.ones(B, T, i1 + i2, dtype=torch.bool)
    mask[:, :switch, i1:] = False  # image 2 is not there yet
    full, _ = module(text, torch.cat([image1, image2], dim=1), mask, need_weights=False)

    kv1 = module.encode_image(image1)
    steps = [module(text[:, s : s + 1], image_kv=kv1, need_weights=False)[0] for s in range(switch)]
    kv = kv1.extend(module.encode_image(image2))
    steps += [
        module(text[:, s : s + 1], None, mask[:, s : s + 1], image_kv=kv, need_weights=False)[0]
        for s in range(switch, T)
    ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **F64)
    # the earlier image is reused as it was, not projected again
    assert torch.equal(kv.key[:, :, :i1], kv1.key)
    assert torch.equal(kv.value[:, :, :i1], kv1.value)


def test_block_extend_mid_conversation_equals_full_forward() -> None:
    block = _block(2, qk_norm=False)
    text = torch.randn(B, T, D, dtype=torch.float64)
    media1, media2 = (
        torch.randn(B, 4, E, dtype=torch.float64),
        torch.randn(B, 4, E, dtype=torch.float64),
    )
    mask = torch.zeros(B, T, 8, dtype=torch.bool)
    mask[:, :2, :4] = True  # "immediate": tokens 0, 1 see image 1 only ...
    mask[:, 2:, 4:] = True  # ... tokens 2.. see image 2 only
    full = block(text, torch.cat([media1, media2], dim=1), mask)

    kv1 = block.encode_image(media1)
    steps = [
        block(text[:, s : s + 1], None, mask[:, s : s + 1, :4], image_kv=kv1) for s in range(2)
    ]
    kv = kv1.extend(block.encode_image(media2))
    steps += [block(text[:, s : s + 1], None, mask[:, s : s + 1], image_kv=kv) for s in range(2, T)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **F64)


def test_extend_errors_name_what_does_not_match() -> None:
    kv = ImageKV(torch.randn(B, 2, 3, HD), torch.randn(B, 2, 3, HD))
    with pytest.raises(TypeError, match=r"other must be an ImageKV, got Tensor"):
        kv.extend(torch.randn(B, 2, 3, HD))  # type: ignore[arg-type]
    with pytest.raises(
        ValueError,
        match=r"cannot extend an ImageKV of shape \(2, 2, 3, 8\) with one of shape \(2, 1, 3, 8\)",
    ):
        kv.extend(ImageKV(torch.randn(B, 1, 3, HD), torch.randn(B, 1, 3, HD)))


# --------------------------------------------------------------------------------------------
# examples/generate.py runs and its two decodings agree
# --------------------------------------------------------------------------------------------


def _load_example() -> Any:
    path = Path(__file__).resolve().parents[1] / "examples" / "generate.py"
    spec = importlib.util.spec_from_file_location("xmodal_example_generate", path)
    assert spec is not None
    assert spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # its dataclass needs to find its module
    try:
        spec.loader.exec_module(example)
    finally:
        del sys.modules[spec.name]
    return example


def test_generate_example_main_runs_and_reports_identical_tokens(
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = _load_example().main(["--tiny", "--new-tokens", "4", "--image-tokens", "9"])
    assert result["identical"] is True
    assert result["tokens"].shape == (1, 8 + 4)
    out = capsys.readouterr().out
    assert "tokens identical: True" in out
    assert "with image cache:" in out


def test_generate_example_cached_and_uncached_tokens_are_identical() -> None:
    example = _load_example()
    model = example.TinyVLM(example.TinyConfig.tiny())
    image = torch.randn(1, 9, model.config.image_dim)
    prompt = torch.tensor([[1, 2, 3]])
    cached, _ = example.generate(model, prompt, image, new_tokens=8, use_cache=True)
    uncached, _ = example.generate(model, prompt, image, new_tokens=8, use_cache=False)
    assert cached.shape == (1, 3 + 8)
    assert torch.equal(cached, uncached)
    # the image matters: another image changes the logits (gates are open)
    with torch.no_grad():
        logits = [
            model(prompt, start=0, text_cache=[[] for _ in model.layers], image=img)
            for img in (image, torch.randn_like(image))
        ]
    assert not torch.allclose(logits[0], logits[1])
