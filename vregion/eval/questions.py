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


def read_question_results(path: str | Path) -> list[dict]:
    """The rows of a per-question results file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no per-question results (the evaluate stage writes them)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for n, r in enumerate(rows, 1):
        if "id" not in r or "correct" not in r:
            raise ValueError(f"{path}, line {n}: a row needs `id` and `correct`")
    _check_unique([r["id"] for r in rows], str(path))
    return rows


def correctness(
    path: str | Path, ids: Sequence[str] | None = None, field: str = "correct"
) -> tuple[list[str], np.ndarray]:
    """`(ids, scores)`: `field` (0/1) of each question, in the order of `ids` (default: the
    file's order). Raises when the file lacks one of `ids` or holds questions beyond them, so
    two runs are only ever compared on the same questions."""
    rows = {r["id"]: r for r in read_question_results(path)}
    order = list(rows) if ids is None else list(ids)
    missing = [i for i in order if i not in rows]
    extra = set(rows) - set(order)
    if missing or extra:
        raise ValueError(
            f"{path}: not the same questions ({len(missing)} missing, e.g. {missing[:3]}; "
            f"{len(extra)} extra, e.g. {sorted(extra)[:3]}): both runs must be evaluated on "
            "the same held-out set (evaluate.data, evaluate.samples, model.seed)"
        )
    if any(field not in rows[i] for i in order):
        raise ValueError(f"{path}: some rows have no `{field}`")
    return order, np.array([rows[i][field] for i in order], dtype=float)


def correctness_matrix(
    paths: Sequence[str | Path], ids: Sequence[str] | None = None, field: str = "correct"
) -> tuple[list[str], np.ndarray]:
    """`(ids, scores)` shaped (len(paths), questions): one row per file (e.g. per training
    seed of one model), every row aligned to `ids` (default: the first file's order)."""
    if not paths:
        raise ValueError("correctness_matrix: no files given")
    ids, first = correctness(paths[0], ids, field)
    rows = [first] + [correctness(p, ids, field)[1] for p in paths[1:]]
    return ids, np.stack(rows)


def paired_scores(
    paths_a: Sequence[str | Path], paths_b: Sequence[str | Path], field: str = "correct"
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """`(ids, a, b)`: two models' per-question scores (each seeds x questions) on the same
    question columns, ready for `vregion.eval.stats.paired_bootstrap`."""
    ids, a = correctness_matrix(paths_a, field=field)
    _, b = correctness_matrix(paths_b, ids, field)
    return ids, a, b
