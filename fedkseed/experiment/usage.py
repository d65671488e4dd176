"""What a client's local training costs: wall seconds, process CPU seconds and the peak memory it
adds, measured around the work (``measure``) in the process that does it (the local engine's,
or the Flower ClientApp's), and summarised per round for metrics.json (``round_usage``).

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the work minus the allocation
before it; on the CPU, the process's resident set size (``/proc/self/statm``) sampled every
``SAMPLE_SECONDS`` in a thread, its maximum minus the RSS before the work. Freed heap memory is
first handed back to the OS (glibc ``malloc_trim``), so memory an earlier client left in the
allocator does not hide this client's own use. A peak shorter than the sampling period can be
missed, and RSS counts every thread of the process: a figure for comparing methods on one
machine, not an allocator trace. What is measured is the client's whole round (``train``):
decoding its download, the local steps and encoding its upload, so a first-order client's
figure includes the tensors it receives and sends (FedAvg: two copies of the weights), beside
gradients and optimizer state. The model the process already holds is not counted.

CPU seconds count every thread, including OpenMP worker threads that spin while they wait for
work (libgomp's default): on a busy 2-core machine 10 AdamW steps of the tiny model took 2.4-3.3x
the CPU time with torch's 2 threads spinning as with ``OMP_WAIT_POLICY=PASSIVE``, for the same
work. Set ``OMP_WAIT_POLICY=PASSIVE`` in the environment (before Python starts: OpenMP reads it
once) when CPU seconds are compared.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

SAMPLE_SECONDS = 0.005
MIB = 1 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass
class Usage:
    seconds: float = 0.0  # wall time
    cpu_seconds: float = 0.0  # time.process_time: every thread of the process
    peak_mib: float = 0.0  # peak memory added by the work


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def measure(device: torch.device | str = "cpu") -> Iterator[Usage]:
    """Measure the block; the returned ``Usage`` is filled in when the block ends."""
    usage = Usage()
    cuda = torch.device(device).type == "cuda"
    stop = threading.Event()
    peak = [0]
    sampler = None
    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _trim()
        before = _rss() or 0
        peak[0] = before

        def sample() -> None:
            while not stop.wait(SAMPLE_SECONDS):
                peak[0] = max(peak[0], _rss() or 0)

        sampler = threading.Thread(target=sample, name="fedkseed-rss", daemon=True)
        sampler.start()
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield usage
    finally:
        if cuda:
            torch.cuda.synchronize(device)
        usage.seconds = time.perf_counter() - wall
        usage.cpu_seconds = time.process_time() - cpu
        if cuda:
            usage.peak_mib = (torch.cuda.max_memory_allocated(device) - before) / MIB
        else:
            stop.set()
            sampler.join()
            peak[0] = max(peak[0], _rss() or 0)
            usage.peak_mib = (peak[0] - before) / MIB


def round_usage(usages: Sequence[Usage]) -> dict[str, float | None]:
    """The per-round keys of metrics.json: mean seconds and CPU seconds of a client's local
    training, and the largest peak over the round's clients (None when no client trained)."""
    if not usages:
        return {"client_seconds": None, "client_cpu_seconds": None, "client_peak_mib": None}
    return {
        "client_seconds": sum(u.seconds for u in usages) / len(usages),
        "client_cpu_seconds": sum(u.cpu_seconds for u in usages) / len(usages),
        "client_peak_mib": max(u.peak_mib for u in usages),
    }
