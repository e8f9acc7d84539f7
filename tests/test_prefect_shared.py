"""The Prefect server the stages of a run share: started once per PREFECT_HOME in its own session,
reused by the next stage, stopped by its watchdog once no flow run has run for a while."""

from __future__ import annotations

import time

from infra import prefect_server, process


def test_shared_server_is_reused_then_stops_itself_when_idle(tmp_path, monkeypatch):
    home = tmp_path / ".prefect"
    monkeypatch.setenv("VREGION_PREFECT_IDLE_STOP", "5")
    url = prefect_server.shared(home)
    try:
        pid = prefect_server.running_state(home)["pid"]
        assert prefect_server.healthy(url)
        began = time.monotonic()
        assert prefect_server.shared(home) == url  # the next stage: no second server
        assert time.monotonic() - began < 2
        deadline = time.monotonic() + 60  # idle 5 s, polled every 5 s, SIGTERM
        while process.alive(pid) and time.monotonic() < deadline:
            time.sleep(1)
        assert not process.alive(pid) and prefect_server.running_state(home) is None
    finally:
        prefect_server.stop(home)
