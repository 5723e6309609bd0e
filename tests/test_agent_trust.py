"""
Issue 8 item 10: only the management node commands an agent. The bootstrap token at connect,
callback URLs under the prefixes agreed at connect, bounded and defensive decoding on both the
agent's and the management node's endpoints, and signatures checked before parsing.
"""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from agent import protocol as p
from agent.app import CallbackPolicy
from tests.agent_fakes import CALLBACK_URL, InMemoryPair, RecordingHTTP, base, make_agent
from tests.signing import command_headers
from zcontrol.agentclient import AgentClient, CallbackEndpoint
from zcontrol.agentclient.errors import AGENT
from zcontrol.core.errors import OperationError

SECRET = "s" * 64
TOKEN = "bootstrap-token-of-the-operator"

#: Inputs of the kinds that raised past the endpoints before issue 8 item 10.
HOSTILE_BODIES = [
    b"[" * 100_000,  # RecursionError in json.loads
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"cpuNum": ' + b"9" * 5000 + b"}",  # int() over the digit limit
    b'{"cpuNum": 1e999}',
    b'{"cpuNum": NaN}',
    b'{"hostUuid": "\\ud800"}',  # a lone surrogate: later encodes raise
    b"\xff\xfe",
    b"",
    b"null",
    b"[]",
    b'"x"',
]


def _post(stub: StubTreq, test: SynchronousTestCase, url: str, body: bytes,
          headers: dict[str, Any] | None = None) -> tuple[int, bytes]:
    response = test.successResultOf(stub.post(url, data=body, headers=headers or {}))
    return response.code, test.successResultOf(response.content())


class BootstrapTokenTests(SynchronousTestCase):
    """
    An agent configured with a bootstrap token refuses a connect without it.
    """

    def setUp(self) -> None:
        self.http = RecordingHTTP()
        self.agent, _ = make_agent(self.http, Clock(), host_count=2,
                                   policy=CallbackPolicy(time_slice=None))
        self.agent.bootstrap_token = TOKEN
        self.stub = StubTreq(self.agent.app.resource())

    def connect(self, token: str | None, secret: str = SECRET) -> tuple[int, bytes]:
        cmd = p.ConnectCmd(host_uuid="h", callback_secret=secret, bootstrap_token=token,
                           callback_url_prefixes=[CALLBACK_URL])
        return _post(self.stub, self, base(0) + p.CONNECT_PATH, cmd.to_json())

    def test_missing_and_wrong_token(self) -> None:
        """
        Fault (issue 8 item 10a): anyone reaching an agent could POST /host/connect and
        replace the host's callback secret. A connect without the token gets 401, with a
        wrong one 403, and the host keeps the secret agreed with the management node.
        """
        self.assertEqual(self.connect(TOKEN)[0], 200)
        self.assertEqual(self.agent.host("0").secret, SECRET)
        code, body = self.connect(None, secret="attacker")
        self.assertEqual((code, body), (401, b"bootstrap token missing"))
        code, body = self.connect("guess", secret="attacker")
        self.assertEqual((code, body), (403, b"bootstrap token refused"))
        code, _ = self.connect(TOKEN[:-1], secret="attacker")
        self.assertEqual(code, 403)
        self.assertEqual(self.agent.host("0").secret, SECRET)

    def test_empty_token_refused_as_configuration(self) -> None:
        """
        An empty configured token would admit an empty one; it is a configuration error.
        """
        from agent.app import AgentApp

        self.assertRaises(ValueError, AgentApp, Clock(), self.http, lambda k: None, [],
                          bootstrap_token="")

    def test_token_matches(self) -> None:
        """
        No token configured admits any connect; a configured one admits only itself.
        """
        self.assertTrue(p.token_matches(None, None))
        self.assertTrue(p.token_matches("a", "a"))
        self.assertFalse(p.token_matches("a", None))
        self.assertFalse(p.token_matches("a", ""))
        self.assertFalse(p.token_matches("a", "b"))
        self.assertFalse(p.token_matches("a", "\ud800"))


