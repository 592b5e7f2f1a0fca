"""The connector's configuration: ``kv_connector_extra_config`` -> typed, validated config.

One place maps vLLM's untyped ``kv_connector_extra_config`` dict onto kvtier's typed config:

* connector-only keys (``ConnectorOptions`` below: ``stats_file``, ``log_interval_s``,
  ``model_id``, ``on_load_error``, ``async_loads``, ``probe_deadline_s``, ``cost_model``,
  ``tool_call_tokens``, ``kv_events``, ...) are
  taken out first;
* every other key is a ``KVTierConfig`` field (``chunk_tokens``, ``tiers``, ``dram``, ``disk``,
  ``redis``, ...), applied over kvtier's usual sources (defaults < ``KVTIER_CONFIG`` file <
  these keys < ``KVTIER_*`` environment) by ``kvtier.config.load_config``.

Unknown keys, wrong types and a chunk size that is not a multiple of vLLM's block size are a
``ConfigError`` raised when the connector is built, so vLLM fails at start-up with the message.
No vLLM import here: this module is unit-tested without an engine.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kvtier.config.loader import from_dict, load_config
from kvtier.config.schema import KVTierConfig
from kvtier.config_checks import ByteSize
from kvtier.errors import ConfigError, ConfigFieldError
from kvtier.layout import KVLayout
from kvtier.policy.cost import CostModel


@dataclass(frozen=True, kw_only=True)
class LinkRates:
    """Bytes per second from a tier into vLLM's blocks, end to end; set: never measured nor refined."""

    dram: ByteSize | None = None
    disk: ByteSize | None = None
    redis: ByteSize | None = None
    mooncake: ByteSize | None = None

    def fixed(self) -> dict[str, float]:
        return {f.name: float(v) for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}


@dataclass(frozen=True, kw_only=True)
class ConnectorOptions:
    """Keys of ``kv_connector_extra_config`` that belong to the connector, not to kvtier's core."""

    stats_file: Path | None = None  # worker rewrites this JSON (cumulative kvtier stats) after each step
    log_interval_s: float = 10.0  # one-line stats summary at most this often (0 = never)
    model_id: str | None = None  # names the weights in chunk keys; default: vLLM's model path/name
    on_load_error: Literal["recompute", "fail"] = "recompute"  # sets vLLM's kv_load_failure_policy
    async_loads: Literal["auto", "always", "never"] = "auto"  # auto: hits below DRAM load off the step
    probe_deadline_s: float = 0.02  # longest a scheduler lookup waits for a Redis/Mooncake probe
    layerwise_loads: bool = False  # CUDA: each attention layer waits only for its own layer of a DRAM hit
    # fetch or recompute (``kvtier.integrations.vllm_cost``): "auto" calibrates at start-up and
    # learns online; "off" loads every chunk kvtier holds; else a CostModel JSON (one link per tier)
    cost_model: str = "auto"
    link_rates: LinkRates = dataclasses.field(default_factory=lambda: LinkRates())  # fixed links for "auto"
    # token ids that start a tool call in the model's output (Hermes' <tool_call>, Llama 3.1's
    # <|python_tag|>, ...): an answer that holds one waits for a tool, one that stopped without
    # one waits for the user (``ContextMemory.hint_end``); empty: the policy is not told
    tool_call_tokens: tuple[int, ...] = ()
    # KV events for routers (``kvtier.integrations.vllm_events``), when vLLM's kv_events_config enables them
    kv_events: bool = True
    kv_events_max_chunks: int = 1 << 15  # chunks whose vLLM block hashes are kept (oldest dropped first)

    def __post_init__(self) -> None:
        if self.stats_file is not None and (problem := writable_file(Path(self.stats_file))) is not None:
            raise ConfigFieldError("ConnectorOptions.stats_file", problem)
        if self.log_interval_s < 0:
            raise ConfigError("log_interval_s must be >= 0")
        if self.probe_deadline_s < 0:
            raise ConfigError("probe_deadline_s must be >= 0")
        if not self.cost_model.strip():
            raise ConfigError('cost_model must be "auto", "off" or the path of a CostModel JSON')
        if self.kv_events_max_chunks < 1:
            raise ConfigError("kv_events_max_chunks must be >= 1")
        if any(v <= 0 for v in self.link_rates.fixed().values()):
            raise ConfigError("link_rates: every rate must be > 0 (bytes per second)")


