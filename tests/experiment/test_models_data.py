"""The real model and data layer: deterministic models, the FAQ, the federated split, encoding,
loss and Rouge-L. Uses the "tiny" model (SmolLM2's tokenizer on a small random body); the one
SmolLM2-135M test converts the GGUF on its first run (~30 s) and reloads it in under a second."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from fedkseed import models
from fedkseed.data import (
    Example,
    encode,
    generate,
    lm_loss,
    load_examples,
    prompt_ids,
    split_clients,
)
from fedkseed.models import load_model

FAQ_ENGLISH_PAIRS = 503
FAQ_CATEGORIES = 39


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", seed=0)


@pytest.fixture(scope="module")
def faq():
    return load_examples("faq")


def _params(model):
    return [p.detach() for p in model.parameters()]


# --- models ---------------------------------------------------------------------------------


def test_tiny_is_deterministic_from_seed(tiny):
    model, _ = tiny
    rng_before = torch.get_rng_state()
    again, _ = load_model("tiny", seed=0)
    other, _ = load_model("tiny", seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before), "loading must not touch the global RNG"
    assert all(torch.equal(a, b) for a, b in zip(_params(model), _params(again)))
    assert not all(torch.equal(a, b) for a, b in zip(_params(model), _params(other)))


def test_tiny_is_float32_eval_and_trainable(tiny):
    model, tokenizer = tiny
    assert not model.training
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    assert model.config.vocab_size == len(tokenizer)


def test_path_spec_loads_a_local_folder(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(_params(model), _params(loaded)))
    assert not loaded.training and loaded_tokenizer.chat_template == tokenizer.chat_template


@pytest.mark.parametrize("spec", ["smollm2-1.7b", "/no/such/model/folder"])
def test_unknown_spec_is_a_clear_error(spec):
    with pytest.raises(models.ModelLoadError, match=f"model '{spec}': no such folder"):
        load_model(spec)


def test_interrupted_cache_build_is_redone(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDKSEED_CACHE", str(tmp_path))
    target = models.cache_dir() / "entry"

    def interrupted(folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        models._cached(target, interrupted)
    assert list(tmp_path.iterdir()) == []  # the scratch folder is gone, nothing was published

    def complete(folder):
        (folder / "model.safetensors").write_bytes(b"whole")
        (folder / "sub").mkdir()
        (folder / "sub" / "done").write_text("ok")

    assert models._cached(target, complete) == target
    assert (target / "model.safetensors").read_bytes() == b"whole"
    assert (target / "sub" / "done").read_text() == "ok"
    assert models._cached(target, interrupted) == target  # complete entries are reused
    # An entry without its marker (a build cut short between files) is built again.
    (target / models.COMPLETE_MARKER).unlink()
    (target / "model.safetensors").write_bytes(b"half")
    models._cached(target, complete)
    assert (target / "model.safetensors").read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


@pytest.mark.slow
def test_smollm2_loads_identically_and_beats_tiny(tiny, faq):
    model, tokenizer = load_model("smollm2-135m")
    again, _ = load_model("smollm2-135m")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert all(torch.equal(a, b) for a, b in zip(_params(model), _params(again)))
    assert not model.training
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    batch = encode(tokenizer, faq[:4])
    loss = lm_loss(model, batch)
    assert torch.isfinite(loss) and loss < lm_loss(tiny[0], batch) - 3.0


# --- data -----------------------------------------------------------------------------------


def test_faq_english_has_every_pair_and_category(faq):
    assert len(faq) == FAQ_ENGLISH_PAIRS
    assert len({e.category for e in faq}) == FAQ_CATEGORIES
    assert all(e.instruction and e.output and e.input == "" for e in faq)
    assert faq[0].instruction.startswith("What is a bygglov")
    swedish = load_examples("faq-sv")
    assert len(swedish) == FAQ_ENGLISH_PAIRS
    assert [e.category for e in swedish] == [e.category for e in faq]


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_jsonl_accepts_alpaca_and_dolly_keys(tmp_path):
    path = _write(
        tmp_path,
        [
            json.dumps({"instruction": "Add", "input": "1 + 1", "output": "2", "category": "math"}),
            "",
            json.dumps({"instruction": "Greet", "context": "", "response": "Hello"}),
        ],
    )
    assert load_examples(path) == [
        Example("Add", "1 + 1", "2", "math"),
        Example("Greet", "", "Hello", "default"),
    ]


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"instruction": "x", "output": ', "data.jsonl:2: invalid JSON .*; expected JSON Lines or a JSON array"),
        ('{"instruction": "x"}', "data.jsonl:2: missing field 'output' or 'response'; expected JSON Lines"),
        ('{"output": "y"}', "data.jsonl:2: missing field 'instruction'"),
        ('["x", "y"]', "data.jsonl:2: got a JSON list; expected JSON Lines or a JSON array of objects"),
        ('{"instruction": "x", "output": 3}', "data.jsonl:2: field 'output' must be a string"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, bad, message):
    path = _write(tmp_path, [json.dumps({"instruction": "ok", "output": "fine"}), bad])
    with pytest.raises(ValueError, match=message):
        load_examples(path)


def test_jsonl_missing_or_empty_file(tmp_path):
    with pytest.raises(ValueError, match="neither"):
        load_examples(str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no examples"):
        load_examples(str(empty))


@pytest.mark.parametrize("num_clients, alpha, holdout", [(1, 0.5, 0), (7, 0.1, 2), (200, 0.5, 1), (13, 100.0, 3)])
def test_split_covers_every_example_once_and_holds_out_whole_categories(faq, num_clients, alpha, holdout):
    clients, heldout = split_clients(faq, num_clients, alpha, seed=3, holdout=holdout)
    assert len(clients) == num_clients and all(clients)
    held = {e.category for e in heldout}
    assert len(held) == holdout
    assert heldout == [e for e in faq if e.category in held]
    assigned = [e for client in clients for e in client]
    assert not held & {e.category for e in assigned}
    # Every example outside the held-out categories goes to exactly one client.
    assert collections.Counter(assigned) == collections.Counter(e for e in faq if e.category not in held)
    assert (clients, heldout) == split_clients(faq, num_clients, alpha, seed=3, holdout=holdout)


def test_split_depends_on_seed_and_alpha_sets_skew(faq):
    first, _ = split_clients(faq, 10, 0.5, seed=0, holdout=1)
    second, _ = split_clients(faq, 10, 0.5, seed=1, holdout=1)
    assert first != second

    def categories_per_client(alpha):
        clients, _ = split_clients(faq, 10, alpha, seed=0, holdout=0)
        return sum(len({e.category for e in c}) for c in clients) / len(clients)

    # Small alpha concentrates each category on few clients; large alpha spreads it evenly.
    assert categories_per_client(0.05) < categories_per_client(100.0)


def test_split_holdout_by_name_and_errors(faq):
    _, heldout = split_clients(faq, 5, 0.5, seed=0, holdout=["bygglov", "vvs"])
    assert {e.category for e in heldout} == {"bygglov", "vvs"} and len(heldout) == 35
    with pytest.raises(ValueError, match="unknown categories \\['nope'\\]"):
        split_clients(faq, 5, 0.5, seed=0, holdout=["bygglov", "nope"])
    with pytest.raises(ValueError, match="holdout"):
        split_clients(faq, 5, 0.5, seed=0, holdout=FAQ_CATEGORIES)
    with pytest.raises(ValueError, match="--clients 600"):
        split_clients(faq, 600, 0.5, seed=0, holdout=0)
    with pytest.raises(ValueError, match="alpha"):
        split_clients(faq, 5, 0.0, seed=0, holdout=0)


def test_encode_masks_prompt_and_padding(tiny, faq):
    _, tokenizer = tiny
    examples = [faq[0], Example("Translate to Swedish", "a house", "ett hus", "default")]
    batch = encode(tokenizer, examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == batch["input_ids"].shape for t in batch.values())
    for row, example in enumerate(examples):
        prompt = prompt_ids(tokenizer, example)
        length = int(batch["attention_mask"][row].sum())
        mask = batch["attention_mask"][row]
        assert mask[:length].all() and not mask[length:].any()
        assert batch["input_ids"][row, : len(prompt)].tolist() == prompt
        labels = batch["labels"][row]
        assert (labels[: len(prompt)] == -100).all() and (labels[length:] == -100).all()
        assert torch.equal(labels[len(prompt) : length], batch["input_ids"][row, len(prompt) : length])
        response = tokenizer.decode(labels[len(prompt) : length])
        assert response.startswith(example.output + tokenizer.eos_token)
    assert "a house" in tokenizer.decode(prompt_ids(tokenizer, examples[1]))


def test_encode_keeps_the_prompts_end_and_the_answers_start(tiny, faq):
    _, tokenizer = tiny
    full = encode(tokenizer, faq[:3], max_length=4096)
    short = encode(tokenizer, faq[:3], max_length=50)
    assert short["input_ids"].shape[1] == 50
    for row, example in enumerate(faq[:3]):
        prompt = prompt_ids(tokenizer, example)
        answer = full["input_ids"][row, len(prompt) : int(full["attention_mask"][row].sum())].tolist()
        # These answers alone exceed 50 - 13 tokens: the prompt keeps its last ceil(50 / 4) = 13
        # tokens (the question's end and the assistant turn), the answer its first 37.
        assert len(answer) > 37 and len(prompt) > 13
        assert short["input_ids"][row].tolist() == prompt[-13:] + answer[:37]
        assert short["labels"][row].tolist() == [-100] * 13 + answer[:37]


def test_lm_loss_matches_the_models_own_loss(tiny, faq):
    model, tokenizer = tiny
    batch = encode(tokenizer, faq[:3])
    loss = lm_loss(model, batch)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and not loss.requires_grad
    with torch.no_grad():
        reference = model(**batch).loss  # HF's shifted token-mean cross-entropy over all positions
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    # A row cut from the padded batch scores as the same example encoded alone.
    alone = lm_loss(model, encode(tokenizer, faq[:1]))
    cut = lm_loss(model, {key: value[:1] for key, value in batch.items()})
    torch.testing.assert_close(cut, alone, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_batched_generation_matches_one_by_one(tiny, faq):
    tokenizer = tiny[1]
    # Untied output weights: a random tied model only repeats its last token (an empty answer).
    config = tiny[0].config.__class__(**{**tiny[0].config.to_dict(), "tie_word_embeddings": False})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = type(tiny[0])(config).eval()
    examples = [faq[0], faq[100], Example("Hi", "", "Hello", "default")]  # prompts of unequal length
    batched = generate(model, tokenizer, examples, max_new_tokens=8, batch_size=3)
    assert all(batched) and len(set(batched)) == len(examples)
    assert batched == generate(model, tokenizer, examples, max_new_tokens=8, batch_size=1)
