"""Can all-layer tuning learn one question kind from the embedded tower? Train on that kind alone.

    python benchmarks/kind_learnability.py --train-kinds relation        # ~8 min on 2 cores
    python benchmarks/kind_learnability.py --train-kinds position --steps 150
    python benchmarks/kind_learnability.py --train-kinds relation --fresh-images 6000
    python benchmarks/kind_learnability.py --train-kinds relation --match "left of" --fresh-images 10000

The pipeline's all-layer run answers relation questions ("Is the red circle left of the blue
square?") at chance, though the tower tells each patch where its object's centre lies. Is that
too few relation questions among 300 mixed steps (about one in nine), or something the LLM does
not learn from these features at all? This trains LoRA on every LLM layer (plus the projector,
the finetune stage's settings) of the aligned model on the training questions of `--train-kinds`
only, then asks `--n-eval` held-out questions of each `--eval-kinds` kind, with the blind control
(images moved to other questions). `--fresh-images N` trains instead on the questions of N new
scenes (every kind a scene supports, none of them in prepare's train or eval split), so the
training questions repeat less often or not at all: memorising versus learning the kind. Reads
models/aligned and data/ (`dvc repro probe` makes both). One seed: a diagnostic, not a claim.
Writes JSON (default benchmarks/results/kind_learnability.json).

The training loss is the mean over the answer's label tokens (for SmolLM2 the word,
`<|im_end|>` and a newline), of which only the word is in doubt: for a yes/no kind, ln 2 / 3 =
0.23 is chance, not memorisation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vregion.config import load_params
from vregion.data import synthetic
from vregion.data.dataset import Part, RecordDataset, RecordFile, index_records, resolve_mix
from vregion.data.imageset import ImageSet
from vregion.devices import pick_device, resolve_precision
from vregion.eval.visual import visual_accuracy
from vregion.models.layer_map import layer_map
from vregion.models.loading import load_lvlm
from vregion.train.quick_tune import lora_tune


def of_kinds(
    parts: list[Part], kinds: list[str], n: int | None = None, match: str | None = None
) -> list[Part]:
    """The rows of `parts` whose question kind is one of `kinds` and whose question contains
    `match` (when given); the first `n` of each part."""

    def wanted(sample) -> bool:
        return sample.kind in kinds and (match is None or match in sample.conversations[0]["value"])

    out = []
    for part in parts:
        records = RecordFile(part.records)
        rows = [int(r) for r in part.rows if wanted(records[int(r)])][:n]
        out.append(Part(part.source, part.records, part.image_root, np.asarray(rows, np.int64)))
    return out


def fresh_parts(
    p, data_dir: str, n_images: int, scratch: Path, processor
) -> tuple[list[Part], dict[str, int]]:
    """The questions of `n_images` new scenes drawn like prepare's, avoiding its splits' images,
    and how many of each kind they are."""
    for split in ("train", "eval"):  # build_split reads the splits to avoid from its out_dir
        (scratch / split).mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(data_dir) / split / "scenes.jsonl", scratch / split / "scenes.jsonl")
    counts = synthetic.build_split(
        scratch,
        "fresh",
        n_images,
        p.data.seed,
        image_size=p.model.embedded.image_size,
        max_objects=p.data.max_objects,
        questions_per_image=len(synthetic.KINDS),  # every kind the scene supports
        avoid_splits=("train", "eval"),
    )
    records = scratch / "fresh" / "vqa.jsonl"
    index_records(records, scratch, processor, p.model.system_prompt)
    rows = np.arange(counts["questions"], dtype=np.int64)
    return [Part("fresh", str(records), str(scratch), rows)], counts["per_kind"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--aligned", default="models/aligned", help="the aligned checkpoint")
    ap.add_argument("--data", default="data", help="prepare's data directory")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--train-kinds", nargs="+", required=True, help="kinds trained on")
    ap.add_argument("--eval-kinds", nargs="+", help="kinds asked (default: --train-kinds)")
    ap.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    ap.add_argument(
        "--fresh-images",
        type=int,
        default=0,
        help="train on the questions of this many new scenes instead of prepare's train split",
    )
    ap.add_argument(
        "--match",
        help="only questions whose text contains this, trained and asked (e.g. 'left of')",
    )
    ap.add_argument("--n-eval", type=int, default=200, help="held-out questions per kind")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    ap.add_argument("--out", default="benchmarks/results/kind_learnability.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    p = load_params(args.params)
    f = p.finetune
    torch.manual_seed(p.model.seed)
    device = pick_device()
    precision = resolve_precision(f.precision, device)
    model, processor = load_lvlm(args.aligned, dtype=p.model.dtype)
    model.to(device)
    held_out_sets = {}
    eval_parts = resolve_mix(f.eval_data, p.model.seed, args.data)
    for kind in args.eval_kinds or args.train_kinds:
        held_out = ImageSet.from_parts(of_kinds(eval_parts, [kind], args.n_eval, args.match))
        if len(held_out) < 2:  # the blind control moves images between questions
            raise SystemExit(f"--eval-kinds {kind}: {len(held_out)} held-out question(s), need 2")
        held_out_sets[kind] = held_out
    fresh_kinds = None
    with tempfile.TemporaryDirectory(prefix="kind_learnability-") as scratch:
        if args.fresh_images:
            parts, fresh_kinds = fresh_parts(
                p, args.data, args.fresh_images, Path(scratch), processor
            )
        else:
            parts = resolve_mix(f.data, p.model.seed, args.data)
        train = RecordDataset(
            of_kinds(parts, args.train_kinds, match=args.match), processor, p.model.system_prompt
        )
        if not len(train):
            raise SystemExit(
                f"no training question of kinds {args.train_kinds} (--match {args.match!r})"
            )
        start = time.perf_counter()
        tuned, curve = lora_tune(
            model,
            range(layer_map(model).num_layers),
            train,
            lora=dict(lora_r=f.lora_r, lora_alpha=f.lora_alpha, lora_dropout=f.lora_dropout),
            batch_size=f.batch_size,
            seed=p.model.seed,
            workers=0,
            projector_lr=f.projector_lr,
            llm_lr=f.llm_lr,
            steps=args.steps,
            warmup_ratio=f.warmup_ratio,
            precision=precision,
            device=device,
            desc=f"all-layer tuning on {'+'.join(args.train_kinds)}",
        )
        train_seconds = round(time.perf_counter() - start, 1)
    result = {
        "train_kinds": args.train_kinds,
        "train_questions": len(train),
        "match": args.match,
        "train_source": f"{args.fresh_images} fresh scenes"
        if args.fresh_images
        else "prepare's train split",
        "fresh_questions_per_kind": fresh_kinds,
        "steps": args.steps,
        "batch_size": f.batch_size,
        "train_seconds": train_seconds,
        "final_train_loss": curve[-1]["loss"],
        "held_out": {},
    }
    for kind, held_out in held_out_sets.items():
        table = visual_accuracy(
            tuned,
            processor,
            held_out,
            p.model.system_prompt,
            batch_size=f.eval_batch_size,
            precision=precision,
            device=device,
            seed=p.model.seed,
        )
        result["held_out"][kind] = table[kind]
        row = table[kind]
        print(
            f"{kind}: accuracy {row['accuracy']:.3f} (n={row['n']}, chance {row['chance']:.2f}, "
            f"blind {row['blind']:.3f})"
        )
    print(f"final training loss {result['final_train_loss']:.3f} after {args.steps} steps")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
