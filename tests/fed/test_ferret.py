"""`fedkseed simulate --method ferret`: first-order SGD steps, the update projected onto the round's
shared seeds, FedKSeed's wire upload, server and table.

End to end on the tiny model (local engine): over 3 rounds Ferret lowers the eval loss more than
FedKSeed uploading the same bytes (issue 19's criterion); the delta file rebuilds the served model
bit for bit through `fedkseed apply`; a resumed run reaches the identical model. In process: the
upload is the compact wire message of the projections, recomputed independently (every z
materialized with `fedkseed.noise`, dotted with the update in float64, scaled by -1/(K_r lr));
a client's catch-up build holds the bits of a fresh replica built from the server's table;
options Ferret cannot honour are refused in one line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedkseed import noise
from fedkseed.cli import main
from fedkseed.errors import UsageError
from fedkseed.experiment.config import SimConfig
from fedkseed.experiment.prepare import prepare
from fedkseed.fed import Replica, SeedPool, wire
from fedkseed.fed.draws import draw_schedule
from fedkseed.fed.ferret import FerretClient
from fedkseed.models import load_model

TINY = [
    "--model", "tiny", "--clients", "4", "--clients-per-round", "2", "--local-steps", "10", "--eval-examples", "8",
    "--rouge-examples", "0", "--batch-size", "2", "--max-length", "48", "--seed", "1", "--quiet",
]  # fmt: skip
# lrs from the tiny-model scan in docs/ferret.md: 1e-3 is FedKSeed's best of {5e-4, 1e-3, 2e-3} at
# seed 1 (2e-3 is past its stable range); Ferret's lower noise lets it take 2e-3.
FERRET_LR, FEDKSEED_LR = "2e-3", "1e-3"


def _simulate(output, method, rounds, *extra):
    assert main(["simulate", *TINY, "--method", method, "--rounds", str(rounds), "--output", str(output), *extra]) == 0
    return json.loads((output / "metrics.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ferret = tmp_path_factory.mktemp("ferret")
    fedkseed = tmp_path_factory.mktemp("fedkseed")
    return {
        "ferret": (ferret, _simulate(ferret, "ferret", 3, "--lr", FERRET_LR)),
        "fedkseed": (fedkseed, _simulate(fedkseed, "fedkseed", 3, "--lr", FEDKSEED_LR, "--shared-seeds")),
    }


@pytest.mark.slow
def test_ferret_lowers_the_eval_loss_more_than_fedkseed_at_equal_upload(runs):
    (_, ferret), (_, fedkseed) = runs["ferret"], runs["fedkseed"]
    assert ferret["config"]["shared_seeds"] and ferret["config"]["k"] == fedkseed["config"]["k"]
    for a, b in zip(ferret["rounds"], fedkseed["rounds"]):  # the same K_r scalars in the same message
        assert a["bytes_up_per_client"] == b["bytes_up_per_client"] > 0 and a["clients"] == b["clients"]
    gain = {m: r["final"]["eval_loss_before"] - r["final"]["eval_loss_after"] for m, (_, r) in runs.items()}
    assert ferret["final"]["eval_loss_before"] == fedkseed["final"]["eval_loss_before"]
    assert gain["ferret"] > 1.2 * gain["fedkseed"] > 0, gain


@pytest.mark.slow
def test_delta_file_rebuilds_the_served_model(runs, tmp_path):
    folder, _ = runs["ferret"]
    assert (folder / "delta.fks").exists()
    out = tmp_path / "applied"
    assert main(["apply", "--base", "tiny", "--delta", str(folder / "delta.fks"), "--output", str(out)]) == 0
    a, b = (load_file(str(f / "model.safetensors")) for f in (out, folder / "model"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_reaches_the_identical_model(runs, tmp_path):
    folder, metrics = runs["ferret"]
    _simulate(tmp_path, "ferret", 1, "--lr", FERRET_LR)
    resumed = _simulate(tmp_path, "ferret", 3, "--lr", FERRET_LR, "--resume")
    a, b = (load_file(str(f / "model" / "model.safetensors")) for f in (tmp_path, folder))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["eval_loss"] for r in resumed["rounds"]] == [r["eval_loss"] for r in metrics["rounds"]]
    assert (tmp_path / "delta.fks").read_bytes() == (folder / "delta.fks").read_bytes()


def test_upload_is_the_projection_in_fedkseeds_wire_message():
    """Round 1 by hand: each upload decodes to one value per distinct seed of the round's shared
    schedule, equal to -<theta_local - theta_round, z_k> / (K_r lr) computed with materialized z;
    its length is the server's count; the next catch-up builds the server's table bit for bit."""
    config = SimConfig(
        model="tiny", method="ferret", clients=4, clients_per_round=2, local_steps=3, batch_size=2,
        max_length=48, rouge_examples="0", lr=1e-3, precision="fp32",
    )  # fmt: skip
    setup = prepare(config)
    server, replica, spec = setup.server, setup.replica, setup.server.spec
    assert all(isinstance(c, FerretClient) for c in setup.clients)
    sampled = server.begin_round()
    schedules = {c: server.schedule(c) for c in sampled}
    indices = np.unique(draw_schedule(spec.seed, 1, 0, spec.local_steps, spec.k, shared=True))
    start = torch.cat([t.detach().flatten().clone() for t in replica.params.tensors])
    for c in sampled:
        replica.build(server.table)  # theta_round (the shared replica holds the last client's weights)
        assert torch.equal(torch.cat([t.flatten() for t in replica.params.tensors]), start)
        upload = setup.clients[c].train(server.download(c))
        delta = torch.cat([t.detach().flatten() for t in replica.params.tensors]) - start
        z = [noise(replica.pool.seeds[i], delta.numel(), dist=spec.dist) for i in indices.tolist()]
        p = np.array([float(torch.dot(delta.double(), zk.double())) for zk in z])
        expected = -p / (len(indices) * spec.lr32)
        decoded = wire.decode_upload(upload, spec.k, schedules)
        np.testing.assert_array_equal(decoded.indices, indices)
        np.testing.assert_allclose(decoded.values, expected, rtol=1e-4)
        assert np.abs(expected).max() > 0
        again = wire.Upload(c, 1, spec.k, spec.local_steps, decoded.loss, indices, decoded.values)
        assert wire.encode_upload(again, "fp32", implied=indices) == upload
        assert server.receive(upload)
    summary = server.end_round()
    assert all(summary.bytes_up[c] == len(upload) for c in sampled)
    assert np.count_nonzero(server.table) == len(indices)
    # A client's catch-up build = a fresh party's canonical build of the server's table.
    (c, *_) = server.begin_round()
    setup.clients[c].catch_up(server.download(c))
    model, _ = load_model("tiny")
    fresh = Replica(model, SeedPool(spec.seed, spec.k), spec.lr32, spec.dist).build(server.table)
    assert all(torch.equal(a, b) for a, b in zip(replica.params.tensors, fresh.tensors))
    assert not torch.equal(fresh.tensors[0], next(load_model("tiny")[0].parameters()))  # the model moved


def test_options_ferret_cannot_honour_are_refused_in_one_line():
    config = SimConfig(method="ferret")
    assert config.shared_seeds and config.lr == SimConfig().lr  # FedKSeed's lr: a ZO-sized step
    for options in (dict(pro=True), dict(dtype="bf16"), dict(dp_epsilon=8.0)):
        with pytest.raises(UsageError, match="method ferret") as error:
            SimConfig(method="ferret", **options)
        assert "\n" not in str(error.value)


@pytest.mark.slow
def test_the_robust_bound_scales_down_a_byzantine_ferret_upload(tmp_path):
    """Ferret's uploads enter FedKSeed's per-step RMS bound: a client sending 1e6 times its
    honest projections is scaled back to the bound and the global model still improves."""
    options = ["--clients-per-round", "3", "--local-steps", "5", "--eval-examples", "4", "--byzantine", "1"]
    metrics = _simulate(tmp_path, "ferret", 1, "--lr", FERRET_LR, *options, "--attack", "scale")
    (record,) = metrics["rounds"]
    assert len(record["clipped"]) == 1 and next(iter(record["clipped"].values())) < 1e-3
    assert record["eval_loss"] < metrics["final"]["eval_loss_before"]
