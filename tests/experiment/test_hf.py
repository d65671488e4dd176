"""fedkseed.hf.ZOTrainer: a transformers.Trainer that trains by ZO steps, on a tiny Llama.

Checked against independent measurements: held-out loss computed here (not by the Trainer),
the scheduler's lr recomputed from its formula, weights rebuilt from the saved History, a
resumed run against an uninterrupted one, PEFT's frozen tensors against their initial bits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import warnings

import numpy as np
import peft  # in requirements.txt (the llm extra): LoRA is tested for real, never skipped
import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

import fedkseed
from fedkseed import models
from fedkseed.hf import HISTORY_FILE, ZOTrainer, ZOTrainingArguments

VOCAB = 64
LENGTH = 16
STEPS = 8
SAVE_STEPS = 4
LR = 2e-3
WARMUP = 2
WEIGHT_DECAY = 0.01


# ------------------------------------------------------------------------------------ helpers
def tiny_llama(dropout: float = 0.0, tied: bool = True) -> LlamaForCausalLM:
    """models.TINY_SHAPE (tied embeddings, as SmolLM2) with a 64-token vocabulary; the same
    weights for every dropout."""
    shape = {**models.TINY_SHAPE, "max_position_embeddings": 32, "tie_word_embeddings": tied}
    config = LlamaConfig(vocab_size=VOCAB, **shape, attention_dropout=dropout)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config)


def lora(model: torch.nn.Module) -> torch.nn.Module:
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft 0.21 reads a deprecated transformers attribute
        torch.manual_seed(1)
        return peft.get_peft_model(model, config)


def token_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Counting sequences (next token = token + 1 mod VOCAB) from random starts: learnable."""
    starts = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))
    rows = (starts[:, None] + torch.arange(LENGTH)) % VOCAB
    return [{"input_ids": row, "labels": row.clone()} for row in rows]


def heldout_loss(model: torch.nn.Module, rows: list[dict[str, torch.Tensor]]) -> float:
    """Mean next-token cross-entropy, computed here rather than by the Trainer."""
    ids = torch.stack([r["input_ids"] for r in rows])
    with torch.no_grad():
        model.eval()
        logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()


def arguments(out: pathlib.Path, **overrides) -> ZOTrainingArguments:
    settings = dict(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=WARMUP,
        weight_decay=WEIGHT_DECAY,
        logging_steps=1,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        zo_eps=1e-3,
        zo_seed=7,
    )
    settings.update(overrides)
    return ZOTrainingArguments(**settings)


class StepRecorder(TrainerCallback):
    """The ZOStepResult of every step, read right after the step."""

    def __init__(self) -> None:
        self.trainer: ZOTrainer | None = None
        self.results: list[fedkseed.ZOStepResult] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.results.append(self.trainer.zo_optimizer.last)


def train(out: pathlib.Path, model: torch.nn.Module, resume: str | None = None, **overrides):
    recorder = StepRecorder()
    trainer = ZOTrainer(
        model=model, args=arguments(out, **overrides), train_dataset=token_data(32, 1), callbacks=[recorder]
    )
    recorder.trainer = trainer
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder.results


@contextlib.contextmanager
def warnings_given():
    """The messages of everything warned inside the block: transformers' logger at WARNING (it
    does not propagate to the root logger, so caplog would miss it) and warnings.warn."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("transformers")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        logger.removeHandler(handler)
        transformers.logging.set_verbosity(verbosity)


def steps_of(history: fedkseed.History) -> list:
    """The History's completed ZO steps (without the settle entries that saves add)."""
    return [e for e in history if e.aborted is None and e.probes]


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differing = [name for name in a if not torch.equal(a[name], b[name])]
    assert not differing, f"{len(differing)} tensors differ, first {differing[0]}"


@pytest.fixture(autouse=True, scope="module")
def quiet_single_thread():
    # One thread: tiny matmuls on a loaded 2-core machine otherwise spend ~20x longer in OpenMP waits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One uninterrupted run, with dropout configured (ZO steps must not see it)."""
    out = tmp_path_factory.mktemp("run")
    trainer, results = train(out, tiny_llama(dropout=0.3))
    return out, trainer, results


# -------------------------------------------------------------------------------------- tests
def test_loss_falls_on_heldout_data(tmp_path):
    model = tiny_llama()
    heldout = token_data(32, 2)
    before = heldout_loss(model, heldout)
    trainer, _ = train(tmp_path, model, max_steps=100, learning_rate=LR, warmup_steps=0, save_strategy="no")
    after = heldout_loss(model, heldout)
    print(f"held-out loss {before:.4f} -> {after:.4f}")
    assert after < before - 0.05, (before, after)
    # The Trainer's own evaluation runs too, on the same weights.
    assert trainer.evaluate(heldout)["eval_loss"] == pytest.approx(after, rel=1e-4)


