"""CPU benchmark of the fused kernels against the MeZO-style baseline, measured in one run.

Cases (SmolLM2-135M-shaped float32 parameters, 134,515,008 elements in 272 tensors):
  floor    one read+write pass `p.add_(1.0)` over the same tensors: the memory-bandwidth floor
  mezo     `torch.manual_seed(s)`, then per parameter `z = torch.normal(0, 1, size=p.shape,
           dtype=p.dtype); p.data = p.data + eps*z` (MeZO / official FedKSeed)
  perturb_ fedkseed.perturb_ (gaussian, rademacher): one fused pass, z generated in registers
  replay_  fedkseed.replay_ with K seeds in one pass, against K MeZO passes (per seed)

Repetitions are interleaved (every case once per round) and the median is reported, so the
ratios come from the same conditions. Usage: python benchmarks/bench_cpu.py [--quick]
[--threads N] [--reps R].
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from smollm2_shape import llama_shapes, make_params, smollm2_135m_shapes

import fedkseed  # noqa: F401
from fedkseed import ops
from fedkseed.paramset import ParamSet

EPS = 1e-3


def mezo_pass(tensors: list[torch.Tensor], seed: int, scale: float = EPS) -> None:
    torch.manual_seed(seed)
    for p in tensors:
        z = torch.normal(0, 1, size=p.shape, dtype=p.dtype)
        p.data = p.data + scale * z


def floor_pass(tensors: list[torch.Tensor]) -> None:
    for p in tensors:
        p.add_(1.0)


def measure(cases: dict[str, Callable[[], None]], reps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall seconds and median process CPU seconds of each case; one warm-up call each,
    then ``reps`` interleaved rounds. CPU time is the fair measure when other processes share
    the cores (with one thread it is the time the case actually ran)."""
    for fn in cases.values():
        fn()
    wall: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    med = statistics.median
    return {n: med(t) for n, t in wall.items()}, {n: med(t) for n, t in cpu.items()}


def machine() -> str:
    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__}, ISA {torch.ops.fedkseed.cpu_isa()}"


def row(
    name: str, seconds: float, cpu: float, work: float, ratio: str, cpu_ratio: str, nbytes: float | None, floor: float
) -> str:
    bw = f"{nbytes / seconds / 1e9:6.1f}" if nbytes else "     -"
    return (
        f"| {name:<38} | {seconds * 1e3:9.1f} | {cpu * 1e3:9.1f} | {work / seconds / 1e6:8.0f} | {ratio:>7} |"
        f" {cpu_ratio:>7} | {bw} | {f'{floor / seconds * 100:.0f}%' if nbytes else '-':>5} |"
    )


def kernel_bench_parser(doc: str, quick: str, reps: int) -> argparse.ArgumentParser:
    """The options of every CPU kernel benchmark (this one, bench_project, bench_mask)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: all)")
    ap.add_argument("--reps", type=int, default=reps, help="interleaved repetitions per case")
    return ap


def setup_kernel_bench(args: argparse.Namespace) -> None:
    """Apply --threads; stop with the fix when the compiled kernels the benchmark times are missing."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if not ops.has_kernel("CPU"):
        sys.exit("fedkseed._C is not built: run `python setup.py build_ext --inplace`")


