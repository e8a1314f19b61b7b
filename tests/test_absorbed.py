"""The absorbed path of CrossModalAttention: same answers as the projected path, and when it runs.

Legend: ``b`` batch, ``t`` text, ``i`` image tokens, ``h`` heads, ``k`` key/value heads, ``d`` head
width, ``D`` text width, ``E`` image width.

Most tests force the path on (``absorbed_is_cheaper`` patched to ``True``) so that tiny shapes
exercise it; the routing tests leave the rule alone.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from reference.naive import reference_attention
from test_attention import HALF_TOLERANCES, MASK_NAMES, dead_rows, make_case, make_module
from torch import Tensor, nn

import xmodal.attention
from xmodal import CrossModalAttention
from xmodal.attention import ABSORB_MAX_COST_RATIO, absorbed_is_cheaper, absorption_costs

# (b, t, i, D, E, h, d, k, qk_norm, bias) as in test_attention.CONFIGS, without q/k-norm (which
# the absorbed path does not serve: the key norm acts on projected keys).
ABSORBABLE = [
    pytest.param((2, 3, 5, 16, 16, 4, None, None, False, True), id="notebook-like"),
    pytest.param((2, 3, 5, 16, 24, 4, None, 2, False, True), id="E!=D-gqa"),
    pytest.param((1, 1, 7, 16, 8, 4, 6, 1, False, False), id="d!=D/h-mqa-nobias-t1"),
    pytest.param((2, 2, 6, 32, 16, 8, 4, 4, False, False), id="h8-gqa-nobias"),
    pytest.param((3, 4, 1, 12, 20, 2, 8, 2, False, True), id="i1-gqa"),
]


def count_absorbed_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the calls of ``CrossModalAttention._attend_absorbed``."""
    calls: list[int] = []
    original = CrossModalAttention._attend_absorbed

    def counted(self: CrossModalAttention, *args: Any, **kwargs: Any) -> Tensor:
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CrossModalAttention, "_attend_absorbed", counted)
    return calls


