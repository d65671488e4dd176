"""Client-level DP of the seed table (fed/privacy.py): the accountant against dp-accounting used
independently, the noise (seeded: the same bits; different seeds or the CSPRNG: different
tables; its spread and support), clipping against a malicious client, the accountant's state
across a checkpoint, the settings' one-line errors, and a run end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedkseed.cli import main
from fedkseed.errors import UsageError
from fedkseed.experiment.checkpoint import STATE_FILE, _join_arrays, save_state
from fedkseed.experiment.config import SimConfig
from fedkseed.fed import FedSpec, Server, wire
from fedkseed.fed.privacy import Privacy, calibrate, default_clip, default_delta
from fedkseed.fed.wire import MAX_STEPS
from fedkseed.seeds import derive_seed

dp_accounting = pytest.importorskip("dp_accounting")


def _spec(**changes) -> FedSpec:
    settings = dict(num_clients=10, clients_per_round=3, k=256, local_steps=8, precision="fp32", seed=5)
    return FedSpec(**(settings | changes))


def _schedule(spec: FedSpec, r: int, c: int) -> np.ndarray:
    """The public seed schedule, from its documented derivation (docs/seed-derivation.md)."""
    return np.array([derive_seed("schedule", spec.seed, r, c, t) % spec.k for t in range(spec.local_steps)])


def _honest(r: int, c: int, n: int) -> np.ndarray:
    return np.random.default_rng([r, c]).normal(0, 3, n)


def _round(server: Server, clients=None, values_of=_honest):
    """One round of synthetic uploads through the real encoder and server path."""
    spec, r = server.spec, server.round + 1
    for c in server.begin_round(clients):
        server.download(c)
        seeds = np.unique(_schedule(spec, r, c))
        upload = wire.Upload(c, r, spec.k, spec.local_steps, 1.0, seeds, values_of(r, c, seeds.size))
        assert server.receive(wire.encode_upload(upload, spec.precision, implied=seeds))
    return server.end_round()


def _independent_epsilon(sigma: float, q: float, rounds: int, delta: float) -> float:
    accountant = dp_accounting.rdp.RdpAccountant()
    for _ in range(rounds):  # one event per round, not the module's self-composed event
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)))
    return accountant.get_epsilon(delta)


# ------------------------------------------------------------------------------- accountant
@pytest.mark.slow
def test_reported_epsilon_agrees_with_dp_accounting():
    spec = _spec()
    privacy = Privacy(spec, rounds=4, epsilon=3.0, noise_seed=1)
    assert privacy.sampling_rate == 0.3 and privacy.delta == 10**-1.1 == default_delta(10)
    assert privacy.clip == default_clip(8) == 20 * math.sqrt(8)
    server = Server(spec, [5] * 10, privacy)
    epsilons = [_round(server).epsilon for _ in range(4)]
    sigma = privacy.noise_multiplier
    expected = [_independent_epsilon(sigma, 0.3, r, privacy.delta) for r in range(1, 5)]
    assert epsilons == pytest.approx(expected, rel=1e-12)
    assert epsilons == sorted(epsilons) and 3.0 * (1 - 1e-4) < epsilons[-1] <= 3.0  # calibrated, on the safe side
    # the calibration's answer: a slightly smaller sigma would overspend
    assert _independent_epsilon(sigma * (1 - 1e-3), 0.3, 4, privacy.delta) > 3.0
    # PLD, a tighter accountant, never reports more than RDP for the same mechanism
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(dp_accounting.PoissonSampledDpEvent(0.3, dp_accounting.GaussianDpEvent(sigma)), 4)
    assert pld.get_epsilon(privacy.delta) <= epsilons[-1]
    report = privacy.report(4)
    assert report["epsilon"] == epsilons[-1] and report["noise_multiplier"] == sigma and report["rounds"] == 4
    assert report["noise_std_per_entry"] == pytest.approx(sigma * privacy.clip / 3)


def test_calibration_is_quiet(caplog):
    with caplog.at_level("WARNING"):
        calibrate(0.05, 60, 2.0, 1e-5)  # dp-accounting warns "failed to converge" for low orders here
    assert not caplog.records


# ------------------------------------------------------------------------------------ noise
def _released(noise_seed, clients=(0, 1, 2)) -> Server:
    spec = _spec()
    server = Server(spec, [5] * 10, Privacy(spec, rounds=2, epsilon=2.0, noise_seed=noise_seed))
    _round(server, clients)
    return server


@pytest.mark.slow
def test_noise_seed_gives_the_same_bits_and_other_seeds_or_the_csprng_other_tables():
    a, b = _released(7), _released(7)
    assert a.table.tobytes() == b.table.tobytes() and a.accumulated.tobytes() == b.accumulated.tobytes()
    assert a.privacy.sample(3) == b.privacy.sample(3)
    touched = a.privacy.touchable(1)
    for other in (_released(8), _released(None), _released(None)):
        assert np.array_equal(np.flatnonzero(other.table != a.table), touched)  # every noised entry differs


def test_noise_covers_every_seed_a_schedule_could_touch_and_has_the_calibrated_spread():
    spec = _spec(num_clients=40, clients_per_round=4, k=4096, local_steps=50)
    privacy = Privacy(spec, rounds=1, epsilon=1.0, noise_seed=3)
    server = Server(spec, [1] * 40, privacy)
    summary = _round(server, clients=[])  # nobody sampled: the table is the noise alone
    touchable = np.unique(np.concatenate([_schedule(spec, 1, c) for c in range(40)]))
    assert np.array_equal(np.flatnonzero(server.accumulated), touchable)
    std = privacy.noise_multiplier * privacy.clip / 4
    noise = server.accumulated[touchable] / std
    assert touchable.size > 1500 and abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.05
    assert summary.epsilon == pytest.approx(1.0, rel=1e-4)


def test_poisson_sampling_rate():
    spec = _spec(num_clients=50, clients_per_round=10)
    privacy = Privacy(spec, rounds=1, epsilon=1.0, noise_seed=11)
    sizes = [len(privacy.sample(r)) for r in range(1, 201)]
    assert abs(np.mean(sizes) - 10) < 0.7 and len(set(sizes)) > 4  # Binomial(50, 0.2): mean 10, sd 2.8
    csprng = Privacy(spec, rounds=1, epsilon=1.0)
    assert np.mean([len(csprng.sample(1)) for _ in range(200)]) == pytest.approx(10, abs=0.7)


# ----------------------------------------------------------------------------------- clipping
@pytest.mark.slow
def test_clipping_bounds_a_malicious_clients_influence():
    """With the same noise seed the noise is the same with or without client 2, so the table's
    difference is client 2's contribution: at most C / (q N) in L2 whatever it sends."""

    def malicious(r, c, n):
        return _honest(r, c, n) * (1e6 if c == 2 else 1.0)

    without = _released(4, clients=(0, 1))
    spec = without.spec
    with_attacker = Server(spec, [5] * 10, Privacy(spec, rounds=2, epsilon=2.0, noise_seed=4))
    summary = _round(with_attacker, (0, 1, 2), malicious)
    influence = np.linalg.norm(with_attacker.accumulated - without.accumulated)
    limit = with_attacker.privacy.clip / 3  # C / (q N), q N = clients_per_round
    assert influence == pytest.approx(limit, rel=1e-9)  # it was clipped to exactly C
    assert set(summary.clipped) == {2} and summary.weights == {0: 1 / 3, 1: 1 / 3, 2: 1 / 3}