class ClientTokenTests(SynchronousTestCase):
    """
    The management node sends its configured token and reports a refusal as AGENT.1002.
    """

    def setUp(self) -> None:
        self.pair = InMemoryPair(host_count=2)
        self.pair.agent.bootstrap_token = TOKEN

    def connect(self) -> Any:
        d = self.pair.client.connect(base(0), "h0")
        self.pair.flush()
        return d

    def test_refused_token_is_structured(self) -> None:
        """
        Fault (issue 8 item 10a): a refused connect must say why, as an ErrorCode naming the
        setting: AGENT.1002 with the HTTP status (401 without a token, 403 with a wrong one).
        """
        error = self.failureResultOf(self.connect(), OperationError).value.error
        self.assertEqual((error.code, error.opaque["status"], error.opaque["field"]),
                         (AGENT.TOKEN_REFUSED, 401, "bootstrap_token"))
        self.pair.client.bootstrap_token = "wrong"
        error = self.failureResultOf(self.connect(), OperationError).value.error
        self.assertEqual((error.code, error.opaque["status"]), (AGENT.TOKEN_REFUSED, 403))
        self.assertIsNone(self.pair.client.secret_for(base(0)))

    def test_right_token_connects_and_commands(self) -> None:
        """
        With the same token on both sides the host connects and commands complete.
        """
        self.pair.client.bootstrap_token = TOKEN
        self.successResultOf(self.connect())
        d = self.pair.client.call(base(0), p.HostCapacityCmd())
        self.pair.flush()
        self.assertTrue(self.successResultOf(d).success)


class _ConnectedAgent(SynchronousTestCase):
    """
    An agent of two hosts, host 0 connected with L{SECRET} and callbacks under
    L{CALLBACK_URL}; time on a Clock.
    """

    def setUp(self) -> None:
        self.http = RecordingHTTP()
        self.clock = Clock()
        self.agent, _ = make_agent(self.http, self.clock, host_count=2,
                                   policy=CallbackPolicy(time_slice=None))
        self.stub = StubTreq(self.agent.app.resource())
        cmd = p.ConnectCmd(host_uuid="h", callback_secret=SECRET,
                           callback_url_prefixes=[CALLBACK_URL])
        self.assertEqual(_post(self.stub, self, base(0) + p.CONNECT_PATH, cmd.to_json())[0],
                         200)

    def command(self, callback: bytes | str, taskuuid: str = "t", body: bytes = b"{}",
                signature: str | None = None, path: str = "/host/capacity",
                signed_path: str | None = None, signed_callback: str | None = None,
                expiry: float = 300.0) -> tuple[int, bytes]:
        """
        POST a command to C{path}, signed as the node signs it (for C{signed_path} and
        C{signed_callback} if given), or with C{signature}.
        """
        text = callback if isinstance(callback, str) else callback.decode("latin-1")
        headers: dict[str, Any] = command_headers(
            SECRET, base(0) + path, taskuuid, body, signed_callback or text, expiry=expiry,
            path=signed_path)
        headers["callbackurl"] = callback
        if signature is not None:
            headers[p.SIGNATURE_HEADER] = signature
        return _post(self.stub, self, base(0) + path, body, headers)


