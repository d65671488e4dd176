"""ParamSet: canonical order, global offsets, decay flags and fingerprints (spec section 1)."""

from __future__ import annotations

import pytest
import torch

import fedkseed
from fedkseed import ParamSet


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(11, 4)
        self.proj = torch.nn.Linear(4, 3)
        self.norm = torch.nn.LayerNorm(3)
        self.head = torch.nn.Linear(4, 11, bias=False)
        self.head.weight = self.embed.weight  # tied: must appear once
        self.frozen = torch.nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_module_order_offsets_and_tied_weights():
    model = Tied()
    pset = ParamSet(model)
    assert pset.names == ["embed.weight", "proj.weight", "proj.bias", "norm.weight", "norm.bias"]
    assert pset.numels == [44, 12, 3, 3, 3]
    assert pset.offsets == [0, 44, 56, 59, 62]
    assert pset.numel == 65
    assert pset.decay_mask == [True, True, False, False, False]


def test_tensor_lists_and_named_pairs():
    a, b = torch.zeros(3), torch.zeros(2, 2)
    assert ParamSet([a, b, a]).tensors == [a, b]  # the same tensor once
    assert ParamSet([("x", a), ("y", b)]).names == ["x", "y"]
    assert ParamSet.of(pset := ParamSet([a])) is pset


def test_fingerprint_tracks_names_shapes_dtypes_and_order():
    a, b = torch.zeros(3), torch.zeros(2, 2)
    base = ParamSet([("a", a), ("b", b)]).fingerprint()
    assert base == ParamSet([("a", a.clone()), ("b", b.clone())]).fingerprint()
    assert base != ParamSet([("b", b), ("a", a)]).fingerprint()
    assert base != ParamSet([("a", a.bfloat16()), ("b", b)]).fingerprint()
    assert base != ParamSet([("a", torch.zeros(4)), ("b", b)]).fingerprint()


def test_decay_factors_follow_the_mask():
    pset = ParamSet(Tied())
    assert pset.decay_factors(None) is None and pset.decay_factors(1.0) is None
    assert pset.decay_factors(0.5) == [0.5, 0.5, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "params,error,match",
    [
        ([torch.zeros(3, dtype=torch.int32)], TypeError, "dtype"),
        ([torch.zeros(3, dtype=torch.float64)], TypeError, "dtype"),
        ([torch.zeros(4, 4).t()], ValueError, "contiguous"),
        ([torch.zeros(3), "x"], TypeError, r"params\[1\]"),
    ],
)
def test_bad_params_are_named(params, error, match):
    with pytest.raises(error, match=match):
        ParamSet(params)


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_reference_replay_is_the_sum_of_materialised_noise(dist):
    x = torch.randn(5, 7)
    y = torch.randn(13)
    pset = ParamSet([x, y])
    before = torch.cat([x.reshape(-1), y]).clone()
    alphas = torch.tensor([0.5, -0.25, 2.0])
    seeds = [3, 2**64 - 1, 2**63]
    fedkseed.replay_(pset, seeds, alphas, dist, backend="reference")
    acc = torch.zeros(pset.numel)
    for s, a in zip(seeds, alphas):
        acc = acc + a * fedkseed.reference.noise(s, pset.numel, 0, dist)
    assert torch.equal(torch.cat([x.reshape(-1), y]), before + acc)
