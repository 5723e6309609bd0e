# -*- test-case-name: tests.test_image -*-
"""
The image service (C{image}): images registered from a URL and downloaded to backup storage,
on the bus.

 - B{add}: checks every field and every backup storage (known, C{Connected}, C{Enabled},
   attached to a zone), creates its job (Note [add jobs]), inserts the image
   C{Downloading} with one ref per backup storage,
   sends C{DownloadImageMsg} to each backup storage in parallel, then records the outcome
   atomically (L{zcontrol.db.components.images.finish_image_download_thd}): C{Ready} when
   one download succeeded at least (failed refs removed), else C{Error} with each ref's
   C{lastError} the agent's reason, and the reply fails with C{IMAGE.1000}.
 - B{delete}: refused while a VM not Destroyed (nor Expunging) has it as its template; the
   bits are deleted on each backup storage (one that cannot be reached is logged and
   skipped: ZStack's delete leaves such bits to a garbage collector), then the refs and the
   row; an L{ImageDeletedEvent} follows.
 - B{backup storage deleted}: L{DeleteImageRefsOnBackupStorageMsg} drops the refs on it; an
   image left with no copy becomes C{Deleted} (the row stays for the VMs made from it; a
   delete removes it).

Operations on one image run one at a time (C{image-<uuid>}), the add with its downloads
included, so a delete waits for the add's outcome; a delete of an image still
C{Downloading} is refused (C{IMAGE.1005}).

Note [add on the owner]: every message about an image is routed to the image's owner node
(C{resource_uuid}), where its chain C{image-<uuid>} runs. So the add too: its uuid is chosen
first (C{uuid}, or a fresh one), and a node that is not the owner forwards the message to it
(with C{resource_uuid} = the uuid); otherwise a delete (on the owner) and the add (on the
node that received it) would run in two chains on two nodes at once. Should the rows go all
the same while it downloads, the add deletes the bits it downloaded (best effort) and fails
with C{IMAGE.1001} naming the image.

Note [add jobs]: an add is a job of the store's jobs table (C{apiName} L{ADD_IMAGE_JOB},
C{apiMessage} the message's fields, owned by this node, C{resourceUuid} the image), created
before the image row (so a row C{Downloading} always has a job) and finished when the add
ends. Each download's outcome is recorded as it comes. A management node that stops during
an add leaves the job C{Running}; when it starts again, nothing downloads any more, so
L{ImageService.resolve_add_image_jobs} resolves it (no image stays C{Downloading}, ZStack's
"no stuck task"). A node that dies does not come back: the node that takes over its
resources claims its jobs (C{claim_jobs}) and resolves them with the same function.
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Any, Sequence

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from zcontrol.bus.message import new_id
from zcontrol.core.errors import SYS, ErrorCode, OperationError, error_code, from_failure
from zcontrol.db.query import Condition, Query
from zcontrol.services import validate
from zcontrol.services.backupstorage.messages import (
    BS,
    DeleteBitsOnBackupStorageMsg,
    DownloadImageMsg,
)
from zcontrol.services.backupstorage.messages import SERVICE_ID as BS_SERVICE
from zcontrol.services.backupstorage.service import install_path
from zcontrol.services.base import Service, handles, succeeds_if_gone
from zcontrol.services.image.messages import (
    FORMATS,
    IMAGE,
    MEDIA_TYPES,
    PLATFORMS,
    SERVICE_ID,
    AddImageMsg,
    ChangeImageStateMsg,
    DeleteImageMsg,
    DeleteImageRefsOnBackupStorageMsg,
    DeleteImageRefsOnBackupStorageReply,
    ImageDeletedEvent,
    ImageReply,
    SelectBackupStorageMsg,
    SelectBackupStorageReply,
    UpdateImageMsg,
)
from zcontrol.services.inventory import inventory, register_inventory

__all__ = ["ADD_IMAGE_JOB", "RESTARTED", "ImageService", "make"]

log = Logger()

_STATE_EVENTS = {"enable": "Enabled", "disable": "Disabled"}
#: VM states in which a VM no longer needs its template.
_GONE_VM_STATES = ["Destroyed", "Expunging"]
#: The C{apiName} of an add's job (L{zcontrol.db.interfaces.IStore.create_job}).
ADD_IMAGE_JOB = AddImageMsg.type_name
#: The C{lastError} of a download its management node's restart interrupted.
RESTARTED = "the management node restarted during the download"
#: The fields of an L{AddImageMsg} recorded as its job's C{apiMessage} (not the envelope).
_ADD_FIELDS = ("name", "url", "backup_storage_uuids", "media_type", "format", "platform",
               "guest_os_type", "system", "description", "uuid")
_REF_FIELDS = ["uuid", "imageUuid", "backupStorageUuid", "installPath", "status", "size",
               "lastError", "createDate", "lastOpDate"]


@register_inventory("image", ("backupStorageRefs",))
async def _expand_images(store: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    uuids = [r["uuid"] for r in rows]
    refs = await store.query("imageBackupStorageRef", Query(
        conditions=[Condition("imageUuid", "?=", uuids)], fields=_REF_FIELDS,
        sort="backupStorageUuid", limit=100_000))
    by_image: dict[str, list[dict[str, Any]]] = {u: [] for u in uuids}
    for ref in refs.inventories:
        by_image[ref["imageUuid"]].append(ref)
    for r in rows:
        r["backupStorageRefs"] = by_image[r["uuid"]]
    return rows


class ImageService(Service):
    """
    The image service on one management node.

    @ivar download_timeout: seconds a download to one backup storage may take.
    """

    service_id = SERVICE_ID

    def __init__(self, clock: Any, bus: Any, store: Any, download_timeout: float = 3 * 3600.0,
                 **kwargs: Any) -> None:
        super().__init__(clock, bus, store, **kwargs)
        self.download_timeout = download_timeout
        #: Fires once L{start}'s resolution of the interrupted adds is done.
        self.recovered: Deferred[Any] = Deferred()

    async def _get(self, uuid: Any, field: str = "uuid") -> dict[str, Any]:
        return await self.must_get("image", uuid, IMAGE.NOT_FOUND, field=field)

    async def _reply(self, uuid: str) -> ImageReply:
        return ImageReply(inventory=await inventory(self.store, "image", uuid))

    async def _refs(self, image_uuid: str) -> list[dict[str, Any]]:
        page = await self.store.query("imageBackupStorageRef", Query(
            conditions=[Condition("imageUuid", "=", image_uuid)], fields=_REF_FIELDS,
            sort="backupStorageUuid", limit=100_000))
        return page.inventories

    # --- add ------------------------------------------------------------------------------

    async def _check_backup_storage(self, uuid: str) -> None:
        row = await self.must_get("backupStorage", uuid, BS.NOT_FOUND,
                                  field="backupStorageUuids")
        why = None
        if row["status"] != "Connected":
            why = f"is {row['status']}"
        elif row["state"] != "Enabled":
            why = f"is {row['state']}"
        else:
            zones = await self.store.query("backupStorageZoneRef", Query(
                conditions=[Condition("backupStorageUuid", "=", uuid)], count=True))
            if not zones.total:
                why = "is attached to no zone"
        if why is not None:
            raise OperationError.of(
                IMAGE.BACKUP_STORAGE_UNUSABLE, f"backup storage {uuid} ({row['name']!r}) "
                f"{why}", field="backupStorageUuids", backupStorageUuid=uuid,
                status=row["status"], state=row["state"])

    @handles(AddImageMsg)
    async def add(self, msg: AddImageMsg) -> ImageReply:
        """
        Add and download (see the module docstring). Runs on the image's owner node (Note
        [add on the owner]); C{IMAGE.1001} naming the image when it was deleted meanwhile.
        """
        name = validate.name(msg.name)
        description = validate.optional_text(msg.description, "description")
        url = validate.url(msg.url, "url", ("http", "https", "file"))
        media_type = validate.one_of(msg.media_type, "mediaType", MEDIA_TYPES)
        fmt = validate.one_of(msg.format, "format", FORMATS)
        if (fmt == "iso") != (media_type == "ISO"):
            raise validate.invalid("format", fmt, f"iso goes with mediaType ISO only (the "
                                   f"mediaType is {media_type})")
        platform = validate.one_of(msg.platform, "platform", PLATFORMS)
        guest_os_type = validate.optional_text(msg.guest_os_type, "guestOsType", 255)
        if not isinstance(msg.system, bool):
            raise validate.invalid("system", msg.system, "must be a boolean")
        bs_uuids = validate.uuids(msg.backup_storage_uuids, "backupStorageUuids")
        uuid = validate.uuid(msg.uuid, "uuid") if msg.uuid is not None else uuidlib.uuid4().hex
        if msg.resource_uuid != uuid and self.bus.owner_of(uuid) != self.bus.node_id:
            forwarded = attrs.evolve(msg, id=new_id(), uuid=uuid, resource_uuid=uuid,
                                     deadline=None, timeout=None, reply_to=None)
            return await self.send(forwarded,
                                   timeout=self.download_timeout + self.send_timeout)
        for bs in bs_uuids:
            await self._check_backup_storage(bs)
        api_message = {f: getattr(msg, f) for f in _ADD_FIELDS}
        api_message["uuid"] = uuid

        async def add() -> ImageReply:
            job = uuidlib.uuid4().hex
            await self.store.create_job(job, ADD_IMAGE_JOB, api_message, self.bus.node_id,
                                        resource_uuid=uuid)
            try:
                await self.store.add_image({
                    "uuid": uuid, "name": name, "description": description, "url": url,
                    "status": "Downloading", "mediaType": media_type, "format": fmt,
                    "platform": platform, "guestOsType": guest_os_type, "system": msg.system,
                }, bs_uuids)
            except OperationError as e:
                await self._finish_job(job, error=e.error)
                raise
            results = await self._download_all(uuid, url, fmt, media_type, bs_uuids)
            # A failure to record the outcome leaves the job Running: the next start of this
            # node (or the node claiming its jobs) resolves it.
            row = await self.store.finish_image_download(uuid, results)
            if row is None:
                err = await self._deleted_meanwhile(uuid, results)
                await self._finish_job(job, error=err)
                raise OperationError(err)
            errors = [r for r in results if r.get("error") is not None]
            for r in errors:
                log.warn("image {uuid}: download to backup storage {bs} failed: {error}",
                         uuid=uuid, bs=r["backupStorageUuid"], error=str(r["cause"]))
            if len(errors) == len(bs_uuids):
                err = error_code(
                    IMAGE.ADD_ERROR, f"image {uuid} ({name!r}) could not be downloaded from "
                    f"{url} to any backup storage: {errors[0]['error']}", errors[0]["cause"],
                    imageUuid=uuid,
                    failures={r["backupStorageUuid"]: r["error"] for r in errors})
                await self._finish_job(job, error=err)
                raise OperationError(err)
            await self._finish_job(job, result={"imageUuid": uuid})
            return await self._reply(uuid)

        return await self.serialized(f"image-{uuid}", add)

    async def _download_all(self, uuid: str, url: str, fmt: str, media_type: str,
                            bs_uuids: Sequence[str]) -> list[dict[str, Any]]:
        """
        Download to every backup storage in parallel, each outcome recorded as it comes
        (L{zcontrol.db.components.images.record_image_ref_download_thd}).

        @return: one result per backup storage, in order (the shape of
            L{zcontrol.db.components.images.finish_image_download_thd}'s, a failure also
            with its ErrorCode as C{cause}).
        """
        async def one(bs: str) -> dict[str, Any]:
            cause = None
            try:
                reply = await self.send(DownloadImageMsg(
                    service_id=BS_SERVICE, resource_uuid=bs, backup_storage_uuid=bs,
                    image_uuid=uuid, url=url, format=fmt, media_type=media_type),
                    timeout=self.download_timeout)
                result = {"backupStorageUuid": bs, "installPath": reply.install_path,
                          "size": reply.size, "actualSize": reply.actual_size,
                          "md5sum": reply.md5sum}
            except Exception as e:
                cause = from_failure(e)
                result = {"backupStorageUuid": bs,
                          "error": cause.opaque.get("reason") or str(cause)}
            try:
                await self.store.record_image_ref_download(uuid, result)
            except Exception as e:
                log.warn("image {uuid}: recording the download to {bs} failed (the outcome "
                         "is recorded when all end): {error}", uuid=uuid, bs=bs,
                         error=str(from_failure(e)))
            if cause is not None:
                result["cause"] = cause
            return result

        outcomes = await DeferredList([Deferred.fromCoroutine(one(bs)) for bs in bs_uuids])
        return [value for _, value in outcomes]

    async def _deleted_meanwhile(self, uuid: str, results: list[dict[str, Any]]) -> ErrorCode:
        """
        The image's rows went while it downloaded: delete the bits downloaded (best effort)
        and say so.
        """
        for r in results:
            if r.get("error") is None:
                await self._delete_bits(uuid, r["backupStorageUuid"], r["installPath"])
        return error_code(IMAGE.NOT_FOUND, f"image {uuid} was deleted while it downloaded",
                          resource="image", uuid=uuid)

    async def _delete_bits(self, image_uuid: str, bs: str, path: str) -> None:
        """
        Delete bits on a backup storage, best effort (a failure is logged: ZStack leaves
        such bits to a garbage collector).
        """
        try:
            await self.send(DeleteBitsOnBackupStorageMsg(
                service_id=BS_SERVICE, resource_uuid=bs, backup_storage_uuid=bs,
                install_path=path))
        except Exception as e:
            log.warn("image {uuid}: bits {path} left on backup storage {bs}: {error}",
                     uuid=image_uuid, path=path, bs=bs, error=str(from_failure(e)))

    async def _finish_job(self, job: str, result: Any = None,
                          error: ErrorCode | None = None) -> None:
        try:
            await self.store.finish_job(job, result=result, error=error)
        except Exception as e:
            log.error("job {job}: cannot record its end: {error}", job=job,
                      error=str(from_failure(e)))

    # --- restart --------------------------------------------------------------------------

    def start(self) -> Any:
        """
        Serve, then resolve in the background the adds this node was running when it
        stopped (L{resolve_add_image_jobs} on its C{Running} jobs); L{recovered} fires once
        they are.
        """
        started = super().start()
        self.background(Deferred.fromCoroutine(self._recover()),
                        "resolving interrupted image adds").chainDeferred(self.recovered)
        return started

    async def _recover(self) -> None:
        jobs = await self.store.running_jobs(self.bus.node_id)
        await self.resolve_add_image_jobs(jobs)

    async def resolve_add_image_jobs(self, jobs: Sequence[dict[str, Any]]) -> None:
        """
        Resolve the C{Running} add jobs (L{ADD_IMAGE_JOB}) among C{jobs} (rows of the jobs
        table; other jobs are left alone): their node restarted, so nothing downloads any
        more. Each image in turn, in its chain C{image-<uuid>}: every ref still
        C{Downloading} becomes C{Error} with C{lastError} L{RESTARTED}; the image becomes
        C{Ready} when a download ended before the restart, else C{Error}
        (L{zcontrol.db.components.images.resolve_interrupted_image_download_thd}); the job
        ends C{Succeeded} or C{Failed} (C{IMAGE.1000}; C{IMAGE.1001} when the image row is
        gone); the partial bits on the interrupted backup storages are deleted in the
        background, best effort.

        Called at start with this node's own jobs. A node that dies does not restart its
        jobs: the node that takes over its resources (the multi-node issue) takes its jobs
        with C{store.claim_jobs(dead, self)} and passes the rows it got here.
        """
        for job in jobs:
            if job.get("apiName") != ADD_IMAGE_JOB or job.get("state") != "Running":
                continue
            uuid = job["resourceUuid"]
            try:
                await self.serialized(f"image-{uuid}", lambda job=job: self._resolve(job))
            except Exception as e:
                log.error("image {uuid}: cannot resolve the add job {job}: {error}",
                          uuid=uuid, job=job["uuid"], error=str(from_failure(e)))

    async def _resolve(self, job: dict[str, Any]) -> None:
        uuid = job["resourceUuid"]
        out = await self.store.resolve_interrupted_image_download(uuid, RESTARTED)
        if out is None:
            await self._finish_job(job["uuid"], error=error_code(
                IMAGE.NOT_FOUND, f"image {uuid} is gone: its add was interrupted by a "
                "restart of the management node", resource="image", uuid=uuid))
            return
        image = out["image"]
        log.warn("image {uuid}: add interrupted by a restart: {status} (downloads "
                 "interrupted to {bs})", uuid=uuid, status=image["status"],
                 bs=", ".join(out["interrupted"]) or "none")
        if image["status"] == "Ready":
            await self._finish_job(job["uuid"], result={"imageUuid": uuid})
        else:
            await self._finish_job(job["uuid"], error=error_code(
                IMAGE.ADD_ERROR, f"image {uuid} ({image['name']!r}): {RESTARTED}",
                imageUuid=uuid, failures={bs: RESTARTED for bs in out["interrupted"]}))
        for bs in out["interrupted"]:
            self.background(Deferred.fromCoroutine(
                self._delete_partial(uuid, bs, image["mediaType"])),
                f"deleting the partial bits of image {uuid} on backup storage {bs}")

    async def _delete_partial(self, uuid: str, bs: str, media_type: str) -> None:
        row = await self.store.get("backupStorage", bs)
        if row is not None:
            await self._delete_bits(uuid, bs, install_path(row["url"], uuid, media_type))

    # --- delete ---------------------------------------------------------------------------

    @handles(DeleteImageMsg)
    @succeeds_if_gone(IMAGE.NOT_FOUND)
    async def delete(self, msg: DeleteImageMsg) -> ImageReply:
        """
        Delete (see the module docstring); C{IMAGE.1003} naming the VMs using it.
        """
        self._deletable(await self._get(msg.uuid))

        async def delete() -> None:
            self._deletable(await self._get(msg.uuid))
            vms = await self.store.query("vmInstance", Query(
                conditions=[Condition("imageUuid", "=", msg.uuid),
                            Condition("state", "!?=", _GONE_VM_STATES)],
                fields=["uuid", "state"], sort="uuid", limit=100))
            if vms.inventories:
                names = [v["uuid"] for v in vms.inventories]
                raise OperationError.of(
                    IMAGE.IN_USE, f"image {msg.uuid} is the template of VM(s) "
                    f"{', '.join(names)} (not Destroyed)", imageUuid=msg.uuid,
                    vmInstanceUuids=names)
            for ref in await self._refs(msg.uuid):
                if ref.get("installPath"):
                    await self._delete_bits(msg.uuid, ref["backupStorageUuid"],
                                            ref["installPath"])
            await self.store.delete_image(msg.uuid)
            self.publish(ImageDeletedEvent(image_uuid=msg.uuid))

        await self.serialized(f"image-{msg.uuid}", delete)
        return ImageReply(inventory=None)

    @staticmethod
    def _deletable(image: dict[str, Any]) -> None:
        """
        C{IMAGE.1005} naming the status while the image downloads (as ZStack, which refuses
        operations on an image being downloaded).
        """
        if image["status"] == "Downloading":
            raise OperationError.of(
                IMAGE.WRONG_STATUS, f"image {image['uuid']} is {image['status']}: it cannot "
                "be deleted until its download ends", imageUuid=image["uuid"],
                status=image["status"])

    @handles(DeleteImageRefsOnBackupStorageMsg)
    async def drop_refs(self, msg: DeleteImageRefsOnBackupStorageMsg
                        ) -> DeleteImageRefsOnBackupStorageReply:
        """
        A backup storage is being deleted: drop the refs on it.
        """
        bs = validate.uuid(msg.backup_storage_uuid, "backupStorageUuid")
        try:
            dropped = await self.store.drop_image_refs_on_backup_storage(bs)
        except OperationError as e:
            if e.error.code != SYS.OPERATION_ERROR:
                raise
            raise OperationError.of(IMAGE.WRONG_STATUS, e.error.details,
                                    **e.error.opaque) from None
        return DeleteImageRefsOnBackupStorageReply(
            image_uuids=[d["imageUuid"] for d in dropped],
            deleted_image_uuids=[d["imageUuid"] for d in dropped if d["deleted"]])

    # --- state, update --------------------------------------------------------------------

    @handles(ChangeImageStateMsg)
    async def change_state(self, msg: ChangeImageStateMsg) -> ImageReply:
        """
        C{enable} / C{disable}.
        """
        event = validate.one_of(msg.state_event, "stateEvent", _STATE_EVENTS)
        await self._get(msg.uuid)
        await self.serialized(f"image-{msg.uuid}", lambda: self.store.update(
            "image", msg.uuid, {"state": _STATE_EVENTS[event]}))
        return await self._reply(msg.uuid)

    @handles(UpdateImageMsg)
    async def update(self, msg: UpdateImageMsg) -> ImageReply:
        """
        Change the given fields.
        """
        changes: dict[str, Any] = validate.common_changes(msg)
        if msg.guest_os_type is not None:
            changes["guestOsType"] = validate.optional_text(msg.guest_os_type, "guestOsType",
                                                            255)
        if msg.platform is not None:
            changes["platform"] = validate.one_of(msg.platform, "platform", PLATFORMS)
        if msg.system is not None:
            if not isinstance(msg.system, bool):
                raise validate.invalid("system", msg.system, "must be a boolean")
            changes["system"] = msg.system
        await self._get(msg.uuid)
        if changes:
            await self.serialized(f"image-{msg.uuid}", lambda: self.store.update(
                "image", msg.uuid, changes))
        return await self._reply(msg.uuid)

    # --- selection for VMs ----------------------------------------------------------------

    @handles(SelectBackupStorageMsg)
    async def select(self, msg: SelectBackupStorageMsg) -> SelectBackupStorageReply:
        """
        A Connected backup storage in the zone holding the image Ready (most available
        capacity first, then uuid).
        """
        image = await self._get(msg.image_uuid, "imageUuid")
        zone = validate.uuid(msg.zone_uuid, "zoneUuid")
        if image["status"] != "Ready":
            raise OperationError.of(IMAGE.WRONG_STATUS, f"image {msg.image_uuid} is "
                                    f"{image['status']}, not Ready", imageUuid=msg.image_uuid,
                                    status=image["status"])
        refs = {r["backupStorageUuid"]: r for r in await self._refs(msg.image_uuid)
                if r["status"] == "Ready"}
        candidates = []
        if refs:
            in_zone = await self.store.query("backupStorageZoneRef", Query(
                conditions=[Condition("zoneUuid", "=", zone),
                            Condition("backupStorageUuid", "?=", sorted(refs))],
                fields=["backupStorageUuid"], limit=100_000))
            uuids = sorted({r["backupStorageUuid"] for r in in_zone.inventories})
            if uuids:
                rows = await self.store.query("backupStorage", Query(
                    conditions=[Condition("uuid", "?=", uuids),
                                Condition("status", "=", "Connected")],
                    fields=["uuid", "hostname", "availableCapacity"], limit=100_000))
                candidates = sorted(rows.inventories,
                                    key=lambda r: (-r["availableCapacity"], r["uuid"]))
        if not candidates:
            raise OperationError.of(
                IMAGE.NO_BACKUP_STORAGE, f"no Connected backup storage attached to zone "
                f"{zone} holds image {msg.image_uuid} Ready", imageUuid=msg.image_uuid,
                zoneUuid=zone)
        best = candidates[0]
        return SelectBackupStorageReply(
            backup_storage_uuid=best["uuid"], install_path=refs[best["uuid"]]["installPath"],
            hostname=best["hostname"], size=image["size"], actual_size=image["actualSize"])


def make(node: Any) -> ImageService:
    """
    The image service of C{node}.
    """
    return ImageService(node.reactor, node.bus, node.store)
