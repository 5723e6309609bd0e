# -*- test-case-name: tests.test_bus_message -*-
"""
The message model of the bus (ZStack's CloudBus messages), and its JSON codec.

Messages, replies and events are attrs classes registered by type name in a L{Registry}. On
the wire a message is C{{"<TypeName>": {field: value, ...}}} (ZStack puts the class name
there too). Times are seconds (floats) on the bus's clock; C{deadline} is absolute.

Kinds:
 - L{Message}: fire-and-forget (C{bus.post}).
 - L{NeedReplyMessage}: request/reply (C{bus.send}); the receiver replies exactly once; its
   class names its reply type in C{reply_type}.
 - L{Reply}: C{success}, C{error} (an ErrorCode), C{correlation_id} = the request's C{id}.
 - L{Event}: published to every subscriber on every node; C{topic} is a dotted name that
   subscriptions match with AMQP-style wildcards (C{*} one word, C{#} any number of words).

Decoding is strict: an unknown type name is C{SYS.1008}; a missing required field or a value
of the wrong type is C{SYS.1007}. Both arrive as a L{DecodeError} (an L{OperationError}), never
as a stray exception. Unknown extra fields are ignored, so that nodes of neighbouring versions
can talk (the way ZStack's JSON decoding treats them).
"""

from __future__ import annotations

import json
import types
import typing
import uuid
from typing import Any, Callable, ClassVar, Mapping, TypeVar, Union

import attrs

from zcontrol.core.errors import SYS, ErrorCode, OperationError, error_code

__all__ = [
    "DecodeError",
    "Event",
    "Message",
    "NeedReplyMessage",
    "Registry",
    "Reply",
    "new_id",
    "registry",
]

M = TypeVar("M", bound=type)


def new_id() -> str:
    """
    A fresh message id: uuid4 hex without dashes, as ZStack.
    """
    return uuid.uuid4().hex


@attrs.define(kw_only=True)
class Message:
    """
    A fire-and-forget message to a service.

    @ivar service_id: the logical service (C{"host"}, C{"vm"}); the bus routes it to the node
        that owns C{resource_uuid}, or to the local node when there is none.
    @ivar resource_uuid: the resource whose owner node must handle the message, or None.
    """

    type_name: ClassVar[str] = "Message"

    id: str = attrs.field(factory=new_id)
    service_id: str = ""
    resource_uuid: str | None = None
    created_at: float = 0.0
    trace_id: str | None = None
    headers: dict[str, Any] = attrs.field(factory=dict)

    def describe(self) -> str:
        """
        C{Message[name: X, id: Y]}, as in ZStack's timeout details.
        """
        return f"Message[name: {self.type_name}, id: {self.id}]"


@attrs.define(kw_only=True)
class Reply:
    """
    The answer to a L{NeedReplyMessage}. An error reply has C{success=False} and C{error}.
    """

    type_name: ClassVar[str] = "Reply"

    correlation_id: str = ""
    success: bool = True
    error: ErrorCode | None = None

    @classmethod
    def failure(cls, error: ErrorCode, correlation_id: str = "") -> Reply:
        """
        An error reply. Error replies are always of the base L{Reply} type: a caller checks
        C{success} before reading a typed reply's payload.
        """
        return Reply(correlation_id=correlation_id, success=False, error=error)


@attrs.define(kw_only=True)
class NeedReplyMessage(Message):
    """
    A request. C{timeout} (seconds) bounds the wait; the bus sets C{deadline}, the absolute
    time after which the sender has given up (deadline propagation: a message sent while
    handling this one gets at most the time left).
    """

    type_name: ClassVar[str] = "NeedReplyMessage"
    reply_type: ClassVar[type[Reply]] = Reply

    timeout: float | None = None
    deadline: float | None = None
    reply_to: str | None = None


@attrs.define(kw_only=True)
class Event:
    """
    An event, published to every subscriber of a matching topic on every node.
    """

    type_name: ClassVar[str] = "Event"
    topic: ClassVar[str] = "event"

    id: str = attrs.field(factory=new_id)
    created_at: float = 0.0
    node_id: str | None = None


