"""The key and value projections as one GEMM in inference (``CrossModalAttention._project_kv``).

Legend: ``b`` batch, ``t`` text tokens, ``i`` image tokens, ``h`` query heads, ``k`` key/value
heads, ``d`` head width, ``D`` text width, ``E`` image width.

``image_key`` and ``image_value`` stay two parameters each (weight, bias) with their own
``state_dict`` names; only their memory is joined, and inference reads the pair as one stacked
``(2·k·d, E)`` weight. These tests check that the pair stays joined through the conversions a
module goes through, that the stacked product gives the reference answer, and that every case
where it must not be used (gradients, hooks, compile, parameters replaced) falls back to two
products and stays correct.
"""

from __future__ import annotations

import copy
import io

import pytest
import safetensors.torch
import torch
from reference.naive import reference_attention
from test_attention import CONFIGS, MASKS, make_module
from torch import Tensor, nn

from xmodal import CrossModalAttention
from xmodal.attention import _rows_of_one_tensor


def joined(module: CrossModalAttention) -> bool:
    """Weights (and biases, when there are any) of the key and value projections are one tensor."""
    key, value = module.image_key, module.image_value
    if _rows_of_one_tensor(key.weight, value.weight) is None:
        return False
    return key.bias is None or _rows_of_one_tensor(key.bias, value.bias) is not None


def kv_share_storage(module: CrossModalAttention, image: Tensor) -> bool:
    """Whether the forward pass makes keys and values with one product.

    Its values are then a view of that product, and so are its keys unless a key norm made new
    ones: the product's width is ``2·k·d``. (``encode_image`` copies them out, contiguous.)
    """
    _, value = module._project_kv(image)  # (b, k, i, d)
    return value.untyped_storage().nbytes() == 2 * value.numel() * value.element_size()


def assert_two_products_match_reference(module: CrossModalAttention) -> None:
    """In inference ``module`` (float64, width 16) projects K and V apart, and is still right."""
    text = torch.randn(2, 3, 16, dtype=torch.float64)
    image = torch.randn(2, 5, 16, dtype=torch.float64)
    ref_out, _ = reference_attention(module, text, image, None)
    with torch.no_grad():
        assert not kv_share_storage(module, image)
        out, _ = module(text, image, need_weights=False)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------
# The pair stays joined
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_constructed_modules_are_joined_and_keep_their_parameters(bias: bool) -> None:
    module = CrossModalAttention(16, 4, image_dim=24, num_kv_heads=2, bias=bias)
    assert joined(module)
    names = [n for n, _ in module.named_parameters()]
    assert "image_key.weight" in names
    assert "image_value.weight" in names
    assert module.image_key.weight.shape == module.image_value.weight.shape == (8, 24)
    assert isinstance(module.image_key.weight, nn.Parameter)
    assert module.state_dict()["image_value.weight"].shape == (8, 24)


@pytest.mark.parametrize(
    ("convert", "lossless"),
    [
        (lambda m: m.to(torch.bfloat16), False),
        (lambda m: m.double(), True),
        (lambda m: m.half().float(), False),
        (lambda m: m.to(torch.device("meta")).to_empty(device="cpu"), False),
        (lambda m: m.requires_grad_(False), True),
    ],
    ids=["to-bf16", "double", "half-float", "meta-to-empty", "requires_grad_"],
)
def test_conversions_keep_the_pair_joined(convert, lossless: bool) -> None:  # type: ignore[no-untyped-def]
    module = CrossModalAttention(16, 4)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module = convert(module)
    assert joined(module)
    if lossless:
        for name, value in module.state_dict().items():
            assert torch.equal(value.double(), before[name].double()), name


def test_load_state_dict_and_optimizer_steps_keep_the_pair_joined() -> None:
    module = CrossModalAttention(16, 4)
    other = CrossModalAttention(16, 4)
    module.load_state_dict(other.state_dict())
    assert joined(module)
    torch.testing.assert_close(module.image_value.weight, other.image_value.weight)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    out, _ = module(torch.randn(2, 3, 16), torch.randn(2, 5, 16), need_weights=False)
    out.sum().backward()
    opt.step()
    assert joined(module)


def test_deepcopy_is_joined_and_independent() -> None:
    module = CrossModalAttention(16, 4)
    twin = copy.deepcopy(module)
    assert joined(twin)
    assert twin.image_key.weight.data_ptr() != module.image_key.weight.data_ptr()
    with torch.no_grad():
        twin.image_value.weight.add_(1.0)
    assert not torch.equal(twin.image_value.weight, module.image_value.weight)


def test_share_memory_is_kept() -> None:
    module = CrossModalAttention(16, 4).share_memory()
    assert module.image_key.weight.is_shared()
    assert module.image_value.weight.is_shared()
    assert joined(module)  # share_memory_ moves the one storage; nothing is copied out of it


def test_state_dict_round_trips_through_torch_save_and_safetensors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    module = CrossModalAttention(16, 4)
    state = module.state_dict()
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(state, str(path))
    loaded = safetensors.torch.load_file(str(path))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    pickled = torch.load(buffer)
    for name, value in state.items():
        assert torch.equal(loaded[name], value), name
        assert torch.equal(pickled[name], value), name
        assert loaded[name].shape == value.shape