def test_scheduler_lr_is_what_each_step_uses_and_records(run):
    _, trainer, results = run
    logged = [h["learning_rate"] for h in trainer.state.log_history if "loss" in h]
    # The linear schedule, recomputed: warm up from 0 over WARMUP steps, then down to 0.
    expected = [LR * t / WARMUP if t < WARMUP else LR * (STEPS - t) / (STEPS - WARMUP) for t in range(STEPS)]
    assert logged == pytest.approx(expected, rel=1e-12)
    entries = steps_of(trainer.zo_optimizer.history)
    assert len(entries) == len(results) == STEPS
    for t, (entry, result) in enumerate(zip(entries, results)):
        # The update applied and recorded is -lr * g (rounded to float32) with this step's lr.
        assert result.grad != 0.0 and entry.probes == entry.seeds
        assert entry.alphas[0][0] == float(np.float32(-logged[t] * result.grad)), t
        assert entry.decays[0] == pytest.approx(1.0 - logged[t] * WEIGHT_DECAY, rel=1e-7), t
    assert [h["loss"] for h in trainer.state.log_history if "loss" in h] == [r.loss_plus for r in results]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["zo_projected_grad"] for h in logs] == [abs(r.grad) for r in results]
    assert not any("grad_norm" in h for h in trainer.state.log_history)


def test_history_beside_each_checkpoint_replays_to_its_weights(run):
    out, trainer, _ = run
    for step in (SAVE_STEPS, STEPS):
        folder = out / f"checkpoint-{step}"
        history = fedkseed.History.load(folder / HISTORY_FILE)
        assert len(steps_of(history)) == step
        rebuilt = tiny_llama()
        history.apply_(rebuilt)
        saved = load_file(folder / "model.safetensors")
        # Tied embeddings are saved once: compare every tensor the checkpoint holds.
        assert_bit_identical({n: w for n, w in weights(rebuilt).items() if n in saved}, saved)
    rebuilt = tiny_llama()
    fedkseed.History.load(out / f"checkpoint-{STEPS}" / HISTORY_FILE).apply_(rebuilt)
    assert_bit_identical(weights(rebuilt), weights(trainer.model))


def test_resume_from_checkpoint_is_bit_identical_and_quiet(run, tmp_path):
    """Resuming warns about nothing: not about lm_head.weight, which the checkpoint holds once as
    the tied model.embed_tokens.weight; the head stays tied."""
    out, trainer, _ = run
    assert "lm_head.weight" not in load_file(out / f"checkpoint-{SAVE_STEPS}" / "model.safetensors")
    with warnings_given() as given:
        resumed, results = train(tmp_path, tiny_llama(dropout=0.3), resume=str(out / f"checkpoint-{SAVE_STEPS}"))
    assert given == []
    assert len(results) == STEPS - SAVE_STEPS
    assert resumed.zo_optimizer.history == trainer.zo_optimizer.history
    assert_bit_identical(weights(resumed.model), weights(trainer.model))
    assert resumed.model.lm_head.weight is resumed.model.model.embed_tokens.weight


def test_resume_into_an_untied_model_still_warns_of_the_missing_head(run, tmp_path):
    """The tied checkpoint lacks lm_head.weight; a model whose head is its own tensor really
    misses it, and the Trainer's warning stays (then ZOSGD refuses the other layout's state)."""
    out, _, _ = run
    with warnings_given() as given, pytest.raises(ValueError, match="different parameter layout"):
        train(tmp_path, tiny_llama(tied=False), resume=str(out / f"checkpoint-{SAVE_STEPS}"))
    assert "There were missing keys in the checkpoint model loaded: ['lm_head.weight']." in given


def test_closure_runs_in_eval_mode(run, tmp_path):
    """Dropout 0.3 (the run) and no dropout train to the same bits: ZO never saw dropout."""
    _, trainer, _ = run
    plain, _ = train(tmp_path, tiny_llama(dropout=0.0))  # the same saves: each one settles the weights
    assert_bit_identical(weights(plain.model), weights(trainer.model))


