"""Reading real LLaVA-format data: valid records become Samples, broken ones go to quarantine.

A file is either one JSON list of records (its first non-blank character is `[`) or JSONL (one
record per line). A record is a dict with:

- `id`: a string or an integer (kept as a string), unique in the file. A record without an id
  is accepted under the generated id `<file stem>-<index>` (0-based position in the file),
  since some public conversions omit it; quarantine reports name such records `#<index>`.
- `image` (optional): one path relative to `image_root`, to a file Pillow can decode. Records
  without it are text-only.
- `conversations`: a non-empty list of `{"from": "human" | "gpt", "value": str}` turns, human
  first, alternating, ending with gpt. With an image, the whole conversation holds exactly one
  `<image>` placeholder, in the first human turn; without one, none. A missing placeholder is
  not added: the record is quarantined (its author may have meant another layout).
- optional `kind` / `answer` (strings) and `choices` (list of strings), as synthetic records
  carry them.

Each skipped record gets one quarantine entry (file, record, field, reason) naming its first
problem; every accepted record is kept exactly as written. A later record whose id an accepted
record already holds is a duplicate. Paths that do not exist raise, with what to fix: the
stage stops rather than train on nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image

from vregion.data.records import IMAGE_PLACEHOLDER, Quarantine, Sample

ROLES = ("human", "gpt")


class RecordError(ValueError):
    """What is wrong with one record, and which field is to blame."""

    def __init__(self, reason: str, field: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.field = field


def load_llava_records(
    path: str | Path,
    image_root: str | Path | None,
    quarantine: Quarantine,
    length_fn: Callable[[Sample], int] | None = None,
    max_tokens: int | None = None,
    verify_images: bool = True,
) -> list[Sample]:
    """Valid records of one LLaVA-format file (JSON list or JSONL); the rest go to `quarantine`.

    `image_root` is the directory `image` paths are relative to (None only for text-only data).
    With `length_fn` and `max_tokens`, samples longer than `max_tokens` are quarantined, not
    truncated. With `verify_images`, every image is decoded once (slow on millions of images;
    a missing file is always caught).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"LLaVA records file {path} does not exist: fix the path (data.llava.train / "
            f"data.llava.eval in params.yaml), relative to the project root"
        )
    root = _check_image_root(image_root)
    image_errors: dict[Path, str | None] = {}  # images shared by many records are read once
    samples: list[Sample] = []
    ids: set[str] = set()
    for index, record, parse_error in _raw_records(path):
        name = _record_name(record, index)
        try:
            if parse_error is not None:
                raise RecordError(parse_error)
            sample = _to_sample(record, f"{path.stem}-{index}")
            _check_placeholders(sample)
            if sample.image is not None:
                _check_image(sample.image, root, image_errors, verify_images)
            if length_fn is not None and max_tokens is not None:
                length = length_fn(sample)
                if length > max_tokens:
                    raise RecordError(
                        f"too long: {length} tokens > max_tokens {max_tokens}", "conversations"
                    )
            if sample.id in ids:
                raise RecordError(f"duplicate id {sample.id!r}", "id")
        except RecordError as err:
            quarantine.add(path, name, err.reason, err.field)
            continue
        ids.add(sample.id)
        samples.append(sample)
    return samples


def _check_image_root(image_root: str | Path | None) -> Path | None:
    if image_root is None:
        return None
    root = Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"image root {root} is not a directory: fix data.llava.image_root in params.yaml "
            f"(the folder that the records' `image` paths are relative to)"
        )
    return root


def _raw_records(path: Path) -> Iterator[tuple[int, object, str | None]]:
    """(index, parsed record or None, parse error or None) for each record of the file."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            # One broken list spoils every record in it: nothing can be read, so stop.
            raise ValueError(
                f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
                f"fix the file or convert it to JSONL so broken records can be skipped one by one"
            ) from None
        for index, record in enumerate(records):
            yield index, record, None
        return
    index = 0
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield index, json.loads(line), None
        except json.JSONDecodeError as err:
            yield index, None, f"malformed JSON on line {line_no}: {err.msg} (column {err.colno})"
        index += 1


def _record_name(record: object, index: int) -> str:
    """The record's id for reports, or `#<index>` when it has no usable one."""
    if isinstance(record, dict) and _valid_id(record.get("id")):
        return str(record["id"])
    return f"#{index}"


