"""The FedKSeed client: catch up from a download, run tau local ZO steps, return the upload."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..zo import zo_step
from . import wire
from .draws import draw_rows, draw_schedule, epoch_rows, rounds_taken
from .replica import Replica
from .spec import FedSpec

Batch = dict[str, torch.Tensor]


def take_rows(data: Batch, rows: list[int]) -> Batch:
    """The batch of ``rows`` of an encoded data set, trimmed to its longest row."""
    index = torch.tensor(rows, dtype=torch.long)
    width = int(data["attention_mask"][index].sum(dim=1).max())
    return {name: tensor[index, :width] for name, tensor in data.items()}


class Client:
    """One client: ``upload = client.train(download)``.

    It keeps its copy of the seed table (``table``, as of the end of round ``synced``), merges
    each download into it, builds the global model with ``replica.build`` (the canonical
    construction, so it holds the server's bits), then runs ``spec.local_steps`` ZO steps on
    batches of its own examples. Seeds come from the download's schedule (FedKSeed-Pro) or are
    drawn uniformly from (seed, round, client id) (from (seed, round) under
    ``spec.shared_seeds``); batches from (seed, round, client id, step).
    The upload carries, per seed used, the sum of the step gradients g (skipped steps add 0);
    under FedKSeed-Pro every step's g in schedule order (``wire.StepUpload``), since each step
    enters its seed's history on the server.
    ``data`` is an encoded data set (``fedkseed.data.encode``), ``loss(model, batch)`` a scalar.
    """

    def __init__(
        self,
        client_id: int,
        spec: FedSpec,
        replica: Replica,
        data: Batch,
        loss: Callable[[Any, Batch], Any],
    ) -> None:
        if not 0 <= client_id < spec.num_clients:
            raise ValueError(f"client_id must be in [0, {spec.num_clients}), got {client_id}")
        if replica.pool.k != spec.k:
            raise ValueError(f"replica pool has K = {replica.pool.k}, spec has K = {spec.k}")
        self.client_id, self.spec, self.replica, self.data, self.loss = client_id, spec, replica, data, loss
        self.num_examples = int(data["input_ids"].shape[0])
        self.table = np.zeros(spec.k, dtype=np.float32)
        self.synced = 0
        self.on_step: Callable[[float], None] | None = None  # called with each local step's loss

    def catch_up(self, download: bytes) -> wire.Download:
        """Merge a download into the local table and build the global model from it."""
        d = wire.decode_download(download, self.spec.k)
        if d.since > self.synced:
            raise wire.WireError(f"download is relative to round {d.since}, this client holds round {self.synced}")
        if d.round <= self.synced:
            raise wire.WireError(f"download for round {d.round} is stale: this client holds round {self.synced}")
        if self.spec.pro and len(d.schedule) != self.spec.local_steps:
            raise wire.WireError(
                f"FedKSeed-Pro download carries {len(d.schedule)} seeds, expected {self.spec.local_steps}"
            )
        self.table[d.indices] = d.values
        self.synced = d.round - 1
        self.replica.build(self.table)
        return d

    def train(self, download: bytes) -> bytes:
        """Catch up, run the local steps, return the encoded upload."""
        return self.encode(self.local_update(download))

    def encode(self, upload: wire.Upload | wire.StepUpload) -> bytes:
        """The upload message in ``spec.precision``. An upload names exactly the distinct seeds of
        the client's schedule, which the server draws too, so its indices travel implied."""
        if isinstance(upload, wire.StepUpload):
            return wire.encode_step_upload(upload, self.spec.precision)
        return wire.encode_upload(upload, self.spec.precision, implied=upload.indices)

    def local_update(self, download: bytes) -> wire.Upload | wire.StepUpload:
        """Catch up and run the local steps: the upload, before encoding (the experiment layer's
        attack simulation rewrites it there)."""
        d = self.catch_up(download)
        spec, r, me = self.spec, d.round, self.client_id
        if len(d.schedule):
            schedule = d.schedule
        else:
            schedule = draw_schedule(spec.seed, r, me, spec.local_steps, spec.k, shared=spec.shared_seeds)
        seeds = self.replica.pool.seeds
        grads, skipped, losses = [], [], []
        first_batch = 0
        if spec.batching == "epochs":
            first_batch = rounds_taken(spec.seed, r, me, spec.num_clients, spec.clients_per_round) * spec.local_steps
        # bf16/fp16 weights: round-to-nearest would drop updates below half an ulp, so local steps
        # round stochastically (seeds derived from each step's seed: the same bits on every run).
        low_precision = any(t.dtype != torch.float32 for t in self.replica.params.tensors)
        for t, index in enumerate(schedule.tolist()):
            if spec.batching == "epochs":
                rows = epoch_rows(spec.seed, me, first_batch + t, spec.batch_size, self.num_examples)
            else:
                rows = draw_rows(spec.seed, r, me, t, spec.batch_size, self.num_examples)
            batch = take_rows(self.data, rows)
            following = seeds[schedule[t + 1]] if t + 1 < len(schedule) else None
            result = zo_step(
                self.replica.params,
                lambda batch=batch: self.loss(self.replica.model, batch),  # called within this step
                seeds[index],
                eps=spec.eps,
                lr=spec.lr,
                weight_decay=spec.weight_decay,
                dist=spec.dist,
                rounding="stochastic" if low_precision else "nearest",
                next_seed=following,
                perturbed=t > 0,
            )
            grads.append(result.grad)  # 0.0 when skipped
            if result.skipped:
                skipped.append(t)
            else:
                losses.append(0.5 * (result.loss_plus + result.loss_minus))
            if self.on_step is not None:
                self.on_step(math.nan if result.skipped else losses[-1])
        loss = float(np.mean(losses)) if losses else float("nan")
        if spec.pro:
            return wire.StepUpload(
                me, r, spec.k, len(schedule), loss, np.array(skipped, dtype=np.int64), np.array(grads)
            )
        sums: dict[int, float] = {}
        for index, g in zip(schedule.tolist(), grads):
            sums[index] = sums.get(index, 0.0) + g
        indices = np.array(sorted(sums), dtype=np.int64)
        return wire.Upload(me, r, spec.k, len(schedule), loss, indices, np.array([sums[i] for i in indices.tolist()]))
