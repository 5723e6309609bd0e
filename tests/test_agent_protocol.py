"""
The wire contract: strict JSON codec of commands and responses, signatures, the command table.
"""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from agent import protocol as p

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
        Wire names are camelCase.
        """
        data = json.loads(p.ConnectCmd(host_uuid="h", callback_secret="s").to_json())
        self.assertEqual(set(data), {"hostUuid", "callbackSecret", "sendCommandUrl", "version",
                                     "bootstrapToken", "callbackUrlPrefixes"})

    def test_strict(self) -> None:
        """
        Malformed JSON, non-objects, unknown fields, missing fields and wrong types are
        refused with ProtocolError.
        """
        good = {"vmInstanceUuid": "v", "cpuNum": 1, "memorySize": 2}
        self.assertEqual(p.StartVmCmd.from_dict(good).cpu_num, 1)
        bad = [
            {**good, "extra": 1},
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
