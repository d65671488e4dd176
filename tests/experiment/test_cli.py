"""`fedkseed simulate` and `fedkseed apply` end to end on the tiny model and the real FAQ data."""

import json
import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fedkseed.cli import final_line, main

TINY = [
    "--model",
    "tiny",
    "--clients",
    "4",
    "--clients-per-round",
    "2",
    "--local-steps",
    "2",
    "--k",
    "16",
    "--eval-examples",
    "2",
    "--max-new-tokens",
    "4",
    "--rouge-examples",
    "2",
    "--batch-size",
    "2",
    "--max-length",
    "64",
    "--lr",
    "1e-3",
    "--quiet",
]


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


@pytest.mark.slow
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
    assert isinstance(final["eval_loss_before"], float) and final["eval_examples"] == 2
    assert len(final["eval_loss_before_per_example"]) == len(final["eval_loss_after_per_example"]) == 2
    for key in ("rouge_l_before", "rouge_l_after"):
        for scorer in ("rouge-score", "rouge"):
            report = final[key][scorer]
            assert report["n"] == len(report["per_example"]) == 2  # --rouge-examples 2
            assert report["low"] <= report["mean"] <= report["high"]
    assert "(L+ + L-)/2" in final["train_loss_meaning"]
    assert final["data"]["heldout"].startswith("categories: ") and final["data"]["max_length"] == 64
    assert (full_run / "delta.fks").stat().st_size < 200  # K = 16: the seed table, a few bytes


@pytest.mark.slow
def test_final_line_gives_eval_loss_and_rouge_with_n(full_run):
    final = json.loads((full_run / "metrics.json").read_text())["final"]
    line = final_line(final, "out")
    after = final["rouge_l_after"]["rouge-score"]
    assert line == (
        f"eval loss {final['eval_loss_before']:.4f} -> {final['eval_loss_after']:.4f} (n=2); "
        f"Rouge-L (rouge-score) {final['rouge_l_before']['rouge-score']['mean']:.1f} -> {after['mean']:.1f} "
        f"[95% CI {after['low']:.1f}, {after['high']:.1f}] (n=2); outputs in out"
    )


@pytest.mark.slow
def test_resume_reaches_the_identical_model(full_run, tmp_path):
    _simulate(tmp_path, 1)  # "stopped" after round 1
    _simulate(tmp_path, 3, "--resume")
    assert (tmp_path / "delta.fks").read_bytes() == (full_run / "delta.fks").read_bytes()
    assert _same_weights(_weights(tmp_path / "model"), _weights(full_run / "model"))
    rounds = [json.loads((d / "metrics.json").read_text())["rounds"] for d in (tmp_path, full_run)]
    assert [r["eval_loss"] for r in rounds[0]] == [r["eval_loss"] for r in rounds[1]]


