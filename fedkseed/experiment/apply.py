"""``fedkseed apply``: rebuild a fine-tuned model from its base model and a delta file.

The model is written to a temporary folder beside ``--output`` and renamed into place only when
complete, so ``--output`` holds the old contents or the whole new model, never a mix; the base
folder is never written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import shutil
import tempfile

from ..errors import UsageError
from ..fed import Replica, SeedPool, wire
from ..models import SMOLLM2, SMOLLM2_DIR, cache_dir
from ..paramset import ParamSet
from .folder import MODEL_CACHE, ensure_writable, refuse_overlap
from .outputs import METRICS_FILE
from .prepare import check_backend

log = logging.getLogger("fedkseed.experiment")


def apply_delta(
    base: str, delta: str | os.PathLike, output: str | os.PathLike, *, dtype: str = "fp32", overwrite: bool = False
) -> pathlib.Path:
    """Rebuild a fine-tuned model from a base model spec and a delta file, bit-identical to the
    simulation's final model (``dtype``: the run's --dtype). Refuses a base whose parameters
    (layout or values) differ, an output that is, contains or lies inside the base folder, the
    delta file or the model cache, and (without ``overwrite``) an output holding files.
    Everything but the base's fingerprint is checked before the model is loaded."""
    from ..models import load_model, save_model  # transformers: loaded only when needed

    table = read_delta(pathlib.Path(delta))
    target = _check_output(base, pathlib.Path(delta), pathlib.Path(output), overwrite)
    for stale in target.parent.glob(f".{target.name}-apply-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by an interrupted apply
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}-apply-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    scratch.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename (simulate's folders: 0755)
    try:
        try:
            model, tokenizer = load_model(base, dtype=dtype)
        except (ValueError, RuntimeError) as error:
            raise UsageError(str(error).splitlines()[0]) from None
        fingerprint = ParamSet.of(model).fingerprint(values=True)
        if fingerprint != table.fingerprint:
            raise UsageError(
                f"--base {base!r} does not match the delta: parameter fingerprint (layout and values) "
                f"{fingerprint[:16]}... != {table.fingerprint[:16]}...{_built_from(pathlib.Path(delta))}"
            )
        replica = Replica(model, SeedPool(table.pool_seed, table.k), table.lr, table.dist)
        check_backend(replica.params)
        replica.build(wire.dense(table.indices, table.values, table.k))
        save_model(model, tokenizer, scratch)
        _move_into_place(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def read_delta(path: pathlib.Path) -> wire.Table:
    """The delta file's seed table, with a learning rate a model can be built with."""
    if not path.is_file():
        raise UsageError(f"--delta: {path} is not a file")
    try:
        table = wire.decode_table(path.read_bytes())
    except (OSError, wire.WireError) as error:
        raise UsageError(f"--delta: {path}: {error}") from None
    if not (math.isfinite(table.lr) and table.lr > 0):
        raise UsageError(f"--delta: {path} has learning rate {table.lr!r}; it must be finite and > 0")
    return table


def _built_from(delta: pathlib.Path) -> str:
    """Which base the delta was built from, when its run's metrics.json lies beside it: the run's
    --model and --dtype (the delta itself records only the base's fingerprint)."""
    try:
        metrics = delta.parent / METRICS_FILE
        config = json.loads(metrics.read_text())["config"]
        return f"; the delta was built from --model {config['model']!r} --dtype {config['dtype']} ({metrics})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _check_output(base: str, delta: pathlib.Path, output: pathlib.Path, overwrite: bool) -> pathlib.Path:
    target = output.expanduser().resolve()
    base_folder = cache_dir() / SMOLLM2_DIR if base == SMOLLM2 else pathlib.Path(base).expanduser()
    inputs = [("--base", base_folder)] if base_folder.exists() else []
    refuse_overlap(output, "--output", [*inputs, ("--delta", delta), (MODEL_CACHE, cache_dir())])
    if target.exists():
        if not target.is_dir():
            raise UsageError(f"--output {output} is a file, not a folder")
        if any(target.iterdir()) and not overwrite:
            raise UsageError(f"--output {output} is not empty: pass --overwrite to replace it")
    ensure_writable(target.parent, "--output's parent folder")
    return target


def _move_into_place(scratch: pathlib.Path, target: pathlib.Path) -> None:
    """Rename ``scratch`` to ``target``; an existing ``target`` is renamed aside first and
    removed only once the new folder is in place."""
    if not target.exists():
        os.rename(scratch, target)
        return
    aside = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}-apply-old-", dir=target.parent))
    os.rename(target, aside / target.name)
    os.rename(scratch, target)
    shutil.rmtree(aside)
