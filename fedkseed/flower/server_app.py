"""fedkseed's ServerApp: the local engine's round loop with Flower moving the bytes.

``serve(grid, setup, ...)`` runs the experiment ``setup`` over a Flower ``Grid`` and returns the
same ``Results`` as ``fedkseed.simulate.run_local`` (same per-round records, final block,
checkpoint after every round, so ``--resume`` works across engines); it also writes
``flower.json`` (who enrolled, who was absent, failed or rejected, and the model digests
checked each round). ``app`` is the deployable ServerApp: it reads the SimConfig from the run
config (``flwr run ... --run-config 'rounds=3 output="/abs/path"'``) and writes the output
folder like ``fedkseed simulate``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from logging import INFO

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from .. import simulate as sim
from ..atomic import save_atomically
from ..fed import RoundSummary
from . import protocol as P
from .strategy import FedKSeedStrategy, RoundLog

FLOWER_FILE = "flower.json"


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(list(grid.get_node_ids()))} of {count} nodes connected within {timeout:g} s")
        time.sleep(0.2)


def serve(grid: Grid, setup: sim.Setup, *, min_nodes: int, timeout: float, progress: bool) -> sim.Results:
    """Run the remaining rounds over Flower's grid with the local engine's bookkeeping."""
    book = sim.RunBook(setup, progress=progress)
    server, replica = setup.server, setup.replica
    transport: list[dict] = []

    def on_round(summary: RoundSummary, round_log: RoundLog, started: float) -> str:
        transport.append(dataclasses.asdict(round_log))
        book.bar.update(book.steps_per_round)
        book.record(summary, started)
        save_atomically(book.output / FLOWER_FILE,
                            lambda p: p.write_text(json.dumps(transport, indent=2) + "\n"))
        return P.weights_digest(replica.params)

    wait_for_nodes(grid, min_nodes, timeout)
    strategy = FedKSeedStrategy(server, P.config_to_json(setup.config), P.weights_digest(replica.params),
                                on_round, timeout)
    strategy.start(grid, ArrayRecord(), num_rounds=setup.config.rounds - server.round, timeout=timeout)
    return book.finish()


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment: the SimConfig comes from the run config; outputs go to its ``output``."""
    config, options = P.config_from_run_config(context.run_config)
    log(INFO, "fedkseed: %s", config)
    results = serve(grid, sim.prepare(config), min_nodes=options[P.MIN_NODES], timeout=options[P.ROUND_TIMEOUT],
                    progress=False)
    sim.write_outputs(results)
    log(INFO, "fedkseed: outputs written to %s", config.output)
