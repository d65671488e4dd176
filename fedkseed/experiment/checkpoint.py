"""The checkpoint ``--resume`` continues from: ``state.npz`` in the output folder, numeric arrays
plus the rest as JSON (no pickle), rewritten atomically after every round (docs/formats.md#checkpoint).

Reading it never ends in a traceback: whatever is wrong with the file (truncated, corrupted, not
a checkpoint, another format version, missing or ill-typed entries, saved with other settings,
another base model or other data, or more rounds) is one ``UsageError`` line naming the file and
the field. The server's own state is checked by ``Server.load_state_dict`` (the RunBook turns
its error into such a line).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import re
from typing import TYPE_CHECKING, Any

import numpy as np

from ..atomic import save_atomically
from ..errors import UsageError
from .config import SimConfig, flag

if TYPE_CHECKING:
    from .prepare import Setup

STATE_FILE = "state.npz"
# Version of the checkpoint layout written by save_state (2: per-scorer Rouge-L; 3: "inputs").
STATE_FORMAT = 3
STATE_KEYS = ("identity", "inputs", "server", "rounds", "before")
# What each "inputs" fingerprint names in an error, and the option that chose it.
INPUTS = {"base": ("the base model", "--model"), "data": ("the data", "--data")}
# Round-record fields the run reads back (printing, plotting, metrics.json), with their rules;
# other fields of a record are carried into metrics.json as they are (any JSON value).
RECORD_NUMBERS = ("train_loss", "eval_loss")  # NaN allowed: a round may have no finite loss
RECORD_COUNTS = ("bytes_up_per_client", "bytes_down_per_client", "seconds")  # finite, >= 0
ROUGE_NUMBERS = ("mean", "low", "high")
_HEX64 = re.compile(r"[0-9a-f]{64}")


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


def inputs_of(setup: Setup) -> dict[str, str]:
    """The fingerprints of what a run starts from, recorded in its checkpoint: the base model's
    weights (``Setup.fingerprint``: layout and values) and the data as the run uses it (every
    client's and the evaluation's token tensors and the held-out examples, so a change to the
    data file, the split or the tokenizer shows)."""
    digest = hashlib.sha256()
    for batch in [client.data for client in setup.clients] + list(setup.eval_data):
        for key in sorted(batch):
            tensor = batch[key].detach().cpu().contiguous()
            digest.update(f"{key} {tensor.dtype} {tuple(tensor.shape)};".encode())
            digest.update(tensor.numpy().tobytes())
    for example in setup.heldout:
        digest.update(json.dumps(dataclasses.astuple(example)).encode())
    return {"base": setup.fingerprint, "data": digest.hexdigest()}


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
    _check_fields(state, path)
    return state


class _Field:
    """Checks of the value at one field of the checkpoint; a failure is a UsageError naming the
    file and the field's path (``rounds[2].eval_loss``)."""

    def __init__(self, path: pathlib.Path, name: str, value: Any) -> None:
        self.path, self.name, self.value = path, name, value

    def at(self, key: str | int) -> _Field:
        name = f"{self.name}[{key}]" if isinstance(key, int) else f"{self.name}.{key}"
        if isinstance(key, str) and key not in self.value:
            self.fail_at(name, "is missing")
        return _Field(self.path, name, self.value[key])

    def fail_at(self, name: str, problem: str) -> None:
        raise UsageError(f"--resume: {self.path} is inconsistent: {name} {problem}")

    def fail(self, problem: str) -> None:
        self.fail_at(self.name, problem)

    def of(self, kind: type | tuple[type, ...], what: str) -> _Field:
        """This field, if its value is of ``kind`` (a boolean is not a number here)."""
        if (isinstance(self.value, bool) and kind is not bool) or not isinstance(self.value, kind):
            self.fail(f"is {_kind(self.value)}, not {what}")
        return self

    def real(self, *, finite: bool = False, minimum: float | None = None) -> float:
        value = self.of((int, float), "a number").value
        if finite and not math.isfinite(value):
            self.fail(f"is {value!r}, not a finite number")
        if minimum is not None and not value >= minimum:
            self.fail(f"is {value!r}, below {minimum}")
        return value

    def count(self, minimum: int = 0) -> int:
        value = self.of(int, "an integer").value
        if value < minimum:
            self.fail(f"is {value}, below {minimum}")
        return value

    def json_value(self) -> None:
        """Any JSON value (what a record carries into metrics.json), no array among it."""
        value = self.value
        if isinstance(value, dict):
            for key in value:
                if not isinstance(key, str):
                    self.fail(f"has a key {key!r} that is not a string")
                self.at(key).json_value()
        elif isinstance(value, list):
            for i in range(len(value)):
                self.at(i).json_value()
        elif value is not None and not isinstance(value, (str, int, float, bool)):
            self.fail(f"is {_kind(value)}, not a JSON value")


