"""How a step's projected gradients become update terms: plain MeZO, q directions (n-SPSA),
FZOO's normalised one-sided estimator, sign-ZO and momentum without a buffer. Each gives (seed,
w) terms; the update is theta <- theta - lr * sum_k w_k z(s_k), applied in ONE multi-seed pass
however many terms (:mod:`fedkseed.zo.passes`), and recorded per term in the History, so it
replays bit for bit.

* **q directions** (``directions=q``; n-SPSA): q probe seeds per step, q loss pairs,
  w_i = g_i / q. MeZO's ``--zero_order_sample q`` (Malladi et al., "Fine-Tuning Language
  Models with Just Forward Passes", NeurIPS 2023, Algorithm 2 with n > 1) and ZO-Bench's ZO-SGD
  with ``--q`` queries (Zhang et al., "Revisiting Zeroth-Order Optimization for Memory-Efficient
  LLM Fine-Tuning: A Benchmark", ICML 2024). MeZO makes 4 passes per direction and a separate
  update per direction; here the probes chain (restore one and perturb the next in one pass)
  and all q updates share one pass: 2q + 1 passes per step, 2q with fusion.
* **FZOO** (``kind="fzoo"``, ``directions=N >= 2``): Dang et al., "FZOO: Fast Zeroth-Order
  Optimizer for Fine-Tuning Large Language Models towards Adam-Scale Speed" (arXiv 2506.09034,
  ICLR 2026). Per step the loss L_0 at theta and the one-sided losses L_i = L(theta + eps u_i),
  i = 1..N; sigma = the sample standard deviation of L_1..L_N (N - 1 in the denominator), and
  theta <- theta - lr * (1/N) sum_i (L_i - L_0) / (eps sigma) u_i: the paper's g = 1/(eps N)
  sum_i (L_i - L_0) u_i divided by sigma. The step's projected gradients are the normalised g_i
  = (L_i - L_0) / (eps sigma) (:func:`fedkseed.zo.step.one_sided_grads`) and w_i = g_i / N, as
  for n-SPSA. eps does not cancel: g_i is about 1/eps in size, so a step moves each coordinate
  by about lr / (eps sqrt(N)), and lr is on another scale than MeZO's (the formula as summarised
  at junaidaliop.github.io/zij/math/fzoo, citing the paper). Scaling the loss by c > 0 scales
  L_i - L_0 and sigma alike, so the step does not change (bit for bit when c is a power of two).
  The normalised step is NOT an unbiased gradient estimate (sigma depends on the same u_i); the
  un-normalised one-sided (L_i - L_0) / eps u_i is, up to an O(eps) bias (none on a quadratic:
  the odd moments of u vanish). A step with some |L_i - L_0| > ``skip_threshold`` is skipped.
  Where this differs from the paper: (1) the paper evaluates the N perturbed losses in ONE
  batched forward over N weight copies; weights here are perturbed in place (no copy, inference
  memory), so the N + 1 forwards run one after the other, with N + 1 fused passes per step
  (:mod:`fedkseed.zo.passes`; n-SPSA takes 2N forwards and 2N + 1 passes); (2) u_i follows the
  run's ``dist``: the paper's Rademacher with ``dist="rademacher"`` (recommended), Gaussian
  otherwise; (3) a step whose sigma is 0 or whose losses are not finite is skipped (the weights
  only restored), the paper does not say; (4) no fused next-step perturbation, since L_0 needs
  the unperturbed weights. ``sign`` does not combine with it (sign discards the scale that sigma
  normalises); momentum does (the window replays past w_i u_i).
* **sign-ZO** (``sign=True``): w_i = sign(g_i) / q, the update sign(g) z of ZO-Bench's
  ZO-SGD-Sign (``--trainer zo_sign_opt``; after Liu et al., "signSGD via Zeroth-Order Oracle",
  ICLR 2019): the sign of the scalar projected gradient times the direction, for any
  distribution. With Rademacher directions it is also the element-wise sign(g z).
* **momentum** (``momentum=beta``, ``window=W``): m_t = sum_{j<W} beta^j w_{t-j} z_{t-j}, the
  heavy-ball buffer of ZO-Bench's ZO-SGD-MMT (``torch.optim.SGD(momentum=beta)`` fed the ZO
  estimates g z) truncated to W steps. The window keeps the share 1 - beta^W of heavy-ball's
  total weight on past estimates: 57% for the default W = 8 at beta = 0.9, 90% from W = 22, so
  a window much shorter than 1/(1-beta) is warned about (:data:`KEPT_WEIGHT_WARNING`). The
  buffer is never stored: it is the last W steps' seeds and scalars, re-generated in the update
  pass (W * q seeds in one pass). A skipped step adds no terms and still ages the window.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from typing import Any

from ..checks import check_bool, check_int, check_real
from ..seeds import check_seed

Terms = list[tuple[int, float]]  # (seed, w): the update is -lr * w * z(seed)
# The estimators: "mezo" two-point (n-SPSA with directions > 1), "fzoo" one-sided normalised.
ESTIMATORS = ("mezo", "fzoo")
MAX_WINDOW = 1024
# A momentum window keeping less than this share of heavy-ball's weight (1 - beta^W) is warned about.
KEPT_WEIGHT_WARNING = 0.9


class Estimator:
    """The update rule of a ZO optimizer (see the module docstring)."""

    def __init__(
        self,
        directions: int = 1,
        *,
        sign: bool = False,
        momentum: float = 0.0,
        window: int = 1,
        warn: bool = True,
        kind: str = "mezo",
    ) -> None:
        """``warn``: warn (UserWarning, once per call site and setting) about a window that keeps
        less than :data:`KEPT_WEIGHT_WARNING` of heavy-ball's weight; a restored state is not
        warned about again. ``kind``: one of :data:`ESTIMATORS`."""
        if kind not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {kind!r}")
        check_int("directions", directions, 1, 255)
        check_bool("sign", sign)
        if kind == "fzoo" and directions < 2:
            raise ValueError(
                f"estimator 'fzoo' needs directions >= 2 (sigma is the standard deviation of the N "
                f"perturbed losses), got {directions}"
            )
        if kind == "fzoo" and sign:
            raise ValueError("estimator 'fzoo' does not take sign=True: sign(g) discards the scale sigma normalises")
        momentum = check_real("momentum", momentum)
        if momentum >= 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        check_int("window", window, 1, MAX_WINDOW)
        if momentum == 0.0:
            window = 1
        elif warn:
            _warn_if_truncated(momentum, window)
        self.directions, self.sign, self.momentum, self.window = directions, sign, momentum, window
        self.kind = kind
        self.recent: deque[Terms] = deque(maxlen=window - 1) if window > 1 else deque(maxlen=0)

    @property
    def one_sided(self) -> bool:
        """The step makes FZOO's one-sided probes (:mod:`fedkseed.zo.passes`)."""
        return self.kind == "fzoo"

    def own_terms(self, probes: tuple[int, ...], grads: list[float]) -> Terms:
        """This step's terms: one per probe."""
        q = len(probes)
        return [(p, (_sign(g) if self.sign else g) / q) for p, g in zip(probes, grads)]

    def terms(self, own: Terms) -> Terms:
        """The update's terms: this step's, then beta^j times those of j steps ago (j < W)."""
        out = list(own)
        for j, past in enumerate(reversed(self.recent), start=1):
            factor = self.momentum**j
            out.extend((seed, factor * w) for seed, w in past)
        return out

    def push(self, own: Terms) -> None:
        """Age the window by one completed step (``own``: empty for a skipped step)."""
        if self.recent.maxlen:
            self.recent.append(list(own))

    # ------------------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        return {
            "directions": self.directions,
            "sign": self.sign,
            "momentum": self.momentum,
            "window": self.window,
            "kind": self.kind,
            "recent": [[[s, w] for s, w in step] for step in self.recent],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Estimator:
        est = cls(
            state["directions"],
            sign=state["sign"],
            momentum=state["momentum"],
            window=state["window"],
            warn=False,
            kind=state.get("kind", "mezo"),  # states saved before FZOO carry no kind
        )
        recent = state["recent"]
        if not isinstance(recent, list) or len(recent) > max(est.window - 1, 0):
            raise ValueError(f"momentum window holds {len(recent)!r} steps, more than window - 1")
        for step in recent:
            terms = []
            for item in step:
                seed, w = item
                if isinstance(w, bool) or not isinstance(w, float) or not math.isfinite(w):
                    raise ValueError(f"momentum window weight {w!r} is not a finite float")
                terms.append((check_seed(seed), w))
            est.recent.append(terms)
        return est


