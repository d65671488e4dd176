"""zo_step and ZOSGD: the fused three-pass step against a naive step built from materialised
reference noise (bit-identical), training on small transformers, skipping, validation."""

from __future__ import annotations

import math

import pytest
import torch

from fedkseed import ParamSet, reference
from fedkseed.zo import ZOSGD, ZOStepResult, zo_step

SHAPES = [(7, 5), (33,), (3, 4, 6), (1,), (130, 3)]


def make_params(dtype: torch.dtype, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    names = ["w0", "b0.bias", "w1", "norm.weight", "w2"]
    return [(n, (0.1 * torch.randn(s, generator=g)).to(dtype)) for n, s in zip(names, SHAPES)]


def quadratic_closure(tensors: list[torch.Tensor]):
    """A deterministic loss of the weights: sum over tensors of mean((x - 0.05)^2)."""
    return lambda: sum(((t.float() - 0.05) ** 2).mean() for t in tensors)


# ------------------------------------------- naive step (docs/stream-spec.md#accumulation)
def naive_pass(pset: ParamSet, seeds, alphas, dist, decay=None, decayed_alphas=None) -> None:
    """x <- cast(float32(x) * d + sum_k float32(a_k) * z_k) from materialised reference noise;
    tensors of ``pset.decay_mask`` take ``decay`` and ``decayed_alphas`` (default ``alphas``)."""
    for t, (x, offset) in enumerate(zip(pset.tensors, pset.offsets)):
        decays = decay is not None and pset.decay_mask[t]
        coefficients = decayed_alphas if decays and decayed_alphas is not None else alphas
        acc = torch.zeros(x.numel(), dtype=torch.float32)
        for s, a in zip(seeds, coefficients):
            acc = acc + torch.tensor(a, dtype=torch.float32) * reference.noise(s, x.numel(), offset, dist)
        y = x.reshape(-1).float()
        if decays:
            y = y * torch.tensor(decay, dtype=torch.float32)
        x.copy_((y + acc).to(x.dtype).reshape(x.shape))


def naive_step(pset, closure, seed, eps, lr, wd, dist, next_seed=None, perturbed=False):
    """The spec's step: after -2 eps, non-decayed tensors get (eps + alpha) z, decayed ones
    theta d + (eps d + alpha) z."""
    if not perturbed:
        naive_pass(pset, [seed], [eps], dist)
    lp = float(closure())
    naive_pass(pset, [seed], [-2 * eps], dist)
    lm = float(closure())
    g = (lp - lm) / (2 * eps)
    alpha = float(torch.tensor(-lr * g, dtype=torch.float32))
    d = float(torch.tensor(1 - lr * wd, dtype=torch.float32))
    seeds, plain, decayed = [seed], [eps + alpha], [eps * d + alpha]
    if next_seed is not None:
        seeds, plain, decayed = [*seeds, next_seed], [*plain, eps], [*decayed, eps]
    naive_pass(pset, seeds, plain, dist, d if d != 1.0 else None, decayed)
    return g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("wd", [0.0, 0.5])
def test_fused_step_matches_naive_step(dtype, dist, wd):
    ours, naive = ParamSet(make_params(dtype)), ParamSet(make_params(dtype))
    for step, seed in enumerate([11, 2**64 - 3, 12345]):
        res = zo_step(ours, quadratic_closure(ours.tensors), seed, eps=1e-3, lr=0.05, weight_decay=wd, dist=dist)
        g = naive_step(naive, quadratic_closure(naive.tensors), seed, 1e-3, 0.05, wd, dist)
        assert res.grad == g and not res.skipped
        for a, b in zip(ours.tensors, naive.tensors):
            assert torch.equal(a, b), f"step {step}: weights differ"


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_next_seed_fusion_matches_naive_and_unfused(dist):
    seeds = [5, 6, 7, 8]
    fused, naive, plain = (ParamSet(make_params(torch.float32)) for _ in range(3))
    for i, s in enumerate(seeds):
        nxt = seeds[i + 1] if i + 1 < len(seeds) else None
        r = zo_step(
            fused,
            quadratic_closure(fused.tensors),
            s,
            eps=1e-3,
            lr=0.05,
            dist=dist,
            next_seed=nxt,
            perturbed=i > 0,
            weight_decay=0.1,
        )
        g = naive_step(
            naive, quadratic_closure(naive.tensors), s, 1e-3, 0.05, 0.1, dist, next_seed=nxt, perturbed=i > 0
        )
        zo_step(plain, quadratic_closure(plain.tensors), s, eps=1e-3, lr=0.05, dist=dist, weight_decay=0.1)
        assert r.grad == g
    for a, b, c in zip(fused.tensors, naive.tensors, plain.tensors):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=0, atol=1e-6)  # one rounding fewer per step


