"""LLaVA-format ingestion: every kind of broken record is quarantined with its reason, and
every valid record is kept exactly as written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vregion.data import images
from vregion.data.llava_format import (
    DataFileError,
    load_llava_records,
    validate_llava_file,
)
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


def test_header_only_accepts_truncated_pixels_that_full_decode_quarantines(tmp_path, image_root):
    path = tmp_path / "d.jsonl"
    rows = [
        {"id": name, "image": image, "conversations": _turns("<image>\nx", "y")}
        for name, image in [
            ("ok", "ok.png"),
            ("corrupt", "corrupt.png"),
            ("missing", "gone.png"),
            ("truncated", "truncated.png"),
        ]
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    quarantine = Quarantine()
    samples = load_llava_records(path, image_root, quarantine, verify_images=False)
    assert [s.id for s in samples] == ["ok", "truncated"]  # the header of truncated.png is whole
    assert {e.record: e.reason for e in quarantine.entries}.keys() == {"corrupt", "missing"}
    assert "cannot be read" in quarantine.entries[0].reason
    full = Quarantine()
    result = validate_llava_file(path, image_root, full, full_decode=True)
    assert [s.id for s in result.samples] == ["ok"]
    reasons = {e.record: e.reason for e in full.entries}
    assert "cannot be read" in reasons["truncated"]


def test_wrong_paths_stop_with_what_to_fix(tmp_path, image_root):
    with pytest.raises(FileNotFoundError, match="does not exist: fix the path"):
        load_llava_records(tmp_path / "absent.json", image_root, Quarantine())
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(VALID[0]) + "\n")
    with pytest.raises(FileNotFoundError, match="image_root"):
        load_llava_records(path, tmp_path / "no-such-dir", Quarantine())
    with pytest.raises(DataFileError, match="no image root is set"):
        load_llava_records(path, None, Quarantine())
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "a", "conversations": []},\n {"id": ]')
    with pytest.raises(ValueError, match=r"not valid JSON \(line 2"):
        load_llava_records(broken, image_root, Quarantine())


def test_text_only_data_needs_no_image_root(tmp_path):
    path = tmp_path / "text.jsonl"
    path.write_text(json.dumps(VALID[1]) + "\n")
    assert [s.id for s in load_llava_records(path, None, Quarantine())] == ["good-text"]


# --- files that yield nothing: one DataFileError each, saying what to do --------------------


def _one_record_file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_non_utf8_file_names_the_byte_offset_and_says_re_encode(tmp_path, image_root):
    good = (json.dumps(VALID[1]) + "\n").encode()
    bad = json.dumps({"id": "x", "conversations": _turns("café", "y")}, ensure_ascii=False)
    bad = bad.encode("latin-1")
    path = _one_record_file(tmp_path, "latin1.jsonl", good + bad + b"\n")
    with pytest.raises(DataFileError) as err:
        load_llava_records(path, image_root, Quarantine())
    offset = len(good) + bad.index(b"\xe9")
    message = str(err.value)
    assert str(path) in message and f"byte offset {offset} (line 2)" in message
    assert "re-encode" in message and "UTF-8" in message


@pytest.mark.parametrize("suffix, body", [("jsonl", "{}\n"), ("json", "[{}]")])
def test_utf8_bom_says_remove_it(tmp_path, image_root, suffix, body):
    record = json.dumps(VALID[1])
    text = body.replace("{}", record)
    path = _one_record_file(tmp_path, f"bom.{suffix}", b"\xef\xbb\xbf" + text.encode())
    with pytest.raises(DataFileError, match="byte-order mark.*remove it.*sed -i"):
        load_llava_records(path, image_root, Quarantine())


def test_truncated_json_list_names_line_and_column(tmp_path, image_root):
    full = json.dumps([VALID[1], VALID[0]], indent=2)
    path = _one_record_file(tmp_path, "cut.json", full[: len(full) // 2].encode())
    with pytest.raises(DataFileError, match=r"not valid JSON \(line \d+, column \d+.*truncated"):
        load_llava_records(path, image_root, Quarantine())


@pytest.mark.parametrize("indent", [None, 2])
def test_top_level_object_says_extract_the_records(tmp_path, image_root, indent):
    text = json.dumps({"version": 1, "data": VALID[:2]}, indent=indent)
    path = _one_record_file(tmp_path, "wrapped.json", text.encode())
    with pytest.raises(DataFileError) as err:
        load_llava_records(path, image_root, Quarantine())
    message = str(err.value)
    assert "must be a JSON list of records or JSONL" in message
    assert "extract them" in message and "['data']" in message


@pytest.mark.parametrize("text", ["", "\n  \n", "[]", "[\n]\n"])
def test_file_without_records_raises(tmp_path, image_root, text):
    path = _one_record_file(tmp_path, "empty.jsonl", text.encode())
    with pytest.raises(DataFileError, match="holds no records"):
        load_llava_records(path, image_root, Quarantine())


def test_every_record_quarantined_raises_with_count_reasons_and_report(tmp_path, image_root):
    row = {"image": "gone.png", "conversations": _turns("<image>\nx", "y")}
    rows = [dict(row, id=f"r{i}") for i in range(5)]
    path = _one_record_file(
        tmp_path, "all-bad.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode()
    )
    report = tmp_path / "out" / "quarantine.json"
    quarantine = Quarantine()
    with pytest.raises(DataFileError) as err:
        validate_llava_file(path, image_root, quarantine, report_path=report)
    message = str(err.value)
    assert "all 5 records were quarantined" in message
    assert "r0: image file" in message and "does not exist" in message
    assert "r3:" not in message  # only the first few reasons
    assert str(report) in message and json.loads(report.read_text())["skipped"] == 5


# --- record-level checks ----------------------------------------------------------------------


@pytest.fixture
def outside_png(tmp_path: Path) -> Path:
    """A valid image just outside the image root, which no record may reach."""
    path = tmp_path / "secret.png"
    Image.new("RGB", (4, 4), (0, 255, 0)).save(path)
    return path


def _outside_refs(image_root: Path, outside_png: Path) -> dict[str, str]:
    (image_root / "link.png").symlink_to(outside_png)
    (image_root / "linkdir").symlink_to(outside_png.parent, target_is_directory=True)
    return {
        "dotdot": "../secret.png",
        "deep-dotdot": "sub/../../secret.png",
        "absolute": str(outside_png),
        "symlink": "link.png",
        "symlinked-dir": "linkdir/secret.png",
    }


@pytest.mark.parametrize("full_decode", [False, True])
def test_images_outside_the_root_are_quarantined_and_never_opened(
    tmp_path, image_root, outside_png, monkeypatch, full_decode
):
    refs = _outside_refs(image_root, outside_png)
    rows = [{"id": "inside", "image": "ok.png", "conversations": _turns("<image>\nx", "y")}]
    rows += [
        {"id": name, "image": rel, "conversations": _turns("<image>\nx", "y")}
        for name, rel in refs.items()
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    opened: list[str] = []
    real_pil_open, real_open = Image.open, open

    def pil_open(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_pil_open(fp, *args, **kwargs)

    def builtin_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(Image, "open", pil_open)
    monkeypatch.setattr("builtins.open", builtin_open)
    quarantine = Quarantine()
    result = validate_llava_file(path, image_root, quarantine, full_decode=full_decode)
    monkeypatch.undo()
    assert [s.id for s in result.samples] == ["inside"]
    assert {e.record for e in quarantine.entries} == set(refs)
    for entry in quarantine.entries:
        assert entry.field == "image" and "outside the image root" in entry.reason, entry
    assert any(p.endswith("ok.png") for p in opened)  # the recorder does see opens
    assert not [p for p in opened if "secret" in p], opened


def test_multi_image_record_is_quarantined_with_how_to_split(tmp_path, image_root):
    path = tmp_path / "multi.jsonl"
    rows = [
        VALID[0],
        {
            "id": "two",
            "image": ["ok.png", "sub/other.jpg"],
            "conversations": VALID[0]["conversations"],
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    quarantine = Quarantine()
    assert [s.id for s in load_llava_records(path, image_root, quarantine)] == ["good-image"]
    (entry,) = quarantine.entries
    assert entry.record == "two" and entry.field == "image"
    assert (
        "multi-image records (a list in `image`) are not supported; "
        "split them into one record per image"
    ) in entry.reason


# --- validation at scale --------------------------------------------------------------------


def test_each_unique_image_is_checked_once(tmp_path, image_root, monkeypatch):
    calls: list[Path] = []
    real_header = images.image_header
    monkeypatch.setattr(images, "image_header", lambda p: calls.append(p) or real_header(p))
    rows = [
        {"id": f"r{i}", "image": rel, "conversations": _turns("<image>\nx", "y")}
        for i, rel in enumerate(["ok.png", "ok.png", "./ok.png", "sub/other.jpg"])
    ]
    path = tmp_path / "shared.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = validate_llava_file(path, image_root, Quarantine(), workers=3)
    assert len(result.samples) == 4 and result.unique_images == 2
    assert sorted(p.name for p in calls) == ["ok.png", "other.jpg"]


def test_image_sizes_come_with_samples_and_reach_length_fn(tmp_path, image_root):
    Image.new("RGB", (40, 30)).save(image_root / "wide.png")
    rows = [
        {"id": "small", "image": "ok.png", "conversations": _turns("<image>\nx", "y")},
        {"id": "text", "conversations": _turns("x", "y")},
        {"id": "wide", "image": "wide.png", "conversations": _turns("<image>\nx", "y")},
    ]
    path = tmp_path / "sizes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []

    def length(sample: Sample, size: tuple[int, int] | None) -> int:
        seen.append((sample.id, size))
        return 0 if size is None else size[0] * size[1] // 16  # like image tokens per patch

    quarantine = Quarantine()
    result = validate_llava_file(path, image_root, quarantine, length_fn=length, max_tokens=10)
    assert [s.id for s in result.samples] == ["small", "text"]
    assert result.image_sizes == [(8, 8), None]
    assert seen == [("small", (8, 8)), ("text", None), ("wide", (40, 30))]
    (entry,) = quarantine.entries
    assert entry.record == "wide" and entry.field == "conversations"
    assert entry.reason == "too long: 75 tokens > max_tokens 10"


def test_two_thousand_records_sharing_fifty_images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(50):
        Image.new("RGB", (4 + i, 4), (i, 0, 0)).save(root / f"{i}.png")
    path = tmp_path / "many.jsonl"
    path.write_text(
        "".join(
            json.dumps(
                {"id": i, "image": f"{i % 50}.png", "conversations": _turns("<image>\nx", "y")}
            )
            + "\n"
            for i in range(2000)
        )
    )
    ticks: list[tuple[int, int]] = []
    result = validate_llava_file(
        path, root, Quarantine(), workers=4, progress=lambda d, t: ticks.append((d, t))
    )
    assert len(result.samples) == result.records == 2000 and result.unique_images == 50
    assert result.image_sizes[:2] == [(4, 4), (5, 4)]
    assert ticks[-1] == (50, 50) and len(ticks) == 50
    assert result.seconds > 0 and result.records_per_second == 2000 / result.seconds
    print(f"{result.records_per_second:.0f} records/s")
