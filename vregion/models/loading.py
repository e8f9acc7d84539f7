"""Load an LVLM and its processor from a local checkpoint directory or a Hugging Face id.

Runs are offline (HF_HUB_OFFLINE=1): an id must already be in the Hugging Face cache. Both
failure cases (missing directory, uncached id) get an error that says what to do instead of
transformers' generic "couldn't connect to huggingface.co".
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from huggingface_hub import is_offline_mode, try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    ProcessorMixin,
)

log = logging.getLogger(__name__)


class CheckpointNotFoundError(FileNotFoundError):
    """Neither a local checkpoint directory nor a Hugging Face id that can be loaded."""


def _looks_like_path(name: str) -> bool:
    # HF ids are `name` or `org/name`; anything else with a slash can only be a path.
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def resolve_checkpoint(name_or_path: str | Path) -> str:
    """A checkpoint directory, or an HF id that can be loaded here; else a clear error.

    A directory must hold a `config.json`. An id is accepted when downloads are allowed, or,
    offline, when its config is already in the Hugging Face cache.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointNotFoundError(
                f"{path} has no config.json: it is not a Hugging Face checkpoint directory"
            )
        return str(path)
    if path.exists():
        raise CheckpointNotFoundError(f"{path} is a file, not a checkpoint directory")
    if _looks_like_path(name):
        raise CheckpointNotFoundError(f"no checkpoint directory {path.resolve()}")
    if is_offline_mode():
        try:
            cached = try_to_load_from_cache(name, "config.json")
        except HFValidationError:
            cached = None
        if not isinstance(cached, str):
            raise CheckpointNotFoundError(
                f"{name!r} is neither a local directory (no {path.resolve()}) nor a model in the "
                f"Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading it. Pass a local "
                f"checkpoint directory, or pre-download it where there is network "
                f"(`hf download {name}`) and copy the cache or the snapshot directory here."
            )
    return name


PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
"""Files a processor is saved as (tokenizer, image/video preprocessing, chat template)."""


def copy_processor_files(name_or_path: str | Path, out_dir: str | Path) -> list[str]:
    """Copy the checkpoint's processor files as they are, without building the processor.

    For processors that cannot be built here (Qwen-VL's video processor needs torchvision, which
    a CPU-only machine lacks): the copy is still the checkpoint's own processor.
    """
    source = resolve_checkpoint(name_or_path)
    out_dir = Path(out_dir)
    copied = []
    for name in PROCESSOR_FILES:
        if Path(source).is_dir():
            path = Path(source) / name
            found = str(path) if path.is_file() else None
        else:
            found = try_to_load_from_cache(source, name)
        if isinstance(found, str):
            shutil.copyfile(found, out_dir / name)
            copied.append(name)
    return copied


def _dtype(dtype: str | torch.dtype | None) -> str | torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use e.g. float32, bfloat16, float16 or auto")
    return value


def load_processor(name_or_path: str | Path) -> ProcessorMixin:
    """The checkpoint's processor (tokenizer + image processor)."""
    source = resolve_checkpoint(name_or_path)
    try:
        return AutoProcessor.from_pretrained(source)
    except OSError as e:
        raise CheckpointNotFoundError(
            f"{source} has no processor (tokenizer and image processor files, e.g. "
            f"preprocessor_config.json): save one with `processor.save_pretrained(dir)` ({e})"
        ) from e


def load_lvlm(
    name_or_path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    with_processor: bool = True,
) -> tuple[PreTrainedModel, ProcessorMixin | None]:
    """Load an image-text-to-text model (LLaVA, LLaVA-NeXT, Qwen2-VL, ...) and its processor.

    `dtype`: a torch dtype or its name (`"bfloat16"`); None or `"auto"` keeps the checkpoint's
    own dtype (transformers 5's default). `device`: where to put the model (default: stays on CPU).
    With `with_processor=False` no processor is loaded and None is returned in its place.
    The model is returned in eval mode.
    """
    source = resolve_checkpoint(name_or_path)
    kwargs = {} if dtype is None else {"dtype": _dtype(dtype)}
    model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
    if device is not None:
        model.to(device)
    model.eval()
    processor = load_processor(source) if with_processor else None
    log.info("loaded %s from %s (%s)", type(model).__name__, source, model.dtype)
    return model, processor


def empty_lvlm(name_or_path: str | Path) -> PreTrainedModel:
    """The checkpoint's architecture with weights on the meta device: no weights read or held.

    Enough for layer maps and parameter counts of a large model (only config.json is needed).
    """
    config = AutoConfig.from_pretrained(resolve_checkpoint(name_or_path))
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)
