"""Real LLaVA-format data through every stage, under real DVC and Prefect, on embedded-tiny.

The only training data is a LLaVA-format set this test writes (multi-turn conversations, some
text-only records, images of several sizes, JPEG and PNG) plus a LLaVA-Pretrain-style caption
file for `align`. Checks: `dvc repro` runs every stage on it (the ingest stages included),
finetune names its source and record count and its loss falls, align trained on the captions,
evaluate measured the held-out LLaVA set, and editing a records file makes its ingest stage
stale and, once revalidated, every stage that reads the data, while the images stay outside
the DVC cache.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from PIL import Image
from pipeline_repo import DVC, merge, pipeline_env, run

# A whole `dvc repro` on LLaVA data (minutes on 2 cores): in the whole suite, not the quick one.
pytestmark = pytest.mark.slow


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "white": (250,) * 3}
SHAPES = ("square", "circle")


def write_llava_set(root: Path, n: int = 240, seed: int = 0) -> dict[str, Path]:
    """Images (a shape of one colour, sizes 48-96 px) and three records files about them."""
    rng = random.Random(seed)
    images = root / "images"
    (images / "coco").mkdir(parents=True)
    pics = []
    for i in range(24):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        w, h = rng.choice([(64, 64), (96, 64), (48, 80)])
        im = Image.new("RGB", (w, h), (0, 0, 0))
        box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
        from PIL import ImageDraw

        draw = ImageDraw.Draw(im)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
        name = f"coco/{i:03d}.{'jpg' if i % 2 else 'png'}"
        im.save(images / name)
        pics.append((name, colour, shape))

    def chat(k: int) -> dict:
        if k % 6 == 5:  # text-only records, as LLaVA's mix has (ShareGPT)
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            return {
                "id": f"text-{k}",
                "conversations": [
                    {"from": "human", "value": f"What is {a} plus {b}?"},
                    {"from": "gpt", "value": str(a + b)},
                ],
            }
        name, colour, shape = pics[k % len(pics)]
        return {
            "id": f"chat-{k}",
            "image": name,
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the shape?"},
                {"from": "gpt", "value": colour},
                {"from": "human", "value": "And what shape is it?"},
                {"from": "gpt", "value": shape},
            ],
        }

    def caption(k: int) -> dict:
        name, colour, shape = pics[k % len(pics)]
        return {
            "id": f"cap-{k}",
            "image": name,
            "conversations": [
                {"from": "human", "value": "Describe the image briefly.\n<image>"},
                {"from": "gpt", "value": f"A {colour} {shape} on black."},
            ],
        }

    files = {
        "chat": root / "llava_mix.json",  # a JSON list, as llava_v1_5_mix665k.json
        "chat_eval": root / "llava_eval.jsonl",
        "captions": root / "pretrain.jsonl",
    }
    files["chat"].write_text(json.dumps([chat(k) for k in range(n)], indent=1))
    files["chat_eval"].write_text(
        "".join(json.dumps(chat(k)) + "\n" for k in range(n, n + 24) if k % 6 != 5)
    )
    files["captions"].write_text("".join(json.dumps(caption(k)) + "\n" for k in range(96)))
    return {**files, "images": images}


REAL_PARAMS = {
    "align": {"data": ["captions"], "eval_data": ["captions"], "steps": 4, "eval_samples": 8},
    "probe": {"data": ["chat"], "samples": 8},
    "finetune": {
        "data": ["chat"],
        "eval_data": ["chat_eval"],
        "steps": 8,
        "llm_lr": 0.002,
        "projector_lr": 0.002,
        "warmup_ratio": 0.0,
        "eval_samples": 12,
        "loader": {"workers": 1},
    },
    "prune": {"data": ["chat_eval"]},
    "evaluate": {
        "data": ["chat_eval"],
        "models": ["tuned"],
        "samples": 8,
        "text": False,
        "speed_repeats": 0,
        "prune_curve": [],
    },
}


@pytest.fixture(scope="module")
def real_repo(built_pipeline, tmp_path_factory):
    data = write_llava_set(tmp_path_factory.mktemp("llava"))
    # the session's built tiny pipeline: its base model is reused, every data stage reruns
    repo = built_pipeline.clone(tmp_path_factory.mktemp("real"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    sources = {
        name: {"records": str(data[name]), "image_root": str(data["images"])}
        for name in ("chat", "chat_eval", "captions")
    }
    params = merge(params, {**REAL_PARAMS, "data": {"sources": sources}})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = pipeline_env(repo)
    out = run([*DVC, "repro"], repo, env, timeout=1200)
    return repo, env, data, out


def test_every_stage_runs_on_llava_data(real_repo):
    repo, _, data, out = real_repo
    for stage in ("ingest@chat", "ingest@chat_eval", "ingest@captions", "align", "probe"):
        assert f"Running stage '{stage}'" in out
    for stage in ("finetune", "prune", "evaluate", "report"):
        assert f"Running stage '{stage}'" in out
    ingest = json.loads((repo / "metrics/ingest_chat.json").read_text())
    assert ingest["records"] == 240 and ingest["with_image"] == 200
    named = {r["image"] for r in json.loads(data["chat"].read_text()) if "image" in r}
    assert ingest["unique_images"] == len(named) and ingest["records_per_second"] > 0
    train = json.loads((repo / "metrics/train.json").read_text())
    assert train["data"] == ["chat"] and train["train_records"] == 240
    curve = [
        float(r.split(",")[1]) for r in (repo / "metrics/finetune_loss.csv").read_text().split()[1:]
    ]
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, curve  # the loss on these records falls
    held_out = train["answer_loss"]["overall"]  # the eval records carry no choices
    assert held_out["n"] == 12 and held_out["loss"] > 0
    align = json.loads((repo / "metrics/align.json").read_text())
    assert align["data"] == ["captions"] and align["train_records"] == 96
    assert align["after_caption_loss"] < align["before_caption_loss"]
    ev = json.loads((repo / "metrics/eval.json").read_text())
    scored = ev["models"]["tuned"]["open_answer"]["chat_eval"]
    assert scored["n"] == 8 and 0 <= scored["accuracy"] <= 1
    # The images were referenced, not copied into the DVC cache or data/.
    cached = sum(1 for f in (repo / ".dvc" / "cache").rglob("*") if f.is_file())
    assert not any((repo / "data").rglob("*.jpg"))
    assert cached > 0
    source = json.loads((repo / "data/sources/chat/source.json").read_text())
    assert source["image_root"] == str(data["images"].resolve())


def test_editing_a_records_file_reruns_its_ingest_and_what_reads_it(real_repo):
    repo, env, data, _ = real_repo
    assert "up to date" in run([*DVC, "status"], repo, env)
    records = json.loads(data["chat"].read_text())
    records[0]["conversations"][1]["value"] = "crimson"
    data["chat"].write_text(json.dumps(records, indent=1))
    status = run([*DVC, "status"], repo, env)
    assert "ingest@chat:" in status and str(data["chat"]) in status
    assert "ingest@captions" not in status
    # Once the source is revalidated, every stage that reads data/sources is out of date.
    assert "Running stage 'ingest@chat'" in run([*DVC, "repro", "ingest@chat"], repo, env)
    status = run([*DVC, "status"], repo, env)
    stale = {line[:-1] for line in status.splitlines() if line and not line[0].isspace()}
    assert {"align", "probe", "finetune", "prune", "evaluate"} <= stale, status
    assert not stale & {"base", "prepare", "ingest@chat", "ingest@captions", "region"}
