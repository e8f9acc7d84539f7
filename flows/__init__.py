"""Prefect flows over the whole DVC pipeline (see `flows.pipeline`)."""
