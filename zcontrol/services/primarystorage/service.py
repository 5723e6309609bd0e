# -*- test-case-name: tests.test_primary_storage -*-
"""
The primary storage service: LocalStorage and NFS primary storage served through the KVM
agents of the hosts (ZStack's C{PrimaryStorageBase}, C{LocalStorageBase},
C{NfsPrimaryStorage}), their image caches, volumes' bits and capacity.

Note [owner node]: every operation on one storage runs on the storage's owner node (the
sender sets C{resource_uuid} to the storage's uuid); attachment changes run in the chain
C{ps-<uuid>}, one at a time. Commands to hosts go through the bus as
L{KVMHostAsyncHttpCallMsg} (routed to each host's owner node), never to an agent directly.
When a host connects (L{HostStatusChangedEvent}, published on every node), each node
initialises / mounts the storages it owns that are attached to the host's cluster.

Note [one download]: a cache fill runs in the chain C{ps-cache-<storage>-<host or
shared>-<image>}: the first request inserts the C{Downloading} row with its capacity held
(holder C{("ImageCacheVO", cache uuid)}), downloads through the agent and marks it
C{Ready}; the requests queued behind it find it C{Ready}. A failed download deletes the row
and gives the capacity back, so the next request tries again.

Note [capacity]: reservations are named holders (Note [holders] in L{zcontrol.db._store}):
C{("VolumeVO", volume uuid)} for volumes, C{("ImageCacheVO", cache uuid)} for caches. A
LocalStorage reservation takes from the storage and the host's ref row at once.
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from agent import protocol as p
from zcontrol.bus.message import Reply
from zcontrol.core.errors import SYS, OperationError, error_code, from_failure
from zcontrol.core.flow import FlowChain, flow
from zcontrol.db.components.storage import IMAGE_CACHE_HOLDER
from zcontrol.db.interfaces import DB
from zcontrol.db.query import Query
from zcontrol.services import validate
from zcontrol.services.base import Service, handles, succeeds_if_gone
from zcontrol.services.host.messages import (
    SERVICE_ID as HOST_SERVICE_ID,
)
from zcontrol.services.host.messages import (
    HostDeletedEvent,
    HostStatusChangedEvent,
    KVMHostAsyncHttpCallMsg,
)
from zcontrol.services.image.messages import ImageDeletedEvent
from zcontrol.services.inventory import inventory, register_inventory
from zcontrol.services.primarystorage.messages import (
    LOCAL_STORAGE_TYPE,
    NFS_TYPE,
    PS,
    SERVICE_ID,
    AddLocalPrimaryStorageMsg,
    AddNfsPrimaryStorageMsg,
    AllocatePrimaryStorageMsg,
    AllocatePrimaryStorageReply,
    AttachPrimaryStorageToClusterMsg,
    ChangePrimaryStorageStateMsg,
    DeletePrimaryStorageMsg,
    DeleteVolumeBitsOnPrimaryStorageMsg,
    DetachPrimaryStorageFromClusterMsg,
    DownloadImageToPrimaryStorageCacheMsg,
    ImageCacheReply,
    InstantiateRootVolumeFromTemplateOnPrimaryStorageMsg,
    InstantiateVolumeOnPrimaryStorageMsg,
    InstantiateVolumeOnPrimaryStorageReply,
    PrimaryStorageReply,
    ReconnectPrimaryStorageMsg,
    RemoveHostFromPrimaryStorageMsg,
    ReturnPrimaryStorageCapacityMsg,
    UpdatePrimaryStorageMsg,
)

__all__ = ["PrimaryStorageService", "make"]

log = Logger()

CONNECTED = "Connected"
VOLUME_HOLDER = "VolumeVO"
_STATE_EVENTS = {"enable": "Enabled", "disable": "Disabled", "maintain": "Maintenance"}


@register_inventory("primaryStorage", ("attachedClusterUuids",))
async def _expand(store: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    ZStack's C{PrimaryStorageInventory.attachedClusterUuids}: one query for the page.
    """
    uuids = [r["uuid"] for r in rows]
    refs = (await store.query("primaryStorageClusterRef", Query(
        conditions=[f"primaryStorageUuid?={','.join(uuids)}"], limit=100000))).inventories
    by_ps: dict[str, list[str]] = {u: [] for u in uuids}
    for ref in refs:
        by_ps.setdefault(ref["primaryStorageUuid"], []).append(ref["clusterUuid"])
    for r in rows:
        r["attachedClusterUuids"] = sorted(by_ps.get(r["uuid"], []))
    return rows


def _image_spec(value: Any) -> dict[str, Any]:
    """
    The checked image spec of a message (see L{zcontrol.services.primarystorage.messages}).
    """
    if not isinstance(value, dict):
        raise validate.invalid("image", value, "must be an image spec (a JSON object)")
    spec = {
        "uuid": validate.uuid(value.get("uuid"), "image.uuid"),
        "size": validate.size(value.get("size"), "image.size"),
        "format": validate.optional_text(value.get("format"), "image.format", 64),
        "mediaType": validate.optional_text(value.get("mediaType"), "image.mediaType", 64),
        "backupStorageUuid": (None if value.get("backupStorageUuid") is None else
                              validate.uuid(value.get("backupStorageUuid"),
                                            "image.backupStorageUuid")),
        "installPath": validate.optional_text(value.get("installPath"), "image.installPath"),
        "backupStorageHostname": validate.optional_text(value.get("backupStorageHostname"),
                                                        "image.backupStorageHostname"),
    }
    actual = value.get("actualSize")
    spec["actualSize"] = (spec["size"] if actual is None
                          else validate.size(actual, "image.actualSize", 0))
    return spec


def _local_url(value: Any, field: str = "url") -> str:
    url = validate.optional_text(value, field) or ""
    if (not url.startswith("/") or url.rstrip("/") == "" or ".." in url.split("/")
            or any(c.isspace() for c in url)):
        raise validate.invalid(field, value, "must be an absolute directory such as /zstack_ps")
    return url.rstrip("/")


def _nfs_url(value: Any) -> str:
    url = validate.optional_text(value, "url") or ""
    server, sep, export = url.partition(":")
    if not sep or not server or not export.startswith("/") or any(c.isspace() for c in url):
        raise validate.invalid("url", value, "must be server:/export")
    return url


