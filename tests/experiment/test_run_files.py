"""Files never lose a run (issue 11): the output folder's rules, checkpoints that cannot be read,
`apply`'s output, stale temporary files, and metrics.json as the "run complete" marker. Every run
is the tiny model through `fedkseed.cli.main`, in process."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import struct
import zlib

import numpy as np
import pytest
from safetensors.torch import load_file

from fedkseed.cli import main

TINY = [
    "--model", "tiny", "--clients", "4", "--clients-per-round", "2", "--local-steps", "2", "--k", "16",
    "--eval-examples", "2", "--rouge-examples", "2", "--max-new-tokens", "2", "--batch-size", "2", "--lr", "1e-3",
    "--quiet",
]  # fmt: skip


def simulate(output: pathlib.Path, rounds: int, *extra: str) -> int:
    return main(["simulate", *TINY, "--rounds", str(rounds), "--output", str(output), *extra])


def error_of(code: int, capsys: pytest.CaptureFixture) -> str:
    """The one stderr line of a refused command (exit code 2, no traceback)."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def snapshot(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory) -> pathlib.Path:
    """A finished 2-round run; tests copy it before changing anything."""
    output = tmp_path_factory.mktemp("two") / "run"
    assert simulate(output, 2) == 0
    return output


@pytest.fixture
def run_copy(two_rounds, tmp_path) -> pathlib.Path:
    target = tmp_path / "run"
    shutil.copytree(two_rounds, target)
    return target


# --------------------------------------------------------------------------- the output folder
@pytest.mark.slow
def test_a_used_output_folder_is_refused_and_left_as_it_was(run_copy, capsys):
    before = snapshot(run_copy)
    err = error_of(simulate(run_copy, 2), capsys)
    assert "--output" in err and "--resume" in err and "--overwrite" in err
    assert snapshot(run_copy) == before


def test_a_folder_with_any_file_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    err = error_of(simulate(tmp_path, 1), capsys)
    assert "notes.txt" in err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_overwrite_replaces_the_run_and_keeps_other_files(run_copy, two_rounds, capsys):
    (run_copy / "notes.txt").write_text("mine")
    assert simulate(run_copy, 1, "--overwrite") == 0
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1]  # the new 1-round run, not the old one
    assert (run_copy / "notes.txt").read_text() == "mine"
    assert (run_copy / "delta.fks").read_bytes() != (two_rounds / "delta.fks").read_bytes()
    names = sorted(p.name for p in run_copy.iterdir())  # nothing of the replaced run is left aside
    assert names == ["delta.fks", "losses.png", "metrics.json", "model", "notes.txt", "state.npz"]


@pytest.mark.slow
def test_overwrite_refuses_a_model_inside_the_output(run_copy, capsys):
    """Continuing from a finished run's own model with --overwrite (issue 18, finding 3):
    refused in one line naming both paths, before anything is moved or deleted."""
    before = snapshot(run_copy)
    model = run_copy / "model"
    code = main(["simulate", *TINY, "--rounds", "1", "--output", str(run_copy), "--overwrite", "--model", str(model)])
    err = error_of(code, capsys)
    assert f"--output {run_copy} contains the --model {run_copy / 'model'}" in err, err
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("where", ["itself", "inside", "parent"])
def test_output_must_lie_apart_from_the_data_file(tmp_path, where, capsys):
    data = tmp_path / "data" / "records.jsonl"
    data.parent.mkdir()
    data.write_text('{"instruction": "a", "response": "b"}\n')
    output = {"itself": data, "inside": data / "run", "parent": tmp_path}[where]
    code = simulate(output, 1, "--data", str(data), "--overwrite")
    err = error_of(code, capsys)
    assert "--output" in err and f"--data {data}" in err, err
    assert data.read_text().startswith('{"instruction"')


@pytest.mark.parametrize("where", ["entry", "cache", "inside"])
def test_output_must_lie_apart_from_the_model_cache(tmp_path, monkeypatch, where, capsys):
    from fedkseed.models import SMOLLM2_DIR

    cache = tmp_path / "cache"
    entry = cache / SMOLLM2_DIR
    entry.mkdir(parents=True)
    (entry / "model.safetensors").write_bytes(b"the cached base")
    monkeypatch.setenv("FEDKSEED_CACHE", str(cache))
    output = {"entry": entry, "cache": cache, "inside": entry / "run"}[where]
    err = error_of(simulate(output, 1, "--overwrite"), capsys)
    assert "--output" in err and "the model cache" in err, err
    assert (entry / "model.safetensors").read_bytes() == b"the cached base"


