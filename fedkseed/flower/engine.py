"""``fedkseed simulate --engine flower``: the run on Flower's simulation runtime (Ray backend).

The ServerApp runs in this process (so ``run_flower`` returns the ``Results`` that
``simulate`` writes, like the local engine); each client is a virtual SuperNode whose
``partition-id`` is its client id, and the ClientApp runs in Ray actors.
"""

from __future__ import annotations

import logging
import os

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from .. import simulate as sim
from . import client_app as client_module
from .server_app import serve

ROUND_TIMEOUT = 3600.0  # seconds; in simulation every virtual node answers or fails


def backend_config() -> dict:
    """One CPU per ClientApp actor, as many actors as cores (Ray's own default is 2 per actor)."""
    cores = max(1, os.cpu_count() or 1)
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": cores}}


def run_flower(config: sim.SimConfig, *, progress: bool = True, client_app: ClientApp | None = None) -> sim.Results:
    """Run ``config`` with ``config.clients`` virtual SuperNodes; ``client_app`` defaults to
    fedkseed's (tests pass a wrapped one to inject faults)."""
    setup = sim.prepare(config)
    results: list[sim.Results] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        results.append(serve(grid, setup, min_nodes=config.clients, timeout=ROUND_TIMEOUT, progress=progress))

    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)  # Flower's per-round INFO lines would drown the table
    try:
        run_simulation(server_app, client_app or client_module.app, num_supernodes=config.clients,
                       backend_name="ray", backend_config=backend_config())
    finally:
        flwr_logger.setLevel(level)
    if not results:
        raise RuntimeError("the Flower simulation ended without results (see the log above)")
    return results[0]
