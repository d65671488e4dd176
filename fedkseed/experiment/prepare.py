"""Preparation of a run from its config: model, data split, server, clients, evaluation batches.
Every engine prepares the same way (the Flower ClientApp too, in each of its processes)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import data as D
from ..errors import UsageError
from ..fed import Client, Replica, Server
from ..paramset import ParamSet
from .config import SimConfig

log = logging.getLogger("fedkseed.experiment")
EVAL_BATCH = 8  # evaluation examples per forward pass


@dataclass
class Setup:
    """Everything a run prepares from its config: model, data, server and clients. ``data`` says
    how the examples were divided (for metrics.json): held-out categories or the random
    hold-out, the max length and what it truncated, examples per client."""

    config: SimConfig
    model: Any
    tokenizer: Any
    fingerprint: str
    server: Server
    replica: Replica
    clients: list[Client]
    eval_data: list[dict[str, torch.Tensor]]
    heldout: list[D.Example]
    data: dict[str, Any] = field(default_factory=dict)


def prepare(config: SimConfig) -> Setup:
    from ..models import load_model  # transformers: loaded only when a run starts

    try:
        model, tokenizer = load_model(config.model, dtype=config.dtype)
        examples = D.load_examples(config.data)
        split = D.split_data(examples, config.clients, config.alpha, config.seed, config.holdout, balanced=config.paper)
        max_length = config.max_length_tokens() or D.auto_max_length(tokenizer, examples)
        fitted = D.count_truncation(tokenizer, [e for c in split.clients for e in c], max_length)
        heldout_fitted = D.count_truncation(tokenizer, split.heldout, max_length)
    except (ValueError, RuntimeError) as error:
        raise UsageError(str(error).splitlines()[0]) from None
    if split.note:
        log.warning("%s", split.note)
    truncated = fitted.prompts_truncated + fitted.answers_cut + heldout_fitted.prompts_truncated
    line = D.truncation_line(fitted, heldout_fitted, auto=config.max_length_tokens() is None)
    log.log(logging.WARNING if truncated else logging.INFO, "%s", line)
    per_client, evaluation = _carve_eval(split.clients, config.eval_examples)
    encoded = [D.encode(tokenizer, ex, max_length) for ex in per_client]
    spec = config.spec()
    server = Server(spec, [int(e["input_ids"].shape[0]) for e in encoded])
    replica = Replica(model, server.pool, spec.lr32, spec.dist, config.backend)
    clients = [Client(i, spec, replica, e, D.lm_loss) for i, e in enumerate(encoded)]
    eval_data = [
        D.encode(tokenizer, evaluation[i : i + EVAL_BATCH], max_length) for i in range(0, len(evaluation), EVAL_BATCH)
    ]
    fingerprint = ParamSet.of(model).fingerprint(values=True)
    data = {
        "examples": len(examples),
        "heldout": split.note or f"categories: {', '.join(split.heldout_categories) or '(none)'}",
        "heldout_examples": len(split.heldout),
        "max_length": max_length,
        "prompts_truncated": fitted.prompts_truncated,
        "answers_cut": fitted.answers_cut,
        "heldout_prompts_truncated": heldout_fitted.prompts_truncated,
        "examples_per_client": [len(ex) for ex in per_client],
    }
    return Setup(config, model, tokenizer, fingerprint, server, replica, clients, eval_data, split.heldout, data)


def _carve_eval(per_client: list[list[D.Example]], count: int) -> tuple[list[list[D.Example]], list[D.Example]]:
    """Take ``count`` evaluation examples round-robin from the clients' data (never a client's
    last example), so the eval loss measures held-back examples of the training tasks."""
    pools = [list(c) for c in per_client]
    taken: list[D.Example] = []
    while len(taken) < count:
        moved = False
        for pool in pools:
            if len(taken) < count and len(pool) > 1:
                taken.append(pool.pop())
                moved = True
        if not moved:
            break
    if not taken:
        raise UsageError("not enough examples to hold any back for evaluation")
    return pools, taken
