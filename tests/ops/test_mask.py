"""The magnitude mask (docs/stream-spec.md#magnitude-mask) on every backend that runs here.

Thresholds and mask bits are checked against an independent numpy model (a sort, numpy's
comparison and packbits). Masked replays are checked bit for bit against the reference. The
reference is in turn checked against the dense replay: a masked replay equals the dense one on
the selected elements and leaves the others alone. Special values (NaN payloads, +-inf, -0.0,
subnormals, ties at the threshold) reach the mask as weights and as thresholds.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from fedkseed import ParamSet, ops
from fedkseed import reference as R
from fedkseed.testing.backends import backend_on_this_machine

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy notes

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SPEC = (Path(__file__).resolve().parents[2] / "docs" / "stream-spec.md").read_text()


@pytest.fixture(params=["reference", "cpu-scalar", "cpu-avx2", "cpu-avx512", "triton", "cuda"])
def backend(request, monkeypatch):
    yield from backend_on_this_machine(request.param, monkeypatch)


# ------------------------------------------------------------------------ the independent model
def np_values(x: torch.Tensor) -> np.ndarray:
    """float32 values of a tensor (torch's widening is exact)."""
    return x.detach().cpu().float().reshape(-1).numpy()


def np_threshold(x: torch.Tensor, density: float) -> float:
    a = np.abs(np_values(x))
    a[np.isnan(a)] = np.inf
    k = min(max(math.ceil(Fraction(density) * a.size), 1), a.size)
    return float(np.sort(a)[k - 1])


def np_mask(tensors: list[torch.Tensor], thresholds: list[float]) -> np.ndarray:
    parts = []
    for x, tau in zip(tensors, thresholds):
        with np.errstate(over="ignore"):
            bits = np.abs(np_values(x)) <= np.float32(tau)  # NaN compares false
        parts.append(np.packbits(bits, bitorder="little"))  # pads the last byte with 0 bits
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


# ------------------------------------------------------------------------------- test inputs
def special_tensor(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """n values of ``dtype``: Gaussian values, repeated magnitudes, and special values
    (NaN with payloads, +-inf, +-0, subnormals of the dtype)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen)
    x[torch.rand(n, generator=gen) < 0.2] = 0.5  # ties at typical thresholds
    tiny = {torch.float32: 1e-40, torch.bfloat16: 1e-39, torch.float16: 1e-6}[dtype]
    specials = [math.nan, -math.inf, math.inf, -0.0, 0.0, tiny, -tiny, -0.5]
    for i, v in enumerate(specials[: max(0, n - 1)]):
        x[(i * 7 + 1) % n] = v
    x = x.to(dtype)
    if n > 3 and dtype != torch.float32:  # a NaN with a payload (signalling): kept bits matter
        x.view(torch.int16)[3] = 0x7F81 if dtype == torch.bfloat16 else 0x7C01
    elif n > 3:
        x.view(torch.int32)[3] = 0x7F812345
    return x


def mixed_set(seed: int = 0) -> list[torch.Tensor]:
    shapes = [(1,), (7,), (1025,), (3, 11), (0,), (9,)]
    return [
        special_tensor(math.prod(s), DTYPES[i % 3], seed + i).reshape(s) if math.prod(s) else torch.empty(s)
        for i, s in enumerate(shapes)
    ]


def storage_bits(x: torch.Tensor) -> torch.Tensor:
    return x.detach().cpu().reshape(-1).view(torch.int32 if x.dtype == torch.float32 else torch.int16)


def assert_same_bits(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        diff = storage_bits(g) != storage_bits(w)
        assert not bool(diff.any()), f"tensor {i} {w.dtype}: {int(diff.sum())} elements differ"


def structured_mask(numels: list[int], seed: int) -> torch.Tensor:
    """Random bytes with runs of 0x00 and 0xFF (whole kernel groups skipped or fully written),
    and garbage in the unused high bits of each tensor's last byte (which must be ignored)."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for n in numels:
        size = R.mask_sizes([n])[0]
        bytes_ = torch.randint(0, 256, (size,), generator=gen, dtype=torch.int64)
        bytes_[8:40] = 0
        bytes_[48:80] = 255
        if n % 8:
            bytes_[-1] |= 0xFF << (n % 8) & 0xFF
        parts.append(bytes_.to(torch.uint8))
    return torch.cat(parts)


# ------------------------------------------------------------------------------ thresholds
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 8, 1025])
@pytest.mark.parametrize("density", [0.01, 0.07, 0.3, 0.5, 0.999])
def test_thresholds_match_a_sort(dtype, n, density):
    x = special_tensor(n, dtype, seed=n)
    assert R.magnitude_thresholds([x], density) == [np_threshold(x, density)]


