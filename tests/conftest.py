"""Shared test settings: offline, quiet, and every service's state in temporary directories."""

import os
import tempfile

from infra.environment import defaults

# Set before transformers / prefect / ray / dvc are imported anywhere in the test session:
# the project's defaults, forced (a developer's own settings must not leak into tests), with
# every service's state in a temporary directory.
_STATE = tempfile.mkdtemp(prefix="vregion-tests-")
os.environ.update(defaults(_STATE))
os.environ["PREFECT_HOME"] = os.path.join(_STATE, "prefect")
os.environ.pop("PREFECT_API_URL", None)
# Stages run as subprocesses share one Prefect server per PREFECT_HOME (infra.prefect_server.
# shared); in tests it stops after a minute without a flow run, the session's at the end.
os.environ["VREGION_PREFECT_IDLE_STOP"] = "60"

import pytest  # noqa: E402

pytest_plugins = ["s3_fixtures"]  # real SeaweedFS on free loopback ports (tests/s3_fixtures.py)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops on 2 busy cores: OpenMP threads spinning against each other make a 10 ms forward
    take seconds, so tests of tiny models run single-threaded (`pytestmark` in their module)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_processor():
    """The embedded model's real processor (SmolLM2 tokenizer + image token + SigLIP pixels)."""
    from vregion.config import EmbeddedModelConfig
    from vregion.models.embedded import build_processor, load_smollm2_tokenizer

    return build_processor(load_smollm2_tokenizer(), EmbeddedModelConfig())


@pytest.fixture(scope="session")
def tiny_embedded_dir(tmp_path_factory):
    """An `embedded-tiny` checkpoint: the embedded model's code path with a random 4-layer LLM."""
    from vregion.config import EmbeddedModelConfig, ModelConfig
    from vregion.models.base import build_embedded

    out = tmp_path_factory.mktemp("embedded-tiny")
    cfg = ModelConfig(
        base="embedded-tiny",
        embedded=EmbeddedModelConfig(tower_pretrain_steps=20, tower_pretrain_batch_size=16),
    )
    metrics = build_embedded(cfg, out, max_objects=3)
    return out, metrics


@pytest.fixture(scope="session")
def built_pipeline(tmp_path_factory):
    """The tiny pipeline built once by `dvc repro` (~2 min on 2 cores), shared by the tests that
    check the build itself and those that start from a built repo (the sweep)."""
    from pipeline_repo import build_pipeline, stop_prefect

    repo = tmp_path_factory.mktemp("pipeline")
    try:
        yield build_pipeline(repo, tmp_path_factory.mktemp("pipeline-snapshot"))
    finally:
        if (repo / ".prefect" / "server.json").is_file():
            stop_prefect(repo)


def pytest_sessionfinish(session, exitstatus):
    """Stop the Prefect server that stage subprocesses started in the session's PREFECT_HOME."""
    from pathlib import Path

    from infra import prefect_server

    prefect_server.stop(Path(os.environ["PREFECT_HOME"]))
