"""Share of a ZO step's time spent on perturbations: MeZO-style against fedkseed's fused passes.

    python benchmarks/bench_zo.py                 # small model + SmolLM2-135M-shaped model
    python benchmarks/bench_zo.py --models small  # quick

MeZO (and FedKSeed's official code) makes four passes per step (+eps, -2eps, +eps, update), each
``torch.manual_seed(seed)`` then per parameter ``torch.normal`` + add. fedkseed makes three fused
passes (``zo_step``), or two when the next step's +eps joins the update pass (``next_seed``).
Each method runs whole steps (two forwards included) on the same model and batch, in the same
process; the perturbation time is measured on its own (the same passes without forwards), so
share = perturbation time / step time. Models are random-init LlamaForCausalLM, float32, CPU.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import fedkseed
from fedkseed import ParamSet, replay_, zo_step

CONFIGS = {
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # SmolLM2-135M: 30 layers, hidden 576, intermediate 1536, 9 heads / 3 kv heads, vocab 49152.
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True),
}
EPS, LR = 1e-3, 1e-6


def build(name: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(max_position_embeddings=256, **CONFIGS[name])).eval()


# ------------------------------------------------------------------------- MeZO-style baseline
def mezo_perturb(params: list[torch.Tensor], seed: int, scale: float) -> None:
    """princeton-nlp/MeZO zo_perturb_parameters: reseed, then normal + add per parameter."""
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0, std=1, size=p.shape, device=p.device, dtype=p.dtype)
        p.data = p.data + scale * EPS * z


def mezo_step(params: list[torch.Tensor], closure: Callable, seed: int) -> None:
    mezo_perturb(params, seed, 1)
    lp = float(closure())
    mezo_perturb(params, seed, -2)
    lm = float(closure())
    mezo_perturb(params, seed, 1)
    g = (lp - lm) / (2 * EPS)
    mezo_perturb(params, seed, -LR * g / EPS)  # the update pass regenerates z the same way


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


def bench(name: str, seq: int, reps: int) -> list[tuple]:
    model = build(name)
    pset = ParamSet(model)
    params = pset.tensors
    ids = torch.randint(0, CONFIGS[name]["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(0))
    closure = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    backend = fedkseed.resolve_backend("auto", pset.device)

    def fused3_passes(s: int) -> None:
        replay_(pset, [s], [EPS])
        replay_(pset, [s], [-2 * EPS])
        replay_(pset, [s], [EPS - LR * 0.5])

    def fused2_passes(s: int) -> None:
        replay_(pset, [s], [-2 * EPS])
        replay_(pset, [s, s + 1], [EPS - LR * 0.5, EPS])

    state = {"next": None}

    def fused2_step(s: int) -> None:
        perturbed = state["next"] == s
        zo_step(pset, closure, s, eps=EPS, lr=LR, next_seed=s + 1, perturbed=perturbed)
        state["next"] = s + 1

    methods = {
        "MeZO-style (4 passes)": (
            lambda s: [mezo_perturb(params, s, c) for c in (1, -2, 1, -0.5)],
            lambda s: mezo_step(params, closure, s),
        ),
        "fused (3 passes)": (fused3_passes, lambda s: zo_step(pset, closure, s, eps=EPS, lr=LR)),
        "fused + next seed (2 passes)": (fused2_passes, fused2_step),
    }
    fns: dict[str, Callable[[int], None]] = {"forward": lambda s: closure()}
    for label, (passes, step) in methods.items():
        fns[label + "/passes"] = passes
        fns[label + "/step"] = (lambda st: lambda s: st(100 + s))(step)
    with torch.inference_mode():
        best = timed_interleaved(fns, reps)
    print(f"# {name}: {pset.numel:,} parameters in {len(pset)} tensors, batch 1x{seq}, "
          f"backend {backend}, {torch.get_num_threads()} threads", flush=True)
    return [
        (name, f"{pset.numel / 1e6:.1f}M", label, best[label + "/passes"], 2 * best["forward"],
         best[label + "/step"])
        for label in methods
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    if not fedkseed.ops.has_kernel("CPU"):
        print("# note: the CPU kernels are not built; fused rows use the (slow) reference backend")
    rows = [row for name in args.models for row in bench(name, args.seq, args.reps)]
    print()
    print("| model | params | method | perturbation s/step | 2 forwards s | step s | share in perturbations | perturbation speedup vs MeZO |")
    print("|---|---|---|---|---|---|---|---|")
    base = {}
    for name, size, label, t_pass, t_fwd, t_step in rows:
        base.setdefault(name, t_pass)
        print(f"| {name} | {size} | {label} | {t_pass:.3f} | {t_fwd:.3f} | {t_step:.3f} | "
              f"{100 * t_pass / t_step:.0f}% | {base[name] / t_pass:.1f}x |")


if __name__ == "__main__":
    main()