@pytest.mark.slow
def test_overwrite_keeps_the_old_run_when_the_new_one_fails(run_copy, tmp_path, capsys):
    """--overwrite deletes nothing before the new run's inputs are loaded: a run whose data
    file is bad leaves the folder exactly as it was."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    before = snapshot(run_copy)
    err = error_of(simulate(run_copy, 1, "--overwrite", "--data", str(bad)), capsys)
    assert str(bad) in err
    assert snapshot(run_copy) == before
    assert not list(run_copy.glob(".replaced-*"))  # the old run was put back, nothing kept aside


@pytest.mark.slow
def test_a_failed_overwrite_keeps_both_runs_once_the_new_one_has_a_checkpoint(run_copy):
    """The claim's rules on a real folder: the replaced run waits in .replaced-*; a run that
    fails after its first checkpoint keeps it (and stays resumable); the next run of the
    folder that finishes deletes it."""
    from fedkseed.experiment.config import SimConfig
    from fedkseed.experiment.folder import claim_output

    old = snapshot(run_copy)
    config = SimConfig(model="tiny", output=str(run_copy), overwrite=True)
    with pytest.raises(KeyboardInterrupt), claim_output(config) as claim:
        assert claim.replaced is not None and sorted(run_copy.iterdir()) == [claim.replaced]
        (run_copy / "state.npz").write_bytes(b"the new run's first checkpoint")
        raise KeyboardInterrupt
    assert snapshot(claim.replaced) == old  # the old run, whole
    assert (run_copy / "state.npz").read_bytes() == b"the new run's first checkpoint"
    with claim_output(SimConfig(model="tiny", output=str(run_copy), overwrite=True)) as second:
        (run_copy / "metrics.json").write_text("{}")
    assert not claim.replaced.exists() and second.replaced is None
    assert sorted(p.name for p in run_copy.iterdir()) == ["metrics.json"]


def test_resume_and_overwrite_exclude_each_other(tmp_path, capsys):
    err = error_of(simulate(tmp_path, 1, "--resume", "--overwrite"), capsys)
    assert "--resume" in err and "--overwrite" in err


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_resume_without_a_checkpoint_is_an_error(tmp_path, where, capsys):
    output = tmp_path / "typo"
    if where == "empty":
        output.mkdir()
    err = error_of(simulate(output, 1, "--resume"), capsys)
    assert "--resume" in err and "no checkpoint" in err
    assert output.exists() == (where == "empty") and not (output / "metrics.json").exists()


@pytest.mark.parametrize(
    "change, setting",
    [
        (["--lr", "2e-3"], "--lr"),
        (["--k", "32"], "--k"),
        (["--seed", "1"], "--seed"),
        (["--pro"], "--pro"),
        (["--aggregate", "median"], "--aggregate"),
        (["--dtype", "bf16"], "--dtype"),
    ],
)
@pytest.mark.slow
def test_resume_with_other_settings_names_the_setting(run_copy, change, setting, capsys):
    before = snapshot(run_copy)
    argv = list(TINY)
    if change[0] in argv:  # replace the value, do not add a second option
        argv[argv.index(change[0]) + 1] = change[1]
    else:
        argv += change
    code = main(["simulate", *argv, "--rounds", "3", "--output", str(run_copy), "--resume"])
    err = error_of(code, capsys)
    assert f"{setting} differs" in err, err
    assert snapshot(run_copy) == before  # refused before anything changed, the marker included


@pytest.mark.slow
def test_rounds_below_the_checkpoint_are_refused(run_copy, capsys):
    before = snapshot(run_copy)
    err = error_of(simulate(run_copy, 1, "--resume"), capsys)
    assert "--rounds 1" in err and "round 2" in err
    assert snapshot(run_copy) == before


def test_output_is_checked_writable_before_the_model_is_loaded(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # The model does not exist either: the error is about --output, so it came first.
    code = main(["simulate", "--model", str(tmp_path / "no-model"), "--output", str(blocker / "run"), "--quiet"])
    err = error_of(code, capsys)
    assert "--output" in err and "not writable" in err
    code = main(["simulate", "--model", str(tmp_path / "no-model"), "--output", str(blocker), "--quiet"])
    assert "is a file" in error_of(code, capsys)


# ---------------------------------------------------------------------------- the checkpoint
def _rewrite_state(path: pathlib.Path, change) -> None:
    """Rewrite a checkpoint's JSON document (and arrays) through ``change(document, arrays)``,
    the way numpy.savez writes one: an independent writer, not the project's save_state."""
    with np.load(path, allow_pickle=False) as loaded:
        arrays = {k: loaded[k] for k in loaded.files}
    document = json.loads(arrays["__json__"].tobytes())
    change(document, arrays)
    arrays["__json__"] = np.frombuffer(json.dumps(document).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _table_key(document):
    return document["state"]["server"]["table"]["__array__"]


CORRUPTIONS = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "not a zip": lambda p: p.write_text("hello"),
    "bit flip in the JSON": lambda p: _flip(p, p.read_bytes().index(b'{"format"') + 20),
    "bit flip in an array": lambda p: _flip(p, p.read_bytes().index(b"\x93NUMPY", 200) + 140),
    "bit flip in the directory": lambda p: _flip(p, p.read_bytes().rindex(b"__json__.npy") + 2),
    "other format version": lambda p: _rewrite_state(p, lambda d, a: d.update(format=99)),
    "missing keys": lambda p: _rewrite_state(p, lambda d, a: d["state"].pop("server")),
    "not an object": lambda p: _rewrite_state(p, lambda d, a: d.update(state=[1, 2])),
    "missing array": lambda p: _rewrite_state(p, lambda d, a: a.pop(_table_key(d))),
    "rounds disagree": lambda p: _rewrite_state(p, lambda d, a: d["state"]["rounds"].pop()),
    "wrong table size": lambda p: _rewrite_state(p, lambda d, a: a.update({_table_key(d): np.zeros(3, np.float32)})),
    "server fields missing": lambda p: _rewrite_state(p, lambda d, a: d["state"]["server"].pop("accumulated")),
    "server pool not a dict": lambda p: _rewrite_state(p, lambda d, a: d["state"]["server"].update(pool=[1])),
    "before without eval loss": lambda p: _rewrite_state(p, lambda d, a: d["state"]["before"].pop("eval_loss")),
    "round record not a dict": lambda p: _rewrite_state(p, lambda d, a: d["state"]["rounds"].__setitem__(0, 7)),
    # Crafted checkpoints, valid ZIP and CRC (issue 18, finding 5): each field named in one line.
    "before without rouge_l": lambda p: _rewrite_state(p, lambda d, a: d["state"]["before"].pop("rouge_l")),
    "rouge_l n disagrees": lambda p: _rewrite_state(p, lambda d, a: _rouge(d).update(n=5)),
    "rouge_l mean a string": lambda p: _rewrite_state(p, lambda d, a: _rouge(d).update(mean="high")),
    "record without bytes": lambda p: _rewrite_state(p, lambda d, a: _record(d, 0).pop("bytes_up_per_client")),
    "round number 1.5": lambda p: _rewrite_state(p, lambda d, a: _record(d, 0).update(round=1.5)),
    "round number true": lambda p: _rewrite_state(p, lambda d, a: _record(d, 0).update(round=True)),
    "eval loss a string": lambda p: _rewrite_state(p, lambda d, a: _record(d, 1).update(eval_loss="low")),
    "seconds infinite": lambda p: _rewrite_state(p, lambda d, a: _record(d, 1).update(seconds=float("inf"))),
    "an array in a record": lambda p: _rewrite_state(p, lambda d, a: _record(d, 0).update(clients=_table_ref(d))),
    "per-example loss null": lambda p: _rewrite_state(
        p, lambda d, a: d["state"]["before"]["eval_loss_per_example"].__setitem__(0, None)
    ),
    "identity not an object": lambda p: _rewrite_state(p, lambda d, a: d["state"].update(identity="tiny")),
    "identity value a list": lambda p: _rewrite_state(p, lambda d, a: d["state"]["identity"].update(lr=[1])),
    "inputs missing": lambda p: _rewrite_state(p, lambda d, a: d["state"].pop("inputs")),
    "base fingerprint not hex": lambda p: _rewrite_state(p, lambda d, a: d["state"]["inputs"].update(base="x" * 64)),
    "server round a string": lambda p: _rewrite_state(p, lambda d, a: d["state"]["server"].update(round="2")),
    "server round a float": lambda p: _rewrite_state(p, lambda d, a: d["state"]["server"].update(round=2.0)),
    # The server's own state: checked by Server.load_state_dict, reported by the RunBook.
    "NaN table": lambda p: _rewrite_state(p, lambda d, a: _server_array(d, a, "table").fill(np.nan)),
    "NaN accumulator": lambda p: _rewrite_state(p, lambda d, a: _server_array(d, a, "accumulated").fill(np.nan)),
    "exponent 200": lambda p: _rewrite_state(p, lambda d, a: d["state"]["server"].update(exponent=200)),
    "synced 1e9": lambda p: _rewrite_state(p, lambda d, a: _server_array(d, a, "synced").fill(10**9)),
    "infinite RMS history": lambda p: _rewrite_state(p, lambda d, a: _rms_history(d, a).fill(np.inf)),
}

