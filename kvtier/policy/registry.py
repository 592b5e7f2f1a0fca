"""Eviction policies by name: what ``eviction = "..."`` in the config names (``KVTierConfig.eviction``).

Kept apart from ``eviction`` (the base class and the plain policies) so the agent policy, which
builds on ``EvictionPolicy``, and the plain policies do not import each other.
"""

from __future__ import annotations

from collections.abc import Callable

from kvtier.policy.agent import AgentPolicy
from kvtier.policy.eviction import EvictionPolicy, LRUPolicy, PrefixLRUPolicy, S3FIFOPolicy

POLICIES: dict[str, Callable[[], EvictionPolicy]] = {
    "lru": LRUPolicy,
    "lru-prefix": PrefixLRUPolicy,
    "s3fifo": S3FIFOPolicy,
    "agent": AgentPolicy,
}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; known: {sorted(POLICIES)}") from None


def make_policies(name: str, n: int) -> list[EvictionPolicy]:
    """One policy per tier of a hierarchy (the agent policies of one hierarchy share a model)."""
    if name == AgentPolicy.name:
        return AgentPolicy.family(n)
    return [make_policy(name) for _ in range(n)]
