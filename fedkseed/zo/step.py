"""One ZO step: the probe passes and closure evaluations, the update pass, and what happens when
the closure fails. ``zo_step`` is the public one-direction MeZO step; ``run_step`` is the engine
``ZOSGD`` drives with several directions, param groups and momentum.

MeZO and FedKSeed's official code make four passes per step (+eps, -2eps, +eps restore, then
the update), each materialising z tensor by tensor. Here the restore and the update are one
fused pass, and with ``next_seed`` the next step's +eps perturbation joins that pass too (two
passes per step in steady state). The exact passes are defined once, in
:mod:`fedkseed.zo.passes`, so a History replays a run bit for bit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import stream as S
from ..checks import check_real, check_rounding
from ..ops import ParamsLike, resolve_backend
from ..paramset import ParamSet, trainable
from ..seeds import check_seed
from . import passes
from .estimators import ESTIMATORS, Estimator
from .passes import Entry
from .runner import Runner

_NO_GRAD_MESSAGE = "does not require grad and does not have a grad_fn"  # autograd's own words

# (seeds, alphas[group][term], decays[group]) of an update, from the step's projected gradients
Update = tuple[tuple[int, ...], tuple[tuple[float, ...], ...], tuple[float, ...]]


@dataclass(frozen=True)
class ZOStepResult:
    grad: float  # mean projected gradient over the directions after clipping; 0.0 when skipped
    loss_plus: float  # L+ of the first direction (MeZO's reported loss)
    loss_minus: float  # L- of the first direction; one-sided (FZOO): L_0, the loss at theta
    skipped: bool  # a loss was NaN/inf or |L+ - L-| > skip_threshold: restored, not updated
    alpha: float = 0.0  # float32 coefficient of the first term in group 0: -lr * w (0.0 when skipped)
    decay: float = 1.0  # float32 factor applied to group 0's decayed tensors (1.0 when skipped)
    grads: tuple[float, ...] = ()  # projected gradient of each direction
    losses: tuple[float, ...] = ()  # L+_1, L-_1, L+_2, L-_2, ...; one-sided: L_0, L_1, ..., L_N


def decay_factor(lr: float, weight_decay: float) -> float:
    decay = passes.float32(1.0 - lr * weight_decay)
    if not math.isfinite(decay):
        raise ValueError(f"lr * weight_decay overflows float32: lr={lr}, weight_decay={weight_decay}")
    return decay


def _loss_value(loss: Any) -> float:
    """A closure's loss as a Python float; a clear error for anything but a scalar."""
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise TypeError(f"closure must return a scalar loss, got a tensor of shape {tuple(loss.shape)}")
        return float(loss.detach().reshape(()).item())
    if isinstance(loss, (int, float)) and not isinstance(loss, bool):
        return float(loss)
    raise TypeError(f"closure must return a scalar loss (tensor or float), got {type(loss).__name__}")


def evaluate(closure: Callable[[], Any]) -> float:
    """closure() under torch.no_grad, as a float; a closure calling .backward() is told why it
    cannot."""
    with torch.no_grad():
        try:
            loss = closure()
        except RuntimeError as error:
            if _NO_GRAD_MESSAGE in str(error):
                raise RuntimeError(
                    "ZO closures run without autograd (under torch.no_grad): return the loss and do "
                    "not call .backward() or build a graph in the closure"
                ) from error
            raise
    return _loss_value(loss)


def _finite_update(update: Update, eps: float) -> bool:
    """Every coefficient of the update pass (restore included: ``eps``, negative for a one-sided
    step) is finite in float32."""
    _, alphas, decays = update
    for group_alphas, d in zip(alphas, decays):
        for a in group_alphas:
            if not math.isfinite(a):
                return False
            for restore_decay in (1.0, d):
                if not math.isfinite(passes.float32(passes.update_alpha(eps, a, restore_decay))):
                    return False
    return all(math.isfinite(d) for d in decays)


