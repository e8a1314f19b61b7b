"""The Sort-of-CLEVR VQA model: built from xmodal's blocks, exact question batching, controls."""

from __future__ import annotations

import pytest
import torch

from xmodal.attention_maps import record_attention
from xmodal.blocks import GatedCrossAttentionBlock
from xmodal.data.sort_of_clevr import ANSWERS, encode_words, generate
from xmodal.models.vqa import VQAConfig, VQAModel, images_to_tensor, recalibrate_batchnorm

TINY = {
    "dim": 16,
    "stem_channels": (4, 8, 8),
    "image_layers": 1,
    "text_layers": 2,
    "num_heads": 2,
}


def _model(**overrides: object) -> VQAModel:
    torch.manual_seed(0)
    return VQAModel(VQAConfig(**{**TINY, **overrides})).eval()  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    d = generate(3, seed=0)
    words = torch.from_numpy(encode_words(d.question_text)).view(3, 20, -1)
    return images_to_tensor(d.images), words


@pytest.mark.parametrize("kind", ["flamingo", "cnn_mlp", "blind"])
def test_output_shape(kind: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, words = batch
    logits = _model(kind=kind)(images, words)
    assert logits.shape == (3, 20, len(ANSWERS))
    assert torch.isfinite(logits).all()


def test_assembled_from_xmodal_blocks_with_gate_setting() -> None:
    model = _model(gate_init=0.25)
    blocks = [m for m in model.modules() if isinstance(m, GatedCrossAttentionBlock)]
    assert len(blocks) == TINY["text_layers"]
    for block in blocks:
        assert block.attn_gate.alpha.item() == pytest.approx(0.25)
        assert block.ff_gate.alpha.item() == pytest.approx(0.25)


def test_default_model_is_small() -> None:
    assert VQAModel(VQAConfig()).num_parameters() < 1_000_000


def test_asking_all_questions_at_once_equals_one_by_one(
    batch: tuple[torch.Tensor, torch.Tensor],
) -> None:
    # The q questions of an image share one cross-attention text of q·t tokens: exact, since
    # cross-attention queries do not interact. Compare with one forward per question.
    images, words = batch
    model = _model()
    with torch.no_grad():
        together = model(images, words)
        alone = torch.stack(
            [model(images, words[:, j : j + 1])[:, 0] for j in range(words.shape[1])], dim=1
        )
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)  # float32 sum order


