"""
The host service's administrative operations (change state, update, reconnect, delete)
and KVMHostAsyncHttpCallMsg, on the in-memory agent pair, LocalBus and MemoryStore.
"""

from __future__ import annotations

from typing import Any

from tests.agent_fakes import base
from tests.test_host_service import HostServiceTestCase
from zcontrol.bus.message import Reply
from zcontrol.core.errors import SYS, ErrorCode, OperationError
from zcontrol.services.host import (
    HOST,
    SERVICE_ID,
    ChangeHostStateMsg,
    DeleteHostMsg,
    HostDeletedEvent,
    HostStateChangedEvent,
    KVMHostAsyncHttpCallMsg,
    ReconnectHostMsg,
    UpdateHostMsg,
)
from zcontrol.services.primarystorage.messages import RemoveHostFromPrimaryStorageMsg


class HostOpsTestCase(HostServiceTestCase):
    """
    Host h1 added (Connected).
    """

    def setUp(self) -> None:
        super().setUp()
        reply = self.successResultOf(self.add(1))
        self.assertTrue(reply.success, reply.error)

    def send(self, msg: Any) -> Any:
        d = self.bus.send(msg)
        self.pump()
        return self.successResultOf(d)

    def ok(self, msg: Any) -> Any:
        reply = self.send(msg)
        self.assertTrue(reply.success, reply.error)
        return reply

    def refused(self, msg: Any, code: str) -> ErrorCode:
        reply = self.send(msg)
        self.assertFalse(reply.success, f"{type(msg).__name__} succeeded")
        self.assertEqual(reply.error.code, code, str(reply.error))
        return reply.error

    def state(self, event: str, uuid: str = "h1") -> Any:
        return ChangeHostStateMsg(service_id=SERVICE_ID, resource_uuid=uuid, uuid=uuid,
                                  state_event=event)

    def transitions(self) -> list[tuple[str, str]]:
        return [(e.old_state, e.new_state) for e in self.events
                if isinstance(e, HostStateChangedEvent)]


class ChangeStateTests(HostOpsTestCase):
    """
    ChangeHostStateMsg.
    """

    def test_disable_enable(self) -> None:
        """
        disable -> Disabled, enable -> Enabled, each an event; again is a no-op.
        """
        self.assertEqual(self.ok(self.state("disable")).inventory["state"], "Disabled")
        self.assertEqual(self.row("host", "h1")["state"], "Disabled")
        self.ok(self.state("disable"))
        self.assertEqual(self.ok(self.state("enable")).inventory["state"], "Enabled")
        self.pump()
        self.assertEqual(self.transitions(),
                         [("Enabled", "Disabled"), ("Disabled", "Enabled")])

    def test_maintain_without_vms(self) -> None:
        """
        maintain goes through PreMaintenance to Maintenance at once when no VM is active
        (stopped and destroyed VMs do not count); enable brings it back.
        """
        self.seed_vm("vm-stopped", "h1", "Stopped")
        self.seed_vm("vm-destroyed", "h1", "Destroyed")
        self.assertEqual(self.ok(self.state("maintain")).inventory["state"], "Maintenance")
        self.assertEqual(self.row("host", "h1")["state"], "Maintenance")
        self.ok(self.state("enable"))
        self.pump()
        self.assertEqual(self.transitions(), [("Enabled", "PreMaintenance"),
                                              ("PreMaintenance", "Maintenance"),
                                              ("Maintenance", "Enabled")])

    def test_maintain_refused_with_running_vms(self) -> None:
        """
        With Running VMs that can be neither migrated nor stopped (here no VM service
        answers: each migrate and stop fails with no route), maintain is HOST.1005 naming
        them and why, and the host returns to the state it had.
        """
        self.ok(self.state("disable"))
        self.seed_vm("vm-b", "h1", "Running")
        self.seed_vm("vm-a", "h1", "Running")
        self.seed_vm("vm-c", "h1", "Stopped")
        err = self.refused(self.state("maintain"), HOST.HAS_VMS)
        self.assertEqual(err.opaque["vmUuids"], ["vm-a", "vm-b"])
        self.assertEqual((err.opaque["vmCount"], err.opaque["operation"]), (2, "maintain"))
        self.assertIn("vm-a", err.details)
        self.assertIn("could neither migrate nor stop VM vm-a", err.details)
        self.assertEqual(sorted(err.opaque["failures"]), ["vm-a", "vm-b"])
        self.assertEqual([e["code"] for e in err.opaque["failures"]["vm-a"]],
                         [SYS.NO_ROUTE_ERROR, SYS.NO_ROUTE_ERROR])
        self.assertEqual(err.cause.code, SYS.NO_ROUTE_ERROR)
        self.assertEqual(self.row("host", "h1")["state"], "Disabled")
        self.pump()
        self.assertEqual(self.transitions()[-2:], [("Disabled", "PreMaintenance"),
                                                   ("PreMaintenance", "Disabled")])

    def test_maintain_refused_with_capacity_held(self) -> None:
        """
        Fault (review 2, item 1): maintain looked only at VM rows, so a VM being created
        (its capacity reserved on the host by the allocator, its row not yet naming the
        host) did not stop it. Capacity held on the host is HOST.1005 naming the holders,
        and the host returns to its state; once given back, maintain goes through.
        """
        self.result(self.store.reserve_host_capacity("h1", 1, 1, ("VmInstanceVO", "vm-new")))
        err = self.refused(self.state("maintain"), HOST.HAS_VMS)
        self.assertEqual(err.opaque["holders"], [{"holderType": "VmInstanceVO",
                                                  "holderUuid": "vm-new", "cpu": 1,
                                                  "memory": 1}])
        self.assertEqual(err.opaque["vmUuids"], [])
        self.assertIn("host CPU/memory held by 1 holder(s)", err.details)
        self.assertIn("vm-new", err.details)
        self.assertEqual(self.row("host", "h1")["state"], "Enabled")
        self.pump()
        self.assertEqual(self.transitions(), [("Enabled", "PreMaintenance"),
                                              ("PreMaintenance", "Enabled")])
        self.result(self.store.release_host_capacity("h1", ("VmInstanceVO", "vm-new")))
        self.assertEqual(self.ok(self.state("maintain")).inventory["state"], "Maintenance")

    def test_invalid(self) -> None:
        """
        An unknown event is SYS.1007 naming stateEvent (preMaintain is internal); an
        unknown host HOST.1003 naming it.
        """
        for event in ("preMaintain", "Maintenance", None):
            err = self.refused(self.state(event), SYS.INVALID_ARGUMENT_ERROR)
            self.assertEqual(err.opaque["field"], "stateEvent")
        err = self.refused(self.state("enable", uuid="nope"), HOST.NOT_FOUND)
        self.assertEqual(err.opaque["uuid"], "nope")
        self.assertEqual(self.row("host", "h1")["state"], "Enabled")