@pytest.fixture
def absorbed_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Force the absorbed path wherever it is allowed; a list that counts its calls."""
    monkeypatch.setattr(xmodal.attention, "absorbed_is_cheaper", lambda **kw: True)
    return count_absorbed_calls(monkeypatch)


# --------------------------------------------------------------------------------------------
# Same answers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_name", MASK_NAMES)
@pytest.mark.parametrize("config", ABSORBABLE)
def test_absorbed_matches_reference_float64(
    absorbed_runs: list[int], config: tuple, mask_name: str
) -> None:
    # float64 all the way: the rearranged sums differ from the reference by rounding only.
    module, text, image, mask = make_case(config, mask_name, torch.float64)
    out, weights = module(text, image, mask, need_weights=False)
    assert absorbed_runs == [1]
    assert weights is None
    ref_out, _ = reference_attention(module, text, image, mask)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mask_name", MASK_NAMES)
@pytest.mark.parametrize("config", ABSORBABLE)
def test_absorbed_matches_projected_float32(
    absorbed_runs: list[int], config: tuple, mask_name: str
) -> None:
    # The same float32 tolerance as test_attention's fused-vs-explicit check, for the same
    # reason: a few hundred eps of rounding at most, while a wrong head, mask entry, scale or
    # bias shows as 1e-2 and more.
    module, text, image, mask = make_case(config, mask_name)
    absorbed, _ = module(text, image, mask, need_weights=False)
    module.absorb_projections = False
    projected, _ = module(text, image, mask, need_weights=False)
    assert absorbed_runs == [1]
    torch.testing.assert_close(absorbed, projected, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize(
    "mask_name", ["none", "pad_2d_empty_element", "per_query_3d", "per_head_4d"]
)
@pytest.mark.parametrize("config", ABSORBABLE[:2])
def test_absorbed_gradients_match_reference_float64(
    absorbed_runs: list[int], config: tuple, mask_name: str
) -> None:
    # Inputs' gradients against the reference; parameters' against the projected path.
    module, text, image, mask = make_case(config, mask_name, torch.float64)
    text.requires_grad_(True)
    image.requires_grad_(True)
    names, params = zip(*module.named_parameters(), strict=True)
    cotangent = torch.randn(text.shape, dtype=torch.float64)
    out, _ = module(text, image, mask, need_weights=False)
    grads = torch.autograd.grad((out * cotangent).sum(), (text, image, *params))
    assert absorbed_runs == [1]
    ref_out, _ = reference_attention(module, text, image, mask)
    ref_grads = torch.autograd.grad((ref_out * cotangent).sum(), (text, image))
    module.absorb_projections = False
    projected, _ = module(text, image, mask, need_weights=False)
    projected_grads = torch.autograd.grad((projected * cotangent).sum(), params)
    for got, want in zip(grads, (*ref_grads, *projected_grads), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    if "image_key.bias" in names:
        # The softmax cancels the key bias: a zero gradient (there, not None, for DDP's sake).
        key_bias_grad = grads[2 + names.index("image_key.bias")]
        assert torch.equal(key_bias_grad, torch.zeros_like(key_bias_grad))


def test_absorbed_gradcheck_float64(absorbed_runs: list[int]) -> None:
    module = make_module(8, 4, E=12, k=2, dtype=torch.float64)
    text = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    image = torch.randn(2, 4, 12, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]]] * 2, dtype=torch.bool)
    assert torch.autograd.gradcheck(
        lambda x, y: module(x, y, mask, need_weights=False)[0], (text, image)
    )
    assert absorbed_runs


@pytest.mark.parametrize("mask_name", ["pad_2d_empty_element", "per_query_3d", "all_masked"])
def test_absorbed_rows_that_see_nothing_get_zero_context(
    absorbed_runs: list[int], mask_name: str
) -> None:
    # Zero context means the output is exactly output_proj's bias -- the value bias must not
    # leak in -- and the gradient reaching the image through such a row is zero, not NaN.
    module, text, image, mask = make_case(ABSORBABLE[0].values[0], mask_name)
    b, t, i, D, _, h = 2, 3, 5, 16, 16, 4
    image.requires_grad_(True)
    out, _ = module(text, image, mask, need_weights=False)
    dead = dead_rows(mask, b, h, t, i).all(1)  # (b, t): every head of the query sees nothing
    assert dead.any()
    assert module.output_proj.bias is not None
    torch.testing.assert_close(out[dead], module.output_proj.bias.expand(int(dead.sum()), D))
    out.sum().backward()
    assert image.grad is not None
    assert torch.isfinite(image.grad).all()
    if mask_name == "all_masked":
        assert torch.equal(image.grad, torch.zeros_like(image.grad))


@pytest.mark.parametrize("mask_name", ["none", "pad_2d_empty_element", "per_head_4d"])
def test_absorbed_bf16_matches_float32(absorbed_runs: list[int], mask_name: str) -> None:
    # bf16 keeps 8 significant bits; HALF_TOLERANCES (test_attention) is the same bound the
    # projected path meets.
    module, text, image, mask = make_case(ABSORBABLE[1].values[0], mask_name, torch.bfloat16)
    module32 = copy.deepcopy(module).float()
    out, _ = module(text, image, mask, need_weights=False)
    out32, _ = module32(text.float(), image.float(), mask, need_weights=False)
    assert absorbed_runs == [1, 1]
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), out32, **HALF_TOLERANCES[torch.bfloat16])


def test_absorbed_dropout_acts_only_in_training(absorbed_runs: list[int]) -> None:
    module = make_module(dropout=0.5)
    text, image = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    eval_out, _ = module(text, image, need_weights=False)
    torch.testing.assert_close(module(text, image, need_weights=False)[0], eval_out)
    module.train()
    train_out, _ = module(text, image, need_weights=False)
    assert absorbed_runs == [1, 1, 1]
    assert not torch.allclose(train_out, eval_out)  # p = 0.5 on 2·4·3·5 probabilities


def test_absorbed_compiles_fullgraph(absorbed_runs: list[int]) -> None:
    torch._dynamo.reset()
    module = make_module(16, 4, E=8, k=2)
    text, image = torch.randn(2, 1, 16), torch.randn(2, 5, 8)
    mask = torch.rand(2, 5) < 0.6
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    got, _ = compiled(text, image, mask, need_weights=False)
    want, _ = module(text, image, mask, need_weights=False)
    assert absorbed_runs  # traced (and run eagerly) through the absorbed path
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------------------------
# When it runs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("t", "dtype", "want"),
    [
        (1, torch.float32, True),  # a decoding step without a cache
        (20, torch.float32, True),  # the notebook's example: FLOP ratio 0.67
        (32, torch.float32, False),  # ratio 1.03
        (1, torch.bfloat16, True),
        (20, torch.bfloat16, False),  # 0.67 > 0.3: in bf16 the projections run at AMX speed
        (1, torch.float16, False),  # not served
    ],
)
def test_auto_rule_at_the_notebook_shape(
    monkeypatch: pytest.MonkeyPatch, t: int, dtype: torch.dtype, want: bool
) -> None:
    calls = count_absorbed_calls(monkeypatch)
    module = CrossModalAttention(256, 8, dropout=0.0).eval().to(dtype)
    module(
        torch.randn(4, t, 256, dtype=dtype),
        torch.randn(4, 196, 256, dtype=dtype),
        need_weights=False,
    )
    assert bool(calls) is want


class _LoRALinear(nn.Linear):
    """A subclass that changes what the projection computes, as adapters do."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 2.0


