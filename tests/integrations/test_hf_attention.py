"""Lower-right causal attention without a mask (``kvtier.integrations.hf_attention``)."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers.cache_utils import DynamicCache  # noqa: E402

from kvtier.integrations.hf_attention import NAME, lower_right_attention, lower_right_sdpa  # noqa: E402
from tests.integrations.hf_helpers import DEVICES, prompt, reference  # noqa: E402


def _masked(query: Any, key: Any, value: Any) -> Any:
    """The reference: an explicit boolean lower-right causal mask, GQA by repeating K and V."""
    q_len, kv_len = query.shape[2], key.shape[2]
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    rows, cols = torch.arange(q_len, device=query.device), torch.arange(kv_len, device=query.device)
    mask = cols[None, :] <= (kv_len - q_len) + rows[:, None]
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("q_len", "kv_len"), [(1, 40), (7, 40), (40, 40), (64, 300)])
def test_lower_right_matches_an_explicit_mask(device: str, q_len: int, kv_len: int) -> None:
    # bf16 and head dim 128 on CUDA: the flash kernel's path; float32 on CPU: the materialised mask
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(q_len * 1000 + kv_len)
    query = torch.randn(1, 8, q_len, 128, device=device, dtype=dtype, generator=g)
    key = torch.randn(1, 2, kv_len, 128, device=device, dtype=dtype, generator=g)
    value = torch.randn(1, 2, kv_len, 128, device=device, dtype=dtype, generator=g)
    out, weights = lower_right_sdpa(torch.nn.Module(), query, key, value, None)
    assert weights is None and out.shape == (1, q_len, 8, 128)
    want = _masked(query.float(), key.float(), value.float())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)


def test_lower_right_refuses_a_mask() -> None:
    x = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="no attention mask"):
        lower_right_sdpa(torch.nn.Module(), x, x, x, torch.ones(1, 1, 4, 4, dtype=torch.bool))


@torch.no_grad()
def test_steps_over_a_past_match_one_forward(model: Any) -> None:
    """A prompt computed as a first forward, then steps over their past under
    ``lower_right_attention``, gives the one-forward logits; the model's setting is restored."""
    ids = prompt(96, seed=7).to(model.device)
    want, _ = reference(model, ids)
    cache = DynamicCache()
    logits = [model(input_ids=ids[None, :40], past_key_values=cache, use_cache=True).logits]
    with lower_right_attention(model) as switched:
        assert switched and model.config._attn_implementation == NAME
        for lo, hi in ((40, 41), (41, 80), (80, 96)):  # one token, then steps of several
            logits.append(model(input_ids=ids[None, lo:hi], past_key_values=cache, use_cache=True).logits)
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(torch.cat(logits, dim=1), want, atol=1e-4, rtol=1e-4)


def test_other_attention_is_left_alone(model: Any) -> None:
    before = model.config._attn_implementation
    with lower_right_attention(model, enabled=False) as switched:  # KVTierLM(lower_right=False)
        assert not switched and model.config._attn_implementation == before
    model.config._attn_implementation = "eager"
    try:
        with lower_right_attention(model) as switched:
            assert not switched and model.config._attn_implementation == "eager"
    finally:
        model.config._attn_implementation = before
