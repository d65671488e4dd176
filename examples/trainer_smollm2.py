"""Fine-tune SmolLM2-135M-Instruct on the Zaragoza construction FAQ with the Hugging Face Trainer,
by ZO steps (fedkseed.hf.ZOTrainer).

    python examples/trainer_smollm2.py                        # the real model, 100 steps
    python examples/trainer_smollm2.py --max-steps 10         # a short run
    python examples/trainer_smollm2.py --lora                 # LoRA adapters only (peft)
    python examples/trainer_smollm2.py --model tiny --max-steps 20   # a quick smoke run

(`python` is the project's venv: `. .venv/bin/activate` first, or `.venv/bin/python`.)

Everything but the step is the Trainer's: the linear lr schedule with warmup, logging, evaluation
on held-out questions, checkpoints (--output) and --resume. The held-out loss is measured once
before training, every --save-steps and at the last step, each time with its change since
before training. The training loss is L+, the loss at the perturbed weights (MeZO's
convention), and |g| the mean absolute projected gradient since the last line. Each
checkpoint and the final model folder hold zo_history.fkh:
fedkseed.History.load(path).apply_(base_model) rebuilds those weights bit for bit from the
base model.
"""

from __future__ import annotations

import argparse
import random
from typing import Any

from options import parser
from transformers import PrinterCallback, TrainerCallback
from transformers.utils import logging as hf_logging

from fedkseed import data, models
from fedkseed.hf import HISTORY_FILE, ZOTrainer, ZOTrainingArguments


def parse_args() -> argparse.Namespace:
    cli = parser(__doc__)
    add = cli.add_argument
    add("--dtype", default="fp32", choices=["fp32", "bf16"], help="weight dtype; bf16 uses stochastic rounding")
    add("--max-steps", type=int, default=100, help="ZO optimizer steps (two forward passes each)")
    add("--heldout", type=int, default=32, help="questions held out for evaluation")
    add("--lora", action="store_true", help="train LoRA adapters (r=8 on q_proj, v_proj) only")
    add("--logging-steps", type=int, default=5, help="steps between training-loss lines")
    add("--save-steps", type=int, default=50, help="steps between held-out evaluations and checkpoints")
    add("--output", default="runs/trainer-smollm2", help="folder of the checkpoints and the final model")
    add("--resume", action="store_true", help="resume from the last checkpoint in --output (bit-identical)")
    return cli.parse_args()


class Report(TrainerCallback):
    """One line per Trainer log: training loss lines, and held-out losses with 5 decimals and
    their change since the evaluation before training (ZO steps move the loss by little)."""

    def __init__(self) -> None:
        self.before: float | None = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        if not state.is_local_process_zero or not logs:
            return
        step = f"step {state.global_step:>{len(str(state.max_steps))}}/{state.max_steps}"
        if "eval_loss" in logs:
            loss = logs["eval_loss"]
            if self.before is None:  # the evaluation trainer.evaluate() runs before train()
                self.before = loss
                print(f"before training: held-out loss {loss:.5f}", flush=True)
            else:
                print(f"{step}: held-out loss {loss:.5f} ({loss - self.before:+.5f})", flush=True)
        elif "loss" in logs:
            print(
                f"{step}: loss {logs['loss']:.4f}  lr {logs['learning_rate']:.3g}  |g| {logs['zo_projected_grad']:.4g}",
                flush=True,
            )
        elif "train_runtime" in logs:
            print(f"trained to step {state.global_step} in {logs['train_runtime']:.0f} s", flush=True)


def main() -> None:
    args = parse_args()
    hf_logging.disable_progress_bar()  # "Writing model shards" bars at each save; the Report lines say enough

    model, tokenizer = models.load_model(args.model, seed=args.seed, dtype=args.dtype)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    examples = data.load_examples("faq")
    random.Random(args.seed).shuffle(examples)
    heldout, train = examples[: args.heldout], examples[args.heldout :]

    training_args = ZOTrainingArguments(
        output_dir=args.output,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0.1,  # a float below 1: a share of max_steps
        weight_decay=args.weight_decay,
        logging_steps=args.logging_steps,
        eval_strategy="steps",  # every eval_steps and at the last step
        eval_steps=args.save_steps,
        prediction_loss_only=True,  # evaluation keeps no logits (batch x length x 49k vocabulary)
        save_steps=args.save_steps,
        save_total_limit=2,
        seed=args.seed,
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        remove_unused_columns=False,  # the collator below turns Examples into token batches
        zo_eps=args.eps,
        zo_rounding="stochastic" if args.dtype == "bf16" else "nearest",
    )
    trainer = ZOTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=heldout,
        processing_class=tokenizer,  # saved with every checkpoint
        data_collator=lambda rows: data.encode(tokenizer, tuple(rows), args.max_length),  # Examples -> tokens
        callbacks=[Report()],
    )
    trainer.remove_callback(PrinterCallback)  # its dicts round the loss to 4 digits; Report replaces them
    opt = trainer.zo_optimizer
    print(f"{opt.params.numel:,} trainable parameters in {len(opt.params)} tensors; {len(train)} training questions")
    before = trainer.evaluate()["eval_loss"]
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    # The Trainer evaluated at the last step (eval_strategy="steps" always does): no second pass.
    after = next(h["eval_loss"] for h in reversed(trainer.state.log_history) if "eval_loss" in h)
    trainer.save_model()
    change = f"held-out loss {before:.5f} -> {after:.5f} ({after - before:+.5f})"
    print(f"{change}; model and {HISTORY_FILE} in {args.output}")


if __name__ == "__main__":
    main()
