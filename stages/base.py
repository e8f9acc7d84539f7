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


@flow(name="base", log_prints=True)
def base(out: str, metrics: str, params: str = "params.yaml") -> dict:
    """Build or copy the base LVLM.

    Args:
        out: checkpoint directory to write
        metrics: metrics file to write
        params: params file
    """
    p = load_params(params)
    shutil.rmtree(out, ignore_errors=True)
    if p.model.base in EMBEDDED:
        result = build_embedded(p.model, out, max_objects=p.data.max_objects)
    elif p.model.base == ASSEMBLE:
        result = build_assembled(p.model, out)
    else:
        result = copy_pretrained(p.model.base, out)
    write_json(metrics, result)
    return result


if __name__ == "__main__":
    sys.exit(run_stage(base, __doc__))
