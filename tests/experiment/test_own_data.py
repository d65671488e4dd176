"""A user's own model and data: folders without a chat template or a tokenizer, dtypes kept on
save, Alpaca and Dolly files (JSON array and JSON Lines), the random hold-out for data without
categories, bad text in data files, hold-out by name, the balanced split, long examples fitted into
--max-length (counted, never dropped), and
Rouge-L both ways with bootstrap intervals. Uses the "tiny" model."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedkseed import data as D
from fedkseed import metrics, models
from fedkseed.cli import main
from fedkseed.errors import UsageError
from fedkseed.experiment.config import SimConfig


@pytest.fixture(scope="module")
def tiny():
    return models.load_model("tiny", seed=0)


@pytest.fixture(scope="module")
def faq():
    return D.load_examples("faq")


def _params(model):
    return [p.detach() for p in model.parameters()]


# --- model folders ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def no_template_folder(tiny, tmp_path_factory):
    """A tiny Llama folder whose tokenizer has no chat template."""
    folder = tmp_path_factory.mktemp("no-template")
    model = tiny[0]
    plain = models.smollm2_tokenizer()
    plain.chat_template = None
    model.save_pretrained(folder)
    plain.save_pretrained(folder)
    return folder


def test_no_chat_template_falls_back_to_alpaca_and_says_so(no_template_folder, tiny, faq, caplog):
    """Said once, where the first prompt is built; loading the model (all `apply` does) is silent."""
    with caplog.at_level(logging.WARNING, logger="fedkseed"):
        model, tokenizer = models.load_model(str(no_template_folder))
        assert caplog.records == []
        D.prompt_ids(tokenizer, faq[0])
        D.encode(tokenizer, faq[:2])
    assert tokenizer.chat_template is None
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        (
            "fedkseed.data",
            f"the tokenizer in {no_template_folder} has no chat template: prompts use FedKSeed's Alpaca template",
        )
    ]
    assert all(torch.equal(a, b) for a, b in zip(_params(model), _params(tiny[0])))
    with_input = D.Example("Translate to Swedish", "a house", "ett hus", "default")
    # The official code's prompt, character for character (FederatedScope FedKSeed, llm_dataset.py).
    assert D.alpaca_prompt(with_input) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response for the task request.\n\n### Instruction:\nTranslate to Swedish\n\n### Input:\na house"
        "\n\n### Response:"
    )
    assert D.alpaca_prompt(faq[0]) == (
        "Below is an instruction that describes a task. Write a response for the task request.\n\n"
        f"### Instruction:\n{faq[0].instruction}\n\n### Response:"
    )
    batch = D.encode(tokenizer, [faq[0], with_input])
    for row, example in enumerate([faq[0], with_input]):
        prompt = D.prompt_ids(tokenizer, example)
        assert tokenizer.decode(prompt) == D.alpaca_prompt(example)
        length = int(batch["attention_mask"][row].sum())
        labels = batch["labels"][row]
        assert (labels[: len(prompt)] == -100).all()
        assert tokenizer.decode(labels[len(prompt) : length]) == example.output + tokenizer.eos_token
    assert torch.isfinite(D.lm_loss(model, batch))
    assert len(D.generate(model, tokenizer, [with_input], max_new_tokens=4)) == 1


def test_template_tokenizer_logs_nothing(tiny, tmp_path, caplog):
    model, tokenizer = tiny
    models.save_model(model, tokenizer, tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedkseed"):
        _, loaded = models.load_model(str(tmp_path))
        D.encode(loaded, [D.Example("Q?", "", "A.", "default")])
    assert caplog.records == []


@pytest.mark.parametrize(
    "keep, problem",
    [
        (("config.json", "model.safetensors"), "no tokenizer (tokenizer.json, tokenizer.model, vocab.json)"),
        (
            ("config.json", "tokenizer.json", "tokenizer_config.json"),
            "no weights (model.safetensors or pytorch_model.bin)",
        ),
        (("model.safetensors", "tokenizer.json"), "no config.json"),
    ],
)
def test_incomplete_folder_is_one_line_naming_it(no_template_folder, tmp_path, keep, problem):
    for name in keep:
        (tmp_path / name).write_bytes((no_template_folder / name).read_bytes())
    with pytest.raises(models.ModelLoadError) as error:
        models.load_model(str(tmp_path))
    assert str(error.value).startswith(f"model folder {tmp_path}: ")
    assert problem in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("broken, what", [("model.safetensors", "the model"), ("tokenizer.json", "the tokenizer")])
def test_unreadable_folder_is_one_line(no_template_folder, tmp_path, broken, what):
    for source in no_template_folder.iterdir():
        (tmp_path / source.name).write_bytes(source.read_bytes())
    (tmp_path / broken).write_bytes(b"not what it claims to be")
    with pytest.raises(models.ModelLoadError) as error:
        models.load_model(str(tmp_path))
    assert str(error.value).startswith(f"model folder {tmp_path}: cannot read {what} ")
    assert broken in str(error.value) and "\n" not in str(error.value)  # names the unreadable file


def test_dtype_is_chosen_at_load_and_kept_on_save(tiny, tmp_path):
    model, tokenizer = tiny
    bf16, _ = models.load_model("tiny", seed=0, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert all(torch.equal(a.to(torch.bfloat16), b) for a, b in zip(_params(model), _params(bf16)))
    models.save_model(bf16, tokenizer, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    # Half the bytes of float32: the weights were written as bfloat16, not upcast.
    numel = sum(p.numel() for p in bf16.parameters())
    assert (tmp_path / "model.safetensors").stat().st_size < 2 * numel + 100_000
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o044  # readable like any saved file
    again, _ = models.load_model(str(tmp_path), dtype=None)  # the folder's own dtype
    assert all(torch.equal(a, b) for a, b in zip(_params(bf16), _params(again)))
    upcast, _ = models.load_model(str(tmp_path))  # the default asks for float32
    assert all(p.dtype == torch.float32 for p in upcast.parameters())
    with pytest.raises(models.ModelLoadError, match="dtype must be one of fp32, bf16, fp16"):
        models.load_model("tiny", dtype="int8")


def test_importing_models_changes_no_environment_variable(monkeypatch):
    import importlib.util
    import os

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # what the module used to set at import
    before = dict(os.environ)
    # A fresh copy of the module, run beside the imported one (which the other tests keep using).
    spec = importlib.util.spec_from_file_location("fedkseed._models_copy", models.__file__)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert dict(os.environ) == before


# --- data files ------------------------------------------------------------------------------


ALPACA = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, sleep, move."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
]


def test_alpaca_json_array_loads(tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(ALPACA, indent=4), encoding="utf-8")  # as alpaca_data.json ships
    assert D.load_examples(str(path)) == [
        D.Example(r["instruction"], r["input"], r["output"], D.DEFAULT_CATEGORY) for r in ALPACA
    ]


def test_dolly_jsonl_loads(tmp_path):
    rows = [
        {
            "instruction": "When was it built?",
            "context": "The bridge opened in 1932.",
            "response": "1932",
            "category": "closed_qa",
        },
        {"instruction": "Name a colour.", "context": "", "response": "Blue", "category": "brainstorming"},
    ]
    path = tmp_path / "dolly.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert D.load_examples(str(path)) == [
        D.Example("When was it built?", "The bridge opened in 1932.", "1932", "closed_qa"),
        D.Example("Name a colour.", "", "Blue", "brainstorming"),
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '[{"instruction": "a", "output": "b"}, {"instruction": "x"}]',
            "alpaca.json item 1: missing field 'output' or 'response'; expected JSON Lines or a JSON array",
        ),
        ('[{"instruction": "a", "output": "b"},\n "just text"]', "alpaca.json item 1: got a JSON str; expected"),
        ('[{"instruction": "a",\n "output": }]', "alpaca.json:2: invalid JSON"),
        (
            '{"instruction": "a",\n "output": "b"}',
            "alpaca.json:1: invalid JSON .*; expected JSON Lines or a JSON array",
        ),
    ],
)
def test_array_errors_name_the_item_or_line_and_the_format(tmp_path, text, message):
    path = tmp_path / "alpaca.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        D.load_examples(str(path))


def test_jsonl_lines_end_at_newlines_only(tmp_path):
    rows = [{"instruction": "Split\u2028here?", "output": "No\x85\x1c."}, {"instruction": "b", "output": "c"}]
    path = tmp_path / "separators.jsonl"
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")  # written raw, as JSON allows
    assert D.load_examples(str(path)) == [
        D.Example(r["instruction"], "", r["output"], D.DEFAULT_CATEGORY) for r in rows
    ]


def test_formats_help_names_every_accepted_field():
    for names, _ in D.FIELDS.values():
        for name in names:
            assert name in D.DATA_FORMATS_HELP
    assert "JSON Lines" in D.DATA_FORMATS_HELP and "JSON array" in D.DATA_FORMATS_HELP


# --- hold-out and split ----------------------------------------------------------------------


def test_data_without_categories_holds_out_random_examples(faq):
    plain = [D.Example(e.instruction, e.input, e.output, D.DEFAULT_CATEGORY) for e in faq]
    split = D.split_data(plain, 5, 0.5, seed=0, holdout=1)
    assert split.note == "no categories: holding out a random 10% of examples (50 of 503) for evaluation"
    assert len(split.heldout) == 50 and split.heldout_categories == ()
    assigned = [e for c in split.clients for e in c]
    assert sorted(map(plain.index, assigned + split.heldout)) == list(range(len(plain)))
    # Random, not the first or last rows; deterministic from the seed, and the seed matters.
    rows = [plain.index(e) for e in split.heldout]
    assert rows != list(range(50)) and rows != list(range(453, 503))
    assert D.split_data(plain, 5, 0.5, seed=0, holdout=1) == split
    assert D.split_data(plain, 5, 0.5, seed=1, holdout=1).heldout != split.heldout
    none = D.split_data(plain, 5, 0.5, seed=0, holdout=0)
    assert none.heldout == [] and none.note is None
    assert D.split_data(faq, 5, 0.5, seed=0, holdout=1).note is None  # categories: no note


@pytest.mark.parametrize(
    "value, parsed",
    [
        (2, 2),
        ("3", 3),
        (" 0 ", 0),
        ("bygglov", ("bygglov",)),
        ("bygglov, vvs", ("bygglov", "vvs")),
        (["bygglov", "vvs"], ("bygglov", "vvs")),
    ],
)
def test_parse_holdout(value, parsed):
    assert D.parse_holdout(value) == parsed


@pytest.mark.parametrize("value", [-1, True, "", "bygglov,,vvs"])
def test_parse_holdout_rejects(value):
    with pytest.raises(ValueError, match="--holdout"):
        D.parse_holdout(value)


def test_holdout_by_names(faq):
    split = D.split_data(faq, 5, 0.5, seed=0, holdout="bygglov,vvs")
    assert split.heldout_categories == ("bygglov", "vvs")
    assert split.heldout == [e for e in faq if e.category in ("bygglov", "vvs")] and len(split.heldout) == 35
    with pytest.raises(ValueError, match=r"--holdout: unknown categories \['nope'\] \(the data has "):
        D.split_data(faq, 5, 0.5, seed=0, holdout="bygglov,nope")


def test_default_split_is_unchanged_for_the_demo(faq):
    # Pinned from the split before the balanced option existed: the demo's bits must not move.
    split = D.split_data(faq, 20, 0.5, seed=0, holdout=1)
    assert split.heldout_categories == ("tomtgrans-servitut",)
    assert " ".join(str(len(c)) for c in split.clients) == "14 12 25 23 22 18 21 39 28 20 15 24 25 15 40 38 12 22 27 56"
    index = {e: i for i, e in enumerate(faq)}
    rows = repr([[index[e] for e in c] for c in split.clients]).encode()
    assert hashlib.sha256(rows).hexdigest()[:16] == "035a0ebafbc76035"


@pytest.mark.parametrize("num_clients, alpha", [(20, 0.5), (25, 0.1), (10, 5.0)])
def test_balanced_split_gives_every_client_the_minimum(faq, num_clients, alpha):
    split = D.split_data(faq, num_clients, alpha, seed=2, holdout=1, balanced=True)
    sizes = [len(c) for c in split.clients]
    assert min(sizes) >= D.MIN_CLIENT_SIZE
    assigned = [e for c in split.clients for e in c]
    held = set(split.heldout_categories)
    assert sorted(map(faq.index, assigned)) == [i for i, e in enumerate(faq) if e.category not in held]
    assert D.split_data(faq, num_clients, alpha, seed=2, holdout=1, balanced=True) == split
    # A client stops taking examples once it holds its fair share: no client exceeds it by more
    # than the largest category it could have received in one piece.
    largest = max(sum(e.category == c for e in faq) for c in {e.category for e in faq})
    assert max(sizes) < len(assigned) / num_clients + largest
    plain = [len(c) for c in D.split_data(faq, num_clients, alpha, seed=2, holdout=1).clients]
    assert np.std(sizes) < np.std(plain)


def test_balanced_split_refuses_what_it_cannot_do(faq, monkeypatch):
    with pytest.raises(ValueError, match="cannot give every client 10"):
        D.split_data(faq, 60, 0.5, seed=0, holdout=1, balanced=True)
    monkeypatch.setattr(D, "BALANCED_ATTEMPTS", 20)  # the message, without 1000 hopeless draws
    with pytest.raises(ValueError, match="no balanced split with 12 examples per client in 20 draws"):
        D.split_data(faq, 40, 0.01, seed=0, holdout=1, balanced=True, min_size=12)


# --- lengths: fitting examples into --max-length ---------------------------------------------


def _chat_tokens(tokenizer, example, *, with_answer):
    """The example's tokens straight from the chat template (not through data.py): the prompt
    with the generation prompt, or prompt and answer."""
    messages = [{"role": "user", "content": example.instruction}]
    if with_answer:
        messages.append({"role": "assistant", "content": example.output})
    return list(
        tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=not with_answer)["input_ids"]
    )


def _expected_row(tokenizer, example, max_length):
    """The fitting rule computed independently: the answer keeps what fits beside the prompt's
    last quarter of max_length (or the whole prompt), the prompt keeps its tail in the rest."""
    full = _chat_tokens(tokenizer, example, with_answer=True)
    prompt = len(_chat_tokens(tokenizer, example, with_answer=False))
    answer = min(len(full) - prompt, max_length - min(prompt, -(-max_length // 4)))
    kept = min(prompt, max_length - answer)
    return full[prompt - kept : prompt + answer], kept


def test_long_prompt_keeps_its_answer_and_loses_its_left(tiny):
    model, tokenizer = tiny
    long = D.Example("Summarise: " + " ".join(f"clause {i}" for i in range(60)) + " ends here.", "", "A permit.", "q")
    prompt = _chat_tokens(tokenizer, long, with_answer=False)
    assert len(prompt) > 64  # the old rule dropped this example: its prompt alone fills 64
    row, kept = _expected_row(tokenizer, long, 64)
    batch = D.encode(tokenizer, [long], 64)
    assert batch["input_ids"][0].tolist() == row and len(row) == 64
    labels = batch["labels"][0].tolist()
    assert labels[:kept] == [D.IGNORE_INDEX] * kept
    assert tokenizer.decode(labels[kept:]) == "A permit.<|im_end|>\n"  # the whole answer and its end
    assert tokenizer.decode(row[:kept]).endswith("ends here.<|im_end|>\n<|im_start|>assistant\n")
    assert D.count_truncation(tokenizer, [long], 64) == D.Truncation(64, 1, 1, 0)
    assert torch.isfinite(D.lm_loss(model, batch))


def test_answer_longer_than_the_limit_is_cut_and_counted(tiny, faq):
    _, tokenizer = tiny
    wordy = D.Example("What is a permit?", "", " ".join(f"step {i} of the application;" for i in range(40)), "q")
    full = _chat_tokens(tokenizer, wordy, with_answer=True)
    prompt = _chat_tokens(tokenizer, wordy, with_answer=False)
    assert len(full) - len(prompt) > 64  # the answer alone exceeds the limit
    row, kept = _expected_row(tokenizer, wordy, 64)
    assert kept == 16 < len(prompt)  # the prompt's last quarter of 64 tokens
    batch = D.encode(tokenizer, [wordy, faq[0]], 64)
    assert batch["input_ids"][0].tolist() == row and len(row) == 64
    assert wordy.output.startswith(tokenizer.decode(batch["labels"][0, kept:]))
    assert D.count_truncation(tokenizer, [wordy], 64) == D.Truncation(64, 1, 1, 1)
    # Every FAQ example against the independent rule, at a limit that cuts most of them.
    for example in faq[:40]:
        assert D.encode(tokenizer, [example], 64)["input_ids"][0].tolist() == _expected_row(tokenizer, example, 64)[0]


def test_auto_max_length_keeps_a_small_user_file_intact(tiny, tmp_path):
    _, tokenizer = tiny
    records = [
        {"instruction": f"Describe item {i}.", "output": "It is " + "very " * (i % 30) + "old."} for i in range(54)
    ]
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(records))
    examples = D.load_examples(str(path))
    lengths = [len(_chat_tokens(tokenizer, e, with_answer=True)) for e in examples]
    auto = D.auto_max_length(tokenizer, examples)
    assert auto == max(lengths) > 64  # 64, the old default, cut answers of this file
    assert D.count_truncation(tokenizer, examples, auto) == D.Truncation(auto, 54, 0, 0)
    batch = D.encode(tokenizer, examples, auto)
    for row, (example, length) in enumerate(zip(examples, lengths)):
        assert batch["input_ids"][row, :length].tolist() == _chat_tokens(tokenizer, example, with_answer=True)
    assert D.count_truncation(tokenizer, examples, auto - 1).prompts_truncated >= 1  # the longest no longer fits
    assert D.auto_max_length(tokenizer, examples, cap=40) == 40


@pytest.mark.slow
def test_heldout_prompts_are_fitted_like_the_loss_sees_them(tiny):
    _, tokenizer = tiny
    # Untied output weights: a random tied model only repeats its last token (an empty answer).
    config = tiny[0].config.__class__(**{**tiny[0].config.to_dict(), "tie_word_embeddings": False})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = type(tiny[0])(config).eval()
    long = D.Example("Explain: " + " ".join(f"rule {i}" for i in range(50)) + ".", "", "Follow the rules.", "q")
    short = D.Example("Hi", "", "Hello", "q")
    _, kept = _expected_row(tokenizer, long, 48)
    prompt = _chat_tokens(tokenizer, long, with_answer=False)[-kept:]
    tokens = model.generate(
        input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    reference = tokenizer.decode(tokens[0, len(prompt) :], skip_special_tokens=True).strip()
    answers = D.generate(model, tokenizer, [long, short], max_new_tokens=6, max_length=48)
    assert answers[0] == reference and answers[0]
    assert answers[0] != D.generate(model, tokenizer, [long], max_new_tokens=6)[0]  # the full prompt differs
    assert answers[1] == D.generate(model, tokenizer, [short], max_new_tokens=6)[0]  # a short one is untouched


@pytest.mark.slow
def test_a_huge_record_is_cut_by_characters_before_tokenizing(tmp_path):
    path = tmp_path / "huge.jsonl"
    sentence = "The permit covers the extension of the house. "
    huge = {"instruction": sentence * 90_000 + "Which permit?", "output": "The extension permit. " * 90_000}
    path.write_text(json.dumps(huge) + "\n" + json.dumps({"instruction": "Hi", "output": "Hello"}) + "\n")
    assert path.stat().st_size > 6_000_000
    # A fresh process, so that its peak resident memory is this work's alone.
    script = f"""
