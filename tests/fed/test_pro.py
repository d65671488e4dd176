"""FedKSeed-Pro as the paper and the official code define it: one history entry per local step."""

import math

import numpy as np
import pytest

from fedkseed import data as D
from fedkseed.fed import Client, FedSpec, Replica, SeedPool, Server, wire
from fedkseed.fed.seedpool import PRO_HISTORY_CLIP
from fedkseed.models import load_model


def _official_probabilities(histories: list[list[float]]) -> np.ndarray:
    """FederatedScope / FATE-LLM: importance = mean |clip(history, +-1000)| with the initial 0,
    p = softmax(min_max_norm(importance)); written out independently of SeedPool."""
    importance = np.array([np.mean(np.abs(np.clip([0.0, *h], -1000, 1000))) for h in histories])
    norm = (importance - importance.min()) / (importance.max() - importance.min() + 1e-10)
    return np.exp(norm) / np.exp(norm).sum()


def _seed_with_schedule(counts: list[int], steps: int) -> int:
    """A run seed whose round-1 schedule for client 0 uses seed i exactly counts[i] times."""
    for seed in range(10_000):
        spec = FedSpec(num_clients=1, clients_per_round=1, k=len(counts), local_steps=steps, pro=True, seed=seed)
        server = Server(spec, [1])
        server.begin_round()
        schedule = wire.decode_download(server.download(0), spec.k).schedule
        if np.bincount(schedule, minlength=spec.k).tolist() == counts:
            return seed
    raise AssertionError("no seed found")


def test_hand_case_through_the_server():
    # Seed 0 gets g = +3 then -3, seed 1 gets g = 1: the official histories are [0, 3, -3] and
    # [0, 1], importance [2, 0.5], p = softmax([1, 0]) = [0.731, 0.269]. Per-round sums would
    # record |3 - 3| = 0 for seed 0 and reverse the ranking.
    seed = _seed_with_schedule([2, 1], steps=3)
    spec = FedSpec(num_clients=1, clients_per_round=1, k=2, local_steps=3, pro=True, seed=seed)
    server = Server(spec, [1])
    server.begin_round()
    schedule = wire.decode_download(server.download(0), spec.k).schedule
    next_g = {0: iter([3.0, -3.0]), 1: iter([1.0])}
    values = np.array([next(next_g[int(s)]) for s in schedule])
    upload = wire.StepUpload(0, 1, spec.k, 3, 1.0, np.zeros(0, np.int64), values)
    assert server.receive(wire.encode_step_upload(upload, spec.precision))
    server.end_round()
    p = server.probabilities()
    np.testing.assert_allclose(p, _official_probabilities([[3.0, -3.0], [1.0]]), rtol=1e-12)
    np.testing.assert_allclose(p, [math.e / (math.e + 1), 1 / (math.e + 1)], rtol=1e-9)
    assert p.round(3).tolist() == [0.731, 0.269]
    assert server.pool.count.tolist() == [3, 2]  # the initial 0 and one entry per step
    assert server.table.tolist() == [0.0, 1.0]  # the table still sums: 3 - 3 = 0, and 1


def test_each_g_is_clipped_at_1000_not_the_sum():
    pool = SeedPool(0, 2)
    pool.record(np.array([0, 0, 1]), np.array([5000.0, -5000.0, 10.0]))
    assert pool.importance().tolist() == [2 * PRO_HISTORY_CLIP / 3, 10.0 / 2]


class _NaNAt:
    """lm_loss, but NaN for both losses of the given local steps (zo_step calls it twice)."""

    def __init__(self, steps: set[int]) -> None:
        self.steps, self.calls = steps, 0

    def __call__(self, model, batch):
        step = self.calls // 2
        self.calls += 1
        loss = D.lm_loss(model, batch)
        return loss * float("nan") if step in self.steps else loss


