"""
The offering service (instance and disk offerings) on MemoryStore + LocalBus + Clock.
"""

from __future__ import annotations

from typing import Any

from tests.test_zone import ServiceTestCase
from zcontrol.services.offering import (
    DISK_ALLOCATOR_STRATEGIES,
    HOST_ALLOCATOR_STRATEGIES,
    MIN_MEMORY_SIZE,
    OFFERING,
    ChangeDiskOfferingStateMsg,
    ChangeInstanceOfferingStateMsg,
    CreateDiskOfferingMsg,
    CreateInstanceOfferingMsg,
    DeleteDiskOfferingMsg,
    DeleteInstanceOfferingMsg,
    UpdateDiskOfferingMsg,
    UpdateInstanceOfferingMsg,
)

GiB = 2**30
INSTANCE_FIELDS = {"uuid", "name", "description", "cpuNum", "cpuSpeed", "memorySize",
                   "allocatorStrategy", "sortKey", "type", "state", "accountUuid",
                   "createDate", "lastOpDate"}
DISK_FIELDS = {"uuid", "name", "description", "diskSize", "sortKey", "allocatorStrategy",
               "type", "state", "accountUuid", "createDate", "lastOpDate"}


def instance(**kw: Any) -> CreateInstanceOfferingMsg:
    values: dict[str, Any] = dict(service_id="offering", name="small", cpu_num=1,
                                  memory_size=GiB)
    values.update(kw)
    return CreateInstanceOfferingMsg(**values)


def disk(**kw: Any) -> CreateDiskOfferingMsg:
    values: dict[str, Any] = dict(service_id="offering", name="data", disk_size=10 * GiB)
    values.update(kw)
    return CreateDiskOfferingMsg(**values)


