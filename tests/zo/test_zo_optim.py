"""ZOSGD as a torch.optim.Optimizer: param groups with their own lr, weight decay and decay rule,
lr schedulers, state_dict resume under weights_only, frozen tensors, layout identity, eval
mode, failed closures, and the default two-pass step, each checked against a naive step built
from materialised reference noise or against an uninterrupted run, bit for bit."""

from __future__ import annotations

import gc
import io
import math

import pytest
import torch

from fedkseed import ParamSet
from fedkseed.testing import NaiveZO
from fedkseed.testing.faults import FailOnce, step_retrying
from fedkseed.zo import ZOSGD, History
from fedkseed.zo.passes import float32


# ------------------------------------------------------------------------------ a small model
class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = torch.nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.lin = torch.nn.Linear(6, 5)  # weight decays ("auto"), bias not
        self.norm = torch.nn.LayerNorm(5)
        self.drop = torch.nn.Dropout(0.5)
        self.head = torch.nn.Linear(5, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.norm(self.lin(self.frozen(x)))))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


X = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
Y = torch.randn(16, 1, generator=torch.Generator().manual_seed(2))


def loss_of(model: torch.nn.Module):
    return lambda: ((model(X) - Y) ** 2).mean()


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------- torch.optim idioms
def test_is_an_optimizer_and_zero_grad_is_harmless():
    model = net()
    opt = ZOSGD(model, lr=0.1, eps=1e-3)
    assert isinstance(opt, torch.optim.Optimizer)
    before = weights(model)
    opt.zero_grad()
    opt.zero_grad(set_to_none=False)
    assert same(before, weights(model))
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="cannot add param groups"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
    assert same(before, weights(model))


@pytest.mark.parametrize("make", ["step", "lambda"])
def test_scheduler_lr_in_effect_is_what_the_history_records(make):
    model = net()
    opt = ZOSGD(model, lr=0.2, eps=1e-3, weight_decay=0.3, seed=2)
    if make == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        want = [0.2, 0.2, 0.1, 0.1, 0.05]
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 3))
        want = [0.2 / 3, 0.4 / 3, 0.2, 0.2, 0.2]
    for t, lr in enumerate(want):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)
        opt.step(loss_of(model))
        used = opt.param_groups[0]["lr"]
        entry = opt.history.entries[t]
        assert entry.alphas == ((float32(-used * opt.last.grads[0]),),)
        assert entry.decays == (float32(1 - used * 0.3),)
        sched.step()


def test_param_groups_with_own_lr_decay_and_rule_match_the_naive_step():
    """Two groups: lin (lr 0.1, wd 0.5, "auto": its weight decays, its bias not) and norm+head
    (lr 0.02, wd 0.2, "all": every tensor decays); per-tensor coefficients, one pass each."""
    model, ref = net(), net()
    groups = lambda m: [  # noqa: E731
        {"params": m.lin.parameters(), "lr": 0.1, "weight_decay": 0.5},
        {"params": [*m.norm.parameters(), *m.head.parameters()], "lr": 0.02, "weight_decay": 0.2, "decay": "all"},
    ]
    base = weights(model)
    opt = ZOSGD(groups(model), lr=1.0, eps=1e-2, seed=5, fuse=False)
    pset = ParamSet(groups(ref), trainable_only=True)
    assert pset.names == ["0", "1", "2", "3", "4"]
    classes = [(0, True), (0, False), (1, True), (1, True), (1, True)]
    naive = NaiveZO([(t, o, g, d) for t, o, (g, d) in zip(pset.tensors, pset.offsets, classes)], 1e-2)
    for t in range(3):
        opt.step(loss_of(model))
        grads = naive.step(loss_of(ref), opt.seeds_for(t), [0.1, 0.02], [0.5, 0.2])
        assert list(opt.last.grads) == grads
        assert same(weights(model), weights(ref)), f"step {t}"
    replayed = net()
    opt.history.apply_(replayed)
    assert same(weights(replayed), weights(model)) and not same(base, weights(model))


def test_frozen_tensors_are_never_touched_whatever_the_form():
    forms = {
        "module": lambda m: m,
        "parameters": lambda m: m.parameters(),
        "named": lambda m: m.named_parameters(),
        "groups": lambda m: [{"params": list(m.parameters())[:3]}, {"params": list(m.parameters())[3:], "lr": 0.5}],
    }
    for name, form in forms.items():
        model = net()
        frozen = [p.detach().clone() for p in model.frozen.parameters()]
        opt = ZOSGD(form(model), lr=0.1, eps=1e-2, seed=1)
        for _ in range(2):
            opt.step(loss_of(model))
        opt.settle()
        assert same(frozen, [p.detach() for p in model.frozen.parameters()]), name
        assert len(opt.params) == 5 and not same(weights(net()), weights(model)), name
    with pytest.raises(ValueError, match="no tensor with requires_grad=True"):
        ZOSGD(net().frozen.parameters(), lr=0.1, eps=1e-2)