def test_lora_moves_only_the_adapters(tmp_path):
    model = lora(tiny_llama())
    before = weights(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    train(tmp_path, model, max_steps=6, save_steps=3)
    after = weights(model)
    frozen = [n for n in before if n not in trainable]
    assert len(frozen) > len(trainable)
    assert_bit_identical({n: after[n] for n in frozen}, {n: before[n] for n in frozen})
    assert all(not torch.equal(after[n], before[n]) for n in trainable)
    assert {"adapter_model.safetensors", HISTORY_FILE} <= set(os.listdir(tmp_path / "checkpoint-6"))
    rebuilt = lora(tiny_llama())
    fedkseed.History.load(tmp_path / "checkpoint-6" / HISTORY_FILE).apply_(rebuilt)
    assert_bit_identical(weights(rebuilt), after)


def test_gradient_accumulation_is_one_zo_step_on_the_whole_batch(tmp_path):
    """2 micro-batches of 2 take the same ZO steps as batches of 4: same seeds, one history
    entry per optimizer step, and the same losses up to the rounding of a split sum."""
    whole, whole_results = train(tmp_path / "whole", tiny_llama(), save_strategy="no")
    split, split_results = train(
        tmp_path / "split",
        tiny_llama(),
        save_strategy="no",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )
    assert len(steps_of(split.zo_optimizer.history)) == len(steps_of(whole.zo_optimizer.history)) == STEPS
    assert [e.probes for e in split.zo_optimizer.history] == [e.probes for e in whole.zo_optimizer.history]
    for a, b in zip(split_results, whole_results):
        assert a.loss_plus == pytest.approx(b.loss_plus, rel=1e-5)
        assert a.grad == pytest.approx(b.grad, rel=1e-2, abs=1e-2)  # g = (L+ - L-) / 2eps amplifies rounding
    logged = [h["loss"] for h in split.state.log_history if "loss" in h]
    assert logged == [r.loss_plus for r in split_results]
    for name, w in weights(split.model).items():
        torch.testing.assert_close(w, weights(whole.model)[name], rtol=0, atol=2e-5)  # updates are ~1e-3


def test_estimator_arguments_reach_zosgd_and_replay(tmp_path):
    """zo_directions / zo_momentum / zo_window choose the estimator: 2 probes a step, updates
    over the last 3 steps' seeds; the History still rebuilds the weights bit for bit."""
    with pytest.warns(UserWarning, match=r"momentum=0.5 with window=3 keeps 88% \(1 - 0.5\^3\)"):
        trainer, _ = train(
            tmp_path, tiny_llama(), max_steps=4, save_strategy="no", zo_directions=2, zo_momentum=0.5, zo_window=3
        )
    entries = steps_of(trainer.zo_optimizer.history)
    assert [len(e.probes) for e in entries] == [2] * 4
    assert [len(e.seeds) for e in entries] == [2, 4, 6, 6]
    assert trainer.zo_optimizer.pending is None  # train() ends on the trained weights, not at +eps
    rebuilt = tiny_llama()
    trainer.zo_optimizer.history.apply_(rebuilt)
    assert_bit_identical(weights(rebuilt), weights(trainer.model))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(fp16=True), "fp16=True needs a GradScaler"),
        (
            dict(load_best_model_at_end=True, eval_strategy="steps", metric_for_best_model="loss"),
            "load_best_model_at_end would swap in weights",
        ),
    ],
)
def test_arguments_a_zo_step_cannot_honour_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        arguments(tmp_path, **overrides)


def test_trainer_refuses_what_cannot_work(tmp_path):
    model = tiny_llama()
    data = token_data(8, 1)
    plain = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(TypeError, match=r"needs fedkseed\.hf\.ZOTrainingArguments"):
        ZOTrainer(model=model, args=plain, train_dataset=data)
    zosgd = fedkseed.ZOSGD(model, lr=1e-3, eps=1e-3)
    with pytest.raises(TypeError, match="builds its ZOSGD from the zo_\\* arguments: pass no optimizer"):
        ZOTrainer(model=model, args=arguments(tmp_path), train_dataset=data, optimizers=(zosgd, None))
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        ZOTrainer(model=model, args=arguments(tmp_path, zo_eps=0.0), train_dataset=data)


def test_resume_without_optimizer_state_is_refused(tmp_path):
    """save_only_model checkpoints lack optimizer.pt: resuming would restart the ZO seeds."""
    train(tmp_path, tiny_llama(), max_steps=2, save_steps=2, save_only_model=True)
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / HISTORY_FILE).is_file() and not (checkpoint / "optimizer.pt").exists()
    before = weights(model := tiny_llama())
    with pytest.raises(ValueError, match=r"no optimizer\.pt"):
        train(tmp_path, model, resume=str(checkpoint))
    assert_bit_identical(weights(model), before)
