"""Progress per local step: every client reports each step's loss (FedKSeed's (L+ + L-)/2, a
first-order step's loss), and the local engine's bar advances step by step with it."""

import math

import numpy as np
import pytest
import torch

from fedkseed import data as D
from fedkseed.experiment.config import SimConfig
from fedkseed.experiment.local import run_local
from fedkseed.fed import Client, FedSpec, Replica, SeedPool, Server, wire
from fedkseed.fed.firstorder import first_order_steps
from fedkseed.models import load_model


def test_a_fedkseed_client_reports_every_step_and_the_mean_is_its_upload_loss():
    spec = FedSpec(num_clients=1, clients_per_round=1, k=8, local_steps=5, lr=1e-3, eps=1e-3, batch_size=2, seed=2)
    model, tokenizer = load_model("tiny")
    replica = Replica(model, SeedPool(spec.seed, spec.k), spec.lr32, spec.dist)
    client = Client(0, spec, replica, D.encode(tokenizer, D.load_examples("faq")[:6], 48), D.lm_loss)
    seen: list[float] = []
    client.on_step = seen.append
    server = Server(spec, [6])
    server.begin_round()
    upload = wire.decode_upload(client.train(server.download(0)), spec.k, {0: server.schedule(0)})
    assert len(seen) == spec.local_steps and all(math.isfinite(x) for x in seen)
    assert np.float32(np.mean(seen)) == upload.loss  # the values the upload's (float32) train loss averages


def test_first_order_steps_report_each_loss_before_its_step():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 1)
    batches = [{"x": torch.randn(4, 3), "y": torch.randn(4, 1)} for _ in range(3)]
    batches.insert(1, {"x": torch.full((4, 3), math.inf), "y": torch.zeros(4, 1)})  # skipped: not finite

    def loss(model, batch):
        return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])

    reference = torch.nn.Linear(3, 1)
    reference.load_state_dict(layer.state_dict())
    expected = []
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for batch in batches:  # an independent loop: the loss each step sees, NaN when skipped
        value = loss(reference, batch)
        if torch.isfinite(value):
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            expected.append(float(value))
        else:
            expected.append(math.nan)
    seen: list[float] = []
    params = list(layer.parameters())
    kept = first_order_steps(layer, params, batches, loss, torch.optim.SGD(params, lr=0.1), seen.append)
    assert np.allclose(seen, expected, equal_nan=True) and kept == [x for x in expected if math.isfinite(x)]


@pytest.mark.slow
def test_the_local_engine_bar_advances_per_step_with_the_loss(tmp_path, capsys):
    config = SimConfig(
        model="tiny", clients=4, clients_per_round=2, rounds=1, local_steps=3, k=16, eval_examples=2,
        rouge_examples="0", batch_size=2, max_length="48", output=str(tmp_path / "run"),
    )  # fmt: skip
    run_local(config, progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n")
    assert "6/6" in bar  # 2 clients x 3 steps, counted one by one
    assert "loss " in bar  # the postfix: the last step's loss
