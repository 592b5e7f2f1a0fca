"""The one request stream every workload source produces and every replay mode consumes.

A ``Request`` is one LLM call of a session: when it arrives, which prefix blocks its input is
made of, how many new input tokens and output tokens it has.  Blocks are named by integer
``hash_ids`` inside a ``scope``; the prefix semantics are those of an engine's prefix cache:

    block_key[-1] = xxh3_64(scope)
    block_key[i]  = xxh3_64(block_key[i-1] || hash_ids[i])

so two requests share the KV of their first k blocks exactly when they have the same scope and
the same first k ids.  Mooncake ids are prefix hashes already (chaining changes nothing);
kv-cache-tester ids are per-conversation block ids (chaining turns them into prefix keys).

The last block may be partial: ``input_tokens`` says how many tokens there really are, and only
``input_tokens // block_tokens`` blocks are full (a partial block is never cached).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import xxhash


@dataclass(frozen=True, slots=True)
class Request:
    """One LLM call of a session."""

    time_s: float  # arrival, seconds since the stream started
    session: str  # the conversation it belongs to (a sub-agent is a session of its own)
    scope: str  # namespace of hash_ids: equal (scope, id-prefix) = equal tokens
    hash_ids: tuple[int, ...]  # input blocks in order; the last may be partial
    block_tokens: int  # tokens per block (Mooncake 512, kv-cache-tester 64)
    input_tokens: int
    output_tokens: int
    awaits: str | None = None  # its answer waits for a "tool" result or the "user"; None: not known
    answer_s: float | None = None  # seconds from its arrival to its answer's end; None: not known

    @property
    def num_full_blocks(self) -> int:
        return min(len(self.hash_ids), self.input_tokens // self.block_tokens)


def block_keys(request: Request) -> list[int]:
    """Chained 64-bit prefix keys of every block of ``request`` (full or not)."""
    prev = xxhash.xxh3_64_intdigest(request.scope.encode())
    out: list[int] = []
    digest = xxhash.xxh3_64_intdigest
    for block_id in request.hash_ids:
        prev = digest(prev.to_bytes(8, "little") + block_id.to_bytes(8, "little", signed=True))
        out.append(prev)
    return out


def merge(streams: Iterable[Sequence[Request]]) -> list[Request]:
    """Interleave streams by arrival time (stable: ties keep stream order)."""
    iters: list[Iterator[Request]] = [iter(s) for s in streams]
    return list(heapq.merge(*iters, key=lambda r: r.time_s))


def sort_by_time(requests: Iterable[Request]) -> list[Request]:
    return sorted(requests, key=lambda r: r.time_s)


@dataclass(frozen=True, slots=True)
class StreamSummary:
    """Shape of a request stream (what the report prints before any cache runs)."""

    num_requests: int
    num_sessions: int
    input_tokens: int
    output_tokens: int
    duration_s: float
    context_tokens: tuple[int, ...]  # input length of every request, in order


def summarize(requests: Sequence[Request]) -> StreamSummary:
    return StreamSummary(
        num_requests=len(requests),
        num_sessions=len({r.session for r in requests}),
        input_tokens=sum(r.input_tokens for r in requests),
        output_tokens=sum(r.output_tokens for r in requests),
        duration_s=(requests[-1].time_s - requests[0].time_s) if requests else 0.0,
        context_tokens=tuple(r.input_tokens for r in requests),
    )
