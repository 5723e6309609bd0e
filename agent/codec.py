# -*- test-case-name: tests.test_agent_protocol -*-
"""
The one attrs <-> JSON codec of the project: bus messages (L{zcontrol.bus.message}) and agent
commands and responses (L{agent.protocol}) are both encoded and decoded here, so that the two
wires follow one policy. It lives under C{agent/} because the agent is deployed without
C{zcontrol} (C{zcontrol} may import C{agent}, never the reverse); it needs only the standard
library, attrs and twisted's logger.

Policy
======
 - B{Tolerant reader}: a field the class does not know is ignored (logged at debug level
   once per class and field name), so that a peer one release ahead can add fields and a
   rolling upgrade keeps working in either order.
 - B{Strict on what it knows}: a missing required field, or a value of the wrong JSON type
   (a bool for an int, a float for an int, null for a non-optional field, a string for a
   number), is a L{CodecError} whose message names the field by its path
   (C{StartVmCmd.nics[0].mac is missing}, C{CreateThing.cpu must be an integer}). Nothing
   else escapes a decode: not JSON, not an object, too deep, all become L{CodecError}.
 - B{One parser}: L{loads} parses every body of both wires, defensively (bounded size,
   64-bit integers, no C{NaN}, no lone surrogates, bounded depth), so that the bus and the
   agent refuse the same hostile input the same way.
 - B{Wire version}: every top-level body carries L{VERSION_KEY} (C{"_v": "1.0"},
   C{MAJOR.MINOR}, see L{WIRE_VERSION}). A minor bump adds optional fields only, and a
   reader accepts any minor of its major (the new fields are ignored, per the first rule). A
   major bump is an incompatible change: a reader refuses any major other than its own with a
   L{CodecError} saying so, instead of misreading. A body without C{_v} is read as C{1.0}
   (the peers that predate the field). The key starts with C{_}, which no attribute name on
   either wire does, so it can never clash with a field (C{ConnectCmd.version} is the agent's
   software version, another thing). It sits inside the body, not beside the bus's
   C{{"<TypeName>": body}} envelope, because readers of the previous release ignore unknown
   body fields but refuse a second envelope key.

Field names on the wire come from a per-codec renaming function: the bus uses attribute
names as they are, the agent camelCase (C{vm_instance_uuid} -> C{vmInstanceUuid}). Attributes
whose name starts with C{_} or that are not in C{__init__} are not on the wire.

Note [compiled codec]: the codec is on the hot path of every bus message and agent call
(over AMQP it was half of the bus's CPU when each value was checked by walking its
annotation). Each field annotation is compiled once into a converter closure, and each class
into a decoder that runs its fields' converters and an encoder that knows which fields are
plain scalars (copied as they are).

Note [why not cattrs]: cattrs 26.2.1 was evaluated as this codec with the same policy
(strict primitive hooks, C{forbid_extra_keys=False}, C{detailed_validation=True} for field
paths, camelCase through C{make_dict_structure_fn} overrides, the same version check), on
2026-11-30, on the 2-core machine shared by ~6 sessions (load average 5-6). Wall-clock
figures swung 2-3x between identical runs, so the codec was compared in one process,
interleaved, as the minimum thread-CPU microseconds per operation over 20 rounds (encode =
object to JSON bytes, decode = bytes to object; the bus's echo request, an error reply with a
cause, a C{StartVmCmd} with two NICs)::

    us per op          main's codecs   this codec   cattrs
    bus request enc        8.75           8.19        7.63
    bus request dec       10.31          10.31       12.81
    bus reply enc          6.24           6.33        6.24
    bus reply dec         13.98          15.40       15.74
    agent cmd enc         14.70          12.07       10.13
    agent cmd dec         45.36          21.13       19.61

C{make bench-core}'s headline (C{localbus_rpc_per_s}) does not run the codec at all (a
LocalBus passes objects, unless C{copy=True}), so no codec choice can move it: main and this
branch measured 29.5k/28.4k/11.2k and 23.6k/22.1k/14.3k round trips/s side by side, which is
the machine's noise, not the code (the 72k of a quiet machine could not be reproduced that
day). cattrs stays within 10 % by that measure, but it was not taken: it is no faster where
it counts (decoding, every receiver; 24 % slower on a bus request), it would add a
dependency to the agent, which is deliberately deployed with twisted + klein + treq + attrs
only, and the policy would still be ours to write (strict primitive hooks, renaming, the
version, turning its exception groups into the field-path messages and SYS.1007 details
that callers and tests read; C{cattrs.transform_error} names the attribute,
C{StartVmCmd.cpu_num}, not the wire field the peer sent, C{cpuNum}). Its one edge, encoding,
came from generated code, which this codec now does too. C{python -m bench.eval_cattrs}
repeats the comparison.
"""

