"""The output folder's rules, checked before anything is loaded: a run never loses another run.

``claim_output(config)`` is called once per run, by the process that writes the folder (never by
a Flower ClientApp): it refuses a folder holding files unless ``--resume`` or ``--overwrite``
says what to do with them, refuses ``--resume`` without a checkpoint, checks the folder is
writable and removes temporary files an interrupted write left behind. Nothing of a previous
run is touched unless ``--overwrite`` says so: a resumed run takes the "run complete" marker
(metrics.json) away only when it first changes the run (``outputs.unmark_complete``).
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import tempfile

from ..errors import UsageError
from .checkpoint import STATE_FILE, load_state
from .config import SimConfig
from .outputs import DELTA_FILE, METRICS_FILE, MODEL_DIR, PLOT_FILE

log = logging.getLogger("fedkseed.experiment")
# Everything a run writes to its folder ("flower.json": the Flower engine's transport log).
RUN_FILES = (METRICS_FILE, DELTA_FILE, MODEL_DIR, PLOT_FILE, STATE_FILE, "flower.json")


def claim_output(config: SimConfig) -> None:
    """Make ``config.output`` ready for this run, or raise a UsageError naming the setting."""
    output = pathlib.Path(config.output)
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
        # A previous run's files only; anything else the user keeps there stays.
        for name in RUN_FILES:  # metrics.json first: the folder stops saying "complete"
            _remove(output / name)


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
