# -*- test-case-name: tests.test_node -*-
"""
The management node's configuration: one frozen tree, built once from defaults, an optional
TOML file and command-line options (in that order of precedence, last wins), then passed
down. There is no global configuration.

A config file looks like::

    [node]
    id = "mn-1"                 # default: a fresh uuid per start
    data_dir = "/var/lib/zcontrol"

    [store]
    url = "postgresql://postgres@127.0.0.1:5432/zcontrol"   # default: SQLite in data_dir
    pool_size = 4

    [bus]
    backend = "amqp"            # "local" (default) or "amqp"
    amqp_url = "amqp://guest:guest@127.0.0.1:5672/"
    message_timeout = 1800
    max_message_size = 8388608  # bytes (AMQP): keep below the broker's max_message_size

    [http]
    port = 8080
    interface = "127.0.0.1"
    backlog = 1024
    public_url = "http://10.0.0.5:8080"   # what agents call back; default from interface/port
"""

from __future__ import annotations

import os
import tomllib
import uuid
from typing import Any, Mapping

import attrs

__all__ = ["BusConfig", "Config", "ConfigError", "HttpConfig", "StoreConfig", "load_config"]


class ConfigError(ValueError):
    """
    A configuration value is missing, unknown or invalid; the message says which.
    """


@attrs.frozen
class StoreConfig:
    url: str
    pool_size: int | None = None


@attrs.frozen
class BusConfig:
    backend: str = "local"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    message_timeout: float = 1800.0
    heartbeat_interval: float = 5.0
    #: the largest encoded message body the AMQP bus publishes (bytes); 8 MiB stays below
    #: RabbitMQ's default max_message_size (3.x: 128 MiB, 4.x: 16 MiB)
    max_message_size: int = 8 * 1024 * 1024

    def __attrs_post_init__(self) -> None:
        if self.backend not in ("local", "amqp"):
            raise ConfigError(f"bus.backend must be 'local' or 'amqp', not {self.backend!r}")
        if self.message_timeout <= 0:
            raise ConfigError("bus.message_timeout must be positive")
        if self.max_message_size < 1024:
            raise ConfigError("bus.max_message_size must be at least 1024 bytes")


@attrs.frozen
class HttpConfig:
    port: int = 8080
    interface: str = "127.0.0.1"
    backlog: int = 1024
    public_url: str | None = None

    def callback_base(self, actual_port: int) -> str:
        """
        The base URL agents call back, given the port actually listened on.
        """
        if self.public_url:
            return self.public_url.rstrip("/")
        host = self.interface if self.interface not in ("", "0.0.0.0", "::") else "127.0.0.1"
        return f"http://{host}:{actual_port}"


@attrs.frozen
class Config:
    node_id: str
    data_dir: str
    store: StoreConfig
    bus: BusConfig = attrs.field(factory=BusConfig)
    http: HttpConfig = attrs.field(factory=HttpConfig)


_SECTIONS: dict[str, dict[str, type]] = {
    "node": {"id": str, "data_dir": str},
    "store": {"url": str, "pool_size": int},
    "bus": {"backend": str, "amqp_url": str, "message_timeout": float,
            "heartbeat_interval": float, "max_message_size": int},
    "http": {"port": int, "interface": str, "backlog": int, "public_url": str},
}


def _coerce(section: str, key: str, value: Any) -> Any:
    kinds = _SECTIONS.get(section)
    if kinds is None:
        raise ConfigError(f"unknown config section [{section}]")
    kind = kinds.get(key)
    if kind is None:
        raise ConfigError(f"unknown config key {section}.{key}")
    try:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, str):
            return int(value)
        if kind is float and isinstance(value, str):
            return float(value)
    except ValueError:
        raise ConfigError(f"{section}.{key} must be a {kind.__name__}: {value!r}") from None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{section}.{key} must be a {kind.__name__}: {value!r}")
    return value


def load_config(path: str | None = None,
                overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Config:
    """
    Build the configuration: defaults, then the TOML file at C{path} (if any), then
    C{overrides} (C{{"section": {"key": value}}}, None values ignored).

    @raise ConfigError: an unreadable file, an unknown key or an invalid value.
    """
    values: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    if path:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        for section, items in doc.items():
            if not isinstance(items, dict):
                raise ConfigError(f"config entry {section!r} must be a [section]")
            for key, value in items.items():
                values.setdefault(section, {})[key] = _coerce(section, key, value)
    for section, items in (overrides or {}).items():
        for key, value in items.items():
            if value is not None:
                values.setdefault(section, {})[key] = _coerce(section, key, value)

    node = values["node"]
    data_dir = os.path.abspath(node.get("data_dir", "var"))
    store = values["store"]
    url = store.get("url") or f"sqlite:///{os.path.join(data_dir, 'zcontrol.db')}"
    try:
        return Config(
            node_id=node.get("id") or uuid.uuid4().hex,
            data_dir=data_dir,
            store=StoreConfig(url=url, pool_size=store.get("pool_size")),
            bus=BusConfig(**values["bus"]),
            http=HttpConfig(**values["http"]),
        )
    except TypeError as e:
        raise ConfigError(str(e)) from None