# The field the error names, for the crafted checkpoints whose fields the checkpoint reader checks.
FIELD_NAMED = {
    "before without rouge_l": "before.rouge_l is missing",
    "rouge_l n disagrees": "before.rouge_l.rouge-score has n = 5",
    "rouge_l mean a string": "before.rouge_l.rouge-score.mean is a string",
    "record without bytes": "rounds[0].bytes_up_per_client is missing",
    "round number 1.5": "rounds[0].round is a float",
    "round number true": "rounds[0].round is a boolean",
    "eval loss a string": "rounds[1].eval_loss is a string",
    "seconds infinite": "rounds[1].seconds is inf",
    "an array in a record": "rounds[0].clients is an array",
    "per-example loss null": "before.eval_loss_per_example[0] is null",
    "identity not an object": "identity is a string",
    "identity value a list": "identity.lr is a list",
    "inputs missing": "missing inputs",
    "base fingerprint not hex": "inputs.base is not a 64-digit hex fingerprint",
    "server round a string": "server.round is a string",
    "server round a float": "server.round is a float",
}


def _record(document, i):
    return document["state"]["rounds"][i]


def _rouge(document):
    return next(iter(document["state"]["before"]["rouge_l"].values()))


def _table_ref(document):
    return {"__array__": _table_key(document)}


