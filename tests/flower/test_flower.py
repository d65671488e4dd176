"""The Flower engine: bit-identical to the local engine on the simulation runtime (Ray, quiet
under --quiet) and on real SuperLink / SuperNode processes with TLS and SuperNode
authentication; client ids bound to node keys (an unregistered node, an unlisted node and a node
uploading for another client are refused); consistent under faults (a node that dies mid-round,
a node that joins late and catches up, a malformed upload).

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
import subprocess
import sys
import time
import tomllib

import pytest
from federation import (
    APP_DIR,
    REPO,
    TINY,
    assert_same_weights,
    local_from_received,
    saved_weights,
    weights,
    write_node_key,
)

from fedkseed.errors import UsageError
from fedkseed.experiment.config import SimConfig
from fedkseed.experiment.local import run_local
from fedkseed.experiment.prepare import prepare


def test_import_fedkseed_does_not_import_flower():
    code = "import sys, fedkseed, fedkseed.experiment, fedkseed.cli; assert 'flwr' not in sys.modules, 'flwr imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


TIMINGS = {"seconds", "client_seconds", "client_cpu_seconds", "client_peak_mib"}  # measured, not computed


def without_seconds(rounds: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rounds]


# ------------------------------------------------------------------------ run configuration
def test_app_config_lists_every_setting_with_simconfig_defaults(flwr):
    """The deployable app's run config holds every SimConfig setting with its default ("" for
    the protocol-dependent ones: the protocol fills them) plus the engine's own: Flower accepts
    only listed keys in --run-config."""
    from fedkseed.flower import protocol as P
    from fedkseed.version import __version__

    table = tomllib.loads((APP_DIR / "pyproject.toml").read_text())
    app = table["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "fedkseed.flower.server_app:app",
        "clientapp": "fedkseed.flower.client_app:app",
    }
    assert table["project"]["version"] == __version__  # the FAB's version is the package's
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["flower"]
    assert [d.replace("[simulation]", "") for d in extra] == table["project"]["dependencies"]  # the same pin
    run_config = app["config"]
    defaults = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(SimConfig)}
    assert set(run_config) == (set(defaults) - {"engine"}) | set(P.ENGINE_OPTIONS)
    for key, value in run_config.items():
        if key not in P.ENGINE_OPTIONS and key != "output":
            assert value == ("" if defaults[key] is None else defaults[key]), key
    config, options = P.config_from_run_config(run_config)
    assert config.engine == "flower" and config.k == SimConfig().k and options[P.MIN_NODES] == run_config["min-nodes"]
    assert options[P.NODE_KEYS] == ""
    config, _ = P.config_from_run_config({"lr": 1, "rounds": 7, "protocol": "paper"})  # a TOML integer for a float
    assert config.lr == 1.0 and isinstance(config.lr, float) and config.rounds == 7
    assert config.k == SimConfig(protocol="paper").k  # unset protocol-dependent settings follow the protocol
    with pytest.raises(UsageError, match="unknown key 'round'"):
        P.config_from_run_config({"round": 3})
    with pytest.raises(UsageError, match="unknown key 'engine'"):
        P.config_from_run_config({"engine": "local"})
    with pytest.raises(UsageError, match="min-nodes"):
        P.config_from_run_config({"min-nodes": 0})
    with pytest.raises(UsageError, match="--byzantine is simulated by the local engine"):
        P.config_from_run_config({"byzantine": 1})


def run_in_group(argv: list, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run ``argv`` in its own process group, captured; the group is killed however it ends
    (Ray's workers and raylet included)."""
    process = subprocess.Popen(
        [str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, **kwargs
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout.decode(), stderr.decode())


SIMULATION = dict(TINY, clients=4, clients_per_round=2, rounds=2, seed=3)


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    """The local engine's run of SIMULATION, the reference of both CLI runs."""
    output = tmp_path_factory.mktemp("local") / "out"
    return run_local(SimConfig(engine="local", output=str(output), **SIMULATION), progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("quiet", [True, False], ids=["quiet", "verbose"])
def test_simulation_engine_output_and_bits_match_local(flwr, tmp_path, local_reference, quiet):
    """`fedkseed simulate --engine flower` (the CLI, in a fresh process), with and without
    --quiet, and `--engine local` with the same options: same sampling, same model bits, same
    metrics.json fields and values (but wall times).

    Output: plain text (no escape sequence: Ray's actor prefixes and Flower's levels would be
    coloured), no "Manually terminating ClientAppActor" from each actor at the end, and the data
    warning printed once (by the driver, not again by each actor). --quiet prints the result
    table and fedkseed's own warnings only: no Flower banner, no Ray line, no progress bar.

    A round's seconds mean what they mean on the local engine (sampling to evaluated model, no
    one-off preparation), checked against clocks the server does not read: they hold at least
    one client's training as its ClientApp timed it, round 1's leave out the ClientApps' model
    and data preparation as they timed it, and the rounds and that preparation fit in the run's
    wall time as this test timed it."""
    argv = [sys.executable, "-m", "fedkseed", "simulate", "--engine", "flower", *(["--quiet"] if quiet else [])]
    argv += ["--output", tmp_path / "flower"]
    for key, value in SIMULATION.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    started = time.perf_counter()
    run = run_in_group(argv, timeout=600, cwd=tmp_path)
    wall = time.perf_counter() - started
    print(f"flower simulation ({'quiet' if quiet else 'verbose'}): {wall:.1f} s")
    assert run.returncode == 0, run.stderr[-3000:]

    printed = run.stdout + run.stderr
    assert "\x1b" not in printed, printed[-3000:]
    assert "Manually terminating" not in printed
    assert printed.count("prompts truncated from the left") == 1, printed[-3000:]  # --max-length 48's warning
    assert "DEPRECATED" not in printed and "FutureWarning" not in printed
    assert "eval loss" in run.stdout
    if quiet:
        assert not re.search(r"\bray\b", printed, re.I), printed[-3000:]  # Ray's lines, actors' "(pid=...)" prefixes
        assert not re.search(r"\d+%\|", printed) and "\r" not in printed  # tqdm bars, in any process
        for line in run.stderr.splitlines():  # what remains: fedkseed's own warnings
            assert re.match(r"WARNING fedkseed[.\w]*: ", line), line
    else:
        assert re.search(r"fedkseed: +\d+%\|", run.stderr)  # the driver's progress bar

    local = local_reference
    metrics = json.loads((tmp_path / "flower" / "metrics.json").read_text())
    assert without_seconds(metrics["rounds"]) == without_seconds(json.loads(json.dumps(local.rounds)))
    assert metrics["final"] == json.loads(json.dumps(local.final))
    assert {k for k, v in metrics["config"].items()} == {f.name for f in dataclasses.fields(SimConfig)}
    assert [r["clients"] for r in metrics["rounds"]] == [r["clients"] for r in local.rounds]

    assert_same_weights(saved_weights(tmp_path / "flower"), weights(local.model))
    transport = json.loads((tmp_path / "flower" / "flower.json").read_text())
    assert sorted(transport[0]["enrolled"]) == [0, 1, 2, 3]  # simulation: ids are partition ids
    for record in transport:  # every client trained from the server's global model
        assert set(record["client_digests"].values()) == {record["global_digest"]}
        assert not record["rejected"] and not record["failed"] and not record["refused"]

    seconds = [r["seconds"] for r in metrics["rounds"]]
    preparation = max(transport[0]["prepare_seconds"].values())  # the ClientApps prepare in round 1
    for r, record in enumerate(transport):
        assert (
            set(record["usage"]) == set(record["prepare_seconds"]) == {str(c) for c in metrics["rounds"][r]["clients"]}
        )
        assert seconds[r] >= min(usage["seconds"] for usage in record["usage"].values())
    assert seconds[0] < preparation, (seconds, transport[0]["prepare_seconds"])
    assert sum(seconds) + preparation < wall


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedit", "fedavg", "shared-seeds", "ferret"])
def test_first_order_methods_on_flower_are_bit_identical_to_local(flwr, tmp_path, method):
    """--method fedit / fedavg over Flower's simulation runtime (tensors in an ArrayRecord): the
    same model bits, the same per-round records (bytes included: both engines count the array
    message) as the local engine, and each round's client cost measured in the ClientApps.
    "shared-seeds": FedKSeed with --shared-seeds, whose uploads the strategy must read against
    the Server's shared schedule, not each client's own. "ferret": FedKSeed's wire messages
    carrying the projections of first-order updates. The run leaves this process's environment
    as it found it (Flower's Ray backend exports a PYTHONPATH of this process's sys.path, which
    made the docs-from-the-wheel test in test_flower_deploy.py install nothing when it ran
    after this one)."""
    from fedkseed.flower.engine import run_flower

    chosen = dict(method="fedkseed", shared_seeds=True) if method == "shared-seeds" else dict(method=method)
    options = dict(TINY, **chosen, clients=3, clients_per_round=2, rounds=2, local_steps=2, seed=1)
    options["rouge_examples"] = "0"
    local = run_local(SimConfig(engine="local", output=str(tmp_path / "local"), **options), progress=False)
    environment = dict(os.environ)
    flower = run_flower(SimConfig(engine="flower", output=str(tmp_path / "flower"), **options), progress=False)
    assert dict(os.environ) == environment
    assert_same_weights(weights(flower.model), weights(local.model))
    assert without_seconds(flower.rounds) == without_seconds(local.rounds)
    assert flower.final == local.final and flower.delta == local.delta
    assert (local.delta is None) == (method in ("fedit", "fedavg"))
    for record in flower.rounds:
        assert record["bytes_up_per_client"] > 0 and len(record["clients"]) == 2 and not record["rejected"]
        assert record["client_seconds"] > 0 and record["client_cpu_seconds"] > 0 and record["client_peak_mib"] > 0


def test_first_order_payloads_are_an_array_record_and_frame_back_exactly(flwr):
    """What the Flower engine sends for a first-order method: one Array per trained tensor
    (the global tensors' values), the header in the ConfigRecord and no bytes beside; the
    receiver frames them back into the very message the sender encoded."""
    import numpy as np

    from fedkseed.flower import protocol as P
    from fedkseed.flower.payloads import ArrayPayloads

    setup = prepare(SimConfig(method="fedit", clients=3, clients_per_round=2, **TINY))
    server, payloads = setup.server, ArrayPayloads()
    (client, _) = server.begin_round()
    download = server.download(client)
    content = payloads.download_content(download)
    record = content[P.ARRAYS]
    assert list(record) == list(setup.trainable) and all("lora" in name for name in record)
    for name, array in record.items():
        assert np.array_equal(array.numpy(), server.weights[name]) and tuple(array.shape) == server.weights[name].shape
    assert not any(isinstance(v, bytes) for v in content[P.CONFIG].values())
    assert payloads.download_bytes(content) == download
    upload = setup.clients[client].train(download)
    reply = payloads.upload_content(upload, {P.MODEL_DIGEST: "d"})
    assert payloads.upload_bytes(reply) == upload and payloads.sender(upload, 0, {}) == client
    assert record.count_bytes() < len(download) < record.count_bytes() + 100  # the arrays are the message


def run_config(config: SimConfig, **engine_options) -> dict:
    """The run config of ``config``; an unset optional setting (None, e.g. --dp-epsilon) is "",
    as in the app's pyproject.toml (a run config holds no null)."""
    keys = {f.name for f in dataclasses.fields(SimConfig)} - {"engine", "resume"}
    values = {k.replace("_", "-"): getattr(config, k) for k in sorted(keys)}
    return {k: "" if v is None else v for k, v in values.items()} | engine_options


# ----------------------------------------------------------- identity: node keys -> client ids
def test_node_keys_bind_public_keys_to_client_ids(flwr, tmp_path):
    """The key list reads OpenSSH and PEM keys alike and maps the PEM key Flower's NodeInfo
    carries to its client; anything else gets no client; a bad list is refused, naming why."""
    from cryptography.hazmat.primitives import serialization

    from fedkseed.flower import protocol as P
    from fedkseed.flower.identity import NodeKeys

    pubs = [write_node_key(tmp_path, f"node{i}")[1].read_text() for i in range(4)]
    keys = [serialization.load_ssh_public_key(text.encode()) for text in pubs]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    pems = [k.public_bytes(serialization.Encoding.PEM, spki) for k in keys]

    def load(entries, clients=3):
        path = tmp_path / "keys.json"
        path.write_text(entries if isinstance(entries, str) else json.dumps(entries))
        return NodeKeys.load(path, clients)

    table = load({pubs[0]: 2, pems[1].decode(): 0})
    assert table.client_of(pems[0]) == 2 and table.client_of(pems[1]) == 0  # what NodeInfo.public_key holds
    assert table.client_of(pems[2]) is None  # a valid key that is not listed
    assert table.client_of(os.urandom(97)) is None  # simulation's NodeInfo: random bytes, no key

    problems = {
        "not json": "cannot read a JSON object",
        "[]": "non-empty JSON object",
        json.dumps({"ssh-rsa AAAA": 0}): "entry 1 is not an OpenSSH or PEM public key",
        json.dumps({pubs[0]: 3}): "entry 1 maps to 3, not a client id in [0, 3)",
        json.dumps({pubs[0]: True}): "maps to True",
        json.dumps({pubs[0]: 0, pems[0].decode(): 1}): "entry 2 repeats the key of client 0",
        json.dumps({pubs[0]: 1, pubs[1]: 1}): "entry 2 gives client 1 a second key",
    }
    for text, message in problems.items():
        with pytest.raises(UsageError, match=re.escape(message)):
            load(text)
    with pytest.raises(UsageError, match="node-keys must be an absolute path"):
        P.config_from_run_config({"node-keys": "keys.json"})


@pytest.mark.slow
def test_a_node_acts_only_for_the_client_it_is_bound_to(flwr):
    """The strategy's checks on real uploads: a client's own upload passes; the same bytes
    from another client's node, a well-formed upload for another client, and corrupted bytes
    are refused with the reason. At enrolment, with a key list, a node declaring an id other
    than its key's is refused; without one, the declared id is taken if it is a client's."""
    from fedkseed.fed import wire
    from fedkseed.flower.identity import NodeKeys
    from fedkseed.flower.strategy import FedKSeedStrategy

    setup = prepare(SimConfig(clients=3, clients_per_round=3, rounds=1, seed=5, **TINY))
    strategy = FedKSeedStrategy(setup.server, "{}", "", lambda *args: "", timeout=1.0)
    keyed = FedKSeedStrategy(setup.server, "{}", "", lambda *args: "", timeout=1.0, keys=NodeKeys({}))
    assert keyed._enrolment_problem(1, 2) == "it claims client 1, its public key is bound to client 2"
    assert keyed._enrolment_problem(2, 2) is None
    assert strategy._enrolment_problem(1, None) is None
    assert strategy._enrolment_problem(3, None) == "client id 3 is outside [0, 3)"

    assert strategy._begin_round() == [0, 1, 2]
    spec = setup.server.spec
    uploads = {c: setup.clients[c].train(setup.server.download(c)) for c in (0, 2)}
    assert strategy._sender_problem(uploads[0], 0) is None
    assert strategy._sender_problem(uploads[2], 2) is None
    assert strategy._sender_problem(uploads[2], 0) == "the node of client 0 sent an upload for client 2"
    forged = wire.decode_upload(uploads[2], spec.k, strategy._schedules)
    relisted = wire.encode_upload(dataclasses.replace(forged, values=-forged.values), spec.precision)
    assert strategy._sender_problem(relisted, 0) == "the node of client 0 sent an upload for client 2"
    broken = bytearray(uploads[0])
    broken[len(broken) // 2] ^= 0xFF
    assert "CRC" in strategy._sender_problem(bytes(broken), 0)


# ----------------------------------------------------------------------------------- faults
FAULTY_CLIENT = '''\
"""fedkseed's ClientApp, plus node-config faults for round R: corrupt-round=R flips a byte of the
upload; impersonate-round=R impersonate=C sends instead what client C would upload, its values
negated (a well-formed upload for C in every respect, but sent by this node)."""
import dataclasses

from flwr.clientapp import ClientApp

from fedkseed.fed import draw_schedule, wire
from fedkseed.flower import client_app as real

app = ClientApp()
app.query()(real.enroll)


def forged_upload(msg, context, victim, round_):
    setup = real._setup(str(context.state["fedkseed"]["sim-config"]))
    spec = setup.server.spec
    upload = setup.clients[victim].train(msg.content["config"]["download"])
    schedule = draw_schedule(spec.seed, round_, victim, spec.local_steps, spec.k)
    honest = wire.decode_upload(upload, spec.k, {victim: schedule})
    return wire.encode_upload(dataclasses.replace(honest, values=-honest.values), spec.precision)


@app.train()
def train(msg, context):
    reply = real.train(msg, context)
    round_, record = int(msg.metadata.group_id), reply.content["config"]
    if int(context.node_config.get("corrupt-round", 0)) == round_:
        upload = bytearray(record["upload"])
        upload[len(upload) // 2] ^= 0xFF
        record["upload"] = bytes(upload)
    if int(context.node_config.get("impersonate-round", 0)) == round_:
        record["upload"] = forged_upload(msg, context, int(context.node_config["impersonate"]), round_)
    return reply
'''


def faulty_app(root: pathlib.Path) -> pathlib.Path:
    app = root / "fedkseed-faults"
    app.mkdir()
    text = (APP_DIR / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(text.replace('"fedkseed.flower.client_app:app"', '"faulty_client:app"'))
    (app / "faulty_client.py").write_text(FAULTY_CLIENT)
    return app


@pytest.mark.slow
def test_deployment_tls_authenticated_nodes_bit_identical_to_local(federation, tmp_path):
    """TLS and SuperNode authentication on; client ids bound to node keys by node-keys.
    Refused: a node whose key the SuperLink does not know (it cannot connect), a registered node
    whose key is not in node-keys (it claims client 1; it gets no client id), and in round 1 the
    node of client 0 uploading a well-formed upload for client 2 (rejected and blamed on client
    0; client 2's own upload counts). The model is the local engine's, built from exactly the
    honest updates, bit for bit. (One round: test_faults_... runs three.)"""
    config = SimConfig(
        engine="flower", output=str(tmp_path / "out"), clients=3, clients_per_round=3, rounds=1, seed=1, **TINY
    )
    started = time.perf_counter()
    node_ids = federation.register(["node0", "node1", "node2", "stranger"])
    keys = federation.node_keys({"node0": 0, "node1": 1, "node2": 2})
    federation.add_node("intruder", 2, retries=1)  # its key was never registered
    federation.add_node("stranger", 1)
    federation.add_node("node0", 0, **{"impersonate-round": 1, "impersonate": 2})
    federation.add_node("node1", 1)
    federation.add_node("node2", 2)
    federation.wait_for("stranger", r"SuperNode ID: \d+", timeout=120)  # online before round 1 enrols
    options = {"min-nodes": 3, "round-timeout": 240.0, "node-keys": str(keys)}
    federation.run(faulty_app(tmp_path), run_config(config, **options), timeout=360)
    federation.wait_run()
    print(f"authenticated TLS deployment, 1 round: {time.perf_counter() - started:.1f} s")

    assert federation.processes["intruder"].wait(timeout=60) != 0  # Flower's refusal: exit code 305
    assert re.search(r"Exit Code: 305.*code: 2004\] Failed to activate SuperNode", federation.log("intruder"), re.S)
    assert "SuperNode authentication is disabled" not in federation.log("superlink")

    transport = json.loads((tmp_path / "out" / "flower.json").read_text())
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert transport[0]["nodes"] == {str(c): node_ids[f"node{c}"] for c in range(3)}  # the registered ids
    refused = {node: reason for record in transport for node, reason in record["refused"].items()}
    assert refused == {str(node_ids["stranger"]): "its public key is not in node-keys"}
    assert transport[0]["rejected"] == {"0": "the node of client 0 sent an upload for client 2"}
    assert "rejected upload of client 0" in federation.log("run")
    accepted = [r["clients"] for r in metrics["rounds"]]
    assert accepted == [[1, 2]]  # client 2's own upload counted

    server, digests, model, fingerprint = local_from_received(dataclasses.replace(config, engine="local"), accepted)
    for r, record in enumerate(transport):
        assert record["global_digest"] == digests[r]
    assert_same_weights(saved_weights(tmp_path / "out"), model)
    assert (tmp_path / "out" / "delta.fks").read_bytes() == server.delta(fingerprint)


@pytest.mark.slow
def test_faults_dead_node_late_node_malformed_upload(federation, tmp_path):
    """Three clients, all sampled every round. Round 1: node 1 sends a corrupted upload
    (rejected, logged). Round 2: node 1 dies while training. Round 3: node 2 joins for the first
    time and catches up by replay. The server's model must be the local engine's model built
    from exactly the accepted updates, and the late node's catch-up model the server's bits."""
    config = SimConfig(
        engine="flower", output=str(tmp_path / "out"), clients=3, clients_per_round=3, rounds=3, seed=2, **TINY
    )
    started = time.perf_counter()
    federation.register(["node0", "node1", "node2"])
    keys = federation.node_keys({"node0": 0, "node1": 1, "node2": 2})
    federation.add_node("node0", 0)
    federation.add_node("node1", 1, **{"corrupt-round": 1})
    options = {"min-nodes": 2, "round-timeout": 120.0, "node-keys": str(keys)}
    federation.run(faulty_app(tmp_path), run_config(config, **options), timeout=330)
    federation.wait_for("node1", r"ROUND 2\].{0,400}Receiving: train message")
    federation.stop("node1")  # dies mid-round 2, with the download in hand
    federation.add_node("node2", 2)  # joins while round 2 is still running: enrols at round 3
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
