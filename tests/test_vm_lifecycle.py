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
    gather,
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


class FlowFailureScenario(CloudScenario):
    """
    A failure injected at each flow of create and start in turn, before the flow did its
    work and after it (its result then never recorded: the rollback gives back by holder).
    """

    def inject(self, kind: str, index: int, after: bool) -> Any:
        """
        Make flow C{index} of job kind C{kind} fail (after doing its work when C{after});
        undone at cleanup and by the returned function.
        """
        flow = self.vm_service.kinds[kind].flows[index]
        original = flow.run

        async def failing(ctx: Any) -> Any:
            if after:
                await original(ctx)
            raise HypervisorError(f"injected failure in {flow.name}")

        flow.run = failing

        def undo() -> None:
            flow.run = original

        self.addCleanup(undo)
        return undo

    async def test_each_create_flow(self) -> None:
        """
        Each flow of a create failing (before or after its work): the create fails with
        VM.1000 naming the flow, the VM is gone, nothing is held, the agents run nothing.
        """
        await self.build_cloud()
        names = [f.name for f in self.vm_service.kinds["CreateVm"].flows]
        for index, name in enumerate(names):
            for after in (False, True):
                undo = self.inject("CreateVm", index, after)
                error = await self.refused(self.create_msg(f"vm-{index}"), VM_SERVICE, None,
                                           "VM.1000", name)
                self.assertIn(f"injected failure in {name}", repr(error.to_dict()))
                undo()
                self.assertEqual(await self.rows("vmInstance"), [], (name, after))
                self.assertEqual(await self.rows("volume"), [], (name, after))
                self.assertEqual(await self.rows("vmNic"), [], (name, after))
                await self.consistent()
        # and the cloud still works
        vm = await self.create("after")
        self.assertEqual(vm["state"], "Running")
        await self.consistent()

    async def test_each_start_flow(self) -> None:
        """
        Each flow of a start failing: the start fails with VM.1001, the VM is Stopped as
        before with its address, nothing more is held.
        """
        await self.build_cloud()
        vm = await self.create("vm")
        u = vm["uuid"]
        await self.vm(StopVmInstanceMsg(uuid=u), u)
        before = (await self.rows("vmInstance"))[0]
        names = [f.name for f in self.vm_service.kinds["StartVm"].flows]
        for index, name in enumerate(names):
            for after in (False, True):
                undo = self.inject("StartVm", index, after)
                await self.refused(StartVmInstanceMsg(uuid=u), VM_SERVICE, u, "VM.1001", name)
                undo()
                [row] = await self.rows("vmInstance")
                self.assertEqual((row["state"], row["hostUuid"], row["lastHostUuid"]),
                                 ("Stopped", None, before["lastHostUuid"]), (name, after))
                await self.consistent()
        started = (await self.vm(StartVmInstanceMsg(uuid=u), u)).inventory
        self.assertEqual(started["state"], "Running")
        await self.consistent()


    async def test_each_flow_of_stop_reboot_destroy(self) -> None:
        """
        Each flow of a stop, reboot or destroy failing (before or after its work): the
        operation fails with its code and the VM settles to what its host says — Running and
        holding its host when the hypervisor did not act, Stopped and holding nothing when it
        did — never a state the store and the agent disagree on.
        """
        await self.build_cloud()
        vm = await self.create("vm")
        u = vm["uuid"]
        cases = [("StopVm", StopVmInstanceMsg(uuid=u), "VM.1002"),
                 ("RebootVm", RebootVmInstanceMsg(uuid=u), "VM.1003"),
                 ("DestroyVm", DestroyVmInstanceMsg(uuid=u), "VM.1004")]
        for kind, msg, code in cases:
            names = [f.name for f in self.vm_service.kinds[kind].flows]
            for index, name in enumerate(names):
                for after in (False, True):
                    [row] = await self.rows("vmInstance")
                    if row["state"] == "Destroyed":
                        await self.vm(RecoverVmInstanceMsg(uuid=u), u)
                    if row["state"] != "Running":
                        await self.vm(StartVmInstanceMsg(uuid=u), u)
                    undo = self.inject(kind, index, after)
                    await self.refused(msg, VM_SERVICE, u, code, name)
                    undo()
                    [row] = await self.rows("vmInstance")
                    self.assertIn(row["state"], ("Running", "Stopped"), (kind, name, after))
                    self.assertEqual(row["state"] == "Running",
                                     u in self.running_on_agents(), (kind, name, after))
                    await self.consistent()


class EmbeddedFlowFailureTests(FlowFailureScenario, EmbeddedBackends, LoopbackTestCase):
    """
    On SQLite and the LocalBus.
    """


class RabbitPostgresFlowFailureTests(FlowFailureScenario, RabbitPostgresBackends,
                                     LoopbackTestCase):
    """
    On PostgreSQL and RabbitMQ.
    """


