"""FZOO's batched one-sided estimator (``estimator="fzoo"``): the fused step against a naive one
built from materialised reference noise tensor by tensor (bit for bit: the same float64 scalar
formula, the same float32 coefficients), History replay bit for bit (format 3, format 2 still
read), the unbiasedness of the un-normalised one-sided probes on a quadratic, the normalised
step's invariance to the loss scale, the skip rule, resume, failed closures and bad arguments."""

from __future__ import annotations

import io
import math
import zlib

import pytest
import torch

from fedkseed import ParamSet, reference
from fedkseed.ops import use_backend
from fedkseed.testing import NaiveZO
from fedkseed.testing.backends import backend_on_this_machine
from fedkseed.testing.faults import FailOnce, step_retrying
from fedkseed.testing.models import SmallNet, small_net
from fedkseed.zo import ZOSGD, History, zo_step
from fedkseed.zo.history import FORMAT_VERSION
from fedkseed.zo.passes import PASS_ONE_SIDED, PASS_UPDATE, Entry, entry_passes


def net(seed: int = 0, dtype: torch.dtype = torch.float32) -> SmallNet:
    return small_net(6, 5, seed, dtype)


X = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
Y = torch.randn(16, 1, generator=torch.Generator().manual_seed(2))


def loss_of(model: torch.nn.Module, scale: float = 1.0):
    return lambda: scale * ((model(X.to(model.lin.weight.dtype)) - Y).float() ** 2).mean()


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------- against the naive
@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_fused_step_matches_the_naive_fzoo_bit_for_bit(dist, momentum):
    """Two groups (own lr and weight decay, "auto" and "all" decay rules), N = 4 directions:
    weights, normalised gradients and the History replay equal the naive step's bits."""
    model, ref = net(), net()
    groups = lambda m: [  # noqa: E731
        {"params": m.lin.parameters(), "lr": 0.1, "weight_decay": 0.5},
        {"params": [*m.norm.parameters(), *m.head.parameters()], "lr": 0.02, "weight_decay": 0.2, "decay": "all"},
    ]
    base = weights(model)
    opt = ZOSGD(groups(model), lr=1.0, eps=1e-2, seed=5, dist=dist, estimator="fzoo", directions=4, momentum=momentum)
    assert opt.fuse  # the default, which FZOO cannot use: no pending perturbation between steps
    pset = ParamSet(groups(ref), trainable_only=True)
    classes = [(0, True), (0, False), (1, True), (1, True), (1, True)]
    naive = NaiveZO(
        [(t, o, g, d) for t, o, (g, d) in zip(pset.tensors, pset.offsets, classes)],
        1e-2,
        dist,
        momentum=momentum,
        window=8 if momentum else 1,
        one_sided=True,
    )
    calls = 0

    def counted():
        nonlocal calls
        calls += 1
        return loss_of(model)()

    for t in range(4):
        loss = opt.step(counted)
        assert opt.pending is None and calls == 5 * (t + 1)  # N + 1 evaluations, nothing fused
        assert loss == opt.last.losses[0] == opt.last.loss_minus  # L_0, the loss before the step
        grads = naive.step(loss_of(ref), opt.seeds_for(t), [0.1, 0.02], [0.5, 0.2])
        assert list(opt.last.grads) == grads and not opt.last.skipped
        assert same(weights(model), weights(ref)), f"step {t}"
    assert all(e.one_sided and len(e.probes) == 4 for e in opt.history)
    replayed = net()
    opt.history.apply_(replayed)
    assert same(weights(replayed), weights(model)) and not same(base, weights(model))


def test_passes_per_step_and_their_numbers():
    """N + 1 passes: +eps u_1, then (-eps u_{i-1}, +eps u_i), then the update restoring -eps u_N;
    the probe passes have their own numbers (their rounding seeds), the update is pass 3."""
    entry = Entry((11, 12, 13), (11, 12, 13), ((0.25, -0.5, 0.125),), (1.0,), one_sided=True)
    got = entry_passes(entry, 0.5)
    assert [p.number for p in got] == [PASS_ONE_SIDED, PASS_ONE_SIDED + 1, PASS_ONE_SIDED + 2, PASS_UPDATE]
    assert [(p.seeds, p.coefficients[0][0]) for p in got[:3]] == [
        ((11,), (0.5,)),
        ((11, 12), (-0.5, 0.5)),
        ((12, 13), (-0.5, 0.5)),
    ]
    assert got[3].seeds == (11, 12, 13) and got[3].coefficients[0] == ((0.25, -0.5, -0.5 + 0.125), 1.0)


