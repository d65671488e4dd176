"""A Hugging Face ``transformers.Trainer`` that trains by zeroth-order steps: :class:`ZOTrainer`.

Each optimizer step is one :class:`fedkseed.ZOSGD` step: two forwards per direction (FZOO,
``zo_estimator="fzoo"``: one per direction plus one), fused perturbation passes, no backward,
no gradients, no optimizer state in memory. Everything else is the Trainer's:
``TrainingArguments`` lr schedulers (ZOSGD reads the lr the scheduler set for step t, applies it
and records it in the History), logging, evaluation, ``max_steps``, checkpoints and
``resume_from_checkpoint`` (bit-identical to an uninterrupted run: the ZO seeds are a function of
(``zo_seed``, step), and ZOSGD's state rides in ``optimizer.pt``). PEFT models train only their
adapters, since ZOSGD takes the tensors with ``requires_grad``. Every saved model folder,
checkpoints included, gets ``zo_history.fkh`` beside the weights:
``fedkseed.History.load(path).apply_(m)`` turns the initial model ``m`` into the saved one bit for
bit.

``zo_density`` < 1 perturbs and updates only each tensor's smallest-magnitude share (Sparse-MeZO;
the mask is rebuilt every ``zo_mask_every`` steps and replayed by the History bit for bit).

The losses are evaluated in eval mode (no dropout: L+ and L- must come from one function, as in
MeZO). The logged ``loss`` is L+ (MeZO's convention; FZOO: L_0, at the unperturbed weights) and
``zo_projected_grad`` (mean |g| since the last log) replaces ``grad_norm``, which would always
be 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .zo import ZOSGD

HISTORY_FILE = "zo_history.fkh"
OPTIMIZER_FILE = "optimizer.pt"  # the Trainer's name for the optimizer state in a checkpoint


@dataclass
class ZOTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the ZO step's settings (``zo_*``, see :class:`fedkseed.ZOSGD`).

    ``learning_rate``, ``lr_scheduler_type``, ``warmup_*`` and ``weight_decay`` mean what they
    mean for any optimizer (weight decay applies to matrices, never to biases or norms);
    ``optim`` and ``max_grad_norm`` are unused, as no gradients exist. Settings a ZO step cannot
    honour are refused here, one line each.
    """

    zo_eps: float = field(default=1e-3, metadata={"help": "Perturbation scale eps (MeZO: 1e-3)."})
    zo_seed: int | None = field(
        default=None, metadata={"help": "Seed the per-step perturbation seeds derive from (uint64); default: seed."}
    )
    zo_dist: str = field(default="gaussian", metadata={"help": 'Direction distribution: "gaussian" or "rademacher".'})
    zo_estimator: str = field(
        default="mezo",
        metadata={"help": '"mezo" (two-point, n-SPSA) or "fzoo" (one-sided, normalised; zo_directions >= 2).'},
    )
    zo_directions: int = field(
        default=1, metadata={"help": "Directions per step (n-SPSA; MeZO's --zero_order_sample; FZOO's N)."}
    )
    zo_momentum: float = field(default=0.0, metadata={"help": "ZO momentum beta, replayed from recent seeds."})
    zo_window: int = field(
        default=8, metadata={"help": "Steps the momentum looks back: it keeps 1 - beta^W of heavy-ball's weight."}
    )
    zo_sign: bool = field(default=False, metadata={"help": "Update by sign(g) (sign-ZO)."})
    zo_fuse: bool = field(default=True, metadata={"help": "Fuse the next step's +eps into the update pass."})
    zo_density: float = field(
        default=1.0,
        metadata={"help": "Sparse-MeZO: perturb only each tensor's smallest-magnitude share rho (1: dense)."},
    )
    zo_mask_every: int = field(default=1, metadata={"help": "Steps between rebuilds of the magnitude mask."})
    zo_rounding: str = field(
        default="nearest", metadata={"help": '"stochastic" keeps bf16/fp16 weights from stalling below one ulp.'}
    )
    zo_clip: float | None = field(default=None, metadata={"help": "Clip the projected gradient to [-c, c]."})
    zo_skip_threshold: float | None = field(
        default=None, metadata={"help": "Skip the update of a step whose |L+ - L-| exceeds this."}
    )

    def __post_init__(self) -> None:
        # Before TrainingArguments' own checks, so that the reason given is the ZO one.
        if self.fp16:
            raise ValueError(
                "ZOTrainingArguments: fp16=True needs a GradScaler, which needs gradients; load the model "
                "in bfloat16 or float16 instead and set zo_rounding='stochastic'"
            )
        if self.load_best_model_at_end:
            raise ValueError(
                "ZOTrainingArguments: load_best_model_at_end would swap in weights the ZO History does not "
                "describe; pick the best checkpoint yourself (each holds its own zo_history.fkh)"
            )
        if self.deepspeed or self.fsdp:
            raise ValueError("ZOTrainingArguments: ZOTrainer supports neither DeepSpeed nor FSDP")
        super().__post_init__()