class InstanceOfferingTests(ServiceTestCase):
    """
    Instance offerings.
    """

    def test_create(self) -> None:
        """
        Every field lands in the row; the inventory is the row.
        """
        inv = self.ok(instance(cpu_num=4, cpu_speed=2400, memory_size=8 * GiB,
                               allocator_strategy="LeastVmPreferredHostAllocatorStrategy",
                               sort_key=-3, description="d", uuid="io1")).inventory
        self.assertEqual(set(inv), INSTANCE_FIELDS)
        self.assertEqual(
            (inv["uuid"], inv["cpuNum"], inv["cpuSpeed"], inv["memorySize"],
             inv["allocatorStrategy"], inv["sortKey"], inv["type"], inv["state"]),
            ("io1", 4, 2400, 8 * GiB, "LeastVmPreferredHostAllocatorStrategy", -3, "UserVm",
             "Enabled"))
        self.assertEqual(self.row("instanceOffering", "io1"), inv)

    def test_defaults(self) -> None:
        """
        cpuSpeed 0, no allocator strategy, sortKey 0, type UserVm; the smallest memory
        ZStack accepts (16 MiB) and the bounds of cpuNum are accepted.
        """
        inv = self.ok(instance(memory_size=MIN_MEMORY_SIZE)).inventory
        self.assertEqual((inv["cpuSpeed"], inv["allocatorStrategy"], inv["sortKey"]),
                         (0, None, 0))
        self.ok(instance(cpu_num=1024))
        for strategy in HOST_ALLOCATOR_STRATEGIES:
            self.ok(instance(allocator_strategy=strategy))

    def test_strategies_are_the_allocators(self) -> None:
        """
        Fault (review 2, item 5): an offering accepted C{LastHostPreferredAllocatorStrategy},
        which the allocator then refused (C{SYS.1007} at allocation time). The offering's
        names are the allocator's: each one an offering accepts, an allocation accepts.
        """
        from zcontrol.scheduler import AllocateHostMsg
        from zcontrol.scheduler.service import request_of
        from zcontrol.scheduler.strategies import STRATEGIES

        self.assertEqual(set(HOST_ALLOCATOR_STRATEGIES), set(STRATEGIES))
        self.assertIn("LastHostPreferredAllocatorStrategy", HOST_ALLOCATOR_STRATEGIES)
        for strategy in HOST_ALLOCATOR_STRATEGIES:
            inv = self.ok(instance(allocator_strategy=strategy)).inventory
            req = request_of(AllocateHostMsg(
                service_id="host.allocator", vm_instance_uuid="vm", cpu_num=inv["cpuNum"],
                memory_size=inv["memorySize"], allocator_strategy=inv["allocatorStrategy"]))
            self.assertEqual(req.allocator_strategy, strategy)

    def test_invalid_fields(self) -> None:
        """
        Each field out of range is SYS.1007 naming it; nothing created.
        """
        for msg, field in [
            (instance(cpu_num=0), "cpuNum"),
            (instance(cpu_num=1025), "cpuNum"),
            (instance(cpu_num="2"), "cpuNum"),
            (instance(cpu_num=True), "cpuNum"),
            (instance(cpu_speed=-1), "cpuSpeed"),
            (instance(memory_size=MIN_MEMORY_SIZE - 1), "memorySize"),
            (instance(memory_size=2**63), "memorySize"),
            (instance(memory_size=1.5 * GiB), "memorySize"),
            (instance(allocator_strategy="MinimumCPUUsageHostAllocatorStrategy"),
             "allocatorStrategy"),
            (instance(allocator_strategy="DesignatedHostAllocatorStrategy"),
             "allocatorStrategy"),
            (instance(sort_key=2**31), "sortKey"),
            (instance(type="VirtualRouter"), "type"),
            (instance(name=""), "name"),
            (instance(description=["x"]), "description"),
            (instance(uuid="x y"), "uuid"),
        ]:
            self.invalid(msg, field)
        self.assertEqual(self.count("instanceOffering"), 0)

    def test_duplicate_uuid(self) -> None:
        """
        OFFERING.1002 naming the uuid.
        """
        self.ok(instance(uuid="io1"))
        err = self.refused(instance(uuid="io1", name="other"), OFFERING.DUPLICATE)
        self.assertEqual(err.opaque["field"], "uuid")

    def test_update(self) -> None:
        """
        Name, description and allocator strategy change; a bad strategy is SYS.1007.
        """
        self.ok(instance(uuid="io1"))
        inv = self.ok(UpdateInstanceOfferingMsg(
            service_id="offering", uuid="io1", name="big", description="d",
            allocator_strategy="LastHostPreferredAllocatorStrategy")).inventory
        self.assertEqual((inv["name"], inv["description"], inv["allocatorStrategy"]),
                         ("big", "d", "LastHostPreferredAllocatorStrategy"))
        self.assertEqual(self.row("instanceOffering", "io1"), inv)
        self.invalid(UpdateInstanceOfferingMsg(service_id="offering", uuid="io1",
                                               allocator_strategy="x"), "allocatorStrategy")
        err = self.refused(UpdateInstanceOfferingMsg(service_id="offering", uuid="nope",
                                                     name="n"),
                           OFFERING.INSTANCE_OFFERING_NOT_FOUND)
        self.assertEqual((err.opaque["uuid"], err.opaque["field"]), ("nope", "uuid"))

    def test_state(self) -> None:
        """
        disable/enable; a bad event is SYS.1007; unknown offering OFFERING.1000.
        """
        self.ok(instance(uuid="io1"))
        inv = self.ok(ChangeInstanceOfferingStateMsg(service_id="offering", uuid="io1",
                                                     state_event="disable")).inventory
        self.assertEqual(inv["state"], "Disabled")
        self.assertEqual(self.row("instanceOffering", "io1")["state"], "Disabled")
        inv = self.ok(ChangeInstanceOfferingStateMsg(service_id="offering", uuid="io1",
                                                     state_event="enable")).inventory
        self.assertEqual(inv["state"], "Enabled")
        self.invalid(ChangeInstanceOfferingStateMsg(service_id="offering", uuid="io1",
                                                    state_event="off"), "stateEvent")
        self.refused(ChangeInstanceOfferingStateMsg(service_id="offering", uuid="x",
                                                    state_event="enable"),
                     OFFERING.INSTANCE_OFFERING_NOT_FOUND)

    def test_delete(self) -> None:
        """
        The row goes; a second delete sent with the first finds it gone and succeeds too
        (ZStack's C{successIfResourceNotExisting}).
        """
        self.ok(instance(uuid="io1"))
        d1 = self.bus.send(DeleteInstanceOfferingMsg(service_id="offering",
                                                     resource_uuid="io1", uuid="io1"))
        d2 = self.bus.send(DeleteInstanceOfferingMsg(service_id="offering",
                                                     resource_uuid="io1", uuid="io1"))
        r1, r2 = self.result(d1), self.result(d2)
        self.assertTrue(r1.success, r1.error)
        self.assertIsNone(r1.inventory)
        self.assertTrue(r2.success, r2.error)
        self.assertEqual(self.count("instanceOffering"), 0)

    def test_delete_used_by_vm(self) -> None:
        """
        As in ZStack, an offering VMs were made from can be deleted: the VM keeps the CPU
        and memory it copied.
        """
        self.ok(instance(uuid="io1", cpu_num=2, memory_size=2 * GiB))
        self.seed("vmInstance", {"uuid": "vm1", "name": "vm1", "instanceOfferingUuid": "io1",
                                 "cpuNum": 2, "memorySize": 2 * GiB})
        self.ok(DeleteInstanceOfferingMsg(service_id="offering", uuid="io1"))
        vm = self.row("vmInstance", "vm1")
        self.assertEqual((vm["instanceOfferingUuid"], vm["cpuNum"], vm["memorySize"]),
                         ("io1", 2, 2 * GiB))


