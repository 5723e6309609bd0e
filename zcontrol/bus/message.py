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

The JSON codec is the project's one codec, L{agent.codec}, shared with the agent wire, and
so are its policy and its defensive parser (bounded size and depth, 64-bit integers, no
C{NaN}, no lone surrogates). An unknown type name is C{SYS.1008}; a missing required field, a value of
the wrong type, or a wire version (C{"_v": "MAJOR.MINOR"} in the body) of another major is
C{SYS.1007} naming the field. Both arrive as a L{DecodeError} (an L{OperationError}), never
as a stray exception. Unknown extra fields are ignored (logged at debug level), so that nodes
of neighbouring versions can talk (the way ZStack's JSON decoding treats them).
"""

from __future__ import annotations

import uuid
from typing import Any, ClassVar, TypeVar

import attrs

from agent.codec import Codec, CodecError, dumps, loads
from zcontrol.core.errors import SYS, ErrorCode, OperationError, error_code

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DecodeError",
    "Event",
    "Message",
    "NeedReplyMessage",
    "Registry",
    "Reply",
    "envelope_error",
    "new_id",
    "registry",
]

M = TypeVar("M", bound=type)

#: The largest body L{Registry.decode} accepts unless told (bytes): the AMQP bus's default
#: C{max_message_size} (L{zcontrol.bus.amqp.DEFAULT_MAX_MESSAGE_SIZE}); a bus passes its own.
DEFAULT_MAX_MESSAGE_SIZE = 8 * 1024 * 1024


def envelope_error(message: Any) -> ErrorCode | None:
    """
    C{SYS.1007} naming the envelope field of C{message} that cannot be routed (a
    C{service_id} that is not a non-empty string, a C{resource_uuid} that is neither None nor
    a string), or None: what a bus's C{send} and C{post} answer instead of raising.
    """
    service_id = getattr(message, "service_id", None)
    if not isinstance(service_id, str) or not service_id:
        return error_code(SYS.INVALID_ARGUMENT_ERROR,
                          f"service_id must be a non-empty string, not {service_id!r:.80}",
                          field="service_id")
    resource_uuid = getattr(message, "resource_uuid", None)
    if resource_uuid is not None and not isinstance(resource_uuid, str):
        return error_code(SYS.INVALID_ARGUMENT_ERROR,
                          f"resource_uuid must be a string or None, not {resource_uuid!r:.80}",
                          field="resource_uuid")
    return None


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


#: The longest chain of causes an ErrorCode on the wire may have (from_dict, repr and to_dict
#: recurse along it).
MAX_CAUSE_DEPTH = 32


def _decode_error_code(value: Any) -> ErrorCode:
    link, depth = value, 0
    while isinstance(link, dict) and link.get("cause") is not None:
        depth += 1
        if depth > MAX_CAUSE_DEPTH:
            raise ValueError(f"a chain of causes longer than {MAX_CAUSE_DEPTH}")
        link = link["cause"]
    return ErrorCode.from_dict(value)


def _encode_error_code(value: ErrorCode) -> dict[str, Any]:
    return value.to_dict()


# The bus's codec: the project's one codec (agent.codec, shared with the agent wire), with
# attribute names as wire names, and ErrorCode as a leaf type.
_CODEC = Codec()
_CODEC.register(ErrorCode, _decode_error_code, _encode_error_code)


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
        try:
            return dumps({name: _CODEC.encode_top(obj)})
        except CodecError as e:
            raise ValueError(f"{name}: {e}") from None

    def decode(self, data: bytes | str, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> Any:
        """
        Rebuild a message from L{encode} output. The body is parsed by the project's one
        defensive parser (L{agent.codec.loads}), as the agent's are: the same hostile input
        (C{NaN}, an integer beyond 64 bits, a lone surrogate, deep nesting, an oversized body)
        is refused the same way on both wires.

        @param max_size: the largest body accepted, bytes: a bus passes its
            C{max_message_size}, the largest it sends (C{bus.max_message_size}, one value
            for the whole cluster: raise it on every node before relying on it).
        @raise DecodeError: SYS.1008 for an unknown type, SYS.1007 for anything else wrong.
        """
        try:
            doc = loads(data, max_size)
        except CodecError as e:
            raise DecodeError(error_code(SYS.INVALID_ARGUMENT_ERROR, str(e))) from None
        if not isinstance(doc, dict) or len(doc) != 1:
            raise DecodeError(
                error_code(SYS.INVALID_ARGUMENT_ERROR, "a message is an object with one key")
            )
        ((name, body),) = doc.items()
        message_id = body.get("id") if isinstance(body, dict) else None
        if not isinstance(message_id, str):
            message_id = None
        if not isinstance(body, dict):
            raise DecodeError(
                error_code(SYS.INVALID_ARGUMENT_ERROR, f"{name}: the body must be an object"),
                message_id,
            )
        try:
            # The version first: a message of another major may well be of a type unknown here.
            reserved = _CODEC.check_version(body, name)
        except CodecError as e:
            raise DecodeError(error_code(SYS.INVALID_ARGUMENT_ERROR, str(e), type_name=name),
                              message_id) from None
        cls = self._types.get(name)
        if cls is None:
            raise DecodeError(
                error_code(SYS.UNKNOWN_MESSAGE_ERROR, f"unknown message type {name!r}",
                           type_name=name),
                message_id,
            )
        try:
            return _CODEC.decode_checked(cls, body, name, reserved)
        except (ValueError, TypeError) as e:
            raise DecodeError(error_code(SYS.INVALID_ARGUMENT_ERROR, str(e), type_name=name),
                              message_id) from None
        except RecursionError:
            raise DecodeError(error_code(SYS.INVALID_ARGUMENT_ERROR,
                                         f"{name}: nested too deeply", type_name=name),
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
