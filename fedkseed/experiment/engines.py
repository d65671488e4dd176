"""The engine registry: what runs a simulation's rounds, found by name.

An *engine* is a function ``engine(config, *, progress) -> Results``. "local" is built in
(``fedkseed.experiment.local``); others are entry points of the group ``fedkseed.engines``, e.g.
``flower = "fedkseed.flower.engine:run_flower"`` in fedkseed's own pyproject.toml. Engines are
looked up by name and loaded only when a run asks for them, so this layer never imports the
layers above it (the Flower engine needs flwr, an optional extra).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from ..errors import UsageError

GROUP = "fedkseed.engines"
# The built-in engine is declared like a plugin, so built-in and installed engines load alike.
BUILTIN = (EntryPoint(name="local", value="fedkseed.experiment.local:run_local", group=GROUP),)

Engine = Callable[..., Any]  # (config, *, progress: bool) -> Results


@lru_cache(maxsize=1)
def registry() -> dict[str, EntryPoint]:
    """Engine name -> its entry point: the built-in ones, then the installed ones (a built-in
    name cannot be taken over)."""
    found = {ep.name: ep for ep in BUILTIN}
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep)
    return found


def names() -> tuple[str, ...]:
    """The names ``--engine`` accepts."""
    return tuple(registry())


def load(name: str) -> Engine:
    """The engine function named ``name``; a UsageError when it is unknown or cannot load."""
    entry = registry().get(name)
    if entry is None:
        raise UsageError(f"--engine must be one of {', '.join(names())}, got {name!r}")
    try:
        return entry.load()
    except ImportError as error:
        raise UsageError(
            f"--engine {name} cannot be loaded ({error}); is its extra installed? e.g. pip install 'fedkseed[{name}]'"
        ) from None
