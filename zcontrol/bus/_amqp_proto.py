# -*- test-case-name: tests.test_bus_amqp -*-
"""
The AMQP connection under L{zcontrol.bus.amqp}: txAMQP 0.8.2 with a fixed spec file and a
fast path for the frames the bus sees most.

Note [fast path]: txAMQP runs every incoming content frame through a channel queue, a work
queue and about sixteen C{inlineCallbacks} generators, re-slices its whole receive buffer
after each frame, and cannot decode the tables RabbitMQ puts in dead-lettered messages
(C{x-death} holds arrays and timestamps: txAMQP raises and drops the connection). So
L{BusProtocol} parses frames itself: C{basic.deliver}, C{basic.return}, C{basic.ack} and
C{basic.nack} (publisher confirms) with their header and body frames are assembled and handed
to a L{BusProtocol.handler} synchronously; every other frame (connection and channel control,
the C{-ok} answers of declare, bind, consume, qos, confirm.select) goes through txAMQP as
usual, so its channel API still works for those. C{basic.publish}, C{basic.ack} and
C{basic.reject} are written straight to the transport (txAMQP writes frames synchronously too,
so the two paths cannot reorder).
"""

from __future__ import annotations

import struct
from functools import lru_cache
from importlib import resources
from typing import Any

from twisted.logger import Logger
from txamqp import spec as txspec
from txamqp.client import TwistedDelegate
from txamqp.factory import AMQFactory
from txamqp.protocol import AMQClient

__all__ = ["BusFactory", "BusProtocol", "encode_table", "load_spec", "spec_path"]

log = Logger()

FRAME_END = 0xCE
_FRAME_HEAD = struct.Struct("!BHI")
_HH = struct.Struct("!HH")
_Q = struct.Struct("!Q")
_QB = struct.Struct("!QB")
_HEADER = struct.Struct("!HHQH")
_METHOD_ACK = struct.Struct("!HHQB")

CONNECTION, START_OK = 10, 11
BASIC = 60
DELIVER, RETURN, ACK, NACK, REJECT, PUBLISH, CANCEL = 60, 50, 80, 120, 90, 40, 30


def spec_path() -> str:
    """
    The path of the packaged AMQP 0-9-1 spec file (fixed for txAMQP: see its header).
    """
    return str(resources.files("zcontrol.bus").joinpath("specs/amqp0-9-1.xml"))


@lru_cache(maxsize=1)
def load_spec() -> Any:
    """
    The parsed spec (parsing takes ~50 ms: done once per process).
    """
    return txspec.load(spec_path())


# field tables (AMQP 0-9-1 as RabbitMQ writes them)

def _shortstr(buf: bytes, pos: int) -> tuple[str, int]:
    n = buf[pos]
    pos += 1
    return buf[pos:pos + n].decode("utf-8", "replace"), pos + n


_SCALARS = {
    ord("b"): struct.Struct("!b"), ord("B"): struct.Struct("!B"),
    ord("s"): struct.Struct("!h"), ord("u"): struct.Struct("!H"),
    ord("I"): struct.Struct("!i"), ord("i"): struct.Struct("!I"),
    ord("l"): struct.Struct("!q"), ord("L"): struct.Struct("!Q"),
    ord("f"): struct.Struct("!f"), ord("d"): struct.Struct("!d"),
    ord("T"): struct.Struct("!Q"),
}
_LONG = struct.Struct("!I")


def _field_value(buf: bytes, pos: int) -> tuple[Any, int]:
    kind = buf[pos]
    pos += 1
    scalar = _SCALARS.get(kind)
    if scalar is not None:
        return scalar.unpack_from(buf, pos)[0], pos + scalar.size
    if kind == ord("t"):
        return buf[pos] != 0, pos + 1
    if kind in (ord("S"), ord("x")):
        (n,) = _LONG.unpack_from(buf, pos)
        pos += 4
        raw = bytes(buf[pos:pos + n])
        return (raw.decode("utf-8", "replace") if kind == ord("S") else raw), pos + n
    if kind == ord("F"):
        return _table(buf, pos)
    if kind == ord("A"):
        (n,) = _LONG.unpack_from(buf, pos)
        pos += 4
        end = pos + n
        items = []
        while pos < end:
            value, pos = _field_value(buf, pos)
            items.append(value)
        return items, end
    if kind == ord("D"):
        scale = buf[pos]
        (value,) = struct.unpack_from("!i", buf, pos + 1)
        return value / (10 ** scale), pos + 5
    if kind == ord("V"):
        return None, pos
    raise ValueError(f"unknown AMQP field type {chr(kind)!r}")


