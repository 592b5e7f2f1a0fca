"""A transformers ``DynamicCache`` whose layers start from a kvtier load still in flight.

``LoadedLayer`` reports the loaded prefix length from ``get_seq_length`` at once (the model
asks for it before layer 0 runs, to build positions and the mask) but touches the loaded bytes
only in its first ``update``, i.e. when *its* layer's attention runs.  There it calls
``KVLoad.layer(l)``, which makes the compute stream wait for that layer's copy alone, so layer
``l + 1``'s KV is still crossing PCIe while layer ``l`` computes.

The first update writes prefix and new tokens into one ``(1, heads, prefix + new, head_dim)``
tensor: the chunk-major bytes are permuted into the transformers order in the same single copy
that a ``torch.cat`` would have cost anyway.  Later updates (decoding) concatenate as a plain
``DynamicLayer`` does.

Tested with transformers 5.17 and 5.19 (``Cache.layers``, ``DynamicLayer.update``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from kvtier.tiers.cuda import KVLoad, torch_dtype


class LoadedLayer(DynamicLayer):
    """One layer's cache, seeded from ``load`` on first use."""

    def __init__(self, load: KVLoad, layer_idx: int, prefix_tokens: int,
                 head: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        self._load: KVLoad | None = load
        self._layer_idx = layer_idx
        self._prefix = prefix_tokens
        self._head = head  # (K, V) computed in front of the loaded tokens (a split), each (1, H, T, D)

    def get_seq_length(self) -> int:
        if self._load is not None:
            return (self._head[0].shape[-2] if self._head is not None else 0) + self._prefix
        return super().get_seq_length()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self._load is None:
            return super().update(key_states, value_states, *args, **kwargs)
        load, self._load = self._load, None
        head, self._head = self._head, None
        lay = load.layout
        n, c, h, d = load.num_chunks, lay.tokens_per_chunk, lay.num_kv_heads, lay.head_dim
        first = head[0].shape[-2] if head is not None else 0  # loaded tokens start here
        prefix = first + self._prefix
        src = load.layer(self._layer_idx).view(torch_dtype(lay))  # (n, P*C*H*D), waits for this layer
        parts = src.view(n, lay.num_kv_parts, c, h, d)
        batch, heads, new, _ = key_states.shape
        out = []
        for part, states in enumerate((key_states, value_states)):
            full = states.new_empty((batch, heads, prefix + new, d))
            if head is not None:
                full[:, :, :first] = head[part]
            # (n, C, H, D) -> (H, n, C, D), written straight into the (H, T, D) prefix slice
            full[0, :, first:prefix].view(h, n, c, d).copy_(parts[:, part].permute(2, 0, 1, 3))
            full[:, :, prefix:] = states
            out.append(full)
        self.keys, self.values = out
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True
        load.release_layer(self._layer_idx)
        return self.keys, self.values


class LoadedCache(DynamicCache):
    """A ``DynamicCache`` of ``LoadedLayer``s over one ``KVLoad`` (batch size 1).

    ``head``: per layer, the (K, V) of tokens computed in front of the loaded ones (a compute +
    load split, ``kvtier.integrations.hf_split``); the loaded tokens follow them.
    """

    def __init__(self, load: KVLoad, prefix_tokens: int,
                 head: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        layers = [LoadedLayer(load, i, prefix_tokens, head[i] if head is not None else None)
                  for i in range(load.layout.num_layers)]
        Cache.__init__(self, layers=layers)  # type: ignore[arg-type]
