"""The worker side of the vLLM connector on its own: hints reach the eviction policy of its hierarchy."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvtier.hierarchy import ContextMemory  # noqa: E402
from kvtier.integrations.vllm_paged import PagedKV, geometry_of  # noqa: E402
from kvtier.integrations.vllm_plan import HintJob  # noqa: E402
from kvtier.integrations.vllm_worker import WorkerCore  # noqa: E402
from kvtier.layout import KVLayout  # noqa: E402
from kvtier.policy.agent import AgentPolicy  # noqa: E402
from kvtier.tiers.dram import DramTier  # noqa: E402

BS, HEADS, HD, LAYERS, NUM_BLOCKS = 4, 2, 8, 2, 16
LAYOUT = KVLayout(model="t", num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HD, dtype="float32",
                  tokens_per_chunk=2 * BS)


def _core(capacity_chunks: int) -> WorkerCore:
    caches = {f"layer{i}": torch.zeros(NUM_BLOCKS, HEADS, BS, 2 * HD) for i in range(LAYERS)}
    paged = PagedKV(caches, geometry_of(caches, BS), tokens_per_chunk=2 * BS)
    memory = ContextMemory(LAYOUT, [DramTier(LAYOUT, capacity_bytes=capacity_chunks * LAYOUT.chunk_bytes)],
                           eviction="agent")
    return WorkerCore(memory, paged)


def test_a_hint_tells_the_agent_policy_the_requests_chunks_and_session() -> None:
    core = _core(4)
    try:
        keys = core.memory.keys_for(list(range(40)))  # 5 chunks
        core.hint([HintJob("r1", tuple(keys), "chat-7")])
        policy = core.memory.indexes[0].policy
        assert isinstance(policy, AgentPolicy)
        model = policy.model
        assert model.hinted and list(model.sessions) == ["chat-7"]
        assert [model.depth_of(k) for k in keys] == [0, 1, 2, 3, 4]
        core.hint([HintJob("r2", tuple(keys[:2]), None), HintJob("r3", tuple(keys[1:3]), "chat-8")])
        assert list(model.sessions) == ["chat-7", "chat-8"] and model.depth_of(keys[0]) == -1  # the latest
        # a second call of the session: its gap is learnt (trace time is the policy's clock here)
        core.hint([HintJob("r4", tuple(keys), "chat-7")])
        assert model.sessions["chat-7"].gap is not None
        payload = np.zeros(LAYOUT.chunk_bytes, np.uint8)
        assert core.memory.store(keys[:4], [payload] * 4) == 4  # the hinted request's chunks are admitted
        assert core.memory.lookup(keys).num_chunks == 4
    finally:
        core.close()