from __future__ import annotations

import collections.abc
import json
import re
import types
import typing
from typing import Any, Callable, Mapping, Union

import attrs
from twisted.logger import Logger

__all__ = [
    "Codec",
    "CodecError",
    "MAX_DEPTH",
    "MAX_INT",
    "MIN_INT",
    "VERSION_KEY",
    "WIRE_VERSION",
    "camel_case",
    "dumps",
    "format_version",
    "loads",
    "parse_version",
]

log = Logger()

#: The wire version this side writes, (major, minor).
WIRE_VERSION: tuple[int, int] = (1, 0)
#: The key of the wire version in a top-level body.
VERSION_KEY = "_v"

_NONE_TYPE = type(None)
_SCALARS = (str, int, float, bool)
#: C{allow_nan=False}: a sender refuses C{NaN}/C{Infinity} at once, as L{loads} would refuse
#: them at the receiver.
_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
#: How many (class, unknown field) pairs are remembered so each is logged once.
_MAX_UNKNOWN_LOGGED = 1024

Converter = Callable[[Any, str], Any]


class CodecError(ValueError):
    """
    Data that does not match the classes it is decoded into (or a value that cannot be
    encoded). The message names the offending field by its path.
    """


def _type_hints(cls: type) -> dict[str, Any]:
    """
    The annotations of C{cls} (and its bases), each resolved in its own module. Unlike
    C{typing.get_type_hints(cls)}, the class's own namespace is not searched first: a field
    named C{type} would otherwise shadow the builtin in C{ClassVar[type[Reply]]}.
    """
    return typing.get_type_hints(cls, localns={})


def camel_case(name: str) -> str:
    """
    C{vm_instance_uuid} -> C{vmInstanceUuid} (ZStack's JSON dialect).
    """
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def format_version(version: tuple[int, int]) -> str:
    """
    C{(1, 0)} -> C{"1.0"}.
    """
    return f"{version[0]}.{version[1]}"


def parse_version(value: Any, path: str) -> tuple[int, int]:
    """
    C{"1.0"} -> C{(1, 0)}.

    @raise CodecError: not a C{"MAJOR.MINOR"} string.
    """
    if type(value) is str:
        major, dot, minor = value.partition(".")
        if dot and major.isdigit() and minor.isdigit() and major.isascii() and minor.isascii():
            return int(major), int(minor)
    raise CodecError(f"{path} must be a wire version \"MAJOR.MINOR\", not {value!r:.40}")


def _any(value: Any, path: str) -> Any:
    return value


def _str(value: Any, path: str) -> Any:
    if type(value) is str or isinstance(value, str):
        return value
    raise CodecError(f"{path} must be a str")


def _bool(value: Any, path: str) -> Any:
    if value is True or value is False:
        return value
    raise CodecError(f"{path} must be a bool")


def _int(value: Any, path: str) -> Any:
    if type(value) is int or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise CodecError(f"{path} must be an integer")


def _float(value: Any, path: str) -> Any:
    if type(value) is float:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CodecError(f"{path} must be a number")
    return float(value)


