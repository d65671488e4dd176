"""The local engine: the whole federation in this process (registered as "local")."""

from __future__ import annotations

import logging
import time

from .attacks import attacked_upload, byzantine_clients, parse_rounds
from .config import SimConfig
from .outputs import Results
from .prepare import prepare
from .runbook import RunBook
from .usage import Usage, measure

log = logging.getLogger("fedkseed.experiment")


def run_local(config: SimConfig, *, progress: bool = True) -> Results:
    """The local engine: every client in this process, one shared model (FedKSeed: one shared
    Replica; each client still merges its own catch-up table and the replica rebuilds only when
    the table changes; first-order methods: each client loads the global tensors it downloads).
    Each client's local work is measured (``usage.measure``) for metrics.json.

    With ``--byzantine N``, N of each round's sampled clients (drawn from the run's seed) train
    and then send ``--attack``'s adversarial upload (``attacks.attacked_upload``), through the
    real encoder to the real server path: the server treats them like any other upload.
    ``--attack-rounds`` limits the attack to some rounds."""
    setup = prepare(config)
    book = RunBook(setup, progress=progress)
    server = setup.server
    attack_rounds = parse_rounds(config.attack_rounds)  # None: every round
    if book.resumed and setup.replica is not None:
        for client in setup.clients:  # the current table agrees with the table a client
            client.table = server.table.copy()  # holds on every entry its catch-up leaves out
            client.synced = int(server.synced[client.client_id])
    for client in setup.clients:
        client.on_step = book.step  # progress per local step, with its loss
    while server.round < config.rounds:
        started = time.perf_counter()
        sampled = server.begin_round()
        attacking = config.byzantine and (attack_rounds is None or server.round + 1 in attack_rounds)
        bad = byzantine_clients(config.seed, server.round + 1, sampled, config.byzantine) if attacking else []
        failures: list[Exception] = []
        usage: list[Usage] = []
        for c in sampled:
            expected = book.bar.n + config.local_steps
            download = server.download(c)
            client = setup.clients[c]
            try:
                with measure(setup.model.device) as used:
                    # only FedKSeed's clients (and Ferret's) are ever Byzantine: config refuses the rest
                    upload = attacked_upload(client, download, config.attack) if c in bad else client.train(download)
            except Exception as error:  # a failed client loses nothing: it is simply absent
                log.warning("round %d: client %d failed: %s", server.round + 1, c, error)
                failures.append(error)
            else:
                usage.append(used)
                server.receive(upload)
            book.bar.update(max(0, expected - book.bar.n))  # the steps a failed client did not take
        if sampled and len(failures) == len(sampled):  # DP's Poisson sampling may draw nobody
            # Every client failing is a bug or a broken setup, not a fault to ride out: stop
            # before the checkpoint records an empty round (the last round's files stay).
            raise RuntimeError(f"round {server.round + 1}: every sampled client failed; first: {failures[0]!r}") from (
                failures[0]
            )
        book.record(server.end_round(), started, usage)
    return book.finish()