class PrimaryStorageService(Service):
    """
    The primary storage service on one management node (see the module docstring).
    """

    service_id = SERVICE_ID

    def start(self) -> Any:
        result = super().start()
        self._subscriptions = [
            self.bus.subscribe(HostStatusChangedEvent.topic, self._on_host_status),
            self.bus.subscribe(HostDeletedEvent.topic, self._on_host_deleted),
            self.bus.subscribe(ImageDeletedEvent.topic, self._on_image_deleted),
        ]
        return result

    def stop(self) -> Deferred[None]:
        for sub in getattr(self, "_subscriptions", []):
            sub.cancel()
        self._subscriptions = []
        return super().stop()

    # --- helpers --------------------------------------------------------------------------

    async def _ps(self, uuid: Any, field: str = "primaryStorageUuid") -> dict[str, Any]:
        return await self.must_get("primaryStorage", validate.uuid(uuid, field), PS.NOT_FOUND,
                                   field=field)

    async def _inventory(self, uuid: str) -> dict[str, Any] | None:
        return await inventory(self.store, "primaryStorage", uuid)

    async def _query(self, resource: str, *conditions: str) -> list[dict[str, Any]]:
        return (await self.store.query(resource, Query(conditions=list(conditions),
                                                       limit=100000))).inventories

    async def _agent(self, host_uuid: str, path: str, cmd: p.Message) -> Any:
        """
        Run an agent command on a host through its owner node; the decoded response, or
        C{PS.1006} wrapping the cause (the agent's error text, or the host service's error).
        """
        try:
            reply = await self.send(KVMHostAsyncHttpCallMsg(
                service_id=HOST_SERVICE_ID, resource_uuid=host_uuid, host_uuid=host_uuid,
                path=path, command=cmd.to_dict()))
        except OperationError as e:
            raise OperationError(error_code(PS.HOST_ERROR, f"{path} on host {host_uuid}",
                                            e.error, hostUuid=host_uuid, path=path)) from None
        try:
            rsp = p.COMMANDS[path].rsp_type.from_dict(reply.response)
        except Exception as e:  # a malformed answer: the command failed, say which
            raise OperationError.of(
                PS.HOST_ERROR, f"{path} on host {host_uuid}: malformed response"
                f" ({type(e).__name__}: {e})", hostUuid=host_uuid, path=path) from None
        if not rsp.success:
            raise OperationError.of(PS.HOST_ERROR, f"{path} on host {host_uuid}: {rsp.error}",
                                    hostUuid=host_uuid, path=path, agentError=rsp.error)
        return rsp

    def _mount_path(self, ps: dict[str, Any]) -> str:
        return ps["mountPath"] or f"/opt/zstack/nfsprimarystorage/prim-{ps['uuid']}"

    def _root(self, ps: dict[str, Any]) -> str:
        return ps["url"] if ps["type"] == LOCAL_STORAGE_TYPE else self._mount_path(ps)

    def _cache_path(self, ps: dict[str, Any], image_uuid: str) -> str:
        return f"{self._root(ps)}/imagecache/template/{image_uuid}/{image_uuid}.qcow2"

    def _volume_path(self, ps: dict[str, Any], kind: str, volume_uuid: str) -> str:
        return f"{self._root(ps)}/{kind}/acct-admin/vol-{volume_uuid}/{volume_uuid}.qcow2"

    def _nfs(self, ps: dict[str, Any]) -> dict[str, Any]:
        return {"uuid": ps["uuid"], "url": ps["url"], "mount_path": self._mount_path(ps)}

    def _mine(self, ps_uuid: str) -> bool:
        return self.bus.owner_of(ps_uuid) == self.bus.node_id

    async def _cluster_hosts(self, cluster_uuid: str, connected_only: bool = True
                             ) -> list[str]:
        conditions = [f"clusterUuid={cluster_uuid}"]
        if connected_only:
            conditions.append(f"status={CONNECTED}")
        return sorted(h["uuid"] for h in await self._query("host", *conditions))

    def _check_usable(self, ps: dict[str, Any]) -> None:
        if ps["state"] != "Enabled":
            raise OperationError.of(PS.WRONG_STATE,
                                    f"primary storage {ps['uuid']} is {ps['state']}",
                                    primaryStorageUuid=ps["uuid"], state=ps["state"])
        if ps["status"] != CONNECTED:
            raise OperationError.of(PS.WRONG_STATE,
                                    f"primary storage {ps['uuid']} is {ps['status']}",
                                    primaryStorageUuid=ps["uuid"], status=ps["status"])

    # --- add, update, state, delete -------------------------------------------------------

    @handles(AddLocalPrimaryStorageMsg, AddNfsPrimaryStorageMsg)
    async def add(self, msg: Any) -> PrimaryStorageReply:
        """
        Insert the storage, Connected, with zero capacity (ZStack's add: capacity comes
        from the hosts once attached).
        """
        local = isinstance(msg, AddLocalPrimaryStorageMsg)
        name = validate.name(msg.name)
        description = validate.optional_text(msg.description, "description")
        zone_uuid = validate.uuid(msg.zone_uuid, "zoneUuid")
        url = _local_url(msg.url) if local else _nfs_url(msg.url)
        mount_path = None
        if not local and msg.mount_path is not None:
            mount_path = _local_url(msg.mount_path, "mountPath")
        ps_uuid = validate.uuid(msg.uuid, "uuid") if msg.uuid is not None else uuidlib.uuid4().hex
        await self.must_get("zone", zone_uuid, PS.NOT_FOUND, field="zoneUuid")
        try:
            await self.store.insert("primaryStorage", {
                "uuid": ps_uuid, "name": name, "description": description,
                "zoneUuid": zone_uuid, "url": url, "mountPath": mount_path,
                "type": LOCAL_STORAGE_TYPE if local else NFS_TYPE, "state": "Enabled",
                "status": CONNECTED, "totalCapacity": 0, "availableCapacity": 0})
        except OperationError as e:
            if e.error.code == DB.DUPLICATE:
                raise OperationError(error_code(PS.ADD_ERROR,
                                                f"a primary storage {ps_uuid} exists",
                                                e.error, uuid=ps_uuid)) from None
            if e.error.code == DB.REFERENCE:  # the zone went meanwhile
                raise OperationError(error_code(
                    PS.NOT_FOUND, f"no zone with uuid {zone_uuid}", e.error, resource="zone",
                    uuid=zone_uuid, field="zoneUuid", zoneUuid=zone_uuid)) from None
            raise
        return PrimaryStorageReply(inventory=await self._inventory(ps_uuid))

    @handles(UpdatePrimaryStorageMsg)
    async def update_storage(self, msg: UpdatePrimaryStorageMsg) -> PrimaryStorageReply:
        await self._ps(msg.uuid, "uuid")
        changes: dict[str, Any] = validate.common_changes(msg)
        if changes:
            await self.store.update("primaryStorage", msg.uuid, changes)
        return PrimaryStorageReply(inventory=await self._inventory(msg.uuid))

    @handles(ChangePrimaryStorageStateMsg)
    async def change_state(self, msg: ChangePrimaryStorageStateMsg) -> PrimaryStorageReply:
        event = validate.one_of(msg.state_event, "stateEvent", _STATE_EVENTS)
        await self._ps(msg.uuid, "uuid")

        async def run() -> PrimaryStorageReply:
            await self.store.update("primaryStorage", msg.uuid,
                                    {"state": _STATE_EVENTS[event]})
            return PrimaryStorageReply(inventory=await self._inventory(msg.uuid))

        return await self.serialized(f"ps-{msg.uuid}", run)

    @handles(DeletePrimaryStorageMsg)
    @succeeds_if_gone(PS.NOT_FOUND)
    async def delete_storage(self, msg: DeletePrimaryStorageMsg) -> Reply:
        """
        Refused (C{PS.1004}) while attached or holding volumes; else the caches, refs and row
        go in one transaction.
        """
        await self._ps(msg.uuid, "uuid")

        async def run() -> Reply:
            clusters = sorted(r["clusterUuid"] for r in await self._query(
                "primaryStorageClusterRef", f"primaryStorageUuid={msg.uuid}"))
            if clusters:
                raise OperationError.of(
                    PS.IN_USE, f"primary storage {msg.uuid} is attached to cluster(s) "
                    f"{', '.join(clusters)}: detach it first", primaryStorageUuid=msg.uuid,
                    clusterUuids=clusters)
            await self._refuse_volumes(msg.uuid, None, "deleted")
            try:
                await self.store.delete_primary_storage(msg.uuid)
            except OperationError as e:
                if e.error.code == SYS.OPERATION_ERROR:
                    raise OperationError(error_code(PS.IN_USE, e.error.details, e.error,
                                                    primaryStorageUuid=msg.uuid)) from None
                raise
            return Reply()

        return await self.serialized(f"ps-{msg.uuid}", run)

    async def _refuse_volumes(self, ps_uuid: str, host_uuids: list[str] | None,
                              what: str) -> None:
        holders = await self.store.primary_storage_holders(ps_uuid, host_uuids,
                                                           IMAGE_CACHE_HOLDER)
        if holders:
            names = ", ".join(f"{h['holderType']} {h['holderUuid']}" for h in holders[:20])
            raise OperationError.of(
                PS.IN_USE, f"primary storage {ps_uuid} cannot be {what}: {len(holders)}"
                f" volume(s) hold its capacity ({names})", primaryStorageUuid=ps_uuid,
                holders=holders, volumeUuids=[h["holderUuid"] for h in holders])

    # --- hosts: init / mount, forget --------------------------------------------------------

    async def _connect_host(self, ps: dict[str, Any], host_uuid: str) -> None:
        """
        Initialise (LocalStorage: the host's ref and the storage's totals) or mount (NFS:
        the host ref, the export's capacity) on one host. Idempotent.
        """
        if ps["type"] == LOCAL_STORAGE_TYPE:
            rsp = await self._agent(host_uuid, "/localstorage/init",
                                    p.LocalStorageInitCmd(path=ps["url"], host_uuid=host_uuid))
            await self.store.set_local_storage_host_capacity(
                ps["uuid"], host_uuid, rsp.total_capacity, rsp.available_capacity)
            return
        rsp = await self._agent(host_uuid, "/nfsprimarystorage/mount",
                                p.NfsMountCmd(**self._nfs(ps)))
        refs = await self._query("primaryStorageHostRef", f"primaryStorageUuid={ps['uuid']}",
                                 f"hostUuid={host_uuid}")
        if refs:
            if refs[0]["status"] != CONNECTED:
                await self.store.update("primaryStorageHostRef", refs[0]["uuid"],
                                        {"status": CONNECTED})
        else:
            try:
                await self.store.insert("primaryStorageHostRef", {
                    "uuid": uuidlib.uuid4().hex, "primaryStorageUuid": ps["uuid"],
                    "hostUuid": host_uuid, "status": CONNECTED})
            except OperationError as e:
                if e.error.code != DB.DUPLICATE:
                    raise
        await self.store.set_primary_storage_capacity(ps["uuid"], rsp.total_capacity,
                                                      rsp.available_capacity)

    async def _forget_host(self, ps: dict[str, Any], host_uuid: str) -> None:
        """
        Drop the host's refs, caches and their capacity from the store in one transaction
        (refused, C{PS.1004} naming the volumes, while volumes hold capacity on the host:
        then nothing changed), then delete the caches' bits / unmount on the host (agent,
        best effort).
        """
        try:
            done = await self.store.remove_primary_storage_host(ps["uuid"], host_uuid)
        except OperationError as e:
            raise self._in_use(e, ps["uuid"], f"removed from host {host_uuid}") from None
        await self._clean_hosts(ps, [host_uuid], done["imageCaches"])

    async def _clean_hosts(self, ps: dict[str, Any], host_uuids: list[str],
                           caches: list[dict[str, Any]]) -> None:
        """
        After the store forgot C{host_uuids}: delete the bits of their dropped C{caches}
        (LocalStorage) or unmount (NFS) on those that are Connected; best effort.
        """
        hosts = await self._query("host", f"uuid?={','.join(host_uuids)}",
                                  f"status={CONNECTED}") if host_uuids else []
        reachable = {h["uuid"] for h in hosts}
        if ps["type"] == LOCAL_STORAGE_TYPE:
            for cache in caches:
                if cache["hostUuid"] in reachable and cache["installUrl"]:
                    await self._best_effort(self._delete_bits(ps, cache["hostUuid"],
                                                              cache["installUrl"]),
                                            "deleting an image cache")
            return
        for h in sorted(reachable):
            await self._best_effort(self._agent(h, "/nfsprimarystorage/unmount",
                                                p.NfsUnmountCmd(**self._nfs(ps))),
                                    "unmounting")

    def _in_use(self, e: OperationError, ps_uuid: str, what: str) -> OperationError:
        """
        The store's refusal (C{SYS.1006}, details C{holders}) as C{PS.1004} naming the
        volumes; any other error as it is.
        """
        if e.error.code != SYS.OPERATION_ERROR:
            return e
        holders = list(e.error.opaque.get("holders") or [])
        names = ", ".join(f"{h['holderType']} {h['holderUuid']}" for h in holders[:20])
        return OperationError(error_code(
            PS.IN_USE, f"primary storage {ps_uuid} cannot be {what}: {len(holders)}"
            f" volume(s) hold its capacity ({names})", e.error, primaryStorageUuid=ps_uuid,
            holders=holders, volumeUuids=[h["holderUuid"] for h in holders]))

    async def _best_effort(self, coro: Any, what: str) -> None:
        try:
            await coro
        except OperationError as e:
            log.warn("primary storage: {what} failed: {error}", what=what, error=str(e.error))

    @handles(RemoveHostFromPrimaryStorageMsg)
    async def remove_host(self, msg: RemoveHostFromPrimaryStorageMsg) -> Reply:
        """
        Refused (C{PS.1004} naming the volumes) while volumes hold capacity on the host;
        else the host's caches, refs and capacity go.
        """
        validate.uuid(msg.host_uuid, "hostUuid")
        ps = await self._ps(msg.primary_storage_uuid)

        async def run() -> Reply:
            await self._forget_host(ps, msg.host_uuid)
            return Reply()

        return await self.serialized(f"ps-{ps['uuid']}", run)

    # --- attach / detach ------------------------------------------------------------------

    @handles(AttachPrimaryStorageToClusterMsg)
    async def attach(self, msg: AttachPrimaryStorageToClusterMsg) -> PrimaryStorageReply:
        """
        A L{FlowChain} C{attach-primary-storage}: C{insert-cluster-ref}, then
        C{connect-hosts} (every Connected host of the cluster); a failure undoes both
        (hosts already done are forgotten) and fails with C{PS.1001}.
        """
        ps = await self._ps(msg.primary_storage_uuid)
        cluster = await self.must_get("cluster", validate.uuid(msg.cluster_uuid, "clusterUuid"),
                                      PS.NOT_FOUND, field="clusterUuid")
        if cluster["zoneUuid"] != ps["zoneUuid"]:
            raise OperationError.of(
                PS.ATTACH_ERROR, f"cluster {cluster['uuid']} is in zone {cluster['zoneUuid']},"
                f" primary storage {ps['uuid']} in zone {ps['zoneUuid']}",
                clusterUuid=cluster["uuid"], primaryStorageUuid=ps["uuid"])
        return await self.serialized(f"ps-{ps['uuid']}",
                                     lambda: self._attach(ps["uuid"], cluster["uuid"]))

    async def _attach(self, ps_uuid: str, cluster_uuid: str) -> PrimaryStorageReply:
        ps = await self._ps(ps_uuid)
        if ps["state"] == "Deleting":
            raise OperationError.of(PS.WRONG_STATE, f"primary storage {ps_uuid} is Deleting",
                                    state=ps["state"])
        refs = await self._query("primaryStorageClusterRef", f"clusterUuid={cluster_uuid}")
        if any(r["primaryStorageUuid"] == ps_uuid for r in refs):
            raise OperationError.of(
                PS.ATTACH_ERROR, f"primary storage {ps_uuid} is already attached to cluster"
                f" {cluster_uuid}", primaryStorageUuid=ps_uuid, clusterUuid=cluster_uuid)
        if ps["type"] == LOCAL_STORAGE_TYPE and refs:
            others = await self._query(
                "primaryStorage", f"uuid?={','.join(r['primaryStorageUuid'] for r in refs)}",
                f"type={LOCAL_STORAGE_TYPE}")
            if others:
                raise OperationError.of(
                    PS.ATTACH_ERROR, f"cluster {cluster_uuid} already has LocalStorage "
                    f"{others[0]['uuid']}", clusterUuid=cluster_uuid,
                    primaryStorageUuid=ps_uuid, localStorageUuid=others[0]["uuid"])

        async def insert(ctx: dict[str, Any]) -> None:
            ref_uuid = uuidlib.uuid4().hex
            await self.store.insert("primaryStorageClusterRef", {
                "uuid": ref_uuid, "primaryStorageUuid": ps_uuid, "clusterUuid": cluster_uuid})
            ctx["ref"] = ref_uuid

        async def uninsert(ctx: dict[str, Any]) -> None:
            if ctx.get("ref"):
                await self.store.delete("primaryStorageClusterRef", ctx["ref"])

        async def connect(ctx: dict[str, Any]) -> None:
            ctx["done"] = []
            hosts = await self._cluster_hosts(cluster_uuid)
            results = await DeferredList(
                [Deferred.fromCoroutine(self._connect_host(ps, h)) for h in hosts],
                consumeErrors=True)
            first: Any = None
            for h, (ok, result) in zip(hosts, results, strict=True):
                ctx["done"].append(h)  # a failed host may be half done: forget it too
                if not ok and first is None:
                    first = result
            if first is not None:
                raise OperationError(from_failure(first))

        async def disconnect(ctx: dict[str, Any]) -> None:
            for h in ctx.get("done", []):
                await self._forget_host(ps, h)
            if ps["type"] == NFS_TYPE and not await self._query(
                    "primaryStorageHostRef", f"primaryStorageUuid={ps_uuid}"):
                await self.store.set_primary_storage_capacity(ps_uuid, 0, 0)

        chain = FlowChain("attach-primary-storage", [
            flow("insert-cluster-ref", insert, uninsert),
            flow("connect-hosts", connect, disconnect),
        ])
        try:
            await chain.run({})
        except OperationError as e:
            cause = e.error.cause if e.error.cause is not None else e.error
            raise OperationError(error_code(
                PS.ATTACH_ERROR, f"cannot attach primary storage {ps_uuid} to cluster "
                f"{cluster_uuid}", cause, primaryStorageUuid=ps_uuid,
                clusterUuid=cluster_uuid)) from None
        return PrimaryStorageReply(inventory=await self._inventory(ps_uuid))

    @handles(DetachPrimaryStorageFromClusterMsg)
    async def detach(self, msg: DetachPrimaryStorageFromClusterMsg) -> PrimaryStorageReply:
        ps = await self._ps(msg.primary_storage_uuid)
        validate.uuid(msg.cluster_uuid, "clusterUuid")
        return await self.serialized(f"ps-{ps['uuid']}",
                                     lambda: self._detach(ps["uuid"], msg.cluster_uuid))

    async def _detach(self, ps_uuid: str, cluster_uuid: str) -> PrimaryStorageReply:
        """
        The dependency check, the hosts' refs and caches and the cluster ref go in one store
        transaction (L{zcontrol.db.components.storage.detach_primary_storage_thd}), before
        any agent call: a volume reserved meanwhile either blocks the detach (C{PS.1004}
        naming it, nothing changed) or finds its host gone. The caches' bits are deleted /
        the hosts unmount afterwards, best effort.
        """
        ps = await self._ps(ps_uuid)
        try:
            done = await self.store.detach_primary_storage(ps_uuid, cluster_uuid)
        except OperationError as e:
            if (e.error.code == SYS.RESOURCE_NOT_FOUND
                    and e.error.opaque.get("resource") == "primaryStorageClusterRef"):
                raise OperationError.of(
                    PS.DETACH_ERROR, f"primary storage {ps_uuid} is not attached to cluster "
                    f"{cluster_uuid}", primaryStorageUuid=ps_uuid,
                    clusterUuid=cluster_uuid) from None
            raise self._in_use(e, ps_uuid, f"detached from cluster {cluster_uuid}") from None
        await self._clean_hosts(ps, done["hostUuids"], done["imageCaches"])
        return PrimaryStorageReply(inventory=await self._inventory(ps_uuid))

    @handles(ReconnectPrimaryStorageMsg)
    async def reconnect(self, msg: ReconnectPrimaryStorageMsg) -> PrimaryStorageReply:
        ps = await self._ps(msg.uuid, "uuid")

        async def run() -> PrimaryStorageReply:
            for ref in await self._query("primaryStorageClusterRef",
                                         f"primaryStorageUuid={ps['uuid']}"):
                for h in await self._cluster_hosts(ref["clusterUuid"]):
                    await self._connect_host(ps, h)
            await self.store.update("primaryStorage", ps["uuid"], {"status": CONNECTED})
            return PrimaryStorageReply(inventory=await self._inventory(ps["uuid"]))

        return await self.serialized(f"ps-{ps['uuid']}", run)

    # --- events ---------------------------------------------------------------------------

    def _on_host_status(self, event: HostStatusChangedEvent) -> None:
        if event.new_status == CONNECTED:
            self.background(Deferred.fromCoroutine(self._host_connected(event.host_uuid)),
                            f"preparing primary storage on host {event.host_uuid}")

    async def _host_connected(self, host_uuid: str) -> None:
        """
        Initialise / mount, on a host that connected, the storages attached to its cluster
        that this node owns (Note [owner node]).
        """
        host = await self.store.get("host", host_uuid)
        if host is None or not host.get("clusterUuid"):
            return
        refs = await self._query("primaryStorageClusterRef",
                                 f"clusterUuid={host['clusterUuid']}")
        for ref in refs:
            ps_uuid = ref["primaryStorageUuid"]
            if not self._mine(ps_uuid):
                continue

            async def run(ps_uuid: str = ps_uuid) -> None:
                ps = await self.store.get("primaryStorage", ps_uuid)
                if ps is None:
                    return
                # Still attached (a detach may have run meanwhile)?
                if not await self._query("primaryStorageClusterRef",
                                         f"primaryStorageUuid={ps_uuid}",
                                         f"clusterUuid={host['clusterUuid']}"):
                    return
                await self._connect_host(ps, host_uuid)

            self.background(self.serialized(f"ps-{ps_uuid}", run),
                            f"preparing primary storage {ps_uuid} on host {host_uuid}")

    def _on_host_deleted(self, event: HostDeletedEvent) -> None:
        self.background(Deferred.fromCoroutine(self._host_deleted(event)),
                        f"forgetting host {event.host_uuid}")

    async def _host_deleted(self, event: HostDeletedEvent) -> None:
        """
        The host's refs went with it (cascade): recompute the totals of the LocalStorages
        this node owns.
        """
        for ps in await self._query("primaryStorage", f"type={LOCAL_STORAGE_TYPE}"):
            if self._mine(ps["uuid"]):
                await self.serialized(f"ps-{ps['uuid']}",
                                      lambda u=ps["uuid"]: self.store.recompute_local_storage(u))

    def _on_image_deleted(self, event: ImageDeletedEvent) -> None:
        self.background(Deferred.fromCoroutine(self._image_deleted(event.image_uuid)),
                        f"dropping the caches of image {event.image_uuid}")

    async def _image_deleted(self, image_uuid: str) -> None:
        """
        Drop the caches of a deleted image on the storages this node owns (agent delete
        best effort, capacity given back), those no volume references: a referenced one
        goes when its last volume's bits are deleted (L{_release_cache_refs}).
        """
        for cache in await self._query("imageCache", f"imageUuid={image_uuid}"):
            ps_uuid = cache["primaryStorageUuid"]
            if not self._mine(ps_uuid):
                continue
            key = self._cache_key(ps_uuid, cache["hostUuid"], image_uuid)
            await self.serialized(key, lambda c=cache: self._drop_cache(c))

    async def _drop_cache(self, cache: dict[str, Any]) -> None:
        """
        Delete an unreferenced cache's row and capacity (atomically checking that no volume
        references it), then its bits (agent, best effort).
        """
        if not await self.store.delete_image_cache(cache["uuid"], unreferenced_only=True):
            return
        ps = await self.store.get("primaryStorage", cache["primaryStorageUuid"])
        if ps is not None and cache["installUrl"]:
            try:
                host = await self._bits_host(ps, cache["hostUuid"])
            except OperationError:
                host = None
            if host is not None:
                await self._best_effort(self._delete_bits(ps, host, cache["installUrl"]),
                                        "deleting an image cache")

    # --- capacity -------------------------------------------------------------------------

    @handles(AllocatePrimaryStorageMsg)
    async def allocate(self, msg: AllocatePrimaryStorageMsg) -> AllocatePrimaryStorageReply:
        size = validate.size(msg.size, "size", 0)
        holder = (validate.name(msg.holder_type, "holderType", 64),
                  validate.uuid(msg.holder_uuid, "holderUuid"))
        host_uuid = None
        if msg.required_host_uuid is not None:
            host_uuid = validate.uuid(msg.required_host_uuid, "requiredHostUuid")
            await self.must_get("host", host_uuid, PS.NOT_FOUND, field="requiredHostUuid")
        if msg.required_primary_storage_uuid is not None:
            candidates = [await self._ps(msg.required_primary_storage_uuid,
                                         "requiredPrimaryStorageUuid")]
        elif host_uuid is not None:
            host = await self.must_get("host", host_uuid, PS.NOT_FOUND,
                                       field="requiredHostUuid")
            refs = await self._query("primaryStorageClusterRef",
                                     f"clusterUuid={host['clusterUuid']}")
            candidates = await self._query(
                "primaryStorage", f"uuid?={','.join(r['primaryStorageUuid'] for r in refs)}"
            ) if refs else []
        else:
            raise validate.invalid("requiredPrimaryStorageUuid", None,
                                   "or requiredHostUuid must be given")
        reasons: dict[str, str] = {}
        for ps in sorted(candidates, key=lambda r: r["uuid"]):
            local = ps["type"] == LOCAL_STORAGE_TYPE
            try:
                self._check_usable(ps)
                if local and host_uuid is None:
                    raise validate.invalid("requiredHostUuid", None,
                                           f"is needed for LocalStorage {ps['uuid']}")
                await self.store.reserve_primary_storage_capacity(
                    ps["uuid"], size, holder, host_uuid if local else None)
            except OperationError as e:
                if len(candidates) == 1:
                    raise self._capacity_error(e, ps["uuid"]) from None
                reasons[ps["uuid"]] = f"{e.error.code}: {e.error.details}"
                continue
            return AllocatePrimaryStorageReply(primary_storage_uuid=ps["uuid"],
                                               host_uuid=host_uuid if local else None,
                                               size=size)
        raise OperationError.of(
            PS.CAPACITY, f"no primary storage has {size} bytes for {holder[0]} {holder[1]}"
            f" ({len(candidates)} candidate(s))", size=size, reasons=reasons)

    def _capacity_error(self, e: OperationError, ps_uuid: str) -> OperationError:
        if e.error.code == DB.STORAGE_CAPACITY:
            return OperationError(error_code(PS.CAPACITY, e.error.details, e.error,
                                             primaryStorageUuid=ps_uuid))
        if e.error.code == SYS.RESOURCE_NOT_FOUND:
            return OperationError(error_code(PS.NOT_FOUND, e.error.details, e.error,
                                             primaryStorageUuid=ps_uuid))
        return e

    @handles(ReturnPrimaryStorageCapacityMsg)
    async def return_capacity(self, msg: ReturnPrimaryStorageCapacityMsg
                              ) -> PrimaryStorageReply:
        holder = (validate.name(msg.holder_type, "holderType", 64),
                  validate.uuid(msg.holder_uuid, "holderUuid"))
        await self._ps(msg.primary_storage_uuid)
        row = await self.store.release_primary_storage_capacity(msg.primary_storage_uuid,
                                                                holder)
        return PrimaryStorageReply(inventory=row)

    # --- image cache ----------------------------------------------------------------------

    def _cache_key(self, ps_uuid: str, host_uuid: str | None, image_uuid: str) -> str:
        return f"ps-cache-{ps_uuid}-{host_uuid or 'shared'}-{image_uuid}"

    async def _volume_host(self, ps: dict[str, Any], host_uuid: str | None) -> str:
        """
        The host that works on C{ps}: LocalStorage, the given one (it must have a ref);
        NFS, the given one or the first Connected host that mounts it.
        """
        if ps["type"] == LOCAL_STORAGE_TYPE:
            if host_uuid is None:
                raise validate.invalid("hostUuid", None,
                                       f"is needed for LocalStorage {ps['uuid']}")
            validate.uuid(host_uuid, "hostUuid")
            if not await self._query("localStorageHostRef", f"primaryStorageUuid={ps['uuid']}",
                                     f"hostUuid={host_uuid}"):
                raise OperationError.of(
                    PS.WRONG_STATE, f"LocalStorage {ps['uuid']} is not on host {host_uuid}",
                    primaryStorageUuid=ps["uuid"], hostUuid=host_uuid)
            return host_uuid
        return await self._bits_host(ps, host_uuid)

    async def _bits_host(self, ps: dict[str, Any], host_uuid: Any) -> str:
        if host_uuid is not None:
            host_uuid = validate.uuid(host_uuid, "hostUuid")
        if ps["type"] == LOCAL_STORAGE_TYPE:
            if host_uuid is None:
                raise validate.invalid("hostUuid", None, "is needed for LocalStorage")
            return host_uuid
        if host_uuid is not None:
            # One ref, not every host's: this runs for every volume a VM creates.
            refs = await self._query("primaryStorageHostRef",
                                     f"primaryStorageUuid={ps['uuid']}",
                                     f"hostUuid={host_uuid}", f"status={CONNECTED}")
        else:
            refs = await self._query("primaryStorageHostRef",
                                     f"primaryStorageUuid={ps['uuid']}", f"status={CONNECTED}")
        mounted = sorted(r["hostUuid"] for r in refs)
        if host_uuid is not None:
            if host_uuid not in mounted:
                raise OperationError.of(
                    PS.WRONG_STATE, f"NFS primary storage {ps['uuid']} is not mounted on host"
                    f" {host_uuid}", primaryStorageUuid=ps["uuid"], hostUuid=host_uuid)
            return host_uuid
        hosts = await self._query("host", f"uuid?={','.join(mounted)}",
                                  f"status={CONNECTED}") if mounted else []
        if not hosts:
            raise OperationError.of(
                PS.WRONG_STATE, f"no Connected host mounts NFS primary storage {ps['uuid']}",
                primaryStorageUuid=ps["uuid"])
        return sorted(h["uuid"] for h in hosts)[0]

    async def _ensure_cache(self, ps: dict[str, Any], host_uuid: str, image: dict[str, Any],
                            volume_uuid: str | None = None) -> tuple[dict[str, Any], bool]:
        """
        The image's cache row, Ready (Note [one download]); with C{volume_uuid}, the
        volume's reference to it recorded in the same chain (so that a drop of the cache
        queued behind sees it). Also whether this call recorded the reference.
        """
        cache_host = host_uuid if ps["type"] == LOCAL_STORAGE_TYPE else None
        key = self._cache_key(ps["uuid"], cache_host, image["uuid"])

        async def run() -> tuple[dict[str, Any], bool]:
            cache = await self._fill_cache(ps, host_uuid, cache_host, image)
            if volume_uuid is None:
                return cache, False
            try:
                added = await self.store.add_image_cache_volume_ref(cache["uuid"], volume_uuid)
            except OperationError as e:
                if e.error.code != SYS.RESOURCE_NOT_FOUND:
                    raise
                raise OperationError(error_code(
                    PS.DOWNLOAD_ERROR, f"the cache of image {image['uuid']} on primary storage"
                    f" {ps['uuid']} went away", e.error, primaryStorageUuid=ps["uuid"],
                    imageUuid=image["uuid"], hostUuid=host_uuid)) from None
            return cache, added

        return await self.serialized(key, run)

    async def _image_gone(self, image_uuid: str) -> bool:
        """
        Whether an image is deleted: no row, or status C{Deleted}.
        """
        row = await self.store.get("image", image_uuid)
        return row is None or row["status"] == "Deleted"

    async def _fill_cache(self, ps: dict[str, Any], host_uuid: str, cache_host: str | None,
                          image: dict[str, Any]) -> dict[str, Any]:
        """
        Note [one download]: the cache row, Ready, downloading it first if needed. A new
        cache of a deleted image is refused (C{PS.1008} naming C{imageUuid}): an instantiate
        racing with the image's deletion would leave it for good. A cache row that went
        during the download (its host removed) fails with C{PS.1008} naming the host, the
        downloaded bits deleted (best effort).
        """
        conditions = [f"primaryStorageUuid={ps['uuid']}", f"imageUuid={image['uuid']}",
                      f"hostUuid={cache_host}" if cache_host else "hostUuid is null"]
        rows = await self._query("imageCache", *conditions)
        if rows and rows[0]["status"] == "Ready":
            return rows[0]
        install = self._cache_path(ps, image["uuid"])
        if rows:
            cache = rows[0]  # a download cut short (a restart): try again
        else:
            if await self._image_gone(image["uuid"]):
                raise OperationError.of(
                    PS.DOWNLOAD_ERROR, f"image {image['uuid']} is deleted: not caching it on"
                    f" primary storage {ps['uuid']}", primaryStorageUuid=ps["uuid"],
                    imageUuid=image["uuid"])
            try:
                cache = await self.store.create_image_cache({
                    "uuid": uuidlib.uuid4().hex, "primaryStorageUuid": ps["uuid"],
                    "hostUuid": cache_host, "imageUuid": image["uuid"], "installUrl": install,
                    "mediaType": image["mediaType"], "size": image["actualSize"],
                    "status": "Downloading"})
            except OperationError as e:
                raise OperationError(error_code(
                    PS.DOWNLOAD_ERROR, f"no room for image {image['uuid']} in the cache of"
                    f" primary storage {ps['uuid']}", e.error, primaryStorageUuid=ps["uuid"],
                    imageUuid=image["uuid"])) from None
        try:
            if ps["type"] == LOCAL_STORAGE_TYPE:
                await self._agent(host_uuid, "/localstorage/sftp/download",
                                  p.LocalStorageDownloadCmd(
                                      storage_path=ps["url"], image_uuid=image["uuid"],
                                      primary_storage_install_path=install,
                                      backup_storage_install_path=image["installPath"],
                                      backup_storage_hostname=image["backupStorageHostname"],
                                      size=image["size"], actual_size=image["actualSize"]))
            else:
                await self._agent(host_uuid, "/nfsprimarystorage/downloadfromsftpbackupstorage",
                                  p.NfsDownloadCmd(
                                      **self._nfs(ps), image_uuid=image["uuid"],
                                      primary_storage_install_path=install,
                                      backup_storage_install_path=image["installPath"],
                                      backup_storage_hostname=image["backupStorageHostname"],
                                      size=image["size"], actual_size=image["actualSize"]))
        except OperationError as e:
            await self.store.delete_image_cache(cache["uuid"])
            raise OperationError(error_code(
                PS.DOWNLOAD_ERROR, f"cannot download image {image['uuid']} to primary storage"
                f" {ps['uuid']}", e.error, primaryStorageUuid=ps["uuid"],
                imageUuid=image["uuid"], hostUuid=host_uuid)) from None
        try:
            return await self.store.update("imageCache", cache["uuid"], {"status": "Ready"})
        except OperationError as e:
            if e.error.code != SYS.RESOURCE_NOT_FOUND:
                raise
        # The row went meanwhile (RemoveHostFromPrimaryStorage / detach forgot the host).
        await self._best_effort(self._delete_bits(ps, host_uuid, install),
                                "deleting an orphaned image cache")
        raise OperationError.of(
            PS.DOWNLOAD_ERROR, f"host {host_uuid} left primary storage {ps['uuid']} while"
            f" image {image['uuid']} was downloaded to it", primaryStorageUuid=ps["uuid"],
            imageUuid=image["uuid"], hostUuid=host_uuid)

    @handles(DownloadImageToPrimaryStorageCacheMsg)
    async def download_to_cache(self, msg: DownloadImageToPrimaryStorageCacheMsg
                                ) -> ImageCacheReply:
        image = _image_spec(msg.image)
        ps = await self._ps(msg.primary_storage_uuid)
        self._check_usable(ps)
        host_uuid = await self._volume_host(ps, msg.host_uuid)
        cache, _ = await self._ensure_cache(ps, host_uuid, image)
        return ImageCacheReply(inventory=cache)

    # --- volumes --------------------------------------------------------------------------

    @handles(InstantiateRootVolumeFromTemplateOnPrimaryStorageMsg)
    async def instantiate(self, msg: InstantiateRootVolumeFromTemplateOnPrimaryStorageMsg
                          ) -> InstantiateVolumeOnPrimaryStorageReply:
        image = _image_spec(msg.image)
        volume_uuid = validate.uuid(msg.volume_uuid, "volumeUuid")
        size = image["size"] if msg.size is None else validate.size(msg.size, "size")
        ps = await self._ps(msg.primary_storage_uuid)
        self._check_usable(ps)
        host_uuid = await self._volume_host(ps, msg.host_uuid)
        cache, ref_added = await self._ensure_cache(ps, host_uuid, image, volume_uuid)
        install = self._volume_path(ps, "rootVolumes", volume_uuid)
        cmd: p.Message
        if ps["type"] == LOCAL_STORAGE_TYPE:
            path, cmd = "/localstorage/volume/createvolumefromcache", \
                p.LocalStorageCreateVolumeFromCacheCmd(
                    storage_path=ps["url"], volume_uuid=volume_uuid,
                    template_path_in_cache=cache["installUrl"], install_url=install,
                    virtual_size=size)
        else:
            path = "/nfsprimarystorage/sftp/createvolumefromtemplate"
            cmd = p.NfsCreateRootVolumeCmd(
                **self._nfs(ps), volume_uuid=volume_uuid,
                template_path_in_cache=cache["installUrl"], install_url=install,
                virtual_size=size)
        try:
            return await self._create_volume(ps, host_uuid, volume_uuid, size, path, cmd)
        except Exception:
            if ref_added:  # no volume of this call references the cache
                await self._release_cache_refs(ps["uuid"], volume_uuid, cache["uuid"])
            raise

    @handles(InstantiateVolumeOnPrimaryStorageMsg)
    async def create_empty(self, msg: InstantiateVolumeOnPrimaryStorageMsg
                           ) -> InstantiateVolumeOnPrimaryStorageReply:
        volume_uuid = validate.uuid(msg.volume_uuid, "volumeUuid")
        size = validate.size(msg.size, "size")
        ps = await self._ps(msg.primary_storage_uuid)
        self._check_usable(ps)
        host_uuid = await self._volume_host(ps, msg.host_uuid)
        install = self._volume_path(ps, "dataVolumes", volume_uuid)
        if ps["type"] == LOCAL_STORAGE_TYPE:
            path, cmd = "/localstorage/volume/createempty", p.LocalStorageCreateEmptyVolumeCmd(
                storage_path=ps["url"], volume_uuid=volume_uuid, install_url=install,
                size=size)
        else:
            path, cmd = "/nfsprimarystorage/createemptyvolume", p.NfsCreateEmptyVolumeCmd(
                **self._nfs(ps), volume_uuid=volume_uuid, install_url=install, size=size)
        return await self._create_volume(ps, host_uuid, volume_uuid, size, path, cmd)

    async def _create_volume(self, ps: dict[str, Any], host_uuid: str, volume_uuid: str,
                             size: int, path: str, cmd: p.Message
                             ) -> InstantiateVolumeOnPrimaryStorageReply:
        """
        Reserve C{size} for the volume, then create it on the agent; a failure gives back
        the reservation if this call made it. Idempotent per volume uuid (a resend after a
        lost reply): when the volume already holds C{size} there (on that host) the agent
        is asked again, and answers that the volume exists with that size (ZStack's agents
        do for a retried command). C{PS.1009} naming C{volumeUuid} when the volume holds
        another size or host, or the agent fails; C{PS.1007} short.
        """
        local = ps["type"] == LOCAL_STORAGE_TYPE
        holder = (VOLUME_HOLDER, volume_uuid)
        try:
            _, inserted = await self.store.reserve_primary_storage_capacity_reporting(
                ps["uuid"], size, holder, host_uuid if local else None)
        except OperationError as e:
            if e.error.code == DB.DUPLICATE:
                held = e.error.opaque.get("held") or {}
                raise OperationError(error_code(
                    PS.VOLUME_ERROR, f"volume {volume_uuid} already holds {held.get('size')}"
                    f" bytes of primary storage {ps['uuid']} (host {held.get('host_uuid')}),"
                    f" not {size}", e.error, primaryStorageUuid=ps["uuid"],
                    volumeUuid=volume_uuid, held=held)) from None
            raise self._capacity_error(e, ps["uuid"]) from None
        try:
            rsp = await self._agent(host_uuid, path, cmd)
            if rsp.install_path is None or (rsp.size and rsp.size != size):
                raise OperationError.of(
                    PS.HOST_ERROR, f"{path} on host {host_uuid} answered volume"
                    f" {rsp.install_path} of {rsp.size} bytes, not {size}", hostUuid=host_uuid,
                    path=path)
        except OperationError as e:
            if inserted:
                await self.store.release_primary_storage_capacity(ps["uuid"], holder)
            raise OperationError(error_code(
                PS.VOLUME_ERROR, f"cannot create volume {volume_uuid} on primary storage "
                f"{ps['uuid']}", e.error, primaryStorageUuid=ps["uuid"],
                volumeUuid=volume_uuid)) from None
        return InstantiateVolumeOnPrimaryStorageReply(
            primary_storage_uuid=ps["uuid"], host_uuid=host_uuid,
            install_path=rsp.install_path, size=size)

    async def _release_cache_refs(self, ps_uuid: str, volume_uuid: str,
                                  cache_uuid: str | None = None) -> None:
        """
        Forget a volume's references to image caches; a cache left unreferenced whose
        image is deleted is dropped (ZStack's C{ImageCacheVolumeRefVO} cleanup).
        """
        for cache in await self.store.remove_image_cache_volume_refs(ps_uuid, volume_uuid,
                                                                     cache_uuid):
            if await self._image_gone(cache["imageUuid"]):
                key = self._cache_key(ps_uuid, cache["hostUuid"], cache["imageUuid"])
                await self.serialized(key, lambda c=cache: self._drop_cache(c))

    async def _delete_bits(self, ps: dict[str, Any], host_uuid: str, install_path: str
                           ) -> None:
        if ps["type"] == LOCAL_STORAGE_TYPE:
            await self._agent(host_uuid, "/localstorage/delete", p.LocalStorageDeleteCmd(
                storage_path=ps["url"], path=install_path))
        else:
            await self._agent(host_uuid, "/nfsprimarystorage/delete", p.NfsDeleteCmd(
                **self._nfs(ps), install_path=install_path))

    @handles(DeleteVolumeBitsOnPrimaryStorageMsg)
    async def delete_volume_bits(self, msg: DeleteVolumeBitsOnPrimaryStorageMsg
                                 ) -> PrimaryStorageReply:
        """
        Delete through the agent, then give the volume's capacity back (an agent failure
        keeps it held and fails with C{PS.1006}).
        """
        volume_uuid = validate.uuid(msg.volume_uuid, "volumeUuid")
        install = validate.optional_text(msg.install_path, "installPath")
        if install is not None and not install.strip():
            raise validate.invalid("installPath", msg.install_path, "must not be empty")
        volume_type = validate.one_of(msg.volume_type, "volumeType", ("Root", "Data"))
        ps = await self._ps(msg.primary_storage_uuid)
        if install is None:
            kind = "rootVolumes" if volume_type == "Root" else "dataVolumes"
            install = self._volume_path(ps, kind, volume_uuid)
        host_uuid = (None if msg.host_uuid is None
                     else validate.uuid(msg.host_uuid, "hostUuid"))
        if ps["type"] == LOCAL_STORAGE_TYPE and host_uuid is None:
            held = [h for h in await self.store.primary_storage_holders(ps["uuid"])
                    if h["holderType"] == VOLUME_HOLDER and h["holderUuid"] == volume_uuid]
            host_uuid = held[0]["hostUuid"] if held else None
        host_uuid = await self._bits_host(ps, host_uuid)
        await self._delete_bits(ps, host_uuid, install)
        row = await self.store.release_primary_storage_capacity(ps["uuid"],
                                                                (VOLUME_HOLDER, volume_uuid))
        await self._release_cache_refs(ps["uuid"], volume_uuid)
        return PrimaryStorageReply(inventory=row)


def make(node: Any) -> PrimaryStorageService:
    """
    The primary storage service of C{node}.
    """
    return PrimaryStorageService(node.reactor, node.bus, node.store)
