"""Chunk keys of a vLLM request: its token ids plus everything else that changes a prefix's KV.

Two requests with equal token ids can need different KV: another LoRA adapter, another image
behind the same placeholder tokens, another tenant's ``cache_salt``.  vLLM 0.32 folds these into
its own block hashes (``vllm/v1/core/kv_cache_utils.py``: ``generate_block_hash_extra_keys`` and
the ``_gen_*_extra_hash_keys`` helpers it calls); ``RequestKeyer`` folds the same things into
kvtier's chunk keys (``kvtier.keys``), so equal keys still mean equal KV:

* ``cache_salt`` (``Request.cache_salt``; vLLM folds it into the first block only, which the
  chain carries on): folded into the chain's seed, so salt A never matches salt B.
* LoRA (``_gen_lora_extra_hash_keys``: name and path): folded into the seed as name, path and
  the adapter's ``adapter_config.json`` at the path when there is one (rank ``r``, alpha, target
  modules: an adapter retrained at the same path with another rank gets other keys; kvtier's
  chunks outlive the process, vLLM's blocks do not).  Never ``lora_int_id``: it is per process,
  and one adapter loaded under two ids shares its chunks.  An adapter retrained in place with an
  identical config must get a new name or path (or its chunks be cleared), as in vLLM.
* multimodal inputs (``_gen_mm_extra_hash_keys``): every feature whose placeholder range
  overlaps a chunk adds its modality, ``identifier`` (vLLM's content hash of the item and its
  processor kwargs, LoRA-prefixed under ``enable_tower_connector_lora``: ``input_processor.py``
  ``_get_mm_identifier``) and its placeholder offset (relative to the chunk) and length to that
  chunk's key; later chunks inherit it through the chain.  Like vLLM, kvtier trusts a
  client-supplied ``multi_modal_uuids`` as the identifier: tenants that do not trust each other
  need distinct ``cache_salt``.
* prompt embeddings (``_gen_prompt_embeds_extra_hash_keys``: sha256 of the block's rows): each
  chunk adds xxh3 of its rows of ``Request.prompt_embeds`` (with dtype and shape) and, in mixed
  mode, its slice of ``prompt_is_token_ids`` (which positions are embeddings; their token ids
  read 0).  xxh3 runs at memory speed, so this costs less than vLLM's own sha256 of the rows.

Nothing else in 0.32's block hash depends on the request (``hash_block_tokens``: parent hash,
token ids, extra keys); the model and KV layout are in ``namespace`` (``namespace_key``).

Streaming-input sessions (``Request.resumable``) are the one request whose tokens vLLM rewrites:
``Scheduler._update_request_as_session`` drops every token from ``num_computed_tokens`` on (the
last sampled token) before appending the next input, and drops its block hashes there.  So for
them only keys of chunks below ``num_computed_tokens`` are kept between calls; the rest are
rehashed each time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from kvtier.errors import IntegrationError
from kvtier.keys import ChunkKey, chunk_keys

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

_Part = str | bytes | int


def _digest(*parts: _Part) -> bytes:
    """xxh3_128 of type-tagged, length-prefixed parts: ("ab", "c") never hashes as ("a", "bc")."""
    h = xxhash.xxh3_128()
    for part in parts:
        raw = part if isinstance(part, bytes) else str(part).encode()
        tag = b"b" if isinstance(part, bytes) else b"i" if isinstance(part, int) else b"s"
        h.update(tag + len(raw).to_bytes(8, "little") + raw)
    return h.digest()


def _mm_identifier(feature: Any) -> str | None:
    return getattr(feature, "identifier", None) or getattr(feature, "mm_hash", None)


def _adapter_config(lora_path: str) -> str:
    """``adapter_config.json`` at ``lora_path`` as canonical JSON; "" when there is none.

    vLLM may also resolve a hub id in the worker; such an adapter is keyed by name and path only.
    OSError and ValueError (bad JSON) go to the caller.
    """
    path = Path(lora_path) / "adapter_config.json"
    if not path.is_file():
        return ""
    return json.dumps(json.loads(path.read_text()), sort_keys=True, separators=(",", ":"))


def _tensor_digest(tensor: Any) -> bytes:
    import torch  # only requests with prompt embeddings get here

    rows = tensor.detach().cpu().contiguous()
    raw = rows.view(torch.uint8).numpy() if rows.numel() else b""
    return _digest(str(rows.dtype), str(tuple(rows.shape)), xxhash.xxh3_128_digest(raw))


@dataclass(slots=True)
class RequestKeyer:
    """The chunk keys of one request, hashed once each as it grows (prompt, then generated tokens).

    Scheduler side; reads ``all_token_ids``, ``mm_features``, ``prompt_embeds``,
    ``prompt_is_token_ids`` and ``num_computed_tokens`` of a ``vllm.v1.request.Request``.
    """

    request: Any  # vllm.v1.request.Request, or any object with the fields above
    seed: ChunkKey  # the chain's seed: namespace + cache_salt + LoRA adapter (= namespace if neither)
    tokens_per_chunk: int
    rewritable: bool  # a streaming session: tokens from num_computed_tokens on may be rewritten
    _keys: list[ChunkKey] = field(default_factory=list, init=False, repr=False)

    @classmethod
    def for_request(cls, request: Any, *, namespace: ChunkKey, tokens_per_chunk: int) -> RequestKeyer | str:
        """A keyer for ``request``, or the reason it cannot be keyed safely (do not cache it)."""
        for feature in request.mm_features or ():
            if not _mm_identifier(feature):
                return f"a {feature.modality} input without a content hash (identifier)"
        parts: list[_Part] = []
        if request.cache_salt:
            parts += ["cache_salt", request.cache_salt]
        lora = request.lora_request
        if lora is not None:
            try:
                adapter = _adapter_config(lora.lora_path)
            except (OSError, ValueError) as exc:
                return f"LoRA {lora.lora_name!r}: unreadable adapter_config.json ({exc})"
            parts += ["lora", lora.lora_name, lora.lora_path, adapter]
        seed = ChunkKey(_digest(bytes(namespace), *parts)) if parts else namespace
        return cls(request, seed, tokens_per_chunk, rewritable=bool(getattr(request, "resumable", False)))

    def keys(self, num_tokens: int) -> list[ChunkKey]:
        """Keys of the full chunks among the first ``num_tokens`` tokens of ``all_token_ids``."""
        size = self.tokens_per_chunk
        want = num_tokens // size
        done = len(self._keys)
        if done >= want:
            return self._keys[:want]
        request = self.request
        has_extras = bool(request.mm_features) or request.prompt_embeds is not None
        new = chunk_keys(request.all_token_ids[done * size:want * size], tokens_per_chunk=size,
                         namespace=self.seed, parent=self._keys[-1] if done else None,
                         extras=(lambda i: self._extra((done + i) * size)) if has_extras else None)
        keys = self._keys + new
        # A streaming session keeps only the chunks vLLM will not rewrite (module docstring).
        stable = min(want, request.num_computed_tokens // size) if self.rewritable else want
        self._keys = keys[:max(done, stable)]
        return keys

    def _extra(self, start: int) -> bytes:
        """What besides token ids the KV of tokens [start, start + C) depends on; b"" if nothing."""
        end = start + self.tokens_per_chunk
        request = self.request
        parts: list[_Part] = []
        for feature in request.mm_features:  # few per request; sorted by offset, but may overlap
            pos = feature.mm_position
            if pos.offset < end and pos.offset + pos.length > start:
                parts += ["mm", feature.modality, str(_mm_identifier(feature)), pos.offset - start, pos.length]
        embeds = request.prompt_embeds
        if embeds is not None and start < len(embeds):
            parts += ["prompt_embeds", _tensor_digest(embeds[start:end])]
            mask = request.prompt_is_token_ids
            if mask is not None:
                parts.append(bytes(bool(b) for b in mask[start:end]))
        return _digest(*parts) if parts else b""


def check_supported(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None = None) -> None:
    """Raise IntegrationError for a model whose KV is not a function of its keyed prefix.

    kvtier refuses what vLLM 0.32 itself will not reuse across requests: models without prefix
    caching support (``ModelConfig.is_prefix_caching_supported``: encoder-decoder, bidirectional
    encoders, attention-free, pooling over the whole sequence), layers that attend non-causally
    (Prefix LM: ``AttentionSpec.non_causal``, which makes ``EngineCore`` turn prefix caching off)
    and R-SWA, whose generated tokens' KV depends on a window (``RSWASpec``; 0.32's
    ``UnlimitedOCRForCausalLMConfig`` turns prefix caching off).  The last two are only seen in
    ``kv_cache_config``: pass it.  Everything per request is keyed (``RequestKeyer``); what the
    KV layout cannot hold (hybrid, sliding window) is refused where the layout is built.
    """
    model = vllm_config.model_config
    if not model.is_prefix_caching_supported:
        raise IntegrationError(f"vLLM does not reuse this model's KV across requests (attention type "
                               f"{model.attn_type!r}{', pooling' if model.pooler_config else ''}), so kvtier cannot")
    if kv_cache_config is None:
        return
    from vllm.v1.kv_cache_interface import RSWASpec

    for group in kv_cache_config.kv_cache_groups:
        spec = group.kv_cache_spec
        if getattr(spec, "non_causal", False):
            raise IntegrationError("a KV cache layer attends non-causally (Prefix LM): "
                                   "its KV depends on later tokens, not only on the prefix")
        if isinstance(spec, RSWASpec):
            raise IntegrationError("R-SWA keeps only a window of generated tokens' KV, so their KV "
                                   "is not a function of the prefix")
