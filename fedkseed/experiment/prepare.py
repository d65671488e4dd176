"""Preparation of a run from its config: model, data split, server, clients, evaluation batches.
Every engine prepares the same way (the Flower ClientApp too, in each of its processes), for
every method: FedKSeed's ``Server``/``Client`` over a ``Replica``, or the first-order methods'
``FirstOrderServer``/``FirstOrderClient`` over the tensors they train (``methods``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import data as D
from ..errors import UsageError
from ..fed import Client, Replica, Server
from ..fed.ferret import FerretClient
from ..fed.firstorder import FirstOrderClient, FirstOrderServer, load_weights
from ..ops import resolve_backend
from ..paramset import ParamSet
from .config import SimConfig
from .methods import first_order_model

log = logging.getLogger("fedkseed.experiment")
EVAL_BATCH = 8  # evaluation examples per forward pass


@dataclass
class Setup:
    """Everything a run prepares from its config: model, data, server and clients. ``data`` says
    how the examples were divided (for metrics.json): held-out categories or the random
    hold-out, the max length and what it truncated, examples per client. ``fingerprint`` is the
    base model's weights digest. FedKSeed has a ``replica``; the first-order methods have
    ``trainable`` (name -> the model's tensors that they train and average)."""

    config: SimConfig
    model: Any
    tokenizer: Any
    fingerprint: str
    server: Server | FirstOrderServer
    replica: Replica | None
    clients: list[Client] | list[FirstOrderClient]
    eval_data: list[dict[str, torch.Tensor]]
    heldout: list[D.Example]
    data: dict[str, Any] = field(default_factory=dict)
    trainable: dict[str, torch.Tensor] = field(default_factory=dict)

    def load_global(self) -> None:
        """Make ``model`` the server's current global model (FedKSeed: the canonical build
        of its seed table; first-order methods: its averaged tensors)."""
        if self.replica is not None:
            self.replica.build(self.server.table)
        else:
            load_weights(self.trainable, self.server.weights)

    def digest(self) -> str:
        """The weights digest of what the clients train from (FedKSeed: every weight; the
        first-order methods: the trained tensors), for the Flower engine's consistency check."""
        if self.replica is not None:
            return self.replica.params.fingerprint(values=True)
        return ParamSet(list(self.trainable.items())).fingerprint(values=True)


def check_backend(params: ParamSet) -> None:
    """The backend setting (``use_backend`` / FEDKSEED_BACKEND) must serve ``params``: a one-line
    UsageError before anything is trained or written."""
    try:
        resolve_backend(None, params.device)
    except (ValueError, RuntimeError) as error:
        raise UsageError(str(error)) from None


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
    fingerprint = ParamSet.of(model).fingerprint(values=True)
    spec = config.spec()
    sizes = [int(e["input_ids"].shape[0]) for e in encoded]
    replica: Replica | None = None
    trainable: dict[str, torch.Tensor] = {}
    if config.first_order:
        model, trainable = _first_order_model(config, model)
        initial = {name: t.detach().cpu().numpy().copy() for name, t in trainable.items()}
        server: Server | FirstOrderServer = FirstOrderServer(spec, sizes, initial)
        clients: list[Any] = [
            FirstOrderClient(i, spec, model, trainable, e, D.response_loss) for i, e in enumerate(encoded)
        ]
    else:
        server = Server(spec, sizes, config.privacy())
        replica = Replica(model, server.pool, spec.lr32, spec.dist)
        check_backend(replica.params)  # one line now rather than every client failing
        if config.method == "ferret":  # FedKSeed's server and table, first-order local steps
            clients = [FerretClient(i, spec, replica, e, D.response_loss) for i, e in enumerate(encoded)]
        else:
            clients = [Client(i, spec, replica, e, D.lm_loss) for i, e in enumerate(encoded)]
    eval_data = [
        D.encode(tokenizer, evaluation[i : i + EVAL_BATCH], max_length) for i in range(0, len(evaluation), EVAL_BATCH)
    ]
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
    return Setup(
        config, model, tokenizer, fingerprint, server, replica, clients, eval_data, split.heldout, data, trainable
    )


def _first_order_model(config: SimConfig, model: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    try:
        return first_order_model(
            model,
            config.method,
            rank=config.lora_rank,
            alpha=config.lora_alpha,
            targets=tuple(config.lora_targets.split(",")),
            seed=config.seed,
        )
    except ValueError as error:  # e.g. --lora-targets naming no module of the model
        raise UsageError(f"--method {config.method}: {str(error).splitlines()[0]}") from None


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
