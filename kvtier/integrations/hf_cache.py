"""A transformers ``DynamicCache`` written in place into a prompt's KV, which a kvtier load fills.

``PromptCache`` holds, per layer, the K and V of the whole prompt as ``KVLoad.tensors(l)``:
``(tokens, heads, head_dim)`` token-major tensors on the device, the loaded chunks' rows filled
by host-to-device copies straight from the DRAM slots.  The model sees them through
``(1, heads, length, head_dim)`` transposed views; attention takes any strides, and the
transformers SDPA path copies K and V once anyway (``repeat_kv``), as it does for a plain cache.

* ``attach(tokens)``: rows ``[0, tokens)`` are there (loaded, or computed before): the next
  ``update`` appends after them.  ``get_seq_length`` reports them at once (the model asks
  before layer 0 runs, to build positions and the mask), but layer ``l`` waits for *its* copies
  only in its own ``update`` (``KVLoad.ready(l)``, a device-side wait), so layer ``l + 1``'s
  KV is still crossing PCIe while layer ``l`` computes.
* ``update`` writes the new tokens' K and V into their rows (the one copy a ``torch.cat`` would
  have cost for them) and returns views of rows ``[0, length)``: the loaded rows are never
  copied on the device, and no buffer is concatenated or allocated per call.  A split's head
  (``kvtier.integrations.hf_split``) is computed step by step into the same rows in front of
  the loaded ones.
* Once the prompt's rows are all written, or for tokens beyond them (decoding), a layer is a
  plain ``DynamicLayer`` over its views (concatenation).

Batch size 1.  Tested with transformers 5.17 and 5.19 (``Cache.layers``, ``DynamicLayer``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from kvtier.tiers.cuda import KVLoad, torch_dtype


class PromptLayer(DynamicLayer):  # type: ignore[no-untyped-call]  # transformers: __init_subclass__ unannotated
    """One layer's cache over ``load``'s (K, V) of the prompt; see the module docstring."""

    def __init__(self, load: KVLoad, layer_idx: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
        lay = load.layout
        self._load: KVLoad | None = load  # None: a plain DynamicLayer from here on
        self._layer_idx = layer_idx
        self._length = 0  # rows [0, _length) are in place (or, with _wait, being loaded)
        self._wait = False  # rows being loaded: wait for this layer's copies before reading them
        self._kv: tuple[torch.Tensor, torch.Tensor] | None = None  # (tokens, H, D) each, once used
        self.dtype, self.device = torch_dtype(lay), load.engine.device
        empty = torch.empty((1, lay.num_kv_heads, 0, lay.head_dim), dtype=self.dtype, device=self.device)
        self.keys, self.values = empty, empty
        self.is_initialized = True

    def attach(self, tokens: int) -> None:
        """Rows ``[0, tokens)`` are in place or being loaded: the next update appends after them."""
        assert self._load is not None and tokens <= self._load.tokens
        self._length, self._wait = tokens, True

    def get_seq_length(self) -> int:
        return self._length if self._load is not None else super().get_seq_length()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        load = self._load
        if load is None:
            return super().update(key_states, value_states, *args, **kwargs)
        start, new = self._length, key_states.shape[-2]
        if self._wait:  # this update's attention reads the loaded rows
            load.ready(self._layer_idx)
            self._wait = False
        if self._kv is None:
            self._kv = load.tensors(self._layer_idx)
        k, v = self._kv
        end = start + new
        if key_states.shape[0] != 1 or end > load.tokens:  # not the prompt's rows: concatenate from here on
            self._views(k, v, start)
            self._load = self._kv = None
            return super().update(key_states, value_states, *args, **kwargs)
        # (1, H, new, D) -> (new, H, D), written into the rows of the new tokens
        k[start:end].copy_(key_states[0].transpose(0, 1))
        v[start:end].copy_(value_states[0].transpose(0, 1))
        self._length = end
        self._views(k, v, end)
        if end == load.tokens:  # the prompt is complete: a plain DynamicLayer over its views
            self._load = self._kv = None
        keys, values = self.keys, self.values
        assert keys is not None and values is not None
        return keys, values

    def _views(self, k: torch.Tensor, v: torch.Tensor, length: int) -> None:
        # (T, H, D) -> (1, H, T, D): the transformers layout, as a view
        self.keys = k[:length].unsqueeze(0).transpose(1, 2)
        self.values = v[:length].unsqueeze(0).transpose(1, 2)


class PromptCache(DynamicCache):
    """A ``DynamicCache`` of ``PromptLayer``s over one ``KVLoad`` (batch size 1).

    Empty at first (a split's head is computed into it from row 0); ``attach`` names the rows in
    place (the loaded prefix, behind a computed head if any).
    """

    def __init__(self, load: KVLoad, attached_tokens: int | None = None) -> None:
        layers = [PromptLayer(load, i) for i in range(load.layout.num_layers)]
        Cache.__init__(self, layers=layers)  # type: ignore[arg-type]
        if attached_tokens is not None:
            self.attach(attached_tokens)

    def attach(self, tokens: int) -> None:
        for layer in self.layers:
            assert isinstance(layer, PromptLayer)
            layer.attach(tokens)
