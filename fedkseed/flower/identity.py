"""Which client a node may act for: the server's list of node public keys (``node-keys``).

With SuperNode authentication on, the SuperLink admits only nodes whose public key was
registered (``flwr supernode register``) and every Fleet request is signed with the node's
private key, so a node's public key, as the ServerApp reads it from ``grid.get_nodes()``, is an
authenticated identity. This module binds those keys to fedkseed client ids. The list is a JSON
object, one entry per client::

    {"ecdsa-sha2-nistp384 AAAAE2VjZHNh... node0": 0,
     "-----BEGIN PUBLIC KEY-----\\nMHYwEAYHKoZIzj0CAQYFK4EEACIDYgAE...\\n-----END PUBLIC KEY-----\\n": 1}

Keys are OpenSSH lines (the ``.pub`` file ``flwr supernode register`` takes) or PEM
SubjectPublicKeyInfo; both are compared as the DER encoding of the key, so the form does not
matter. A key maps to one client and a client to one key.
"""

from __future__ import annotations

import json
import pathlib

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from ..errors import UsageError


def key_der(text: str | bytes) -> bytes:
    """The DER SubjectPublicKeyInfo of an OpenSSH or PEM public key; ValueError if it is none."""
    data = (text.encode() if isinstance(text, str) else bytes(text)).strip()
    try:
        if data.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data + b"\n")
        else:
            key = serialization.load_ssh_public_key(data)
    except UnsupportedAlgorithm as error:
        raise ValueError(str(error)) from None
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class NodeKeys:
    """Public key -> client id, read from a ``node-keys`` file."""

    def __init__(self, clients: dict[bytes, int]) -> None:
        self._clients = dict(clients)

    @classmethod
    def load(cls, path: str | pathlib.Path, num_clients: int) -> NodeKeys:
        """Read and check the list; a UsageError names the first problem."""
        where = f"node-keys {path}"
        try:
            entries = json.loads(pathlib.Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UsageError(f"{where}: cannot read a JSON object ({error})") from None
        if not isinstance(entries, dict) or not entries:
            raise UsageError(f"{where}: expected a non-empty JSON object {{public key: client id}}")
        clients: dict[bytes, int] = {}
        for n, (text, client) in enumerate(entries.items(), 1):
            try:
                der = key_der(text)
            except (ValueError, UnicodeEncodeError):
                raise UsageError(f"{where}: entry {n} is not an OpenSSH or PEM public key") from None
            if isinstance(client, bool) or not isinstance(client, int) or not 0 <= client < num_clients:
                raise UsageError(f"{where}: entry {n} maps to {client!r}, not a client id in [0, {num_clients})")
            if der in clients:
                raise UsageError(f"{where}: entry {n} repeats the key of client {clients[der]}")
            if client in clients.values():
                raise UsageError(f"{where}: entry {n} gives client {client} a second key")
            clients[der] = client
        return cls(clients)

    def client_of(self, public_key: bytes) -> int | None:
        """The client bound to a node's public key (PEM, as Flower's ``NodeInfo.public_key``
        holds it); None for a key that is not listed or not a key at all."""
        try:
            return self._clients.get(key_der(public_key))
        except ValueError:
            return None

    def __len__(self) -> int:
        return len(self._clients)
