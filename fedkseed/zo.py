"""The zeroth-order training layer: one MeZO step in three passes (``zo_step``) and an optimizer
over it (``ZOSGD``) that records every step in a :class:`~fedkseed.history.History`.

MeZO and FedKSeed's official code make four passes per step (+eps, -2eps, +eps restore, then
the update), each materialising z tensor by tensor. Here the restore and the update are one
fused pass, theta <- theta * d + (eps * d - lr * g) * z, and with ``next_seed`` the next step's
+eps perturbation joins that pass too (two passes per step in steady state). The exact passes a
step applies are defined once, in :func:`fedkseed.history.step_passes`, so a History replays a
run bit for bit.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import stream as S
from .history import (
    PASS_RECOVER,
    PASS_UPDATE,
    History,
    derive_seed,
    float32,
    rounding_seed as pass_rounding_seed,
    step_passes,
    step_rounding_base,
)
from .ops import ParamsLike, replay_, resolve_backend
from .paramset import ParamSet
from .reference import check_seed

ROUNDINGS = ("nearest", "stochastic")


@dataclass(frozen=True)
class ZOStepResult:
    grad: float  # projected gradient g = (L+ - L-) / (2 eps) after clipping; 0.0 when skipped
    loss_plus: float
    loss_minus: float
    skipped: bool  # a loss was NaN/inf or |L+ - L-| > skip_threshold: restored, not updated
    alpha: float = 0.0  # the float32 coefficient applied: -lr * g (0.0 when skipped)
    decay: float = 1.0  # the float32 factor applied to decayed tensors (1.0 when skipped)


# --------------------------------------------------------------------------------- validation
def _real(name: str, value: Any, *, positive: bool = False, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def _rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return rounding


def _loss_value(loss: Any) -> float:
    """A closure's loss as a Python float; a clear error for anything but a scalar."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise TypeError(f"closure must return a scalar loss, got a tensor of shape {tuple(loss.shape)}")
        return float(loss.detach().reshape(()).item())
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    raise TypeError(f"closure must return a scalar loss (tensor or float), got {type(loss).__name__}")


