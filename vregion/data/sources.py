"""Validate one real data source into the streaming layout the stages read.

`ingest_source` checks a LLaVA-format records file (every record; every image it names once,
in parallel, headers only unless `full_decode`; nothing outside the image root is opened),
measures each record's token length with the model's processor without decoding any image,
and writes `records.jsonl` with its index, `quarantine.json` and `source.json` (the image
root, counts, records/s) into `out`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from vregion.config import SourceConfig
from vregion.data import llava_format
from vregion.data.dataset import write_index
from vregion.data.encode import ImageTokenCounter, render, to_messages
from vregion.data.records import Quarantine, write_jsonl
from vregion.data.remote import S3Object, is_s3

CHUNK = 2048  # records rendered and tokenized per tokenizer call


def _root(image_root: str | None) -> str | None:
    """Where the stages find the images: the real local path, or the s3:// URL as given."""
    if not image_root:
        return None
    return str(S3Object.parse(image_root)) if is_s3(image_root) else os.path.realpath(image_root)


def token_lengths(processor, samples, sizes, system_prompt: str | None) -> list[int]:
    """Each record's sequence length as the model sees it (image tokens from the image size)."""
    image_tokens = ImageTokenCounter(processor)
    lengths = []
    for start in range(0, len(samples), CHUNK):
        chunk = samples[start : start + CHUNK]
        texts = [render(processor, to_messages(s, system_prompt)) for s in chunk]
        ids = processor.tokenizer(texts)["input_ids"]
        for n, size in zip(ids, sizes[start : start + CHUNK], strict=True):
            lengths.append(len(n) + (image_tokens(tuple(size)) if size else 0))
    return lengths


def ingest_source(
    name: str,
    cfg: SourceConfig,
    processor,
    out: str | Path,
    *,
    system_prompt: str | None,
    max_tokens: int,
    workers: int,
) -> dict:
    """Validate `cfg` into `out` (replaced); returns the metrics (counts, records/s).

    Raises `llava_format.DataFileError` when the file cannot be read or no record is usable.
    """
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    quarantine = Quarantine()
    t0 = time.perf_counter()
    checked = llava_format.validate_llava_file(
        cfg.records,
        cfg.image_root,
        quarantine,
        workers=workers,
        full_decode=cfg.full_decode,
        report_path=out / "quarantine.json",
    )
    validate_s = time.perf_counter() - t0
    lengths = token_lengths(processor, checked.samples, checked.image_sizes, system_prompt)
    kept, kept_lengths = [], []
    for sample, n in zip(checked.samples, lengths, strict=True):
        if n > max_tokens:  # never truncated: a cut answer teaches the wrong thing
            quarantine.add(
                cfg.records,
                sample.id,
                f"too long: {n} tokens > max_tokens {max_tokens}",
                "conversations",
            )
        else:
            kept.append(sample)
            kept_lengths.append(n)
    quarantine.write(out / "quarantine.json")
    if not kept:
        raise llava_format.DataFileError(
            f"{cfg.records}: no record is usable ({len(quarantine.entries)} quarantined, see "
            f"{out / 'quarantine.json'}): raise data.max_tokens or fix the records"
        )
    records = out / "records.jsonl"
    write_jsonl(records, kept)
    write_index(records, kept_lengths, [s.image is not None for s in kept])
    seconds = time.perf_counter() - t0
    metrics = {
        "source": name,
        "records_file": str(cfg.records),
        "image_root": _root(cfg.image_root),
        "revision": cfg.revision,
        "records_read": checked.records,
        "records": len(kept),
        "with_image": sum(s.image is not None for s in kept),
        "unique_images": checked.unique_images,
        "quarantined": len(quarantine.entries),
        "full_decode": cfg.full_decode,
        "validate_seconds": round(validate_s, 2),
        "seconds": round(seconds, 2),
        "records_per_second": round(checked.records / max(seconds, 1e-9), 1),
        "mean_tokens": round(sum(kept_lengths) / len(kept_lengths), 1),
        "max_tokens": max(kept_lengths),
    }
    (out / "source.json").write_text(json.dumps(metrics, indent=2) + "\n")  # read by the stages
    return metrics