@pytest.mark.slow
def test_apply_refuses_a_backend_setting_that_cannot_serve_the_model(full_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEDKSEED_BACKEND", "cuda")  # no CUDA tensors here
    argv = ["apply", "--base", "tiny", "--delta", str(full_run / "delta.fks"), "--output", str(tmp_path / "m")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "backend='cuda' cannot serve" in err and err.count("\n") == 1, err
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_apply_rebuilds_bit_exact_and_refuses_another_base(full_run, tmp_path, capsys):
    assert (
        main(["apply", "--base", "tiny", "--delta", str(full_run / "delta.fks"), "--output", str(tmp_path / "m")]) == 0
    )
    assert _same_weights(_weights(tmp_path / "m"), _weights(full_run / "model"))
    # The rebuilt folder is as readable as simulate's (not mkdtemp's 0700).
    assert (tmp_path / "m").stat().st_mode & 0o777 == (full_run / "model").stat().st_mode & 0o777

    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other"
    LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(other)
    (full_run / "model" / "tokenizer.json").read_bytes()  # the tokenizer of the run ...
    for name in ("tokenizer.json", "tokenizer_config.json"):  # ... so only the weights differ
        (other / name).write_bytes((full_run / "model" / name).read_bytes())
    capsys.readouterr()
    assert (
        main(["apply", "--base", str(other), "--delta", str(full_run / "delta.fks"), "--output", str(tmp_path / "x")])
        == 2
    )
    err = capsys.readouterr().err
    assert "fingerprint" in err and err.count("\n") == 1
    assert "the delta was built from --model 'tiny' --dtype fp32" in err  # read from the run's metrics.json
    assert not (tmp_path / "x").exists()

    # Same layout, other values: the fine-tuned model is not the base the delta was made from.
    assert (
        main(
            [
                "apply",
                "--base",
                str(full_run / "model"),
                "--delta",
                str(full_run / "delta.fks"),
                "--output",
                str(tmp_path / "y"),
            ]
        )
        == 2
    )
    assert "fingerprint" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "--rounds", "0"],
        ["simulate", "--k", "many"],
        ["simulate", "--clients", "2", "--clients-per-round", "3"],
        ["simulate", "--model", "/no/such/model", "--output", "OUT"],
        ["simulate", "--model", "tiny", "--data", "/no/such.jsonl", "--output", "OUT"],
        ["simulate", "--model", "tiny", "--holdout", "no-such-category", "--output", "OUT"],
        ["simulate", "--byzantine", "2", "--clients-per-round", "2"],
        ["simulate", "--clip", "-1"],
        ["simulate", "--rouge-examples", "some"],
        ["simulate", "--weight-decay", "-0.1"],
        ["simulate", "--dtype", "fp8"],
        ["simulate", "--protocol", "fast"],
        ["apply", "--base", "tiny", "--delta", "/no/such.fks", "--output", "OUT"],
        ["bogus"],
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, tmp_path, capsys):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own errors
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("method,value", [("fedkseed", "cuda"), ("fedkseed", "bogus"), ("fedit", "bogus")])
def test_a_backend_setting_that_cannot_serve_the_model_is_one_line(method, value, tmp_path, capsys, monkeypatch):
    """FEDKSEED_BACKEND reaches the run (no CUDA tensors here), refused before any round; a value
    that names no backend is refused whatever the method."""
    monkeypatch.setenv("FEDKSEED_BACKEND", value)
    code = main(["simulate", *TINY, "--method", method, "--rounds", "1", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and value in err, err
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "fedkseed", "simulate", "--lr", "-1"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "lr" in done.stderr, done.stderr


# ------------------------------------------------------------- options generated from the config
def test_options_are_generated_from_the_config_and_its_owners():
    import argparse
    import dataclasses

    from fedkseed import stream
    from fedkseed.cli import build_parser
    from fedkseed.experiment import engines
    from fedkseed.experiment.config import ApplyConfig, SimConfig
    from fedkseed.fed import wire

    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command, config_class in (("simulate", SimConfig), ("apply", ApplyConfig)):
        actions = {a.dest: a for a in subcommands[command]._actions if a.dest != "help"}
        fields = dataclasses.fields(config_class)
        # how to print, not what to run; --estimator and --density only refuse what FedKSeed cannot
        # run (fzoo, a sparse mask)
        assert set(actions) - {"quiet", "print_config", "estimator", "density"} == {f.name for f in fields}
        for f in fields:
            action = actions[f.name]
            assert action.option_strings == ["--" + f.name.replace("_", "-")]
            assert action.required == (f.default is dataclasses.MISSING)
            if not action.required:
                assert action.default == f.default
    simulate = {a.dest: a for a in subcommands["simulate"]._actions}
    assert tuple(simulate["precision"].choices) == wire.PRECISIONS
    assert tuple(simulate["dist"].choices) == tuple(stream.DISTRIBUTIONS)
    assert tuple(simulate["engine"].choices) == engines.names()
    assert tuple(simulate["method"].choices) == ("fedkseed", "fedit", "fedavg", "ferret")


def test_robustness_and_training_options_reach_the_spec():
    from fedkseed.experiment.config import SimConfig

    spec = SimConfig(aggregate="trimmed-mean", clip="2.5", weight_decay=0.1).spec()
    assert (spec.aggregate, spec.clip, spec.weight_decay) == ("trimmed-mean", 2.5, 0.1)
    assert SimConfig().spec().clip == "auto" and SimConfig().spec().aggregate == "mean"
    for spelling in ("off", "none", "inf"):
        assert SimConfig(clip=spelling).spec().clip == "off"
    assert SimConfig(holdout=2).holdout == "2" and SimConfig(holdout="a, b").holdout == "a,b"


def test_engine_registry_loads_builtin_and_installed_engines(tmp_path, monkeypatch):
    """Installed engines are entry points of the group fedkseed.engines: a distribution on
    sys.path declares two (one that loads, one whose module is missing) and tries to take the
    built-in name."""
    from fedkseed.errors import UsageError
    from fedkseed.experiment import engines
    from fedkseed.experiment.config import SimConfig
    from fedkseed.experiment.local import run_local

    info = tmp_path / "probe_engines-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: probe-engines\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text(
        "[fedkseed.engines]\nprobe = probe_engine:run\nbroken = no_such_module:run\nlocal = probe_engine:run\n"
    )
    (tmp_path / "probe_engine.py").write_text(
        "def run(config, *, progress=True):\n    return config.engine, progress\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    engines.registry.cache_clear()
    try:
        assert engines.names()[0] == "local" and {"probe", "broken"} <= set(engines.names())
        assert engines.load("local") is run_local  # an installed engine cannot take a built-in name
        assert engines.load("probe")(SimConfig(engine="probe"), progress=False) == ("probe", False)
        with pytest.raises(UsageError, match="--engine broken cannot be loaded"):
            engines.load("broken")
    finally:
        engines.registry.cache_clear()  # the next lookup sees sys.path as restored
    with pytest.raises(UsageError, match="--engine must be one of"):
        engines.load("nope")
    with pytest.raises(UsageError, match="--engine must be one of"):
        SimConfig(engine="nope")


# ------------------------------------------------------------------------- own data, dtype
def _records(count, long_every=0):
    """Alpaca records without categories; every ``long_every``-th one has a prompt far over 64 tokens."""
    records = []
    for i in range(count):
        words = " ".join(["construction permit"] * 40) if long_every and i % long_every == 0 else f"item {i}"
        records.append({"instruction": f"Describe {words}.", "input": "", "output": f"It is number {i}."})
    return records


@pytest.mark.slow
def test_own_json_array_without_categories_is_held_out_at_random_and_truncations_are_counted(tmp_path, caplog):
    from fedkseed import data as D

    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(_records(80, long_every=10)))
    output = tmp_path / "run"
    argv = ["simulate", *TINY, "--data", str(path), "--rouge-examples", "all", "--rounds", "1", "--output", str(output)]
    with caplog.at_level(logging.WARNING, logger="fedkseed.experiment"):
        assert main(argv) == 0
    said = "\n".join(caplog.messages)
    final = json.loads((output / "metrics.json").read_text())["final"]
    examples = D.load_examples(str(path))
    split = D.split_data(examples, 4, 0.5, 0, 1)  # what the run did, recomputed
    long_kept = sum(1 for c in split.clients for e in c if "permit" in e.instruction)
    assert split.note and split.note in said and final["data"]["heldout"] == split.note
    # Long prompts are truncated (from the left), never dropped; the short answers stay whole.
    assert final["data"]["prompts_truncated"] == long_kept > 0 and final["data"]["answers_cut"] == 0
    assert final["rouge_l_after"]["rouge"]["n"] == len(split.heldout) == 8  # 10% of 80, every one scored


@pytest.mark.slow
def test_low_precision_model_is_trained_and_saved_in_its_dtype(tmp_path):
    output = tmp_path / "bf16"
    _simulate(output, 1, "--dtype", "bf16")
    weights = _weights(output / "model")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    rebuilt = tmp_path / "rebuilt"
    delta = str(output / "delta.fks")
    assert main(["apply", "--base", "tiny", "--dtype", "bf16", "--delta", delta, "--output", str(rebuilt)]) == 0
    assert _same_weights(_weights(rebuilt), weights)


# ---------------------------------------------------------------------------- one bad client
def _final_eval_loss(tmp_path, name, *extra):
    output = tmp_path / name
    argv = ["simulate", *TINY, "--clients-per-round", "4", "--rounds", "1", "--rouge-examples", "0", *extra]
    assert main([*argv, "--output", str(output)]) == 0
    return json.loads((output / "metrics.json").read_text())["final"]["eval_loss_after"]


@pytest.mark.slow
def test_one_attacker_of_four_moves_the_default_run_less_than_2_percent(tmp_path):
    """The robustness table's property on a small run (benchmarks/robustness.py: the full one).
    The unbounded mean fails on the same run, so the bound is what holds it."""
    clean = _final_eval_loss(tmp_path, "clean")
    for attack in ("scale", "sign-flip"):
        attacked = _final_eval_loss(tmp_path, attack, "--byzantine", "1", "--attack", attack)
        assert abs(attacked - clean) <= 0.02 * clean, (attack, attacked, clean)
    unbounded_clean = _final_eval_loss(tmp_path, "off-clean", "--clip", "off")
    unbounded = _final_eval_loss(tmp_path, "off-scale", "--clip", "off", "--byzantine", "1", "--attack", "scale")
    assert not abs(unbounded - unbounded_clean) <= 0.02 * unbounded_clean, (unbounded, unbounded_clean)


@pytest.mark.slow
def test_a_round_where_every_client_fails_stops_the_run(tmp_path, monkeypatch):
    """One failing client is a fault to ride out; all of them failing is a bug, and must not end in
    a run that exits 0 with empty rounds (fault injected in the real Client.train)."""
    from fedkseed.fed import Client

    def broken(self, download):
        raise TypeError("client code bug")

    monkeypatch.setattr(Client, "train", broken)
    with pytest.raises(RuntimeError, match=r"every sampled client failed.*client code bug"):
        main(["simulate", *TINY, "--rounds", "1", "--output", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "metrics.json").exists()
