"""
The message codec: registration, round trips, strict decoding.
"""

import json
import re
from typing import Any

import attrs
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from agent import protocol as agent_protocol
from agent.codec import MAX_DEPTH, MAX_INT, MIN_INT, VERSION_KEY, CodecError, dumps
from zcontrol.bus.amqp import AMQPBus
from zcontrol.bus.message import (
    DecodeError,
    Event,
    NeedReplyMessage,
    Registry,
    Reply,
    registry,
)
from zcontrol.core.errors import SYS, error_code

reg = registry.copy()


@attrs.define(kw_only=True)
class Nested:
    name: str
    size: int = 0


@reg.register
@attrs.define(kw_only=True)
class CreateThing(NeedReplyMessage):
    name: str
    cpu: int = 1
    ratio: float = 1.0
    enabled: bool = True
    tags: list[str] = attrs.field(factory=list)
    extra: dict[str, Any] = attrs.field(factory=dict)
    parent: str | None = None
    nested: Nested | None = None


@reg.register
@attrs.define(kw_only=True)
class ThingChanged(Event):
    topic = "thing.changed"
    name: str = ""


class CodecTests(SynchronousTestCase):
    @given(
        name=st.text(),
        cpu=st.integers(-(2**53), 2**53),
        ratio=st.floats(allow_nan=False, allow_infinity=False),
        tags=st.lists(st.text(max_size=5), max_size=3),
        parent=st.none() | st.text(max_size=5),
    )
    def test_round_trip(self, name, cpu, ratio, tags, parent):
        """
        A message comes back equal after encode and decode.
        """
        msg = CreateThing(name=name, cpu=cpu, ratio=ratio, tags=tags, parent=parent,
                          nested=Nested(name="n", size=2), timeout=5.0)
        self.assertEqual(reg.decode(reg.encode(msg)), msg)

    def test_reply_with_error(self):
        """
        An error reply keeps its ErrorCode and cause.
        """
        err = error_code(SYS.OPERATION_ERROR, "x", error_code(SYS.TIMEOUT, "y"))
        reply = Reply.failure(err, "abc")
        self.assertEqual(reg.decode(reg.encode(reply)), reply)

    def test_event(self):
        """
        Events round-trip and keep their topic.
        """
        ev = reg.decode(reg.encode(ThingChanged(name="a")))
        self.assertEqual((type(ev).topic, ev.name), ("thing.changed", "a"))

    def assertDecodeError(self, data, code, fragment):
        e = self.assertRaises(DecodeError, reg.decode, data)
        self.assertEqual(e.error.code, code)
        self.assertIn(fragment, e.error.details)
        return e

    def test_unknown_type(self):
        """
        An unknown type name is SYS.1008, with the message id when readable.
        """
        e = self.assertDecodeError(b'{"Nope": {"id": "m1"}}', SYS.UNKNOWN_MESSAGE_ERROR, "Nope")
        self.assertEqual(e.message_id, "m1")

    def test_bad_fields(self):
        """
        Missing or ill-typed fields are SYS.1007 naming the field.
        """
        cases = [
            (b'{"CreateThing": {}}', "CreateThing.name is missing"),
            (b'{"CreateThing": {"name": 1}}', "CreateThing.name must be a str"),
            (b'{"CreateThing": {"name": "a", "cpu": 1.5}}', "cpu must be an integer"),
            (b'{"CreateThing": {"name": "a", "cpu": true}}', "cpu must be an integer"),
            (b'{"CreateThing": {"name": "a", "tags": [1]}}', "tags[0] must be a str"),
            (b'{"CreateThing": {"name": "a", "nested": {"size": 1}}}', "nested.name is missing"),
            (b'{"CreateThing": {"name": "a", "enabled": "yes"}}', "enabled must be a bool"),
            (b'{"CreateThing": {"name": null}}', "CreateThing.name must be a str"),
            (b'{"CreateThing": {"name": "a", "ratio": null}}', "ratio must be a number"),
            (b'{"CreateThing": 5}', "the body must be an object"),
            (b'not json', "not JSON"),
            (b'\xff\xfe', "not JSON"),
            (b'{"a": {}, "b": {}}', "one key"),
            (b'{"Reply": {"error": {"code": 1}}}', "error"),
        ]
        for data, fragment in cases:
            self.assertDecodeError(data, SYS.INVALID_ARGUMENT_ERROR, fragment)

    def test_unknown_fields_ignored(self):
        """
        Extra fields from a newer peer are ignored.
        """
        msg = reg.decode(b'{"CreateThing": {"name": "a", "futureField": 1}}')
        self.assertEqual(msg.name, "a")

    @given(st.binary(max_size=64))
    def test_garbage_never_escapes(self, data):
        """
        Random bytes decode or raise DecodeError, nothing else.
        """
        try:
            reg.decode(data)
        except DecodeError as e:
            self.assertIn(e.error.code, (SYS.INVALID_ARGUMENT_ERROR, SYS.UNKNOWN_MESSAGE_ERROR))

    def test_registration(self):
        """
        Two classes cannot share a type name; unregistered objects cannot be encoded.
        """
        r = Registry()

        @attrs.define
        class A:
            pass

        r.register(A)
        self.assertEqual(A.type_name, "A")

        @attrs.define
        class B:
            type_name = "A"

        self.assertRaises(ValueError, r.register, B)
        self.assertRaises(ValueError, r.encode, Nested(name="x"))