def _table(buf: bytes, pos: int) -> tuple[dict[str, Any], int]:
    (n,) = _LONG.unpack_from(buf, pos)
    pos += 4
    end = pos + n
    out: dict[str, Any] = {}
    while pos < end:
        key, pos = _shortstr(buf, pos)
        out[key], pos = _field_value(buf, pos)
    return out, end


# basic properties, in flag order (bit 15 first)
_PROPS = (
    ("content-type", "s"), ("content-encoding", "s"), ("headers", "F"),
    ("delivery-mode", "o"), ("priority", "o"), ("correlation-id", "s"), ("reply-to", "s"),
    ("expiration", "s"), ("message-id", "s"), ("timestamp", "T"), ("type", "s"),
    ("user-id", "s"), ("app-id", "s"), ("cluster-id", "s"),
)


def decode_properties(buf: bytes, pos: int, flags: int) -> dict[str, Any]:
    """
    The basic-class properties of a content header, from C{pos} (just after the flags).
    """
    props: dict[str, Any] = {}
    bit = 15
    for name, kind in _PROPS:
        if flags & (1 << bit):
            if kind == "s":
                props[name], pos = _shortstr(buf, pos)
            elif kind == "o":
                props[name] = buf[pos]
                pos += 1
            elif kind == "T":
                props[name] = _Q.unpack_from(buf, pos)[0]
                pos += 8
            else:
                props[name], pos = _table(buf, pos)
        bit -= 1
    return props


