"""Seeded synthetic visual QA: coloured shapes on a plain background, drawn with Pillow.

Every image is a `Scene` (a few non-overlapping objects, each a shape, a colour and a size) and
yields a short caption (for alignment), short-answer questions of fixed kinds (for tuning and
evaluation), and per-patch class labels (to pretrain a vision tower without the LLM).

Each question has a finite answer set (`choices`), so accuracy has a chance level, and answers
are balanced so that the question text alone predicts the answer no better than chance: the
answer is chosen first (the least used so far among those the scene supports, see
`AnswerBalancer`), then a question with that answer; yes/no relations come in swapped pairs.
The same seed gives byte-identical PNGs; nothing uses global random state.
"""

from __future__ import annotations

import hashlib
import json
import random
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from vregion.data.records import IMAGE_PLACEHOLDER, Sample, write_jsonl

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")
"""Colour names; class id of `COLORS[i]` in `patch_labels` is i + 1 (0 is background)."""
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
"""Shape names; class id of `SHAPES[i]` in `patch_labels` is i + 1 (0 is background)."""
SIZES: tuple[str, ...] = ("small", "large")
"""Size names; class id of `SIZES[i]` in `patch_labels` is i + 1 (0 is background)."""
POSITION_BINS = 8
"""Bins per axis of an object's centre in `patch_labels` (`center_x`, `center_y`): bin b is class
b + 1 (0 is background). 8 bins of 8 px at 64 px: fine enough to order two objects that a
relation question calls clearly apart."""
KINDS: tuple[str, ...] = ("color", "shape", "count", "position", "relation", "size")
"""Question kinds, in the order they are reported."""
NUMBER_WORDS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six")
"""Answers of `count` questions (a scene holds at most six objects)."""

RGB: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 100, 240),
    "yellow": (240, 220, 40),
    "purple": (165, 70, 215),
    "white": (240, 240, 240),
}
BACKGROUND = (50, 50, 50)

# Object sides in pixels at 64 px; scaled linearly with image_size. The gap between the
# largest small and the smallest large object keeps `size` answerable by eye.
_SIDE_AT_64 = {"small": (12, 16), "large": (22, 28)}
_GAP = 2  # free pixels between objects, so they never touch
_MARGIN = 1  # free pixels between objects and the image border
_CLEAR = 0.15  # "clearly" left/right/above/below: centres this share of the side apart
_SCENE_ATTEMPTS = 60
_PLACE_ATTEMPTS = 40
_SPLIT_INDEX = {"train": 0, "eval": 1, "val": 2, "test": 3}
_CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "What is in this picture?",
    "Give a short description of the image.",
)


@dataclass
class SceneObject:
    """One shape drawn in a scene."""

    shape: str
    """One of SHAPES."""
    color: str
    """One of COLORS."""
    size: str
    """One of SIZES."""
    bbox: tuple[int, int, int, int]
    """(x0, y0, x1, y1) in pixels, x1 and y1 exclusive."""

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def name(self) -> str:
        """How questions refer to it; unique in its scene (colour-shape pairs never repeat)."""
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    """What one image shows: non-overlapping objects on a plain background."""

    image_size: int
    """Side of the square image in pixels."""
    max_objects: int
    """The generator's limit; fixes the answer set of `count` questions."""
    objects: list[SceneObject] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        objects = [
            SceneObject(o["shape"], o["color"], o["size"], tuple(o["bbox"])) for o in d["objects"]
        ]
        return cls(
            image_size=int(d["image_size"]), max_objects=int(d["max_objects"]), objects=objects
        )


class Question(NamedTuple):
    """One short-answer question about a scene."""

    kind: str
    question: str
    answer: str
    choices: list[str]
    """Every answer this question can have (its chance level is 1 / len(choices))."""


# ---------------------------------------------------------------------------------------------
# Scenes


def generate_scenes(n: int, seed: int, image_size: int = 64, max_objects: int = 3) -> list[Scene]:
    """`n` random scenes; the same arguments always give the same scenes."""
    stream = _scene_stream(random.Random(seed), image_size, max_objects)
    return [next(stream) for _ in range(n)]


def _scene_stream(rng: random.Random, image_size: int, max_objects: int) -> Iterator[Scene]:
    """Endless scenes from one random stream (so duplicates can be replaced deterministically)."""
    if not 1 <= max_objects <= len(NUMBER_WORDS):
        raise ValueError(f"max_objects must be in 1..{len(NUMBER_WORDS)}, got {max_objects}")
    if image_size < 32:
        raise ValueError(
            f"image_size must be at least 32 px for shapes to stay recognisable, got {image_size}"
        )
    while True:
        yield _sample_scene(rng, image_size, max_objects)


