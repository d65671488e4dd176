"""``fedkseed simulate --engine flower``: the run on Flower's simulation runtime (Ray backend).

Registered as the engine "flower" through the ``fedkseed.engines`` entry point (pyproject.toml),
so the experiment layer finds it by name without importing this layer. The ServerApp runs in
this process (so ``run_flower`` returns the ``Results`` that ``simulate`` writes, like the local
engine); each client is a virtual SuperNode whose ``partition-id`` is its client id, and the
ClientApp runs in Ray actors. There are no node keys in simulation: ids are the partition ids.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

# Imported before any run: its import sets process-wide defaults in os.environ (Ray's
# RAY_ENABLE_UV_RUN_RUNTIME_ENV), which _quiet_flower's restoring of the environment must keep.
import flwr.simulation  # noqa: F401
from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from ..experiment.config import SimConfig
from ..experiment.outputs import Results
from ..experiment.prepare import prepare
from . import client_app as client_module
from . import protocol as P
from .server_app import serve

ROUND_TIMEOUT = 3600.0  # seconds; in simulation every virtual node answers or fails

# Set before Ray starts, so the raylet and the ClientApp actors it forks inherit them (Ray's
# ``runtime_env`` cannot be used: Flower passes its own to ``ray.init``). Worker-side progress
# bars and advisories are noise in every mode: the server's bar and table say how the run goes.
# The actors' output that Ray forwards (without --quiet) is plain text: Ray prints its
# "(ClientAppActor pid=N)" prefix without colour codes (read in this process, as it prints), and
# Flower logs in the actors at ERROR: its only record there below that is the WARNING "Manually
# terminating ClientAppActor" each actor logs when the run ends, and its console handler would
# colour it. A variable the user has set is left as it is.
WORKER_ENV = {
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_COLOR_PREFIX": "0",
    "FLWR_LOG_LEVEL": "ERROR",
}


def backend_config(*, quiet: bool) -> dict[str, Any]:
    """One CPU per ClientApp actor, as many actors as cores (Ray's own default is 2 per actor).
    Quiet: Ray logs errors only and does not forward the actors' output (a ClientApp exception
    still reaches the driver: Flower logs it and the round records the failure)."""
    cores = max(1, os.cpu_count() or 1)
    init_args = {"num_cpus": cores, "logging_level": "ERROR" if quiet else "WARNING", "log_to_driver": not quiet}
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args}


class _DropDeprecationBanners(logging.Filter):
    """Flower's "DEPRECATED FEATURE" / "FEATURE UPDATE" banners: advice for Flower's users that
    fedkseed's users cannot act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith(("DEPRECATED FEATURE", "FEATURE UPDATE"))


@contextlib.contextmanager
def _quiet_flower() -> Iterator[None]:
    """Flower at WARNING (its per-round INFO lines would drown the table), its banners dropped,
    its records printed once (by the application's handlers when it has set logging up: Flower's
    own console handler would print each of them a second time), the worker environment
    exported, and Ray's one-off FutureWarning about a future default hidden; everything
    restored afterwards, the whole environment included: Flower's Ray backend exports the
    driver's ``sys.path`` as ``PYTHONPATH`` for its actors and leaves it set, so every process
    the caller started afterwards would import from the caller's ``sys.path`` (under
    ``python -m pytest``: the checkout, whose build metadata then passes for an installed
    fedkseed)."""
    flwr_logger = logging.getLogger("flwr")
    level, banner_filter = flwr_logger.level, _DropDeprecationBanners()
    own_handlers = list(flwr_logger.handlers) if flwr_logger.propagate and logging.getLogger().handlers else []
    saved = dict(os.environ)
    os.environ.update({name: value for name, value in WORKER_ENV.items() if name not in os.environ})
    flwr_logger.setLevel(logging.WARNING)
    flwr_logger.addFilter(banner_filter)
    for handler in own_handlers:
        flwr_logger.removeHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
            yield
    finally:
        for handler in own_handlers:
            flwr_logger.addHandler(handler)
        flwr_logger.removeFilter(banner_filter)
        flwr_logger.setLevel(level)
        for name in set(os.environ) - set(saved):
            del os.environ[name]
        os.environ.update((name, value) for name, value in saved.items() if os.environ.get(name) != value)


def _simulate(server_app: ServerApp, client_app: ClientApp, num_supernodes: int, config: dict[str, Any]) -> None:
    """Run the apps on the simulation runtime.

    Why the private ``_run_simulation``: in flwr 1.42 the public ``run_simulation`` is deprecated
    and is only a banner, a telemetry event and a call of ``_run_simulation``; the supported
    ``flwr run`` path ends in the same function (``flwr/simulation/app.py``), but in a separate
    ``flwr-simulation`` process behind a SuperLink, so the ServerApp could not hand ``Results``
    back in-process and tests could not inject a ClientApp object. Calling the runtime's own
    entry point keeps both. It is private, so it is checked: a Flower whose ``_run_simulation``
    lacks these parameters gets the public function (its banner is filtered by _quiet_flower).
    """
    try:
        from flwr.simulation.run_simulation import _run_simulation
        from flwr.supercore.telemetry import EventType
    except ImportError:
        _run_simulation = None
    wanted = {"num_supernodes", "exit_event", "client_app", "server_app", "backend_name", "backend_config"}
    if _run_simulation is not None and wanted <= set(inspect.signature(_run_simulation).parameters):
        _run_simulation(
            num_supernodes=num_supernodes,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,  # what run_simulation passes (telemetry only)
            client_app=client_app,
            server_app=server_app,
            backend_name="ray",
            backend_config=config,
        )
        return
    from flwr.simulation import run_simulation

    run_simulation(server_app, client_app, num_supernodes=num_supernodes, backend_name="ray", backend_config=config)


def run_flower(config: SimConfig, *, progress: bool = True, client_app: ClientApp | None = None) -> Results:
    """Run ``config`` with ``config.clients`` virtual SuperNodes; ``client_app`` defaults to
    fedkseed's (tests pass a wrapped one to inject faults). ``progress=False`` (``--quiet``):
    nothing from Flower or Ray but errors."""
    P.check_supported(config)
    setup = prepare(config)
    results: list[Results] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        results.append(serve(grid, setup, min_nodes=config.clients, timeout=ROUND_TIMEOUT, progress=progress))

    with _quiet_flower():
        _simulate(server_app, client_app or client_module.app, config.clients, backend_config(quiet=not progress))
    if not results:
        raise RuntimeError("the Flower simulation ended without results (see the log above)")
    return results[0]
