"""
The agent framework and its plugins, in memory: requests through StubTreq, callbacks into a
recording HTTP client, time on a task.Clock.
"""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from agent import protocol as p
from agent.app import CallbackPolicy, Faults, TaskMemory
from agent.http import BytesProducer, JSONRequest, QuietSite
from agent.hypervisor.simulator import parse_latency
from tests.agent_fakes import AGENT_URL, CALLBACK_URL, RecordingHTTP, base, make_agent
from tests.signing import command_headers

SECRET = "k" * 64


class AgentTestCase(SynchronousTestCase):
    """
    An agent with 4 simulated hosts, host 0 connected.
    """

    faults = Faults()
    policy = CallbackPolicy(max_attempts=4, initial_delay=1.0, factor=2.0, jitter=0.0,
                            time_slice=None)
    config: dict[str, Any] = {}

    def setUp(self) -> None:
        self.clock = Clock()
        self.http = RecordingHTTP()
        self.agent, self.cluster = make_agent(self.http, self.clock, faults=self.faults,
                                              policy=self.policy, **self.config)
        self.stub = StubTreq(self.agent.app.resource())
        self.connect(0)

    def post(self, url: str, cmd: Any = None, body: bytes | None = None,
             taskuuid: str | None = None, callback: str | None = CALLBACK_URL) -> tuple[int, bytes]:
        headers = {}
        data = body if body is not None else cmd.to_json()
        if taskuuid is not None:
            headers = command_headers(SECRET, url, taskuuid, data, callback or "",
                                      expiry=self.clock.seconds() + 300)
            if callback is None:
                del headers["callbackurl"]
        response = self.successResultOf(self.stub.post(url, data=data, headers=headers))
        return response.code, self.successResultOf(response.content())

    def connect(self, i: int, host_uuid: str | None = None) -> p.ConnectRsp:
        code, body = self.post(base(i) + p.CONNECT_PATH, p.ConnectCmd(
            host_uuid=host_uuid or f"host-{i}", callback_secret=SECRET,
            send_command_url="http://mn/asyncrest/sendcommand",
            callback_url_prefixes=[CALLBACK_URL]))
        self.assertEqual(code, 200)
        return p.ConnectRsp.from_json(body)

    def run_async(self, cmd: Any, host: int = 0, taskuuid: str = "t1") -> Any:
        """
        Send an async command, check it is accepted at once, and return the decoded callback.
        """
        before = len(self.http.posts)
        definition = p.command_for(cmd)
        code, body = self.post(base(host) + definition.path, cmd, taskuuid=taskuuid)
        self.assertEqual((code, body), (200, b""))
        self.assertEqual(len(self.http.posts), before + 1)
        post = self.http.posts[-1]
        self.assertEqual(post.url, CALLBACK_URL)
        self.assertEqual(post.header("taskuuid"), taskuuid)
        self.assertTrue(p.verify(SECRET, taskuuid, post.data, post.header(p.SIGNATURE_HEADER)))
        post.answer(200)
        return definition.rsp_type.from_json(post.data)


class SyncUriTests(AgentTestCase):
    """
    echo, connect and ping answer inline.
    """

    def test_echo(self) -> None:
        """
        echo answers 200 with an EchoRsp, on any host and unprefixed.
        """
        for url in (base(3) + p.ECHO_PATH, AGENT_URL + p.ECHO_PATH):
            code, body = self.post(url, p.EchoCmd())
            self.assertEqual(code, 200)
            self.assertTrue(p.EchoRsp.from_json(body).success)

    def test_ping_reports_host_uuid(self) -> None:
        """
        ping answers with the uuid given at connect, None for a host never connected.
        """
        code, body = self.post(base(0) + p.PING_PATH, p.PingCmd(host_uuid="x"))
        self.assertEqual(p.PingRsp.from_json(body).host_uuid, "host-0")
        code, body = self.post(base(2) + p.PING_PATH, p.PingCmd(host_uuid="x"))
        self.assertIsNone(p.PingRsp.from_json(body).host_uuid)

    def test_sync_rejects_taskuuid(self) -> None:
        """
        A synchronous URI refuses a taskuuid (as ZStack's agents do).
        """
        code, _ = self.post(base(0) + p.ECHO_PATH, p.EchoCmd(), taskuuid="t")
        self.assertEqual(code, 400)

    def test_bad_body(self) -> None:
        """
        A body that does not decode gets 400.
        """
        code, body = self.post(base(0) + p.PING_PATH, body=b'{"hostUuid": 3}')
        self.assertEqual(code, 400)
        self.assertIn(b"hostUuid", body)

    def test_unknown_host_and_path(self) -> None:
        """
        A host index out of range, a non-index host and an unknown command get 404.
        """
        self.assertEqual(self.post(base(4) + p.ECHO_PATH, p.EchoCmd())[0], 404)
        self.assertEqual(self.post(base("x") + p.ECHO_PATH, p.EchoCmd())[0], 404)
        self.assertEqual(self.post(base("01") + p.ECHO_PATH, p.EchoCmd())[0], 404)
        self.assertEqual(self.post(base(0) + "/vm/frobnicate", p.EchoCmd())[0], 404)


