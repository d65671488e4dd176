"""The checkpoint ``--resume`` continues from: ``state.npz`` in the output folder, numeric arrays
plus the rest as JSON (no pickle), rewritten atomically after every round (docs/formats.md#checkpoint).

Reading it never ends in a traceback: whatever is wrong with the file (truncated, corrupted, not
a checkpoint, another format version, missing or ill-typed entries, saved with other settings or
more rounds) is one ``UsageError`` line naming the file and the problem.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from ..atomic import save_atomically
from ..errors import UsageError
from .config import SimConfig, flag

STATE_FILE = "state.npz"
STATE_FORMAT = 2  # version of the checkpoint layout written by save_state (2: per-scorer Rouge-L)
STATE_KEYS = ("identity", "server", "rounds", "before")


def _split_arrays(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """``value`` with every numpy array replaced by a reference into ``arrays`` (JSON-ready)."""
    if isinstance(value, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = value
        return {"__array__": key}
    if isinstance(value, dict):
        return {k: _split_arrays(v, arrays) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split_arrays(v, arrays) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _join_arrays(value: Any, arrays: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__array__"}:
            return arrays[value["__array__"]]
        return {k: _join_arrays(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_arrays(v, arrays) for v in value]
    return value


def save_state(output: pathlib.Path, state: dict[str, Any]) -> None:
    """The checkpoint as one .npz: numeric arrays plus the rest as JSON (no pickle)."""
    arrays: dict[str, np.ndarray] = {}
    document = json.dumps({"format": STATE_FORMAT, "state": _split_arrays(state, arrays)})
    arrays["__json__"] = np.frombuffer(document.encode(), dtype=np.uint8)

    def write(path: pathlib.Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    save_atomically(output / STATE_FILE, write)


def _read(path: pathlib.Path) -> dict[str, Any]:
    """The state saved in ``path``, its layout checked; UsageError for anything unreadable."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            document = json.loads(arrays["__json__"].tobytes())
            if not isinstance(document, dict):
                raise ValueError("its JSON is not an object")
            if document.get("format") != STATE_FORMAT:
                raise UsageError(
                    f"--resume: {path} has checkpoint format {document.get('format')!r}; "
                    f"this version reads {STATE_FORMAT}"
                )
            state = _join_arrays(document["state"], {k: arrays[k] for k in arrays.files})
    except UsageError:
        raise
    # A damaged ZIP surfaces as BadZipFile, EOFError, OSError, ValueError, KeyError, struct.error
    # and more, depending on where the damage is: whichever it is, the file is unreadable.
    except Exception as error:
        raise UsageError(f"--resume: {path} is not a readable checkpoint ({_describe(error)})") from None
    if not isinstance(state, dict) or any(key not in state for key in STATE_KEYS):
        missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
        raise UsageError(f"--resume: {path} is not a complete checkpoint (missing {', '.join(missing)})")
    if not _well_formed(state):
        raise UsageError(f"--resume: {path} is inconsistent (identity, rounds or before of the wrong form)")
    return state


def _well_formed(state: dict[str, Any]) -> bool:
    """The parts the run reads back besides the server's own state (which checks itself)."""
    number = (int, float)
    records = state["rounds"]
    before = state["before"]
    return (
        isinstance(state["identity"], dict)
        and isinstance(records, list)
        and all(
            isinstance(r, dict) and all(isinstance(r.get(key), number) for key in ("round", "train_loss", "eval_loss"))
            for r in records
        )
        and isinstance(before, dict)
        and isinstance(before.get("eval_loss"), number)
        and isinstance(before.get("eval_loss_per_example"), list)
        and (before.get("rouge_l") is None or isinstance(before.get("rouge_l"), dict))
    )


def load_state(output: pathlib.Path, config: SimConfig) -> dict[str, Any]:
    """The checkpoint in ``output``, checked against ``config``: the same settings (the first
    that differs is named) and no more rounds than ``--rounds``."""
    path = output / STATE_FILE
    if not path.is_file():
        raise UsageError(f"--resume: {output} holds no checkpoint ({STATE_FILE}); nothing to continue")
    state = _read(path)
    saved, current = state["identity"], config.run_identity()
    for name in sorted(set(saved) | set(current)):
        if saved.get(name, "(absent)") != current.get(name, "(absent)"):
            raise UsageError(
                f"--resume: {flag(name)} differs from the checkpoint's run in {output} "
                f"(saved {saved.get(name, '(absent)')!r}, now {current.get(name, '(absent)')!r})"
            )
    done = checkpoint_round(state, path)
    if config.rounds < done:
        raise UsageError(f"--rounds {config.rounds} is below the checkpoint's round {done} in {output}")
    return state


def checkpoint_round(state: dict[str, Any], path: pathlib.Path) -> int:
    """The last finished round of a checkpoint, checked against its per-round records."""
    try:
        done = int(state["server"]["round"])
        numbers = [int(r["round"]) for r in state["rounds"]]
    except (KeyError, TypeError, ValueError) as error:
        raise UsageError(f"--resume: {path} is inconsistent ({_describe(error)})") from None
    if numbers != list(range(1, done + 1)):
        raise UsageError(f"--resume: {path} is inconsistent (server at round {done}, records for rounds {numbers})")
    return done


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