class DecodeError(OperationError):
    """
    A message could not be decoded: C{error.code} is C{SYS.1008} (unknown type) or
    C{SYS.1007} (bad field). C{message_id} and C{reply_to} are filled in when the envelope
    was readable, so that the receiver can still answer.
    """

    def __init__(self, error: ErrorCode, message_id: str | None = None):
        super().__init__(error)
        self.message_id = message_id


_NONE_TYPE = type(None)
_JSON = json.JSONEncoder(separators=(",", ":"))
_SCALARS = (str, int, float, bool)

Converter = Callable[[Any, str], Any]

# Note [compiled codec]: the codec is on the hot path of every bus message (over AMQP it was
# half of the bus's CPU when each value was checked by walking its annotation). Each field
# annotation is compiled once into a converter closure, and each class into a builder that
# runs its fields' converters; encoding knows per class which fields are plain scalars.

_CONVERTERS: dict[Any, Converter] = {}
_BUILDERS: dict[type, Callable[[Mapping[str, Any], str], Any]] = {}
_ENCODERS: dict[type, tuple[tuple[str, ...], tuple[str, ...]]] = {}


def _converter(tp: Any) -> Converter:
    conv = _CONVERTERS.get(tp)
    if conv is None:
        conv = _CONVERTERS[tp] = _make_converter(tp)
    return conv


def _any(value: Any, path: str) -> Any:
    return value


def _str(value: Any, path: str) -> Any:
    if type(value) is str or isinstance(value, str):
        return value
    raise ValueError(f"{path} must be a str")


def _bool(value: Any, path: str) -> Any:
    if value is True or value is False:
        return value
    raise ValueError(f"{path} must be a bool")


def _int(value: Any, path: str) -> Any:
    if type(value) is int or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ValueError(f"{path} must be an integer")


def _float(value: Any, path: str) -> Any:
    if type(value) is float:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{path} must be a number")
    return float(value)


def _error_code(value: Any, path: str) -> Any:
    try:
        return ErrorCode.from_dict(value)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _make_converter(tp: Any) -> Converter:
    if tp is Any:
        return _any
    if tp is str:
        return _str
    if tp is bool:
        return _bool
    if tp is int:
        return _int
    if tp is float:
        return _float
    if tp is ErrorCode:
        return _error_code
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        optional = _NONE_TYPE in args
        convs = [_converter(a) for a in args if a is not _NONE_TYPE]

        def union(value: Any, path: str) -> Any:
            if value is None:
                if optional:
                    return None
                raise ValueError(f"{path} must not be null")
            errors = []
            for conv in convs:
                try:
                    return conv(value, path)
                except ValueError as e:
                    errors.append(str(e))
            raise ValueError("; ".join(errors))

        return union
    if isinstance(tp, type) and attrs.has(tp):
        build = _builder(tp)

        def nested(value: Any, path: str) -> Any:
            if not isinstance(value, Mapping):
                raise ValueError(f"{path} must be an object")
            return build(value, path)

        return nested
    if origin is list or tp is list:
        item = _converter(args[0]) if args else _any

        def list_(value: Any, path: str) -> Any:
            if not isinstance(value, list):
                raise ValueError(f"{path} must be a list")
            if item is _any:
                return value
            return [item(v, f"{path}[{i}]") for i, v in enumerate(value)]

        return list_
    if origin is dict or tp is dict:
        item = _converter(args[1]) if args else _any

        def dict_(value: Any, path: str) -> Any:
            if not isinstance(value, dict):
                raise ValueError(f"{path} must be an object")
            if item is _any:
                return value
            return {k: item(v, f"{path}.{k}") for k, v in value.items()}

        return dict_

    def unsupported(value: Any, path: str) -> Any:
        raise ValueError(f"{path}: unsupported field type {tp!r}")

    return unsupported


def _builder(cls: type) -> Callable[[Mapping[str, Any], str], Any]:
    build = _BUILDERS.get(cls)
    if build is not None:
        return build
    hints = typing.get_type_hints(cls)
    fields = [
        (f.name, "." + f.name, _converter(hints.get(f.name, Any)), f.default is attrs.NOTHING)
        for f in attrs.fields(cls)
    ]

    def build(body: Mapping[str, Any], path: str) -> Any:
        kwargs = {}
        for name, suffix, conv, required in fields:
            if name in body:
                kwargs[name] = conv(body[name], path + suffix)
            elif required:
                raise ValueError(f"{path}{suffix} is missing")
        return cls(**kwargs)

    _BUILDERS[cls] = build
    return build


