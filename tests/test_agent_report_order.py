"""
Issue 8 items 10d and 11: agent reports carry a sequence number (per host, restarted at every
connect, whose secret is the sequence's epoch); the management node applies a host's reports
one at a time and drops a replayed or overtaken one (409), so an older report never overwrites
a newer state.
"""

from __future__ import annotations

from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from agent import protocol as p
from agent.app import CallbackPolicy
from tests.agent_fakes import CALLBACK_URL, Post, RecordingHTTP, base, make_agent
from zcontrol.agentclient import AgentClient, CallbackEndpoint

SECRET = "s" * 64
SEND_COMMAND_URL = "http://mn.example:8080/zstack/asyncrest/sendcommand"


class ReportOrderTests(SynchronousTestCase):
    """
    A real agent's reports, captured and delivered to a real endpoint in a chosen order.
    """

    def setUp(self) -> None:
        self.http = RecordingHTTP()
        self.agent, _ = make_agent(self.http, Clock(), host_count=2,
                                   policy=CallbackPolicy(time_slice=None, jitter=0.0))
        self.to_agent = StubTreq(self.agent.app.resource())
        self.connect_agent(SECRET)
        self.client = AgentClient(Clock(), RecordingHTTP(), CALLBACK_URL)
        self.client._secrets[base(0)] = SECRET
        self.client._base_of_host["h0"] = base(0)
        self.endpoint = CallbackEndpoint(self.client, max_queued_reports=3)
        #: the VM state as a last-writer-wins store would hold it
        self.state: dict[str, str] = {}
        self.applied: list[int | None] = []
        self.endpoint.on_report(p.REPORT_VM_STATE_PATH, self.apply)
        self.to_node = StubTreq(self.endpoint.resource())

    def connect_agent(self, secret: str) -> None:
        cmd = p.ConnectCmd(host_uuid="h0", callback_secret=secret,
                           send_command_url=SEND_COMMAND_URL,
                           callback_url_prefixes=[CALLBACK_URL])
        response = self.successResultOf(self.to_agent.post(base(0) + p.CONNECT_PATH,
                                                           data=cmd.to_json()))
        self.assertEqual(response.code, 200)

    def apply(self, cmd: p.ReportVmStateCmd) -> Any:
        self.state[cmd.vm_uuid] = cmd.vm_state
        self.applied.append(cmd.seq)

    def report(self, state: str) -> Post:
        self.agent.report_vm_state("0", "vm-1", state)
        return self.http.posts[-1]

    def deliver(self, post: Post) -> int:
        headers = {name: post.header(name) for name in (
            "taskuuid", p.COMMAND_PATH_HEADER, p.RESOURCE_UUID_HEADER, p.SIGNATURE_HEADER)}
        response = self.successResultOf(self.to_node.post(post.url, data=post.data,
                                                          headers=headers))
        return response.code

    def test_agent_numbers_reports_per_connect(self) -> None:
        """
        Reports of a host are numbered 1, 2, 3 ... and numbering restarts at a connect.
        """
        seqs = [p.ReportVmStateCmd.from_json(self.report(s).data).seq
                for s in ("Stopped", "Running")]
        self.connect_agent("new-secret")
        seqs.append(p.ReportVmStateCmd.from_json(self.report("Stopped").data).seq)
        self.assertEqual(seqs, [1, 2, 1])

    def test_overtaken_report_dropped(self) -> None:
        """
        Fault (issue 8 item 11): the agent retried a report that a later one had overtaken,
        and the node applied it last, so the VM's state went back to the older one. The
        overtaken report is refused with 409 and the newer state stays.
        """
        older = self.report("Stopped")
        newer = self.report("Running")
        self.assertEqual(self.deliver(newer), 200)
        self.assertEqual(self.deliver(older), 409)
        self.assertEqual(self.state, {"vm-1": "Running"})
        self.assertEqual(self.applied, [2])

    def test_replay_refused(self) -> None:
        """
        Fault (issue 8 item 10d): a captured report could be POSTed again and was applied
        again (a replayed "Stopped" after the VM was started again would undo it). The same
        signed report is refused the second time.
        """
        first = self.report("Stopped")
        self.assertEqual(self.deliver(first), 200)
        self.state["vm-1"] = "Running"  # the VM was started meanwhile
        self.assertEqual(self.deliver(first), 409)
        self.assertEqual(self.state, {"vm-1": "Running"})
        self.assertEqual(self.applied, [1])

    def test_reconnect_starts_a_new_epoch(self) -> None:
        """
        After a reconnect (a new secret on both sides) numbering restarts and is accepted; a
        report signed with the old secret is refused by its signature.
        """
        old = self.report("Stopped")
        self.assertEqual(self.deliver(self.report("Running")), 200)
        self.connect_agent("second-secret")
        self.client._secrets[base(0)] = "second-secret"
        self.assertEqual(self.deliver(old), 403)
        self.assertEqual(self.deliver(self.report("Stopped")), 200)
        self.assertEqual(self.applied, [2, 1])
        self.assertEqual(self.state, {"vm-1": "Stopped"})

    def test_failed_handler_does_not_advance(self) -> None:
        """
        A report whose handler failed (500) is accepted when the agent retries it.
        """
        post = self.report("Stopped")
        self.endpoint.on_report(p.REPORT_VM_STATE_PATH, lambda cmd: 1 / 0)
        self.assertEqual(self.deliver(post), 500)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.endpoint.on_report(p.REPORT_VM_STATE_PATH, self.apply)
        self.assertEqual(self.deliver(post), 200)
        self.assertEqual(self.applied, [1])

    def test_reports_applied_one_at_a_time(self) -> None:
        """
        Fault (issue 8 item 11): two reports of a host ran their handlers at the same time,
        so the older one could finish (and write) last. The second waits for the first; one
        overtaken while waiting is dropped; waiting ones are bounded (503).
        """
        pending: list[Deferred] = []

        def slow(cmd: p.ReportVmStateCmd) -> Deferred:
            d: Deferred = Deferred()
            d.addCallback(lambda _: self.apply(cmd))
            pending.append(d)
            return d

        self.endpoint.on_report(p.REPORT_VM_STATE_PATH, slow)
        posts = [self.report(s) for s in ("Stopped", "Running", "Stopped", "Running", "Paused")]
        codes: list[int] = []
        for post in (posts[0], posts[2], posts[1], posts[3], posts[4]):
            headers = {name: post.header(name) for name in (
                "taskuuid", p.COMMAND_PATH_HEADER, p.RESOURCE_UUID_HEADER, p.SIGNATURE_HEADER)}
            self.to_node.post(post.url, data=post.data, headers=headers).addCallback(
                lambda r: codes.append(r.code))
        # seq 1 runs; 3, 2 and 4 wait (the bound is 3); 5 is refused at once.
        self.assertEqual((len(pending), codes), (1, [503]))
        pending[0].callback(None)  # 1 done; 3 runs
        self.assertEqual(len(pending), 2)
        pending[1].callback(None)  # 3 done; 2 is stale now; 4 runs
        self.assertEqual(len(pending), 3)
        pending[2].callback(None)
        self.to_node.flush()
        self.assertEqual(sorted(codes), [200, 200, 200, 409, 503])
        self.assertEqual(self.applied, [1, 3, 4])
        self.assertEqual(self.state, {"vm-1": "Running"})

    def test_report_without_seq(self) -> None:
        """
        A signed report without a sequence number (or with one out of range) is a 400.
        """
        for seq in (None, 0, -1):
            body = p.ReportVmStateCmd(host_uuid="h0", vm_uuid="v", vm_state="Stopped",
                                      seq=seq).to_json()
            headers = {"taskuuid": "t", p.COMMAND_PATH_HEADER: p.REPORT_VM_STATE_PATH,
                       p.RESOURCE_UUID_HEADER: "h0",
                       p.SIGNATURE_HEADER: p.sign_report(SECRET, p.REPORT_VM_STATE_PATH, "t",
                                                         body)}
            response = self.successResultOf(self.to_node.post(SEND_COMMAND_URL, data=body,
                                                              headers=headers))
            self.assertEqual(response.code, 400)
        self.assertEqual(self.applied, [])
