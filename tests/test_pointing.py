"""The pointing game on synthetic maps: hits, dilation, chance levels, errors."""

from __future__ import annotations

import math

import pytest
import torch

from xmodal.pointing import pointing_game, pointing_hits

# A 40 x 40 picture as a 4 x 4 grid of 10-pixel patches; patch (r, c) is token 4r + c.
GRID = (4, 4)
SIZE = (40, 40)


def _peak_at(row: int, col: int) -> torch.Tensor:
    m = torch.full((16,), 0.01)
    m[4 * row + col] = 1.0
    return m / m.sum()


def test_hit_inside_miss_far_away_and_the_one_patch_dilation() -> None:
    box = torch.tensor([15.0, 15.0, 25.0, 25.0])  # centred; overlaps patches (1..2, 1..2)
    maps = torch.stack(
        [_peak_at(1, 1), _peak_at(2, 2), _peak_at(0, 1), _peak_at(3, 3), _peak_at(0, 0)]
    )
    boxes = box.expand(5, 4)
    hits = pointing_hits(maps, boxes, grid=GRID, image_size=SIZE)
    # (0, 1): centre (15, 5) is 10 px = one patch above the box: a hit only with dilation.
    # (3, 3) centre (35, 35) and (0, 0) centre (5, 5) lie 10 px off in both axes: also hits
    # with dilation 1 (the dilated box is [5, 35] squared, edges included).
    assert hits.tolist() == [True, True, True, True, True]
    strict = pointing_hits(maps, boxes, grid=GRID, image_size=SIZE, dilation=0)
    assert strict.tolist() == [True, True, False, False, False]


def test_score_and_the_two_chance_levels() -> None:
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])  # top-left patch
    maps = torch.stack([_peak_at(0, 0), _peak_at(3, 3)])
    result = pointing_game(maps, box, grid=GRID, image_size=SIZE)
    assert result.hits.tolist() == [True, False]
    assert result.score == 0.5
    # Dilated box [-10, 20]^2 holds the centres of patches (0..1, 0..1): 4 of 16.
    assert result.chance == pytest.approx(4 / 16)
    assert result.area_fraction == pytest.approx(100 / 1600)
    assert result.count == 2
    strict = pointing_game(maps, box, grid=GRID, image_size=SIZE, dilation=0)
    assert strict.chance == pytest.approx(1 / 16)
    assert result.to_dict() == {
        "pointing_game": 0.5,
        "pointing_game_chance": result.chance,
        "pointing_game_area_fraction": result.area_fraction,
        "pointing_game_count": 2,
    }


def test_chance_draws_from_the_allowed_patches() -> None:
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 2)  # dilated: patches (0..1, 0..1) hit
    maps = torch.stack([_peak_at(0, 0), _peak_at(3, 3)])
    allowed = torch.zeros(2, 16, dtype=torch.bool)
    allowed[0, [0, 1, 15]] = True  # two of three attendable patches hit
    allowed[1, [14, 15]] = True  # none does
    result = pointing_game(maps, box, grid=GRID, image_size=SIZE, allowed=allowed)
    assert result.chance == pytest.approx((2 / 3 + 0 / 2) / 2)
    assert result.score == 0.5  # the score itself does not change
    everything = pointing_game(
        maps, box, grid=GRID, image_size=SIZE, allowed=torch.ones(2, 16, dtype=torch.bool)
    )
    assert everything.chance == pytest.approx(4 / 16)
    with pytest.raises(ValueError, match=r"allowed must have shape \(2, 16\) with at least one"):
        pointing_game(maps, box, grid=GRID, image_size=SIZE, allowed=allowed[:, :4])
    with pytest.raises(ValueError, match="at least one True per row"):
        pointing_game(maps, box, grid=GRID, image_size=SIZE, allowed=allowed & False)
    with pytest.raises(TypeError, match=r"allowed must be a bool tensor, got torch\.float32"):
        pointing_game(maps, box, grid=GRID, image_size=SIZE, allowed=allowed.float())


def test_a_uniformly_random_pointer_scores_the_chance_level() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 4000
    xy = torch.randint(0, 30, (n, 2), generator=gen).float()
    boxes = torch.cat([xy, xy + 10], dim=1)  # 10 x 10 boxes anywhere
    maps = torch.rand(n, 16, generator=gen)  # the argmax is a uniformly random patch
    result = pointing_game(maps, boxes, grid=GRID, image_size=SIZE)
    # Binomial standard error sqrt(p(1-p)/n) <= 0.008; allow 4 of them.
    assert abs(result.score - result.chance) < 4 * math.sqrt(0.25 / n)
    assert result.area_fraction < result.chance  # dilation makes the game easier