class UpdateReconnectTests(HostOpsTestCase):
    """
    UpdateHostMsg and ReconnectHostMsg.
    """

    def test_update(self) -> None:
        """
        Name and description change; the rest of the row does not.
        """
        before = self.row("host", "h1")
        inv = self.ok(UpdateHostMsg(service_id=SERVICE_ID, uuid="h1", name="renamed",
                                    description="rack 4")).inventory
        self.assertEqual((inv["name"], inv["description"]), ("renamed", "rack 4"))
        self.assertEqual((inv["managementIp"], inv["status"]),
                         (before["managementIp"], before["status"]))
        self.assertEqual(self.row("host", "h1"), inv)

    def test_update_invalid_and_unknown(self) -> None:
        """
        SYS.1007 naming the field; HOST.1003 for an unknown host.
        """
        err = self.refused(UpdateHostMsg(service_id=SERVICE_ID, uuid="h1", name=""),
                           SYS.INVALID_ARGUMENT_ERROR)
        self.assertEqual(err.opaque["field"], "name")
        self.refused(UpdateHostMsg(service_id=SERVICE_ID, uuid="nope", name="x"),
                     HOST.NOT_FOUND)
        err = self.refused(UpdateHostMsg(service_id=SERVICE_ID, uuid="", name="x"),
                           SYS.INVALID_ARGUMENT_ERROR)
        self.assertEqual(err.opaque["field"], "uuid")

    def test_reconnect(self) -> None:
        """
        ReconnectHostMsg is a connect: Connecting then Connected again, with a new secret.
        """
        secret = self.pair.client.secret_for(base(1))
        del self.events[:]
        inv = self.ok(ReconnectHostMsg(service_id=SERVICE_ID, resource_uuid="h1",
                                       uuid="h1")).inventory
        self.assertEqual(inv["status"], "Connected")
        self.assertNotEqual(self.pair.client.secret_for(base(1)), secret)
        self.assertEqual(self.statuses(), [("h1", "Connected", "Connecting"),
                                           ("h1", "Connecting", "Connected")])
        self.refused(ReconnectHostMsg(service_id=SERVICE_ID, uuid="nope"), HOST.NOT_FOUND)