@attrs.define(kw_only=True)
class ProbeItem:
    name: str
    size: int = 0


@reg.register
@attrs.define(kw_only=True)
class Probe(NeedReplyMessage):
    name: str
    size: int = 0
    items: list[ProbeItem] = attrs.field(factory=list)


@agent_protocol.message
class AgentProbeItem(agent_protocol.Message):
    name: str
    size: int = 0


@agent_protocol.message
class AgentProbe(agent_protocol.Message):
    name: str
    size: int = 0
    items: list[AgentProbeItem] = attrs.Factory(list)


class OneCodecPolicyTests(SynchronousTestCase):
    """
    The bus and the agent wire share one codec and one policy (issue 8 item 16).
    """

    def bus(self, body):
        """
        (True, fields) or (False, error details with the root named "Probe").
        """
        try:
            msg = reg.decode(json.dumps({"Probe": body}))
        except DecodeError as e:
            return False, e.error.code, e.error.details
        return True, msg.name, msg.size, [(i.name, i.size) for i in msg.items]

    def agent(self, body):
        try:
            cmd = AgentProbe.from_dict(body)
        except agent_protocol.ProtocolError as e:
            return False, SYS.INVALID_ARGUMENT_ERROR, str(e).replace("AgentProbe", "Probe", 1)
        return True, cmd.name, cmd.size, [(i.name, i.size) for i in cmd.items]

    def test_same_answer_on_both_wires(self):
        """
        Fault (issue 8 item 16): the bus ignored unknown fields and the agent refused them
        (two codecs, two policies), so a rolling upgrade broke one of the wires. The same
        body now gets the same answer on both: unknown fields ignored at any depth, missing
        and ill-typed ones refused with the same path, the same versions accepted.
        """
        good = {"name": "a", "size": 2, "items": [{"name": "i", "size": 1}]}
        accepted = [
            good,
            {**good, "future": {"x": [1]}},
            {**good, "items": [{"name": "i", "size": 1, "future": True}]},
            {**good, VERSION_KEY: "1.0"},
            {**good, VERSION_KEY: "1.7"},
        ]
        refused = [
            ({"size": 2}, "Probe.name is missing"),
            ({**good, "size": True}, "Probe.size must be an integer"),
            ({**good, "size": 1.5}, "Probe.size must be an integer"),
            ({**good, "name": None}, "Probe.name must be a str"),
            ({**good, "items": [{"size": 1}]}, "Probe.items[0].name is missing"),
            ({**good, "items": {}}, "Probe.items must be a list"),
            ({**good, VERSION_KEY: "2.0"}, "Probe._v: wire version 2.0 is not supported"),
            ({**good, VERSION_KEY: 1}, "Probe._v must be a wire version"),
        ]
        for body in accepted:
            on_bus = self.bus(body)
            self.assertTrue(on_bus[0], (body, on_bus))
            self.assertEqual(on_bus, (True, "a", 2, [("i", 1)]))
            self.assertEqual(self.agent(body), on_bus)
        for body, message in refused:
            on_bus = self.bus(body)
            self.assertEqual(on_bus[:2], (False, SYS.INVALID_ARGUMENT_ERROR), body)
            self.assertIn(message, on_bus[2])
            self.assertEqual(self.agent(body), on_bus)

    def test_bus_wire_version(self):
        """
        Bus bodies carry the wire version; another major is SYS.1007 naming C{_v} (checked
        before the type, which may not exist here) with the message id kept for the answer.
        """
        body = json.loads(reg.encode(Probe(name="a")))["Probe"]
        self.assertEqual(body[VERSION_KEY], "1.0")
        for name in ("Probe", "TypeFromTheFuture"):
            data = json.dumps({name: {"id": "m9", "name": "a", VERSION_KEY: "2.1"}})
            e = self.assertRaises(DecodeError, reg.decode, data)
            self.assertEqual(e.error.code, SYS.INVALID_ARGUMENT_ERROR)
            self.assertIn(f"{name}._v: wire version 2.1 is not supported", e.error.details)
            self.assertEqual(e.message_id, "m9")

    def test_deep_nesting_is_a_decode_error(self):
        """
        Deeply nested JSON, and a deep chain of error causes (within the parser's depth
        bound), are SYS.1007 rather than a RecursionError escaping the decoder.
        """
        causes = b'{"code": "X.1", "cause": ' * 40 + b"null" + b"}" * 40
        for data, fragment in [(b"[" * 100_000, "nested too deeply"),
                               (b'{"Reply": {"error": ' + causes + b"}}",
                                "Reply.error: a chain of causes longer than 32")]:
            e = self.assertRaises(DecodeError, reg.decode, data)
            self.assertEqual(e.error.code, SYS.INVALID_ARGUMENT_ERROR)
            self.assertIn(fragment, e.error.details)


