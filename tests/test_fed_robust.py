"""Bounded influence: norm bound, robust per-seed aggregates, a table that stays finite, and the
attack simulation through the real encoder and server path."""

import math

import numpy as np
import pytest
import torch

from fedkseed import data as D
from fedkseed.fed import (
    ATTACKS,
    CLIP_FACTOR,
    Client,
    FedSpec,
    Replica,
    SeedPool,
    Server,
    attack,
    byzantine_clients,
    draw_schedule,
    parse_clip,
    wire,
)
from fedkseed.fed.robust import table_limit, trimmed_mean, weighted_median
from fedkseed.models import load_model


def _round(spec: FedSpec, sizes, values_of, attackers=None, kind="scale"):
    """One round of synthetic uploads through the real encoder and server: ``values_of(c, n)``
    gives client c's n per-seed values; ``attackers`` rewrite theirs with ``attack``."""
    server = Server(spec, sizes)
    uploads = {}
    for c in server.begin_round():
        d = wire.decode_download(server.download(c), spec.k)
        used = np.unique(draw_schedule(spec.seed, d.round, c, spec.local_steps, spec.k))
        upload = wire.Upload(c, d.round, spec.k, spec.local_steps, 1.0, used, values_of(c, used.size))
        if attackers and c in attackers:
            upload = attack(upload, kind, spec.seed)
        message = wire.encode_upload(upload, spec.precision, implied=used)
        uploads[c] = wire.decode_upload(message, spec.k, {c: used})
        assert server.receive(message)
    return server, server.end_round(), uploads


def _honest(c, n):
    return np.random.default_rng(c).normal(0, 1 + c / 4, n)  # norms differ by client, < 3x


def test_auto_bound_scales_only_the_attacker_to_four_times_the_lower_median_rms():
    spec = FedSpec(num_clients=4, clients_per_round=4, k=4096, local_steps=50, precision="fp32", seed=4)
    _, clean, honest = _round(spec, [1, 1, 1, 1], _honest)
    server, summary, uploads = _round(spec, [1, 1, 1, 1], _honest, attackers={2})
    norms = {c: float(np.linalg.norm(uploads[c].values.astype(np.float64))) for c in range(4)}
    assert norms[2] > 1e5 * max(norms[c] for c in (0, 1, 3))
    # per-step RMS = norm / sqrt(50 steps); the lower median of four is the second smallest
    reference = sorted(n / np.sqrt(50) for n in norms.values())[1]
    assert summary.bound == pytest.approx(CLIP_FACTOR * reference, rel=1e-12)
    assert list(summary.clipped) == [2] and clean.clipped == {}
    assert summary.clipped[2] == pytest.approx(summary.bound * np.sqrt(50) / norms[2], rel=1e-12)
    # honest entries are exactly the clean run's; the attacker's are its values scaled to the bound
    expected = np.zeros(spec.k)
    for c in range(4):
        values = uploads[c].values.astype(np.float64)
        if c == 2:
            values = values * summary.clipped[2]
        expected[uploads[c].indices] += 0.25 * values
    np.testing.assert_allclose(server.accumulated, expected, rtol=1e-12, atol=0)
    for c in (0, 1, 3):
        assert np.array_equal(uploads[c].values, honest[c].values)
    # the next round's reference includes this round's bounded values: the attacker stays bounded
    assert server.rms_history.tolist() == pytest.approx(
        [min(n / np.sqrt(50), summary.bound) for n in norms.values()], rel=1e-12
    )


