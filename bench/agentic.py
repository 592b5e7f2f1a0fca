"""Synthetic agentic traffic: N concurrent agent sessions through the hierarchy or an engine.

    kvtier bench agentic --sessions 64 --turns 50 --dram 5%,10%,25% --disk 50%
    kvtier bench agentic --sessions 8 --mode live --endpoint http://127.0.0.1:8000 --time-scale 0.1

The workload (``bench.sim.workloads.synthetic``) is seeded: the same flags give the same
requests.  Replay options and output are those of ``kvtier bench trace``.
"""

from __future__ import annotations

import argparse

from bench.sim.workloads.synthetic import AgentWorkload, generate
from bench.trace import add_replay_arguments, replay


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = AgentWorkload()
    g = parser.add_argument_group("workload")
    g.add_argument("--sessions", type=int, default=d.sessions, help="concurrent agent sessions")
    g.add_argument("--turns", type=int, default=d.turns, help="top-level calls per session")
    g.add_argument("--system-tokens", type=int, default=d.system_tokens, help="shared system+tools prompt")
    g.add_argument("--task-tokens", type=float, default=d.task_tokens, help="mean first user message")
    g.add_argument("--tool-tokens", type=float, default=d.tool_result_tokens, help="mean tool result per turn")
    g.add_argument("--output-tokens", type=float, default=d.output_tokens, help="mean model output per call")
    g.add_argument("--size-sigma", type=float, default=d.size_sigma, help="lognormal shape of sizes")
    g.add_argument("--gap", type=float, default=d.gap_mean_s, help="mean seconds between a session's calls")
    g.add_argument("--human-prob", type=float, default=d.human_prob, help="fraction of gaps that are think time")
    g.add_argument("--human-mean", type=float, default=d.human_mean_s, help="mean think time, s (Pareto)")
    g.add_argument("--context-cap", type=int, default=d.context_cap, help="compact contexts past this")
    g.add_argument("--subagent-prob", type=float, default=d.subagent_prob, help="chance a turn forks sub-agents")
    g.add_argument("--subagent-turns", type=int, default=d.subagent_turns)
    g.add_argument("--start-spread", type=float, default=d.start_spread_s, help="sessions start within this, s")
    g.add_argument("--block-tokens", type=int, default=d.block_tokens)
    g.add_argument("--seed", type=int, default=d.seed)
    add_replay_arguments(parser)


def workload_from_args(args: argparse.Namespace) -> AgentWorkload:
    return AgentWorkload(
        sessions=args.sessions, turns=args.turns, system_tokens=args.system_tokens, task_tokens=args.task_tokens,
        tool_result_tokens=args.tool_tokens, output_tokens=args.output_tokens, size_sigma=args.size_sigma,
        gap_mean_s=args.gap, human_prob=args.human_prob, human_mean_s=args.human_mean,
        context_cap=args.context_cap, subagent_prob=args.subagent_prob, subagent_turns=args.subagent_turns,
        start_spread_s=args.start_spread, block_tokens=args.block_tokens, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    w = workload_from_args(args)
    return replay(generate(w), args, title=f"agentic x{w.sessions} (seed {w.seed})")
