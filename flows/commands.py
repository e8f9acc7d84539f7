"""Running `dvc` and other commands from a flow: captured, or streamed line by line to its log."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from collections.abc import Mapping
from pathlib import Path

TAIL_LINES = 30
"""How many last output lines a failing command's error quotes."""


def run_dvc(repo: str | Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m dvc ARGS` in `repo`, output captured (no analytics)."""
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=repo,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def stream(cmd: list[str], repo: str | Path, env: Mapping[str, str], logger) -> tuple[int, str]:
    """Run `cmd`, log each output line as it comes; (exit code, last lines)."""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    with subprocess.Popen(
        cmd,
        cwd=repo,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                logger.info(line)
        code = proc.wait()
    return code, "\n".join(tail)