import json, resource
from fedkseed import data as D, models
tokenizer = models.smollm2_tokenizer()
examples = D.load_examples({str(path)!r})
D.encode(tokenizer, examples[1:], 64)  # warm the tokenizer
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
auto = D.auto_max_length(tokenizer, examples)
counts = D.count_truncation(tokenizer, examples, auto)
fitted = D.fit_example(tokenizer, examples[0], auto)
batch = D.encode(tokenizer, examples, auto)
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps([auto, counts.prompts_truncated, counts.answers_cut, list(batch["input_ids"].shape), grown,
                  tokenizer.decode(fitted.prompt[-12:]), tokenizer.decode(fitted.answer[:6])]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    auto, prompts, answers, shape, grown, prompt_tail, answer_head = json.loads(done.stdout.splitlines()[-1])
    assert (auto, prompts, answers, shape) == (D.AUTO_MAX_LENGTH_CAP, 1, 1, [2, D.AUTO_MAX_LENGTH_CAP])
    # Tokenizing the 4 MB prompt alone would take ~450 MB (measured: ~110 MB per MB of text).
    assert grown < 150, f"peak memory grew {grown:.0f} MB"
    assert prompt_tail.endswith("Which permit?<|im_end|>\n<|im_start|>assistant\n")  # the prompt's end is kept
    assert answer_head.startswith("The extension permit.")  # the answer's start is kept


@pytest.mark.parametrize(
    "name, text, where, problem",
    [
        (
            "lone.jsonl",
            '{"instruction": "a\\ud800b", "output": "x"}\n',
            "lone.jsonl:1",
            "field 'instruction' holds a lone UTF-16 surrogate (U+D800 at character 1)",
        ),
        (
            "lone.json",
            '[{"instruction": "a", "output": "b"}, {"instruction": "c", "response": "\\udfff"}]',
            "lone.json item 1",
            "field 'response' holds a lone UTF-16 surrogate (U+DFFF at character 0)",
        ),
        ("deep.json", "[" * 100_000 + "]" * 100_000, "deep.json", "JSON nested too deeply to read"),
        (
            "deep.jsonl",
            '{"instruction": "a", "output": "b"}\n{"x": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
            "deep.jsonl:2",
            "JSON nested too deeply to read",
        ),
        (
            "digits.jsonl",
            '{"instruction": "a", "output": "b", "n": ' + "9" * 5000 + "}\n",
            "digits.jsonl:1",
            "invalid JSON (Exceeds the limit (4300 digits)",
        ),
    ],
)
def test_bad_text_in_a_data_file_is_one_line_naming_file_and_record(tmp_path, name, text, where, problem):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError) as error:
        D.load_examples(str(path))
    message = str(error.value)
    assert message.startswith(f"--data {tmp_path / where}: {problem}") and "\n" not in message