class AsyncUriTests(AgentTestCase):
    """
    The asynchronous pattern: accept at once, work, POST a signed callback.
    """

    def test_missing_headers(self) -> None:
        """
        No taskuuid, or no callbackurl: 400 and nothing is done.
        """
        self.assertEqual(self.post(base(0) + "/host/capacity", p.HostCapacityCmd())[0], 400)
        code, _ = self.post(base(0) + "/host/capacity", p.HostCapacityCmd(), taskuuid="t",
                            callback=None)
        self.assertEqual(code, 400)
        self.assertEqual(self.http.posts, [])

    def test_malformed_command(self) -> None:
        """
        A command that does not decode gets 400.
        """
        code, _ = self.post(base(0) + "/vm/start", body=b'{"vmInstanceUuid": "v"}',
                            taskuuid="t")
        self.assertEqual(code, 400)

    def test_not_connected(self) -> None:
        """
        A host that was never connected has no secret to sign with: 409.
        """
        code, body = self.post(base(1) + "/host/capacity", p.HostCapacityCmd(), taskuuid="t")
        self.assertEqual(code, 409)

    def test_capacity_and_fact(self) -> None:
        """
        capacity and fact call back with the simulator's figures.
        """
        capacity = self.run_async(p.HostCapacityCmd(), taskuuid="a")
        self.assertEqual((capacity.cpu_num, capacity.used_cpu), (32, 0))
        fact = self.run_async(p.HostFactCmd(), taskuuid="b")
        self.assertEqual(fact.hypervisor_type, "KVM")

    def test_duplicate_taskuuid(self) -> None:
        """
        A repeated taskuuid is accepted (200) and ignored: one callback only.
        """
        self.run_async(p.HostCapacityCmd(), taskuuid="same")
        code, body = self.post(base(0) + "/host/capacity", p.HostCapacityCmd(), taskuuid="same")
        self.assertEqual((code, body), (200, b""))
        self.assertEqual(len(self.http.posts), 1)
        self.assertEqual(self.agent.stats["duplicates"], 1)

    def test_vm_lifecycle(self) -> None:
        """
        start, attach/detach NIC, vncport, checkstate, stop, reboot refused, destroy.
        """
        start = self.run_async(p.StartVmCmd(vm_instance_uuid="vm", cpu_num=4,
                                            memory_size=1024, nics=[p.NicTO(mac="m1")]), taskuuid="1")
        self.assertTrue(start.success)
        self.assertEqual(self.run_async(p.GetVncPortCmd(vm_uuid="vm"), taskuuid="2").port,
                         start.vnc_port)
        self.assertTrue(self.run_async(p.AttachNicCmd(vm_uuid="vm", nic=p.NicTO(mac="m2")),
                                       taskuuid="3").success)
        again = self.run_async(p.AttachNicCmd(vm_uuid="vm", nic=p.NicTO(mac="m2")), taskuuid="4")
        self.assertFalse(again.success)
        self.assertTrue(self.run_async(p.DetachNicCmd(vm_uuid="vm", nic=p.NicTO(mac="m1")),
                                       taskuuid="5").success)
        capacity = self.run_async(p.HostCapacityCmd(), taskuuid="6")
        self.assertEqual((capacity.used_cpu, capacity.used_memory), (4, 1024))
        self.assertTrue(self.run_async(p.StopVmCmd(uuid="vm"), taskuuid="7").success)
        states = self.run_async(p.CheckVmStateCmd(vm_uuids=["vm", "other"]), taskuuid="8")
        self.assertEqual(states.states, {"vm": "Stopped", "other": "Stopped"})
        reboot = self.run_async(p.RebootVmCmd(uuid="vm"), taskuuid="9")
        self.assertFalse(reboot.success)
        self.assertIn("Stopped", reboot.error)
        self.assertTrue(self.run_async(p.DestroyVmCmd(uuid="vm"), taskuuid="10").success)
        self.assertEqual(self.run_async(p.VmSyncCmd(), taskuuid="11").states, {})

    def test_data_volumes(self) -> None:
        """
        C{/vm/attachdatavolume} and C{/vm/detachdatavolume} (ZStack's field names on the
        wire: C{vmInstanceUuid}, C{volume.installPath}, C{volume.deviceId}) reach the host's
        hypervisor; refusals come back as C{success=false} with the reason.
        """
        vol = p.VolumeTO(volume_uuid="v1", install_path="/ps/v1.qcow2", device_id=1)
        wire = p.AttachDataVolumeCmd(vm_instance_uuid="vm", volume=vol).to_dict()
        self.assertEqual((wire["vmInstanceUuid"], wire["volume"]["installPath"],
                          wire["volume"]["deviceId"]), ("vm", "/ps/v1.qcow2", 1))
        unknown = self.run_async(p.AttachDataVolumeCmd(vm_instance_uuid="vm", volume=vol),
                                 taskuuid="1")
        self.assertFalse(unknown.success)
        self.assertIn("VM vm is not on host", unknown.error)
        self.assertTrue(self.run_async(p.StartVmCmd(vm_instance_uuid="vm", cpu_num=1,
                                                    memory_size=1024), taskuuid="2").success)
        self.assertTrue(self.run_async(p.AttachDataVolumeCmd(vm_instance_uuid="vm", volume=vol),
                                       taskuuid="3").success)
        hv = self.cluster.backends("0").hypervisor
        self.assertEqual(self.successResultOf(hv.attached_volumes("vm")), {"v1": vol})
        twice = self.run_async(p.AttachDataVolumeCmd(vm_instance_uuid="vm", volume=vol),
                               taskuuid="4")
        self.assertFalse(twice.success)
        self.assertIn("already attached", twice.error)
        self.assertTrue(self.run_async(p.DetachDataVolumeCmd(vm_instance_uuid="vm", volume=vol),
                                       taskuuid="5").success)
        self.assertEqual(self.successResultOf(hv.attached_volumes("vm")), {})
        self.assertTrue(self.run_async(p.DetachDataVolumeCmd(vm_instance_uuid="vm", volume=vol),
                                       taskuuid="6").success)

    def test_migrate(self) -> None:
        """
        A running VM migrates to another host of the same agent; an unknown destination is
        refused.
        """
        self.connect(1)
        self.run_async(p.StartVmCmd(vm_instance_uuid="vm", cpu_num=1, memory_size=1),
                       taskuuid="s")
        self.run_async(p.VmSyncCmd(), host=1, taskuuid="touch")
        bad = self.run_async(p.MigrateVmCmd(vm_uuid="vm", dest_host_address=base(3)),
                             taskuuid="m0")
        self.assertFalse(bad.success)
        ok = self.run_async(p.MigrateVmCmd(vm_uuid="vm", dest_host_address=base(1)),
                            taskuuid="m1")
        self.assertTrue(ok.success, ok.error)
        self.assertEqual(self.run_async(p.VmSyncCmd(), host=1, taskuuid="v1").states,
                         {"vm": "Running"})
        self.assertEqual(self.run_async(p.VmSyncCmd(), taskuuid="v0").states, {})

    def test_console_plugin(self) -> None:
        """
        A console proxy is established with a URL, checked and deleted.
        """
        rsp = self.run_async(p.EstablishProxyCmd(vm_uuid="vm", target_hostname="h",
                                                 target_port=5900, token="tok"), taskuuid="c1")
        self.assertIn("token=tok", rsp.url)
        self.assertTrue(self.run_async(p.CheckProxyCmd(token="tok"), taskuuid="c2").available)
        self.run_async(p.DeleteProxyCmd(token="tok"), taskuuid="c3")
        self.assertFalse(self.run_async(p.CheckProxyCmd(token="tok"), taskuuid="c4").available)

    def test_vrouter_plugin(self) -> None:
        """
        A router refuses configuration before init, then takes NICs, SNAT, DHCP and rules.
        """
        nic = p.VRouterNic(mac="a", ip="10.0.0.1", netmask="255.0.0.0")
        pub = p.VRouterNic(mac="b", ip="1.1.1.1", netmask="255.255.255.0", category="Public")
        early = self.run_async(p.ConfigureNicCmd(vrouter_uuid="r", nics=[nic]), taskuuid="r0")
        self.assertFalse(early.success)
        self.assertTrue(self.run_async(p.InitVRouterCmd(vrouter_uuid="r"), taskuuid="r1").success)
        snat = p.SNATInfo(private_nic_mac="a", private_nic_ip="10.0.0.1", public_ip="1.1.1.1",
                          public_nic_mac="b", snat_netmask="255.0.0.0")
        self.assertFalse(self.run_async(p.SetSNATCmd(vrouter_uuid="r", snat=snat),
                                        taskuuid="r2").success)
        self.run_async(p.ConfigureNicCmd(vrouter_uuid="r", nics=[nic, pub]), taskuuid="r3")
        self.assertTrue(self.run_async(p.SetSNATCmd(vrouter_uuid="r", snat=snat),
                                       taskuuid="r4").success)
        dhcp = p.DhcpInfo(ip="10.0.0.5", mac="c", netmask="255.0.0.0")
        self.assertTrue(self.run_async(p.AddDhcpEntryCmd(vrouter_uuid="r", dhcp_entries=[dhcp]),
                                       taskuuid="r5").success)
        rule = p.FirewallRule(action="accept", dest_port="22")
        self.assertTrue(self.run_async(p.RefreshFirewallCmd(vrouter_uuid="r", rules=[rule]),
                                       taskuuid="r6").success)
        router = self.cluster.backends("0").vrouter.routers["r"]
        self.assertEqual((len(router.nics), len(router.snat), len(router.dhcp),
                          len(router.rules)), (2, 1, 1, 1))

    def test_handler_bug_becomes_failure_response(self) -> None:
        """
        A handler that raises still calls back, with success=false and the error, and the bug
        is logged.
        """
        self.cluster.backends("0").hypervisor.capacity = lambda: 1 / 0
        rsp = self.run_async(p.HostCapacityCmd(), taskuuid="z")
        self.assertFalse(rsp.success)
        self.assertIn("ZeroDivisionError", rsp.error)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class ReportTests(AgentTestCase):
    """
    Agent-initiated commands (C{/kvm/reportvmstate}).
    """

    def test_report_vm_state(self) -> None:
        """
        A report goes to the sendCommandUrl with the command path, the host uuid and a
        signature over a fresh task uuid and the body; it is retried until acknowledged.
        """
        d = self.agent.report_vm_state("0", "vm-1", "Stopped")
        [post] = self.http.posts
        self.assertEqual(post.url, "http://mn/asyncrest/sendcommand")
        self.assertEqual(post.header(p.COMMAND_PATH_HEADER), p.REPORT_VM_STATE_PATH)
        self.assertEqual(post.header(p.RESOURCE_UUID_HEADER), "host-0")
        taskuuid = post.header("taskuuid")
        self.assertTrue(p.verify_report(SECRET, p.REPORT_VM_STATE_PATH, taskuuid, post.data,
                                        post.header(p.SIGNATURE_HEADER)))
        self.assertFalse(p.verify(SECRET, taskuuid, post.data, post.header(p.SIGNATURE_HEADER)))
        cmd = p.ReportVmStateCmd.from_json(post.data)
        self.assertEqual((cmd.host_uuid, cmd.vm_uuid, cmd.vm_state),
                         ("host-0", "vm-1", "Stopped"))
        post.answer(503)
        self.clock.advance(1)
        self.http.posts[1].answer(200)
        self.assertTrue(self.successResultOf(d))

    def test_not_connected(self) -> None:
        """
        A host that was never connected reports nothing.
        """
        self.assertFalse(self.successResultOf(self.agent.report_vm_state("2", "vm", "Stopped")))
        self.assertEqual(self.http.posts, [])


