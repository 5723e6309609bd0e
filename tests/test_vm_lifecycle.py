"""
The VM lifecycle end to end (issue 10): create, stop, start, reboot, destroy, recover,
expunge through the node's bus, a real simulated agent over loopback HTTP, with the store,
the agents' simulated state and the capacity accounting checked after each step
(L{tests.vm_scenario.CloudScenario.consistent}); on the embedded backends and on
PostgreSQL + RabbitMQ.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from agent.hypervisor.interfaces import HypervisorError
from tests.test_agent_loopback import LoopbackTestCase
from tests.vm_scenario import (
    IMAGE_SIZE,
    CloudScenario,
    EmbeddedBackends,
    RabbitPostgresBackends,
    codes_of,
)
from zcontrol.services.vm.messages import SERVICE_ID as VM_SERVICE
from zcontrol.services.vm.messages import (
    DestroyVmInstanceMsg,
    ExpungeVmInstanceMsg,
    RebootVmInstanceMsg,
    RecoverVmInstanceMsg,
    StartVmInstanceMsg,
    StopVmInstanceMsg,
)


class LifecycleScenario(CloudScenario):
    """
    The lifecycle, for a backend mixin.
    """

    async def test_lifecycle(self) -> None:
        """
        Create (Running on a host, root volume Ready on NFS, an address on the L3), stop
        (Stopped, host capacity back, the address kept), start, reboot, destroy (Destroyed,
        capacity and address back, volume kept), recover (Stopped), start again (a new
        address), destroy, expunge (volume bits and rows gone).
        """
        cloud = await self.build_cloud()
        vm = await self.create("vm1")
        u = vm["uuid"]
        self.assertEqual(vm["state"], "Running")
        self.assertIn(vm["hostUuid"], cloud.hosts)
        self.assertEqual(vm["lastHostUuid"], vm["hostUuid"])
        [nic] = vm["vmNics"]
        self.assertEqual(nic["l3NetworkUuid"], cloud.l3)
        self.assertTrue(nic["ip"].startswith("10.0."))
        [root] = vm["allVolumes"]
        self.assertEqual((root["type"], root["status"], root["primaryStorageUuid"],
                          root["size"]), ("Root", "Ready", cloud.nfs, IMAGE_SIZE))
        self.assertEqual(vm["rootVolumeUuid"], root["uuid"])
        self.assertEqual(self.running_on_agents(), {u: vm["hostUuid"]})
        [job] = await self.rows("job", resourceUuid=u)
        self.assertEqual((job["apiName"], job["state"]), ("CreateVm", "Succeeded"))
        await self.consistent()

        stopped = (await self.vm(StopVmInstanceMsg(uuid=u), u)).inventory
        self.assertEqual((stopped["state"], stopped["hostUuid"], stopped["lastHostUuid"]),
                         ("Stopped", None, vm["hostUuid"]))
        self.assertEqual(stopped["vmNics"][0]["ip"], nic["ip"])
        await self.consistent()
        # stopping a Stopped VM does nothing, successfully
        again = await self.vm(StopVmInstanceMsg(uuid=u), u)
        self.assertIsNone(again.job_uuid)

        started = (await self.vm(StartVmInstanceMsg(uuid=u), u)).inventory
        self.assertEqual(started["state"], "Running")
        self.assertEqual(started["hostUuid"], vm["hostUuid"])  # the last host first
        await self.consistent()
        rebooted = (await self.vm(RebootVmInstanceMsg(uuid=u), u)).inventory
        self.assertEqual(rebooted["state"], "Running")
        await self.consistent()

        destroyed = (await self.vm(DestroyVmInstanceMsg(uuid=u), u)).inventory
        self.assertEqual((destroyed["state"], destroyed["hostUuid"]), ("Destroyed", None))
        self.assertIsNone(destroyed["vmNics"][0]["ip"])
        self.assertEqual(destroyed["allVolumes"][0]["status"], "Ready")
        await self.consistent()
        # destroying again succeeds, idempotent
        self.assertIsNone((await self.vm(DestroyVmInstanceMsg(uuid=u), u)).job_uuid)

        recovered = (await self.vm(RecoverVmInstanceMsg(uuid=u), u)).inventory
        self.assertEqual(recovered["state"], "Stopped")
        await self.consistent()
        started = (await self.vm(StartVmInstanceMsg(uuid=u), u)).inventory
        self.assertEqual(started["state"], "Running")
        self.assertIsNotNone(started["vmNics"][0]["ip"])
        await self.consistent()

        await self.vm(DestroyVmInstanceMsg(uuid=u), u)
        path = root["installPath"]
        expunged = await self.vm(ExpungeVmInstanceMsg(uuid=u), u)
        self.assertIsNone(expunged.inventory)
        self.assertEqual(await self.rows("vmInstance"), [])
        self.assertEqual(await self.rows("volume"), [])
        self.assertEqual(await self.rows("vmNic"), [])
        for slot in cloud.slots.values():
            storage = self.simulated.storage(str(slot))
            for export in storage.mounts:
                self.assertNotIn(path, self.simulated.nfs_export(export).files)
        await self.consistent()

    async def test_refusals(self) -> None:
        """
        Unknown image, offering, L3 or VM: the right NOT_FOUND code naming the field; an
        operation the state does not allow: VM.1010 naming the state; nothing is left behind.
        """
        await self.build_cloud()
        await self.refused(self.create_msg(image_uuid="nope"), VM_SERVICE, None,
                           "IMAGE.1001", "imageUuid")
        await self.refused(self.create_msg(instance_offering_uuid="nope"), VM_SERVICE, None,
                           "OFFERING.1000", "instanceOfferingUuid")
        await self.refused(self.create_msg(l3_network_uuids=["nope"]), VM_SERVICE, None,
                           "L3.1000", "l3NetworkUuids[0]")
        await self.refused(self.create_msg(name=""), VM_SERVICE, None, "SYS.1007", "name")
        await self.refused(StartVmInstanceMsg(uuid="nope"), VM_SERVICE, "nope", "VM.1100",
                           "nope")
        vm = await self.create("vm1")
        await self.refused(RecoverVmInstanceMsg(uuid=vm["uuid"]), VM_SERVICE, vm["uuid"],
                           "VM.1010", "Running")
        self.assertEqual([v["uuid"] for v in await self.rows("vmInstance")], [vm["uuid"]])
        await self.consistent()

    async def test_agent_failure_rolls_back_create(self) -> None:
        """
        The hypervisor failing /vm/start fails the create with VM.1000 whose cause chain
        carries the agent's own words; the VM is removed and nothing is left held.
        """
        cloud = await self.build_cloud()
        for slot in cloud.slots.values():
            hv = self.simulated.hypervisor(str(slot))
            hv.start_vm = lambda spec: defer.fail(HypervisorError("the disk is on fire"))
        error = await self.refused(self.create_msg(), VM_SERVICE, None, "VM.1000")
        self.assertIn("SYS.1006", codes_of(error))
        self.assertIn("the disk is on fire", repr(error.to_dict()))
        self.assertEqual(await self.rows("vmInstance"), [])
        self.assertEqual(await self.rows("volume"), [])
        self.assertEqual(await self.rows("vmNic"), [])
        await self.consistent()


class EmbeddedLifecycleTests(LifecycleScenario, EmbeddedBackends, LoopbackTestCase):
    """
    On SQLite and the LocalBus.
    """


class RabbitPostgresLifecycleTests(LifecycleScenario, RabbitPostgresBackends, LoopbackTestCase):
    """
    On PostgreSQL and RabbitMQ.
    """


del Any