@attrs.define(eq=False)
class Codec:
    """
    An attrs <-> JSON codec with its compiled converters (see the module docstring).

    @ivar rename: attribute name -> wire name.
    """

    rename: Callable[[str], str] = lambda name: name
    _decode_hooks: dict[Any, Converter] = attrs.field(factory=dict, init=False)
    _encode_hooks: dict[type, Callable[[Any], Any]] = attrs.field(factory=dict, init=False)
    _converters: dict[Any, Converter] = attrs.field(factory=dict, init=False)
    _decoders: dict[type, Callable[[Mapping[str, Any], str, int], Any]] = attrs.field(
        factory=dict, init=False)
    _encoders: dict[type, Callable[[Any], dict[str, Any]]] = attrs.field(factory=dict,
                                                                         init=False)
    _unknown_logged: set[tuple[type, str]] = attrs.field(factory=set, init=False)

    def register(self, tp: type, decode: Callable[[Any], Any],
                 encode: Callable[[Any], Any]) -> None:
        """
        Handle values of type C{tp} with C{decode} (from the JSON value; raises ValueError
        when it does not fit) and C{encode} (to a JSON value), e.g. the bus's C{ErrorCode}.
        Register before the first use of a class that has such a field.
        """

        def hook(value: Any, path: str) -> Any:
            try:
                return decode(value)
            except CodecError:
                raise
            except (ValueError, TypeError) as e:
                raise CodecError(f"{path}: {e}") from None

        self._decode_hooks[tp] = hook
        self._encode_hooks[tp] = encode

    # -- decoding ----------------------------------------------------------------------------

    def converter(self, tp: Any) -> Converter:
        """
        The compiled converter of annotation C{tp}: C{(json value, path) -> value}.

        @raise CodecError: (from the converter) the value does not fit C{tp}.
        """
        conv = self._converters.get(tp)
        if conv is None:
            conv = self._converters[tp] = self._make_converter(tp)
        return conv

    def _make_converter(self, tp: Any) -> Converter:
        hook = self._decode_hooks.get(tp)
        if hook is not None:
            return hook
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
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin in (Union, types.UnionType):
            return self._union(args)
        if isinstance(tp, type) and attrs.has(tp):
            return self._nested(tp)
        if origin in (list, tuple) or tp in (list, tuple):
            return self._list(tp, args)
        if origin in (dict, collections.abc.Mapping) or tp is dict:
            return self._dict(args)

        def unsupported(value: Any, path: str) -> Any:
            raise CodecError(f"{path}: unsupported field type {tp!r}")

        return unsupported

    def _union(self, args: tuple[Any, ...]) -> Converter:
        optional = _NONE_TYPE in args
        convs = [self.converter(a) for a in args if a is not _NONE_TYPE]
        if len(convs) == 1:
            (conv,) = convs

            def optional_(value: Any, path: str) -> Any:
                if value is None:
                    if optional:
                        return None
                    raise CodecError(f"{path} must not be null")
                return conv(value, path)

            return optional_

        def union(value: Any, path: str) -> Any:
            if value is None:
                if optional:
                    return None
                raise CodecError(f"{path} must not be null")
            errors = []
            for conv in convs:
                try:
                    return conv(value, path)
                except CodecError as e:
                    errors.append(str(e))
            raise CodecError("; ".join(errors))

        return union

    def _nested(self, cls: type) -> Converter:
        decoders = self._decoders

        def nested(value: Any, path: str) -> Any:
            if type(value) is not dict and not isinstance(value, Mapping):
                raise CodecError(f"{path} must be an object")
            decode = decoders.get(cls) or self._decoder(cls)
            return decode(value, path, 0)

        return nested

    def _list(self, tp: Any, args: tuple[Any, ...]) -> Converter:
        if typing.get_origin(tp) is tuple or tp is tuple:
            item = self.converter(args[0]) if len(args) == 2 and args[1] is ... else _any
        else:
            item = self.converter(args[0]) if args else _any

        def list_(value: Any, path: str) -> Any:
            if type(value) is not list:
                raise CodecError(f"{path} must be a list")
            if item is _any:
                return value
            return [item(v, f"{path}[{i}]") for i, v in enumerate(value)]

        return list_

    def _dict(self, args: tuple[Any, ...]) -> Converter:
        item = self.converter(args[1]) if len(args) == 2 else _any

        def dict_(value: Any, path: str) -> Any:
            if type(value) is not dict:
                raise CodecError(f"{path} must be an object")
            if item is _any:
                return value
            return {k: item(v, f"{path}.{k}") for k, v in value.items()}

        return dict_

    def wire_fields(self, cls: type) -> list[attrs.Attribute]:
        """
        The attributes of C{cls} that are on the wire.
        """
        return [f for f in attrs.fields(cls) if f.init and not f.name.startswith("_")]

    def _decoder(self, cls: type) -> Callable[[Mapping[str, Any], str, int], Any]:
        decode = self._decoders.get(cls)
        if decode is not None:
            return decode
        hints = _type_hints(cls)
        fields = []
        for f in self.wire_fields(cls):
            key = self.rename(f.name)
            fields.append((f.alias, key, "." + key, self.converter(hints.get(f.name, Any)),
                           f.default is attrs.NOTHING))
        fields_ = tuple(fields)
        known = frozenset(key for _a, key, _p, _c, _r in fields_)
        unknown = self._unknown

        def decode(body: Mapping[str, Any], path: str, reserved: int) -> Any:
            kwargs = {}
            for alias, key, suffix, conv, required in fields_:
                if key in body:
                    kwargs[alias] = conv(body[key], path + suffix)
                elif required:
                    raise CodecError(f"{path}{suffix} is missing")
            if len(body) - reserved > len(kwargs):
                unknown(cls, body, known, path)
            try:
                return cls(**kwargs)
            except (ValueError, TypeError) as e:  # the class's own validators
                raise CodecError(f"{path}: {e}") from None

        self._decoders[cls] = decode
        return decode

    def _unknown(self, cls: type, body: Mapping[str, Any], known: frozenset, path: str
                 ) -> None:
        logged = self._unknown_logged
        for key in body:
            if key in known or key == VERSION_KEY or (cls, key) in logged:
                continue
            if len(logged) >= _MAX_UNKNOWN_LOGGED:  # a peer sending random keys: stop here
                return
            logged.add((cls, key))
            log.debug("ignoring the unknown field {path}.{key} (a newer peer?)",
                      path=path, key=key)

    def decode(self, cls: type, body: Any, path: str | None = None) -> Any:
        """
        Build a C{cls} from the JSON object C{body} (a nested value: no version check).

        @param path: how errors name C{body} (default: the class name).
        @raise CodecError: C{body} does not fit C{cls}.
        """
        path = cls.__name__ if path is None else path
        if type(body) is not dict and not isinstance(body, Mapping):
            raise CodecError(f"{path} must be an object, not {type(body).__name__}")
        return (self._decoders.get(cls) or self._decoder(cls))(body, path, 0)

    def check_version(self, body: Mapping[str, Any], path: str) -> int:
        """
        Check the wire version of the top-level C{body}.

        @return: how many reserved keys C{body} holds (for L{decode_top}'s bookkeeping).
        @raise CodecError: ill-formed, or a major version other than ours.
        """
        if VERSION_KEY not in body:
            return 0
        raw = body[VERSION_KEY]
        if raw != _OUR_VERSION:
            major, minor = parse_version(raw, f"{path}.{VERSION_KEY}")
            if major != WIRE_VERSION[0]:
                raise CodecError(
                    f"{path}.{VERSION_KEY}: wire version {major}.{minor} is not supported "
                    f"(this side reads {WIRE_VERSION[0]}.x): upgrade this side or the peer")
        return 1

    def decode_top(self, cls: type, body: Any, path: str | None = None) -> Any:
        """
        Build a C{cls} from a whole message body: L{check_version}, then L{decode}.

        @raise CodecError: C{body} does not fit C{cls}, or its wire version is refused.
        """
        path = cls.__name__ if path is None else path
        if type(body) is not dict and not isinstance(body, Mapping):
            raise CodecError(f"{path} must be an object, not {type(body).__name__}")
        reserved = self.check_version(body, path)
        return (self._decoders.get(cls) or self._decoder(cls))(body, path, reserved)

    def decode_checked(self, cls: type, body: Mapping[str, Any], path: str, reserved: int
                       ) -> Any:
        """
        L{decode_top} for a caller that ran L{check_version} itself (C{reserved} is its
        answer) and knows C{body} is a dict.
        """
        return (self._decoders.get(cls) or self._decoder(cls))(body, path, reserved)

    # -- encoding ----------------------------------------------------------------------------

    def _is_plain(self, tp: Any) -> bool:
        if tp in _SCALARS or tp is _NONE_TYPE:
            return tp not in self._encode_hooks
        if typing.get_origin(tp) in (Union, types.UnionType):
            return all(self._is_plain(a) for a in typing.get_args(tp))
        return False

    def _encoder(self, cls: type) -> Callable[[Any], dict[str, Any]]:
        encode = self._encoders.get(cls)
        if encode is not None:
            return encode
        hints = _type_hints(cls)
        plain, other = [], []
        for f in self.wire_fields(cls):
            pair = (f.name, self.rename(f.name))
            (plain if self._is_plain(hints.get(f.name, Any)) else other).append(pair)
        # Generated code: one dict display reading each attribute (cattrs does the same; it
        # is about 30 % faster than a loop over a field table).
        items = [f"{key!r}: obj.{name}" for name, key in plain]
        items += [f"{key!r}: value(obj.{name})" for name, key in other]
        if all(name.isidentifier() for name, _key in plain + other):
            source = f"def encode(obj):\n    return {{{', '.join(items)}}}\n"
            namespace: dict[str, Any] = {"value": self.encode_value}
            exec(compile(source, f"<codec encoder {cls.__qualname__}>", "exec"), namespace)
            encode = namespace["encode"]
        else:  # pragma: no cover - attrs field names are identifiers
            plain_, other_ = tuple(plain), tuple(other)
            value = self.encode_value

            def encode(obj: Any) -> dict[str, Any]:
                body = {key: getattr(obj, name) for name, key in plain_}
                for name, key in other_:
                    body[key] = value(getattr(obj, name))
                return body

        self._encoders[cls] = encode
        return encode

    def encode_value(self, value: Any) -> Any:
        """
        The JSON value of any field value (attrs instances as nested objects, no version).
        """
        if value is None or type(value) in _SCALARS:
            return value
        hook = self._encode_hooks.get(type(value))
        if hook is not None:
            return hook(value)
        if attrs.has(type(value)):
            return (self._encoders.get(type(value)) or self._encoder(type(value)))(value)
        if isinstance(value, (list, tuple)):
            return [self.encode_value(v) for v in value]
        if isinstance(value, dict):
            return {k: self.encode_value(v) for k, v in value.items()}
        return value

    def encode(self, obj: Any) -> dict[str, Any]:
        """
        The JSON object of the attrs instance C{obj}, as a nested value (no version).
        """
        return (self._encoders.get(type(obj)) or self._encoder(type(obj)))(obj)

    def encode_top(self, obj: Any) -> dict[str, Any]:
        """
        The JSON object of a whole message body: L{encode} plus the wire version.
        """
        body = (self._encoders.get(type(obj)) or self._encoder(type(obj)))(obj)
        body[VERSION_KEY] = _OUR_VERSION
        return body