# ------------------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_resume_keeps_the_accountant_state_exactly(tmp_path):
    spec = _spec()

    def server() -> Server:
        return Server(spec, [5] * 10, Privacy(spec, rounds=3, epsilon=4.0, noise_seed=9))

    straight = server()
    expected = [_round(straight).epsilon for _ in range(3)]
    first = server()
    _round(first), _round(first)
    saved = _through_checkpoint(first.state_dict(), tmp_path)
    resumed = server()
    resumed.load_state_dict(saved)
    assert resumed.privacy.epsilon(2) == expected[1]
    assert _round(resumed).epsilon == expected[2]
    assert resumed.table.tobytes() == straight.table.tobytes()

    # the saved sigma is what counts: it is never recalibrated
    doubled = server()
    doubled.load_state_dict(
        saved | {"privacy": saved["privacy"] | {"noise_multiplier": 2 * saved["privacy"]["noise_multiplier"]}}
    )
    sigma = 2 * straight.privacy.noise_multiplier
    assert doubled.privacy.epsilon(2) == pytest.approx(
        _independent_epsilon(sigma, 0.3, 2, default_delta(10)), rel=1e-12
    )

    longer = Server(spec, [5] * 10, Privacy(spec, rounds=4, epsilon=4.0, noise_seed=9))
    with pytest.raises(ValueError, match="--rounds 4 exceeds the 3 rounds"):
        longer.load_state_dict(saved)
    bad = {"noise_multiplier": math.nan, "delta": 0.5, "clip": 1.0}
    for name, value in bad.items():
        with pytest.raises(ValueError, match=f"privacy {name}") as error:
            server().load_state_dict(saved | {"privacy": saved["privacy"] | {name: value}})
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="DP"):
        Server(spec, [5] * 10).load_state_dict(saved)


def _through_checkpoint(state: dict, folder) -> dict:
    """``state`` written as the checkpoint writes it and read back (JSON plus arrays)."""
    save_state(folder, {"server": state})
    with np.load(folder / STATE_FILE, allow_pickle=False) as arrays:
        document = json.loads(arrays["__json__"].tobytes())
        return _join_arrays(document["state"], {k: arrays[k] for k in arrays.files})["server"]


