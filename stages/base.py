"""base: the pipeline's starting LVLM in models/base/ (HF checkpoint + processor).

`model.base: embedded` builds SmolLM2-135M-Instruct + a SigLIP tower pretrained on synthetic
patches (no pretrained vision weights exist offline); `model.base: assemble` builds a LLaVA from
the LLM, CLIP/SigLIP tower and stage-1 projector named in `model.assemble`; anything else is an
HF id or a local directory, saved as it is.
"""

from __future__ import annotations

import shutil
import sys

from prefect import flow

from stages._common import run_stage, write_json
from vregion.config import load_params
from vregion.models.base import (
    ASSEMBLE,
    EMBEDDED,
    build_assembled,
    build_embedded,
    copy_pretrained,
)

OUT = "models/base"
METRICS = "metrics/base.json"


@flow(name="base", log_prints=True)
def base(params: str = "params.yaml") -> dict:
    p = load_params(params)
    shutil.rmtree(OUT, ignore_errors=True)
    if p.model.base in EMBEDDED:
        metrics = build_embedded(p.model, OUT, max_objects=p.data.max_objects)
    elif p.model.base == ASSEMBLE:
        metrics = build_assembled(p.model, OUT)
    else:
        metrics = copy_pretrained(p.model.base, OUT)
    write_json(METRICS, metrics)
    return metrics


if __name__ == "__main__":
    sys.exit(run_stage(base, __doc__))
