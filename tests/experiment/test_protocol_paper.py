"""`fedkseed simulate --protocol paper` end to end on the tiny model: the official defaults fill
what the command line leaves unset, the split is the balanced one, aggregation weights count
batches, and Rouge-L scores every held-out example both ways with n and an interval."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import subprocess
import sys

import pytest

from fedkseed import data as D
from fedkseed.cli import main
from fedkseed.experiment.config import PROTOCOLS, SimConfig, flag
from fedkseed.metrics import SCORERS, bootstrap_interval

# Small where the test needs speed (rounds, steps, K); everything else left to the protocol.
ARGV = [
    "--protocol", "paper", "--model", "tiny", "--clients", "4", "--clients-per-round", "2", "--rounds", "1",
    "--local-steps", "3", "--k", "16", "--batch-size", "4", "--eval-examples", "2", "--holdout", "bygglov",
    "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("paper") / "run"
    assert main(["simulate", *ARGV, "--output", str(output)]) == 0
    return json.loads((output / "metrics.json").read_text())


@pytest.mark.slow
def test_unset_settings_come_from_the_protocol_and_flags_win(paper_run):
    config = paper_run["config"]
    assert config["protocol"] == "paper"
    assert (config["k"], config["local_steps"], config["batch_size"]) == (16, 3, 4)  # given
    official = {name: PROTOCOLS["paper"][name] for name in ("lr", "eps", "dist", "max_new_tokens", "rouge_examples")}
    assert official == {"lr": 3e-7, "eps": 5e-4, "dist": "gaussian", "max_new_tokens": 128, "rouge_examples": "all"}
    assert {name: config[name] for name in official} == official
    paper = PROTOCOLS["paper"]
    assert (paper["k"], paper["local_steps"], paper["batch_size"]) == (4096, 200, 1)
    # ... and the demo protocol is what `fedkseed simulate` runs without flags.
    demo = SimConfig()
    assert (demo.k, demo.local_steps, demo.lr, demo.eps, demo.batch_size) == (1024, 30, 3e-5, 1e-2, 2)


@pytest.mark.slow
def test_the_protocol_rules_reach_every_party(paper_run):
    """What no flag overrides: batches walk shuffled epochs and weights count batches, in the
    FedSpec that the server and every client share (and the checkpoint records)."""
    spec = SimConfig(**paper_run["config"]).spec()
    assert (spec.batching, spec.weighting) == ("epochs", "batches")
    demo = SimConfig(**{**paper_run["config"], "protocol": "demo"}).spec()
    assert (demo.batching, demo.weighting) == ("draws", "examples")


@pytest.mark.slow
def test_the_split_is_the_balanced_one(paper_run):
    faq = D.load_examples("faq")
    split = D.split_data(faq, 4, 0.5, 0, "bygglov", balanced=True)
    expected = [len(c) for c in split.clients]
    assert min(expected) >= D.MIN_CLIENT_SIZE
    assert expected != [len(c) for c in D.split_data(faq, 4, 0.5, 0, "bygglov").clients]
    recorded = paper_run["final"]["data"]["examples_per_client"]
    # The 2 eval examples are carved from the clients afterwards, at most one per client here.
    carved = [e - r for e, r in zip(expected, recorded)]
    assert set(carved) <= {0, 1} and sum(carved) == 2


@pytest.mark.slow
def test_aggregation_weights_count_batches(paper_run):
    sizes = paper_run["final"]["data"]["examples_per_client"]
    (record,) = paper_run["rounds"]
    weights = {int(c): w for c, w in record["weights"].items()}
    batches = {c: math.ceil(sizes[c] / 4) for c in weights}
    for c, w in weights.items():
        assert w == pytest.approx(batches[c] / sum(batches.values()), rel=1e-12)


@pytest.mark.slow
def test_rouge_l_scores_every_heldout_example_both_ways(paper_run):
    final = paper_run["final"]
    heldout = [e for e in D.load_examples("faq") if e.category == "bygglov"]
    assert final["heldout_examples"] == len(heldout) > 8  # all of them, not the demo's 8
    for when in ("rouge_l_before", "rouge_l_after"):
        report = final[when]
        assert set(report) == set(SCORERS)
        for scorer in SCORERS:
            entry = report[scorer]
            assert entry["n"] == len(entry["per_example"]) == len(heldout)
            # The interval is the bootstrap over those examples (recomputed independently).
            again = bootstrap_interval(entry["per_example"])
            assert (entry["mean"], entry["low"], entry["high"]) == (again.mean, again.low, again.high)
            assert entry["low"] <= entry["mean"] <= entry["high"]


# ---------------------------------------------------------------- the documented preset
DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "protocol-paper.md"
SOURCE = "https://github.com/alibaba/FederatedScope/tree/FedKSeed"


def _documented() -> dict[str, str]:
    """option (``--clients``) or FedSpec field (``spec.weighting``) -> the value in the docs table."""
    rows = re.findall(r"^\| [^|]+ \| `([^`]+)` \| `([^`]+)` \| [^|]+ \|$", DOC.read_text(), re.M)
    return dict(rows)


def _same(actual, documented: str) -> bool:
    if isinstance(actual, bool) or isinstance(actual, str):
        return str(actual).lower() == documented
    return type(actual)(documented) == actual  # int("200"), float("3e-7")


def test_paper_preset_is_the_documented_official_setup():
    """Every value of the docs table is what --protocol paper resolves to, and every setting the
    protocol sets is in the table (a new one must be documented with its source)."""
    assert SOURCE in DOC.read_text()
    documented = _documented()
    config = SimConfig(protocol="paper")
    spec = config.spec()
    assert {flag(name) for name in PROTOCOLS["paper"]} <= set(documented)
    assert len(documented) >= 20
    for where, value in documented.items():
        actual = getattr(spec, where[5:]) if where.startswith("spec.") else getattr(config, where[2:].replace("-", "_"))
        assert _same(actual, value), (where, actual, value)
    # The list, independently of the table: 200 clients, 10 per round, tau 200, K 4096,
    # lr 3e-7, eps 5e-4, Gaussian, batch 1, 60 rounds (Dolly-style data), max length 1024,
    # every held-out example with 128 new tokens, no upload bound, fp32 table.
    assert (config.clients, config.clients_per_round, config.local_steps, config.k) == (200, 10, 200, 4096)
    assert (config.lr, config.eps, config.dist, config.batch_size, config.rounds) == (3e-7, 5e-4, "gaussian", 1, 60)
    assert (str(config.max_length), config.rouge_examples, config.max_new_tokens) == ("1024", "all", 128)
    assert (config.clip, config.precision, spec.clip) == ("off", "fp32", "off")
    demo = SimConfig()
    assert (demo.clients, demo.clients_per_round, demo.rounds, demo.clip, demo.precision) == (20, 2, 5, "auto", "fp16")


@pytest.mark.slow
def test_print_config_prints_the_resolved_settings_and_loads_nothing(tmp_path):
    """In a fresh process: the JSON is the resolved config (flags win over the protocol), no
    model library is imported and the output folder is not claimed."""
    output = tmp_path / "never"
    code = (
        "import sys\n"
        "from fedkseed.cli import main\n"
        f"argv = ['simulate', '--protocol', 'paper', '--k', '64', '--output', {str(output)!r}]\n"
        "code = main([*argv, '--print-config'])\n"
        "loaded = [m for m in ('transformers', 'peft', 'flwr', 'safetensors') if m in sys.modules]\n"
        "assert code == 0 and not loaded, (code, loaded)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    printed = json.loads(result.stdout)
    expected = SimConfig(protocol="paper", k=64, output=str(output))
    assert printed["config"] == json.loads(json.dumps(dataclasses.asdict(expected)))
    assert printed["spec"] == json.loads(json.dumps(expected.spec().to_dict()))
    assert (printed["config"]["k"], printed["spec"]["weighting"], printed["spec"]["batching"]) == (
        64,
        "batches",
        "epochs",
    )
    assert not output.exists()
