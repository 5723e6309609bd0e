"""
The wire contract: strict JSON codec of commands and responses, signatures, the command table.
"""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from agent import protocol as p
from agent.codec import VERSION_KEY

texts = st.text(max_size=20)
nics = st.builds(p.NicTO, mac=texts, ip=st.none() | texts, device_id=st.integers(0, 64))
start_cmds = st.builds(
    p.StartVmCmd,
    vm_instance_uuid=texts,
    vm_name=st.none() | texts,
    cpu_num=st.integers(1, 256),
    memory_size=st.integers(0, 2**40),
    nics=st.lists(nics, max_size=3),
)


class CodecTests(SynchronousTestCase):
    """
    Messages round-trip through JSON and decoding is strict.
    """

    @given(start_cmds)
    def test_round_trip(self, cmd: p.StartVmCmd) -> None:
        """
        Any StartVmCmd survives to_json/from_json unchanged.
        """
        self.assertEqual(p.StartVmCmd.from_json(cmd.to_json()), cmd)

    @given(st.dictionaries(texts, texts, max_size=4), st.booleans(), st.none() | texts)
    def test_response_round_trip(self, states: dict, success: bool, error: str | None) -> None:
        """
        Responses with maps round-trip.
        """
        rsp = p.VmSyncRsp(success=success, error=error, states=states)
        self.assertEqual(p.VmSyncRsp.from_json(rsp.to_json()), rsp)

    def test_camel_case(self) -> None:
        """
        Wire names are camelCase; the body carries the wire version.
        """
        data = json.loads(p.ConnectCmd(host_uuid="h", callback_secret="s").to_json())
        self.assertEqual(set(data), {"hostUuid", "callbackSecret", "sendCommandUrl", "version",
                                     "bootstrapToken", "callbackUrlPrefixes", "_v"})

    def test_strict(self) -> None:
        """
        Malformed JSON, non-objects, missing fields and wrong types are refused with
        ProtocolError (unknown fields are not: see L{OneCodecTests}).
        """
        good = {"vmInstanceUuid": "v", "cpuNum": 1, "memorySize": 2}
        self.assertEqual(p.StartVmCmd.from_dict(good).cpu_num, 1)
        bad = [
            {"vmInstanceUuid": "v", "cpuNum": 1},
            {**good, "cpuNum": True},
            {**good, "cpuNum": 1.5},
            {**good, "vmInstanceUuid": None},
            {**good, "nics": [{"ip": "1.2.3.4"}]},
            {**good, "nics": {}},
            {**good, "bootDev": [1]},
            [],
        ]
        for data in bad:
            self.assertRaises(p.ProtocolError, p.StartVmCmd.from_dict, data)
        self.assertRaises(p.ProtocolError, p.StartVmCmd.from_json, b"{")
        self.assertRaises(p.ProtocolError, p.StartVmCmd.from_json, b"\xff")
        self.assertRaises(p.ProtocolError, p.VmSyncRsp.from_dict, {"states": {"a": 1}})

    def test_float_accepts_int(self) -> None:
        """
        Integers are accepted where a number is expected (none in the contract yet: checked on
        the decoder directly).
        """
        self.assertEqual(p._decode_value(float, 3, "x"), 3.0)
        self.assertRaises(p.ProtocolError, p._decode_value, float, "3", "x")

    def test_every_response_has_defaults(self) -> None:
        """
        Every response type can be built as a bare failure.
        """
        for definition in p.COMMANDS.values():
            rsp = definition.rsp_type(success=False, error="boom")
            self.assertEqual(definition.rsp_type.from_json(rsp.to_json()), rsp)

    def test_response_without_default_refused(self) -> None:
        """
        Declaring a response field without a default is a programming error.
        """

        with self.assertRaises(TypeError):

            @p.message
            class BadRsp(p.Response):
                needed: int


