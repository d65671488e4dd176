"""CPU benchmark of fedkseed.project (docs/stream-spec.md#projection) against the baseline every
Ferret implementation uses, measured in one run.

  fused     fedkseed.project(params, seeds): all K seeds in one pass, z generated in registers,
            float64 products and the spec's fixed-order sums, no noise tensor
  baseline  per seed: torch.manual_seed(s), then per parameter z = torch.normal(0, 1, p.shape)
            and torch.dot(p, z) (K full passes, one noise tensor per parameter and seed)

Parameters: SmolLM2-135M-shaped float32 tensors (134,515,008 elements in 272 tensors). The fused
op runs on the full set for K up to --full-k-max; larger K run on the first --subset-layers decoder
layers and are scaled to the full set by element count (the work is K x elements, one chunk of
4096 at a time). The baseline is timed for --baseline-seeds seeds over the full set and scaled
linearly in K (each seed is an independent pass). Every scaled figure is marked in the table.
Timings: median of --reps interleaved repetitions; wall time and process CPU time (the fair
measure on a shared machine). Usage: python benchmarks/bench_project.py [--quick] [--threads N].
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_cpu import kernel_bench_parser, machine, measure, setup_kernel_bench
from smollm2_shape import llama_shapes, make_params, smollm2_135m_shapes

import fedkseed
from fedkseed.paramset import ParamSet


def baseline(tensors: list[torch.Tensor], seeds: list[int]) -> list[float]:
    """The Ferret-style projection: materialise each z with torch.normal, then torch.dot."""
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        total = 0.0
        for p in tensors:
            z = torch.normal(0, 1, size=p.shape, dtype=p.dtype)
            total += float(torch.dot(p.reshape(-1), z.reshape(-1)))
        out.append(total)
    return out


def main() -> None:
    ap = kernel_bench_parser(__doc__, "small Llama shape, K = 16 and 64 (CI smoke test)", 3)
    ap.add_argument("--ks", default="16,256,4096", help="numbers of seeds")
    ap.add_argument("--full-k-max", type=int, default=256, help="largest K run on the full set")
    ap.add_argument("--subset-layers", type=int, default=1, help="decoder layers for larger K")
    ap.add_argument("--baseline-seeds", type=int, default=16, help="seeds the baseline is timed for")
    args = ap.parse_args()
    setup_kernel_bench(args)
    ks = [int(k) for k in args.ks.split(",")]
    if args.quick:
        shapes, ks, reps = llama_shapes(2, 576, 1536, 9, 3, 4096, tied=True), [16, 64], 1
    else:
        shapes, reps = smollm2_135m_shapes(), args.reps
    named = make_params(shapes)
    full = ParamSet(named)
    prefixes = tuple(f"model.layers.{i}." for i in range(args.subset_layers))
    subset = ParamSet([(n, p) for n, p in named if n.startswith(prefixes)])
    n = full.numel
    load_before = os.getloadavg()[0]
    print(f"# {machine()}; threads {torch.get_num_threads()}")
    print(f"# {len(full)} float32 tensors, {n:,} elements; load average {load_before:.2f} at start")

    base_seeds = list(range(1, args.baseline_seeds + 1))
    cases = {"baseline": lambda: baseline(full.tensors, base_seeds)}
    scale = {}
    for k in ks:
        on_full = k <= args.full_k_max or args.quick
        pset = full if on_full else subset
        seeds = list(range(1, k + 1))
        cases[f"fused{k}"] = lambda pset=pset, seeds=seeds: fedkseed.project(pset, seeds)
        scale[k] = 1.0 if on_full else n / pset.numel
    start = time.perf_counter()
    wall, cpu = measure(cases, reps)
    load_after = os.getloadavg()[0]

    per_seed_wall = wall["baseline"] / len(base_seeds)
    per_seed_cpu = cpu["baseline"] / len(base_seeds)
    print()
    print(
        "| K | fused wall s | fused CPU s | baseline wall s | baseline CPU s | speed-up (wall) | speed-up (CPU) |"
        " fused normals/s (CPU) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k in ks:
        fw, fc = wall[f"fused{k}"] * scale[k], cpu[f"fused{k}"] * scale[k]
        bw, bc = per_seed_wall * k, per_seed_cpu * k
        mark_f = "*" if scale[k] != 1.0 else ""
        mark_b = "" if k == len(base_seeds) else "+"
        print(
            f"| {k} | {fw:.2f}{mark_f} | {fc:.2f}{mark_f} | {bw:.1f}{mark_b} | {bc:.1f}{mark_b} | {bw / fw:.1f}x |"
            f" {bc / fc:.1f}x | {k * n / fc:.3g} |"
        )
    print()
    print(f"* measured on the first {args.subset_layers} decoder layer(s) ({subset.numel:,} elements), scaled")
    print("  to the full set by element count.")
    print(f"+ the baseline timed for {len(base_seeds)} seeds over the full set, scaled linearly in K.")
    print(
        f"Median of {reps} interleaved repetitions; {time.perf_counter() - start:.0f} s in all; load average"
        f" {load_before:.2f} -> {load_after:.2f} (other processes share the CPU when above ~0)."
    )


if __name__ == "__main__":
    main()