def test_thresholds_count_nan_as_inf_and_clamp_k():
    x = torch.tensor([math.nan, math.nan, 1.0, -2.0])
    assert R.magnitude_thresholds([x], 0.5) == [2.0]  # k = 2
    assert R.magnitude_thresholds([x], 0.75) == [math.inf]  # k = 3: a NaN, counted as +inf
    assert R.magnitude_thresholds([x], 1e-9) == [1.0]  # k clamped up to 1
    assert R.magnitude_thresholds([torch.tensor([-0.0, 3.0])], 0.5) == [0.0]
    assert R.magnitude_thresholds([torch.empty(0)], 0.5) == [0.0]
    # k = ceil(rho * n) from the exact float64 rho: 0.07 is a little above 7/100, so k = 8.
    assert R.magnitude_thresholds([torch.arange(1.0, 101.0)], 0.07) == [8.0]


def test_thresholds_of_a_param_set_follow_its_order():
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2))
    pset = ParamSet.of(model)
    assert ops.magnitude_thresholds(model, 0.25) == [np_threshold(t, 0.25) for t in pset.tensors]


# ------------------------------------------------------------------------------ mask bits
def test_spec_known_answer(backend):
    which, device = backend
    section = SPEC[SPEC.index('<a id="magnitude-mask">') :]
    example = re.search(r"tensor 0 is the\s+float32 values `\[([^]]+)\]` and tensor 1 is\s+`\[([^]]+)\]`", section)
    expected = re.search(r"the mask\s+bytes are `([0-9a-f ]+)`", section)
    assert example and expected
    tensors = [torch.tensor([float(v) for v in group.split(", ")], device=device) for group in example.groups()]
    thresholds = ops.magnitude_thresholds(tensors, 0.5)
    assert thresholds == [0.5, 2.0]
    got = ops.magnitude_mask(tensors, thresholds, backend=which)
    assert got.cpu().tolist() == [int(v, 16) for v in expected.group(1).split()]


@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_matches_numpy(backend, dtype):
    which, device = backend
    tensors = [special_tensor(n, dtype, seed=n).to(device) for n in (1, 7, 8, 9, 1025, 2049)]
    for density in (0.05, 0.5):
        thresholds = ops.magnitude_thresholds(tensors, density)
        got = ops.magnitude_mask(tensors, thresholds, backend=which)
        assert got.dtype == torch.uint8 and got.device.type == device.type
        assert got.cpu().numpy().tolist() == np_mask(tensors, thresholds).tolist(), density


def test_mask_of_mixed_dtypes_and_given_thresholds(backend):
    """Any threshold but NaN: negative (none), -0.0 (the zeros), +inf (all but NaN), above
    float32's range (rounds to +inf), not a float32 (rounded to nearest) and subnormal."""
    which, device = backend
    tensors = [t.to(device) for t in mixed_set()]
    for thresholds in (
        [-1.0, -0.0, math.inf, 1e39, 0.1, 1e-40],
        [0.30000001192092896, 2.0, 0.5, 0.0, -0.0, math.inf],
    ):
        got = ops.magnitude_mask(tensors, thresholds, backend=which)
        assert got.cpu().numpy().tolist() == np_mask(tensors, thresholds).tolist(), thresholds