def test_bad_groups_are_refused():
    model = net()
    with pytest.raises(ValueError, match="eps is one for the run"):
        ZOSGD([{"params": model.lin.parameters(), "eps": 1e-2}], lr=0.1, eps=1e-3)
    with pytest.raises(ValueError, match="unknown keys"):
        ZOSGD([{"params": model.lin.parameters(), "weight_decy": 0.1}], lr=0.1, eps=1e-3)
    with pytest.raises(ValueError, match="decay must be one of"):
        ZOSGD([{"params": model.lin.parameters(), "decay": "some"}], lr=0.1, eps=1e-3)
    opt = ZOSGD(model, lr=0.1, eps=1e-3)
    opt.param_groups[0]["lr"] = math.nan
    before = weights(model)
    with pytest.raises(ValueError, match="lr"):
        opt.step(loss_of(model))
    assert same(before, weights(model))


# ------------------------------------------------------------------------------------- resume
def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


CONFIGS = [
    dict(),
    dict(directions=2, momentum=0.9, window=3, weight_decay=0.1),
    dict(rounding="stochastic", sign=True, fuse=False),
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=["plain", "q2-momentum", "sign-unfused"])
def test_state_dict_resumes_bit_identically_under_weights_only(kwargs):
    def make(model):
        opt = ZOSGD(model, lr=0.05, eps=1e-3, seed=9, **kwargs)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    model = net()
    opt, sched = make(model)
    for t in range(6):
        if t == 3:
            saved_model = roundtrip(model.state_dict())  # settles a pending perturbation first
            saved_opt, saved_sched = roundtrip(opt.state_dict()), roundtrip(sched.state_dict())
        opt.step(loss_of(model))
        sched.step()
    resumed = net(seed=1)
    resumed.load_state_dict(saved_model)
    opt2, sched2 = make(resumed)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert opt2.steps == 3
    for _ in range(3):
        opt2.step(loss_of(resumed))
        sched2.step()
    assert same(weights(model), weights(resumed))
    assert opt2.history == opt.history and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_resume_with_a_pending_perturbation_over_tensors():
    """Tensors (no module, no hooks): the saved weights carry the pending +eps, the state says
    so, and the resumed run continues with its two-pass step, bit for bit."""
    w = [torch.randn(40, requires_grad=True), torch.randn(3, 7, requires_grad=True)]
    loss = lambda ts: lambda: sum(((t - 0.3) ** 2).sum() for t in ts)  # noqa: E731
    opt = ZOSGD(w, lr=0.01, eps=1e-3, seed=4)
    for t in range(5):
        if t == 2:
            assert opt.pending is not None
            saved = [x.detach().clone().requires_grad_() for x in w]
            state = roundtrip(opt.state_dict())
        opt.step(loss(w))
    opt2 = ZOSGD(saved, lr=0.01, eps=1e-3, seed=4)
    opt2.load_state_dict(state)
    for _ in range(3):
        opt2.step(loss(saved))
    assert same(w, saved) and opt2.history == opt.history
    bad = roundtrip(opt.state_dict())
    bad["zo"]["pending"] = 123
    with pytest.raises(ValueError, match="pending"):
        opt2.load_state_dict(bad)


# ----------------------------------------------------------------------------- layout identity
def test_history_via_parameters_applies_to_module_parameters_and_compiled():
    model = net()
    opt = ZOSGD(model.parameters(), lr=0.1, eps=1e-2, seed=3)
    for _ in range(3):
        opt.step(loss_of(model))
    data = opt.history.to_bytes()
    for form in (lambda m: m, lambda m: m.parameters(), torch.compile):
        fresh = net()
        History.from_bytes(data).apply_(form(fresh))
        assert same(weights(fresh), weights(model))


def test_layout_mismatch_names_the_first_differing_tensor():
    model = net()
    opt = ZOSGD(model, lr=0.1, eps=1e-2)
    opt.step(loss_of(model))
    other = net()
    other.norm = torch.nn.LayerNorm(7)
    before = weights(other)
    with pytest.raises(
        ValueError, match=r"tensor 2 is 'norm.weight' \(5,\) float32 in the history but 'norm.weight' \(7,\) float32"
    ):
        opt.history.apply_(other)
    assert same(before, weights(other))


# ------------------------------------------------------------------------------------- modes
def test_closure_runs_in_eval_mode_and_modes_are_restored():
    model = net().train()
    model.norm.eval()  # a submodule's own mode survives the step
    seen = []

    def closure():
        seen.append((model.training, model.drop.training))
        return loss_of(model)()

    opt = ZOSGD(model, lr=0.1, eps=1e-3, fuse=False)
    opt.step(closure)
    assert seen == [(False, False)] * 2
    assert model.training and model.drop.training and not model.norm.training
    # dropout off: the two losses are those of the deterministic model at theta +- eps z
    twin = net().eval()
    ZOSGD(twin, lr=0.1, eps=1e-3, fuse=False).step(loss_of(twin))
    assert same(weights(model), weights(twin))


