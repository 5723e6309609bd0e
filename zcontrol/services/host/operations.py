# -*- test-case-name: tests.test_host_ops -*-
"""
The host service's administrative operations (issue 9): change state (with the
maintenance of issue 10), update, reconnect and delete, mixed into
L{zcontrol.services.host.service.HostService}.

They run in the host's connect chain (C{host-connect-<uuid>}), one at a time with connects
and pings of the same host, so a delete never interleaves with a reconnect. State changes
are compare-and-swaps on C{state} (Note [host states]).

Note [host states]: C{Enabled} hosts get new VMs; C{Disabled}, C{PreMaintenance} and
C{Maintenance} ones do not (the allocator filters on the state, and its reservation,
C{reserve_host_capacity_for_allocation}, requires C{Enabled} in the same statement, so
nothing is reserved on a host once its state change committed). Every committed transition
publishes a L{HostStateChangedEvent}.

Note [maintenance]: C{maintain} (ZStack's C{HostBase.maintenanceHook}), one at a time per
host (chain C{host-maintain-<uuid>}; the state changes themselves run in the connect chain,
the VMs' moves outside it, so pings and commands go on meanwhile):
 1. the host goes C{PreMaintenance}: from then on no new VM lands on it;
 2. every active VM on it (any state but C{Stopped}, C{Created}, C{Destroyed}, C{Error})
    is B{live-migrated} away with a C{MigrateVmMsg} (the allocator picks the destination),
    at most L{MIGRATE_PARALLELISM} at a time (ZStack's C{kvm.vm.migrationQuantity}), unless
    a volume of it is on B{LocalStorage}, which cannot migrate live (ZStack's LocalStorage
    maintenance policy: C{StopVm}); a VM that is not migrated (local storage, or its
    migration failed: no other host, the VM service refused, ...) is B{stopped} with a
    C{StopVmInstanceMsg} (ZStack's C{stop-vm-not-migrated}). The messages queue in each
    VM's chain, so a VM in the middle of an operation is moved once that operation ended;
 3. the host is looked at again: with no active VM on it and no capacity held on it
    (C{host_capacity_holders}: a VM being created holds the host's CPU and memory before
    its row names the host), it goes C{Maintenance}; otherwise it returns to the state it
    had (C{Enabled} when it was C{PreMaintenance}) and the reply is C{HOST.1005} naming the
    VMs (C{vmUuids}) and holders, with why each VM could not be moved (C{failures}: VM uuid
    -> the migrate and stop errors; the first stop error is the cause).

Note [host delete]: the steps, in order, so that a refusal at any of them leaves the host
as it was:
 1. an C{Enabled} host is compare-and-swapped to C{Disabled} (taken out of allocation:
    with the allocator's reservation conditions, nothing new is reserved on it from then
    on); a host already Disabled, PreMaintenance or Maintenance is left so;
 2. VMs on it (any state but C{Destroyed}) refuse the delete with C{HOST.1005} naming
    them; capacity held on it (a VM being created) refuses it with C{HOST.1006} naming the
    holders ("CPU/memory of host ... held by ...", details C{holders.hostCapacity});
 3. every primary storage attached to the host's cluster gets a
    L{RemoveHostFromPrimaryStorageMsg} (one after the other; the first refusal stops the
    delete with C{HOST.1006}, its error the cause; the storages told before keep what they
    dropped, as in ZStack);
 4. the row is deleted; in the same transaction the host's Destroyed VMs let go of it
    (C{hostUuid} cleared, C{lastHostUuid} kept: ZStack's destroyed VMs keep no host). If
    something else in the store still refers to it (a VM or image cache that appeared
    meanwhile, capacity held on its local storage), the store's C{DB.1001} becomes
    C{HOST.1006} naming what holds it;
 5. the agent client forgets the host (its pending commands fail) and so does the
    service, and L{HostDeletedEvent} is published.
On a refusal at steps 2-4 the host returns to its previous state (step 1 undone).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredSemaphore, fail, gatherResults
from twisted.logger import Logger

from zcontrol.bus.publishing import publish_after_commit
from zcontrol.core.errors import SYS, ErrorCode, OperationError, error_code
from zcontrol.db.interfaces import DB
from zcontrol.db.query import Condition, Query
from zcontrol.services import validate
from zcontrol.services.host.messages import (
    HOST,
    HOST_STATE_EVENTS,
    ChangeHostStateMsg,
    DeleteHostMsg,
    HostDeletedEvent,
    HostReply,
    HostStateChangedEvent,
    ReconnectHostMsg,
    UpdateHostMsg,
)
from zcontrol.services.primarystorage.messages import (
    LOCAL_STORAGE_TYPE,
    RemoveHostFromPrimaryStorageMsg,
)
from zcontrol.services.primarystorage.messages import SERVICE_ID as PS_SERVICE_ID
from zcontrol.services.vm.messages import SERVICE_ID as VM_SERVICE_ID
from zcontrol.services.vm.messages import MigrateVmMsg, StopVmInstanceMsg

__all__ = ["HostOperations", "INACTIVE_VM_STATES", "PRE_MAINTENANCE", "MAINTENANCE"]

log = Logger()

PRE_MAINTENANCE, MAINTENANCE = "PreMaintenance", "Maintenance"
#: VM states that do not keep a host from maintenance.
INACTIVE_VM_STATES = ("Stopped", "Created", "Destroyed", "Error")
#: At most this many VM uuids are named in an error.
VMS_SHOWN = 20
#: How many VMs a maintenance migrates (or stops) at once (ZStack's
#: C{kvm.vm.migrationQuantity}).
MIGRATE_PARALLELISM = 2
#: The bound (seconds) of one VM's migrate or stop during a maintenance (the maintain
#: message's own deadline caps it).
MOVE_TIMEOUT = 1800.0


class HostOperations:
    """
    Change state, update, reconnect and delete (mixed into the host service, whose
    C{_run}, C{_store}, C{_bus}, C{_clock}, C{_agents}, C{_facts}, C{_failures},
    C{_base} and C{connect} they use).
    """

    _store: Any
    _bus: Any
    _clock: Any
    _agents: Any
    _facts: dict[str, Any]
    _failures: dict[str, int]
    _run: Any
    _background: Any
    _base: Any
    connect: Any

    def handle_operation(self, msg: Any) -> Deferred | None:
        """
        The reply Deferred of an administrative message, or None when C{msg} is not one.
        """
        if isinstance(msg, ChangeHostStateMsg):
            return self.change_state(msg.uuid, msg.state_event).addCallback(
                lambda row: HostReply(inventory=row))
        if isinstance(msg, UpdateHostMsg):
            return self.update_host(msg.uuid, msg.name, msg.description).addCallback(
                lambda row: HostReply(inventory=row))
        if isinstance(msg, ReconnectHostMsg):
            validate.uuid(msg.uuid, "uuid")
            return self.connect(msg.uuid).addCallback(lambda row: HostReply(inventory=row))
        if isinstance(msg, DeleteHostMsg):
            def gone(reason: Any) -> Any:
                # Idempotent, as ZStack's APIDeleteHostMsg (successIfResourceNotExisting): a
                # host that is not (or no longer) there is deleted already.
                error = getattr(reason.value, "error", None)
                if (error is not None and error.code == HOST.NOT_FOUND
                        and error.opaque.get("uuid") == msg.uuid):
                    return None
                return reason

            return self.delete_host(msg.uuid).addErrback(gone).addCallback(
                lambda _: HostReply(inventory=None))
        return None

    # --- helpers --------------------------------------------------------------------------

    async def _must_host(self, uuid: str) -> dict[str, Any]:
        row = await self._store.get("host", uuid)
        if row is None:
            raise self._host_not_found(uuid)
        return row

    @staticmethod
    def _host_not_found(uuid: str) -> OperationError:
        return OperationError.of(HOST.NOT_FOUND, f"no host {uuid}", hostUuid=uuid,
                                 resource="host", uuid=uuid, field="uuid")

    async def _set_state(self, uuid: str, old: str, new: str) -> dict[str, Any]:
        try:
            row = await self._store.update("host", uuid, {"state": new}, {"state": old})
        except OperationError as e:
            if e.error.code == SYS.RESOURCE_NOT_FOUND:
                raise self._host_not_found(uuid) from None
            raise
        log.info("host {uuid} state {old} -> {new}", uuid=uuid, old=old, new=new)
        self._background(publish_after_commit(self._bus, HostStateChangedEvent(
            host_uuid=uuid, old_state=old, new_state=new), self._clock),
            "publishing a host state change")
        return row

    async def _vms_on(self, uuid: str, excluded_states: tuple[str, ...]
                      ) -> tuple[int, list[str]]:
        page = await self._store.query("vmInstance", Query(
            conditions=[Condition("hostUuid", "=", uuid),
                        Condition("state", "!?=", list(excluded_states))],
            fields=["uuid"], sort="uuid", limit=VMS_SHOWN, reply_with_count=True))
        return page.total or 0, [r["uuid"] for r in page.inventories]

    @staticmethod
    def _has_vms(uuid: str, operation: str, count: int, vms: list[str],
                 held: dict[str, Any] | None = None,
                 failures: dict[str, list[ErrorCode]] | None = None) -> OperationError:
        parts: list[str] = []
        extra: dict[str, Any] = {}
        cause = None
        if count:
            more = ", ..." if count > len(vms) else ""
            parts.append(f"{count} VM(s) on it ({', '.join(vms)}{more})")
        if failures:
            shown = sorted(failures)[:VMS_SHOWN]
            parts.append("could neither migrate nor stop " + "; ".join(
                f"VM {vm} ({' / then: '.join(str(e) for e in failures[vm])})"
                for vm in shown))
            extra["failures"] = {vm: [e.to_dict() for e in failures[vm]] for vm in shown}
            cause = failures[shown[0]][-1]
        if held and held["total"]:
            parts.append(_held_text(held))
            extra.update(holders=held["holders"], holderCount=held["total"])
        return OperationError(error_code(
            HOST.HAS_VMS, f"cannot {operation} host {uuid}: {'; '.join(parts)}", cause,
            hostUuid=uuid, vmUuids=vms, vmCount=count, operation=operation, **extra))

    # --- operations -----------------------------------------------------------------------

    def change_state(self, uuid: Any, state_event: Any) -> Deferred[dict[str, Any]]:
        """
        See L{ChangeHostStateMsg}, Note [host states] and Note [maintenance].

        @return: a Deferred firing with the host row; fails with C{SYS.1007} (field
            C{uuid} or C{stateEvent}), C{HOST.1003}, C{HOST.1005} (a maintenance that could
            not move every VM away), or C{SYS.1005} when another node (or an C{enable}
            during a maintenance) changed the state meanwhile.
        """
        try:
            validate.uuid(uuid, "uuid")
            target = HOST_STATE_EVENTS[validate.one_of(state_event, "stateEvent",
                                                       HOST_STATE_EVENTS)]
        except OperationError as e:
            return fail(e)

        if target == MAINTENANCE:
            return self._run(f"host-maintain-{uuid}", lambda: self._maintain(uuid))

        async def change() -> dict[str, Any]:
            row = await self._must_host(uuid)
            old = row["state"]
            if old == target:
                return row
            return await self._set_state(uuid, old, target)

        return self._run(f"host-connect-{uuid}", change)

    async def _maintain(self, uuid: str) -> dict[str, Any]:
        """
        Note [maintenance].
        """
        async def enter() -> tuple[dict[str, Any], str]:
            row = await self._must_host(uuid)
            old = row["state"]
            if old not in (PRE_MAINTENANCE, MAINTENANCE):
                row = await self._set_state(uuid, old, PRE_MAINTENANCE)
            return row, old

        row, old = await self._run(f"host-connect-{uuid}", enter)
        if old == MAINTENANCE:
            return row
        back = old if old != PRE_MAINTENANCE else "Enabled"
        try:
            failures = await self._evacuate(uuid)
        except BaseException:
            await self._run(f"host-connect-{uuid}",
                            lambda: self._set_state(uuid, PRE_MAINTENANCE, back))
            raise

        async def finish() -> dict[str, Any]:
            count, vms = await self._vms_on(uuid, INACTIVE_VM_STATES)
            held = await self._store.host_capacity_holders(uuid, VMS_SHOWN)
            if count or held["total"]:
                await self._set_state(uuid, PRE_MAINTENANCE, back)
                raise self._has_vms(uuid, "maintain", count, vms, held, failures)
            return await self._set_state(uuid, PRE_MAINTENANCE, MAINTENANCE)

        return await self._run(f"host-connect-{uuid}", finish)

    async def _evacuate(self, uuid: str) -> dict[str, list[ErrorCode]]:
        """
        Step 2 of Note [maintenance]: migrate or stop every active VM on the host.

        @return: VM uuid -> the errors of the VMs that could not be moved (a migrate error
            before a stop error).
        """
        page = await self._store.query("vmInstance", Query(
            conditions=[Condition("hostUuid", "=", uuid),
                        Condition("state", "!?=", list(INACTIVE_VM_STATES))],
            fields=["uuid"], sort="uuid", limit=100_000))
        vms = [r["uuid"] for r in page.inventories]
        if not vms:
            return {}
        local = await self._on_local_storage(vms)
        errors: dict[str, list[ErrorCode]] = {}

        async def migrate(vm: str) -> None:
            try:
                await self._send(MigrateVmMsg(service_id=VM_SERVICE_ID, resource_uuid=vm,
                                              vm_instance_uuid=vm), MOVE_TIMEOUT)
            except OperationError as e:
                log.warn("host {host}: VM {vm} could not be migrated away ({error}); "
                         "stopping it", host=uuid, vm=vm, error=e.error)
                errors.setdefault(vm, []).append(e.error)

        await _each([vm for vm in vms if vm not in local], MIGRATE_PARALLELISM, migrate)
        to_stop = [vm for vm in vms if vm in local or vm in errors]
        stop_errors: dict[str, ErrorCode] = {}

        async def stop(vm: str) -> None:
            try:
                await self._send(StopVmInstanceMsg(service_id=VM_SERVICE_ID,
                                                   resource_uuid=vm, uuid=vm), MOVE_TIMEOUT)
            except OperationError as e:
                if await self._store.get("vmInstance", vm) is None:
                    return  # gone meanwhile: nothing to stop (ZStack the same)
                log.warn("host {host}: VM {vm} could not be stopped: {error}", host=uuid,
                         vm=vm, error=e.error)
                errors.setdefault(vm, []).append(e.error)
                stop_errors[vm] = e.error

        await _each(to_stop, MIGRATE_PARALLELISM, stop)
        return {vm: errors[vm] for vm in stop_errors}

    async def _on_local_storage(self, vm_uuids: list[str]) -> set[str]:
        """
        The VMs of C{vm_uuids} with a volume on LocalStorage (which cannot migrate live).
        """
        volumes = (await self._store.query("volume", Query(
            conditions=[Condition("vmInstanceUuid", "?=", vm_uuids)],
            fields=["vmInstanceUuid", "primaryStorageUuid"], limit=100_000))).inventories
        storages = sorted({v["primaryStorageUuid"] for v in volumes
                           if v["primaryStorageUuid"] is not None})
        if not storages:
            return set()
        local = {ps["uuid"] for ps in (await self._store.query("primaryStorage", Query(
            conditions=[Condition("uuid", "?=", storages)], fields=["uuid", "type"],
            limit=len(storages)))).inventories if ps["type"] == LOCAL_STORAGE_TYPE}
        return {v["vmInstanceUuid"] for v in volumes if v["primaryStorageUuid"] in local}

    def update_host(self, uuid: Any, name: Any = None, description: Any = None
                    ) -> Deferred[dict[str, Any]]:
        """
        See L{UpdateHostMsg}.

        @return: a Deferred firing with the host row; fails with C{SYS.1007} naming the
            field, or C{HOST.1003}.
        """
        changes: dict[str, Any] = {}
        try:
            validate.uuid(uuid, "uuid")
            if name is not None:
                changes["name"] = validate.name(name)
            if description is not None:
                changes["description"] = validate.optional_text(description, "description")
        except OperationError as e:
            return fail(e)

        async def update() -> dict[str, Any]:
            row = await self._must_host(uuid)
            if not changes:
                return row
            try:
                return await self._store.update("host", uuid, changes)
            except OperationError as e:
                if e.error.code == SYS.RESOURCE_NOT_FOUND:
                    raise self._host_not_found(uuid) from None
                raise

        return self._run(f"host-connect-{uuid}", update)

    def delete_host(self, uuid: Any) -> Deferred[None]:
        """
        See L{DeleteHostMsg} and Note [host delete].

        @return: a Deferred firing with None once the host is gone; fails with
            C{SYS.1007}, C{HOST.1003}, C{HOST.1005} (VMs on it) or C{HOST.1006}.
        """
        try:
            validate.uuid(uuid, "uuid")
        except OperationError as e:
            return fail(e)

        async def delete() -> None:
            row = await self._must_host(uuid)
            old = row["state"]
            if old == "Enabled":
                # Step 1: out of allocation before anything is checked (Note [host delete]).
                row = await self._set_state(uuid, old, "Disabled")
            try:
                await self._delete_steps(uuid, row)
            except BaseException:
                if old == "Enabled":
                    try:
                        await self._set_state(uuid, "Disabled", old)
                    except OperationError as e:
                        log.warn("host {uuid}: cannot restore state {old} after a refused"
                                 " delete: {error}", uuid=uuid, old=old, error=e.error)
                raise
            self._agents.forget(self._base(row), f"host {uuid} was deleted")
            self._facts.pop(uuid, None)
            self._failures.pop(uuid, None)
            self._background(publish_after_commit(self._bus, HostDeletedEvent(
                host_uuid=uuid, cluster_uuid=row["clusterUuid"], zone_uuid=row["zoneUuid"]),
                self._clock), "publishing a host deletion")

        return self._run(f"host-connect-{uuid}", delete)

    async def _delete_steps(self, uuid: str, row: dict[str, Any]) -> None:
        """
        Steps 2 to 4 of Note [host delete] (the caller undoes step 1 when they fail).
        """
        count, vms = await self._vms_on(uuid, ("Destroyed",))
        if count:
            raise self._has_vms(uuid, "delete", count, vms)
        held = await self._store.host_capacity_holders(uuid, VMS_SHOWN)
        if held["total"]:
            raise OperationError.of(
                HOST.DELETE_ERROR, f"cannot delete host {uuid}: {_held_text(held)}",
                hostUuid=uuid, holders={"hostCapacity": held["holders"]},
                holderCount=held["total"])
        page = await self._store.query("primaryStorageClusterRef", Query(
            conditions=[Condition("clusterUuid", "=", row["clusterUuid"])],
            fields=["primaryStorageUuid"], sort="primaryStorageUuid", limit=10_000))
        for ref in page.inventories:
            ps_uuid = ref["primaryStorageUuid"]
            try:
                await self._send(RemoveHostFromPrimaryStorageMsg(
                    service_id=PS_SERVICE_ID, resource_uuid=ps_uuid,
                    primary_storage_uuid=ps_uuid, host_uuid=uuid))
            except OperationError as e:
                raise OperationError(error_code(
                    HOST.DELETE_ERROR, f"cannot delete host {uuid}: primary storage "
                    f"{ps_uuid} refused to remove it", e.error, hostUuid=uuid,
                    primaryStorageUuid=ps_uuid)) from None
        try:
            deleted = await self._store.delete_host(uuid)
        except OperationError as e:
            if e.error.code != DB.REFERENCE:
                raise
            holders = await self._holders(uuid)
            named = "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in holders.items())
            raise OperationError(error_code(
                HOST.DELETE_ERROR, f"cannot delete host {uuid}: still referenced"
                + (f" by {named}" if named else " (capacity held on its local storage)"),
                e.error, hostUuid=uuid, holders=holders)) from None
        if not deleted:
            raise self._host_not_found(uuid)

    async def _send(self, msg: Any, timeout: float = 300.0) -> Any:
        reply = await self._bus.send(msg, timeout)
        if not reply.success:
            raise OperationError(reply.error)
        return reply

    async def _holders(self, uuid: str) -> dict[str, list[str]]:
        holders: dict[str, list[str]] = {}
        for resource in ("vmInstance", "imageCache"):
            page = await self._store.query(resource, Query(
                conditions=[Condition("hostUuid", "=", uuid)], fields=["uuid"], sort="uuid",
                limit=VMS_SHOWN))
            if page.inventories:
                holders[resource] = [r["uuid"] for r in page.inventories]
        held = await self._store.host_capacity_holders(uuid, VMS_SHOWN)
        if held["holders"]:
            holders["hostCapacity"] = [f"{h['holderType']} {h['holderUuid']}"
                                       for h in held["holders"]]
        return holders


async def _each(items: list[str], parallelism: int, fn: Any) -> None:
    """
    Run C{await fn(item)} for every item, at most C{parallelism} at a time.
    """
    sem = DeferredSemaphore(parallelism)
    await gatherResults([sem.run(lambda i=i: Deferred.fromCoroutine(fn(i))) for i in items],
                        consumeErrors=True)


def _held_text(held: dict[str, Any]) -> str:
    """
    "host CPU/memory held by ..." for L{host_capacity_holders}' answer.
    """
    shown = ", ".join(f"{h['holderType']} {h['holderUuid']} ({h['cpu']} CPUs,"
                      f" {h['memory']} bytes)" for h in held["holders"])
    more = ", ..." if held["total"] > len(held["holders"]) else ""
    return (f"host CPU/memory held by {held['total']} holder(s) (VMs being created):"
            f" {shown}{more}")
