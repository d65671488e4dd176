"""FedKSeed server and clients: aggregation, bit-identical catch-up, Pro probabilities, faults."""

import logging

import numpy as np
import pytest
import torch

from fedkseed import data as D
from fedkseed.fed import Client, FedSpec, Replica, SeedPool, Server, wire
from fedkseed.models import load_model


@pytest.fixture(scope="module")
def faq():
    return D.load_examples("faq")


def _party(spec: FedSpec):
    model, tokenizer = load_model("tiny")
    pool = SeedPool(spec.seed, spec.k)
    return Replica(model, pool, spec.lr32, spec.dist), tokenizer


@pytest.mark.parametrize("dist", ["gaussian", pytest.param("rademacher", marks=pytest.mark.slow)])
def test_round_equals_weighted_average_and_catch_up_is_bit_identical(faq, dist):
    spec = FedSpec(
        num_clients=2,
        clients_per_round=2,
        k=8,
        local_steps=3,
        lr=1e-3,
        eps=1e-3,
        dist=dist,
        batch_size=2,
        precision="fp32",
        seed=5,
        clip="off",  # FedKSeed's plain weighted mean (3 steps: the auto bound may scale a client)
    )
    shards = [faq[:6], faq[6:9]]  # data shares 2/3 and 1/3
    server = Server(spec, [len(s) for s in shards])
    server_replica, tokenizer = _party(spec)
    base = server_replica.params.state()
    clients, trained = [], []
    for c, shard in enumerate(shards):
        replica, _ = _party(spec)
        clients.append(Client(c, spec, replica, D.encode(tokenizer, shard, 48), D.lm_loss))
    assert server.begin_round() == [0, 1]
    for client in clients:
        assert server.receive(client.train(server.download(client.client_id)))
        trained.append(client.replica.params.state())
    summary = server.end_round()
    assert summary.weights == pytest.approx({0: 2 / 3, 1: 1 / 3})
    global_model = server_replica.build(server.table).state()

    scale = max(float(b.abs().max()) for b in base)
    moved = 0.0
    for g, b, m0, m1 in zip(global_model, base, *trained):
        average = (2 / 3) * m0.double() + (1 / 3) * m1.double()
        torch.testing.assert_close(g.double(), average, atol=1e-6 * scale, rtol=0)
        moved = max(moved, float((g - b).abs().max()))
    assert moved > 100 * 1e-6 * scale  # the round really changed the weights

    # Round 2: each client catches up from its download alone and holds the server's bits.
    server.begin_round()
    for client in clients:
        client.catch_up(server.download(client.client_id))
        assert np.array_equal(client.table, server.table)
        for mine, theirs in zip(client.replica.params.tensors, global_model):
            assert torch.equal(mine, theirs)


def test_pro_probabilities_follow_the_formula():
    spec = FedSpec(num_clients=4, clients_per_round=3, k=32, local_steps=20, pro=True, seed=1)
    server = Server(spec, [3, 1, 2, 5])
    history = [[0.0] for _ in range(spec.k)]  # the formula, kept independently
    rng = np.random.default_rng(0)
    for _ in range(4):
        probabilities = server.probabilities()
        mean = np.array([np.mean(np.abs(np.clip(h, -1000, 1000))) for h in history])
        norm = (mean - mean.min()) / (mean.max() - mean.min() + 1e-10)
        expected = np.exp(norm) / np.exp(norm).sum()
        np.testing.assert_allclose(probabilities, expected, rtol=1e-12, atol=0)
        for c in server.begin_round():
            d = wire.decode_download(server.download(c), spec.k)
            # one g per step, some past the +-1000 clip; every client's norm alike (none bounded)
            values = rng.normal(0, 400, spec.local_steps) * rng.choice([1, 10], spec.local_steps)
            upload = wire.StepUpload(c, d.round, spec.k, spec.local_steps, 1.0, np.zeros(0, np.int64), values)
            message = wire.encode_step_upload(upload, spec.precision)
            assert server.receive(message)
            for i, v in zip(d.schedule, wire.decode_upload(message, spec.k).values):
                history[i].append(float(v))
        assert not server.end_round().clipped
    assert server.probabilities().max() > 1.5 * server.probabilities().min()


def _open_round(k=16):
    spec = FedSpec(num_clients=5, clients_per_round=3, k=k, local_steps=4, seed=2)
    server = Server(spec, [1, 2, 3, 4, 5])
    return spec, server, server.begin_round()


def _valid(server, spec, c, values=None):
    d = wire.decode_download(server.download(c), spec.k)
    from fedkseed.fed import draw_schedule

    used = np.unique(draw_schedule(spec.seed, d.round, c, spec.local_steps, spec.k))
    values = np.ones(used.size) if values is None else values
    return wire.Upload(c, d.round, spec.k, spec.local_steps, 1.0, used, values)


