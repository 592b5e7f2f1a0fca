"""Loading the config: file (TOML or YAML) and environment -> ``KVTierConfig``.

Sources, later wins: defaults < file < ``overrides`` < environment.  Environment overrides name a
field by its path, upper-cased, ``__`` between levels::

    KVTIER_CHUNK_TOKENS=512
    KVTIER_DRAM__CAPACITY=8GiB
    KVTIER_TIERS=dram,disk,redis
    KVTIER_CONFIG=/etc/kvtier.toml      (the file to read, if no path is passed)

Values are converted to the field's type (``from_dict``): sizes accept integers or strings with
units (``512MiB``, ``2GiB``, ``1.5GB``; whole bytes only).  Unknown keys are errors, never
silently ignored.  A bad value is a ``ConfigFieldError`` naming the field as the user wrote it --
``KVTIER_DRAM__CAPACITY: cannot read 'banana' as a size``, ``/etc/kvtier.toml: disk.io_threads:
must be at least 1, got 0``.  YAML files need PyYAML (the ``yaml`` extra); TOML needs nothing.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
import tomllib
import types
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from kvtier.config.schema import KVTierConfig
from kvtier.config_checks import ByteSize, size_problem
from kvtier.errors import ConfigError, ConfigFieldError

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
          "g": 10**9, "gb": 10**9, "gib": 1 << 30, "t": 10**12, "tb": 10**12, "tib": 1 << 40}


def parse_size(value: object, where: str = "size") -> int:
    """Bytes from ``42``, ``"512MiB"``, ``"1.5GB"``; ``where`` names the field in the error."""
    if isinstance(value, bool):
        raise ConfigFieldError(where, f"expected a size, got {value!r}")
    if isinstance(value, numbers.Integral):
        n = int(value)
    else:
        text = repr(value) if isinstance(value, float) else value
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text) if isinstance(text, str) else None
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigFieldError(where, f"cannot read {value!r} as a size (examples: 1048576, 512MiB, 2GiB)")
        exact = Decimal(m.group(1)) * _UNITS[m.group(2).lower()]
        if exact != exact.to_integral_value():
            raise ConfigFieldError(where, f"{value!r} is not a whole number of bytes")
        n = int(exact)
    if (problem := size_problem(n)) is not None:
        raise ConfigFieldError(where, f"{problem}, got {value!r}")
    return n


Labels = Mapping[str, str]  # a field's dotted path -> how errors name it (an env variable, the file)


def from_dict(cls: type[Any], data: Mapping[str, Any], where: str = "", labels: Labels | None = None) -> Any:
    """Build dataclass ``cls`` from a mapping, converting and checking every field.

    ``where`` is the mapping's dotted path (``"redis"``); errors name a field by ``labels[path]``
    where given (``KVTIER_REDIS__URL``), else by its path.
    """
    labels = labels or {}
    if not isinstance(data, Mapping):
        raise ConfigFieldError(labels.get(where, where or cls.__name__),
                               f"expected a table, got {type(data).__name__} {data!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=repr)
    if unknown:
        message = f"unknown config key(s) {unknown} in {where or cls.__name__}; known: {sorted(names)}"
        path = _join(where, str(unknown[0]))
        raise ConfigFieldError(labels[path], message) if path in labels else ConfigError(message)
    kwargs = {name: _convert(hints[name], value, _join(where, name), labels) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigFieldError as exc:  # the class named its own field: name it by path or env variable
        owner, _, name = exc.field.partition(".")
        if owner != cls.__name__ or name not in names:
            raise
        path = _join(where, name)
        raise ConfigFieldError(labels.get(path, path), exc.problem) from None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _convert(tp: Any, value: Any, where: str, labels: Labels) -> Any:
    """``value`` as read from a file or the environment (strings) -> the field's type."""
    label = labels.get(where, where)
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null", "") and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, where, labels)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # type: ignore[arg-type]
            return value
        return from_dict(tp, value, where, labels)  # type: ignore[arg-type]
    if origin is Literal:
        if not isinstance(value, str) or value not in get_args(tp):
            raise ConfigFieldError(label, f"{value!r} is not one of {list(get_args(tp))}")
        return value
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigFieldError(label, f"expected a list, got {value!r}")
        return tuple(_convert(get_args(tp)[0], item.strip() if isinstance(item, str) else item, where, labels)
                     for item in items)
    if tp is ByteSize:
        return ByteSize(parse_size(value, label))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigFieldError(label, f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool | float) or not isinstance(value, int | str):
            raise ConfigFieldError(label, f"expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigFieldError(label, f"expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigFieldError(label, f"expected a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigFieldError(label, f"expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigFieldError(label, f"expected a finite number, got {value!r}")
        return number
    if tp is Path:
        if not isinstance(value, str) or not value.strip():
            raise ConfigFieldError(label, f"expected a path, got {value!r}")
        return Path(os.path.expanduser(value))
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigFieldError(label, f"expected a string, got {type(value).__name__}")
        return str(value)
    raise ConfigFieldError(label, f"unsupported config type {tp}")


def _env_overrides(env: Mapping[str, str], prefix: str = "KVTIER_") -> tuple[dict[str, Any], dict[str, str]]:
    """``KVTIER_DRAM__CAPACITY=8GiB`` -> ``{"dram": {"capacity": "8GiB"}}``, and each path's variable."""
    out: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for name, value in sorted(env.items()):
        if not name.startswith(prefix) or name == prefix + "CONFIG":
            continue
        path = name[len(prefix):].lower().split("__")
        node = out
        for depth, part in enumerate(path[:-1]):
            labels.setdefault(".".join(path[:depth + 1]), name)
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigFieldError(name, f"{part} is not a section")
        node[path[-1]] = value
        labels[".".join(path)] = name
    return out, labels


def _file_labels(data: Mapping[str, Any], file: str, where: str = "") -> dict[str, str]:
    labels: dict[str, str] = {}
    for key, value in data.items():
        path = _join(where, str(key))
        labels[path] = f"{file}: {path}"
        if isinstance(value, Mapping):
            labels.update(_file_labels(value, file, path))
    return labels


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(merged.get(k), Mapping):
            merged[k] = _merge(dict(merged[k]), v)
        else:
            merged[k] = v
    return merged


def read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"config file {p} must end in .toml, .yaml or .yml")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {p} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None
    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(text)
        else:
            try:
                import yaml
            except ModuleNotFoundError:
                raise ConfigError(f"{p}: YAML config files need PyYAML: pip install 'kvtier[yaml]' "
                                  "(or write the config as TOML)") from None
            data = yaml.safe_load(text) or {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    except ConfigError:
        raise
    except Exception as exc:  # yaml.YAMLError without importing yaml at module level
        raise ConfigError(f"{p}: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a table/mapping, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> KVTierConfig:
    """Defaults < file < ``overrides`` < environment.

    A bad value is a ``ConfigFieldError`` naming where it came from: ``KVTIER_DRAM__CAPACITY:
    cannot read 'banana' as a size``, ``kvtier.toml: disk.io_threads: must be at least 1, got 0``.
    """
    env = os.environ if env is None else env
    if not isinstance(overrides, Mapping | None):
        raise ConfigError(f"overrides must be a mapping of config keys, got {type(overrides).__name__}")
    path = path or env.get("KVTIER_CONFIG")
    if path is not None and not isinstance(path, str | os.PathLike):
        raise ConfigError(f"the config file must be a path, got {path!r}")
    data: dict[str, Any] = read_file(path) if path else {}
    labels = _file_labels(data, str(path)) if path else {}
    data = _merge(data, overrides or {})
    for key in _file_labels(overrides or {}, ""):  # an override replaces the file's value
        labels.pop(key, None)
    env_data, env_labels = _env_overrides(env)
    data = _merge(data, env_data)
    labels.update(env_labels)
    config: KVTierConfig = from_dict(KVTierConfig, data, labels=labels)
    return config
