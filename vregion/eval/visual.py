"""Held-out visual accuracy: does the model answer from the image, and by how much?

Every synthetic question carries its `choices`. The model's answer is the choice it finds most
likely after the prompt (multiple-choice log-likelihood, as MMBench-style evaluations do), so
accuracy never depends on answer formatting and the chance level of a question is exactly
1/len(choices). When the choices start with different tokens (every synthetic kind) one
forward pass over the prompt ranks them all by their first token; otherwise every choice is
scored in full. The blind control asks the same model the same questions with the images
moved to other questions: what it gets right then comes from the question alone.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence

import torch

from vregion.data.encode import collate, encode_sample, render, to_messages
from vregion.data.imageset import ImageSet, take
from vregion.data.records import Sample
from vregion.devices import autocast
from vregion.eval.questions import question_rows
from vregion.progress import track


def with_answer(sample: Sample, answer: str) -> Sample:
    """The same record with its last (gpt) turn replaced by `answer`."""
    turns = [*sample.conversations[:-1], {"from": "gpt", "value": answer}]
    return Sample(sample.id, sample.image, turns, sample.kind, answer, sample.choices)


def answer_token_ids(processor, sample: Sample, image, system_prompt: str | None) -> list[int]:
    """The tokens of the record's final answer as the model is trained to produce them."""
    enc = encode_sample(processor, sample, image, system_prompt)
    return [t for t in enc["labels"] if t >= 0]


class FirstTokens:
    """Each choice's first answer token, per set of choices (answers tokenize alike after any prompt)."""

    def __init__(self, processor, system_prompt: str | None):
        self.processor, self.system_prompt = processor, system_prompt
        self._cache: dict[tuple[str, ...], list[int] | None] = {}

    def __call__(self, sample: Sample, image) -> list[int] | None:
        key = tuple(sample.choices or ())
        if key not in self._cache:
            firsts = [
                answer_token_ids(self.processor, with_answer(sample, c), image, self.system_prompt)[
                    0
                ]
                for c in key
            ]
            self._cache[key] = firsts if len(set(firsts)) == len(firsts) else None
        return self._cache[key]


def prompt_inputs(
    processor, samples: Sequence[Sample], images: Sequence, system_prompt: str | None
):
    """Right-padded prompts (all turns but the answer, plus the generation prompt).

    Right padding keeps every row's positions as in an unpadded run, for any architecture; the
    next-token logits are read at each row's last real token.
    """
    texts = [
        render(processor, to_messages(s, system_prompt, len(s.conversations) - 1), True)
        for s in samples
    ]
    present = [im for im in images if im is not None]
    tokenizer = processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        kwargs = {"images": present} if present else {}
        return processor(text=texts, padding=True, return_tensors="pt", **kwargs)
    finally:
        tokenizer.padding_side = side


@torch.no_grad()
def _full_choice_scores(
    model, processor, sample, image, system_prompt, precision, device
) -> list[float]:
    """Summed log-likelihood of every choice's answer tokens (one row per choice)."""
    variants = [with_answer(sample, c) for c in sample.choices]
    batch = collate(processor, variants, [image] * len(variants), system_prompt)
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = batch.pop("labels")
    with autocast(precision, device):
        logits = model(**batch).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    target = labels[:, 1:]
    mask = target >= 0
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1).tolist()


