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


def test_fingerprint_tracks_shapes_dtypes_and_order_never_names():
    a, b = torch.zeros(3), torch.zeros(2, 2)
    base = ParamSet([("a", a), ("b", b)]).fingerprint()
    assert base == ParamSet([("a", a.clone()), ("b", b.clone())]).fingerprint()
    assert base == ParamSet([("x", a), ("y", b)]).fingerprint() == ParamSet([a, b]).fingerprint()
    assert base != ParamSet([("b", b), ("a", a)]).fingerprint()
    assert base != ParamSet([("a", a.bfloat16()), ("b", b)]).fingerprint()
    assert base != ParamSet([("a", torch.zeros(4)), ("b", b)]).fingerprint()
    assert base != ParamSet([("a", a)]).fingerprint()


def test_weights_fingerprint_tracks_values_and_layout_never_names():
    a, b = torch.randn(3), torch.randn(2, 2)
    base = ParamSet([("a", a), ("b", b)]).fingerprint(values=True)
    assert base == ParamSet([("x", a.clone()), ("y", b.clone())]).fingerprint(values=True)
    assert base == ParamSet([a, b]).fingerprint(values=True)
    b2 = b.clone()
    b2[1, 1] = torch.nextafter(b2[1, 1], torch.tensor(9.0))  # one ulp
    assert base != ParamSet([a, b2]).fingerprint(values=True)
    assert base != ParamSet([a, b.reshape(4)]).fingerprint(values=True)  # same bytes, other shape


def test_one_layout_for_a_module_its_parameters_and_its_compiled_form():
    model = Tied()
    model.frozen.requires_grad_(True)
    compiled = torch.compile(model)
    assert next(compiled.named_parameters())[0] == "_orig_mod.embed.weight"
    forms = [lambda: model, model.parameters, model.named_parameters, lambda: compiled]
    psets = [ParamSet(form()) for form in forms]
    assert len({p.fingerprint() for p in psets}) == 1
    layouts = [p.layout() for p in psets]
    assert layouts[0] == layouts[2] == layouts[3]  # names too: "_orig_mod." is never a difference
    assert layouts[3][0] == ("embed.weight", (11, 4), "float32")
    assert layouts[1][0] == ("0", (11, 4), "float32")
    for pset in psets:
        pset.check_layout(layouts[1])  # names differ ("0", "1", ...): no error


def test_check_layout_names_the_first_differing_tensor():
    pset = ParamSet([("w", torch.zeros(3, 2)), ("b", torch.zeros(2)), ("n", torch.zeros(2))])
    recorded = [("w", [3, 2], "float32"), ("bias", [2], "bfloat16"), ("n", [2], torch.float32)]
    with pytest.raises(ValueError) as error:
        pset.check_layout(recorded, what="checkpoint")
    message = str(error.value)
    assert "\n" not in message
    assert "tensor 1 is 'bias' (2,) bfloat16 in the checkpoint but 'b' (2,) float32 in the params" in message
    assert "3 tensors in the checkpoint, 3 in the params" in message
    with pytest.raises(
        ValueError,
        match=r"2 tensors in the history, 3 in the params\): tensor 2 is absent in the "
        r"history but 'n' \(2,\) float32 in the params",
    ):
        pset.check_layout(pset.layout()[:2])
    with pytest.raises(ValueError, match=r"tensor 0 is 'w' \(2, 3\) float32 in the history"):
        pset.check_layout([("w", (2, 3), "float32"), *pset.layout()[1:]])
    pset.check_layout([("a", (3, 2), "float32"), ("b", (2,), "float32"), ("c", (2,), "float32")])