class DiskOfferingTests(ServiceTestCase):
    """
    Disk offerings.
    """

    def test_create(self) -> None:
        """
        Every field lands in the row (the API's allocationStrategy is the inventory's
        allocatorStrategy).
        """
        inv = self.ok(disk(uuid="do1", sort_key=5, description="d",
                           allocation_strategy="LocalPrimaryStorageStrategy")).inventory
        self.assertEqual(set(inv), DISK_FIELDS)
        self.assertEqual((inv["diskSize"], inv["sortKey"], inv["allocatorStrategy"],
                          inv["state"], inv["type"]),
                         (10 * GiB, 5, "LocalPrimaryStorageStrategy", "Enabled",
                          "DefaultDiskOfferingType"))
        self.assertEqual(self.row("diskOffering", "do1"), inv)
        for strategy in DISK_ALLOCATOR_STRATEGIES:
            self.ok(disk(allocation_strategy=strategy))
        self.assertEqual(self.ok(disk(disk_size=1)).inventory["diskSize"], 1)

    def test_invalid_fields(self) -> None:
        """
        SYS.1007 naming each field; nothing created.
        """
        for msg, field in [
            (disk(disk_size=0), "diskSize"),
            (disk(disk_size=-5), "diskSize"),
            (disk(disk_size="1G"), "diskSize"),
            (disk(allocation_strategy="DefaultHostAllocatorStrategy"), "allocationStrategy"),
            (disk(sort_key=-(2**31) - 1), "sortKey"),
            (disk(name=None), "name"),
            (disk(uuid=""), "uuid"),
        ]:
            self.invalid(msg, field)
        self.assertEqual(self.count("diskOffering"), 0)

    def test_update_state_delete(self) -> None:
        """
        Update, disable, delete; each unknown uuid is OFFERING.1001 naming it; the store
        is left clean.
        """
        self.ok(disk(uuid="do1"))
        inv = self.ok(UpdateDiskOfferingMsg(service_id="offering", uuid="do1", name="n",
                                            description="d")).inventory
        self.assertEqual((inv["name"], inv["description"]), ("n", "d"))
        inv = self.ok(ChangeDiskOfferingStateMsg(service_id="offering", uuid="do1",
                                                 state_event="disable")).inventory
        self.assertEqual(inv["state"], "Disabled")
        self.invalid(ChangeDiskOfferingStateMsg(service_id="offering", uuid="do1",
                                                state_event="maintain"), "stateEvent")
        self.ok(DeleteDiskOfferingMsg(service_id="offering", uuid="do1"))
        self.assertEqual(self.count("diskOffering"), 0)
        for msg in (UpdateDiskOfferingMsg(service_id="offering", uuid="do1", name="x"),
                    ChangeDiskOfferingStateMsg(service_id="offering", uuid="do1",
                                               state_event="enable")):
            err = self.refused(msg, OFFERING.DISK_OFFERING_NOT_FOUND)
            self.assertEqual(err.opaque["uuid"], "do1")
        # A delete of what is gone succeeds (idempotent).
        self.ok(DeleteDiskOfferingMsg(service_id="offering", uuid="do1"))

    def test_concurrent_updates(self) -> None:
        """
        Two updates sent together apply in order.
        """
        self.ok(disk(uuid="do1"))
        d1 = self.bus.send(UpdateDiskOfferingMsg(service_id="offering", resource_uuid="do1",
                                                 uuid="do1", name="a"))
        d2 = self.bus.send(UpdateDiskOfferingMsg(service_id="offering", resource_uuid="do1",
                                                 uuid="do1", name="b"))
        self.assertEqual(self.result(d1).inventory["name"], "a")
        self.assertEqual(self.result(d2).inventory["name"], "b")
        self.assertEqual(self.row("diskOffering", "do1")["name"], "b")