def one_sided_grads(losses: Sequence[float], eps: float, skip_threshold: float | None) -> list[float] | None:
    """FZOO's normalised one-sided projected gradients (L_i - L_0) / (eps sigma), i = 1..N, from
    ``losses`` = (L_0, L_1, ..., L_N); sigma = sqrt(sum_i (L_i - mean)^2 / (N - 1)) over the N
    perturbed losses (fsum, float64). None (skip the update) when a loss is NaN/inf, when some
    |L_i - L_0| > ``skip_threshold``, or when sigma is 0 (all N losses equal: no scale to
    normalise by) or the quotient overflows."""
    base, perturbed = losses[0], losses[1:]
    n = len(perturbed)
    if not all(math.isfinite(x) for x in losses):
        return None
    if skip_threshold is not None and any(abs(x - base) > skip_threshold for x in perturbed):
        return None
    mean = math.fsum(perturbed) / n
    sigma = math.sqrt(math.fsum((x - mean) ** 2 for x in perturbed) / (n - 1))
    if not sigma > 0:
        return None
    grads = [(x - base) / (eps * sigma) for x in perturbed]
    return grads if all(math.isfinite(g) for g in grads) else None


# ------------------------------------------------------------------------------------ the engine
def run_step(
    runner: Runner,
    closure: Callable[[], Any],
    probes: tuple[int, ...],
    update: Callable[[list[float]], Update],
    *,
    eps: float,
    groups: int,
    perturbed: bool = False,
    next_seed: int | None = None,
    clip: float | None = None,
    skip_threshold: float | None = None,
    rounding_base: int | None = None,
    record: Callable[[Entry, bool], None] | None = None,
    one_sided: bool = False,
    remask: float | None = None,
) -> ZOStepResult:
    """One ZO step over ``probes`` (validated by the caller).

    ``update(grads)`` maps the projected gradients (one per probe, clipped) to the update terms.
    ``one_sided``: FZOO's probe pattern (:mod:`fedkseed.zo.passes`; the caller passes neither
    ``perturbed``, ``next_seed`` nor ``clip``) and its normalised gradients
    (:func:`one_sided_grads`).
    ``record(entry, exact)`` receives the entry of what was applied, completed or aborted;
    ``exact`` is False only when a pass failed half-way or the recovery pass failed, so the
    weights are no longer what the entry says. ``rounding_base``: stochastic rounding on, with
    each pass's seed derived from it and the pass number. ``remask``: a density; the step starts
    a mask epoch (the runner's mask rebuilt from the weights now, which must not be perturbed);
    every pass goes through the runner's current mask either way.
    """

    def apply(p: passes.Pass) -> None:
        rseed = None if rounding_base is None else passes.rounding_seed(rounding_base, p.number)
        runner.apply(p, rseed)

    if remask is not None:
        runner.remask(remask)
    losses: list[float] = []
    done, in_pass = 0, False
    try:
        if perturbed or one_sided:
            losses.append(evaluate(closure))
        for p in passes.probe_passes(probes, eps, perturbed, one_sided):
            in_pass = True
            apply(p)
            in_pass = False
            done += 1
            losses.append(evaluate(closure))
    except BaseException:
        recovery = passes.recovery_pass(probes, eps, perturbed, done, one_sided)
        exact = not in_pass and _recover(apply, recovery)
        if record is not None:
            aborted = Entry(probes, (), ((),) * groups, (1.0,) * groups, perturbed, None, done, one_sided, remask)
            record(aborted, exact)
        raise

    grads, skipped = [], False
    if one_sided:
        normalized = one_sided_grads(losses, eps, skip_threshold)
        skipped = normalized is None
        grads = [0.0] * len(probes) if normalized is None else normalized
    for i in range(0 if one_sided else len(probes)):
        lp, lm = losses[2 * i], losses[2 * i + 1]
        g = (lp - lm) / (2.0 * eps)
        if not (math.isfinite(lp) and math.isfinite(lm) and math.isfinite(g)):
            skipped = True
        elif skip_threshold is not None and abs(lp - lm) > skip_threshold:
            skipped = True
        if clip is not None and math.isfinite(g):
            g = max(-clip, min(clip, g))
        grads.append(g)
    planned = None if skipped else update(grads)
    if planned is None or not _finite_update(planned, -eps if one_sided else eps):
        skipped = True
        planned = ((), ((),) * groups, (1.0,) * groups)
    entry = Entry(probes, *planned, perturbed, next_seed, None, one_sided, remask)
    try:
        apply(passes.update_pass(entry, eps))
    except BaseException:
        if record is not None:
            record(entry, False)
        raise
    if record is not None:
        record(entry, True)
    first_alpha = entry.alphas[0][0] if entry.alphas[0] else 0.0
    return ZOStepResult(
        0.0 if skipped else math.fsum(grads) / len(grads),
        losses[1] if one_sided else losses[0],
        losses[0] if one_sided else losses[1],
        skipped,
        first_alpha,
        entry.decays[0],
        tuple(0.0 if skipped else g for g in grads),
        tuple(losses),
    )


