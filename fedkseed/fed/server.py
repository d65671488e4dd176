"""The FedKSeed server: client sampling, catch-up downloads, upload checks, aggregation.

No transport and no model here: methods take and return bytes (``wire``) and numpy arrays; a
party builds weights from ``server.table`` with ``Replica.build``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import robust, wire
from .draws import draw_schedule, sample_clients
from .seedpool import SeedPool
from .spec import FedSpec

if TYPE_CHECKING:
    from .privacy import Privacy

log = logging.getLogger("fedkseed.fed")

MAX_EXPONENT = 127  # the largest fp16 exponent: an i8 field (docs/formats.md#values)


def _steps_taken(upload: wire.Upload | wire.StepUpload) -> int:
    """The local steps an upload's values come from (a per-step upload's skipped ones excluded)."""
    if isinstance(upload, wire.StepUpload):
        return upload.steps - len(upload.skipped)
    return upload.steps


@dataclass
class RoundSummary:
    round: int
    sampled: list[int]
    accepted: list[int]
    rejected: dict[int, str]  # client id (-1 when unreadable) -> reason
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    train_loss: float = float("nan")  # data-weighted mean of the accepted clients' losses
    weights: dict[int, float] = field(default_factory=dict)  # aggregation weight per client
    rms: dict[int, float] = field(default_factory=dict)  # per-step RMS of each accepted upload
    bound: float = float("inf")  # the round's bound on it (inf: none); norm <= bound * sqrt(steps)
    clipped: dict[int, float] = field(default_factory=dict)  # client -> scale factor (< 1) applied
    epsilon: float | None = None  # under DP (``privacy``): the epsilon spent after this round


class RoundServer:
    """What every server of a round protocol shares, whatever its messages: the clients and
    their weight units, one open round at a time (``begin_round`` opens it with ``_start``,
    ``end_round`` closes it), and each upload kept or rejected with a one-line reason (logged on
    the "fedkseed.fed" logger and kept in the round's summary). A subclass decodes its uploads
    and adds its own checks (``_receive``)."""

    def __init__(self, spec: FedSpec, client_sizes: Sequence[int]) -> None:
        if len(client_sizes) != spec.num_clients:
            raise ValueError(f"client_sizes has {len(client_sizes)} entries for {spec.num_clients} clients")
        if any(int(n) < 1 for n in client_sizes):
            raise ValueError("every client needs at least one example")
        self.spec = spec
        self.sizes = [int(n) for n in client_sizes]
        self.units = [spec.weight_units(n) for n in self.sizes]
        self.round = 0
        self._uploads: dict[int, Any] = {}
        self._summary: RoundSummary | None = None

    def _start(self, clients: Sequence[int] | None, draw: Callable[[], list[int]] | None = None) -> list[int]:
        """Open round ``self.round + 1`` for ``clients`` (sorted, checked); without them, for
        ``draw()`` (a subclass's own sample) or else the run's deterministic sample."""
        if self._summary is not None:
            raise RuntimeError(f"round {self.round + 1} is already open")
        spec = self.spec
        if clients is not None:
            chosen = sorted({int(c) for c in clients})
            if any(not 0 <= c < spec.num_clients for c in chosen):
                raise ValueError(f"client ids must be in [0, {spec.num_clients}), got {chosen}")
        elif draw is not None:
            chosen = draw()
        else:
            chosen = sample_clients(spec.seed, self.round + 1, spec.num_clients, spec.clients_per_round)
        self._uploads = {}
        self._summary = RoundSummary(self.round + 1, list(chosen), [], {})
        return list(chosen)

    def _receive(self, data: bytes, decode: Callable[[bytes], Any], check: Callable[[Any], str | None]) -> bool:
        """Decode an upload, check it against the open round and with ``check``, and keep it;
        a bad one is rejected (False). Decoding errors are ``wire.WireError``."""
        summary = self._open()
        try:
            upload = decode(data)
        except wire.WireError as error:
            return self._reject(-1, str(error))
        reason = self._round_fault(upload, summary) or check(upload)
        if reason:
            return self._reject(upload.client_id, reason)
        self._uploads[upload.client_id] = upload
        summary.bytes_up[upload.client_id] = len(data)
        return True

    def _round_fault(self, u: Any, summary: RoundSummary) -> str | None:
        if u.round != summary.round:
            return f"upload is for round {u.round}, the open round is {summary.round}"
        if not 0 <= u.client_id < self.spec.num_clients:
            return f"unknown client {u.client_id}"
        if u.client_id not in summary.sampled:
            return f"client {u.client_id} is not sampled in round {summary.round}"
        if u.client_id in self._uploads:
            return f"client {u.client_id} already uploaded in round {summary.round}"
        if u.steps > self.spec.local_steps:
            return f"upload claims {u.steps} steps, local_steps is {self.spec.local_steps}"
        return None

    def _open(self) -> RoundSummary:
        if self._summary is None:
            raise RuntimeError("no round is open: call begin_round() first")
        return self._summary

    def _reject(self, client_id: int, reason: str) -> bool:
        log.warning("round %d: rejected upload from client %d: %s", self.round + 1, client_id, reason)
        self._open().rejected[client_id] = reason
        return False

    def _round_state(self) -> dict:
        """The part of ``state_dict()`` every server saves: the run it belongs to, and its round."""
        if self._summary is not None:
            raise RuntimeError("cannot save in the middle of a round")
        return {"spec": self.spec.to_dict(), "sizes": list(self.sizes), "round": self.round}

    def _check_same_run(self, state: dict) -> None:
        """Refuse a saved state of another run (other settings or client data sizes)."""
        if dict(state["spec"]) != self.spec.to_dict() or list(state["sizes"]) != self.sizes:
            raise ValueError("the saved server state belongs to a run with other settings or data")


class Server(RoundServer):
    """Holds the global model as (base weights, published seed table) and runs rounds:

        sampled = server.begin_round()              # or begin_round(clients=[...])
        for c in sampled: send(c, server.download(c))
        for data in uploads: server.receive(data)   # False (and logged) when rejected
        summary = server.end_round()

    The exact per-seed sums live in ``accumulated`` (float64: pool[s] += g_c[s] * w_c, clients
    in id order, w_c = the client's share of the weight units (``FedSpec.weighting``) of the
    clients whose uploads were accepted), after each upload's norm bound and with the per-seed
    rule of ``spec.aggregate`` (``robust``). ``table`` is what everyone replays: ``accumulated``
    clamped to its finite range and rounded to the run's precision (fp16: one power-of-two
    scale ``exponent`` for the table, which only grows), so rounding never accumulates.
    Under FedKSeed-Pro clients upload every step's g in schedule order (``wire.StepUpload``):
    each (bounded) g enters its seed's history, and the per-seed sums come from the schedule.
    ``changed[k]`` is the round in which entry k last changed, and ``synced[c]`` the table
    state client c holds: its download is the entries changed since. ``client_rms[c]`` is the
    per-step RMS of client c's latest accepted upload before any bound (0: none yet), from which
    ``clip="auto"`` derives each round's bound (``robust.rms_bound``). With ``privacy``
    (client-level DP, ``fed/privacy.py``) clients are Poisson-sampled, each upload is clipped
    to L2 norm ``privacy.clip`` and weighted 1 / clients_per_round, and the round's noise is
    added before the table is published.
    """

    def __init__(self, spec: FedSpec, client_sizes: Sequence[int], privacy: Privacy | None = None) -> None:
        super().__init__(spec, client_sizes)
        if privacy is not None and privacy.spec != spec:
            raise ValueError("privacy was set up for another FedSpec")
        self.privacy = privacy
        self.pool = SeedPool(spec.seed, spec.k)
        self.accumulated = np.zeros(spec.k, dtype=np.float64)
        self.table = np.zeros(spec.k, dtype=np.float32)
        self.exponent = wire.MIN_EXPONENT
        self.changed = np.zeros(spec.k, dtype=np.int64)
        self.synced = np.zeros(spec.num_clients, dtype=np.int64)
        self.client_rms = np.zeros(spec.num_clients, dtype=np.float64)
        self._sampled: list[int] | None = None
        self._probabilities: np.ndarray | None = None
        self._schedules: dict[int, np.ndarray] = {}

    # ----------------------------------------------------------------------------- a round
    def begin_round(self, clients: Sequence[int] | None = None) -> list[int]:
        """Open round ``self.round + 1`` for ``clients`` (default: the run's deterministic
        sample of ``clients_per_round``); returns the sorted participant ids."""
        r = self.round + 1
        spec = self.spec
        privacy = self.privacy
        chosen = self._start(clients, (lambda: privacy.sample(r)) if privacy is not None else None)  # secret draw
        self._sampled = chosen
        self._probabilities = self.pool.probabilities() if spec.pro else None
        self._schedules = {
            c: draw_schedule(spec.seed, r, c, spec.local_steps, spec.k, self._probabilities, shared=spec.shared_seeds)
            for c in chosen
        }
        return list(chosen)

    def probabilities(self) -> np.ndarray:
        """The seed probabilities of the open (or next) round: Pro's formula, or uniform."""
        if not self.spec.pro:
            return np.full(self.spec.k, 1.0 / self.spec.k)
        return self._probabilities if self._probabilities is not None else self.pool.probabilities()

    def schedule(self, client_id: int) -> np.ndarray:
        """The seed indices of a sampled client's local steps in the open round (a copy)."""
        summary = self._open()
        if client_id not in self._schedules:
            raise ValueError(f"client {client_id} is not sampled in round {summary.round}")
        return self._schedules[client_id].copy()

    def download(self, client_id: int) -> bytes:
        """The catch-up message for a sampled client: the table entries changed since the state
        it holds (never weights), plus its seed schedule under FedKSeed-Pro."""
        summary = self._open()
        if client_id not in self._schedules:
            raise ValueError(f"client {client_id} is not sampled in round {summary.round}")
        since = int(self.synced[client_id])
        schedule = self._schedules[client_id] if self.spec.pro else np.zeros(0, dtype=np.int64)

        def encode(indices: np.ndarray) -> bytes:
            d = wire.Download(summary.round, since, self.spec.k, indices, self.table[indices], schedule)
            return wire.encode_download(d, self.spec.precision, self.exponent)

        # Entries the client already holds may ride along when that is shorter than naming
        # the changed ones (a nearly dense change set: K values beat a bitmap plus values).
        changed = encode(np.flatnonzero(self.changed > since))
        everything = encode(np.arange(self.spec.k))
        message = changed if len(changed) <= len(everything) else everything
        summary.bytes_down[client_id] = len(message)
        return message

    def receive(self, data: bytes) -> bool:
        """Check an upload and keep it for aggregation; a bad one is logged and dropped."""
        return self._receive(data, lambda d: wire.decode_upload(d, self.spec.k, self._schedules), self._check)

    def end_round(self) -> RoundSummary:
        """Aggregate the accepted uploads (clients that failed are simply absent): bound each
        upload's norm, record Pro histories, apply the per-seed rule, publish the new table
        and close the round."""
        summary = self._open()
        accepted = sorted(self._uploads)
        total = sum(self.units[c] for c in accepted)
        steps = {c: _steps_taken(self._uploads[c]) for c in accepted}
        summary.rms = {c: robust.per_step_rms(self._uploads[c].values, steps[c]) for c in accepted}
        dp = self.privacy
        summary.bound = math.inf if dp else robust.rms_bound(summary.rms, self.client_rms, self.spec.clip)
        parts, losses = [], []
        for c in accepted:
            upload = self._uploads[c]
            weight = dp.weight if dp else self.units[c] / total
            limit = dp.clip if dp else summary.bound * np.sqrt(max(steps[c], 1))
            values, factor = robust.bounded(upload.values, limit)
            if factor < 1.0:
                summary.clipped[c] = factor
            if factor < 1.0 and not dp:  # under DP, clipping is the mechanism, not an event
                log.warning(
                    "round %d: client %d's upload scaled by %.3g to the per-step RMS bound %.6g",
                    summary.round,
                    c,
                    factor,
                    summary.bound,
                )
            parts.append((*self._per_seed(upload, values), weight))
            self.synced[c] = summary.round - 1
            summary.weights[c] = weight
            if np.isfinite(upload.loss):
                losses.append((weight, upload.loss))
        robust.accumulate(self.accumulated, parts, self.spec.aggregate)
        if dp:
            summary.epsilon = dp.release(self.accumulated, summary.round)
        for c in accepted:  # unbounded: an honest upload scaled down in this round counts at its size
            self.client_rms[c] = summary.rms[c]
        if robust.clamp_table(self.accumulated, self.spec.lr32):
            log.warning(
                "round %d: seed-table entries clamped to +-%.3g", summary.round, robust.table_limit(self.spec.lr32)
            )
        if losses:
            summary.train_loss = sum(w * loss for w, loss in losses) / sum(w for w, _ in losses)
        summary.accepted = accepted
        self._publish(summary.round)
        self.round = summary.round
        self._sampled, self._probabilities, self._schedules, self._uploads, self._summary = None, None, {}, {}, None
        return summary

    def _per_seed(self, upload: wire.Upload | wire.StepUpload, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(distinct seed indices, float64 per-seed values) of a bounded upload. A per-step
        upload also feeds FedKSeed-Pro's histories: one entry per step that was not skipped."""
        if isinstance(upload, wire.Upload):
            return upload.indices, values
        schedule = self._schedules[upload.client_id][: upload.steps]
        taken = np.ones(upload.steps, dtype=bool)
        taken[upload.skipped] = False
        self.pool.record(schedule[taken], values[taken])
        indices, position = np.unique(schedule[taken], return_inverse=True)
        sums = np.zeros(indices.size, dtype=np.float64)
        np.add.at(sums, position, values[taken])  # in step order
        return indices, sums

    # ------------------------------------------------------------------------------ helpers
    def _check(self, u: wire.Upload | wire.StepUpload) -> str | None:
        """What FedKSeed checks beyond the round (``RoundServer._round_fault``)."""
        if u.k != self.spec.k:
            return f"upload has K = {u.k}, the run has K = {self.spec.k}"
        if self.spec.pro != isinstance(u, wire.StepUpload):
            wanted = "per-step (FedKSeed-Pro)" if self.spec.pro else "per-seed"
            return f"the run takes {wanted} uploads, this one is not"
        if isinstance(u, wire.Upload) and not np.isin(u.indices, self._schedules[u.client_id]).all():
            return "upload names seeds outside the client's schedule for this round"
        return None

    def _publish(self, round_: int) -> None:
        if self.spec.precision == "fp16":
            peak = float(np.abs(self.accumulated).max())
            self.exponent = wire.fp16_exponent(peak, floor=self.exponent)
        table = wire.quantize(self.accumulated, self.spec.precision, self.exponent)
        moved = table.view(np.uint32) != self.table.view(np.uint32)
        self.changed[moved] = round_
        self.table = table

    # ----------------------------------------------------------------- delta file, resume
    def delta(self, fingerprint: str) -> bytes:
        """The delta file: the published table (non-zero entries) and what it applies to."""
        indices = np.flatnonzero(self.table)
        table = wire.Table(
            self.spec.k,
            self.spec.seed,
            self.spec.lr32,
            self.spec.dist,
            self.round,
            fingerprint,
            indices,
            self.table[indices],
        )
        return wire.encode_table(table, self.spec.precision, self.exponent)

    def state_dict(self) -> dict:
        return {
            **self._round_state(),
            "accumulated": self.accumulated.copy(),
            "table": self.table.copy(),
            "exponent": self.exponent,
            "changed": self.changed.copy(),
            "synced": self.synced.copy(),
            "pool": self.pool.state_dict(),
            "client_rms": self.client_rms.copy(),
            **({"privacy": self.privacy.state_dict()} if self.privacy else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``'s output. Everything is checked before anything is
        replaced: a value no run can produce is a one-line ValueError naming it."""
        try:
            loaded = self._checked_state(state)
            if (self.privacy is None) != ("privacy" not in state):
                raise ValueError("the saved server state and this run differ in whether DP (privacy) is on")
            if self.privacy is not None:
                self.privacy.load_state_dict(state["privacy"])  # checks before it replaces anything
        except (KeyError, TypeError, IndexError, OverflowError) as error:
            missing = f"lacks {error}" if isinstance(error, KeyError) else f"is malformed ({error})"
            raise ValueError(f"the saved server state {missing}".splitlines()[0]) from None
        self.pool.load_state_dict(state["pool"])  # checks before it replaces anything
        for name, value in loaded.items():
            setattr(self, name, value)

    def _checked_state(self, state: dict) -> dict:
        self._check_same_run(state)
        round_, exponent = _integer(state["round"], "round"), _integer(state["exponent"], "exponent")
        if round_ < 0:
            raise ValueError(f"saved round {round_} is negative")
        if not wire.MIN_EXPONENT <= exponent <= MAX_EXPONENT:
            raise ValueError(f"saved exponent {exponent} is outside [{wire.MIN_EXPONENT}, {MAX_EXPONENT}]")
        k, n = self.spec.k, self.spec.num_clients
        arrays = {"accumulated": (np.float64, k), "table": (np.float32, k), "changed": (np.float64, k)}
        arrays |= {"synced": (np.float64, n), "client_rms": (np.float64, n)}
        loaded: dict = {"round": round_, "exponent": exponent}
        for name, (dtype, size) in arrays.items():
            value = np.array(state[name], dtype=dtype)
            if value.shape != (size,):
                raise ValueError(f"saved {name} has shape {value.shape}, expected ({size},)")
            if not np.isfinite(value).all():
                raise ValueError(f"saved {name} holds a non-finite value")
            loaded[name] = value
        limit = robust.table_limit(self.spec.lr32)
        if (np.abs(loaded["accumulated"]) > limit).any():
            raise ValueError(f"saved accumulated holds a value beyond the table's limit +-{limit:.3g}")
        table = wire.quantize(loaded["accumulated"], self.spec.precision, exponent)
        if not np.array_equal(table.view(np.uint32), loaded["table"].view(np.uint32)):
            raise ValueError("saved table is not the accumulated sums rounded to the run's precision")
        # changed: the round an entry last changed (0: never); synced: the round a client's table is
        # from (a client that trained in round r holds round r - 1's table)
        for name, high in (("changed", round_), ("synced", max(round_ - 1, 0))):
            value = loaded[name]
            if ((value < 0) | (value > high) | (value != np.round(value))).any():
                raise ValueError(f"saved {name} holds a value that is not a round number in [0, {high}]")
            loaded[name] = value.astype(np.int64)
        if ((loaded["table"] != 0) & (loaded["changed"] == 0)).any():
            raise ValueError("saved table has a non-zero entry that never changed (changed = 0)")
        if (loaded["client_rms"] < 0).any():
            raise ValueError("saved client_rms holds a negative value")
        return loaded


def _integer(value: object, name: str) -> int:
    """A saved scalar that must be an integer (a JSON number: int, or a float with no fraction)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"saved {name} is not a number: {value!r}")
    if not (math.isfinite(value) and value == int(value)):
        raise ValueError(f"saved {name} is not an integer: {value!r}")
    return int(value)
