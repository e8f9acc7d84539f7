"""LLaVA-format ingestion: every kind of broken record is quarantined with its reason, and
every valid record is kept exactly as written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vregion.data.llava_format import load_llava_records
from vregion.data.records import Quarantine, Sample


def _turns(*values: str) -> list[dict[str, str]]:
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(root / "ok.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(root / "sub" / "other.jpg")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    big = root / "big.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(big)
    (root / "truncated.png").write_bytes(big.read_bytes()[:300])
    return root


VALID = [
    {
        "id": "good-image",
        "image": "ok.png",
        "conversations": _turns("<image>\nWhat is it?", "A red square."),
    },
    {"id": "good-text", "conversations": _turns("Say hi.", "Hi.")},
    {
        "id": "good-multiturn",
        "image": "sub/other.jpg",
        "conversations": _turns("What colour?\n<image>", "Blue.", "Sure?", "Yes."),
        "extra_field": "ignored",
    },
    {"id": 7, "image": "ok.png", "conversations": _turns("<image> Describe.", "Red.")},
    {
        "id": "good-synthetic",
        "image": "ok.png",
        "conversations": _turns("<image>\nWhat color?", "red"),
        "kind": "color",
        "answer": "red",
        "choices": ["red", "blue"],
    },
]

# (record, expected quarantine name, field, words in the reason)
BROKEN = [
    ([1, 2], "#{i}", None, "not a JSON object"),
    ({"id": "no-conv", "image": "ok.png"}, "no-conv", "conversations", "missing"),
    ({"id": "conv-str", "conversations": "hello"}, "conv-str", "conversations", "non-empty list"),
    ({"id": "conv-empty", "conversations": []}, "conv-empty", "conversations", "non-empty list"),
    (
        {"id": "turn-not-dict", "conversations": ["<image>", "x"]},
        "turn-not-dict",
        "conversations",
        "turn 0 is not an object",
    ),
    (
        {
            "id": "bad-role",
            "conversations": [{"from": "user", "value": "hi"}, {"from": "gpt", "value": "x"}],
        },
        "bad-role",
        "conversations",
        "turn 0 is from 'user'",
    ),
    (
        {
            "id": "gpt-first",
            "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}],
        },
        "gpt-first",
        "conversations",
        "expected 'human'",
    ),
    (
        {
            "id": "not-alternating",
            "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}],
        },
        "not-alternating",
        "conversations",
        "turn 1 is from 'human'",
    ),
    (
        {"id": "ends-human", "conversations": _turns("a", "b", "c")},
        "ends-human",
        "conversations",
        "last turn",
    ),
    (
        {
            "id": "value-int",
            "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}],
        },
        "value-int",
        "conversations",
        "no string value",
    ),
    ({"id": "", "conversations": _turns("a", "b")}, "#{i}", "id", "non-empty string"),
    ({"id": 1.5, "conversations": _turns("a", "b")}, "#{i}", "id", "non-empty string"),
    ({"id": True, "conversations": _turns("a", "b")}, "#{i}", "id", "non-empty string"),
    (
        {"id": "image-list", "image": ["ok.png"], "conversations": _turns("<image>\nx", "y")},
        "image-list",
        "image",
        "one path string",
    ),
    (
        {"id": "image-missing", "image": "nope.png", "conversations": _turns("<image>\nx", "y")},
        "image-missing",
        "image",
        "does not exist",
    ),
    (
        {"id": "image-corrupt", "image": "corrupt.png", "conversations": _turns("<image>\nx", "y")},
        "image-corrupt",
        "image",
        "cannot be read",
    ),
    (
        {
            "id": "image-truncated",
            "image": "truncated.png",
            "conversations": _turns("<image>\nx", "y"),
        },
        "image-truncated",
        "image",
        "cannot be read",
    ),
    (
        {"id": "no-placeholder", "image": "ok.png", "conversations": _turns("What is it?", "y")},
        "no-placeholder",
        "conversations",
        "exactly one <image>",
    ),
    (
        {
            "id": "two-placeholders",
            "image": "ok.png",
            "conversations": _turns("<image><image>\nx", "y"),
        },
        "two-placeholders",
        "conversations",
        "found 2",
    ),
    (
        {
            "id": "late-placeholder",
            "image": "ok.png",
            "conversations": _turns("x", "y", "<image>\nz", "w"),
        },
        "late-placeholder",
        "conversations",
        "first human turn has 0",
    ),
    (
        {"id": "placeholder-no-image", "conversations": _turns("<image>\nx", "y")},
        "placeholder-no-image",
        "conversations",
        "but no image",
    ),
    (
        {"id": "too-long", "conversations": _turns("word " * 200, "y")},
        "too-long",
        "conversations",
        "too long",
    ),
    (
        {"id": "kind-int", "conversations": _turns("a", "b"), "kind": 3},
        "kind-int",
        "kind",
        "must be a string",
    ),
    (
        {"id": "choices-str", "conversations": _turns("a", "b"), "choices": "red"},
        "choices-str",
        "choices",
        "list of strings",
    ),
    (
        {"id": "good-text", "conversations": _turns("Again.", "Hi.")},
        "good-text",
        "id",
        "duplicate id",
    ),
]


def _word_count(sample: Sample) -> int:
    return sum(len(t["value"].split()) for t in sample.conversations)


def _load(path: Path, image_root: Path) -> tuple[list[Sample], Quarantine]:
    quarantine = Quarantine()
    samples = load_llava_records(
        path, image_root, quarantine, length_fn=_word_count, max_tokens=100
    )
    return samples, quarantine


def _interleave() -> list[tuple[object, dict | None]]:
    """Valid and broken records mixed, valid ones first (so the duplicate comes later)."""
    return [(r, None) for r in VALID] + [(b[0], {"broken": b}) for b in BROKEN]


def _assert_result(
    samples: list[Sample], quarantine: Quarantine, path: Path, records: list
) -> None:
    assert [s.id for s in samples] == [
        "good-image",
        "good-text",
        "good-multiturn",
        "7",
        "good-synthetic",
    ]
    for sample, record in zip(samples, VALID, strict=True):
        assert sample.image == record.get("image")
        assert sample.conversations == record["conversations"]  # unchanged, not normalised
        assert (sample.kind, sample.answer, sample.choices) == (
            record.get("kind"),
            record.get("answer"),
            record.get("choices"),
        )
    entries = {e.record: e for e in quarantine.entries}
    assert len(quarantine.entries) == len(BROKEN)
    for index, (_, meta) in enumerate(records):
        if meta is None:
            continue
        _, name, field, words = meta["broken"]
        entry = entries[name.format(i=index)]
        assert entry.file == str(path)
        assert entry.field == field, (name, entry)
        assert words in entry.reason, (name, entry.reason)


def test_jsonl_quarantines_each_broken_record_and_keeps_valid_ones(tmp_path, image_root):
    records = _interleave()
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(r) for r, _ in records]
    path.write_text("\n".join(lines) + "\n\n")  # a blank line is no record
    samples, quarantine = _load(path, image_root)
    _assert_result(samples, quarantine, path, records)


def test_json_list_quarantines_each_broken_record_and_keeps_valid_ones(tmp_path, image_root):
    records = _interleave()
    path = tmp_path / "data.json"
    path.write_text(json.dumps([r for r, _ in records], indent=2))
    samples, quarantine = _load(path, image_root)
    _assert_result(samples, quarantine, path, records)
    assert quarantine.counts() == {str(path): len(BROKEN)}


def test_malformed_jsonl_line_is_named_by_line_number(tmp_path, image_root):
    path = tmp_path / "data.jsonl"
    path.write_text(
        json.dumps(VALID[1])
        + "\n\n"
        + '{"id": "cut", "conversations": [\n'
        + json.dumps(VALID[0])
        + "\n"
    )
    samples, quarantine = _load(path, image_root)
    assert [s.id for s in samples] == ["good-text", "good-image"]
    (entry,) = quarantine.entries
    assert entry.record == "#1" and "line 3" in entry.reason and "malformed JSON" in entry.reason


def test_records_without_id_get_a_generated_one(tmp_path, image_root):
    path = tmp_path / "noid.jsonl"
    path.write_text(
        json.dumps({"conversations": _turns("a", "b")})
        + "\n"
        + json.dumps({"conversations": _turns("<image>\nc", "d")})
        + "\n"
    )
    samples, quarantine = _load(path, image_root)
    assert [s.id for s in samples] == ["noid-0"]
    (entry,) = quarantine.entries
    assert entry.record == "#1" and entry.field == "conversations"


def test_length_is_only_checked_with_both_length_fn_and_max_tokens(tmp_path, image_root):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"id": "long", "conversations": _turns("word " * 500, "y")}) + "\n")
    assert len(load_llava_records(path, image_root, Quarantine(), length_fn=_word_count)) == 1
    assert len(load_llava_records(path, image_root, Quarantine(), max_tokens=10)) == 1


def test_unverified_images_only_need_to_exist(tmp_path, image_root):
    path = tmp_path / "d.jsonl"
    rows = [
        {"id": "corrupt", "image": "corrupt.png", "conversations": _turns("<image>\nx", "y")},
        {"id": "missing", "image": "gone.png", "conversations": _turns("<image>\nx", "y")},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    quarantine = Quarantine()
    samples = load_llava_records(path, image_root, quarantine, verify_images=False)
    assert [s.id for s in samples] == ["corrupt"]
    assert [e.record for e in quarantine.entries] == ["missing"]


def test_wrong_paths_stop_with_what_to_fix(tmp_path, image_root):
    with pytest.raises(FileNotFoundError, match="does not exist: fix the path"):
        load_llava_records(tmp_path / "absent.json", image_root, Quarantine())
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(VALID[0]) + "\n")
    with pytest.raises(FileNotFoundError, match="image_root"):
        load_llava_records(path, tmp_path / "no-such-dir", Quarantine())
    with pytest.raises(ValueError, match="no image root is set"):
        load_llava_records(path, None, Quarantine())
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "a", "conversations": []},\n {"id": ]')
    with pytest.raises(ValueError, match=r"not valid JSON \(line 2"):
        load_llava_records(broken, image_root, Quarantine())


def test_text_only_data_needs_no_image_root(tmp_path):
    path = tmp_path / "text.jsonl"
    path.write_text(json.dumps(VALID[1]) + "\n")
    assert [s.id for s in load_llava_records(path, None, Quarantine())] == ["good-text"]
