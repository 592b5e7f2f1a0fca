"""One exception tree for kvtier.

    KVTierError
    ├── ConfigError            bad config file, env override, or connector extra config
    │   └── ConfigFieldError       one field's bad value, named by path or env variable
    ├── LayoutError            a KVLayout that cannot exist, or a payload of the wrong size
    │   └── LayoutTypeError        a layout field of the wrong type (also a TypeError)
    ├── KeyingError            token ids (or a chain start/parent) that cannot be keyed
    ├── ChunkFormatError       bytes that are not a servable chunk (callers: a miss, delete, count)
    │   ├── TruncatedChunkError    fewer bytes than the header promises
    │   ├── CorruptChunkError      bad magic, header or payload checksum
    │   └── ForeignLayoutError     written for another model/layout than the reader's
    ├── TierError              a tier failed in a way the caller may want to see
    │   └── TierUnavailableError   a remote tier is down (the hierarchy turns this into a miss)
    ├── ServiceError           ``kvtier serve`` cannot start (its socket is taken, no memory for its pool)
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


class ServiceError(KVTierError):
    """``kvtier serve`` cannot start: another one serves the socket, or the pool cannot be made."""


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


# --- added by the API/config hardening (issue 14) ----------------------------------------------

class ConfigFieldError(ConfigError):
    """One config field has a bad value; ``field`` names it (``dram.capacity``, an env variable).

    A dataclass names its own field (``DramConfig.capacity``); ``load_config`` re-labels the error
    with the field's path in the file, or the environment variable that set it.
    """

    MAX_PROBLEM = 300  # a hostile value (a megabyte string) is cut, so the message stays one screen line

    def __init__(self, field: str, problem: str) -> None:
        if len(problem) > self.MAX_PROBLEM:
            problem = problem[:self.MAX_PROBLEM] + "..."
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class LayoutTypeError(LayoutError, TypeError):
    """A KVLayout field of the wrong type (``num_layers="4"``, ``head_dim=2.5``, a bool)."""


class KeyingError(ArgumentValueError):
    """Bad input to chunk keying: token ids out of [0, 2**31) or not 1-D, a bad start or parent."""


class KeyingTypeError(KeyingError, ArgumentTypeError):
    """Token ids that are not integers (floats, bools, strings): also a TypeError."""
