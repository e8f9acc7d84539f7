"""Typed configuration, one section per pipeline stage (params.yaml has the same sections).

Every field has a docstring; `vregion params [SECTION]` prints them. Unknown keys and wrong
types are refused with the section and field named, so a typo never silently becomes a default.

Defaults: every default here is the value the embedded default run uses (params.yaml), so a
key left out of params.yaml changes nothing; where the paper's setting differs, the field's
docstring names it ("paper: ..."). The few intended differences from params.yaml are listed,
with their reasons, in tests/test_config.py (`PARAMS_YAML_DIFFERS`).

This module is a leaf: it imports nothing from vregion and no torch, so `load_params` takes
milliseconds in every stage. Names that code defines (probe scorers, region strategies) are
checked against their registries by `vregion.region.registry.check_params`, which each stage
runs right after `load_params`, before any model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, frozen=True, validate_default=True
    )


class EmbeddedModelConfig(Section):
    """The embedded default LVLM: SmolLM2-135M-Instruct + a small SigLIP tower built from config."""

    image_size: int = Field(64, ge=16)
    """Square image side in pixels, for the generator and the vision tower."""
    patch_size: int = Field(16, ge=4)
    """Vision patch side in pixels; the LLM sees (image_size / patch_size)^2 image tokens."""
    vision_hidden_size: int = Field(192, ge=16)
    """Width of the SigLIP tower."""
    vision_layers: int = Field(4, ge=1)
    """Depth of the SigLIP tower."""
    vision_heads: int = Field(4, ge=1)
    """Attention heads of the SigLIP tower."""
    tower_pretrain_steps: int = Field(600, ge=0)
    """Supervised per-patch colour/shape/size steps that stand in for CLIP/SigLIP pretraining."""
    tower_pretrain_lr: float = Field(2e-3, gt=0)
    """Learning rate of the tower pretraining."""
    tower_pretrain_batch_size: int = Field(64, ge=1)
    """Images per tower pretraining step."""

    @model_validator(mode="after")
    def _divisible(self) -> EmbeddedModelConfig:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}"
            )
        if self.vision_hidden_size % self.vision_heads:
            raise ValueError(
                f"vision_hidden_size {self.vision_hidden_size} must be a multiple of "
                f"vision_heads {self.vision_heads}"
            )
        return self


class AssembleConfig(Section):
    """A LLaVA assembled from parts (used when `model.base: assemble`): the paper's start, an LLM,
    a CLIP or SigLIP tower and LLaVA's stage-1 projector."""

    llm: str
    """The language model: an HF id (in the cache; runs are offline) or a local directory of a
    causal LM with its tokenizer, e.g. `lmsys/vicuna-7b-v1.5`."""
    vision_tower: str
    """A CLIP or SigLIP checkpoint (full or vision-only), HF id or directory, e.g.
    `openai/clip-vit-large-patch14-336`. Image size and patch size come from its config."""
    projector: str | None = None
    """LLaVA's stage-1 projector weights (`mm_projector.bin`, or the same keys as .safetensors);
    null: a random projector, which `align` must then train."""
    vision_feature_layer: int = -2
    """Tower hidden state the projector sees (LLaVA-1.5: -2, the second-to-last layer)."""
    vision_feature_select_strategy: Literal["default", "full"] = "default"
    """`default` drops the first token, CLIP's CLS (LLaVA-1.5); `full` keeps every token (SigLIP,
    which has no CLS token)."""
    pad_to_square: bool = False
    """Pad images to a square with the mean colour before resizing (LLaVA-1.5's `pad` aspect
    ratio); false: CLIP's resize and centre crop, or SigLIP's resize."""
    image_token: str = "<image>"
    """The image placeholder token; added to the tokenizer (and embeddings) if missing."""
    chat_template: str | None = None
    """null: the LLM tokenizer's own; `vicuna_v1`: LLaVA-1.5's conversation format (Vicuna's
    tokenizer has no template); or a Jinja template."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the assembled base checkpoint; later stages load it as saved (float32 keeps small
    projector updates, e.g. lr 2e-5, from rounding away)."""


