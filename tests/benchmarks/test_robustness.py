"""benchmarks/robustness.py end to end on the tiny model (real simulations, real attackers): its
figures against a recomputation from the runs' metrics.json files, and a second invocation that
reuses the finished runs instead of training them again."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # two robustness.py subprocesses, four tiny simulations

ROBUSTNESS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "robustness.py"
ARGS = ["--model", "tiny", "--rounds", "2", "--local-steps", "2", "--k", "32", "--lr", "0.05", "--eval-examples", "8"]
ARGS += ["--modes", "robust", "default", "--scenarios", "sign-flip-bound"]


def invoke(root: pathlib.Path) -> list[list[str]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROBUSTNESS), *ARGS, "--output", str(root)], capture_output=True,
                          text=True, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table[1:]]  # header dropped


def final(root: pathlib.Path, folder: str) -> dict:
    return json.loads((root / folder / "metrics.json").read_text())["final"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("robustness")
    return root, invoke(root)


def test_figures_match_the_runs(runs):
    root, rows = runs
    by_label = {(row[0], row[1]): row for row in rows}
    for mode in ("robust", "default"):
        clean = final(root, f"{mode}-clean")
        attacked = final(root, f"{mode}-1of4-sign-flip-bound")
        before, after, reference = clean["eval_loss_before"], attacked["eval_loss_after"], clean["eval_loss_after"]
        row = by_label[(mode, "1 of 4: sign-flip-bound")]
        assert row[2] == f"{after:.4f}"
        assert row[4].startswith(f"{(before - after) / (before - reference):.0%} [")
        assert row[5] == f"{after / reference - 1:+.1%}"
    assert by_label[("", "base model")][2] == f"{before:.4f}"
    assert by_label[("default", "1 of 4: sign-flip-bound")][5] != "+0.0%"  # the attack moved it: a figure to check


def test_a_second_invocation_reuses_finished_runs_and_retrains_changed_or_damaged_ones(runs):
    root, rows = runs
    folders = ["robust-clean", "robust-1of4-sign-flip-bound", "default-clean", "default-1of4-sign-flip-bound"]
    written = {f: (root / f / "metrics.json").stat().st_mtime_ns for f in folders}
    assert invoke(root) == rows
    assert {f: (root / f / "metrics.json").stat().st_mtime_ns for f in folders} == written
    record = root / "default-clean" / "robustness-run.json"
    saved = json.loads(record.read_text())
    saved["settings"]["lr"] = 0.01  # as if that run had been made with other settings
    record.write_text(json.dumps(saved))
    (root / "robust-clean" / "robustness-run.json").write_text('{"settings": ')  # cut short
    assert [row[:-1] for row in invoke(root)] == [row[:-1] for row in rows]  # the same bits; CPU s remeasured
    for folder in ("default-clean", "robust-clean"):
        assert (root / folder / "metrics.json").stat().st_mtime_ns != written[folder]
    assert (root / "default-1of4-sign-flip-bound" / "metrics.json").stat().st_mtime_ns == written[folders[3]]