def _server_array(document, arrays, name) -> np.ndarray:
    """The array of the server state's field ``name``, writable in place."""
    key = document["state"]["server"][name]["__array__"]
    arrays[key] = arrays[key].copy()
    return arrays[key]


def _rms_history(document, arrays) -> np.ndarray:
    """The per-step RMS values the automatic bound derives from, whatever the server calls them."""
    server = document["state"]["server"]
    name = next(n for n in ("rms_history", "client_rms") if n in server)
    return _server_array(document, arrays, name)


def _flip(path: pathlib.Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.slow
def test_an_unreadable_or_inconsistent_checkpoint_is_one_line_and_exit_2(run_copy, corruption, capsys):
    CORRUPTIONS[corruption](run_copy / "state.npz")
    marker = (run_copy / "metrics.json").read_bytes()
    err = error_of(simulate(run_copy, 3, "--resume"), capsys)
    assert "state.npz" in err, err
    assert FIELD_NAMED.get(corruption, "") in err, err
    assert (run_copy / "metrics.json").read_bytes() == marker  # a refused resume changes nothing


def _one_round_from(tmp_path, model: pathlib.Path, data: pathlib.Path) -> pathlib.Path:
    output = tmp_path / "run"
    assert main(["simulate", *TINY, "--rounds", "1", "--output", str(output), "--model", str(model),
                 "--data", str(data)]) == 0  # fmt: skip
    return output


def _resume_from(output: pathlib.Path, model: pathlib.Path, data: pathlib.Path) -> int:
    return main(["simulate", *TINY, "--rounds", "2", "--output", str(output), "--model", str(model),
                 "--data", str(data), "--resume"])  # fmt: skip


@pytest.mark.slow
def test_resume_with_another_base_model_or_data_is_refused(base_folder, tmp_path, capsys):
    """Issue 18, finding 4: the checkpoint records the base's and the data's fingerprints."""
    from fedkseed.data import load_examples
    from fedkseed.models import load_model, save_model

    model = tmp_path / "base"
    shutil.copytree(base_folder, model)
    data = tmp_path / "data.jsonl"
    records = [{"instruction": e.instruction, "input": e.input, "output": e.output, "category": e.category}
               for e in load_examples("faq")[:40]]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    output = _one_round_from(tmp_path, model, data)
    capsys.readouterr()
    before = snapshot(output)

    save_model(*load_model("tiny", seed=1), model)  # the base's weights replaced, same layout
    err = error_of(_resume_from(output, model, data), capsys)
    assert f"the base model (--model {model}) differs" in err, err
    assert snapshot(output) == before

    shutil.rmtree(model)
    shutil.copytree(base_folder, model)
    records[3]["output"] += " (edited)"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    err = error_of(_resume_from(output, model, data), capsys)
    assert f"the data (--data {data}) differs" in err, err
    assert snapshot(output) == before

    records[3]["output"] = records[3]["output"].removesuffix(" (edited)")
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert _resume_from(output, model, data) == 0  # the same base and data: it continues


# ----------------------------------------------------------- temporaries and the complete marker
@pytest.mark.slow
def test_stale_temporaries_are_cleaned_at_start(run_copy):
    stale = [
        run_copy / ".state.npz-x1y2z3",
        run_copy / ".metrics.json-abc",
        run_copy / ".delta.fks-q",
        run_copy / "model" / ".model.safetensors-k9",
    ]
    for path in stale:
        path.write_bytes(b"half")
    (run_copy / ".model-scratch").mkdir()  # the model writer's scratch folder
    (run_copy / "mine.txt").write_text("kept")
    (run_copy / ".hidden-but-mine").write_text("kept")
    assert simulate(run_copy, 2, "--resume") == 0  # nothing left to train: rewrites the outputs
    assert not any(p.exists() for p in stale) and not (run_copy / ".model-scratch").exists()
    assert (run_copy / "mine.txt").exists() and (run_copy / ".hidden-but-mine").exists()


@pytest.mark.slow
def test_metrics_json_is_written_last(two_rounds):
    written = [p for p in two_rounds.rglob("*") if p.is_file() and p.name not in ("metrics.json", "state.npz")]
    assert {p.name for p in written} >= {"delta.fks", "losses.png", "model.safetensors", "config.json"}
    last = max(os.stat(p).st_mtime_ns for p in written)
    assert os.stat(two_rounds / "metrics.json").st_mtime_ns >= last


@pytest.mark.slow
def test_a_run_that_dies_writing_its_model_does_not_look_complete(run_copy, tmp_path):
    """write_outputs with a tokenizer that cannot be saved: the delta and the model's weights
    are written, the run fails, and no metrics.json says it finished."""
    from fedkseed.experiment import Results, write_outputs
    from fedkseed.experiment.config import SimConfig
    from fedkseed.models import load_model

    model, _ = load_model("tiny")
    output = tmp_path / "dying"
    config = SimConfig(model="tiny", output=str(output))
    results = Results(config, [], {"eval_loss_before": 1.0}, b"delta", model, tokenizer=None)
    with pytest.raises(AttributeError):
        write_outputs(results)
    assert (output / "delta.fks").exists() and not (output / "metrics.json").exists()


@pytest.mark.slow
def test_resuming_a_finished_run_extends_it_and_its_marker(run_copy):
    assert simulate(run_copy, 3, "--resume") == 0
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]