class DeleteHostTests(HostOpsTestCase):
    """
    DeleteHostMsg.
    """

    def setUp(self) -> None:
        super().setUp()
        self.removals: list[RemoveHostFromPrimaryStorageMsg] = []
        self.refuse_from: set[str] = set()
        self.bus.register_service("storage.primary", self.fake_primary_storage)

    def fake_primary_storage(self, msg: Any) -> Reply:
        self.removals.append(msg)
        if msg.primary_storage_uuid in self.refuse_from:
            raise OperationError.of(SYS.OPERATION_ERROR, "volumes on the host: vol-1",
                                    volumeUuids=["vol-1"])
        return Reply()

    def attach_storage(self, uuid: str) -> None:
        self.seed("primaryStorage", {"uuid": uuid, "name": uuid, "zoneUuid": "z",
                                     "url": f"/{uuid}", "type": "LocalStorage"})
        self.seed("primaryStorageClusterRef", {"uuid": f"ref-{uuid}",
                                               "primaryStorageUuid": uuid,
                                               "clusterUuid": "c"})

    def test_delete(self) -> None:
        """
        Each attached primary storage is told; the agent client forgets the host; the row
        goes; HostDeletedEvent.
        """
        self.attach_storage("ps1")
        self.attach_storage("ps2")
        reply = self.ok(DeleteHostMsg(service_id=SERVICE_ID, resource_uuid="h1", uuid="h1"))
        self.assertIsNone(reply.inventory)
        self.assertEqual([(m.primary_storage_uuid, m.host_uuid, m.resource_uuid)
                          for m in self.removals],
                         [("ps1", "h1", "ps1"), ("ps2", "h1", "ps2")])
        self.assertIsNone(self.row("host", "h1"))
        self.assertIsNone(self.pair.client.secret_for(base(1)))
        self.assertIsNone(self.service.facts("h1"))
        self.pump()
        [event] = [e for e in self.events if isinstance(e, HostDeletedEvent)]
        self.assertEqual((event.host_uuid, event.cluster_uuid, event.zone_uuid),
                         ("h1", "c", "z"))
        # Deleting it again succeeds (ZStack's successIfResourceNotExisting), telling no
        # storage and publishing nothing.
        removals = len(self.removals)
        self.assertIsNone(self.ok(DeleteHostMsg(service_id=SERVICE_ID, uuid="h1")).inventory)
        self.pump()
        self.assertEqual(len(self.removals), removals)
        self.assertEqual(len([e for e in self.events if isinstance(e, HostDeletedEvent)]), 1)

    def test_refused_with_vms(self) -> None:
        """
        VMs on the host (any state but Destroyed) refuse the delete (HOST.1005 naming
        them); no storage is told.
        """
        self.attach_storage("ps1")
        self.seed_vm("vm-1", "h1", "Stopped")
        err = self.refused(DeleteHostMsg(service_id=SERVICE_ID, uuid="h1"), HOST.HAS_VMS)
        self.assertEqual(err.opaque["vmUuids"], ["vm-1"])
        self.assertEqual(self.removals, [])
        self.assertEqual(self.row("host", "h1")["state"], "Enabled")

    def test_storage_refuses(self) -> None:
        """
        A primary storage refusing stops the delete: HOST.1006 whose cause is its error;
        the host is still there, connected.
        """
        self.attach_storage("ps1")
        self.refuse_from.add("ps1")
        err = self.refused(DeleteHostMsg(service_id=SERVICE_ID, uuid="h1"), HOST.DELETE_ERROR)
        self.assertEqual(err.cause.code, SYS.OPERATION_ERROR)
        self.assertEqual(err.opaque["primaryStorageUuid"], "ps1")
        self.assertEqual(self.row("host", "h1")["status"], "Connected")
        self.assertEqual(self.row("host", "h1")["state"], "Enabled")
        self.assertIsNotNone(self.pair.client.secret_for(base(1)))

    def test_destroyed_vms_let_go(self) -> None:
        """
        Fault (review 2, item 4): Destroyed VMs, exempted by the pre-check, still refused
        the delete through their hostUuid foreign key. As in ZStack a Destroyed VM keeps no
        host: the delete clears its hostUuid (lastHostUuid is the host), in the same
        transaction as the host's row.
        """
        self.seed_vm("vm-gone", "h1", "Destroyed")
        self.ok(DeleteHostMsg(service_id=SERVICE_ID, uuid="h1"))
        self.assertIsNone(self.row("host", "h1"))
        vm = self.row("vmInstance", "vm-gone")
        self.assertEqual((vm["hostUuid"], vm["lastHostUuid"], vm["state"]),
                         (None, "h1", "Destroyed"))

    def test_refused_with_capacity_held(self) -> None:
        """
        Fault (review 2, item 2): capacity reserved on the host (a VM being created)
        refused the delete only at the row's foreign key, after the storages had been told
        to drop the host, with an error blaming "local storage". It is refused first,
        HOST.1006 naming the holders as host CPU/memory; no storage is told; the host is
        back Enabled and Connected.
        """
        self.attach_storage("ps1")
        self.result(self.store.reserve_host_capacity("h1", 1, 1, ("VmInstanceVO", "vm-new")))
        err = self.refused(DeleteHostMsg(service_id=SERVICE_ID, uuid="h1"), HOST.DELETE_ERROR)
        self.assertEqual(err.opaque["holders"], {"hostCapacity": [
            {"holderType": "VmInstanceVO", "holderUuid": "vm-new", "cpu": 1, "memory": 1}]})
        self.assertIn("host CPU/memory held by", err.details)
        self.assertIn("vm-new", err.details)
        self.assertNotIn("local storage", err.details)
        self.assertEqual(self.removals, [])
        row = self.row("host", "h1")
        self.assertEqual((row["state"], row["status"]), ("Enabled", "Connected"))
        self.pump()
        self.assertEqual(self.transitions(), [("Enabled", "Disabled"), ("Disabled", "Enabled")])

    def test_out_of_allocation_before_the_checks(self) -> None:
        """
        The host leaves allocation (Disabled) before its VMs and holders are looked at:
        an allocator reserving meanwhile is refused (DB.1008), so the delete's checks
        cannot miss a reservation.
        """
        from zcontrol.db.interfaces import DB
        orig = self.store.host_capacity_holders
        seen: list[Any] = []

        def racing(host_uuid: str, limit: int = 20) -> Any:
            d = self.store.reserve_host_capacity_for_allocation(
                host_uuid, 1, 1, ("VmInstanceVO", "vm-late"))
            d.addErrback(lambda f: seen.append(f.value.error.code))
            return d.addBoth(lambda _: orig(host_uuid, limit))

        self.store.host_capacity_holders = racing
        self.ok(DeleteHostMsg(service_id=SERVICE_ID, uuid="h1"))
        self.assertEqual(seen, [DB.HOST_NOT_ALLOCATABLE])
        self.assertIsNone(self.row("host", "h1"))

    def test_store_reference_named(self) -> None:
        """
        Something the checks did not see (a VM appearing meanwhile) makes the store's
        delete fail on its foreign key: HOST.1006 naming the VM, never a raw DB.1001; the
        host is back Enabled.
        """
        orig = self.store.host_capacity_holders

        def appearing(host_uuid: str, limit: int = 20) -> Any:
            self.store.host_capacity_holders = orig
            self.seed_vm("vm-late", "h1", "Running")
            return orig(host_uuid, limit)

        self.store.host_capacity_holders = appearing
        err = self.refused(DeleteHostMsg(service_id=SERVICE_ID, uuid="h1"), HOST.DELETE_ERROR)
        self.assertEqual(err.opaque["holders"], {"vmInstance": ["vm-late"]})
        self.assertIn("vm-late", err.details)
        self.assertEqual(self.row("host", "h1")["state"], "Enabled")


