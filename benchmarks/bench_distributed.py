"""Data-parallel ZO steps per second on 1 and 2 ranks (CPU, gloo), replicated and FSDP2.

    python benchmarks/bench_distributed.py                          # small Llama, 1 vs 2 ranks
    python benchmarks/bench_distributed.py --models small smollm2-135m --steps 5

Each rank runs with one thread on its own micro-batch (``--batch`` sequences of ``--seq``
tokens), so 2 ranks do twice the examples per step on twice the cores: examples/s is the
figure to compare, steps/s the cost of a step. Every rank evaluates its two forwards and applies
the fused ZO passes to what it holds (the whole model, or its FSDP2 shards); the ranks exchange
the loss all-reduce (16 B per forward) and, under FSDP2, the forwards' parameter all-gathers:
both are measured at the dispatcher (fedkseed.distributed.CommMeter) and shown per step. The
workers are this script, started once per configuration with RANK/WORLD_SIZE set.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import torch
from bench_zo import CONFIGS


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    import fedkseed
    from fedkseed.distributed import CommMeter, DistributedLoss

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        torch.manual_seed(0)  # the same initial weights on every rank
        config = LlamaConfig(max_position_embeddings=256, **CONFIGS[args.model])
        model = LlamaForCausalLM(config).eval()
        if args.mode == "fsdp":
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        params = fedkseed.ParamSet(model)
        dloss = DistributedLoss(module=model)
        opt = fedkseed.ZOSGD(params, lr=1e-6, eps=1e-3, seed=0)
        g = torch.Generator().manual_seed(rank)
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g)
        closure = dloss.wrap(lambda: model(input_ids=ids, labels=ids).loss, weight=ids.numel())
        for _ in range(args.warmup):
            opt.step(closure)
        dist.barrier()
        with CommMeter() as meter:
            start = time.perf_counter()
            for _ in range(args.steps):
                opt.step(closure)
            dist.barrier()
            elapsed = time.perf_counter() - start
        if rank == 0:
            sent = {k: v // args.steps for k, v in meter.bytes.items() if k != "barrier"}
            print(json.dumps({"seconds": elapsed, "bytes": sent, "numel": sum(p.numel() for p in model.parameters())}))
    finally:
        dist.destroy_process_group()


def launch(args: argparse.Namespace, model: str, mode: str, world: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    command = [sys.executable, __file__, "--worker", "--model", model, "--mode", mode]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
    command += ["--seq", str(args.seq)]
    procs = [
        subprocess.Popen(command, env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, text=True) for r in range(world)
    ]
    try:
        outputs = [p.communicate(timeout=3600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{model}/{mode}/{world} ranks failed: exit codes {[p.returncode for p in procs]}")
    return json.loads(outputs[0].strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["small"], choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="sequences per rank per step")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"# {args.batch}x{args.seq} tokens per rank per step, 1 thread per rank, gloo on CPU, float32")
    print(f"# {'model':>13} {'mode':>9} {'ranks':>5} {'steps/s':>8} {'examples/s':>10}  bytes per step per rank")
    for model in args.models:
        for mode, worlds in (("replicate", (1, 2)), ("fsdp", (2,))):
            for world in worlds:
                r = launch(args, model, mode, world)
                rate = args.steps / r["seconds"]
                sent = ", ".join(f"{k} {v:,}" for k, v in sorted(r["bytes"].items())) or "none"
                print(f"  {model:>13} {mode:>9} {world:>5} {rate:8.2f} {rate * world * args.batch:10.2f}  {sent}")


if __name__ == "__main__":
    main()
