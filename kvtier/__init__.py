"""kvtier: a tiered context-memory store for LLM KV caches (DRAM -> disk -> shared).

Start at ``ContextMemory`` (kvtier.hierarchy); the formats are in keys.py, layout.py, codec.py.
"""

from kvtier.config import KVTierConfig, load_config
from kvtier.errors import KVTierError
from kvtier.hierarchy import ContextMemory, PrefixHit
from kvtier.keys import ChunkKey, chunk_keys, namespace_key
from kvtier.layout import KVLayout

__version__ = "0.1.0"

__all__ = ["ChunkKey", "ContextMemory", "KVLayout", "KVTierConfig", "KVTierError", "PrefixHit",
           "chunk_keys", "load_config", "namespace_key"]
