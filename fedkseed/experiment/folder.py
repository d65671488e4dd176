"""The output folder's rules, checked before anything is loaded: a run never loses another run.

``claim_output(config)`` is called once per run, by the process that writes the folder (never by
a Flower ClientApp): it refuses an output folder that is, contains or lies inside one of the
run's inputs (``--model``, ``--data``, the model cache), refuses a folder holding files unless
``--resume`` or ``--overwrite`` says what to do with them, refuses ``--resume`` without a
checkpoint, checks the folder is writable and removes temporary files an interrupted write left
behind. Nothing of a previous run is touched unless ``--overwrite`` says so, and even then
nothing is deleted before the new run finishes: ``--overwrite`` moves the previous run's files
aside (``.replaced-*``) and the returned :class:`Claim`, used as ``with claim_output(config):``
around the run, deletes them when the run finishes, or puts them back when it fails before its
first checkpoint. A resumed run takes the "run complete" marker (metrics.json) away only when it
first changes the run (``outputs.unmark_complete``).
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType

from ..errors import UsageError
from ..models import cache_dir
from .checkpoint import STATE_FILE, load_state
from .config import SimConfig
from .outputs import DELTA_FILE, METRICS_FILE, MODEL_DIR, PLOT_FILE

log = logging.getLogger("fedkseed.experiment")
# Everything a run writes to its folder ("flower.json": the Flower engine's transport log).
RUN_FILES = (METRICS_FILE, DELTA_FILE, MODEL_DIR, PLOT_FILE, STATE_FILE, "flower.json")
# The folder --overwrite moves the previous run into, inside the output folder (one rename per
# file, no copy); deleted once a run of the folder finishes.
REPLACED_PREFIX = ".replaced-"
MODEL_CACHE = "the model cache"


@dataclass
class Claim:
    """An output folder claimed for a run. ``replaced``: where ``--overwrite`` moved the
    previous run's files (None when there were none). As a context manager around the run:
    a run that finishes deletes what it replaced; a run that fails before writing its first
    checkpoint gets the previous run put back as it was; one that fails later keeps both (the
    new run can be resumed, the old one is in ``replaced``)."""

    output: pathlib.Path
    replaced: pathlib.Path | None = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if kind is None:
            self.finish()
        else:
            self.abandon()

    def finish(self) -> None:
        """The run is complete: the runs --overwrite replaced in this folder go."""
        for replaced in self.output.glob(f"{REPLACED_PREFIX}*"):
            _remove(replaced)
        self.replaced = None

    def abandon(self) -> None:
        """The run failed: put the replaced run back unless the new run has a checkpoint."""
        if self.replaced is None:
            return
        if (self.output / STATE_FILE).exists():
            log.warning(
                "the run replacing %s failed after its first checkpoint: it can be resumed, and the "
                "run it replaces is kept in %s until a run of this folder finishes",
                self.output,
                self.replaced,
            )
            return
        for name in RUN_FILES:  # whatever the failed run started to write
            _remove(self.output / name)
        for path in self.replaced.iterdir():
            os.rename(path, self.output / path.name)
        self.replaced.rmdir()
        self.replaced = None


def claim_output(config: SimConfig) -> Claim:
    """Make ``config.output`` ready for this run, or raise a UsageError naming the setting."""
    output = pathlib.Path(config.output)
    refuse_overlap(output, "--output", run_inputs(config))
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file, not a folder")
    if config.resume and not (output / STATE_FILE).is_file():  # before creating a mistyped folder
        raise UsageError(f"--resume: {output} holds no checkpoint ({STATE_FILE}); nothing to continue")
    ensure_writable(output, "--output")
    remove_stale_temporaries(output)
    entries = sorted(p.name for p in output.iterdir())
    if config.resume:
        load_state(output, config)  # refuses an unreadable checkpoint or other settings, now
    elif entries and not config.overwrite:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise UsageError(
            f"--output {output} is not empty ({shown}): pass --resume to continue its run or --overwrite to replace it"
        )
    elif config.overwrite:
        return Claim(output, _move_aside(output))
    return Claim(output)


def run_inputs(config: SimConfig) -> list[tuple[str, pathlib.Path]]:
    """The paths a run reads: the model cache, and --model / --data where they name a path."""
    inputs = [(MODEL_CACHE, cache_dir())]
    for setting, value in (("--model", config.model), ("--data", config.data)):
        path = pathlib.Path(value).expanduser()
        if path.exists():
            inputs.append((setting, path))
    return inputs


def refuse_overlap(output: pathlib.Path, setting: str, inputs: Iterable[tuple[str, pathlib.Path]]) -> None:
    """Refuse an output folder that is, contains or lies inside an input (symbolic links
    resolved): writing or overwriting it could destroy what the run reads."""
    target = output.expanduser().resolve()
    for name, path in inputs:
        source = path.expanduser().resolve()
        if target == source:
            relation = "is"
        elif source in target.parents:
            relation = "is inside"
        elif target in source.parents:
            relation = "contains"
        else:
            continue
        named = name if name == MODEL_CACHE else f"the {name}"
        raise UsageError(f"{setting} {output} {relation} {named} {path}: write the output elsewhere")


def _move_aside(output: pathlib.Path) -> pathlib.Path | None:
    """Move the previous run's files into a new ``.replaced-*`` folder of ``output``."""
    present = [output / name for name in RUN_FILES if (output / name).exists() or (output / name).is_symlink()]
    if not present:
        return None
    replaced = pathlib.Path(tempfile.mkdtemp(prefix=REPLACED_PREFIX, dir=output))
    for path in present:  # metrics.json first: the folder stops saying "complete"
        os.rename(path, replaced / path.name)
    return replaced


def ensure_writable(folder: pathlib.Path, setting: str) -> None:
    """Create ``folder`` if needed and prove a file can be created in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise UsageError(f"{setting} {folder} is not writable ({error.strerror or error})") from None


def remove_stale_temporaries(output: pathlib.Path) -> None:
    """Temporary files and folders of our atomic writes (``.<name>-<random>``) left by a killed
    run: in the output folder for its files, and in model/ for the model's files."""
    stale = [p for name in RUN_FILES for p in output.glob(f".{name}-*")]
    model = output / MODEL_DIR
    if model.is_dir():
        stale += [p for p in model.glob(".*-*") if p.is_file()]
    for path in stale:
        log.info("removing %s, left by an interrupted write", path)
        _remove(path)


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