@pytest.mark.parametrize(
    "case",
    [
        "need_weights",
        "image_kv",
        "qk_norm",
        "switched_off",
        "hooked",
        "global_hook",
        "subclassed",
        "autocast",
    ],
)
def test_absorbed_path_steps_aside(monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    # Each of these must run the projected path even where the rule says absorbing is cheaper:
    # weights are the explicit path's; a cache has no image features; the key norm acts on
    # projected keys; a hook or a subclassed projection must see itself run.
    calls = count_absorbed_calls(monkeypatch)
    module = CrossModalAttention(256, 8, dropout=0.0, qk_norm=case == "qk_norm").eval()
    text, image = torch.randn(2, 1, 256), torch.randn(2, 196, 256)
    seen: list[int] = []
    if case == "switched_off":
        module.absorb_projections = False
    if case == "hooked":
        module.image_value.register_forward_hook(lambda m, a, out: seen.append(1))
    if case == "subclassed":
        lora = _LoRALinear(256, 256)
        lora.load_state_dict(module.image_value.state_dict())
        module.image_value = lora
    kwargs: dict[str, Any] = {"need_weights": case == "need_weights"}
    if case == "image_kv":
        kwargs["image_kv"] = module.encode_image(image)
        out, _ = module(text, **kwargs)
    elif case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = module(text, image, **kwargs)
    elif case == "global_hook":  # e.g. a profiler or FLOP counter hooking every module
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, a, out: seen.append(1) if m is module.image_value else None
        )
        try:
            out, _ = module(text, image, **kwargs)
        finally:
            handle.remove()
    else:
        out, _ = module(text, image, **kwargs)
    assert calls == []
    if case in ("hooked", "global_hook"):
        assert seen == [1]
    if case == "subclassed":  # the adapter's doubling reached the output
        plain = CrossModalAttention(256, 8, dropout=0.0).eval()
        plain.load_state_dict(module.state_dict())
        with torch.no_grad():
            plain.image_value.weight.mul_(2.0)
            plain.image_value.bias.mul_(2.0)  # type: ignore[union-attr]
        torch.testing.assert_close(out, plain(text, image, need_weights=False)[0])


def test_absorb_projections_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="absorb_projections must be a bool, got str"):
        CrossModalAttention(16, 4, absorb_projections="auto")  # type: ignore[arg-type]


