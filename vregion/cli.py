"""The `vregion` command line.

Each subcommand is an `add_<name>(subparsers)` function that declares its arguments and sets
`run` to a function of the parsed arguments returning an exit code; append it to `SUBCOMMANDS`.
Heavy imports (torch, transformers) happen inside the `run` functions so `--help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

DESCRIPTION = """\
vregion: activate the visual region of an LLM. Visual instruction tuning trains only a sparse,
uniformly spread ~25% of the LLM's layers (plus the projector); layers outside that region are
then pruned, for the same visual quality at less training time and a smaller model."""

TINY_PREFIX = "tiny:"
MODEL_HELP = (
    "a local checkpoint directory, a Hugging Face id (must be cached when HF_HUB_OFFLINE=1), "
    "`tiny:<arch>` for a tiny random model (one per model_type in `vregion layers --families`, "
    "plus llava_siglip), or `embedded` / `embedded-tiny` for the embedded default's layout"
)


class ModelSpecError(ValueError):
    """A MODEL argument that names nothing vregion can build or load."""


def open_model(spec: str):
    """The model a MODEL argument names, for inspection: weights are not needed.

    A checkpoint or HF id is built on the meta device from its config (nothing read but
    config.json, so a 7B model costs nothing); tiny and embedded models are built in memory.
    """
    if spec.startswith(TINY_PREFIX):
        from vregion.models.tiny import TINY_ARCHS, tiny_lvlm

        arch = spec[len(TINY_PREFIX) :]
        if arch not in TINY_ARCHS:
            raise ModelSpecError(
                f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHS)}"
            )
        return tiny_lvlm(arch)
    if spec in ("embedded", "embedded-tiny"):
        return _embedded_model(tiny=spec == "embedded-tiny")
    from vregion.models.loading import empty_lvlm

    return empty_lvlm(spec)


def _embedded_model(tiny: bool):
    """The embedded default as the `base` stage assembles it, before tower pretraining."""
    from vregion.config import EmbeddedModelConfig
    from vregion.models import embedded

    cfg = EmbeddedModelConfig()
    if tiny:
        tokenizer = embedded.load_smollm2_tokenizer()
        llm = embedded.tiny_llm(tokenizer)
    else:
        llm, tokenizer = embedded.load_smollm2()
    embedded.build_processor(tokenizer, cfg)  # adds the image token to the tokenizer
    return embedded.assemble_llava(llm, tokenizer, cfg)


# ---- vregion layers ----------------------------------------------------------------------------


def add_layers(subparsers) -> None:
    p = subparsers.add_parser(
        "layers",
        help="print an LVLM's layer map: LLM layers, vision tower, projector, LM head",
        description="Print where the LLM decoder layers, vision tower, projector and LM head of "
        "an LVLM live, with parameter counts per layer and per part.",
    )
    p.add_argument("model", metavar="MODEL", nargs="?", help=MODEL_HELP)
    p.add_argument(
        "--families",
        action="store_true",
        help="instead, print the supported and refused LVLM families as a markdown table "
        "(what the README shows), with the paths found on each family's tiny model",
    )
    p.set_defaults(run=run_layers)


def run_layers(args: argparse.Namespace) -> int:
    from vregion.models.layer_map import describe, families_table, layer_map

    if args.families == (args.model is not None):
        raise ModelSpecError("give either a MODEL or --families")
    if args.families:
        print(families_table())
        return 0
    print(describe(layer_map(open_model(args.model))))
    return 0


# ---- vregion remote ----------------------------------------------------------------------------


def add_remote(subparsers) -> None:
    p = subparsers.add_parser(
        "remote",
        help="point this DVC repo's cache at the S3 store from VREGION_S3_* (checked first)",
        description="Check the S3 store named by VREGION_S3_ENDPOINT_URL / VREGION_S3_BUCKET "
        "(credentials VREGION_S3_ACCESS_KEY_ID / VREGION_S3_SECRET_ACCESS_KEY, or AWS_*), then "
        "make it the default DVC remote: URL and endpoint in .dvc/config (committed), the key "
        "pair only in .dvc/config.local (git-ignored). After it, `dvc push` / `dvc pull` share "
        "every stage output.",
    )
    p.add_argument("--name", default="storage", help="DVC remote name (default: storage)")
    p.add_argument("--repo", default=".", help="DVC repo directory (default: .)")
    p.set_defaults(run=run_remote)


def run_remote(args: argparse.Namespace) -> int:
    from vregion.storage import S3Settings, check_s3, configure_dvc_remote

    settings = S3Settings.from_env()
    check_s3(settings)
    url = configure_dvc_remote(args.repo, settings, name=args.name)
    print(f"DVC remote '{args.name}' -> {url} ({settings.where}); credentials in .dvc/config.local")
    return 0


# ---- vregion params ----------------------------------------------------------------------------


def add_params(subparsers) -> None:
    p = subparsers.add_parser(
        "params",
        help="list every params.yaml field: its type, default and what it does",
        description="Print every field of params.yaml (vregion/config.py), one section per "
        "stage, with its type, default and documentation; with --check, validate a params file "
        "the way every stage does.",
    )
    p.add_argument("section", nargs="?", help="only this section (e.g. finetune, data)")
    p.add_argument("--check", metavar="FILE", help="validate FILE (e.g. params.yaml) and exit")
    p.set_defaults(run=run_params)


def run_params(args: argparse.Namespace) -> int:
    from vregion.config import Params, load_params

    if args.check:
        from vregion.region.registry import check_params

        check_params(load_params(args.check))  # also the scorer and strategy names
        print(f"{args.check}: valid")
        return 0
    fields = field_docs(Params)
    if args.section:
        fields = [f for f in fields if f[0] == args.section or f[0].startswith(args.section + ".")]
        if not fields:
            raise ValueError(f"no params section {args.section!r}")
    for name, kind, default, doc in fields:
        print(f"{name}: {kind} = {default!r}")
        for line in (doc or "").split("\n"):
            print(f"    {line.strip()}")
    return 0


def field_docs(model, prefix: str = "") -> list[tuple[str, str, object, str | None]]:
    """(dotted name, type, default, docstring) of every leaf field of a config model."""
    from pydantic import BaseModel

    out = []
    for name, info in model.model_fields.items():
        dotted = f"{prefix}{name}"
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out += field_docs(kind, dotted + ".")
            continue
        default = info.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = [d.model_dump() if hasattr(d, "model_dump") else d for d in default]
        label = kind.__name__ if isinstance(kind, type) else str(kind)
        label = label.replace("typing.", "").replace("vregion.config.", "")
        out.append((dotted, label, default, info.description))
    return out


# ------------------------------------------------------------------------------------------------

SUBCOMMANDS: list[Callable] = [add_layers, add_remote, add_params]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vregion",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that are the user's to fix: reported in one line, without a traceback."""
    from vregion.models.layer_map import UnsupportedArchitectureError
    from vregion.storage import StorageError

    return (
        ModelSpecError,
        FileNotFoundError,
        UnsupportedArchitectureError,
        StorageError,
        ValueError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 failed, 2 bad usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return int(e.code or 0)
    try:
        return args.run(args)
    except _user_errors() as e:
        print(f"vregion: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
