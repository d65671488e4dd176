"""Helpers shared by the Flower tests (test_flower.py, test_flower_deploy.py): the tiny run's
settings, bitwise weight comparison, the local engine fed exactly the updates a Flower run
accepted, and ``Federation``: a real SuperLink with TLS and SuperNode authentication and
SuperNodes on loopback, with the certificates and node keys it needs.

Here rather than in ``fedkseed.testing`` (layer L3): these drive ``fedkseed.flower`` (L6) and
Flower's processes.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import pathlib
import re
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import urllib.request

from fedkseed.experiment.config import SimConfig
from fedkseed.experiment.prepare import prepare

REPO = pathlib.Path(__file__).resolve().parents[2]
APP_DIR = REPO / "fedkseed" / "flower" / "app"
BIN = pathlib.Path(sys.executable).parent
TINY = dict(model="tiny", local_steps=3, k=32, eval_examples=4, max_new_tokens=4, batch_size=2, max_length=48)


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


def saved_weights(output: pathlib.Path) -> dict:
    from fedkseed.models import load_model

    return weights(load_model(str(output / "model"))[0])


def local_from_received(config: SimConfig, accepted: list[list[int]]):
    """The local engine's Server and Clients, fed only the updates the Flower run accepted;
    returns (server, global model digest after each round, final weights)."""
    setup = prepare(config)
    server, replica = setup.server, setup.replica
    digests = [replica.build(server.table).fingerprint(values=True)]
    for clients in accepted:
        server.begin_round()
        for c in clients:
            assert server.receive(setup.clients[c].train(server.download(c)))
        assert server.end_round().accepted == clients
        digests.append(replica.build(server.table).fingerprint(values=True))
    return server, digests, weights(setup.model), setup.fingerprint


# ------------------------------------------------------------- TLS, node keys, processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tls(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """A throwaway P-384 CA and a server certificate it signs for 127.0.0.1 / localhost (Flower's
    clients check the host name against the SAN), as PEM files: ca.crt, server.pem, server.key
    (what docs/flower.md makes with openssl)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedkseed test CA")])

    def certificate(subject, key, extensions):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    ca = certificate(ca_name, ca_key, [(x509.BasicConstraints(ca=True, path_length=None), True)])
    hosts = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = certificate(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
        server_key,
        [
            (x509.SubjectAlternativeName(hosts), False),
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ],
    )
    folder.mkdir(parents=True)
    files = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    files["ca"].write_bytes(ca)
    files["cert"].write_bytes(server)
    pkcs8 = serialization.PrivateFormat.PKCS8
    files["key"].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()))
    files["key"].chmod(0o600)
    return files


def write_node_key(folder: pathlib.Path, name: str) -> tuple[pathlib.Path, pathlib.Path]:
    """A SuperNode's P-384 key pair in OpenSSH form (``name``, ``name.pub``), what
    ``ssh-keygen -t ecdsa -b 384`` writes."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    openssh = serialization.PrivateFormat.OpenSSH
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, openssh, serialization.NoEncryption()))
    private.chmod(0o600)
    ssh = serialization.Encoding.OpenSSH
    public.write_bytes(key.public_key().public_bytes(ssh, serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


def stop_group(process: subprocess.Popen) -> None:
    """Stop a process started in its own session and everything it started: SIGTERM to the
    group, SIGKILL if it is still there after 15 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_healthy(
    url: str, ca: pathlib.Path, process: subprocess.Popen, log: pathlib.Path, timeout: float = 120
) -> None:
    """Block until the SuperLink at ``url`` answers /health over TLS, verified with ``ca``: a
    cold start (fresh venv, no bytecode yet) can take many seconds, and the CLI fails at once
    on a refused connection."""
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", context=context, timeout=2).close()
            return
        except OSError:
            assert process.poll() is None, f"superlink exited:\n{log.read_text(errors='replace')[-2000:]}"
            assert time.monotonic() < deadline, f"superlink not healthy at {url} after {timeout:g} s"
            time.sleep(0.3)


