"""
The message codec: registration, round trips, strict decoding.
"""

import json
from typing import Any

import attrs
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from agent import protocol as agent_protocol
from agent.codec import VERSION_KEY
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
        Deeply nested JSON, and a deep chain of error causes, are SYS.1007 rather than a
        RecursionError escaping the decoder.
        """
        causes = b'{"code": "X.1", "cause": ' * 900 + b"null" + b"}" * 900
        for data, fragment in [(b"[" * 100_000, "nested too deeply"),
                               (b'{"Reply": {"error": ' + causes + b"}}",
                                "Reply.error: a chain of causes longer than 32")]:
            e = self.assertRaises(DecodeError, reg.decode, data)
            self.assertEqual(e.error.code, SYS.INVALID_ARGUMENT_ERROR)
            self.assertIn(fragment, e.error.details)