# --------------------------------------------------------------------------------------------
# The stacked product is used in inference and gives the reference answer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "explicit"])
@pytest.mark.parametrize("mask_name", ["none", "pad_2d_empty_element", "per_head_4d", "float_3d"])
@pytest.mark.parametrize("config", CONFIGS)
def test_inference_matches_reference_float64(
    config: tuple, mask_name: str, need_weights: bool
) -> None:
    b, t, i, D, E, h, d, k, qk_norm, bias = config
    module = make_module(D, h, E=E, d=d, k=k, qk_norm=qk_norm, bias=bias, dtype=torch.float64)
    module.absorb_projections = False  # the projected path, where keys and values are made
    text = torch.randn(b, t, D, dtype=torch.float64)
    image = torch.randn(b, i, E, dtype=torch.float64)
    mask = MASKS[mask_name](b, h, t, i, torch.Generator().manual_seed(0))
    ref_out, ref_weights = reference_attention(module, text, image, mask)
    with torch.inference_mode():
        assert kv_share_storage(module, image)
        out, weights = module(text, image, mask, need_weights=need_weights)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    if need_weights:
        torch.testing.assert_close(weights, ref_weights, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_product_equals_two_products(dtype: torch.dtype) -> None:
    # The same dot products over E, grouped into one GEMM instead of two. float32: a different
    # blocking may change the summation order (eps 1.2e-7 times a few dozen terms); bf16 outputs
    # are rounded to 8 significant bits, so one output ulp (2^-8 relative) is allowed.
    module = CrossModalAttention(32, 4, image_dim=48).to(dtype).eval()
    split = copy.deepcopy(module)
    split.image_value.weight = nn.Parameter(split.image_value.weight.detach().clone())
    assert not joined(split)
    image = torch.randn(3, 7, 48, dtype=dtype)
    with torch.no_grad():
        assert kv_share_storage(module, image)
        assert not kv_share_storage(split, image)
        one, two = module.encode_image(image), split.encode_image(image)
    for kv in (one, two):  # the cache is stored contiguous, whichever way it was made
        assert kv.key.is_contiguous()
        assert kv.value.is_contiguous()
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2**-8, "atol": 1e-3}
    torch.testing.assert_close(one.key, two.key, **tol)
    torch.testing.assert_close(one.value, two.value, **tol)


# --------------------------------------------------------------------------------------------
# Where the stacked product must not be used
# --------------------------------------------------------------------------------------------


def test_gradients_take_two_products_and_reach_both_weights() -> None:
    module = CrossModalAttention(16, 4, absorb_projections=False)
    image = torch.randn(2, 5, 16)
    assert not kv_share_storage(module, image)  # parameters need gradients here
    out, _ = module(torch.randn(2, 3, 16), image, need_weights=False)
    out.square().sum().backward()
    for p in (module.image_key.weight, module.image_value.weight, module.image_value.bias):
        assert p.grad is not None
        assert p.grad.abs().sum() > 0
    frozen = CrossModalAttention(16, 4).requires_grad_(False)
    assert not kv_share_storage(frozen, image.requires_grad_(True))  # the input needs one


def test_hooks_see_their_projection_run() -> None:
    module = CrossModalAttention(16, 4, absorb_projections=False).eval()
    seen: list[str] = []
    module.image_value.register_forward_hook(lambda m, args, out: seen.append("value"))
    with torch.no_grad():
        assert not kv_share_storage(module, torch.randn(1, 5, 16))
        module(torch.randn(1, 3, 16), torch.randn(1, 5, 16), need_weights=False)
    assert seen == ["value", "value"]


def test_replaced_parameters_fall_back_and_stay_correct() -> None:
    module = make_module(dtype=torch.float64)
    module.absorb_projections = False
    module.image_key.bias = nn.Parameter(torch.randn(16, dtype=torch.float64))  # bias elsewhere
    assert_two_products_match_reference(module)
    module.to(torch.float32)  # the next conversion joins them again
    assert joined(module)


@pytest.mark.parametrize(("image_len", "stacked"), [(65535, True), (65536, False)])
def test_a_product_of_glibcs_largest_mmap_threshold_is_split_in_two(
    image_len: int, stacked: bool
) -> None:
    # 2·i·k·d float32 elements: 65536 · 128 · 4 bytes = 32 MiB, which glibc may map afresh
    # (and the kernel fault in page by page) on every call; two 16 MiB outputs stay on its heap
    from xmodal.attention import MALLOC_MMAP_THRESHOLD_MAX, _fresh_pages_each_call

    module = CrossModalAttention(64, 1, image_dim=4, dropout=0.0).eval()
    image = torch.randn(1, image_len, 4)
    assert _fresh_pages_each_call(image, 2 * image_len * 64) is not stacked
    with torch.no_grad():
        assert kv_share_storage(module, image) is stacked
        key, value = module._project_kv(image)
    torch.testing.assert_close(key, module.image_key(image).view(1, -1, 1, 64).transpose(1, 2))
    torch.testing.assert_close(value, module.image_value(image).view(1, -1, 1, 64).transpose(1, 2))
    # each half must itself stay below the threshold for the split to help
    assert not _fresh_pages_each_call(image, 4 * MALLOC_MMAP_THRESHOLD_MAX)
    assert not _fresh_pages_each_call(image.to("meta"), 2 * image_len * 64)  # CPU only