class ConcurrencyScenario(CloudScenario):
    """
    Many creates at once, and operations racing on one VM.
    """

    cloud_hosts = 5

    async def test_200_creates_150_fit(self) -> None:
        """
        200 concurrent creates on hosts with room for exactly 150: 150 Running, 50 failing
        with VM.1000 caused by the allocator's capacity error (ALLOCATOR.1000), every
        figure exact, nothing left of the failed ones.
        """
        from zcontrol.services.offering.messages import SERVICE_ID as OFFERING_SERVICE
        from zcontrol.services.offering.messages import CreateInstanceOfferingMsg

        cloud = await self.build_cloud()
        hosts = await self.rows("host")
        memory = min(h["availableMemoryCapacity"] for h in hosts)
        per_host = 30
        self.assertGreaterEqual(min(h["availableCpuCapacity"] for h in hosts), per_host)
        offering = (await self.ok(CreateInstanceOfferingMsg(
            name="thirtieth", cpu_num=1, memory_size=memory // per_host),
            OFFERING_SERVICE)).inventory["uuid"]
        self.assertEqual(len(hosts) * per_host, 150)
        replies = await gather(*[
            self.send(self.create_msg(f"vm-{i}", instance_offering_uuid=offering),
                      VM_SERVICE) for i in range(200)])
        ok = [r for r in replies if r.success]
        failed = [r for r in replies if not r.success]
        self.assertEqual(len(ok), 150, [r.error for r in failed][:3])
        for r in failed:
            self.assertEqual(r.error.code, "VM.1000", r.error)
            self.assertIn("ALLOCATOR.1000", codes_of(r.error), r.error)
        running = await self.rows("vmInstance", state="Running")
        self.assertEqual(len(running), 150)
        self.assertEqual(len(await self.rows("vmInstance")), 150)
        self.assertEqual(len(self.running_on_agents()), 150)
        for h in await self.rows("host"):
            self.assertLess(h["availableMemoryCapacity"], memory // per_host, h["uuid"])
            self.assertEqual(len([v for v in running if v["hostUuid"] == h["uuid"]]),
                             per_host)
        self.assertEqual(len(await self.rows("usedIp", holderType="VmNicVO")), 150)
        del cloud
        await self.consistent()

    async def test_stop_and_destroy_race(self) -> None:
        """
        A stop and a destroy sent at once to one VM run one after the other in the VM's
        chain: the stop stops it, the destroy destroys the stopped VM; a stop sent while its
        create runs waits for the create and stops the VM it made.
        """
        await self.build_cloud()
        vm = await self.create("vm")
        u = vm["uuid"]
        stop, destroy = await gather(
            self.send(StopVmInstanceMsg(uuid=u), VM_SERVICE, u),
            self.send(DestroyVmInstanceMsg(uuid=u), VM_SERVICE, u))
        self.assertTrue(stop.success, stop.error)
        self.assertTrue(destroy.success, destroy.error)
        self.assertEqual(stop.inventory["state"], "Stopped")
        self.assertEqual(destroy.inventory["state"], "Destroyed")
        await self.consistent()

        # the other way round: the stop finds the VM Destroyed and is refused
        await self.vm(RecoverVmInstanceMsg(uuid=u), u)
        await self.vm(StartVmInstanceMsg(uuid=u), u)
        destroy, stop = await gather(
            self.send(DestroyVmInstanceMsg(uuid=u), VM_SERVICE, u),
            self.send(StopVmInstanceMsg(uuid=u), VM_SERVICE, u))
        self.assertTrue(destroy.success, destroy.error)
        self.assertFalse(stop.success)
        self.assertEqual((stop.error.code, stop.error.opaque.get("state")),
                         ("VM.1010", "Destroyed"))
        await self.consistent()

        # a stop sent while the create runs
        msg = self.create_msg("racing", uuid="vm-racing-0001")
        create, stop = await gather(
            self.send(msg, VM_SERVICE, "vm-racing-0001"),
            self.send(StopVmInstanceMsg(uuid="vm-racing-0001"), VM_SERVICE, "vm-racing-0001"))
        self.assertTrue(create.success, create.error)
        self.assertEqual(create.inventory["state"], "Running")
        self.assertTrue(stop.success, stop.error)
        self.assertEqual(stop.inventory["state"], "Stopped")
        await self.consistent()


class EmbeddedConcurrencyTests(ConcurrencyScenario, EmbeddedBackends, LoopbackTestCase):
    """
    On SQLite and the LocalBus.
    """


class RabbitPostgresConcurrencyTests(ConcurrencyScenario, RabbitPostgresBackends,
                                     LoopbackTestCase):
    """
    On PostgreSQL and RabbitMQ.
    """


class EmbeddedLifecycleTests(LifecycleScenario, EmbeddedBackends, LoopbackTestCase):
    """
    On SQLite and the LocalBus.
    """


class RabbitPostgresLifecycleTests(LifecycleScenario, RabbitPostgresBackends, LoopbackTestCase):
    """
    On PostgreSQL and RabbitMQ.
    """