def _simulate(tmp_path, records, *extra):
    """A tiny-model `fedkseed simulate` on ``records`` (exit 0 asserted): its final results."""
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(records))
    output = tmp_path / "run"
    argv = [
        "simulate", "--model", "tiny", "--data", str(path), "--clients", "4", "--clients-per-round", "2",
        "--rounds", "1", "--local-steps", "2", "--k", "16", "--eval-examples", "2", "--batch-size", "2",
        "--max-new-tokens", "4", "--rouge-examples", "all", "--quiet", "--output", str(output), *extra,
    ]  # fmt: skip
    assert main(argv) == 0
    return json.loads((output / "metrics.json").read_text())["final"]


def _long_records(count, long_every):
    """Alpaca records without categories; every ``long_every``-th one has a prompt far over 64 tokens."""
    records = []
    for i in range(count):
        words = " ".join(["construction permit"] * 40) if i % long_every == 0 else f"item {i}"
        records.append({"instruction": f"Describe {words}.", "input": "", "output": f"It is number {i}."})
    return records


@pytest.mark.slow
def test_truncation_is_counted_in_metrics_and_said_once(tmp_path, caplog):
    records = _long_records(80, long_every=2)  # half the prompts fill 64 tokens: once refused
    with caplog.at_level(logging.INFO, logger="fedkseed.experiment"):
        final = _simulate(tmp_path, records, "--max-length", "64")
    examples = D.load_examples(str(tmp_path / "mine.json"))
    split = D.split_data(examples, 4, 0.5, 0, 1)  # what the run did, recomputed
    trained = [e for c in split.clients for e in c]
    long_trained = sum("permit" in e.instruction for e in trained)
    long_heldout = sum("permit" in e.instruction for e in split.heldout)
    data = final["data"]
    assert data["max_length"] == 64 and "dropped_by_max_length" not in data
    assert (data["prompts_truncated"], data["answers_cut"]) == (long_trained, 0) and long_trained > 30
    assert data["heldout_prompts_truncated"] == long_heldout
    assert sum(data["examples_per_client"]) + final["eval_examples"] == len(trained)  # nothing dropped
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--max-length")]
    assert lines == [
        f"--max-length 64: {long_trained} of {len(trained)} prompts truncated from the left, 0 answers cut; "
        f"held-out: {long_heldout} of {len(split.heldout)} prompts truncated"
    ]
    assert [r.levelno for r in caplog.records if r.getMessage() == lines[0]] == [logging.WARNING]


