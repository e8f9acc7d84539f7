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

REGION = "reports/region.json"
ALIGN = "metrics/align.json"
TRAIN = "metrics/train.json"
PRUNE = "metrics/prune.json"
EVAL = "metrics/eval.json"
OUT = Path("reports/summary.md")


def read(path: str) -> dict:
    return json.loads(Path(path).read_text())


@flow(name="report", log_prints=True)
def report(params: str = "params.yaml") -> str:
    p = load_params(params)
    align = read(ALIGN) if Path(ALIGN).is_file() else {}
    text = summary(p.model.base, read(REGION), align, read(TRAIN), read(PRUNE), read(EVAL))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return str(OUT)


if __name__ == "__main__":
    sys.exit(run_stage(report, __doc__))