def test_zo_step_fzoo_is_the_zosgd_step():
    model, twin = net(), net()
    opt = ZOSGD(model, lr=0.05, eps=1e-2, seed=3, estimator="fzoo", directions=3, weight_decay=0.1)
    opt.step(loss_of(model))
    result = zo_step(twin, loss_of(twin), opt.seeds_for(0), eps=1e-2, lr=0.05, weight_decay=0.1, estimator="fzoo")
    assert same(weights(model), weights(twin)) and result.grads == opt.last.grads


@pytest.fixture(params=["reference", "cpu-scalar", "cpu-avx2", "cpu-avx512", "triton", "cuda"])
def backend(request, monkeypatch):
    yield from backend_on_this_machine(request.param, monkeypatch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_backend_makes_the_reference_bits(backend, dtype):
    """The one-sided passes are the existing multi-seed kernels: on every backend of this machine
    two FZOO steps (stochastic rounding in bf16) give the reference backend's bits. The loss is
    computed on the CPU in float64, so every backend sees the same losses."""
    name, device = backend

    def run(which: str, where: torch.device) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(4)
        w = [torch.randn(n, generator=gen).to(dtype).to(where).requires_grad_() for n in (1000, 37)]
        rounding = "stochastic" if dtype == torch.bfloat16 else "nearest"
        opt = ZOSGD(w, lr=1e-3, eps=1e-2, estimator="fzoo", directions=3, rounding=rounding)
        loss = lambda: float(sum(((t.detach().cpu().double() - 0.2) ** 2).sum() for t in w))  # noqa: E731
        with use_backend(which):
            for _ in range(2):
                opt.step(loss)
        assert not opt.last.skipped
        return [t.detach().cpu() for t in w]

    assert same(run(name, device), run("reference", torch.device("cpu")))


# ---------------------------------------------------------------------------------- History
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_history_replays_bit_for_bit_after_save_and_load(tmp_path, dtype):
    """bf16 weights with stochastic rounding: each one-sided pass has its own rounding seed."""
    model = net(dtype=dtype)
    rounding = "stochastic" if dtype == torch.bfloat16 else "nearest"
    opt = ZOSGD(model, lr=0.05, eps=1e-2, seed=8, estimator="fzoo", directions=5, rounding=rounding)
    for _ in range(3):
        opt.step(loss_of(model))
    opt.history.save(tmp_path / "h.fkh")
    data = (tmp_path / "h.fkh").read_bytes()
    assert data[4:6] == FORMAT_VERSION.to_bytes(2, "little") == b"\x03\x00"
    loaded = History.load(tmp_path / "h.fkh")
    assert loaded == opt.history
    fresh = net(dtype=dtype)
    loaded.apply_(fresh)
    assert same(weights(fresh), weights(model))
    mezo = ZOSGD(net(), lr=0.05, eps=1e-2)
    mezo.step(loss_of(mezo.module))
    assert mezo.history.to_bytes()[4:6] == b"\x02\x00"  # a run without one-sided steps stays format 2


def test_fused_replay_and_merged_sums_match_up_to_rounding():
    """The logical updates of one-sided entries (FedKSeed's way: one multi-seed pass, or one
    merged per-seed sum) give the trained weights up to float32 rounding."""
    model = net()
    opt = ZOSGD(model, lr=0.01, eps=1e-2, seed=1, estimator="fzoo", directions=4)
    for _ in range(4):
        opt.step(loss_of(model))
    for history, fused in [(opt.history, True), (opt.history.merged(), False)]:
        fresh = net()
        history.apply_(fresh, fused=fused)
        assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(weights(fresh), weights(model)))
        assert not same(weights(fresh), weights(net()))