@pytest.mark.slow
def test_simulate_defaults_to_auto_and_cuts_nothing_of_short_data(tiny, tmp_path):
    _, tokenizer = tiny
    records = [
        {"instruction": f"Describe item {i}.", "output": "It is " + "very " * (i % 50) + "old."} for i in range(54)
    ]
    final = _simulate(tmp_path, records)
    examples = D.load_examples(str(tmp_path / "mine.json"))
    longest = max(len(_chat_tokens(tokenizer, e, with_answer=True)) for e in examples)
    assert longest > 64  # the old default cut the answers of this file
    data = final["data"]
    assert (data["max_length"], data["prompts_truncated"], data["answers_cut"], data["heldout_prompts_truncated"]) == (
        longest, 0, 0, 0,
    )  # fmt: skip


def test_max_length_setting():
    assert SimConfig().max_length == "auto" and SimConfig().max_length_tokens() is None
    assert SimConfig(protocol="paper").max_length_tokens() == 1024
    assert SimConfig(max_length=48).max_length == "48" and SimConfig(max_length=" 48 ").max_length_tokens() == 48
    for bad in (7, "x", True, "64.0"):
        with pytest.raises(UsageError, match=f"--max-length must be 'auto' or an integer >= 8, got {bad!r}"):
            SimConfig(max_length=bad)


