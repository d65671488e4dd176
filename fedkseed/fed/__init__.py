"""FedKSeed (Qin et al., ICML 2024): federated full-parameter ZO fine-tuning with K seeds.

Transport-free building blocks; an engine (``fedkseed.experiment``'s local engine, or a Flower app)
moves the bytes. Every method takes and returns bytes or plain objects.

``FedSpec(num_clients, clients_per_round, k, local_steps, lr, eps, dist, batch_size, pro,
precision, seed, aggregate, clip, weighting, batching, weight_decay, shared_seeds)``: the
settings all parties share (send ``spec.to_dict()`` at setup).

``SeedPool(pool_seed, k)``: the K candidate seeds (``seeds``, ``seed_tensor``) and
FedKSeed-Pro's statistics (``record``, ``importance``, ``probabilities``).

``Replica(model, pool, lr32, dist)``: a party's base weights and working
parameters; ``build(table)`` makes them the global model of a seed table by the canonical
construction (fresh base, one replay of every non-zero entry in index order with alpha =
float32(-lr) * table[k]): every party holds bit-identical weights.

``Server(spec, client_sizes)``::

    sampled = server.begin_round(clients=None)  # ids; default: the run's deterministic sample
    server.schedule(client_id)                  # its seed indices for the open round
    data = server.download(client_id)           # bytes: table entries changed since the
                                                # client's last sync (+ Pro seed schedule)
    ok = server.receive(upload_bytes)           # False when rejected (reason logged on the
                                                # "fedkseed.fed" logger and in the summary)
    summary = server.end_round()                # RoundSummary: accepted, rejected, bytes,
                                                # train_loss, weights, rms, bound, clipped
    server.table                                # float32[K]: what everyone replays
    server.delta(fingerprint) -> bytes          # the delta file (``apply`` rebuilds from it)
    server.state_dict() / load_state_dict()     # between rounds, for resuming

``Client(client_id, spec, replica, data, loss)``: ``upload = client.train(download)``, which is
``client.encode(client.local_update(download))`` (or ``client.catch_up(download)`` alone to sync
without training). Clients that fail simply send nothing; the server aggregates the others.

Bounded influence (``robust``): the upload bound scales each upload down (``FedSpec.clip``;
"auto": 2x the lower median over clients of each one's latest per-step RMS), the per-seed rule
is ``FedSpec.aggregate`` (with ``shared_seeds`` every client of a round uses the same seeds, so
a median outvotes a client), the table stays finite. Attacks are simulated above this layer
(``fedkseed.experiment.attacks``), on the upload a ``Client`` computed.

Wire format: ``fedkseed.fed.wire`` (versioned, CRC-checked, little-endian).

The first-order baselines (``firstorder``: ``FirstOrderServer`` / ``FirstOrderClient``, FedIT and
FedAvg) have the same round interface and exchange the array message of ``fed.arrays``.

Ferret (``ferret``: ``FerretClient(client_id, spec, replica, data, loss)``, a ``Client`` whose local
work is first-order SGD steps, then one ``fedkseed.project`` call onto the round's shared seeds)
uploads FedKSeed's own ``wire.Upload`` to the same ``Server`` (docs/ferret.md).
"""

from .client import Client
from .draws import draw_schedule, sample_clients
from .replica import Replica, canonical_alphas
from .robust import AGGREGATES, BOUND_FACTOR, TRIM_FRACTION, parse_upload_bound
from .seedpool import SeedPool
from .server import RoundSummary, Server
from .spec import BATCHINGS, WEIGHTINGS, FedSpec
from .wire import WireError

__all__ = [
    "AGGREGATES",
    "BATCHINGS",
    "BOUND_FACTOR",
    "TRIM_FRACTION",
    "WEIGHTINGS",
    "Client",
    "FedSpec",
    "Replica",
    "RoundSummary",
    "SeedPool",
    "Server",
    "WireError",
    "canonical_alphas",
    "draw_schedule",
    "parse_upload_bound",
    "sample_clients",
]
