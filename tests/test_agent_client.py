"""
The management side's agent client and callback endpoint, in memory: a recording HTTP client
or StubTreq, and task.Clock for timeouts and deadlines.
"""

from __future__ import annotations

import json

from treq.testing import StubTreq
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived
from zope.interface.verify import verifyObject

from agent import protocol as p
from agent.hypervisor.simulator import parse_latency
from tests.agent_fakes import CALLBACK_URL, InMemoryPair, RecordingHTTP, base
from zcontrol.agentclient import AgentClient, CallbackEndpoint, IAgentClient
from zcontrol.agentclient.client import AGENT_LOST_WORK, NOT_SENT
from zcontrol.bus._pending import deadline_scope
from zcontrol.core.errors import SYS, OperationError, from_failure

SECRET = "s3cret"


def connected_client(clock: Clock, http: RecordingHTTP, timeout: float = 30.0) -> AgentClient:
    client = AgentClient(clock, http, CALLBACK_URL, default_timeout=timeout)
    client._secrets[base(0)] = SECRET
    return client


class ClientTests(SynchronousTestCase):
    """
    AgentClient against a recording HTTP client.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.http = RecordingHTTP()
        self.client = connected_client(self.clock, self.http)

    def callback(self, taskuuid: str, rsp: p.Response, secret: str = SECRET) -> tuple[int, str]:
        body = rsp.to_json()
        return self.client.complete(taskuuid, body, p.sign(secret, taskuuid, body))

    def test_provides_interface(self) -> None:
        """
        AgentClient provides IAgentClient.
        """
        self.assertTrue(verifyObject(IAgentClient, self.client))

    def test_async_call_headers(self) -> None:
        """
        An asynchronous command is POSTed to base URL + path with a taskuuid and the callback
        URL, and stays pending after the agent's 200.
        """
        d = self.client.call(base(0), p.HostCapacityCmd())
        [post] = self.http.posts
        self.assertEqual(post.url, base(0) + "/host/capacity")
        self.assertEqual(post.header("callbackurl"), CALLBACK_URL)
        taskuuid = post.header("taskuuid")
        self.assertTrue(taskuuid)
        post.answer(200)
        self.assertNoResult(d)
        self.assertTrue(self.client.is_pending(taskuuid))

    def test_callback_completes_once(self) -> None:
        """
        A signed callback completes the call with the decoded response (200); the same callback
        again gets 404 and changes nothing.
        """
        d = self.client.call(base(0), p.HostCapacityCmd())
        post = self.http.posts[0]
        post.answer(200)
        taskuuid = post.header("taskuuid")
        rsp = p.HostCapacityRsp(cpu_num=8)
        self.assertEqual(self.callback(taskuuid, rsp), (200, ""))
        self.assertEqual(self.successResultOf(d), rsp)
        self.assertEqual(self.callback(taskuuid, rsp)[0], 404)
        self.assertEqual(len(self.client), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_callback_before_accept(self) -> None:
        """
        A callback that overtakes the agent's 200 completes the call; the late 200 is ignored.
        """
        d = self.client.call(base(0), p.HostCapacityCmd())
        post = self.http.posts[0]
        self.assertEqual(self.callback(post.header("taskuuid"), p.HostCapacityRsp())[0], 200)
        post.answer(200)
        self.assertIsInstance(self.successResultOf(d), p.HostCapacityRsp)

    def test_timeout(self) -> None:
        """
        No callback: the call fails with SYS.1001 naming the URL, the pending entry is gone,
        and a late callback gets 404.
        """
        d = self.client.call(base(0), p.StartVmCmd(vm_instance_uuid="v", cpu_num=1,
                                                   memory_size=1), timeout=10)
        post = self.http.posts[0]
        post.answer(200)
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        err = self.failureResultOf(d, OperationError).value.error
        self.assertEqual(err.code, SYS.TIMEOUT)
        self.assertIn(base(0) + "/vm/start", err.details)
        self.assertEqual(len(self.client), 0)
        self.assertEqual(self.callback(post.header("taskuuid"), p.StartVmRsp())[0], 404)

    def test_timeout_names_callback_url(self) -> None:
        """
        Fault (issue 8, host add item 3): an async command the agent accepted (200) whose
        callback never came (agents call back to a wrong C{http.public_url}) timed out as
        "no callback after Ns", with nothing saying that the agent took the command nor
        where it was told to call back. The timeout of every async command now says the
        agent accepted it and names the callback URL (details and C{callbackUrl});
        one the agent never answered says so instead.
        """
        for cmd in (p.HostFactCmd(), p.HostCapacityCmd(),
                    p.StartVmCmd(vm_instance_uuid="v", cpu_num=1, memory_size=1)):
            d = self.client.call(base(0), cmd, timeout=10)
            self.http.posts[-1].answer(200)
            self.clock.advance(10)
            err = self.failureResultOf(d, OperationError).value.error
            self.assertEqual(err.code, SYS.TIMEOUT)
            self.assertIn("accepted the command but its callback never reached", err.details)
            self.assertIn(CALLBACK_URL, err.details)
            self.assertIn("http.public_url", err.details)
            self.assertEqual(err.opaque["callbackUrl"], CALLBACK_URL)
            self.assertIs(err.opaque["accepted"], True)
        d = self.client.call(base(0), p.HostCapacityCmd(), timeout=5)
        self.clock.advance(5)
        err = self.failureResultOf(d, OperationError).value.error
        self.assertIn("did not answer the POST", err.details)
        self.assertNotIn("accepted the command", err.details)
        self.assertEqual(err.opaque["callbackUrl"], CALLBACK_URL)
        self.assertIs(err.opaque["accepted"], False)

    def test_timeout_cancels_unanswered_accept(self) -> None:
        """
        A timeout while the accept POST is unanswered cancels that POST too.
        """
        d = self.client.call(base(0), p.HostCapacityCmd(), timeout=5)
        post = self.http.posts[0]
        self.clock.advance(5)
        self.assertEqual(self.failureResultOf(d, OperationError).value.error.code, SYS.TIMEOUT)
        self.assertTrue(post.result.called)

    def test_deadline_caps_timeout(self) -> None:
        """
        The caller's deadline (absolute, on the client's clock) caps the timeout.
        """
        self.clock.advance(100)
        d = self.client.call(base(0), p.HostCapacityCmd(), timeout=60, deadline=103)
        self.http.posts[0].answer(200)
        self.clock.advance(3)
        self.assertEqual(self.failureResultOf(d, OperationError).value.error.code, SYS.TIMEOUT)

    def test_deadline_passed(self) -> None:
        """
        A deadline already passed fails at once with SYS.1001, sending nothing.
        """
        self.clock.advance(100)
        d = self.client.call(base(0), p.HostCapacityCmd(), deadline=99)
        self.assertEqual(self.failureResultOf(d, OperationError).value.error.code, SYS.TIMEOUT)
        self.assertEqual(self.http.posts, [])

    def test_non_2xx_accept(self) -> None:
        """
        A non-2xx answer to the command fails it with SYS.1015 and the status.
        """
        d = self.client.call(base(0), p.HostCapacityCmd())
        self.http.posts[0].answer(409, b"host 0 is not connected")
        err = self.failureResultOf(d, OperationError).value.error
        self.assertEqual(err.code, SYS.HTTP_ERROR)
        self.assertEqual(err.opaque["status"], 409)
        self.assertIn("not connected", err.details)
        self.assertEqual(len(self.client), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connection_refused(self) -> None:
        """
        A connection error fails the call with SYS.1016.
        """
        d = self.client.call(base(0), p.HostCapacityCmd())
        self.http.posts[0].result.errback(Failure(ConnectionRefusedError()))
        err = self.failureResultOf(d, OperationError).value.error
        self.assertEqual(err.code, SYS.IO_ERROR)
        self.assertEqual(len(self.client), 0)

    def test_broken_exchange_retried_once(self) -> None:
        """
        An exchange that broke before any answer (a stale pooled connection) is resent once
        with the same taskuuid; a second break fails with SYS.1015.
        """
        d = self.client.call(base(0), p.HostCapacityCmd())
        first = self.http.posts[0]
        first.result.errback(Failure(ResponseNeverReceived([Failure(Exception("reset"))])))
        self.assertEqual(len(self.http.posts), 2)
        second = self.http.posts[1]
        self.assertEqual(second.header("taskuuid"), first.header("taskuuid"))
        second.result.errback(Failure(ResponseNeverReceived([Failure(Exception("reset"))])))
        self.assertEqual(self.failureResultOf(d, OperationError).value.error.code,
                         SYS.HTTP_ERROR)

    def test_not_connected(self) -> None:
        """
        An asynchronous command to a host with no agreed secret fails without being sent.
        """
        d = self.client.call(base(1), p.HostCapacityCmd())
        self.failureResultOf(d, OperationError)
        self.assertEqual(self.http.posts, [])

    def test_not_a_command(self) -> None:
        """
        A message that is not a command of the contract is refused.
        """
        d = self.client.call(base(0), p.NicTO(mac="m"))
        self.assertEqual(self.failureResultOf(d, OperationError).value.error.code,
                         SYS.INVALID_ARGUMENT_ERROR)

    def test_cancel(self) -> None:
        """
        Cancelling a call fails it with SYS.1017 and forgets the task.
        """
        d = self.client.call(base(0), p.HostCapacityCmd())
        post = self.http.posts[0]
        post.answer(200)
        d.cancel()
        self.assertEqual(from_failure(self.failureResultOf(d)).code, SYS.CANCEL)
        self.assertEqual(len(self.client), 0)
        self.assertEqual(self.callback(post.header("taskuuid"), p.HostCapacityRsp())[0], 404)

    def test_agent_failure(self) -> None:
        """
        A response with success=false fails the call with SYS.1006 carrying the agent's error,
        unless the caller asks for the response.
        """
        d = self.client.call(base(0), p.RebootVmCmd(uuid="v"))
        d2 = self.client.call(base(0), p.RebootVmCmd(uuid="v"), raise_on_failure=False)
        for post in self.http.posts:
            post.answer(200)
            self.callback(post.header("taskuuid"),
                          p.RebootVmRsp(success=False, error="VM v is Stopped"))
        err = self.failureResultOf(d, OperationError).value.error
        self.assertEqual(err.code, SYS.OPERATION_ERROR)
        self.assertIn("VM v is Stopped", err.details)
        self.assertFalse(self.successResultOf(d2).success)

    def test_forged_callback(self) -> None:
        """
        A callback signed with another secret, or not signed, gets 403 and the task stays
        pending.
        """
        d = self.client.call(base(0), p.HostCapacityCmd())
        taskuuid = self.http.posts[0].header("taskuuid")
        body = p.HostCapacityRsp().to_json()
        self.assertEqual(self.client.complete(taskuuid, body, None)[0], 403)
        self.assertEqual(
            self.client.complete(taskuuid, body, p.sign("other", taskuuid, body))[0], 403
        )
        self.assertEqual(self.client.complete(taskuuid, body, "zz")[0], 403)
        self.assertNoResult(d)
        self.assertTrue(self.client.is_pending(taskuuid))

    def test_replay_on_other_task(self) -> None:
        """
        A genuine callback of one task replayed under another task's uuid gets 403: the
        signature binds the task uuid.
        """
        d1 = self.client.call(base(0), p.HostCapacityCmd())
        d2 = self.client.call(base(0), p.HostCapacityCmd())
        t1, t2 = (post.header("taskuuid") for post in self.http.posts)
        body = p.HostCapacityRsp(cpu_num=1).to_json()
        signature = p.sign(SECRET, t1, body)
        self.assertEqual(self.client.complete(t2, body, signature)[0], 403)
        self.assertEqual(self.client.complete(t1, body, signature)[0], 200)
        self.assertEqual(self.client.complete(t1, body, signature)[0], 404)
        self.successResultOf(d1)
        self.assertNoResult(d2)
        d2.cancel()
        self.failureResultOf(d2)

    def test_malformed_json(self) -> None:
        """
        Fault (issue 8 item 10): a signed callback whose body is not JSON got 400 but left its
        task pending until its timeout, while a signed body of the wrong type failed the
        task. Once the signature checks, both fail the task at once with SYS.1015 (its agent
        will not send a better one); an unsigned one (403) or one without taskuuid (400)
        completes nothing.
        """
        d = self.client.call(base(0), p.HostCapacityCmd())
        self.http.posts[0].answer(200)
        taskuuid = self.http.posts[0].header("taskuuid")
        body = b"{not json"
        self.assertEqual(self.client.complete(taskuuid, body, None)[0], 403)
        self.assertEqual(self.client.complete(None, b"{}", None)[0], 400)
        self.assertNoResult(d)
        self.assertEqual(self.client.complete(taskuuid, body, p.sign(SECRET, taskuuid, body))[0],
                         400)
        err = self.failureResultOf(d, OperationError).value.error
        self.assertEqual(err.code, SYS.HTTP_ERROR)
        self.assertIn("malformed", err.details)
        self.assertFalse(self.client.is_pending(taskuuid))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_signed_but_wrong_type(self) -> None:
        """
        A signed callback whose body is not the command's response gets 400 and fails the call
        with SYS.1015.
        """
        d = self.client.call(base(0), p.HostCapacityCmd())
        taskuuid = self.http.posts[0].header("taskuuid")
        body = json.dumps({"cpuNum": "eight"}).encode()
        self.assertEqual(self.client.complete(taskuuid, body, p.sign(SECRET, taskuuid, body))[0],
                         400)
        self.assertEqual(self.failureResultOf(d, OperationError).value.error.code,
                         SYS.HTTP_ERROR)

    def test_sync_call(self) -> None:
        """
        A synchronous command is POSTed without taskuuid and answered inline.
        """
        d = self.client.call(base(3), p.PingCmd(host_uuid="h"))
        [post] = self.http.posts
        self.assertIsNone(post.header("taskuuid"))
        post.answer(200, p.PingRsp(host_uuid="h").to_json())
        self.assertEqual(self.successResultOf(d).host_uuid, "h")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_sync_timeout(self) -> None:
        """
        A synchronous command unanswered within its timeout fails with SYS.1001.
        """
        d = self.client.call(base(3), p.EchoCmd(), timeout=2)
        self.clock.advance(2)
        self.assertEqual(self.failureResultOf(d, OperationError).value.error.code, SYS.TIMEOUT)

    def test_sync_errors(self) -> None:
        """
        A synchronous command answered non-2xx fails with SYS.1015, one refused with SYS.1016.
        """
        d1 = self.client.call(base(3), p.EchoCmd())
        d2 = self.client.call(base(3), p.EchoCmd())
        self.http.posts[0].answer(404, b"no host 3 here")
        self.http.posts[1].result.errback(Failure(ConnectionRefusedError()))
        self.assertEqual(self.failureResultOf(d1, OperationError).value.error.code,
                         SYS.HTTP_ERROR)
        self.assertEqual(self.failureResultOf(d2, OperationError).value.error.code, SYS.IO_ERROR)

    def test_connect_agrees_secret(self) -> None:
        """
        connect sends a fresh secret and uses it for the host's callbacks once connected.
        """
        d = self.client.connect(base(2), "host-2")
        [post] = self.http.posts
        cmd = p.ConnectCmd.from_json(post.data)
        self.assertEqual(cmd.host_uuid, "host-2")
        self.assertEqual(len(cmd.callback_secret), 64)
        self.assertIsNone(self.client.secret_for(base(2)))
        post.answer(200, p.ConnectRsp().to_json())
        self.successResultOf(d)
        self.assertEqual(self.client.secret_for(base(2)), cmd.callback_secret)
        self.client.forget(base(2))
        self.assertIsNone(self.client.secret_for(base(2)))


class DeadlineAndSlotTests(SynchronousTestCase):
    """
    Deadlines inherited from the bus, per-host slots, "not sent" and lost work (issue 8
    items 6, 7 and 8).
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.http = RecordingHTTP()
        self.client = AgentClient(self.clock, self.http, CALLBACK_URL, default_timeout=300,
                                  max_in_flight=4, max_in_flight_per_host=2,
                                  accept_timeout=10)
        for i in range(4):
            self.client._secrets[base(i)] = SECRET

    def test_inherits_bus_deadline(self) -> None:
        """
        Fault (issue 8 item 6): an agent call made while handling a bus message ignored that
        message's deadline and waited its own (300 s) timeout. A call without C{deadline}
        now inherits the current bus deadline.
        """
        d = deadline_scope(7.0, self.client.call, base(0), p.HostCapacityCmd())
        self.http.posts[0].answer(200)
        self.clock.advance(7)
        self.assertEqual(self.failureResultOf(d, OperationError).value.error.code, SYS.TIMEOUT)
        sync = deadline_scope(9.0, self.client.call, base(1), p.EchoCmd())
        self.clock.advance(2)
        self.assertEqual(self.failureResultOf(sync, OperationError).value.error.code,
                         SYS.TIMEOUT)

    def serve(self, base_url: str) -> None:
        """
        Answer every POST to C{base_url} still unanswered: echoes inline, asynchronous
        commands with 200 and then their signed callback.
        """
        for post in self.http.posts:
            if not post.url.startswith(base_url + "/") or post.result.called:
                continue
            if post.url.endswith("/host/echo"):
                post.answer(200, p.EchoRsp().to_json())
                continue
            post.answer(200)
            taskuuid = post.header("taskuuid")
            body = p.HostCapacityRsp(cpu_num=2).to_json()
            self.assertEqual(self.client.complete(taskuuid, body, p.sign(SECRET, taskuuid,
                                                                         body))[0], 200)

    def test_hung_hosts_do_not_starve_healthy_ones(self) -> None:
        """
        Fault (issue 8 item 7): the in-flight limit was only global, so hosts that accept TCP
        and never answer filled it and a healthy host's call timed out without being sent.

        Fault (issue 8 item 7): a share per host (2 of the 4 global slots here) was not
        enough: an unanswered POST had no timeout of its own and held its slots until its
        command's timeout (300 s), so more than 4 / 2 hung hosts still took every global
        slot (the earlier version of this test passed only because it failed a hung exchange
        by hand). Now a POST unanswered after C{accept_timeout} (10 s) fails and its host
        becomes suspect: one slot of its own and one of the quarantine's (a quarter of the
        global ones). Six hung hosts that keep calling: the healthy host's calls made during
        their first burst are sent and complete within it, and the later ones are sent at
        once; nothing leaks.
        """
        healthy = base(9)
        self.client._secrets[healthy] = SECRET
        hung: list = []

        def call_hung() -> None:
            for i in range(6):
                hung.extend(self.client.call(base(i), p.EchoCmd(), timeout=300)
                            for _ in range(3))

        def call_healthy() -> list:
            return [self.client.call(healthy, p.EchoCmd(), timeout=60),
                    self.client.call(healthy, p.HostCapacityCmd(), timeout=60)]

        call_hung()
        self.assertEqual(len(self.http.posts), 4)  # the global limit, 2 per hung host
        first = call_healthy()
        for _ in range(40):
            self.clock.advance(1)
            self.serve(healthy)
        for d in first:
            self.assertTrue(self.successResultOf(d).success)
        self.assertEqual(self.client._suspect, {base(i) for i in range(6)})
        # The hung hosts keep calling (pings, commands); the healthy host is served at once.
        call_hung()
        later = call_healthy()
        self.serve(healthy)
        for d in later:
            self.assertTrue(self.successResultOf(d).success)
        for _ in range(400):
            self.clock.advance(1)
        for d in hung:
            self.assertIn(self.failureResultOf(d, OperationError).value.error.code,
                          (SYS.TIMEOUT, NOT_SENT))
        self.assertFalse(any(post.url.startswith(healthy) and not post.result.called
                             for post in self.http.posts))
        self.assertEqual(self.client._host_slots, {})
        self.assertEqual((self.client._sem.tokens, self.client._quarantine.tokens), (4, 1))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_accept_timeout(self) -> None:
        """
        Fault (issue 8 item 7): the accept POST had no timeout of its own, so a host that
        accepts TCP and never answers kept the exchange (and its slots) until the command's
        timeout (300 s). Unanswered after C{accept_timeout} (10 s), the POST is cancelled and
        the command fails with SYS.1001 saying so; the host then holds one slot at a time
        until it answers again, and then its share (2) comes back.
        """
        d = self.client.call(base(0), p.HostCapacityCmd())
        post = self.http.posts[0]
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        err = self.failureResultOf(d, OperationError).value.error
        self.assertEqual(err.code, SYS.TIMEOUT)
        self.assertIn("did not answer the POST within 10s", err.details)
        self.assertTrue(post.result.called)  # cancelled
        self.assertEqual(len(self.client), 0)
        calls = [self.client.call(base(0), p.EchoCmd()) for _ in range(3)]
        self.assertEqual(len(self.http.posts), 2)  # one at a time while suspect
        self.http.posts[1].answer(200, p.EchoRsp().to_json())
        self.assertEqual(len(self.http.posts), 4)  # it answers: both slots again
        self.serve(base(0))
        for c in calls:
            self.assertTrue(self.successResultOf(c).success)
        self.assertEqual(self.client._suspect, set())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_fails_everything(self) -> None:
        """
        Fault (issue 8 item 9): close() failed only the asynchronous commands in its pending
        table: synchronous calls (echo, connect, ping) lived until their own timers, and a
        call waiting for a slot could be sent on the closed pool once a slot came free. Now
        every call in progress fails at once with SYS.1017 and the reason (those never sent
        say "not sent"), nothing more is sent, and later calls fail the same way.
        """
        sync_sent = self.client.call(base(0), p.EchoCmd())
        async_sent = self.client.call(base(0), p.HostCapacityCmd())
        sync_waiting = self.client.call(base(0), p.PingCmd(host_uuid="h"))
        async_waiting = self.client.call(base(0), p.HostCapacityCmd())
        accepted = self.client.call(base(1), p.HostCapacityCmd())
        self.assertEqual(len(self.http.posts), 3)
        self.http.posts[2].answer(200)
        self.successResultOf(self.client.close("the node is stopping"))
        for d, sent in ((sync_sent, True), (async_sent, True), (accepted, True),
                        (sync_waiting, False), (async_waiting, False)):
            err = self.failureResultOf(d, OperationError).value.error
            self.assertEqual(err.code, SYS.CANCEL)
            self.assertIn("the node is stopping", err.details)
            self.assertEqual("not sent" in err.details, not sent, err.details)
        self.assertEqual(len(self.http.posts), 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        for cmd in (p.EchoCmd(), p.HostCapacityCmd()):
            err = self.failureResultOf(self.client.call(base(2), cmd), OperationError).value.error
            self.assertEqual(err.code, SYS.CANCEL)
            self.assertIn("not sent", err.details)
        self.assertEqual(len(self.http.posts), 3)

    def test_not_sent(self) -> None:
        """
        Fault (issue 8 item 7): a call that only waited in the local queue timed out like one
        the agent never answered, so callers could not know a retry is safe. It now fails
        with C{AGENT.1000} saying "not sent", for sync and async commands; a call that was
        sent still times out with C{SYS.1001}; no slot leaks.
        """
        sent = [self.client.call(base(0), p.EchoCmd(), timeout=5) for _ in range(2)]
        waiting_sync = self.client.call(base(0), p.EchoCmd(), timeout=5)
        waiting_async = self.client.call(base(0), p.HostCapacityCmd(), timeout=5)
        self.assertEqual(len(self.http.posts), 2)
        self.clock.advance(5)
        for d in sent:
            self.assertEqual(self.failureResultOf(d, OperationError).value.error.code,
                             SYS.TIMEOUT)
        for d in (waiting_sync, waiting_async):
            err = self.failureResultOf(d, OperationError).value.error
            self.assertEqual(err.code, NOT_SENT)
            self.assertIn("not sent", err.details)
        self.assertEqual(len(self.http.posts), 2)
        self.assertEqual(self.client._host_slots, {})
        self.assertEqual(self.client._sem.tokens, 4)
        # The slots are free again.
        self.client.call(base(0), p.EchoCmd(), timeout=5)
        self.assertEqual(len(self.http.posts), 3)

    def test_forget_fails_pending(self) -> None:
        """
        Fault (issue 8 item 8): forgetting a host left its pending commands waiting out their
        timeout (300 s) although nothing would complete them. They now fail at once with
        C{AGENT.1001}; other hosts' commands are untouched.

        Fault (issue 8 item 8): commands still waiting for a connection slot, never sent,
        were reported lost (AGENT.1001) too; they fail with AGENT.1000 (not sent, safe to
        retry), and are not sent later.
        """
        mine = [self.client.call(base(0), p.HostCapacityCmd()) for _ in range(3)]
        other = self.client.call(base(1), p.HostCapacityCmd())
        self.assertEqual(self.http.posts[2].url, base(1) + "/host/capacity")
        self.http.posts[2].answer(200)
        self.http.posts[0].answer(200)  # frees its slot: the third is sent
        unsent = self.client.call(base(0), p.HostCapacityCmd())  # 2 slots per host, both busy
        self.assertEqual(len(self.http.posts), 4)
        self.assertEqual(self.client.forget(base(0)), 4)
        for d in mine:
            err = self.failureResultOf(d, OperationError).value.error
            self.assertEqual(err.code, AGENT_LOST_WORK)
        err = self.failureResultOf(unsent, OperationError).value.error
        self.assertEqual(err.code, NOT_SENT)
        self.assertIn("not sent", err.details)
        self.assertEqual(len(self.http.posts), 4)
        self.assertEqual(self.client._sem.tokens, 4)
        self.assertNoResult(other)
        self.assertEqual(len(self.client), 1)
        self.assertEqual(self.client.lost_work(base(1), "the agent restarted"), 1)
        self.assertIn("the agent restarted",
                      self.failureResultOf(other, OperationError).value.error.details)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class EndpointTests(SynchronousTestCase):
    """
    The klein callback endpoint, through StubTreq.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.http = RecordingHTTP()
        self.client = connected_client(self.clock, self.http)
        self.stub = StubTreq(CallbackEndpoint(self.client).resource())

    def post(self, headers: dict, body: bytes) -> int:
        response = self.successResultOf(
            self.stub.post("http://mn/zstack/asyncrest/callback", data=body, headers=headers)
        )
        return response.code

    def test_statuses(self) -> None:
        """
        400 without taskuuid, 404 unknown, 403 unsigned, 200 once, then 404; a signed body
        that is not JSON gets 400 and fails its task (SYS.1015), which is then gone (404).
        """
        bad = self.client.call(base(0), p.HostCapacityCmd())
        taskuuid = self.http.posts[0].header("taskuuid")
        signed_bad = {"taskuuid": taskuuid, p.SIGNATURE_HEADER: p.sign(SECRET, taskuuid, b"]")}
        self.assertEqual(self.post(signed_bad, b"]"), 400)
        self.assertEqual(self.failureResultOf(bad, OperationError).value.error.code,
                         SYS.HTTP_ERROR)
        self.assertEqual(self.post(signed_bad, b"]"), 404)
        d = self.client.call(base(0), p.HostCapacityCmd())
        taskuuid = self.http.posts[1].header("taskuuid")
        body = p.HostCapacityRsp(cpu_num=4).to_json()
        signature = p.sign(SECRET, taskuuid, body)
        self.assertEqual(self.post({}, body), 400)
        self.assertEqual(self.post({"taskuuid": "nope", p.SIGNATURE_HEADER: signature}, body),
                         404)
        self.assertEqual(self.post({"taskuuid": taskuuid}, body), 403)
        good = {"taskuuid": taskuuid, p.SIGNATURE_HEADER: signature}
        self.assertEqual(self.post(good, body), 200)
        self.assertEqual(self.successResultOf(d).cpu_num, 4)
        self.assertEqual(self.post(good, body), 404)

    def report(self, host_uuid: str, body: bytes, secret: str = SECRET,
               path: str = p.REPORT_VM_STATE_PATH, signed: bool = True) -> int:
        headers = {p.COMMAND_PATH_HEADER: path, p.RESOURCE_UUID_HEADER: host_uuid,
                   "taskuuid": "r1"}
        if signed:
            headers[p.SIGNATURE_HEADER] = p.sign_report(secret, path, "r1", body)
        response = self.successResultOf(self.stub.post(
            "http://mn/zstack/asyncrest/sendcommand", data=body, headers=headers))
        return response.code

    def test_reports(self) -> None:
        """
        Agent-initiated commands: 404 for an unhandled path, 403 unless signed with the named
        host's secret (or if the body names another host), 400 for a bad body, 500 when the
        handler fails, else 200 and the handler gets the decoded command.
        """
        endpoint = CallbackEndpoint(self.client)
        self.stub = StubTreq(endpoint.resource())
        self.client._base_of_host["host-0"] = base(0)
        got: list = []
        cmd = p.ReportVmStateCmd(host_uuid="host-0", vm_uuid="v", vm_state="Stopped", seq=1)
        body = cmd.to_json()
        self.assertEqual(self.report("host-0", body), 404)
        endpoint.on_report(p.REPORT_VM_STATE_PATH, got.append)
        self.assertRaises(ValueError, endpoint.on_report, "/nope", got.append)
        self.assertEqual(self.report("host-0", body, signed=False), 403)
        self.assertEqual(self.report("host-0", body, secret="other"), 403)
        self.assertEqual(self.report("host-9", body), 403)
        self.assertEqual(self.report("host-0", b'{"vmUuid": 1}'), 400)
        other = p.ReportVmStateCmd(host_uuid="host-1", vm_uuid="v", vm_state="Stopped")
        self.assertEqual(self.report("host-0", other.to_json()), 403)
        self.assertEqual(self.report("host-0", body), 200)
        self.assertEqual(got, [cmd])
        endpoint.on_report(p.REPORT_VM_STATE_PATH, lambda c: 1 / 0)
        body = p.ReportVmStateCmd(host_uuid="host-0", vm_uuid="v", vm_state="Stopped", seq=2).to_json()
        self.assertEqual(self.report("host-0", body), 500)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.client.forget(base(0))
        self.assertEqual(self.report("host-0", body), 403)

    def test_get_not_allowed(self) -> None:
        """
        Only POST is served.
        """
        response = self.successResultOf(self.stub.get("http://mn/zstack/asyncrest/callback"))
        self.assertEqual(response.code, 405)


class InMemoryEndToEndTests(SynchronousTestCase):
    """
    The real client against the real agent, both through StubTreq.
    """

    def test_connect_then_command(self) -> None:
        """
        After connect, an asynchronous command completes through a signed callback.
        """
        pair = InMemoryPair()
        self.successResultOf(pair.client.connect(base(1), "host-1"))
        d = pair.client.call(base(1), p.StartVmCmd(vm_instance_uuid="vm", cpu_num=2,
                                                   memory_size=1024))
        pair.flush()
        self.assertEqual(self.successResultOf(d).vnc_port, 5900)
        ping = self.successResultOf(pair.client.call(base(1), p.PingCmd(host_uuid="host-1")))
        self.assertEqual(ping.host_uuid, "host-1")
        self.assertEqual(pair.agent.stats["callbacks"], 1)
        self.assertEqual(pair.client_clock.getDelayedCalls(), [])
        self.assertEqual(pair.agent_clock.getDelayedCalls(), [])

    def test_command_across_reconnect(self) -> None:
        """
        A command in flight when the host is reconnected (new secret) still completes: both
        sides use the secret of the moment it was sent.
        """
        pair = InMemoryPair(latency={"*": parse_latency("const:5")})
        self.successResultOf(pair.client.connect(base(0), "h"))
        old = pair.client.secret_for(base(0))
        d = pair.client.call(base(0), p.HostCapacityCmd(), timeout=30)
        self.successResultOf(pair.client.connect(base(0), "h"))
        self.assertNotEqual(pair.client.secret_for(base(0)), old)
        pair.agent_clock.advance(5)
        pair.flush()
        self.successResultOf(d)

    def test_agent_refusal(self) -> None:
        """
        What the simulator refuses comes back as SYS.1006 with its reason.
        """
        pair = InMemoryPair()
        self.successResultOf(pair.client.connect(base(0), "h"))
        d = pair.client.call(base(0), p.GetVncPortCmd(vm_uuid="ghost"))
        pair.flush()
        err = self.failureResultOf(d, OperationError).value.error
        self.assertEqual(err.code, SYS.OPERATION_ERROR)
        self.assertIn("ghost", err.details)