# --- metrics ---------------------------------------------------------------------------------


def test_rouge_l_both_scorers_on_a_known_pair():
    reference, answer = "Apply for a permit.", "You must apply for permits"
    # rouge-score: lower-case, drop punctuation, Porter-stem: "appli for a permit" against
    # "you must appli for permit"; LCS "appli for permit" = 3: P = 3/5, R = 3/4.
    p, r = 3 / 5, 3 / 4
    assert metrics.rouge_l_scores([reference], [answer], "rouge-score") == [pytest.approx(2 * p * r / (p + r))]
    # rouge (FedKSeed's): words as written, "Apply" != "apply", "permit." != "permits"; LCS "for" = 1.
    p, r = 1 / 5, 1 / 4
    official = metrics.rouge_l_scores([reference], [answer], "rouge")
    assert official == [pytest.approx(2 * p * r / (p + r + 1e-8))]
    assert round(official[0], 3) == 0.222 and round(2 * 0.6 * 0.75 / 1.35, 3) == 0.667
    assert metrics.rouge_l_scores(["a b"], [""], "rouge") == [0.0]  # empty answer: 0, as official
    assert metrics.rouge_l_scores(["x y z"], ["x y z"], "rouge") == [pytest.approx(1.0)]
    with pytest.raises(ValueError, match="scorer"):
        metrics.rouge_l_scores(["a"], ["a"], "bleu")


