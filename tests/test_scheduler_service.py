"""
The C{host.allocator} service on the in-memory store, LocalBus and a Clock: allocation and
its idempotence, strategies, LocalStorage and NFS, narrowing, the "no available host"
error's reasons, validation, returning capacity, concurrent allocations and lost races.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from zcontrol.bus.local import LocalBus
from zcontrol.core.errors import SYS, OperationError
from zcontrol.db.interfaces import DB
from zcontrol.db.memory import MemoryStore
from zcontrol.scheduler import (
    ALLOCATOR,
    SERVICE_ID,
    AllocateHostMsg,
    AllocateHostReply,
    ReturnHostCapacityMsg,
)
from zcontrol.scheduler.service import HostAllocatorService, make
from zcontrol.services.registry import SERVICE_FACTORIES

GIB = 1024**3


class LosingStore(MemoryStore):
    """
    A store on which every host reservation loses a race (C{DB.1003}), as if concurrent
    allocations always took the capacity first.
    """

    def reserve_host_capacity_for_allocation(self, host_uuid: str, cpu: int, memory: int,
                                             holder: Any) -> Deferred:
        self.lost = getattr(self, "lost", 0) + 1
        return fail(OperationError.of(DB.HOST_CAPACITY, f"host {host_uuid} is full"))


class ChangeBeforeReservation(MemoryStore):
    """
    A store on which C{change} (C{(resource, uuid, changes)}, set by the test) commits
    right before the first host reservation: between the allocator's snapshot and its
    reservation, as a state change by another node (or chain) may.
    """

    change: tuple[str, str, dict] | None = None

    async def _first(self) -> None:
        if self.change is not None:
            resource, uuid, changes = self.change
            self.change = None
            await MemoryStore.update(self, resource, uuid, changes)

    def reserve_host_capacity(self, host_uuid: str, cpu: int, memory: int, holder: Any
                              ) -> Deferred:
        async def go() -> Any:
            await self._first()
            return await MemoryStore.reserve_host_capacity(self, host_uuid, cpu, memory,
                                                           holder)
        return Deferred.fromCoroutine(go())

    def reserve_host_capacity_for_allocation(self, host_uuid: str, cpu: int, memory: int,
                                             holder: Any) -> Deferred:
        async def go() -> Any:
            await self._first()
            return await MemoryStore.reserve_host_capacity_for_allocation(
                self, host_uuid, cpu, memory, holder)
        return Deferred.fromCoroutine(go())


class AllocatorServiceTestCase(SynchronousTestCase):
    """
    Zone C{z}, cluster C{c} attached to L2 C{l2} (L3 C{l3}) and to NFS storage C{nfs}
    (100 GiB, mounted on every host), hosts C{h1}, C{h2} (4 CPUs, 4 GiB each), all Enabled
    and Connected.
    """

    store_class: type = MemoryStore

    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = LocalBus(self.clock, node_id="mn-1")
        self.bus.start()
        self.store = self.store_class(self.clock)
        self.result(self.store.start())
        self.addCleanup(self.stop)
        for resource, values in [
            ("zone", {"uuid": "z", "name": "zone"}),
            ("cluster", {"uuid": "c", "name": "c", "zoneUuid": "z", "hypervisorType": "KVM"}),
            ("l2Network", {"uuid": "l2", "name": "l2", "zoneUuid": "z",
                           "physicalInterface": "eth0"}),
            ("l3Network", {"uuid": "l3", "name": "l3", "l2NetworkUuid": "l2", "zoneUuid": "z"}),
            ("l2NetworkClusterRef", {"uuid": "l2c", "l2NetworkUuid": "l2", "clusterUuid": "c"}),
            ("primaryStorage", {"uuid": "nfs", "name": "nfs", "zoneUuid": "z", "url": "n:/x",
                                "type": "NFS", "status": "Connected",
                                "totalCapacity": 100 * GIB, "availableCapacity": 100 * GIB}),
            ("primaryStorageClusterRef", {"uuid": "psc", "primaryStorageUuid": "nfs",
                                          "clusterUuid": "c"}),
        ]:
            self.result(self.store.insert(resource, values))
        for h in ("h1", "h2"):
            self.add_host(h)
        self.service = HostAllocatorService(self.clock, self.bus, self.store)
        self.service.start()

    def add_host(self, uuid: str, cluster: str = "c", cpu: int = 4, memory: int = 4 * GIB,
                 mount: str | None = "nfs", **kw: Any) -> None:
        self.result(self.store.add_host({
            "uuid": uuid, "name": uuid, "zoneUuid": "z", "clusterUuid": cluster,
            "managementIp": f"10.1.0.{len(uuid)}{uuid}", "hypervisorType": "KVM",
            "status": "Connected", "cpuNum": cpu, "totalCpuCapacity": cpu,
            "totalMemoryCapacity": memory, **kw}))
        if mount is not None:
            self.result(self.store.insert("primaryStorageHostRef", {
                "uuid": f"m-{mount}-{uuid}", "primaryStorageUuid": mount, "hostUuid": uuid}))

    def stop(self) -> None:
        d = self.service.stop()
        self.pump()
        self.successResultOf(d)
        d = self.store.stop()
        self.pump()
        self.successResultOf(d)

    def pump(self) -> None:
        for _ in range(200):
            self.store.flush()
            self.clock.advance(0)

    def result(self, d: Deferred) -> Any:
        self.pump()
        return self.successResultOf(d)

    def allocate(self, vm: str = "vm-1", **kw: Any) -> Deferred:
        kw.setdefault("cpu_num", 1)
        kw.setdefault("memory_size", GIB)
        kw.setdefault("disk_size", 10 * GIB)
        kw.setdefault("l3_network_uuids", ["l3"])
        return self.bus.send(AllocateHostMsg(service_id=SERVICE_ID, vm_instance_uuid=vm, **kw))

    def ok(self, d: Deferred) -> AllocateHostReply:
        reply = self.result(d)
        self.assertTrue(reply.success, reply.error)
        return reply

    def error(self, d: Deferred, code: str) -> Any:
        reply = self.result(d)
        self.assertFalse(reply.success)
        self.assertEqual(reply.error.code, code, reply.error)
        return reply.error

    def host(self, uuid: str) -> dict:
        return self.result(self.store.get("host", uuid))


class AllocateTests(AllocatorServiceTestCase):
    """
    L{AllocateHostMsg}.
    """

    def test_first_fit_reserves(self) -> None:
        """
        The default strategy takes the first fitting host by uuid and reserves the VM's
        CPUs and memory there for C{("VmInstanceVO", vm)}; the reply carries the host's
        inventory after the reservation and the storages for the root volume.
        """
        reply = self.ok(self.allocate(cpu_num=2, memory_size=3 * GIB))
        self.assertEqual(reply.inventory["uuid"], "h1")
        self.assertEqual(reply.inventory["availableCpuCapacity"], 2)
        self.assertEqual(reply.inventory["availableMemoryCapacity"], GIB)
        self.assertEqual(reply.primary_storage_uuids, ["nfs"])
        self.assertEqual(self.result(self.store.holder_reservations(("VmInstanceVO", "vm-1"))),
                         [("h1", 2, 3 * GIB)])
        # The next one no longer fits on h1.
        self.assertEqual(self.ok(self.allocate("vm-2", memory_size=2 * GIB)).inventory["uuid"],
                         "h2")
        self.assertEqual(self.result(self.store.audit_capacity()), [])

    def test_least_used(self) -> None:
        """
        C{LeastVmPreferredHostAllocatorStrategy} (least-used) takes the host with the most
        free memory, so consecutive VMs spread.
        """
        self.ok(self.allocate("vm-0", memory_size=GIB))
        for vm in ("vm-1", "vm-2"):
            reply = self.ok(self.allocate(
                vm, allocator_strategy="LeastVmPreferredHostAllocatorStrategy"))
            self.assertEqual(reply.inventory["uuid"], "h2" if vm == "vm-1" else "h1")

    def test_repeat_is_idempotent(self) -> None:
        """
        The same VM asking again (a retry after a lost reply) gets the host it holds,
        reserved once; asking for other amounts is refused with C{ALLOCATOR.1002}.
        """
        first = self.ok(self.allocate())
        again = self.ok(self.allocate())
        self.assertEqual(again.inventory["uuid"], first.inventory["uuid"])
        self.assertEqual(again.primary_storage_uuids, ["nfs"])
        self.assertEqual(self.host("h1")["availableCpuCapacity"], 3)
        err = self.error(self.allocate(cpu_num=2), ALLOCATOR.HELD_ELSEWHERE)
        self.assertEqual(err.opaque["hostUuid"], "h1")

    def test_local_storage_room_on_the_host(self) -> None:
        """
        With LocalStorage, the host whose own disk has room for the root volume is chosen,
        and the storages come best first (most room on that host).
        """
        self.result(self.store.insert("primaryStorage", {
            "uuid": "local", "name": "local", "zoneUuid": "z", "url": "/l", "status": "Connected",
            "type": "LocalStorage", "totalCapacity": 80 * GIB, "availableCapacity": 80 * GIB}))
        self.result(self.store.insert("primaryStorageClusterRef", {
            "uuid": "psc2", "primaryStorageUuid": "local", "clusterUuid": "c"}))
        for h, size in (("h1", 20 * GIB), ("h2", 60 * GIB)):
            self.result(self.store.insert("localStorageHostRef", {
                "uuid": f"lr-{h}", "primaryStorageUuid": "local", "hostUuid": h,
                "totalCapacity": size, "availableCapacity": size}))
        reply = self.ok(self.allocate(disk_size=50 * GIB, primary_storage_uuid="local"))
        self.assertEqual((reply.inventory["uuid"], reply.primary_storage_uuids), ("h2", ["local"]))
        reply = self.ok(self.allocate("vm-2", disk_size=15 * GIB))
        self.assertEqual((reply.inventory["uuid"], reply.primary_storage_uuids),
                         ("h1", ["nfs", "local"]))

    def test_narrowing(self) -> None:
        """
        An explicit host, cluster or zone narrows the choice; the avoid list removes.
        """
        self.assertEqual(self.ok(self.allocate("v1", host_uuid="h2")).inventory["uuid"], "h2")
        self.assertEqual(self.ok(self.allocate("v2", avoid_host_uuids=["h1"], zone_uuid="z",
                                               cluster_uuid="c")).inventory["uuid"], "h2")

    def test_no_available_host_says_why(self) -> None:
        """
        When nothing fits, C{ALLOCATOR.1000} names the request and, per filter, how many
        candidates it removed.
        """
        self.add_host("h3", state="Maintenance")
        self.add_host("h4", status="Disconnected")
        self.add_host("h5", mount=None)
        self.add_host("h6", cpu=1)
        err = self.error(self.allocate(cpu_num=2, memory_size=4 * GIB + 1,
                                       avoid_host_uuids=["h1"]),
                         ALLOCATOR.NO_AVAILABLE_HOST)
        self.assertEqual(err.opaque["candidates"], 6)
        self.assertEqual(err.opaque["filters"], [
            {"name": "narrowing", "removed": 0, "left": 6},
            {"name": "avoid", "removed": 1, "left": 5},
            {"name": "state", "removed": 2, "left": 3},
            {"name": "l2Network", "removed": 0, "left": 3},
            {"name": "primaryStorage", "removed": 1, "left": 2},
            {"name": "capacity", "removed": 2, "left": 0},
        ])
        for text in ("cpuNum=2", f"memorySize={4 * GIB + 1}", f"diskSize={10 * GIB}", "l3",
                     "capacity removed 2", "state removed 2"):
            self.assertIn(text, err.details)
        self.assertEqual(err.opaque["request"]["cpuNum"], 2)

    def test_l2_not_attached(self) -> None:
        """
        A cluster not attached to a requested L3's L2 network has no candidate.
        """
        self.result(self.store.insert("l2Network", {
            "uuid": "l2b", "name": "l2b", "zoneUuid": "z", "physicalInterface": "eth1"}))
        self.result(self.store.insert("l3Network", {
            "uuid": "l3b", "name": "l3b", "l2NetworkUuid": "l2b", "zoneUuid": "z"}))
        err = self.error(self.allocate(l3_network_uuids=["l3", "l3b"]),
                         ALLOCATOR.NO_AVAILABLE_HOST)
        self.assertEqual(err.opaque["filters"][3], {"name": "l2Network", "removed": 2, "left": 0})

    def test_fills_up_then_refuses(self) -> None:
        """
        Eight 1-CPU VMs fill both hosts (first-fit: h1's four, then h2's); the ninth gets
        "no available host", its capacity filter having removed both.
        """
        hosts = [self.ok(self.allocate(f"vm-{i}", memory_size=GIB // 2)).inventory["uuid"]
                 for i in range(8)]
        self.assertEqual(hosts, ["h1"] * 4 + ["h2"] * 4)
        err = self.error(self.allocate("vm-9"), ALLOCATOR.NO_AVAILABLE_HOST)
        self.assertEqual(err.opaque["filters"][-1], {"name": "capacity", "removed": 2, "left": 0})
        # The text says why, for the filters that removed hosts (new-user trial).
        self.assertIn("capacity removed 2 (not enough free CPU or memory)", err.details)
        self.assertNotIn("state removed 0 (", err.details)
        self.assertEqual(self.result(self.store.audit_capacity()), [])

    def test_concurrent_allocations_never_exceed_capacity(self) -> None:
        """
        Twelve allocations sent at once (the memory store runs them in a shuffled order)
        for eight CPUs: exactly eight win, the others fail with C{ALLOCATOR.1000}, and the
        holders account for every CPU taken.
        """
        ds = [self.allocate(f"vm-{i}") for i in range(12)]
        replies = self.result(gatherResults(ds))
        won = [r for r in replies if r.success]
        self.assertEqual(len(won), 8)
        lost = [r for r in replies if not r.success]
        for r in lost:
            self.assertEqual(r.error.code, ALLOCATOR.NO_AVAILABLE_HOST)
        # They raced: some chose a host that filled up before their reservation.
        self.assertTrue(any(r.error.opaque.get("lostRaces") for r in lost))
        self.assertEqual([self.host(h)["availableCpuCapacity"] for h in ("h1", "h2")], [0, 0])
        self.assertEqual(self.result(self.store.audit_capacity()), [])

    def test_unknown_resources(self) -> None:
        """
        An unknown L3 network, zone, cluster, host or primary storage fails with
        C{ALLOCATOR.1001} naming it.
        """
        err = self.error(self.allocate(l3_network_uuids=["l3", "nope"]), ALLOCATOR.NOT_FOUND)
        self.assertEqual((err.opaque["uuid"], err.opaque["field"]), ("nope", "l3NetworkUuids"))
        for field, kw in (("zoneUuid", {"zone_uuid": "x"}), ("clusterUuid", {"cluster_uuid": "x"}),
                          ("hostUuid", {"host_uuid": "x"}),
                          ("primaryStorageUuid", {"primary_storage_uuid": "x"})):
            err = self.error(self.allocate(**kw), ALLOCATOR.NOT_FOUND)
            self.assertEqual((err.opaque["uuid"], err.opaque["field"]), ("x", field))

    def test_validation(self) -> None:
        """
        Every field is checked: C{SYS.1007} naming it.
        """
        for field, kw in (("cpuNum", {"cpu_num": 0}), ("cpuNum", {"cpu_num": True}),
                          ("memorySize", {"memory_size": 0}), ("diskSize", {"disk_size": -1}),
                          ("cpuSpeed", {"cpu_speed": -1}),
                          ("l3NetworkUuids", {"l3_network_uuids": ["l3", "l3"]}),
                          ("l3NetworkUuids[0]", {"l3_network_uuids": [""]}),
                          ("avoidHostUuids", {"avoid_host_uuids": "h1"}),
                          ("allocatorStrategy", {"allocator_strategy": "Random"}),
                          ("zoneUuid", {"zone_uuid": "a b"}),
                          ("vmInstanceUuid", {"vm": ""})):
            err = self.error(self.allocate(**kw), SYS.INVALID_ARGUMENT_ERROR)
            self.assertEqual(err.opaque["field"], field)
        self.assertEqual(self.host("h1")["availableCpuCapacity"], 4)


class ReturnTests(AllocatorServiceTestCase):
    """
    L{ReturnHostCapacityMsg}.
    """

    def give_back(self, host: str = "h1", vm: str = "vm-1") -> Deferred:
        return self.bus.send(ReturnHostCapacityMsg(service_id=SERVICE_ID, host_uuid=host,
                                                   vm_instance_uuid=vm))

    def test_return_is_idempotent(self) -> None:
        """
        Returning gives the VM's CPUs and memory back; returning again changes nothing;
        the VM can then be allocated afresh.
        """
        self.ok(self.allocate(cpu_num=3))
        reply = self.ok(self.give_back())
        self.assertEqual(reply.inventory["availableCpuCapacity"], 4)
        self.assertEqual(self.ok(self.give_back()).inventory["availableCpuCapacity"], 4)
        self.assertEqual(self.result(self.store.holder_reservations(("VmInstanceVO", "vm-1"))),
                         [])
        self.assertEqual(self.ok(self.allocate(cpu_num=2)).inventory["availableCpuCapacity"], 2)

    def test_unknown_host(self) -> None:
        """
        An unknown host fails with C{ALLOCATOR.1001}; a bad field with C{SYS.1007}.
        """
        err = self.error(self.give_back("nope"), ALLOCATOR.NOT_FOUND)
        self.assertEqual(err.opaque["uuid"], "nope")
        err = self.error(self.give_back(vm=""), SYS.INVALID_ARGUMENT_ERROR)
        self.assertEqual(err.opaque["field"], "vmInstanceUuid")


class LostRaceTests(AllocatorServiceTestCase):
    """
    Every reservation loses its race.
    """

    store_class = LosingStore

    def test_bounded_retries(self) -> None:
        """
        An allocation whose reservations keep losing tries at most C{max_attempts} (8) and
        then fails with C{ALLOCATOR.1000} saying so.
        """
        err = self.error(self.allocate(), ALLOCATOR.NO_AVAILABLE_HOST)
        self.assertEqual(self.store.lost, 8)
        self.assertEqual(err.opaque["lostRaces"], 8)
        self.assertIn("8 reservations were lost to concurrent allocations", err.details)
        self.assertEqual(err.opaque["filters"][-1]["left"], 2)


class StateChangeRaceTests(AllocatorServiceTestCase):
    """
    Fault (review 2, item 1): a host that left allocation between the allocator's
    snapshot and its reservation still got the VM (the reservation checked capacity only).
    """

    store_class = ChangeBeforeReservation

    def test_host_leaves_allocation_meanwhile(self) -> None:
        """
        h1 goes to Maintenance, PreMaintenance, Disabled or Disconnected after the
        snapshot that chose it: its reservation is refused and the allocation takes h2 (a
        lost race), nothing held on h1.
        """
        for i, changes in enumerate(({"state": "Maintenance"}, {"state": "PreMaintenance"},
                                     {"state": "Disabled"}, {"status": "Disconnected"})):
            before = self.host("h1")
            self.store.change = ("host", "h1", changes)
            reply = self.ok(self.allocate(f"vm-{i}"))
            self.assertEqual(reply.inventory["uuid"], "h2", changes)
            self.assertEqual(self.host("h1")["availableCpuCapacity"], 4)
            self.assertEqual(self.result(self.store.holder_reservations(
                ("VmInstanceVO", f"vm-{i}"))), [("h2", 1, GIB)])
            self.result(self.store.update("host", "h1", {k: before[k] for k in changes}))
        self.assertEqual(self.result(self.store.audit_capacity()), [])

    def test_cluster_or_zone_disabled_meanwhile(self) -> None:
        """
        The cluster or zone of every host is Disabled after the snapshot: no host is
        reserved; the error counts the refused reservations as lost races.
        """
        for resource, uuid in (("cluster", "c"), ("zone", "z")):
            self.store.change = (resource, uuid, {"state": "Disabled"})
            err = self.error(self.allocate(), ALLOCATOR.NO_AVAILABLE_HOST)
            self.assertEqual(err.opaque["lostRaces"], 2)
            self.assertIn("stopped taking VMs", err.details)
            self.assertEqual([self.host(h)["availableCpuCapacity"] for h in ("h1", "h2")],
                             [4, 4])
            self.result(self.store.update(resource, uuid, {"state": "Enabled"}))


class LastHostPreferredTests(AllocatorServiceTestCase):
    """
    Fault (review 2, item 5): an instance offering accepted
    C{LastHostPreferredAllocatorStrategy} but the allocator refused it (C{SYS.1007}).
    """

    strategy = "LastHostPreferredAllocatorStrategy"

    def test_last_host_chosen_when_it_fits(self) -> None:
        """
        The VM's last host (h2, not first-fit's h1) is chosen when it passes every filter.
        """
        reply = self.ok(self.allocate(allocator_strategy=self.strategy, last_host_uuid="h2"))
        self.assertEqual(reply.inventory["uuid"], "h2")
        self.assertEqual(reply.inventory["availableCpuCapacity"], 3)
        self.assertEqual(reply.primary_storage_uuids, ["nfs"])
        # Other strategies ignore it.
        self.assertEqual(self.ok(self.allocate("vm-2", last_host_uuid="h2")).inventory["uuid"],
                         "h1")

    def test_first_fit_otherwise(self) -> None:
        """
        Without a last host, with one that fails a filter (full, in maintenance, avoided,
        outside the requested cluster, unknown), or that a concurrent change took: first-fit.
        """
        self.add_host("h3", cpu=1)
        self.add_host("h4", state="Maintenance")
        self.result(self.store.update("host", "h1", {"totalCpuCapacity": 16,
                                                     "availableCpuCapacity": 16}))
        self.assertEqual(self.ok(self.allocate("vm-0", allocator_strategy=self.strategy))
                         .inventory["uuid"], "h1")
        for i, kw in enumerate(({"last_host_uuid": "h3", "cpu_num": 2},
                                {"last_host_uuid": "h4"},
                                {"last_host_uuid": "h2", "avoid_host_uuids": ["h2"]},
                                {"last_host_uuid": "h2", "host_uuid": "h1"},
                                {"last_host_uuid": "h9"})):
            reply = self.ok(self.allocate(f"vm-{i + 1}", allocator_strategy=self.strategy,
                                          memory_size=GIB // 8, **kw))
            self.assertEqual(reply.inventory["uuid"], "h1", kw)
        err = self.error(self.allocate("vm-x", allocator_strategy=self.strategy,
                                       last_host_uuid=""), SYS.INVALID_ARGUMENT_ERROR)
        self.assertEqual(err.opaque["field"], "lastHostUuid")


class LastHostLostTests(AllocatorServiceTestCase):
    """
    The last host leaves allocation between the snapshot and the reservation.
    """

    store_class = ChangeBeforeReservation

    def test_last_host_lost_then_first_fit(self) -> None:
        self.store.change = ("host", "h2", {"state": "Disabled"})
        reply = self.ok(self.allocate(allocator_strategy="LastHostPreferredAllocatorStrategy",
                                      last_host_uuid="h2"))
        self.assertEqual(reply.inventory["uuid"], "h1")
        self.assertEqual(self.host("h2")["availableCpuCapacity"], 4)


class WiringTests(SynchronousTestCase):
    """
    The node runs the allocator.
    """

    def test_registry(self) -> None:
        """
        The registry lists the allocator's factory, which builds the C{host.allocator}
        service from a node's reactor, bus and store.
        """
        self.assertIn("zcontrol.scheduler.service.make", SERVICE_FACTORIES)

        class Node:
            reactor = Clock()
            bus = object()
            store = object()

        service = make(Node())
        self.assertEqual(service.service_id, "host.allocator")
        self.assertIs(service.store, Node.store)
