"""The one record format every data source is turned into: LLaVA-style conversations in JSONL.

A record is one image (or none) and a conversation of human/gpt turns; the first human turn
holds exactly one `<image>` placeholder when there is an image. Synthetic records also carry
their question `kind`, the gold `answer` and the answer `choices` of that kind, so evaluation
can score accuracy and chance level per kind. Anything that cannot be read is not a record: it
goes to the quarantine report with the file, the record id and the reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Sample:
    """One conversation about one image."""

    id: str
    """Unique within its file."""
    image: str | None
    """Image path, relative to the data set's image root (None for text-only records)."""
    conversations: list[dict[str, str]]
    """Turns `{"from": "human" | "gpt", "value": str}`, human first."""
    kind: str | None = None
    """Question kind for synthetic data (`color`, `shape`, ..., `caption`); None for real data."""
    answer: str | None = None
    """Gold short answer (the last gpt turn), for accuracy."""
    choices: list[str] | None = None
    """Every answer this question can have; 1/len(choices) is its chance level."""

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None})

    @classmethod
    def from_dict(cls, d: dict) -> Sample:
        return cls(
            id=str(d["id"]),
            image=d.get("image"),
            conversations=d["conversations"],
            kind=d.get("kind"),
            answer=d.get("answer"),
            choices=d.get("choices"),
        )


@dataclass
class QuarantineEntry:
    """A record that was skipped, and why."""

    file: str
    """The file the record came from."""
    record: str
    """Its id, or `#<index>` when it has none."""
    reason: str
    """What is wrong, naming the field."""
    field: str | None = None
    """The offending field, when one is to blame."""


@dataclass
class Quarantine:
    """Collects skipped records; written next to the data as a report."""

    entries: list[QuarantineEntry] = field(default_factory=list)

    def add(self, file: str | Path, record: str, reason: str, field: str | None = None) -> None:
        self.entries.append(QuarantineEntry(str(file), record, reason, field))

    def counts(self) -> dict[str, int]:
        """Skipped records per file."""
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.file] = out.get(e.file, 0) + 1
        return out

    def write(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {"skipped": len(self.entries), "entries": [asdict(e) for e in self.entries]},
                indent=2,
            )
            + "\n"
        )


def write_jsonl(path: str | Path, samples: Iterable[Sample]) -> int:
    """Write samples one per line; returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w") as f:
        for s in samples:
            f.write(s.to_json() + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> Iterator[Sample]:
    """Read samples written by write_jsonl (already validated: no quarantine here)."""
    with Path(path).open() as f:
        for line in f:
            if line.strip():
                yield Sample.from_dict(json.loads(line))
