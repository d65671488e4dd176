"""ZO on torch.distributed: 2 real processes, gloo on CPU, a tiny Llama.

One launch of two ranks runs both jobs; the tests check what they wrote:
(a) FSDP2 (``fully_shard``, dim-0 shards, the 211-row embedding split 106/105): every rank
    records the same History, and that History replays on one process (and onto fresh shards)
    to weights bit-identical to the gathered shards; the sharded run equals the replicated one
    step for step. DTensors of other placements and meshes perturb exactly the unsharded
    elements.
(b) replicated data parallelism: identical weights on every rank after every step, and the
    loss each step uses is the token-weighted mean of the ranks' losses.
(c) the bytes each step communicates, measured at the dispatcher, are asserted and printed.
(d) the idiom of an FSDP loop, ``opt.step(lambda: model(**batch).loss)`` with each rank's own
    batch and no DistributedLoss: ZOSGD reduces the loss over the ranks itself (a mean), so the
    ranks take one step and rank 0's History replays to the gathered weights; with
    ``loss_reduction="none"`` ranks run their own steps, which sharded parameters refuse.

The ranks meet through a file in the output folder (no port to race for) and talk over
loopback. Run a rank by hand: ``RANK=0 python tests/zo/test_distributed.py OUT_DIR``.
"""

from __future__ import annotations

import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.slow  # every test reads the run of two gloo ranks (module fixture)

WORLD = 2
STEPS = 3
VOCAB = 211  # the embedding's 211 rows shard unevenly: 106 on rank 0, 105 on rank 1
SEQ = 8
ZO = dict(lr=5e-3, eps=1e-3, seed=11)
TIMEOUT_S = 300
ROOT = pathlib.Path(__file__).resolve().parents[2]


def build_model() -> torch.nn.Module:
    """fedkseed's tiny Llama body (models.TINY_SHAPE) on a 211-token vocabulary, seed 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedkseed.models import ATTENTION, TINY_SHAPE

    config = LlamaConfig(vocab_size=VOCAB, attn_implementation=ATTENTION, **TINY_SHAPE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def batch_for(step: int, rank: int) -> torch.Tensor:
    """Rank r's micro-batch of step t: 2 sequences on rank 0, 1 on rank 1 (unequal weights)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, VOCAB, (2 - rank, SEQ), generator=g)


def tokens(ids: torch.Tensor) -> int:
    return ids.shape[0] * (ids.shape[1] - 1)  # the shifted labels a causal-LM loss averages


# ------------------------------------------------------------------------------- the workers
def run_job(model: torch.nn.Module, params, dloss, rank: int) -> dict:
    """STEPS ZOSGD steps on this rank's batches; what the tests check, per step."""
    import torch.distributed as dist

    from fedkseed import ZOSGD
    from fedkseed.distributed import CommMeter

    opt = ZOSGD(params, **ZO)
    out: dict = {"loss": [], "local": [], "weight": [], "calls": [], "bytes": [], "digests": []}
    for step in range(STEPS):
        ids = batch_for(step, rank)
        local: list[float] = []

        def closure(ids=ids, local=local):
            loss = model(input_ids=ids, labels=ids).loss
            local.append(float(loss))
            return loss

        before = dloss.bytes
        with CommMeter() as meter:
            out["loss"].append(opt.step(dloss.wrap(closure, weight=tokens(ids))))
        out["local"].append(local)
        out["weight"].append(tokens(ids))
        out["calls"].append(meter.calls)
        out["bytes"].append(meter.bytes | {"DistributedLoss": dloss.bytes - before})
        digests: list = [None] * WORLD
        dist.all_gather_object(digests, params.fingerprint(values=True))
        out["digests"].append(digests)
    opt.settle()  # the last fused pass left the next step's +eps on the weights (shards)
    out["history"] = opt.history.to_bytes()
    return out


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 on each decoder layer and the root, dim-0 shards."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def plain_closure_job(model: torch.nn.Module, rank: int, **options) -> dict:
    """STEPS ZOSGD steps given the module, each with a plain closure of this rank's batch."""
    from fedkseed import ZOSGD
    from fedkseed.distributed import CommMeter

    opt = ZOSGD(model, **ZO, **options)
    out: dict = {"loss": [], "local": [], "calls": []}
    for step in range(STEPS):
        ids = batch_for(step, rank)
        local: list[float] = []

        def closure(ids=ids, local=local):
            loss = model(input_ids=ids, labels=ids).loss
            local.append(float(loss))
            return loss

        with CommMeter() as meter:
            out["loss"].append(opt.step(closure))
        out["local"].append(local)
        out["calls"].append(meter.calls)
    opt.settle()
    out["history"] = opt.history.to_bytes()
    return out