def _build(cls: type, body: Mapping[str, Any], path: str) -> Any:
    return _builder(cls)(body, path)


def _is_plain(tp: Any) -> bool:
    if tp in _SCALARS or tp is _NONE_TYPE:
        return True
    if typing.get_origin(tp) in (Union, types.UnionType):
        return all(_is_plain(a) for a in typing.get_args(tp))
    return False


def _field_split(cls: type) -> tuple[tuple[str, ...], tuple[str, ...]]:
    split = _ENCODERS.get(cls)
    if split is None:
        hints = typing.get_type_hints(cls)
        names = [f.name for f in attrs.fields(cls)]
        plain = tuple(n for n in names if _is_plain(hints.get(n, Any)))
        other = tuple(n for n in names if n not in plain)
        split = _ENCODERS[cls] = (plain, other)
    return split


def _encode_value(value: Any) -> Any:
    if value is None or type(value) in _SCALARS:
        return value
    if isinstance(value, ErrorCode):
        return value.to_dict()
    if attrs.has(type(value)):
        return _encode_body(value)
    if isinstance(value, (list, tuple)):
        return [_encode_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode_value(v) for k, v in value.items()}
    return value


def _encode_body(obj: Any) -> dict[str, Any]:
    plain, other = _field_split(type(obj))
    body = {n: getattr(obj, n) for n in plain}
    for n in other:
        body[n] = _encode_value(getattr(obj, n))
    return body


@attrs.define
class Registry:
    """
    Message, reply and event types by type name. Registering the same name twice for two
    classes is a programming error.
    """

    _types: dict[str, type] = attrs.field(factory=dict)

    def register(self, cls: M) -> M:
        """
        Register C{cls} under its C{type_name} (set from the class name when the class does
        not define its own). Usable as a class decorator.
        """
        if "type_name" not in cls.__dict__:
            cls.type_name = cls.__name__
        name = cls.type_name
        known = self._types.get(name)
        if known is not None and known is not cls:
            raise ValueError(f"message type {name!r} is already registered to {known!r}")
        self._types[name] = cls
        return cls

    def copy(self) -> Registry:
        """
        A new registry knowing the same types (to extend without touching this one).
        """
        return Registry(dict(self._types))

    def get(self, name: str) -> type | None:
        return self._types.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._types

    def encode(self, obj: Any) -> bytes:
        """
        The JSON bytes of a registered message, reply or event.
        """
        name = getattr(type(obj), "type_name", None)
        if name is None or self._types.get(name) is not type(obj):
            raise ValueError(f"{type(obj).__name__} is not a registered message type")
        body = _encode_body(obj)
        return _JSON.encode({name: body}).encode("utf-8")

    def decode(self, data: bytes | str) -> Any:
        """
        Rebuild a message from L{encode} output.

        @raise DecodeError: SYS.1008 for an unknown type, SYS.1007 for anything else wrong.
        """
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise DecodeError(error_code(SYS.INVALID_ARGUMENT_ERROR, f"not JSON: {e}")) from None
        if not isinstance(doc, dict) or len(doc) != 1:
            raise DecodeError(
                error_code(SYS.INVALID_ARGUMENT_ERROR, "a message is an object with one key")
            )
        ((name, body),) = doc.items()
        message_id = body.get("id") if isinstance(body, dict) else None
        if not isinstance(message_id, str):
            message_id = None
        cls = self._types.get(name)
        if cls is None:
            raise DecodeError(
                error_code(SYS.UNKNOWN_MESSAGE_ERROR, f"unknown message type {name!r}",
                           type_name=name),
                message_id,
            )
        if not isinstance(body, dict):
            raise DecodeError(
                error_code(SYS.INVALID_ARGUMENT_ERROR, f"{name}: the body must be an object"),
                message_id,
            )
        try:
            return _build(cls, body, name)
        except (ValueError, TypeError) as e:
            raise DecodeError(error_code(SYS.INVALID_ARGUMENT_ERROR, str(e), type_name=name),
                              message_id) from None


registry = Registry()
"""
The default registry: the bus's own types and every service's messages register here with
C{@registry.register}. A bus can be given another one (tests do).
"""

registry.register(Message)
registry.register(NeedReplyMessage)
registry.register(Reply)
registry.register(Event)
