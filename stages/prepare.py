"""prepare: the data every later stage reads, under data/.

- synthetic visual QA (train/eval splits sharing no image): captions for `align`, short-answer
  questions for `finetune` and `evaluate`, scene descriptions;
- the text-skill set (how much of the LLM's text ability survives tuning);
- beside each records file its index (`<file>.index.npz`: byte offsets, token lengths, image
  flags), so later stages stream records one at a time and batch them by length;
- data/quarantine.json: every record skipped (file, record id, field, reason), counted in
  metrics/prepare.json. Samples longer than `data.max_tokens` with the base model's processor
  are skipped too, never truncated.

Real LLaVA-format data is validated by the `ingest@<name>` stages (stages/ingest.py).
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from pathlib import Path

from PIL import Image
from prefect import flow
from tqdm.auto import tqdm

from stages._common import run_stage, write_json
from vregion.config import load_params
from vregion.data import synthetic, text_skill
from vregion.data.dataset import write_index
from vregion.data.encode import count_tokens
from vregion.data.records import Quarantine, read_jsonl, write_jsonl
from vregion.models.loading import load_processor

# What prepare writes under its data directory, as dvc.yaml lists them (and
# sources/README.md; the folders beside it belong to the ingest stages).
OUTPUTS = ("train", "eval", "images", "text", "quarantine.json")


def drop_overlong(
    path: Path,
    processor,
    image_size: int,
    max_tokens: int,
    system_prompt: str,
    quarantine: Quarantine,
) -> int:
    """Rewrite a synthetic JSONL without samples over `max_tokens`, with its index; returns how
    many remain."""
    # Synthetic images all have one size, so one blank image stands in for the token count.
    blank = Image.new("RGB", (image_size, image_size))
    kept, lengths = [], []
    for s in tqdm(list(read_jsonl(path)), desc=f"length check {path.parent.name}/{path.name}"):
        n = count_tokens(processor, s, blank if s.image else None, system_prompt)
        if n > max_tokens:
            quarantine.add(
                path, s.id, f"too long: {n} tokens > max_tokens {max_tokens}", "conversations"
            )
        else:
            kept.append(s)
            lengths.append(n)
    n = write_jsonl(path, kept)
    write_index(path, lengths, [s.image is not None for s in kept])
    return n


@flow(name="prepare", log_prints=True)
def prepare(base: str, out: str, metrics: str, params: str = "params.yaml") -> dict:
    """Build the synthetic and text-skill data.

    Args:
        base: base checkpoint (its processor counts tokens)
        out: data directory to write (train/, eval/, images/, text/, quarantine.json)
        metrics: metrics file to write
        params: params file
    """
    p = load_params(params)
    d, emb = p.data, p.model.embedded
    if not Path(base).is_dir():
        raise FileNotFoundError(f"{base} is missing: run `dvc repro base` first")
    processor = load_processor(base)
    data = Path(out)
    for name in OUTPUTS:  # data/sources/ belongs to the ingest stages
        shutil.rmtree(data / name, ignore_errors=True)
    quarantine = Quarantine()
    result: dict = {"synthetic": {}}
    for split, n_images in (("train", d.train_images), ("eval", d.eval_images)):
        kinds = synthetic.build_split(
            data,
            split,
            n_images,
            seed=d.seed,
            image_size=emb.image_size,
            max_objects=d.max_objects,
            questions_per_image=d.questions_per_image,
        )
        for name in ("captions", "vqa"):
            kept = drop_overlong(
                data / split / f"{name}.jsonl",
                processor,
                emb.image_size,
                d.max_tokens,
                p.model.system_prompt,
                quarantine,
            )
            result["synthetic"][f"{split}_{name}"] = kept
        result["synthetic"][f"{split}_kinds"] = kinds
    readme = data / "sources" / "README.md"
    readme.parent.mkdir(parents=True, exist_ok=True)
    readme.write_text(
        "Validated real data sources, one folder each, written by the `ingest@<name>` stages\n"
        "(params `data.sources`): records.jsonl, its index, quarantine.json, source.json.\n"
    )
    items = text_skill.build_text_set(d.text_items, seed=d.seed)
    text_skill.write_text_set(data / "text" / "text_skill.jsonl", items)
    result["text_items"] = dict(Counter(i["type"] for i in items))
    quarantine.write(data / "quarantine.json")
    result["quarantined"] = len(quarantine.entries)
    result["quarantined_by_file"] = quarantine.counts()
    write_json(metrics, result)
    return result


if __name__ == "__main__":
    sys.exit(run_stage(prepare, __doc__))
