"""Build each built-in tier from the typed config (imported lazily by the registry)."""

from __future__ import annotations

from kvtier.config.schema import KVTierConfig
from kvtier.errors import ConfigFieldError
from kvtier.layout import KVLayout
from kvtier.tiers.base import Tier


def make_dram(config: KVTierConfig, layout: KVLayout) -> Tier:
    from kvtier.tiers.dram import DramTier

    return DramTier(layout, capacity_bytes=config.dram.capacity, pin_memory=config.dram.pin_memory,
                    prefault=config.dram.prefault)


def make_disk(config: KVTierConfig, layout: KVLayout) -> Tier:
    from kvtier.tiers.disk import DiskTier

    try:
        return DiskTier(layout, path=config.disk.path, capacity_bytes=config.disk.capacity,
                        fsync=config.disk.fsync, io_threads=config.disk.io_threads, mode=config.disk.mode)
    except OSError as exc:  # the root or the layout's directory in it cannot be made or opened
        raise ConfigFieldError("disk.path", f"cannot use {str(config.disk.path)!r} as the disk root: "
                               f"{exc.strerror or exc}") from exc


def make_redis(config: KVTierConfig, layout: KVLayout) -> Tier:
    from kvtier.tiers.redis import RedisTier

    return RedisTier(layout, config.redis)


def make_mooncake(config: KVTierConfig, layout: KVLayout) -> Tier:
    from kvtier.tiers.mooncake import MooncakeTier

    return MooncakeTier(layout, config.mooncake)


def make_node(config: KVTierConfig, layout: KVLayout) -> Tier:
    from kvtier.tiers.node import NodeTier

    # dram.capacity stands for the node pool's size until the service first answers
    return NodeTier(layout, config.node, capacity_hint=config.dram.capacity)
