"""The synthetic visual QA generator: determinism, drawing, labels, questions, splits."""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vregion.data import synthetic
from vregion.data.records import read_jsonl
from vregion.data.synthetic import (
    COLORS,
    KINDS,
    RGB,
    SHAPES,
    SIZES,
    AnswerBalancer,
    Scene,
    build_split,
    build_synthetic,
    caption,
    generate_scenes,
    make_questions,
    object_masks,
    patch_labels,
    render,
)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_same_seed_gives_identical_scenes_and_pngs():
    a, b = generate_scenes(20, seed=7), generate_scenes(20, seed=7)
    assert a == b
    assert [_png_bytes(render(s)) for s in a] == [_png_bytes(render(s)) for s in b]
    assert generate_scenes(20, seed=8) != a


@pytest.mark.parametrize("image_size", [64, 96, 128])
@pytest.mark.parametrize("max_objects", [1, 3, 6])
def test_scenes_are_valid(image_size, max_objects):
    scale = image_size / 64
    for scene in generate_scenes(60, seed=1, image_size=image_size, max_objects=max_objects):
        assert 1 <= len(scene.objects) <= max_objects
        pairs = [(o.color, o.shape) for o in scene.objects]
        assert len(set(pairs)) == len(pairs)  # every object has a unique name
        for o in scene.objects:
            x0, y0, x1, y1 = o.bbox
            assert 0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size
            side = x1 - x0
            assert side == y1 - y0
            lo, hi = (12, 16) if o.size == "small" else (22, 28)
            assert round(lo * scale) <= side <= round(hi * scale)
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                overlap_x = a.bbox[0] < b.bbox[2] and b.bbox[0] < a.bbox[2]
                overlap_y = a.bbox[1] < b.bbox[3] and b.bbox[1] < a.bbox[3]
                assert not (overlap_x and overlap_y)


def test_object_counts_are_uniform():
    counts = Counter(len(s.objects) for s in generate_scenes(3000, seed=2, max_objects=3))
    assert all(abs(counts[n] / 3000 - 1 / 3) < 0.04 for n in (1, 2, 3))


def test_render_draws_each_object_in_its_colour_on_the_background():
    for scene in generate_scenes(30, seed=3, max_objects=3):
        image = render(scene, 64)
        assert image.mode == "RGB" and image.size == (64, 64)
        pixels = np.asarray(image)
        masks = object_masks(scene)
        for obj, mask in zip(scene.objects, masks, strict=True):
            assert mask.sum() > 0.3 * (obj.bbox[2] - obj.bbox[0]) ** 2
            assert (pixels[mask] == RGB[obj.color]).all()
        background = ~masks.any(axis=0)
        assert (pixels[background] == synthetic.BACKGROUND).all()


def test_render_refuses_another_size():
    with pytest.raises(ValueError, match="64 px"):
        render(generate_scenes(1, seed=0)[0], 96)


@pytest.mark.parametrize("image_size,patch_size", [(64, 16), (64, 8), (128, 16)])
def test_patch_labels_mark_every_object_and_nothing_else(image_size, patch_size):
    grid = image_size // patch_size
    for scene in generate_scenes(40, seed=4, image_size=image_size, max_objects=3):
        labels = patch_labels(scene, image_size, patch_size)
        assert set(labels) == {"color", "shape", "size", "center_x", "center_y"}
        bins = range(synthetic.POSITION_BINS)
        for name, classes in (
            ("color", COLORS),
            ("shape", SHAPES),
            ("size", SIZES),
            ("center_x", bins),
            ("center_y", bins),
        ):
            assert labels[name].shape == (grid * grid,)
            assert labels[name].min() >= 0 and labels[name].max() <= len(classes)
        # Object patches carry every label, background patches none.
        is_object = labels["color"] > 0
        for name in ("shape", "size", "center_x", "center_y"):
            assert ((labels[name] > 0) == is_object).all(), name
        masks = object_masks(scene)
        for obj, mask in zip(scene.objects, masks, strict=True):
            color_id = COLORS.index(obj.color) + 1
            shape_id = SHAPES.index(obj.shape) + 1
            # Row-major patch order: patch (r, c) is index r * grid + c.
            cover = mask.reshape(grid, patch_size, grid, patch_size).sum(axis=(1, 3)).ravel()
            mine = (labels["color"] == color_id) & (labels["shape"] == shape_id)
            assert mine.any(), "a small object vanished from the labels"
            assert (cover[mine] > 0).all()
            assert (cover >= 0.5 * patch_size**2)[~mine].sum() == 0  # mostly covered => labelled
        assert (labels["color"] == 0).any()


