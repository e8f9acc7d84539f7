"""Progress of the long loops (tower pretraining, training steps, layer scoring, evaluation),
for whoever watches: a tqdm bar when stderr is a terminal, and events for the reporters an
orchestrator registers (the stages turn them into Prefect progress artifacts and log lines).

The library stays orchestrator-free: `track` only calls the callables in `reporters`. An event
is a dict: phase, done, total, unit, elapsed (s since the loop started), initial (the step a
resumed loop started from), and the fields the loop noted for that item (loss, lr, ...).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator

from tqdm.auto import tqdm

Reporter = Callable[[dict], None]
reporters: list[Reporter] = []
"""Called with every event, in the loop's thread; a reporter throttles itself (`log_due`)."""


def log_every() -> int:
    """N of "a compact log line every N steps" (env VREGION_LOG_EVERY, default 10)."""
    return max(1, int(os.environ.get("VREGION_LOG_EVERY", "10")))


def log_due(event: dict, every: int) -> bool:
    """The first item, every `every`-th and the last deserve a log line."""
    done = event["done"]
    return done == event["initial"] + 1 or done % every == 0 or done == event["total"]


def emit(event: dict) -> None:
    for report in list(reporters):
        report(event)


class track:  # noqa: N801 - used like tqdm, which it wraps
    """`for x in track(items, desc=..., total=...)`: a terminal bar plus an event per item.

    `note(**fields)` attaches values (loss, lr) to the item being processed; they go with its
    event and into the bar's postfix.
    """

    def __init__(
        self,
        iterable: Iterable,
        *,
        desc: str,
        total: int | None = None,
        unit: str = "it",
        initial: int = 0,
        leave: bool = True,
    ):
        self.iterable, self.desc, self.unit, self.initial = iterable, desc, unit, initial
        self.total = total if total is not None else _length(iterable, initial)
        self.fields: dict = {}
        # disable=None: a bar only on a terminal; in a log file or a flow run's logs, the
        # reporters' lines say the same in a few lines instead of hundreds of carriage returns.
        self.bar = tqdm(
            desc=desc, total=self.total, unit=unit, initial=initial, leave=leave, disable=None
        )

    def note(self, **fields) -> None:
        self.fields.update(fields)
        self.bar.set_postfix(
            {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in fields.items()}
        )

    def __iter__(self) -> Iterator:
        start, done = time.monotonic(), self.initial
        try:
            for item in self.iterable:
                yield item
                done += 1
                self.bar.update(1)
                if reporters:
                    emit(
                        {
                            "phase": self.desc,
                            "done": done,
                            "total": self.total,
                            "unit": self.unit,
                            "initial": self.initial,
                            "elapsed": time.monotonic() - start,
                            **self.fields,
                        }
                    )
        finally:
            self.bar.close()


def _length(iterable, initial: int) -> int | None:
    try:
        return initial + len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def describe(event: dict) -> str:
    """One compact line: `finetune: step 20/300 (7%) loss 1.234 lr 2.0e-04 1.53 s/step ETA 7m08s`."""
    done, total, unit = event["done"], event["total"], event["unit"]
    parts = [f"{event['phase']}: {unit} {done}" + (f"/{total}" if total else "")]
    if total:
        parts[0] += f" ({100 * done / total:.0f}%)"
    if "loss" in event:
        parts.append(f"loss {event['loss']:.4f}")
    if "lr" in event:
        parts.append(f"lr {event['lr']:.2e}")
    per = event["elapsed"] / max(1, done - event["initial"])
    parts.append(f"{per:.3g} s/{unit}")
    if total:
        eta = round(per * (total - done))
        parts.append(f"ETA {eta // 60}m{eta % 60:02d}s")
    return " ".join(parts)