# ------------------------------------------------------------------------------ masked replay
CASES = [  # (K seeds, decay, rounding seed)
    (1, None, None),
    (7, 0.9, 5),
]


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("k,decay,rounding_seed", CASES)
@pytest.mark.parametrize("how", ["magnitude", "structured"])
def test_masked_replay_matches_reference(backend, dist, k, decay, rounding_seed, how):
    which, device = backend
    params = mixed_set(seed=k)
    if how == "magnitude":
        mask = ops.magnitude_mask(params, ops.magnitude_thresholds(params, 0.3), backend="reference")
    else:
        mask = structured_mask([p.numel() for p in params], seed=k)
    seeds = [3 + 11 * i for i in range(k)]
    alphas = [0.25 * (-1) ** i / (i + 1) for i in range(k)]
    want = [p.clone() for p in params]
    ops.replay_(want, seeds, alphas, dist, decay, rounding_seed=rounding_seed, mask=mask, backend="reference")
    got = [p.clone().to(device) for p in params]
    ops.replay_(got, seeds, alphas, dist, decay, rounding_seed=rounding_seed, mask=mask.to(device), backend=which)
    assert_same_bits(got, want)


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("k,decay,rounding_seed", CASES)
def test_masked_replay_is_dense_on_selected_and_identity_elsewhere(dist, k, decay, rounding_seed):
    """The reference's masked replay against its dense replay, element by element."""
    params = mixed_set(seed=10 + k)
    mask = structured_mask([p.numel() for p in params], seed=k)
    seeds, alphas = list(range(1, k + 1)), [0.5 / (i + 1) for i in range(k)]
    dense = [p.clone() for p in params]
    ops.replay_(dense, seeds, alphas, dist, decay, rounding_seed=rounding_seed, backend="reference")
    masked = [p.clone() for p in params]
    ops.replay_(masked, seeds, alphas, dist, decay, rounding_seed=rounding_seed, mask=mask, backend="reference")
    selected = R.mask_bits(mask, [p.numel() for p in params])
    changed = 0
    for before, d, m, sel in zip(params, dense, masked, selected):
        b, d, m = storage_bits(before), storage_bits(d), storage_bits(m)
        assert torch.equal(m[sel], d[sel])
        assert torch.equal(m[~sel], b[~sel])
        changed += int((d != b)[sel].sum())
    assert changed > 100  # the selected elements did move


def test_empty_and_full_masks(backend):
    """All bits 0: every stored bit stays (even -0.0 and NaN payloads, which a dense replay
    rewrites). All bits 1: the dense replay."""
    which, device = backend
    params = [p.to(device) for p in mixed_set(seed=3)]
    size = ops.mask_bytes(params)
    none = [p.clone() for p in params]
    nothing = torch.zeros(size, dtype=torch.uint8, device=device)
    ops.replay_(none, [1, 2], [0.5, -0.5], decay=0.5, mask=nothing, backend=which)
    assert_same_bits(none, params)
    full = [p.clone() for p in params]
    every = torch.full((size,), 255, dtype=torch.uint8, device=device)
    ops.perturb_(full, 7, 0.5, "rademacher", rounding_seed=9, mask=every, backend=which)
    dense = [p.clone() for p in params]
    ops.perturb_(dense, 7, 0.5, "rademacher", rounding_seed=9, backend="reference")
    assert_same_bits(full, dense)


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_masked_replay_over_many_chunks_and_threads(isa, monkeypatch):
    """Tensors past the CPU kernel's chunk size (2^15), at offsets that are not group aligned,
    with 1 and 2 threads."""
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(70001, generator=gen), torch.randn(33333, generator=gen).bfloat16()]
    mask = ops.magnitude_mask(params, ops.magnitude_thresholds(params, 0.2), backend="reference")
    want = [p.clone() for p in params]
    ops.replay_(want, [5, 6, 7], [0.1, 0.2, -0.3], decay=0.99, rounding_seed=4, mask=mask, backend="reference")
    for threads in (1, 2):
        got = [p.clone() for p in params]
        with torch.no_grad():
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                for _ in backend_on_this_machine(f"cpu-{isa}", monkeypatch):
                    ops.replay_(got, [5, 6, 7], [0.1, 0.2, -0.3], decay=0.99, rounding_seed=4, mask=mask, backend="cpu")
            finally:
                torch.set_num_threads(before)
        assert_same_bits(got, want)


