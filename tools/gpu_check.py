"""`make gpu-check`: everything a GPU machine without network has to say about fedkseed's GPU path,
in one run of under 8 minutes on an H100/H200. Usage: ``python tools/gpu_check.py OUT_DIR``.

The machine's image already holds torch, triton and nvcc; nothing is installed. Steps:
  1. environment: GPU, torch, triton, nvcc;
  2. build the extension in place (CUDA kernels included when torch has CUDA and nvcc is there);
  3. tests: the GPU tests (CUDA-graph capture of a ZO step with device seeds and alphas, no host
     sync, compiled Triton vs CUDA) and the all-backend bit-identity tests (branch cases, special
     values, the magnitude mask), which run the CUDA kernels and compiled Triton on a GPU;
  4. benchmarks/bench_gpu.py on the SmolLM2-135M shape (perturb_ vs copy bandwidth, replay_
     normals/s at K = 16, 256, 4096, speed-ups over MeZO-style passes, project at K = 16, 256, 4096
     in bf16 against torch.normal + torch.dot per seed, a bf16 ZO step against two forward passes).
Each step has its own time limit, all within BUDGET_S, and a failing step does not stop the others. Without a GPU
(a dry run) the extension in place (CPU) is used, the CUDA kernels are compiled but not run
(when nvcc is there), the tests run on the CPU backends and the GPU steps are reported as
skipped. Writes OUT_DIR/report.json and OUT_DIR/report.md; exit status 1 when a step
failed.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = [
    "tests/ops/test_gpu.py",
    "tests/ops/test_branches.py",
    "tests/ops/test_special_values.py",
    "tests/ops/test_triton_backend.py",
    "tests/ops/test_project.py",
    "tests/ops/test_mask.py",
]
# On a CPU dry run the Triton interpreter is slow; its branch tests run in the CPU suite anyway.
DRY_RUN_TEST_FILTER = "not triton"
# The whole run must fit a GPU slot (~15 min with start-up): every step's limit is cut to what is
# left of this budget, and the figures (bench) run before the longer test step.
BUDGET_S = 450
_DEADLINE = time.monotonic() + BUDGET_S


def run_step(name: str, argv: list[str], timeout: int, env: dict | None = None) -> dict:
    """Run one step as a subprocess from the repository root; its output tail goes in the report."""
    print(f"gpu-check: {name}: {' '.join(argv)}", flush=True)
    start = time.monotonic()
    timeout = max(1, min(timeout, int(_DEADLINE - start)))
    try:
        done = subprocess.run(
            argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, **(env or {}))
        )
        status, output = ("ok" if done.returncode == 0 else "failed"), done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        status = "timed out"
        output = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    seconds = time.monotonic() - start
    print(f"gpu-check: {name}: {status} in {seconds:.0f} s", flush=True)
    return {
        "name": name,
        "status": status,
        "seconds": round(seconds, 1),
        "command": " ".join(argv),
        "output_tail": output[-6000:],
    }


def skipped(name: str, why: str) -> dict:
    print(f"gpu-check: {name}: SKIPPED, {why}", flush=True)
    return {"name": name, "status": "skipped", "seconds": 0.0, "why": why}


def compile_check(py: str) -> dict:
    """Compile (never link or run) the CUDA kernels for every configured architecture, as
    `make cuda-check` does: what a machine without a GPU can check of the CUDA path."""
    with tempfile.TemporaryDirectory() as tmp:
        flags = subprocess.run(
            [py, "tools/nvcc_flags.py", os.path.join(tmp, "stub")], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout.split()
        sources = sorted(f for f in os.listdir(os.path.join(ROOT, "csrc", "cuda")) if f.endswith(".cu"))
        script = " && ".join(
            f"nvcc {' '.join(flags)} -c csrc/cuda/{src} -o {os.path.join(tmp, src + '.o')}" for src in sources
        )
        return run_step("CUDA compile check (no GPU)", ["bash", "-c", script], 300)


def environment() -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "nvcc": shutil.which("nvcc"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def markdown(report: dict) -> str:
    lines = [
        "# fedkseed gpu-check",
        "",
        f"- environment: `{json.dumps(report['environment'])}`",
        f"- total: {report['seconds']:.0f} s, result: **{report['result']}**",
        "",
        "| step | status | seconds |",
        "|---|---|---:|",
    ]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.0f} |" for s in report["steps"]]
    bench = report.get("bench")
    if bench:
        lines += [
            "",
            "## Kernels (bench_gpu.py)",
            "",
            "| shape | dtype | backend | op | ms | % of copy | per s | vs MeZO |",
            "|---|---|---|---|---:|---:|---:|---:|",
        ]
        for r in bench["kernels"]:
            speedup = f"{r['speedup_vs_mezo']:.1f}x" if r["speedup_vs_mezo"] else ""
            copy = f"{100 * r['copy_share']:.0f}%"
            if r["op"].startswith("project"):  # its baseline is torch.normal + torch.dot per seed
                copy, speedup = "-", f"{speedup} vs normal+dot" + ("" if r["baseline_measured"] else " (scaled)")
            lines.append(
                f"| {r['shape']} | {r['dtype']} | {r['backend']} | {r['op']} | {r['ms']:.2f} | "
                f"{copy} | {r['per_s']:.2e} | {speedup} |"
            )
        for z in bench.get("zo_step", []):
            lines.append(
                f"\nZO step ({z['backend']}, bf16, batch {z['batch']}x{z['seq']}): {z['zo_step_ms']:.2f} ms "
                f"vs two forward passes {z['two_forward_ms']:.2f} ms ({z['ratio']:.2f}x)"
            )
    for s in report["steps"]:
        if s["status"] not in ("ok", "skipped"):
            lines += ["", f"## {s['name']}: {s['status']}", "", "```", s.get("output_tail", "")[-3000:], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tools/gpu_check.py OUT_DIR", file=sys.stderr)
        return 2
    out = os.path.abspath(argv[0])
    os.makedirs(out, exist_ok=True)
    start = time.monotonic()
    import torch

    gpu = torch.cuda.is_available()
    env = environment()
    print(f"gpu-check: {json.dumps(env)}", flush=True)
    py = sys.executable
    steps = []
    if gpu and env["nvcc"] and torch.version.cuda:
        steps.append(run_step("build (CUDA + CPU)", [py, "setup.py", "-q", "build_ext", "--inplace"], 240))
    else:
        why = "no CUDA GPU here" if not gpu else "nvcc or a CUDA build of torch is missing"
        steps.append(skipped("build (CUDA + CPU)", f"{why}; the CPU extension in place is used"))
        if env["nvcc"]:
            steps.append(compile_check(py))
    if gpu:
        bench_json = os.path.join(out, "bench.json")
        steps.append(
            run_step(
                "bench_gpu",
                [
                    py,
                    "benchmarks/bench_gpu.py",
                    "--shapes",
                    "smollm2",
                    "--dtypes",
                    "bf16,fp32",
                    "--ks",
                    "16,256,4096",
                    "--project-ks",
                    "16,256,4096",
                    "--project-dtypes",
                    "bf16",
                    "--zo",
                    "--json",
                    bench_json,
                ],
                200,
            )
        )
        steps.append(run_step("tests (GPU)", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], BUDGET_S))
    else:
        steps.append(
            run_step(
                "tests (CPU dry run)",
                [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS, "-k", DRY_RUN_TEST_FILTER],
                BUDGET_S,
            )
        )
        steps.append(skipped("bench_gpu", "no CUDA GPU here: no GPU figures are measured"))
        bench_json = None
    report = {
        "environment": env,
        "steps": steps,
        "seconds": round(time.monotonic() - start, 1),
        "result": "ok" if all(s["status"] in ("ok", "skipped") for s in steps) else "failed",
        "gpu": gpu,
    }
    if bench_json and os.path.exists(bench_json):
        with open(bench_json) as f:
            report["bench"] = json.load(f)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown(report))
    print(f"gpu-check: {report['result']} in {report['seconds']:.0f} s; report in {out}/report.md", flush=True)
    return 0 if report["result"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