def refusals(rank: int) -> dict:
    """What sharded ZO refuses, identically on every rank (so no rank is left waiting)."""
    from fedkseed import ZOSGD, ParamSet

    model = shard(build_model())
    params = ParamSet(model)
    out = {}
    try:
        ZOSGD(params, **ZO, loss_reduction="none")
    except ValueError as e:
        out["none over shards"] = str(e)
    opt = ZOSGD(params, **ZO)  # the shards as tensors: ZOSGD cannot reshard the model itself
    ids = batch_for(0, rank)
    try:
        opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    except ValueError as e:
        out["plain closure over tensors"] = str(e)
    out["steps"] = opt.steps
    return out


def edge_cases(rank: int) -> dict:
    """DistributedLoss.reduce on inputs that must give every rank the same answer."""
    from fedkseed.distributed import DistributedLoss

    dloss = DistributedLoss()
    out = {
        # A rank with weight 0 contributes nothing, even a NaN loss (an empty micro-batch).
        "empty": dloss.reduce(math.nan if rank == 0 else 5.0, 0 if rank == 0 else 3),
        # A NaN loss with weight makes the mean NaN everywhere: every rank skips the step alike.
        "nan": dloss.reduce(torch.tensor(math.nan if rank == 0 else 1.0), torch.tensor(4)),
    }
    try:  # a bad weight on one rank: every rank raises, none is left waiting
        dloss.reduce(1.0, -1 if rank == 1 else 2)
    except ValueError as e:
        out["bad weight"] = str(e)
    return out