class ModelConfig(Section):
    """Which LVLM the pipeline starts from."""

    base: str = "embedded"
    """`embedded` (SmolLM2-135M + SigLIP, the default), `embedded-tiny` (a random 4-layer LLM with the
    same tokenizer: a seconds-long smoke run), `assemble` (a LLaVA built from the parts in
    `model.assemble`), a Hugging Face id, or a local checkpoint directory."""
    system_prompt: str = "Answer briefly."
    """System message put in every chat; short on purpose (SmolLM2's default adds ~20 tokens)."""
    seed: int = 0
    """Seed for model construction and tower pretraining."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the master weights while training (align, probe tuning, finetune); auto: the
    checkpoint's (a bfloat16 7B model stays bfloat16). Autocast is each stage's `precision`."""
    embedded: EmbeddedModelConfig = EmbeddedModelConfig()
    """Settings used only when `base: embedded`."""
    assemble: AssembleConfig | None = None
    """The parts used when `base: assemble` (and only then: set both or neither)."""

    @model_validator(mode="after")
    def _assemble_named(self) -> ModelConfig:
        # Both or neither: a leftover `assemble` section beside another base would be ignored.
        if (self.base == "assemble") != (self.assemble is not None):
            raise ValueError(
                "model.base: assemble needs a model.assemble section (llm, vision_tower, ...), "
                "and a model.assemble section needs model.base: assemble"
            )
        return self


class SourceConfig(Section):
    """One LLaVA-format records file and the folder its images are under (validated by `ingest`)."""

    records: str
    """Path of the records: a JSON list or JSONL of `{id, image, conversations}` (LLaVA format);
    or an `s3://bucket/key` URL, read with the `VREGION_S3_*` settings.
    A DVC dependency: editing the file reruns `ingest@<name>` and every stage downstream."""
    image_root: str | None = None
    """Folder that the records' `image` paths are relative to (null for text-only records); or
    an `s3://bucket/prefix` URL: images are read from the store when used, never copied.
    Images are referenced, never copied into the DVC cache: change `revision` when they change."""
    revision: str | None = None
    """Free-form version of the image folder (e.g. a date or a tag). Images are not hashed (a
    100-GB folder would be duplicated into the cache), so bumping this is how `dvc repro` learns
    that the images changed."""
    full_decode: bool = False
    """Decode every image while validating (catches truncated pixel data; slower). Default:
    headers only (missing, non-image and truncated-header files are still caught)."""


class DataMix(Section):
    """One entry of a stage's data: a source with a weight or a cap, as LLaVA-1.5's mix uses."""

    source: str
    """A synthetic split (`synthetic/train/vqa`, `synthetic/train/captions`,
    `synthetic/eval/vqa`, `synthetic/eval/captions`) or a name from `data.sources`."""
    weight: float = Field(1.0, gt=0)
    """Share of this source's records taken: 0.5 a seeded half, 2.0 every record twice."""
    max_samples: int | None = Field(None, ge=1)
    """Cap on the records taken from this source (after `weight`); null: no cap."""


SYNTHETIC_SOURCES = (
    "synthetic/train/vqa",
    "synthetic/train/captions",
    "synthetic/eval/vqa",
    "synthetic/eval/captions",
)


def _mix(value: object) -> object:
    """Accept `source` strings as shorthand for `{source: ...}` in a stage's data list."""
    if isinstance(value, str):
        return [{"source": value}]
    if isinstance(value, list):
        return [{"source": v} if isinstance(v, str) else v for v in value]
    return value


Mix = Annotated[list[DataMix], BeforeValidator(_mix), Field(min_length=1)]
"""A stage's data: a list of sources (or one source name), each with an optional weight/cap."""


def _steps_or_epochs(steps: int | None, epochs: float | None, section: str) -> None:
    if (steps is None) == (epochs is None):
        raise ValueError(f"{section}: set exactly one of `steps` and `epochs` (the other null)")