def _unplaced(answer: tuple) -> tuple:
    return answer[:2] + (re.sub(r"(position|char|column) \d+", r"\1 N", answer[2]),)


def _nest(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


#: Text no peer may send, as JSON fragments placed where the tolerant reader would ignore
#: them (an unknown field) or in a known field: (fragment, what the refusal says).
HOSTILE = [
    (b'{"name": "a", "future": NaN}', "NaN is not a JSON number"),
    (b'{"name": "a", "future": [Infinity]}', "Infinity is not a JSON number"),
    (b'{"name": "a", "future": -Infinity}', "-Infinity is not a JSON number"),
    (b'{"name": "a", "future": 1e400}', "number out of range"),
    (b'{"name": "a", "future": [1, -2E+308 ]}', "number out of range"),
    (b'{"name": "a", "size": 1180591620717411303424}', "integer out of range"),  # 2**70
    (b'{"name": "a", "future": %d}' % (MAX_INT + 1), "integer out of range"),
    (b'{"name": "a", "future": %d}' % (MIN_INT - 1), "integer out of range"),
    (b'{"name": "a", "future": 1%s}' % (b"0" * 5000), "integer out of range"),
    (b'{"name": "\\ud800"}', "lone surrogate"),
    (b'{"name": "a", "items": [{"name": "x\\udc00"}]}', "lone surrogate"),
    (b'{"name": "a", "future": {"\\udbff": 1}}', "lone surrogate"),
    (b'{"name": "a", "future": ' + _nest(MAX_DEPTH) + b"}", "nested too deeply"),
    (b'{"name": "a", "future": ' + _nest(100_000) + b"}", "nested too deeply"),
    (b'{"name": "\xff"}', "not JSON"),
]
#: Edges that are fine on both wires: (fragment, name, size).
ADMITTED = [
    (b'{"name": "a", "size": %d}' % MAX_INT, "a", MAX_INT),
    (b'{"name": "a", "size": %d}' % MIN_INT, "a", MIN_INT),
    (b'{"name": "\\ud83d\\ude00", "future": 1.5e300}', "\U0001f600", 0),
    (b'{"name": "a", "future": ' + _nest(MAX_DEPTH - 2) + b"}", "a", 0),
    (b'{"name": "e588", "future": [1e-400, -1234, "5e1234"]}', "e588", 0),
    (b'{"name": "a", "future": "\\\\ud800 is text, not an escape"}', "a", 0),
]


class OneParserTests(SynchronousTestCase):
    """
    The bus and the agent wire parse with one defensive parser (issue 8 items 10 and 16).
    """

    def bus(self, fragment, max_size=1 << 20):
        try:
            msg = reg.decode(b'{"Probe": ' + fragment + b"}", max_size)
        except DecodeError as e:
            return False, e.error.code, e.error.details
        return True, msg.name, msg.size

    def agent(self, fragment, max_size=1 << 20):
        try:
            cmd = agent_protocol.decode_body(AgentProbe, fragment, max_size)
        except agent_protocol.ProtocolError as e:
            return False, SYS.INVALID_ARGUMENT_ERROR, str(e).replace("AgentProbe", "Probe", 1)
        return True, cmd.name, cmd.size

    def test_same_refusal_of_hostile_text_on_both_wires(self):
        """
        Fault (issue 8 items 10/16): the agent parsed with a defensive parser and the bus with
        plain C{json.loads}, so the bus accepted what the agent refused: C{NaN} and
        C{Infinity}, integers beyond 64 bits (2**70), lone surrogates (which raise later, when
        the value is encoded again), and nesting up to the interpreter's recursion limit. The
        same text now gets the same refusal (SYS.1007, the same words) on both wires, and the
        edges a peer may send are admitted by both.
        """
        for fragment, words in HOSTILE:
            on_bus = self.bus(fragment)
            self.assertEqual(on_bus[:2], (False, SYS.INVALID_ARGUMENT_ERROR), fragment[:80])
            self.assertIn(words, on_bus[2])
            # positions in the text differ by the bus's envelope
            self.assertEqual(_unplaced(self.agent(fragment)), _unplaced(on_bus))
        for fragment, name, size in ADMITTED:
            self.assertEqual(self.bus(fragment), (True, name, size), fragment[:80])
            self.assertEqual(self.agent(fragment), (True, name, size))

    def test_size_bound_on_both_wires(self):
        """
        Fault (issue 8 items 4/10): the bus parsed a body of any size. Both wires refuse a
        body over the bound they are given (the bus passes its C{max_message_size}, the
        largest body it sends), and admit one at the bound.
        """
        fragment = b'{"name": "a"}'
        envelope = len(b'{"Probe": }')
        self.assertEqual(self.bus(fragment, len(fragment) + envelope), (True, "a", 0))
        self.assertEqual(self.agent(fragment, len(fragment)), (True, "a", 0))
        on_bus = self.bus(fragment, len(fragment) + envelope - 1)
        self.assertEqual(on_bus[:2], (False, SYS.INVALID_ARGUMENT_ERROR))
        self.assertIn(f"over the limit of {len(fragment) + envelope - 1} bytes", on_bus[2])
        on_agent = self.agent(fragment, len(fragment) - 1)
        self.assertEqual(on_agent[:2], (False, SYS.INVALID_ARGUMENT_ERROR))
        self.assertIn(f"over the limit of {len(fragment) - 1} bytes", on_agent[2])

    def test_senders_refuse_non_json_numbers(self):
        """
        Fault (issue 8 item 16): a sender wrote C{NaN} and C{Infinity} (Python's JSON
        extension), which every receiver now refuses. A sender refuses them at once.
        """
        for value in (float("nan"), float("inf"), float("-inf")):
            self.assertRaises(ValueError, reg.encode, CreateThing(name="a", ratio=value))
            self.assertRaises(CodecError, dumps, {"x": [value]})

    def test_hostile_heartbeat_dropped(self):
        """
        Fault (issue 8 items 5/16): the AMQP bus parsed node heartbeats with plain
        C{json.loads}: deep nesting raised a RecursionError out of the heartbeat handler (a
        traceback per delivery), and a heartbeat naming a node by a number or a list made
        that value a member of the ring (or raised). Such a heartbeat is now dropped with one
        log line and changes nothing.
        """
        bus = AMQPBus(Clock(), node_id="hb-probe")
        for body in [_nest(100_000), b"[" * 120 + b"]" * 120,
                     b'{"node": 5, "op": "beat"}', b'{"node": ["x"], "op": "beat"}',
                     b'{"node": "n\\ud800", "op": "beat"}', b'{"node": "n", "op": {}}',
                     b'{"node": "n", "op": NaN}', b'"node"', b"\xff"]:
            bus._on_node(body)
            self.assertEqual(bus.members, frozenset({"hb-probe"}), body[:40])
            self.assertEqual(bus._missed, {}, body[:40])
        self.flushLoggedErrors()
        bus._on_node(b'{"node": "n2", "op": "beat"}')
        self.assertEqual(bus.members, frozenset({"hb-probe", "n2"}))