@pytest.mark.slow
def test_real_round_records_one_entry_per_step_and_nothing_for_a_skipped_step():
    spec = FedSpec(
        num_clients=2,
        clients_per_round=2,
        k=2,  # 4 steps over 2 seeds: seeds repeat within each client
        local_steps=4,
        lr=1e-3,
        eps=1e-3,
        batch_size=2,
        pro=True,
        precision="fp32",
        seed=3,
        clip="off",  # 4 steps of a random model: honest per-step RMS may differ 10x (the bound: test_fed_robust)
    )
    examples = D.load_examples("faq")
    shards = [examples[:5], examples[5:9]]
    _, tokenizer = load_model("tiny")
    server = Server(spec, [len(s) for s in shards])
    clients = []
    for c, shard in enumerate(shards):
        replica = Replica(load_model("tiny")[0], SeedPool(spec.seed, spec.k), spec.lr32, spec.dist)
        loss = _NaNAt({2}) if c == 1 else D.lm_loss
        clients.append(Client(c, spec, replica, D.encode(tokenizer, shard, 48), loss))

    for round_ in (1, 2):
        before = server.pool.state_dict()
        accumulated = server.accumulated.copy()
        expected_sum = np.zeros(spec.k)
        expected_abs = before["abs_sum"].copy()
        expected_count = before["count"].copy()
        weights = {0: 5 / 9, 1: 4 / 9}
        server.begin_round()
        for client in clients:
            schedule = wire.decode_download(download := server.download(client.client_id), spec.k).schedule
            if isinstance(client.loss, _NaNAt):
                client.loss.calls = 0  # NaN at step 2 of every round
            message = client.train(download)
            upload = wire.decode_upload(message, spec.k)
            assert isinstance(upload, wire.StepUpload) and upload.values.size == spec.local_steps
            assert len(set(schedule.tolist())) < spec.local_steps  # repeats within the client
            skipped = [2] if client.client_id == 1 else []
            assert upload.skipped.tolist() == skipped and all(upload.values[skipped] == 0)
            for t, (s, g) in enumerate(zip(schedule.tolist(), upload.values.tolist())):
                if t not in skipped:
                    expected_abs[s] += abs(max(-1000.0, min(1000.0, g)))
                    expected_count[s] += 1
                    expected_sum[s] += weights[client.client_id] * g
            assert server.receive(message)
        summary = server.end_round()
        assert summary.clipped == {}  # clip="off": values enter as sent
        # one entry per step that was not skipped: 4 + 3 per round on top of the initial 0s
        assert server.pool.count.sum() - spec.k == 7 * round_
        np.testing.assert_array_equal(server.pool.count, expected_count)
        np.testing.assert_allclose(server.pool.abs_sum, expected_abs, rtol=1e-12, atol=0)
        np.testing.assert_allclose(server.accumulated - accumulated, expected_sum, rtol=1e-9, atol=1e-12)


def test_pro_run_refuses_per_seed_uploads_and_uniform_run_refuses_per_step_ones():
    for pro in (True, False):
        spec = FedSpec(num_clients=2, clients_per_round=1, k=8, local_steps=4, pro=pro, seed=1)
        server = Server(spec, [1, 1])
        (c,) = server.begin_round()
        if pro:
            message = wire.encode_upload(wire.Upload(c, 1, 8, 4, 1.0, np.zeros(0, np.int64), np.zeros(0)))
        else:
            message = wire.encode_step_upload(wire.StepUpload(c, 1, 8, 4, 1.0, np.zeros(0, np.int64), np.ones(4)))
        assert not server.receive(message)
        assert "uploads, this one is not" in server.end_round().rejected[c]


@pytest.mark.parametrize("steps", [0, 1, 200])
def test_step_upload_round_trip(steps):
    rng = np.random.default_rng(steps)
    values = rng.normal(0, 30, steps)
    skipped = np.array([t for t in range(steps) if t % 7 == 3], dtype=np.int64)
    values[skipped] = 0
    for precision in ("fp16", "fp32"):
        message = wire.encode_step_upload(wire.StepUpload(4, 9, 4096, steps, 2.5, skipped, values), precision)
        u = wire.decode_upload(message, 4096)
        assert isinstance(u, wire.StepUpload)
        assert (u.client_id, u.round, u.k, u.steps, u.loss) == (4, 9, 4096, steps, 2.5)
        assert np.array_equal(u.skipped, skipped)
        exponent = wire.fp16_exponent(float(np.abs(values).max())) if steps and precision == "fp16" else 0
        assert np.array_equal(u.values, wire.quantize(values, precision, exponent))
        if precision == "fp16":
            assert len(message) <= 2 * steps + (steps + 7) // 8 + 24  # 2 bytes a step, 1 bit per skip