# ------------------------------------------------------------------------------------- apply
def _apply(base, delta, output, *extra) -> int:
    return main(["apply", "--base", str(base), "--delta", str(delta), "--output", str(output), *extra])


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> pathlib.Path:
    """The tiny model saved as a folder: a base that is a real directory."""
    from fedkseed.models import load_model, save_model

    folder = tmp_path_factory.mktemp("base") / "tiny-base"
    save_model(*load_model("tiny"), folder)
    return folder


@pytest.mark.parametrize("where", ["itself", "inside", "parent"])
@pytest.mark.slow
def test_apply_refuses_an_output_that_overlaps_the_base(two_rounds, base_folder, where, capsys):
    before = snapshot(base_folder)
    output = {"itself": base_folder, "inside": base_folder / "out", "parent": base_folder.parent}[where]
    err = error_of(_apply(base_folder, two_rounds / "delta.fks", output, "--overwrite"), capsys)
    assert "--output" in err and "--base" in err
    assert snapshot(base_folder) == before


@pytest.mark.slow
def test_apply_refuses_to_overwrite_the_cached_base(two_rounds, tmp_path, monkeypatch, capsys):
    """`apply --base smollm2-135m --output <its cache entry> --overwrite` (issue 18, finding 3)."""
    from fedkseed.models import SMOLLM2_DIR

    monkeypatch.setenv("FEDKSEED_CACHE", str(tmp_path / "cache"))
    entry = tmp_path / "cache" / SMOLLM2_DIR
    entry.mkdir(parents=True)
    (entry / "model.safetensors").write_bytes(b"the cached base")
    err = error_of(_apply("smollm2-135m", two_rounds / "delta.fks", entry, "--overwrite"), capsys)
    assert f"--output {entry} is the --base {entry}" in err, err
    assert (entry / "model.safetensors").read_bytes() == b"the cached base"


