"""How a step's projected gradients become update terms: plain MeZO, q directions (n-SPSA),
sign-ZO and momentum without a buffer. Each gives (seed, w) terms; the update is
theta <- theta - lr * sum_k w_k z(s_k), applied in ONE multi-seed pass however many terms
(:mod:`fedkseed.zo.passes`), and recorded per term in the History, so it replays bit for bit.

* **q directions** (``directions=q``; n-SPSA): q probe seeds per step, q loss pairs,
  w_i = g_i / q. MeZO's ``zero_order_sample`` / ``--zo_sample`` (Malladi et al., "Fine-Tuning
  Language Models with Just Forward Passes", NeurIPS 2023, Algorithm 2 with n > 1) and ZO-Bench's
  ZO-SGD with several queries (Zhang et al., "Revisiting Zeroth-Order Optimization for
  Memory-Efficient LLM Fine-Tuning: A Benchmark", ICML 2024). MeZO makes 4 passes per direction
  and a separate update per direction; here the probes chain (restore one and perturb the next
  in one pass) and all q updates share one pass: 2q + 1 passes per step, 2q with fusion.
* **sign-ZO** (``sign=True``): w_i = sign(g_i) / q, ZO-Bench's ZO-SGD-Sign (Liu et al.,
  "signSGD via Zeroth-Order Oracle", ICLR 2019). ZO-Bench takes the sign element-wise of g z;
  with Rademacher directions sign(g z) = sign(g) z, so ``dist="rademacher"`` is exactly that
  update; with Gaussian directions it is the scale-free sign(g) z.
* **momentum** (``momentum=beta``, ``window=W``): m_t = sum_{j<W} beta^j w_{t-j} z_{t-j}, the
  heavy-ball buffer of ZO-Bench's ZO-SGD-MMT truncated to W steps (beta^W is negligible for
  W ~ 1/(1-beta) * a few). The buffer is never stored: it is the last W steps' seeds and
  scalars, re-generated in the update pass (W * q seeds in one pass). A skipped step adds no
  terms and still ages the window.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from ..seeds import check_seed
from .step import check_real

Terms = list[tuple[int, float]]  # (seed, w): the update is -lr * w * z(seed)


class Estimator:
    """The update rule of a ZO optimizer (see the module docstring)."""

    def __init__(self, directions: int = 1, *, sign: bool = False, momentum: float = 0.0, window: int = 1) -> None:
        if isinstance(directions, bool) or not isinstance(directions, int) or not 1 <= directions <= 255:
            raise ValueError(f"directions must be an int in [1, 255], got {directions!r}")
        if not isinstance(sign, bool):
            raise TypeError(f"sign must be a bool, got {type(sign).__name__}")
        momentum = check_real("momentum", momentum)
        if momentum >= 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= 1024:
            raise ValueError(f"window must be an int in [1, 1024], got {window!r}")
        if momentum == 0.0:
            window = 1
        self.directions, self.sign, self.momentum, self.window = directions, sign, momentum, window
        self.recent: deque[Terms] = deque(maxlen=window - 1) if window > 1 else deque(maxlen=0)

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
            "recent": [[[s, w] for s, w in step] for step in self.recent],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Estimator:
        est = cls(state["directions"], sign=state["sign"], momentum=state["momentum"], window=state["window"])
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


def _sign(g: float) -> float:
    return 1.0 if g > 0 else -1.0 if g < 0 else 0.0
