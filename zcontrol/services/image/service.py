# -*- test-case-name: tests.test_image -*-
"""
The image service (C{image}): images registered from a URL and downloaded to backup storage,
on the bus.

 - B{add}: checks every field and every backup storage (known, C{Connected}, C{Enabled},
   attached to a zone), then runs as a journaled job (Note [add jobs]): inserts the image
   C{Downloading} with one ref per backup storage, sends C{DownloadImageMsg} to each backup
   storage in parallel, then records the outcome atomically
   (L{zcontrol.db.components.images.finish_image_download_thd}): C{Ready} when one download
   succeeded at least (failed refs removed), else C{Error} with each ref's C{lastError} the
   agent's reason, and the reply fails with C{IMAGE.1000}.
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

Note [add jobs]: an add is a job of L{zcontrol.core.journal} (kind L{ADD_IMAGE_JOB}, the
C{apiName} of the jobs this service wrote before the journal, so that their rows resolve
too; C{apiMessage} the checked fields, C{resourceUuid} the image, owned by this node; its
uuid is the trace id of everything the add causes). Its flows (L{ADD_IMAGE_FLOWS}):

    1. C{insert}: the image C{Downloading} and its refs (so a row C{Downloading} always has
       a job); its rollback never deletes the image but I{settles} it
       (L{ImageService.settle}: the refs still C{Downloading} C{Error}, the image C{Ready}
       when a copy arrived, else C{Error}; the partial bits deleted);
    2. C{download}: all the downloads in parallel, each ref recorded as its download ends;
    3. C{finish}: the final status; C{Error} fails the job with C{IMAGE.1000}.

The job row keeps the add's own outcome (L{JobKind.job_result}, L{JobKind.job_error}):
C{Succeeded} with C{{"imageUuid": uuid}}, or C{Failed} with the failing flow's error
(C{IMAGE.1000}, C{IMAGE.1001}, the store's refusal of the insert), not the journal's
C{SYS.1006} around it.

A management node that stops during an add leaves the job C{Running}; when it starts, it
resolves it with L{zcontrol.core.journal.recover_jobs} (L{ImageService.recover_job}, in the
image's chain, before it serves), so that no image stays C{Downloading} (ZStack's "no stuck
task"). Nothing downloads any more (the agent's callback went to the node that stopped), and
the Sftp agent cannot tell whether a download ended (its probe says None), but the refs say
which downloads ended before the stop. So the job is finished I{forward} unless its image
row was never inserted, each flow re-run with C{ctx["recovering"]}: C{insert} adopts the
row; C{download} settles it (the interrupted refs C{Error} with L{RESTARTED}, their partial
bits deleted in the background, best effort); C{finish} then ends the job C{Succeeded} when
the image is C{Ready} (a copy had arrived), else C{Failed} with C{IMAGE.1000} saying why. A
job whose image row was never inserted is finished C{Failed} with C{IMAGE.1001} (caused by
C{JOB.1000}); a job that was rolling back finishes its rollbacks and fails with its error. A
node that dies does not come back: the node that takes over its resources claims its jobs
(C{claim_jobs}) and resolves them with L{ImageService.resolve_add_image_jobs}.
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Any, Sequence

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from zcontrol.bus.message import new_id
from zcontrol.core.errors import SYS, ErrorCode, OperationError, error_code, from_failure
from zcontrol.core.journal import (
    JOB_NODE_RESTARTED,
    JobKind,
    JournaledFlow,
    JournaledFlowChain,
    recover_jobs,
)
from zcontrol.core.trace import new_trace_id, trace_scope
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

__all__ = ["ADD_FAILED", "ADD_IMAGE_JOB", "ADD_IMAGE_FLOWS", "RESTARTED", "ImageService",
           "make"]

log = Logger()

_STATE_EVENTS = {"enable": "Enabled", "disable": "Disabled"}
#: VM states in which a VM no longer needs its template.
_GONE_VM_STATES = ["Destroyed", "Expunging"]
#: The C{apiName} of an add's job (L{zcontrol.db.interfaces.IStore.create_job}).
ADD_IMAGE_JOB = AddImageMsg.type_name
#: The C{lastError} of a download its management node's restart interrupted.
RESTARTED = "the management node restarted during the download"
#: The C{lastError} of a download whose outcome was never recorded because the add failed.
ADD_FAILED = "the add failed before the download's outcome was recorded"
#: The flows of an add job, in order (Note [add jobs]).
ADD_IMAGE_FLOWS = ("insert", "download", "finish")
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


def _gone(uuid: str, why: str, cause: ErrorCode | None = None) -> ErrorCode:
    return error_code(IMAGE.NOT_FOUND, f"image {uuid} {why}", cause, resource="image",
                      uuid=uuid)


def _flow_error(err: ErrorCode) -> ErrorCode:
    """
    The add's own error from its chain's: the failing flow's (C{IMAGE.1000}, C{IMAGE.1001},
    the store's refusal of the insert), not the chain's C{SYS.1006} around it.
    """
    if (err.code == SYS.OPERATION_ERROR and err.location in ADD_IMAGE_FLOWS
            and err.cause is not None):
        return err.cause
    return err


def _job_error(ctx: dict[str, Any], err: ErrorCode) -> ErrorCode:
    """
    The error an add job is finished with (L{JobKind.job_error}): the failing flow's own
    (L{_flow_error}); C{IMAGE.1001} caused by C{JOB.1000} when a recovery rolled the job
    back, which happens only when its image row was never inserted (Note [add jobs]).
    """
    if err.code == JOB_NODE_RESTARTED:
        return _gone(ctx["image_uuid"], "is gone: its add was interrupted by a restart of the"
                     " management node", err)
    return _flow_error(err)


class _InsertImage(JournaledFlow):
    """
    Insert the image C{Downloading} with one C{Downloading} ref per backup storage of the
    plan, atomically (L{zcontrol.db.components.images.add_image_thd}).

    took: C{{"image": uuid, "backupStorageUuids": [uuids]}}. Re-run at recovery (the row
    exists, the probe said so), it adopts the row (C{"adopted": True}, the refs' backup
    storages). Rollback: never deletes the image (a failed add leaves it C{Error}, or
    C{Ready} with the copies that arrived, as ZStack's semantics here; a delete removes it):
    it settles it (L{ImageService.settle}), which a failed insert (nothing inserted, or the
    uuid is another image's, which is not C{Downloading}) leaves unchanged. Probe: the image
    row exists.
    """

    name = ADD_IMAGE_FLOWS[0]

    def __init__(self, service: ImageService) -> None:
        self.service = service

    async def run(self, ctx: Any) -> dict[str, Any]:
        uuid = ctx["image_uuid"]
        store = self.service.store
        if ctx.get("recovering"):
            if await store.get("image", uuid) is None:
                raise OperationError(_gone(uuid, "is gone: its add was interrupted by a "
                                          "restart of the management node"))
            refs = await self.service._refs(uuid)
            return {"image": uuid, "adopted": True,
                    "backupStorageUuids": [r["backupStorageUuid"] for r in refs]}
        plan = ctx["message"]
        await store.add_image({
            "uuid": uuid, "name": plan["name"], "description": plan["description"],
            "url": plan["url"], "status": "Downloading", "mediaType": plan["media_type"],
            "format": plan["format"], "platform": plan["platform"],
            "guestOsType": plan["guest_os_type"], "system": plan["system"],
        }, plan["backup_storage_uuids"])
        return {"image": uuid, "backupStorageUuids": list(plan["backup_storage_uuids"])}

    async def rollback(self, ctx: Any, took: Any) -> None:
        await self.service.settle(ctx)

    async def probe(self, ctx: Any) -> bool:
        return await self.service.store.get("image", ctx["image_uuid"]) is not None


class _Download(JournaledFlow):
    """
    Download to every backup storage of the plan in parallel, each outcome recorded in its
    ref as it ends (L{ImageService.download_all}). One flow for all the downloads, not one
    per backup storage: a L{JobKind}'s flows are a fixed list while the backup storages are
    the message's, the downloads run in parallel (ZStack's), and the refs are the per-copy
    journal (each written as its download ends, so a restart knows which ended).

    took: C{{"results": [one per backup storage: C{backupStorageUuid} and C{installPath},
    C{size}, C{actualSize}, C{md5sum}, or C{error}]}}. Re-run at recovery (nothing
    downloads any more: the agent's callback went to the node that stopped), it settles the
    image (L{ImageService.settle}: the refs still C{Downloading} C{Error} L{RESTARTED}, their
    partial bits deleted) and reports the refs (C{"settled": True}).

    Rollback: C{took=None} (its outcome never recorded): settle, as above. Else the copies
    that arrived are kept while the image row exists (any copy makes the image C{Ready}),
    and deleted (best effort) when the row went meanwhile: nobody can use them.

    Probe: cannot tell (None): the Sftp backup storage agent answers connect, download and
    delete only (L{agent.protocol}), nothing that says whether a download ended.
    """

    name = ADD_IMAGE_FLOWS[1]

    def __init__(self, service: ImageService) -> None:
        self.service = service

    async def run(self, ctx: Any) -> dict[str, Any]:
        uuid = ctx["image_uuid"]
        if ctx.get("recovering"):
            if await self.service.settle(ctx) is None:
                raise OperationError(_gone(uuid, "is gone: its add was interrupted by a "
                                          "restart of the management node"))
            results = []
            for ref in await self.service._refs(uuid):
                if ref["status"] == "Ready":
                    results.append({"backupStorageUuid": ref["backupStorageUuid"],
                                    "installPath": ref["installPath"]})
                else:
                    results.append({"backupStorageUuid": ref["backupStorageUuid"],
                                    "error": ref["lastError"] or ref["status"]})
            return {"results": results, "settled": True}
        return {"results": await self.service.download_all(ctx)}

    async def rollback(self, ctx: Any, took: Any) -> None:
        if took is None:
            await self.service.settle(ctx)
            return
        uuid = ctx["image_uuid"]
        if await self.service.store.get("image", uuid) is not None:
            return
        for r in took["results"]:
            if r.get("error") is None:
                await self.service._delete_bits(uuid, r["backupStorageUuid"],
                                                r["installPath"])


class _FinishDownload(JournaledFlow):
    """
    The image's final status. After live downloads, recorded atomically
    (L{zcontrol.db.components.images.finish_image_download_thd}, idempotent): C{Ready} with
    the first success's sizes when one download succeeded (the failed refs removed), else
    C{Error} with each ref's C{lastError}. After a recovery's settlement, the status the
    settlement gave. C{Ready}: took C{{"status", "size", "actualSize"}}. C{Error}: fails
    with C{IMAGE.1000} (caused by the first failure's ErrorCode when it is known, details
    its reason, C{failures} every backup storage's); the image row gone: C{IMAGE.1001}.
    Nothing to roll back (a final status stays).
    """

    name = ADD_IMAGE_FLOWS[2]

    def __init__(self, service: ImageService) -> None:
        self.service = service

    async def run(self, ctx: Any) -> dict[str, Any]:
        uuid = ctx["image_uuid"]
        store = self.service.store
        downloaded = ctx["took"][ADD_IMAGE_FLOWS[1]]
        results = downloaded["results"]
        if downloaded.get("settled"):
            row = await store.get("image", uuid)
        else:
            row = await store.finish_image_download(uuid, results)
        if row is None:
            raise OperationError(_gone(uuid, "was deleted while it downloaded"))
        errors = [r for r in results if r.get("error") is not None]
        for r in errors:
            log.warn("image {uuid}: download to backup storage {bs} failed: {error}",
                     uuid=uuid, bs=r["backupStorageUuid"], error=r["error"])
        if row["status"] == "Ready":
            return {"status": "Ready", "size": row["size"], "actualSize": row["actualSize"]}
        first = errors[0] if errors else {"backupStorageUuid": None, "error": row["status"]}
        raise OperationError(error_code(
            IMAGE.ADD_ERROR, f"image {uuid} ({row['name']!r}) could not be downloaded from "
            f"{row['url']} to any backup storage: {first['error']}",
            ctx["causes"].get(first["backupStorageUuid"]), imageUuid=uuid,
            failures={r["backupStorageUuid"]: r["error"] for r in errors}))


class ImageService(Service):
    """
    The image service on one management node.

    @ivar download_timeout: seconds a download to one backup storage may take.
    """

    service_id = SERVICE_ID

    def __init__(self, clock: Any, bus: Any, store: Any, download_timeout: float = 3 * 3600.0,
                 node_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(clock, bus, store, **kwargs)
        self.download_timeout = download_timeout
        #: This management node's uuid (the owner of the add jobs it runs).
        self.node_id = node_id or bus.node_id
        #: The add's job kind (Note [add jobs]).
        self.add_image_kind = self._add_image_kind()
        #: Fires with L{recover_jobs}' outcomes once L{start}'s resolution of the
        #: interrupted adds is done.
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
        Add and download (see the module docstring and Note [add jobs]). Runs on the image's
        owner node (Note [add on the owner]); C{IMAGE.1001} naming the image when it was
        deleted meanwhile.
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
        # The job's plan: the checked fields (the flows read them, not the message).
        plan = {"name": name, "url": url, "backup_storage_uuids": bs_uuids,
                "media_type": media_type, "format": fmt, "platform": platform,
                "guest_os_type": guest_os_type, "system": msg.system,
                "description": description, "uuid": uuid}
        job_uuid = new_trace_id()

        async def add() -> ImageReply:
            chain = JournaledFlowChain(self.store, self.node_id, self.add_image_kind,
                                       job_uuid=job_uuid)
            try:
                await chain.run(plan, uuid)
            except OperationError as e:
                raise OperationError(_flow_error(e.error)) from None
            return await self._reply(uuid)

        # The job uuid is the trace id of everything the add causes (Note [add jobs]).
        return await trace_scope(job_uuid, self.serialized, f"image-{uuid}", add)

    def _add_image_kind(self) -> JobKind:
        """
        The add's L{JobKind} (Note [add jobs]).
        """
        def context(job: dict[str, Any]) -> dict[str, Any]:
            message = job.get("apiMessage") or {}
            return {"image_uuid": job.get("resourceUuid") or message.get("uuid"),
                    "causes": {}}

        return JobKind(
            ADD_IMAGE_JOB, [_InsertImage(self), _Download(self), _FinishDownload(self)],
            # At recovery, finish forward unless the image row was never inserted: the
            # flows re-run with ctx["recovering"] settle what is known (Note [add jobs]).
            forward=lambda ctx, recorded, happened: happened is not False,
            context=context,
            job_result=lambda ctx: {"imageUuid": ctx["image_uuid"]},
            job_error=_job_error)

    async def settle(self, ctx: dict[str, Any]) -> dict[str, Any] | None:
        """
        Settle the image of an add whose downloads no longer run (a failed add's rollback,
        or a recovery), atomically
        (L{zcontrol.db.components.images.resolve_interrupted_image_download_thd}): every ref
        still C{Downloading} becomes C{Error} (C{lastError} L{RESTARTED} at recovery, else
        L{ADD_FAILED}), an image still C{Downloading} becomes C{Ready} when a download ended
        (its ref C{Ready}), else C{Error}; the partial bits on the interrupted backup storages
        are deleted in the background, best effort. Idempotent (a settled image does not
        change, and no delete is sent again). The image row (or None: it is gone) is left in
        C{ctx["settled"]}.

        @return: C{{"image": row, "interrupted": [backup storage uuids]}}, or None when the
            image row is gone.
        """
        uuid = ctx["image_uuid"]
        reason = RESTARTED if ctx.get("recovering") else ADD_FAILED
        out = await self.store.resolve_interrupted_image_download(uuid, reason)
        ctx["settled"] = None if out is None else out["image"]
        if out is None:
            return None
        image = out["image"]
        if out["interrupted"]:
            log.warn("image {uuid}: downloads to {bs} interrupted ({reason}); the image is"
                     " {status}", uuid=uuid, bs=", ".join(out["interrupted"]), reason=reason,
                     status=image["status"])
        for bs in out["interrupted"]:
            self.background(Deferred.fromCoroutine(
                self._delete_partial(uuid, bs, image["mediaType"])),
                f"deleting the partial bits of image {uuid} on backup storage {bs}")
        return out

    async def download_all(self, ctx: dict[str, Any]) -> list[dict[str, Any]]:
        """
        Download to every backup storage of the plan in parallel, each outcome recorded in
        its ref as it comes (L{zcontrol.db.components.images.record_image_ref_download_thd}),
        each failure's ErrorCode kept in C{ctx["causes"]} (by backup storage uuid).

        @return: one result per backup storage, in order (the shape of
            L{zcontrol.db.components.images.finish_image_download_thd}'s).
        """
        plan = ctx["message"]
        uuid = ctx["image_uuid"]

        async def one(bs: str) -> dict[str, Any]:
            try:
                reply = await self.send(DownloadImageMsg(
                    service_id=BS_SERVICE, resource_uuid=bs, backup_storage_uuid=bs,
                    image_uuid=uuid, url=plan["url"], format=plan["format"],
                    media_type=plan["media_type"]), timeout=self.download_timeout)
                result = {"backupStorageUuid": bs, "installPath": reply.install_path,
                          "size": reply.size, "actualSize": reply.actual_size,
                          "md5sum": reply.md5sum}
            except Exception as e:
                cause = from_failure(e)
                ctx["causes"][bs] = cause
                result = {"backupStorageUuid": bs,
                          "error": cause.opaque.get("reason") or str(cause)}
            try:
                await self.store.record_image_ref_download(uuid, result)
            except Exception as e:
                log.warn("image {uuid}: recording the download to {bs} failed (the outcome "
                         "is recorded when all end): {error}", uuid=uuid, bs=bs,
                         error=str(from_failure(e)))
            return result

        outcomes = await DeferredList([Deferred.fromCoroutine(one(bs))
                                       for bs in plan["backup_storage_uuids"]])
        return [value for _, value in outcomes]

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

    async def _delete_partial(self, uuid: str, bs: str, media_type: str) -> None:
        row = await self.store.get("backupStorage", bs)
        if row is not None:
            await self._delete_bits(uuid, bs, install_path(row["url"], uuid, media_type))

    # --- restart --------------------------------------------------------------------------

    def start(self) -> Any:
        """
        Queue the recovery of the adds this node was running when it stopped (each in its
        image's chain, so no new operation on that image runs before it), then serve.
        L{recovered} fires once they are resolved.
        """
        d = Deferred.fromCoroutine(self._queue_recovery())
        d.addCallback(lambda _: super(ImageService, self).start())
        return d

    async def _queue_recovery(self) -> None:
        try:
            jobs = await self.store.running_jobs(self.node_id)
        except Exception as e:
            log.error("image: cannot list the jobs to recover: {error}; none recovered",
                      error=str(from_failure(e)))
            self.recovered.callback([])
            return
        self.background(self.resolve_add_image_jobs(jobs),
                        "resolving interrupted image adds").chainDeferred(self.recovered)

    def resolve_add_image_jobs(self, jobs: Sequence[dict[str, Any]]) -> Deferred[list[dict]]:
        """
        Resolve the C{Running} add jobs (L{ADD_IMAGE_JOB}) of this node among C{jobs} (rows
        of the jobs table; other jobs are left alone), each with L{recover_job}. The jobs
        are queued in their images' chains at once (before this returns).

        Called at start with this node's own jobs. A node that dies does not restart its
        jobs: the node that takes over its resources (the multi-node issue) takes its jobs
        with C{store.claim_jobs(dead, self)} and passes the rows it got here.

        @return: a Deferred firing with L{recover_jobs}' outcomes (one per job resolved).
        """
        queued = [(j, self.recover_job(j)) for j in jobs
                  if j.get("apiName") == ADD_IMAGE_JOB and j.get("state") == "Running"]

        async def gather() -> list[dict]:
            out: list[dict] = []
            for job, d in queued:
                try:
                    out.extend(await d)
                except Exception as e:
                    log.error("image {uuid}: cannot resolve the add job {job}: {error}",
                              uuid=job.get("resourceUuid"), job=job["uuid"],
                              error=str(from_failure(e)))
            return out

        return Deferred.fromCoroutine(gather())

    def recover_job(self, job: dict[str, Any]) -> Deferred[list[dict]]:
        """
        Resolve one interrupted add job of this node in its image's chain, as the job's
        trace (L{recover_jobs}; Note [add jobs] says how each point of the add ends).

        @return: a Deferred firing with L{recover_jobs}' list of outcomes.
        """
        uuid = job.get("resourceUuid") or job["uuid"]

        def run() -> Deferred:
            return Deferred.fromCoroutine(recover_jobs(
                self.store, self.node_id, [self.add_image_kind], [job], clock=self.clock,
                parallelism=1))

        return trace_scope(job["uuid"], self.serialized, f"image-{uuid}", run)

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