_OUR_VERSION = format_version(WIRE_VERSION)


def dumps(doc: Any) -> bytes:
    """
    Compact UTF-8 JSON.

    @raise CodecError: a value JSON cannot hold (C{NaN} and C{Infinity} among them).
    """
    try:
        return _JSON.encode(doc).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise CodecError(f"cannot encode: {e}") from None


#: Bounds of integers on the wire (signed 64 bits, as ZStack's Java C{long}): both peers
#: refuse what a Java peer or the store (PostgreSQL C{bigint}) could not hold.
MAX_INT = 2**63 - 1
MIN_INT = -(2**63)
#: The deepest nesting of arrays and objects accepted (the deepest message, an error reply
#: with its chain of 32 causes, nests about 36 levels).
MAX_DEPTH = 100

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
#: The shape of a body's numbers, for one C{bytes.translate}: a digit becomes C{0}, an
#: exponent mark C{e}, a sign C{s}, what ends a number (C{,]}} and white space) C{,}, an
#: opening bracket C{[}, the rest a space. A number that may be out of range has a long
#: digit run (an integer beyond 64 bits needs 19 digits, 18 always fit) or a 3-digit exponent
#: (a double overflows only past 1e308, or with a long mantissa).
_SHAPE = bytes(
    ord("0") if 48 <= b <= 57 else ord("e") if b in b"eE" else ord("s") if b in b"+-"
    else ord(",") if b in b",]} \t\r\n" else ord("[") if b in b"[{" else ord(" ")
    for b in range(256))
