"""One exception tree for kvtier.

    KVTierError
    ├── ConfigError            bad config file, env override, or connector extra config
    ├── LayoutError            a KVLayout that cannot exist, or a payload of the wrong size
    ├── ChunkFormatError       bytes that are not a servable chunk (callers: a miss, delete, count)
    │   ├── TruncatedChunkError    fewer bytes than the header promises
    │   ├── CorruptChunkError      bad magic, header or payload checksum
    │   └── ForeignLayoutError     written for another model/layout than the reader's
    ├── TierError              a tier failed in a way the caller may want to see
    │   └── TierUnavailableError   a remote tier is down (the hierarchy turns this into a miss)
    └── IntegrationError       an engine integration was misconfigured or misused

Errors of libraries below (OSError, redis, CUDA) are translated at the tier boundary with
``raise ... from exc`` so callers only ever catch ``KVTierError``.
"""

from __future__ import annotations


class KVTierError(Exception):
    """Base class of every error kvtier raises on purpose."""


class ConfigError(KVTierError, ValueError):
    """A configuration value is unknown, of the wrong type, or out of range."""


class LayoutError(KVTierError, ValueError):
    """A KV layout is invalid, or a payload does not match the layout."""


class ChunkFormatError(KVTierError):
    """Stored bytes are not a valid chunk. Never served: treat as a miss and delete."""


class TruncatedChunkError(ChunkFormatError):
    """The chunk is shorter than its header says (a torn write or a cut transfer)."""


class CorruptChunkError(ChunkFormatError):
    """Magic, header checksum or payload checksum does not match."""


class ForeignLayoutError(ChunkFormatError):
    """The chunk was written for a different model or KV layout than the reader expects."""


class TierError(KVTierError):
    """A storage tier failed (I/O error, protocol error)."""


class TierUnavailableError(TierError):
    """A remote tier cannot be reached right now; it is retried after a backoff."""


class IntegrationError(KVTierError):
    """An engine integration (vLLM, transformers) is misconfigured or misused."""


# --- bad arguments to a public call (ContextMemory, InPlaceStore, keys) ---------------------------
#     KVTierError
#     ├── ArgumentTypeError (also TypeError)    a payload that is not an array, a key that is not bytes
#     └── ArgumentValueError (also ValueError)  counts that do not match, a key of 15 bytes, ttl_s=-1
# (a payload array of the wrong dtype or size stays a LayoutError, as the tiers raise it)


class ArgumentTypeError(KVTierError, TypeError):
    """An argument of a public call has the wrong type; the message names it and what it got."""


class ArgumentValueError(KVTierError, ValueError):
    """An argument of a public call has the right type but a value that cannot be used."""
