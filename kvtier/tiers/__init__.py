"""Tier registry: a tier name in the config -> a factory building it.

Factories are named as ``"module:function"`` strings and imported on first use, so the core
never imports redis, mooncake or torch unless a config asks for those tiers.  An out-of-tree
tier registers itself with ``register_tier("name", "package.module:factory")``; a factory takes
``(config: KVTierConfig, layout: KVLayout)`` and returns a ``Tier``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvtier.errors import ConfigError
from kvtier.tiers.base import Tier, TierStats

if TYPE_CHECKING:
    from kvtier.config.schema import KVTierConfig
    from kvtier.layout import KVLayout

TierFactory = Callable[["KVTierConfig", "KVLayout"], Tier]

_REGISTRY: dict[str, str | TierFactory] = {
    "dram": "kvtier.tiers.factories:make_dram",
    "disk": "kvtier.tiers.factories:make_disk",
    "redis": "kvtier.tiers.factories:make_redis",
    "mooncake": "kvtier.tiers.factories:make_mooncake",
    "node": "kvtier.tiers.factories:make_node",
}


def register_tier(name: str, factory: str | TierFactory) -> None:
    _REGISTRY[name] = factory


def make_tier(name: str, config: KVTierConfig, layout: KVLayout) -> Tier:
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown tier {name!r}; known: {sorted(_REGISTRY)}") from None
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        _REGISTRY[name] = factory
    return factory(config, layout)


__all__ = ["Tier", "TierStats", "make_tier", "register_tier"]