class CallbackUrlTests(_ConnectedAgent):
    """
    A host calls back only under the management-node URLs agreed at connect.
    """

    def test_unsigned_command_refused(self) -> None:
        """
        Fault (issue 8 item 10): anyone reaching an agent could command a connected host
        (destroy its VMs) by naming the management node's callback URL. A command not signed
        with the host's secret is refused with 403 before its body is parsed; nothing runs.
        """
        parsed: list = []
        real = p.loads
        self.patch(p, "loads", lambda *a, **k: parsed.append(a) or real(*a, **k))
        path, cb, exp = "/host/capacity", CALLBACK_URL, p.format_expiry(300)
        for i, signature in enumerate([
                "", "00" * 32, p.sign_command("other", path, "t2", cb, exp, b"{}"),
                p.sign_command(SECRET, path, "another-task", cb, exp, b"{}"),
                p.sign(SECRET, "t4", b"{}"),
                p.sign_report(SECRET, path, "t5", b"{}")]):
            code, body = self.command(CALLBACK_URL, taskuuid=f"t{i}", signature=signature)
            self.assertEqual((code, body), (403, b"bad or missing signature"))
        self.assertEqual((parsed, self.http.posts, self.agent.stats["accepted"]), ([], [], 0))

    def test_foreign_callback_url_refused(self) -> None:
        """
        Fault (issue 8 item 10b): any command could carry any callbackurl and the agent POSTed
        the host's result there. A URL not under the agreed prefix is refused with 403 before
        the command runs, and nothing is POSTed; the kinds of look-alike URL are refused too.
        """
        mn = "http://mn.example:8080"
        for i, url in enumerate([
            "http://evil.example/cb",
            f"{mn}/elsewhere",
            f"{mn}/zstack/asyncrest/callbackx",
            f"{mn}/zstack/asyncrest/callback/../../../x",
            "http://mn.example:80801/zstack/asyncrest/callback",
            "http://mn.example:8080@evil.example/zstack/asyncrest/callback",
            "http://user@mn.example:8080/zstack/asyncrest/callback",
            "https://mn.example:8080/zstack/asyncrest/callback",
            "ftp://mn.example:8080/zstack/asyncrest/callback",
            f"{mn}/zstack/asyncrest/callback?x=1",
            "http://[::1/zstack",
            "not a url",
        ]):
            code, body = self.command(url, taskuuid=f"t{i}")
            self.assertEqual(code, 403, url)
            self.assertIn(b"not under the management node URLs", body)
        self.assertEqual(self.http.posts, [])
        self.assertEqual(self.agent.stats["accepted"], 0)

    def test_agreed_callback_url_accepted(self) -> None:
        """
        The agreed URL itself (and the same with an explicit default port) is accepted.
        """
        self.assertEqual(self.command(CALLBACK_URL), (200, b""))
        self.assertEqual([post.url for post in self.http.posts], [CALLBACK_URL])
        self.assertTrue(p.url_under("http://mn/cb", ["http://mn:80/cb"]))
        self.assertTrue(p.url_under("http://mn:8080/cb/sub", ["http://mn:8080/cb"]))

    def test_non_ascii_callback_header(self) -> None:
        """
        Fault (issue 8 item 10e): a callbackurl header that is not UTF-8 raised
        UnicodeDecodeError in the request (a 500 and a traceback); it is a 400.
        """
        code, _ = self.command(b"http://mn.example:8080/\xff")
        self.assertEqual(code, 400)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_default_prefix_is_send_command_origin(self) -> None:
        """
        A connect naming no prefixes admits the origin of its sendCommandUrl only; one with
        neither admits nothing.
        """
        cmd = p.ConnectCmd(host_uuid="h", callback_secret="x",
                           send_command_url="http://mn:8080/zstack/asyncrest/sendcommand")
        self.assertEqual(p.allowed_callback_prefixes(cmd), ("http://mn:8080/",))
        self.assertEqual(
            p.allowed_callback_prefixes(p.ConnectCmd(host_uuid="h", callback_secret="x")), ())

    def test_client_sends_its_callback_url(self) -> None:
        """
        The agent client agrees its own callback URL at connect.
        """
        http = RecordingHTTP()
        client = AgentClient(Clock(), http, CALLBACK_URL)
        client.connect(base(0), "h")
        cmd = p.ConnectCmd.from_json(http.posts[0].data)
        self.assertEqual(cmd.callback_url_prefixes, [CALLBACK_URL])