class ZOTrainer(Trainer):
    """A ``transformers.Trainer`` whose optimizer step is a fused ZO step; see the module doc.

    ``args`` must be :class:`ZOTrainingArguments`; the ZOSGD is built from them (``optimizers``
    may pass a scheduler only). ``zo_optimizer`` is that ZOSGD: ``zo_optimizer.history`` is the
    run so far, ``zo_optimizer.last`` the latest step's result. Gradient accumulation gives one
    ZO step per optimizer step, on the loss of all its micro-batches.
    """

    def __init__(self, model: Any = None, args: TrainingArguments | None = None, *a: Any, **kw: Any) -> None:
        if args is None:
            args = ZOTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, ZOTrainingArguments):
            raise TypeError(
                "ZOTrainer needs fedkseed.hf.ZOTrainingArguments (TrainingArguments plus zo_eps, zo_seed, ...), "
                f"got {type(args).__name__}"
            )
        optimizer = (kw.get("optimizers") or (None, None))[0]
        if optimizer is not None or kw.get("optimizer_cls_and_kwargs") is not None:
            raise TypeError("ZOTrainer builds its ZOSGD from the zo_* arguments: pass no optimizer")
        super().__init__(model, args, *a, **kw)
        if self.args.n_gpu > 1:
            raise ValueError("ZOTrainer: DataParallel over several GPUs is not supported; run one process per device")
        self.zo_optimizer: ZOSGD | None = None
        self._zo_grads: list[float] = []  # |g| of each step since the last training log
        self._micro_batches: list[dict[str, Any]] = []  # gradient accumulation: this step's inputs so far
        if self.model is not None:
            self.create_optimizer()  # now, so that a bad zo_* setting fails here rather than in train()

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """One ZOSGD over the model's trainable tensors, in the model's order (so that its
        History applies to the model); the Trainer's two decay groups would reorder them."""
        if self.optimizer is None:
            args: ZOTrainingArguments = self.args  # type: ignore[assignment]
            self.optimizer = self.zo_optimizer = _TrainerZOSGD(
                self.model if model is None else model,
                lr=args.learning_rate,
                eps=args.zo_eps,
                weight_decay=args.weight_decay,
                dist=args.zo_dist,
                seed=args.seed if args.zo_seed is None else args.zo_seed,
                rounding=args.zo_rounding,
                clip=args.zo_clip,
                skip_threshold=args.zo_skip_threshold,
                directions=args.zo_directions,
                momentum=args.zo_momentum,
                window=args.zo_window,
                sign=args.zo_sign,
                fuse=args.zo_fuse,
                estimator=args.zo_estimator,
                density=args.zo_density,
                mask_every=args.zo_mask_every,
            )
        return self.optimizer

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """Buffer the micro-batch; on the last one of the optimizer step run one ZO step on the
        loss the stock Trainer would back-propagate (token-weighted over the micro-batches), and
        return L+. Earlier micro-batches return 0: the Trainer adds up one step's returns."""
        self._micro_batches.append(self._prepare_inputs(inputs))
        if not self.accelerator.gradient_state.sync_gradients:
            return torch.zeros((), device=self.args.device)
        batches, self._micro_batches = self._micro_batches, []
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:  # the stock training_step's rule
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )

        def closure() -> torch.Tensor:  # ZOSGD runs it in eval mode, without autograd
            total = torch.zeros((), device=self.args.device)
            for batch in batches:
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(model, batch, num_items_in_batch=num_items_in_batch)
                total = total + (loss if scaled else loss / len(batches))
            return total

        loss_plus = self.zo_optimizer.step(closure)
        self._zo_grads.append(abs(self.zo_optimizer.last.grad))
        return torch.tensor(loss_plus, dtype=torch.float32, device=self.args.device)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.pop("grad_norm", None)
            if self._zo_grads:
                logs["zo_projected_grad"] = sum(self._zo_grads) / len(self._zo_grads)
            self._zo_grads = []
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's save (checkpoints go through it too), then the History that rebuilds the
        saved weights beside them. The weights saved are the trained ones: ZOSGD takes back a
        pending +eps before the module's state_dict() (and records that pass)."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save and self.zo_optimizer is not None:
            folder = self.args.output_dir if output_dir is None else output_dir
            self.zo_optimizer.history.save(os.path.join(folder, HISTORY_FILE))

    def train(self, resume_from_checkpoint: str | bool | None = None, *a: Any, **kw: Any) -> Any:
        """The Trainer's train(), ending on the trained weights (no pending +eps). A checkpoint
        without optimizer state (``save_only_model``) is refused: the ZO step count and History
        would restart, and with them the seeds."""
        checkpoint = (
            get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True else resume_from_checkpoint
        )
        if isinstance(checkpoint, (str, os.PathLike)) and not os.path.isfile(os.path.join(checkpoint, OPTIMIZER_FILE)):
            raise ValueError(
                f"resume_from_checkpoint {os.fspath(checkpoint)!r}: no {OPTIMIZER_FILE} (saved with "
                "save_only_model?), so the ZO step count and History cannot resume"
            )
        output = super().train(resume_from_checkpoint, *a, **kw)
        self.zo_optimizer.settle()
        return output

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """The Trainer's missing/unexpected-key warnings on resume, less the tied names.

        A checkpoint holds each shared tensor once (safetensors stores no aliases, so
        save_pretrained drops ``lm_head.weight``, tied to ``model.embed_tokens.weight``); the
        Trainer loads it with ``load_state_dict(strict=False)`` and would warn that the dropped
        name is missing, although loading the name kept filled the one tensor both names hold.
        A missing name is left out only when its tensor *is* (same object) one loaded under
        another name; an untied head missing from a checkpoint is still warned about."""
        every = dict(remove_duplicate=False)
        aliases: dict[int, set[str]] = {}  # tensor -> every name it goes by
        for name, tensor in (*self.model.named_parameters(**every), *self.model.named_buffers(**every)):
            aliases.setdefault(id(tensor), set()).add(name)
        missing = set(load_result.missing_keys)
        loaded = set().union(*(names for names in aliases.values() if not names <= missing))
        kept = [name for name in load_result.missing_keys if name not in loaded]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=kept))


class _TrainerZOSGD(ZOSGD):
    """ZOSGD as the Trainer's optimizer. The Trainer calls ``optimizer.step()`` without a closure
    after each ``training_step``, where the ZO step has already run: that call does nothing."""

    def step(self, closure: Any = None) -> float | None:  # type: ignore[override]
        return None if closure is None else super().step(closure)