@pytest.mark.slow
def test_apply_refuses_an_output_holding_the_delta(two_rounds, tmp_path, capsys):
    delta = tmp_path / "run" / "delta.fks"
    delta.parent.mkdir()
    shutil.copy(two_rounds / "delta.fks", delta)
    err = error_of(_apply("tiny", delta, delta.parent, "--overwrite"), capsys)
    assert f"contains the --delta {delta}" in err, err
    assert delta.read_bytes() == (two_rounds / "delta.fks").read_bytes()


@pytest.mark.slow
def test_apply_writes_through_a_temporary_folder_and_overwrites_only_when_asked(
    two_rounds, base_folder, tmp_path, capsys
):
    output = tmp_path / "out"
    assert _apply(base_folder, two_rounds / "delta.fks", output) == 0
    fine_tuned = load_file(str(two_rounds / "model" / "model.safetensors"))
    rebuilt = load_file(str(output / "model.safetensors"))
    assert fine_tuned.keys() == rebuilt.keys() and all((fine_tuned[k] == rebuilt[k]).all() for k in rebuilt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no scratch folder left
    capsys.readouterr()
    err = error_of(_apply(base_folder, two_rounds / "delta.fks", output), capsys)
    assert "--overwrite" in err
    (tmp_path / ".out-apply-stale").mkdir()  # an interrupted apply's scratch folder
    (output / "model.safetensors").write_bytes(b"old")
    assert _apply(base_folder, two_rounds / "delta.fks", output, "--overwrite") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert load_file(str(output / "model.safetensors")).keys() == rebuilt.keys()


@pytest.mark.slow
def test_apply_checks_its_output_before_loading_the_model(two_rounds, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = error_of(_apply(tmp_path / "no-model", two_rounds / "delta.fks", blocker / "out"), capsys)
    assert "--output" in err


def _with_lr(delta: bytes, old: float, new: float) -> bytes:
    """The delta file with its float32 lr replaced and its CRC recomputed (an independent edit
    of the documented layout: the lr is the float32 after the pool seed)."""
    body = delta[:-4]
    packed = struct.pack("<f", old)
    assert body.count(packed) == 1
    body = body.replace(packed, struct.pack("<f", new))
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -1e-3, 0.0])
@pytest.mark.slow
def test_apply_refuses_a_delta_whose_lr_cannot_build_a_model(two_rounds, tmp_path, lr, capsys):
    delta = tmp_path / "bad.fks"
    delta.write_bytes(_with_lr((two_rounds / "delta.fks").read_bytes(), float(np.float32(1e-3)), lr))
    err = error_of(_apply("tiny", delta, tmp_path / "out"), capsys)
    assert "--delta" in err and ("lr" in err or "learning rate" in err)
    assert not (tmp_path / "out").exists()
