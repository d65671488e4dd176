"""Fine-tune SmolLM2-135M-Instruct on the Zaragoza construction FAQ with the Hugging Face Trainer,
by ZO steps (fedkseed.hf.ZOTrainer).

    python examples/trainer_smollm2.py                        # the real model, 100 steps
    python examples/trainer_smollm2.py --max-steps 10         # a short run
    python examples/trainer_smollm2.py --lora                 # LoRA adapters only (peft)
    python examples/trainer_smollm2.py --model tiny --max-steps 20   # a quick smoke run

Everything but the step is the Trainer's: the linear lr schedule with warmup, logging, evaluation
on held-out questions, checkpoints (``--output``) and ``--resume``. The logged ``loss`` is L+
(MeZO's convention), ``zo_projected_grad`` the mean |g|. Each checkpoint and the final model
folder hold ``zo_history.fkh``: ``fedkseed.History.load(path).apply_(base_model)`` rebuilds those
weights bit for bit from the base model.
"""

from __future__ import annotations

import argparse
import random

from fedkseed import data, models
from fedkseed.hf import HISTORY_FILE, ZOTrainer, ZOTrainingArguments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=models.SMOLLM2, help='"smollm2-135m", "tiny" or a local folder')
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 uses stochastic rounding")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--heldout", type=int, default=32, help="questions held out for evaluation")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (r=8 on q_proj, v_proj) only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logging-steps", type=int, default=5)
    parser.add_argument("--save-steps", type=int, default=50)
    parser.add_argument("--output", default="runs/trainer-smollm2")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output")
    args = parser.parse_args()

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
        eval_strategy="steps",
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
    )
    opt = trainer.zo_optimizer
    print(f"{opt.params.numel:,} trainable parameters in {len(opt.params)} tensors")
    before = trainer.evaluate()["eval_loss"]
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    after = trainer.evaluate()["eval_loss"]
    trainer.save_model()
    print(f"held-out loss {before:.4f} -> {after:.4f}; model and {HISTORY_FILE} in {args.output}")


if __name__ == "__main__":
    main()