class Federation:
    """A SuperLink with TLS and SuperNode authentication and SuperNodes on 127.0.0.1, as real
    processes (each in its own process group, so stopping one stops the ClientApp processes it
    started), driven by the commands of docs/flower.md. Certificates and node keys are made
    here, for this federation only."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.home = root / "flwr-home"
        self.home.mkdir(parents=True)
        self.keys = root / "keys"
        self.keys.mkdir()
        self.tls = write_tls(root / "tls")
        # The SuperLink and SuperNodes spawn flower-superexec / flwr-clientapp by name: the
        # venv's bin must be on PATH even when the tests run as .venv/bin/python unactivated.
        path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
        self.env = dict(
            os.environ,
            FLWR_HOME=str(self.home),
            PYTHONUNBUFFERED="1",
            PATH=path,
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
        )
        self.port = free_port()
        (self.home / "config.toml").write_text(
            textwrap.dedent(f"""\
            [superlink]
            default = "test"
            [superlink.test]
            address = "127.0.0.1:{self.port}"
            root-certificates = "{self.tls["ca"]}"
            """)
        )
        self.processes: dict[str, subprocess.Popen] = {}
        self._start(
            "superlink",
            [
                BIN / "flower-superlink",
                "--ssl-ca-certfile",
                self.tls["ca"],
                "--ssl-certfile",
                self.tls["cert"],
                "--ssl-keyfile",
                self.tls["key"],
                "--enable-supernode-auth",
                "--port",
                self.port,
                "--disable-runtime-dependency-installation",
            ],
        )
        url = f"https://127.0.0.1:{self.port}"
        wait_healthy(url, self.tls["ca"], self.processes["superlink"], self.root / "superlink.log")

    def _start(self, name: str, argv: list) -> None:
        log = open(self.root / f"{name}.log", "wb")
        self.processes[name] = subprocess.Popen(
            [str(a) for a in argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.root,
            start_new_session=True,
        )
        log.close()

    def register(self, names: list[str]) -> dict[str, int]:
        """Make a key pair per name and register the public keys with the SuperLink
        (``flwr supernode register``, concurrently); returns the node id each key was given."""
        pending = {}
        for name in names:
            _, public = write_node_key(self.keys, name)
            argv = [BIN / "flwr", "supernode", "register", public, "test", "--name", name, "--format", "json"]
            self._start(f"register-{name}", argv)
            pending[name] = self.processes[f"register-{name}"]
        node_ids = {}
        for name, process in pending.items():
            process.wait(timeout=120)
            text = self.log(f"register-{name}")
            assert process.returncode == 0, text[-2000:]
            node_ids[name] = int(json.loads(text[text.index("{") :])["node-id"])
        return node_ids

    def add_node(self, name: str, partition_id: int, *, retries: int | None = None, **node_config) -> str:
        """Start a SuperNode that signs with the key pair ``name`` (made by ``register``, or
        made here for a key the SuperLink does not know)."""
        if not (self.keys / name).exists():
            write_node_key(self.keys, name)
        pairs = " ".join(f"{k}={v}" for k, v in {"partition-id": partition_id, **node_config}.items())
        argv = [
            BIN / "flower-supernode",
            "--root-certificates",
            self.tls["ca"],
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--auth-supernode-private-key",
            self.keys / name,
            "--port",
            free_port(),
            "--node-config",
            pairs,
        ]
        if retries is not None:
            argv += ["--max-retries", retries]
        self._start(name, argv)
        return name

    def node_keys(self, clients: dict[str, int]) -> pathlib.Path:
        """The server's key list (node-keys): public key -> client id; the first key in PEM
        form, the others as the OpenSSH lines that were registered (both forms are accepted)."""
        from cryptography.hazmat.primitives import serialization

        entries = {}
        for n, (name, client) in enumerate(clients.items()):
            line = (self.keys / f"{name}.pub").read_text().strip()
            if n == 0:
                key = serialization.load_ssh_public_key(line.encode())
                spki = serialization.PublicFormat.SubjectPublicKeyInfo
                line = key.public_bytes(serialization.Encoding.PEM, spki).decode()
            entries[line] = client
        path = self.root / "node-keys.json"
        path.write_text(json.dumps(entries, indent=1))
        return path

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str) -> None:
        stop_group(self.processes.pop(name))

    def run(self, app: pathlib.Path, run_config: dict, timeout: float) -> subprocess.Popen:
        """`flwr run APP test --stream --run-config ...` (returns the running process)."""
        pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        self._start("run", [BIN / "flwr", "run", app, "test", "--stream", "--run-config", pairs])
        self.deadline = time.monotonic() + timeout
        return self.processes["run"]

    def wait_run(self) -> None:
        process = self.processes["run"]
        process.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        log = self.log("run")
        # `flwr run --stream` exits 0 even when the ServerApp raised: its log says so.
        assert process.returncode == 0 and "ServerApp raised an exception" not in log, log[-3000:]

    def wait_for(self, name: str, pattern: str, timeout: float | None = None) -> None:
        deadline = self.deadline if timeout is None else time.monotonic() + timeout
        while not re.search(pattern, self.log(name), re.S):
            assert time.monotonic() < deadline, f"{name}: no {pattern!r} in time:\n{self.log(name)[-2000:]}"
            if "run" in self.processes:
                assert self.processes["run"].poll() is None, self.log("run")[-3000:]
            time.sleep(0.2)

    def close(self) -> None:
        for name in reversed(list(self.processes)):
            self.stop(name)
