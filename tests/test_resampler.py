"""PerceiverResampler: shapes, the float64 reference (Flamingo Fig. 5), embeddings, gradcheck."""

from __future__ import annotations

import pytest
import torch
from reference import flamingo as ref

from xmodal import PerceiverResampler

D = 16


def _resampler(**kwargs: object) -> PerceiverResampler:
    options: dict[str, object] = {"depth": 2, "num_latents": 3, "num_heads": 2, "head_dim": 4}
    options.update(kwargs)
    return PerceiverResampler(D, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("shape", "out"),
    [((2, 5, D), (2, 1, 3, D)), ((2, 3, 5, D), (2, 3, 3, D)), ((2, 3, 2, 5, D), (2, 3, 3, D))],
)
def test_output_shape(shape: tuple[int, ...], out: tuple[int, ...]) -> None:
    assert _resampler(max_num_frames=2)(torch.randn(shape)).shape == out


def test_matches_float64_reference_with_media_and_frame_embeddings() -> None:
    module = _resampler(max_num_media=4, max_num_frames=3).double()
    media = torch.randn(2, 3, 2, 5, D, dtype=torch.float64)
    # float64 on both sides, the same formulas in a different order: agreement to ~1e-12.
    torch.testing.assert_close(module(media), ref.resampler(module, media), rtol=1e-10, atol=1e-10)


def test_float32_matches_reference_within_float32_rounding() -> None:
    module = _resampler()
    media = torch.randn(2, 2, 6, D)
    expected = ref.resampler(module, media[:, :, None]).float()
    # float32 through 2 layers of LayerNorm + softmax attention: ~1e-6 relative per op.
    torch.testing.assert_close(module(media), expected, rtol=1e-4, atol=1e-5)


def test_each_medium_is_resampled_on_its_own() -> None:
    module = _resampler()
    media = torch.randn(1, 3, 4, D)
    changed = media.clone()
    changed[:, 1] = torch.randn(4, D)
    out, out2 = module(media), module(changed)
    assert torch.equal(out[:, 0], out2[:, 0])
    assert torch.equal(out[:, 2], out2[:, 2])
    assert not torch.allclose(out[:, 1], out2[:, 1])


def test_media_embedding_tells_media_apart() -> None:
    module = _resampler(max_num_media=2)
    image = torch.randn(1, 1, 4, D)
    out = module(torch.cat([image, image], dim=1))  # the same image twice
    assert not torch.allclose(out[:, 0], out[:, 1])
    plain = _resampler()(torch.cat([image, image], dim=1))
    torch.testing.assert_close(plain[:, 0], plain[:, 1])


def test_compiles_fullgraph() -> None:
    module = _resampler(max_num_media=2, max_num_frames=2)
    media = torch.randn(1, 2, 2, 3, D)
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(media), module(media))


def test_gradcheck_tiny() -> None:
    module = PerceiverResampler(4, depth=1, num_latents=2, num_heads=2, head_dim=2).double()
    media = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(module, (media,), eps=1e-6, atol=1e-5)


def test_errors_name_the_argument() -> None:
    module = _resampler(max_num_media=2, max_num_frames=1)
    with pytest.raises(
        ValueError, match=r"media must have shape \(b, n, 16\).*got shape \(2, 16\)"
    ):
        module(torch.randn(2, D))
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 8\)"):
        module(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"3 media per row .* more than max_num_media=2"):
        module(torch.randn(1, 3, 4, D))
    with pytest.raises(ValueError, match=r"2 frames per medium .* more than max_num_frames=1"):
        module(torch.randn(1, 1, 2, 4, D))
    with pytest.raises(TypeError, match=r"media must be a torch.Tensor, got list"):
        module([1.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"depth must be positive, got 0"):
        PerceiverResampler(D, depth=0)
    with pytest.raises(TypeError, match=r"max_num_media must be a positive int or None, got str"):
        PerceiverResampler(D, max_num_media="2")  # type: ignore[arg-type]


def test_media_of_the_wrong_dtype_is_a_type_error_naming_media() -> None:
    module = _resampler()
    with pytest.raises(TypeError, match=r"media must be a floating-point tensor, got dtype"):
        module(torch.ones(1, 3, D, dtype=torch.long))
    with pytest.raises(TypeError, match=r"media has dtype torch.bfloat16, but the module's"):
        module(torch.randn(1, 3, D, dtype=torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast may mix dtypes
        assert module(torch.randn(1, 3, D, dtype=torch.bfloat16)).shape == (1, 1, 3, D)
