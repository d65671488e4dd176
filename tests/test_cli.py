"""`fedkseed simulate` and `fedkseed apply` end to end on the tiny model and the real FAQ data."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fedkseed.cli import main

TINY = ["--model", "tiny", "--clients", "4", "--clients-per-round", "2", "--local-steps", "2",
        "--k", "16", "--eval-examples", "2", "--max-new-tokens", "4", "--batch-size", "2",
        "--max-length", "64", "--lr", "1e-3", "--quiet"]


def _simulate(output, rounds, *extra):
    assert main(["simulate", *TINY, "--rounds", str(rounds), "--output", str(output), *extra]) == 0


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _same_weights(a, b):
    assert a.keys() == b.keys()
    return all(torch.equal(a[name], b[name]) for name in a)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("full")
    _simulate(output, 3)
    return output


def test_simulate_writes_every_output(full_run):
    assert {p.name for p in full_run.iterdir()} >= {"metrics.json", "delta.fks", "model", "losses.png", "state.npz"}
    assert (full_run / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((full_run / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    for r in metrics["rounds"]:
        assert {"train_loss", "eval_loss", "bytes_up_per_client", "bytes_down_per_client", "seconds"} <= r.keys()
        assert r["bytes_up_per_client"] > 0 and r["bytes_down_per_client"] > 0
    final = metrics["final"]
    assert final["eval_loss_after"] == metrics["rounds"][-1]["eval_loss"]
    for key in ("eval_loss_before", "rouge_l_before", "rouge_l_after"):
        assert isinstance(final[key], float)
    assert (full_run / "delta.fks").stat().st_size < 200  # K = 16: the seed table, a few bytes


def test_resume_reaches_the_identical_model(full_run, tmp_path):
    _simulate(tmp_path, 1)  # "stopped" after round 1
    _simulate(tmp_path, 3, "--resume")
    assert (tmp_path / "delta.fks").read_bytes() == (full_run / "delta.fks").read_bytes()
    assert _same_weights(_weights(tmp_path / "model"), _weights(full_run / "model"))
    rounds = [json.loads((d / "metrics.json").read_text())["rounds"] for d in (tmp_path, full_run)]
    assert [r["eval_loss"] for r in rounds[0]] == [r["eval_loss"] for r in rounds[1]]


def test_apply_rebuilds_bit_exact_and_refuses_another_base(full_run, tmp_path, capsys):
    assert main(["apply", "--base", "tiny", "--delta", str(full_run / "delta.fks"), "--output", str(tmp_path / "m")]) == 0
    assert _same_weights(_weights(tmp_path / "m"), _weights(full_run / "model"))

    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(other)
    (full_run / "model" / "tokenizer.json").read_bytes()  # the tokenizer of the run ...
    for name in ("tokenizer.json", "tokenizer_config.json"):  # ... so only the weights differ
        (other / name).write_bytes((full_run / "model" / name).read_bytes())
    capsys.readouterr()
    assert main(["apply", "--base", str(other), "--delta", str(full_run / "delta.fks"), "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "fingerprint" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()

    # Same layout, other values: the fine-tuned model is not the base the delta was made from.
    assert main(["apply", "--base", str(full_run / "model"), "--delta", str(full_run / "delta.fks"),
                 "--output", str(tmp_path / "y")]) == 2
    assert "fingerprint" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "--rounds", "0"],
        ["simulate", "--k", "many"],
        ["simulate", "--clients", "2", "--clients-per-round", "3"],
        ["simulate", "--model", "/no/such/model", "--output", "/tmp/unused"],
        ["simulate", "--model", "tiny", "--data", "/no/such.jsonl", "--output", "/tmp/unused"],
        ["apply", "--base", "tiny", "--delta", "/no/such.fks", "--output", "/tmp/unused"],
        ["bogus"],
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "fedkseed", "simulate", "--lr", "-1"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "lr" in done.stderr, done.stderr
