"""The estimators of ZOSGD: q directions (n-SPSA), momentum without a buffer, sign-ZO. The fused
passes against fedkseed.testing.NaiveZO (materialised reference noise, tensor by tensor), bit for
bit; the momentum itself against torch.optim.SGD(momentum=beta) fed the same ZO estimates g z,
since NaiveZO shares ZOSGD's idea of momentum; each replays bit for bit from its History; each
step's update is ONE pass however many seeds it carries."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import fedkseed
from fedkseed import ParamSet, reference
from fedkseed.testing import NaiveZO
from fedkseed.zo import ZOSGD, Estimator, History
from fedkseed.zo.passes import PASS_UPDATE

SHAPES = [(9, 7), (13,), (16, 3)]
# Short windows are chosen on purpose here; the warning itself is tested below.
pytestmark = pytest.mark.filterwarnings("ignore:momentum=.* keeps .* of heavy-ball:UserWarning")


def make(dtype: torch.dtype = torch.float32) -> ParamSet:
    g = torch.Generator().manual_seed(0)
    names = ["w0", "b0.bias", "w1"]
    return ParamSet([(n, (0.1 * torch.randn(s, generator=g)).to(dtype)) for n, s in zip(names, SHAPES)])


def loss_of(pset: ParamSet):
    return lambda: sum(((x.float() - 0.05) ** 2).mean() for x in pset.tensors)


ESTIMATORS = {
    "q4": dict(directions=4),
    "momentum": dict(momentum=0.9, window=4),
    "q3-momentum": dict(directions=3, momentum=0.8, window=3),
    "sign": dict(sign=True),
    "sign-q2-rademacher": dict(sign=True, directions=2, dist="rademacher"),
}


@pytest.mark.parametrize("fuse", [False, True], ids=["three-pass", "fused"])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_estimator_matches_naive_and_replays_bit_for_bit(name, fuse):
    kwargs = dict(ESTIMATORS[name])
    dist = kwargs.pop("dist", "gaussian")
    trained, ref = make(), make()
    opt = ZOSGD(trained, lr=0.05, eps=1e-3, weight_decay=0.2, dist=dist, seed=3, fuse=fuse, **kwargs)
    naive = NaiveZO(
        [(t, o, 0, flag) for t, o, flag in zip(ref.tensors, ref.offsets, ref.decay_mask)],
        1e-3,
        dist,
        sign=kwargs.get("sign", False),
        momentum=kwargs.get("momentum", 0.0),
        window=kwargs.get("window", 1),
    )
    for t in range(5):
        opt.step(loss_of(trained))
        nxt = opt.seeds_for(t + 1)[0] if fuse else None
        grads = naive.step(loss_of(ref), opt.seeds_for(t), [0.05], [0.2], next_seed=nxt)
        assert list(opt.last.grads) == grads
        assert all(torch.equal(a, b) for a, b in zip(trained.tensors, ref.tensors)), f"step {t}"
    replayed = make()
    History.from_bytes(opt.history.to_bytes()).apply_(replayed)
    assert all(torch.equal(a, b) for a, b in zip(trained.tensors, replayed.tensors))


def test_each_update_is_one_pass_however_many_seeds():
    """q = 4 and a momentum window of 8: the update pass of step t carries 4 * min(t + 1, 8)
    term seeds (+ the next probe), and a step is 2q passes (2q + 1 for the first)."""
    pset = make()
    opt = ZOSGD(pset, lr=0.01, eps=1e-3, directions=4, momentum=0.9, window=8)
    for _ in range(10):
        opt.step(loss_of(pset))
    per_entry = [[p for j, p in opt.history._indexed_passes(False) if j == i] for i in range(10)]
    assert [len(ps) for ps in per_entry] == [9] + [8] * 9
    updates = [ps[-1] for ps in per_entry]
    assert all(p.number == PASS_UPDATE for p in updates)
    assert [len(p.seeds) for p in updates] == [4 * min(t + 1, 8) + 1 for t in range(10)]


def test_momentum_weights_are_beta_powers_of_past_gradients():
    est = Estimator(2, momentum=0.5, window=3)
    own = [est.own_terms((1, 2), [4.0, -2.0]), est.own_terms((3, 4), [1.0, 1.0]), est.own_terms((5, 6), [8.0, 0.0])]
    assert own[0] == [(1, 2.0), (2, -1.0)]
    est.push(own[0])
    est.push(own[1])
    assert est.terms(own[2]) == [(5, 4.0), (6, 0.0), (3, 0.25), (4, 0.25), (1, 0.5), (2, -0.25)]
    est.push(own[2])  # the window holds W - 1 = 2 past steps: step 0 drops out
    assert [s for s, _ in est.terms([])] == [5, 6, 3, 4]
    assert Estimator.from_state(est.state()).terms([]) == est.terms([])


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_sign_zo_is_zo_bench_sign_of_g_times_z(dist):
    """ZO-Bench's ZO-SGD-Sign (zo_sign_opt) updates by np.sign(projected_grad) * z: one scalar
    sign per direction, which sign-ZO replays as a seed and a scalar. With Rademacher z it is also
    the element-wise sign(g z) of signSGD on the estimate; with Gaussian z it is not."""
    z = reference.noise(77, 4096, 0, dist)
    for g in (3.5, -0.25):
        w = Estimator(sign=True).own_terms((77,), [g])[0][1]
        assert torch.equal(w * z, torch.sign(torch.tensor(g)) * z)
        assert torch.equal(w * z, torch.sign(g * z)) == (dist == "rademacher")


# ------------------------------------------- momentum against torch.optim.SGD's heavy ball
def zo_estimate(pset: ParamSet, terms: list[tuple[int, float]], dist: str) -> list[torch.Tensor]:
    """sum_k w_k z(s_k) per tensor, z materialised at the tensor's global offset."""
    out = []
    for t, offset in zip(pset.tensors, pset.offsets):
        z = [fedkseed.noise(s, t.numel(), offset, dist).reshape(t.shape) for s, _ in terms]
        out.append(sum(w * zk for (_, w), zk in zip(terms, z)))
    return out


