"""Reading real LLaVA-format data: valid records become Samples, broken ones go to quarantine.

A file is either one JSON list of records (its first non-blank character is `[`) or JSONL (one
record per line), in UTF-8 without a byte-order mark. A record is a dict with:

- `id`: a string or an integer (kept as a string), unique in the file. A record without an id
  is accepted under the generated id `<file stem>-<index>` (0-based position in the file),
  since some public conversions omit it; quarantine reports name such records `#<index>`.
- `image` (optional): one path relative to `image_root`, to a file Pillow can read, that stays
  inside `image_root` (symlinks followed). Records without it are text-only; multi-image
  records (a list) are not supported.
- `conversations`: a non-empty list of `{"from": "human" | "gpt", "value": str}` turns, human
  first, alternating, ending with gpt. With an image, the whole conversation holds exactly one
  `<image>` placeholder, in the first human turn; without one, none. A missing placeholder is
  not added: the record is quarantined (its author may have meant another layout).
- optional `kind` / `answer` (strings) and `choices` (list of strings), as synthetic records
  carry them.

Each skipped record gets one quarantine entry (file, record, field, reason) naming its first
problem; every accepted record is kept exactly as written. A later record whose id an accepted
record already holds is a duplicate. Paths that do not exist raise FileNotFoundError, and a
file that yields nothing usable (not UTF-8, a BOM, broken JSON, a top-level object, no records,
every record quarantined) raises DataFileError, each with what to fix: the stage stops rather
than train on nothing.

Images are checked once per unique file, in parallel threads (Pillow releases the GIL while
reading): by default only the header (missing, non-image and truncated-header files), with
`full_decode` also the pixels (truncated pixel data). Header sizes are returned per sample so
token counts need no decoding.

The records file and the image root may be `s3://` URLs (`vregion.data.remote`): the records
object is read once, each image's header with a ranged GET, in place; a key outside the root's
prefix is "outside the image root" like a path outside a folder. A store that cannot be read
(unreachable, refused) stops validation with `RemoteDataError`; a missing key is a record's
problem and goes to quarantine.
"""

from __future__ import annotations

import codecs
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from vregion.data import images, remote
from vregion.data.records import IMAGE_PLACEHOLDER, Quarantine, Sample

ROLES = ("human", "gpt")
MULTI_IMAGE = (
    "image must be one path string: multi-image records (a list in `image`) are not "
    "supported; split them into one record per image"
)
_CHUNK = 4096  # paths per batch handed to the thread pool: bounds the futures held at once

ImageSize = tuple[int, int]
T = TypeVar("T")
R = TypeVar("R")


class DataFileError(ValueError):
    """A records file that yields no usable records as a whole, and what to do about it."""