class CallbackRetryTests(AgentTestCase):
    """
    Callbacks are retried with backoff until acknowledged, refused or out of attempts.
    """

    def accept(self) -> None:
        code, _ = self.post(base(0) + "/host/capacity", p.HostCapacityCmd(), taskuuid="r")
        self.assertEqual(code, 200)

    def test_retry_until_acknowledged(self) -> None:
        """
        A 503 and a connection error are retried after 1 s then 2 s; a 200 ends it.
        """
        self.accept()
        self.http.posts[0].answer(503)
        self.assertEqual(len(self.http.posts), 1)
        self.clock.advance(1)
        self.http.posts[1].result.errback(Failure(ConnectionRefusedError()))
        self.clock.advance(1.9)
        self.assertEqual(len(self.http.posts), 2)
        self.clock.advance(0.1)
        self.assertEqual(len(self.http.posts), 3)
        self.assertEqual(self.http.posts[2].data, self.http.posts[0].data)
        self.http.posts[2].answer(200)
        self.assertEqual(self.agent.stats["callbacks"], 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_4xx_stops(self) -> None:
        """
        A 404 (unknown or expired task) or 403 stops the retries; 408 and 429 do not.
        """
        self.accept()
        self.http.posts[0].answer(429)
        self.clock.advance(1)
        self.http.posts[1].answer(408)
        self.clock.advance(2)
        self.http.posts[2].answer(404)
        self.clock.advance(100)
        self.assertEqual(len(self.http.posts), 3)
        self.assertEqual(self.agent.stats["callback_failures"], 1)

    def test_bounded_attempts(self) -> None:
        """
        After max_attempts failures the callback is given up.
        """
        self.accept()
        for i in range(4):
            self.http.posts[i].answer(500)
            self.clock.advance(60)
        self.assertEqual(len(self.http.posts), 4)
        self.assertEqual(self.agent.stats["callback_failures"], 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_post_timeout_passed(self) -> None:
        """
        Each callback POST carries the policy's timeout on the agent's clock.
        """
        self.accept()
        kwargs = self.http.posts[0].kwargs
        self.assertEqual(kwargs["timeout"], self.policy.timeout)
        self.assertIs(kwargs["reactor"], self.clock)


class OutboxTests(AgentTestCase):
    """
    With a time slice, callbacks are queued and POSTed from the reactor loop.
    """

    policy = CallbackPolicy(time_slice=0.005)

    def test_posted_next_turn(self) -> None:
        """
        Accepting queues the callback; the next reactor turn POSTs it; drain waits for it.
        """
        for n in range(3):
            code, _ = self.post(base(0) + "/host/capacity", p.HostCapacityCmd(),
                                taskuuid=f"o{n}")
            self.assertEqual(code, 200)
        self.assertEqual(self.http.posts, [])
        self.assertEqual(len(self.agent), 3)
        drained = self.agent.drain()
        self.clock.advance(0)
        self.assertEqual([post.header("taskuuid") for post in self.http.posts],
                         ["o0", "o1", "o2"])
        self.assertNoResult(drained)
        for post in self.http.posts:
            post.answer(200)
        self.successResultOf(drained)
        self.assertEqual(self.agent.stats["callbacks"], 3)

    def test_crash_while_queued(self) -> None:
        """
        A callback still queued when its host crashes is dropped.
        """
        self.post(base(0) + "/host/capacity", p.HostCapacityCmd(), taskuuid="q")
        self.agent.crash_host("0")
        drained = self.agent.drain()
        self.clock.advance(0)
        self.assertEqual(self.http.posts, [])
        self.successResultOf(drained)

    def test_slices(self) -> None:
        """
        A slice that runs out of time leaves the rest for the next turn (a zero slice: one
        callback per turn).
        """
        self.agent._policy = CallbackPolicy(time_slice=0.0)
        for n in range(3):
            self.post(base(0) + "/host/capacity", p.HostCapacityCmd(), taskuuid=f"s{n}")
        for expected in (1, 2, 3):
            self.agent._flush()  # what one reactor turn runs
            self.assertEqual(len(self.http.posts), expected)
        # The flushes scheduled meanwhile still run, and find nothing left.
        self.clock.advance(0)
        self.assertEqual(len(self.http.posts), 3)


class LatencyTests(AgentTestCase):
    """
    Simulated latency delays the callback, not the accept.
    """

    config = {"latency": {"*": parse_latency("const:3"), "/vm/start": parse_latency("const:7")}}

    def test_latency(self) -> None:
        """
        The callback comes after the command's latency.
        """
        code, _ = self.post(base(0) + "/vm/start", p.StartVmCmd(
            vm_instance_uuid="v", cpu_num=1, memory_size=1), taskuuid="l")
        self.assertEqual(code, 200)
        self.clock.advance(6.9)
        self.assertEqual(self.http.posts, [])
        self.clock.advance(0.1)
        self.assertEqual(len(self.http.posts), 1)


class NeverCallbackTests(AgentTestCase):
    """
    never_callback_rate=1: work is done, nothing is POSTed.
    """

    faults = Faults(never_callback_rate=1.0)

    def test_no_callback(self) -> None:
        """
        The VM starts but no callback is sent.
        """
        code, _ = self.post(base(0) + "/vm/start", p.StartVmCmd(
            vm_instance_uuid="v", cpu_num=1, memory_size=1), taskuuid="n")
        self.assertEqual(code, 200)
        self.clock.advance(100)
        self.assertEqual(self.http.posts, [])
        self.assertIn("v", self.cluster.backends("0").hypervisor.vms)


class CrashTests(AgentTestCase):
    """
    crash_after_accept_rate=1: the host forgets everything after accepting.
    """

    faults = Faults(crash_after_accept_rate=1.0)

    def test_crash(self) -> None:
        """
        No callback; the host lost its connection (ping: no uuid, commands: 409) and VMs.
        """
        code, _ = self.post(base(0) + "/host/capacity", p.HostCapacityCmd(), taskuuid="c")
        self.assertEqual(code, 200)
        self.assertEqual(self.http.posts, [])
        _, body = self.post(base(0) + p.PING_PATH, p.PingCmd(host_uuid="host-0"))
        self.assertIsNone(p.PingRsp.from_json(body).host_uuid)
        self.assertEqual(self.post(base(0) + "/host/capacity", p.HostCapacityCmd(),
                                   taskuuid="c2")[0], 409)


class CrashMidTaskTests(AgentTestCase):
    """
    A host that crashes while a command is running never calls back for it.
    """

    config = {"latency": {"*": parse_latency("const:5")}}

    def test_crash_mid_task(self) -> None:
        """
        Work finishing after the host's crash is dropped.
        """
        self.post(base(0) + "/host/capacity", p.HostCapacityCmd(), taskuuid="m")
        self.agent.crash_host("0")
        self.clock.advance(5)
        self.assertEqual(self.http.posts, [])


class TaskMemoryTests(SynchronousTestCase):
    """
    Remembered task uuids are bounded in time and count.
    """

    def test_expiry(self) -> None:
        """
        A task uuid is forgotten after the ttl.
        """
        clock = Clock()
        memory = TaskMemory(clock, ttl=10, max_size=100)
        self.assertFalse(memory.seen("a"))
        self.assertTrue(memory.seen("a"))
        clock.advance(10)
        self.assertFalse(memory.seen("a"))

    def test_bounded(self) -> None:
        """
        Beyond max_size the oldest is forgotten.
        """
        memory = TaskMemory(Clock(), ttl=10, max_size=3)
        for t in "abcd":
            memory.seen(t)
        self.assertEqual(len(memory), 3)
        self.assertFalse(memory.seen("a"))
        self.assertTrue(memory.seen("d"))


class HttpPlumbingTests(SynchronousTestCase):
    """
    The shared HTTP helpers.
    """

    def test_bytes_producer(self) -> None:
        """
        BytesProducer writes its body at once and knows its length.
        """
        out: list[bytes] = []

        class Consumer:
            write = out.append

        producer = BytesProducer(b"abc")
        self.assertEqual(producer.length, 3)
        self.successResultOf(producer.startProducing(Consumer()))
        self.assertEqual(out, [b"abc"])

    def test_quiet_site_no_form_parsing(self) -> None:
        """
        The site's requests do not parse form bodies and it writes no access log.
        """
        from twisted.web.resource import Resource

        site = QuietSite(Resource())
        self.assertIs(site.requestFactory, JSONRequest)
        self.assertIsNone(site.log(object()))

    def test_policy_backoff(self) -> None:
        """
        The backoff doubles up to its cap, with bounded jitter.
        """
        import random

        policy = CallbackPolicy(initial_delay=1, factor=2, max_delay=5, jitter=0.5)
        rng = random.Random(1)
        delays = [policy.delay(n, rng) for n in range(1, 6)]
        for n, d in enumerate(delays, 1):
            base_delay = min(5, 2 ** (n - 1))
            self.assertTrue(base_delay <= d <= base_delay * 1.5, (n, d))

    def test_plugins_cover_the_contract(self) -> None:
        """
        With all plugins, the agent serves every command of the contract.
        """
        agent, _ = make_agent(RecordingHTTP())
        self.assertEqual(agent.paths, sorted(p.COMMANDS))
        json.dumps(agent.stats)