# ------------------------------------------------------------------------------ opcheck
@pytest.mark.skipif(not ops.has_kernel("CPU"), reason="fedkseed._C CPU kernels not built")
def test_opcheck_magnitude_mask():
    params = [torch.randn(7, 3), torch.randn(11).to(torch.bfloat16), torch.randn(5).half()]
    torch.library.opcheck(torch.ops.fedkseed.magnitude_mask.default, (params, [0.5, 1.0, -1.0]))


@pytest.mark.skipif(not ops.has_kernel("CPU"), reason="fedkseed._C CPU kernels not built")
def test_opcheck_masked_replay():
    params = [torch.randn(7, 3), torch.randn(11).to(torch.bfloat16)]
    mask = torch.tensor([0b10110101, 0xFF, 0x0F, 0x81, 0x03], dtype=torch.uint8)
    args = (params, [0, 21], [0.9, 1.0], torch.tensor([1, 2]), torch.tensor([0.1, 0.2]), 0, torch.tensor([5]), mask)
    torch.library.opcheck(torch.ops.fedkseed.replay_.default, args)


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda p: ops.replay_(p, [1], [0.1], mask=torch.zeros(3, dtype=torch.uint8)), ValueError, r"need \[4\] bytes"),
        (lambda p: ops.replay_(p, [1], [0.1], mask=torch.zeros(4, dtype=torch.int8)), TypeError, "uint8"),
        (lambda p: ops.replay_(p, [1], [0.1], mask=torch.zeros(2, 2, dtype=torch.uint8)), ValueError, "shape"),
        (lambda p: ops.replay_(p, [1], [0.1], mask=[1, 2, 3, 4]), TypeError, "uint8 tensor"),
        (lambda p: ops.perturb_(p, 1, 0.1, mask=torch.zeros(4, dtype=torch.uint8, device="meta")), ValueError, "meta"),
    ],
)
def test_bad_masks_leave_params_untouched(call, error, match):
    params = [torch.randn(10), torch.randn(9).half()]  # 2 + 2 bytes
    before = [p.clone() for p in params]
    with pytest.raises(error, match=match):
        call(params)
    assert_same_bits(params, before)


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda p: ops.magnitude_mask(p, [0.5]), ValueError, "1 entries for 2 tensors"),
        (lambda p: ops.magnitude_mask(p, [0.5, math.nan]), ValueError, "NaN"),
        (lambda p: ops.magnitude_mask(p, 0.5), TypeError, "one threshold per tensor"),
        (lambda p: ops.magnitude_mask(p, [0.5, "1"]), TypeError, "real numbers"),
        (lambda p: ops.magnitude_thresholds(p, 1.0), ValueError, r"density must be in \(0, 1\)"),
        (lambda p: ops.magnitude_thresholds(p, 0.0), ValueError, "density"),
        (lambda p: ops.magnitude_thresholds(p, math.nan), ValueError, "density"),
        (lambda p: ops.magnitude_thresholds(p, True), TypeError, "density"),
    ],
)
def test_bad_mask_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call([torch.randn(10), torch.randn(9).half()])


@pytest.mark.skipif(not ops.has_kernel("CPU"), reason="fedkseed._C CPU kernels not built")
def test_op_level_mask_checks_come_before_writes():
    """The compiled ops validate the mask and thresholds themselves (callers may bypass ops.py)."""
    x = torch.randn(20)  # 3 bytes
    replay = torch.ops.fedkseed.replay_

    def call(mask):
        return replay([x], [0], [], torch.tensor([1]), torch.tensor([0.1]), 0, None, mask)

    for mask, match in [
        (torch.zeros(2, dtype=torch.uint8), "mask has 2 bytes, the params need 3"),
        (torch.zeros(3, dtype=torch.int32), "uint8"),
        (torch.zeros(6, dtype=torch.uint8)[::2], "contiguous"),
    ]:
        before = x.clone()
        with pytest.raises(RuntimeError, match=match):
            call(mask)
        assert_same_bits([x], [before])
    with pytest.raises(RuntimeError, match="thresholds has 2 entries for 1 params"):
        torch.ops.fedkseed.magnitude_mask([x], [0.5, 0.5])
    with pytest.raises(RuntimeError, match=r"thresholds\[0\] is NaN"):
        torch.ops.fedkseed.magnitude_mask([x], [math.nan])
