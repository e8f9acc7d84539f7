"""report: reports/summary.md, readable on its own: what ran, the region, tables and pictures.

Every number comes from the metrics files of the stages before (metrics/*.json,
reports/region.json); `vregion/report.py` lays them out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prefect import flow

from stages._common import run_stage
from vregion.config import load_params
from vregion.report import summary


def read(path: str) -> dict:
    return json.loads(Path(path).read_text())


@flow(name="report", log_prints=True)
def report(
    region: str,
    align_metrics: str,
    train_metrics: str,
    prune_metrics: str,
    eval_metrics: str,
    out: str,
    params: str = "params.yaml",
) -> str:
    """Write the run's summary.

    Args:
        region: the region stage's region JSON
        align_metrics: the align stage's metrics
        train_metrics: the finetune stage's metrics
        prune_metrics: the prune stage's metrics
        eval_metrics: the evaluate stage's metrics
        out: summary markdown to write
        params: params file
    """
    p = load_params(params)
    align = read(align_metrics) if Path(align_metrics).is_file() else {}
    text = summary(
        p.model.base,
        read(region),
        align,
        read(train_metrics),
        read(prune_metrics),
        read(eval_metrics),
    )
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    sys.exit(run_stage(report, __doc__))