class RecordError(ValueError):
    """What is wrong with one record, and which field is to blame."""

    def __init__(self, reason: str, field: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.field = field


@dataclass
class Validated:
    """The accepted records of one file, with what validating them cost."""

    samples: list[Sample]
    image_sizes: list[ImageSize | None]
    """(width, height) from the header of each sample's image, None for text-only samples."""
    records: int
    """Records read, accepted or not."""
    seconds: float
    """Wall time of reading and validating."""
    unique_images: int
    """Distinct image files checked."""

    @property
    def records_per_second(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else float("inf")


def validate_llava_file(
    path: str | Path,
    image_root: str | Path | None,
    quarantine: Quarantine,
    *,
    workers: int | None = None,
    full_decode: bool = False,
    length_fn: Callable[[Sample, ImageSize | None], int] | None = None,
    max_tokens: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    report_path: str | Path | None = None,
) -> Validated:
    """Valid records of one LLaVA-format file (JSON list or JSONL); the rest go to `quarantine`.

    `image_root`: the directory `image` paths are relative to (None only for text-only data).
    `workers`: threads checking images (None: ThreadPoolExecutor's default, min(32, cpus + 4);
    header reads mostly wait on storage). `full_decode`: decode every image, not just its
    header. `length_fn(sample, (width, height) or None)` with `max_tokens`: longer samples are
    quarantined, not truncated. `progress(done, total)` is called as images are checked.
    `report_path`: where the quarantine is written if every record fails, before DataFileError.
    """
    started = time.perf_counter()
    if remote.is_s3(path):  # read once into memory (records are small next to their images)
        path = remote.S3Object.parse(str(path))
        raw = _read_records(path, remote.read_bytes(path))
        root = _check_image_root(image_root)
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"LLaVA records file {path} does not exist: fix the path (data.llava.train / "
                f"data.llava.eval in params.yaml), relative to the project root"
            )
        root = _check_image_root(image_root)
        raw = _read_records(path, path.read_bytes())

    # Pass 1: each record's structure, in file order; images are only collected.
    checked: list[tuple[str, Sample | None, RecordError | None]] = []
    for index, (record, parse_error) in enumerate(raw):
        name = _record_name(record, index)
        try:
            if parse_error is not None:
                raise RecordError(parse_error)
            sample = _to_sample(record, f"{path.stem}-{index}")
            _check_placeholders(sample)
            if sample.image is not None and root is None:
                raise DataFileError(
                    f"{path}: records have images (e.g. {sample.image!r}) but no image root is "
                    f"set: set data.llava.image_root in params.yaml"
                )
        except RecordError as err:
            checked.append((name, None, err))
            continue
        checked.append((name, sample, None))

    # Images: resolve each distinct path string, then check each distinct file, in threads.
    rels = sorted({s.image for _, s, _ in checked if s is not None and s.image is not None})
    resolved = dict(zip(rels, _parallel(lambda r: _resolve(root, r), rels, workers), strict=True))
    files = sorted({p for p in resolved.values() if isinstance(p, Path | remote.S3Object)})
    check = _full_check if full_decode else _header_check
    results = dict(zip(files, _parallel(check, files, workers, progress), strict=True))

    # Pass 2: image results, length and duplicates, in file order.
    samples: list[Sample] = []
    sizes: list[ImageSize | None] = []
    ids: set[str] = set()
    for name, sample, error in checked:
        try:
            if error is not None:
                raise error
            assert sample is not None
            size = None
            if sample.image is not None:
                where = resolved[sample.image]
                if isinstance(where, str):  # shared by records: a fresh error for each
                    raise RecordError(where, "image")
                size, problem = results[where]
                if problem is not None:
                    raise RecordError(problem, "image")
            if length_fn is not None and max_tokens is not None:
                length = length_fn(sample, size)
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
        sizes.append(size)
    if not samples:
        _all_quarantined(path, quarantine, len(checked), report_path)
    return Validated(samples, sizes, len(checked), time.perf_counter() - started, len(files))


def load_llava_records(
    path: str | Path,
    image_root: str | Path | None,
    quarantine: Quarantine,
    length_fn: Callable[[Sample], int] | None = None,
    max_tokens: int | None = None,
    verify_images: bool = True,
    *,
    workers: int | None = None,
    report_path: str | Path | None = None,
) -> list[Sample]:
    """The samples of `validate_llava_file`, for callers whose `length_fn` takes the sample only.

    `verify_images`: decode every image (slow on millions of images); False reads only headers.
    """
    by_sample = None if length_fn is None else (lambda sample, _size: length_fn(sample))
    return validate_llava_file(
        path,
        image_root,
        quarantine,
        workers=workers,
        full_decode=verify_images,
        length_fn=by_sample,
        max_tokens=max_tokens,
        report_path=report_path,
    ).samples


def _check_image_root(image_root: str | Path | None) -> Path | remote.S3Object | None:
    if image_root is None:
        return None
    if remote.is_s3(image_root):
        prefix = remote.S3Object.parse(str(image_root))
        if not remote.exists_prefix(prefix):
            raise FileNotFoundError(
                f"image root {prefix} holds no object (bucket {prefix.bucket!r}, prefix "
                f"{prefix.key + '/'!r}): fix image_root in params.yaml"
            )
        return prefix
    root = Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"image root {root} is not a directory: fix data.llava.image_root in params.yaml "
            f"(the folder that the records' `image` paths are relative to)"
        )
    return root