def test_clip_modes():
    spec = dict(num_clients=2, clients_per_round=2, k=512, local_steps=20, precision="fp32", seed=1)
    big = lambda c, n: np.full(n, 100.0 if c else 1.0)  # noqa: E731
    _, fixed, uploads = _round(FedSpec(**spec, clip=0.5), [1, 1], big)
    rms0 = np.sqrt(uploads[0].values.size / 20)
    assert rms0 > 0.5 and fixed.bound == 0.5 and set(fixed.clipped) == {0, 1}
    _, off, _ = _round(FedSpec(**spec, clip="off"), [1, 1], big)
    assert off.bound == math.inf and off.clipped == {}
    _, auto, _ = _round(FedSpec(**spec), [1, 1], big)  # two clients: the smaller one is the reference
    assert auto.bound == pytest.approx(CLIP_FACTOR * rms0, rel=1e-12)
    assert list(auto.clipped) == [1]
    assert [parse_clip(x) for x in ("auto", "off", "2.5", 3)] == ["auto", "off", 2.5, 3.0]
    for bad in ("0", "-1", "nan", "inf", "maybe", None, True):
        with pytest.raises(ValueError, match="clip must be auto, off or a number > 0"):
            FedSpec(**spec, clip=bad)


def test_huge_uploads_on_one_seed_never_make_the_table_infinite():
    # Two clients both send float32's largest values on the same seed, with no bound at all.
    for precision in ("fp16", "fp32"):
        spec = FedSpec(num_clients=2, clients_per_round=2, k=1, local_steps=3, clip="off", precision=precision)
        server, _, _ = _round(spec, [1, 1], lambda c, n: np.full(n, 3.4e38))
        assert server.table[0] == table_limit(spec.lr32) == 2.0**64  # clamped, not inf
        server.begin_round()
        for c in (0, 1):
            assert wire.decode_download(server.download(c), spec.k).values[0] == server.table[0]
        server.end_round()
        delta = wire.decode_table(server.delta("00" * 32))
        assert delta.values[0] == server.table[0]
        replica = Replica(torch.nn.Linear(4, 3), SeedPool(spec.seed, spec.k), spec.lr32, spec.dist)
        weights = replica.build(server.table)
        assert all(torch.isfinite(t).all() for t in weights.tensors)


def _shared_round(how: str, values_by_client: dict[int, float], sizes):
    """K = 1: every client's only seed is seed 0, so the per-seed rule sees all of them."""
    spec = FedSpec(
        num_clients=len(sizes), clients_per_round=len(sizes), k=1, local_steps=1, aggregate=how, precision="fp32"
    )
    server, summary, _ = _round(spec, sizes, lambda c, n: np.full(n, values_by_client[c]))
    return float(server.accumulated[0]), summary


@pytest.mark.parametrize("how", ["median", "trimmed-mean", "mean"])
def test_per_seed_aggregates_against_an_independent_computation(how):
    values = {0: 1.0, 1: 2.0, 2: 3.0, 3: -1e6, 4: 2.5}  # client 3 attacks
    sizes = [1, 1, 1, 1, 1]
    got, summary = _shared_round(how, values, sizes)
    bounded = {c: v * summary.clipped.get(c, 1.0) for c, v in values.items()}
    ordered = sorted(bounded.values())
    if how == "median":
        expected = ordered[2]  # equal weights: the middle value
    elif how == "trimmed-mean":
        expected = float(np.mean(ordered[1:4]))  # floor(5 / 4) = 1 dropped at each end
    else:
        expected = float(np.mean(ordered))
    assert got == pytest.approx(expected, rel=1e-12)
    if how != "mean":
        assert 1.0 <= got <= 3.0  # the attacker moved nothing


def test_weighted_median_and_trimmed_mean():
    v = np.array([-5.0, 1.0, 2.0, 10.0])
    assert weighted_median(v, np.array([0.1, 0.2, 0.3, 0.4])) == 2.0  # cumulative .1 .3 .6 1.0
    assert weighted_median(v, np.array([0.25, 0.25, 0.25, 0.25])) == 1.5  # exactly half between 1 and 2
    assert weighted_median(v, np.array([0.7, 0.1, 0.1, 0.1])) == -5.0
    assert trimmed_mean(v, np.array([1.0, 1.0, 3.0, 1.0])) == pytest.approx((1 + 6) / 4)