# --------------------------------------------------------------------------------- failures
@pytest.mark.parametrize("fail_at", [1, 2, 3, 4])
def test_failed_closure_is_recorded_and_replay_stays_exact(fail_at):
    """Two directions (4 evaluations per step) with fusion: a closure failing at evaluation
    ``fail_at`` of step 2, caught and retried, still replays bit for bit."""
    model = net()
    opt = ZOSGD(model.parameters(), lr=0.05, eps=1e-3, seed=6, directions=2)
    assert step_retrying(opt, FailOnce(loss_of(model), 8 + fail_at), 4) == [(2, 2, None)]
    assert opt.steps == 4 and opt.history.exact
    assert opt.history.entries[2].aborted == fail_at - 1  # the first +eps came from step 1's pass
    fresh = net()
    opt.history.apply_(fresh.parameters())
    assert same(weights(fresh), weights(model))


def test_failed_recovery_marks_the_history_inexact():
    w = torch.randn(8, requires_grad=True)
    opt = ZOSGD([w], lr=0.1, eps=1e-3, seed=1)
    opt.step(lambda: float(w.sum()))

    def breaks_the_weights():
        w.data = w.data.double()  # the recovery pass cannot write float64
        raise KeyError("boom")

    with pytest.warns(UserWarning, match="could not take back"), pytest.raises(KeyError):
        opt.step(breaks_the_weights)
    assert not opt.history.exact
    loaded = History.from_bytes(opt.history.to_bytes())
    target = torch.randn(8, requires_grad=True)
    before = target.detach().clone()
    with pytest.raises(ValueError, match="inexact"):
        loaded.apply_([target])
    assert torch.equal(target, before)
    loaded.apply_([target], allow_inexact=True)


# ---------------------------------------------------------------------------- two-pass steps
def test_default_step_is_two_passes_and_replays_exactly():
    model, unfused = net(), net()
    opt = ZOSGD(model, lr=0.05, eps=1e-3, seed=8)
    plain = ZOSGD(unfused, lr=0.05, eps=1e-3, seed=8, fuse=False)
    for _ in range(10):
        opt.step(loss_of(model))
        plain.step(loss_of(unfused))
    assert len(opt.history.passes()) == 1 + 2 * 10 and len(plain.history.passes()) == 3 * 10
    assert opt.pending == opt.seed_for(10)
    perturbed = weights(model)
    model(X)  # a forward outside step settles first
    assert opt.pending is None and len(opt.history.passes()) == 22 and not same(perturbed, weights(model))
    # one rounding fewer per step, so g (a loss difference / 2 eps) drifts a little too
    for a, b, c in list(zip(weights(model), weights(unfused), weights(net())))[2:]:  # trained ones
        torch.testing.assert_close(a, b, rtol=0, atol=5e-4)
        assert (a - c).abs().max() > 20 * (a - b).abs().max()
    fresh = net()
    opt.history.apply_(fresh)
    assert same(weights(fresh), weights(model))


def test_module_state_dict_settles_first():
    model = net()
    opt = ZOSGD(model, lr=0.05, eps=1e-3)
    opt.step(loss_of(model))
    assert opt.pending is not None
    state = model.state_dict()
    assert opt.pending is None
    assert all(torch.equal(state[n], p) for n, p in model.named_parameters())
    opt.step(loss_of(model))  # an unperturbed start: +eps of its own
    assert not opt.history.entries[-1].perturbed


# ------------------------------------------------------------------------ the module's hooks
def _hooks(module: torch.nn.Module) -> tuple[int, int]:
    """(forward pre-hooks, state_dict pre-hooks) on ``module``."""
    return len(module._forward_pre_hooks), len(module._state_dict_pre_hooks)


def test_an_optimizer_collected_takes_its_hooks_along():
    """Issue 18, finding 10: 5 optimizers over one module used to leave 5 hooks of each kind."""
    model = net()
    assert _hooks(model) == (0, 0)
    for _ in range(5):
        opt = ZOSGD(model, lr=0.05, eps=1e-3)
        opt.step(loss_of(model))
        opt.settle()
        assert _hooks(model) == (1, 1)  # the one just built; the ones before are gone
    del opt
    gc.collect()
    assert _hooks(model) == (0, 0)


def test_close_settles_and_removes_the_hooks():
    model = net()
    opt = ZOSGD(model, lr=0.05, eps=1e-3, seed=3)
    for _ in range(3):
        opt.step(loss_of(model))
    assert opt.pending is not None and _hooks(model) == (1, 1)
    opt.close()
    assert opt.pending is None and _hooks(model) == (0, 0)
    fresh = net()
    opt.history.apply_(fresh)
    assert same(weights(fresh), weights(model))  # closed on the trained (settled) weights
    opt.close()  # a second close does nothing
    with pytest.raises(RuntimeError, match="closed"):
        opt.step(loss_of(model))
