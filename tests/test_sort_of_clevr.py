"""Sort-of-CLEVR generator: scenes, questions, answers, codes and the .npz format.

The answers are checked against a naive re-derivation from the object table (loops, no
vectorisation), and the drawing against pixel counts computed here from the specification.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xmodal.data import sort_of_clevr as soc
from xmodal.data.sort_of_clevr import ANSWERS, COLORS, SortOfClevr, generate


@pytest.fixture(scope="module")
def data() -> SortOfClevr:
    return generate(40, seed=3)


def test_published_constants() -> None:
    assert soc.COLOR_NAMES == ("red", "green", "blue", "orange", "gray", "yellow")
    assert COLORS == (
        (255, 0, 0),
        (0, 255, 0),
        (0, 0, 255),
        (255, 156, 0),
        (128, 128, 128),
        (255, 255, 0),
    )
    assert ANSWERS == ("yes", "no", "rectangle", "circle", "0", "1", "2", "3", "4", "5")
    assert ANSWERS.index("3") == 3 + 4  # the published generator writes count + 4


def test_arrays_shapes_and_dtypes(data: SortOfClevr) -> None:
    n, q = 40, 20
    assert data.images.shape == (n, 75, 75, 3)
    assert data.images.dtype == np.uint8
    assert data.questions.shape == (n * q, 11)
    assert data.questions.dtype == np.float32
    assert data.question_text.shape == (n * q,)
    assert data.answers.shape == (n * q,)
    assert data.answers.dtype == np.int64
    assert (data.image_index == np.repeat(np.arange(n), q)).all()
    assert data.object_shape is not None
    assert data.object_shape.shape == (n, 6)
    assert data.object_center is not None
    assert data.object_center.shape == (n, 6, 2)
    assert data.grouped_by_image()


def test_same_seed_same_data_and_other_seed_differs() -> None:
    a, b, c = generate(5, seed=7), generate(5, seed=7), generate(5, seed=8)
    assert np.array_equal(a.images, b.images)
    assert np.array_equal(a.answers, b.answers)
    assert not np.array_equal(a.images, c.images)


def test_centres_in_range_and_apart(data: SortOfClevr) -> None:
    centers = data.object_center
    assert centers is not None
    assert centers.min() >= 5
    assert centers.max() < 70
    for scene in centers:
        for k in range(6):
            for j in range(k):
                assert ((scene[k] - scene[j]) ** 2).sum() >= 100


def test_ten_non_relational_then_ten_relational_per_image(data: SortOfClevr) -> None:
    rel = data.relational.reshape(40, 20)
    assert not rel[:, :10].any()
    assert rel[:, 10:].all()
    assert set(np.unique(data.subtype)) == {0, 1, 2}


def _naive_answer(shapes: np.ndarray, centers: np.ndarray, color: int, rel: int, sub: int) -> int:
    me = centers[color]
    if not rel:
        if sub == 0:
            return 2 if shapes[color] == 0 else 3
        axis = 0 if sub == 1 else 1  # left: x; top: y
        return 0 if me[axis] < 75 / 2 else 1
    dists = [int(((me - c) ** 2).sum()) for c in centers]
    if sub == 2:
        return 4 + sum(1 for k in range(6) if k != color and shapes[k] == shapes[color])
    if sub == 0:
        others = [d if k != color else 10**9 for k, d in enumerate(dists)]
        target = others.index(min(others))
    else:
        target = dists.index(max(dists))
    return 2 if shapes[target] == 0 else 3


def test_answers_match_a_naive_rederivation(data: SortOfClevr) -> None:
    assert data.object_shape is not None
    assert data.object_center is not None
    for j in range(len(data)):
        img = data.image_index[j]
        color = int(data.questions[j, :6].argmax())
        rel = int(data.questions[j, 6:8].argmax())
        sub = int(data.questions[j, 8:].argmax())
        expected = _naive_answer(data.object_shape[img], data.object_center[img], color, rel, sub)
        assert data.answers[j] == expected, (j, data.question_text[j])


def test_counts_span_indices_4_to_9() -> None:
    d = generate(300, seed=0)
    counts = d.answers[d.relational & (d.subtype == 2)]
    assert counts.min() >= 4
    assert counts.max() <= 9
    assert set(np.unique(counts)) == set(range(4, 10))  # 0..5 other objects all occur


def test_codes_are_one_hot_and_match_the_words(data: SortOfClevr) -> None:
    q = data.questions
    assert (q[:, :6].sum(1) == 1).all()
    assert (q[:, 6:8].sum(1) == 1).all()
    assert (q[:, 8:].sum(1) == 1).all()
    assert set(np.unique(q)) == {0.0, 1.0}
    assert (q[:, 7].astype(bool) == data.relational).all()
    assert (q[:, 8:].argmax(1) == data.subtype).all()
    for code, text in zip(q[:50], data.question_text[:50], strict=True):
        assert soc.COLOR_NAMES[int(code[:6].argmax())] in text
    closest = np.array(["closest to the" in t for t in data.question_text])
    assert (closest == (data.relational & (data.subtype == 0))).all()
    left = np.array([t.endswith("on the left?") for t in data.question_text])
    assert (left == (~data.relational & (data.subtype == 1))).all()


def test_code_to_text_renders_every_template() -> None:
    codes = np.zeros((2, 11), dtype=np.float32)
    codes[0, [0, 6, 8]] = 1  # red, non-relational, shape
    codes[1, [5, 7, 9]] = 1  # yellow, relational, furthest
    assert soc.code_to_text(codes).tolist() == [
        "What is the shape of the red object?",
        "What is the shape of the object furthest from the yellow object?",
    ]


def test_drawing_follows_the_specification() -> None:
    # One square at (20, 30) and one circle at (50, 50), the rest far away; count pixels.
    shapes = np.array([0, 1, 0, 0, 0, 0])
    centers = np.array([[20, 30], [50, 50], [60, 10], [10, 10], [10, 60], [35, 8]])
    img = soc.render_scene(shapes, centers)
    red = (img == COLORS[0]).all(-1)
    ys, xs = np.nonzero(red)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (15, 25, 25, 35)  # x right, y down
    assert red.sum() == 121  # corners at centre +- 5 px, inclusive
    green = (img == COLORS[1]).all(-1)
    expected_disc = sum(1 for dx in range(-5, 6) for dy in range(-5, 6) if dx * dx + dy * dy <= 30)
    assert green.sum() == expected_disc
    assert green[50, 50]
    assert not green[45, 45]
    assert (img[0, 0] == 255).all()  # white background


def test_npz_round_trip(tmp_path: Path, data: SortOfClevr) -> None:
    path = tmp_path / "split.npz"
    data.save(path)
    back = SortOfClevr.load(path)
    for name in ("images", "questions", "question_text", "image_index", "answers", "subtype"):
        assert np.array_equal(getattr(back, name), getattr(data, name)), name
    assert np.array_equal(back.relational, data.relational)
    assert back.object_center is not None
    assert np.array_equal(back.object_center, data.object_center)
    assert [p.name for p in tmp_path.iterdir()] == ["split.npz"]  # no temp file left


def test_codes_only_file_renders_words(tmp_path: Path, data: SortOfClevr) -> None:
    # What a converted published-generator split looks like: float images, codes, no text.
    path = tmp_path / "published.npz"
    np.savez(
        path,
        images=data.images.astype(np.float64) / 255.0,
        questions=data.questions.astype(np.float64),
        image_index=data.image_index,
        answers=data.answers,
    )
    back = SortOfClevr.load(path)
    assert np.array_equal(back.question_text, data.question_text)
    assert np.array_equal(back.images, data.images)
    assert back.object_shape is None


def test_load_names_missing_arrays(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((1, 75, 75, 3), np.uint8))
    with pytest.raises(
        ValueError, match=r"lacks the required array\(s\) \['questions', 'image_index', 'answers'\]"
    ):
        SortOfClevr.load(path)


def test_bad_codes_are_named(tmp_path: Path) -> None:
    codes = np.zeros((1, 11), dtype=np.float32)
    codes[0, [0, 1, 6, 8]] = 1  # two colors
    with pytest.raises(ValueError, match=r"questions\[0\] has a color part .* not one-hot"):
        soc.code_to_text(codes)
    with pytest.raises(ValueError, match=r"must have shape \(N, 11\).*got shape \(1, 10\)"):
        soc.code_to_text(np.zeros((1, 10)))


def test_generate_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="num_images must be >= 0, got -1"):
        generate(-1, seed=0)
    with pytest.raises(TypeError, match="num_images must be an int, got float"):
        generate(2.0, seed=0)  # type: ignore[arg-type]


def test_word_ids_pad_with_zero() -> None:
    ids = soc.encode_words(["Is the red object on the left?", "What is a zebra?"])
    assert ids.shape == (2, soc.MAX_QUESTION_WORDS)
    assert (ids[0, 8:] == 0).all()
    assert (ids[0, :8] > 1).all()
    assert ids[1, 2] == 1  # unknown word