@torch.no_grad()
def predict_choices(
    model,
    processor,
    data: ImageSet,
    system_prompt: str | None,
    *,
    batch_size: int,
    precision: str,
    device: torch.device,
    images: list | None = None,
    desc: str = "visual eval",
) -> list[str]:
    """The choice each question's answer would be, for questions that have `choices`."""
    images = data.images if images is None else images
    firsts = FirstTokens(processor, system_prompt)
    predictions: list[str] = [""] * len(data)
    model.eval()
    for start in track(
        range(0, len(data), batch_size),
        total=math.ceil(len(data) / batch_size),
        desc=desc,
        unit="batch",
        leave=False,
    ):
        idx = range(start, min(start + batch_size, len(data)))
        fast = []
        for i in idx:
            sample = data.samples[i]
            if not sample.choices:
                raise ValueError(f"record {sample.id}: no `choices`, cannot score accuracy")
            ids = firsts(sample, images[i])
            if ids is None:
                scores = _full_choice_scores(
                    model, processor, sample, images[i], system_prompt, precision, device
                )
                predictions[i] = sample.choices[max(range(len(scores)), key=scores.__getitem__)]
            else:
                fast.append((i, ids))
        if not fast:
            continue
        batch = prompt_inputs(
            processor,
            [data.samples[i] for i, _ in fast],
            [images[i] for i, _ in fast],
            system_prompt,
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(precision, device):
            logits = model(**batch).logits
        last = batch["attention_mask"].sum(-1) - 1
        next_logits = logits[torch.arange(len(fast), device=logits.device), last].float()
        for row, (i, ids) in enumerate(fast):
            best = int(next_logits[row, ids].argmax())
            predictions[i] = data.samples[i].choices[best]
    return predictions


def shuffled_images(data: ImageSet, seed: int) -> list:
    """Blind control: each question gets the image of another picture (never its own).

    Images are deranged per picture, not per question, so a question never gets its own
    picture back through a sibling question about the same image.
    """
    keys = sorted({s.image for s in data.samples if s.image is not None})
    if len(keys) < 2:
        raise ValueError("a blind control needs questions about at least two different images")
    order = keys[:]
    random.Random(seed).shuffle(order)
    moved = dict(zip(order, order[1:] + order[:1], strict=True))
    first: dict[str, int] = {}  # each picture's first question: where to take its image from
    for i, s in enumerate(data.samples):
        first.setdefault(s.image, i)
    return take(
        data.images, [first[moved[s.image]] if s.image is not None else None for s in data.samples]
    )


def accuracy_table(samples: Sequence[Sample], predictions: Sequence[str]) -> dict:
    """Accuracy, count and chance level, overall and per question kind."""
    groups: dict[str, list[tuple[bool, float]]] = defaultdict(list)
    for s, p in zip(samples, predictions, strict=True):
        hit = (p == s.answer, 1 / len(s.choices))
        groups[s.kind or "all"].append(hit)
        groups["overall"].append(hit)

    def summary(rows):
        return {
            "accuracy": round(sum(h for h, _ in rows) / len(rows), 4),
            "chance": round(sum(c for _, c in rows) / len(rows), 4),
            "n": len(rows),
        }

    return {k: summary(v) for k, v in sorted(groups.items())}


def visual_accuracy(
    model,
    processor,
    data: ImageSet,
    system_prompt: str | None,
    *,
    batch_size: int,
    precision: str,
    device: torch.device,
    seed: int = 0,
    questions: bool = False,
) -> dict | tuple[dict, list[dict]]:
    """Per kind and overall: accuracy with the right images, blind accuracy, chance, n.

    `questions=True`: `(table, rows)`, the same table and one row per question
    (`vregion.eval.questions.question_rows`), to compare runs question by question.
    """
    ask = dict(batch_size=batch_size, precision=precision, device=device)
    seeing = predict_choices(model, processor, data, system_prompt, desc="visual eval", **ask)
    blind = predict_choices(
        model,
        processor,
        data,
        system_prompt,
        images=shuffled_images(data, seed),
        desc="blind control",
        **ask,
    )
    table = accuracy_table(data.samples, seeing)
    blind_table = accuracy_table(data.samples, blind)
    for kind, row in table.items():
        row["blind"] = blind_table[kind]["accuracy"]
    if questions:
        return table, question_rows(data.samples, seeing, blind)
    return table


def normalize_answer(text: str) -> str:
    """Lower case, no surrounding punctuation or spaces: 'Two.' and 'two' are the same answer."""
    return text.strip().strip(".!,;:\"'").strip().lower()


@torch.no_grad()
def generated_answers(
    model,
    processor,
    data: ImageSet,
    system_prompt: str | None,
    *,
    batch_size: int,
    precision: str,
    device: torch.device,
    images: list | None = None,
    max_new_tokens: int = 16,
    desc: str = "generate",
) -> list[str]:
    """Greedy answers to each record's last question (for records without `choices`)."""
    from vregion.data.encode import prompt_batch

    images = data.images if images is None else images
    answers: list[str] = []
    tokenizer = processor.tokenizer
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    model.eval()
    for start in track(range(0, len(data), batch_size), desc=desc, unit="batch", leave=False):
        sl = slice(start, start + batch_size)
        batch = prompt_batch(processor, data.samples[sl], images[sl], system_prompt)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(precision, device):
            out = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id
            )
        new = out[:, batch["input_ids"].shape[1] :]
        answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    return answers


