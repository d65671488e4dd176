"""Ferret (Shu et al., ICML 2025): first-order local steps, then the round's update projected onto
the round's shared seeds; only those projections travel, through FedKSeed's own wire format.

A Ferret client is a FedKSeed ``Client`` whose local work differs: it catches up like FedKSeed
(table download, ``Replica.build``: the canonical global model), runs ``spec.local_steps``
first-order SGD steps at ``spec.lr`` on every weight (``firstorder.first_order_steps`` on
FedKSeed's batches), then projects its update Delta = theta_local - theta_round onto the round's distinct
seeds z_k of the shared schedule (``FedSpec.shared_seeds``) with ONE ``fedkseed.project`` call
(no noise tensor), and uploads one scalar per seed as a ``wire.Upload``. Everything else is
FedKSeed's ``Server``: aggregation per seed, the robust bound, the seed table, catch-up downloads,
resume, the delta file and ``fedkseed apply``.

Scaling (docs/ferret.md). The canonical replay adds float32(-lr) * table[k] * z_k, and the table
is the weighted mean of the uploads, so a client uploads ``v_k = -c * p_k / lr`` with
p_k = <Delta, z_k> and everyone replays c * sum_k mean(p_k) z_k. The run uses the unbiased
``c = 1 / K_r`` (``SCALINGS["unbiased"]``: E[p_k z_k] = Delta), whose variance ~ (d / K_r) |Delta|^2
makes ``spec.lr`` a ZO-sized step; ``c = 1 / (d + K_r + 1)`` (``SCALINGS["projection"]``, about
the least-squares projection onto span(z)) is kept for the measurement that chose between them:
on the tiny model it barely moves the loss at any stable lr. Plain SGD, not AdamW: the projection
noise grows with |Delta|^2, and Adam's sign-like steps put far more |Delta|^2 per unit of descent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..ops import project
from ..paramset import ParamSet
from . import wire
from .client import Batch, Client, take_rows
from .draws import draw_schedule
from .firstorder import OptimizerFactory, first_order_steps, local_batch_rows
from .replica import Replica
from .spec import FedSpec

SCALINGS: dict[str, Callable[[int, int], float]] = {
    "projection": lambda d, k_r: 1.0 / (d + k_r + 1),
    "unbiased": lambda d, k_r: 1.0 / k_r,
}


def sgd(spec: FedSpec) -> OptimizerFactory:
    """Plain SGD at ``spec.lr`` with ``spec.weight_decay``, fresh for every client and round."""
    return lambda params: torch.optim.SGD(params, lr=spec.lr, weight_decay=spec.weight_decay)


class FerretClient(Client):
    """``upload = client.train(download)``: FedKSeed's catch-up, first-order local steps on every
    weight of the replica, then the projection upload (module docstring). The replica's weights
    are left trained; the next ``catch_up`` rebuilds the global model, as after FedKSeed's steps."""

    def __init__(
        self,
        client_id: int,
        spec: FedSpec,
        replica: Replica,
        data: Batch,
        loss: Callable[[Any, Batch], torch.Tensor],
        optimizer: OptimizerFactory | None = None,
        scaling: str = "unbiased",
    ) -> None:
        if not spec.shared_seeds or spec.pro:
            raise ValueError("Ferret projects onto the round's shared seeds: spec needs shared_seeds and not pro")
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {sorted(SCALINGS)}, got {scaling!r}")
        if any(t.dtype != torch.float32 for t in replica.params.tensors):
            raise ValueError("Ferret's first-order steps train float32 weights")
        super().__init__(client_id, spec, replica, data, loss)
        self.optimizer, self.scaling = optimizer or sgd(spec), scaling

    def local_update(self, download: bytes) -> wire.Upload:
        d = self.catch_up(download)
        spec, params = self.spec, self.replica.params
        start = params.state()  # theta_round; becomes Delta below (one copy of the weights)
        rows = local_batch_rows(spec, d.round, self.client_id, self.num_examples)
        batches = (take_rows(self.data, r) for r in rows)
        tensors = list(params.tensors)
        with torch.enable_grad():  # the replica's tensors are the model's trainable parameters
            losses = first_order_steps(
                self.replica.model, tensors, batches, self.loss, self.optimizer(tensors), self.on_step
            )
        with torch.no_grad():
            for s, t in zip(start, tensors):
                s.sub_(t).neg_()  # Delta = theta_local - theta_round, in place
        schedule = draw_schedule(spec.seed, d.round, self.client_id, spec.local_steps, spec.k, shared=True)
        indices = np.unique(schedule)
        delta = ParamSet(list(zip(params.names, start)), trainable_only=False)
        seeds = self.replica.pool.seed_tensor[torch.from_numpy(indices)]
        p = project(delta, seeds, dist=spec.dist).numpy()
        values = -SCALINGS[self.scaling](delta.numel, len(indices)) * p / spec.lr32
        loss = float(np.mean(losses)) if losses else float("nan")
        return wire.Upload(self.client_id, d.round, spec.k, spec.local_steps, loss, indices, values)