def _sample_scene(rng: random.Random, image_size: int, max_objects: int) -> Scene:
    # The object count is drawn first and kept, so `count` answers stay uniform; crowded scenes
    # that do not fit are redrawn, in the end with small objects only.
    n = rng.randint(1, max_objects)
    for attempt in range(_SCENE_ATTEMPTS):
        objects = _place_objects(rng, n, image_size, small_only=attempt >= _SCENE_ATTEMPTS // 2)
        if objects is not None:
            return Scene(image_size=image_size, max_objects=max_objects, objects=objects)
    raise RuntimeError(f"cannot place {n} objects in {image_size} px: use fewer max_objects")


def _place_objects(
    rng: random.Random, n: int, image_size: int, small_only: bool
) -> list[SceneObject] | None:
    """Rejection sampling: each object goes where it overlaps nothing placed so far."""
    pairs = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)  # no repeated colour-shape
    objects: list[SceneObject] = []
    for color, shape in pairs:
        size = "small" if small_only else rng.choice(SIZES)
        side = rng.randint(*_side_range(size, image_size))
        for _ in range(_PLACE_ATTEMPTS):
            x0 = rng.randint(_MARGIN, image_size - _MARGIN - side)
            y0 = rng.randint(_MARGIN, image_size - _MARGIN - side)
            bbox = (x0, y0, x0 + side, y0 + side)
            if not any(_boxes_near(bbox, o.bbox, _GAP) for o in objects):
                objects.append(SceneObject(shape, color, size, bbox))
                break
        else:
            return None
    return objects


def _side_range(size: str, image_size: int) -> tuple[int, int]:
    lo, hi = _SIDE_AT_64[size]
    scale = image_size / 64
    return round(lo * scale), round(hi * scale)


def _boxes_near(a: tuple[int, ...], b: tuple[int, ...], gap: int) -> bool:
    """Whether two boxes overlap or come closer than `gap` pixels."""
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


# ---------------------------------------------------------------------------------------------
# Drawing


def render(scene: Scene, image_size: int | None = None) -> Image.Image:
    """The scene as an RGB image (`image_size` must match the scene's, if given)."""
    size = _check_size(scene, image_size)
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_shape(draw, obj.shape, obj.bbox, RGB[obj.color])
    return image


def object_masks(scene: Scene) -> np.ndarray:
    """Boolean masks (n_objects, S, S), each object drawn alone with the rendering code."""
    size = scene.image_size
    masks = np.zeros((len(scene.objects), size, size), dtype=bool)
    for i, obj in enumerate(scene.objects):
        mask = Image.new("L", (size, size), 0)
        _draw_shape(ImageDraw.Draw(mask), obj.shape, obj.bbox, 255)
        masks[i] = np.asarray(mask) > 0
    return masks


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, bbox: tuple[int, ...], fill) -> None:
    x0, y0, x1, y1 = bbox[0], bbox[1], bbox[2] - 1, bbox[3] - 1  # Pillow boxes are inclusive
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _check_size(scene: Scene, image_size: int | None) -> int:
    if image_size is not None and image_size != scene.image_size:
        raise ValueError(f"scene was generated for {scene.image_size} px, not {image_size} px")
    return scene.image_size


