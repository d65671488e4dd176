"""benchmarks/convergence.py: the MeZO recipe's update convention against ZOSGD's, the data split,
and the script end to end in its smoke mode (tiny model, real training subprocesses), its table
against an independent recomputation from the runs' JSON files."""

import importlib.util
import itertools
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedkseed import ZOSGD, reference
from fedkseed.data import load_examples
from fedkseed.testing.mezo import mezo_step

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "convergence.py"
SMOKE_METHODS = ["mezo", "zosgd", "zosgd-q4"]
T_975_DF1 = 12.706204736174707  # Student t quantile 0.975 with 1 degree of freedom (two seeds)


def load_script():
    spec = importlib.util.spec_from_file_location("convergence", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_recipe_and_zosgd_share_the_update_convention():
    # On a linear loss c . theta the projected gradient is c . z (up to rounding), so both updates
    # must be -lr (c . z) z, each with its own z: one lr and eps mean the same thing to both.
    c = torch.linspace(-1.0, 1.0, 64)
    lr, eps = 0.01, 1e-3
    x = torch.zeros(64)
    mezo_step([x], lambda: (c * x).sum(), 5, lr=lr, eps=eps)
    torch.manual_seed(5)
    z = torch.normal(0, 1, size=(64,))
    torch.testing.assert_close(x, -lr * (c @ z) * z, rtol=1e-3, atol=1e-7)

    y = torch.zeros(64, requires_grad=True)
    opt = ZOSGD([y], lr=lr, eps=eps, seed=5)
    with torch.no_grad():
        opt.step(lambda: (c * y).sum())
        opt.settle()  # take back the fused +eps of the next step
    u = reference.noise(opt.seed_for(0), 64, 0, "gaussian")
    torch.testing.assert_close(y.detach(), -lr * (c @ u) * u, rtol=1e-3, atol=1e-7)


def test_eval_set_is_fixed_and_disjoint_from_training():
    convergence = load_script()
    examples = load_examples("faq")
    pool, held = convergence.split(examples, 12)
    again_pool, again_held = convergence.split(examples, 12)
    assert held == again_held and pool == again_pool and len(held) == 12
    assert not set(held) & set(pool)
    assert {e.category for e in pool + held}.isdisjoint(convergence.HOLDOUT)
    assert len(pool) + len(held) == sum(e.category not in convergence.HOLDOUT for e in examples)
    # Two seeds draw different orders of the same pool; one seed draws the same order every time.
    take = [convergence.batches(pool, seed, 2) for seed in (0, 0, 1)]
    first = [[t() for _ in range(3)] for t in take]
    assert first[0] == first[1] != first[2]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("convergence")
    command = [sys.executable, str(SCRIPT), "--smoke", "--methods", *SMOKE_METHODS, "--output", str(root)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return root


def reach(points: list[dict], target: float, key: str) -> float | None:
    """Where the loss first gets to the target, interpolated linearly (written out independently)."""
    losses = np.array([p["eval_loss"] for p in points])
    xs = np.array([p[key] for p in points], dtype=float)
    below = np.nonzero(losses <= target)[0]
    if below.size == 0:
        return None
    i = int(below[0])
    if i == 0:
        return float(xs[0])
    return float(xs[i - 1] + (losses[i - 1] - target) / (losses[i - 1] - losses[i]) * (xs[i] - xs[i - 1]))


def interval(values: list[float]) -> tuple[float, float, float]:
    half = T_975_DF1 * np.std(values, ddof=1) / np.sqrt(len(values))
    return float(np.mean(values)), float(np.mean(values) - half), float(np.mean(values) + half)


@pytest.mark.slow
def test_runs_follow_the_protocol(smoke):
    runs = {m: {s: json.loads((smoke / f"{m}-seed{s}.json").read_text()) for s in (0, 1)} for m in SMOKE_METHODS}
    starts = {r["points"][0]["eval_loss"] for seeds in runs.values() for r in seeds.values()}
    assert len(starts) == 1  # one base model, one eval set
    for method, per_step, steps in (("mezo", 2, 6), ("zosgd", 2, 6), ("zosgd-q4", 8, 1)):
        for result in runs[method].values():
            points = result["points"]
            assert points[0]["step"] == 0 and points[0]["cpu_seconds"] == 0 and points[0]["forwards"] == 0
            assert points[-1]["step"] == steps == len(result["train_losses"])
            assert all(p["forwards"] == per_step * p["step"] for p in points)  # the closure's calls counted
            assert all(a["cpu_seconds"] < b["cpu_seconds"] for a, b in itertools.pairwise(points))
            assert points[-1]["forwards"] <= 2 * 6  # the recipe's forward budget
    # Evaluations every 4 forwards (--eval-every 2 recipe steps) for the two-forward methods.
    assert [p["step"] for p in runs["zosgd"][0]["points"]] == [0, 2, 4, 6]


@pytest.mark.slow
def test_table_matches_the_runs(smoke):
    summary = json.loads((smoke / "convergence.json").read_text())
    runs = {m: {s: json.loads((smoke / f"{m}-seed{s}.json").read_text()) for s in (0, 1)} for m in SMOKE_METHODS}
    recipe_final = [runs["mezo"][s]["points"][-1]["eval_loss"] for s in (0, 1)]
    target = float(np.mean(recipe_final))
    assert summary["target"] == pytest.approx(target, abs=1e-12)
    report = (smoke / "convergence.md").read_text()
    for method in SMOKE_METHODS:
        got = summary["methods"][method]
        finals = [runs[method][s]["points"][-1]["eval_loss"] for s in (0, 1)]
        assert (got["final_eval_loss"]["mean"], got["final_eval_loss"]["low"], got["final_eval_loss"]["high"]) == (
            pytest.approx(interval(finals), abs=1e-9)
        )
        row = next(line for line in report.splitlines() if line.startswith(f"| {method} |"))
        mean, low, high = interval(finals)
        assert f"{mean:.3f} [{low:.3f}, {high:.3f}]" in row
        if method == "mezo":  # the target is its own loss at step N: its time is step N's
            cpu = [runs[method][s]["points"][-1]["cpu_seconds"] for s in (0, 1)]
            assert got["reach_cpu_seconds"]["mean"] == pytest.approx(np.mean(cpu))
            assert got["reach_cpu_ratio"]["mean"] == pytest.approx(1.0)
            continue
        reached = {s: reach(runs[method][s]["points"], target, "cpu_seconds") for s in (0, 1)}
        assert got["reached"] == [s for s in (0, 1) if reached[s] is not None]
        if all(v is not None for v in reached.values()):
            ratios = [reached[s] / runs["mezo"][s]["points"][-1]["cpu_seconds"] for s in (0, 1)]
            assert got["reach_cpu_seconds"]["mean"] == pytest.approx(np.mean(list(reached.values())))
            assert got["reach_cpu_ratio"]["mean"] == pytest.approx(np.mean(ratios))
        else:
            assert "reach_cpu_seconds" not in got and "not reached in" in row
    assert (smoke / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_report_only_reads_the_same_figures_and_refuses_other_settings(smoke):
    before = (smoke / "convergence.json").read_text()
    command = [sys.executable, str(SCRIPT), "--smoke", "--methods", *SMOKE_METHODS, "--output", str(smoke)]
    done = subprocess.run([*command, "--report-only"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (smoke / "convergence.json").read_text() == before
    other = subprocess.run([*command, "--report-only", "--eps", "0.5"], capture_output=True, text=True)
    assert other.returncode != 0 and "holds a run with other settings: eps 0.001 (wanted 0.5)" in other.stderr