def test_bootstrap_interval_matches_the_binomial_and_is_deterministic():
    values = [0.0] * 50 + [1.0] * 50
    estimate = metrics.bootstrap_interval(values)
    # A resample's mean is Binomial(100, 1/2) / 100, whose 2.5% and 97.5% quantiles are 0.40, 0.60.
    assert estimate.mean == 0.5 and estimate.n == 100
    assert estimate.low == pytest.approx(0.40, abs=0.011) and estimate.high == pytest.approx(0.60, abs=0.011)
    assert metrics.bootstrap_interval(values) == estimate
    constant = metrics.bootstrap_interval([0.3] * 7)
    assert (constant.low, constant.mean, constant.high) == pytest.approx((0.3, 0.3, 0.3))
    rng = np.random.default_rng(0)
    skewed = rng.exponential(size=40)
    e = metrics.bootstrap_interval(skewed)
    assert e.low < e.mean < e.high and metrics.bootstrap_interval(skewed) == e
    assert metrics.bootstrap_interval(skewed, seed=1) != e  # the seed is what fixes it
    with pytest.raises(ValueError, match="non-empty"):
        metrics.bootstrap_interval([])


def test_rouge_l_report_holds_both_scorers_per_example(tiny, faq):
    model, tokenizer = tiny
    examples = faq[:3]
    answers = D.generate(model, tokenizer, examples, max_new_tokens=8, batch_size=2)
    answers[0] = examples[0].output  # one perfect answer
    report = metrics.rouge_l_report([e.output for e in examples], answers)
    assert set(report) == {"rouge-score", "rouge"}
    for scorer, entry in report.items():
        scores = [100 * s for s in metrics.rouge_l_scores([e.output for e in examples], answers, scorer)]
        assert entry["per_example"] == scores and entry["n"] == 3
        assert entry["per_example"][0] == pytest.approx(100.0)
        assert entry["mean"] == pytest.approx(np.mean(scores)) and entry["low"] <= entry["mean"] <= entry["high"]


def test_example_losses_are_each_rows_own_loss(tiny, faq):
    model, tokenizer = tiny
    examples = [faq[0], faq[7], faq[100]]
    losses = D.example_losses(model, D.encode(tokenizer, examples))
    assert losses.shape == (3,) and losses.dtype == torch.float32
    alone = torch.stack([D.lm_loss(model, D.encode(tokenizer, [e])) for e in examples])
    torch.testing.assert_close(losses, alone, rtol=1e-5, atol=1e-5)