class AsyncHttpCallTests(HostOpsTestCase):
    """
    KVMHostAsyncHttpCallMsg (the lead's; tested here).
    """

    def call(self, path: Any, host: str = "h1", command: Any = None) -> Any:
        return KVMHostAsyncHttpCallMsg(service_id=SERVICE_ID, resource_uuid=host,
                                       host_uuid=host, path=path, command=command or {})

    def test_success(self) -> None:
        """
        An asynchronous command runs on the host's agent; the reply carries its response.
        """
        reply = self.ok(self.call("/host/capacity"))
        self.assertTrue(reply.response["success"])
        self.assertEqual(reply.response["cpuNum"], 32)
        self.assertEqual(reply.response["totalMemory"], 128 * 1024**3)

    def test_unknown_path(self) -> None:
        """
        An unknown or synchronous path is SYS.1007 naming path.
        """
        for path in ("/nope", "/host/echo", 7):
            err = self.refused(self.call(path), SYS.INVALID_ARGUMENT_ERROR)
            self.assertEqual(err.opaque["field"], "path")

    def test_not_connected(self) -> None:
        """
        A host that is not Connected is HOST.1002.
        """
        self.seed_host("h9", "Disconnected", base(5))
        self.refused(self.call("/host/capacity", host="h9"), HOST.NOT_CONNECTED)

    def test_unknown_host(self) -> None:
        """
        An unknown host is HOST.1003.
        """
        self.refused(self.call("/host/capacity", host="nope"), HOST.NOT_FOUND)
