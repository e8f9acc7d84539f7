"""Start, check and stop the local services vregion can use, each on 127.0.0.1 only:

- `s3`      SeaweedFS `weed mini`, an S3-compatible store for DVC and Ray Train checkpoints
- `prefect` a Prefect server (API + UI) that collects the stages' flow runs
- `ray`     a Ray head node that Ray Train jobs join through RAY_ADDRESS

    python -m infra <s3|prefect|ray|all> <start|status|stop> [options]    (--help for options)

State, logs and pid files live in git-ignored directories of the project (`.s3/`,
`.prefect/`, `.ray/`). None of this is needed to run the pipeline: without these services
DVC keeps a local cache, each stage starts a temporary Prefect server, and Ray runs in-process.
"""