def test_trainable_only_whatever_form_the_parameters_come_in():
    model = Tied()  # frozen.weight and frozen.bias do not require grad
    trainable = ParamSet(model).tensors
    assert len(trainable) == 5 and all(t.requires_grad for t in trainable)
    groups = [
        {"params": [model.embed.weight, model.frozen.weight], "lr": 1.0},
        {"params": [*model.proj.parameters(), model.frozen.bias]},
    ]
    forms = [model.parameters(), model.named_parameters(), groups]
    for form in forms:
        pset = ParamSet(form, trainable_only=True)
        assert all(t.requires_grad for t in pset.tensors) and len(pset) == (5 if form is not groups else 3)
    assert len(ParamSet(model.parameters())) == 7  # tensors: every one by default
    assert len(ParamSet(model, trainable_only=False)) == 7
    plain = [torch.randn(3), torch.randn(2)]  # requires_grad=False, as the ops usually get them
    assert len(ParamSet(plain)) == 2 and len(ParamSet(plain, trainable_only=True)) == 0


def test_param_groups():
    a, b, c = torch.zeros(2), torch.zeros(3), torch.zeros(4)
    pset = ParamSet([{"params": [a, b], "lr": 0.1}, {"params": c}])
    assert pset.tensors == [a, b, c] and pset.group_index == [0, 0, 1] and pset.offsets == [0, 2, 5]
    named = ParamSet([{"params": [a], "param_names": ["x.bias"]}, {"params": [("y", b)]}])
    assert named.names == ["x.bias", "y"] and named.group_index == [0, 1]
    with pytest.raises(TypeError, match="param group 1 has no 'params'"):
        ParamSet([{"params": [a]}, {"lr": 1.0}])


def test_overlapping_storages_are_refused():
    w = torch.zeros(10)
    with pytest.raises(ValueError, match="params '0' and '1' share memory"):
        ParamSet([w[:6], w[4:]])
    with pytest.raises(ValueError, match="params 'a' and 'b' share memory"):
        ParamSet([("a", w), ("b", w.view(2, 5))])  # a second view of the same elements
    halves = ParamSet([w[:5], w[5:]])  # one storage, disjoint: each element once
    assert halves.offsets == [0, 5]
    assert ParamSet([w, w]).tensors == [w]  # the same tensor twice: kept once
    fedkseed.perturb_(halves, 3, 1.0, backend="reference")
    assert torch.equal(w, fedkseed.reference.noise(3, 10, 0, "gaussian"))


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


def test_history_recorded_via_parameters_applies_to_every_form():
    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        model = Tied()
        model.frozen.requires_grad_(True)
        return model

    trained = fresh()
    opt = fedkseed.ZOSGD(trained.parameters(), lr=0.1, eps=1e-2, seed=4)
    for step in range(3):
        opt.step(lambda step=step: float(trained.proj.weight.sum()) * (step + 1))
    want = [p.detach().clone() for p in trained.parameters()]
    assert not all(torch.equal(p, w) for p, w in zip(fresh().parameters(), want))
    for form in (lambda m: m, lambda m: m.parameters(), torch.compile):
        model = fresh()
        opt.history.apply_(form(model))
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), want))


def test_subset_keeps_global_offsets_so_ops_write_what_the_whole_set_writes():
    import fedkseed

    whole = [torch.zeros(5), torch.zeros(3, 4), torch.zeros(7)]
    pset = ParamSet(whole, trainable_only=False)
    sub = pset.subset([0, 2], decayed=True)
    assert sub.offsets == [pset.offsets[0], pset.offsets[2]] and sub.decay_mask == [True, True]
    assert pset.subset([1]).decay_mask == [pset.decay_mask[1]]
    expected = [t.clone() for t in whole]
    fedkseed.perturb_(ParamSet(expected, trainable_only=False), seed=9, alpha=0.5, backend="reference")
    fedkseed.perturb_(sub, seed=9, alpha=0.5, backend="reference")
    assert torch.equal(whole[0], expected[0]) and torch.equal(whole[2], expected[2])
    assert torch.equal(whole[1], torch.zeros(3, 4))  # outside the subset: untouched