def patch_labels(
    scene: Scene, image_size: int | None = None, patch_size: int = 16, min_cover: float = 0.15
) -> dict[str, np.ndarray]:
    """Per-patch class ids for `color`, `shape`, `size` and where the object's centre lies
    (`center_x`, `center_y`: `POSITION_BINS` bins per axis), flat in row-major (ViT) patch order.

    A patch takes the classes of the object covering most of its pixels; it is background (0)
    when that object covers less than `min_cover` of the patch, unless the patch holds at least
    a quarter of the object: a small object split over four patches must not vanish. Every
    patch of an object carries the object's centre, not its own place: a question about where
    "the red circle" is can then read the answer off any of the circle's patches.
    """
    size = _check_size(scene, image_size)
    if size % patch_size:
        raise ValueError(f"image_size {size} is not a multiple of patch_size {patch_size}")
    grid = size // patch_size
    names = ("color", "shape", "size", "center_x", "center_y")
    labels = {k: np.zeros(grid * grid, dtype=np.int64) for k in names}
    if not scene.objects:
        return labels
    masks = object_masks(scene)
    cover = masks.reshape(len(masks), grid, patch_size, grid, patch_size).sum(axis=(2, 4))
    cover = cover.reshape(len(masks), grid * grid)  # pixels of each object in each patch
    area = masks.reshape(len(masks), -1).sum(axis=1, keepdims=True)
    best = cover.argmax(axis=0)
    best_cover = cover[best, np.arange(grid * grid)]
    keep = (best_cover >= min_cover * patch_size**2) | (best_cover * 4 >= area[best, 0])
    keep &= best_cover > 0
    for name, classes, attr in (
        ("color", COLORS, "color"),
        ("shape", SHAPES, "shape"),
        ("size", SIZES, "size"),
    ):
        ids = np.array([classes.index(getattr(o, attr)) + 1 for o in scene.objects])
        labels[name] = np.where(keep, ids[best], 0).astype(np.int64)
    for name, axis in (("center_x", 0), ("center_y", 1)):
        ids = np.array([_position_bin(o.center[axis], size) + 1 for o in scene.objects])
        labels[name] = np.where(keep, ids[best], 0).astype(np.int64)
    return labels


def _position_bin(coordinate: float, image_size: int) -> int:
    return min(POSITION_BINS - 1, int(coordinate * POSITION_BINS / image_size))


# ---------------------------------------------------------------------------------------------
# Text about a scene


def caption(scene: Scene) -> str:
    """A short description, objects left to right, e.g. "A large red circle on the left and a
    small blue square on the right." (positions only up to three objects: under 30 words)."""
    objects = sorted(scene.objects, key=lambda o: o.center)
    if len(objects) <= 3:
        parts = [
            f"a {o.size} {o.color} {o.shape} {_place_phrase(o, scene.image_size)}" for o in objects
        ]
        text = _join(parts)
    else:
        parts = [f"a {o.size} {o.color} {o.shape}" for o in objects]
        text = f"{NUMBER_WORDS[len(objects) - 1]} objects: {_join(parts)}"
    return text[0].upper() + text[1:] + "."


def _place_phrase(obj: SceneObject, image_size: int) -> str:
    cx, cy = obj.center
    h = "left" if cx < 0.4 * image_size else "right" if cx > 0.6 * image_size else None
    v = "top" if cy < 0.4 * image_size else "bottom" if cy > 0.6 * image_size else None
    if h and v:
        return f"at the {v} {h}"
    if h:
        return f"on the {h}"
    if v:
        return f"at the {v}"
    return "in the middle"


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


class AnswerBalancer:
    """Keeps the answers of each kind balanced over many scenes.

    Scenes support answers unevenly (crowded scenes fall back to small objects, so "small" is
    available more often than "large"); drawing uniformly among available answers would leave
    a prior that a blind guesser could use. Instead each question takes the least used answer
    so far among those its scene supports (ties broken at random).
    """

    def __init__(self) -> None:
        self.used: Counter[tuple[str, str]] = Counter()

    def pick(self, candidates: list[Question], rng: random.Random) -> Question:
        answers = sorted({q.answer for q in candidates})
        fewest = min(self.used[(candidates[0].kind, a)] for a in answers)
        answer = rng.choice([a for a in answers if self.used[(candidates[0].kind, a)] == fewest])
        self.used[(candidates[0].kind, answer)] += 1
        return rng.choice([q for q in candidates if q.answer == answer])


def make_questions(
    scene: Scene, rng: random.Random, k: int, balancer: AnswerBalancer | None = None
) -> list[Question]:
    """Up to `k` questions of different kinds that the scene answers unambiguously.

    `count` is asked with the same probability in every scene (k / number of kinds), never as
    a filler: which other kinds are answerable depends on the object count, which would skew
    the `count` answers. The other kinds are drawn among those the scene supports. Pass one
    `balancer` for a whole split to balance answers across scenes; without it the answer is
    drawn uniformly among those the scene supports.
    """
    include_count = rng.random() < min(1.0, k / len(KINDS))
    candidates = {kind: _candidates(kind, scene) for kind in KINDS}
    others = [kind for kind in KINDS if kind != "count" and candidates[kind]]
    chosen = rng.sample(others, min(len(others), k - int(include_count)))
    if include_count:
        chosen.insert(rng.randrange(len(chosen) + 1), "count")
    balancer = balancer or AnswerBalancer()  # a fresh one draws uniformly among available
    return [balancer.pick(candidates[kind], rng) for kind in chosen]