def test_a_version_2_file_cannot_hold_one_sided_entries():
    opt = ZOSGD(net(), lr=0.05, eps=1e-2, estimator="fzoo", directions=2)
    opt.step(loss_of(opt.module))
    body = opt.history.to_bytes()[:-4]
    as_v2 = body[:4] + b"\x02\x00" + body[6:]
    with pytest.raises(ValueError, match="corrupt entry 0"):
        History.from_bytes(as_v2 + zlib.crc32(as_v2).to_bytes(4, "little"))


@pytest.mark.parametrize(
    "entry,match",
    [
        (Entry((1,), (1,), ((0.5,),), (1.0,), one_sided=True), "at least 2 probes"),
        (Entry((1, 2), (1, 2), ((0.5, 0.5),), (1.0,), next_seed=3, one_sided=True), "fuses"),
        (Entry((1, 2), (), ((),), (1.0,), aborted=3, one_sided=True), "expected 0..2"),
        (Entry((1, 2), (1, 2), ((0.5, 0.5),), (1.0,), one_sided=1), "one_sided must be a bool"),
    ],
)
def test_bad_one_sided_entries_are_refused(entry, match):
    with pytest.raises(ValueError, match=match):
        History(eps=1e-3).add(entry)


# ---------------------------------------------------------------------------- the estimator
def test_one_sided_probes_are_unbiased_on_a_quadratic():
    """The un-normalised one-sided estimate (L_i - L_0) / eps u_i, read from the fused step's
    losses (lr 0: the weights are put back each step), averages to the gradient of
    L = 1/2 sum a (theta - c)^2 (no smoothing bias on a quadratic): every coordinate within
    4.5 standard errors over 2,400 samples. The normalised step is not unbiased (sigma depends
    on the same u_i); it is tested for scale invariance below."""
    d, n, steps, eps = 8, 4, 600, 0.05
    theta0 = torch.linspace(-1.0, 1.0, d)
    a, c = torch.linspace(0.5, 2.0, d, dtype=torch.float64), torch.linspace(0.3, -0.2, d, dtype=torch.float64)
    w = theta0.clone().requires_grad_(True)
    loss = lambda: float((0.5 * a * (w.detach().double() - c) ** 2).sum())  # noqa: E731
    grad = a * (theta0.double() - c)
    samples = []
    for t in range(steps):
        seeds = [1000 * t + i for i in range(n)]
        r = zo_step([w], loss, seeds, eps=eps, lr=0.0, dist="rademacher", estimator="fzoo")
        base = r.losses[0]
        for s, li in zip(seeds, r.losses[1:]):
            samples.append((li - base) / eps * reference.noise(s, d, 0, "rademacher").double())
        with torch.no_grad():
            w.copy_(theta0)
    est = torch.stack(samples)
    err = est.std(dim=0) / math.sqrt(len(samples))
    assert torch.all((est.mean(dim=0) - grad).abs() < 4.5 * err), (est.mean(dim=0), grad, err)
    assert torch.all(err < 0.1 * grad.abs().max())  # tight enough to tell a wrong sign or scale


def test_scaling_the_loss_leaves_the_step_unchanged():
    """L -> c L scales every L_i - L_0 and sigma alike: bit for bit at c = 8 (exact in binary
    floating point); at c = 3 the float32 rounding of c L (~6e-8 relative, amplified by the
    small differences L_i - L_0) moves the step by under 1e-4 of its size. MeZO's step does
    change with c (so this can fail)."""
    base = weights(net())
    runs = {}
    for estimator, scale in [("fzoo", 1.0), ("fzoo", 8.0), ("fzoo", 3.0), ("mezo", 1.0), ("mezo", 8.0)]:
        model = net()
        kwargs = dict(estimator="fzoo", directions=4) if estimator == "fzoo" else {}
        opt = ZOSGD(model, lr=0.05, eps=1e-2, seed=2, **kwargs)
        for _ in range(3):
            opt.step(loss_of(model, scale))
        runs[estimator, scale] = weights(model)
    assert same(runs["fzoo", 1.0], runs["fzoo", 8.0])
    for x, y, b in zip(runs["fzoo", 1.0], runs["fzoo", 3.0], base):
        assert (x - y).abs().max() <= 1e-4 * (x - b).abs().max()
    assert not same(runs["mezo", 1.0], runs["mezo", 8.0])