class CommandTableTests(SynchronousTestCase):
    """
    The command table.
    """

    def test_sync_commands(self) -> None:
        """
        echo, connect and ping are the synchronous commands.
        """
        self.assertEqual({d.path for d in p.COMMANDS.values() if d.sync},
                         {p.ECHO_PATH, p.CONNECT_PATH, p.PING_PATH})

    def test_command_for(self) -> None:
        """
        A command's type gives its path; a non-command raises KeyError.
        """
        self.assertEqual(p.command_for(p.StopVmCmd(uuid="v")).path, "/vm/stop")
        self.assertRaises(KeyError, p.command_for, p.NicTO(mac="m"))

    def test_kvm_paths(self) -> None:
        """
        The KVM paths of ZStack's agent are all there.
        """
        for path in ("/host/connect", "/host/echo", "/host/ping", "/host/capacity", "/host/fact",
                     "/vm/start", "/vm/stop", "/vm/reboot", "/vm/destroy", "/vm/migrate",
                     "/vm/attachnic", "/vm/detachnic", "/vm/vmsync", "/vm/checkstate",
                     "/vm/getvncport"):
            self.assertIn(path, p.COMMANDS)

    def test_host_base_url(self) -> None:
        """
        Hosts are addressed by a path prefix.
        """
        self.assertEqual(p.host_base_url("http://a:7070/", 12), "http://a:7070/hosts/12")
        self.assertEqual(p.host_base_url("http://a:7070/"), "http://a:7070")


class SignatureTests(SynchronousTestCase):
    """
    Callback signatures.
    """

    @given(texts, texts, st.binary(max_size=64))
    def test_sign_verify(self, secret: str, taskuuid: str, body: bytes) -> None:
        """
        A signature verifies for its secret, task and body, and not for another body or task.
        """
        signature = p.sign(secret, taskuuid, body)
        self.assertTrue(p.verify(secret, taskuuid, body, signature))
        self.assertTrue(p.verify(secret, taskuuid, body, signature.encode()))
        self.assertFalse(p.verify(secret, taskuuid, body + b"x", signature))
        self.assertFalse(p.verify(secret, taskuuid + "x", body, signature))
        self.assertFalse(p.verify(secret + "x", taskuuid, body, signature))

    def test_missing(self) -> None:
        """
        No signature, an empty one or garbage does not verify.
        """
        for signature in (None, "", b"", "é", "00"):
            self.assertFalse(p.verify("s", "t", b"", signature))


#: Keys a newer peer might add: anything that is not a field of the class nor the version key.
#: Only what the wire admits (L{p.loads} refuses integers beyond 64 bits and lone surrogates
#: wherever they are, known field or not).
_wire_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=5)
future_keys = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1,
                      max_size=12).filter(
    lambda k: k not in {w for _a, w, _t, _r in p.StartVmCmd._wire} | {VERSION_KEY})
json_values = st.recursive(st.none() | st.booleans()
                           | st.integers(min_value=p.MIN_INT, max_value=p.MAX_INT) | _wire_text,
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(_wire_text, inner, max_size=3),
                           max_leaves=8)


