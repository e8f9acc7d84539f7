"""Scoring the text-skill set (`vregion.data.text_skill`): the LLM's text ability, text only.

In both parts only the reply is scored: its tokens plus the end-of-turn token that closes it;
the system message and the question are context. Multiple-choice items are correct when the
right reply has the highest summed log-likelihood (`mc_accuracy`, chance 0.25); held-out
answers give the mean NLL per reply token (`answer_nll`, pooled). A drop in `mc_accuracy` or a
rise in `answer_nll` after visual instruction tuning is text skill lost (forgetting).
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from collections.abc import Sequence

import torch


def score_text_skill(
    model: torch.nn.Module,
    tokenizer,
    items: Sequence[dict],
    system_prompt: str,
    batch_size: int = 8,
) -> dict:
    """Multiple-choice accuracy and held-out answer NLL of `model` on `items` (see module doc).

    `model` is any causal LM, or an LVLM whose forward takes `input_ids` / `attention_mask`
    alone and returns `.logits`. Sequences are right-padded here whatever the tokenizer's
    padding side, so position ids stay those of unpadded text. Returns `mc_accuracy`,
    `mc_items`, `answer_nll`, `answer_ppl`, `ppl_items`, and per-family figures
    (`mc_accuracy_by_family`, `answer_nll_by_family`); metrics without items are NaN.
    """
    sequences = []  # (item index, option index, token ids, answer token positions)
    for i, item in enumerate(items):
        candidates = item["options"] if item["type"] == "mc" else [item["answer"]]
        for j, reply in enumerate(candidates):
            ids, positions = tokenize_reply(tokenizer, system_prompt, item["prompt"], reply)
            sequences.append((i, j, ids, positions))
    logprobs = _reply_logprobs(model, tokenizer, [(s[2], s[3]) for s in sequences], batch_size)

    option_scores: dict[int, dict[int, float]] = defaultdict(dict)
    ppl_nll: dict[int, tuple[float, int]] = {}
    for (i, j, _, _), token_logprobs in zip(sequences, logprobs, strict=True):
        if items[i]["type"] == "mc":
            option_scores[i][j] = sum(token_logprobs)
        else:
            ppl_nll[i] = (-sum(token_logprobs), len(token_logprobs))
    return _summarise(items, option_scores, ppl_nll)


def _summarise(
    items: Sequence[dict],
    option_scores: dict[int, dict[int, float]],
    ppl_nll: dict[int, tuple[float, int]],
) -> dict:
    correct: dict[str, list[bool]] = defaultdict(list)
    for i, scores in option_scores.items():
        best = max(scores, key=lambda j: scores[j])
        correct[items[i]["family"]].append(items[i]["options"][best] == items[i]["answer"])
    nll: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for i, pair in ppl_nll.items():
        nll[items[i]["family"]].append(pair)

    all_correct = [c for cs in correct.values() for c in cs]
    total_nll = sum(s for pairs in nll.values() for s, _ in pairs)
    total_tokens = sum(n for pairs in nll.values() for _, n in pairs)
    answer_nll = total_nll / total_tokens if total_tokens else math.nan
    return {
        "mc_accuracy": sum(all_correct) / len(all_correct) if all_correct else math.nan,
        "mc_items": len(all_correct),
        "answer_nll": answer_nll,
        "answer_ppl": math.exp(answer_nll) if total_tokens else math.nan,
        "ppl_items": len(ppl_nll),
        "mc_accuracy_by_family": {f: sum(cs) / len(cs) for f, cs in sorted(correct.items())},
        "answer_nll_by_family": {
            f: sum(s for s, _ in pairs) / sum(n for _, n in pairs)
            for f, pairs in sorted(nll.items())
        },
    }


def tokenize_reply(
    tokenizer, system_prompt: str, prompt: str, reply: str
) -> tuple[list[int], list[int]]:
    """Token ids of the chat (system, user `prompt`, assistant `reply`) and the positions of the
    reply's tokens plus the end-of-turn token after them."""
    messages = [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": reply},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    context = tokenizer.apply_chat_template(
        messages[:2], tokenize=False, add_generation_prompt=True
    )
    start = (
        len(context)
        if text.startswith(context) and text[len(context) :].startswith(reply)
        else text.rfind(reply)
    )
    if start < 0:
        raise ValueError(f"the chat template does not keep the reply {reply!r} verbatim")
    end = start + len(reply)
    # The template already holds any BOS token: add no special tokens of our own.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    positions = [t for t, (a, b) in enumerate(encoded["offset_mapping"]) if b > start and a < end]
    if not positions:
        raise ValueError(f"reply {reply!r} has no tokens")
    if positions[-1] + 1 < len(ids):
        positions.append(positions[-1] + 1)  # the end-of-turn token closes the reply
    if positions[0] == 0:
        raise ValueError("the reply starts the sequence: there is no context to score it from")
    return ids, positions