def test_rows_of_one_tensor_refuses_what_is_not_one_tensor() -> None:
    joint = torch.randn(8, 3)
    assert torch.equal(_rows_of_one_tensor(joint[:4], joint[4:]), joint)  # type: ignore[arg-type]
    assert _rows_of_one_tensor(joint[4:], joint[:4]) is None  # wrong order
    assert _rows_of_one_tensor(joint[:4], joint[4:7]) is None  # other shape
    assert _rows_of_one_tensor(torch.randn(4, 3), torch.randn(4, 3)) is None  # two storages
    assert _rows_of_one_tensor(joint.t()[:, :4], joint.t()[:, 4:]) is None  # not contiguous
    meta = torch.empty(8, 3, device="meta")
    assert _rows_of_one_tensor(meta[:4], meta[4:]) is None


def test_compile_fullgraph_in_inference_matches_eager() -> None:
    module = CrossModalAttention(16, 4, absorb_projections=False).eval()
    text, image = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    with torch.no_grad():
        expected, _ = module(text, image, need_weights=False)
        got, _ = compiled(text, image, need_weights=False)
    torch.testing.assert_close(got, expected)


def test_a_remembered_layout_is_checked_against_the_parameters_in_use() -> None:
    # _stacked_kv_projection remembers its answer for the tensors it saw; a parameter whose
    # .data is reassigned afterwards (new memory, new values) must not be read through old views.
    module = make_module(dtype=torch.float64)
    module.absorb_projections = False
    text = torch.randn(2, 3, 16, dtype=torch.float64)
    image = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        assert kv_share_storage(module, image)
        module(text, image, need_weights=False)
        module.image_value.weight.data = module.image_value.weight.data + 1.0  # new storage
        assert not kv_share_storage(module, image)
        out, _ = module(text, image, need_weights=False)
    ref_out, _ = reference_attention(module, text, image, None)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    # A later conversion leaves the pair apart: image_key.weight is now half of a buffer whose
    # other half nothing uses, and a parameter that does not own its memory is never moved
    # (it may be a view into FSDP's or an optimiser's flat buffer). Two products, still right.
    module.to(torch.float64)
    with torch.no_grad():
        assert not kv_share_storage(module, image)
        again, _ = module(text, image, need_weights=False)
    torch.testing.assert_close(again, ref_out, rtol=1e-10, atol=1e-12)


def test_a_state_dict_load_that_replaces_parameters_lets_go_of_the_old_ones() -> None:
    import gc
    import weakref

    module = CrossModalAttention(16, 4, absorb_projections=False).eval()
    with torch.no_grad():
        module(torch.randn(1, 2, 16), torch.randn(1, 3, 16), need_weights=False)  # remembered
    old = weakref.ref(module.image_value.weight)
    module.load_state_dict(CrossModalAttention(16, 4).state_dict(), assign=True)
    gc.collect()
    assert old() is None  # not kept alive by the remembered layout
    text, image = torch.randn(1, 2, 16), torch.randn(1, 3, 16)
    with torch.no_grad():
        out, _ = module(text, image, need_weights=False)
    module.absorb_projections = False
    ref, _ = copy.deepcopy(module).requires_grad_(True)(text, image, need_weights=False)
    torch.testing.assert_close(out, ref)


def test_parametrised_projections_are_left_alone_and_stay_correct() -> None:
    from torch.nn.utils.parametrizations import weight_norm

    module = make_module(dtype=torch.float64)
    module.absorb_projections = False
    weight_norm(module.image_value)  # image_value.weight is now computed from g and v
    module = module.to(torch.float64)  # a conversion must not try to join a computed weight
    assert not joined(module)
    assert_two_products_match_reference(module)


def test_parameters_that_are_views_into_a_flat_buffer_are_left_there() -> None:
    # FSDP, DeepSpeed and fused optimisers keep parameters as views into one flat buffer of
    # their own; a later conversion must not copy the pair out of it (updates to the buffer
    # would no longer reach the module).
    module = CrossModalAttention(16, 4, bias=False)
    weights = [module.image_key.weight, module.image_value.weight]
    flat = torch.zeros(3 * 16 * 16)  # key weight, a gap, value weight: not side by side
    for p, start in zip(weights, (0, 2 * 16 * 16), strict=True):
        view = flat[start : start + p.numel()].view_as(p)
        view.copy_(p.detach())
        p.data = view
    module.to(torch.float32)  # a no-op conversion, which joins pairs that own their memory
    assert module.image_key.weight.data_ptr() == flat.data_ptr()
    assert module.image_value.weight.data_ptr() == flat.data_ptr() + 2 * 16 * 16 * 4
    assert not joined(module)