def test_patch_labels_take_the_object_covering_most_of_the_patch():
    scene = Scene(
        image_size=64,
        max_objects=3,
        objects=[
            synthetic.SceneObject("square", "red", "large", (0, 0, 20, 20)),
            synthetic.SceneObject("square", "blue", "small", (22, 2, 34, 14)),
        ],
    )
    labels = patch_labels(scene, 64, 16)
    color = labels["color"].reshape(4, 4)
    assert color[0, 0] == COLORS.index("red") + 1  # 256 red pixels
    assert color[0, 1] == COLORS.index("blue") + 1  # 120 blue vs 64 red pixels
    assert color[1, 0] == COLORS.index("red") + 1  # 64 px = 25% of the patch
    assert color[1, 1] == 0  # 16 red pixels: 6% of the patch, 4% of the object
    assert color[0, 2] == 0  # 24 blue pixels: 9% of the patch, 17% of the object
    assert color[2:].sum() == 0


def test_patch_labels_give_every_patch_of_an_object_its_centre():
    # A large square across four patches, centred at (20, 44): bin 2 of 8 across, bin 5 down.
    # A small one at the top right, centred at (55, 9): bins 6 and 1.
    scene = Scene(
        image_size=64,
        max_objects=3,
        objects=[
            synthetic.SceneObject("square", "red", "large", (8, 32, 32, 56)),
            synthetic.SceneObject("square", "blue", "small", (49, 3, 61, 15)),
        ],
    )
    labels = patch_labels(scene, 64, 16)
    red = labels["color"] == COLORS.index("red") + 1
    blue = labels["color"] == COLORS.index("blue") + 1
    assert red.sum() == 4 and blue.sum() == 1
    assert (labels["center_x"][red] == 2 + 1).all() and (labels["center_y"][red] == 5 + 1).all()
    assert (labels["center_x"][blue] == 6 + 1).all() and (labels["center_y"][blue] == 1 + 1).all()
    assert (labels["center_x"][~(red | blue)] == 0).all()
    # The same object moved to the left half gets a different centre and the same colour.
    scene.objects[0].bbox = (0, 32, 24, 56)
    moved = patch_labels(scene, 64, 16)
    assert (moved["center_x"][moved["color"] == COLORS.index("red") + 1] == 1 + 1).all()


def test_captions_are_short_and_name_every_object():
    for max_objects in (3, 6):
        for scene in generate_scenes(100, seed=5, max_objects=max_objects):
            text = caption(scene)
            assert len(text.split()) < 30
            assert text[0].isupper() and text.endswith(".")
            for o in scene.objects:
                assert f"{o.size} {o.color} {o.shape}" in text
    assert caption(generate_scenes(3, seed=5)[0]) == caption(generate_scenes(3, seed=5)[0])


def _check_answer(scene: Scene, kind: str, question: str, answer: str) -> None:
    """An independent reading of the question against the scene."""
    objs = scene.objects
    half = scene.image_size / 2
    by_name = {f"{o.color} {o.shape}": o for o in objs}
    if kind == "color":
        shape = question.removeprefix("What color is the ").removesuffix("?")
        (obj,) = [o for o in objs if o.shape == shape]
        assert obj.color == answer
    elif kind == "shape":
        color = question.removeprefix("What shape is the ").removesuffix(" object?")
        (obj,) = [o for o in objs if o.color == color]
        assert obj.shape == answer
    elif kind == "count":
        assert synthetic.NUMBER_WORDS.index(answer) + 1 == len(objs)
    elif kind == "position":
        name = question.removeprefix("Is the ").split(" on the")[0].split(" at the")[0]
        cx, cy = by_name[name].center
        value, margin = (cx, "left") if "left" in question else (cy, "top")
        assert abs(value - half) >= 0.15 * scene.image_size  # unambiguous
        assert (answer == margin) == (value < half)
    elif kind == "relation":
        body = question.removeprefix("Is the ").removesuffix("?")
        for rel in ("left of", "right of", "above", "below", "bigger than", "smaller than"):
            if f" {rel} the " in body:
                a_name, b_name = body.split(f" {rel} the ")
                break
        a, b = by_name[a_name], by_name[b_name]
        (ax, ay), (bx, by) = a.center, b.center
        clear = 0.15 * scene.image_size
        truth = {
            "left of": bx - ax >= clear,
            "right of": ax - bx >= clear,
            "above": by - ay >= clear,
            "below": ay - by >= clear,
            "bigger than": a.size == "large" and b.size == "small",
            "smaller than": a.size == "small" and b.size == "large",
        }
        converse = {"left of": "right of", "above": "below", "bigger than": "smaller than"}
        converse.update({v: k for k, v in converse.items()})
        assert truth[rel] or truth[converse[rel]], "relation must be clear one way or the other"
        assert answer == ("yes" if truth[rel] else "no")
    elif kind == "size":
        name = question.removeprefix("Is the ").removesuffix(" small or large?")
        assert by_name[name].size == answer
    else:
        raise AssertionError(kind)


def test_questions_are_correct_distinct_and_in_their_choices():
    rng = random.Random(0)
    kinds_seen = Counter()
    for scene in generate_scenes(500, seed=6, max_objects=4):
        questions = make_questions(scene, rng, k=3)
        assert 1 <= len(questions) <= 3
        assert len({q.kind for q in questions}) == len(questions)
        for q in questions:
            assert q.answer in q.choices and q.answer == q.answer.lower() and " " not in q.answer
            _check_answer(scene, q.kind, q.question, q.answer)
            kinds_seen[q.kind] += 1
    assert set(kinds_seen) == set(KINDS)


