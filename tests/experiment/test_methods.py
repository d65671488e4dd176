"""`fedkseed simulate --method fedit|fedavg`: the first-order baselines in FedKSeed's harness.

End to end on the tiny model (local engine): each method lowers nothing by magic but trains
(the eval loss moves), writes its outputs (no delta.fks: that is FedKSeed's), records the
per-round cost keys, and resumes to the identical model. Bytes are those of the real messages
(recomputed independently from the tensors' shapes with numpy's own .npy writer), the batches
are FedKSeed's very draws (recorded through the loss both clients call), the server's average
is the weighted mean (recomputed), and bad messages and options are refused in one line.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedkseed import data as D
from fedkseed.cli import main
from fedkseed.errors import UsageError
from fedkseed.experiment.config import SimConfig
from fedkseed.experiment.methods import FIRST_ORDER_LR
from fedkseed.experiment.prepare import prepare
from fedkseed.fed import Client, FedSpec, Replica, SeedPool, Server, WireError
from fedkseed.fed import arrays as A
from fedkseed.fed.firstorder import FirstOrderClient, FirstOrderServer, local_batch_rows
from fedkseed.models import load_model

TINY = [
    "--model", "tiny", "--clients", "4", "--clients-per-round", "2", "--local-steps", "3", "--eval-examples", "2",
    "--rouge-examples", "1", "--max-new-tokens", "2", "--batch-size", "2", "--max-length", "48", "--quiet",
]  # fmt: skip
COST_KEYS = ("client_seconds", "client_cpu_seconds", "client_peak_mib", "bytes_up_per_client", "bytes_down_per_client")


def _simulate(output, method, rounds, *extra):
    assert main(["simulate", *TINY, "--method", method, "--rounds", str(rounds), "--output", str(output), *extra]) == 0
    return json.loads((output / "metrics.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two rounds of each first-order method (fedit with a higher lr: the tiny model's loss
    must visibly move in 6 steps)."""
    out = {}
    for method, extra in (("fedit", ["--lr", "1e-2"]), ("fedavg", [])):
        folder = tmp_path_factory.mktemp(method)
        out[method] = (folder, _simulate(folder, method, 2, *extra), extra)
    return out


def _message_size(layout: dict[str, tuple[int, ...]]) -> int:
    """The array message's length from its definition (docs/formats.md#arrays), with numpy's own
    .npy writer: 3 + 1 + 1 + 4 * 4 + 4 header bytes, per tensor 2 + name + 4 + .npy, CRC 4."""
    size = 3 + 1 + 1 + 4 * 4 + 4 + 4
    for name, shape in layout.items():
        buffer = io.BytesIO()
        np.save(buffer, np.zeros(shape, dtype="<f4"))
        size += 2 + len(name.encode()) + 4 + len(buffer.getvalue())
    return size


@pytest.mark.parametrize("method", ["fedit", "fedavg"])
@pytest.mark.slow
def test_method_trains_and_writes_its_outputs(runs, method):
    folder, metrics, _ = runs[method]
    assert {p.name for p in folder.iterdir()} == {"metrics.json", "model", "losses.png", "state.npz"}  # no delta.fks
    final = metrics["final"]
    assert final["method"] == metrics["config"]["method"] == method
    assert final["eval_loss_after"] != final["eval_loss_before"]  # the global model moved
    assert final["eval_loss_after"] == metrics["rounds"][-1]["eval_loss"]
    assert "first-order" in final["train_loss_meaning"]
    for record in metrics["rounds"]:
        assert all(isinstance(record[key], float) and record[key] > 0 for key in COST_KEYS), record
        assert record["client_cpu_seconds"] > 0 and math.isfinite(record["train_loss"])
        assert len(record["clients"]) == 2 and sum(record["weights"].values()) == pytest.approx(1.0)
    # The saved model is a plain transformers model (FedIT's adapters merged into it).
    weights = load_file(str(folder / "model" / "model.safetensors"))
    assert not any("lora" in name for name in weights)


