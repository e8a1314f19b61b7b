"""Media-location masks: the three policies, no leakage from the future, mixed batches."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from reference import flamingo as ref

from xmodal import (
    MEDIA_POLICIES,
    GatedCrossAttentionBlock,
    media_attention_mask,
    media_locations_from_ids,
    visible_media_range,
)

IMG = 99  # the image token id used in these tests
D, E, N = 8, 6, 2  # text width, image width, tokens per medium


def _loc(*rows: str) -> torch.Tensor:
    """'.I.II' -> tensor([[False, True, False, True, True]])."""
    return torch.tensor([[c == "I" for c in row] for row in rows])


def _seen(mask: torch.Tensor, n: int = 1) -> list[list[list[int]]]:
    """For each row and token, the media indices it may see."""
    b, t, cols = mask.shape
    per_media = mask.reshape(b, t, cols // n, n).any(-1)
    return [[torch.nonzero(per_media[i, j]).flatten().tolist() for j in range(t)] for i in range(b)]


def test_policies_on_a_drawn_example() -> None:
    # tokens:  a  I0  b  I1  I2  c   (I2 follows I1 directly: one group for "grouped")
    loc = _loc(".I.II.")
    expected = {
        "immediate": [[], [0], [0], [1], [2], [2]],
        "all_previous": [[], [0], [0], [0, 1], [0, 1, 2], [0, 1, 2]],
        "grouped": [[], [0], [0], [1], [1, 2], [1, 2]],
    }
    for policy, seen in expected.items():
        mask = media_attention_mask(loc, 1, policy=policy)  # type: ignore[arg-type]
        assert _seen(mask) == [seen], policy


def test_columns_follow_the_flattened_media_order() -> None:
    loc = _loc("I.I.")
    mask = media_attention_mask(loc, 3)  # 2 media of 3 tokens -> 6 columns
    assert mask.shape == (1, 4, 6)
    assert mask[0, 1].tolist() == [True] * 3 + [False] * 3
    assert mask[0, 3].tolist() == [False] * 3 + [True] * 3


@pytest.mark.parametrize("policy", MEDIA_POLICIES)
def test_matches_reference_loops(policy: str) -> None:
    gen = torch.Generator().manual_seed(1)
    loc = torch.rand(5, 12, generator=gen) < 0.3
    loc[0] = False  # a row with no image
    loc[1, :3] = True  # back-to-back images at the start
    m = int(loc.sum(-1).max())
    got = media_attention_mask(loc, 2, num_media=m + 1, policy=policy)  # type: ignore[arg-type]
    assert torch.equal(got, ref.media_mask(loc, 2, m + 1, policy))


def test_visible_media_range_is_the_mask_in_ranges() -> None:
    loc = _loc("..I.II.I", "I.......")
    for policy in MEDIA_POLICIES:
        first, end = visible_media_range(loc, policy=policy)  # type: ignore[arg-type]
        mask = media_attention_mask(loc, 1, num_media=4, policy=policy)  # type: ignore[arg-type]
        cols = torch.arange(4)
        assert torch.equal(mask, (cols >= first[..., None]) & (cols < end[..., None]))


locations = st.integers(1, 3).flatmap(
    lambda b: st.integers(1, 9).flatmap(
        lambda t: st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=b, max_size=b)
    )
)


@given(rows=locations, policy=st.sampled_from(MEDIA_POLICIES))
@example(rows=[[True, False, False]], policy="immediate")  # image at position 0
@example(rows=[[False, True, True, False]], policy="grouped")  # back to back
@example(rows=[[False, False], [False, True]], policy="all_previous")  # none at all
def test_no_leakage_from_the_future(rows: list[list[bool]], policy: str) -> None:
    """Changing image k changes no token before image k's marker, under every policy."""
    loc = torch.tensor(rows)
    b, t = loc.shape
    m = max(1, int(loc.sum(-1).max()))
    mask = media_attention_mask(loc, N, num_media=m, policy=policy)  # type: ignore[arg-type]
    assert torch.equal(mask, ref.media_mask(loc, N, m, policy))

    torch.manual_seed(len(rows) * 31 + t)
    block = GatedCrossAttentionBlock(D, E, num_heads=2, head_dim=4, ff_mult=1, gate_init=1.0)
    text, media = torch.randn(b, t, D), torch.randn(b, m, N, E)
    out = block(text, media, mask)
    for row in range(b):
        positions = torch.nonzero(loc[row]).flatten().tolist()
        for k, pos in enumerate(positions):
            # the mask itself: no token before marker k sees a column of image k
            assert not mask[row, :pos, k * N : (k + 1) * N].any()
            changed = media.clone()
            changed[row, k] = torch.randn(N, E) * 10
            out2 = block(text, changed, mask)
            # every token before image k, in this row, is untouched -- bit for bit
            assert torch.equal(out2[row, :pos], out[row, :pos])
    # tokens that see no image pass through
    blind = ~mask.any(-1)
    assert torch.equal(out[blind], text[blind])


