"""Visual accuracy: known answers give the known accuracy, padding changes nothing, the blind
control never shows a question its own picture."""

from __future__ import annotations

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
