"""Sort-of-CLEVR (Santoro et al. 2017): scenes, questions in words and in the paper's code.

Legend: ``n`` images, ``q`` questions per image (20), ``o`` objects per image (6), ``t`` words
per question, ``N = n·q`` questions in a split.

Each scene is a 75×75 RGB image on a white background with six objects, one per color in
:data:`COLORS` order, each a filled square (corners at centre ± 5 px) or a filled circle
(radius 5) with probability ½. Centres are integers drawn uniformly in ``[5, 70)`` on both axes
(``x`` to the right, ``y`` downwards) and redrawn until at least 10 px from every earlier centre.

Per image there are 10 non-relational and 10 relational questions, each about a uniformly drawn
color (subtypes drawn uniformly):

==========  =======  ============================================================  ===========
type        subtype  question                                                      answers
==========  =======  ============================================================  ===========
non-rel.    0        What is the shape of the red object?                          rectangle,
                                                                                   circle
non-rel.    1        Is the red object on the left?  (centre x < 37.5)             yes, no
non-rel.    2        Is the red object on the top?   (centre y < 37.5)             yes, no
relational  0        What is the shape of the object closest to the red object?    shape
relational  1        What is the shape of the object furthest from the red object? shape
relational  2        How many other objects have the shape of the red object?      0 … 5
==========  =======  ============================================================  ===========

Answers index :data:`ANSWERS` (``yes, no, rectangle, circle, 0 … 5``: a count ``c`` is index
``c + 4``, as the published generator writes it). The question code is the published 11-d
vector: 6 one-hot color, 2 one-hot (non-relational, relational), 3 one-hot subtype. Distances
are squared Euclidean between integer centres; ties go to the object earliest in color order,
as in the published generator.

A split is a :class:`SortOfClevr`; ``save``/``load`` use one ``.npz`` per split (the format is
in ``docs/sort_of_clevr.md``). Only ``images``, ``questions``, ``image_index`` and ``answers``
are required to load: words are rendered from the codes when ``question_text`` is missing.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xmodal.checkpoint import atomic_write_bytes

__all__ = [
    "ANSWERS",
    "COLORS",
    "COLOR_NAMES",
    "IMAGE_SIZE",
    "QUESTIONS_PER_IMAGE",
    "SUBTYPE_NAMES",
    "VOCAB",
    "SortOfClevr",
    "answer_questions",
    "code_to_text",
    "generate",
    "render_scene",
    "tokenize",
]

logger = logging.getLogger(__name__)

IMAGE_SIZE = 75
"""Images are ``IMAGE_SIZE × IMAGE_SIZE`` RGB."""
OBJECT_SIZE = 5
"""Half-width of a square, radius of a circle; also the margin of the centres."""
MIN_DISTANCE = 10
"""Every centre is at least this far (Euclidean, px) from every earlier one."""
NUM_OBJECTS = 6
QUESTIONS_PER_TYPE = 10
QUESTIONS_PER_IMAGE = 2 * QUESTIONS_PER_TYPE
CODE_SIZE = 11

COLOR_NAMES: tuple[str, ...] = ("red", "green", "blue", "orange", "gray", "yellow")
COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0),
    (0, 255, 0),
    (0, 0, 255),
    (255, 156, 0),
    (128, 128, 128),
    (255, 255, 0),
)
SHAPE_NAMES: tuple[str, ...] = ("rectangle", "circle")  # object_shape 0 / 1
ANSWERS: tuple[str, ...] = ("yes", "no", "rectangle", "circle", "0", "1", "2", "3", "4", "5")
SUBTYPE_NAMES: tuple[tuple[str, ...], ...] = (
    ("shape", "left", "top"),  # non-relational
    ("closest", "furthest", "count"),  # relational
)

_TEMPLATES: tuple[tuple[str, ...], ...] = (
    (
        "What is the shape of the {} object?",
        "Is the {} object on the left?",
        "Is the {} object on the top?",
    ),
    (
        "What is the shape of the object closest to the {} object?",
        "What is the shape of the object furthest from the {} object?",
        "How many other objects have the shape of the {} object?",
    ),
)


def tokenize(text: str) -> list[str]:
    """Split a question into lower-case words, with ``?`` as a word of its own."""
    return text.lower().replace("?", " ?").split()


def _build_vocab() -> tuple[str, ...]:
    words: list[str] = ["<pad>", "<unk>"]
    for templates in _TEMPLATES:
        for template in templates:
            for color in COLOR_NAMES:
                for word in tokenize(template.format(color)):
                    if word not in words:
                        words.append(word)
    return tuple(words)


VOCAB: tuple[str, ...] = _build_vocab()
"""Word vocabulary of the question templates; index 0 is padding, 1 an unknown word."""
_WORD_INDEX = {w: i for i, w in enumerate(VOCAB)}
MAX_QUESTION_WORDS = max(
    len(tokenize(t.format(c))) for ts in _TEMPLATES for t in ts for c in COLOR_NAMES
)


def encode_words(texts: np.ndarray | list[str], *, length: int = MAX_QUESTION_WORDS) -> np.ndarray:
    """Word ids ``(N, length)`` int64 of the questions, right-padded with ``0``.

    Unknown words map to ``1`` (``<unk>``); longer questions are truncated.
    """
    out = np.zeros((len(texts), length), dtype=np.int64)
    for row, text in enumerate(texts):
        ids = [_WORD_INDEX.get(w, 1) for w in tokenize(str(text))][:length]
        out[row, : len(ids)] = ids
    return out


def code_to_text(codes: np.ndarray) -> np.ndarray:
    """Render question codes ``(N, 11)`` as words: a ``(N,)`` array of strings."""
    color, relational, subtype = _decode(codes)
    return np.array(
        [
            _TEMPLATES[r][s].format(COLOR_NAMES[c])
            for c, r, s in zip(color.tolist(), relational.tolist(), subtype.tolist(), strict=True)
        ],
        dtype=str,
    )


def _decode(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(color, relational, subtype)`` int64 arrays ``(N,)`` from one-hot codes ``(N, 11)``."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != CODE_SIZE:
        raise ValueError(
            f"questions must have shape (N, {CODE_SIZE}) (6 color, 2 type, 3 subtype one-hot), "
            f"got shape {codes.shape}"
        )
    parts = (codes[:, :6], codes[:, 6:8], codes[:, 8:11])
    for name, part in zip(("color", "type", "subtype"), parts, strict=True):
        if not (np.isin(part, (0, 1)).all() and (part.sum(axis=1) == 1).all()):
            bad = int(np.flatnonzero(~(np.isin(part, (0, 1)).all(1) & (part.sum(1) == 1)))[0])
            raise ValueError(
                f"questions[{bad}] has a {name} part {part[bad].tolist()} that is not one-hot"
            )
    color, kind, subtype = (p.argmax(axis=1).astype(np.int64) for p in parts)
    return color, kind, subtype


def _encode(color: np.ndarray, relational: np.ndarray, subtype: np.ndarray) -> np.ndarray:
    codes = np.zeros((len(color), CODE_SIZE), dtype=np.float32)
    rows = np.arange(len(color))
    codes[rows, color] = 1.0
    codes[rows, 6 + relational] = 1.0
    codes[rows, 8 + subtype] = 1.0
    return codes


def render_scene(shapes: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Draw one scene: ``(75, 75, 3)`` uint8 RGB.

    Args:
        shapes: ``(6,)`` 0 = square, 1 = circle, in color order.
        centers: ``(6, 2)`` integer ``(x, y)`` centres.

    Objects are drawn in color order (a later one covers an earlier one where they touch). A
    square covers ``[c - 5, c + 5]`` on both axes; a circle the pixels with
    ``dx² + dy² <= 5·6`` (the filled midpoint circle of radius 5, as OpenCV draws it).
    """
    centers = np.asarray(centers)
    r = OBJECT_SIZE
    if centers.shape != (NUM_OBJECTS, 2) or centers.min() < r or centers.max() >= IMAGE_SIZE - r:
        raise ValueError(
            f"centers must be ({NUM_OBJECTS}, 2) integers in [{r}, {IMAGE_SIZE - r}), "
            f"got shape {centers.shape}"
        )
    img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 255, dtype=np.uint8)
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]  # (11, 11)
    disc = dx**2 + dy**2 <= r * (r + 1)
    for k in range(NUM_OBJECTS):
        x, y = (int(v) for v in centers[k])
        window = img[y - r : y + r + 1, x - r : x + r + 1]  # (11, 11, 3), a view
        if shapes[k] == 0:
            window[:] = COLORS[k]
        else:
            window[disc] = COLORS[k]
    return img