def test_blind_rows_are_misses_and_ties_take_the_first_patch() -> None:
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).expand(2, 4)
    maps = torch.stack([torch.zeros(16), torch.full((16,), 1 / 16)])  # blind; uniform
    hits = pointing_hits(maps, box, grid=GRID, image_size=SIZE, dilation=0)
    assert hits.tolist() == [False, True]  # the uniform map "points" at patch 0


def test_empty_input_gives_nan() -> None:
    result = pointing_game(torch.zeros(0, 16), torch.zeros(0, 4), grid=GRID, image_size=SIZE)
    assert result.count == 0
    assert math.isnan(result.score)


def test_errors_name_the_argument() -> None:
    maps, boxes = torch.rand(3, 16), torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"maps must have shape \(n, i\) with i = gh·gw = 16"):
        pointing_game(torch.rand(3, 15), boxes, grid=GRID, image_size=SIZE)
    with pytest.raises(ValueError, match=r"boxes must have shape \(n, 4\) = \(3, 4\)"):
        pointing_game(maps, torch.zeros(2, 4), grid=GRID, image_size=SIZE)
    with pytest.raises(ValueError, match="grid must be a pair of positive ints"):
        pointing_game(maps, boxes, grid=(4,), image_size=SIZE)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dilation must be a non-negative number"):
        pointing_game(maps, boxes, grid=GRID, image_size=SIZE, dilation=-1)
    with pytest.raises(TypeError, match="maps must be a floating-point tensor, got dtype"):
        pointing_game(maps.long(), boxes, grid=GRID, image_size=SIZE)


def _tiny_vqa(**overrides: object):
    from xmodal.models.vqa import VQAConfig, VQAModel

    config = VQAConfig(
        dim=16,
        stem_channels=(4, 4, 4),
        image_layers=1,
        num_heads=2,
        ff_mult=1.0,
        mlp_hidden=8,
        **overrides,  # type: ignore[arg-type]
    )
    return VQAModel(config).eval()


def test_stem_patch_centers_match_the_conv_stem() -> None:
    from torch import nn

    from xmodal.pointing import stem_patch_centers

    # Three 3x3, stride-2, padding-1 convolutions that copy their centre tap: output cell
    # (r, c) then reads exactly one pixel, which must be the centre we claim.
    convs = [nn.Conv2d(1, 1, 3, stride=2, padding=1, bias=False) for _ in range(3)]
    for conv in convs:
        nn.init.zeros_(conv.weight)
        with torch.no_grad():
            conv.weight[0, 0, 1, 1] = 1.0
    stem = nn.Sequential(*convs)
    centers = stem_patch_centers((2, 2, 2), (10, 10))
    for cell in (0, 23, 99):
        x, y = (int(v - 0.5) for v in centers[cell])
        image = torch.zeros(1, 1, 75, 75)
        image[0, 0, y, x] = 1.0
        out = stem(image)[0, 0].flatten()  # (100,)
        assert out.argmax().item() == cell
        assert out.sum().item() == 1.0


def test_sort_of_clevr_pointing_runs_and_reports_the_documented_keys() -> None:
    from xmodal.data.sort_of_clevr import generate
    from xmodal.pointing import sort_of_clevr_pointing

    data = generate(3, seed=0)
    model = _tiny_vqa()
    result = sort_of_clevr_pointing(model, data, batch_size=7, selection_images=2)
    assert result["pointing_game_count"] == 30  # 10 non-relational questions per image
    table = result["pointing_game_table"]
    # (layer0, layer1) x (color, words) x (mean, max, head0, head1) + rollout x 2 x (mean, max)
    assert len(table) == 2 * 2 * 4 + 2 * 2
    assert result["pointing_game_choice"] in table
    assert result["pointing_game"] == table[result["pointing_game_choice"]]
    assert result["pointing_game_selection"].startswith("best of 20 on 2 images of seed 2")
    assert result["pointing_game_any_object"] >= result["pointing_game"]
    for key in ("pointing_game", "pointing_game_chance", "pointing_game_accuracy"):
        assert 0.0 <= result[key] <= 1.0
    assert result["pointing_game_area_fraction"] == pytest.approx(121 / 75**2)
    assert result["pointing_game_area_fraction"] < result["pointing_game_chance"]
    given = sort_of_clevr_pointing(model, data, choice="layer1/words/head0")
    assert given["pointing_game_selection"] == "given"
    assert given["pointing_game"] == table["layer1/words/head0"]
    with pytest.raises(ValueError, match="choice must be 'auto' or one of"):
        sort_of_clevr_pointing(model, data, choice="layer9/color/mean")


