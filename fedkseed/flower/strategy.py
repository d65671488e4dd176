"""FedKSeedStrategy: ``fedkseed.fed.Server`` (or, for the first-order methods, a
``fed.firstorder.FirstOrderServer``) as a Flower Message-API strategy; how each method's
messages ride in the records is ``payloads``.

One Flower round is one Server round: ``configure_train`` enrols nodes that appeared since the
last round, opens the round (the run's deterministic client sample, as in the local engine) and
sends each sampled client that has a node its download; ``aggregate_train`` hands the uploads
to ``Server.receive`` and closes the round with ``Server.end_round``. Clients without a node
(not joined yet, or departed) and nodes that fail or time out are simply absent: the server
aggregates the others, exactly as the local engine does for a client that fails.

Identity: a node is bound to one client id at enrolment. With a key list (``NodeKeys``, the
deployment's ``node-keys``), the id is the one its authenticated public key maps to (a node
whose key is not listed gets none, a node claiming another id is refused); without one
(simulation), it is the ``partition-id`` the node declares. An upload counts only for the id
its node is bound to: one that names another client is rejected and blamed on the sender.

Availability: a node's binding is released when it leaves or restarts (the SuperLink activated
it again since it enrolled: a SuperNode keeps its node id across restarts under SuperNode
authentication, but its ClientApp state is gone), and the restarted node enrols afresh. A
refusal stands until the node restarts (its key and its declared id are fixed for the life of
its process), except a clash over a client id held by another node, which is retried each round.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from ..fed import RoundSummary, Server, wire
from ..fed.firstorder import FirstOrderServer
from . import protocol as P
from .identity import NodeKeys
from .payloads import ArrayPayloads, SeedPayloads, prepare_seconds_of, usage_of

ALREADY_SERVED = "is already served by another node"


@dataclass
class RoundLog:
    """What the transport saw in a round (written to flower.json next to metrics.json)."""

    round: int
    nodes: dict[int, int] = field(default_factory=dict)  # client id -> node id, this round
    enrolled: list[int] = field(default_factory=list)  # clients whose node enrolled this round
    departed: list[int] = field(default_factory=list)  # clients whose node left
    absent: list[int] = field(default_factory=list)  # sampled clients with no node
    failed: dict[int, str] = field(default_factory=dict)  # client id -> error reply / timeout
    rejected: dict[int, str] = field(default_factory=dict)  # client id (-1: unknown) -> reason
    refused: dict[int, str] = field(default_factory=dict)  # online node id -> why it has no client id
    global_digest: str = ""  # the model the clients had to train from
    client_digests: dict[int, str] = field(default_factory=dict)  # what they reported
    usage: dict[int, dict[str, float]] = field(default_factory=dict)  # client id -> its local work's cost
    prepare_seconds: dict[int, float] = field(default_factory=dict)  # client id -> its ClientApp's preparation


def replies_by_node(sent: list[Message], replies: Iterable[Message]) -> dict[int, Message]:
    """Each reply keyed by the node its message was sent to. Matched on ``reply_to``, not on
    the sender: Flower's own error replies (e.g. NODE_UNAVAILABLE) come from the SuperLink."""
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    return {node_of[r.metadata.reply_to_message_id]: r for r in replies if r.metadata.reply_to_message_id in node_of}


