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
        self.node_clock = Clock()
        self.client = AgentClient(self.node_clock, RecordingHTTP(), CALLBACK_URL)
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

    def report(self, state: str, vm: str = "vm-1") -> Post:
        self.agent.report_vm_state("0", vm, state)
        return self.http.posts[-1]

    def send(self, post: Post) -> Deferred:
        headers = {name: post.header(name) for name in (
            "taskuuid", p.COMMAND_PATH_HEADER, p.RESOURCE_UUID_HEADER, p.SIGNATURE_HEADER)}
        return self.to_node.post(post.url, data=post.data, headers=headers)

    def deliver(self, post: Post) -> int:
        return self.successResultOf(self.send(post)).code

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

    def test_other_vm_overtaken_report_applied(self) -> None:
        """
        Fault (issue 8 item 11, review): report order was per host, so a retried report of
        vm-1 that arrived after a later report of vm-2 got 409 and was dropped for good (the
        agent never retries a 409): vm-1's "Stopped" was lost. Order is per (host, VM): with
        interleaved retries each VM ends in its latest state, and a replay or an overtaken
        report of the same VM is still refused.
        """
        failing = [True]

        def flaky(cmd: p.ReportVmStateCmd) -> None:
            if cmd.vm_uuid == "vm-1" and failing:
                failing.pop()
                raise OSError("database busy")
            self.apply(cmd)

        self.endpoint.on_report(p.REPORT_VM_STATE_PATH, flaky)
        vm1_stopped = self.report("Stopped", "vm-1")  # seq 1
        vm2_running = self.report("Running", "vm-2")  # seq 2
        vm2_stopped = self.report("Stopped", "vm-2")  # seq 3
        self.assertEqual(self.deliver(vm1_stopped), 500)  # the agent will retry it
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(self.deliver(vm2_stopped), 200)
        self.assertEqual(self.deliver(vm1_stopped), 200)  # the retry, after seq 3
        self.assertEqual(self.deliver(vm2_running), 409)  # overtaken by seq 3 of vm-2
        self.assertEqual(self.deliver(vm1_stopped), 409)  # a replay
        self.assertEqual(self.state, {"vm-1": "Stopped", "vm-2": "Stopped"})
        self.assertEqual(self.applied, [3, 1])

    def test_order_memory_bounded(self) -> None:
        """
        The per-VM order is bounded: a VM with no report for C{forget_after} seconds, or the
        least recently reported one past C{max_tracked_resources}, is forgotten, and its
        number raises the host's floor, so its old reports are still refused.
        """
        self.endpoint.forget_after = 100.0
        self.endpoint.max_tracked_resources = 2
        first = self.report("Stopped", "vm-1")
        self.assertEqual(self.deliver(first), 200)
        self.assertEqual(self.deliver(self.report("Stopped", "vm-2")), 200)
        self.node_clock.advance(101)
        self.assertEqual(self.deliver(self.report("Stopped", "vm-3")), 200)
        order = self.endpoint._order["h0"]
        self.assertEqual((list(order.last), order.floor), (["vm-3"], 2))
        self.assertEqual(self.deliver(first), 409)  # forgotten, still refused
        for vm in ("vm-4", "vm-5", "vm-6"):
            self.assertEqual(self.deliver(self.report("Running", vm)), 200)
        self.assertEqual((list(order.last), order.floor), (["vm-5", "vm-6"], 4))
        self.assertEqual(self.applied, [1, 2, 3, 4, 5, 6])

    def test_hung_handler_times_out(self) -> None:
        """
        Fault (issue 8 item 11, review): the report handler had no time limit; one hung
        handler held the host's lock, every later report of the host waited behind it and,
        once 1000 waited, all got 503 forever. A handler past C{handler_timeout} is cancelled
        and answered 500 (the agent retries), and the host's next reports proceed.
        """
        cancelled: list[Deferred] = []

        def hang(cmd: p.ReportVmStateCmd) -> Deferred:
            return Deferred(cancelled.append)

        self.endpoint.on_report(p.REPORT_VM_STATE_PATH, hang)
        codes: list[int] = []
        self.send(self.report("Stopped", "vm-1")).addCallback(lambda r: codes.append(r.code))
        self.endpoint.on_report(p.REPORT_VM_STATE_PATH, self.apply)
        self.send(self.report("Running", "vm-2")).addCallback(lambda r: codes.append(r.code))
        self.assertEqual(codes, [])
        self.node_clock.advance(self.endpoint.handler_timeout - 0.5)
        self.assertEqual((codes, self.applied), ([], []))
        self.node_clock.advance(1)
        self.to_node.flush()
        self.assertEqual(sorted(codes), [200, 500])
        self.assertEqual(len(cancelled), 1)
        self.assertEqual(self.applied, [2])
        self.assertFalse(self.endpoint._order["h0"].lock.locked)

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
