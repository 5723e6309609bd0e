# -*- test-case-name: tests.test_services_base -*-
"""
Field checks for service messages: each returns the (normalised) value or raises
C{SYS.1007} (L{SYS.INVALID_ARGUMENT_ERROR}) whose details name the field (C{field}) and the
value given (C{value}), as ZStack's API interceptors answer C{SYS.1007}. Units as ZStack's:
sizes in bytes, CPU speed in MHz.
"""

from __future__ import annotations

import ipaddress
import math
from typing import Any, Iterable
from urllib.parse import urlsplit

from zcontrol.core.errors import SYS, OperationError

__all__ = [
    "cidr",
    "common_changes",
    "has_control",
    "integer",
    "invalid",
    "ipv4",
    "name",
    "netmask",
    "one_of",
    "optional_text",
    "seconds",
    "size",
    "url",
    "uuid",
    "uuids",
    "vlan",
]

MAX_SIZE = 2**63 - 1


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def invalid(field: str, value: Any, why: str) -> OperationError:
    """
    The C{SYS.1007} error for C{field}: "<field> <why>".
    """
    shown = value if isinstance(value, (str, int, float, bool, type(None))) else _short(value)
    if isinstance(shown, str) and len(shown) > 256:
        shown = shown[:253] + "..."
    return OperationError.of(SYS.INVALID_ARGUMENT_ERROR, f"{field} {why}, not {_short(value)}",
                             field=field, value=shown)


def _text(field: str, value: Any, max_length: int) -> str:
    if not isinstance(value, str):
        raise invalid(field, value, "must be a string")
    if len(value) > max_length:
        raise invalid(field, value, f"must be at most {max_length} characters")
    if has_control(value):
        raise invalid(field, value, "must not contain control characters")
    return value


def has_control(text: str) -> bool:
    """
    Whether C{text} holds a C0 or C1 control character (tab and newline too) or a lone
    surrogate: a superset of what the store refuses (L{zcontrol.db.query.check_text}), so
    that a field checked here never meets the store's own check, which names its column.
    """
    return any(ord(c) < 32 or 127 <= ord(c) <= 159 or 0xD800 <= ord(c) <= 0xDFFF
               for c in text)


def name(value: Any, field: str = "name", max_length: int = 255) -> str:
    """
    A resource name: a non-blank string of at most C{max_length} characters.
    """
    text = _text(field, value, max_length)
    if not text.strip():
        raise invalid(field, value, "must not be empty")
    return text


def optional_text(value: Any, field: str, max_length: int = 2048) -> str | None:
    """
    None, or a string of at most C{max_length} characters (a description).
    """
    if value is None:
        return None
    return _text(field, value, max_length)


def uuid(value: Any, field: str) -> str:
    """
    A resource uuid: a non-empty string of at most 64 characters without white space.
    """
    text = _text(field, value, 64)
    if not text or any(c.isspace() for c in text):
        raise invalid(field, value, "must be a uuid")
    return text


def uuids(value: Any, field: str, allow_empty: bool = False) -> list[str]:
    """
    A list of distinct uuids (order kept).
    """
    if not isinstance(value, (list, tuple)):
        raise invalid(field, value, "must be a list of uuids")
    if not value and not allow_empty:
        raise invalid(field, value, "must name at least one uuid")
    out: list[str] = []
    for i, item in enumerate(value):
        u = uuid(item, f"{field}[{i}]")
        if u in out:
            raise invalid(field, value, f"names {u} twice")
        out.append(u)
    return out


def integer(value: Any, field: str, minimum: int | None = None,
            maximum: int | None = None) -> int:
    """
    An integer (not a bool) within [C{minimum}, C{maximum}].
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(field, value, "must be an integer")
    if minimum is not None and value < minimum:
        raise invalid(field, value, f"must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise invalid(field, value, f"must be at most {maximum}")
    return value


def seconds(value: Any, field: str, maximum: float = 86400.0) -> float:
    """
    A duration in seconds: a finite number (an integer or a float, not a bool) greater
    than 0 and at most C{maximum}.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(field, value, "must be a number of seconds")
    if not math.isfinite(value) or value <= 0 or value > maximum:
        raise invalid(field, value, f"must be more than 0 and at most {maximum:g} seconds")
    return float(value)


