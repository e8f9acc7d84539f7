"""ingest@<name>: validate one real data source (`data.sources.<name>`) into data/sources/<name>/.

The records file (LLaVA format: a JSON list or JSONL) is checked record by record and every
image it names is checked once, in parallel, headers only unless `full_decode` (nothing outside
the image root is ever opened). Valid records are written as JSONL with an index (byte offsets,
token lengths with the base model's processor, image flags) that the training stages stream
from; broken ones go to data/sources/<name>/quarantine.json with file, record, field and reason.
Images stay where they are: source.json records the image root, and `revision` in params is
how a change of images reaches DVC. A file that cannot be read, or that yields no valid
record, stops the stage with exit 2 and what to fix.
"""

from __future__ import annotations

import sys

from prefect import flow

from stages._common import log, run_stage, write_json
from vregion.config import ConfigError, load_params
from vregion.data.sources import ingest_source
from vregion.models.loading import load_processor


@flow(name="ingest", log_prints=True)
def ingest(source: str, base: str, out: str, metrics: str, params: str = "params.yaml") -> dict:
    """Validate one real data source.

    Args:
        source: name under data.sources
        base: base checkpoint (its processor counts tokens)
        out: directory for the validated records
        metrics: metrics file to write
        params: params file
    """
    p = load_params(params)
    cfg = p.data.sources.get(source)
    if cfg is None:
        raise ConfigError(
            f"data.sources has no source {source!r} (it has: {sorted(p.data.sources) or 'none'})"
        )
    result = ingest_source(
        source,
        cfg,
        load_processor(base),
        out,
        system_prompt=p.model.system_prompt,
        max_tokens=p.data.max_tokens,
        workers=p.data.validate_workers,
    )
    write_json(metrics, result)
    log.info(
        "ingest %s: %d of %d records kept (%d quarantined), %.0f records/s",
        source,
        result["records"],
        result["records_read"],
        result["quarantined"],
        result["records_per_second"],
    )
    return result


if __name__ == "__main__":
    sys.exit(run_stage(ingest, __doc__, positional=("source", "name under data.sources")))