@pytest.mark.parametrize("weighting, expected", [("examples", [3 / 8, 5 / 8]), ("batches", [2 / 5, 3 / 5])])
def test_weighting_counts_examples_or_batches(weighting, expected):
    spec = FedSpec(num_clients=2, clients_per_round=2, k=64, local_steps=2, batch_size=2, weighting=weighting)
    _, summary, _ = _round(spec, [3, 5], _honest)  # 3 and 5 examples: 2 and 3 batches of 2
    assert summary.weights == pytest.approx(dict(enumerate(expected)), rel=1e-15)
    at_one = FedSpec(num_clients=2, clients_per_round=2, k=64, local_steps=2, batch_size=1, weighting=weighting)
    assert _round(at_one, [3, 5], _honest)[1].weights == pytest.approx({0: 3 / 8, 1: 5 / 8}, rel=1e-15)


def test_attacks_are_deterministic_and_do_what_they_say():
    honest = wire.Upload(3, 7, 64, 4, 1.0, np.array([1, 5, 9]), np.array([0.5, -2.0, 0.25]))
    assert attack(honest, "scale", 0).values.tolist() == [5e5, -2e6, 2.5e5]
    assert attack(honest, "sign-flip", 0).values.tolist() == [-0.5, 2.0, -0.25]
    noise = attack(honest, "random", 0).values
    assert np.array_equal(noise, attack(honest, "random", 0).values)  # (seed, round, client) decide
    assert not np.array_equal(noise, attack(honest, "random", 1).values)
    assert 1e4 < np.abs(noise).max() <= 2e6 and np.array_equal(attack(honest, "scale", 0).indices, honest.indices)
    steps = wire.StepUpload(3, 7, 64, 3, 1.0, np.array([1]), np.array([1.0, 0.0, -1.0]))
    for kind in ATTACKS:
        assert attack(steps, kind, 0).values[1] == 0  # a skipped step still carries 0
    with pytest.raises(ValueError, match="attack must be one of"):
        attack(honest, "nice", 0)
    picked = byzantine_clients(5, 2, [1, 4, 6, 9], 2)
    assert len(picked) == 2 and set(picked) <= {1, 4, 6, 9} and picked == byzantine_clients(5, 2, [9, 6, 4, 1], 2)
    assert byzantine_clients(5, 2, [1, 4], 9) == [1, 4] and byzantine_clients(5, 2, [1, 4], 0) == []


def test_real_clients_attack_through_the_encoder_and_the_server_bounds_them():
    """One real round on the tiny model: four clients, one of them attacking through
    ``Client.train(attack=...)``. Honest uploads do not depend on the attacker (same global
    model, same batches), so each attacked round reuses them."""
    spec = FedSpec(num_clients=4, clients_per_round=4, k=16, local_steps=4, lr=3e-3, eps=1e-3, seed=6)
    examples = D.load_examples("faq")
    _, tokenizer = load_model("tiny")
    replica = Replica(load_model("tiny")[0], SeedPool(spec.seed, spec.k), spec.lr32, spec.dist)
    shards = [D.encode(tokenizer, examples[3 * c : 3 * c + 3], 96) for c in range(4)]
    clients = [Client(c, spec, replica, shard, D.lm_loss) for c, shard in enumerate(shards)]

    def round_(spec, messages):
        server = Server(spec, [3] * 4)
        server.begin_round()
        for c in range(4):
            server.download(c)
            assert server.receive(messages[c])
        return server, server.end_round()

    downloads = {}
    for c in range(4):
        server = Server(spec, [3] * 4)
        server.begin_round()
        downloads[c] = server.download(c)
    honest = {c: clients[c].train(downloads[c]) for c in range(4)}
    (bad,) = byzantine_clients(spec.seed, 1, [0, 1, 2, 3], 1)
    clean, clean_summary = round_(spec, honest)
    assert clean_summary.clipped == {}  # honest clients are not bounded
    for kind in ("scale", "random"):
        clients[bad].synced = 0
        attacked_bytes = clients[bad].train(downloads[bad], attack=kind)
        expected = attack(wire.decode_upload(honest[bad], spec.k, {bad: _schedule(spec, bad)}), kind, spec.seed)
        got = wire.decode_upload(attacked_bytes, spec.k, {bad: _schedule(spec, bad)}).values
        np.testing.assert_allclose(got, expected.values, rtol=2**-9)  # the same attack, up to fp16 rounding
        for clip, bounded in (("auto", True), ("off", False)):
            server, summary = round_(FedSpec(**{**spec.to_dict(), "clip": clip}), {**honest, bad: attacked_bytes})
            moved = np.linalg.norm(server.accumulated - clean.accumulated)
            honest_norm = np.linalg.norm(clean.accumulated)
            if bounded:
                assert list(summary.clipped) == [bad]
                # what the attacker can add: its weight times the bound on its norm
                assert moved <= 0.25 * 2 * summary.bound * np.sqrt(spec.local_steps)
                assert moved <= 3 * honest_norm
            else:
                assert moved > 1e4 * honest_norm and np.isfinite(server.table).all()