class LoaderConfig(Section):
    """How a training stage streams its data (torch DataLoader)."""

    workers: int | Literal["auto"] = "auto"
    """DataLoader worker processes that decode images and tokenize; `auto`: 1 on CPU (the model
    needs the cores), 4 per GPU. 0 loads on the training thread."""
    prefetch_factor: int = Field(2, ge=1)
    """Batches each worker prepares ahead."""
    group_by_length: bool = False
    """Batch records of similar token length (image and text-only records apart, as LLaVA's
    `group_by_modality_length`, over megabatches of 32 steps): far less padding (18% -> 0.3% in
    benchmarks/data_scale.py). Off by default: where length tracks content (the synthetic set:
    one question template per kind, captions as long as the object count) batches become
    nearly uniform in content, and the embedded default's 100-step alignment ended at a held-out
    caption loss of 0.88 instead of 0.65. Order stays seeded and exactly resumable either way."""


class DataConfig(Section):
    """The synthetic visual QA set, the text-skill set, and optional LLaVA-format data."""

    seed: int = 0
    """Seed of the generator; the same seed gives byte-identical data."""
    train_images: int = Field(3000, ge=1)
    """Synthetic training images (each yields one caption and several questions)."""
    eval_images: int = Field(300, ge=1)
    """Synthetic held-out images; no image is shared with the training split."""
    questions_per_image: int = Field(3, ge=1)
    """Questions drawn per image, of different kinds where possible."""
    max_objects: int = Field(3, ge=1, le=6)
    """Most objects drawn in one image."""
    max_tokens: int = Field(256, ge=16)
    """Samples longer than this (text + image tokens) are quarantined, not truncated."""
    text_items: int = Field(200, ge=0)
    """Items in the text-skill set (multiple-choice and held-out instruction answers)."""
    sources: dict[str, SourceConfig] = {}
    """Real data: name -> LLaVA-format records file and image root. Each is validated by its
    own `ingest@<name>` stage into data/sources/<name>/ and named by the stages' `data` lists."""
    validate_workers: int = Field(8, ge=1)
    """Threads that check images in `ingest` (I/O bound: more than the cores is fine)."""


class AlignConfig(Section):
    """Stage 1: train the projector (LLM frozen; tower frozen unless `vision_lr` > 0)."""

    skip: bool = False
    """Keep the base's projector (a checkpoint whose projector is already trained, e.g.
    LLaVA-1.5): `models/aligned` is `models/base` (files hard-linked), nothing trains, and the
    other fields are not used."""
    data: Mix = ["synthetic/train/captions"]
    """Training captions (LLaVA-Pretrain-style records: one image, one caption answer)."""
    eval_data: Mix = ["synthetic/eval/captions"]
    """Held-out captions for the before/after and shuffled-image losses."""
    steps: int | None = Field(100, ge=0)
    """Optimizer steps (null: train by `epochs`); to train none, set `skip`."""
    epochs: float | None = Field(None, gt=0)
    """Passes over `data` (LLaVA stage 1: 1); null: train by `steps`."""
    batch_size: int = Field(16, ge=1)
    """Captions per step."""
    loader: LoaderConfig = LoaderConfig()
    """Data loading (workers, length grouping)."""
    lr: float = Field(1e-3, gt=0)
    """Projector learning rate (LLaVA stage 1 uses 1e-3)."""
    vision_lr: float = Field(0.0, ge=0)
    """Tower learning rate; 0 keeps the tower frozen."""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Share of steps with linear warm-up before the cosine decay."""
    eval_samples: int = Field(128, ge=1)
    """Held-out captions for the before/after and shuffled-image losses."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto`: bf16 autocast where the hardware runs it fast (CUDA, or CPU with AMX/AVX512-BF16), else fp32."""

    @field_validator("steps")
    @classmethod
    def _some_steps(cls, steps: int | None) -> int | None:
        if steps == 0:  # a trained projector is kept by `skip`, which also copies no weights
            raise ValueError("0 steps trains nothing: to keep the base's projector, set align.skip")
        return steps

    @model_validator(mode="after")
    def _one_length(self) -> AlignConfig:
        _steps_or_epochs(self.steps, self.epochs, "align")
        return self