def _recover(apply: Callable[[passes.Pass], None], recovery: passes.Pass | None) -> bool:
    """Take back an aborted step's perturbation; False (with a warning) if even that fails."""
    if recovery is None:
        return True
    try:
        apply(recovery)
    except Exception as error:  # the closure's error propagates; this one is reported
        warnings.warn(f"could not take back the perturbation of a failed ZO step: {error!r}", stacklevel=3)
        return False
    return True


# ------------------------------------------------------------------------------------ zo_step
def zo_step(
    params: ParamsLike,
    closure: Callable[[], Any],
    seed: int | Sequence[int],
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
    estimator: str = "mezo",
    density: float = 1.0,
) -> ZOStepResult:
    """One MeZO two-point step in three passes (two with ``next_seed`` / ``perturbed``), or
    with ``estimator="fzoo"`` one FZOO step over the N >= 2 probe seeds ``seed`` (a sequence):
    L_0 at theta, then L_i at theta + eps z(seed[i-1]), and the normalised update
    theta <- theta - lr/N sum_i (L_i - L_0) / (eps sigma) z(seed[i-1]) in N + 1 passes
    (:mod:`fedkseed.zo.estimators`); it takes neither ``clip``, ``next_seed`` nor ``perturbed``.

    ``params``: a ParamSet as is, or any other form's tensors with ``requires_grad``.
    ``closure()`` returns the loss at the current weights (tensor with one element or float);
    it runs under ``torch.no_grad``. g = (L+ - L-) / (2 eps), clamped to [-clip, clip] when
    ``clip`` is set; a NaN/inf loss, or |L+ - L-| > ``skip_threshold`` (FedKSeed's official
    rule), skips the update: the last pass only restores the weights. Weight decay applies to
    the tensors of ``ParamSet.decay_mask``: they end at theta d + (eps d + alpha) z after the
    -2 eps pass, the others at theta + (eps + alpha) z.

    ``next_seed``: the update pass also applies the next step's +eps * z(next_seed); the weights
    are then left perturbed and the next call must pass ``perturbed=True`` (it skips its first
    pass). ``rounding="stochastic"`` rounds bfloat16/float16 results stochastically, each pass
    with fresh bits derived from (``rounding_seed`` or ``seed`` (FZOO: its first seed), pass
    number).

    ``density`` < 1: Sparse-MeZO's step, every pass through the magnitude mask of that density
    built from the weights at the call (docs/stream-spec.md#magnitude-mask): only the selected
    (small-magnitude) elements are perturbed, updated and decayed, the others keep their bits.
    The mask needs unperturbed weights, so it takes neither ``next_seed`` nor ``perturbed``.

    Everything is validated before the weights are touched. If the closure raises or returns a
    non-scalar mid-step, the perturbation is taken back before the error propagates (one more
    pass: the weights come back up to rounding, as a copy would double the memory).
    """
    pset = trainable(params, "zo_step")
    if not callable(closure):
        raise TypeError(f"closure must be callable, got {type(closure).__name__}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    one_sided = estimator == "fzoo"
    if one_sided:
        if isinstance(seed, int) or not isinstance(seed, Sequence):
            raise TypeError(f"estimator 'fzoo' takes a sequence of N >= 2 probe seeds, got {seed!r}")
        probes = tuple(check_seed(s) for s in seed)
        rule = Estimator(len(probes), kind="fzoo")  # refuses fewer than 2 seeds or more than 255
        refused = {"clip": clip is not None, "next_seed": next_seed is not None, "perturbed": perturbed}
        for name, given in refused.items():
            if given:
                raise ValueError(
                    f"estimator 'fzoo' does not take {name}: its step is normalised by sigma and starts "
                    "from the unperturbed weights (L_0)"
                )
    else:
        probes = (check_seed(seed),)
    if next_seed is not None:
        check_seed(next_seed)
    density = check_density(density)
    if density < 1.0:
        check_maskable(pset)
        if next_seed is not None or perturbed:
            raise ValueError(
                "density < 1 does not take next_seed or perturbed: the mask is built from the weights "
                "at the call, which must carry no perturbation"
            )
    eps = check_real("eps", eps, positive=True)
    lr = check_real("lr", lr)
    weight_decay = check_real("weight_decay", weight_decay)
    clip = check_real("clip", clip, positive=True, allow_none=True)
    skip_threshold = check_real("skip_threshold", skip_threshold, positive=True, allow_none=True)
    S.dist_tag(dist)
    stochastic = check_rounding(rounding) == "stochastic"
    if rounding_seed is not None:
        if not stochastic:
            raise ValueError("rounding_seed needs rounding='stochastic'")
        check_seed(rounding_seed)
    resolve_backend(None, pset.device)  # the backend setting must serve these tensors: refused before any pass
    decay = decay_factor(lr, weight_decay)
    runner = Runner(pset, [int(flag) for flag in pset.decay_mask], dist)

    def update(grads: list[float]) -> Update:
        if one_sided:
            terms = rule.own_terms(probes, grads)
            return tuple(s for s, _ in terms), (tuple(passes.float32(-lr * w) for _, w in terms),), (decay,)
        return probes, ((passes.float32(-lr * grads[0]),),), (decay,)

    base = (rounding_seed if rounding_seed is not None else probes[0]) if stochastic else None
    return run_step(
        runner,
        closure,
        probes,
        update,
        eps=eps,
        groups=1,
        perturbed=perturbed,
        next_seed=next_seed,
        clip=clip,
        skip_threshold=skip_threshold,
        rounding_base=base,
        one_sided=one_sided,
        remask=density if density < 1.0 else None,
    )


def check_density(density: float) -> float:
    """The mask density rho, in (0, 1] (1: dense, no mask)."""
    density = check_real("density", density, positive=True)
    if density > 1.0:
        raise ValueError(f"density must be in (0, 1] (the share of each tensor perturbed), got {density!r}")
    return density


def check_maskable(pset: ParamSet) -> None:
    """A magnitude mask needs whole tensors: sharded parameters are refused in one line."""
    if pset.sharded:
        raise ValueError(
            "density < 1 needs whole tensors (per-tensor thresholds over the global tensor): these parameters "
            "are sharded (FSDP2/DTensor)"
        )


def classes_of(pset: ParamSet, group_decays: Sequence[str]) -> list[int]:
    """Each tensor's coefficient class 2g + decayed, from its param group g and that group's
    decay rule: "auto" (ParamSet.decay_mask: matrices, not biases or norms), "all", "none"."""
    out = []
    for g, flag in zip(pset.group_index, pset.decay_mask):
        rule = group_decays[g]
        out.append(2 * g + int(flag if rule == "auto" else rule == "all"))
    return out