def open_answer_accuracy(
    model,
    processor,
    data: ImageSet,
    system_prompt: str | None,
    *,
    batch_size: int,
    precision: str,
    device: torch.device,
    seed: int = 0,
) -> dict:
    """Exact-match accuracy of greedy answers (normalized) beside the blind control."""
    kw = dict(batch_size=batch_size, precision=precision, device=device)
    gold = [normalize_answer(s.answer or s.conversations[-1]["value"]) for s in data.samples]
    seeing = generated_answers(model, processor, data, system_prompt, **kw)
    blind = generated_answers(
        model,
        processor,
        data,
        system_prompt,
        images=shuffled_images(data, seed),
        desc="generate (blind)",
        **kw,
    )

    def score(answers: list[str]) -> float:
        hits = [normalize_answer(a) == g for a, g in zip(answers, gold, strict=True)]
        return round(sum(hits) / max(len(hits), 1), 4)

    return {"accuracy": score(seeing), "blind": score(blind), "n": len(gold)}


def held_out_check(
    model,
    processor,
    held_out: ImageSet,
    system_prompt: str | None,
    *,
    batch_size: int,
    precision: str,
    device: torch.device,
    seed: int = 0,
) -> tuple[str, dict]:
    """Does a tuned model see? On `held_out`, beside the blind control: ("visual", accuracy per
    kind) when every record carries `choices`, else ("answer_loss", the answer loss with the
    right images and with deranged ones; lower is better)."""
    from vregion.train.loop import deranged, mean_answer_loss

    kw = dict(precision=precision, device=device)
    if all(s.choices for s in held_out.samples):
        return "visual", visual_accuracy(
            model, processor, held_out, system_prompt, batch_size=batch_size, seed=seed, **kw
        )
    data, n = held_out, len(held_out)
    args = (model, processor, data, system_prompt)
    loss = mean_answer_loss(*args, batch_size=batch_size, **kw)
    blind = mean_answer_loss(
        *args, batch_size=batch_size, images=deranged(data.images, seed), desc="blind", **kw
    )
    return "answer_loss", {"overall": {"loss": round(loss, 5), "blind": round(blind, 5), "n": n}}


def pruning_curve(
    model,
    processor,
    data: ImageSet,
    ranking: Sequence[int],
    ks: Sequence[int],
    system_prompt: str | None,
    *,
    batch_size: int,
    precision: str,
    device: torch.device,
) -> list[dict]:
    """Visual accuracy (overall and per kind) of `model` with the first k layers of `ranking`
    removed, for each k in `ks`; the model is restored after each. Each row's `questions`
    holds its per-question rows (`vregion.eval.questions`)."""
    from vregion.prune import temporarily_pruned

    rows = []
    for k in ks:
        with temporarily_pruned(model, sorted(ranking[:k])) as pruned:
            preds = predict_choices(
                pruned,
                processor,
                data,
                system_prompt,
                batch_size=batch_size,
                precision=precision,
                device=device,
                desc=f"curve: {k} removed",
            )
        table = accuracy_table(data.samples, preds)
        rows.append(
            {
                "layers_removed": k,
                "removed": sorted(ranking[:k]),
                "accuracy": table["overall"]["accuracy"],
                **{
                    f"accuracy_{kind}": v["accuracy"]
                    for kind, v in table.items()
                    if kind != "overall"
                },
                "questions": question_rows(data.samples, preds),
            }
        )
    return rows