class ProbeConfig(Section):
    """Score every LLM layer on a probe subset (optionally after a short all-layer probe tuning)."""

    data: Mix = ["synthetic/train/vqa"]
    """Where the probe subset is drawn from."""
    samples: int = Field(64, ge=1)
    """Records in the probe subset (a seeded sample of `data`)."""
    batch_size: int = Field(8, ge=1)
    """Probe batch size for scoring and probe tuning."""
    scorers: list[str] = [
        "block_influence",
        "multimodal_block_influence",
        "angular_distance",
        "attention_to_image",
        "parameter_change",
        "layer_ablation",
    ]
    """Scorers to compute: names registered with `@scorer` (vregion/region/scores.py and
    `vregion.region.registry.SCORERS`); `parameter_change` needs `tune_steps` > 0."""
    tune_steps: int = Field(20, ge=0)
    """All-layer LoRA probe-tuning steps before scoring, as the paper scores a model tuned on all
    layers; 0 scores the aligned model as it is."""
    tune_lr: float = Field(2e-4, gt=0)
    """Learning rate of the probe tuning (LoRA and projector)."""
    lora_r: int = Field(16, ge=1)
    """LoRA rank of the probe tuning."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Precision of the probe tuning (scoring always runs in fp32)."""

    @model_validator(mode="after")
    def _reference_for_parameter_change(self) -> ProbeConfig:
        # Unknown names are the registry's to refuse (vregion.region.registry.check_params).
        if "parameter_change" in self.scorers and self.tune_steps == 0:
            raise ValueError(
                "parameter_change needs tune_steps > 0 (it compares tuned to aligned weights)"
            )
        return self


class RegionConfig(Section):
    """How the visual region (the LLM layers to tune) is chosen; read by probe."""

    strategy: str = "uniform"
    """uniform | bottom | top | middle | bottom+top | random | list | all | topk:<scorer>, or a
    name registered with `@strategy` (vregion/region/select.py)."""
    amount: int | float = 0.25
    """How many layers: a fraction in (0, 1] (float) or a count (int); `all` and `list` ignore
    it. (Not called `size`: DVC leaves params named `size` out of its run-cache key, so a size
    sweep would reuse the wrong results.)"""
    most_important: bool = True
    """For topk:<scorer>: take the highest-scoring layers (False: the lowest)."""
    layers: list[int] | None = None
    """Explicit layer indices for `strategy: list`."""
    seed: int = 0
    """Seed of `strategy: random`."""