def _ss(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    if len(b) > 255:
        raise ValueError("AMQP short string longer than 255 bytes")
    return bytes((len(b),)) + b


def _longstr(b: bytes) -> bytes:
    return _LONG.pack(len(b)) + b


def encode_table(table: dict[str, Any]) -> bytes:
    """
    An AMQP 0-9-1 field table as RabbitMQ reads it: C{str} (S), C{bool} (t), C{int} (l),
    C{dict} (F, nested). txAMQP's own encoder knows only strings and 32-bit integers, and
    RabbitMQ wants the client C{capabilities} as a nested table of booleans.
    """
    out = []
    for key, value in table.items():
        out.append(_ss(key))
        if isinstance(value, bool):
            out.append(b"t\x01" if value else b"t\x00")
        elif isinstance(value, int):
            out.append(b"l" + struct.pack("!q", value))
        elif isinstance(value, str):
            out.append(b"S" + _longstr(value.encode("utf-8")))
        elif isinstance(value, dict):
            out.append(b"F" + encode_table(value))
        else:
            raise TypeError(f"cannot encode {type(value).__name__} in an AMQP table")
    return _longstr(b"".join(out))


#: What the bus asks of the broker (client properties C{capabilities}): without
#: C{consumer_cancel_notify}, RabbitMQ drops the consumers of a deleted queue silently and
#: the bus would wait for replies that cannot come (issue 8 item 3).
CAPABILITIES = {
    "consumer_cancel_notify": True,
    "publisher_confirms": True,
    "basic.nack": True,
    "connection.blocked": False,
    # a refused login is answered with connection.close 403 ACCESS_REFUSED (saying so)
    # rather than a bare TCP close
    "authentication_failure_close": True,
}


class _Assembly:
    __slots__ = ("kind", "args", "props", "chunks", "left")

    def __init__(self, kind: int, args: tuple):
        self.kind = kind
        self.args = args
        self.props: dict[str, Any] = {}
        self.chunks: list[bytes] = []
        self.left = -1


class BusDelegate(TwistedDelegate):
    """
    txAMQP's delegate, sending client properties (RabbitMQ shows C{connection_name} in its
    management tools and C{rabbitmqctl list_connections client_properties}).
    """

    def __init__(self, client_properties: dict[str, str]):
        super().__init__()
        self.client_properties = client_properties

    def connection_start(self, ch: Any, msg: Any) -> None:
        # Written here rather than through txAMQP: its table encoder cannot write the
        # nested table of booleans that C{capabilities} is (see L{encode_table}).
        client = self.client
        response = client.response
        response = (encode_table(response) if isinstance(response, dict)
                    else _longstr(response.encode("utf-8")))
        payload = (_HH.pack(CONNECTION, START_OK) + encode_table(self.client_properties)
                   + _ss(client.mechanism) + response + _ss(client.locale))
        client.transport.write(_FRAME_HEAD.pack(1, 0, len(payload)) + payload + b"\xce")

    def basic_ack(self, ch: Any, msg: Any) -> None:
        """
        A confirm that arrived when no bus listens any more (stopping): nothing to do.
        """

    basic_nack = basic_ack

    def basic_cancel(self, ch: Any, msg: Any) -> None:
        # Normally taken by the fast path (L{BusProtocol._frame}); here when no bus listens.
        log.warn("the broker cancelled consumer {tag}", tag=msg.consumer_tag)


class BusProtocol(AMQClient):
    """
    An L{AMQClient} with the fast path of Note [fast path]. The bus sets C{handler}, an
    object with C{amqp_deliver(channel, consumer_tag, delivery_tag, exchange, routing_key,
    props, body)}, C{amqp_return(channel, reply_code, reply_text, exchange, routing_key,
    props, body)}, C{amqp_confirm(channel, delivery_tag, multiple, ok)},
    C{amqp_flush(protocol)} (called after each batch of received data),
    C{amqp_cancelled(channel, consumer_tag)} (the broker cancelled a consumer: its queue was
    deleted) and C{amqp_lost(protocol, reason)}.
    """

    handler: Any = None
    _rx = b""
    #: why the connection is being closed, when a channel error is the cause
    channel_error: str | None = None

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._assembling: dict[int, _Assembly] = {}

    # receiving

    def dataReceived(self, data: bytes) -> None:
        buf = self._rx + data if self._rx else data
        pos, n = 0, len(buf)
        unpack_head = _FRAME_HEAD.unpack_from
        try:
            while n - pos >= 8:
                ftype, ch, size = unpack_head(buf, pos)
                end = pos + 7 + size
                if end >= n:
                    break
                if buf[end] != FRAME_END:
                    log.error("AMQP framing error: closing the connection")
                    self.transport.abortConnection()
                    return
                self._frame(ftype, ch, buf, pos + 7, end)
                pos = end + 1
                if self.transport is None or self.transport.disconnecting:
                    break
        finally:
            self._rx = buf[pos:] if pos < n else b""
        if self.heartbeatInterval > 0 and not self.closed:
            self.reschedule_check_heartbeat()
        handler = self.handler
        if handler is not None:
            handler.amqp_flush(self)

    def _frame(self, ftype: int, ch: int, buf: bytes, start: int, end: int) -> None:
        if ftype == 3:
            asm = self._assembling.get(ch)
            if asm is not None and asm.left > 0:
                chunk = buf[start:end]
                asm.chunks.append(chunk)
                asm.left -= len(chunk)
                if asm.left <= 0:
                    self._finish(ch, asm)
                return
        elif ftype == 2:
            asm = self._assembling.get(ch)
            if asm is not None and asm.left < 0:
                _cls, _weight, size, flags = _HEADER.unpack_from(buf, start)
                asm.props = decode_properties(buf, start + _HEADER.size, flags)
                asm.left = size
                if size == 0:
                    self._finish(ch, asm)
                return
        elif ftype == 1:
            cls, meth = _HH.unpack_from(buf, start)
            if cls == BASIC and self.handler is not None:
                p = start + 4
                if meth == DELIVER:
                    tag, p = _shortstr(buf, p)
                    (dtag,) = _Q.unpack_from(buf, p)
                    p += 9  # delivery tag, redelivered
                    exchange, p = _shortstr(buf, p)
                    rkey, p = _shortstr(buf, p)
                    self._assembling[ch] = _Assembly(DELIVER, (tag, dtag, exchange, rkey))
                    return
                if meth == RETURN:
                    (code,) = struct.unpack_from("!H", buf, p)
                    text, p = _shortstr(buf, p + 2)
                    exchange, p = _shortstr(buf, p)
                    rkey, p = _shortstr(buf, p)
                    self._assembling[ch] = _Assembly(RETURN, (code, text, exchange, rkey))
                    return
                if meth == ACK or meth == NACK:
                    dtag, bits = _QB.unpack_from(buf, p)
                    self.handler.amqp_confirm(ch, dtag, bool(bits & 1), meth == ACK)
                    return
                if meth == CANCEL:
                    # consumer cancel notification (sent with no-wait: nothing to answer)
                    tag, p = _shortstr(buf, p)
                    self.handler.amqp_cancelled(ch, tag)
                    return
        # everything else: txAMQP's own path
        frame = self._unpack_frame(bytes(buf[start - 7:end + 1]))
        self.frame_received(frame)

    def _finish(self, ch: int, asm: _Assembly) -> None:
        del self._assembling[ch]
        body = asm.chunks[0] if len(asm.chunks) == 1 else b"".join(asm.chunks)
        if asm.kind == DELIVER:
            tag, dtag, exchange, rkey = asm.args
            self.handler.amqp_deliver(ch, tag, dtag, exchange, rkey, asm.props, body)
        else:
            code, text, exchange, rkey = asm.args
            self.handler.amqp_return(ch, code, text, exchange, rkey, asm.props, body)

    def channel_failed(self, channel: Any, reason: Any) -> None:
        """
        The broker closed a channel (a declaration it refused, a publish to a missing
        exchange): the bus uses one channel, so start afresh with a new connection.
        """
        log.error("the broker closed AMQP channel {id}: {reason}", id=channel.id,
                  reason=reason.getErrorMessage())
        # what the sends lost with the connection are told (not "closed cleanly")
        self.channel_error = f"the broker closed the channel: {reason.getErrorMessage()}"
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        handler, self.handler = self.handler, None
        try:
            super().connectionLost(reason)
        finally:
            if handler is not None:
                handler.amqp_lost(self, reason)

    # sending

    def publish(self, ch: int, exchange: str, routing_key: str, body: bytes, *,
                mandatory: bool = False, kind: str | None = None,
                message_id: str | None = None, correlation_id: str | None = None,
                reply_to: str | None = None, expiration: str | None = None) -> None:
        """
        Write one C{basic.publish} (non-persistent) with its header and body frames.
        """
        method = (_HH.pack(BASIC, PUBLISH) + b"\x00\x00" + _ss(exchange) + _ss(routing_key)
                  + (b"\x01" if mandatory else b"\x00"))
        flags = 1 << 12  # delivery-mode
        values = [b"\x01"]
        if correlation_id is not None:
            flags |= 1 << 10
            values.append(_ss(correlation_id))
        if reply_to is not None:
            flags |= 1 << 9
            values.append(_ss(reply_to))
        if expiration is not None:
            flags |= 1 << 8
            values.append(_ss(expiration))
        if message_id is not None:
            flags |= 1 << 7
            values.append(_ss(message_id))
        if kind is not None:
            flags |= 1 << 5
            values.append(_ss(kind))
        header = _HEADER.pack(BASIC, 0, len(body), flags) + b"".join(values)
        out = [_FRAME_HEAD.pack(1, ch, len(method)), method, b"\xce",
               _FRAME_HEAD.pack(2, ch, len(header)), header, b"\xce"]
        step = self.MAX_LENGTH - 8
        for i in range(0, len(body), step):
            chunk = body[i:i + step]
            out.append(_FRAME_HEAD.pack(3, ch, len(chunk)))
            out.append(chunk)
            out.append(b"\xce")
        self.transport.write(b"".join(out))

    def ack(self, ch: int, delivery_tag: int, multiple: bool = False) -> None:
        """
        Write C{basic.ack}.
        """
        payload = _METHOD_ACK.pack(BASIC, ACK, delivery_tag, 1 if multiple else 0)
        self.transport.write(_FRAME_HEAD.pack(1, ch, len(payload)) + payload + b"\xce")

    def reject(self, ch: int, delivery_tag: int, requeue: bool = False) -> None:
        """
        Write C{basic.reject}.
        """
        payload = _METHOD_ACK.pack(BASIC, REJECT, delivery_tag, 1 if requeue else 0)
        self.transport.write(_FRAME_HEAD.pack(1, ch, len(payload)) + payload + b"\xce")


class BusFactory(AMQFactory):
    """
    Builds L{BusProtocol}s on the packaged spec, with C{connection_name} in the client
    properties.
    """

    protocol = BusProtocol

    def __init__(self, clock: Any, connection_name: str):
        # AMQFactory.__init__ parses the spec file on every call: share one parse.
        self._spec = load_spec()
        self._clock = clock
        self._vhost = "/"
        self._heartbeat = 0
        self.connection_name = connection_name

    def buildProtocol(self, addr: Any) -> BusProtocol:
        delegate = BusDelegate({"connection_name": self.connection_name,
                                "product": "zcontrol", "capabilities": dict(CAPABILITIES)})
        return self.protocol(delegate, vhost=self._vhost, spec=self._spec,
                             heartbeat=self._heartbeat, clock=self._clock)
