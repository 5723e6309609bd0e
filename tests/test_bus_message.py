"""
The message codec: registration, round trips, strict decoding.
"""

from typing import Any

import attrs
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

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