def size(value: Any, field: str, minimum: int = 1) -> int:
    """
    A size in bytes: an integer from C{minimum} to 2**63-1.
    """
    return integer(value, field, minimum, MAX_SIZE)


def one_of(value: Any, field: str, choices: Iterable[str]) -> str:
    """
    One of C{choices} (compared exactly, as ZStack's enums).
    """
    allowed = list(choices)
    if value not in allowed:
        raise invalid(field, value, f"must be one of {', '.join(allowed)}")
    return value


def ipv4(value: Any, field: str) -> str:
    """
    A dotted IPv4 address, normalised (C{"010.0.0.1"} is refused, as C{ipaddress} does).
    """
    text = _text(field, value, 64)
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise invalid(field, value, "must be an IPv4 address") from None


def netmask(value: Any, field: str = "netmask") -> str:
    """
    A contiguous IPv4 netmask (C{255.255.255.0}), normalised. A host mask
    (C{0.0.0.255}), which C{ipaddress} would take for a prefix, is refused.
    """
    text = ipv4(value, field)
    try:
        network = ipaddress.IPv4Network(f"0.0.0.0/{text}")
    except ValueError:
        raise invalid(field, value, "must be a contiguous netmask") from None
    if text == "0.0.0.0" or str(network.netmask) != text:
        raise invalid(field, value, "must be a contiguous netmask")
    return text


def cidr(value: Any, field: str = "networkCidr") -> ipaddress.IPv4Network:
    """
    An IPv4 network in CIDR form with no host bits set (C{192.168.0.0/24}): a bare
    address or a netmask suffix (which C{ipaddress} would take) is refused.
    """
    text = _text(field, value, 64)
    _, slash, prefix = text.partition("/")
    if not slash or not prefix.isdigit() or not prefix.isascii() or len(prefix) > 2:
        raise invalid(field, value, "must be an IPv4 CIDR (address/prefix length)")
    try:
        return ipaddress.IPv4Network(text, strict=True)
    except ValueError as e:
        raise invalid(field, value, f"must be an IPv4 CIDR ({e})") from None


def vlan(value: Any, field: str = "vlan") -> int:
    """
    A VLAN id, 1 to 4094 (IEEE 802.1Q; 0 and 4095 are reserved).
    """
    return integer(value, field, 1, 4094)


def url(value: Any, field: str = "url", schemes: Iterable[str] = ("http", "https"),
        max_length: int = 2048) -> str:
    """
    A URL with one of C{schemes} and a host (C{file} URLs need a path instead).
    """
    text = _text(field, value, max_length)
    allowed = tuple(schemes)
    try:
        parts = urlsplit(text)
    except ValueError:
        raise invalid(field, value, "must be a URL") from None
    if parts.scheme not in allowed:
        raise invalid(field, value, f"must be a URL of scheme {', '.join(allowed)}")
    try:
        parts.port  # noqa: B018 (urlsplit checks the port only when it is read)
    except ValueError:
        raise invalid(field, value, "must have a valid port") from None
    if parts.scheme == "file" and not parts.path:
        raise invalid(field, value, "must name a path")
    if parts.scheme != "file" and not parts.hostname:
        raise invalid(field, value, "must name a host")
    if any(c.isspace() for c in text):
        raise invalid(field, value, "must not contain white space")
    return text


def common_changes(msg: Any) -> dict[str, Any]:
    """
    The C{name} and C{description} changes an C{Update*Msg} asks for (each field left None
    does not change), checked as L{name} and L{optional_text}: the start of every update's
    C{changes} (camelCase store fields).
    """
    changes: dict[str, Any] = {}
    if msg.name is not None:
        changes["name"] = name(msg.name)
    if msg.description is not None:
        changes["description"] = optional_text(msg.description, "description")
    return changes
