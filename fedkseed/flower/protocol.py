"""What travels between fedkseed's ServerApp and ClientApp, and the run configuration.

Messages (FedKSeed: every one carries an empty ``ArrayRecord``: weights never travel, only the
wire format's bytes and a few scalars in a ``ConfigRecord``):

    query  server -> node   {"sim-config": JSON of the SimConfig}        enrolment
           node -> server   {"client-id": int}
    train  server -> node   {"download": bytes (wire.Download)}
           node -> server   {"upload": bytes (wire.Upload), "model-digest": str,
                             "client-seconds", "client-cpu-seconds", "client-peak-mib",
                             "prepare-seconds": float}

The first-order methods (``--method fedit|fedavg``) send tensors instead: a train message's
``ArrayRecord`` holds the global tensors, a reply's the client's, and the ``ConfigRecord`` the
array message's header (``payloads``: "kind", "round", "client-id", "steps", "loss") beside the
digest and the cost fields.

A node claims the client whose id is its ``partition-id`` node-config value (Flower's
convention: the simulation engine sets it; a deployed SuperNode gets ``--node-config
partition-id=N``). In deployment with ``node-keys`` the claim must match the id the node's
public key is bound to (``identity.NodeKeys``).

``model-digest`` is ``ParamSet.fingerprint(values=True)`` of the weights the client trained
from (layout and bytes; first-order methods: of the trained tensors), which must be the
server's global model bit for bit. ``prepare-seconds`` is the wall time the ClientApp spent
preparing model and data for this message (once per process; about 0 when it had them), which
the round's ``seconds`` leave out, as the local engine's do.

A deployed SuperNode starts a fresh process for every message, so this module (imported by the
ClientApp) defers the heavy imports to the functions that need them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import UsageError

if TYPE_CHECKING:
    from ..experiment.config import SimConfig

CONFIG, ARRAYS = "config", "arrays"
SIM_CONFIG, CLIENT_ID = "sim-config", "client-id"
DOWNLOAD, UPLOAD, MODEL_DIGEST, PREPARE_SECONDS = "download", "upload", "model-digest", "prepare-seconds"
PARTITION_ID = "partition-id"
NODE_STATE = "fedkseed"  # the node's record in its Flower Context.state

# Run-config keys that configure the Flower engine itself rather than the experiment:
# nodes to wait for before round 1, seconds to wait for replies, and the absolute path of the
# node key list on the SuperLink's machine ("": no list, ids are the nodes' partition-id).
MIN_NODES, ROUND_TIMEOUT, NODE_KEYS = "min-nodes", "round-timeout", "node-keys"
ENGINE_OPTIONS: dict[str, Any] = {MIN_NODES: 1, ROUND_TIMEOUT: 600.0, NODE_KEYS: ""}


def config_to_json(config: SimConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_json(text: str) -> SimConfig:
    from ..experiment.config import SimConfig

    return SimConfig(**json.loads(text))


def config_from_run_config(run_config: Mapping[str, Any]) -> tuple[SimConfig, dict[str, Any]]:
    """(SimConfig, engine options) from a Flower run config: the keys are SimConfig's field
    names with hyphens (as on the command line) plus ``ENGINE_OPTIONS``; "" for a setting whose
    default depends on the protocol means the protocol's value (TOML has no null); TOML
    integers given for float settings are accepted."""
    from ..experiment.config import SimConfig

    types = typing.get_type_hints(SimConfig)
    options = dict(ENGINE_OPTIONS)
    kwargs: dict[str, Any] = {"engine": "flower"}
    for key, value in run_config.items():
        if key in ENGINE_OPTIONS:
            options[key] = type(ENGINE_OPTIONS[key])(value)
            continue
        name = key.replace("-", "_")
        if name not in types or name == "engine":
            raise UsageError(f"run config: unknown key {key!r}")
        allowed = typing.get_args(types[name]) or (types[name],)  # float, or float | None
        if value == "" and type(None) in allowed:
            value = None
        elif float in allowed and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kwargs[name] = value
    if options[MIN_NODES] < 1 or options[ROUND_TIMEOUT] <= 0:
        raise UsageError(f"run config: {MIN_NODES} must be >= 1 and {ROUND_TIMEOUT} > 0, got {options}")
    if options[NODE_KEYS] and not os.path.isabs(options[NODE_KEYS]):
        # The ServerApp runs in a process the SuperLink starts: a relative path has no fixed base.
        raise UsageError(f"run config: {NODE_KEYS} must be an absolute path, got {options[NODE_KEYS]!r}")
    config = SimConfig(**kwargs)
    check_supported(config)
    return config, options


def check_supported(config: SimConfig) -> None:
    """Refuse what the Flower engine does not do: attack simulation is the local engine's (a
    Flower node runs whatever client code its operator installed; none is told to attack)."""
    if config.byzantine:
        raise UsageError(f"--byzantine is simulated by the local engine only (--engine local), got {config.byzantine}")