# ---------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(dp_epsilon=0.0), "--dp-epsilon must be a finite number > 0, got 0.0"),
        (dict(dp_epsilon=-1.0), "--dp-epsilon must be a finite number > 0"),
        (dict(dp_epsilon=math.inf), "--dp-epsilon must be a finite number > 0"),
        (dict(dp_epsilon=1.0, dp_delta=0.0), "--dp-delta must be a finite number in (0, 1), got 0.0"),
        (dict(dp_epsilon=1.0, dp_delta=1.0), "--dp-delta must be a finite number in (0, 1)"),
        (dict(dp_epsilon=1.0, dp_clip=-2.0), "--dp-clip must be a finite number > 0"),
        (dict(dp_epsilon=1.0, clip="off"), "--clip off is refused with --dp-epsilon"),
        (dict(dp_epsilon=1.0, clip="3"), "--clip 3.0 is refused with --dp-epsilon"),
        (dict(dp_epsilon=1.0, pro=True), "--pro (FedKSeed-Pro) is refused under DP"),
        (dict(dp_epsilon=1.0, aggregate="median"), "--aggregate median is refused under DP"),
        (dict(dp_epsilon=1.0, method="fedit"), "--dp-epsilon is FedKSeed's (--method fedkseed)"),
        (dict(dp_delta=0.01), "--dp-delta needs --dp-epsilon"),
        (dict(dp_noise_seed=1), "--dp-noise-seed needs --dp-epsilon"),
    ],
)
def test_bad_settings_are_one_line_errors(settings, message):
    with pytest.raises(UsageError) as error:
        SimConfig(model="tiny", **settings)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_settings_resolve_and_survive_a_rebuild():
    config = SimConfig(model="tiny", protocol="paper", dp_epsilon=2.0)  # the paper's clip "off" is not asked for
    assert config.clip == "auto" and config.dp_delta == 200**-1.1 and config.dp_clip == default_clip(200)
    assert SimConfig(**{f: getattr(config, f) for f in config.__dataclass_fields__}) == config


def test_local_steps_beyond_the_wire_limit_are_refused():
    FedSpec(num_clients=1, clients_per_round=1, local_steps=MAX_STEPS)
    with pytest.raises(ValueError, match=f"local_steps must be <= {MAX_STEPS}"):
        FedSpec(num_clients=1, clients_per_round=1, local_steps=MAX_STEPS + 1)


# ------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_simulate_with_dp_end_to_end(tmp_path, capsys):
    args = ["simulate", "--model", "tiny", "--clients", "5", "--clients-per-round", "2", "--rounds", "2"]
    args += ["--local-steps", "2", "--k", "32", "--eval-examples", "4", "--rouge-examples", "0", "--quiet"]
    args += ["--dp-epsilon", "5", "--dp-noise-seed", "3", "--output", str(tmp_path / "run")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    dp = metrics["final"]["dp"]
    assert {"epsilon", "delta", "noise_multiplier", "sampling_rate", "rounds", "clip", "accountant"} <= set(dp)
    assert dp["rounds"] == 2 and dp["sampling_rate"] == 0.4 and dp["delta"] == 5**-1.1 and dp["clip"] == 20 * 2**0.5
    epsilons = [r["epsilon"] for r in metrics["rounds"]]
    assert epsilons == pytest.approx(
        [_independent_epsilon(dp["noise_multiplier"], 0.4, r, dp["delta"]) for r in (1, 2)], rel=1e-12
    )
    assert epsilons[-1] == dp["epsilon"] <= 5.0
    assert "epsilon" in printed.splitlines()[1] and f"{epsilons[-1]:.3f}" in printed
    assert f"client-level DP: epsilon {dp['epsilon']:.3f}" in printed
    # more rounds than the budget was calibrated for: refused on resume, in one line
    assert main([*args, "--resume", "--rounds", "3"]) == 2
    error = capsys.readouterr().err.strip()
    assert "--rounds 3 exceeds the 2 rounds" in error and "\n" not in error


@pytest.mark.slow
def test_flower_engine_releases_the_local_engines_tables_under_dp(tmp_path):
    """DP lives in the Server, so the Flower engine runs it too: with the same noise seed, the
    same Poisson samples (round 2 samples nobody: only noise is released), tables and records."""
    pytest.importorskip("flwr", reason="Flower is an optional extra: pip install 'fedkseed[flower]'")
    from fedkseed.experiment.local import run_local
    from fedkseed.flower.engine import run_flower

    options = dict(model="tiny", clients=4, clients_per_round=2, rounds=3, local_steps=3, k=32, seed=3)
    options |= dict(eval_examples=4, rouge_examples="0", batch_size=2, max_length=48, dp_epsilon=4.0, dp_noise_seed=22)
    local = run_local(SimConfig(engine="local", output=str(tmp_path / "local"), **options), progress=False)
    flower = run_flower(SimConfig(engine="flower", output=str(tmp_path / "flower"), **options), progress=False)
    assert [r["clients"] for r in local.rounds] == [[2, 3], [], [1, 2, 3]]
    assert flower.delta == local.delta and flower.final == local.final
    timings = {"seconds", "client_seconds", "client_cpu_seconds", "client_peak_mib"}
    strip = [[{k: v for k, v in r.items() if k not in timings} for r in run.rounds] for run in (local, flower)]
    assert json.dumps(strip[0]) == json.dumps(strip[1])
    assert local.rounds[1]["epsilon"] > local.rounds[0]["epsilon"] and "dp" in flower.final
