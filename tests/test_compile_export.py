"""``torch.compile(fullgraph=True)`` and ``torch.export.export`` on the modules, vs eager.

CrossModalAttention, GatedCrossAttentionBlock and PerceiverResampler, with and without an
image K/V cache and a mask. The default run uses ``backend="aot_eager"`` for compile: it still
traces the whole forward into one graph (``fullgraph=True`` fails on any graph break) and runs
it through AOTAutograd, without inductor's C++ code generation, so it takes about a second.
Inductor runs are ``slow``.

Tolerances: ``aot_eager`` and ``torch.export`` run the same ATen ops as eager, so outputs must
match to float32 rounding (the ``assert_close`` defaults); inductor fuses and reorders, and
gets ``1e-5``.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.export import Dim

from xmodal import (
    CrossModalAttention,
    GatedCrossAttentionBlock,
    ImageKV,
    PerceiverResampler,
    media_attention_mask,
)

B, T, N, D, E, H = 2, 5, 7, 16, 12, 4


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


def _attention(**kwargs: object) -> CrossModalAttention:
    defaults: dict[str, object] = {"image_dim": E, "num_kv_heads": 2, "qk_norm": True}
    return CrossModalAttention(D, H, dropout=0.0, **{**defaults, **kwargs}).eval()  # type: ignore[arg-type]


def _block() -> GatedCrossAttentionBlock:
    return GatedCrossAttentionBlock(
        D, E, num_heads=H, head_dim=4, num_kv_heads=2, qk_norm=True, ff_mult=2, gate_init=0.5
    ).eval()


def _resampler() -> PerceiverResampler:
    return PerceiverResampler(E, depth=2, num_latents=3, num_heads=2, head_dim=4, ff_mult=2).eval()


class _Attend(nn.Module):
    """CrossModalAttention's fused forward as a tensor -> tensor module (for export)."""

    def __init__(self, attn: CrossModalAttention, *, need_weights: bool = False) -> None:
        super().__init__()
        self.attn = attn
        self.need_weights = need_weights

    def forward(
        self,
        text: Tensor,
        image: Tensor | None = None,
        mask: Tensor | None = None,
        image_kv: ImageKV | None = None,
    ) -> Tensor:
        out, weights = self.attn(
            text, image, mask, need_weights=self.need_weights, image_kv=image_kv
        )
        return out if weights is None else out + weights.sum()  # weights flow into the output


def _inputs(mask_kind: str) -> tuple[Tensor, Tensor, Tensor | None]:
    text, image = torch.randn(B, T, D), torch.randn(B, N, E)
    if mask_kind == "none":
        return text, image, None
    if mask_kind == "padding":
        mask = torch.ones(B, N, dtype=torch.bool)
        mask[1, -3:] = False
        return text, image, mask
    mask = torch.rand(B, T, N) < 0.5
    mask[0, 0] = False  # a token that sees nothing
    return text, image, mask


MASKS = ["none", "padding", "per_query"]


# --------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True), aot_eager: default run
# --------------------------------------------------------------------------------------------


def _grid(fast: list[tuple[object, ...]], *axes: list[object]) -> list[object]:
    """Every combination of ``axes``; those not in ``fast`` are marked ``slow`` (each compile
    costs about a second on the shared 2-core CI machine)."""
    import itertools

    return [
        pytest.param(*combo, marks=() if combo in fast else pytest.mark.slow)
        for combo in itertools.product(*axes)
    ]


@pytest.mark.parametrize(
    ("cache", "mask_kind", "need_weights"),
    _grid(
        [(False, "none", False), (True, "per_query", False), (False, "padding", True)],
        [False, True],
        MASKS,
        [False, True],
    ),
)
def test_attention_compile_fullgraph_matches_eager(
    cache: bool, mask_kind: str, need_weights: bool
) -> None:
    module = _Attend(_attention(), need_weights=need_weights)
    text, image, mask = _inputs(mask_kind)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    if cache:
        kv = module.attn.encode_image(image)
        got, want = compiled(text, None, mask, kv), module(text, None, mask, kv)
    else:
        got, want = compiled(text, image, mask), module(text, image, mask)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    ("cache", "mask_kind"),
    _grid([(False, "per_query"), (True, "padding")], [False, True], MASKS),
)
def test_block_compile_fullgraph_matches_eager(cache: bool, mask_kind: str) -> None:
    block = _block()
    text, media, mask = _inputs(mask_kind)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    if cache:
        kv = block.encode_image(media)
        got = compiled(text, attention_mask=mask, image_kv=kv)
        want = block(text, attention_mask=mask, image_kv=kv)
    else:
        got, want = compiled(text, media, mask), block(text, media, mask)
    torch.testing.assert_close(got, want)


def test_resampler_compile_fullgraph_matches_eager() -> None:
    resampler = _resampler()
    media = torch.randn(B, 3, N, E)  # (b, m, n, E)
    compiled = torch.compile(resampler, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(media), resampler(media))


def test_encode_image_compiles_fullgraph() -> None:
    attn = _attention()
    image = torch.randn(B, N, E)
    kv = torch.compile(attn.encode_image, fullgraph=True, backend="aot_eager")(image)
    want = attn.encode_image(image)
    assert isinstance(kv, ImageKV)
    torch.testing.assert_close(kv.key, want.key)
    torch.testing.assert_close(kv.value, want.value)