def test_result_fields_and_update_formula():
    pset = ParamSet(make_params(torch.float32))
    res = zo_step(pset, quadratic_closure(pset.tensors), 3, eps=1e-3, lr=0.1, weight_decay=0.2)
    assert isinstance(res, ZOStepResult)
    assert res.grad == pytest.approx((res.loss_plus - res.loss_minus) / 2e-3)
    assert res.alpha == pytest.approx(-0.1 * res.grad, rel=1e-6)
    assert res.decay == pytest.approx(0.98, rel=1e-7)


# ----------------------------------------------------------------------------- tiny models
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.slow
def test_loss_falls_on_fixed_batch_under_inference_mode(build):
    model = build()
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    opt = ZOSGD(model, lr=5e-3, eps=1e-3, seed=7)
    closure = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    with torch.inference_mode():
        first = float(closure())
        for _ in range(20):
            opt.step(closure)
        last = float(closure())
    # 20 two-pass steps, then the last forward settled the pending +eps (one recorded pass)
    assert opt.steps == 20 and len(opt.history) == 21 and opt.pending is None
    assert opt.history.entries[-1].aborted == 0 and opt.history.entries[-1].perturbed
    assert last < first - 0.03, (first, last)


# ---------------------------------------------------------------------------- skip and clip
def test_nan_loss_skips_and_restores():
    pset = ParamSet(make_params(torch.float32))
    before = pset.state()
    res = zo_step(pset, lambda: torch.tensor(math.nan), 9, eps=1e-3, lr=0.1, weight_decay=0.5)
    assert res.skipped and res.grad == 0.0 and res.alpha == 0.0 and res.decay == 1.0
    for a, b in zip(pset.tensors, before):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # +eps, -2eps, +eps: up to rounding


def test_clip_and_skip_threshold():
    pset = ParamSet(make_params(torch.float32))
    calls = iter([1.0, 0.0, 1.0, 0.0])
    res = zo_step(pset, lambda: next(calls), 1, eps=1e-3, lr=0.1, clip=2.0)
    assert res.grad == 2.0 and not res.skipped  # g = 500 clamped to 2
    res = zo_step(pset, lambda: next(calls), 2, eps=1e-3, lr=0.1, skip_threshold=0.5)
    assert res.skipped and res.grad == 0.0  # |L+ - L-| = 1 > 0.5 (FedKSeed's official rule)


# ------------------------------------------------------------------------------- bad input
GOOD = dict(eps=1e-3, lr=0.1)
BAD_CALLS = [
    ("closure", dict(closure=42), TypeError),
    ("eps", dict(eps=0.0), ValueError),
    ("eps", dict(eps=math.inf), ValueError),
    ("eps", dict(eps=math.nan), ValueError),
    ("lr", dict(lr=-1.0), ValueError),
    ("weight_decay", dict(weight_decay=-0.1), ValueError),
    ("dist", dict(dist="uniform"), ValueError),
    ("clip", dict(clip=0.0), ValueError),
    ("rounding", dict(rounding="down"), ValueError),
    ("rounding_seed", dict(rounding_seed=3), ValueError),
    ("seed", dict(seed=-1), ValueError),
    ("seed", dict(next_seed=2**64), ValueError),
]


@pytest.mark.parametrize("name,bad,error", BAD_CALLS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_CALLS)])
def test_bad_input_raises_before_touching_weights(name, bad, error):
    pset = ParamSet(make_params(torch.bfloat16))
    before = pset.state()
    calls = []
    kwargs = {**GOOD, "closure": lambda: calls.append(1) or 0.0, "seed": 1, **bad}
    closure, seed = kwargs.pop("closure"), kwargs.pop("seed")
    with pytest.raises(error, match=name):
        zo_step(pset, closure, seed, **kwargs)
    assert not calls
    assert all(torch.equal(a, b) for a, b in zip(pset.tensors, before))


@pytest.mark.parametrize("fail_on", [1, 2])
@pytest.mark.parametrize("failure", ["raises", "non-scalar"])
def test_closure_failure_mid_step_restores_weights(fail_on, failure):
    pset = ParamSet(make_params(torch.float32))
    before = pset.state()
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == fail_on:
            if failure == "raises":
                raise RuntimeError("boom")
            return torch.ones(3)
        return 1.0

    with pytest.raises(RuntimeError if failure == "raises" else TypeError, match=r"boom|scalar"):
        zo_step(pset, closure, 4, eps=1e-2, lr=0.1)
    for a, b in zip(pset.tensors, before):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ ZOSGD
def test_zosgd_seeds_are_deterministic_and_ignore_global_rng():
    pset = ParamSet(make_params(torch.float32))
    a = ZOSGD(pset, lr=0.1, eps=1e-3, seed=5)
    torch.manual_seed(123)
    first = [a.seed_for(t) for t in range(8)]
    torch.manual_seed(999)
    assert [ZOSGD(pset, lr=0.1, eps=1e-3, seed=5).seed_for(t) for t in range(8)] == first
    assert len(set(first)) == 8 and all(0 <= s < 2**64 for s in first)
    assert ZOSGD(pset, lr=0.1, eps=1e-3, seed=6).seed_for(0) != first[0]