def test_fzoo_descends_on_an_ill_conditioned_quadratic():
    """200 coordinates, curvatures 0.1..2: 200 FZOO steps (N = 8, 1,800 forwards) take the loss
    from 105 to under a tenth of it on every one of three seeds."""
    d = 200
    curvature = torch.linspace(0.1, 2.0, d, dtype=torch.float64)
    for seed in range(3):
        w = torch.zeros(d, requires_grad=True)
        loss = lambda w=w: float((0.5 * curvature * (w.detach().double() - 1.0) ** 2).sum())  # noqa: E731
        start = loss()
        opt = ZOSGD([w], lr=1e-4, eps=1e-3, dist="rademacher", seed=seed, estimator="fzoo", directions=8)
        for _ in range(200):
            opt.step(loss)
        assert loss() < 0.1 * start, (seed, loss())


@pytest.mark.parametrize("bad", ["constant", "nan"])
def test_a_step_without_a_scale_is_skipped_and_replays(bad):
    """sigma = 0 (all perturbed losses equal) or a NaN loss: no update, the weights only
    restored (up to the rounding of +eps then -eps, as MeZO's skipped step), recorded, replayed."""
    model = net()
    base = weights(model)
    opt = ZOSGD(model, lr=0.05, eps=1e-2, estimator="fzoo", directions=3, momentum=0.5)
    value = 1.5 if bad == "constant" else math.nan
    opt.step(lambda: torch.tensor(value))
    assert opt.last.skipped and opt.last.grad == 0.0 and opt.history.entries[-1].seeds == ()
    assert all(torch.allclose(x, y, atol=1e-7) for x, y in zip(weights(model), base))
    opt.step(loss_of(model))
    assert not opt.last.skipped
    fresh = net()
    opt.history.apply_(fresh)
    assert same(weights(fresh), weights(model))


# ------------------------------------------------------------------- resume and failed steps
def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_dict_resumes_bit_identically():
    def make(model):
        return ZOSGD(model, lr=0.05, eps=1e-2, seed=9, estimator="fzoo", directions=3, momentum=0.5, window=4)

    model = net()
    opt = make(model)
    for t in range(5):
        if t == 2:
            saved_model, saved_opt = roundtrip(model.state_dict()), roundtrip(opt.state_dict())
        opt.step(loss_of(model))
    resumed = net(seed=1)
    resumed.load_state_dict(saved_model)
    opt2 = ZOSGD(resumed, lr=0.05, eps=1e-2)  # the estimator comes from the state
    opt2.load_state_dict(saved_opt)
    assert opt2.estimator.kind == "fzoo" and opt2.steps == 2
    for _ in range(3):
        opt2.step(loss_of(resumed))
    assert same(weights(model), weights(resumed)) and opt2.history == opt.history


def test_a_state_saved_before_fzoo_still_loads():
    model = net()
    opt = ZOSGD(model, lr=0.05, eps=1e-2, directions=2)
    opt.step(loss_of(model))
    state = opt.state_dict()
    del state["zo"]["estimator"]["kind"]  # what a state written before this estimator holds
    opt2 = ZOSGD(net(), lr=0.05, eps=1e-2)
    opt2.load_state_dict(state)
    assert opt2.estimator.kind == "mezo" and opt2.estimator.directions == 2


@pytest.mark.parametrize("fail_at", [1, 2, 4])
def test_failed_closure_is_taken_back_and_replay_stays_exact(fail_at):
    """A closure failing at evaluation ``fail_at`` (1: L_0, before any pass) of step 1 with
    N = 3: the recovery pass takes back what the probes left, the retry continues, and the
    History (with its aborted one-sided entry) replays bit for bit."""
    model = net()
    opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-2, seed=6, estimator="fzoo", directions=3)
    assert step_retrying(opt, FailOnce(loss_of(model), 4 + fail_at), 3) == [(1, 1, None)]
    entry = opt.history.entries[1]
    assert entry.one_sided and entry.aborted == fail_at - 1 and opt.history.exact
    fresh = net()
    opt.history.apply_(fresh.parameters())
    assert same(weights(fresh), weights(model))


