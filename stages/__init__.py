"""One file per DVC stage; each entry point is a Prefect flow (`python -m stages.<name>`)."""
