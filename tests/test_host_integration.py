"""
The host service against the real pieces: a SQLite store, the LocalBus, the real agent client
and a real agent over loopback HTTP, on the real reactor.
"""

from __future__ import annotations

import os

from twisted.internet import defer, reactor

from agent import protocol as p
from agent.hypervisor.interfaces import VmSpec
from tests.test_agent_loopback import LoopbackTestCase
from zcontrol.agentclient import SEND_COMMAND_PATH
from zcontrol.bus.local import LocalBus
from zcontrol.db.sqlite import SQLiteStore
from zcontrol.scheduler.service import HostAllocatorService
from zcontrol.services.host import SERVICE_ID, AddHostMsg, HostConfig, HostService, PingHostMsg
from zcontrol.services.vm.service import VmService


class HostIntegrationTests(LoopbackTestCase):
    """
    Add, sync and reconnect a host of a real agent, recorded in SQLite.
    """

    def setUp(self) -> defer.Deferred:
        super().setUp()
        path = os.path.abspath(self.mktemp() + ".db")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.store = SQLiteStore(path, reactor)
        self.bus = LocalBus(reactor, node_id="mn-1")
        send_command_url = self.client.callback_url.replace(self.endpoint.path,
                                                            SEND_COMMAND_PATH)
        self.service = HostService(reactor, self.bus, self.store, self.client,
                                   HostConfig(echo_interval=0.05, connect_timeout=5,
                                              vm_sync_on_ping=False,
                                              send_command_url=send_command_url))
        for path, handler in self.service.report_handlers().items():
            self.endpoint.on_report(path, handler)
        # The VM service decides on what the host reports (Note [VM states]).
        self.vms = VmService(reactor, self.bus, self.store)
        self.allocator = HostAllocatorService(reactor, self.bus, self.store)

        async def start() -> None:
            await self.store.start()
            await self.bus.start()
            self.service.start(track=False)
            self.allocator.start()
            await self.vms.start()
            await self.store.insert("zone", {"uuid": "z", "name": "zone"})
            await self.store.insert("cluster", {"uuid": "c", "name": "cluster", "zoneUuid": "z",
                                                "hypervisorType": "KVM"})

        async def stop() -> None:
            await self.vms.stop()
            await self.allocator.stop()
            await self.service.stop()
            await self.bus.stop()
            await self.store.stop()

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(stop()))
        return defer.Deferred.fromCoroutine(start())

    def test_lifecycle(self) -> defer.Deferred:
        """
        The added host is Connected with the agent's capacity in SQLite; the VM sync fixes a
        stale VM state (through the VM service); the agent's signed VM state report reaches
        the store; a restarted agent (ping with no uuid) is reconnected.
        """

        async def go() -> None:
            reply = await self.bus.send(AddHostMsg(
                service_id=SERVICE_ID, name="h", zone_uuid="z", cluster_uuid="c", uuid="h5",
                management_ip=self.base(5)))
            self.assertTrue(reply.success, reply.error)
            row = await self.store.get("host", "h5")
            self.assertEqual((row["status"], row["totalCpuCapacity"]), ("Connected", 32))
            await self.store.insert("vmInstance", {
                "uuid": "vm-1", "name": "vm", "cpuNum": 1, "memorySize": 64, "hostUuid": "h5",
                "state": "Stopped"})
            hv = self.agent._hosts["5"].backends.hypervisor
            await hv.start_vm(VmSpec(uuid="vm-1", name=None, cpu_num=1, memory_size=64))
            self.assertEqual(await self.service.sync_vms("h5"), 1)
            self.assertEqual((await self.store.get("vmInstance", "vm-1"))["state"], "Running")
            # The agent reports that the VM stopped on its own.
            self.assertTrue(await self.agent.report_vm_state("5", "vm-1", "Stopped"))
            self.assertEqual((await self.store.get("vmInstance", "vm-1"))["state"], "Stopped")
            self.agent.crash_host("5")
            ping = await self.bus.send(PingHostMsg(service_id=SERVICE_ID, host_uuid="h5",
                                                   resource_uuid="h5"))
            self.assertTrue(ping.success, ping.error)
            await self.service._waiter.wait()
            self.assertEqual((await self.store.get("host", "h5"))["status"], "Connected")
            rsp = await self.service.call("h5", p.PingCmd(host_uuid="h5"))
            self.assertEqual(rsp.host_uuid, "h5")

        return defer.Deferred.fromCoroutine(go())

    def test_missing_slot_fails_at_once(self) -> defer.Deferred:
        """
        Fault (new-user trial): a managementIp naming a slot the agent does not serve
        (C{/hosts/99} of a 50-host agent) was echoed for the whole connect timeout, the
        agent's 404 retried as if the agent were starting. A 404 to the echo fails the add at
        once, saying the agent serves no such slot; nothing is left in the store.
        """

        async def go() -> None:
            reply = await self.bus.send(AddHostMsg(
                service_id=SERVICE_ID, name="h", zone_uuid="z", cluster_uuid="c", uuid="h99",
                management_ip=self.base(99)))
            self.assertFalse(reply.success)
            self.assertIn("serves no such host slot", str(reply.error))
            # One echo, not the connect timeout's worth of them ("N attempt(s) in Ts").
            self.assertNotIn("attempt(s)", str(reply.error))
            self.assertIsNone(await self.store.get("host", "h99"))

        return defer.Deferred.fromCoroutine(go())