def main() -> None:
    args = kernel_bench_parser(__doc__, "small Llama shape (CI smoke test)", 5).parse_args()
    setup_kernel_bench(args)

    if args.quick:
        shapes = llama_shapes(2, 576, 1536, 9, 3, 4096, tied=True)
        reps, subset_layers = min(args.reps, 3), 1
    else:
        shapes = smollm2_135m_shapes()
        reps, subset_layers = args.reps, 1
    named = make_params(shapes)
    pset = ParamSet(named)
    tensors = pset.tensors
    n = pset.numel
    nbytes = 8.0 * n  # float32: read 4 B + write 4 B per element and pass
    load_before = os.getloadavg()[0]
    print(f"# {machine()}; threads {torch.get_num_threads()}")
    print(f"# {len(tensors)} float32 tensors, {n:,} elements; load average {load_before:.2f} at start")

    seeds16 = list(range(1, 17))
    alphas16 = [EPS] * 16
    t, c = measure(
        {
            "floor": lambda: floor_pass(tensors),
            "mezo": lambda: mezo_pass(tensors, 1),
            "perturb_gauss": lambda: ops.perturb_(pset, 1, EPS, "gaussian"),
            "perturb_rade": lambda: ops.perturb_(pset, 1, EPS, "rademacher"),
            "replay16_gauss": lambda: ops.replay_(pset, seeds16, alphas16, "gaussian"),
            "replay16_rade": lambda: ops.replay_(pset, seeds16, alphas16, "rademacher"),
        },
        reps,
    )

    # K = 256 on a subset (the first decoder layer(s)), scaled per seed; MeZO on the same subset.
    sub_names = [f"model.layers.{i}." for i in range(subset_layers)]
    sub = ParamSet([(nm, p) for nm, p in named if any(nm.startswith(s) for s in sub_names)])
    n_sub = sub.numel
    seeds256 = list(range(1, 257))
    alphas256 = [EPS] * 256
    t_sub, c_sub = measure(
        {
            "mezo_sub": lambda: mezo_pass(sub.tensors, 1),
            "replay256_gauss": lambda: ops.replay_(sub, seeds256, alphas256, "gaussian"),
            "replay256_rade": lambda: ops.replay_(sub, seeds256, alphas256, "rademacher"),
        },
        max(1, reps // 2),
    )
    load_after = os.getloadavg()[0]

    floor, mezo, mezo_cpu = t["floor"], t["mezo"], c["mezo"]
    print()
    print("| case | wall ms | CPU ms | M elem/s | vs MeZO (wall) | vs MeZO (CPU) | GB/s | % of floor speed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(row("floor: p.add_(1.0) read+write", floor, c["floor"], n, "", "", nbytes, floor))
    print(row("MeZO-style pass (normal + add)", mezo, mezo_cpu, n, "1.00x", "1.00x", nbytes, floor))
    for dist in ("gauss", "rade"):
        s, sc = t[f"perturb_{dist}"], c[f"perturb_{dist}"]
        print(row(f"fused perturb_ {dist}", s, sc, n, f"{mezo / s:.2f}x", f"{mezo_cpu / sc:.2f}x", nbytes, floor))
    for dist in ("gauss", "rade"):
        s, sc = t[f"replay16_{dist}"] / 16, c[f"replay16_{dist}"] / 16
        ratios = f"{mezo / s:.2f}x", f"{mezo_cpu / sc:.2f}x"
        print(row(f"fused replay_ K=16 {dist} (per seed)", s, sc, n, *ratios, None, floor))
    for dist in ("gauss", "rade"):
        s, sc = t_sub[f"replay256_{dist}"] / 256, c_sub[f"replay256_{dist}"] / 256
        scale = n / n_sub
        print(
            row(
                f"fused replay_ K=256 {dist} (per seed)*",
                s * scale,
                sc * scale,
                n,
                f"{t_sub['mezo_sub'] / s:.2f}x",
                f"{c_sub['mezo_sub'] / sc:.2f}x",
                None,
                floor,
            )
        )
    print()
    print(f"* K=256 runs on the first {subset_layers} decoder layer(s) ({n_sub:,} elements) and is scaled")
    print("  to the full set; its ratio is against MeZO passes over the same subset.")
    print(
        f"  Full K=256 replay extrapolated: {t_sub['replay256_gauss'] * n / n_sub:.1f} s gaussian vs"
        f" {256 * mezo:.1f} s for 256 MeZO passes; K=4096: {16 * t_sub['replay256_gauss'] * n / n_sub:.0f} s"
        f" vs {4096 * mezo / 60:.0f} min."
    )
    print(
        f"Bytes moved per pass: {nbytes / 1e9:.2f} GB (float32 read + write); load average"
        f" {load_before:.2f} -> {load_after:.2f} (other processes share the CPU when above ~0)."
    )


if __name__ == "__main__":
    main()