def reply_split(tokenizer, system_prompt: str, prompt: str, reply: str) -> tuple[str, str]:
    """The chat text of `tokenize_reply` cut where its scored tokens start: (context,
    continuation), the continuation ending with the end-of-turn token. Tokenizing
    `context + continuation` gives the same ids, and the continuation's tokens are exactly the
    scored ones: the strings a log-likelihood harness (lm-eval) needs to score a reply as
    `score_text_skill` does. Raises ValueError where the tokenizer merges across the cut."""
    ids, positions = tokenize_reply(tokenizer, system_prompt, prompt, reply)
    text = tokenizer.decode(ids, skip_special_tokens=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != ids:
        raise ValueError(f"the tokenizer does not round-trip the chat of {prompt!r}")
    offsets = encoded["offset_mapping"]
    start, end = offsets[positions[0]][0], offsets[positions[-1]][1]
    context, continuation = text[:start], text[start:end]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    head = tokenizer(context, add_special_tokens=False)["input_ids"]
    if list(whole) != ids[: positions[-1] + 1] or list(head) != ids[: positions[0]]:
        raise ValueError(f"the tokenizer merges tokens across the reply of {prompt!r}")
    return context, continuation


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0  # any id works: padded positions are masked and never scored


@torch.inference_mode()
def _reply_logprobs(
    model: torch.nn.Module, tokenizer, sequences: list[tuple[list[int], list[int]]], batch_size: int
) -> list[list[float]]:
    """Log-probability of each scored token of each sequence, in input order."""
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    order = sorted(range(len(sequences)), key=lambda k: len(sequences[k][0]))  # less padding
    out: list[list[float]] = [[] for _ in sequences]
    accepts_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    was_training = model.training
    model.eval()  # no dropout while scoring
    try:
        for b in range(0, len(order), batch_size):
            batch = [sequences[k] for k in order[b : b + batch_size]]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (ids, _) in enumerate(batch):
                input_ids[r, : len(ids)] = torch.tensor(ids)
                attention_mask[r, : len(ids)] = 1
            # Only positions from the first scored token on need logits: the LM head over a
            # 50k vocabulary is a fifth of a small model's forward.
            keep = width - min(pos[0] for _, pos in batch) + 1
            extra = {"logits_to_keep": keep} if accepts_logits_to_keep else {}
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **extra
            ).logits
            offset = width - logits.shape[1]  # logits kept only for the last positions
            # Token t is predicted by the logits at t - 1; take only the scored positions.
            rows = torch.tensor([r for r, (_, pos) in enumerate(batch) for _ in pos])
            targets = torch.tensor([t for _, pos in batch for t in pos])
            picked = logits[rows.to(logits.device), (targets - 1 - offset).to(logits.device)]
            picked = picked.float()
            token_ids = input_ids[rows, targets].to(logits.device)
            logp = torch.log_softmax(picked, dim=-1).gather(1, token_ids[:, None])[:, 0].tolist()
            cursor = 0
            for k, (_, pos) in zip(order[b : b + batch_size], batch, strict=True):
                out[k] = logp[cursor : cursor + len(pos)]
                cursor += len(pos)
    finally:
        model.train(was_training)
    return out