class CommandBindingTests(_ConnectedAgent):
    """
    A command's signature binds its path, callback URL, expiry and task (issue 8 item 10,
    second round): a captured command is valid for that one use only.
    """

    def test_signature_bound_to_path(self) -> None:
        """
        Fault (issue 8 item 10): a command's signature covered only its task uuid and body,
        and the reader ignores unknown fields, so a captured C{/vm/stop} (body and signature)
        was accepted at C{/vm/destroy}: a man in the middle re-sent it to any path. A command
        signed for one path is refused (403) at every other one; nothing runs.
        """
        body = p.StopVmCmd(uuid="vm-1").to_json()
        others = [path for path, d in p.COMMANDS.items() if not d.sync and path != "/vm/stop"]
        self.assertIn("/vm/destroy", others)
        for i, path in enumerate(others):
            code, text = self.command(CALLBACK_URL, taskuuid=f"t{i}", body=body, path=path,
                                      signed_path="/vm/stop")
            self.assertEqual((code, text), (403, b"bad or missing signature"), path)
        self.assertEqual((self.agent.stats["accepted"], self.http.posts), (0, []))
        # The same command at its own path is accepted.
        self.assertEqual(self.command(CALLBACK_URL, taskuuid="mine", body=body,
                                      path="/vm/stop"), (200, b""))

    def test_signature_bound_to_callback_url(self) -> None:
        """
        Fault (issue 8 item 10): the C{callbackurl} header was not signed, so a captured
        command could be re-sent with another callback URL (one under the agreed prefix: the
        result goes elsewhere). A command signed for one callback URL is refused with another.
        """
        code, text = self.command(CALLBACK_URL + "/elsewhere", taskuuid="t",
                                  signed_callback=CALLBACK_URL)
        self.assertEqual((code, text), (403, b"bad or missing signature"))
        self.assertEqual((self.agent.stats["accepted"], self.http.posts), (0, []))

    def test_replay_after_task_memory_expired(self) -> None:
        """
        Fault (issue 8 item 10): a command had no age, so anyone holding a captured command
        could replay it once its task uuid left L{TaskMemory} (ttl 3600 s): the VM stopped
        again an hour later. A command carries a signed expiry; replayed after it (beyond the
        clock skew allowance) it is refused with 403, and the agent remembers task uuids at
        least as long as any expiry it admits.
        """
        body = p.StopVmCmd(uuid="vm-1").to_json()
        headers = command_headers(SECRET, base(0) + "/vm/stop", "t1", body, CALLBACK_URL,
                                  expiry=300.0)
        url = base(0) + "/vm/stop"
        self.assertEqual(_post(self.stub, self, url, body, headers), (200, b""))
        self.clock.advance(300 + self.agent.clock_skew - 1)  # within the skew: a duplicate
        self.assertEqual(_post(self.stub, self, url, body, headers), (200, b""))
        self.assertEqual(self.agent.stats["duplicates"], 1)
        self.clock.advance(self.agent.tasks.ttl)  # the task uuid is forgotten by now
        code, text = _post(self.stub, self, url, body, headers)
        self.assertEqual(code, 403)
        self.assertIn(b"expired", text)
        self.assertEqual(self.agent.stats["accepted"], 1)
        self.assertGreaterEqual(self.agent.tasks.ttl,
                                self.agent.max_command_age + 2 * self.agent.clock_skew)

    def test_expiry_too_far_or_malformed(self) -> None:
        """
        A command whose expiry lies further ahead than the agent admits (it would outlive the
        task memory) is refused with 403; a missing or malformed expiry header is a 400.
        """
        now = self.clock.seconds()
        limit = now + self.agent.max_command_age + self.agent.clock_skew
        self.assertEqual(self.command(CALLBACK_URL, taskuuid="far", expiry=limit + 1)[0], 403)
        self.assertEqual(self.command(CALLBACK_URL, taskuuid="ok", expiry=limit), (200, b""))
        for i, bad in enumerate(["", "nan", "inf", "-1", "1e9", "12.5.1", "0x10",
                                 "\u0661"]):
            headers = command_headers(SECRET, base(0) + "/host/capacity", f"b{i}", b"{}",
                                      CALLBACK_URL)
            headers[p.EXPIRY_HEADER] = bad
            code, text = _post(self.stub, self, base(0) + "/host/capacity", b"{}", headers)
            self.assertEqual(code, 400, bad)
            self.assertIn(p.EXPIRY_HEADER.encode(), text)
        headers = command_headers(SECRET, base(0) + "/host/capacity", "none", b"{}",
                                  CALLBACK_URL)
        del headers[p.EXPIRY_HEADER]
        self.assertEqual(_post(self.stub, self, base(0) + "/host/capacity", b"{}",
                               headers)[0], 400)
        self.assertEqual(self.agent.stats["accepted"], 1)

    def test_task_memory_must_outlive_expiries(self) -> None:
        """
        An agent whose task memory would forget uuids before the commands they name expire
        is refused at construction.
        """
        from agent.app import AgentApp, TaskMemory

        clock = Clock()
        self.assertRaises(ValueError, AgentApp, clock, self.http, lambda k: None, [],
                          tasks=TaskMemory(clock, ttl=600.0))
        AgentApp(clock, self.http, lambda k: None, [], tasks=TaskMemory(clock, ttl=600.0),
                 max_command_age=400.0, clock_skew=100.0)

    def test_node_signs_path_callback_and_deadline(self) -> None:
        """
        The agent client signs what the agent checks: the command's path, its callback URL
        and its deadline as the expiry (capped at what agents admit).
        """
        clock = Clock()
        clock.advance(1000)
        http = RecordingHTTP()
        client = AgentClient(clock, http, CALLBACK_URL)
        client._secrets[base(0)] = SECRET
        client.call(base(0), p.StopVmCmd(uuid="vm-1"), timeout=50)
        client.call(base(0), p.StopVmCmd(uuid="vm-2"), timeout=10 * p.MAX_COMMAND_AGE)
        expiries = []
        for post in http.posts:
            expiry = post.header(p.EXPIRY_HEADER)
            expiries.append(expiry)
            self.assertTrue(p.verify_command(SECRET, "/vm/stop", post.header("taskuuid"),
                                             CALLBACK_URL, expiry, post.data,
                                             post.header(p.SIGNATURE_HEADER)))
            self.assertFalse(p.verify_command(SECRET, "/vm/destroy", post.header("taskuuid"),
                                              CALLBACK_URL, expiry, post.data,
                                              post.header(p.SIGNATURE_HEADER)))
        self.assertEqual(expiries, ["1050.000", p.format_expiry(1000 + p.MAX_COMMAND_AGE)])

    def test_labels_distinct(self) -> None:
        """
        Fault (issue 8 item 10): reports and callbacks shared one signature, so a report's
        signature was valid as a callback's of the same task uuid and body. Each kind has its
        own label: no signature of one kind verifies as another.
        """
        body, task, path = b"{}", "t", p.REPORT_VM_STATE_PATH
        report = p.sign_report(SECRET, path, task, body)
        callback = p.sign(SECRET, task, body)
        self.assertNotEqual(report, callback)
        self.assertFalse(p.verify(SECRET, task, body, report))
        self.assertFalse(p.verify_report(SECRET, path, task, body, callback))
        self.assertFalse(p.verify_report(SECRET, "/other", task, body, report))
        self.assertTrue(p.verify_report(SECRET, path, task, body, report))
        # A field with a line break is never signed nor verified (the string would be
        # ambiguous).
        self.assertRaises(ValueError, p.sign, SECRET, "a\nb", body)
        self.assertFalse(p.verify(SECRET, "a\nb", body, "00"))


