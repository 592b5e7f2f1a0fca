"""Hugging Face transformers integration: prefill only what kvtier does not already hold.

Follow one request through ``KVTierLM.prefill(input_ids)``:

1. **lookup**: chunk keys of the prompt, the longest cached prefix and its tier levels
   (control plane only, no bytes move);
2. **decide**: ``CostModel.plan`` picks how many leading chunks to load; the rest is
   recomputed.  By default (``cost="auto"``) the model is calibrated at start-up and refined from
   every read and forward (``kvtier.integrations.hf_cost``); ``cost="off"`` loads every usable
   chunk.  Each decision is counted (``KVTierLM.decisions``) and logged at DEBUG.  At least one token is always
   computed, so the model produces logits.  For a slow-tier hit the plan may be a **split**:
   recompute the head while the tail loads, then the suffix (``kvtier.integrations.hf_split``
   executes it; steps 3-4 then run on a loader thread beside the head's compute);
3. **fetch**: ``ContextMemory.borrow_prefix``: DRAM chunks are borrowed zero-copy from the
   pinned pool, chunks of lower tiers are read (checksums, corrupt = miss) straight into pinned
   DRAM slots reserved for them -- the promotion is the read.  Without a DRAM tier (or with
   no room in it) chunks go through ``ContextMemory.load`` into pinned staging.  A chunk that
   fails to load ends the prefix there: those tokens are recomputed;
4. **copy**: the copy engine streams the bytes straight into the prompt's KV tensors on the
   model's device, layer by layer (``layerwise=True``: queued as the forward reaches each
   layer, and layer ``l`` computes as soon as *its* bytes are in) or in bulk;
5. **compute**: the model runs on the uncached suffix with a ``PromptCache`` over those
   tensors, writing the suffix's K and V into their rows (``kvtier.integrations.hf_cache``).
   Over a past it attends through a lower-right causal flash kernel instead of a mask
   (``hf_attention``: faster per FLOP, and no per-shape planning, which cuDNN's masked SDPA
   does for every new length);
6. **store**: the suffix's new full chunks are gathered on the device and copied by a
   background thread (``flush()`` waits), off the request's critical path, straight into DRAM
   slots that kvtier reserved for them (``ContextMemory.store_in_place``), then committed.

``prefill(ids, session=..., retention=...)`` tells the eviction policy which session asks and
how long to keep its chunks (``ContextMemory.hint``); ``hint_end(session, awaits="tool")`` (or
``generate(..., awaits="tool")``) says the answer waits for a tool, and the session's chunks come
back from disk into DRAM during the pause (``kvtier.prefetch``, ``prefetch_share``).

One request at a time per ``KVTierLM`` (batch size 1); the model's KV dtype must be the
layout's.  Standard attention only (K and V per layer): MLA models are not supported here.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from kvtier.errors import IntegrationError
from kvtier.hierarchy import ContextMemory, InPlaceStore
from kvtier.integrations.hf_attention import lower_right_attention
from kvtier.integrations.hf_cache import PromptCache
from kvtier.integrations.hf_cost import AUTO, OFF, AutoCost, Decisions, ForwardTimer, calibrate_cost
from kvtier.integrations.hf_cost import calibrate_prefill as calibrate_prefill  # re-exported: its old home
from kvtier.integrations.hf_split import DEFAULT_SPLIT, SplitOptions, SplitTimings, run_split
from kvtier.keys import ChunkKey
from kvtier.layout import KVLayout
from kvtier.policy.cost import CostModel, FetchPlan
from kvtier.policy.retention import Retention
from kvtier.tiers.cuda import CopyEngine, KVLoad

log = logging.getLogger(__name__)


def layout_for(model: Any, *, model_id: str | None = None, tokens_per_chunk: int = 256) -> KVLayout:
    """The KVLayout of a transformers causal LM (from its config and parameter dtype).

    ``model_id`` must name the weights (two checkpoints of one architecture must never share
    chunks); it defaults to the config's ``name_or_path``.
    """
    cfg = model.config.get_text_config(decoder=True)
    name = model_id or getattr(cfg, "name_or_path", "") or getattr(model.config, "name_or_path", "")
    if not name:
        raise IntegrationError("the model has no name_or_path: pass model_id= naming its weights")
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return KVLayout(model=name, num_layers=cfg.num_hidden_layers,
                    num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                    head_dim=head_dim, dtype=dtype, tokens_per_chunk=tokens_per_chunk)


@dataclass(frozen=True, slots=True)
class PrefillResult:
    logits: torch.Tensor  # the model's logits for the computed suffix (or its last logits_to_keep)
    cache: DynamicCache  # KV of the whole prompt, ready for decoding
    plan: FetchPlan | None  # the fetch-or-recompute decision (None: cost model off, load all)
    loaded_tokens: int  # prompt tokens whose KV came from kvtier
    computed_tokens: int  # prompt tokens the model computed
    store: Future[int] | None  # background store of the new full chunks (result: chunks stored)
    head_tokens: int = 0  # of computed_tokens, those computed while the loaded ones streamed in (a split)
    split_timings: SplitTimings | None = None  # a split: where its time went (benchmarks)


class KVTierLM:
    """A transformers causal LM in front of a ``ContextMemory``; see the module docstring."""

    def __init__(self, model: Any, memory: ContextMemory, *, cost: CostModel | str | None = AUTO,
                 layerwise: bool = True, store: bool = True, staging_bytes: int = 256 << 20,
                 copy2d: bool | None = None, split: SplitOptions | None = DEFAULT_SPLIT,
                 lower_right: bool = True) -> None:
        self.model = model
        self.memory = memory
        self.layout = memory.layout
        if self.layout.num_kv_parts != 2:
            raise IntegrationError("the transformers integration supports K/V layouts only (not MLA)")
        self.device = next(model.parameters()).device
        self.layerwise = layerwise
        self.store_enabled = store
        self.split = split  # None: never split (the cost model's pure decisions only)
        # forwards over a past attend through lower-right causal flash, not a mask (hf_attention)
        self.lower_right = lower_right
        top = memory.tiers[0]
        # a top tier whose slots are host memory (DRAM): the device copies straight into and out of them
        self._dram = top if top.capabilities.slots and top.pool is not None else None
        self.engine = CopyEngine(self.layout, self.device, pool=self._dram.pool if self._dram else None,
                                 staging_bytes=staging_bytes, copy2d=copy2d)
        self.engine.warm_up()  # no first-hit penalty: the load path's first-use costs are paid here
        self._warm_attention()
        self._auto: AutoCost | None = None
        self._fixed: CostModel | None = None
        self.cost = cost  # "auto" calibrates here (see the ``cost`` property)
        self.decisions = Decisions()
        self._timer = ForwardTimer(self.engine)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-hf-store")
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-hf-split")
        self._stores: list[Future[int]] = []

    @torch.no_grad()
    def _warm_attention(self) -> None:
        """One throwaway forward over a cache shaped like a hit's (``PromptCache``: the KV read
        through strided views, a past longer than the new tokens).

        The first attention over a past (a hit) pays one-time set-up: on an H200 cuDNN's SDPA
        took 77 ms in the first turn that loaded, 48 ms after this warm-up, the rest being the
        plan for that turn's (new, past) shape, which any cache pays for a new shape, the in-HBM
        baseline too.  With ``lower_right`` (the default) there is no per-shape plan; the warm-up
        still pays the first call's set-up.  The cache's rows are never written: the logits are
        garbage and dropped."""
        if not self.engine.is_cuda:
            return
        c = self.layout.tokens_per_chunk
        load = self.engine.start_load(1, tokens=2 * c, layerwise=self.layerwise)
        load.finish()
        ids = torch.zeros((1, c), dtype=torch.long, device=self.device)
        with lower_right_attention(self.model, self.lower_right):
            self.model(input_ids=ids, past_key_values=PromptCache(load, c), use_cache=True)
        load.wait_host()
        torch.cuda.synchronize(self.device)

    @property
    def cost(self) -> CostModel | None:
        """The fetch-or-recompute model deciding now (None: off, every usable chunk is loaded).

        Set it to ``"auto"`` (calibrate now, refine online: the default), ``"off"`` (or None), or a
        fixed ``CostModel`` (measured once, ``CostModel.load``; never refined)."""
        return self._auto.model if self._auto is not None else self._fixed

    @cost.setter
    def cost(self, cost: CostModel | str | None) -> None:
        if isinstance(cost, CostModel) or cost is None or cost == OFF:
            self._auto, self._fixed = None, cost if isinstance(cost, CostModel) else None
        elif cost == AUTO:
            self._auto = calibrate_cost(self.model, self.memory, self.engine, layerwise=self.layerwise)
            self._fixed = None
        else:
            raise IntegrationError(f"cost must be {AUTO!r}, {OFF!r}, None or a CostModel, got {cost!r}")

    @property
    def auto_cost(self) -> AutoCost | None:
        """The default model's figures and its online refinement (None unless ``cost="auto"``)."""
        return self._auto

    # --- the request path -----------------------------------------------------------------------
    def prefill(self, input_ids: torch.Tensor | Sequence[int], *, session: str | None = None,
                retention: Retention | None = None, **forward_kwargs: Any) -> PrefillResult:
        """Logits and cache for ``input_ids`` (1-D, or shape (1, T)), loading what kvtier holds.

        ``session``, ``retention``: told to the eviction policy (``ContextMemory.hint``)."""
        with lower_right_attention(self.model, self.lower_right):
            return self._prefill(_as_ids(input_ids), forward_kwargs, session, retention)

    def hint_end(self, session: str, *, awaits: str) -> None:
        """``session``'s answer is out and waits for a ``"tool"`` (back in seconds: its chunks below
        DRAM are prefetched meanwhile) or the ``"user"`` (``ContextMemory.hint_end``)."""
        self.memory.hint_end(session, awaits=awaits)

    def _prefill(self, ids: torch.Tensor, forward_kwargs: dict[str, Any], session: str | None,
                 retention: Retention | None) -> PrefillResult:
        c = self.layout.tokens_per_chunk
        keys = self.memory.keys_for(ids.numpy())
        self.memory.hint(keys, session=session, retention=retention)
        hit = self.memory.lookup(keys)
        if self._auto is not None:
            self._timer.poll(self._auto)  # CUDA: earlier forwards whose events are done
        if self.cost is not None:
            # a split pays where a chunk loads about as slowly as it computes (disk, G4); a hit wholly
            # in DRAM (~10x faster than an 8B model computes it on an H200) needs a pure decision only
            split = self.split is not None and not (self._dram is not None and not any(hit.tiers))
            plan: FetchPlan | None = self.cost.plan(hit.tiers, total_tokens=len(ids), tokens_per_chunk=c,
                                                    chunk_bytes=self.layout.chunk_bytes, split=split)
            want = plan.load_chunks if plan else 0
        else:
            plan, want = None, min(hit.num_chunks, (len(ids) - 1) // c)
        self._decided(plan, hit.tiers, want, len(ids))
        if plan is not None and plan.is_split:
            return self._prefill_split(ids, keys, hit.tiers, plan, forward_kwargs)
        with contextlib.ExitStack() as borrows:
            load, loaded = self._fetch(keys[:want], borrows, tokens=len(ids), levels=hit.tiers) if want else (None, 0)
            try:
                cache = PromptCache(load, loaded * c) if load is not None else DynamicCache()
                suffix = ids[loaded * c:].to(self.device)[None, :]
                started = self._timer.start()
                out = self.model(input_ids=suffix, past_key_values=cache, use_cache=True, **forward_kwargs)
                if self._auto is not None and (load is None or not self.engine.is_cuda):  # not waiting on copies
                    self._timer.stop(started, loaded * c, len(ids) - loaded * c, self._auto)
            finally:
                if load is not None:
                    load.wait_host()  # the DRAM borrows end here: copies must have read them
        if loaded < want:
            log.warning("kvtier: loaded %d of %d planned chunks (a chunk failed to load); "
                        "recomputed the rest", loaded, want)
        first_new = loaded if loaded < want else max(hit.num_chunks, loaded)
        store = self._store_async(keys, first_new, len(ids) // c, out.past_key_values)
        return PrefillResult(logits=out.logits, cache=out.past_key_values, plan=plan, loaded_tokens=loaded * c,
                             computed_tokens=len(ids) - loaded * c, store=store)

    def _decided(self, plan: FetchPlan | None, levels: Sequence[int], want: int, tokens: int) -> None:
        """Count the decision for a prompt whose hit offered usable chunks; log it at DEBUG."""
        cached = min(len(levels), (tokens - 1) // self.layout.tokens_per_chunk)
        if cached == 0:
            return
        name = self.decisions.count(plan, cached, want)
        if log.isEnabledFor(logging.DEBUG):
            why = (f"est {plan.est_total_s * 1e3:.2f} ms vs recompute {plan.est_recompute_s * 1e3:.2f} ms"
                   if plan is not None else "cost model off")
            log.debug("kvtier: %d tokens, %d cached chunks (deepest tier %d): %s, load %d chunks (%s)", tokens,
                      cached, max(levels[:cached]), name, plan.loaded_chunks if plan is not None else want, why)

    def _prefill_split(self, ids: torch.Tensor, keys: Sequence[ChunkKey], levels: Sequence[int], plan: FetchPlan,
                       forward_kwargs: dict[str, Any]) -> PrefillResult:
        """The plan's split: compute the head while the tail loads (``hf_split``), then the suffix."""
        assert self.split is not None
        c, end, cached = self.layout.tokens_per_chunk, plan.load_chunks, len(levels)
        with contextlib.ExitStack() as borrows:
            split = run_split(self.model, self.memory, self.engine, ids, keys, compute_chunks=plan.compute_chunks,
                              end=end, options=self.split, borrows=borrows, pool=self._loader)
            try:
                suffix = ids[end * c:].to(self.device)[None, :]
                started = self._timer.start()
                out = self.model(input_ids=suffix, past_key_values=split.cache, use_cache=True, **forward_kwargs)
                if self._auto is not None and not self.engine.is_cuda:  # on CUDA it waits for the copies
                    self._timer.stop(started, end * c, len(ids) - end * c, self._auto)
            finally:
                if split.load is not None:
                    split.load.wait_host()  # the DRAM borrows end here: copies must have read them
        if split.failed_at is not None:
            log.warning("kvtier: chunk %d of a split failed to load; computed up to chunk %d instead",
                        split.failed_at, split.computed_chunks)
        loaded = (end - split.computed_chunks) * c
        if self._auto is not None and loaded and split.timings is not None:  # the loader's wall time
            t = split.timings
            self._auto.observe_read(max(levels[split.computed_chunks:end]), loaded // c * self.layout.chunk_bytes,
                                    max(t.loader_done_s - t.queue_s, 0.0))
        first_new = split.failed_at if split.failed_at is not None else max(cached, end)
        store = self._store_async(keys, first_new, len(ids) // c, out.past_key_values)
        return PrefillResult(logits=out.logits, cache=out.past_key_values, plan=plan, loaded_tokens=loaded,
                             computed_tokens=len(ids) - loaded, store=store,
                             head_tokens=split.computed_chunks * c, split_timings=split.timings)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | Sequence[int], max_new_tokens: int, *,
                 session: str | None = None, retention: Retention | None = None,
                 awaits: str | None = None) -> tuple[list[int], PrefillResult]:
        """Greedy decoding after a kvtier prefill: (new token ids, the prefill result).

        ``session``, ``retention``: as ``prefill``; ``awaits``: then ``hint_end(session, awaits=)``."""
        if awaits is not None and session is None:
            raise IntegrationError("generate(awaits=...) needs the session whose answer it is")
        result = self.prefill(input_ids, session=session, retention=retention, logits_to_keep=1)
        token = result.logits[0, -1].argmax()
        tokens = [int(token)]
        cache = result.cache
        for _ in range(max_new_tokens - 1):
            out = self.model(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True)
            token = out.logits[0, -1].argmax()
            tokens.append(int(token))
        if awaits is not None and session is not None:
            self.hint_end(session, awaits=awaits)
        return tokens, result

    # --- fetch: host bytes -> device ------------------------------------------------------------
    def _fetch(self, keys: Sequence[ChunkKey], borrows: contextlib.ExitStack, *, tokens: int | None = None,
               levels: Sequence[int] = ()) -> tuple[KVLoad | None, int]:
        """Start copying the longest loadable prefix of ``keys`` into the KV of a ``tokens``-token
        prompt (default: just those chunks); returns (load, chunks).  ``levels``: the tier of each
        key at lookup (reads from below DRAM are timed for the default cost model)."""
        load = self.engine.start_load(len(keys), tokens=tokens, layerwise=self.layerwise)
        dram_views: list[np.ndarray] = []
        if self._dram is not None:
            # DRAM chunks zero-copy from the pinned pool; lower-tier chunks read straight into
            # pinned DRAM slots (promotion in place), then copied to the device from there.
            started = time.perf_counter()
            dram_views = borrows.enter_context(self.memory.borrow_prefix(keys))
            self._observe_reads(levels[:len(dram_views)], time.perf_counter() - started)
        n = len(dram_views)
        n += self._fetch_lower(load, keys[n:], first=n, levels=levels[n:])  # whole chunks, host-synchronous reads
        if n == 0:
            return None, 0
        load.num_chunks = n  # chunks past a failed one are never read
        started = time.perf_counter()
        load.copy_layers(dram_views)  # layer-wise: queued layer by layer as the forward reaches them
        load.finish()
        if self._auto is not None and not self.engine.is_cuda:  # CPU: the copies are done here
            self._auto.observe_copy(len(dram_views) * self.layout.chunk_bytes, time.perf_counter() - started)
        return load, n

    def _observe_reads(self, levels: Sequence[int], seconds: float) -> None:
        lower = [level for level in levels if level > 0]
        if self._auto is not None and lower:
            self._auto.observe_read(max(lower), len(lower) * self.layout.chunk_bytes, seconds)

    def _fetch_lower(self, load: KVLoad, keys: Sequence[ChunkKey], *, first: int, levels: Sequence[int] = ()) -> int:
        """Chunks of tiers below DRAM (or missed borrows) via the hierarchy, through staging."""
        done, group = 0, self.engine.group_chunks
        while done < len(keys):
            if done:
                load.wait_queued()  # the staging is reused: the previous group's copy must be out
            views = self.engine.views(self.engine.load_staging, min(group, len(keys) - done))
            started = time.perf_counter()
            got = self.memory.load(keys[done:done + len(views)], views)
            self._observe_reads(levels[done:done + got], time.perf_counter() - started)
            load.copy_chunks(views[:got], first=first + done)
            done += got
            if got < len(views):
                break
        return done

    # --- store: device -> kvtier, in the background -----------------------------------------------
    def _store_async(self, keys: Sequence[ChunkKey], first: int, end: int, cache: Any) -> Future[int] | None:
        if not self.store_enabled or first >= end:
            return None
        kv = [(layer.keys, layer.values) for layer in cache.layers]  # references keep them alive
        ready = self.engine.record_now()
        future = self._writer.submit(_logged, self._store, list(keys[first:end]), first, kv, ready)
        # done ones are dropped, but not failed ones: ``flush`` raises the first of them (once)
        self._stores = [f for f in self._stores if not f.done() or f.exception() is not None] + [future]
        return future

    def _store(self, keys: list[ChunkKey], first_chunk: int,
               kv: list[tuple[torch.Tensor, torch.Tensor]], ready: Any) -> int:
        """Gather group after group on the device and copy each into kvtier; returns chunks stored.

        With a DRAM top tier the copies land in reserved pool slots (``store_in_place``) and
        the next group is queued before the previous one is waited for and committed, so the
        copy engine stays busy; otherwise through pinned staging and ``store``.
        """
        c, stored, group_chunks = self.layout.tokens_per_chunk, 0, self.engine.group_chunks
        ctx = torch.cuda.device(self.device) if self.engine.is_cuda else contextlib.nullcontext()
        inflight: list[tuple[InPlaceStore, Any]] = []  # at most one group waits while the next is queued
        with ctx, torch.no_grad():
            try:
                for start in range(0, len(keys), group_chunks):
                    group = keys[start:start + group_chunks]
                    chunks, gathered = self.engine.gather(kv, (first_chunk + start) * c, len(group), after=ready)
                    if self._dram is None:
                        stored += self.memory.store(group, self.engine.to_host(chunks, gathered))
                        continue
                    op = self.memory.store_in_place(group)
                    try:
                        done = self.engine.copy_to_host(chunks, gathered, op.views)
                    except BaseException:
                        op.abort()  # nothing was queued into its slots (the copy failed to start)
                        raise
                    del chunks  # freed in stream order, after the copy
                    inflight.append((op, done))
                    if len(inflight) > 1:
                        stored += self._commit(inflight)
                while inflight:
                    stored += self._commit(inflight)
            finally:
                for op, done in inflight:  # an error: slots may be reused only once their copies are done
                    self.engine.wait(done)  # (if even this fails, the slots stay reserved: never reused)
                    op.abort()
        return stored

    def _commit(self, inflight: list[tuple[InPlaceStore, Any]]) -> int:
        """Wait for the oldest group's copies, then publish it."""
        op, done = inflight[0]
        self.engine.wait(done)
        inflight.pop(0)
        return op.commit()

    def flush(self) -> None:
        """Wait for every background store; re-raises a store's error (once)."""
        stores, self._stores = self._stores, []
        for future in stores:
            future.result()

    def close(self) -> None:
        self.flush()
        self._writer.shutdown(wait=True)
        self._loader.shutdown(wait=True)

    def __enter__(self) -> KVTierLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _logged(store: Any, *args: Any) -> int:
    """A background store whose failure is logged when it happens, before its future is done (a
    done-callback would log after the waiters had been woken)."""
    try:
        return int(store(*args))
    except Exception as exc:
        log.error("background store into kvtier failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        raise


def _as_ids(input_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    ids = torch.as_tensor(input_ids).detach().to("cpu", torch.int64)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1 or ids.numel() == 0:
        raise IntegrationError(f"expected one non-empty sequence of token ids (batch size 1), got {tuple(ids.shape)}")
    return ids
