"""Parameter sets shaped like real models, built without transformers (for benchmarks).

``smollm2_135m_shapes`` is the SmolLM2-135M Llama (30 layers, hidden 576, intermediate 1536,
9 query heads / 3 key-value heads of dim 64, vocab 49152, tied embedding): 134,515,008
parameters in 272 tensors, in ``model.parameters()`` order. ``llama_1b_shapes`` is the LLaMA
shape FedKSeed's 1.3B-class runs use (24 layers, hidden 2048, intermediate 5504, 16 heads,
vocab 32000, untied head).
"""

from __future__ import annotations

import torch

SMOLLM2_135M_NUMEL = 134_515_008
SMOLLM2_135M_TENSORS = 272
# The same shape as transformers.LlamaConfig keyword arguments (random-init models for benchmarks).
SMOLLM2_135M_CONFIG = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    tie_word_embeddings=True,
)


def llama_shapes(
    layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int, tied: bool
) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of a Llama decoder, in ``named_parameters()`` order."""
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{p}.mlp.gate_proj.weight", (intermediate, hidden)),
            (f"{p}.mlp.up_proj.weight", (intermediate, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, intermediate)),
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
        ]
    shapes.append(("model.norm.weight", (hidden,)))
    if not tied:
        shapes.append(("lm_head.weight", (vocab, hidden)))
    return shapes


def smollm2_135m_shapes() -> list[tuple[str, tuple[int, ...]]]:
    shapes = llama_shapes(30, 576, 1536, 9, 3, 49152, tied=True)
    numel = sum(_numel(s) for _, s in shapes)
    assert len(shapes) == SMOLLM2_135M_TENSORS, len(shapes)
    assert numel == SMOLLM2_135M_NUMEL, numel
    return shapes


def llama_1b_shapes() -> list[tuple[str, tuple[int, ...]]]:
    return llama_shapes(24, 2048, 5504, 16, 16, 32000, tied=False)


def make_params(
    shapes: list[tuple[str, tuple[int, ...]]],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs with small random values (norm weights near 1, like a real model)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for name, shape in shapes:
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.float32)
        else:
            t = torch.empty(shape, dtype=torch.float32).uniform_(-0.05, 0.05, generator=gen)
        params.append((name, t.to(dtype=dtype, device=device)))
    return params


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
