"""The Sort-of-CLEVR VQA model: built from xmodal's blocks, exact question batching, controls."""

from __future__ import annotations

import pytest
import torch

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