class FinetuneConfig(Section):
    """Stage-2 visual instruction tuning of the region (read by finetune); runs on Ray Train."""

    mode: Literal["lora", "full"] = "lora"
    """`lora`: LoRA on the seven linear modules of the region's layers (the paper); `full`: all
    weights of those layers."""
    lora_r: int = Field(16, ge=1)
    """LoRA rank (paper: 128 on 4096-wide 7B layers, 3% of the width; 16 is the same share of
    SmolLM2's 576)."""
    lora_alpha: int = Field(32, ge=1)
    """LoRA alpha (paper: 256, i.e. 2 x rank, kept here)."""
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    """LoRA dropout (paper: 0.05)."""
    projector_lr: float = Field(2e-5, gt=0)
    """Learning rate of the projector (paper: 2e-5)."""
    llm_lr: float = Field(2e-4, gt=0)
    """Learning rate of the region's LoRA or full weights (paper: 2e-4)."""
    data: Mix = ["synthetic/train/vqa"]
    """Training data: synthetic questions and/or `data.sources` (e.g. LLaVA-1.5's 665K mix)."""
    eval_data: Mix = ["synthetic/eval/vqa"]
    """Held-out records for the tuned model's check: accuracy when they carry `choices`, else
    answer loss; each beside the blind control (images shuffled)."""
    steps: int | None = Field(300, ge=1)
    """Optimizer steps; each sees batch_size * grad_accum * num_workers records (null: train by
    `epochs`)."""
    epochs: float | None = Field(None, gt=0)
    """Passes over `data` (the paper: 1); null: train by `steps`."""
    loader: LoaderConfig = LoaderConfig()
    """Data loading (workers, prefetch, length grouping)."""
    batch_size: int = Field(8, ge=1)
    """Questions per worker per micro-batch."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    """Share of the steps with linear warmup before the cosine decay (paper: 3%)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, more time."""
    train_vision: bool = False
    """Also train the vision tower (frozen in the paper)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto`: bf16 autocast on GPUs and on CPUs with native bf16, else fp32."""
    num_workers: int = Field(1, ge=1)
    """Ray Train workers (one per GPU; data is sharded across them, DDP keeps them in step)."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """With several workers: `ddp` (a full model copy per worker) or `fsdp` (parameters sharded
    across workers, each LLM layer gathered only while it runs: for models that do not fit one
    device). Checkpoints and exports are unsharded either way."""
    use_gpu: Literal["auto", True, False] = "auto"
    """Give each worker a GPU; `auto`: when this machine has CUDA."""
    placement: Literal["PACK", "SPREAD"] = "PACK"
    """Ray placement of the workers: `PACK` fills one node first, `SPREAD` puts them on
    different nodes where it can (each node then reads its own share of the data)."""
    max_failures: int = Field(2, ge=0)
    """A worker group that fails (a worker or its node lost) restarts from the latest
    checkpoint this many times before the stage fails."""
    checkpoint_every: int = Field(50, ge=1)
    """Steps between checkpoints (trainable weights + optimizer), where a rerun resumes."""
    eval_samples: int | None = Field(300, ge=6)
    """Held-out questions for the tuned model's visual accuracy check, balanced over kinds
    (null: all of data/eval/vqa.jsonl)."""
    eval_batch_size: int = Field(16, ge=1)
    """Batch size of that check."""
    seed: int | None = None
    """Training seed: LoRA initialisation, dropout and batch order; null: `model.seed`. The data
    mix (which records a `weight` below 1 takes) stays on `model.seed`, so changing this one
    retrains on the same records."""

    @model_validator(mode="after")
    def _one_length(self) -> FinetuneConfig:
        _steps_or_epochs(self.steps, self.epochs, "finetune")
        return self


class PruneConfig(Section):
    """Remove LLM layers outside the region from the tuned model (read by prune)."""

    layers: int = Field(2, ge=0)
    """How many layers to remove: the least important outside the region (paper: 1-4)."""
    explicit: list[int] | None = None
    """Remove exactly these layers instead of ranking (region layers are refused)."""
    protect: list[int] | None = None
    """Layers never removed; null: the tuned region (reports/region.json). For the paper's
    comparison, an all-layer-tuned model is pruned outside the uniform region's layers."""
    scorer: Literal["angular_distance", "block_influence"] = "angular_distance"
    """Importance measure on visual eval data; low = the layer changes its input least."""
    data: Mix = ["synthetic/eval/vqa"]
    """Calibration records the importance is measured on."""
    samples: int = Field(64, ge=1)
    """Calibration records used (a seeded, kind-balanced subset of `data`)."""
    batch_size: int = Field(8, ge=1)
    """Batch size of the scoring pass."""
    heal_steps: int = Field(0, ge=0)
    """Optional healing: LoRA steps on the pruned model's remaining region (paper: none)."""
    heal_lr: float = Field(2e-4, gt=0)
    """Learning rate of the healing pass."""


class HarnessConfig(Section):
    """One evaluation harness run on every model `evaluate` measures (read by evaluate)."""

    tasks: list[str] = []
    """Task names as the harness knows them (its own, or ones under `include_path`); [] skips
    the harness. vregion ships `vregion_text_mc` (lm-eval) and `vregion_vqa` (lmms-eval)."""
    include_path: list[str] = []
    """More directories of task YAMLs (your local copies of MME, MMLU, ...)."""
    limit: int | float | None = Field(None, gt=0)
    """Documents per task (a count, or a fraction below 1); null: all of them."""
    batch_size: int = Field(1, ge=1)
    """The harness's batch size."""
    num_fewshot: int | None = Field(None, ge=0)
    """Few-shot examples; null: each task's own default."""
    model: str | None = None
    """The harness's model type; null: `hf` for lm-eval (the exported LLM), `llava_hf` for
    lmms-eval (the LVLM checkpoint)."""
    model_args: dict[str, str | int | float | bool] = {}
    """Extra `--model_args` (e.g. `dtype: bfloat16`, `max_length: 4096`)."""
    extra_args: list[str] = []
    """More command-line arguments, passed as they are (e.g. `[--apply_chat_template]`)."""
    threads: int | None = Field(None, ge=1)
    """CPU threads of the harness process (OMP/MKL); null: every CPU this process may use."""
    offline: bool = True
    """HF_HUB_OFFLINE and HF_DATASETS_OFFLINE on: task data must be local or already cached."""
    timeout_s: float | None = Field(None, gt=0)
    """Stop a harness run after this long (it then fails the stage); null: no limit."""


class EvaluateConfig(Section):
    """Measure every model the pipeline produced (read by evaluate)."""

    data: Mix = ["synthetic/eval/vqa"]
    """Held-out sets, each measured on its own: multiple-choice accuracy when records carry
    `choices` (the synthetic questions), else exact match of the generated answer."""
    samples: int | None = Field(None, ge=6)
    """Held-out records per set, balanced over kinds (null: all of them)."""
    batch_size: int = Field(16, ge=1)
    """Evaluation batch size."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto`: bf16 autocast where the hardware runs it fast, else fp32."""
    text: bool = True
    """Measure text skill (data/text) for every model and the base LLM."""
    speed_batch: int = Field(4, ge=1)
    """Prompts per batch in the prefill/decode speed measurement."""
    new_tokens: int = Field(16, ge=2)
    """Tokens decoded per prompt in the speed measurement."""
    speed_repeats: int = Field(3, ge=0)
    """Timed repeats (median reported); 0 skips speed."""
    prune_curve: list[int] = [0, 1, 2, 3, 4]
    """Layers removed (by the prune ranking) for the accuracy-vs-layers-removed curve; [] skips it."""
    curve_samples: int | None = Field(300, ge=6)
    """Held-out questions per point of that curve."""
    models: list[Literal["aligned", "tuned", "pruned"]] = ["aligned", "tuned", "pruned"]
    """Which of the pipeline's models to measure (a sweep measures the aligned model once)."""
    extra_models: dict[str, str] = {}
    """More checkpoints to measure, name -> directory (e.g. `all-layer: path/to/merged`)."""
    baseline: str | None = None
    """Name of the model that retention % is computed against (e.g. an all-layer-tuned model
    in `extra_models`); null: no retention column."""
    lm_eval: HarnessConfig = HarnessConfig()
    """lm-evaluation-harness on each model's LLM, exported to `models/llm/<name>` (text tasks:
    MMLU, BBH, ... and the shipped `vregion_text_mc`)."""
    lmms_eval: HarnessConfig = HarnessConfig()
    """lmms-eval on each LVLM checkpoint (image tasks: MME, POPE, ... and the shipped
    `vregion_vqa`; `llava_hf` runs generation tasks only)."""


