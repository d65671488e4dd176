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
import pathlib
import sys
import time
from logging import INFO

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from .. import simulate as sim
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
    from tqdm import tqdm

    config = setup.config
    server, replica, output = setup.server, setup.replica, pathlib.Path(config.output)
    state = sim.load_state(output, config) if config.resume else None
    if state is not None:
        server.load_state_dict(state["server"])
    replica.build(server.table)
    if state is not None:
        rounds, before = state["rounds"], state["before"]
    else:
        rounds = []
        before = {"eval_loss": sim.eval_loss(setup.model, setup.eval_data), "rouge_l": sim.rouge(setup)}
    transport: list[dict] = []

    steps = config.clients_per_round * config.local_steps
    bar = tqdm(total=max(0, config.rounds - server.round) * steps, file=sys.stderr, disable=not progress,
               unit="step", desc="fedkseed")
    sim._row(bar, None)

    def on_round(summary: RoundSummary, round_log: RoundLog, started: float) -> str:
        replica.build(server.table)
        record = {
            "round": summary.round,
            "train_loss": summary.train_loss,
            "eval_loss": sim.eval_loss(setup.model, setup.eval_data),
            "bytes_up_per_client": sim._mean(summary.bytes_up.values()),
            "bytes_down_per_client": sim._mean(summary.bytes_down.values()),
            "clients": summary.accepted,
            "seconds": time.perf_counter() - started,
        }
        rounds.append(record)
        transport.append(dataclasses.asdict(round_log))
        sim.save_state(output, {"identity": config.run_identity(), "server": server.state_dict(),
                                "rounds": rounds, "before": before})
        sim.save_atomically(output / FLOWER_FILE, lambda p: p.write_text(json.dumps(transport, indent=2) + "\n"))
        bar.update(steps)
        sim._row(bar, record)
        return P.weights_digest(replica.params)

    wait_for_nodes(grid, min_nodes, timeout)
    strategy = FedKSeedStrategy(server, P.config_to_json(config), P.weights_digest(replica.params), on_round, timeout)
    strategy.start(grid, ArrayRecord(), num_rounds=config.rounds - server.round, timeout=timeout)
    bar.close()

    replica.build(server.table)
    final = {
        "eval_loss_before": before["eval_loss"],
        "eval_loss_after": sim.eval_loss(setup.model, setup.eval_data),
        "rouge_l_before": before["rouge_l"],
        "rouge_l_after": sim.rouge(setup),
        "heldout_examples": min(len(setup.heldout), config.eval_examples),
        "eval_examples": sum(int(b["input_ids"].shape[0]) for b in setup.eval_data),
        "fingerprint": setup.fingerprint,
    }
    return sim.Results(config, rounds, final, server.delta(setup.fingerprint), setup.model, setup.tokenizer)


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