def _check_fields(state: dict[str, Any], path: pathlib.Path) -> None:
    """Every part the run reads back besides the server's own state (``Server.load_state_dict``
    checks that), down to each field's type and range."""
    identity = _Field(path, "identity", state["identity"]).of(dict, "an object")
    for name, value in identity.value.items():
        if not isinstance(value, (str, int, float, bool, type(None))):
            identity.fail_at(f"identity.{name}", f"is {_kind(value)}, not a setting's value")
    inputs = _Field(path, "inputs", state["inputs"]).of(dict, "an object")
    for name in INPUTS:
        fingerprint = inputs.at(name).of(str, "a fingerprint")
        if not _HEX64.fullmatch(fingerprint.value):
            fingerprint.fail("is not a 64-digit hex fingerprint")
    _Field(path, "server", state["server"]).of(dict, "an object").at("round").count()
    rounds = _Field(path, "rounds", state["rounds"]).of(list, "a list")
    for i in range(len(rounds.value)):
        record = rounds.at(i).of(dict, "an object")
        record.at("round").count(1)
        for name in RECORD_NUMBERS:
            record.at(name).real()
        for name in RECORD_COUNTS:
            record.at(name).real(finite=True, minimum=0)
        if "epsilon" in record.value:  # a DP run's budget spent after the round
            record.at("epsilon").real(finite=True, minimum=0)
        record.json_value()
    before = _Field(path, "before", state["before"]).of(dict, "an object")
    before.at("eval_loss").real()
    _reals(before.at("eval_loss_per_example"))
    rouge = before.at("rouge_l")
    if rouge.value is not None:
        rouge.of(dict, "an object or null")
        for scorer in rouge.value:
            report = rouge.at(str(scorer)).of(dict, "an object")
            for name in ROUGE_NUMBERS:
                report.at(name).real()
            n = report.at("n").count()
            if len(_reals(report.at("per_example"))) != n:
                report.fail(f"has n = {n} but {len(report.value['per_example'])} per-example scores")


def _reals(field: _Field) -> list[float]:
    field.of(list, "a list")
    for i in range(len(field.value)):
        field.at(i).real()
    return field.value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, np.ndarray):
        return f"an array {value.dtype}{list(value.shape)}"
    return {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}.get(
        type(value), f"a {type(value).__name__}"
    )


def load_state(output: pathlib.Path, config: SimConfig, inputs: dict[str, str] | None = None) -> dict[str, Any]:
    """The checkpoint in ``output``, checked against ``config``: the same settings (the first
    that differs is named), no more rounds than ``--rounds`` and, given ``inputs``
    (:func:`inputs_of`, once the model and data are loaded), the same base model and data."""
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
    for name, (what, option) in INPUTS.items() if inputs is not None else ():
        if state["inputs"][name] != inputs[name]:
            value = getattr(config, option[2:])
            raise UsageError(
                f"--resume: {what} ({option} {value}) differs from the checkpoint's run in {output} "
                f"(fingerprint saved {state['inputs'][name][:16]}..., now {inputs[name][:16]}...)"
            )
    done = checkpoint_round(state, path)
    if config.rounds < done:
        raise UsageError(f"--rounds {config.rounds} is below the checkpoint's round {done} in {output}")
    return state


def checkpoint_round(state: dict[str, Any], path: pathlib.Path) -> int:
    """The last finished round of a checkpoint, checked against its per-round records (whose
    fields ``_check_fields`` checked)."""
    done = state["server"]["round"]
    numbers = [r["round"] for r in state["rounds"]]
    if numbers != list(range(1, done + 1)):
        raise UsageError(f"--resume: {path} is inconsistent (server at round {done}, records for rounds {numbers})")
    return done


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