def _candidates(kind: str, scene: Scene) -> list[Question]:
    """Every unambiguous question of `kind` about the scene (empty if it supports none)."""
    return _CANDIDATES[kind](scene)


def _color_questions(scene: Scene) -> list[Question]:
    shapes = Counter(o.shape for o in scene.objects)
    return [
        Question("color", f"What color is the {o.shape}?", o.color, list(COLORS))
        for o in scene.objects
        if shapes[o.shape] == 1
    ]


def _shape_questions(scene: Scene) -> list[Question]:
    colors = Counter(o.color for o in scene.objects)
    return [
        Question("shape", f"What shape is the {o.color} object?", o.shape, list(SHAPES))
        for o in scene.objects
        if colors[o.color] == 1
    ]


def _count_questions(scene: Scene) -> list[Question]:
    choices = list(NUMBER_WORDS[: scene.max_objects])
    answer = NUMBER_WORDS[len(scene.objects) - 1]
    return [Question("count", "How many objects are there?", answer, choices)]


def _position_questions(scene: Scene) -> list[Question]:
    # Only objects whose centre is clearly inside one half; the choices are the two named sides.
    half, clear = scene.image_size / 2, _CLEAR * scene.image_size
    out = []
    for o in scene.objects:
        cx, cy = o.center
        if abs(cx - half) >= clear:
            answer = "left" if cx < half else "right"
            q = f"Is the {o.name} on the left or the right?"
            out.append(Question("position", q, answer, ["left", "right"]))
        if abs(cy - half) >= clear:
            answer = "top" if cy < half else "bottom"
            q = f"Is the {o.name} at the top or the bottom?"
            out.append(Question("position", q, answer, ["top", "bottom"]))
    return out


def _relation_questions(scene: Scene) -> list[Question]:
    # Each clear relation between a and b yields two "yes" questions ("a left of b", "b right
    # of a") and their two swapped "no" twins, so no relation word hints at the answer.
    clear = _CLEAR * scene.image_size
    out = []
    for a in scene.objects:
        for b in scene.objects:
            (ax, ay), (bx, by) = a.center, b.center
            pairs = []  # (relation that holds for a to b, its converse)
            if bx - ax >= clear:
                pairs.append(("left of", "right of"))
            if by - ay >= clear:
                pairs.append(("above", "below"))
            if a.size == "large" and b.size == "small":
                pairs.append(("bigger than", "smaller than"))
            for rel, converse in pairs:
                out += [
                    _relation(a, rel, b, "yes"),
                    _relation(b, converse, a, "yes"),
                    _relation(b, rel, a, "no"),
                    _relation(a, converse, b, "no"),
                ]
    return out


def _relation(a: SceneObject, rel: str, b: SceneObject, answer: str) -> Question:
    return Question("relation", f"Is the {a.name} {rel} the {b.name}?", answer, ["yes", "no"])


def _size_questions(scene: Scene) -> list[Question]:
    return [
        Question("size", f"Is the {o.name} small or large?", o.size, list(SIZES))
        for o in scene.objects
    ]


_CANDIDATES = {
    "color": _color_questions,
    "shape": _shape_questions,
    "count": _count_questions,
    "position": _position_questions,
    "relation": _relation_questions,
    "size": _size_questions,
}


# ---------------------------------------------------------------------------------------------
# Writing a split


def split_seed(seed: int, split: str) -> int:
    """The seed of one split's random stream; different splits never share a stream."""
    index = _SPLIT_INDEX.get(split, zlib.crc32(split.encode()) + len(_SPLIT_INDEX))
    return seed * 1000003 + index


def pixel_hash(image: Image.Image) -> str:
    """SHA-256 of the raw pixels (equal pixels, equal hash, whatever the PNG encoder does)."""
    return hashlib.sha256(image.tobytes()).hexdigest()