def test_compiled_decode_loop_compiles_once() -> None:
    # A decoding step has the same shapes every time: one graph, no recompilation per token.
    from torch._dynamo.testing import CompileCounterWithBackend

    attn = _attention()
    text, image, mask = _inputs("per_query")
    kv = attn.encode_image(image)
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(_Attend(attn), fullgraph=True, backend=counter)
    for s in range(T):
        got = step(text[:, s : s + 1], None, mask[:, s : s + 1], kv)  # type: ignore[index]
        want, _ = attn(
            text[:, s : s + 1], None, mask[:, s : s + 1], need_weights=False, image_kv=kv
        )  # type: ignore[index]
        torch.testing.assert_close(got, want)
    assert counter.frame_count == 1


# --------------------------------------------------------------------------------------------
# torch.export.export: default run
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "explicit"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("cache", [False, True], ids=["features", "image_kv"])
def test_attention_export_matches_eager(cache: bool, mask_kind: str, need_weights: bool) -> None:
    module = _Attend(_attention(), need_weights=need_weights)
    text, image, mask = _inputs(mask_kind)
    if cache:
        kv = module.attn.encode_image(image)
        args: tuple[object, ...] = (text, None, mask, kv)
    else:
        args = (text, image, mask)
    program = torch.export.export(module, args)
    torch.testing.assert_close(program.module()(*args), module(*args))


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("cache", [False, True], ids=["features", "image_kv"])
def test_block_export_matches_eager(cache: bool, mask_kind: str) -> None:
    block = _block()
    text, media, mask = _inputs(mask_kind)
    if cache:
        kwargs: dict[str, object] = {"attention_mask": mask, "image_kv": block.encode_image(media)}
        program = torch.export.export(block, (text,), kwargs)
        torch.testing.assert_close(program.module()(text, **kwargs), block(text, **kwargs))
    else:
        program = torch.export.export(block, (text, media, mask))
        torch.testing.assert_close(program.module()(text, media, mask), block(text, media, mask))


def test_block_export_with_media_mask_and_four_d_media() -> None:
    block = _block()
    locations = torch.zeros(B, T, dtype=torch.bool)
    locations[:, 1] = True
    locations[0, 3] = True
    media = torch.randn(B, 2, 3, E)  # (b, m, n, E)
    mask = media_attention_mask(locations, 3, num_media=2)
    text = torch.randn(B, T, D)
    program = torch.export.export(block, (text, media, mask))
    torch.testing.assert_close(program.module()(text, media, mask), block(text, media, mask))


def test_resampler_export_matches_eager() -> None:
    resampler = _resampler()
    media = torch.randn(B, 3, N, E)
    program = torch.export.export(resampler, (media,))
    torch.testing.assert_close(program.module()(media), resampler(media))


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "explicit"])
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_export_decode_step_with_dynamic_text_and_image_lengths(
    num_kv_heads: int, need_weights: bool
) -> None:
    # One exported program serves every decoding step (t = 1) and any prompt length, for any
    # image length: the text and image axes are dynamic, the mask is per query.
    module = _Attend(_attention(num_kv_heads=num_kv_heads), need_weights=need_weights)
    text, image, mask = _inputs("per_query")
    kv = module.attn.encode_image(image)
    t, i = Dim("t", min=1, max=256), Dim("i", min=2, max=8192)
    program = torch.export.export(
        module,
        (text, None, mask, kv),
        dynamic_shapes=({1: t}, None, {1: t, 2: i}, [{2: i}, {2: i}]),
    )
    for text_len, image_len in ((1, N), (3, 20), (9, 33)):
        text = torch.randn(B, text_len, D)
        kv = module.attn.encode_image(torch.randn(B, image_len, E))
        mask = torch.rand(B, text_len, image_len) < 0.5
        torch.testing.assert_close(
            program.module()(text, None, mask, kv), module(text, None, mask, kv)
        )


# --------------------------------------------------------------------------------------------
# inductor: slow
# --------------------------------------------------------------------------------------------

INDUCTOR = {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.slow
@pytest.mark.parametrize("cache", [False, True], ids=["features", "image_kv"])
def test_attention_inductor_matches_eager(cache: bool) -> None:
    module = _Attend(_attention())
    text, image, mask = _inputs("per_query")
    compiled = torch.compile(module, fullgraph=True)
    args = (text, None, mask, module.attn.encode_image(image)) if cache else (text, image, mask)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), module(*args), **INDUCTOR)


@pytest.mark.slow
@pytest.mark.parametrize("cache", [False, True], ids=["features", "image_kv"])
def test_block_inductor_matches_eager(cache: bool) -> None:
    block = _block()
    text, media, mask = _inputs("per_query")
    compiled = torch.compile(block, fullgraph=True)
    with torch.no_grad():
        if cache:
            kv = block.encode_image(media)
            got = compiled(text, attention_mask=mask, image_kv=kv)
            want = block(text, attention_mask=mask, image_kv=kv)
        else:
            got, want = compiled(text, media, mask), block(text, media, mask)
    torch.testing.assert_close(got, want, **INDUCTOR)


@pytest.mark.slow
def test_resampler_inductor_matches_eager() -> None:
    resampler = _resampler()
    media = torch.randn(B, 3, N, E)
    with torch.no_grad():
        got = torch.compile(resampler, fullgraph=True)(media)
        torch.testing.assert_close(got, resampler(media), **INDUCTOR)


@pytest.mark.slow
def test_exported_program_runs_under_inductor() -> None:
    # export -> compile: the deployment path (AOT graph, then inductor).
    module = _Attend(_attention())
    text, image, mask = _inputs("per_query")
    kv = module.attn.encode_image(image)
    program = torch.export.export(module, (text, None, mask, kv))
    compiled = torch.compile(program.module(), fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(text, None, mask, kv), module(text, None, mask, kv), **INDUCTOR
        )
