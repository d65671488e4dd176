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

import random
import time

import torch
from options import parser

import fedkseed
from fedkseed import data, models


def main() -> None:
    cli = parser(__doc__)
    add = cli.add_argument
    add("--steps", type=int, default=100, help="ZO steps (two forward passes each); lr is constant")
    add("--log-every", type=int, default=10, help="steps between loss lines")
    add("--history", default=None, help="save the run's History to this file")
    args = cli.parse_args()

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
        f"backend {fedkseed.resolve_backend(None, opt.params.device)}"
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
