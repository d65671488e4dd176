"""The first-order methods' parties: FedAvg of trainable tensors (FedIT: the LoRA adapters;
FedAvg: every weight), with first-order local steps.

Transport-free and model-agnostic, like ``Server`` / ``Client``: methods take and return bytes
(``arrays``, docs/formats.md#arrays) and the caller hands in the tensors to train (the experiment
layer wraps the model with peft for FedIT and passes the adapter tensors). Sampling, batches
and aggregation weights are FedKSeed's own (``draws.sample_clients``, ``local_batch_rows``,
``FedSpec.weight_units``), so every method sees the same clients and the same examples.

    server = FirstOrderServer(spec, client_sizes, initial)   # initial: name -> float32 array
    sampled = server.begin_round()
    data = server.download(c)                # the global tensors (every round: no catch-up)
    upload = clients[c].train(data)          # local_steps optimizer steps, then its tensors
    ok = server.receive(upload)
    summary = server.end_round()             # weighted mean of the accepted uploads
    server.weights                           # name -> float32 array: the global tensors

Seam for other first-order methods (e.g. Ferret: local steps, then a projection of the update):
``local_batch_rows`` and ``first_order_steps`` are the local training, usable on their own;
``FirstOrderClient.train`` is ``catch_up`` (the global tensors), ``local_steps`` and
``upload_of(download, losses)``, which a subclass may replace (it has the global tensors the
client started from in ``download.arrays`` and its trained ones in ``tensors``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from . import arrays
from .client import take_rows
from .draws import draw_rows, epoch_rows, rounds_taken
from .server import RoundServer, RoundSummary
from .spec import FedSpec
from .wire import WireError

log = logging.getLogger("fedkseed.fed")
Batch = dict[str, torch.Tensor]
OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


# ----------------------------------------------------------------------------- local training
def local_batch_rows(spec: FedSpec, round_: int, client_id: int, num_examples: int) -> list[list[int]]:
    """The rows of each of a client's ``spec.local_steps`` batches in ``round_``: the same draws
    as FedKSeed's client (``spec.batching``: per-step draws, or the epoch walk that continues
    across the rounds the client takes part in)."""
    if spec.batching == "epochs":
        first = rounds_taken(spec.seed, round_, client_id, spec.num_clients, spec.clients_per_round) * spec.local_steps
        return [
            epoch_rows(spec.seed, client_id, first + t, spec.batch_size, num_examples) for t in range(spec.local_steps)
        ]
    return [draw_rows(spec.seed, round_, client_id, t, spec.batch_size, num_examples) for t in range(spec.local_steps)]


def adamw(spec: FedSpec) -> OptimizerFactory:
    """AdamW at ``spec.lr`` with ``spec.weight_decay`` (torch's other defaults), fresh for every
    client and round: the first-order methods keep no optimizer state between rounds."""
    return lambda params: torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


def first_order_steps(
    model: Any,
    params: list[torch.Tensor],
    batches: Iterable[Batch],
    loss: Callable[[Any, Batch], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    on_step: Callable[[float], None] | None = None,
) -> list[float]:
    """One optimizer step per batch (backward of ``loss(model, batch)``), in train mode; a
    batch whose loss is not finite is skipped (no step). Returns the finite losses, each
    measured before its step. Gradients are released afterwards. ``on_step(loss)`` is called
    after every batch (NaN for a skipped one): progress reporting."""
    was_training = model.training
    model.train()
    losses: list[float] = []
    try:
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            value = loss(model, batch)
            if torch.isfinite(value):
                value.backward()
                optimizer.step()
                losses.append(float(value.detach()))
            if on_step is not None:
                on_step(losses[-1] if torch.isfinite(value) else math.nan)
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    return losses


# ------------------------------------------------------------------------------ the parties
def layout_of(weights: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(w.shape) for name, w in weights.items()}


@torch.no_grad()
def load_weights(tensors: Mapping[str, torch.Tensor], weights: Mapping[str, np.ndarray]) -> None:
    """Copy ``weights`` (float32 arrays) into the model's ``tensors`` (same names)."""
    for name, tensor in tensors.items():
        tensor.copy_(torch.from_numpy(np.asarray(weights[name])))


class FirstOrderClient:
    """One client: ``upload = client.train(download)``: load the global tensors into
    ``tensors`` (the trainable tensors of ``model``), run ``spec.local_steps`` optimizer steps
    on its batches (``local_batch_rows``), upload its tensors and its mean train loss."""

    def __init__(
        self,
        client_id: int,
        spec: FedSpec,
        model: Any,
        tensors: Mapping[str, torch.Tensor],
        data: Batch,
        loss: Callable[[Any, Batch], torch.Tensor],
        optimizer: OptimizerFactory | None = None,
    ) -> None:
        if not 0 <= client_id < spec.num_clients:
            raise ValueError(f"client_id must be in [0, {spec.num_clients}), got {client_id}")
        if any(t.dtype != torch.float32 for t in tensors.values()):
            raise ValueError("first-order clients train float32 tensors")
        self.client_id, self.spec, self.model, self.tensors = client_id, spec, model, dict(tensors)
        self.data, self.loss, self.optimizer = data, loss, optimizer or adamw(spec)
        self.layout = layout_of(self.tensors)
        self.num_examples = int(data["input_ids"].shape[0])
        self.on_step: Callable[[float], None] | None = None  # called with each local step's loss

    def catch_up(self, download: bytes) -> arrays.ArrayMessage:
        """Check a download and load its global tensors into the model."""
        d = arrays.decode(download, arrays.KIND_GLOBAL, self.layout)
        if d.client_id != self.client_id:
            raise WireError(f"download is addressed to client {d.client_id}, this is client {self.client_id}")
        load_weights(self.tensors, d.arrays)
        return d

    def train(self, download: bytes) -> bytes:
        d = self.catch_up(download)
        return self.upload_of(d, self.local_steps(d.round))

    def local_steps(self, round_: int) -> list[float]:
        """``spec.local_steps`` optimizer steps on this client's batches of ``round_``; the
        finite losses (``first_order_steps``)."""
        rows = local_batch_rows(self.spec, round_, self.client_id, self.num_examples)
        params = list(self.tensors.values())
        batches = (take_rows(self.data, r) for r in rows)
        return first_order_steps(self.model, params, batches, self.loss, self.optimizer(params), self.on_step)

    def upload_of(self, download: arrays.ArrayMessage, losses: Sequence[float]) -> bytes:
        """The upload after training from ``download``: this client's trained tensors and its
        mean train loss."""
        local = {name: t.detach().cpu().numpy() for name, t in self.tensors.items()}
        loss = float(np.mean(losses)) if losses else math.nan
        message = arrays.ArrayMessage(
            arrays.KIND_LOCAL, download.round, self.client_id, self.spec.local_steps, loss, local
        )
        return arrays.encode(message)


class FirstOrderServer(RoundServer):
    """FedAvg of the uploaded tensors: the new global tensors are sum_c w_c * theta_c over the
    accepted uploads (float64, clients in id order, then float32), w_c the client's share of
    their weight units (``FedSpec.weighting``, as for FedKSeed's uploads). Clients that fail or
    are rejected are absent; with no accepted upload the global tensors stay as they were."""

    def __init__(self, spec: FedSpec, client_sizes: Sequence[int], initial: Mapping[str, np.ndarray]) -> None:
        super().__init__(spec, client_sizes)
        if not initial:
            raise ValueError("nothing to train: no tensors given")
        self.weights = {name: np.array(w, dtype=np.float32) for name, w in initial.items()}
        self.layout = layout_of(self.weights)

    def begin_round(self, clients: Sequence[int] | None = None) -> list[int]:
        return self._start(clients)

    def download(self, client_id: int) -> bytes:
        summary = self._open()
        if client_id not in summary.sampled:
            raise ValueError(f"client {client_id} is not sampled in round {summary.round}")
        message = arrays.encode(
            arrays.ArrayMessage(arrays.KIND_GLOBAL, summary.round, client_id, 0, math.nan, self.weights)
        )
        summary.bytes_down[client_id] = len(message)
        return message

    def receive(self, data: bytes) -> bool:
        return self._receive(data, lambda d: arrays.decode(d, arrays.KIND_LOCAL, self.layout), lambda u: None)

    def end_round(self) -> RoundSummary:
        summary = self._open()
        accepted = sorted(self._uploads)
        total = sum(self.units[c] for c in accepted)
        if accepted:
            sums = {name: np.zeros(shape, dtype=np.float64) for name, shape in self.layout.items()}
            for c in accepted:
                weight = self.units[c] / total
                summary.weights[c] = weight
                for name, value in self._uploads[c].arrays.items():
                    sums[name] += weight * value.astype(np.float64)
            self.weights = {name: s.astype(np.float32) for name, s in sums.items()}
            losses = [(summary.weights[c], self._uploads[c].loss) for c in accepted]
            finite = [(w, v) for w, v in losses if math.isfinite(v)]
            if finite:
                summary.train_loss = sum(w * v for w, v in finite) / sum(w for w, _ in finite)
        summary.accepted = accepted
        self.round = summary.round
        self._uploads, self._summary = {}, None
        return summary

    # ------------------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {**self._round_state(), "weights": {name: w.copy() for name, w in self.weights.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._check_same_run(state)
        saved = state["weights"]
        if list(saved) != list(self.layout):
            raise ValueError("the saved global tensors are not this run's trainable tensors")
        weights = {}
        for name, shape in self.layout.items():
            value = np.asarray(saved[name], dtype=np.float32)
            if value.shape != shape:
                raise ValueError(f"saved tensor {name} has shape {value.shape}, expected {shape}")
            weights[name] = value.copy()
        self.round, self.weights = int(state["round"]), weights
