"""Visual accuracy: known answers give the known accuracy, padding changes nothing, the blind
control never shows a question its own picture."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vregion.data import synthetic
from vregion.data.dataset import stratified
from vregion.data.imageset import ImageSet, LazyImages
from vregion.data.records import read_jsonl
from vregion.eval.visual import (
    FirstTokens,
    accuracy_table,
    answer_token_ids,
    predict_choices,
    prompt_inputs,
    shuffled_images,
    visual_accuracy,
    with_answer,
)
from vregion.models.loading import load_lvlm

SYSTEM = "Answer briefly."


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory) -> ImageSet:
    out = tmp_path_factory.mktemp("eval")
    synthetic.build_split(out, "eval", 10, seed=3, questions_per_image=3, avoid_splits=())
    return ImageSet.load(list(read_jsonl(out / "eval" / "vqa.jsonl")), out)


@pytest.fixture(scope="module")
def tiny(tiny_embedded_dir):
    model, processor = load_lvlm(tiny_embedded_dir[0])
    return model.eval(), processor


class Favours(torch.nn.Module):
    """A model with known answers: the tiny model with `token_ids` made overwhelmingly likely."""

    def __init__(self, model, token_ids: list[int]):
        super().__init__()
        self.model, self.token_ids = model, token_ids

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        out.logits[..., self.token_ids] += 100.0
        return out


def _first_choice_tokens(processor, data: ImageSet) -> list[int]:
    """Every token of the first choice of every question kind."""
    ids = set()
    for s, im in zip(data.samples, data.images, strict=True):
        ids.update(answer_token_ids(processor, with_answer(s, s.choices[0]), im, SYSTEM)[:-1])
    return sorted(ids)


@pytest.mark.parametrize("full_scoring", [False, True])
def test_known_answers_give_the_known_accuracy(tiny, eval_set, monkeypatch, full_scoring):
    model, processor = tiny
    if full_scoring:  # every question through the score-every-choice path
        monkeypatch.setattr(FirstTokens, "__call__", lambda self, sample, image: None)
    oracle = Favours(model, _first_choice_tokens(processor, eval_set))
    table = visual_accuracy(
        oracle,
        processor,
        eval_set,
        SYSTEM,
        batch_size=4,
        precision="fp32",
        device=torch.device("cpu"),
    )
    kinds = {s.kind for s in eval_set.samples}
    assert set(table) == kinds | {"overall"}
    for kind in kinds:
        rows = [s for s in eval_set.samples if s.kind == kind]
        expected = sum(s.answer == s.choices[0] for s in rows) / len(rows)
        assert table[kind]["accuracy"] == pytest.approx(expected, abs=1e-4)
        assert table[kind]["blind"] == pytest.approx(expected, abs=1e-4)  # it never looks
        assert table[kind]["chance"] == pytest.approx(1 / len(rows[0].choices), abs=1e-4)
        assert table[kind]["n"] == len(rows)
    overall = sum(s.answer == s.choices[0] for s in eval_set.samples) / len(eval_set)
    assert table["overall"]["accuracy"] == pytest.approx(overall, abs=1e-4)
    assert 0 < overall < 1  # the data mixes first-choice and other answers


def test_right_padding_reads_each_rows_own_next_token(tiny, eval_set):
    model, processor = tiny
    samples, images = eval_set.samples[:4], eval_set.images[:4]
    batch = prompt_inputs(processor, samples, images, SYSTEM)
    assert batch["attention_mask"].sum(-1).unique().numel() > 1  # rows of different lengths
    with torch.no_grad():
        logits = model(**batch).logits
        for row, (s, im) in enumerate(zip(samples, images, strict=True)):
            alone = model(**prompt_inputs(processor, [s], [im], SYSTEM)).logits[0, -1]
            last = int(batch["attention_mask"][row].sum()) - 1
            torch.testing.assert_close(logits[row, last], alone, atol=1e-4, rtol=1e-4)


def test_predictions_are_choices_and_follow_the_image(tiny, eval_set):
    model, processor = tiny
    preds = predict_choices(
        model,
        processor,
        eval_set,
        SYSTEM,
        batch_size=5,
        precision="fp32",
        device=torch.device("cpu"),
    )
    assert all(p in s.choices for p, s in zip(preds, eval_set.samples, strict=True))


def test_blind_images_never_return_a_question_its_own_picture(eval_set):
    blind = shuffled_images(eval_set, seed=1)
    # an eval set holds image paths, not pixels; the blind control moves the paths
    assert isinstance(blind, LazyImages) and isinstance(eval_set.images, LazyImages)
    moved = [path for _, path in blind.refs]
    assert all(m != s.image for m, s in zip(moved, eval_set.samples, strict=True))
    assert sorted(set(moved)) == sorted({s.image for s in eval_set.samples})  # a permutation


def test_accuracy_table_and_stratified_subset(eval_set):
    samples = eval_set.samples
    table = accuracy_table(samples, [s.answer for s in samples])
    assert all(row["accuracy"] == 1.0 for row in table.values())
    picked = stratified(samples, 12, seed=0)
    available = {k: sum(s.kind == k for s in samples) for k in {s.kind for s in samples}}
    counts = {k: sum(s.kind == k for s in picked) for k in available}
    assert len(picked) == 12 and len({s.id for s in picked}) == 12
    assert all(counts[k] >= min(2, available[k]) for k in available)  # round robin over kinds


def test_open_answers_score_by_normalized_exact_match(tiny, eval_set):
    """LLaVA-format records have no choices: greedy answers, matched after normalizing."""
    from vregion.eval.visual import generated_answers, open_answer_accuracy

    model, processor = tiny
    kw = dict(batch_size=4, precision="fp32", device=torch.device("cpu"))
    said = generated_answers(model, processor, eval_set, SYSTEM, max_new_tokens=16, **kw)
    planted = 5  # gold = what the model says (re-cased, with a full stop) for the first 5 only
    samples = [
        with_answer(s, f"{a.strip().upper()}." if i < planted else "no such answer")
        for i, (s, a) in enumerate(zip(eval_set.samples, said, strict=True))
    ]
    for s in samples:
        s.choices = None
    data = ImageSet(samples, eval_set.images)
    result = open_answer_accuracy(model, processor, data, SYSTEM, **kw)
    assert result["n"] == len(samples)
    assert result["accuracy"] == round(planted / len(samples), 4)
    assert 0 <= result["blind"] <= 1


def test_question_rows_match_the_table_and_line_up_by_id(tiny, eval_set, tmp_path):
    """Per-question rows add up to the returned accuracies, and two runs' files written in
    different orders line up question by question when read back."""
    from vregion.eval.questions import (
        correctness,
        paired_scores,
        parse_question_results,
        read_question_results,
        write_question_results,
    )

    model, processor = tiny
    kw = dict(batch_size=4, precision="fp32", device=torch.device("cpu"))
    table, rows = visual_accuracy(model, processor, eval_set, SYSTEM, questions=True, **kw)
    assert table == visual_accuracy(model, processor, eval_set, SYSTEM, **kw)  # unchanged
    assert [r["id"] for r in rows] == [s.id for s in eval_set.samples]
    for kind, row in table.items():
        mine = [r for r in rows if kind in ("overall", r["kind"])]
        assert len(mine) == row["n"]
        assert sum(r["correct"] for r in mine) / len(mine) == pytest.approx(
            row["accuracy"], abs=1e-4
        )
        assert sum(r["blind_correct"] for r in mine) / len(mine) == pytest.approx(
            row["blind"], abs=1e-4
        )
    assert all(r["choice"] in s.choices for r, s in zip(rows, eval_set.samples, strict=True))

    first = write_question_results(tmp_path / "a.jsonl", rows)
    flipped = [{**r, "correct": 1 - r["correct"]} for r in reversed(rows)]  # another "run"
    second = write_question_results(tmp_path / "q" / "b.jsonl", flipped)
    assert read_question_results(second)[0]["id"] == rows[-1]["id"]  # stored in its own order
    ids, a, b = paired_scores([first], [second, first])
    assert (
        ids == [r["id"] for r in rows] and a.shape == (1, len(rows)) and b.shape == (2, len(rows))
    )
    np.testing.assert_array_equal(b[0], 1 - a[0])  # aligned by id, not by line
    np.testing.assert_array_equal(b[1], a[0])
    # rows already read, e.g. a file's text from `git show REV:PATH`, line up the same way
    committed = parse_question_results(second.read_text(), "rev:b.jsonl")
    np.testing.assert_array_equal(paired_scores([rows], [committed])[2], b[:1])
    with pytest.raises(ValueError, match="rev:b.jsonl, line 2: a row needs `id`"):
        parse_question_results('{"id": "q", "correct": 1}\n{"correct": 0}\n', "rev:b.jsonl")
    write_question_results(tmp_path / "fewer.jsonl", rows[1:])
    with pytest.raises(ValueError, match="not the same questions"):
        correctness(tmp_path / "fewer.jsonl", ids)
    with pytest.raises(ValueError, match="unique"):
        write_question_results(tmp_path / "dup.jsonl", [rows[0], rows[0]])


def test_an_isolated_evaluation_measures_what_one_in_process_does(
    tiny_embedded_dir, tiny_processor, tmp_path
):
    """Each model is measured in a process forked from a forkserver that imported its
    transformers code once; the figures are those of the same measure in this process."""
    import importlib.util

    from vregion.data.dataset import Part, index_records, part_to_dict
    from vregion.eval.checkpoint import EvalJob, _preload, evaluate_checkpoint, evaluate_isolated

    synthetic.build_split(tmp_path, "eval", 4, seed=5, questions_per_image=3, avoid_splits=())
    records = tmp_path / "eval" / "vqa.jsonl"
    index_records(records, tmp_path, tiny_processor, SYSTEM)
    part = Part("eval", str(records), str(tmp_path), np.arange(12))
    checkpoint = str(tiny_embedded_dir[0])
    sets = {"eval": [part_to_dict(part)]}
    job = EvalJob(checkpoint, SYSTEM, sets=sets, batch_size=6, speed_repeats=0)
    modules = _preload(checkpoint)
    for family in ("llava", "llama", "siglip"):  # the embedded model's three model types
        name = f"transformers.models.{family}.modeling_{family}"
        assert name in modules and importlib.util.find_spec(name), modules
    assert _preload("/no/such/checkpoint")[-1] == "vregion.eval.checkpoint"
    torch.set_num_threads(1)
    here, there = evaluate_checkpoint(job), evaluate_isolated(job)
    assert there.pop("peak_memory_mb") > 100 and here.pop("peak_memory_mb") > 100
    assert there == here
    assert 0 <= here["visual"]["overall"]["accuracy"] <= 1 and here["parameters"] > 0
