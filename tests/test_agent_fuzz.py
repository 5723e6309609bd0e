"""
Issue 8 item 10e, by property: whatever body and headers reach the agent's command URIs or the
management node's callback and report endpoints, the answer is a deliberate status and nothing
raises past the endpoint (no 500, no logged error).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from agent import protocol as p
from agent.app import CallbackPolicy
from tests.agent_fakes import CALLBACK_URL, RecordingHTTP, base, make_agent
from zcontrol.agentclient import AgentClient, CallbackEndpoint

SECRET = "f" * 64
SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)


@st.composite
def _shaped(draw: Any, cls: type[p.Message]) -> bytes:
    """
    A JSON object with some of C{cls}'s wire fields (and sometimes others), of any type.
    """
    names = [wire for _attr, wire, _tp, _req in cls._wire] + ["extra"]
    keys = draw(st.lists(st.sampled_from(names), max_size=len(names), unique=True))
    return json.dumps({k: draw(_json) for k in keys}).encode()


def _deep(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


_raw = st.one_of(
    st.binary(max_size=200),
    _json.map(lambda v: json.dumps(v).encode()),
    st.integers(min_value=1, max_value=200_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(min_value=1, max_value=100_000).map(_deep),
    st.sampled_from([b"NaN", b"-Infinity", b'{"x": 1e999}', b'"\\udc00"', b"9" * 5000]),
)


def _body_for(cls: type[p.Message]) -> Any:
    """
    Raw bytes, JSON of any shape, objects with the fields of C{cls} of any type, and
    well-typed C{cls} values (so that the handlers run with arbitrary values).
    """
    return st.one_of(_raw, _shaped(cls), st.from_type(cls).map(lambda m: m.to_json()))


def _status(test: SynchronousTestCase, stub: StubTreq, url: str, body: bytes,
            headers: dict[str, Any]) -> int:
    d = stub.post(url, data=body, headers=headers)
    stub.flush()
    return test.successResultOf(d).code


class AgentFuzzTests(SynchronousTestCase):
    """
    The agent's URIs against arbitrary bodies and headers.
    """

    def agent(self) -> tuple[Any, StubTreq, RecordingHTTP]:
        http = RecordingHTTP()
        agent, _ = make_agent(http, Clock(), host_count=1,
                              policy=CallbackPolicy(time_slice=None))
        stub = StubTreq(agent.app.resource())
        cmd = p.ConnectCmd(host_uuid="h", callback_secret=SECRET,
                           callback_url_prefixes=[CALLBACK_URL])
        self.assertEqual(_status(self, stub, base(0) + p.CONNECT_PATH, cmd.to_json(), {}), 200)
        return agent, stub, http

    @SETTINGS
    @given(data=st.data(), path=st.sampled_from(sorted(p.COMMANDS)),
           taskuuid=st.text(max_size=40), callback=st.one_of(st.just(CALLBACK_URL),
                                                             st.binary(max_size=60)),
           signed=st.booleans())
    def test_any_command(self, data: Any, path: str, taskuuid: str, callback: Any,
                         signed: bool) -> None:
        """
        Any body (signed with the host's secret or not) to any command URI with any task
        uuid and callback URL gets 200, 400, 401, 403, 409 or 413; nothing is logged as an
        error and nothing is POSTed outside the agreed callback URL.
        """
        agent, stub, http = self.agent()
        body = data.draw(_body_for(p.COMMANDS[path].cmd_type))
        task = taskuuid.encode("utf-8", "surrogatepass")
        headers: dict[bytes, list[bytes]] = {}
        if not p.COMMANDS[path].sync:
            headers = {b"taskuuid": [task], b"callbackurl": [
                callback.encode() if isinstance(callback, str) else callback]}
            if signed:
                tu = task.decode("utf-8", "replace")
                cb = headers[b"callbackurl"][0].decode("ascii", "replace")
                exp = p.format_expiry(300)
                headers[p.EXPIRY_HEADER.encode()] = [exp.encode()]
                try:
                    sig = p.sign_command(SECRET, path, tu, cb, exp, body)
                except ValueError:  # a line break in a header value: never signed
                    sig = ""
                headers[p.SIGNATURE_HEADER.encode()] = [sig.encode()]
        code = _status(self, stub, base(0) + path, body, headers)
        self.assertIn(code, (200, 400, 401, 403, 409, 413))
        self.assertEqual(self.flushLoggedErrors(), [])
        for post in http.posts:
            self.assertEqual(post.url, CALLBACK_URL)


class NodeFuzzTests(SynchronousTestCase):
    """
    The management node's callback and report endpoints against arbitrary bodies.
    """

    def node(self) -> tuple[AgentClient, CallbackEndpoint, StubTreq, RecordingHTTP]:
        http = RecordingHTTP()
        client = AgentClient(Clock(), http, CALLBACK_URL)
        client._secrets[base(0)] = SECRET
        client._base_of_host["h"] = base(0)
        endpoint = CallbackEndpoint(client)
        return client, endpoint, StubTreq(endpoint.resource()), http

    @SETTINGS
    @given(data=st.data(), cmd=st.sampled_from([
        p.HostCapacityCmd(), p.VmSyncCmd(), p.CheckVmStateCmd(vm_uuids=["v"]),
        p.StartVmCmd(vm_instance_uuid="v", cpu_num=1, memory_size=1),
        p.EstablishProxyCmd(vm_uuid="v", target_hostname="h", target_port=1, token="t")]),
        signed=st.booleans())
    def test_any_callback(self, data: Any, cmd: p.Message, signed: bool) -> None:
        """
        Any callback body for a pending task, signed or not, gets 200, 400, 403 or 413; a
        task it does not complete stays pending or fails with an ErrorCode; nothing is
        logged as an error.
        """
        client, endpoint, stub, http = self.node()
        definition = p.command_for(cmd)
        d = client.call(base(0), cmd)
        taskuuid = http.posts[-1].header("taskuuid")
        body = data.draw(_body_for(definition.rsp_type))
        headers = {"taskuuid": taskuuid}
        if signed:
            headers[p.SIGNATURE_HEADER] = p.sign(SECRET, taskuuid, body)
        code = _status(self, stub, "http://mn" + endpoint.path, body, headers)
        self.assertIn(code, (200, 400, 403, 413))
        if code == 200 or (code == 400 and not client.is_pending(taskuuid)):
            self.assertTrue(d.called)
        d.addErrback(lambda f: None)
        d.cancel()
        self.assertEqual(self.flushLoggedErrors(), [])

    @SETTINGS
    @given(data=st.data(), signed=st.booleans(),
           host=st.one_of(st.sampled_from(["h", "x", ""]), st.binary(max_size=20)),
           taskuuid=st.one_of(st.just(b"r"), st.binary(max_size=20)),
           path=st.one_of(st.just(p.REPORT_VM_STATE_PATH), st.binary(max_size=20)))
    def test_any_report(self, data: Any, signed: bool, host: Any, taskuuid: bytes,
                        path: Any) -> None:
        """
        Any report body gets 200, 400, 403, 404, 409 or 413; the handler only ever sees a
        decoded report of the signing host; nothing is logged as an error.
        """
        client, endpoint, stub, _ = self.node()
        got: list = []
        endpoint.on_report(p.REPORT_VM_STATE_PATH, got.append)
        body = data.draw(_body_for(p.ReportVmStateCmd))
        def raw(v: Any) -> bytes:
            return v.encode() if isinstance(v, str) else v

        headers = {p.COMMAND_PATH_HEADER.encode(): [raw(path)],
                   p.RESOURCE_UUID_HEADER.encode(): [raw(host)], b"taskuuid": [taskuuid]}
        if signed:
            try:
                sig = p.sign_report(SECRET, raw(path).decode("utf-8", "replace"),
                                    taskuuid.decode("utf-8", "replace"), body)
            except ValueError:  # a line break in a header value: never signed
                sig = ""
            headers[p.SIGNATURE_HEADER.encode()] = [sig.encode()]
        code = _status(self, stub, "http://mn" + endpoint.send_command_path, body, headers)
        self.assertIn(code, (200, 400, 403, 404, 409, 413))
        for cmd in got:
            self.assertIsInstance(cmd, p.ReportVmStateCmd)
            self.assertEqual(cmd.host_uuid, "h")
        self.assertEqual(len(got), int(code == 200))
        self.assertEqual(self.flushLoggedErrors(), [])


class UrlUnderTests(SynchronousTestCase):
    """
    L{p.url_under} by property.
    """

    @SETTINGS
    @given(url=st.one_of(st.text(max_size=60), st.from_regex(
        r"\Ahttps?://[a-z.@:\[\]0-9]{1,20}(:[0-9]{1,6})?(/[a-z./%?#]{0,20})?\Z")))
    def test_only_the_agreed_origin(self, url: str) -> None:
        """
        Whatever the URL, url_under never raises, and admits it only if it parses to the
        prefix's scheme, host and port, with no user info, below the prefix's path.
        """
        prefix = "http://mn.example:8080/cb"
        if p.url_under(url, [prefix]):
            import urllib.parse

            parts = urllib.parse.urlsplit(url)
            self.assertEqual((parts.scheme, parts.hostname, parts.port or 80),
                             ("http", "mn.example", 8080))
            self.assertIsNone(parts.username)
            self.assertTrue(parts.path == "/cb" or parts.path.startswith("/cb/"))
