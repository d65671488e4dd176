"""ZO fine-tuning on more than one device: data-parallel, replicated or FSDP2-sharded.

    torchrun --nproc_per_node 2 examples/zo_fsdp.py --model tiny --steps 20      # CPU, gloo
    torchrun --nproc_per_node 8 examples/zo_fsdp.py --steps 100                  # 8 GPUs, NCCL
    torchrun --nproc_per_node 2 examples/zo_fsdp.py --mode replicate             # no sharding

Every rank derives the same seeds from ``--seed``, evaluates the two losses on its own
micro-batch of the FAQ data, and all-reduces (loss x tokens, tokens): 16 bytes per forward, 32
per step. Every rank then applies the same update to what it holds: under ``--mode fsdp`` each
decoder layer and the root are ``fully_shard``-ed (dim-0 shards) and each rank perturbs and
updates only its shards, with their global element indices, so the run is the one a single
device would make on the concatenated batch. Forwards all-gather the shards as FSDP2 always
does; the ZO step itself adds only the loss all-reduce. Rank 0 saves the History; replaying it
on one device rebuilds the trained weights bit for bit, which the last line lets you check
(the weights' fingerprint, gathered from the shards).
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import fedkseed
from fedkseed import data, models
from fedkseed.distributed import DistributedLoss, check_same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help='"smollm2-135m", "tiny" or a local folder')
    parser.add_argument("--mode", choices=("fsdp", "replicate"), default="fsdp")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4, help="examples per rank per step")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--history", default=None, help="rank 0 saves the run's History here")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        model, tokenizer = models.load_model(args.model, seed=args.seed)
        model.to(device)
        if args.mode == "fsdp":
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        params = fedkseed.ParamSet(model)  # FSDP2: this rank's shards, with global offsets
        check_same(params.fingerprint(values=True), "initial weights")
        dloss = DistributedLoss(module=model)  # module: reshards FSDP2's root around each forward
        opt = fedkseed.ZOSGD(params, lr=args.lr, eps=args.eps, seed=args.seed)

        examples = data.load_examples("faq")
        rng = random.Random(args.seed * 1_000_003 + rank)  # each rank its own micro-batches
        if rank == 0:
            print(
                f"{world} ranks, {args.mode}: {sum(s.numel() for s in model.parameters()):,} parameters, "
                f"{params.numel:,} held by rank 0; backend {fedkseed.resolve_backend(None, params.device)}",
                flush=True,
            )
        recent: list[float] = []
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            batch = data.encode(tokenizer, rng.sample(examples, args.batch_size), args.max_length)
            tokens = int((batch["labels"][:, 1:] != data.IGNORE_INDEX).sum())  # what lm_loss averages
            recent.append(opt.step(dloss.wrap(lambda batch=batch: data.lm_loss(model, batch), weight=tokens)))
            if rank == 0 and (step % args.log_every == 0 or step == args.steps):
                elapsed = time.perf_counter() - start
                print(
                    f"step {step:5d}  loss {sum(recent) / len(recent):.4f}  |g| {abs(opt.last.grad):.3f}  "
                    f"{elapsed / step:.2f} s/step  all-reduced {dloss.bytes / step:.0f} B/step",
                    flush=True,
                )
                recent = []
        opt.settle()  # take back the next step's +eps the last fused pass left on the weights
        if rank == 0 and args.history:
            opt.history.save(args.history)
            print(f"history of {len(opt.history)} steps saved to {args.history}")
        digest = params.fingerprint(values=True)  # a collective under FSDP2: every rank calls it
        if rank == 0:
            print(f"trained weights fingerprint {digest}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
