"""ZOSGD: zeroth-order SGD with MeZO semantics as a ``torch.optim.Optimizer``, recording every
pass in a :class:`~fedkseed.zo.History` that replays the run bit for bit."""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from .. import ops
from .. import stream as S
from ..checks import check_bool, check_int, check_real, check_rounding
from ..distributed import DistributedLoss, is_multi_rank, is_reduced
from ..ops import ParamsLike, resolve_backend
from ..paramset import ParamSet, reshard_fsdp, trainable
from ..seeds import check_seed, derive_seed, draw_index
from . import passes
from .estimators import Estimator, Terms
from .history import History
from .passes import Entry
from .runner import Runner
from .step import (
    Update,
    ZOStepResult,
    check_density,
    check_maskable,
    classes_of,
    decay_factor,
    run_step,
)

STATE_FORMAT = 2
DECAY_RULES = ("auto", "all", "none")
LOSS_REDUCTIONS = ("mean", "none")
_GROUP_KEYS = ("params", "param_names", "lr", "weight_decay", "decay")


class ZOSGD(torch.optim.Optimizer):
    """Zeroth-order SGD with MeZO semantics: ``loss = opt.step(closure)``.

    ``params``: a module (its parameters with ``requires_grad``), a tensor, an iterable of
    tensors or (name, tensor) pairs, or param groups (dicts with "params" and optionally "lr",
    "weight_decay", "decay" and "param_names"); tensors with ``requires_grad=False`` are never
    touched, whatever the form. A ParamSet is taken as is. A group's "decay" rule says which of
    its tensors decay: "auto" (matrices, not biases or norms; ``ParamSet.decay_mask``), "all"
    or "none". ``eps`` is one for the run.

    Each step reads every group's "lr" and "weight_decay" at that moment (so any
    ``torch.optim.lr_scheduler`` works) and records the coefficients it applied. The seeds of
    step t derive from (``seed``, t) by BLAKE2b (reproducible, independent of torch's global
    RNG), or are drawn from ``candidates`` (FedKSeed) with ``probabilities`` by the same
    derivation. ``estimator`` ("mezo": two-point, n-SPSA with ``directions`` > 1; "fzoo": FZOO's
    normalised one-sided step over ``directions`` = N >= 2 probes, N + 1 forwards, best with
    ``dist="rademacher"``), ``directions``, ``sign``, ``momentum`` and ``window`` choose the
    update rule (:mod:`fedkseed.zo.estimators`); "fzoo" takes neither ``sign`` nor ``clip``.
    ``rounding="stochastic"`` gives every pass fresh rounding bits derived from (seed, entry,
    pass).

    ``density`` = rho < 1: Sparse-MeZO's sparse perturbation. Every pass (probes, update,
    settle) goes through a magnitude mask that selects, in each tensor, its ceil(rho * n)
    smallest-magnitude elements (docs/stream-spec.md#magnitude-mask); the others keep their
    stored bits. The mask is built from the weights at the start of every ``mask_every``-th step
    (a mask epoch; the step before it does not fuse, so those weights are unperturbed) and kept
    as one bit per element until the next. What follows: (1) weight decay acts only on the
    selected elements (an unselected element is not written at all); (2) momentum's past terms
    are replayed through the current mask, m_t = sum_j beta^j w_{t-j} (mask_t * z_{t-j}), not
    through the masks they were drawn under; (3) the History records ``remask`` = rho at each
    mask epoch and replays bit for bit, rebuilding the mask from the replayed weights. The mask
    costs one read pass plus the per-tensor thresholds at each rebuild; density = 1 (default)
    is the dense step, bit for bit.

    ``fuse`` (default): the update pass also applies the next step's +eps perturbation (two
    passes per step instead of three; "fzoo" never fuses, as L_0 needs the unperturbed
    weights), so between steps the weights carry +eps z(next seed) (``pending``). ``settle()``
    takes it back (one recorded pass). Given a module, ZOSGD settles by itself before any
    forward of the module outside ``step`` and before its ``state_dict()``; with tensors call
    ``settle()`` before evaluating or saving them. Given a module, the closure runs with the
    module in eval mode (no dropout noise in the two losses, as MeZO does). Those hooks are
    removed by ``close()`` (which settles first) or when the optimizer is garbage-collected.

    On more than one rank (torch.distributed initialised, ``group`` of more than one rank:
    FSDP2 shards, or replicas), every rank must step with the same loss, or the ranks' weights
    drift apart. A closure from :class:`fedkseed.distributed.DistributedLoss` already gives
    that (with token weighting); any other closure's loss is averaged over the ranks by ZOSGD
    (``loss_reduction="mean"``, 16 bytes per evaluation). ``loss_reduction="none"`` keeps each
    rank's own loss, for independent runs sharing a process group; sharded parameters refuse it.
    Over FSDP2 shards given as tensors (a ParamSet), ZOSGD cannot reshard the model between the
    evaluations, so a plain closure is refused: give ZOSGD the model, or use
    ``DistributedLoss(module=model)``.
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
        *,
        rounding: str = "nearest",
        clip: float | None = None,
        skip_threshold: float | None = None,
        directions: int = 1,
        momentum: float = 0.0,
        window: int = 8,
        sign: bool = False,
        fuse: bool = True,
        loss_reduction: str = "mean",
        group: Any = None,
        estimator: str = "mezo",
        density: float = 1.0,
        mask_every: int = 1,
    ) -> None:
        lr = check_real("lr", lr)
        weight_decay = check_real("weight_decay", weight_decay)
        self.eps = check_real("eps", eps, positive=True)
        S.dist_tag(dist)
        self.module = params if isinstance(params, torch.nn.Module) else None
        if not isinstance(params, (ParamSet, torch.nn.Module, torch.Tensor)):
            params = list(params)  # an iterator (model.parameters()) is read once
        self.params = trainable(params, "ZOSGD")
        options = _group_options(params, lr, weight_decay)
        self._layout_fixed = False
        super().__init__(
            [
                {"params": [t for t, g in zip(self.params.tensors, self.params.group_index) if g == i], **o}
                for i, o in enumerate(options)
            ],
            {"lr": lr, "weight_decay": weight_decay, "decay": "auto"},
        )
        self._layout_fixed = True
        self._decay_rules = [g["decay"] for g in self.param_groups]
        self.classes = classes_of(self.params, self._decay_rules)
        self.dist = dist
        self.seed = check_seed(seed)
        self.candidates, self._cumulative = _seed_pool(candidates, probabilities)
        self.probabilities = None if probabilities is None else [float(p) for p in probabilities]
        self._runner = Runner(self.params, self.classes, dist)
        self.rounding = check_rounding(rounding)
        self.clip = check_real("clip", clip, positive=True, allow_none=True)
        self.skip_threshold = check_real("skip_threshold", skip_threshold, positive=True, allow_none=True)
        self.estimator = Estimator(directions, sign=sign, momentum=momentum, window=window, kind=estimator)
        if self.estimator.one_sided and self.clip is not None:
            raise ValueError("estimator 'fzoo' does not take clip: its step is already normalised by sigma")
        self.fuse = check_bool("fuse", fuse)
        self.density = check_density(density)
        self.mask_every = check_int("mask_every (steps per mask epoch)", mask_every, 1)
        if self.density < 1.0:
            check_maskable(self.params)
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
        if loss_reduction == "none" and self.params.sharded:
            raise ValueError(
                "loss_reduction='none' with sharded parameters: the shards of one model must step with "
                "one loss; leave the default (the mean over the ranks) or use DistributedLoss"
            )
        self.loss_reduction, self.group = loss_reduction, group
        self._reducer: DistributedLoss | None = None  # the mean over the ranks, made when first needed
        self.steps = 0
        self.pending: int | None = None  # seed whose +eps the weights carry (a fused pass)
        self.last: ZOStepResult | None = None
        self.history = self._new_history()
        self._in_step = False
        self._closed = False
        # The module's hooks go with the optimizer: on close(), or when it is collected.
        handles = _settle_before_use(self.module, weakref.ref(self)) if self.module is not None else ()
        self._release_hooks = weakref.finalize(self, _remove_hooks, handles)

    def _new_history(self) -> History:
        key = derive_seed("round-key", self.seed) if self.rounding == "stochastic" else None
        return History.for_params(
            self.params, self.classes, groups=len(self.param_groups), dist=self.dist, eps=self.eps, rounding_key=key
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._layout_fixed:
            raise RuntimeError(
                "ZOSGD cannot add param groups after construction: its History is tied to the "
                "parameter layout; build a new optimizer with every group"
            )
        super().add_param_group(param_group)

    # ---------------------------------------------------------------------------------- seeds
    def seeds_for(self, step: int) -> tuple[int, ...]:
        """The probe seeds of step ``step`` (a pure function of the configuration): direction
        0 from (seed, step), direction i > 0 from (seed, step, i)."""
        words = [derive_seed("step-seed", self.seed, step)]
        words += [derive_seed("step-seed", self.seed, step, i) for i in range(1, self.estimator.directions)]
        if self.candidates is None:
            return tuple(words)
        if self._cumulative is None:
            return tuple(self.candidates[w % len(self.candidates)] for w in words)
        return tuple(self.candidates[draw_index(w, self._cumulative)] for w in words)

    def seed_for(self, step: int) -> int:
        """The (first) perturbation seed of step ``step``."""
        return self.seeds_for(step)[0]

    # ----------------------------------------------------------------------------------- step
    def step(self, closure: Callable[[], Any] | None = None) -> float:  # type: ignore[override]
        """One ZO step; returns L+ of the first direction (the loss at the perturbed weights,
        MeZO's convention), or for "fzoo" L_0, the loss at the weights before the step.
        ``closure()`` returns the loss; it runs 2 * directions times ("fzoo": directions + 1)."""
        if closure is None:
            raise TypeError(
                "ZOSGD.step needs a closure that returns the loss: a ZO step evaluates it twice per "
                "direction (loss = opt.step(lambda: model(**batch).loss))"
            )
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        if self._closed:
            raise RuntimeError("this ZOSGD is closed: build a new optimizer to train further")
        resolve_backend(None, self.params.device)  # the backend setting must serve the tensors: before any pass
        closure = self._agreed(closure)
        lrs, decays = self._group_coefficients()
        probes = self.seeds_for(self.steps)
        one_sided = self.estimator.one_sided
        remask = self.density if self._starts_mask_epoch(self.steps) else None
        if self.pending is not None and (one_sided or remask is not None or self.pending != probes[0]):
            self.settle()  # the configuration changed under a pending perturbation
        fuse_next = self.fuse and not one_sided and not self._starts_mask_epoch(self.steps + 1)
        next_seed = self.seeds_for(self.steps + 1)[0] if fuse_next else None
        own: Terms = []

        def update(grads: list[float]) -> Update:
            nonlocal own
            own = self.estimator.own_terms(probes, grads)
            terms = self.estimator.terms(own)
            seeds = tuple(s for s, _ in terms)
            alphas = tuple(tuple(passes.float32(-lr * w) for _, w in terms) for lr in lrs)
            return seeds, alphas, decays

        with self._stepping():
            result = run_step(
                self._runner,
                closure,
                probes,
                update,
                eps=self.eps,
                groups=len(self.param_groups),
                perturbed=self.pending is not None,
                next_seed=next_seed,
                clip=self.clip,
                skip_threshold=self.skip_threshold,
                rounding_base=self._rounding_base(),
                record=self._record,
                one_sided=one_sided,
                remask=remask,
            )
        self.estimator.push([] if result.skipped else own)
        self.steps += 1
        self.pending = next_seed
        self.last = result
        return result.loss_minus if one_sided else result.loss_plus

    def _agreed(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        """``closure``, made to give every rank the same loss when there is more than one rank
        (the mean over them), unless it already does (DistributedLoss) or reduction is off."""
        if self.loss_reduction == "none" or is_reduced(closure) or not is_multi_rank(self.group):
            return closure
        if self.params.sharded and self.module is None:
            raise ValueError(
                "ZOSGD over sharded tensors cannot reshard their model between evaluations: wrap the "
                "closure with DistributedLoss(module=model).wrap(...) or give ZOSGD the model"
            )
        if self._reducer is None:
            self._reducer = DistributedLoss(self.group, module=self.module)
        return self._reducer.wrap(closure)

    def _starts_mask_epoch(self, step: int) -> bool:
        """Step ``step`` rebuilds the magnitude mask (masked runs: every ``mask_every`` steps)."""
        return self.density < 1.0 and step % self.mask_every == 0

    def settle(self) -> None:
        """Take back the pending +eps perturbation of the next step (one pass, recorded), so
        the weights are the trained ones; nothing when none is pending."""
        if self.pending is None:
            return
        resolve_backend(None, self.params.device)  # refused before the entry: the perturbation stays pending
        groups = len(self.param_groups)
        entry = Entry((self.pending,), (), ((),) * groups, (1.0,) * groups, True, None, 0)
        base = self._rounding_base()
        exact = True
        try:
            for p in passes.entry_passes(entry, self.eps):
                self._runner.apply(p, None if base is None else passes.rounding_seed(base, p.number))
        except BaseException:
            exact = False
            raise
        finally:
            self._record(entry, exact)

    def close(self) -> None:
        """Settle the pending perturbation and remove the hooks this optimizer put on its
        module; the optimizer takes no further steps (its History stays readable). Closing
        twice does nothing."""
        if self._closed:
            return
        self.settle()
        self._release_hooks()
        self._closed = True

    def _record(self, entry: Entry, exact: bool) -> None:
        self.history.add(entry)
        if not exact:
            self.history.mark_inexact()
        if entry.aborted is not None:
            self.pending = None  # the recovery took the perturbation back

    def _rounding_base(self) -> int | None:
        key = self.history.rounding_key
        return None if key is None else passes.step_rounding_base(key, len(self.history))

    def _group_coefficients(self) -> tuple[list[float], tuple[float, ...]]:
        """Each group's lr and decay factor now (a scheduler may have changed them), checked
        before any weight moves."""
        lrs, decays = [], []
        for i, group in enumerate(self.param_groups):
            lr = check_real(f"param_groups[{i}]['lr']", group["lr"])
            wd = check_real(f"param_groups[{i}]['weight_decay']", group["weight_decay"])
            rule = group["decay"]
            if rule != self._decay_rules[i]:
                raise ValueError(f"param_groups[{i}]['decay'] is fixed at construction ({self._decay_rules[i]!r})")
            lrs.append(lr)
            decays.append(decay_factor(lr, wd))
        return lrs, tuple(decays)

    @contextlib.contextmanager
    def _stepping(self) -> Iterator[None]:
        """Inside a step: the module in eval mode (restored after, module by module), and no
        settling by the module's hooks."""
        modes = [(m, m.training) for m in self.module.modules()] if self.module is not None else []
        self._in_step = True
        try:
            if self.module is not None:
                self.module.eval()
            yield
        finally:
            for m, training in modes:
                m.training = training
            self._in_step = False

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """torch's (empty ``state``; ``param_groups`` with lr, weight_decay, decay and
        scheduler keys) plus "zo": configuration, step counter, pending seed, momentum window,
        the History bytes and, in a masked run, the current mask epoch's bits (the weights it
        was built from are gone). Only ints, floats, strs, bools, None, lists and bytes: it loads
        under ``torch.load(weights_only=True)``."""
        state = super().state_dict()
        state["zo"] = {
            "format": STATE_FORMAT,
            "steps": self.steps,
            "seed": self.seed,
            "eps": self.eps,
            "dist": self.dist,
            "rounding": self.rounding,
            "clip": self.clip,
            "skip_threshold": self.skip_threshold,
            "candidates": None if self.candidates is None else list(self.candidates),
            "probabilities": self.probabilities,
            "fuse": self.fuse,
            "pending": self.pending,
            "estimator": self.estimator.state(),
            "history": self.history.to_bytes(),
            "density": self.density,
            "mask_every": self.mask_every,
            "mask": None if self._runner.mask is None else self._runner.mask.cpu().numpy().tobytes(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume: everything is validated before anything changes. The weights must be the
        ones saved with this state (they may carry the pending perturbation)."""
        zo = state_dict.get("zo") if isinstance(state_dict, dict) else None
        if not isinstance(zo, dict) or zo.get("format") != STATE_FORMAT:
            got = zo.get("format") if isinstance(zo, dict) else None
            raise ValueError(f"not a ZOSGD state dict of format {STATE_FORMAT} (zo format {got!r})")
        history = History.from_bytes(zo["history"], source="state_dict['zo']['history']")
        history.check_params(self.params)
        if history.classes != self.classes or history.groups != len(self.param_groups):
            raise ValueError("state_dict was saved with other param groups or decay rules")
        steps = zo["steps"]
        completed = sum(1 for e in history if e.aborted is None and e.probes)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps != completed:
            raise ValueError(f"state_dict steps {steps!r} does not match its history ({completed} steps)")
        candidates, cumulative = _seed_pool(zo["candidates"], zo["probabilities"])
        S.dist_tag(zo["dist"])
        if zo["dist"] != history.dist or zo["eps"] != history.eps:
            raise ValueError("state_dict dist/eps disagree with its history")
        rounding = check_rounding(zo["rounding"])
        eps = check_real("eps", zo["eps"], positive=True)
        clip = check_real("clip", zo["clip"], positive=True, allow_none=True)
        skip = check_real("skip_threshold", zo["skip_threshold"], positive=True, allow_none=True)
        seed = check_seed(zo["seed"])
        estimator = Estimator.from_state(zo["estimator"])
        pending = zo["pending"]
        last = history.entries[-1] if len(history) else None
        if pending != (last.next_seed if last is not None else None):
            raise ValueError(f"state_dict pending seed {pending!r} disagrees with its history")
        if not isinstance(zo["fuse"], bool):
            raise ValueError(f"state_dict fuse {zo['fuse']!r} is not a bool")
        # states saved before masks carry no density: dense
        density = check_density(zo.get("density", 1.0))
        mask_every = zo.get("mask_every", 1)
        if isinstance(mask_every, bool) or not isinstance(mask_every, int) or mask_every < 1:
            raise ValueError(f"state_dict mask_every {mask_every!r} is not an int >= 1")
        mask = self._saved_mask(zo.get("mask"), history)
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError("state_dict has a different number of param groups")
        for i, group in enumerate(groups):
            check_real(f"param_groups[{i}]['lr']", group.get("lr"))
            check_real(f"param_groups[{i}]['weight_decay']", group.get("weight_decay"))
            if group.get("decay") != self._decay_rules[i]:
                raise ValueError(f"state_dict param_groups[{i}] has decay rule {group.get('decay')!r}")
        torch_state = {k: v for k, v in state_dict.items() if k != "zo"}
        super().load_state_dict(torch_state)
        self.eps, self.dist, self.rounding, self.clip, self.skip_threshold = eps, zo["dist"], rounding, clip, skip
        self.seed, self.candidates, self._cumulative = seed, candidates, cumulative
        self.probabilities = zo["probabilities"]
        self.fuse, self.pending, self.estimator = zo["fuse"], pending, estimator
        self.density, self.mask_every = density, mask_every
        self._runner = Runner(self.params, self.classes, self.dist)
        self._runner.set_mask(mask)
        self.history, self.steps, self.last = history, steps, None

    def _saved_mask(self, raw: Any, history: History) -> torch.Tensor | None:
        """The current mask epoch's bits from a state dict: present exactly when the history's
        last mask epoch has density < 1, of the size the parameters need."""
        epochs = [e.remask for e in history if e.remask is not None]
        if not epochs or epochs[-1] == 1.0:
            if raw is not None:
                raise ValueError("state_dict holds a mask but its history is in no mask epoch")
            return None
        check_maskable(self.params)
        want = ops.mask_bytes(self.params)
        if not isinstance(raw, bytes) or len(raw) != want:
            got = f"{len(raw)} bytes" if isinstance(raw, bytes) else repr(type(raw).__name__)
            raise ValueError(f"state_dict mask is {got}; its history's mask epoch needs {want} bytes")
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(self.params.device)


# ------------------------------------------------------------------------------------ helpers
def _group_options(params: Any, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """The options of each param group given (one empty group for the other forms)."""
    if isinstance(params, (ParamSet, torch.nn.Module, torch.Tensor)) or not params:
        return [{}]
    if not all(isinstance(item, dict) for item in params):
        return [{}]
    out = []
    for i, group in enumerate(params):
        unknown = sorted(set(group) - set(_GROUP_KEYS))
        if "eps" in unknown:
            raise ValueError(f"param group {i} sets eps: eps is one for the run (ZOSGD(eps=...))")
        if unknown:
            raise ValueError(f"param group {i} has unknown keys {unknown}; ZOSGD groups take {list(_GROUP_KEYS)}")
        options = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        if "lr" in options:
            check_real(f"param group {i} lr", options["lr"])
        if "weight_decay" in options:
            check_real(f"param group {i} weight_decay", options["weight_decay"])
        if options.get("decay", "auto") not in DECAY_RULES:
            raise ValueError(f"param group {i} decay must be one of {DECAY_RULES}, got {options['decay']!r}")
        out.append(options)
    return out


def _settle_before_use(module: torch.nn.Module, ref: weakref.ref) -> tuple[RemovableHandle, ...]:
    """Hooks that take back a pending perturbation before the module is used outside a step:
    a forward (evaluation, generation) or ``state_dict()`` (saving). They hold the optimizer
    only weakly, so they never keep it alive."""

    def settle(*_: Any) -> None:
        opt = ref()
        if opt is not None and not opt._in_step and opt.pending is not None:
            opt.settle()
            reshard_fsdp(module)  # under FSDP2 the next unshard must gather the settled shards

    # prepend: run before FSDP2's own pre-forward hook, which all-gathers the (still perturbed)
    # shards; otherwise an evaluation outside step() would see stale weights.
    return (
        module.register_forward_pre_hook(settle, prepend=True),
        module.register_state_dict_pre_hook(settle),
    )


def _remove_hooks(handles: tuple[RemovableHandle, ...]) -> None:
    for handle in handles:
        handle.remove()


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
