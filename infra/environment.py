"""The offline and quiet environment defaults, in one place: stages, flows and tests apply them
before Prefect, Ray, DVC or transformers are imported (a value the user set always wins).

Runs never download (HF_HUB_OFFLINE), no tool phones home, a local Ray stays on loopback, and
Prefect keeps its state inside the project.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

RAY = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    # Ray swaps 127.0.0.1 for the routable IP and binds on all interfaces unless told not to.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}
"""What every Ray process needs, the head and worker nodes that `infra` starts included."""


def defaults(root: str | os.PathLike | None = None) -> dict[str, str]:
    """The defaults for a project rooted at `root` (default: DVC_ROOT, else the working
    directory: a queued DVC experiment runs in a temporary copy, and DVC_ROOT keeps its
    Prefect state with the repo's own runs)."""
    root = root or os.environ.get("DVC_ROOT") or os.getcwd()
    return {
        "HF_HUB_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "PREFECT_HOME": os.path.join(root, ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "vregion",  # library logs show up in flow run logs
        **RAY,
        "TOKENIZERS_PARALLELISM": "false",
    }


def apply_defaults(
    environ: MutableMapping[str, str] | None = None, root: str | os.PathLike | None = None
) -> None:
    """Set each default that `environ` (default: os.environ) does not set already."""
    environ = os.environ if environ is None else environ
    for key, value in defaults(root).items():
        environ.setdefault(key, value)