class AgentHostileInputTests(SynchronousTestCase):
    """
    No body raises past the agent's endpoints.
    """

    def setUp(self) -> None:
        self.http = RecordingHTTP()
        self.agent, _ = make_agent(self.http, Clock(), host_count=2,
                                   policy=CallbackPolicy(time_slice=None))
        self.stub = StubTreq(self.agent.app.resource())
        cmd = p.ConnectCmd(host_uuid="h", callback_secret=SECRET,
                           callback_url_prefixes=[CALLBACK_URL])
        _post(self.stub, self, base(0) + p.CONNECT_PATH, cmd.to_json())

    def test_hostile_bodies(self) -> None:
        """
        Fault (issue 8 item 10e): deeply nested JSON raised RecursionError out of the decoder
        (a 500 with a traceback); huge integers, NaN/Infinity and lone surrogates got through
        or raised later. Every such body gets 400, on a synchronous and an asynchronous URI.
        """
        for i, body in enumerate(HOSTILE_BODIES):
            code, _ = _post(self.stub, self, base(0) + p.CONNECT_PATH, body)
            self.assertEqual(code, 400, body[:40])
            code, _ = _post(self.stub, self, base(0) + "/vm/start", body,
                            command_headers(SECRET, base(0) + "/vm/start", f"t{i}", body,
                                            CALLBACK_URL))
            self.assertEqual(code, 400, body[:40])
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(self.http.posts, [])

    def test_oversized_body(self) -> None:
        """
        A body over the limit is refused (413 here and from the site, see
        L{tests.test_agent_tls}; 400 from the decoder of a synchronous URI).
        """
        body = b'{"vmUuids": [' + b'"x",' * (p.MAX_BODY_SIZE // 4) + b'"x"]}'
        code, text = _post(self.stub, self, base(0) + "/vm/checkstate", body,
                           command_headers(SECRET, base(0) + "/vm/checkstate", "big", body,
                                           CALLBACK_URL))
        self.assertEqual(code, 413)
        code, text = _post(self.stub, self, base(0) + p.CONNECT_PATH, body)
        self.assertEqual(code, 400)
        self.assertIn(b"over the limit", text)

    def test_loads_kinds(self) -> None:
        """
        L{p.loads} refuses each kind with ProtocolError and nothing else.
        """
        for body in HOSTILE_BODIES[:7]:
            self.assertRaises(p.ProtocolError, p.loads, body)
        self.assertRaises(p.ProtocolError, p.loads, b"-1e400")
        self.assertRaises(p.ProtocolError, p.loads, b"Infinity")
        self.assertEqual(p.loads(b'{"a": [1, 2.5, "\\ud83d\\ude00"]}'),
                         {"a": [1, 2.5, "\U0001f600"]})
        self.assertEqual(p.loads(str(p.MAX_INT).encode()), p.MAX_INT)
        self.assertRaises(p.ProtocolError, p.loads, str(p.MAX_INT + 1).encode())


class NodeHostileInputTests(SynchronousTestCase):
    """
    No body raises past the management node's callback and report endpoints, and no unsigned
    body is parsed.
    """

    def setUp(self) -> None:
        self.http = RecordingHTTP()
        self.client = AgentClient(Clock(), self.http, CALLBACK_URL)
        self.client._secrets[base(0)] = SECRET
        self.client._base_of_host["h0"] = base(0)
        self.endpoint = CallbackEndpoint(self.client)
        self.got: list = []
        self.endpoint.on_report(p.REPORT_VM_STATE_PATH, self.got.append)
        self.stub = StubTreq(self.endpoint.resource())

    def callback(self, taskuuid: str, body: bytes, signed: bool = True) -> int:
        headers = {"taskuuid": taskuuid}
        if signed:
            headers[p.SIGNATURE_HEADER] = p.sign(SECRET, taskuuid, body)
        return _post(self.stub, self, "http://mn" + self.endpoint.path, body, headers)[0]

    def report(self, body: bytes, signed: bool = True, taskuuid: str = "r") -> int:
        headers = {p.COMMAND_PATH_HEADER: p.REPORT_VM_STATE_PATH,
                   p.RESOURCE_UUID_HEADER: "h0", "taskuuid": taskuuid}
        if signed:
            headers[p.SIGNATURE_HEADER] = p.sign_report(SECRET, p.REPORT_VM_STATE_PATH,
                                                        taskuuid, body)
        return _post(self.stub, self, "http://mn" + self.endpoint.send_command_path, body,
                     headers)[0]

    def test_unsigned_bodies_not_parsed(self) -> None:
        """
        Fault (issue 8 item 10e): the callback body was parsed as JSON before its signature
        was checked, so anyone could make the node parse anything (and deep nesting raised).
        An unsigned callback or report is refused with 403 without being parsed.
        """
        parsed: list = []
        real = p.loads
        self.patch(p, "loads", lambda *a, **k: parsed.append(a) or real(*a, **k))
        d = self.client.call(base(0), p.HostCapacityCmd())
        taskuuid = self.http.posts[0].header("taskuuid")
        for body in HOSTILE_BODIES:
            self.assertEqual(self.callback(taskuuid, body, signed=False), 403)
            self.assertEqual(self.report(body, signed=False), 403)
        self.assertEqual(parsed, [])
        self.assertNoResult(d)
        d.cancel()
        self.failureResultOf(d)

    def test_signed_hostile_bodies(self) -> None:
        """
        Fault (issue 8 item 10e): a deeply nested (or otherwise hostile) signed callback or
        report raised RecursionError past the endpoint (500, traceback). Each is a 400.
        """
        for i, body in enumerate(HOSTILE_BODIES):
            d = self.client.call(base(0), p.HostCapacityCmd())
            taskuuid = self.http.posts[-1].header("taskuuid")
            self.assertEqual(self.callback(taskuuid, body), 400, body[:40])
            self.assertEqual(self.report(body, taskuuid=f"r{i}"), 400, body[:40])
            d.cancel()
            self.failureResultOf(d)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(self.got, [])

    def test_wrong_types_fail_the_task(self) -> None:
        """
        A signed callback of the wrong shape fails its task with SYS.1015 rather than raising.
        """
        d = self.client.call(base(0), p.HostCapacityCmd())
        taskuuid = self.http.posts[-1].header("taskuuid")
        body = json.dumps({"cpuNum": [[[]]], "success": "yes"}).encode()
        self.assertEqual(self.callback(taskuuid, body), 400)
        self.assertEqual(self.failureResultOf(d, OperationError).value.error.code, "SYS.1015")

    def test_command_not_reflectable_as_callback(self) -> None:
        """
        A command's signature is labelled: a captured command (task uuid, body, signature)
        POSTed back to the callback endpoint does not complete its task (a command body such
        as C{{}} would otherwise decode as a successful response).
        """
        d = self.client.call(base(0), p.HostCapacityCmd())
        post = self.http.posts[-1]
        taskuuid = post.header("taskuuid")
        self.assertTrue(p.verify_command(SECRET, "/host/capacity", taskuuid, CALLBACK_URL,
                                         post.header(p.EXPIRY_HEADER), post.data,
                                         post.header(p.SIGNATURE_HEADER)))
        code = _post(self.stub, self, "http://mn" + self.endpoint.path, post.data,
                     {"taskuuid": taskuuid,
                      p.SIGNATURE_HEADER: post.header(p.SIGNATURE_HEADER)})[0]
        self.assertEqual(code, 403)
        self.assertNoResult(d)
        d.cancel()
        self.failureResultOf(d)

    def test_oversized_callback(self) -> None:
        """
        A callback over the size limit is refused (413) before its signature is computed.
        """
        d = self.client.call(base(0), p.HostCapacityCmd())
        taskuuid = self.http.posts[-1].header("taskuuid")
        body = b" " * (p.MAX_BODY_SIZE + 1)
        self.assertEqual(self.client.complete(taskuuid, body, "x"), (413, self.client.complete(
            taskuuid, body, "x")[1]))
        self.assertEqual(self.callback(taskuuid, body, signed=False), 413)
        self.assertNoResult(d)
        d.cancel()
        self.failureResultOf(d)