def _valid_id(value: object) -> bool:
    # bool is an int subclass, but `true` is no id.
    return (isinstance(value, str) and value.strip() != "") or (
        isinstance(value, int) and not isinstance(value, bool)
    )


def _to_sample(record: object, generated_id: str) -> Sample:
    if not isinstance(record, dict):
        raise RecordError(f"not a JSON object but {type(record).__name__}")
    if "id" in record and not _valid_id(record["id"]):
        raise RecordError(
            f"id must be a non-empty string or an integer, got {record['id']!r}", "id"
        )
    image = record.get("image")
    if image is not None and not (isinstance(image, str) and image.strip()):
        raise RecordError(f"image must be one path string, got {image!r}", "image")
    _check_conversations(record.get("conversations"))
    for key in ("kind", "answer"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise RecordError(f"{key} must be a string, got {record[key]!r}", key)
    choices = record.get("choices")
    if choices is not None and not (
        isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)
    ):
        raise RecordError(
            f"choices must be a non-empty list of strings, got {choices!r}", "choices"
        )
    return Sample(
        id=str(record["id"]) if "id" in record else generated_id,
        image=image,
        conversations=record["conversations"],
        kind=record.get("kind"),
        answer=record.get("answer"),
        choices=choices,
    )


def _check_conversations(turns: object) -> None:
    if turns is None:
        raise RecordError("missing conversations", "conversations")
    if not isinstance(turns, list) or not turns:
        raise RecordError("conversations must be a non-empty list of turns", "conversations")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"turn {i} is not an object", "conversations")
        expected = ROLES[i % 2]
        if turn.get("from") != expected:
            raise RecordError(
                f"turn {i} is from {turn.get('from')!r}, expected {expected!r} "
                f"(human and gpt alternate, human first)",
                "conversations",
            )
        if not isinstance(turn.get("value"), str):
            raise RecordError(f"turn {i} has no string value", "conversations")
    if turns[-1]["from"] != "gpt":
        raise RecordError("the last turn is human: nothing to learn from", "conversations")


def _check_placeholders(sample: Sample) -> None:
    counts = [turn["value"].count(IMAGE_PLACEHOLDER) for turn in sample.conversations]
    total = sum(counts)
    if sample.image is None:
        if total:
            raise RecordError(
                f"{total} {IMAGE_PLACEHOLDER} placeholder(s) but no image", "conversations"
            )
        return
    if total != 1 or counts[0] != 1:
        where = "none" if total == 0 else f"{total}, first human turn has {counts[0]}"
        raise RecordError(
            f"an image needs exactly one {IMAGE_PLACEHOLDER} placeholder, in the first human "
            f"turn; found {where}",
            "conversations",
        )


def _check_image(
    rel_path: str, root: Path | None, cache: dict[Path, str | None], verify: bool
) -> None:
    if root is None:
        raise ValueError(
            f"records have images (e.g. {rel_path!r}) but no image root is set: "
            f"set data.llava.image_root in params.yaml"
        )
    path = root / rel_path
    if path not in cache:
        cache[path] = _image_problem(path, verify)
    if cache[path] is not None:
        raise RecordError(cache[path], "image")


def _image_problem(path: Path, verify: bool) -> str | None:
    """Why the image cannot be used, or None."""
    if not path.is_file():
        return f"image file {path} does not exist"
    if not verify:
        return None
    try:
        with Image.open(path) as image:
            image.verify()  # structure and checksums; catches most corruption cheaply
        with Image.open(path) as image:
            image.load()  # verify() misses truncated pixel data; decoding does not
    except Exception as err:  # Pillow raises many types for bad files
        return f"image file {path} cannot be read: {type(err).__name__}: {err}"
    return None
