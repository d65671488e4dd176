"""Low precision: stochastic rounding (stream tag 2) in the ZO passes of bfloat16 weights.

Two measured facts, each turned into an assertion:
- 1000 perturb/restore cycles (+eps, -2eps, +eps) leave bfloat16 weights off by a random walk of
  about the same size under both roundings, but round-to-nearest also SHRINKS them (a
  systematic drift toward zero of about a tenth of the walk) where stochastic rounding is
  unbiased. The float32 run of the same cycles is the ground truth (drift ~1e-8).
- Where lr * g * z is far below one bfloat16 ulp of the weights, ZO training with
  round-to-nearest stalls (perturbations and updates round away) while stochastic rounding
  tracks the float32 loss curve.
"""

from __future__ import annotations

import torch

from fedkseed import perturb_
from fedkseed.zo import ZOSGD
from fedkseed.zo.passes import rounding_seed


def drift_after_cycles(x0: torch.Tensor, rounding: str, cycles: int = 1000, eps: float = 1e-3):
    x = x0.clone()
    for c in range(cycles):
        for p, alpha in enumerate((eps, -2 * eps, eps)):
            rseed = rounding_seed(c, p) if rounding == "stochastic" else None
            perturb_([x], c, alpha, rounding_seed=rseed, backend="auto")
    return x.float() - x0.float()


def test_stochastic_rounding_removes_the_bias_of_perturb_restore_cycles():
    w = 0.02 * torch.randn(32768, generator=torch.Generator().manual_seed(0))  # LLM-like scale
    x0 = w.to(torch.bfloat16)
    truth = drift_after_cycles(x0.float(), "nearest")  # float32 ground truth
    nearest = drift_after_cycles(x0, "nearest")
    stochastic = drift_after_cycles(x0, "stochastic")
    sign = x0.float().sign()
    assert truth.abs().mean() < 1e-6
    walk = nearest.abs().mean()
    # The random walk: same size either way (stochastic rounding adds no precision).
    assert abs(stochastic.abs().mean() / walk - 1) < 0.2
    # The bias toward zero: about 10% of the walk with round-to-nearest, none with SR.
    shrink_nearest = -(nearest * sign).mean() / walk
    shrink_stochastic = -(stochastic * sign).mean() / walk
    assert shrink_nearest > 0.06, float(shrink_nearest)
    assert abs(shrink_stochastic) < 0.03, float(shrink_stochastic)


def regression_problem(d: int = 2048, r: int = 4, n: int = 64):
    """Least squares on rank-r data: the loss sees r directions of w (low effective rank, the
    regime where ZO works), w ~ 3 so one bfloat16 ulp is 2^-6."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(d, r, generator=g))[0]
    inputs = torch.randn(n, r, generator=g) @ basis.T
    w0 = 3.0 + 0.5 * torch.randn(d, generator=g)
    targets = inputs @ (w0 + basis @ torch.randn(r, generator=g))
    return inputs, targets, w0.to(torch.bfloat16)


def train_losses(dtype: torch.dtype, rounding: str, steps: int = 300) -> tuple[float, float]:
    inputs, targets, w0 = regression_problem()
    w = w0.to(dtype).clone().requires_grad_()  # the same starting values in every precision
    opt = ZOSGD([w], lr=1e-3, eps=1e-3, seed=1, rounding=rounding)
    loss = lambda: torch.mean((inputs @ w.float() - targets) ** 2)  # noqa: E731
    with torch.no_grad():
        first = float(loss())
    for _ in range(steps):
        opt.step(loss)
    opt.settle()  # take back the next step's pending +eps before measuring
    with torch.no_grad():
        return first, float(loss())


def test_bf16_with_stochastic_rounding_tracks_fp32_while_nearest_stalls():
    first, fp32 = train_losses(torch.float32, "nearest")
    _, stochastic = train_losses(torch.bfloat16, "stochastic")
    _, nearest = train_losses(torch.bfloat16, "nearest")
    # lr * g * z is ~1e-3 per element here, below a quarter of the 2^-6 ulp of w ~ 3.
    fp32_gain = first - fp32
    assert fp32 < 0.5 * first
    assert first - stochastic > 0.7 * fp32_gain, (first, fp32, stochastic)
    assert first - nearest < 0.1 * fp32_gain, (first, fp32, nearest)
