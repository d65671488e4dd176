"""The utility cost of client-level DP (issue 20): `fedkseed simulate` on SmolLM2-135M and the FAQ
data at epsilon = inf (no DP: the default aggregation) and each --dp-epsilon, over seeds, with the
demo protocol's clients and rounds; then, from sigma, how many clients per round the noise needs
to fall below the signal.

    flock /tmp/fedkseed-bench.lock nice -n 5 .venv/bin/python benchmarks/privacy.py --jobs 2
    .venv/bin/python benchmarks/privacy.py --synthetic 20.7   # no model: bytes and noise / signal

Each run is the real CLI in its own process (its CPU time from wait4); a finished run folder is
reused, never rerun. The DP runs use --dp-noise-seed (reproducible; docs/privacy.md says why a
deployment must not). Prints a Markdown section for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedkseed.fed.privacy import calibrate, default_clip, default_delta  # noqa: E402

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # Student t, two-sided 95%, by df


def run(output: pathlib.Path, seed: int, epsilon: float | None, extra: list[str], report: bool) -> dict | None:
    """One simulate run (reused when its metrics.json exists); its metrics plus CPU seconds.
    ``report``: only read finished runs (None for one that is not)."""
    metrics = output / "metrics.json"
    cpu_file = output / "cpu_seconds.txt"
    if report and not metrics.is_file():
        return None
    if not metrics.is_file():
        argv = [sys.executable, "-m", "fedkseed", "simulate", "--quiet", "--output", str(output), "--seed", str(seed)]
        if output.exists():
            argv.append("--overwrite")
        if epsilon is not None:
            argv += ["--dp-epsilon", str(epsilon), "--dp-noise-seed", str(1000 + seed)]
        log = open(output.with_suffix(".log"), "w")
        process = subprocess.Popen([*argv, *extra], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
        log.close()
        if status != 0:
            raise RuntimeError(f"{output}: exit status {status}; see {output.with_suffix('.log')}")
        cpu_file.write_text(f"{usage.ru_utime + usage.ru_stime:.1f}\n")
    result = json.loads(metrics.read_text())
    result["cpu_seconds"] = float(cpu_file.read_text()) if cpu_file.is_file() else math.nan
    return result


def interval(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.4f} (n=1)"
    half = T95[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values))
    return f"{mean:.4f} ± {half:.4f} (n={len(values)})"


def synthetic(epsilons: list[float], seeds: list[int], per_step_rms: float) -> None:
    """No model: 5 demo-shaped rounds through the real Server and fp16 encoder, each sampled client
    uploading Gaussian per-seed sums of the given per-step RMS on its real schedule. Prints bytes
    per client and round and the released table's noise / signal (squared norms), the noise part
    recomputed from the noise seed."""
    import numpy as np

    from fedkseed.fed import FedSpec, Server, draw_schedule, wire
    from fedkseed.fed.privacy import Privacy

    demo = dict(clients_per_round=2, k=1024, local_steps=30, lr=3e-5, eps=1e-2, dist="rademacher", precision="fp16")
    print("| epsilon | seed | up B / client | down B / client | noise / signal (squared norm, 5 rounds) |")
    print("|---|---|---|---|---|")
    for eps in [None, *epsilons]:
        for seed in seeds:
            spec = FedSpec(num_clients=20, seed=seed, **demo)
            privacy = None if eps is None else Privacy(spec, 5, eps, noise_seed=1000 + seed)
            server = Server(spec, [20] * 20, privacy)
            up, down, noise = [], [], np.zeros(spec.k)
            for r in range(1, 6):
                for c in server.begin_round():
                    down.append(len(server.download(c)))
                    used, counts = np.unique(draw_schedule(seed, r, c, spec.local_steps, spec.k), return_counts=True)
                    values = np.random.default_rng([seed, r, c]).normal(0, per_step_rms, used.size) * np.sqrt(counts)
                    upload = wire.Upload(c, r, spec.k, spec.local_steps, 1.0, used, values)
                    up.append(len(message := wire.encode_upload(upload, spec.precision, implied=used)))
                    server.receive(message)
                server.end_round()
                if privacy is not None:
                    touched = privacy.touchable(r)
                    scale = privacy.noise_multiplier * privacy.clip * privacy.weight
                    noise[touched] += scale * privacy.noise(r, touched)
            signal = server.accumulated - noise
            ratio = float(np.sum(noise**2) / np.sum(signal**2))
            name = "inf" if eps is None else f"{eps:g}"
            print(f"| {name} | {seed} | {statistics.fmean(up):.1f} | {statistics.fmean(down):.1f} | {ratio:.3g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/privacy")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 2.0])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--report", action="store_true", help="only tabulate the runs already finished")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more simulate options")
    parser.add_argument("--synthetic", type=float, metavar="RMS", help="no model: bytes and noise/signal only")
    args = parser.parse_args()
    if args.synthetic:
        synthetic(args.epsilons, args.seeds, args.synthetic)
        return
    out = ROOT / args.output
    out.mkdir(parents=True, exist_ok=True)
    # seed by seed: a run cut short still leaves every epsilon of the first seeds (rerun with those --seeds)
    settings = [(seed, eps) for seed in args.seeds for eps in [None, *args.epsilons]]
    started = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {
            (seed, eps): pool.submit(
                run, out / f"eps{'inf' if eps is None else f'{eps:g}'}-seed{seed}", seed, eps, args.extra, args.report
            )
            for seed, eps in settings
        }
        results = {key: f.result() for key, f in futures.items() if f.result() is not None}
    wall = time.perf_counter() - started
    config = next(iter(results.values()))["config"]
    n, per_round, rounds, steps, k = (config[x] for x in ("clients", "clients_per_round", "rounds", "local_steps", "k"))

    print("## Client-level DP: the utility cost (issue 20; `benchmarks/privacy.py`)\n")
    print(
        f"SmolLM2-135M-Instruct, FAQ data, demo protocol: {n} clients, {per_round} per round (q = {per_round / n:g}, "
        f"Poisson-sampled under DP), {rounds} rounds, tau = {steps}, K = {k}, {config['dist']}, lr {config['lr']:g}, "
        f"eps {config['eps']:g}, fp16 table; delta = clients^-1.1 = {default_delta(n):.4g} fixed; "
        f"C = 20 sqrt(tau) = {default_clip(steps):.1f}; noise from --dp-noise-seed 1000 + seed. Seeds "
        f"{args.seeds}; intervals are mean ± t-based 95% half-widths over seeds. Wall {wall / 60:.1f} min for "
        f"all runs ({args.jobs} at a time, on a 2-core machine shared with other jobs).\n"
    )
    header = "| epsilon | sigma | noise std / entry | eval loss before -> after | Rouge-L after (before) |"
    print(header + " up B / client | down B / client | CPU s / run |")
    print("|---|---|---|---|---|---|---|---|")
    for eps in [None, *args.epsilons]:
        runs = [results[(seed, eps)] for seed in args.seeds if (seed, eps) in results]
        if not runs:
            continue
        finals = [r["final"] for r in runs]
        dp = finals[0].get("dp")
        spent = "inf (no DP)" if dp is None else " / ".join(f"{f['dp']['epsilon']:.3f}" for f in finals)
        sigma = "-" if dp is None else f"{dp['noise_multiplier']:.3f}"
        noise = "-" if dp is None else f"{dp['noise_std_per_entry']:.1f}"
        before = statistics.fmean(f["eval_loss_before"] for f in finals)
        scorer = next(iter(finals[0]["rouge_l_after"]))
        rouge_after = [f["rouge_l_after"][scorer]["mean"] for f in finals]
        rouge_before = statistics.fmean(f["rouge_l_before"][scorer]["mean"] for f in finals)
        heldout = finals[0]["rouge_l_after"][scorer]["n"]
        trained = [r for x in runs for r in x["rounds"] if r["clients"]]  # Poisson rounds may have none
        up = statistics.fmean(r["bytes_up_per_client"] for r in trained)
        down = statistics.fmean(r["bytes_down_per_client"] for r in trained)
        cpu = statistics.fmean(r["cpu_seconds"] for r in runs)
        print(
            f"| {spent} | {sigma} | {noise} | {before:.4f} -> {interval([f['eval_loss_after'] for f in finals])} "
            f"| {interval(rouge_after)} ({rouge_before:.1f}; {heldout} held-out) | {up:.0f} | {down:.0f} | {cpu:.0f} |"
        )
    clean = [results[(seed, None)] for seed in args.seeds if (seed, None) in results]
    rms = [r["rms_bound"] / 2 for x in clean for r in x["rounds"] if r.get("rms_bound")]  # auto bound = 2x median
    median_rms = statistics.median(rms)
    print(
        f"\nClean signal (epsilon = inf runs): the median per-step RMS of g is {median_rms:.1f} (half the auto "
        f"bound, over {len(rms)} rounds), so a clean table entry moves by about g / {per_round} = "
        f"{median_rms / per_round:.1f} per round on the ~{per_round * steps} entries the round's clients used."
    )
    clip = default_clip(steps)
    norm = min(clip, median_rms * math.sqrt(steps))  # a clipped clean upload's L2 norm
    print(
        "\nClients per round needed (from sigma): with m clients per round (q N = m expected), a round adds "
        "signal of squared norm about m x min(C, r sqrt(tau))^2 / m^2 (clean uploads of per-step RMS r on "
        "distinct seeds, clipped to C) and noise of |U| sigma^2 C^2 / m^2 on the |U| entries some public "
        "schedule could touch, so the noise falls below the signal when "
        f"|U| sigma^2 C^2 / (m min(C, r sqrt(tau))^2) < 1. Here r = {median_rms:.1f}, C = {clip:.1f}, "
        f"min(C, r sqrt(tau)) = {norm:.1f}; at q = 0.1 (N = 10 m), {rounds} rounds, tau = {steps}, K = {k}, "
        "delta = N^-1.1, |U| its expected size (with --shared-seeds every client of a round uses the "
        "round's one schedule, so |U| is at most tau; the signal estimate ignores that clients' values on a "
        "shared seed add up coherently, so it is conservative there):\n"
    )
    cells = " | ".join(
        f"sigma (eps {e:g}) | noise / signal (eps {e:g}) | same, --shared-seeds (eps {e:g})" for e in args.epsilons
    )
    print(f"| clients per round m | N | |U| | {cells} |".replace("|U|", "\\|U\\|"))
    print("|---|---|---|" + "---|---|---|" * len(args.epsilons))
    for m in (2, 10, 50, 100, 200, 500, 1000, 2000):
        total = 10 * m
        touchable = k * (1 - (1 - 1 / k) ** (total * steps))  # expected size of the union of schedules
        row = [str(m), str(total), f"{touchable:.0f}"]
        for e in args.epsilons:
            sigma = calibrate(0.1, rounds, e, default_delta(total))
            ratio = sigma**2 * clip**2 / (m * norm**2)  # per touchable entry
            row += [f"{sigma:.3f}", f"{touchable * ratio:.3g}", f"{min(steps, k) * ratio:.3g}"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