def momentum_runs(window: int, steps: int, *, directions: int = 1, fuse: bool = True):
    """ZOSGD with momentum 0.9 and torch.optim.SGD(momentum=0.9) given, as .grad, the same ZO
    estimate (1/q) sum_i g_i z_i that each ZOSGD step measured. Yields per step the ZOSGD
    weights, SGD's, and the ZO estimates so far."""
    beta, lr, dist = 0.9, 0.05, "gaussian"
    pset = make()
    leaves = [t.clone().requires_grad_() for t in make().tensors]
    zo = ZOSGD(
        pset, lr=lr, eps=1e-3, seed=11, dist=dist, directions=directions, momentum=beta, window=window, fuse=fuse
    )
    sgd = torch.optim.SGD(leaves, lr=lr, momentum=beta)
    estimates = []
    for t in range(steps):
        zo.step(loss_of(pset))
        zo.settle()  # the trained weights, without the next step's fused +eps
        own = [(s, g / directions) for s, g in zip(zo.seeds_for(t), zo.last.grads)]
        estimates.append(zo_estimate(pset, own, dist))
        for leaf, grad in zip(leaves, estimates[-1]):
            leaf.grad = grad.clone()
        sgd.step()
        yield [x.clone() for x in pset.tensors], [x.detach().clone() for x in leaves], estimates


@pytest.mark.parametrize("directions, fuse", [(1, False), (1, True), (3, True)], ids=["q1", "q1-fused", "q3-fused"])
def test_momentum_with_a_full_window_is_heavy_ball_sgd(directions, fuse):
    """W >= the number of steps: ZOSGD's momentum is torch's heavy ball, buf = beta buf + g z,
    step by step (to float32 rounding: the two sum the terms in different orders)."""
    steps = 12
    moved = 0.0
    for t, (zo, sgd, _) in enumerate(momentum_runs(24, steps, directions=directions, fuse=fuse)):
        for a, b in zip(zo, sgd):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, t=t: f"step {t}: {m}")
        moved = max(abs(a - b).max().item() for a, b in zip(zo, make().tensors))
    assert moved > 1e-2  # the weights travelled far beyond the tolerance


def test_momentum_window_drops_exactly_the_older_terms():
    """W = 4 < steps: ZOSGD = heavy-ball SGD + lr * the dropped tail sum_t sum_{j >= W} beta^j e_{t-j}
    (e: the ZO estimates), as documented; the tail is far above float tolerance, and the
    truncation is warned about with the share of heavy-ball's weight kept (1 - 0.9^4 = 34%)."""
    beta, lr, window = 0.9, 0.05, 4
    with pytest.warns(UserWarning, match=r"momentum=0.9 with window=4 keeps 34% \(1 - 0.9\^4\)"):
        runs = list(momentum_runs(window, 12))
    zo, sgd, estimates = runs[-1]
    tail = [torch.zeros_like(x) for x in zo]
    for t in range(len(estimates)):
        for j in range(window, t + 1):
            for acc, e in zip(tail, estimates[t - j]):
                acc += beta**j * e
    for a, b, c in zip(zo, sgd, tail):
        torch.testing.assert_close(a, b + lr * c, rtol=1e-5, atol=1e-6)
    assert max(abs(lr * c).max().item() for c in tail) > 1e-3


def test_short_window_warning_states_the_kept_share_and_is_given_once():
    """The default window (8) at beta = 0.9 keeps 1 - 0.9^8 = 57% of heavy-ball's weight: warned
    when the optimizer is built, not again when its state is restored; W = 22 keeps 90%: silent."""
    with pytest.warns(UserWarning) as record:
        opt = ZOSGD(make(), lr=0.01, eps=1e-3, momentum=0.9)
        opt.step(loss_of(opt.params))
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        opt.load_state_dict(torch.load(buffer, weights_only=True))
    assert [str(w.message) for w in record] == [
        "momentum=0.9 with window=8 keeps 57% (1 - 0.9^8) of heavy-ball momentum's weight, a window of "
        "0.8 x 1/(1-beta) = 10 steps; window=22 keeps 90%"
    ]
    assert record[0].filename == __file__  # points at the caller that chose the window
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ZOSGD(make(), lr=0.01, eps=1e-3, momentum=0.9, window=22)
        ZOSGD(make(), lr=0.01, eps=1e-3)  # no momentum: no window


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(directions=0), "directions"),
        (dict(directions=256), "directions"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(momentum=0.9, window=0), "window"),
        (dict(sign=1), "sign"),
    ],
)
def test_bad_estimator_settings_are_refused(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ZOSGD(make(), lr=0.1, eps=1e-3, **kwargs)


def test_q_directions_lower_the_variance_of_the_step():
    """n-SPSA's point: the mean of q projected gradients estimates the directional derivative
    with about 1/q of the variance. Measured over many seeds on a fixed quadratic."""

    def spread(q: int) -> float:
        moves = []
        for seed in range(16):
            pset = make()
            before = [t.clone() for t in pset.tensors]
            ZOSGD(pset, lr=0.01, eps=1e-3, seed=seed, directions=q, fuse=False).step(loss_of(pset))
            moves.append(torch.cat([(a - b).reshape(-1) for a, b in zip(pset.tensors, before)]))
        return float(torch.stack(moves).var(dim=0).sum())

    assert spread(4) < 0.5 * spread(1)