_LONG_DIGITS = b"0" * 19
#: A 3-digit exponent ending a number, in the shape (in a hex string such as a uuid, C{e588}
#: is followed by more hex or a quote, never by what ends a number).
_EXPONENT = re.compile(rb"es?000+(?:,|\Z)")
_TOO_DEEP = f"not JSON: nested too deeply (over {MAX_DEPTH} levels)"


def _parse_int(text: str) -> int:
    if len(text) > 20:
        raise CodecError(f"not JSON: integer out of range (64 bits): {text[:24]}...")
    value = int(text)
    if not MIN_INT <= value <= MAX_INT:
        raise CodecError(f"not JSON: integer out of range (64 bits): {text}")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # a literal is never NaN
        raise CodecError(f"not JSON: number out of range: {text[:24]}")
    return value


def _parse_constant(text: str) -> Any:
    raise CodecError(f"not JSON: {text} is not a JSON number")


#: Decoders built once (C{json.loads} with hooks builds one per call, which costs as much as
#: the parse of a small body).
_DECODER = json.JSONDecoder(parse_constant=_parse_constant)
_CHECKED_DECODER = json.JSONDecoder(parse_int=_parse_int, parse_float=_parse_float,
                                    parse_constant=_parse_constant)


def _deeper_than(doc: Any, limit: int) -> bool:
    """
    Whether C{doc} nests arrays and objects more than C{limit} levels (without recursion).
    """
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if type(value) is dict else value
        for child in children:
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))
    return False