# ---------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(estimator="fzoo"), "directions >= 2"),
        (dict(estimator="fzoo", directions=2, sign=True), "sign"),
        (dict(estimator="fzoo", directions=2, clip=1.0), "clip"),
        (dict(estimator="adam"), "estimator must be one of"),
    ],
)
def test_zosgd_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ZOSGD(net(), lr=0.1, eps=1e-3, **kwargs)


@pytest.mark.parametrize(
    "seed,kwargs,error,match",
    [
        (7, {}, TypeError, "sequence of N >= 2"),
        ((7,), {}, ValueError, "directions >= 2"),
        ((7, 8), dict(next_seed=9), ValueError, "next_seed"),
        ((7, 8), dict(perturbed=True), ValueError, "perturbed"),
        ((7, 8), dict(clip=1.0), ValueError, "clip"),
        ((7, -1), {}, ValueError, "seed"),
    ],
)
def test_zo_step_refuses_bad_arguments_before_touching_the_weights(seed, kwargs, error, match):
    model = net()
    before = weights(model)
    with pytest.raises(error, match=match):
        zo_step(model, loss_of(model), seed, eps=1e-3, lr=0.1, estimator="fzoo", **kwargs)
    assert same(before, weights(model))


# ------------------------------------------------------------------------------- ZOTrainer
def test_zotrainer_passes_the_estimator_through(tmp_path):
    """zo_estimator="fzoo" on a tiny Llama: two one-sided steps, the logged loss is L_0, and the
    History saved beside the model rebuilds it bit for bit."""
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

    from fedkseed import models
    from fedkseed.hf import HISTORY_FILE, ZOTrainer, ZOTrainingArguments

    def tiny() -> LlamaForCausalLM:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return LlamaForCausalLM(LlamaConfig(vocab_size=64, **{**models.TINY_SHAPE, "max_position_embeddings": 32}))

    rows = (torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(1))[:, None] + torch.arange(16)) % 64
    data = [{"input_ids": r, "labels": r.clone()} for r in rows]
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-4)
    args.update(report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", zo_eps=1e-2)
    with pytest.raises(ValueError, match="directions >= 2"):
        ZOTrainer(model=tiny(), args=ZOTrainingArguments(**args, zo_estimator="fzoo"), train_dataset=data)
    base_losses: list[float] = []

    class Recorder(TrainerCallback):
        def on_step_end(self, *_, **__):
            base_losses.append(trainer.zo_optimizer.last.losses[0])

    model = tiny()
    trainer = ZOTrainer(
        model=model,
        args=ZOTrainingArguments(**args, zo_estimator="fzoo", zo_directions=3),
        train_dataset=data,
        callbacks=[Recorder()],
    )
    output = trainer.train()
    opt = trainer.zo_optimizer
    assert opt.estimator.kind == "fzoo" and [e.one_sided for e in opt.history] == [True, True]
    assert output.training_loss == pytest.approx(sum(base_losses) / 2, rel=1e-6)  # the mean L_0
    trainer.save_model(str(tmp_path / "out"))
    fresh = tiny()
    History.load(tmp_path / "out" / HISTORY_FILE).apply_(fresh)
    assert same(weights(fresh), weights(model))


# ------------------------------------------------------------------------------- FedKSeed
def test_fedkseed_simulate_refuses_fzoo_in_one_line(capsys):
    """FedKSeed's schedule and wire format carry one seed and one scalar per local step: the
    CLI refuses --estimator fzoo before loading anything, saying why; mezo passes the check."""
    from fedkseed.cli import main

    assert main(["simulate", "--model", "tiny", "--estimator", "fzoo", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--estimator fzoo is not supported" in err and "one seed per local step" in err
    assert main(["simulate", "--model", "tiny", "--estimator", "mezo", "--print-config"]) == 0