def test_trailing_padding_changes_nothing(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, words = batch
    model = _model()
    with torch.no_grad():
        short = model(images[:1], words[:1, :2, :8])  # non-relational questions have 8 words
        long = model(images[:1], words[:1, :2])
    assert (words[:1, :2, 8:] == 0).all()
    torch.testing.assert_close(short, long, rtol=1e-5, atol=1e-5)


def test_answers_depend_on_the_image_except_when_blind(
    batch: tuple[torch.Tensor, torch.Tensor],
) -> None:
    images, words = batch
    other = images.flip(0)
    with torch.no_grad():
        for kind in ("flamingo", "cnn_mlp"):
            m = _model(kind=kind)
            assert not torch.allclose(m(images, words), m(other, words))
        blind = _model(kind="blind")
        assert torch.equal(blind(images, words), blind(other, words))


def test_gradient_reaches_the_image_encoder_through_cross_attention(
    batch: tuple[torch.Tensor, torch.Tensor],
) -> None:
    images, words = batch
    model = _model().train()
    model(images, words).sum().backward()
    stem_grad = model.image_encoder.stem[0].weight.grad  # type: ignore[union-attr]
    assert stem_grad is not None
    assert stem_grad.abs().sum() > 0


def test_coordinates_make_positions_visible() -> None:
    config = VQAConfig(**TINY)  # type: ignore[arg-type]
    assert config.grid == (10, 10)
    coords = _model().image_encoder.coords  # type: ignore[union-attr]
    assert coords.shape == (10, 10, 3)
    assert coords[0, 0, :2].tolist() == [-1.0, -1.0]
    assert coords[0, -1, :2].tolist() == [1.0, -1.0]
    torch.testing.assert_close(coords[..., 2], coords[..., 0] ** 2 + coords[..., 1] ** 2)


def test_pixel_coordinates_enter_the_stem_as_two_channels(
    batch: tuple[torch.Tensor, torch.Tensor],
) -> None:
    from xmodal.models.vqa import PixelCoordinates

    images, words = batch
    grid = PixelCoordinates()(images)[:, 3:]  # (b, 2, 75, 75): x, then y
    assert grid.shape == (3, 2, 75, 75)
    assert grid[0, 0, 0].tolist() == torch.linspace(-1, 1, 75).tolist()  # x grows rightwards
    assert grid[0, 1, :, 0].tolist() == torch.linspace(-1, 1, 75).tolist()  # y grows downwards
    model = _model(pixel_coords=True)
    stem = model.image_encoder.stem  # type: ignore[union-attr]
    assert stem[1].in_channels == 5
    # A blank image is no longer the same everywhere: the stem sees where each pixel is.
    cells = stem(torch.ones(1, 3, 75, 75))
    assert (cells[0, :, 0, 0] - cells[0, :, -1, -1]).abs().max() > 0
    assert model(images, words).shape == (3, 20, len(ANSWERS))
    # Old checkpoints' configs (no such key) load as before.
    assert VQAConfig.from_dict({}).pixel_coords is False


@pytest.mark.parametrize(("x", "y"), [(0, 0), (3, 3), (4, 3), (37, 60), (74, 74), (44, 11)])
def test_foreground_cells_mark_the_patch_holding_a_pixel(x: int, y: int) -> None:
    from xmodal.models.vqa import foreground_cells
    from xmodal.pointing import stem_patch_centers

    images = torch.ones(1, 3, 75, 75)
    images[0, 1, y, x] = 0.5  # one non-white pixel
    keep = foreground_cells(images, (2, 2, 2))
    assert keep.shape == (1, 10, 10)
    assert keep.sum() == 1
    # The kept token's centre (pointing's geometry) is within half a patch (8 px) of the pixel.
    centers = stem_patch_centers((2, 2, 2), (10, 10))  # (100, 2) pixel (x, y)
    offset = centers[keep.flatten()] - torch.tensor([x + 0.5, y + 0.5], dtype=centers.dtype)
    assert offset.abs().max() <= 4


def test_foreground_mask_hides_background_and_keeps_a_blank_image_finite(
    batch: tuple[torch.Tensor, torch.Tensor],
) -> None:
    from xmodal.models.vqa import foreground_cells

    images, words = batch
    keep = foreground_cells(images, (2, 2, 2))
    assert 0.1 < keep.float().mean() < 0.5  # six 11-pixel objects: about a quarter of 100 cells
    assert foreground_cells(torch.ones(2, 3, 75, 75), (2, 2, 2)).all()  # nothing to show
    model = _model(foreground_mask=True)
    with record_attention(model) as maps:
        model(images, words)
    w = maps["cross_blocks.0.attn"]  # (b, h, q·t, i)
    assert w[~keep.flatten(1)[:, None, None, :].expand_as(w)].abs().max() == 0
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
    blank = model(torch.ones(3, 3, 75, 75), words)
    assert torch.isfinite(blank).all()


def test_distance_bias_adds_slope_times_squared_distance_and_hides_background(
    batch: tuple[torch.Tensor, torch.Tensor],
) -> None:
    images, words = batch
    model = _model(distance_bias=True, foreground_mask=True).train()
    encoder = model.image_encoder
    assert encoder is not None
    assert encoder.distance_slopes is not None
    assert encoder.distance_slopes.shape == (TINY["image_layers"], TINY["num_heads"])
    d2 = encoder.squared_distances  # (100, 100): cells (0, 0) and (0, 9) are 2 apart
    assert d2[0, 9].item() == pytest.approx(4.0)
    assert d2[0, 99].item() == pytest.approx(8.0)
    pad = torch.zeros(3, 100, dtype=torch.bool)
    pad[1, 5] = True
    bias = encoder._distance_bias(0, pad).view(3, TINY["num_heads"], 100, 100)
    slopes = encoder.distance_slopes[0]
    torch.testing.assert_close(bias[0], slopes[:, None, None] * d2)
    assert (bias[1, :, :, 5] < -1e30).all()
    torch.testing.assert_close(bias[1, :, :, 6], bias[0, :, :, 6])
    with torch.no_grad():  # nn.TransformerEncoderLayer's inference fast path: no NaN
        assert torch.isfinite(model.eval()(images, words)).all()
    model.train()(images, words).logsumexp(-1).sum().backward()
    assert encoder.distance_slopes.grad is not None
    assert encoder.distance_slopes.grad.abs().sum() > 0


def test_distance_ring_pushes_back_the_near_field() -> None:
    model = _model(distance_bias=True, distance_ring=True)
    encoder = model.image_encoder
    assert encoder is not None
    assert encoder.ring_weights is not None
    bias = encoder._distance_bias(0, None).view(TINY["num_heads"], 100, 100)
    slopes, ring = encoder.distance_slopes[0], encoder.ring_weights[0]  # type: ignore[index]
    d2 = encoder.squared_distances
    cell = 2.0 / 9  # neighbouring cells of the 10×10 grid, in [-1, 1] coordinates
    expected = slopes[:, None, None] * d2 + ring[:, None, None] * torch.exp(-d2 / cell**2)
    torch.testing.assert_close(bias, expected)
    # The "nearest first" head (most negative slope) now prefers a cell two away to itself.
    assert bias[0, 0, 2] > bias[0, 0, 0]


def test_config_round_trips_through_a_dict() -> None:
    config = VQAConfig(**TINY)  # type: ignore[arg-type]
    assert VQAConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kind": "rn"}, r"kind must be one of \('flamingo', 'cnn_mlp', 'blind'\), got 'rn'"),
        ({"dim": 10, "num_heads": 4}, r"dim \(10\) must be divisible by num_heads \(4\)"),
        ({"stem_strides": (2, 2)}, "stem_channels and stem_strides must be non-empty and of equal"),
        ({"dim": 0}, "dim must be a positive int, got 0"),
        ({"distance_ring": True}, "distance_ring=True needs distance_bias=True"),
    ],
)
def test_config_errors(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VQAConfig(**{**TINY, **overrides})  # type: ignore[arg-type]


def test_unknown_config_key_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown model config key\(s\) \['depth'\]"):
        VQAConfig.from_dict({"depth": 3})


def test_input_errors(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    images, words = batch
    model = _model()
    with pytest.raises(ValueError, match=r"questions must be int64 word ids of shape \(b, q, t\)"):
        model(images, words.float())
    with pytest.raises(
        ValueError, match=r"images must have shape \(2, 3, H, W\).*got \(3, 3, 75, 75\)"
    ):
        model(images, words[:2])
    with pytest.raises(ValueError, match="more than max_words=13"):
        model(images, torch.ones(3, 1, 14, dtype=torch.int64))
    with pytest.raises(TypeError, match="config must be a VQAConfig, got dict"):
        VQAModel({})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"images must have shape \(b, H, W, 3\), got \(2, 3\)"):
        images_to_tensor(torch.zeros(2, 3))


def test_recalibrated_batchnorm_holds_the_statistics_of_the_given_images(
    batch: tuple[torch.Tensor, torch.Tensor],
) -> None:
    images, _ = batch
    model = _model().train()
    stem = model.image_encoder.stem  # type: ignore[union-attr]
    norms = [m for m in stem if isinstance(m, torch.nn.BatchNorm2d)]
    inputs: dict[int, list[torch.Tensor]] = {k: [] for k in range(len(norms))}
    hooks = [
        m.register_forward_hook(lambda _m, args, _o, k=k: inputs[k].append(args[0].detach()))
        for k, m in enumerate(norms)
    ]
    with torch.no_grad():
        stem(images)  # stale running stats: one momentum-0.1 update from the initial 0 / 1
        for h in hooks:
            h.remove()
        recalibrate_batchnorm(model, images, batch_size=len(images))
    assert model.training  # modes restored
    assert all(m.training for m in norms)
    # float32 sums over 3·38·38 values in two different orders: agree to ~1e-5 relative.
    tol = {"rtol": 1e-4, "atol": 1e-4}
    for k, m in enumerate(norms):
        x = inputs[k][0]  # (b, C, H, W) what this BatchNorm saw in training mode
        torch.testing.assert_close(m.running_mean, x.mean(dim=(0, 2, 3)), **tol)
        torch.testing.assert_close(m.running_var, x.var(dim=(0, 2, 3), unbiased=True), **tol)
        assert m.momentum == 0.1  # restored