def test_a_blind_guesser_stays_near_chance():
    """Majority answer per exact question text, learnt on one stream, scored on another."""

    def questions(seed: int, n: int) -> list:
        rng, balancer = random.Random(seed), AnswerBalancer()
        return [
            q
            for scene in generate_scenes(n, seed, max_objects=6)
            for q in make_questions(scene, rng, 3, balancer)
        ]

    train, held_out = questions(10, 4000), questions(11, 1500)
    by_text: dict[str, Counter] = defaultdict(Counter)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for q in train:
        by_text[q.question][q.answer] += 1
        by_kind[q.kind][q.answer] += 1
    for kind in KINDS:
        items = [q for q in held_out if q.kind == kind]
        guess = {
            q.question: (by_text.get(q.question) or by_kind[kind]).most_common(1)[0][0]
            for q in items
        }
        accuracy = sum(guess[q.question] == q.answer for q in items) / len(items)
        chance = sum(1 / len(q.choices) for q in items) / len(items)
        assert accuracy < chance + 0.06, f"{kind}: blind {accuracy:.3f} vs chance {chance:.3f}"
        shares = Counter(q.answer for q in train if q.kind == kind)
        assert max(shares.values()) / sum(shares.values()) < 1 / len(shares) + 0.03, kind


def test_build_split_writes_records_images_and_scenes(tmp_path: Path):
    counts = build_split(tmp_path, "train", 30, seed=0, questions_per_image=3)
    assert counts["images"] == 30 and counts["captions"] == 30
    assert counts["questions"] == sum(counts["per_kind"].values())
    assert set(counts["per_kind"]) == set(KINDS)

    captions = list(read_jsonl(tmp_path / "train" / "captions.jsonl"))
    vqa = list(read_jsonl(tmp_path / "train" / "vqa.jsonl"))
    assert len(captions) == 30 and len(vqa) == counts["questions"]
    ids = [s.id for s in captions + vqa]
    assert len(set(ids)) == len(ids)
    assert vqa[0].id.startswith("train-000000-q")
    for s in captions:
        assert s.kind == "caption" and s.conversations[1]["value"] == s.answer
    for s in captions + vqa:
        assert (tmp_path / s.image).is_file() and not Path(s.image).is_absolute()
        human, gpt = s.conversations
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt == {"from": "gpt", "value": s.answer}
    for s in vqa:
        assert s.kind in KINDS and s.answer in s.choices

    rows = [
        json.loads(line) for line in (tmp_path / "train" / "scenes.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 30
    scenes = synthetic.read_scenes(tmp_path / "train" / "scenes.jsonl")
    for row, (image_path, scene) in zip(rows, scenes, strict=True):
        on_disk = Image.open(tmp_path / image_path)
        assert on_disk.tobytes() == render(scene).tobytes()
        assert hashlib.sha256(on_disk.tobytes()).hexdigest() == row["pixel_sha256"]


def test_build_is_byte_identical_for_the_same_seed(tmp_path: Path):
    build_split(tmp_path / "a", "train", 12, seed=3)
    build_split(tmp_path / "b", "train", 12, seed=3)
    files = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )
    assert len(files) == 12 + 3
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def _pixel_hashes(out_dir: Path, split: str) -> list[str]:
    return [
        hashlib.sha256(Image.open(p).tobytes()).hexdigest()
        for p in sorted((out_dir / "images" / split).glob("*.png"))
    ]


def test_train_and_eval_share_no_image(tmp_path: Path):
    counts = build_synthetic(tmp_path, seed=0, train_images=200, eval_images=60, max_objects=1)
    train, held_out = _pixel_hashes(tmp_path, "train"), _pixel_hashes(tmp_path, "eval")
    assert len(train) == 200 and len(held_out) == 60
    assert not set(train) & set(held_out)
    assert len(set(held_out)) == 60
    assert counts["eval"]["images"] == 60


def test_eval_images_that_repeat_train_ones_are_replaced(tmp_path: Path, monkeypatch):
    # Give eval the train split's random stream: every image would repeat, so all are replaced.
    monkeypatch.setattr(synthetic, "split_seed", lambda seed, split: seed * 1000003)
    build_split(tmp_path, "train", 25, seed=0)
    counts = build_split(tmp_path, "eval", 10, seed=0)
    assert counts["replaced_duplicates"] >= 10
    held_out = _pixel_hashes(tmp_path, "eval")
    assert not set(_pixel_hashes(tmp_path, "train")) & set(held_out)
    assert len(set(held_out)) == 10


def test_eval_before_train_says_what_to_do(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="build split 'train' first"):
        build_split(tmp_path, "eval", 5, seed=0)


def test_split_seeds_differ():
    assert len({synthetic.split_seed(0, s) for s in ("train", "eval", "val", "test", "other")}) == 5
    assert synthetic.split_seed(1, "train") != synthetic.split_seed(0, "eval")