@pytest.mark.slow
def test_bytes_are_the_real_messages(runs):
    """Every sampled client downloads the global tensors and uploads its own: the recorded
    bytes are the array message's length, recomputed here from the tensors' shapes."""
    config = SimConfig(model="tiny", method="fedit", clients=4, clients_per_round=2, max_length=48)
    setup = prepare(config)
    layout = {name: tuple(t.shape) for name, t in setup.trainable.items()}
    assert layout and all("lora_A" in n or "lora_B" in n for n in layout)  # FedIT sends its adapters only
    assert {n.split(".")[-2] for n in layout} == {"default"} and any("q_proj" in n for n in layout)
    fedit = _message_size(layout)
    for record in runs["fedit"][1]["rounds"]:
        assert record["bytes_up_per_client"] == record["bytes_down_per_client"] == fedit
    model, _ = load_model("tiny")
    fedavg = _message_size({n: tuple(p.shape) for n, p in model.named_parameters()})
    for record in runs["fedavg"][1]["rounds"]:
        assert record["bytes_up_per_client"] == record["bytes_down_per_client"] == fedavg
    # ... and the server counts exactly what it sends and receives.
    server = setup.server
    (c, *_) = server.begin_round()
    download = server.download(c)
    upload = setup.clients[c].train(download)
    assert server.receive(upload)
    summary = server.end_round()
    assert (summary.bytes_down[c], summary.bytes_up[c]) == (len(download), len(upload)) == (fedit, fedit)


@pytest.mark.slow
def test_fedavg_peak_memory_holds_gradients_and_adam_state(runs):
    """Full-parameter AdamW keeps a gradient and two moments per weight: the measured peak
    added memory must hold at least those 12 bytes per parameter."""
    model, _ = load_model("tiny")
    floor = 12 * sum(p.numel() for p in model.parameters()) / 2**20
    peaks = [r["client_peak_mib"] for r in runs["fedavg"][1]["rounds"]]
    assert min(peaks) >= 0.9 * floor, (peaks, floor)
    assert max(r["client_peak_mib"] for r in runs["fedit"][1]["rounds"]) < min(peaks)


@pytest.mark.slow
def test_first_order_resume_reaches_the_identical_model(runs, tmp_path):
    folder, metrics, extra = runs["fedit"]
    _simulate(tmp_path, "fedit", 1, *extra)
    resumed = _simulate(tmp_path, "fedit", 2, *extra, "--resume")
    a, b = (load_file(str(f / "model" / "model.safetensors")) for f in (tmp_path, folder))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["eval_loss"] for r in resumed["rounds"]] == [r["eval_loss"] for r in metrics["rounds"]]


@pytest.mark.slow
def test_first_order_clients_take_fedkseeds_batches():
    """Both clients call their loss once per local step (FedKSeed's twice: L+ and L-) on the
    batches they draw: the same rows, under both batchings, across two rounds."""
    model, tokenizer = load_model("tiny")
    examples = D.load_examples("faq")[:7]
    data = D.encode(tokenizer, examples, 48)
    for batching in ("draws", "epochs"):
        spec = FedSpec(num_clients=2, clients_per_round=2, k=8, local_steps=4, batch_size=3, batching=batching)
        seen = {"zo": [], "fo": []}

        def recorder(kind, loss, seen=seen):
            def call(m, batch):
                seen[kind].append(batch["input_ids"].clone())
                return loss(m, batch)

            return call

        replica = Replica(model, SeedPool(spec.seed, spec.k), spec.lr32, spec.dist)
        zo = Client(1, spec, replica, data, recorder("zo", D.lm_loss))
        tensors = dict(model.named_parameters())
        fo = FirstOrderClient(1, spec, model, tensors, data, recorder("fo", D.response_loss))
        server = FirstOrderServer(spec, [7, 7], {n: t.detach().numpy().copy() for n, t in tensors.items()})
        zo_server = Server(spec, [7, 7])
        for _ in range(2):
            for s, client in ((zo_server, zo), (server, fo)):
                s.begin_round()
                s.receive(client.train(s.download(1)))
                s.end_round()
        zo_batches = seen["zo"][::2]  # each ZO step evaluates its batch twice
        assert len(zo_batches) == len(seen["fo"]) == 8
        assert all(torch.equal(a, b) for a, b in zip(zo_batches, seen["fo"])), batching
        rows = local_batch_rows(spec, 2, 1, 7)  # round 2: the epoch walk goes on from round 1
        assert len(rows) == 4 and [len(r) for r in rows] == ([3, 3, 3, 3] if batching == "draws" else [3, 1, 3, 3])