def test_sort_of_clevr_pointing_chance_counts_only_foreground_for_a_masked_model() -> None:
    from xmodal.data.sort_of_clevr import generate
    from xmodal.pointing import sort_of_clevr_pointing

    data = generate(3, seed=0)
    plain = sort_of_clevr_pointing(_tiny_vqa(), data, choice="layer1/color/mean")
    masked = sort_of_clevr_pointing(
        _tiny_vqa(foreground_mask=True), data, choice="layer1/color/mean"
    )
    # About a quarter of the cells show an object, and one of six objects is named: a random
    # foreground patch hits far more often than a random patch of the whole grid.
    assert 0.05 < plain["pointing_game_chance"] < 0.2
    assert masked["pointing_game_chance"] > 1.5 * plain["pointing_game_chance"]  # 0.21 vs 0.11


def test_sort_of_clevr_pointing_finds_an_oracle_map(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose first layer looks exactly at the named object scores 100%."""
    from xmodal.attention import CrossModalAttention
    from xmodal.data.sort_of_clevr import generate
    from xmodal.pointing import sort_of_clevr_pointing, stem_patch_centers

    data = generate(2, seed=1)
    model = _tiny_vqa()
    centers = stem_patch_centers((2, 2, 2), (10, 10))  # (100, 2)
    targets = []  # the cell nearest the named object's centre, per non-relational question
    for q in range(len(data)):
        if data.relational[q]:
            continue
        color = int(data.questions[q, :6].argmax())
        xy = torch.as_tensor(data.object_center[data.image_index[q], color], dtype=torch.float64)
        targets.append(int(((centers - xy) ** 2).sum(1).argmin()))
    queue = list(targets)
    original = CrossModalAttention.forward

    def oracle(self, text, image=None, mask=None, *, need_weights=True, image_kv=None):
        out, weights = original(self, text, image, mask, need_weights=True, image_kv=image_kv)
        if self is model.cross_blocks[0].attn:
            fake = torch.zeros_like(weights)
            for row in range(fake.shape[0]):
                fake[row, :, :, queue.pop(0)] = 1.0
            weights = fake
        return out, weights

    monkeypatch.setattr(CrossModalAttention, "forward", oracle)
    # The nearest cell centre is at most 4 px off on each axis, inside the 11-px object even
    # without dilation.
    result = sort_of_clevr_pointing(
        model, data, batch_size=len(targets), dilation=0, choice="layer0/color/mean"
    )
    assert result["pointing_game_table"]["layer0/color/mean"] == 1.0
    assert result["pointing_game_table"]["layer0/words/max"] == 1.0
    assert result["pointing_game_table"]["layer0/color/head1"] == 1.0
    assert result["pointing_game_any_object"] == 1.0
    assert result["pointing_game_chance"] < 0.05  # 1 to 4 of 100 cells lie in the box


def test_pointing_table_markdown() -> None:
    from xmodal.pointing import pointing_table_markdown

    result = {
        "pointing_game": 0.9,
        "pointing_game_chance": 0.1,
        "pointing_game_area_fraction": 0.02,
        "pointing_game_choice": "layer0/color/mean",
        "pointing_game_selection": "given",
        "pointing_game_dilation": 1.0,
        "pointing_game_count": 10,
        "pointing_game_accuracy": 0.5,
        "pointing_game_table": {"layer0/color/mean": 0.9, "rollout/color/mean": 0.25},
    }
    lines = pointing_table_markdown(result).splitlines()
    assert lines[0] == "| map | color, mean of heads |"
    assert lines[2] == "| layer0 | **90.0%** |"
    assert lines[3] == "| rollout | 25.0% |"
    assert "chance (a random attendable patch, same rule) 10.0%" in lines[-1]
