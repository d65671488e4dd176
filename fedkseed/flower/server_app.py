"""fedkseed's ServerApp: the local engine's round loop with Flower moving the bytes.

``serve(grid, setup, ...)`` runs the experiment ``setup`` over a Flower ``Grid`` and returns the
same ``Results`` as the local engine, ``fedkseed.experiment.local`` (same per-round records,
final block, checkpoint after every round, so ``--resume`` works across engines); it also writes
``flower.json`` (who enrolled, who was absent, failed or rejected, and the model digests
checked each round). ``app`` is the deployable ServerApp: it reads the SimConfig from the run
config (``flwr run ... --run-config 'rounds=3 output="/abs/path"'``) and writes the output
folder like ``fedkseed simulate``; with ``node-keys`` (a file of node public keys -> client
ids, see ``identity``), only nodes whose authenticated key is listed get a client id.
"""

from __future__ import annotations

import dataclasses
import json
import time
from logging import INFO, WARNING

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from ..atomic import save_atomically
from ..experiment.folder import claim_output
from ..experiment.outputs import Results, write_outputs
from ..experiment.prepare import Setup, prepare
from ..experiment.runbook import RunBook
from ..experiment.usage import Usage
from ..fed import RoundSummary
from . import protocol as P
from .identity import NodeKeys
from .payloads import payloads_for
from .strategy import FedKSeedStrategy, RoundLog

FLOWER_FILE = "flower.json"


def client_nodes(grid: Grid, keys: NodeKeys | None) -> int:
    """How many online nodes may act for a client: all of them without a key list, else those
    whose public key is listed."""
    online = set(grid.get_node_ids())
    if keys is None:
        return len(online)
    return sum(1 for info in grid.get_nodes() if info.node_id in online and keys.client_of(info.public_key) is not None)


def wait_for_nodes(grid: Grid, count: int, timeout: float, keys: NodeKeys | None = None) -> None:
    deadline = time.monotonic() + timeout
    while (connected := client_nodes(grid, keys)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {connected} of {count} client nodes connected within {timeout:g} s")
        time.sleep(0.2)


def serve(
    grid: Grid, setup: Setup, *, min_nodes: int, timeout: float, progress: bool, keys: NodeKeys | None = None
) -> Results:
    """Run the remaining rounds over Flower's grid with the local engine's bookkeeping;
    ``keys`` binds client ids to node public keys (None: to the nodes' partition-id). The
    clients' local work is measured where it runs and reported in their replies."""
    book = RunBook(setup, progress=progress)
    transport: list[dict] = []

    def on_round(summary: RoundSummary, round_log: RoundLog, started: float) -> str:
        transport.append(dataclasses.asdict(round_log))
        book.bar.update(book.steps_per_round)
        book.record(summary, started, [Usage(**u) for u in round_log.usage.values()])
        save_atomically(book.output / FLOWER_FILE, lambda p: p.write_text(json.dumps(transport, indent=2) + "\n"))
        return setup.digest()

    wait_for_nodes(grid, min_nodes, timeout, keys)
    payloads = payloads_for(setup.config.method)
    strategy = FedKSeedStrategy(
        setup.server, P.config_to_json(setup.config), setup.digest(), on_round, timeout, keys, payloads
    )
    strategy.start(grid, ArrayRecord(), num_rounds=setup.config.rounds - setup.server.round, timeout=timeout)
    return book.finish()


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment: the SimConfig comes from the run config; outputs go to its ``output``."""
    config, options = P.config_from_run_config(context.run_config)
    log(INFO, "fedkseed: %s", config)
    # Refuse a used folder (unless resume/overwrite) before any work; a replaced run is deleted
    # only once this one's outputs are written, and put back if it fails before a checkpoint.
    with claim_output(config):
        keys = None
        if options[P.NODE_KEYS]:
            keys = NodeKeys.load(options[P.NODE_KEYS], config.clients)
            log(INFO, "fedkseed: client ids bound to the %d node keys of %s", len(keys), options[P.NODE_KEYS])
        else:
            log(WARNING, "fedkseed: no node-keys: client ids are what nodes declare (partition-id), unauthenticated")
        results = serve(
            grid,
            prepare(config),
            min_nodes=options[P.MIN_NODES],
            timeout=options[P.ROUND_TIMEOUT],
            progress=False,
            keys=keys,
        )
        write_outputs(results)
    log(INFO, "fedkseed: outputs written to %s", config.output)