def test_mixed_batch_with_left_padding_equals_rows_alone() -> None:
    pad, a = 0, 5
    ids = torch.tensor(
        [
            [pad, pad, IMG, a, a, IMG, a],  # left padding, two images
            [IMG, a, a, a, a, a, a],  # one image at position 0
            [a, a, a, a, a, a, a],  # no image
        ]
    )
    loc = media_locations_from_ids(ids, IMG)
    counts = loc.sum(-1).tolist()
    block = GatedCrossAttentionBlock(D, E, num_heads=2, head_dim=4, ff_mult=1, gate_init=0.5)
    text, media = torch.randn(3, 7, D), torch.randn(3, 2, N, E)  # row 1 pads 1 slot, row 2 both
    for policy in MEDIA_POLICIES:
        mask = media_attention_mask(loc, N, num_media=2, policy=policy)  # type: ignore[arg-type]
        out = block(text, media, mask)
        for row, count in enumerate(counts):
            alone_mask = media_attention_mask(
                loc[row : row + 1],
                N,
                num_media=count,
                policy=policy,  # type: ignore[arg-type]
            )
            alone = block(text[row : row + 1], media[row : row + 1, :count], alone_mask)
            torch.testing.assert_close(out[row : row + 1], alone)
        assert torch.equal(out[2], text[2])  # the row without images passes through
        assert torch.equal(out[0, :2], text[0, :2])  # and so does the left padding


def test_media_locations_from_ids() -> None:
    ids = torch.tensor([[1, IMG, 2], [IMG, IMG, 3]])
    assert media_locations_from_ids(ids, IMG).tolist() == [
        [False, True, False],
        [True, True, False],
    ]


def test_num_media_default_and_padding_slots() -> None:
    loc = _loc("I.I.", "....")
    assert media_attention_mask(loc, 2).shape == (2, 4, 4)
    wide = media_attention_mask(loc, 2, num_media=3)
    assert wide.shape == (2, 4, 6)
    assert not wide[..., 4:].any()  # an unused media slot is never seen


def test_mask_builder_compiles_fullgraph() -> None:
    loc = _loc("I..II.", ".I....")
    fn = torch.compile(media_attention_mask, fullgraph=True, backend="eager")
    for policy in MEDIA_POLICIES:
        assert torch.equal(
            fn(loc, 2, num_media=3, policy=policy),
            media_attention_mask(loc, 2, num_media=3, policy=policy),  # type: ignore[arg-type]
        )


def test_errors_name_the_argument() -> None:
    loc = _loc("I.I.")
    with pytest.raises(ValueError, match=r"policy must be one of .* got 'previous'"):
        media_attention_mask(loc, 2, policy="previous")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"a row with 2 image markers, but num_media is 1"):
        media_attention_mask(loc, 2, num_media=1)
    with pytest.raises(ValueError, match=r"tokens_per_media must be positive, got 0"):
        media_attention_mask(loc, 0)
    with pytest.raises(TypeError, match=r"num_media must be an int or None, got float"):
        media_attention_mask(loc, 2, num_media=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"media_locations must have shape \(b, t\), got rank 1"):
        media_attention_mask(loc[0], 2)
    with pytest.raises(TypeError, match=r"media_locations must be boolean .* got dtype"):
        media_attention_mask(loc.float(), 2)
    with pytest.raises(TypeError, match=r"input_ids must be an integer tensor, got dtype"):
        media_locations_from_ids(torch.zeros(2, 3), IMG)
    with pytest.raises(TypeError, match=r"image_token_id must be an int, got str"):
        media_locations_from_ids(torch.zeros(2, 3, dtype=torch.long), "<image>")  # type: ignore[arg-type]


def test_interleaved_example_runs_and_the_mask_is_what_reaches_each_token(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import runpy
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "interleaved.py"
    runpy.run_path(str(example), run_name="__main__")
    out = capsys.readouterr().out
    assert out.count("policy = ") == len(MEDIA_POLICIES)
    assert "reached by img0,img1,img2" in out  # all_previous reaches every earlier image
    assert "differs from the mask" not in out
