"""
Faults beyond input (issue 10, deliverable 6): an agent that does not answer within the
command timeout, a hypervisor that fails a stop, a storage agent that fails to create a
volume. Each operation fails with its code, the cause chain says what happened at the agent
(a timeout is reported as a timeout naming the command and the host, a failure in the
agent's own words: ZStack #4 masked the real error as a timeout), and the cloud is left
consistent (L{tests.vm_scenario.CloudScenario.consistent}): everything the failed operation
took is given back, the VM in a final state.

No sleeps: the waits are the node's own bounded command timeout and Deferreds fired by the
simulated agent.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from agent.hypervisor.interfaces import HypervisorError
from agent.hypervisor.simulator import parse_latency
from tests.test_agent_loopback import LoopbackTestCase
from tests.vm_scenario import CloudScenario, EmbeddedBackends, RabbitPostgresBackends, codes_of
from zcontrol.core.errors import SYS
from zcontrol.services.vm.messages import SERVICE_ID as VM_SERVICE
from zcontrol.services.vm.messages import StopVmInstanceMsg

#: seconds: the node's bound of one agent command, and how long the agent takes to start a VM
COMMAND_TIMEOUT, START_LATENCY = 0.5, 2.0


class TimeoutScenario(CloudScenario):
    """
    The agent takes longer to start a VM than the node waits for one agent command.
    """

    node_config = {"vm": {"command_timeout": COMMAND_TIMEOUT}}
    latency = {"/vm/start": parse_latency(f"const:{START_LATENCY}")}

    async def test_start_never_answers(self) -> None:
        """
        A create whose /vm/start does not call back within the command timeout fails with
        VM.1000 caused by SYS.1001 naming the command, the host and the timeout; the VM is
        gone and nothing is held. When the agent finally starts the VM and calls back, the
        late callback changes nothing on the node (its task was given up): the store still
        has no VM, and the VM the agent started is one the store does not know (the host's
        VM sync reports it).
        """
        cloud = await self.build_cloud()
        late: list[defer.Deferred] = []
        for slot in cloud.slots.values():
            hv = self.simulated.hypervisor(str(slot))
            start = hv.start_vm

            def starting(spec: Any, start: Any = start) -> defer.Deferred:
                d = start(spec)
                late.append(d)
                return d

            hv.start_vm = starting
        error = await self.refused(self.create_msg("slow"), VM_SERVICE, None, "VM.1000",
                                   "start-on-hypervisor")
        # what timed out: the command at its host's agent URL, and after how long
        timeout = error.cause.cause
        self.assertEqual(timeout.code, SYS.TIMEOUT, error)
        self.assertIn("no callback after", timeout.details)
        [url] = [f"{self.base(slot)}/vm/start" for slot in cloud.slots.values()
                 if timeout.opaque["url"] == f"{self.base(slot)}/vm/start"]
        self.assertIn(url, timeout.details)
        self.assertEqual(len(late), 1)
        self.assertFalse(late[0].called, "the agent answered within the timeout")
        self.assertEqual(await self.rows("vmInstance"), [])
        self.assertEqual(await self.rows("volume"), [])
        self.assertEqual(await self.rows("vmNic"), [])
        self.assertEqual(await self.rows("tag"), [])
        await self.consistent()

        # the agent finishes the start (after START_LATENCY) and calls back, too late
        await late[0]
        await self.agent.drain()
        self.assertEqual(await self.rows("vmInstance"), [])
        self.assertEqual(await self.rows("vmNic"), [])
        await self.no_drift()
        self.assertEqual(len(self.running_on_agents()), 1)


class StopFailsScenario(CloudScenario):
    """
    The hypervisor fails every stop.
    """

    async def test_stop_fails(self) -> None:
        """
        A stop the hypervisor fails (graceful, then cold) fails with VM.1002 whose cause
        chain holds the hypervisor's words; the VM, which still runs, stays Running on its
        host, holding its host capacity and its address.
        """
        cloud = await self.build_cloud()
        vm = await self.create("stubborn")
        u = vm["uuid"]
        for slot in cloud.slots.values():
            hv = self.simulated.hypervisor(str(slot))
            hv.stop_vm = lambda uuid, force=False: defer.fail(
                HypervisorError(f"the guest of {uuid} refuses to shut down"))
        for kind in ("grace", "cold"):
            error = await self.refused(StopVmInstanceMsg(uuid=u, type=kind), VM_SERVICE, u,
                                       "VM.1002", "stop-on-hypervisor")
            self.assertIn(f"the guest of {u} refuses to shut down", repr(error.to_dict()))
            self.assertNotIn(SYS.TIMEOUT, codes_of(error))
            [row] = await self.rows("vmInstance", uuid=u)
            self.assertEqual((row["state"], row["hostUuid"]), ("Running", vm["hostUuid"]))
            self.assertEqual(self.running_on_agents(), {u: vm["hostUuid"]})
            [nic] = await self.rows("vmNic", vmInstanceUuid=u)
            self.assertEqual(nic["ip"], vm["vmNics"][0]["ip"])
            await self.consistent()


class StorageFailsScenario(CloudScenario):
    """
    The storage agent fails to create root volumes on NFS.
    """

    async def test_volume_creation_fails(self) -> None:
        """
        A create whose root volume the storage agent cannot make fails with VM.1000 whose
        cause chain holds the storage's words (never a timeout); the VM, its volume, NIC and
        tags are gone, no capacity or address is held, and no VM runs on any agent.
        """
        cloud = await self.build_cloud()
        for slot in cloud.slots.values():
            storage = self.simulated.storage(str(slot))
            storage.nfs_create_root = lambda *a, **kw: defer.fail(HypervisorError(
                "qemu-img: the export nfs.example is read-only"))
        error = await self.refused(self.create_msg("diskless", system_tags=["hostname::d-1"]),
                                   VM_SERVICE, None, "VM.1000", "instantiate-volumes")
        self.assertIn("qemu-img: the export nfs.example is read-only", repr(error.to_dict()))
        self.assertNotIn(SYS.TIMEOUT, codes_of(error))
        self.assertNotIn(SYS.INTERNAL, codes_of(error))
        self.assertEqual(await self.rows("vmInstance"), [])
        self.assertEqual(await self.rows("volume"), [])
        self.assertEqual(await self.rows("vmNic"), [])
        self.assertEqual(await self.rows("tag"), [])
        self.assertEqual(self.running_on_agents(), {})
        await self.consistent()


class EmbeddedTimeoutTests(TimeoutScenario, EmbeddedBackends, LoopbackTestCase):
    """On SQLite and the LocalBus."""


class EmbeddedStopFailsTests(StopFailsScenario, EmbeddedBackends, LoopbackTestCase):
    """On SQLite and the LocalBus."""


class EmbeddedStorageFailsTests(StorageFailsScenario, EmbeddedBackends, LoopbackTestCase):
    """On SQLite and the LocalBus."""


class RabbitPostgresTimeoutTests(TimeoutScenario, RabbitPostgresBackends, LoopbackTestCase):
    """On PostgreSQL and RabbitMQ."""


class RabbitPostgresStopFailsTests(StopFailsScenario, RabbitPostgresBackends,
                                   LoopbackTestCase):
    """On PostgreSQL and RabbitMQ."""


class RabbitPostgresStorageFailsTests(StorageFailsScenario, RabbitPostgresBackends,
                                      LoopbackTestCase):
    """On PostgreSQL and RabbitMQ."""
