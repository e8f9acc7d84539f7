"""Per-question results: what a model answered to each held-out question, so two runs can be
compared question by question (`vregion.eval.stats`).

One JSONL file per model and held-out set, one row per question:
`{"index", "id", "kind", "choice", "answer", "correct", "blind_choice", "blind_correct"}` -
the question's position in the set, its record id, its kind, the choice the model picked,
the gold answer, 1 if they match else 0, and the same for the blind control (images moved to
other questions). Rows are read back by id, so files written in any order line up.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vregion.data.records import Sample


def question_rows(
    samples: Sequence[Sample], predictions: Sequence[str], blind: Sequence[str] | None = None
) -> list[dict]:
    """One row per question (see module doc); `blind`: the blind control's choices, if any.

    A question is correct exactly when `accuracy_table` counts it so (choice == answer).
    """
    if blind is not None and len(blind) != len(samples):
        raise ValueError(f"{len(blind)} blind answers for {len(samples)} questions")
    rows = []
    for i, (s, p) in enumerate(zip(samples, predictions, strict=True)):
        row = {
            "index": i,
            "id": s.id,
            "kind": s.kind,
            "choice": p,
            "answer": s.answer,
            "correct": int(p == s.answer),
        }
        if blind is not None:
            row["blind_choice"] = blind[i]
            row["blind_correct"] = int(blind[i] == s.answer)
        rows.append(row)
    return rows


def _check_unique(ids: Sequence[str], where: str) -> None:
    seen: set[str] = set()
    dup = [i for i in ids if i in seen or seen.add(i)]
    if dup:
        raise ValueError(
            f"{where}: question ids must be unique to line runs up, repeated: {sorted(set(dup))[:5]}"
        )


def write_question_results(path: str | Path, rows: Sequence[dict]) -> Path:
    """`rows` (from `question_rows`) as JSONL at `path`, parent folders made."""
    path = Path(path)
    _check_unique([r["id"] for r in rows], str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def parse_question_results(text: str, where: str) -> list[dict]:
    """The rows of a per-question results file's text (e.g. from `git show REV:PATH`);
    `where` names the file in errors."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}, line {n}: not a JSON row ({e.msg})") from None
        if not isinstance(row, dict) or "id" not in row or "correct" not in row:
            raise ValueError(f"{where}, line {n}: a row needs `id` and `correct`")
        rows.append(row)
    _check_unique([r["id"] for r in rows], where)
    return rows


def read_question_results(path: str | Path) -> list[dict]:
    """The rows of a per-question results file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no per-question results (the evaluate stage writes them)")
    return parse_question_results(path.read_text(), str(path))


Source = str | Path | Sequence[dict]
"""A per-question results file, or its rows already read (`parse_question_results`)."""


def _load(source: Source) -> tuple[list[dict], str]:
    if isinstance(source, str | Path):
        return read_question_results(source), str(source)
    where = "per-question rows"
    rows = list(source)
    _check_unique([r["id"] for r in rows], where)
    return rows, where


def correctness(
    source: Source, ids: Sequence[str] | None = None, field: str = "correct"
) -> tuple[list[str], np.ndarray]:
    """`(ids, scores)`: `field` (0/1) of each question, in the order of `ids` (default: the
    file's order). Raises when the results lack one of `ids` or hold questions beyond them,
    so two runs are only ever compared on the same questions."""
    loaded, where = _load(source)
    rows = {r["id"]: r for r in loaded}
    order = list(rows) if ids is None else list(ids)
    missing = [i for i in order if i not in rows]
    extra = set(rows) - set(order)
    if missing or extra:
        raise ValueError(
            f"{where}: not the same questions ({len(missing)} missing, e.g. {missing[:3]}; "
            f"{len(extra)} extra, e.g. {sorted(extra)[:3]}): both runs must be evaluated on "
            "the same held-out set (evaluate.data, evaluate.samples, model.seed)"
        )
    if any(field not in rows[i] for i in order):
        raise ValueError(f"{where}: some rows have no `{field}`")
    return order, np.array([rows[i][field] for i in order], dtype=float)


def correctness_matrix(
    sources: Sequence[Source], ids: Sequence[str] | None = None, field: str = "correct"
) -> tuple[list[str], np.ndarray]:
    """`(ids, scores)` shaped (len(sources), questions): one row per results file (e.g. per
    training seed of one model), every row aligned to `ids` (default: the first's order)."""
    if not sources:
        raise ValueError("correctness_matrix: no results given")
    ids, first = correctness(sources[0], ids, field)
    rows = [first] + [correctness(s, ids, field)[1] for s in sources[1:]]
    return ids, np.stack(rows)


def paired_scores(
    a: Sequence[Source], b: Sequence[Source], field: str = "correct"
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """`(ids, a, b)`: two models' per-question scores (each seeds x questions, one results
    file or row list per seed) on the same question columns, in the first file's question
    order: ready for `vregion.eval.stats.paired_bootstrap`."""
    ids, a = correctness_matrix(a, field=field)
    _, b = correctness_matrix(b, ids, field)
    return ids, a, b