def answer_questions(
    shapes: np.ndarray,
    centers: np.ndarray,
    color: np.ndarray,
    relational: np.ndarray,
    subtype: np.ndarray,
) -> np.ndarray:
    """Answer indices ``(N,)`` for questions about one scene (see :data:`ANSWERS`)."""
    d2 = ((centers[:, None, :] - centers[None, :, :]) ** 2).sum(-1)  # (o, o) squared distances
    near = d2 + np.where(np.eye(NUM_OBJECTS, dtype=bool), 10**9, 0)
    closest, furthest = near.argmin(1), d2.argmax(1)  # (o,): argmin/argmax take the first tie
    same_shape = (shapes[:, None] == shapes[None, :]).sum(1) - 1  # (o,) other objects
    half = IMAGE_SIZE / 2
    table = np.array(
        [
            [
                2 + shapes,
                np.where(centers[:, 0] < half, 0, 1),
                np.where(centers[:, 1] < half, 0, 1),
            ],
            [2 + shapes[closest], 2 + shapes[furthest], 4 + same_shape],
        ],
        dtype=np.int64,
    )  # (2, 3, o): answer per type, subtype, color
    return table[relational, subtype, color]


@dataclass
class SortOfClevr:
    """One split of Sort-of-CLEVR. ``n`` images, ``N = 20·n`` questions (any ``N`` on load).

    Attributes:
        images: ``(n, 75, 75, 3)`` uint8 RGB.
        questions: ``(N, 11)`` float32 one-hot codes (color, type, subtype).
        question_text: ``(N,)`` str, the question in words.
        image_index: ``(N,)`` int64, which image each question is about.
        answers: ``(N,)`` int64 indices into :data:`ANSWERS`.
        relational: ``(N,)`` bool.
        subtype: ``(N,)`` int64 in ``0..2`` (see :data:`SUBTYPE_NAMES`).
        object_shape: ``(n, 6)`` int64, 0 square / 1 circle, in color order; ``None`` if unknown.
        object_center: ``(n, 6, 2)`` int64 ``(x, y)``; ``None`` if unknown.
    """

    images: np.ndarray
    questions: np.ndarray
    question_text: np.ndarray
    image_index: np.ndarray
    answers: np.ndarray
    relational: np.ndarray
    subtype: np.ndarray
    object_shape: np.ndarray | None = None
    object_center: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.answers)

    @property
    def num_images(self) -> int:
        return len(self.images)

    def grouped_by_image(self) -> bool:
        """Whether question ``j`` is about image ``j // 20`` (the layout :func:`generate` makes)."""
        n = self.num_images
        return len(self) == n * QUESTIONS_PER_IMAGE and bool(
            (self.image_index == np.repeat(np.arange(n), QUESTIONS_PER_IMAGE)).all()
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the split to one ``.npz`` (uncompressed; atomically: temp file + rename)."""
        path = Path(path)
        arrays = {
            "images": self.images,
            "questions": self.questions,
            "question_text": np.asarray(self.question_text, dtype=str),
            "image_index": self.image_index,
            "answers": self.answers,
            "relational": self.relational,
            "subtype": self.subtype,
        }
        if self.object_shape is not None and self.object_center is not None:
            arrays["object_color"] = np.broadcast_to(
                np.arange(NUM_OBJECTS, dtype=np.int64), self.object_shape.shape
            ).copy()
            arrays["object_shape"] = self.object_shape
            arrays["object_center"] = self.object_center
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SortOfClevr:
        """Read a split written by :meth:`save` or converted from another generator.

        Required arrays: ``images`` (uint8 ``(n, 75, 75, 3)``, or float in ``[0, 1]``),
        ``questions`` ``(N, 11)``, ``image_index`` ``(N,)``, ``answers`` ``(N,)``. Missing
        ``question_text`` is rendered from the codes; ``relational`` and ``subtype`` are always
        re-derived from the codes (and checked against the file's, if present).
        """
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("images", "questions", "image_index", "answers") if k not in z]
            if missing:
                raise ValueError(
                    f"{path} lacks the required array(s) {missing}; found {sorted(z.files)}"
                )
            data = {k: z[k] for k in z.files}
        images = data["images"]
        if images.dtype != np.uint8:
            if images.max() <= 1.0:
                images = images * 255.0
            images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
        if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(
                f"images in {path} must have shape (n, {IMAGE_SIZE}, {IMAGE_SIZE}, 3), "
                f"got {images.shape}"
            )
        questions = data["questions"].astype(np.float32)
        _color, relational, subtype = _decode(questions)
        for name, derived in (("relational", relational), ("subtype", subtype)):
            if name in data and not (data[name].astype(np.int64) == derived).all():
                raise ValueError(f"{name} in {path} disagrees with the question codes")
        text = data.get("question_text")
        if text is None:
            text = code_to_text(questions)
        image_index = data["image_index"].astype(np.int64)
        answers = data["answers"].astype(np.int64)
        n_q = len(questions)
        for name, arr in (
            ("image_index", image_index),
            ("answers", answers),
            ("question_text", text),
        ):
            if arr.shape != (n_q,):
                raise ValueError(f"{name} in {path} must have shape ({n_q},), got {arr.shape}")
        if n_q and (image_index.min() < 0 or image_index.max() >= len(images)):
            raise ValueError(f"image_index in {path} must lie in [0, {len(images)})")
        if n_q and (answers.min() < 0 or answers.max() >= len(ANSWERS)):
            raise ValueError(f"answers in {path} must lie in [0, {len(ANSWERS)})")
        return cls(
            images=images,
            questions=questions,
            question_text=np.asarray(text, dtype=str),
            image_index=image_index,
            answers=answers,
            relational=relational.astype(bool),
            subtype=subtype,
            object_shape=data.get("object_shape"),
            object_center=data.get("object_center"),
        )


def _draw_centers(rng: np.random.Generator) -> np.ndarray:
    centers = np.zeros((NUM_OBJECTS, 2), dtype=np.int64)
    for k in range(NUM_OBJECTS):
        while True:
            c = rng.integers(OBJECT_SIZE, IMAGE_SIZE - OBJECT_SIZE, size=2)  # [5, 70)
            if k == 0 or (((centers[:k] - c) ** 2).sum(1) >= MIN_DISTANCE**2).all():
                break
        centers[k] = c
    return centers


def generate(num_images: int, *, seed: int) -> SortOfClevr:
    """Generate ``num_images`` scenes and their 20 questions each, reproducibly from ``seed``.

    Questions are grouped by image: the 10 non-relational, then the 10 relational questions
    of image 0, then image 1's, and so on.
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int):
        raise TypeError(f"num_images must be an int, got {type(num_images).__name__}")
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    rng = np.random.default_rng(seed)
    n, q = num_images, QUESTIONS_PER_IMAGE
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    shapes = np.empty((n, NUM_OBJECTS), dtype=np.int64)
    centers = np.empty((n, NUM_OBJECTS, 2), dtype=np.int64)
    color = rng.integers(0, NUM_OBJECTS, size=(n, q))
    relational = np.tile(np.repeat(np.array([0, 1]), QUESTIONS_PER_TYPE), (n, 1))  # (n, q)
    subtype = rng.integers(0, 3, size=(n, q))
    answers = np.empty((n, q), dtype=np.int64)
    for j in range(n):
        centers[j] = _draw_centers(rng)
        shapes[j] = (rng.random(NUM_OBJECTS) >= 0.5).astype(np.int64)  # 1 = circle
        images[j] = render_scene(shapes[j], centers[j])
        answers[j] = answer_questions(shapes[j], centers[j], color[j], relational[j], subtype[j])
    codes = _encode(color.reshape(-1), relational.reshape(-1), subtype.reshape(-1))  # (n·q, 11)
    return SortOfClevr(
        images=images,
        questions=codes,
        question_text=code_to_text(codes),
        image_index=np.repeat(np.arange(n, dtype=np.int64), q),
        answers=answers.reshape(-1),
        relational=relational.reshape(-1).astype(bool),
        subtype=subtype.reshape(-1).astype(np.int64),
        object_shape=shapes,
        object_center=centers,
    )
