# -*- test-case-name: tests.test_vm_volumes -*-
"""
Data volumes: the volume service (ZStack's C{VolumeManagerImpl} and C{VolumeBase}: create,
delete, expunge) and the VM service's attach and detach (ZStack's
C{VmInstanceBase.handle(AttachDataVolumeToVmMsg)}, C{VmAttachVolumeFlow},
C{VmDetachVolumeFlow}), both on the journal of L{zcontrol.core.journal}.

A data volume's life
====================
 - B{Created} (L{VolumeService}, L{CreateDataVolumeMsg}): a C{volumes} row of type C{Data},
   its C{size} (bytes) from the disk offering or C{diskSize}, status C{NotInstantiated}: no
   capacity held, no bits. With C{primaryStorageUuid} it is instantiated at once (a
   C{CreateDataVolume} job: the row, then the bits through the primary storage service's
   L{InstantiateVolumeOnPrimaryStorageMsg}, then C{Ready}); on LocalStorage the host comes
   from the system tag C{localStorage::hostUuid::<hostUuid>}, as ZStack asks
   (C{LocalStorageSystemTags.DEST_HOST_FOR_CREATING_DATA_VOLUME}); without it the create is
   refused (C{SYS.1007} naming C{systemTags}).
 - B{Attached} (L{VolumeAttachMixin}, L{AttachDataVolumeToVmMsg}) to a C{Running} or
   C{Stopped} VM, in the VM's chain, as an C{AttachDataVolumeToVm} job of three flows, each
   giving back exactly what it took:
    1. C{take-volume}: the volume row gets C{vmInstanceUuid} and the VM's lowest free
       C{deviceId} (1 and up: 0 is the root volume's) in one compare-and-swap on its being
       unattached and C{Ready} or C{NotInstantiated} (so two attaches of one volume to two
       VMs, or an attach and a delete, cannot both win); for a C{NotInstantiated} volume it
       records where it will be instantiated: the primary storage of the VM's root volume
       and, on LocalStorage, the root volume's host. Rollback: the row's C{vmInstanceUuid}
       and C{deviceId} cleared, if still this VM's.
    2. C{instantiate-volume}: a C{NotInstantiated} volume is created there
       (L{InstantiateVolumeOnPrimaryStorageMsg}, holder C{("VolumeVO", volume)}) and its row
       made C{Ready} with C{primaryStorageUuid} and C{installPath}. Rollback: the bits deleted
       and the capacity given back (L{DeleteVolumeBitsOnPrimaryStorageMsg}, idempotent: by
       the volume's default path and holder even when the run never reported), the row
       C{NotInstantiated} again.
    3. C{attach-on-hypervisor}: a C{Running} VM gets the volume hot-plugged
       (C{/vm/attachdatavolume} on its host). Rollback: C{/vm/detachdatavolume} (a volume
       that is not attached detaches successfully, so a rollback of an attach that never
       happened is a no-op).
   A C{Ready} volume must be reachable from the VM: on LocalStorage, on the VM's host
   (ZStack's C{LocalStorageApiInterceptor}); elsewhere, on a primary storage attached to the
   VM's cluster; otherwise the attach is refused before any job (C{VM.1005}).
 - B{Detached} (L{DetachDataVolumeFromVmMsg}), a C{DetachDataVolumeFromVm} job:
    1. C{detach-on-hypervisor}: a C{Running} VM's volume is unplugged. Rollback: plugged
       in again at its device id (an agent that answers that it is already attached has
       what the rollback wants).
    2. C{release-volume}: the row's C{vmInstanceUuid} and C{deviceId} cleared (a
       compare-and-swap on its being this VM's). Rollback: set again.
   The root volume cannot be detached (C{VM.1006} saying so). A volume that is not attached
   detaches successfully (the retry of a detach whose reply was lost), its inventory
   unchanged; one attached to another VM than C{vmUuid} is refused (C{VM.1006} naming both).
 - B{Deleted} (L{DeleteDataVolumeMsg}, L{ExpungeDataVolumeMsg}: volumes are deleted directly
   here), refused with C{VOLUME.1004} while attached: the row is first marked C{Deleted} (a
   compare-and-swap on its being unattached: from then on no attach takes it), its bits are
   deleted and its capacity given back (L{DeleteVolumeBitsOnPrimaryStorageMsg}), and its row
   removed. Each step is idempotent, so a delete that failed at the agent (C{VOLUME.1001},
   the volume left C{Deleted} with its bits and capacity) or was cut short by a crash is
   finished by sending it again. Deleting a volume that does not exist succeeds.

An attach or detach fails with C{VM.1005}/C{VM.1006} whose cause chain is the failing flow's
error (the agent's own text included); refusals before the job are the VM's state
(C{VM.1010} naming it), an unknown VM (C{VM.1100}) or volume (C{VOLUME.1003}), a volume that
is not C{Ready}/C{NotInstantiated} (C{VOLUME.1002}) or already attached (C{VOLUME.1004}).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Iterable, MutableMapping

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from agent import protocol as p
from zcontrol.core.errors import SYS, OperationError, error_code
from zcontrol.core.journal import (
    JobKind,
    JournaledFlow,
    JournaledFlowChain,
    recover_jobs,
)
from zcontrol.core.trace import new_trace_id, trace_scope
from zcontrol.db.interfaces import DB
from zcontrol.db.query import Query
from zcontrol.services import validate
from zcontrol.services.base import Service, handles, succeeds_if_gone
from zcontrol.services.offering.messages import OFFERING
from zcontrol.services.primarystorage.messages import (
    LOCAL_STORAGE_TYPE,
    PS,
    DeleteVolumeBitsOnPrimaryStorageMsg,
    InstantiateVolumeOnPrimaryStorageMsg,
)
from zcontrol.services.primarystorage.messages import SERVICE_ID as PRIMARY
from zcontrol.services.vm import states
from zcontrol.services.vm.base import NO_JOB, VOLUME_HOLDER, job_kinds, message_body
from zcontrol.services.vm.errors import VM
from zcontrol.services.vm.messages import (
    SERVICE_ID,
    VOLUME,
    VOLUME_SERVICE_ID,
    AttachDataVolumeToVmMsg,
    CreateDataVolumeMsg,
    DeleteDataVolumeMsg,
    DetachDataVolumeFromVmMsg,
    ExpungeDataVolumeMsg,
    VolumeReply,
)
from zcontrol.services.zone.service import new_uuid

__all__ = [
    "ATTACH_KIND",
    "CREATE_KIND",
    "DETACH_KIND",
    "LOCAL_STORAGE_HOST_TAG",
    "VolumeAttachMixin",
    "VolumeService",
    "data_volume_tos",
    "make",
]

log = Logger()

#: The job kinds (the job rows' C{apiName}).
CREATE_KIND = "CreateDataVolume"
ATTACH_KIND = "AttachDataVolumeToVm"
DETACH_KIND = "DetachDataVolumeFromVm"

#: ZStack's C{LocalStorageSystemTags.DEST_HOST_FOR_CREATING_DATA_VOLUME}: the host a data
#: volume created on a LocalStorage goes to.
LOCAL_STORAGE_HOST_TAG = "localStorage::hostUuid::"

#: Volume statuses (ZStack's C{VolumeStatus}).
READY = "Ready"
NOT_INSTANTIATED = "NotInstantiated"
DELETED = "Deleted"

#: What an agent answers a hot-plug of a volume the VM already has (the simulator's text; a
#: libvirt agent's "target ... already exists" would be added here). A rollback that re-attaches
#: counts it as done.
_ALREADY_ATTACHED = ("is already attached", "already exists")


class _Flow(JournaledFlow):
    """
    A journaled flow from two functions: C{run(ctx)} returning what it took, and
    C{rollback(ctx, took)}.
    """

    def __init__(self, name: str, run: Callable[[MutableMapping[str, Any]], Awaitable[dict]],
                 rollback: Callable[[MutableMapping[str, Any], dict | None], Awaitable[None]]
                 ) -> None:
        self.name = name
        self._run = run
        self._rollback = rollback

    def run(self, ctx: MutableMapping[str, Any]) -> Deferred:
        return Deferred.fromCoroutine(self._run(ctx))

    def rollback(self, ctx: MutableMapping[str, Any], took: dict | None) -> Deferred:
        return Deferred.fromCoroutine(self._rollback(ctx, took))


def _msg(ctx: MutableMapping[str, Any], key: str) -> Any:
    return (ctx.get("message") or {}).get(key)


def _conflict(e: OperationError) -> bool:
    return e.error.code == SYS.CHANGE_RESOURCE_STATE_ERROR


def _gone(e: OperationError) -> bool:
    return e.error.code == SYS.RESOURCE_NOT_FOUND


def volume_to(row: dict[str, Any]) -> p.VolumeTO:
    """
    The agent's view of an attached volume row (ZStack's C{VolumeTO}).
    """
    return p.VolumeTO(volume_uuid=row["uuid"], install_path=row["installPath"] or "",
                      device_id=row["deviceId"] or 0)


async def _query(store: Any, resource: str, *conditions: str) -> list[dict[str, Any]]:
    return (await store.query(resource, Query(conditions=list(conditions), limit=100000))
            ).inventories


async def data_volume_tos(store: Any, vm_uuid: str) -> list[p.VolumeTO]:
    """
    The data volumes attached to VM C{vm_uuid} that have bits (C{Ready}), as the agent's
    C{StartVmCmd.dataVolumes} wants them, in device order: what a start must define the VM
    with.
    """
    rows = await _query(store, "volume", f"vmInstanceUuid={vm_uuid}", "type=Data",
                        f"status={READY}")
    return [volume_to(r) for r in sorted(rows, key=lambda r: r["deviceId"] or 0)]


# --- the volume service ----------------------------------------------------------------------


class VolumeService(Service):
    """
    The C{volume} service: create, delete and expunge data volumes (see the module
    docstring). Its one job kind, C{CreateDataVolume} (a create on a primary storage), is
    resolved at start when this node was running one when it stopped (rolled back: the row
    and any bits removed).

    @ivar node_id: this management node's uuid (the owner of its jobs).
    @ivar recovered: fires (with L{recover_jobs}' outcomes) once the interrupted jobs are
        resolved.
    """

    service_id = VOLUME_SERVICE_ID

    def __init__(self, clock: Any, bus: Any, store: Any, node_id: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(clock, bus, store, **kwargs)
        self.node_id = node_id or bus.node_id
        self.kinds = {CREATE_KIND: JobKind(CREATE_KIND, (
            _Flow("create-row", self._create_row, self._uncreate_row),
            _Flow("instantiate-volume", self._create_bits, self._delete_created_bits),
            _Flow("volume-ready", self._volume_ready, self._nothing),
        ))}
        self.recovered: Deferred = Deferred()

    def start(self) -> Any:
        """
        Resolve this node's interrupted C{CreateDataVolume} jobs in the background
        (L{resolve_interrupted}; L{recovered} fires with the outcomes), and serve.
        """
        self.background(self.resolve_interrupted(), "resolving interrupted volume jobs"
                        ).chainDeferred(self.recovered)
        return super().start()

    def resolve_interrupted(self) -> Deferred:
        """
        Resolve this node's C{Running} jobs of the volume service's kinds, each in its
        volume's chain, as its trace (L{recover_jobs}: the create rolled back, its row and
        any bits removed).

        @return: a Deferred firing with L{recover_jobs}' outcomes.
        """
        async def recover() -> list[dict]:
            jobs = [j for j in await self.store.running_jobs(self.node_id)
                    if j.get("apiName") in self.kinds]
            out: list[dict] = []
            for job in jobs:
                out.extend(await trace_scope(job["uuid"], self.serialized,
                                             f"volume-{job.get('resourceUuid')}",
                                             lambda job=job: Deferred.fromCoroutine(
                                                 recover_jobs(self.store, self.node_id,
                                                              self.kinds, [job],
                                                              clock=self.clock))))
            return out

        return Deferred.fromCoroutine(recover())

    # --- create -----------------------------------------------------------------------

    @handles(CreateDataVolumeMsg)
    async def create(self, msg: CreateDataVolumeMsg) -> VolumeReply:
        """
        L{CreateDataVolumeMsg}: C{SYS.1007} naming a bad field (C{name}, C{diskSize}: 1 byte
        and up, C{systemTags}, ...); C{OFFERING.1001} naming C{diskOfferingUuid};
        C{PS.1003} naming C{primaryStorageUuid}; C{VOLUME.1000} when the uuid is taken or
        the instantiation failed (its cause; nothing left behind).
        """
        values = await self._values(msg)
        uuid = values["uuid"]
        ps_uuid, host_uuid = await self._placement(msg)

        async def run() -> VolumeReply:
            if await self.store.get("volume", uuid) is not None:
                raise OperationError.of(VOLUME.CREATE_ERROR, f"a volume with uuid {uuid} exists",
                                        field="uuid", uuid=uuid)
            if ps_uuid is None:
                return VolumeReply(inventory=await self._insert(values))
            job_uuid = new_trace_id()
            body = {**message_body(msg), "uuid": uuid, "values": values,
                    "hostUuid": host_uuid}

            async def job() -> dict:
                return await JournaledFlowChain(self.store, self.node_id,
                                                self.kinds[CREATE_KIND],
                                                job_uuid=job_uuid).run(body, uuid)

            try:
                await trace_scope(job_uuid, lambda: Deferred.fromCoroutine(job()))
            except OperationError as e:
                raise OperationError(error_code(
                    VOLUME.CREATE_ERROR, f"cannot create data volume {uuid} on primary"
                    f" storage {ps_uuid}", e.error, uuid=uuid,
                    primaryStorageUuid=ps_uuid, job=job_uuid)) from None
            return VolumeReply(inventory=await self.store.get("volume", uuid),
                               job_uuid=job_uuid)

        return await self.serialized(f"volume-{uuid}", run)

    async def _values(self, msg: CreateDataVolumeMsg) -> dict[str, Any]:
        name = validate.name(msg.name)
        description = validate.optional_text(msg.description, "description")
        uuid = new_uuid() if msg.uuid is None else validate.uuid(msg.uuid, "uuid")
        offering_uuid = None
        if msg.disk_offering_uuid is not None:
            offering = await self.must_get("diskOffering", msg.disk_offering_uuid,
                                           OFFERING.DISK_OFFERING_NOT_FOUND,
                                           field="diskOfferingUuid")
            size, offering_uuid = offering["diskSize"], offering["uuid"]
        elif msg.disk_size is not None:
            size = validate.size(msg.disk_size, "diskSize")
        else:
            raise validate.invalid("diskSize", None, "or diskOfferingUuid must be given")
        for field, tags in (("systemTags", msg.system_tags), ("userTags", msg.user_tags)):
            if not isinstance(tags, list):
                raise validate.invalid(field, tags, "must be a list of tags")
            for i, tag in enumerate(tags):
                validate.name(tag, f"{field}[{i}]", 2048)
        account = (None if msg.account_uuid is None
                   else validate.uuid(msg.account_uuid, "accountUuid"))
        return {"uuid": uuid, "name": name, "description": description, "type": "Data",
                "size": size, "diskOfferingUuid": offering_uuid, "status": NOT_INSTANTIATED,
                "accountUuid": account}

    async def _placement(self, msg: CreateDataVolumeMsg) -> tuple[str | None, str | None]:
        """
        The primary storage (and LocalStorage host) to instantiate on at once, or C{(None,
        None)}.
        """
        if msg.primary_storage_uuid is None:
            return None, None
        ps = await self.must_get("primaryStorage", msg.primary_storage_uuid, PS.NOT_FOUND,
                                 field="primaryStorageUuid")
        if ps["type"] != LOCAL_STORAGE_TYPE:
            return ps["uuid"], None
        hosts = [t[len(LOCAL_STORAGE_HOST_TAG):] for t in msg.system_tags
                 if t.startswith(LOCAL_STORAGE_HOST_TAG)]
        if len(hosts) != 1:
            raise validate.invalid(
                "systemTags", msg.system_tags,
                f"must hold one {LOCAL_STORAGE_HOST_TAG}<hostUuid> to create a data volume on"
                f" LocalStorage {ps['uuid']} (ZStack's"
                " LocalStorageSystemTags.DEST_HOST_FOR_CREATING_DATA_VOLUME)")
        host_uuid = validate.uuid(hosts[0], "systemTags")
        await self.must_get("host", host_uuid, PS.NOT_FOUND, field="systemTags")
        return ps["uuid"], host_uuid

    async def _insert(self, values: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self.store.insert("volume", values)
        except OperationError as e:
            if e.error.code == DB.DUPLICATE:
                raise OperationError(error_code(
                    VOLUME.CREATE_ERROR, f"a volume with uuid {values['uuid']} exists",
                    e.error, field="uuid", uuid=values["uuid"])) from None
            raise

    # the CreateDataVolume job's flows (context: the message body with "values", "hostUuid")

    async def _create_row(self, ctx: MutableMapping[str, Any]) -> dict:
        row = await self._insert(_msg(ctx, "values"))
        return {"volume": row["uuid"]}

    async def _uncreate_row(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        # took None: the insert may have committed; the row is this job's either way (a
        # duplicate uuid failed the insert and there is nothing of ours to remove then, but
        # the run's error said so only when it reported: the row's status tells).
        uuid = ctx["resource"]
        if took is None:
            row = await self.store.get("volume", uuid)
            if row is None or row["status"] != NOT_INSTANTIATED or row["vmInstanceUuid"]:
                return
        await self.store.delete("volume", uuid)

    async def _create_bits(self, ctx: MutableMapping[str, Any]) -> dict:
        values = _msg(ctx, "values")
        ps_uuid = _msg(ctx, "primaryStorageUuid")
        reply = await self.send(InstantiateVolumeOnPrimaryStorageMsg(
            service_id=PRIMARY, resource_uuid=ps_uuid, primary_storage_uuid=ps_uuid,
            volume_uuid=values["uuid"], size=values["size"], host_uuid=_msg(ctx, "hostUuid")))
        return {"primaryStorageUuid": ps_uuid, "hostUuid": reply.host_uuid,
                "installPath": reply.install_path, "size": reply.size}

    async def _delete_created_bits(self, ctx: MutableMapping[str, Any], took: dict | None
                                   ) -> None:
        ps_uuid = _msg(ctx, "primaryStorageUuid")
        await self.send(DeleteVolumeBitsOnPrimaryStorageMsg(
            service_id=PRIMARY, resource_uuid=ps_uuid, primary_storage_uuid=ps_uuid,
            volume_uuid=ctx["resource"], install_path=(took or {}).get("installPath"),
            host_uuid=(took or {}).get("hostUuid") or _msg(ctx, "hostUuid"),
            volume_type="Data"))

    async def _volume_ready(self, ctx: MutableMapping[str, Any]) -> dict:
        bits = ctx["took"]["instantiate-volume"]
        await self.store.update("volume", ctx["resource"], {
            "status": READY, "primaryStorageUuid": bits["primaryStorageUuid"],
            "installPath": bits["installPath"]}, {"status": NOT_INSTANTIATED})
        return {"status": READY}

    async def _nothing(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        return None

    # --- delete -----------------------------------------------------------------------

    @handles(DeleteDataVolumeMsg, ExpungeDataVolumeMsg)
    @succeeds_if_gone(VOLUME.NOT_FOUND)
    async def delete(self, msg: DeleteDataVolumeMsg | ExpungeDataVolumeMsg) -> VolumeReply:
        """
        L{DeleteDataVolumeMsg} and L{ExpungeDataVolumeMsg} (see the module docstring):
        C{VOLUME.1004} naming the VM while attached; C{VOLUME.1002} for a root volume (it
        goes with its VM); C{VOLUME.1001} when the bits could not be deleted (the volume is
        left C{Deleted}; sending the delete again finishes it). Succeeds with an empty
        inventory.
        """
        uuid = validate.uuid(msg.uuid, "uuid")
        return await self.serialized(f"volume-{uuid}",
                                     lambda: Deferred.fromCoroutine(self._delete(uuid)))

    async def _delete(self, uuid: str) -> VolumeReply:
        row = await self.must_get("volume", uuid, VOLUME.NOT_FOUND, field="uuid")
        if row["type"] != "Data":
            raise OperationError.of(
                VOLUME.NOT_IN_CORRECT_STATE, f"volume {uuid} is the root volume of VM"
                f" {row['vmInstanceUuid']}: it is deleted with its VM", uuid=uuid,
                vmInstanceUuid=row["vmInstanceUuid"])
        if row["status"] != DELETED:
            try:
                row = await self.store.update("volume", uuid, {"status": DELETED},
                                              {"vmInstanceUuid": None,
                                               "status": row["status"]})
            except OperationError as e:
                if _gone(e):
                    raise OperationError.of(VOLUME.NOT_FOUND, f"no volume with uuid {uuid}",
                                            uuid=uuid, field="uuid") from None
                if not _conflict(e):
                    raise
                row = await self.must_get("volume", uuid, VOLUME.NOT_FOUND, field="uuid")
                if row["vmInstanceUuid"] is None:
                    raise
        if row["vmInstanceUuid"] is not None:
            raise OperationError.of(
                VOLUME.ATTACHED, f"volume {uuid} is attached to VM {row['vmInstanceUuid']};"
                " detach it first", uuid=uuid, vmInstanceUuid=row["vmInstanceUuid"])
        if row["primaryStorageUuid"] is not None:
            try:
                await self._delete_bits(row)
            except OperationError as e:
                raise OperationError(error_code(
                    VOLUME.DELETE_ERROR, f"cannot delete the bits of volume {uuid}; it stays"
                    " Deleted, holding its capacity: send the delete again", e.error,
                    uuid=uuid, primaryStorageUuid=row["primaryStorageUuid"])) from None
        await self.store.delete("volume", uuid)
        return VolumeReply()

    async def _delete_bits(self, row: dict[str, Any]) -> None:
        ps_uuid = row["primaryStorageUuid"]
        ps = await self.store.get("primaryStorage", ps_uuid)
        if ps is None:
            return
        if ps["type"] == LOCAL_STORAGE_TYPE:
            held = [h for h in await self.store.primary_storage_holders(ps_uuid)
                    if (h["holderType"], h["holderUuid"]) == (VOLUME_HOLDER, row["uuid"])]
            if not held:  # a delete cut short after its bits went: nothing left there
                return
        await self.send(DeleteVolumeBitsOnPrimaryStorageMsg(
            service_id=PRIMARY, resource_uuid=ps_uuid, primary_storage_uuid=ps_uuid,
            volume_uuid=row["uuid"], install_path=row["installPath"], volume_type="Data"))


def make(node: Any) -> VolumeService:
    """
    The volume service of C{node}.
    """
    return VolumeService(node.reactor, node.bus, node.store)


# --- attach and detach, in the VM service ----------------------------------------------------


class VolumeAttachMixin:
    """
    L{AttachDataVolumeToVmMsg} and L{DetachDataVolumeFromVmMsg} on the VM service
    (L{zcontrol.services.vm.base.VmServiceBase}), as journaled jobs in the VM's chain (see
    the module docstring).
    """

    store: Any
    clock: Any

    # --- handlers ---------------------------------------------------------------------

    @handles(AttachDataVolumeToVmMsg)
    async def attach_data_volume(self, msg: AttachDataVolumeToVmMsg) -> VolumeReply:
        """
        L{AttachDataVolumeToVmMsg} (see the module docstring for the refusals).
        """
        vm_uuid = validate.uuid(msg.vm_instance_uuid, "vmInstanceUuid")
        volume_uuid = validate.uuid(msg.volume_uuid, "volumeUuid")

        async def before() -> None:
            vm = await self.check(vm_uuid, states.Operation.attachVolume,  # type: ignore
                                  field="vmInstanceUuid")
            volume = await self._volume(volume_uuid, "volumeUuid")
            if volume["type"] != "Data":
                raise OperationError.of(
                    VOLUME.NOT_IN_CORRECT_STATE, f"volume {volume_uuid} is a root volume;"
                    " only data volumes are attached", uuid=volume_uuid, field="volumeUuid")
            if volume["vmInstanceUuid"] is not None:
                raise OperationError.of(
                    VOLUME.ATTACHED, f"volume {volume_uuid} is already attached to VM"
                    f" {volume['vmInstanceUuid']}", uuid=volume_uuid,
                    vmInstanceUuid=volume["vmInstanceUuid"])
            if volume["status"] not in (READY, NOT_INSTANTIATED):
                raise OperationError.of(
                    VOLUME.NOT_IN_CORRECT_STATE, f"volume {volume_uuid} is"
                    f" {volume['status']}; only a Ready or NotInstantiated volume is attached",
                    uuid=volume_uuid, status=volume["status"])
            if volume["status"] == READY:
                await self._check_reachable(vm, volume)

        return await self._run_volume_job(ATTACH_KIND, msg, vm_uuid, volume_uuid, before,
                                          VM.ATTACH_VOLUME_ERROR)

    @handles(DetachDataVolumeFromVmMsg)
    async def detach_data_volume(self, msg: DetachDataVolumeFromVmMsg) -> VolumeReply:
        """
        L{DetachDataVolumeFromVmMsg}: without C{vm_uuid}, sent on to the VM the volume is
        attached to (succeeds at once when it is attached to none).
        """
        volume_uuid = validate.uuid(msg.uuid, "uuid")
        if msg.vm_uuid is None:
            volume = await self._volume(volume_uuid, "uuid")
            if volume["vmInstanceUuid"] is None:
                return VolumeReply(inventory=volume)
            reply = await self.send(DetachDataVolumeFromVmMsg(  # type: ignore[attr-defined]
                service_id=SERVICE_ID, resource_uuid=volume["vmInstanceUuid"],
                uuid=volume_uuid, vm_uuid=volume["vmInstanceUuid"]))
            return VolumeReply(inventory=reply.inventory, job_uuid=reply.job_uuid)
        vm_uuid = validate.uuid(msg.vm_uuid, "vmUuid")

        async def before() -> Any:
            await self.check(vm_uuid, states.Operation.detachVolume,  # type: ignore
                             field="vmUuid")
            volume = await self._volume(volume_uuid, "uuid")
            if volume["type"] != "Data":
                raise OperationError.of(
                    VM.DETACH_VOLUME_ERROR, f"volume {volume_uuid} is the root volume of VM"
                    f" {volume['vmInstanceUuid']}: a root volume cannot be detached",
                    uuid=volume_uuid, field="uuid")
            if volume["vmInstanceUuid"] is None:
                return NO_JOB
            if volume["vmInstanceUuid"] != vm_uuid:
                raise OperationError.of(
                    VM.DETACH_VOLUME_ERROR, f"volume {volume_uuid} is attached to VM"
                    f" {volume['vmInstanceUuid']}, not to VM {vm_uuid}", uuid=volume_uuid,
                    vmInstanceUuid=volume["vmInstanceUuid"], field="vmUuid")
            return None

        return await self._run_volume_job(DETACH_KIND, msg, vm_uuid, volume_uuid, before,
                                          VM.DETACH_VOLUME_ERROR)

    async def _run_volume_job(self, kind: str, msg: Any, vm_uuid: str, volume_uuid: str,
                              before: Callable[[], Awaitable[Any]], code: str
                              ) -> VolumeReply:
        """
        Run a job of C{kind} in the VM's chain (L{VmServiceBase.run_job}): C{before()}
        refuses with its own error, or says there is nothing to do (L{NO_JOB}); a failed job
        fails with C{code} (C{VM.1005}/C{VM.1006}) whose cause is the failing flow's error.
        The reply carries the volume's inventory afterwards and the job uuid.
        """
        job_uuid = new_trace_id()

        async def prepare() -> Any:
            if await before() is NO_JOB:
                return NO_JOB
            return message_body(msg)

        done = await self.run_job(kind, vm_uuid,  # type: ignore[attr-defined]
                                  lambda: Deferred.fromCoroutine(prepare()),
                                  fail_code=code, job_uuid=job_uuid)
        return VolumeReply(inventory=await self.store.get("volume", volume_uuid),
                           job_uuid=None if done is NO_JOB else job_uuid)

    async def _volume(self, uuid: str, field: str) -> dict[str, Any]:
        return await self.must_get("volume", uuid, VOLUME.NOT_FOUND,  # type: ignore
                                   field=field)

    # --- placement --------------------------------------------------------------------

    async def _root_placement(self, vm: dict[str, Any]) -> tuple[str, str | None, str]:
        """
        Where the VM's root volume is: C{(primary storage uuid, LocalStorage host or None,
        storage type)}.
        """
        root = await self.store.get("volume", vm["rootVolumeUuid"]) \
            if vm.get("rootVolumeUuid") else None
        if root is None or root["primaryStorageUuid"] is None:
            raise OperationError.of(
                VM.ATTACH_VOLUME_ERROR, f"VM {vm['uuid']} has no instantiated root volume:"
                " no primary storage to put a data volume on", vmInstanceUuid=vm["uuid"])
        ps_uuid = root["primaryStorageUuid"]
        ps = await self.store.get("primaryStorage", ps_uuid)
        ps_type = ps["type"] if ps is not None else "?"
        if ps_type != LOCAL_STORAGE_TYPE:
            return ps_uuid, None, ps_type
        return ps_uuid, await self._local_host(ps_uuid, root["uuid"],
                                               vm.get("hostUuid") or vm.get("lastHostUuid")), \
            ps_type

    async def _local_host(self, ps_uuid: str, volume_uuid: str, hint: str | None
                          ) -> str | None:
        """
        The host of a volume on a LocalStorage: the host its capacity is held on.
        """
        where = [hint] if hint else None
        held = [h for h in await self.store.primary_storage_holders(ps_uuid, where)
                if (h["holderType"], h["holderUuid"]) == (VOLUME_HOLDER, volume_uuid)]
        if not held and where is not None:
            held = [h for h in await self.store.primary_storage_holders(ps_uuid)
                    if (h["holderType"], h["holderUuid"]) == (VOLUME_HOLDER, volume_uuid)]
        return held[0]["hostUuid"] if held else None

    async def _check_reachable(self, vm: dict[str, Any], volume: dict[str, Any]) -> None:
        """
        Refuse (C{VM.1005}) a C{Ready} volume the VM cannot reach: on another host's
        LocalStorage, or on a primary storage not attached to the VM's cluster.
        """
        ps_uuid = volume["primaryStorageUuid"]
        ps = await self.store.get("primaryStorage", ps_uuid)
        if ps is not None and ps["type"] == LOCAL_STORAGE_TYPE:
            _, vm_host, _ = await self._root_placement(vm)
            host = await self._local_host(ps_uuid, volume["uuid"], vm_host)
            if host != vm_host:
                raise OperationError.of(
                    VM.ATTACH_VOLUME_ERROR, f"volume {volume['uuid']} is on the LocalStorage"
                    f" {ps_uuid} of host {host}, VM {vm['uuid']} is on host {vm_host}",
                    uuid=volume["uuid"], hostUuid=host, vmHostUuid=vm_host)
            return
        refs = await _query(self.store, "primaryStorageClusterRef",
                            f"primaryStorageUuid={ps_uuid}",
                            f"clusterUuid={vm['clusterUuid']}") if vm.get("clusterUuid") else []
        if not refs:
            raise OperationError.of(
                VM.ATTACH_VOLUME_ERROR, f"volume {volume['uuid']} is on primary storage"
                f" {ps_uuid}, which is not attached to the cluster {vm.get('clusterUuid')}"
                f" of VM {vm['uuid']}", uuid=volume["uuid"], primaryStorageUuid=ps_uuid)

    # --- the job kinds ----------------------------------------------------------------

    @job_kinds
    def volume_job_kinds(self) -> Iterable[JobKind]:
        """
        C{AttachDataVolumeToVm} and C{DetachDataVolumeFromVm}.
        """
        def attach_ctx(job: dict) -> dict[str, Any]:
            msg = job.get("apiMessage") or {}
            return {"vm": job["resourceUuid"], "volume": msg.get("volumeUuid")}

        def detach_ctx(job: dict) -> dict[str, Any]:
            msg = job.get("apiMessage") or {}
            return {"vm": job["resourceUuid"], "volume": msg.get("uuid")}

        return [
            JobKind(ATTACH_KIND, (
                _Flow("take-volume", self._take_volume, self._give_volume),
                _Flow("instantiate-volume", self._instantiate, self._uninstantiate),
                _Flow("attach-on-hypervisor", self._plug, self._unplug_after_plug),
            ), context=attach_ctx),
            JobKind(DETACH_KIND, (
                _Flow("detach-on-hypervisor", self._unplug, self._replug_after_unplug),
                _Flow("release-volume", self._release_volume, self._retake_volume),
            ), context=detach_ctx),
        ]

    # attach flows

    async def _next_device_id(self, vm_uuid: str) -> int:
        used = {v["deviceId"] for v in await _query(self.store, "volume",
                                                    f"vmInstanceUuid={vm_uuid}")
                if v["deviceId"] is not None}
        device = 1
        while device in used:
            device += 1
        return device

    async def _take_volume(self, ctx: MutableMapping[str, Any]) -> dict:
        vm_uuid, volume_uuid = ctx["vm"], ctx["volume"]
        vm = await self.vm_row(vm_uuid)  # type: ignore[attr-defined]
        volume = await self._volume(volume_uuid, "volumeUuid")
        took: dict[str, Any] = {"status": volume["status"]}
        if volume["status"] == NOT_INSTANTIATED:
            ps_uuid, host_uuid, ps_type = await self._root_placement(vm)
            if ps_type == LOCAL_STORAGE_TYPE and host_uuid is None:
                raise OperationError.of(
                    VM.ATTACH_VOLUME_ERROR, f"the host of VM {vm_uuid}'s root volume on"
                    f" LocalStorage {ps_uuid} is unknown", vmInstanceUuid=vm_uuid)
            took.update(primaryStorageUuid=ps_uuid, hostUuid=host_uuid)
        device = await self._next_device_id(vm_uuid)
        try:
            await self.store.update("volume", volume_uuid,
                                    {"vmInstanceUuid": vm_uuid, "deviceId": device},
                                    {"vmInstanceUuid": None, "status": volume["status"]})
        except OperationError as e:
            if not _conflict(e):
                raise
            now = await self.store.get("volume", volume_uuid) or {}
            raise OperationError(error_code(
                VOLUME.ATTACHED if now.get("vmInstanceUuid") else VOLUME.NOT_IN_CORRECT_STATE,
                f"volume {volume_uuid} changed meanwhile (VM {now.get('vmInstanceUuid')},"
                f" status {now.get('status')})", e.error, uuid=volume_uuid)) from None
        took["deviceId"] = device
        return took

    async def _give_volume(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        try:
            await self.store.update("volume", ctx["volume"],
                                    {"vmInstanceUuid": None, "deviceId": None},
                                    {"vmInstanceUuid": ctx["vm"]})
        except OperationError as e:
            if not (_conflict(e) or _gone(e)):  # not ours (any more): nothing to give back
                raise

    async def _instantiate(self, ctx: MutableMapping[str, Any]) -> dict:
        placed = ctx["took"]["take-volume"]
        if placed["status"] != NOT_INSTANTIATED:
            return {"instantiated": False}
        volume = await self._volume(ctx["volume"], "volumeUuid")
        ps_uuid = placed["primaryStorageUuid"]
        reply = await self.send(InstantiateVolumeOnPrimaryStorageMsg(  # type: ignore
            service_id=PRIMARY, resource_uuid=ps_uuid, primary_storage_uuid=ps_uuid,
            volume_uuid=volume["uuid"], size=volume["size"], host_uuid=placed["hostUuid"]))
        await self.store.update("volume", volume["uuid"], {
            "status": READY, "primaryStorageUuid": ps_uuid,
            "installPath": reply.install_path}, {"vmInstanceUuid": ctx["vm"]})
        return {"instantiated": True, "primaryStorageUuid": ps_uuid,
                "hostUuid": reply.host_uuid, "installPath": reply.install_path}

    async def _uninstantiate(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        placed = ctx["took"].get("take-volume")
        if placed is None or placed["status"] != NOT_INSTANTIATED:
            return  # a Ready volume: this job made nothing
        ps_uuid = placed["primaryStorageUuid"]
        await self.send(DeleteVolumeBitsOnPrimaryStorageMsg(  # type: ignore[attr-defined]
            service_id=PRIMARY, resource_uuid=ps_uuid, primary_storage_uuid=ps_uuid,
            volume_uuid=ctx["volume"], install_path=(took or {}).get("installPath"),
            host_uuid=(took or {}).get("hostUuid") or placed["hostUuid"],
            volume_type="Data"))
        try:
            await self.store.update("volume", ctx["volume"], {
                "status": NOT_INSTANTIATED, "primaryStorageUuid": None, "installPath": None},
                {"vmInstanceUuid": ctx["vm"]})
        except OperationError as e:
            if not (_conflict(e) or _gone(e)):
                raise

    async def _running_host(self, vm_uuid: str) -> str | None:
        vm = await self.vm_row(vm_uuid)  # type: ignore[attr-defined]
        if vm["state"] == states.VmInstanceState.Running and vm.get("hostUuid"):
            return vm["hostUuid"]
        return None

    async def _plug(self, ctx: MutableMapping[str, Any]) -> dict:
        host_uuid = await self._running_host(ctx["vm"])
        if host_uuid is None:
            return {"hostUuid": None}
        volume = await self._volume(ctx["volume"], "volumeUuid")
        await self.host_call(host_uuid, p.AttachDataVolumeCmd(  # type: ignore[attr-defined]
            vm_instance_uuid=ctx["vm"], volume=volume_to(volume)))
        return {"hostUuid": host_uuid, "deviceId": volume["deviceId"]}

    async def _unplug_after_plug(self, ctx: MutableMapping[str, Any], took: dict | None
                                 ) -> None:
        host_uuid = (took or {}).get("hostUuid") if took is not None \
            else await self._running_host(ctx["vm"])
        if host_uuid is None:
            return
        volume = await self.store.get("volume", ctx["volume"])
        if volume is None:
            return
        # Detaching a volume that is not attached succeeds: idempotent.
        await self.host_call(host_uuid, p.DetachDataVolumeCmd(  # type: ignore[attr-defined]
            vm_instance_uuid=ctx["vm"], volume=volume_to(volume)))

    # detach flows

    async def _unplug(self, ctx: MutableMapping[str, Any]) -> dict:
        volume = await self._volume(ctx["volume"], "uuid")
        host_uuid = await self._running_host(ctx["vm"])
        took = {"hostUuid": host_uuid, "deviceId": volume["deviceId"],
                "installPath": volume["installPath"]}
        if host_uuid is not None:
            await self.host_call(host_uuid, p.DetachDataVolumeCmd(  # type: ignore
                vm_instance_uuid=ctx["vm"], volume=volume_to(volume)))
        return took

    async def _replug_after_unplug(self, ctx: MutableMapping[str, Any], took: dict | None
                                   ) -> None:
        host_uuid = (took or {}).get("hostUuid") if took is not None \
            else await self._running_host(ctx["vm"])
        volume = await self.store.get("volume", ctx["volume"])
        if host_uuid is None or volume is None or volume["vmInstanceUuid"] != ctx["vm"]:
            return
        try:
            await self.host_call(host_uuid, p.AttachDataVolumeCmd(  # type: ignore
                vm_instance_uuid=ctx["vm"], volume=volume_to(volume)))
        except OperationError as e:
            text = f"{e.error} {e.error.opaque}"
            if not any(s in text for s in _ALREADY_ATTACHED):
                raise

    async def _release_volume(self, ctx: MutableMapping[str, Any]) -> dict:
        unplugged = ctx["took"]["detach-on-hypervisor"]
        await self.store.update("volume", ctx["volume"],
                                {"vmInstanceUuid": None, "deviceId": None},
                                {"vmInstanceUuid": ctx["vm"]})
        return {"deviceId": unplugged["deviceId"]}

    async def _retake_volume(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        device = ctx["took"].get("detach-on-hypervisor", {}).get("deviceId")
        if device is None:
            return
        try:
            await self.store.update("volume", ctx["volume"],
                                    {"vmInstanceUuid": ctx["vm"], "deviceId": device},
                                    {"vmInstanceUuid": None})
        except OperationError as e:
            # still this VM's (the release never happened), or another VM's since: nothing
            # to give back either way
            if not (_conflict(e) or _gone(e)):
                raise
