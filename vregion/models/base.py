"""Build the pipeline's starting checkpoint: the embedded default, or a copy of a given LVLM."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from vregion.config import ModelConfig
from vregion.devices import pick_device, resolve_precision

log = logging.getLogger(__name__)


EMBEDDED = ("embedded", "embedded-tiny")
ASSEMBLE = "assemble"


def build_embedded(cfg: ModelConfig, out_dir: str | Path, max_objects: int) -> dict:
    """SmolLM2 (or, for `embedded-tiny`, a random 4-layer Llama with its tokenizer) + a pretrained
    SigLIP tower + a fresh projector, saved as an HF checkpoint."""
    from vregion.models import embedded
    from vregion.models.vision_pretrain import pretrain_tower

    emb = cfg.embedded
    t0 = time.perf_counter()
    if cfg.base == "embedded-tiny":
        tokenizer = embedded.load_smollm2_tokenizer()
        llm = embedded.tiny_llm(tokenizer, seed=cfg.seed)
    else:
        llm, tokenizer = embedded.load_smollm2()
    processor = embedded.build_processor(tokenizer, emb)
    model = embedded.assemble_llava(llm, tokenizer, emb, seed=cfg.seed)
    del llm
    device = pick_device()
    tower = model.model.vision_tower.to(device)
    tower_metrics = pretrain_tower(
        tower,
        processor.image_processor,
        steps=emb.tower_pretrain_steps,
        lr=emb.tower_pretrain_lr,
        batch_size=emb.tower_pretrain_batch_size,
        image_size=emb.image_size,
        patch_size=emb.patch_size,
        max_objects=max_objects,
        seed=cfg.seed,
        precision=resolve_precision("auto", device),
        device=device,
    )
    model.to("cpu")
    save_checkpoint(model, processor, out_dir)
    return {
        "source": f"{cfg.base}: {'SmolLM2-135M-Instruct' if cfg.base == 'embedded' else 'random tiny Llama'} + SigLIP",
        "seconds": round(time.perf_counter() - t0, 1),
        "tower": tower_metrics,
    }


def build_assembled(cfg: ModelConfig, out_dir: str | Path) -> dict:
    """A LLaVA assembled from `cfg.assemble`'s LLM, tower and projector, saved as an HF checkpoint."""
    from vregion.models.assemble import assemble_llava
    from vregion.models.layer_map import layer_map

    parts = cfg.assemble
    t0 = time.perf_counter()
    model, processor = assemble_llava(
        parts.llm,
        parts.vision_tower,
        parts.projector,
        vision_feature_layer=parts.vision_feature_layer,
        vision_feature_select_strategy=parts.vision_feature_select_strategy,
        pad_to_square=parts.pad_to_square,
        image_token=parts.image_token,
        chat_template=parts.chat_template,
        dtype=parts.dtype,
        seed=cfg.seed,
    )
    lm = layer_map(model)
    save_checkpoint(model, processor, out_dir)
    return {
        "source": f"assembled: {parts.llm} + {parts.vision_tower}",
        "projector": parts.projector or "random (align trains it)",
        "llm_layers": lm.num_layers,
        "image_tokens": model.config.image_seq_length,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def copy_pretrained(name_or_path: str, out_dir: str | Path) -> dict:
    """Load an LVLM by HF id or directory and save it as the pipeline's base checkpoint.

    A family vregion refuses (or whose parts it cannot find) is refused here, from its config
    alone, before any weight is read: not stages later.
    """
    from vregion.models.layer_map import layer_map
    from vregion.models.loading import (
        copy_processor_files,
        empty_lvlm,
        load_lvlm,
        load_processor,
    )

    t0 = time.perf_counter()
    layer_map(empty_lvlm(name_or_path))  # raises UnsupportedArchitectureError with the reason
    model, _ = load_lvlm(name_or_path, with_processor=False)
    try:
        processor = load_processor(name_or_path)
    except ImportError as err:  # e.g. Qwen-VL's video processor without torchvision
        processor, missing = None, err
    save_checkpoint(model, processor, out_dir)
    metrics = {"source": name_or_path, "seconds": round(time.perf_counter() - t0, 1)}
    if processor is None:
        metrics["processor_files_copied"] = copy_processor_files(name_or_path, out_dir)
        if not metrics["processor_files_copied"]:
            raise missing
        log.warning("processor not built here (%s); its files were copied as they are", missing)
    return metrics


def save_checkpoint(model, processor, out_dir: str | Path) -> None:
    """An ordinary HF checkpoint (safetensors) + processor that plain transformers loads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(out_dir)
    log.info("saved %s to %s", type(model).__name__, out_dir)


def link_checkpoint(src: str | Path, out_dir: str | Path) -> dict[str, int]:
    """`out_dir` as a replica of the checkpoint directory `src`, its files hard-linked.

    No weight is copied: both names point at the same bytes (DVC's cache stores them once, by
    content). Across filesystems, where a hard link cannot be made, the file is copied.
    Stages replace their outputs (never edit them in place), so sharing is safe.
    """
    counts = {"files_linked": 0, "files_copied": 0}

    def link_or_copy(source: str, target: str) -> None:
        try:
            os.link(source, target)
            counts["files_linked"] += 1
        except OSError:  # EXDEV across filesystems, EPERM / ENOTSUP where links are refused
            shutil.copy2(source, target)
            counts["files_copied"] += 1

    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(src, out_dir, copy_function=link_or_copy)
    log.info("linked %s to %s: %s", src, out_dir, counts)
    return counts