class OneCodecTests(SynchronousTestCase):
    """
    The agent wire under the project's one codec policy (issue 8 item 16): tolerant of
    unknown fields, strict on missing and ill-typed ones, with a wire version.
    """

    good = {"vmInstanceUuid": "v", "cpuNum": 1, "memorySize": 2,
            "nics": [{"mac": "m", "deviceId": 0}]}

    @given(st.dictionaries(future_keys, json_values, min_size=1, max_size=4))
    def test_unknown_fields_ignored(self, extra: dict) -> None:
        """
        Fault (issue 8 item 16): the agent refused unknown fields while the bus ignored them,
        so a management node one release ahead (adding a field) broke every command to an
        agent of the previous release. Any extra keys, at the top or in a nested value, are
        now ignored and the rest decodes the same.
        """
        expected = p.StartVmCmd.from_dict(self.good)
        data = {**self.good, **extra, "nics": [{**self.good["nics"][0], **extra}]}
        self.assertEqual(p.StartVmCmd.from_dict(data), expected)
        self.assertEqual(p.StartVmCmd.from_json(json.dumps(data)), expected)

    def test_newer_response_accepted(self) -> None:
        """
        A response from a newer agent (extra fields, a newer minor version) is read.
        """
        rsp = p.StartVmRsp.from_json(b'{"success":true,"vncPort":5900,"spicePort":5901,'
                                     b'"_v":"1.9"}')
        self.assertEqual(rsp, p.StartVmRsp(success=True, vnc_port=5900))

    def test_errors_name_the_field(self) -> None:
        """
        Missing and ill-typed fields are refused with the field's wire path.
        """
        cases = [
            ({k: v for k, v in self.good.items() if k != "memorySize"},
             "StartVmCmd.memorySize is missing"),
            ({**self.good, "cpuNum": True}, "StartVmCmd.cpuNum must be an integer"),
            ({**self.good, "nics": [{"ip": "1.2.3.4"}]}, "StartVmCmd.nics[0].mac is missing"),
            ({**self.good, "bootDev": ["hd", None]}, "StartVmCmd.bootDev[1] must be a str"),
            ({**self.good, "vmName": 3}, "StartVmCmd.vmName must be a str"),
        ]
        for data, message in cases:
            e = self.assertRaises(p.ProtocolError, p.StartVmCmd.from_dict, data)
            self.assertEqual(str(e), message)

    def test_wire_version(self) -> None:
        """
        Every body carries C{_v}; a newer minor (or none, a peer older than the field) is
        accepted, another major or an ill-formed version is refused, saying so.
        """
        self.assertEqual(json.loads(p.EchoCmd().to_json()), {VERSION_KEY: "1.0"})
        self.assertEqual(p.StartVmCmd.to_dict(p.StartVmCmd.from_dict(self.good))[VERSION_KEY],
                         "1.0")
        for version in ("1.0", "1.1", "1.42"):
            p.StartVmCmd.from_dict({**self.good, VERSION_KEY: version})
        e = self.assertRaises(p.ProtocolError, p.StartVmCmd.from_dict,
                              {**self.good, VERSION_KEY: "2.0"})
        self.assertIn("StartVmCmd._v: wire version 2.0 is not supported", str(e))
        self.assertRaises(p.ProtocolError, p.StartVmCmd.from_dict,
                          {**self.good, VERSION_KEY: "0.9"})
        for bad in (1, 1.0, "1", "1.x", "", None, [1, 0], "١.٠"):
            e = self.assertRaises(p.ProtocolError, p.StartVmCmd.from_dict,
                                  {**self.good, VERSION_KEY: bad})
            self.assertIn("StartVmCmd._v must be a wire version", str(e))

    def test_no_input_escapes(self) -> None:
        """
        Deeply nested JSON, or a deep value in a free-form field, is a ProtocolError rather
        than a RecursionError.
        """
        self.assertRaises(p.ProtocolError, p.StartVmCmd.from_json, b"[" * 100_000)
        deep = b'{"states": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001
        self.assertRaises(p.ProtocolError, p.VmSyncRsp.from_json, deep)

    def test_unknown_field_logged_once(self) -> None:
        """
        An ignored field is logged at debug level, once per class and field name.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for _ in range(3):
            p.HostFactRsp.from_dict({"success": True, "gpuModelForTestOnly": "x"})
        seen = [e for e in events if e.get("key") == "gpuModelForTestOnly"]
        self.assertEqual(len(seen), 1)
        self.assertEqual(seen[0]["log_level"], LogLevel.debug)


_digits = st.text(alphabet="0123456789", min_size=1, max_size=30)


class OneParserNumberTests(SynchronousTestCase):
    """
    The one parser (L{agent.codec.loads}, behind L{p.loads}) checks numbers with hooks only
    when a body's shape says one may be out of range (Note [parse cost]); the shortcut must
    never let one through.
    """

    @given(st.booleans(), _digits, st.none() | _digits, st.sampled_from(["e", "E", "e+", "E-"]),
           _digits, st.sampled_from(["", " ", "]", "}"]))
    def test_out_of_range_number_never_admitted(self, negative, whole, fraction, mark,
                                                exponent, end) -> None:
        """
        A number that overflows a double (C{1e400}) would become C{Infinity}, which no peer
        can send back: whatever its form and position, a JSON number is admitted exactly
        when it is a finite double, so the hook-free fast path never lets one through.
        """
        text = ("-" if negative else "") + whole.lstrip("0").rjust(1, "0")
        if fraction is not None:
            text += "." + fraction
        text += mark + exponent
        body = {"": f"[{text}{end}]", " ": f"[{text} ]", "]": f"[{text}]",
                "}": f'{{"x": {text}}}'}[end]
        value = float(text)
        if value in (float("inf"), float("-inf")):
            e = self.assertRaises(p.ProtocolError, p.loads, body.encode())
            self.assertIn("number out of range", str(e))
        else:
            doc = p.loads(body.encode())
            self.assertEqual(doc if type(doc) is list else [doc["x"]], [value])

    @given(st.integers())
    def test_integer_bounds(self, value: int) -> None:
        """
        Any integer, alone or in a document beside hex that looks like an exponent, is
        admitted exactly when it fits in 64 bits.
        """
        bodies = [(str(value), value), (f'["5e588", {value}, "e1234"]', ["5e588", value, "e1234"])]
        for body, expected in bodies:
            if p.MIN_INT <= value <= p.MAX_INT:
                self.assertEqual(p.loads(body.encode()), expected)
            else:
                self.assertRaises(p.ProtocolError, p.loads, body.encode())
