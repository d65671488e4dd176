"""GPU benchmark of fedkseed's fused kernels (CUDA and Triton backends) against the MeZO-style
passes the anchors use (torch.manual_seed + per-parameter torch.normal + add), all in one run.

    python benchmarks/bench_gpu.py [--shapes smollm2,llama1.3b] [--dtypes bf16,fp32] [--ks 16,256,4096]
                                   [--project-ks 16,256,4096] [--project-dtypes bf16] [--zo] [--json PATH]

Measures, per parameter-set shape and dtype:
- device-to-device copy bandwidth of a buffer of the same size (the memory roof);
- single-seed perturb_: GB/s (read + write of every parameter) and % of copy (target >= 80%),
  speed-up over one MeZO-style pass (target >= 10x);
- replay_ of K seeds: normals/s (target >= 5e11/s on H100 for Gaussian) and speed-up over K
  MeZO-style passes (target >= 20x at K = 256);
- project (docs/stream-spec.md#projection) of K seeds: normals/s and speed-up over K passes of
  torch.normal + torch.dot (the Ferret baseline; measured at K <= 256, scaled above);
and prints a roofline line per replay: bytes moved, normals generated, the memory-bound time at
the measured copy bandwidth and the generation-bound time at the best normals/s seen.
With --zo: one ZO (MeZO) step of a SmolLM2-135M-shaped Llama in bfloat16 (random weights,
built from its config by transformers, no download) against two forward passes of the same
batch: the step is +eps z, forward, -2 eps z, forward, +eps z, update, the perturbations fused.
With --json: every figure also goes to PATH as JSON (tools/gpu_check.py reads it).
Timing: CUDA events, warm-up, median of repeats; the parameter sets are far larger than L2.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from collections.abc import Callable

import torch
from smollm2_shape import SMOLLM2_135M_CONFIG, llama_1b_shapes, make_params, smollm2_135m_shapes

import fedkseed
from fedkseed import ParamSet
from fedkseed.ops import has_kernel, has_triton

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


SHAPES: dict[str, Callable[[], list[tuple[str, tuple[int, ...]]]]] = {
    "smollm2": smollm2_135m_shapes,
    "llama1.3b": llama_1b_shapes,
}


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` by CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def mezo_pass(tensors: list[torch.Tensor], seed: int, alpha: float) -> None:
    """One perturbation pass the way MeZO / the official FedKSeed code does it."""
    torch.manual_seed(seed)
    for p in tensors:
        z = torch.normal(0, 1, size=p.shape, device=p.device, dtype=p.dtype)
        p.data = p.data + alpha * z


def mezo_passes(tensors: list[torch.Tensor], k: int) -> None:
    for s in range(k):
        mezo_pass(tensors, s, 1e-6)


def normal_dot(tensors: list[torch.Tensor], seeds: list[int]) -> torch.Tensor:
    """The Ferret-style projection: per seed, materialise z with torch.normal, then torch.dot."""
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        total = torch.zeros((), dtype=torch.float64, device=tensors[0].device)
        for p in tensors:
            z = torch.normal(0, 1, size=p.shape, device=p.device, dtype=p.dtype)
            total += torch.dot(p.reshape(-1), z.reshape(-1)).double()
        out.append(total)
    return torch.stack(out).cpu()


def bench_project(pset: ParamSet, ks: list[int], backends: list[str], base: dict) -> tuple[list[str], list[dict]]:
    """fedkseed.project (gaussian) at each K against torch.normal + torch.dot per seed; the baseline
    is timed at K <= 256 and scaled linearly in K above (each seed is an independent pass)."""
    n = pset.numel
    per_seed = timed(lambda: normal_dot(pset.tensors, [1, 2, 3, 4]), repeats=3) / 4
    lines, rows = [f"normal + dot baseline: {per_seed * 1e3:.2f} ms per seed"], []
    for k in ks:
        baseline = timed(lambda k=k: normal_dot(pset.tensors, list(range(k))), repeats=1) if k <= 256 else per_seed * k
        seeds = torch.arange(1, k + 1, dtype=torch.int64, device="cuda")
        for backend in backends:
            project = functools.partial(fedkseed.project, pset, seeds, backend=backend)
            t = timed(project, repeats=3 if k * n > 1e11 else 5)
            rows.append(
                {
                    **base,
                    "backend": backend,
                    "op": f"project gaussian K={k}",
                    "k": k,
                    "ms": t * 1e3,
                    "gb_per_s": 0.0,
                    "copy_share": 0.0,
                    "per_s": k * n / t,
                    "speedup_vs_mezo": baseline / t,  # here: vs torch.normal + torch.dot
                    "baseline_ms": baseline * 1e3,
                    "baseline_measured": k <= 256,
                }
            )
            lines.append(
                f"{backend:8} {'project K=' + str(k):22} {t * 1e3:10.2f} {'':>8} {'':>7} {k * n / t:10.2e} "
                f"{baseline / t:7.1f}x vs normal+dot{'' if k <= 256 else ' (baseline scaled)'}"
            )
    return lines, rows


def bench(
    shape_name: str,
    dtype_name: str,
    ks: list[int],
    backends: list[str],
    record: list[dict],
    project_ks: list[int] | None = None,
) -> list[str]:
    dtype = DTYPES[dtype_name]
    pset = ParamSet(make_params(SHAPES[shape_name](), dtype, "cuda"))
    n, size = pset.numel, torch.finfo(dtype).bits // 8
    rw_bytes = 2 * n * size
    src = torch.empty(n, dtype=dtype, device="cuda")
    dst = torch.empty_like(src)
    copy_s = timed(functools.partial(dst.copy_, src), repeats=20, warmup=3)
    del src, dst
    copy_bw = rw_bytes / copy_s
    lines = [
        f"\n## {shape_name} ({n:,} params, {len(pset)} tensors), {dtype_name}: "
        f"copy {copy_bw / 1e9:,.0f} GB/s ({copy_s * 1e3:.2f} ms)"
    ]
    mezo_s = timed(lambda: mezo_pass(pset.tensors, 1, 1e-3), repeats=5)
    lines.append(f"MeZO-style pass (torch.normal + add): {mezo_s * 1e3:.2f} ms")
    header = f"{'backend':8} {'op':22} {'time ms':>10} {'GB/s':>8} {'% copy':>7} {'normals/s':>10} {'vs MeZO':>8}"
    lines += [header, "-" * len(header)]
    seed_t = torch.tensor([12345], dtype=torch.int64, device="cuda")
    alpha_t = torch.tensor([1e-3], device="cuda")
    best_rate = {}
    rows = []
    for backend in backends:
        for dist in ("gaussian", "rademacher"):
            perturb = functools.partial(fedkseed.perturb_, pset, seed_t, alpha_t, dist, backend=backend)
            t = timed(perturb, repeats=10, warmup=2)
            rows.append(
                (backend, f"perturb_ {dist}", t, rw_bytes / t, n / t, mezo_s / t if dist == "gaussian" else None, 1)
            )
            for k in ks:
                seeds = torch.arange(1, k + 1, dtype=torch.int64, device="cuda")
                alphas = torch.full((k,), 1e-6, device="cuda")
                reps = 3 if k * n > 1e11 else 5
                replay = functools.partial(fedkseed.replay_, pset, seeds, alphas, dist, backend=backend)
                t = timed(replay, repeats=reps)
                rate = k * n / t
                best_rate[dist] = max(best_rate.get(dist, 0.0), rate)
                rows.append((backend, f"replay_ {dist} K={k}", t, rw_bytes / t, rate, None, k))
    baseline = {k: k * mezo_s for k in ks}
    for k in ks:
        if k <= 256:  # K MeZO-style passes, measured (K = 4096 would take minutes)
            passes = functools.partial(mezo_passes, pset.tensors, k)
            baseline[k] = timed(passes, repeats=1, warmup=0)
    for backend, op, t, bw, rate, speedup, k in rows:
        if op.startswith("replay_ gaussian"):
            speedup = baseline[k] / t
        record.append(
            {
                "shape": shape_name,
                "dtype": dtype_name,
                "backend": backend,
                "op": op,
                "k": k,
                "ms": t * 1e3,
                "gb_per_s": bw / 1e9,
                "copy_share": bw / copy_bw,
                "per_s": rate,
                "speedup_vs_mezo": speedup,
                "copy_gb_per_s": copy_bw / 1e9,
                "mezo_pass_ms": mezo_s * 1e3,
            }
        )
        lines.append(
            f"{backend:8} {op:22} {t * 1e3:10.2f} {bw / 1e9:8.0f} {100 * bw / copy_bw:6.0f}% {rate:10.2e} "
            + (f"{speedup:7.1f}x" if speedup else f"{'':>8}")
        )
    if project_ks:
        base = {"shape": shape_name, "dtype": dtype_name, "copy_gb_per_s": copy_bw / 1e9, "mezo_pass_ms": mezo_s * 1e3}
        project_lines, project_rows = bench_project(pset, project_ks, backends, base)
        lines += project_lines
        record += project_rows
    for backend, op, t, _bw, _rate, _speedup, k in rows:
        if op.startswith("replay_"):
            dist = op.split()[1]
            mem_s, gen_s = rw_bytes / copy_bw, k * n / best_rate[dist]
            lines.append(
                f"roofline {backend} {op}: {rw_bytes / 1e9:.2f} GB moved, {k * n:.2e} normals; "
                f"memory limit {mem_s * 1e3:.2f} ms, generation limit {gen_s * 1e3:.2f} ms, "
                f"achieved {t * 1e3:.2f} ms ({100 * max(mem_s, gen_s) / t:.0f}% of the bound)"
            )
    return lines


def zo_step_vs_forward(backend: str, batch: int = 8, seq: int = 256) -> dict:
    """One fused ZO step against two forward passes, SmolLM2-135M shape, bfloat16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SMOLLM2_135M_CONFIG, max_position_embeddings=2048)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    pset = ParamSet(model)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device="cuda")
    seed = torch.tensor([7], dtype=torch.int64, device="cuda")
    eps, minus2, update = (torch.tensor([v], device="cuda") for v in (1e-3, -2e-3, -1e-6))

    @torch.no_grad()
    def forward() -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    @torch.no_grad()
    def step() -> None:
        fedkseed.perturb_(pset, seed, eps, backend=backend)
        forward()
        fedkseed.perturb_(pset, seed, minus2, backend=backend)
        forward()
        fedkseed.perturb_(pset, seed, eps, backend=backend)
        fedkseed.perturb_(pset, seed, update, backend=backend)

    two_fwd = timed(lambda: (forward(), forward()), repeats=10, warmup=2)
    step_s = timed(step, repeats=10, warmup=2)
    return {
        "backend": backend,
        "batch": batch,
        "seq": seq,
        "params": pset.numel,
        "zo_step_ms": step_s * 1e3,
        "two_forward_ms": two_fwd * 1e3,
        "ratio": step_s / two_fwd,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="smollm2,llama1.3b")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--ks", default="16,256,4096")
    parser.add_argument("--project-ks", default="16,256,4096", help="K of fedkseed.project ('' for none)")
    parser.add_argument("--project-dtypes", default="bf16", help="dtypes the projection is timed on")
    parser.add_argument("--zo", action="store_true", help="also time a ZO step against two forward passes")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "bench_gpu: no CUDA GPU here; run this on a GPU machine (python benchmarks/bench_gpu.py). "
            "CPU figures come from benchmarks/bench_cpu.py."
        )
        return 0
    backends = [b for b, ok in (("cuda", has_kernel("CUDA")), ("triton", has_triton())) if ok]
    if not backends:
        print("bench_gpu: neither the CUDA extension nor triton is available")
        return 1
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, backends: {', '.join(backends)}")
    ks = [int(k) for k in args.ks.split(",")]
    project_ks = [int(k) for k in args.project_ks.split(",") if k]
    record: list[dict] = []
    for shape in args.shapes.split(","):
        for dtype in args.dtypes.split(","):
            pks = project_ks if dtype in args.project_dtypes.split(",") else None
            print("\n".join(bench(shape, dtype, ks, backends, record, pks)), flush=True)
            torch.cuda.empty_cache()
    zo = []
    if args.zo:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("bench_gpu: --zo skipped, transformers is not installed")
        else:
            for backend in backends:
                row = zo_step_vs_forward(backend)
                zo.append(row)
                print(
                    f"ZO step {backend}: {row['zo_step_ms']:.2f} ms vs two forward passes "
                    f"{row['two_forward_ms']:.2f} ms ({row['ratio']:.2f}x), batch {row['batch']}x{row['seq']}"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "kernels": record, "zo_step": zo},
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
