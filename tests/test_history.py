"""History: bit-exact replay of ZOSGD runs, fused (FedKSeed) replay, merging, the binary format
and the fingerprint check."""

from __future__ import annotations

import math

import pytest
import torch

from fedkseed import ParamSet
from fedkseed.history import MAGIC, History
from fedkseed.zo import ZOSGD

SHAPES = [(9, 7), (13,), (2, 3, 5), (64, 3)]


def make_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> ParamSet:
    g = torch.Generator().manual_seed(seed)
    names = ["w0", "b0.bias", "w1", "w2"]
    return ParamSet([(n, (0.1 * torch.randn(s, generator=g)).to(dtype)) for n, s in zip(names, SHAPES)])


def train(pset: ParamSet, steps: int, nan_at: int | None = None, **kwargs) -> ZOSGD:
    opt = ZOSGD(pset, **{"lr": 0.05, "eps": 1e-3, "seed": 4, **kwargs})
    for t in range(steps):
        def closure():
            if t == nan_at:
                return math.nan
            return sum(((x.float() - 0.05) ** 2).mean() for x in pset.tensors)
        opt.step(closure)
    return opt


@pytest.mark.parametrize(
    "dtype,kwargs",
    [
        (torch.float32, {}),
        (torch.float32, {"weight_decay": 0.3, "dist": "rademacher"}),
        (torch.float32, {"candidates": [1, 2, 3]}),  # seeds repeat
        (torch.bfloat16, {"rounding": "stochastic", "weight_decay": 0.1}),
        (torch.float16, {"rounding": "stochastic"}),
    ],
)
def test_replay_reproduces_trained_weights_bit_for_bit(dtype, kwargs):
    trained, replayed = make_params(dtype), make_params(dtype)
    opt = train(trained, 12, nan_at=5, **kwargs)
    assert opt.history.entries[5][1:] == (0.0, 1.0)  # the skipped step is recorded
    opt.history.apply_(replayed)
    for a, b in zip(trained.tensors, replayed.tensors):
        assert torch.equal(a, b)


def test_fused_replay_is_close_and_uses_fewer_passes():
    trained, fused = make_params(), make_params()
    opt = train(trained, 20)
    assert len(opt.history.passes()) == 60 and len(opt.history.passes(fused=True)) == 1
    opt.history.apply_(fused, fused=True)
    for a, b in zip(trained.tensors, fused.tensors):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert not torch.equal(a, b) or a.numel() < 20  # rounding differs: not bit-identical


def test_fused_replay_keeps_decayed_entries_as_their_own_passes():
    h = History(entries=[(1, 0.1, 1.0), (2, 0.2, 1.0), (3, 0.3, 0.75), (4, 0.4, 1.0)])
    assert [(p[0], p[2]) for p in h.passes(fused=True)] == [([1, 2], None), ([3], 0.75), ([4], None)]


def test_merged_sums_per_seed_and_matches_replay():
    h = History(entries=[(7, 0.25, 1.0), (9, -0.5, 1.0), (7, 0.5, 1.0), (2**64 - 1, 1.0, 1.0)])
    m = h.merged()
    assert m.entries == [(7, 0.75, 1.0), (9, -0.5, 1.0), (2**64 - 1, 1.0, 1.0)]
    a, b = make_params(), make_params()
    h.apply_(a)
    m.apply_(b)
    for x, y in zip(a.tensors, b.tensors):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_merged_refuses_weight_decay():
    h = History(entries=[(1, 0.1, 1.0), (2, 0.1, 0.99)])
    with pytest.raises(ValueError, match="decay"):
        h.merged()


def test_save_load_round_trip_is_compact_and_atomic(tmp_path):
    opt = train(make_params(), 10, weight_decay=0.2, rounding="stochastic")
    path = tmp_path / "run.fkh"
    opt.history.save(path)
    opt.history.save(path)  # overwrite in place
    data = path.read_bytes()
    assert data.startswith(MAGIC) and len(data) == 66 + 16 * 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.fkh"]  # no temporary left
    loaded = History.load(path)
    assert loaded == opt.history
    assert (loaded.eps, loaded.rounding_key, loaded.fingerprint, loaded.dist) == (
        opt.history.eps, opt.history.rounding_key, opt.history.fingerprint, opt.history.dist)


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (lambda d: d[:-1], "expected"),
        (lambda d: d[:20], "shorter"),
        (lambda d: b"PKL!" + d[4:], "magic"),
        (lambda d: d[:4] + b"\x09\x00" + d[6:], "format version"),
        (lambda d: d[:6] + b"\x07\x00" + d[8:], "stream v7"),
    ],
)
def test_load_rejects_corrupt_files(tmp_path, corrupt, match):
    path = tmp_path / "h.fkh"
    History(entries=[(1, 0.5, 1.0)]).save(path)
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(ValueError, match=match):
        History.load(path)


def test_apply_refuses_other_params_before_touching_them():
    opt = train(make_params(), 3)
    other = ParamSet([("w0", torch.randn(9, 7)), ("b", torch.randn(5))])
    before = other.state()
    with pytest.raises(ValueError, match=f"{opt.history.fingerprint}.*{other.fingerprint()}"):
        opt.history.apply_(other)
    assert all(torch.equal(a, b) for a, b in zip(other.tensors, before))


def test_record_validates():
    h = History()
    with pytest.raises(ValueError):
        h.record(-1, 0.1)
    with pytest.raises(ValueError, match="finite"):
        h.record(1, math.inf)
    with pytest.raises(ValueError, match="fingerprint"):
        History(fingerprint="abc")
    assert len(h) == 0
