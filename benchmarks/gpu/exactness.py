"""Does a kvtier hit add any error on the GPU?  Bitwise checks against the bf16 noise floor.

A bf16 model's logits for a suffix differ between "prefill everything" and "prefill the prefix,
then the suffix" (other GEMM shapes, other rounding) whatever the KV's origin.  This script
separates that engine noise from kvtier:

* ``kv_bitwise_equal``: the KV a hit loads equals, bit for bit, the KV the model computed;
* ``hit_vs_floor``: logits of a hit vs the same suffix forward over that KV kept on the GPU
  (no kvtier): 0 means kvtier added nothing;
* ``floor_vs_recompute``: the engine's own noise, the yardstick for ``hit_vs_recompute``;
* greedy continuations from all three caches.

    PYTHONPATH=. python benchmarks/gpu/exactness.py --json $OUT/exactness.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from benchmarks.gpu.bench_gpu import build_model, console
from kvtier.hierarchy import ContextMemory
from kvtier.integrations.hf import KVTierLM, layout_for
from kvtier.tiers.dram import DramTier


@torch.no_grad()
def greedy(model: Any, cache: DynamicCache, first: torch.Tensor, steps: int) -> list[int]:
    token, out = first, [int(first)]
    for _ in range(steps - 1):
        logits = model(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True).logits
        token = logits[0, -1].argmax()
        out.append(int(token))
    return out


def diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    a, b = a.float(), b.float()
    return {"max_abs": (a - b).abs().max().item(), "rel_l2": ((a - b).norm() / b.norm()).item()}


@torch.no_grad()
def check(model: Any, lm: KVTierLM, ids: torch.Tensor, n: int, steps: int) -> dict[str, Any]:
    device, c = lm.device, lm.layout.tokens_per_chunk
    gpu_ids = ids[None].to(device)
    full = DynamicCache()  # recompute: one forward over prefix + suffix
    ref = model(input_ids=gpu_ids, past_key_values=full, use_cache=True, logits_to_keep=1).logits[0, -1]
    floor_cache = DynamicCache()  # the same prefix KV, kept on the GPU, then the suffix forward
    for layer_idx, layer in enumerate(full.layers):
        floor_cache.update(layer.keys[:, :, :n].clone(), layer.values[:, :, :n].clone(), layer_idx)
    # kvtier holds exactly the KV the full forward computed
    keys = lm.memory.keys_for(ids.numpy())[:n // c]
    lm.memory.delete(keys)
    lm._store(keys, 0, [(layer.keys, layer.values) for layer in full.layers], None)
    hit = lm.prefill(ids, logits_to_keep=1)
    floor = model(input_ids=gpu_ids[:, n:], past_key_values=floor_cache, use_cache=True, logits_to_keep=1).logits[0, -1]
    bitwise = all(torch.equal(h.keys[:, :, :n], f.keys[:, :, :n])
                  and torch.equal(h.values[:, :, :n], f.values[:, :, :n])
                  for h, f in zip(hit.cache.layers, full.layers, strict=True))
    result = {"cached_tokens": n, "loaded_tokens": hit.loaded_tokens, "kv_bitwise_equal": bitwise,
              "hit_vs_floor": diff(hit.logits[0, -1], floor), "hit_vs_recompute": diff(hit.logits[0, -1], ref),
              "floor_vs_recompute": diff(floor, ref)}
    result["suffix_kv_bitwise_equal_hit_vs_floor"] = all(
        torch.equal(h.keys, f.keys) and torch.equal(h.values, f.values)
        for h, f in zip(hit.cache.layers, floor_cache.layers, strict=True))
    floor_copy = DynamicCache()  # the same cache twice: is decoding itself deterministic?
    for layer_idx, layer in enumerate(floor_cache.layers):
        floor_copy.update(layer.keys.clone(), layer.values.clone(), layer_idx)
    g_hit = greedy(model, hit.cache, hit.logits[0, -1].argmax(), steps)
    g_floor = greedy(model, floor_cache, floor.argmax(), steps)
    g_floor2 = greedy(model, floor_copy, floor.argmax(), steps)
    g_ref = greedy(model, full, ref.argmax(), steps)
    result["greedy"] = {"steps": steps, "hit_equals_floor": g_hit == g_floor, "hit_equals_recompute": g_hit == g_ref,
                        "floor_equals_recompute": g_floor == g_ref, "floor_equals_floor_repeat": g_floor == g_floor2,
                        "first_divergence_hit_vs_recompute": next(
                            (i for i, (a, b) in enumerate(zip(g_hit, g_ref, strict=True)) if a != b), None),
                        "hit": g_hit, "floor": g_floor, "recompute": g_ref}
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["llama-3.1-8b", "tiny"], default="llama-3.1-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--contexts", default="4096,32768")
    ap.add_argument("--suffix", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    model = build_model(args.model, args.device)
    layout = layout_for(model)
    contexts = [int(x) for x in args.contexts.split(",")]
    dram = DramTier(layout, capacity_bytes=(max(contexts) // layout.tokens_per_chunk + 2) * layout.chunk_bytes)
    results = []
    with ContextMemory(layout, [dram], write_through=False) as memory, \
            KVTierLM(model, memory, store=False, cost="off") as lm:
        gen = torch.Generator().manual_seed(2)
        for n in contexts:
            ids = torch.randint(0, model.config.vocab_size, (n + args.suffix,), generator=gen)
            results.append(check(model, lm, ids, n, args.steps))
            console.print({k: v for k, v in results[-1].items() if k != "greedy"},
                          {k: v for k, v in results[-1]["greedy"].items() if k not in ("hit", "floor", "recompute")})
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": layout.describe(), "suffix": args.suffix, "results": results},
                                        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