def test_failed_client_is_simply_absent():
    spec, server, sampled = _open_round()
    for c in sampled[:2]:  # the third client never answers
        assert server.receive(wire.encode_upload(_valid(server, spec, c), "fp16"))
    summary = server.end_round()
    assert summary.accepted == sampled[:2]
    sizes = [server.sizes[c] for c in sampled[:2]]
    assert summary.weights == pytest.approx({c: n / sum(sizes) for c, n in zip(sampled[:2], sizes)})
    assert server.synced[sampled[2]] == 0 and server.table.any()


def test_malformed_and_out_of_range_uploads_are_rejected_and_never_applied(caplog):
    spec, server, sampled = _open_round()
    outsider = next(c for c in range(spec.num_clients) if c not in sampled)
    good = _valid(server, spec, sampled[0])
    bad = {
        "round": wire.Upload(good.client_id, 7, spec.k, 4, 1.0, good.indices, good.values),
        "unknown client": wire.Upload(99, good.round, spec.k, 4, 1.0, good.indices, good.values),
        "not sampled": wire.Upload(outsider, good.round, spec.k, 4, 1.0, good.indices, good.values),
        "K =": wire.Upload(good.client_id, good.round, 32, 4, 1.0, good.indices, good.values),
        "steps": wire.Upload(good.client_id, good.round, spec.k, 9, 1.0, good.indices, good.values),
        "outside the client's schedule": wire.Upload(
            good.client_id, good.round, spec.k, 4, 1.0, np.setdiff1d(np.arange(spec.k), good.indices)[:1], np.ones(1)
        ),
    }
    with caplog.at_level(logging.WARNING, logger="fedkseed.fed"):
        for reason, upload in bad.items():
            assert not server.receive(wire.encode_upload(upload, "fp32"))
            assert reason in caplog.records[-1].getMessage()
        assert not server.receive(b"FKSU\x01garbage")
        assert "CRC" in caplog.records[-1].getMessage()
        assert server.receive(wire.encode_upload(good, "fp32"))
        assert not server.receive(wire.encode_upload(good, "fp32"))
        assert "already uploaded" in caplog.records[-1].getMessage()
    summary = server.end_round()
    assert summary.accepted == [good.client_id]
    expected = np.zeros(spec.k)
    expected[good.indices] = 1.0  # the one accepted client carries all the weight
    assert np.array_equal(server.table, wire.quantize(expected, "fp16", server.exponent))


def test_client_refuses_a_download_it_cannot_apply():
    spec, _server, sampled = _open_round(k=8)
    replica = Replica(torch.nn.Linear(3, 2), SeedPool(spec.seed, spec.k), spec.lr32, spec.dist)
    client = Client(
        sampled[0], spec, replica, {"input_ids": torch.zeros(1, 2), "attention_mask": torch.ones(1, 2)}, None
    )
    client.synced = 0
    future = wire.encode_download(
        wire.Download(5, 3, spec.k, np.array([1]), np.ones(1, np.float32), np.array([])), "fp32", 0
    )
    with pytest.raises(wire.WireError, match="relative to round 3"):
        client.catch_up(future)
    assert not client.table.any()


def test_epoch_walk_covers_each_epoch_once():
    from fedkseed.fed.draws import epoch_rows
    from fedkseed.seeds import derive_seed

    n, batch = 7, 3
    batches = [epoch_rows(5, 2, b, batch, n) for b in range(9)]  # 3 epochs of 3, 3 and 1 rows
    assert [len(b) for b in batches] == [3, 3, 1] * 3
    epochs = [[row for b in batches[3 * e : 3 * e + 3] for row in b] for e in range(3)]
    assert all(sorted(rows) == list(range(n)) for rows in epochs)
    assert len({tuple(rows) for rows in epochs}) == 3  # reshuffled every epoch
    # The permutation is the order of the BLAKE2b keys of (seed, client, epoch, row): by hand.
    keys = [derive_seed("epoch", 5, 2, 1, i) for i in range(n)]
    assert epochs[1] == sorted(range(n), key=keys.__getitem__)
    assert [epoch_rows(5, 2, b, 1, n)[0] for b in range(n)] == epochs[0]  # batch size 1: same walk
    with pytest.raises(ValueError, match="epoch_rows"):
        epoch_rows(5, 2, -1, batch, n)


def test_rounds_taken_counts_earlier_samplings():
    from fedkseed.fed.draws import rounds_taken, sample_clients

    for client in range(6):
        by_hand = sum(client in sample_clients(3, r, 6, 2) for r in range(1, 9))
        assert rounds_taken(3, 9, client, 6, 2) == by_hand
    assert rounds_taken(3, 1, 0, 6, 2) == 0
