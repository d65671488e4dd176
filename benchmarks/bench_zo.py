"""A ZO step's cost on a real model: time, share spent in perturbation passes, and peak memory
against inference, for ``fedkseed.ZOSGD`` (default two-pass step, q = 4 directions, momentum
window W = 8) against MeZO-style steps in the same run.

    python benchmarks/bench_zo.py                           # SmolLM2-135M-shaped Llama
    python benchmarks/bench_zo.py --models small --reps 2   # quick

MeZO (and FedKSeed's official code) perturbs with ``torch.manual_seed(seed)`` then, per
parameter, ``torch.normal`` + add: four passes per direction (+eps, -2eps, +eps, update); with q
directions (MeZO's ``zero_order_sample``) that is 4q passes and 2q forwards. ZOSGD chains the
probes and fuses restore, update and the next step's +eps: 2q passes per step in steady state,
the update one multi-seed pass (q seeds, or q * W with momentum). Each method runs whole steps
(forwards included) on the same model and batch, in the same process, interleaved; its
perturbation time is the same optimizer's step with a closure that returns scripted losses (no
forward), so share = perturbation time / step time. Peak memory is the process's peak resident
set (VmHWM, reset through /proc/self/clear_refs) during two steps, each method in a fresh
process after one warm-up forward, against two forwards alone. Models are random-init
LlamaForCausalLM, float32, CPU.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from smollm2_shape import SMOLLM2_135M_CONFIG  # the script's folder is on sys.path

import fedkseed
from fedkseed import ZOSGD, ParamSet
from fedkseed.testing.mezo import mezo_step  # the MeZO-style baseline, shared with convergence.py

CONFIGS = {
    "small": dict(
        vocab_size=8192,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "smollm2-135m": SMOLLM2_135M_CONFIG,
}
EPS, LR = 1e-3, 1e-6
MOMENTUM = dict(momentum=0.9, window=8)
# label -> (q directions, ZOSGD keyword arguments, or None for the MeZO-style step)
METHODS: dict[str, tuple[int, dict | None]] = {
    "MeZO-style, q=1": (1, None),
    "ZOSGD default (two-pass)": (1, {}),
    "ZOSGD momentum W=8": (1, MOMENTUM),
    "MeZO-style, q=4": (4, None),
    "ZOSGD q=4": (4, {"directions": 4}),
}


def build(name: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(max_position_embeddings=256, **CONFIGS[name])).eval()


def scripted_losses() -> Callable[[], float]:
    """A closure without a forward whose losses give g != 0 (so every pass is the real one)."""
    values = itertools.cycle([1.0, 0.999])
    return lambda: next(values)


def zo_optimizer(pset: ParamSet, kwargs: dict, warm: int) -> ZOSGD:
    opt = ZOSGD(pset, lr=LR, eps=EPS, seed=0, **kwargs)
    for _ in range(warm):  # fill the momentum window: the update pass carries W seeds
        opt.step(scripted_losses())
    return opt


def passes_per_step(q: int, kwargs: dict | None) -> int:
    return 4 * q if kwargs is None else 2 * q


# ------------------------------------------------------------------------------- measurement
def timed_interleaved(fns: dict[str, Callable[[int], None]], reps: int) -> dict[str, float]:
    """Least time of each function over ``reps`` rounds, the functions interleaved in every
    round: other processes share these cores, and interleaving spreads their load evenly."""
    for fn in fns.values():
        fn(10_000)  # warm-up (and kernel tables)
    best = {key: float("inf") for key in fns}
    for r in range(reps):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn(r)
            best[key] = min(best[key], time.perf_counter() - start)
    return best


def setup(name: str, seq: int):
    model = build(name)
    pset = ParamSet(model)
    ids = torch.randint(0, CONFIGS[name]["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(0))
    return model, pset, lambda: model(input_ids=ids, labels=ids).loss


def bench(name: str, seq: int, reps: int) -> list[dict]:
    _model, pset, closure = setup(name, seq)  # the closure holds the model
    params = pset.tensors
    fns: dict[str, Callable[[int], None]] = {"forward": lambda s: closure()}
    for label, (q, kwargs) in METHODS.items():
        if kwargs is None:
            fns[label + "/passes"] = lambda s, q=q: mezo_step(params, scripted_losses(), 100 * s, lr=LR, eps=EPS, q=q)
            fns[label + "/step"] = lambda s, q=q: mezo_step(params, closure, 100 * s, lr=LR, eps=EPS, q=q)
        else:
            warm = kwargs.get("window", 0)
            timing, training = zo_optimizer(pset, kwargs, warm), zo_optimizer(pset, kwargs, warm)
            fns[label + "/passes"] = lambda s, o=timing: o.step(scripted_losses())
            fns[label + "/step"] = lambda s, o=training: o.step(closure)
    with torch.inference_mode():
        best = timed_interleaved(fns, reps)
    print(
        f"# {name}: {pset.numel:,} parameters in {len(pset)} tensors, batch 1x{seq}, backend "
        f"{fedkseed.resolve_backend(None, pset.device)}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rows = []
    for label, (q, kwargs) in METHODS.items():
        rows.append(
            dict(
                model=name,
                label=label,
                q=q,
                passes=passes_per_step(q, kwargs),
                forwards=2 * q * best["forward"],
                pass_s=best[label + "/passes"],
                step_s=best[label + "/step"],
                mezo=kwargs is None,
            )
        )
    return rows


# ------------------------------------------------------------------------------------ memory
def peak_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set


def measure_peak(name: str, seq: int, label: str) -> int:
    """Peak resident KiB while running two steps of ``label`` (or two forwards for
    "inference"), after one warm-up forward, in this (fresh) process."""
    _model, pset, closure = setup(name, seq)  # the closure holds the model
    with torch.inference_mode():
        closure()
        if label == "inference":
            run = lambda s: closure()  # noqa: E731
        elif METHODS[label][1] is None:
            run = lambda s: mezo_step(pset.tensors, closure, s, lr=LR, eps=EPS, q=METHODS[label][0])  # noqa: E731
        else:
            opt = zo_optimizer(pset, METHODS[label][1], 0)
            run = lambda s: opt.step(closure)  # noqa: E731
        reset_peak()
        for s in range(2):
            run(s)
        return peak_kib()


def peaks(name: str, seq: int) -> dict[str, int]:
    out = {}
    for label in ["inference", *METHODS]:
        cmd = [sys.executable, __file__, "--peak-of", label, "--models", name, "--seq", str(seq)]
        out[label] = int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m"], choices=list(CONFIGS))
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)  # internal: one memory measurement
    args = parser.parse_args()
    if args.peak_of:
        print(measure_peak(args.models[0], args.seq, args.peak_of))
        return
    if not fedkseed.ops.has_kernel("CPU"):
        print("# note: the CPU kernels are not built; ZOSGD rows use the (slow) reference backend")
    print(
        "| model | method | passes/step | perturbation s/step | forwards s | step s | share in passes "
        "| step vs MeZO-style (same q) | peak RSS MiB | vs inference |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        rows = bench(name, args.seq, args.reps)
        memory = {} if args.no_memory else peaks(name, args.seq)
        mezo = {r["q"]: r["step_s"] for r in rows if r["mezo"]}
        for r in rows:
            peak = memory.get(r["label"])
            mem = f"{peak / 1024:.0f} | {peak / memory['inference']:.2f}x" if peak else "- | -"
            print(
                f"| {name} | {r['label']} | {r['passes']} | {r['pass_s']:.3f} | {r['forwards']:.3f} | "
                f"{r['step_s']:.3f} | {100 * r['pass_s'] / r['step_s']:.0f}% | "
                f"{mezo[r['q']] / r['step_s']:.1f}x | {mem} |"
            )
        if memory:
            print(f"# {name}: inference (two forwards) peaks at {memory['inference'] / 1024:.0f} MiB resident")


if __name__ == "__main__":
    main()
