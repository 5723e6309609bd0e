# -*- test-case-name: tests.test_image -*-
"""
The image service (C{image}): images registered from a URL and downloaded to backup storage,
on the bus.

 - B{add}: checks every field and every backup storage (known, C{Connected}, C{Enabled},
   attached to a zone), inserts the image C{Downloading} with one ref per backup storage,
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
included, so a delete waits for the add's outcome.
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Any

from twisted.internet.defer import DeferredList
from twisted.logger import Logger

from zcontrol.core.errors import SYS, OperationError, error_code, from_failure
from zcontrol.db.query import Condition, Query
from zcontrol.services import validate
from zcontrol.services.backupstorage.messages import (
    BS,
    DeleteBitsOnBackupStorageMsg,
    DownloadImageMsg,
)
from zcontrol.services.backupstorage.messages import SERVICE_ID as BS_SERVICE
from zcontrol.services.base import Service, handles
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

__all__ = ["ImageService", "make"]

log = Logger()

_STATE_EVENTS = {"enable": "Enabled", "disable": "Disabled"}
#: VM states in which a VM no longer needs its template.
_GONE_VM_STATES = ["Destroyed", "Expunging"]
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
        Add and download (see the module docstring).
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
        for bs in bs_uuids:
            await self._check_backup_storage(bs)

        async def add() -> ImageReply:
            await self.store.add_image({
                "uuid": uuid, "name": name, "description": description, "url": url,
                "status": "Downloading", "mediaType": media_type, "format": fmt,
                "platform": platform, "guestOsType": guest_os_type, "system": msg.system,
            }, bs_uuids)
            sends = [self.send(DownloadImageMsg(
                service_id=BS_SERVICE, resource_uuid=bs, backup_storage_uuid=bs,
                image_uuid=uuid, url=url, format=fmt, media_type=media_type),
                timeout=self.download_timeout) for bs in bs_uuids]
            outcomes = await DeferredList(sends, consumeErrors=True)
            results: list[dict[str, Any]] = []
            errors = []
            for bs, (ok, value) in zip(bs_uuids, outcomes, strict=True):
                if ok:
                    results.append({"backupStorageUuid": bs, "installPath": value.install_path,
                                    "size": value.size, "actualSize": value.actual_size,
                                    "md5sum": value.md5sum})
                else:
                    err = from_failure(value)
                    reason = err.opaque.get("reason") or str(err)
                    errors.append((bs, err, reason))
                    results.append({"backupStorageUuid": bs, "error": reason})
            await self.store.finish_image_download(uuid, results)
            for bs, err, _ in errors:
                log.warn("image {uuid}: download to backup storage {bs} failed: {error}",
                         uuid=uuid, bs=bs, error=str(err))
            if len(errors) == len(bs_uuids):
                raise OperationError(error_code(
                    IMAGE.ADD_ERROR, f"image {uuid} ({name!r}) could not be downloaded from "
                    f"{url} to any backup storage: {errors[0][2]}", errors[0][1],
                    imageUuid=uuid, failures={bs: reason for bs, _, reason in errors}))
            return await self._reply(uuid)

        return await self.serialized(f"image-{uuid}", add)

    # --- delete ---------------------------------------------------------------------------

    @handles(DeleteImageMsg)
    async def delete(self, msg: DeleteImageMsg) -> ImageReply:
        """
        Delete (see the module docstring); C{IMAGE.1003} naming the VMs using it.
        """
        await self._get(msg.uuid)

        async def delete() -> None:
            await self._get(msg.uuid)
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
                if not ref.get("installPath"):
                    continue
                try:
                    await self.send(DeleteBitsOnBackupStorageMsg(
                        service_id=BS_SERVICE, resource_uuid=ref["backupStorageUuid"],
                        backup_storage_uuid=ref["backupStorageUuid"],
                        install_path=ref["installPath"]))
                except OperationError as e:
                    log.warn("image {uuid}: bits {path} left on backup storage {bs}: {error}",
                             uuid=msg.uuid, path=ref["installPath"],
                             bs=ref["backupStorageUuid"], error=str(e.error))
            await self.store.delete_image(msg.uuid)
            self.publish(ImageDeletedEvent(image_uuid=msg.uuid))

        await self.serialized(f"image-{msg.uuid}", delete)
        return ImageReply(inventory=None)

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
        changes: dict[str, Any] = {}
        if msg.name is not None:
            changes["name"] = validate.name(msg.name)
        if msg.description is not None:
            changes["description"] = validate.optional_text(msg.description, "description")
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