def test_absorption_costs_count_the_flops() -> None:
    # b4 t20 i196 D256 h8: K/V projections 2·8·196·256·32·2 + products 2·8·20·196·32·2.
    projected, absorbed = absorption_costs(
        num_heads=8, num_kv_heads=8, head_dim=32, image_dim=256, text_len=20, image_len=196
    )
    assert projected == 2 * 8 * 196 * 256 * 32 + 2 * 8 * 20 * 196 * 32
    assert absorbed == 2 * 8 * 20 * 32 * 256 + 2 * 8 * 20 * 196 * 256
    assert 0.66 < absorbed / projected < 0.68


def test_absorbed_is_cheaper_keeps_memory_bounded() -> None:
    # With an image width below the head width, absorbing is cheaper at any text length; the
    # h·t <= k·d condition still hands long text to the projected path, so the h·t·i scores
    # never outgrow the keys and values.
    sizes = {"num_heads": 4, "num_kv_heads": 4, "head_dim": 64, "image_dim": 16, "image_len": 100}
    assert absorbed_is_cheaper(**sizes, text_len=64)
    assert not absorbed_is_cheaper(**sizes, text_len=65)
    assert not absorbed_is_cheaper(**sizes, text_len=1, dtype=torch.float16)
    assert set(ABSORB_MAX_COST_RATIO) == {torch.float32, torch.float64, torch.bfloat16}


@pytest.mark.slow
def test_absorbed_compiles_with_inductor(absorbed_runs: list[int]) -> None:
    torch._dynamo.reset()
    module = make_module(16, 4, E=8, k=2)
    text, image = torch.randn(2, 1, 16), torch.randn(2, 5, 8)
    mask = torch.rand(2, 5) < 0.6
    compiled = torch.compile(module, fullgraph=True)
    got, _ = compiled(text, image, mask, need_weights=False)
    want, _ = module(text, image, mask, need_weights=False)
    assert absorbed_runs
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # float32; inductor reorders sums


@pytest.mark.parametrize(
    ("case", "want"),
    [
        ("weights", "explicit"),
        ("short", "absorbed"),
        ("long", "sdpa"),
        ("cache", "sdpa"),
        ("bf16-training", "math"),
        ("bf16-inference", "sdpa"),
    ],
)
def test_which_path_names_what_forward_runs(
    monkeypatch: pytest.MonkeyPatch, case: str, want: str
) -> None:
    # The answer must match what forward then does: the absorbed path, SDPA, or neither.
    absorbed = count_absorbed_calls(monkeypatch)
    sdpa_calls: list[int] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted_sdpa(*args: Any, **kwargs: Any) -> Tensor:
        sdpa_calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted_sdpa)
    dtype = torch.bfloat16 if case.startswith("bf16") else torch.float32
    module = CrossModalAttention(256, 8, dropout=0.0).to(dtype)
    module.train(case == "bf16-training")
    t = 64 if case in ("long", "bf16-training", "bf16-inference") else 1
    text, image = torch.randn(2, t, 256, dtype=dtype), torch.randn(2, 49, 256, dtype=dtype)
    kwargs: dict[str, Any] = {"need_weights": case == "weights"}
    if case == "cache":
        kwargs["image_kv"] = module.encode_image(image)
        image = None  # type: ignore[assignment]
    grad = torch.enable_grad() if case == "bf16-training" else torch.no_grad()
    with grad:
        assert module.which_path(text, image, **kwargs) == want
        module(text, image, **kwargs)
    assert bool(absorbed) is (want == "absorbed")
    assert bool(sdpa_calls) is (want == "sdpa")


def test_which_path_needs_image_features_or_a_cache() -> None:
    module = CrossModalAttention(16, 4)
    with pytest.raises(ValueError, match="pass either image_features or image_kv, got neither"):
        module.which_path(torch.randn(1, 2, 16), need_weights=False)