def test_server_average_is_the_weighted_mean_and_bad_uploads_are_refused():
    spec = FedSpec(num_clients=3, clients_per_round=3, local_steps=2, batch_size=2, weighting="batches")
    sizes = [3, 4, 9]  # batches: 2, 2, 5
    initial = {"w": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}
    server = FirstOrderServer(spec, sizes, initial)
    sampled = server.begin_round()
    assert sampled == [0, 1, 2]
    rng = np.random.default_rng(0)
    local = {
        c: {"w": rng.normal(size=(2, 3)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
        for c in sampled
    }

    def upload(c, round_=1, arrays=None, steps=2):
        return A.encode(A.ArrayMessage(A.KIND_LOCAL, round_, c, steps, 0.5 + c, arrays or local[c]))

    download = server.download(0)
    assert A.decode(download, A.KIND_GLOBAL, {"w": (2, 3), "b": (4,)}).arrays["b"].tolist() == [1.0] * 4
    assert server.receive(upload(0)) and server.receive(upload(2))
    assert not server.receive(upload(0))  # twice
    assert not server.receive(upload(1, round_=2))  # another round
    assert not server.receive(upload(1, steps=3))  # more steps than the run's
    assert not server.receive(upload(1, arrays={"w": local[1]["w"]}))  # a tensor missing
    nan = {"w": np.full((2, 3), np.nan, np.float32), "b": local[1]["b"]}
    assert not server.receive(upload(1, arrays=nan))
    corrupted = bytearray(upload(1))
    corrupted[40] ^= 1
    assert not server.receive(bytes(corrupted))
    summary = server.end_round()
    assert summary.accepted == [0, 2] and summary.weights == {0: 2 / 7, 2: 5 / 7}
    assert set(summary.rejected) == {0, 1, -1}
    for name in initial:
        expected = 2 / 7 * local[0][name].astype(np.float64) + 5 / 7 * local[2][name].astype(np.float64)
        expected = expected.astype(np.float32)
        assert np.array_equal(server.weights[name], expected)
    assert summary.train_loss == pytest.approx(2 / 7 * 0.5 + 5 / 7 * 2.5)
    again = FirstOrderServer(spec, sizes, initial)
    again.load_state_dict(server.state_dict())
    assert all(np.array_equal(again.weights[n], server.weights[n]) for n in initial) and again.round == 1


@pytest.mark.parametrize(
    "cut",
    [lambda m: m[:-1], lambda m: m[:20], lambda m: b"XYZ" + m[3:], lambda m: m[:30] + bytes([m[30] ^ 0xFF]) + m[31:]],
)
def test_array_messages_refuse_damage(cut):
    message = A.encode(A.ArrayMessage(A.KIND_GLOBAL, 1, 0, 0, math.nan, {"w": np.ones(3, np.float32)}))
    with pytest.raises(WireError):
        A.decode(cut(message), A.KIND_GLOBAL, {"w": (3,)})
    with pytest.raises(WireError, match="kind"):
        A.decode(message, A.KIND_LOCAL, {"w": (3,)})
    with pytest.raises(WireError, match="shape"):
        A.decode(message, A.KIND_GLOBAL, {"w": (4,)})


def test_method_options_and_default_learning_rates():
    assert SimConfig(method="fedit").lr == FIRST_ORDER_LR["fedit"] == 1e-4
    assert SimConfig(method="fedavg").lr == FIRST_ORDER_LR["fedavg"] == 1e-5
    assert SimConfig(method="fedavg", lr=3e-3).lr == 3e-3  # an explicit --lr wins
    assert SimConfig(method="fedavg", protocol="paper").lr == 1e-5  # the paper's lr is FedKSeed's
    assert SimConfig().lr == 3e-5 and SimConfig().method == "fedkseed"
    refused = {
        "pro": dict(pro=True),
        "byzantine": dict(byzantine=1),
        "aggregate": dict(aggregate="median"),
        "dtype": dict(dtype="bf16"),
        "shared-seeds": dict(shared_seeds=True),  # a seed schedule: first-order methods draw no seeds
    }
    for flag, options in refused.items():
        with pytest.raises(UsageError, match=f"--{flag}.* is FedKSeed's"):
            SimConfig(method="fedit", **options)
    with pytest.raises(UsageError, match="--lora-rank"):
        SimConfig(method="fedit", lora_rank=0)
    with pytest.raises(UsageError, match="--lora-targets"):
        SimConfig(method="fedit", lora_targets="q_proj,,v_proj")


def test_unknown_lora_target_is_one_line(tmp_path, capsys):
    assert main(["simulate", *TINY, "--method", "fedit", "--lora-targets", "nope", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedkseed simulate: error: --method fedit:") and "nope" in err and "\n" not in err
