"""vregion.progress: the events a long loop sends its reporters, and the compact log line."""

from __future__ import annotations

from vregion import progress


def test_track_sends_an_event_per_item_with_the_noted_fields():
    events: list[dict] = []
    progress.reporters.append(events.append)
    try:
        bar = progress.track(range(3, 6), desc="train", unit="step", initial=2, total=5)
        for step in bar:
            bar.note(loss=1.0 / step, lr=1e-4)
    finally:
        progress.reporters.remove(events.append)
    assert [e["done"] for e in events] == [3, 4, 5]
    assert all(e["total"] == 5 and e["initial"] == 2 and e["phase"] == "train" for e in events)
    assert events[-1]["loss"] == 1.0 / 5 and events[-1]["elapsed"] >= events[0]["elapsed"]
    # first (after a resume), every 2nd, last
    assert [progress.log_due(e, every=2) for e in events] == [True, True, True]
    assert [progress.log_due(e, every=10) for e in events] == [True, False, True]


def test_describe_is_one_compact_line():
    line = progress.describe(
        {"phase": "finetune (worker 0)", "done": 20, "total": 300, "unit": "step",
         "initial": 0, "elapsed": 30.0, "loss": 1.23456, "lr": 2e-4}
    )  # fmt: skip
    assert line == (
        "finetune (worker 0): step 20/300 (7%) loss 1.2346 lr 2.00e-04 1.5 s/step ETA 7m00s"
    )
    # a loop of unknown length: no percentage, no ETA
    assert (
        progress.describe(
            {"phase": "scan", "done": 4, "total": None, "unit": "it", "initial": 0, "elapsed": 2.0}
        )
        == "scan: it 4 0.5 s/it"
    )


def test_worker_progress_forwards_line_worthy_events_and_throttles_the_rest():
    from vregion.distributed import worker_progress

    class Relay:
        def __init__(self):
            self.items = []

        def put_nowait(self, item):
            self.items.append(item["done"])

    relay = Relay()
    forward = worker_progress(relay, every=5, min_interval=3600)
    for done in range(1, 13):
        forward({"done": done, "total": 12, "initial": 0})
    assert relay.items == [1, 5, 10, 12]
