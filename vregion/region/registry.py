"""Name -> function registries of layer scorers and region strategies (no torch here).

A scorer or a strategy is one function and one decorator in the module that defines it:

    @scorer("block_influence")            # vregion/region/scores.py
    def block_influence(model, batches): ...

    @strategy("uniform")                  # vregion/region/select.py
    def uniform_layers(num_layers, count): ...

Its name is then valid in params.yaml (`probe.scorers`, `region.strategy`). The registries are
filled when their module is imported; `check_params` tells an unknown name apart before any
model loads (the stage shell `stages/_common.run_stage` calls it right after `load_params`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable

from vregion.config import ConfigError, Params


class Registry:
    """Functions by name, filled by a decorator; `module` is where the built-in ones live."""

    def __init__(self, kind: str, field: str, module: str):
        self.kind = kind  # what one entry is called in messages: "scorer", "strategy"
        self.field = field  # the params.yaml field that names entries
        self.module = module  # importing it registers the built-in entries
        self._entries: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[Callable], Callable]:
        """Decorator: make the function available as `name` (a name is registered once)."""

        def add(fn: Callable) -> Callable:
            if name in self._entries and self._entries[name] is not fn:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = fn
            return fn

        return add

    def _load(self) -> None:
        importlib.import_module(self.module)

    def names(self) -> list[str]:
        """Every registered name, the built-in ones first."""
        self._load()
        return list(self._entries)

    def get(self, name: str) -> Callable:
        self._load()
        if name not in self._entries:
            raise ValueError(self.unknown_message([name]))
        return self._entries[name]

    def __iter__(self):
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def unknown_message(self, unknown: Iterable[str], extra: Iterable[str] = ()) -> str:
        known = ", ".join([*self._entries, *extra])
        return f"{self.field}: unknown {self.kind} {', '.join(map(repr, unknown))}; known: {known}"


SCORERS = Registry("scorer", "probe.scorers", "vregion.region.scores")
"""Layer scorers: `fn(model, batches)` -> one float per LLM layer (or a dict of such lists,
the first key being the scorer's own name); add `reference_model` as a keyword parameter to get
the model before probe tuning (see `parameter_change`)."""
STRATEGIES = Registry("strategy", "region.strategy", "vregion.region.select")
"""Region strategies: `fn(num_layers, count)` -> the layer indices; optional keyword parameters
`seed`, `scores`, `most_important` and `layers` receive the `region.*` settings."""
TOPK_PREFIX = "topk:"
"""`region.strategy: topk:<scorer>` ranks layers by that scorer's probe scores."""

scorer = SCORERS.register
strategy = STRATEGIES.register


def check_strategy(name: str) -> None:
    """ConfigError naming `region.strategy` unless `name` is registered or `topk:<scorer>`."""
    if name.startswith(TOPK_PREFIX) and len(name) > len(TOPK_PREFIX):
        return
    if name not in STRATEGIES:
        raise ConfigError(STRATEGIES.unknown_message([name], extra=[f"{TOPK_PREFIX}<scorer>"]))


def check_scorers(names: Iterable[str]) -> None:
    """ConfigError naming `probe.scorers` unless every name is registered."""
    unknown = [n for n in names if n not in SCORERS]
    if unknown:
        raise ConfigError(SCORERS.unknown_message(unknown))


def check_params(p: Params, *, loaded_only: bool = False) -> None:
    """Refuse unknown scorer and strategy names in `p` with ConfigError (exit 2 in a stage).

    Strategies are plain Python and always checked. Scorers live beside torch: with
    `loaded_only` they are checked only when this process has already imported them, i.e. in a
    stage that scores layers (which has torch loaded anyway); a stage that never scores (`report`)
    then pays nothing for the check.
    """
    check_strategy(p.region.strategy)
    if not loaded_only or SCORERS.module in sys.modules:
        check_scorers(p.probe.scorers)
