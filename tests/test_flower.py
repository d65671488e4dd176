"""The Flower engine: bit-identical to the local engine on the simulation runtime (Ray) and on
real SuperLink / SuperNode processes, and consistent under faults (a node that dies mid-round, a
node that joins late and catches up, a malformed upload).

Flower is an optional extra: everything but the import check skips without it. Budget: about
3-4 minutes on 2 cores (one Ray simulation, two small deployments, three local references).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from fedkseed.simulate import SimConfig, UsageError, prepare, run_local

REPO = pathlib.Path(__file__).resolve().parents[1]
APP_DIR = REPO / "fedkseed" / "flower" / "app"
BIN = pathlib.Path(sys.executable).parent
TINY = dict(model="tiny", local_steps=3, k=32, eval_examples=4, max_new_tokens=4, batch_size=2, max_length=48)


@pytest.fixture(scope="module")
def flwr():
    return pytest.importorskip("flwr", reason="Flower is an optional extra: pip install 'fedkseed[flower]'")


def test_import_fedkseed_does_not_import_flower():
    code = "import sys, fedkseed, fedkseed.simulate, fedkseed.cli; assert 'flwr' not in sys.modules, 'flwr imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].view(-1).view(dtype=_int_of(a[name])).equal(b[name].view(-1).view(dtype=_int_of(b[name]))), name


def _int_of(t):
    import torch

    return {4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()]


def without_seconds(rounds: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rounds]


# ------------------------------------------------------------------------ run configuration
def test_app_config_lists_every_setting_with_simconfig_defaults(flwr):
    from fedkseed.flower import protocol as P

    table = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    app = table["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedkseed.flower.server_app:app",
                                 "clientapp": "fedkseed.flower.client_app:app"}
    run_config = app["config"]
    defaults = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(SimConfig)}
    assert set(run_config) == (set(defaults) - {"engine"}) | set(P.ENGINE_OPTIONS)
    for key, value in run_config.items():
        if key not in P.ENGINE_OPTIONS and key != "output":
            assert value == defaults[key], key
    config, options = P.config_from_run_config(run_config)
    assert config.engine == "flower" and config.k == SimConfig().k and options[P.MIN_NODES] == run_config["min-nodes"]
    config, _ = P.config_from_run_config({"lr": 1, "rounds": 7})  # a TOML integer for a float
    assert config.lr == 1.0 and isinstance(config.lr, float) and config.rounds == 7
    with pytest.raises(UsageError, match="unknown key 'round'"):
        P.config_from_run_config({"round": 3})
    with pytest.raises(UsageError, match="min-nodes"):
        P.config_from_run_config({"min-nodes": 0})


# ------------------------------------------------------------------ simulation runtime (Ray)
def test_simulation_engine_is_bit_identical_to_local(flwr, tmp_path):
    """`fedkseed simulate --engine flower` and `--engine local` with the same options: same
    sampling, same model bits, same metrics.json fields and values (but wall times)."""
    from fedkseed.cli import main

    options = dict(TINY, clients=4, clients_per_round=2, rounds=2, seed=3)
    local = run_local(SimConfig(engine="local", output=str(tmp_path / "local"), **options), progress=False)
    argv = ["simulate", "--engine", "flower", "--output", str(tmp_path / "flower"), "--quiet"]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    started = time.perf_counter()
    assert main(argv) == 0
    print(f"flower simulation: {time.perf_counter() - started:.1f} s")

    metrics = json.loads((tmp_path / "flower" / "metrics.json").read_text())
    assert without_seconds(metrics["rounds"]) == without_seconds(json.loads(json.dumps(local.rounds)))
    assert metrics["final"] == json.loads(json.dumps(local.final))
    assert {k for k, v in metrics["config"].items()} == {f.name for f in dataclasses.fields(SimConfig)}
    assert [r["clients"] for r in metrics["rounds"]] == [r["clients"] for r in local.rounds]

    assert_same_weights(saved_weights(tmp_path / "flower"), weights(local.model))
    transport = json.loads((tmp_path / "flower" / "flower.json").read_text())
    assert sorted(transport[0]["enrolled"]) == [0, 1, 2, 3]
    for record in transport:  # every client trained from the server's global model
        assert set(record["client_digests"].values()) == {record["global_digest"]}
        assert not record["rejected"] and not record["failed"]


# ----------------------------------------------------------------- deployment: real processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Federation:
    """A SuperLink and SuperNodes on 127.0.0.1 as real processes (each in its own process
    group, so stopping one stops the ClientApp processes it started)."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.home = root / "flwr-home"
        self.home.mkdir(parents=True)
        # The SuperLink and SuperNodes spawn flower-superexec / flwr-clientapp by name: the
        # venv's bin must be on PATH even when the tests run as .venv/bin/python unactivated.
        path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
        self.env = dict(os.environ, FLWR_HOME=str(self.home), PYTHONUNBUFFERED="1", PATH=path)
        self.port = free_port()
        (self.home / "config.toml").write_text(textwrap.dedent(f"""\
            [superlink]
            default = "test"
            [superlink.test]
            address = "127.0.0.1:{self.port}"
            insecure = true
            """))
        self.processes: dict[str, subprocess.Popen] = {}
        self._start("superlink", [BIN / "flower-superlink", "--insecure", "--port", str(self.port),
                                  "--disable-runtime-dependency-installation"])
        self._wait_listening("superlink", self.port, timeout=120)

    def _wait_listening(self, name: str, port: int, timeout: float) -> None:
        """Block until ``name`` accepts connections: a cold start (fresh venv, no bytecode yet)
        can take many seconds, and `flwr run` fails at once on a refused connection."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
                return
            except OSError:
                assert self.processes[name].poll() is None, f"{name} exited:\n{self.log(name)[-2000:]}"
                assert time.monotonic() < deadline, f"{name} not listening on {port} after {timeout:g} s"
                time.sleep(0.2)

    def _start(self, name: str, argv: list) -> None:
        log = open(self.root / f"{name}.log", "wb")
        self.processes[name] = subprocess.Popen([str(a) for a in argv], stdout=log, stderr=subprocess.STDOUT,
                                                env=self.env, cwd=self.root, start_new_session=True)
        log.close()

    def add_node(self, partition_id: int, **node_config) -> str:
        name = f"node{partition_id}"
        pairs = " ".join(f"{k}={v}" for k, v in {"partition-id": partition_id, **node_config}.items())
        self._start(name, [BIN / "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                           "--port", free_port(), "--node-config", pairs])
        return name

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str) -> None:
        process = self.processes.pop(name)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def run(self, app: pathlib.Path, run_config: dict, timeout: float) -> subprocess.Popen:
        """`flwr run APP test --stream --run-config ...` (returns the running process)."""
        pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        self._start("run", [BIN / "flwr", "run", app, "test", "--stream", "--run-config", pairs])
        self.deadline = time.monotonic() + timeout
        return self.processes["run"]

    def wait_run(self) -> None:
        process = self.processes["run"]
        process.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        assert process.returncode == 0, self.log("run")[-3000:]

    def wait_for(self, name: str, pattern: str) -> None:
        while not re.search(pattern, self.log(name), re.S):
            assert time.monotonic() < self.deadline, f"{name}: no {pattern!r} in time:\n{self.log(name)[-2000:]}"
            assert self.processes["run"].poll() is None, self.log("run")[-3000:]
            time.sleep(0.2)

    def close(self) -> None:
        for name in reversed(list(self.processes)):
            self.stop(name)


@pytest.fixture
def federation(flwr, tmp_path):
    fed = Federation(tmp_path)
    try:
        yield fed
    finally:
        fed.close()


def run_config(config: SimConfig, **engine_options) -> dict:
    keys = {f.name for f in dataclasses.fields(SimConfig)} - {"engine", "resume"}
    return {k.replace("_", "-"): getattr(config, k) for k in sorted(keys)} | engine_options


def saved_weights(output: pathlib.Path) -> dict:
    from fedkseed.models import load_model

    return weights(load_model(str(output / "model"))[0])


def test_deployment_two_supernodes_bit_identical_to_local(federation, tmp_path):
    config = SimConfig(engine="flower", output=str(tmp_path / "out"), clients=2, clients_per_round=2, rounds=2,
                       seed=1, **TINY)
    started = time.perf_counter()
    federation.add_node(0)
    federation.add_node(1)
    federation.run(APP_DIR, run_config(config, **{"min-nodes": 2, "round-timeout": 240.0}), timeout=300)
    federation.wait_run()
    print(f"deployment, 2 rounds: {time.perf_counter() - started:.1f} s")

    local = run_local(dataclasses.replace(config, engine="local", output=str(tmp_path / "local")), progress=False)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert without_seconds(metrics["rounds"]) == without_seconds(json.loads(json.dumps(local.rounds)))
    assert metrics["final"] == json.loads(json.dumps(local.final))
    assert_same_weights(saved_weights(tmp_path / "out"), weights(local.model))
    assert (tmp_path / "out" / "delta.fks").read_bytes() == local.delta


# ----------------------------------------------------------------------------------- faults
FAULTY_CLIENT = '''\
"""fedkseed's ClientApp, plus a node-config fault: corrupt-round=R flips a byte of the upload."""
from flwr.clientapp import ClientApp

