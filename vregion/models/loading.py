"""Load an LVLM and its processor from a local checkpoint directory or a Hugging Face id.

Runs are offline (HF_HUB_OFFLINE=1): an id must already be in the Hugging Face cache. Both
failure cases (missing directory, uncached id) get an error that says what to do instead of
transformers' generic "couldn't connect to huggingface.co".
"""

from __future__ import annotations

import importlib
import logging
import shutil
import sys
from pathlib import Path

import torch
import transformers
from huggingface_hub import is_offline_mode, try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    ProcessorMixin,
)
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
from transformers.utils import is_torchvision_available
from transformers.video_processing_utils import BaseVideoProcessor

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
    """The checkpoint's processor (tokenizer + image processor).

    Without torchvision (a CPU-only machine) transformers refuses the processors that carry a
    video processor (Qwen-VL, GLM-4V, InternVL, LLaVA-OneVision, ...) or import torchvision
    (Pixtral): then the same processor class is built without its video part
    (`image_only_class`), which gives the same outputs for images and text.
    """
    source = resolve_checkpoint(name_or_path)
    try:
        try:
            return AutoProcessor.from_pretrained(source)
        except (ImportError, OSError, ValueError, TypeError, AttributeError):
            cls = None if is_torchvision_available() else _torchvision_free_class(source)
            if cls is None:
                raise
            processor = cls.from_pretrained(source)
            log.warning(
                "torchvision is unavailable: loaded %s from %s in an image-only form (no videos)",
                cls.__name__,
                source,
            )
            return processor
    except OSError as e:
        raise CheckpointNotFoundError(
            f"{source} has no processor (tokenizer and image processor files, e.g. "
            f"preprocessor_config.json): save one with `processor.save_pretrained(dir)` ({e})"
        ) from e


class _WithoutVideo(ProcessorMixin):
    """Sits between a processor class and ProcessorMixin and drops its video processor.

    The processor's own `__init__` still passes every sub-processor positionally, the video slot
    (None) included; this names them by the full class's order and forwards all but the video one.
    """

    _full_attributes: tuple[str, ...] = ()

    def __init__(self, *args, **kwargs):
        named = dict(zip(self._full_attributes, args, strict=False))
        named.pop("video_processor", None)
        kwargs.pop("video_processor", None)
        super().__init__(**named, **kwargs)

    @classmethod
    def get_attributes(cls):
        # Drives loading, saving and type checks: the video processor is none of them here.
        return [a for a in cls._full_attributes if a != "video_processor"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        processor = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        try:
            config, _ = BaseVideoProcessor.get_video_processor_dict(pretrained_model_name_or_path)
        except OSError:  # the checkpoint has none
            config = None
        processor.video_processor_config = config
        return processor

    def to_dict(self):
        # Save the checkpoint's video processor config back, so a machine with torchvision still
        # loads the full processor from what this one saves.
        output = super().to_dict()
        if getattr(self, "video_processor_config", None) is not None:
            output["video_processor"] = self.video_processor_config
        return output

    @classmethod
    def from_args_and_dict(cls, args, processor_dict, **kwargs):
        # Pass the sub-processors by name: the full class's positional order has a video slot
        # (first in LLaVA-NeXT-Video), so positions no longer match. Some (SmolVLM) require it.
        named = dict(zip(cls.get_attributes(), args, strict=True), video_processor=None)
        return super().from_args_and_dict([], processor_dict, **named, **kwargs)


def image_only_class(base: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`base` without its video processor (`base` itself if it has none): built, loaded and saved
    without torchvision; images and text go through `base`'s own code, so `input_ids`,
    `pixel_values` and `image_grid_thw` are the full processor's."""
    attributes = tuple(base.get_attributes())
    if "video_processor" not in attributes:
        return base
    # Same name as `base`: a processor saved from it names the full class, so GPU machines load
    # the usual processor from the same files.
    return type(
        base.__name__,
        (base, _WithoutVideo),
        {"__module__": __name__, "_full_attributes": attributes, "__doc__": base.__doc__},
    )


def _pixtral_processor() -> type[ProcessorMixin]:
    # transformers marks PixtralProcessor as needing torchvision only because its module imports
    # one helper from the torchvision image processor; the Pillow module defines the same helper.
    name = "transformers.models.pixtral.image_processing_pixtral"
    saved = sys.modules.get(name)
    sys.modules[name] = importlib.import_module(
        "transformers.models.pixtral.image_processing_pil_pixtral"
    )
    try:
        module = importlib.import_module("transformers.models.pixtral.processing_pixtral")
    finally:
        if saved is None:
            del sys.modules[name]
        else:
            sys.modules[name] = saved
    return module.PixtralProcessor


def _processor_class_name(source: str) -> str:
    processor_dict, _ = ProcessorMixin.get_processor_dict(source)
    if name := processor_dict.get("processor_class"):
        return name
    model_type = AutoConfig.from_pretrained(source).model_type
    if name := PROCESSOR_MAPPING_NAMES.get(model_type):
        return name
    raise ValueError(f"{source}: no processor class is known for model type {model_type!r}")


def _torchvision_free_class(source: str) -> type[ProcessorMixin] | None:
    """The checkpoint's processor class made to work without torchvision; None if it already
    does (then torchvision is not why it failed)."""
    name = _processor_class_name(source)
    if name == "PixtralProcessor":
        return _pixtral_processor()
    base = getattr(transformers, name)
    cls = image_only_class(base)
    return None if cls is base else cls


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