class Params(Section):
    """All of params.yaml."""

    model: ModelConfig = ModelConfig()
    """The starting LVLM (read by base, prepare, align and later stages)."""
    data: DataConfig = DataConfig()
    """Synthetic, text-skill and LLaVA-format data (read by prepare)."""
    align: AlignConfig = AlignConfig()
    """Stage-1 alignment (read by align)."""
    probe: ProbeConfig = ProbeConfig()
    """Layer scoring (read by probe)."""
    region: RegionConfig = RegionConfig()
    """Choice of the visual region (read by probe; finetune and prune read reports/region.json)."""
    finetune: FinetuneConfig = FinetuneConfig()
    """Selective visual instruction tuning (read by finetune)."""
    prune: PruneConfig = PruneConfig()
    """Layer pruning outside the region (read by prune)."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """Measurements of every model (read by evaluate and report)."""

    @model_validator(mode="after")
    def _known_sources(self) -> Params:
        known = set(SYNTHETIC_SOURCES) | set(self.data.sources)
        for section in ("align", "probe", "finetune", "prune", "evaluate"):
            cfg = getattr(self, section)
            for field in ("data", "eval_data"):
                for entry in getattr(cfg, field, None) or []:
                    if entry.source not in known:
                        raise ValueError(
                            f"{section}.{field}: unknown source {entry.source!r}; name one of "
                            f"{sorted(known)} (real data: add it under data.sources)"
                        )
        return self


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read params.yaml; a missing file or a wrong value raises ConfigError saying what to fix."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{path}: no such params file (run from the project root or pass --params)"
        )
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_explain(path, err)) from None


class ConfigError(ValueError):
    """A params file or value that the pipeline cannot run with."""


def _explain(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: {err.error_count()} invalid value(s):"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        got = e.get("input")
        lines.append(f"  {where}: {e['msg']} (got {got!r})")
    return "\n".join(lines)