def writable_file(path: Path) -> str | None:
    """Why a file cannot be (re)written atomically at ``path`` (a temp file beside it, then a
    rename), or None: checked by writing one, since root passes every ``os.access`` test."""
    if path.is_dir():
        return f"{str(path)!r} is a directory"
    parent = path.parent
    if not parent.is_dir():
        return f"cannot write {str(path)!r}: directory {str(parent)!r} does not exist"
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.", suffix=".check"):
            pass
    except OSError as exc:
        return f"cannot write in {str(parent)!r}: {exc.strerror or exc}"
    return None


CONNECTOR_KEYS = frozenset(f.name for f in dataclasses.fields(ConnectorOptions))


def parse_extra_config(extra: Mapping[str, Any] | None, *,
                       env: Mapping[str, str] | None = None) -> tuple[KVTierConfig, ConnectorOptions]:
    """Split and validate ``kv_connector_extra_config``; raises ConfigError naming the bad key."""
    extra = dict(extra or {})
    options_data = {k: extra.pop(k) for k in list(extra) if k in CONNECTOR_KEYS}
    options: ConnectorOptions = from_dict(ConnectorOptions, options_data, "kv_connector_extra_config")
    try:
        config = load_config(overrides=extra, env=env)
    except ConfigError as exc:
        raise ConfigError(f"kv_connector_extra_config: {exc} (connector keys: {sorted(CONNECTOR_KEYS)})") from exc
    return config, options


def load_cost_model(options: ConnectorOptions, tiers: list[str]) -> CostModel | None:
    """The connector's ``cost_model`` file, checked against the tiers; ConfigError naming it.

    None for ``"auto"`` (``kvtier.integrations.vllm_cost`` builds one) and ``"off"``."""
    if options.cost_model in ("auto", "off"):
        return None
    path = Path(options.cost_model).expanduser()
    try:
        cost = CostModel.load(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"kv_connector_extra_config.cost_model={str(options.cost_model)!r}: {exc}") from exc
    if len(cost.links) < len(tiers):
        raise ConfigError(f"kv_connector_extra_config.cost_model has {len(cost.links)} link(s) for the tiers "
                          f"{tiers}: one link per tier, top first")
    return cost


@dataclass(frozen=True, slots=True)
class PagedGeometry:
    """How vLLM pages the KV cache of one worker, as far as the connector cares."""

    num_layers: int
    num_kv_heads: int  # heads on this worker (after tensor parallelism)
    head_dim: int
    dtype: str  # torch dtype name
    block_size: int  # tokens per vLLM block
    parts: int = 2  # 2: K and V; 1: one MLA latent per token


def make_layout(geometry: PagedGeometry, *, chunk_tokens: int, model_id: str) -> KVLayout:
    """The kvtier layout of a vLLM worker's KV cache; chunks must be whole vLLM blocks."""
    if chunk_tokens % geometry.block_size:
        raise ConfigError(f"chunk_tokens={chunk_tokens} must be a multiple of vLLM's block_size="
                          f"{geometry.block_size} (a chunk is copied as whole blocks); "
                          f"try chunk_tokens={max(1, chunk_tokens // geometry.block_size) * geometry.block_size}")
    return KVLayout(model=model_id, num_layers=geometry.num_layers, num_kv_heads=geometry.num_kv_heads,
                    head_dim=geometry.head_dim, dtype=geometry.dtype, tokens_per_chunk=chunk_tokens,
                    num_kv_parts=geometry.parts)
