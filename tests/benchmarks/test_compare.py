"""benchmarks/compare.py end to end in its smoke mode (tiny model, 1 round of 2 local steps, real
``fedkseed simulate`` subprocesses): its figures against an independent recomputation from the
runs' metrics.json files."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # every test reads the smoke runs of the compare.py subprocess

COMPARE = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "compare.py"


def percentile_bootstrap(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95% percentile-bootstrap interval: 10,000 resamples from seed 0, as documented
    in fedkseed.metrics, written out here in one draw."""
    rng = np.random.default_rng(0)
    means = values[rng.integers(0, values.size, size=(10_000, values.size))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return float(values.mean()), float(low), float(high)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("compare")
    command = [sys.executable, str(COMPARE), "--smoke", "--methods", "FedKSeed", "FedIT", "--cpu-ratio", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*command, "--output", str(root)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return root


def metrics(root: pathlib.Path, folder: str) -> dict:
    return json.loads((root / folder / "metrics.json").read_text())


def test_figures_match_the_runs(smoke):
    summary = json.loads((smoke / "compare.json").read_text())
    quality = summary["quality"]
    assert list(quality) == ["zero-shot", "FedKSeed", "FedIT", "FedKSeed (equal CPU)"]
    fedit, fedkseed = metrics(smoke, "fedit-seed0"), metrics(smoke, "fedkseed-seed0")
    assert fedit["config"]["method"] == "fedit" and fedkseed["config"]["method"] == "fedkseed"

    # Eval-loss change against zero-shot: mean and interval recomputed from the per-example losses.
    final = fedit["final"]
    change = np.subtract(final["eval_loss_after_per_example"], final["eval_loss_before_per_example"])
    assert np.any(change != 0)  # FedIT's two AdamW steps move the loss: the check below has a value to check
    got = quality["FedIT"]["eval_loss_change"]
    assert (got["mean"], got["low"], got["high"]) == pytest.approx(percentile_bootstrap(change), abs=1e-12)
    assert got["n"] == final["eval_examples"] == 8

    # FedIT minus FedKSeed, paired per example; Rouge-L per scorer against zero-shot.
    versus = summary["versus"]["FedIT minus FedKSeed"]["eval_loss"]
    paired = np.subtract(final["eval_loss_after_per_example"], fedkseed["final"]["eval_loss_after_per_example"])
    assert versus["mean"] == pytest.approx(paired.mean(), abs=1e-12)
    for scorer in ("rouge-score", "rouge"):
        after = np.asarray(fedkseed["final"]["rouge_l_after"][scorer]["per_example"])
        assert quality["FedKSeed"][f"rouge_{scorer}"]["mean"] == pytest.approx(after.mean(), abs=1e-12)
        assert quality["FedKSeed"][f"rouge_{scorer}"]["n"] == 55

    # Cost: bytes up + down per client and round, and the CPU-seconds per local step of the budget.
    cost = quality["FedIT"]["cost"]
    up = np.mean([r["bytes_up_per_client"] for r in fedit["rounds"]])
    down = np.mean([r["bytes_down_per_client"] for r in fedit["rounds"]])
    assert cost["bytes_per_client_round"] == pytest.approx(up + down)
    assert up > 1000 > quality["FedKSeed"]["cost"]["bytes_per_client_round"]  # adapters against seeds
    budget = json.loads((smoke / "cpu_budget.json").read_text())
    for name, run in (("FedIT", fedit), ("FedKSeed", fedkseed)):
        per_step = np.mean([r["client_cpu_seconds"] for r in run["rounds"]]) / run["config"]["local_steps"]
        assert budget["cpu_seconds_per_step"][name] == pytest.approx(per_step)


def test_equal_cpu_run_continues_the_examples_run(smoke):
    # --cpu-ratio 2: FedKSeed gets 2 rounds of the same local steps; its first round is the
    # equal-examples run's, continued from a copy of that run's checkpoint.
    budget = json.loads((smoke / "cpu_budget.json").read_text())
    assert budget["rounds"] == {"FedKSeed": 2} and budget["ratio_fixed"]
    base, longer = metrics(smoke, "fedkseed-seed0"), metrics(smoke, "fedkseed-cpu-seed0")
    assert [r["round"] for r in longer["rounds"]] == [1, 2]
    assert longer["rounds"][0] == base["rounds"][0]
    assert longer["final"]["rouge_l_before"] == base["final"]["rouge_l_before"]
    assert (smoke / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_only_reads_the_same_figures(smoke):
    before = (smoke / "compare.json").read_text()
    command = [sys.executable, str(COMPARE), "--smoke", "--methods", "FedKSeed", "FedIT", "--cpu-ratio", "2"]
    done = subprocess.run([*command, "--output", str(smoke), "--report-only"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (smoke / "compare.json").read_text() == before
    assert "| FedKSeed (equal CPU) | 1 |" in (smoke / "compare.md").read_text()