def _read_records(path: Path | remote.S3Object, data: bytes) -> list[tuple[object, str | None]]:
    """(parsed record or None, parse error or None) for each record of the file `data`.

    Raises DataFileError when the file as a whole cannot hold records.
    """
    if data.startswith(codecs.BOM_UTF8):
        raise DataFileError(
            f"{path} starts with a UTF-8 byte-order mark (BOM), which JSON does not allow: "
            f"remove it, e.g. `sed -i '1s/^\\xEF\\xBB\\xBF//' {path}` or `python -c \"import "
            f"pathlib; p = pathlib.Path('{path}'); p.write_bytes(p.read_bytes()[3:])\"`"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        utf16 = " (it looks like UTF-16)" if data.startswith((b"\xff\xfe", b"\xfe\xff")) else ""
        raise DataFileError(
            f"{path} is not UTF-8{utf16}: byte offset {err.start} (line {line}) is "
            f"0x{data[err.start]:02x} ({err.reason}); re-encode the file as UTF-8, e.g. "
            f"`iconv -f <its encoding, e.g. LATIN1> -t UTF-8 {path} > {path.stem}.utf8"
            f"{path.suffix}`"
        ) from None
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            # One broken list spoils every record in it: nothing can be read, so stop.
            raise DataFileError(
                f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
                f"the file may be truncated: fix it or convert it to JSONL so broken records "
                f"can be skipped one by one"
            ) from None
        out = [(record, None) for record in records]
    else:
        if stripped.startswith("{"):
            _refuse_top_level_object(path, stripped)
        out = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append((json.loads(line), None))
            except json.JSONDecodeError as err:
                reason = f"malformed JSON on line {line_no}: {err.msg} (column {err.colno})"
                out.append((None, reason))
    if not out:
        raise DataFileError(
            f"{path} holds no records: it must be a JSON list of records or JSONL (one record "
            f"per line); check that the right file is configured and that it was fully written"
        )
    return out


def _refuse_top_level_object(path: Path, stripped: str) -> None:
    """Raise if the file is one JSON object (e.g. `{"data": [...]}`) rather than JSONL."""
    try:
        whole = json.loads(stripped)
    except json.JSONDecodeError:
        return  # JSONL with several lines, or broken lines to quarantine one by one
    if not isinstance(whole, dict):
        return
    lists = [
        k
        for k, v in whole.items()
        if k != "conversations" and isinstance(v, list) and v and isinstance(v[0], dict)
    ]
    if not lists and "\n" not in stripped:
        return  # JSONL of one record (broken ones are quarantined as such)
    key = lists[0] if lists else "<key>"
    raise DataFileError(
        f"{path} is one JSON object (keys: {', '.join(map(repr, list(whole)[:10]))}), not "
        f"records: the file must be a JSON list of records or JSONL (one record per line). "
        f'If the records are under a key, extract them, e.g. `python -c "import json; '
        f"json.dump(json.load(open('{path}'))['{key}'], open('records.json', 'w'))\"`"
    )


def _all_quarantined(
    path: Path, quarantine: Quarantine, records: int, report_path: str | Path | None
) -> None:
    first = "; ".join(f"{e.record}: {e.reason}" for e in quarantine.entries[-records:][:3])
    if report_path is not None:
        quarantine.write(report_path)
        where = f"Every reason is in {report_path}"
    else:
        where = "Every reason is in the stage's quarantine report (quarantine.json)"
    raise DataFileError(
        f"{path}: all {records} records were quarantined, none is usable. First reasons: "
        f"{first}. {where}"
    )


def _resolve(root: Path | remote.S3Object | None, rel: str) -> Path | remote.S3Object | str:
    """The real path of image `rel`, or why it may not be used."""
    assert root is not None
    try:
        return images.resolve_image(root, rel)
    except ValueError as err:  # OutsideRootError, or a NUL byte
        return str(err)


def _header_check(path: Path | remote.S3Object) -> tuple[ImageSize | None, str | None]:
    """(size, None) for a usable image, (None, why) otherwise; reads the header only.

    A store that cannot be reached (after its retries) is no fault of the record: it raises."""
    if isinstance(path, Path) and not path.is_file():
        return None, f"image file {path} does not exist"
    try:
        width, height, mode = images.image_header(path)
    except remote.MissingObjectError:
        return None, f"image file {path} does not exist"
    except remote.RemoteDataError:
        raise
    except Exception as err:  # Pillow raises many types for bad files
        return None, f"image file {path} cannot be read: {type(err).__name__}: {err}"
    if mode not in images.SUPPORTED_MODES:
        return None, f"image file {path} has mode {mode!r}, which cannot be converted to RGB"
    return (width, height), None


def _full_check(path: Path | remote.S3Object) -> tuple[ImageSize | None, str | None]:
    """As `_header_check`, then decode the pixels too (catches truncated pixel data)."""
    size, problem = _header_check(path)
    if problem is not None:
        return size, problem
    try:
        with images.open_image(path) as image:
            image.verify()  # structure and checksums; catches most corruption cheaply
        images.open_rgb(path)  # verify() misses truncated pixel data; decoding does not
    except remote.RemoteDataError:
        raise
    except Exception as err:
        return None, f"image file {path} cannot be read: {type(err).__name__}: {err}"
    return size, None


def _parallel(
    fn: Callable[[T], R],
    items: Sequence[T],
    workers: int | None,
    progress: Callable[[int, int], None] | None = None,
) -> list[R]:
    """fn over items in threads, results in order, in chunks so futures stay few."""
    if not items:
        return []
    results: list[R] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(items), _CHUNK):
            for result in pool.map(fn, items[start : start + _CHUNK]):
                results.append(result)
                if progress is not None:
                    progress(len(results), len(items))
    return results


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
    if isinstance(image, list):
        raise RecordError(f"{MULTI_IMAGE}; got {len(image)} paths", "image")
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