def build_split(
    out_dir: str | Path,
    split: str,
    n_images: int,
    seed: int,
    image_size: int = 64,
    max_objects: int = 3,
    questions_per_image: int = 3,
    avoid_splits: Sequence[str] | None = None,
) -> dict:
    """Render one split and write its records; returns counts (images, questions per kind).

    Writes `images/<split>/<split>-NNNNNN.png`, `<split>/captions.jsonl` (one caption sample per
    image), `<split>/vqa.jsonl` (one sample per question) and `<split>/scenes.jsonl` (the scene,
    image path and pixel hash of each image), all under `out_dir`, with image paths relative to
    it. No image is repeated within the split, nor taken from `avoid_splits` (default: `train`
    for every other split; those splits must already be built): a repeat is replaced by the
    next scene of the stream, so the result stays deterministic.
    """
    out_dir = Path(out_dir)
    if avoid_splits is None:
        avoid_splits = () if split == "train" else ("train",)
    seen = _hashes_of_splits(out_dir, avoid_splits)
    rng_seed = split_seed(seed, split)
    scenes = _scene_stream(random.Random(rng_seed), image_size, max_objects)
    question_rng = random.Random(f"{rng_seed}:questions")
    balancer = AnswerBalancer()
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)

    captions: list[Sample] = []
    questions: list[Sample] = []
    scene_rows: list[str] = []
    replaced = 0
    for i in tqdm(range(n_images), desc=f"synthetic {split}", disable=None):
        scene, image, digest = _next_unseen(scenes, seen)
        replaced += digest[1]
        seen.add(digest[0])
        image_id = f"{split}-{i:06d}"
        rel_path = f"images/{split}/{image_id}.png"
        image.save(out_dir / rel_path, format="PNG")
        scene_rows.append(
            json.dumps(
                {"id": image_id, "image": rel_path, "pixel_sha256": digest[0], **scene.to_dict()}
            )
        )
        captions.append(_caption_sample(image_id, rel_path, scene, question_rng))
        for j, q in enumerate(make_questions(scene, question_rng, questions_per_image, balancer)):
            questions.append(_question_sample(f"{image_id}-q{j}", rel_path, q))

    write_jsonl(out_dir / split / "captions.jsonl", captions)
    write_jsonl(out_dir / split / "vqa.jsonl", questions)
    (out_dir / split / "scenes.jsonl").write_text("".join(row + "\n" for row in scene_rows))
    per_kind = Counter(s.kind for s in questions)
    return {
        "images": n_images,
        "captions": len(captions),
        "questions": len(questions),
        "replaced_duplicates": replaced,
        "per_kind": {kind: per_kind.get(kind, 0) for kind in KINDS},
    }


def build_synthetic(
    out_dir: str | Path,
    seed: int,
    train_images: int,
    eval_images: int,
    image_size: int = 64,
    max_objects: int = 3,
    questions_per_image: int = 3,
) -> dict[str, dict]:
    """The train split, then an eval split that shares no image with it; counts per split."""
    common = dict(
        image_size=image_size, max_objects=max_objects, questions_per_image=questions_per_image
    )
    return {
        "train": build_split(out_dir, "train", train_images, seed, **common),
        "eval": build_split(out_dir, "eval", eval_images, seed, **common),
    }


def read_scenes(path: str | Path) -> list[tuple[str, Scene]]:
    """(image path, scene) pairs of a `scenes.jsonl` written by `build_split`."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [(row["image"], Scene.from_dict(row)) for row in rows]


def _next_unseen(
    scenes: Iterator[Scene], seen: set[str]
) -> tuple[Scene, Image.Image, tuple[str, int]]:
    """The next scene whose image is not in `seen`; also (its hash, how many were skipped)."""
    skipped = 0
    while True:
        scene = next(scenes)
        image = render(scene)
        digest = pixel_hash(image)
        if digest not in seen:
            return scene, image, (digest, skipped)
        skipped += 1


def _hashes_of_splits(out_dir: Path, splits: Sequence[str]) -> set[str]:
    hashes: set[str] = set()
    for split in splits:
        path = out_dir / split / "scenes.jsonl"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: build split {split!r} first, so this split can avoid its images"
            )
        for line in path.read_text().splitlines():
            if line.strip():
                hashes.add(json.loads(line)["pixel_sha256"])
    return hashes


def _caption_sample(image_id: str, rel_path: str, scene: Scene, rng: random.Random) -> Sample:
    prompt = rng.choice(_CAPTION_PROMPTS)
    text = caption(scene)
    return Sample(
        id=f"{image_id}-cap",
        image=rel_path,
        conversations=_conversation(prompt, text),
        kind="caption",
        answer=text,
    )


def _question_sample(sample_id: str, rel_path: str, q: Question) -> Sample:
    return Sample(
        id=sample_id,
        image=rel_path,
        conversations=_conversation(q.question, q.answer),
        kind=q.kind,
        answer=q.answer,
        choices=list(q.choices),
    )


def _conversation(prompt: str, answer: str) -> list[dict[str, str]]:
    return [
        {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{prompt}"},
        {"from": "gpt", "value": answer},
    ]