# ------------------------------------------------------------------------------------ zo_step
def zo_step(
    params: ParamsLike,
    closure: Callable[[], Any],
    seed: int,
    *,
    eps: float,
    lr: float,
    weight_decay: float = 0.0,
    dist: str = "gaussian",
    clip: float | None = None,
    skip_threshold: float | None = None,
    next_seed: int | None = None,
    perturbed: bool = False,
    rounding: str = "nearest",
    rounding_seed: int | None = None,
    backend: str = "auto",
) -> ZOStepResult:
    """One MeZO two-point step in three passes (two with ``next_seed`` / ``perturbed``).

    ``closure()`` returns the loss at the current weights (tensor with one element or float);
    it runs under ``torch.no_grad``. g = (L+ - L-) / (2 eps), clamped to [-clip, clip] when
    ``clip`` is set; a NaN/inf loss, or |L+ - L-| > ``skip_threshold`` (FedKSeed's official
    rule), skips the update: the last pass only restores the weights.

    ``next_seed``: the update pass also applies the next step's +eps * z(next_seed); the weights
    are then left perturbed and the next call must pass ``perturbed=True`` (it skips its first
    pass). ``rounding="stochastic"`` rounds bfloat16/float16 results stochastically, each pass
    with fresh bits derived from (``rounding_seed`` or ``seed``, pass number).

    Everything is validated before the weights are touched. If the closure raises or returns a
    non-scalar mid-step, the perturbation is taken back before the error propagates (one more
    pass: the weights come back up to rounding, as a copy would double the memory).
    """
    pset = ParamSet.of(params)
    if not callable(closure):
        raise TypeError(f"closure must be callable, got {type(closure).__name__}")
    check_seed(seed)
    if next_seed is not None:
        check_seed(next_seed)
    eps = _real("eps", eps, positive=True)
    lr = _real("lr", lr)
    weight_decay = _real("weight_decay", weight_decay)
    clip = _real("clip", clip, positive=True, allow_none=True)
    skip_threshold = _real("skip_threshold", skip_threshold, positive=True, allow_none=True)
    S.dist_tag(dist)
    stochastic = _rounding(rounding) == "stochastic"
    if rounding_seed is not None:
        if not stochastic:
            raise ValueError("rounding_seed needs rounding='stochastic'")
        check_seed(rounding_seed)
    which = resolve_backend(backend, pset.device)
    decay = float32(1.0 - lr * weight_decay)
    if not math.isfinite(decay):
        raise ValueError(f"lr * weight_decay overflows float32: lr={lr}, weight_decay={weight_decay}")
    base = rounding_seed if rounding_seed is not None else seed

    def apply(seeds: list[int], alphas: list[float], d: float | None, pass_number: int) -> None:
        rseed = pass_rounding_seed(base, pass_number) if stochastic else None
        replay_(pset, seeds, alphas, dist, d, rounding_seed=rseed, backend=which)

    plus, minus, _ = step_passes(seed, 0.0, 1.0, eps)
    shift = 1.0 if perturbed else 0.0  # the multiple of eps * z(seed) the weights carry
    try:
        if not perturbed:
            apply(*plus)
            shift = 1.0
        with torch.no_grad():
            loss_plus = _loss_value(closure())
        apply(*minus)
        shift = -1.0
        with torch.no_grad():
            loss_minus = _loss_value(closure())
    except BaseException:
        if shift:
            apply([seed], [-shift * eps], None, PASS_RECOVER)
        raise

    grad = (loss_plus - loss_minus) / (2.0 * eps)
    if clip is not None and math.isfinite(grad):
        grad = max(-clip, min(clip, grad))
    alpha = float32(-lr * grad) if math.isfinite(grad) else math.nan
    skipped = not (
        math.isfinite(loss_plus)
        and math.isfinite(loss_minus)
        and math.isfinite(alpha)
        and math.isfinite(float32(eps * decay + alpha))
    ) or (skip_threshold is not None and abs(loss_plus - loss_minus) > skip_threshold)
    if skipped:
        grad, alpha, step_decay = 0.0, 0.0, 1.0
    else:
        step_decay = decay
    seeds, alphas, d, pass_number = step_passes(seed, alpha, step_decay, eps)[PASS_UPDATE - 1]
    if next_seed is not None:
        seeds, alphas = seeds + [next_seed], alphas + [eps]
    apply(seeds, alphas, None if d == 1.0 else d, pass_number)
    return ZOStepResult(grad, loss_plus, loss_minus, skipped, alpha, step_decay)