def test_zosgd_candidate_pool_follows_probabilities():
    pset = ParamSet(make_params(torch.float32))
    pool = [101, 202, 303]
    opt = ZOSGD(pset, lr=0.1, eps=1e-3, seed=1, candidates=pool, probabilities=[0.25, 0.0, 0.75])
    draws = [opt.seed_for(t) for t in range(4000)]
    assert 202 not in draws
    assert draws.count(303) / len(draws) == pytest.approx(0.75, abs=0.03)
    uniform = ZOSGD(pset, lr=0.1, eps=1e-3, seed=1, candidates=pool)
    counts = [sum(uniform.seed_for(t) == s for t in range(3000)) for s in pool]
    assert all(abs(c - 1000) < 100 for c in counts)
    uniform.step(quadratic_closure(pset.tensors))
    assert uniform.history.entries[0].probes[0] in pool


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(candidates=[]),
        dict(candidates=[1, 2], probabilities=[1.0]),
        dict(candidates=[1], probabilities=[-1.0]),
        dict(probabilities=[1.0]),
        dict(candidates=[1, 2], probabilities=[0.0, 0.0]),
        dict(lr=-1),
        dict(eps=0.0),
    ],
)
def test_zosgd_rejects_bad_configuration(kwargs):
    args = {"lr": 0.1, "eps": 1e-3, **kwargs}
    with pytest.raises(ValueError):
        ZOSGD(ParamSet(make_params(torch.float32)), **args)


def test_zosgd_state_dict_resumes_identically():
    ref, resumed = ParamSet(make_params(torch.float32)), ParamSet(make_params(torch.float32))
    opt = ZOSGD(ref, lr=0.05, eps=1e-3, weight_decay=0.1, seed=3)
    for _ in range(3):
        opt.step(quadratic_closure(ref.tensors))
    state = opt.state_dict()
    for x, y in zip(resumed.tensors, ref.tensors):
        x.copy_(y)
    opt2 = ZOSGD(resumed, lr=1.0, eps=1.0, seed=0)
    opt2.load_state_dict(state)
    assert opt2.steps == 3 and opt2.history == opt.history
    for _ in range(3):
        opt.step(quadratic_closure(ref.tensors))
        opt2.step(quadratic_closure(resumed.tensors))
    assert opt2.history == opt.history
    assert all(torch.equal(a, b) for a, b in zip(ref.tensors, resumed.tensors))
    other = ZOSGD([torch.zeros(3, requires_grad=True)], lr=0.1, eps=1e-3)
    with pytest.raises(ValueError, match="tensor 0 is 'w0' \\(7, 5\\) float32 in the history"):
        other.load_state_dict(state)


# ------------------------------------------------------------- weight decay restores exactly
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_gradient_with_decay_leaves_non_decayed_tensors_as_without_decay(dtype):
    """g = 0 (constant loss): non-decayed tensors end bit-identical to the same step with
    wd = 0, decayed ones at theta*d + eps*d*z after the -2 eps pass (the spec's arithmetic)."""
    runs = {}
    for wd in (0.0, 0.5):
        pset = ParamSet(make_params(dtype))
        for seed in (3, 4, 5):
            res = zo_step(pset, lambda: 1.25, seed, eps=1e-2, lr=0.2, weight_decay=wd)
            assert res.grad == 0.0 and not res.skipped
        runs[wd] = pset
    flags = runs[0.5].decay_mask
    assert flags == [True, False, True, False, True]
    for flag, a, b in zip(flags, runs[0.0].tensors, runs[0.5].tensors):
        assert torch.equal(a, b) != flag
    naive = ParamSet(make_params(dtype))
    for seed in (3, 4, 5):
        naive_step(naive, lambda: 1.25, seed, 1e-2, 0.2, 0.5, "gaussian")
    assert all(torch.equal(a, b) for a, b in zip(naive.tensors, runs[0.5].tensors))


def test_closure_calling_backward_gets_a_clear_error_and_weights_come_back():
    pset = ParamSet(make_params(torch.float32))
    before = pset.state()

    def closure():
        loss = sum((t**2).sum() for t in pset.tensors)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="ZO closures run without autograd"):
        zo_step(pset, closure, 4, eps=1e-2, lr=0.1)
    for a, b in zip(pset.tensors, before):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_zo_step_never_touches_frozen_tensors():
    frozen = torch.randn(4, 4)
    trained = torch.randn(4, 4, requires_grad=True)
    keep = frozen.clone()
    zo_step([frozen, trained], lambda: float(trained.sum()), 1, eps=1e-2, lr=0.1)
    assert torch.equal(frozen, keep)
    with pytest.raises(ValueError, match="no tensor with requires_grad=True"):
        zo_step([frozen], lambda: 0.0, 1, eps=1e-2, lr=0.1)
