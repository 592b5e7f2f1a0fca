"""Helpers of the transformers-integration tests (``test_hf*.py``): a tiny random Llama, the
tiers it is tested over, prompts and full-recompute references.  The ``model`` and ``layout``
fixtures over them are in ``conftest.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache

from kvtier.hierarchy import ContextMemory
from kvtier.integrations.hf import KVTierLM
from kvtier.layout import KVLayout
from kvtier.tiers.disk import DiskTier
from kvtier.tiers.dram import DramTier

C = 16  # tokens per chunk: small, so prompts of a few chunks stay fast on CPU
VOCAB = 256

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_llama(device: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      name_or_path="kvtier-test/tiny-random-llama")
    model = LlamaForCausalLM(cfg).to(device=device, dtype=torch.float32).eval()
    return model


def open_memory(layout: KVLayout, root: Path, *, dram_chunks: int = 64, promotion: str = "always") -> ContextMemory:
    tiers = [DramTier(layout, capacity_bytes=dram_chunks * layout.chunk_bytes),
             DiskTier(layout, path=root, capacity_bytes=1 << 30, fsync=False)]
    return ContextMemory(layout, tiers, promotion=promotion)


def prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference(model: LlamaForCausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, DynamicCache]:
    out = model(input_ids=ids[None].to(model.device), past_key_values=DynamicCache(), use_cache=True)
    return out.logits, out.past_key_values


@torch.no_grad()
def greedy_reference(model: LlamaForCausalLM, ids: torch.Tensor, n: int) -> list[int]:
    logits, cache = reference(model, ids)
    token = logits[0, -1].argmax()
    tokens = [int(token)]
    for _ in range(n - 1):
        out = model(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True)
        token = out.logits[0, -1].argmax()
        tokens.append(int(token))
    return tokens


def warm(lm: KVTierLM, ids: torch.Tensor) -> None:
    """Put the prompt's full chunks into kvtier (a first request that recomputes everything)."""
    with torch.no_grad():
        first = lm.prefill(ids)
    assert first.loaded_tokens == 0
    lm.flush()
