"""What travels between fedkseed's ServerApp and ClientApp, and the run configuration.

Messages (every one carries an empty ``ArrayRecord``: weights never travel, only the wire
format's bytes and a few scalars in a ``ConfigRecord``):

    query  server -> node   {"sim-config": JSON of the SimConfig}        enrolment
           node -> server   {"client-id": int}
    train  server -> node   {"download": bytes (wire.Download)}
           node -> server   {"upload": bytes (wire.Upload), "model-digest": str}

A node is the client whose id is its ``partition-id`` node-config value (Flower's convention:
the simulation engine sets it; a deployed SuperNode gets ``--node-config partition-id=N``).
``model-digest`` is the sha256 of the weights the client trained from, which must be the
server's global model bit for bit.

A deployed SuperNode starts a fresh process for every message, so this module (imported by the
ClientApp) defers the heavy imports to the functions that need them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..paramset import ParamSet
    from ..simulate import SimConfig

CONFIG, ARRAYS = "config", "arrays"
SIM_CONFIG, CLIENT_ID = "sim-config", "client-id"
DOWNLOAD, UPLOAD, MODEL_DIGEST = "download", "upload", "model-digest"
PARTITION_ID = "partition-id"
NODE_STATE = "fedkseed"  # the node's record in its Flower Context.state

# Run-config keys that configure the Flower engine itself rather than the experiment.
MIN_NODES, ROUND_TIMEOUT = "min-nodes", "round-timeout"
ENGINE_OPTIONS: dict[str, Any] = {MIN_NODES: 1, ROUND_TIMEOUT: 600.0}


def weights_digest(params: ParamSet) -> str:
    """sha256 of the raw bytes of every tensor, in the ParamSet's canonical order."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for t in params.tensors:
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def config_to_json(config: SimConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_json(text: str) -> SimConfig:
    from ..simulate import SimConfig

    return SimConfig(**json.loads(text))


def config_from_run_config(run_config: Mapping[str, Any]) -> tuple[SimConfig, dict[str, Any]]:
    """(SimConfig, engine options) from a Flower run config: the keys are SimConfig's field
    names with hyphens (as on the command line) plus ``ENGINE_OPTIONS``; TOML integers given
    for float settings are accepted."""
    from ..simulate import SimConfig, UsageError

    fields = {f.name: f for f in dataclasses.fields(SimConfig)}
    options = dict(ENGINE_OPTIONS)
    kwargs: dict[str, Any] = {"engine": "flower"}
    for key, value in run_config.items():
        if key in ENGINE_OPTIONS:
            options[key] = type(ENGINE_OPTIONS[key])(value)
            continue
        name = key.replace("-", "_")
        if name not in fields:
            raise UsageError(f"run config: unknown key {key!r}")
        if isinstance(fields[name].default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kwargs[name] = value
    if options[MIN_NODES] < 1 or options[ROUND_TIMEOUT] <= 0:
        raise UsageError(f"run config: {MIN_NODES} must be >= 1 and {ROUND_TIMEOUT} > 0, got {options}")
    return SimConfig(**kwargs), options
