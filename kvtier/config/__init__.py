"""Typed configuration: the schema (``schema.py``: one frozen dataclass per component, checked on
construction) and its loading from a file and the environment (``loader.py``).

Sources, later wins: defaults < file (TOML or YAML) < environment (``KVTIER_DRAM__CAPACITY=8GiB``);
see ``kvtier.config.loader``.  The names below are the public ones; import them from here.
"""

from kvtier.config.loader import from_dict, load_config, parse_size
from kvtier.config.schema import (
    BreakerConfig,
    DiskConfig,
    DramConfig,
    GiB,
    KVTierConfig,
    MooncakeConfig,
    PrefetchConfig,
    RedisConfig,
    check_openable,
    default_cache_dir,
    read_tenant_secret,
    redacted,
)

__all__ = [
    "BreakerConfig", "DiskConfig", "DramConfig", "GiB", "KVTierConfig", "MooncakeConfig", "PrefetchConfig",
    "RedisConfig", "check_openable", "default_cache_dir", "from_dict", "load_config", "parse_size",
    "read_tenant_secret", "redacted",
]
