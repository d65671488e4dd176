"""Deployments a user runs: docs/flower.md's commands, as written, from the installed wheel, and
the availability of nodes that are refused, restart or crash (real SuperLink / SuperNode
processes on loopback, TLS and SuperNode authentication).

Flower is an optional extra: these tests skip without it. Budget: about 2 minutes on 2 cores.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time

import pytest
from federation import (
    APP_DIR,
    REPO,
    TINY,
    assert_same_weights,
    local_from_received,
    saved_weights,
    stop_group,
    wait_healthy,
)

from fedkseed.experiment.config import SimConfig

pytestmark = pytest.mark.slow  # SuperLink / SuperNode processes, a wheel install

DOCS = REPO / "docs" / "flower.md"
# The deployment walk-through's blocks, in order; "&" marks the ones that run until stopped.
STEPS = ["settings", "certificate", "node-keys", "key-list", "superlink&", "connection", "register"]
STEPS += ["supernodes&", "run"]
PORTS = {"superlink": 9092, "node0": 9094, "node1": 9095}  # as the docs give them


def settings_run_config(config: SimConfig, **engine_options) -> dict:
    """The run config of the settings this module sets (TINY, the sizes, the output); the app
    config's defaults, SimConfig's, give the rest."""
    keys = [*TINY, "clients", "clients_per_round", "rounds", "seed", "output"]
    return {k.replace("_", "-"): getattr(config, k) for k in keys} | engine_options


# ------------------------------------------------------------- restarts, refusals, crashes
def test_refused_and_restarted_nodes_enrol_afresh(federation, tmp_path):
    """Three clients, two per round (the run's sample: [1, 2], [1, 2], [0, 1]).
    node1 starts declaring partition-id 0 while its key is bound to client 1: refused, and the
    log says why client 1 has no node. Stopped (SIGTERM) and restarted at once with the right id,
    it keeps its node id, is evaluated afresh and trains from the next round. node0, enrolled
    and idle in round 2, restarts then (SIGTERM, started again at once: same node id, state
    gone): round 3 sees the new activation, releases its binding, enrols it afresh and it trains
    from a full catch-up. The model is the local engine's built from exactly the accepted
    updates. Then node0 is killed (SIGKILL) and started again at once: Flower refuses to activate
    it while it still counts as online (exit code 305), and the SuperLink's log says why, as
    docs/flower.md describes."""
    config = SimConfig(
        engine="flower", output=str(tmp_path / "out"), clients=3, clients_per_round=2, rounds=3, seed=0, **TINY
    )
    started = time.perf_counter()
    ids = federation.register(["node0", "node1", "node2"])
    keys = federation.node_keys({"node0": 0, "node1": 1, "node2": 2})
    federation.add_node("node0", 0)
    federation.add_node("node1", 0)  # the wrong id: its key is bound to client 1
    federation.add_node("node2", 2)
    options = {"min-nodes": 3, "round-timeout": 120.0, "node-keys": str(keys)}
    federation.run(APP_DIR, settings_run_config(config, **options), timeout=330)
    reason = "it claims client 0, its public key is bound to client 1"
    federation.wait_for("run", rf"node {ids['node1']} refused: {reason}")
    federation.stop("node1")  # SIGTERM: the SuperNode deactivates itself ...
    federation.add_node("node1", 1)  # ... so it can start again at once
    federation.wait_for("node2", r"ROUND 2\].{0,400}Receiving: train message")  # round 2 has enrolled
    federation.stop("node0")
    federation.add_node("node0", 0)
    federation.wait_run()
    print(f"refused and restarted nodes, 3 rounds: {time.perf_counter() - started:.1f} s")

    transport = json.loads((tmp_path / "out" / "flower.json").read_text())
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert transport[0]["refused"] == {str(ids["node1"]): reason} and transport[0]["absent"] == [1]
    why = f"sampled clients without a node: [1]; node {ids['node1']} has no client id: {reason}"
    assert why in federation.log("run")
    back = next(r for r, record in enumerate(transport) if 1 in record["enrolled"])
    assert back in (1, 2) and transport[back]["nodes"]["1"] == ids["node1"]  # the same node id
    assert not transport[back]["refused"]
    assert transport[2]["departed"] == [0] and 0 in transport[2]["enrolled"]  # released, enrolled afresh
    assert transport[2]["nodes"]["0"] == ids["node0"]
    assert f"round 3: node {ids['node0']} (client 0) restarted" in federation.log("run")
    accepted = [r["clients"] for r in metrics["rounds"]]
    assert accepted == [[2], [1, 2] if back == 1 else [2], [0, 1]]

    server, digests, model, fingerprint = local_from_received(dataclasses.replace(config, engine="local"), accepted)
    for r, record in enumerate(transport):
        assert record["global_digest"] == digests[r]
    assert transport[back]["client_digests"]["1"] == digests[back]  # catch-ups rebuilt the model
    assert transport[2]["client_digests"]["0"] == digests[2]
    assert_same_weights(saved_weights(tmp_path / "out"), model)
    assert (tmp_path / "out" / "delta.fks").read_bytes() == server.delta(fingerprint)

    crashed = federation.processes.pop("node0")
    os.killpg(crashed.pid, signal.SIGKILL)  # no deactivation: the SuperLink still counts it online
    crashed.wait()
    federation.add_node("node0", 0)
    assert federation.processes["node0"].wait(timeout=60) != 0
    assert re.search(r"Exit Code: 305.*code: 2004\] Failed to activate SuperNode", federation.log("node0"), re.S)
    assert f"SuperNode with node ID {ids['node0']} could not be activated" in federation.log("superlink")


# ------------------------------------------------------------------- docs, from the wheel
def deploy_blocks() -> dict[str, str]:
    """docs/flower.md's deployment commands: each ```sh block after a ``<!-- deploy: NAME -->``
    marker ("&" appended to NAME when the docs say it runs until stopped)."""
    pattern = re.compile(r"<!-- deploy: (\S+)( \(.*?runs? until stopped\))? -->\n```sh\n(.*?)```", re.S)
    return {name + ("&" if background else ""): text for name, background, text in pattern.findall(DOCS.read_text())}


def commands(block: str) -> list[str]:
    """The shell commands of a block: continuation lines joined, comments and blank lines dropped."""
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def clean_environment() -> dict[str, str]:
    """This process's environment without Python's, a venv's or Flower's settings, as a user's
    fresh shell would have it. An earlier test can leave them set in this process: with a
    PYTHONPATH holding the checkout (which has build metadata, fedkseed.egg-info), pip took the
    checkout for an installed fedkseed of the wheel's version and skipped the wheel, and the
    venv's `python -m fedkseed.flower.app_path` then found no fedkseed."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "FLWR"))}


def installed_venv(root: pathlib.Path, wheel: pathlib.Path) -> pathlib.Path:
    """A fresh venv with the wheel installed (--no-deps), the test environment's packages made
    visible by a .pth line (not its .pth files: the editable install of the checkout stays out)
    and console scripts for Flower's entry points, as `pip install flwr` would write them."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index"]
    subprocess.run([*pip, wheel], check=True, env=clean_environment() | dict(PIP_DISABLE_PIP_VERSION_CHECK="1"))
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
        env=clean_environment(),
    ).stdout.strip()
    installed = pathlib.Path(site) / "fedkseed" / "flower" / "app" / "pyproject.toml"
    assert installed.is_file(), f"pip did not install {wheel.name} into {venv}"
    (pathlib.Path(site) / "test-environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
    for entry in importlib.metadata.distribution("flwr").entry_points.select(group="console_scripts"):
        script = venv / "bin" / entry.name
        script.write_text(
            f"#!{python}\nimport sys\nfrom {entry.module} import {entry.attr}\nsys.exit({entry.attr}())\n"
        )
        script.chmod(0o755)
    return venv


def test_docs_deployment_commands_run_from_an_installed_wheel(flwr, tmp_path):
    """Every deployment block of docs/flower.md, as written, in a folder outside the checkout, with
    only a venv holding the built wheel on PATH: certificates (openssl), node keys (ssh-keygen),
    the key list, the SuperLink, the flwr connection, key registration, two SuperNodes and
    `flwr run` of the app folder the installed package ships. The run must end with both
    clients trained, bound to their registered node ids, and the model the local engine builds
    from those updates, bit for bit."""
    for tool in ("openssl", "ssh-keygen"):
        if shutil.which(tool) is None:
            pytest.skip(f"the docs' commands need {tool}")
    for name, port in PORTS.items():
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"port {port} ({name} in docs/flower.md) is in use on this machine")
    blocks = deploy_blocks()
    assert list(blocks) == STEPS, "docs/flower.md's deployment blocks changed: update STEPS"
    started = time.perf_counter()
    wheels = tmp_path / "wheel"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*build, "-w", wheels, REPO], check=True, cwd=REPO, env=clean_environment())
    (wheel,) = wheels.glob("fedkseed-*.whl")
    venv = installed_venv(tmp_path, wheel)
    site = tmp_path / "site"  # the folder the walk-through runs in, outside the checkout
    site.mkdir()
    env = clean_environment() | dict(PATH=f"{venv / 'bin'}:/usr/bin:/bin", VIRTUAL_ENV=str(venv), HOME=str(tmp_path))
    env |= dict(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1")
    app_path = ["python", "-m", "fedkseed.flower.app_path"]
    found = subprocess.run(app_path, cwd=site, env=env, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr[-3000:]
    where = found.stdout.strip()
    assert pathlib.Path(where).is_relative_to(venv) and (pathlib.Path(where) / "pyproject.toml").is_file()
    print(f"wheel built and installed: {time.perf_counter() - started:.1f} s")

    processes: list[subprocess.Popen] = []

    def shell(text: str, log: str, background: bool = False, timeout: float = 120):
        argv = ["bash", "-euo", "pipefail", "-c", f"{blocks['settings']}\n{'exec ' if background else ''}{text}"]
        with open(site / f"{log}.log", "wb") as out:
            process = subprocess.Popen(
                argv, cwd=site, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        if background:
            processes.append(process)
            return process
        try:
            process.wait(timeout=timeout)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        text = (site / f"{log}.log").read_text(errors="replace")
        assert process.returncode == 0, f"docs step {log} failed:\n{text[-3000:]}"
        return text

    try:
        for step in ("certificate", "node-keys", "key-list"):
            shell(blocks[step], step)
        (superlink,) = [shell(c, "superlink", background=True) for c in commands(blocks["superlink&"])]
        wait_healthy("https://localhost:9092", site / "ca.crt", superlink, site / "superlink.log")
        shell(blocks["connection"], "connection")
        registered = shell(blocks["register"], "register")
        node_ids = [int(n) for n in re.findall(r'"node-id": (\d+)', registered)]
        assert len(node_ids) == 2, registered
        for n, command in enumerate(commands(blocks["supernodes&"])):
            shell(command, f"node{n}", background=True)
        out = shell(blocks["run"], "run", timeout=360)
        print(f"docs deployment from the wheel, 1 round: {time.perf_counter() - started:.1f} s")
    finally:
        for process in reversed(processes):
            stop_group(process)
    assert "ServerApp raised an exception" not in out, out[-3000:]  # `flwr run --stream` exits 0 even then

    transport = json.loads((site / "out" / "flower.json").read_text())
    metrics = json.loads((site / "out" / "metrics.json").read_text())
    assert [r["clients"] for r in metrics["rounds"]] == [[0, 1]]
    assert transport[0]["nodes"] == {"0": node_ids[0], "1": node_ids[1]}  # bound by their registered keys
    config = SimConfig(**{k.replace("-", "_"): v for k, v in metrics["config"].items() if k != "engine"})
    assert (config.model, config.rounds, config.clients) == ("tiny", 1, 2)
    server, digests, model, fingerprint = local_from_received(
        dataclasses.replace(config, engine="local", output=str(tmp_path / "reference")), [[0, 1]]
    )
    assert [record["global_digest"] for record in transport] == digests[:1]
    assert_same_weights(saved_weights(site / "out"), model)
    assert (site / "out" / "delta.fks").read_bytes() == server.delta(fingerprint)