def loads(data: bytes | str, max_size: int) -> Any:
    """
    Parse a JSON body, defensively: THE parser of both wires (bus messages and agent commands,
    responses and reports), so that both refuse the same input the same way. Refused: a body
    over C{max_size} bytes, text that is not UTF-8 JSON, C{NaN}/C{Infinity} and numbers that
    overflow a double, integers beyond 64 bits (L{MIN_INT}..L{MAX_INT}), lone surrogates (no
    UTF-8 encoder accepts them later), nesting deeper than L{MAX_DEPTH} levels.

    Note [parse cost]: the common body costs one C{json} parse without hooks plus about a
    microsecond: numbers are checked by hooks only when the body has a digit run or an
    exponent long enough to be out of range (a hook called for every number costs as much as
    the parse of a small message; one C{bytes.translate} tells, see C{_SHAPE}), strings only
    when it has a surrogate escape, and the depth only when it has more than L{MAX_DEPTH}
    opening brackets.

    @param data: UTF-8 JSON text (bytes; a C{str} is encoded first).
    @param max_size: the largest body accepted, bytes.
    @raise CodecError: whatever is wrong with C{data}; nothing else is raised.
    """
    if type(data) is not bytes:
        if isinstance(data, str):
            try:
                data = data.encode("utf-8")
            except UnicodeEncodeError:
                raise CodecError("not JSON: a string holds a lone surrogate") from None
        elif isinstance(data, (bytes, bytearray, memoryview)):
            data = bytes(data)
        else:
            raise CodecError(f"a body is bytes, not {type(data).__name__}")
    if len(data) > max_size:
        raise CodecError(f"body of {len(data)} bytes is over the limit of {max_size} bytes")
    shape = data.translate(_SHAPE)
    if _LONG_DIGITS in shape or _EXPONENT.search(shape) is not None:
        decoder = _CHECKED_DECODER
    else:
        decoder = _DECODER
    try:
        doc = decoder.decode(data.decode("utf-8"))
    except CodecError:
        raise
    except RecursionError:
        raise CodecError(_TOO_DEEP) from None
    except (ValueError, TypeError) as e:  # UnicodeDecodeError is a ValueError
        raise CodecError(f"not JSON: {e}") from None
    if (shape.count(b"[") > MAX_DEPTH and (type(doc) is dict or type(doc) is list)
            and _deeper_than(doc, MAX_DEPTH)):
        raise CodecError(_TOO_DEEP)
    if _SURROGATE_ESCAPE.search(data) is not None:
        try:
            json.dumps(doc, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise CodecError("not JSON: a string holds a lone surrogate") from None
    return doc
