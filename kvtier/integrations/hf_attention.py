"""Causal attention aligned to the *end* of the past, without a mask: for prefill steps after the first.

A forward of new tokens ``[p, p + q)`` over a past of ``p`` tokens attends with a causal mask
aligned lower-right (query ``i`` sees keys ``[0, p + i]``).  Transformers' ``sdpa`` builds that
mask as a tensor, which keeps PyTorch off its flash kernel (cuDNN or the memory-efficient kernel
read the mask instead, ~1.6x slower per attention FLOP measured on an H200, and cuDNN plans each
new (q, kv) shape once, tens of ms).  PyTorch's flash kernel does lower-right causal attention
itself (``torch.nn.attention.bias.causal_lower_right``), so no mask is built or read.

``lower_right_attention(model)`` switches a transformers model with ``sdpa`` attention to that
function for the calls inside it (the split's head steps in ``kvtier.integrations.hf_split``);
any other implementation (eager, flash-attention, a padded batch) is left as it is.  The result
is the same attention: PyTorch picks flash on CUDA (bf16/fp16), the memory-efficient kernel or
a materialised mask elsewhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface

NAME = "kvtier_lower_right"


def lower_right_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **_: Any) -> tuple[torch.Tensor, None]:
    """Transformers' attention-function signature: ``query`` ``[b, h, q, d]``, ``key``/``value``
    ``[b, h_kv, kv, d]`` (``kv >= q``, the new tokens last); returns ``[b, q, h, d]``."""
    if attention_mask is not None:  # a padded batch: its mask says more than causality
        raise ValueError("lower_right_sdpa takes no attention mask (batch size 1, no padding)")
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = causal_lower_right(q_len, kv_len) if q_len > 1 else None  # one new token sees the whole past
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=causal, dropout_p=dropout,
                                                            scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, lower_right_sdpa)


@contextlib.contextmanager
def lower_right_attention(model: Any, enabled: bool = True) -> Iterator[bool]:
    """Within: ``model`` attends through ``lower_right_sdpa`` if ``enabled`` and it used ``sdpa``
    (yields whether it switched).  Not for concurrent use of the same model from other threads."""
    config: Any = getattr(model, "config", None)  # None: not a transformers model (a wrapper)
    before = getattr(config, "_attn_implementation", None)
    if not enabled or before != "sdpa":
        yield False
        return
    config._attn_implementation = NAME
    try:
        yield True
    finally:
        config._attn_implementation = before
