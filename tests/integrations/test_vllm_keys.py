"""Chunk keys of real vLLM requests: what besides token ids separates two requests' KV."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm")

import torch
from vllm.config import ModelConfig, PoolerConfig, VllmConfig
from vllm.lora.request import LoRARequest
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, RSWASpec
from vllm.v1.request import Request, RequestStatus, StreamingUpdate

from kvtier.errors import IntegrationError
from kvtier.integrations.vllm_keys import RequestKeyer, check_supported
from kvtier.keys import ChunkKey, chunk_keys, namespace_key
from kvtier.layout import KVLayout

C = 8
NS = namespace_key(KVLayout(model="m", num_layers=1, num_kv_heads=1, head_dim=4, tokens_per_chunk=C))
TOKENS = list(range(100, 148))  # 6 chunks


def request(tokens: list[int] | None = TOKENS, **kwargs: Any) -> Request:
    return Request("r", tokens, SamplingParams(max_tokens=8), None, **kwargs)


def image(identifier: str, offset: int, length: int) -> MultiModalFeatureSpec:
    return MultiModalFeatureSpec(data=None, modality="image", identifier=identifier,
                                 mm_position=PlaceholderRange(offset=offset, length=length), mm_hash=identifier)


def keyer(req: Request) -> RequestKeyer:
    k = RequestKeyer.for_request(req, namespace=NS, tokens_per_chunk=C)
    assert isinstance(k, RequestKeyer), k
    return k


def keys(req: Request) -> list[ChunkKey]:
    return keyer(req).keys(req.num_tokens)


def adapter(path: Path, rank: int) -> str:
    path.mkdir(exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    return str(path)


def test_plain_request_keeps_todays_keys() -> None:
    got = keys(request())
    assert got == chunk_keys(TOKENS, tokens_per_chunk=C, namespace=NS) and len(got) == 6
    assert keys(request([*TOKENS, 1, 2, 3])) == got  # the partial last chunk gets no key


def test_cache_salt_separates_tenants() -> None:
    a, a2, b, none = (keys(request(cache_salt=s)) for s in ("tenant-a", "tenant-a", "tenant-b", None))
    assert a == a2
    assert not set(a) & set(b) and not set(a) & set(none) and not set(b) & set(none)


def test_lora_adapters_never_share(tmp_path: Path) -> None:
    path_x, path_y = adapter(tmp_path / "x", 8), adapter(tmp_path / "y", 8)
    x = keys(request(lora_request=LoRARequest("x", 1, path_x)))
    x_other_id = keys(request(lora_request=LoRARequest("x", 7, path_x)))  # same adapter, another process's id
    renamed = keys(request(lora_request=LoRARequest("x2", 1, path_x)))
    moved = keys(request(lora_request=LoRARequest("x", 1, path_y)))  # the name re-pointed at another adapter
    base = keys(request())
    assert x == x_other_id
    keysets = [x, renamed, moved, base]
    flat = [k for ks in keysets for k in ks]
    assert len(set(flat)) == len(flat)


def test_lora_retrained_with_another_rank_gets_other_keys(tmp_path: Path) -> None:
    path = adapter(tmp_path / "x", 8)
    r8 = keys(request(lora_request=LoRARequest("x", 1, path)))
    adapter(tmp_path / "x", 16)
    r16 = keys(request(lora_request=LoRARequest("x", 1, path)))
    assert not set(r8) & set(r16)
    (tmp_path / "x" / "adapter_config.json").write_text("{not json")
    reason = RequestKeyer.for_request(request(lora_request=LoRARequest("x", 1, path)), namespace=NS,
                                      tokens_per_chunk=C)
    assert isinstance(reason, str) and "adapter_config.json" in reason


def test_image_changes_keys_from_its_first_chunk_on() -> None:
    a = keys(request(mm_features=[image("img-a", offset=20, length=10)]))  # chunks 2 and 3
    b = keys(request(mm_features=[image("img-b", offset=20, length=10)]))
    plain = keys(request())
    assert a[:2] == b[:2] == plain[:2]
    assert all(x != y for x, y in zip(a[2:], b[2:], strict=True))
    assert not set(a[2:]) & set(plain)


def test_image_position_and_length_are_keyed() -> None:
    at20 = keys(request(mm_features=[image("img", offset=20, length=10)]))
    at21 = keys(request(mm_features=[image("img", offset=21, length=9)]))
    longer = keys(request(mm_features=[image("img", offset=20, length=11)]))
    assert at20[:2] == at21[:2] == longer[:2]
    assert at20[2] != at21[2] and at20[2] != longer[2]


def test_image_without_content_hash_is_refused() -> None:
    spec = MultiModalFeatureSpec(data=None, modality="image", identifier="", mm_position=PlaceholderRange(4, 4))
    reason = RequestKeyer.for_request(request(mm_features=[spec]), namespace=NS, tokens_per_chunk=C)
    assert isinstance(reason, str) and "image" in reason


def test_prompt_embeds_are_keyed_by_content() -> None:
    embeds = torch.arange(40 * 4, dtype=torch.float32).reshape(40, 4)
    changed = embeds.clone()
    changed[17, 2] += 1  # chunk 2
    a, a2 = keys(request(None, prompt_embeds=embeds)), keys(request(None, prompt_embeds=embeds.clone()))
    b = keys(request(None, prompt_embeds=changed))
    zeros = keys(request([0] * 40))  # the token ids an embeddings-only request reads as
    assert a == a2 and len(a) == 5
    assert a[:2] == b[:2] and all(x != y for x, y in zip(a[2:], b[2:], strict=True))
    assert not set(a) & set(zeros)
    assert not set(a) & set(keys(request(None, prompt_embeds=embeds.to(torch.bfloat16))))


def test_mixed_prompt_keys_which_positions_are_embeddings() -> None:
    """Positions given as embeddings read token id 0; a real token 0 there is another input."""
    tokens = [5] * 8 + [0] * 8 + [5] * 8
    embeds = torch.zeros(24, 4)
    mask_a = [True] * 8 + [False] * 8 + [True] * 8
    mask_b = [True] * 8 + [True, *[False] * 7] + [True] * 8  # position 8 is token 0, not an embedding
    a = keys(request(tokens, prompt_embeds=embeds, prompt_is_token_ids=mask_a))
    b = keys(request(tokens, prompt_embeds=embeds, prompt_is_token_ids=mask_b))
    assert a[0] == b[0] and a[1] != b[1]


def test_incremental_keys_equal_one_shot(tmp_path: Path) -> None:
    extras: dict[str, Any] = {"cache_salt": "s", "lora_request": LoRARequest("x", 1, adapter(tmp_path / "x", 4))}
    prompt, generated = TOKENS[:19], TOKENS[19:]
    # "b" overlaps chunks 3-5, which are hashed one by one as the request grows
    grow = request(prompt, mm_features=[image("a", offset=2, length=5), image("b", offset=30, length=12)], **extras)
    k = keyer(grow)
    seen = [list(k.keys(grow.num_tokens))]
    for token in generated:
        grow.append_output_token_ids(token)
        seen.append(list(k.keys(grow.num_tokens)))
    full = keys(request(TOKENS, mm_features=[image("a", 2, 5), image("b", 30, 12)], **extras))
    assert seen[-1] == full and len(full) == 6
    assert all(s == full[:len(s)] for s in seen)
    assert k.keys(17) == full[:2] and k.keys(7) == []


def test_streaming_session_rekeys_the_rewritten_tail() -> None:
    """vLLM drops the last sampled token when the next input arrives; its chunk is rehashed."""
    session = request(TOKENS[:15], resumable=True)
    k = keyer(session)
    session.append_output_token_ids(999)  # sampled, never computed: num_tokens 16, chunk 1 now full
    session.num_computed_tokens = 15
    stale = k.keys(session.num_tokens)
    assert len(stale) == 2
    session.status = RequestStatus.WAITING_FOR_STREAMING_REQ
    update = StreamingUpdate(mm_features=None, prompt_token_ids=TOKENS[15:], max_tokens=8, arrival_time=0.0,
                             sampling_params=SamplingParams(max_tokens=8))
    scheduler = SimpleNamespace(hash_block_size=C, log_stats=False, num_waiting_for_streaming_input=1)
    Scheduler._update_request_as_session(scheduler, session, update)  # type: ignore[arg-type]
    assert list(session.all_token_ids) == TOKENS
    assert k.keys(session.num_tokens) == keys(request(TOKENS)) and stale[1] != keys(request(TOKENS))[1]


def test_keys_are_stable_across_processes(tmp_path: Path) -> None:
    path = adapter(tmp_path / "x", 8)
    code = f"""
