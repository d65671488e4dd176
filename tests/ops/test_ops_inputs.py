"""Seeds and alphas in any integral or real scalar form (Python, NumPy, 0-d tensors) give the same
bits as Python ints and floats; anything else is one clear error and touches nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fedkseed

SEED, ALPHA = 2**63 + 11, 0.375


def _perturbed(seed, alpha) -> torch.Tensor:
    x = [torch.zeros(33)]
    fedkseed.perturb_(x, seed=seed, alpha=alpha, backend="cpu")
    return x[0]


@pytest.mark.parametrize(
    "seed",
    [np.uint64(SEED), torch.tensor(SEED - 2**64), torch.tensor(SEED - 2**64, dtype=torch.int64)],
    ids=["numpy-uint64", "0d-int64-tensor-two's-complement", "0d-int64-explicit"],
)
def test_integral_seed_forms_match_python_int(seed):
    assert torch.equal(_perturbed(seed, ALPHA), _perturbed(SEED, ALPHA))


@pytest.mark.parametrize(
    "seed", [np.int64(7), np.int32(7), np.uint8(7), torch.tensor(7, dtype=torch.int32)], ids=lambda s: type(s).__name__
)
def test_small_seed_forms_match_python_int(seed):
    assert torch.equal(_perturbed(seed, ALPHA), _perturbed(7, ALPHA))


@pytest.mark.parametrize(
    "alpha", [np.float32(ALPHA), np.float64(ALPHA), torch.tensor(ALPHA), torch.tensor(ALPHA, dtype=torch.float64)]
)
def test_real_alpha_forms_match_python_float(alpha):
    assert torch.equal(_perturbed(SEED, alpha), _perturbed(SEED, ALPHA))


def test_numpy_arrays_as_seed_and_alpha_sequences():
    x, y = [torch.zeros(40)], [torch.zeros(40)]
    fedkseed.replay_(x, seeds=np.array([1, 2, 3], dtype=np.uint64), alphas=np.array([0.1, -0.2, 0.3]))
    fedkseed.replay_(y, seeds=[1, 2, 3], alphas=[0.1, -0.2, 0.3])
    assert torch.equal(x[0], y[0])


@pytest.mark.parametrize(
    ("seed", "alpha", "error", "message"),
    [
        (1.5, 0.1, TypeError, "seed must be an integer, got float"),
        (True, 0.1, TypeError, "got bool"),
        (np.float64(3), 0.1, TypeError, "got float64"),
        (-1, 0.1, ValueError, r"seed must be in \[0, 2\^64\)"),
        (2**64, 0.1, ValueError, r"seed must be in \[0, 2\^64\)"),
        (3, "a", TypeError, "alphas must be real numbers, got str"),
        (3, np.float64("nan"), ValueError, "non-finite"),
        (3, 1e39, ValueError, "overflow float32"),
        (torch.tensor([1, 2], dtype=torch.int32), 0.1, TypeError, "seeds tensor must be int64"),
    ],
)
def test_bad_scalars_are_one_line_errors_and_touch_nothing(seed, alpha, error, message):
    x = [torch.ones(5)]
    with pytest.raises(error, match=message) as caught:
        fedkseed.perturb_(x, seed=seed, alpha=alpha)
    assert "\n" not in str(caught.value)
    assert torch.equal(x[0], torch.ones(5))
