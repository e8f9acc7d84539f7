"""Inference cost of a model: prefill and decode tokens/s, parameters, size on disk, memory.

Prefill is one forward pass over a batch of real prompts (image tokens included); decode is
the rest of a greedy `generate` that must produce exactly `new_tokens` tokens with the KV cache,
so decode tokens/s = batch * (new_tokens - 1) / (generate time - prefill time). Medians of
`repeats` runs after a warm-up, because timings on shared CPUs are noisy.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from vregion.devices import autocast


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pad_id(model) -> int:
    pad = model.generation_config.pad_token_id
    pad = model.generation_config.eos_token_id if pad is None else pad
    return pad[0] if isinstance(pad, list) else pad


@torch.inference_mode()
def time_prefill_and_generate(
    model, inputs: dict[str, torch.Tensor], new_tokens: int, device: torch.device
) -> tuple[float, float]:
    """Seconds of one prefill (a forward with the KV cache, last-position logits only, as
    `generate` does) and of one `generate` of exactly `new_tokens` tokens."""
    _sync(device)
    t0 = time.perf_counter()
    model(**inputs, use_cache=True, logits_to_keep=1)
    _sync(device)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # never stop early: every run decodes the same amount
        do_sample=False,
        pad_token_id=_pad_id(model),
    )
    _sync(device)
    total = time.perf_counter() - t0
    assert out.shape[1] - inputs["input_ids"].shape[1] == new_tokens, "generate stopped early"
    return prefill, total


def throughput(
    prefill_s: float, generate_s: float, rows: int, prompt_tokens: int, new_tokens: int
) -> dict:
    """Tokens/s from timings: the first new token comes from the prefill, the rest are decode."""
    decode_s = max(generate_s - prefill_s, 1e-9)
    return {
        "prefill_tokens_per_s": round(prompt_tokens / prefill_s, 2),
        "decode_tokens_per_s": round(rows * (new_tokens - 1) / decode_s, 2),
        "prefill_seconds": round(prefill_s, 4),
        "generate_seconds": round(generate_s, 4),
    }


def generation_speed(
    model,
    batch: dict[str, torch.Tensor],
    *,
    new_tokens: int = 16,
    repeats: int = 3,
    precision: str = "fp32",
    device: torch.device | None = None,
) -> dict[str, float]:
    """Median prefill and decode throughput (tokens/s) of `model` on a prompt `batch`."""
    device = device or next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    model.eval()
    runs = []
    with autocast(precision, device):
        time_prefill_and_generate(model, batch, 2, device)  # warm-up
        runs = [time_prefill_and_generate(model, batch, new_tokens, device) for _ in range(repeats)]
    rows = batch["input_ids"].shape[0]
    prompt_tokens = int(batch["attention_mask"].sum())
    return {
        **throughput(
            statistics.median(p for p, _ in runs),
            statistics.median(t for _, t in runs),
            rows,
            prompt_tokens,
            new_tokens,
        ),
        "batch": rows,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
    }


def size_on_disk(path: str | Path) -> int:
    """Bytes of the weight files of a checkpoint directory (safetensors or bin)."""
    path = Path(path)
    files = [f for f in path.rglob("*") if f.suffix in (".safetensors", ".bin") and f.is_file()]
    return sum(f.stat().st_size for f in files)