import torch
from tests.integrations.test_vllm_keys import LoRARequest, image, keys, request
req = request(None, prompt_embeds=torch.arange(96.0).reshape(24, 4), cache_salt="s",
              lora_request=LoRARequest("x", 3, {path!r}), mm_features=[image("h", 4, 6)])
print(",".join(k.hex() for k in keys(req)))
"""
    here = [k.hex() for k in keys(request(None, prompt_embeds=torch.arange(96.0).reshape(24, 4), cache_salt="s",
                                          lora_request=LoRARequest("x", 1, path), mm_features=[image("h", 4, 6)]))]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2], env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout
    assert out.strip().splitlines()[-1].split(",") == here and len(here) == 3


def _kv_config(spec: Any) -> KVCacheConfig:
    return KVCacheConfig(num_blocks=1, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l0"], spec)])


def test_check_supported(tiny_model: Path) -> None:
    decoder = VllmConfig(model_config=ModelConfig(model=str(tiny_model), skip_tokenizer_init=True))
    full = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float32)
    check_supported(decoder)
    check_supported(decoder, _kv_config(full))
    with pytest.raises(IntegrationError, match="non-causally"):
        check_supported(decoder, _kv_config(FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64,
                                                              dtype=torch.float32, non_causal=True)))
    with pytest.raises(IntegrationError, match="R-SWA"):
        check_supported(decoder, _kv_config(RSWASpec(block_size=16, num_kv_heads=2, head_size=64,
                                                     dtype=torch.float32, rswa_window=8)))
    mean_pooling = ModelConfig(model=str(tiny_model), skip_tokenizer_init=True, runner="pooling",
                               pooler_config=PoolerConfig(seq_pooling_type="MEAN"))
    with pytest.raises(IntegrationError, match="does not reuse"):
        check_supported(SimpleNamespace(model_config=mean_pooling))  # type: ignore[arg-type]