class FedKSeedStrategy(Strategy):
    """``on_round(summary, log, started)`` runs after each round; it rebuilds the global model
    and returns its digest, which the next round's clients must report. ``keys``: the
    deployment's key list (None: ids are the nodes' own ``partition-id``). ``payloads``: how
    the method's messages travel (default: FedKSeed's)."""

    def __init__(
        self,
        server: Server | FirstOrderServer,
        config_json: str,
        global_digest: str,
        on_round: Callable[[RoundSummary, RoundLog, float], str],
        timeout: float,
        keys: NodeKeys | None = None,
        payloads: SeedPayloads | ArrayPayloads | None = None,
    ) -> None:
        self.payloads = payloads or SeedPayloads()
        self.server, self.config_json, self.global_digest = server, config_json, global_digest
        self.on_round, self.timeout, self.keys = on_round, timeout, keys
        self.client_of: dict[int, int] = {}  # node id -> the client id it is bound to
        self.session_of: dict[int, str] = {}  # node id -> when the SuperLink activated it, as last enrolled
        self.refused: dict[int, str] = {}  # node id -> why it has no client id, until it restarts
        self.log: RoundLog | None = None
        self._started = 0.0
        self._sent: list[Message] = []  # this round's train messages (Flower sets their ids)
        self._schedules: dict[int, np.ndarray] = {}  # this round's seed schedule of each sampled client

    def summary(self) -> None:
        spec = self.server.spec
        seeds = f"K = {spec.k}, {spec.precision}" if isinstance(self.server, Server) else "first-order local steps"
        log(
            INFO,
            "\t├── fedkseed: %d of %d clients per round, %d local steps, %s",
            spec.clients_per_round,
            spec.num_clients,
            spec.local_steps,
            seeds,
        )
        log(INFO, "\t└── payloads: %s", self.payloads.description)

    # --------------------------------------------------------------------------- enrolment
    def _enroll(self, grid: Grid, round_log: RoundLog) -> None:
        nodes = {info.node_id: info for info in grid.get_nodes()}  # the online ones
        restarted = {node for node in self.session_of if node in nodes and self._restarted(nodes[node])}
        for node in sorted(set(self.client_of) - (set(nodes) - restarted)):
            client = self.client_of.pop(node)
            round_log.departed.append(client)
            how = "restarted" if node in restarted else "left"
            log(WARNING, "round %d: node %d (client %d) %s", round_log.round, node, client, how)
        for node in set(self.session_of) - (set(nodes) - restarted):  # forget it: it is a new node now
            self.session_of.pop(node)
            self.refused.pop(node, None)
        round_log.refused.update(sorted(self.refused.items()))  # standing refusals
        new = sorted(set(nodes) - set(self.client_of) - set(self.refused))
        if not new:
            return
        self.session_of.update((node, nodes[node].last_activated_at) for node in new)
        bound = self._bound_clients(nodes, new, round_log)
        if self.keys is not None:
            new = sorted(bound)  # the others were refused without a message
        query = ConfigRecord({P.SIM_CONFIG: self.config_json})
        messages = [
            Message(
                RecordDict({P.ARRAYS: ArrayRecord(), P.CONFIG: query}),
                node,
                MessageType.QUERY,
                group_id=str(round_log.round),
            )
            for node in new
        ]
        for node, reply in replies_by_node(messages, grid.send_and_receive(messages, timeout=self.timeout)).items():
            if reply.has_error():
                log(WARNING, "round %d: node %d failed to enrol: %s", round_log.round, node, reply.error.reason)
                continue
            try:
                client = int(reply.content[P.CONFIG][P.CLIENT_ID])
            except (KeyError, TypeError, ValueError) as error:
                log(WARNING, "round %d: node %d sent a malformed enrolment: %r", round_log.round, node, error)
                continue
            reason = self._enrolment_problem(client, bound.get(node))
            if reason:
                # A clash over a client id may clear (its node may leave): retried next round.
                self._refuse(round_log, node, reason, standing=not reason.endswith(ALREADY_SERVED))
                continue
            self.client_of[node] = client
            if isinstance(self.server, Server):
                # A node that (re)joins holds no table: its first download is a full catch-up.
                self.server.synced[client] = 0
            round_log.enrolled.append(client)
            log(INFO, "round %d: node %d enrolled as client %d", round_log.round, node, client)

    def _restarted(self, info: NodeInfo) -> bool:
        """Whether the SuperLink activated the node again since it enrolled or was refused: a new
        process (or one back from being deemed dead), which holds no enrolment."""
        return info.last_activated_at != self.session_of[info.node_id]

    def _bound_clients(self, nodes: dict[int, NodeInfo], new: list[int], round_log: RoundLog) -> dict[int, int]:
        """Node id -> the client its authenticated public key is bound to, for the ``new``
        nodes; nodes whose key is not in the list are refused. Empty without a key list."""
        if self.keys is None:
            return {}
        bound = {}
        for node in new:
            client = self.keys.client_of(nodes[node].public_key)
            if client is None:
                self._refuse(round_log, node, "its public key is not in node-keys")
            else:
                bound[node] = client
        return bound

    def _enrolment_problem(self, client: int, bound: int | None) -> str | None:
        if self.keys is not None and client != bound:
            return f"it claims client {client}, its public key is bound to client {bound}"
        if not 0 <= client < self.server.spec.num_clients:
            return f"client id {client} is outside [0, {self.server.spec.num_clients})"
        if client in self.client_of.values():
            return f"client {client} {ALREADY_SERVED}"
        return None

    def _refuse(self, round_log: RoundLog, node: int, reason: str, standing: bool = True) -> None:
        if standing:
            self.refused[node] = reason
        round_log.refused[node] = reason
        log(WARNING, "round %d: node %d refused: %s", round_log.round, node, reason)

    # ----------------------------------------------------------------------------- training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        round_log = self.log = RoundLog(self.server.round + 1, global_digest=self.global_digest)
        self._enroll(grid, round_log)
        self._started = time.perf_counter()  # the round, as the local engine times it: from sampling on
        node_of = {client: node for node, client in self.client_of.items()}
        round_log.nodes = dict(sorted(node_of.items()))
        self._sent = []
        for client in self._begin_round():
            node = node_of.get(client)
            if node is None:
                round_log.absent.append(client)
                continue
            self._sent.append(
                Message(
                    self.payloads.download_content(self.server.download(client)),
                    node,
                    MessageType.TRAIN,
                    group_id=str(round_log.round),
                )
            )
        if round_log.absent:
            unbound = "".join(f"; node {node} has no client id: {why}" for node, why in round_log.refused.items())
            log(WARNING, "round %d: sampled clients without a node: %s%s", round_log.round, round_log.absent, unbound)
        return self._sent

    def _begin_round(self) -> list[int]:
        """Open the Server's round; keep each sampled client's seed schedule, which uploads
        may refer to instead of listing their seeds."""
        sampled = self.server.begin_round()
        # The Server's own schedules (Pro probabilities and --shared-seeds included); first-order
        # servers have none: their uploads name no seeds.
        schedule = getattr(self.server, "schedule", None)
        self._schedules = {c: schedule(c) for c in sampled} if schedule is not None else {}
        return sampled

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_log = self.log
        sent_by: dict[int, int] = {}  # client id -> 1 accepted by Server.receive / 0 refused
        received = replies_by_node(self._sent, replies)
        for message in self._sent:
            node = message.metadata.dst_node_id
            client = self.client_of.get(node, -1)
            reply = received.get(node)
            if reply is None:
                round_log.failed[client] = f"no reply within {self.timeout:g} s"
                log(WARNING, "round %d: client %d (node %d) did not reply", round_log.round, client, node)
                continue
            if reply.has_error():
                round_log.failed[client] = str(reply.error.reason)
                log(
                    WARNING,
                    "round %d: client %d (node %d) failed: %s",
                    round_log.round,
                    client,
                    node,
                    reply.error.reason,
                )
                continue
            upload, digest = self._payload(reply)
            usage = usage_of(reply.content)
            if usage is not None:
                round_log.usage[client] = usage
            preparing = prepare_seconds_of(reply.content)
            if preparing is not None:
                round_log.prepare_seconds[client] = preparing
            if upload is None:
                self._reject(round_log, client, node, "reply carries no upload bytes")
                continue
            reason = self._sender_problem(upload, client)
            if reason:
                self._reject(round_log, client, node, reason)
                continue
            round_log.client_digests[client] = digest
            if digest != self.global_digest:
                self._reject(round_log, client, node, "trained from weights that differ from the global model")
                continue
            sent_by[client] = int(self.server.receive(upload))
        summary = self.server.end_round()
        for client, ok in sent_by.items():
            if not ok:  # Server.receive logged it; an unreadable upload is filed under -1
                reason = summary.rejected.get(client, summary.rejected.get(-1, "rejected"))
                self._reject(round_log, client, None, reason)
        # The round's seconds mean what the local engine's mean (from sampling to the evaluated
        # model, the clients' training included), so the ClientApps' one-off preparation of model
        # and data, which the local engine does before round 1, is left out: each process
        # prepares at its first message, in parallel with the others, so the round waited about
        # as long as the longest preparation reported (capped at the time elapsed).
        elapsed = time.perf_counter() - self._started
        started = self._started + min(max(round_log.prepare_seconds.values(), default=0.0), elapsed)
        self.global_digest = self.on_round(summary, round_log, started)
        metrics = MetricRecord(
            {
                "train-loss": float(summary.train_loss),
                "accepted": len(summary.accepted),
                "rejected": len(round_log.rejected),
            }
        )
        return None, metrics

    def _sender_problem(self, upload: bytes, client: int) -> str | None:
        """Why ``upload`` cannot count as client ``client``'s (the client its node is bound
        to), or None: it must be readable and name that client, so a node cannot take another
        client's place (the Server then checks it as that client's, schedule included)."""
        try:
            named = self.payloads.sender(upload, self.server.spec.k, self._schedules)
        except wire.WireError as error:
            return str(error)
        if named != client:
            return f"the node of client {client} sent an upload for client {named}"
        return None

    def _payload(self, reply: Message) -> tuple[bytes | None, str]:
        try:
            return self.payloads.upload_bytes(reply.content), str(reply.content[P.CONFIG][P.MODEL_DIGEST])
        except (KeyError, TypeError):
            return None, ""

    @staticmethod
    def _reject(round_log: RoundLog, client: int, node: int | None, reason: str) -> None:
        round_log.rejected[client] = reason
        log(
            WARNING,
            "round %d: rejected upload of client %d%s: %s",
            round_log.round,
            client,
            "" if node is None else f" (node {node})",
            reason,
        )

    # ---------------------------------------------------------- no federated evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # the server evaluates the global model itself (on_round)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