def placement_cases() -> dict[str, bool]:
    """perturb_ on DTensors of several placements and meshes against the unsharded op: every
    gathered element must be exactly x + z(seed, global index)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    from fedkseed import ParamSet, noise, perturb_

    flat, pair, swapped = (init_device_mesh("cpu", shape) for shape in [(WORLD,), (1, WORLD), (WORLD, 1)])
    cases = {
        "shard0 uneven 5x3": (flat, [Shard(0)], (5, 3)),
        "shard0 one row (an empty shard)": (flat, [Shard(0)], (1, 4)),
        "shard0 vector of 7": (flat, [Shard(0)], (7,)),
        "replicate": (flat, [Replicate()], (3, 2)),
        "HSDP replicate x shard0": (pair, [Replicate(), Shard(0)], (5, 3)),
        "shard0 x replicate": (swapped, [Shard(0), Replicate()], (5, 3)),
        "shard0 x shard0": (swapped, [Shard(0), Shard(0)], (9, 2)),
    }
    out = {}
    for name, (mesh, placements, shape) in cases.items():
        head = torch.arange(4.0).reshape(2, 2)  # a plain tensor first: offsets continue after it
        x = torch.linspace(-1, 1, math.prod(shape)).reshape(shape)
        dt = distribute_tensor(x.clone(), mesh, placements)
        perturb_(ParamSet([head.clone(), dt]), 77, 0.5)
        want = x.reshape(-1) + 0.5 * noise(77, x.numel(), offset=head.numel())
        out[name] = torch.equal(dt.full_tensor().reshape(-1), want)
    return out


def worker(out_dir: pathlib.Path) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    from fedkseed import History, ParamSet
    from fedkseed.distributed import DistributedLoss, check_same

    torch.set_num_threads(1)
    rendezvous = f"file://{out_dir / 'rendezvous'}"
    dist.init_process_group("gloo", init_method=rendezvous, rank=int(os.environ["RANK"]), world_size=WORLD)
    rank = dist.get_rank()
    try:
        result: dict = {}
        # (b) replicated: every rank holds the whole model.
        model = build_model()
        params = ParamSet(model)
        check_same(params.fingerprint(values=True), "initial weights")
        result["replicated"] = run_job(model, params, DistributedLoss(), rank)
        result["replicated_weights"] = params.state()

        # (a) FSDP2: each decoder layer and the root sharded on dim 0. The root keeps FSDP2's
        # default (unsharded after a no-grad forward): DistributedLoss(module=) reshards it.
        model = build_model()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        params = ParamSet(model)
        result["shards"] = list(zip(params.names, params.offsets, params.numels))
        result["layout"] = params.layout()
        result["fsdp"] = run_job(model, params, DistributedLoss(module=model), rank)
        result["fsdp_weights"] = [p.full_tensor() for p in model.parameters()]
        # The History also replays onto a fresh sharded model, each rank its own shards.
        fresh = build_model()
        for layer in fresh.model.layers:
            fully_shard(layer)
        fully_shard(fresh)
        History.from_bytes(result["fsdp"]["history"]).apply_(ParamSet(fresh))
        result["fsdp_replayed_on_shards"] = [p.full_tensor() for p in fresh.parameters()]

        # (d) a plain closure, each rank its own batch: ZOSGD reduces the loss itself.
        model = shard(build_model())
        result["plain"] = plain_closure_job(model, rank)
        result["plain_weights"] = [p.full_tensor() for p in model.parameters()]
        model = build_model()
        result["independent"] = plain_closure_job(model, rank, loss_reduction="none")
        result["refusals"] = refusals(rank)

        result["edge"] = edge_cases(rank)
        result["placements"] = placement_cases()
        mesh = init_device_mesh("cpu", (WORLD,))
        try:
            ParamSet([distribute_tensor(torch.zeros(4, 6), mesh, [Shard(1)])])
        except ValueError as e:
            result["shard1_error"] = str(e)
        torch.save(result, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ the launcher
@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("distributed")
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    logs = [out / f"rank{r}.log" for r in range(WORLD)]
    procs = []
    try:
        for r in range(WORLD):
            with logs[r].open("w") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, __file__, str(out)],
                        env=dict(env, RANK=str(r)),
                        cwd=ROOT,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + TIMEOUT_S
        # A rank that fails leaves the other waiting in a collective: stop at the first failure.
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
            assert time.monotonic() < deadline, f"ranks still running after {TIMEOUT_S} s"
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    # The rank that failed first, not one killed here after it.
    failed = sorted((p.returncode == -signal.SIGKILL, r) for r, p in enumerate(procs) if p.returncode)
    for _, r in failed[:1]:
        pytest.fail(f"rank {r} exited {procs[r].returncode}:\n{logs[r].read_text()[-4000:]}")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def replayed(history: bytes) -> list[torch.Tensor]:
    from fedkseed import History, ParamSet

    params = ParamSet(build_model())
    History.from_bytes(history).apply_(params)
    return params.tensors


def bits_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x.view(torch.int32), y.view(torch.int32)) for x, y in zip(a, b))


def test_fsdp2_shards_carry_global_offsets(ranks):
    from fedkseed import ParamSet

    full = ParamSet(build_model())
    assert ranks[0]["layout"] == ranks[1]["layout"] == full.layout()
    for rank, result in enumerate(ranks):
        for (name, offset, numel), start, shape in zip(result["shards"], full.offsets, full.shapes):
            rows = -(-shape[0] // WORLD)  # torch.chunk: ceil-sized, the last chunk short
            lo, hi = min(rank * rows, shape[0]), min((rank + 1) * rows, shape[0])
            assert (offset, numel) == (start + lo * math.prod(shape[1:]), (hi - lo) * math.prod(shape[1:])), name
    embed = [s for s in ranks[0]["shards"] + ranks[1]["shards"] if s[0] == "model.embed_tokens.weight"]
    assert [n // 64 for _, _, n in embed] == [106, 105]


def test_dtensor_shards_perturb_the_elements_the_unsharded_op_would(ranks):
    for result in ranks:
        assert result["placements"] and all(result["placements"].values()), result["placements"]


def test_fsdp2_run_agrees_across_ranks_and_replays_on_one_process(ranks):
    a, b = ranks[0]["fsdp"], ranks[1]["fsdp"]
    assert a["history"] == b["history"] and a["loss"] == b["loss"]
    assert all(len(set(d)) == 1 for d in a["digests"])  # gathered weights agree after every step
    assert bits_equal(replayed(a["history"]), ranks[0]["fsdp_weights"])
    assert bits_equal(ranks[0]["fsdp_weights"], ranks[1]["fsdp_weights"])
    assert bits_equal(ranks[0]["fsdp_replayed_on_shards"], ranks[0]["fsdp_weights"])
    # Sharding changes nothing: the same steps as the replicated run, bit for bit.
    assert a["history"] == ranks[0]["replicated"]["history"]
    assert "contiguous range" in ranks[0]["shard1_error"]


def test_replicated_run_keeps_ranks_identical_every_step(ranks):
    a, b = ranks[0]["replicated"], ranks[1]["replicated"]
    assert a["history"] == b["history"] and a["loss"] == b["loss"]
    for step in range(STEPS):
        assert len(set(a["digests"][step])) == 1, f"ranks differ after step {step}"
        assert a["digests"][step] == b["digests"][step]
    assert len({d[0] for d in a["digests"]}) == STEPS  # and the weights did move every step
    assert bits_equal(replayed(a["history"]), ranks[0]["replicated_weights"])
    assert bits_equal(ranks[0]["replicated_weights"], ranks[1]["replicated_weights"])


def test_the_step_loss_is_the_token_weighted_mean_of_the_ranks(ranks):
    a, b = ranks[0]["replicated"], ranks[1]["replicated"]
    for step in range(STEPS):
        wa, wb = a["weight"][step], b["weight"][step]
        assert (wa, wb) == (2 * (SEQ - 1), SEQ - 1)
        l_plus = (a["local"][step][0] * wa + b["local"][step][0] * wb) / (wa + wb)
        assert a["loss"][step] == l_plus
    # Independently: step 0's L+ is the loss over both ranks' batches together on one process.
    from fedkseed import ZOSGD, ParamSet, perturb_

    model = build_model()
    perturb_(ParamSet(model), ZOSGD(ParamSet(model), **ZO).seed_for(0), ZO["eps"])
    ids = torch.cat([batch_for(0, 0), batch_for(0, 1)])
    with torch.no_grad():
        joint = float(model(input_ids=ids, labels=ids).loss)
    assert a["loss"][0] == pytest.approx(joint, rel=1e-6)


def test_distributed_loss_gives_every_rank_the_same_answer(ranks):
    first, second = ranks[0]["edge"], ranks[1]["edge"]
    assert first["empty"] == second["empty"] == 5.0
    assert math.isnan(first["nan"]) and math.isnan(second["nan"])
    assert "weights must be finite, >= 0" in first["bad weight"] and "weight: 2.0" in first["bad weight"]
    assert "this rank's weight: -1.0" in second["bad weight"]


def test_bytes_per_step(ranks):
    """(c) A replicated step communicates only the two loss all-reduces: 2 x 16 B. An FSDP2
    step adds FSDP2's all-gathers of the (padded) shards, one set per forward."""
    from fedkseed import ParamSet
    from fedkseed.models import TINY_SHAPE

    full = ParamSet(build_model())
    padded = sum(-(-s[0] // WORLD) * WORLD * math.prod(s[1:]) * 4 for s in full.shapes)
    for result in ranks:
        for step in range(STEPS):
            assert result["replicated"]["calls"][step] == {"allreduce_": 2}
            assert result["replicated"]["bytes"][step] == {"allreduce_": 32, "DistributedLoss": 32}
            calls, sent = result["fsdp"]["calls"][step], result["fsdp"]["bytes"][step]
            assert calls == {"allreduce_": 2, "_allgather_base_": 2 * (1 + TINY_SHAPE["num_hidden_layers"])}
            assert sent == {"allreduce_": 32, "DistributedLoss": 32, "_allgather_base_": 2 * padded}
    print(
        f"\nbytes per ZO step per rank: replicated {ranks[0]['replicated']['bytes'][0]}; "
        f"FSDP2 {ranks[0]['fsdp']['bytes'][0]} (the model holds {full.numel * 4} B)"
    )


def test_a_plain_closure_under_fsdp2_is_reduced_by_zosgd(ranks):
    """Issue 18, finding 9: each rank's own batch, no DistributedLoss. The step loss is the
    mean of the ranks' losses on every rank, the ranks record one History, and it replays on
    one process to the gathered weights bit for bit."""
    from fedkseed.models import TINY_SHAPE

    a, b = ranks[0]["plain"], ranks[1]["plain"]
    assert a["history"] == b["history"] and a["loss"] == b["loss"]
    for step in range(STEPS):
        assert a["local"][step][0] != b["local"][step][0]  # the ranks' own losses differ
        assert a["loss"][step] == (a["local"][step][0] + b["local"][step][0]) / 2
        # one 16-byte all-reduce per evaluation, none more: the same as DistributedLoss
        assert a["calls"][step] == {"allreduce_": 2, "_allgather_base_": 2 * (1 + TINY_SHAPE["num_hidden_layers"])}
    assert bits_equal(replayed(a["history"]), ranks[0]["plain_weights"])
    assert bits_equal(ranks[0]["plain_weights"], ranks[1]["plain_weights"])


def test_loss_reduction_none_runs_each_rank_on_its_own(ranks):
    a, b = ranks[0]["independent"], ranks[1]["independent"]
    assert all(calls == {} for calls in a["calls"] + b["calls"])  # nothing communicated
    assert a["loss"] != b["loss"] and a["history"] != b["history"]
    assert a["loss"] == [local[0] for local in a["local"]]  # each rank's own L+


def test_sharded_zo_refuses_what_would_diverge_or_read_stale_weights(ranks):
    for result in ranks:
        refused = result["refusals"]
        assert "DistributedLoss" in refused["none over shards"], refused
        assert "DistributedLoss(module=" in refused["plain closure over tensors"], refused
        assert refused["steps"] == 0


if __name__ == "__main__":
    worker(pathlib.Path(sys.argv[1]))
