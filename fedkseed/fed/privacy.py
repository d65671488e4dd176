"""Client-level (epsilon, delta)-differential privacy of the released seed table (DP-FedAvg,
McMahan et al. 2018, on FedKSeed's per-seed sums; threat model and limits: docs/privacy.md).

``Server(spec, sizes, privacy=Privacy(...))`` runs each round as the Gaussian mechanism on
Poisson-sampled clients:

- **Sampling.** Each client takes part in a round independently with probability
  q = clients_per_round / clients (``sample``), so the number of clients per round varies.
- **Clipping.** Each accepted upload's per-seed sums (its vector in seed-table space) are
  scaled to L2 norm <= ``clip`` (C), and every client counts 1 / (q N): a fixed denominator (the
  expected number of clients), since data-size weights or the actual count would make the
  sensitivity depend on private facts. Adding or removing one client changes the round's sum by
  at most C in L2.
- **Noise.** ``release`` adds N(0, sigma^2 C^2) / (q N) to every table entry that some client's
  public seed schedule could touch in the round (``touchable``: the union over all clients'
  schedules, which depend only on the run's public seed). The set cannot reveal who took part,
  and entries outside it receive no client's value in any neighbouring run, so noising them too
  would only damage the model.
- **Accounting.** sigma is calibrated so that ``rounds`` compositions of the Poisson-subsampled
  Gaussian reach (epsilon, delta) under dp-accounting's RDP accountant
  (``calibrate_dp_mechanism``); ``epsilon(r)`` is the budget spent after r rounds. dp-accounting
  is imported only when a run uses DP (``pip install fedkseed[llm]`` brings it).

Randomness: the sample and the noise must be secret from the clients, and everything derived
from the run's seed is public to them, so by default both come from the OS's CSPRNG
(``os.urandom``). ``noise_seed`` derives them instead from BLAKE2b words of (noise seed, round,
...) (domains ``dp-sample`` and ``dp-noise``, docs/seed-derivation.md#domains): reproducible
simulations, unsafe in a deployment. Gaussians come from pairs of 64-bit words by Box-Muller.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..checks import check_int, check_real, check_u64
from ..seeds import derive_seed, unit_interval
from .draws import draw_schedule
from .spec import FedSpec

ACCOUNTANT = "rdp"  # dp_accounting.rdp.RdpAccountant, Poisson-subsampled Gaussian events
DELTA_EXPONENT = 1.1  # the default delta is clients ** -1.1: below 1 / clients, as DP requires
# The default clip per local step: C = DEFAULT_CLIP_PER_STEP * sqrt(local_steps). 20 is the median
# per-step RMS of g measured for SmolLM2-135M at the demo settings (robust.py's auto bound, 2x the
# median, was 41 in round 1), so C sits near the median upload norm, the usual DP-FedAvg choice.
DEFAULT_CLIP_PER_STEP = 20.0


def default_delta(num_clients: int) -> float:
    return float(num_clients) ** -DELTA_EXPONENT


def default_clip(local_steps: int) -> float:
    return DEFAULT_CLIP_PER_STEP * math.sqrt(local_steps)


class Privacy:
    """The DP mechanism and its accountant for one run of ``spec`` over ``rounds`` rounds.
    Construction only checks the settings; sigma is calibrated (dp-accounting imported) the first
    time it is needed, so a party that never aggregates (a Flower client) never pays for it."""

    def __init__(
        self,
        spec: FedSpec,
        rounds: int,
        epsilon: float,
        delta: float | None = None,
        clip: float | None = None,
        noise_seed: int | None = None,
    ) -> None:
        if spec.pro:
            raise ValueError(
                "pro (FedKSeed-Pro) is refused under DP: its seed probabilities come from the raw uploads, "
                "which DP does not release"
            )
        if spec.aggregate != "mean":
            raise ValueError(
                f"aggregate {spec.aggregate} is refused under DP: the noise is calibrated to the sum of clipped "
                "uploads (mean), and a per-seed median or trimmed mean's sensitivity is not bounded that way"
            )
        self.spec, self.rounds = spec, check_int("rounds", rounds, 1)
        self.target_epsilon = check_real("dp-epsilon", epsilon, positive=True)
        delta = check_real("dp-delta", delta, positive=True, below=1, allow_none=True)
        self.delta = default_delta(spec.num_clients) if delta is None else delta
        self.clip = default_clip(spec.local_steps) if clip is None else check_real("dp-clip", clip, positive=True)
        self.noise_seed = None if noise_seed is None else check_u64("dp-noise-seed", noise_seed)
        self.sampling_rate = spec.clients_per_round / spec.num_clients
        self.weight = 1.0 / spec.clients_per_round  # 1 / (q N): DP-FedAvg's fixed denominator
        self._sigma: float | None = None

    # ------------------------------------------------------------------------- mechanism
    @property
    def noise_multiplier(self) -> float:
        """sigma: the noise std over the clip, calibrated to (epsilon, delta) over ``rounds``."""
        if self._sigma is None:
            self._sigma = calibrate(self.sampling_rate, self.rounds, self.target_epsilon, self.delta)
        return self._sigma

    def sample(self, round_: int) -> list[int]:
        """The clients of ``round_`` (sorted ids): each independently with probability q."""
        n = self.spec.num_clients
        if self.noise_seed is None:
            words = _urandom_words(n)
        else:
            words = np.array([derive_seed("dp-sample", self.noise_seed, round_, c) for c in range(n)], np.uint64)
        return [c for c in range(n) if unit_interval(int(words[c])) < self.sampling_rate]

    def touchable(self, round_: int) -> np.ndarray:
        """The sorted seed indices some client's schedule uses in ``round_`` (public knowledge)."""
        spec = self.spec
        owners = [0] if spec.shared_seeds else range(spec.num_clients)
        schedules = [
            draw_schedule(spec.seed, round_, c, spec.local_steps, spec.k, shared=spec.shared_seeds) for c in owners
        ]
        return np.unique(np.concatenate(schedules))

    def noise(self, round_: int, indices: np.ndarray) -> np.ndarray:
        """Standard normal values, one per entry of ``indices``, for ``round_``'s noise."""
        if self.noise_seed is None:
            words = _urandom_words(2 * len(indices))
        else:
            words = np.array(
                [
                    derive_seed("dp-noise", self.noise_seed, round_, j, half)
                    for j in indices.tolist()
                    for half in (0, 1)
                ],
                dtype=np.uint64,
            )
        return box_muller(words)

    def release(self, accumulated: np.ndarray, round_: int) -> float:
        """Add round ``round_``'s noise to ``accumulated`` (which already holds the clipped
        uploads times ``weight``); returns the epsilon spent after this round."""
        touched = self.touchable(round_)
        scale = self.noise_multiplier * self.clip * self.weight
        accumulated[touched] += scale * self.noise(round_, touched)
        return self.epsilon(round_)

    # ------------------------------------------------------------------------ accounting
    def epsilon(self, rounds_done: int) -> float:
        """The epsilon (at ``delta``) spent by ``rounds_done`` rounds, by the RDP accountant."""
        if rounds_done == 0:
            return 0.0
        return spent_epsilon(self.noise_multiplier, self.sampling_rate, rounds_done, self.delta)

    def report(self, rounds_done: int) -> dict:
        """metrics.json's ``final.dp`` block."""
        return {
            "epsilon": self.epsilon(rounds_done),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "rounds": rounds_done,
            "clip": self.clip,
            "accountant": f"dp_accounting {ACCOUNTANT} (RdpAccountant, Poisson-subsampled Gaussian)",
            "target_epsilon": self.target_epsilon,
            "calibrated_rounds": self.rounds,
            "noise_std_per_entry": self.noise_multiplier * self.clip * self.weight,
            "noise_source": "os.urandom" if self.noise_seed is None else "--dp-noise-seed (reproducible; unsafe)",
        }

    # ------------------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        return {
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "delta": self.delta,
            "clip": self.clip,
            "epsilon": self.target_epsilon,
            "rounds": self.rounds,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue the saved accountant: its sigma, never a recalibrated one (the rounds already
        run were noised with it). A run may stop earlier than calibrated, never go further."""
        sigma = check_real("saved privacy noise_multiplier", state["noise_multiplier"], positive=True)
        for name, value in (
            ("sampling_rate", self.sampling_rate),
            ("delta", self.delta),
            ("clip", self.clip),
            ("epsilon", self.target_epsilon),
        ):
            if state[name] != value:
                raise ValueError(f"saved privacy {name} is {state[name]!r}, this run's is {value!r}")
        rounds = check_int("saved privacy rounds", state["rounds"], 1)
        if self.rounds > rounds:
            raise ValueError(
                f"--rounds {self.rounds} exceeds the {rounds} rounds whose noise was calibrated to epsilon "
                f"{self.target_epsilon:g}: more rounds would spend more than the budget"
            )
        self._sigma, self.rounds = sigma, rounds


def box_muller(words: np.ndarray) -> np.ndarray:
    """Standard normal float64 values from pairs of uint64 words (cosine branch of Box-Muller,
    u1 in (0, 1] from the first word's top 53 bits, u2 in [0, 1) from the second's)."""
    pairs = words.reshape(-1, 2)
    u1 = ((pairs[:, 0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53
    u2 = (pairs[:, 1] >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _urandom_words(n: int) -> np.ndarray:
    return np.frombuffer(os.urandom(8 * n), dtype=np.uint64)


@contextlib.contextmanager
def _quiet_accountant() -> Iterator[None]:
    """dp-accounting logs "failed to converge ... excluding this order" warnings through absl for
    RDP orders it cannot evaluate; the result is still a valid bound, so users need not see them."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _event(sigma: float, q: float, rounds: int) -> Any:  # a dp_accounting.DpEvent (imported lazily)
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds
    )


def spent_epsilon(sigma: float, q: float, rounds: int, delta: float) -> float:
    """epsilon at ``delta`` after ``rounds`` Poisson-subsampled (rate q) Gaussian mechanisms of
    noise multiplier ``sigma``, by dp-accounting's RDP accountant."""
    from dp_accounting.rdp import RdpAccountant

    with _quiet_accountant():
        return float(RdpAccountant().compose(_event(sigma, q, rounds)).get_epsilon(delta))


def calibrate(q: float, rounds: int, epsilon: float, delta: float) -> float:
    """The least noise multiplier (within dp-accounting's tolerance, on the safe side) whose
    ``rounds`` compositions spend at most ``epsilon`` at ``delta``."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    with _quiet_accountant():
        return float(
            dp_accounting.calibrate_dp_mechanism(RdpAccountant, lambda s: _event(s, q, rounds), epsilon, delta)
        )