from fedkseed.flower import client_app as real

app = ClientApp()
app.query()(real.enroll)


@app.train()
def train(msg, context):
    reply = real.train(msg, context)
    if int(context.node_config.get("corrupt-round", 0)) == int(msg.metadata.group_id):
        record = reply.content["config"]
        upload = bytearray(record["upload"])
        upload[len(upload) // 2] ^= 0xFF
        record["upload"] = bytes(upload)
    return reply
'''


def faulty_app(root: pathlib.Path) -> pathlib.Path:
    app = root / "fedkseed-faults"
    app.mkdir()
    text = (APP_DIR / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(text.replace('"fedkseed.flower.client_app:app"', '"faulty_client:app"'))
    (app / "faulty_client.py").write_text(FAULTY_CLIENT)
    return app


def local_from_received(config: SimConfig, accepted: list[list[int]]):
    """The local engine's Server and Clients, fed only the updates the Flower run accepted;
    returns (server, global model digest after each round, final weights)."""
    from fedkseed.flower.protocol import weights_digest

    setup = prepare(config)
    server, replica = setup.server, setup.replica
    digests = [weights_digest(replica.build(server.table))]
    for clients in accepted:
        server.begin_round()
        for c in clients:
            assert server.receive(setup.clients[c].train(server.download(c)))
        assert server.end_round().accepted == clients
        digests.append(weights_digest(replica.build(server.table)))
    return server, digests, weights(setup.model), setup.fingerprint


def test_faults_dead_node_late_node_malformed_upload(federation, tmp_path):
    """Three clients, all sampled every round. Round 1: node 1 sends a corrupted upload
    (rejected, logged). Round 2: node 1 dies while training. Round 3: node 2 joins for the first
    time and catches up by replay. The server's model must be the local engine's model built
    from exactly the accepted updates, and the late node's catch-up model the server's bits."""
    config = SimConfig(engine="flower", output=str(tmp_path / "out"), clients=3, clients_per_round=3, rounds=3,
                       seed=2, **TINY)
    started = time.perf_counter()
    federation.add_node(0)
    federation.add_node(1, **{"corrupt-round": 1})
    federation.run(faulty_app(tmp_path), run_config(config, **{"min-nodes": 2, "round-timeout": 120.0}), timeout=330)
    federation.wait_for("node1", r"ROUND 2\].{0,400}Receiving: train message")
    federation.stop("node1")  # dies mid-round 2, with the download in hand
    federation.add_node(2)  # joins while round 2 is still running: enrols at round 3
    federation.wait_run()
    print(f"deployment with faults, 3 rounds: {time.perf_counter() - started:.1f} s")

    transport = json.loads((tmp_path / "out" / "flower.json").read_text())
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    accepted = [r["clients"] for r in metrics["rounds"]]
    assert accepted == [[0], [0], [0, 2]]
    assert list(transport[0]["rejected"]) == ["1"] and "CRC" in transport[0]["rejected"]["1"]
    assert "rejected upload of client 1" in federation.log("run")
    assert "1" in transport[1]["failed"]  # died mid-round 2 ...
    assert transport[2]["departed"] == [1] or "1" in transport[2]["failed"]  # ... and is gone in round 3
    assert transport[2]["enrolled"] == [2] and "2" not in transport[1]["nodes"]

    server, digests, model, fingerprint = local_from_received(dataclasses.replace(config, engine="local"), accepted)
    for r, record in enumerate(transport):
        assert record["global_digest"] == digests[r]  # the server's global model, round by round
    assert transport[2]["client_digests"]["2"] == digests[2]  # the late node caught up bit for bit
    assert_same_weights(saved_weights(tmp_path / "out"), model)
    assert (tmp_path / "out" / "delta.fks").read_bytes() == server.delta(fingerprint)
