"""Shared test settings: offline, quiet, and every service's state in temporary directories."""

import os
import tempfile

# Set before transformers / prefect / ray / dvc are imported anywhere in the test session.
_STATE = tempfile.mkdtemp(prefix="vregion-tests-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["PREFECT_HOME"] = os.path.join(_STATE, "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "90"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
# Ray swaps 127.0.0.1 for the routable IP and binds on all interfaces unless told not to.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
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


def pytest_sessionfinish(session, exitstatus):
    """Stop the Prefect server that stage subprocesses started in the session's PREFECT_HOME."""
    from pathlib import Path

    from infra import prefect_server

    prefect_server.stop(Path(os.environ["PREFECT_HOME"]))
