"""FedSpec: the settings every party of a FedKSeed run shares (sent to clients once, at setup)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .. import stream as S
from ..checks import check_bool, check_int, check_real, check_u64
from ..zo.passes import float32
from .robust import AGGREGATES, parse_upload_bound
from .wire import MAX_K, MAX_STEPS, PRECISIONS

WEIGHTINGS = ("examples", "batches")
BATCHINGS = ("draws", "epochs")


@dataclass(frozen=True)
class FedSpec:
    """What the server and every client must agree on for the run to be one run.

    ``lr`` is used as its float32 value everywhere (the delta file stores that value), so the
    global model is the same bits on every party. ``seed`` derives the pool, the client
    sampling, the seed schedules and the batches. ``precision`` is how seed-table entries and
    uploaded sums travel, and therefore the values every party replays: "fp16" (float16 codes
    with a shared power-of-two scale: 2 bytes per entry) or "fp32".

    Robustness (``fed/robust.py``): ``clip`` bounds each upload's per-step RMS ("auto":
    ``robust.BOUND_FACTOR`` times a median over clients, one value per client; a number: that
    bound; "off": none), ``aggregate`` is the per-seed rule over the clients that used a seed
    ("mean": FedKSeed's weighted sum). ``shared_seeds``: every client of a round follows the same
    seed schedule (DeComFL-style; ``draw_schedule(shared=True)``), so each seed's values come
    from every client and "median" / "trimmed-mean" can outvote a client; otherwise clients
    rarely share a seed.
    ``weighting``: a client's aggregation weight counts its "examples" or, as the official
    code does, its "batches" (ceil(examples / batch_size); the same at batch size 1).
    ``batching``: each local step's batch is "draws" (rows drawn with replacement, per step) or
    "epochs" (shuffled epochs without replacement, continued across the rounds a client takes
    part in, as the official client does). ``weight_decay`` applies in the clients' local ZO
    steps only: the global model is the base weights plus the seed table, as in FedKSeed, so
    decay acts on the global model only through the scalars it changes.
    """

    num_clients: int
    clients_per_round: int
    k: int = 4096
    local_steps: int = 200
    lr: float = 3e-7
    eps: float = 5e-4
    dist: str = "gaussian"
    batch_size: int = 1
    pro: bool = False
    precision: str = "fp16"
    seed: int = 0
    aggregate: str = "mean"
    clip: str | float = "auto"
    weighting: str = "examples"
    batching: str = "draws"
    weight_decay: float = 0.0
    shared_seeds: bool = False

    def __post_init__(self) -> None:
        for name in ("num_clients", "clients_per_round", "k", "local_steps", "batch_size"):
            check_int(name, getattr(self, name), 1)
        if self.clients_per_round > self.num_clients:
            raise ValueError(f"clients_per_round ({self.clients_per_round}) exceeds num_clients ({self.num_clients})")
        if self.k > MAX_K:
            raise ValueError(f"k must be <= {MAX_K} (the wire format's limit), got {self.k}")
        if self.local_steps > MAX_STEPS:
            raise ValueError(f"local_steps must be <= {MAX_STEPS} (the wire format's limit), got {self.local_steps}")
        for name in ("lr", "eps"):
            value = check_real(name, getattr(self, name), positive=True)
            if float32(value) == 0 or not math.isfinite(float32(value)):
                raise ValueError(f"{name} = {value!r} is not representable in float32")
        S.dist_tag(self.dist)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        check_u64("seed", self.seed)
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        object.__setattr__(self, "clip", parse_upload_bound(self.clip))  # "1e3" -> 1000.0
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.batching not in BATCHINGS:
            raise ValueError(f"batching must be one of {BATCHINGS}, got {self.batching!r}")
        check_bool("shared_seeds", self.shared_seeds, error=ValueError)
        check_real("weight_decay", self.weight_decay)

    @property
    def lr32(self) -> float:
        return float32(self.lr)

    def weight_units(self, examples: int) -> int:
        """What a client with ``examples`` examples counts for in the aggregation weights."""
        return examples if self.weighting == "examples" else -(-examples // self.batch_size)

    def to_dict(self) -> dict:
        return asdict(self)
