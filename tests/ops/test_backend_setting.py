"""Backend choice by device, and its one override: ``use_backend`` (default ``FEDKSEED_BACKEND``).

The layers above the ops take no backend argument, so the setting must reach them: a backend that
cannot serve CPU tensors ("cuda" on this machine) has to stop ZOSGD, zo_step, History.apply_ and a
FedKSeed replica before they touch a weight, and "reference" has to run the reference path."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import fedkseed
from fedkseed import ZOSGD, History, reference, use_backend, zo_step
from fedkseed.fed import Replica
from fedkseed.fed.seedpool import SeedPool
from fedkseed.ops import BACKEND_VARIABLE, backend_setting
from fedkseed.testing.models import small_net

CANNOT_SERVE = "backend='cuda' cannot serve these tensors"


def quadratic(model: torch.nn.Module):
    return lambda: float(sum((p.detach().double() ** 2).sum() for p in model.parameters()))


def weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def unchanged(model: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


@pytest.fixture(autouse=True)
def no_variable(monkeypatch):
    monkeypatch.delenv(BACKEND_VARIABLE, raising=False)


def test_the_default_is_auto_and_a_block_restores_what_it_found():
    assert backend_setting() == "auto"
    with use_backend("reference"):
        assert backend_setting() == "reference"
        with use_backend("cpu"):
            assert backend_setting() == "cpu"
        assert backend_setting() == "reference"
    assert backend_setting() == "auto"


def test_an_unknown_backend_is_refused_by_name(monkeypatch):
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'tpu'"):
        with use_backend("tpu"):
            pass
    monkeypatch.setenv(BACKEND_VARIABLE, "tpu")
    with pytest.raises(ValueError, match=rf"{BACKEND_VARIABLE} must be one of .* got 'tpu'"):
        fedkseed.perturb_([torch.zeros(3)], 1, 0.5)


def test_the_setting_stops_every_layer_before_it_touches_a_weight_or_a_record():
    trained = small_net(5, 4)
    recorder = ZOSGD(trained, lr=1e-2, eps=1e-3, seed=3)
    recorder.step(quadratic(trained))
    recorded = History.from_bytes(recorder.history.to_bytes())
    recorder.close()
    model = small_net(5, 4)
    before = weights(model)
    opt = ZOSGD(model, lr=1e-2, eps=1e-3, seed=3)
    with use_backend("cuda"):
        with pytest.raises(RuntimeError, match=CANNOT_SERVE):
            opt.step(quadratic(model))
        assert opt.steps == 0 and opt.history.entries == [] and opt.pending is None
        with pytest.raises(RuntimeError, match=CANNOT_SERVE):
            zo_step(model, quadratic(model), 7, eps=1e-3, lr=1e-2)
        with pytest.raises(RuntimeError, match=CANNOT_SERVE):
            recorded.apply_(model)
    assert unchanged(model, before)
    opt.close()


def test_a_refused_settle_leaves_the_perturbation_pending_and_the_history_exact():
    model = small_net(5, 4)
    opt = ZOSGD(model, lr=1e-2, eps=1e-3, seed=3)  # fused: the step leaves the next +eps pending
    opt.step(quadratic(model))
    pending, entries, perturbed = opt.pending, list(opt.history.entries), weights(model)
    assert pending is not None
    with use_backend("cuda"):
        with pytest.raises(RuntimeError, match=CANNOT_SERVE):
            opt.settle()
    assert opt.pending == pending and opt.history.entries == entries and opt.history.exact
    assert unchanged(model, perturbed)
    opt.settle()
    fresh = small_net(5, 4)
    opt.history.apply_(fresh)
    assert unchanged(fresh, weights(model))  # the run still replays bit for bit
    opt.close()


def test_a_refused_replica_build_keeps_the_model_it_had():
    model = small_net(5, 4)
    replica = Replica(model, SeedPool(5, 8), 1e-2, "gaussian")
    replica.build(np.ones(8, dtype=np.float32))
    built = weights(model)
    with use_backend("cuda"):
        with pytest.raises(RuntimeError, match=CANNOT_SERVE):
            replica.build(np.full(8, 2.0, dtype=np.float32))
    assert unchanged(model, built)


def test_a_block_holds_in_its_own_thread_only():
    """A context variable: a thread started inside the block starts from the process default
    (so a process-wide choice is FEDKSEED_BACKEND, as the README says)."""
    seen = []
    with use_backend("reference"):
        thread = threading.Thread(target=lambda: seen.append(backend_setting()))
        thread.start()
        thread.join()
    assert seen == ["auto"]


def test_the_setting_picks_the_path_and_an_ops_own_argument_wins(monkeypatch):
    """Counted on the real reference function: "reference" runs it, the default (the compiled CPU
    kernels, when built) does not, and ``backend=`` overrides the block."""
    calls = []
    real = reference.replay_
    monkeypatch.setattr(reference, "replay_", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = small_net(5, 4)
    opt = ZOSGD(model, lr=1e-2, eps=1e-3, seed=3, fuse=False)
    with use_backend("reference"):
        opt.step(quadratic(model))
    assert len(calls) == 3  # +eps, -2 eps, update
    if fedkseed.ops.has_kernel("CPU"):
        calls.clear()
        opt.step(quadratic(model))
        assert calls == []
        with use_backend("reference"):
            fedkseed.perturb_([torch.zeros(3)], 1, 0.5, backend="cpu")
        assert calls == []
    opt.close()


def test_the_variable_is_the_default_of_whole_processes(monkeypatch):
    model = small_net(5, 4)
    monkeypatch.setenv(BACKEND_VARIABLE, "cuda")
    assert backend_setting() == "cuda"
    with pytest.raises(RuntimeError, match=CANNOT_SERVE):
        zo_step(model, quadratic(model), 7, eps=1e-3, lr=1e-2)
    with use_backend("auto"):  # a block overrides the variable
        zo_step(model, quadratic(model), 7, eps=1e-3, lr=1e-2)
