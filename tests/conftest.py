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
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.pop("PREFECT_API_URL", None)
