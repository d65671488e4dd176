"""The README's example scripts run as a user runs them (`python examples/x.py`, a fresh process,
the tiny model), and what they print is checked against an independent recomputation."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedkseed import History, data, models

pytestmark = pytest.mark.slow  # fresh interpreters importing torch and transformers
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--model", "tiny", *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_finetune_example_prints_the_loss_its_history_rebuilds(tmp_path):
    """The held-out loss printed after training is the loss of the base model with the saved
    History replayed onto it, computed here on the example's held-out batch."""
    history = tmp_path / "run.fkh"
    out = _run(
        "finetune_smollm2.py",
        "--steps",
        "6",
        "--batch-size",
        "2",
        "--max-length",
        "32",
        "--lr",
        "1e-2",
        "--log-every",
        "3",
        "--history",
        str(history),
    )
    before = float(re.search(r"held-out loss before: (\S+)", out).group(1))
    after = float(re.search(r"held-out loss after:\s+(\S+)", out).group(1))
    assert len(re.findall(r"^step\s+\d+\s+loss", out, re.M)) == 2
    model, tokenizer = models.load_model(models.TINY, seed=0)
    examples = data.load_examples("faq")
    random.Random(0).shuffle(examples)
    batch = data.encode(tokenizer, examples[:2], 32)
    with torch.inference_mode():
        assert data.lm_loss(model, batch).item() == pytest.approx(before, abs=1e-5)
        History.load(history).apply_(model)
        assert data.lm_loss(model, batch).item() == pytest.approx(after, abs=1e-5)
    assert after != before  # the run trained


def test_trainer_example_trains_evaluates_and_saves(tmp_path):
    out = _run(
        "trainer_smollm2.py",
        "--max-steps",
        "4",
        "--batch-size",
        "2",
        "--max-length",
        "32",
        "--heldout",
        "4",
        "--save-steps",
        "2",
        "--logging-steps",
        "2",
        "--output",
        str(tmp_path / "run"),
    )
    change = re.search(r"held-out loss (\S+) -> (\S+) \(([-+]\S+)\)", out)
    assert change and float(change.group(2)) - float(change.group(1)) == pytest.approx(float(change.group(3)), abs=2e-5)
    assert len(re.findall(r"held-out loss \S+ \([-+]", out)) == 2  # steps 2 and 4, each with its change
    assert (tmp_path / "run" / "zo_history.fkh").is_file()


def test_examples_refuse_an_unknown_option():
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "finetune_smollm2.py"), "--stepz", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "unrecognized arguments: --stepz" in done.stderr