# -------------------------------------------------------------------------------------- ZOSGD
class ZOSGD:
    """Zeroth-order SGD with MeZO semantics: ``loss = opt.step(closure)``.

    The seed of step t is derived from (``seed``, t) by BLAKE2b (reproducible, independent of
    torch's global RNG), or, with ``candidates``, drawn from that finite pool (FedKSeed) with
    ``probabilities`` (uniform when None) by the same derivation. Every step, skipped ones too,
    is recorded in ``history``; ``last`` holds the latest ZOStepResult; ``steps`` counts steps.
    ``rounding="stochastic"`` gives each step fresh rounding bits derived from (seed, t).
    """

    def __init__(
        self,
        params: ParamsLike,
        lr: float,
        eps: float,
        weight_decay: float = 0.0,
        dist: str = "gaussian",
        seed: int = 0,
        candidates: Sequence[int] | None = None,
        probabilities: Sequence[float] | None = None,
        backend: str = "auto",
        *,
        rounding: str = "nearest",
        clip: float | None = None,
        skip_threshold: float | None = None,
    ) -> None:
        self.params = ParamSet.of(params)
        self.lr = _real("lr", lr)
        self.eps = _real("eps", eps, positive=True)
        self.weight_decay = _real("weight_decay", weight_decay)
        S.dist_tag(dist)
        self.dist = dist
        self.seed = check_seed(seed)
        self.candidates, self._cumulative = _seed_pool(candidates, probabilities)
        self.probabilities = None if probabilities is None else [float(p) for p in probabilities]
        resolve_backend(backend, self.params.device)
        self.backend = backend
        self.rounding = _rounding(rounding)
        self.clip = _real("clip", clip, positive=True, allow_none=True)
        self.skip_threshold = _real("skip_threshold", skip_threshold, positive=True, allow_none=True)
        self.steps = 0
        self.last: ZOStepResult | None = None
        self.history = self._new_history()

    def _new_history(self) -> History:
        key = derive_seed(b"fks-round-key", self.seed) if self.rounding == "stochastic" else None
        return History(self.dist, self.params.fingerprint(), eps=self.eps, rounding_key=key)

    def seed_for(self, step: int) -> int:
        """The perturbation seed of step ``step`` (a pure function of the configuration)."""
        word = derive_seed(b"fks-step-seed", self.seed, step)
        if self.candidates is None:
            return word
        if self._cumulative is None:
            return self.candidates[word % len(self.candidates)]
        u = (word >> 11) * 2.0**-53 * self._cumulative[-1]  # uniform in [0, total)
        index = bisect.bisect_right(self._cumulative, u)
        return self.candidates[min(index, len(self.candidates) - 1)]

    def step(self, closure: Callable[[], Any]) -> float:
        """One ZO step; returns L+ (the loss at the perturbed weights, MeZO's convention)."""
        seed = self.seed_for(self.steps)
        rbase = None
        if self.history.rounding_key is not None:
            rbase = step_rounding_base(self.history.rounding_key, self.steps)
        result = zo_step(
            self.params,
            closure,
            seed,
            eps=self.eps,
            lr=self.lr,
            weight_decay=self.weight_decay,
            dist=self.dist,
            clip=self.clip,
            skip_threshold=self.skip_threshold,
            rounding=self.rounding,
            rounding_seed=rbase,
            backend=self.backend,
        )
        self.history.record(seed, result.alpha, result.decay)
        self.steps += 1
        self.last = result
        return result.loss_plus

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs: configuration, step counter and the history (compact bytes)."""
        return {
            "format": 1,
            "step": self.steps,
            "seed": self.seed,
            "lr": self.lr,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "dist": self.dist,
            "rounding": self.rounding,
            "clip": self.clip,
            "skip_threshold": self.skip_threshold,
            "candidates": None if self.candidates is None else list(self.candidates),
            "probabilities": self.probabilities,
            "history": self.history.to_bytes(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: validated in full before anything changes."""
        if state.get("format") != 1:
            raise ValueError(f"unknown ZOSGD state format {state.get('format')!r}")
        history = History.from_bytes(state["history"], source="state_dict['history']")
        if history.fingerprint != self.params.fingerprint():
            raise ValueError(
                f"state_dict was saved for other parameters: fingerprint {history.fingerprint} "
                f"!= {self.params.fingerprint()}"
            )
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step != len(history):
            raise ValueError(f"state_dict step {step!r} does not match its history ({len(history)} entries)")
        candidates, cumulative = _seed_pool(state["candidates"], state["probabilities"])
        S.dist_tag(state["dist"])
        rounding = _rounding(state["rounding"])
        self.lr = _real("lr", state["lr"])
        self.eps = _real("eps", state["eps"], positive=True)
        self.weight_decay = _real("weight_decay", state["weight_decay"])
        self.clip = _real("clip", state["clip"], positive=True, allow_none=True)
        self.skip_threshold = _real("skip_threshold", state["skip_threshold"], positive=True, allow_none=True)
        self.seed = check_seed(state["seed"])
        self.dist, self.rounding = state["dist"], rounding
        self.candidates, self._cumulative = candidates, cumulative
        self.probabilities = state["probabilities"]
        self.history, self.steps, self.last = history, step, None


def _seed_pool(
    candidates: Sequence[int] | None, probabilities: Sequence[float] | None
) -> tuple[list[int] | None, list[float] | None]:
    """The candidate list and, when probabilities are given, their cumulative sums (float64)."""
    if candidates is None:
        if probabilities is not None:
            raise ValueError("probabilities need candidates")
        return None, None
    pool = [check_seed(s) for s in candidates]
    if not pool:
        raise ValueError("candidates must hold at least one seed")
    if probabilities is None:
        return pool, None
    probs = list(probabilities)
    if len(probs) != len(pool):
        raise ValueError(f"probabilities has {len(probs)} values for {len(pool)} candidates")
    cumulative, total = [], 0.0
    for p in probs:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p < 0:
            raise ValueError(f"probabilities must be finite and >= 0, got {p!r}")
        total += p
        cumulative.append(total)
    if total <= 0:
        raise ValueError("probabilities must not all be zero")
    return pool, cumulative