def _schedule(spec, c):
    return draw_schedule(spec.seed, 1, c, spec.local_steps, spec.k)


def test_pro_attacker_is_bounded_before_its_steps_enter_the_histories():
    spec = FedSpec(num_clients=4, clients_per_round=4, k=64, local_steps=30, pro=True, precision="fp32", seed=2)
    server = Server(spec, [1, 1, 1, 1])
    rng = np.random.default_rng(0)
    sent, schedules = {}, {}
    for c in server.begin_round():
        schedules[c] = wire.decode_download(server.download(c), spec.k).schedule
        upload = wire.StepUpload(
            c, 1, spec.k, 30, 1.0, np.array([4]), np.r_[rng.normal(0, 1, 4), 0, rng.normal(0, 1, 25)]
        )
        if c == 3:
            upload = attack(upload, "scale", spec.seed)
        message = wire.encode_step_upload(upload, spec.precision)
        sent[c] = wire.decode_upload(message, spec.k).values.astype(np.float64)
        assert server.receive(message)
    summary = server.end_round()
    assert list(summary.clipped) == [3]
    expected_abs, expected_count = np.zeros(spec.k), np.ones(spec.k, dtype=np.int64)
    for c in range(4):
        values = sent[c] * summary.clipped.get(c, 1.0)
        for t, s in enumerate(schedules[c].tolist()):
            if t != 4:  # the skipped step records nothing
                expected_abs[s] += min(abs(values[t]), 1000.0)
                expected_count[s] += 1
    np.testing.assert_allclose(server.pool.abs_sum, expected_abs, rtol=1e-12)
    assert np.array_equal(server.pool.count, expected_count)
    # the bounded attacker counts for at most four times the median honest client
    assert np.linalg.norm(sent[3] * summary.clipped[3]) == pytest.approx(summary.bound * np.sqrt(29), rel=1e-12)


def test_the_auto_bound_survives_a_resume():
    spec = FedSpec(num_clients=3, clients_per_round=3, k=256, local_steps=10, precision="fp32", seed=8)
    first, _, _ = _round(spec, [1, 1, 1], _honest)
    resumed = Server(spec, [1, 1, 1])
    resumed.load_state_dict(first.state_dict())
    assert np.array_equal(resumed.rms_history, first.rms_history) and resumed.rms_history.size == 3
    outcomes = []
    for server in (first, resumed):
        for c in server.begin_round():
            d = wire.decode_download(server.download(c), spec.k)
            used = np.unique(draw_schedule(spec.seed, d.round, c, spec.local_steps, spec.k))
            values = np.full(used.size, 50.0) if c == 0 else _honest(c, used.size)
            assert server.receive(wire.encode_upload(wire.Upload(c, d.round, spec.k, 10, 1.0, used, values), "fp32"))
        outcomes.append(server.end_round())
    history = first.rms_history[:3].tolist()  # round 1's, saved and restored
    expected = CLIP_FACTOR * sorted(history + list(outcomes[0].rms.values()))[2]  # lower median of 6
    assert outcomes[0].bound == outcomes[1].bound == pytest.approx(expected, rel=1e-12)
    assert outcomes[0].clipped == outcomes[1].clipped and list(outcomes[0].clipped) == [0]
    assert np.array_equal(first.table, resumed.table)
