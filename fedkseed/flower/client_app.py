"""fedkseed's ClientApp: a thin shell over ``fedkseed.fed.Client`` (or, for the first-order
methods, ``fed.firstorder.FirstOrderClient``; ``payloads`` says how each method's messages ride
in the records).

A node enrols once (``query``: it receives the run's SimConfig and answers with its client id,
its ``partition-id``), then trains when sampled (``train``: download bytes in, upload bytes
out, and what the local work cost). What a FedKSeed client must remember between rounds, its copy
of the seed table and the round it holds, lives in the node's Flower ``Context.state`` (a
first-order client keeps nothing: each download holds the whole global tensors), because the process that runs the
ClientApp may change from one message to the next (a Ray actor in simulation, a fresh
``flwr-clientapp`` process per message in deployment). Model and data are rebuilt per process
by ``fedkseed.experiment.prepare``, the same preparation as the local engine's, and cached.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from . import protocol as P
from .payloads import payloads_for, usage_record

if TYPE_CHECKING:
    from ..experiment.prepare import Setup

app = ClientApp()
_cache: dict[str, Setup] = {}  # SimConfig JSON -> Setup; one run per process at a time


def _setup(config_json: str) -> Setup:
    """The run's Setup, prepared once per process. Preparation's warnings (how the data was
    split and truncated) are left to the server, which prepares the same run from the same
    config and logs them once (the driver in simulation, the ServerApp in deployment): every
    ClientApp process would repeat them, once per Ray actor or once per message on a SuperNode.
    Errors still raise."""
    if config_json not in _cache:
        from ..experiment.prepare import prepare

        _cache.clear()
        fedkseed_logger = logging.getLogger("fedkseed")
        level = fedkseed_logger.level
        fedkseed_logger.setLevel(logging.ERROR)
        try:
            _cache[config_json] = prepare(P.config_from_json(config_json))
        finally:
            fedkseed_logger.setLevel(level)
    return _cache[config_json]


@app.query()
def enroll(msg: Message, context: Context) -> Message:
    """Keep the run's settings, start from an empty table, answer with who this node is (no
    model or data is loaded here: enrolment stays cheap)."""
    config_json = str(msg.content[P.CONFIG][P.SIM_CONFIG])
    config = json.loads(config_json)
    client_id = int(context.node_config[P.PARTITION_ID])
    if not 0 <= client_id < config["clients"]:
        raise ValueError(f"{P.PARTITION_ID} {client_id} is not a client of this run (0..{config['clients'] - 1})")
    context.state[P.NODE_STATE] = ConfigRecord(
        {
            P.SIM_CONFIG: config_json,
            P.CLIENT_ID: client_id,
            "table": np.zeros(config["k"], dtype=np.float32).tobytes(),
            "synced": 0,
        }
    )
    reply = ConfigRecord({P.CLIENT_ID: client_id})
    return Message(RecordDict({P.ARRAYS: ArrayRecord(), P.CONFIG: reply}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Catch up from the download (report the digest of the model built), train, upload."""
    if P.NODE_STATE not in context.state:
        raise RuntimeError("this node has not enrolled in the run (no query message received)")
    from ..experiment.usage import measure

    state = context.state[P.NODE_STATE]
    started = time.perf_counter()
    setup = _setup(str(state[P.SIM_CONFIG]))
    preparing = time.perf_counter() - started  # once per process; the round's seconds leave it out
    payloads = payloads_for(setup.config.method)
    client = setup.clients[int(state[P.CLIENT_ID])]
    seeds = setup.replica is not None  # FedKSeed: the client's table persists in the node state
    if seeds:
        client.table = np.frombuffer(state["table"], dtype=np.float32).copy()
        client.synced = int(state["synced"])
    download = payloads.download_bytes(msg.content)
    client.catch_up(download)
    digest = setup.digest()
    with measure(setup.model.device) as used:  # the work the local engine measures too
        upload = client.train(download)  # catches up again: the same weights, rebuilt or reloaded
    if seeds:
        state["table"], state["synced"] = client.table.tobytes(), client.synced
    fields = {P.MODEL_DIGEST: digest, P.PREPARE_SECONDS: preparing, **usage_record(used)}
    content = payloads.upload_content(upload, fields)
    return Message(content, reply_to=msg)