def kept_weight(momentum: float, window: int) -> float:
    """The share of heavy-ball momentum's total weight on past estimates that a window of
    ``window`` steps keeps: sum_{j<W} beta^j / sum_j beta^j = 1 - beta^W."""
    return 1.0 - momentum**window


def _warn_if_truncated(momentum: float, window: int) -> None:
    kept = kept_weight(momentum, window)
    if kept >= KEPT_WEIGHT_WARNING:
        return
    # The smallest window reaching the threshold: beta^W <= 1 - threshold.
    needed = math.ceil(math.log(1.0 - KEPT_WEIGHT_WARNING) / math.log(momentum) - 1e-9)
    advice = (
        f"window={needed} keeps {kept_weight(momentum, needed):.0%}"
        if needed <= MAX_WINDOW
        else f"the largest window, {MAX_WINDOW}, keeps {kept_weight(momentum, MAX_WINDOW):.0%}"
    )
    warnings.warn(
        f"momentum={momentum:g} with window={window} keeps {kept:.0%} (1 - {momentum:g}^{window}) of heavy-ball "
        f"momentum's weight, a window of {window / (1 / (1 - momentum)):.2g} x 1/(1-beta) = "
        f"{1 / (1 - momentum):.3g} steps; {advice}",
        UserWarning,
        stacklevel=4,  # _warn_if_truncated <- Estimator <- ZOSGD <- the caller
    )


def _sign(g: float) -> float:
    return 1.0 if g > 0 else -1.0 if g < 0 else 0.0
