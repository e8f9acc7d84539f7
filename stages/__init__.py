"""One file per DVC stage; each entry point is a Prefect flow (`python -m stages.<name>`) that
takes its paths from dvc.yaml's `cmd`. `deps` is no stage: it keeps dvc.yaml's code deps equal
to each stage's import closure (`python -m stages.deps --write`)."""
