"""CPU benchmark of the magnitude mask (docs/stream-spec.md#magnitude-mask), measured in one run.

  thresholds  fedkseed.ops.magnitude_thresholds(params, density): torch.kthvalue per tensor (timed
              once per density: it is done once per mask epoch, and it is the slow part)
  build       fedkseed.ops.magnitude_mask(params, thresholds): the C++ kernel, 1 bit per element
  dense       fedkseed.perturb_(params, seed, eps): the unmasked replay (K = 1)
  masked      the same call with mask=: the masked replay, against the dense one (ratio)

Parameters: SmolLM2-135M-shaped tensors (134,515,008 elements in 272 tensors). Timings are the
median of --reps interleaved repetitions, in wall time and in process CPU time (the fair measure
on a shared machine). The perturbations alternate +eps / -eps, so the weights stay where they
are. Usage: python benchmarks/bench_mask.py [--quick] [--threads N] [--dtype bfloat16].
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_cpu import EPS, kernel_bench_parser, machine, measure, setup_kernel_bench
from smollm2_shape import llama_shapes, make_params, smollm2_135m_shapes

from fedkseed import ops
from fedkseed.paramset import ParamSet


def main() -> None:
    ap = kernel_bench_parser(__doc__, "2 layers of SmolLM2, vocab 4096 (smoke test)", 3)
    ap.add_argument("--densities", default="0.01,0.1,0.5", help="mask densities rho")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    setup_kernel_bench(args)
    shapes = llama_shapes(2, 576, 1536, 9, 3, 4096, tied=True) if args.quick else smollm2_135m_shapes()
    pset = ParamSet(make_params(shapes, dtype=getattr(torch, args.dtype)))
    densities = [float(d) for d in args.densities.split(",")]
    load_before = os.getloadavg()[0]
    print(f"# {machine()}; threads {torch.get_num_threads()}")
    print(f"# {len(pset)} {args.dtype} tensors, {pset.numel:,} elements; load average {load_before:.2f} at start")

    thresholds, threshold_wall, threshold_cpu = {}, {}, {}
    for rho in densities:
        start, start_cpu = time.perf_counter(), time.process_time()
        thresholds[rho] = ops.magnitude_thresholds(pset, rho)
        threshold_wall[rho], threshold_cpu[rho] = time.perf_counter() - start, time.process_time() - start_cpu
    masks = {rho: ops.magnitude_mask(pset, thresholds[rho]) for rho in densities}
    sign = [1.0]

    def perturb(mask=None) -> None:
        sign[0] = -sign[0]
        ops.perturb_(pset, 7, sign[0] * EPS, mask=mask)

    cases = {"dense": perturb}
    for rho in densities:
        cases[f"build{rho}"] = lambda rho=rho: ops.magnitude_mask(pset, thresholds[rho])
        cases[f"masked{rho}"] = lambda rho=rho: perturb(masks[rho])
    start = time.perf_counter()
    wall, cpu = measure(cases, args.reps)
    load_after = os.getloadavg()[0]

    print()
    print(
        "| density | selected | thresholds wall / CPU s | build wall / CPU s | masked replay wall / CPU s |"
        " dense replay wall / CPU s | masked / dense (CPU) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for rho in densities:
        selected = sum(bin(b).count("1") for b in masks[rho].tolist()) / pset.numel
        print(
            f"| {rho} | {selected:.3f} | {threshold_wall[rho]:.2f} / {threshold_cpu[rho]:.2f} |"
            f" {wall[f'build{rho}']:.3f} / {cpu[f'build{rho}']:.3f} |"
            f" {wall[f'masked{rho}']:.2f} / {cpu[f'masked{rho}']:.2f} |"
            f" {wall['dense']:.2f} / {cpu['dense']:.2f} | {cpu[f'masked{rho}'] / cpu['dense']:.2f} |"
        )
    print()
    print(
        f"Build and replays: median of {args.reps} interleaved repetitions; thresholds: one run each;"
        f" {time.perf_counter() - start:.0f} s for the repetitions; load average"
        f" {load_before:.2f} -> {load_after:.2f} (other processes share the CPU when above ~0)."
    )


if __name__ == "__main__":
    main()
