"""Fine-tune SmolLM2-135M-Instruct on the Zaragoza construction FAQ with ZOSGD (MeZO).

    python examples/finetune_smollm2.py                      # the real model, 100 steps
    python examples/finetune_smollm2.py --model tiny --steps 20   # a quick smoke run

(`python` is the project's venv: `. .venv/bin/activate` first, or `.venv/bin/python`.)

Every step is two forward passes and two fused passes over the weights; the loss printed is
L+ (the loss at the perturbed weights, MeZO's convention) averaged over the last steps, and the
loss on a fixed held-out batch is shown before and after, with its change. --history saves the
run's (seed, alpha, decay) record: replaying it onto the base model rebuilds the trained weights
bit for bit (fedkseed.History.load(path).apply_(model)).
"""

from __future__ import annotations

import argparse
import random
import time

import torch

import fedkseed
from fedkseed import data, models


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--model", default=models.SMOLLM2, help=f'"{models.SMOLLM2}", "{models.TINY}" or a local model folder')
    add("--steps", type=int, default=100, help="ZO steps (two forward passes each)")
    add("--batch-size", type=int, default=8, help="questions per step; also the size of the held-out batch")
    add("--max-length", type=int, default=128, help="tokens per question and answer (longer ones are cut)")
    add("--lr", type=float, default=1e-5, help="learning rate (constant)")
    add("--eps", type=float, default=1e-3, help="perturbation scale eps of the two losses L+ and L-")
    add("--weight-decay", type=float, default=0.0, help="decoupled weight decay on matrices (not biases or norms)")
    add("--seed", type=int, default=0, help="seed of the data split, the batches and the ZO directions")
    add("--log-every", type=int, default=10, help="steps between loss lines")
    add("--history", default=None, help="save the run's History to this file")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model, tokenizer = models.load_model(args.model, seed=args.seed)
    examples = data.load_examples("faq")
    rng = random.Random(args.seed)
    rng.shuffle(examples)
    heldout, train = examples[: args.batch_size], examples[args.batch_size :]
    heldout_batch = data.encode(tokenizer, heldout, args.max_length)

    opt = fedkseed.ZOSGD(model, lr=args.lr, eps=args.eps, weight_decay=args.weight_decay, seed=args.seed)
    print(
        f"{opt.params.numel:,} parameters in {len(opt.params)} tensors; "
        f"backend {fedkseed.resolve_backend('auto', opt.params.device)}"
    )
    with torch.inference_mode():
        before = data.lm_loss(model, heldout_batch).item()
        print(f"held-out loss before: {before:.5f}")
        recent: list[float] = []
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            batch = data.encode(tokenizer, rng.sample(train, args.batch_size), args.max_length)
            recent.append(opt.step(lambda batch=batch: data.lm_loss(model, batch)))
            if step % args.log_every == 0 or step == args.steps:
                elapsed = time.perf_counter() - start
                print(
                    f"step {step:5d}  loss {sum(recent) / len(recent):.4f}  "
                    f"|g| {abs(opt.last.grad):.3f}  {elapsed / step:.2f} s/step",
                    flush=True,
                )
                recent = []
        after = data.lm_loss(model, heldout_batch).item()
        print(f"held-out loss after:  {after:.5f} ({after - before:+.5f})")
    if args.history:
        opt.history.save(args.history)
        print(f"history of {len(opt.history)} entries (steps and settle passes) saved to {args.history}")


if __name__ == "__main__":
    main()
