"""The estimators of ZOSGD: q directions (n-SPSA), momentum without a buffer, sign-ZO. Each
against the naive optimizer of test_zo_optim (materialised reference noise, tensor by tensor),
bit for bit; each replays bit for bit from its History; each step's update is ONE pass however
many seeds it carries."""

from __future__ import annotations

import pytest
import torch
from test_zo_optim import NaiveZO

from fedkseed import ParamSet, reference
from fedkseed.zo import ZOSGD, Estimator, History
from fedkseed.zo.passes import PASS_UPDATE

SHAPES = [(9, 7), (13,), (16, 3)]


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
        directions=kwargs.get("directions", 1),
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


def test_sign_with_rademacher_is_the_elementwise_sign_of_g_z():
    """ZO-Bench's ZO-SGD-Sign updates by sign(g z) element-wise; with Rademacher z that is
    sign(g) z, which is what sign-ZO replays as a seed and a scalar."""
    z = reference.noise(77, 4096, 0, "rademacher")
    for g in (3.5, -0.25):
        assert torch.equal(torch.sign(g * z), Estimator(sign=True).own_terms((77,), [g])[0][1] * z)


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
