# -*- test-case-name: tests.test_backup_storage -*-
"""
The backup storage service (C{storage.backup}): Sftp backup storages, served by the
C{sftpbackupstorage} agent plugin, on the bus.

 - B{add}: a L{FlowChain} C{add-backup-storage}: C{insert-backup-storage} (C{Connecting}),
   then C{connect-backup-storage}; a failing connect deletes the row again and forgets the
   callback secret, and the add fails with C{BS.1000} (as the host service's add).
 - B{connect}: the agent is connected exactly as a host's: echo until it answers (at most
   C{connect_timeout}), C{/host/connect} with a fresh callback secret and the backup
   storage's uuid as the "host uuid" (L{zcontrol.agentclient.AgentClient.connect}), then
   C{/sftpbackupstorage/connect} with the storage path (its C{url}), whose capacity is
   stored; C{Connected}, or C{Disconnected} and C{BS.1001}.
 - B{capacity}: every agent response carries the storage's capacity (bytes); it is stored
   after each one, failed ones included.
 - B{commands}: C{DownloadImageMsg} and C{DeleteBitsOnBackupStorageMsg} run on a Connected
   backup storage (downloads also need it Enabled), in parallel; operations that change the
   backup storage (add, attach, detach, state, update, reconnect, delete) run one at a time
   per backup storage (C{bs-<uuid>}).

Note [add on the owner]: the messages about a backup storage are routed to its owner node
(C{resource_uuid}), where its chain C{bs-<uuid>} runs; so the add too: its uuid is chosen
first (C{uuid}, or a fresh one), a node that is not the owner forwards the message to it
(with C{resource_uuid} = the uuid), and the insert and connect run in the chain. A delete
(or reconnect, attach, ...) sent meanwhile waits for the add's outcome instead of removing
the row under its connect.

Note [one backup storage per agent]: as for hosts (Note [one host per agent] in
L{zcontrol.services.host.service}), two backup storages may not share an agent, however its
address is spelt: the add compares the canonical agent URL of C{hostname} with every backup
storage's (C{BS.1004}), before and after its insert.

Note [install paths]: as ZStack's Sftp backup storage, the management node chooses where an
image goes: C{<url>/rootVolumeTemplates/<image uuid>/<image uuid>.template},
C{<url>/dataVolumeTemplates/...template} or C{<url>/iso/<image uuid>/<image uuid>.iso}.
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.logger import Logger

from agent import protocol as p
from zcontrol.bus.message import new_id
from zcontrol.core.errors import SYS, OperationError, error_code
from zcontrol.core.flow import FlowChain, flow
from zcontrol.db.interfaces import DB
from zcontrol.db.query import Condition, Query
from zcontrol.services import validate
from zcontrol.services.backupstorage.messages import (
    BS,
    SERVICE_ID,
    SFTP_BACKUP_STORAGE_TYPE,
    AddSftpBackupStorageMsg,
    AttachBackupStorageToZoneMsg,
    BackupStorageDeletedEvent,
    BackupStorageReply,
    ChangeBackupStorageStateMsg,
    DeleteBackupStorageMsg,
    DeleteBitsOnBackupStorageMsg,
    DetachBackupStorageFromZoneMsg,
    DownloadImageMsg,
    DownloadImageReply,
    ReconnectBackupStorageMsg,
    UpdateBackupStorageMsg,
)
from zcontrol.services.base import Service, handles, succeeds_if_gone
from zcontrol.services.host.service import agent_base_url, canonical_agent_url
from zcontrol.services.inventory import inventory, register_inventory

__all__ = ["BackupStorageConfig", "BackupStorageService", "install_path", "make"]

log = Logger()

CONNECTING, CONNECTED, DISCONNECTED = "Connecting", "Connected", "Disconnected"
_STATE_EVENTS = {"enable": "Enabled", "disable": "Disabled"}
_DIRS = {"RootVolumeTemplate": ("rootVolumeTemplates", "template"),
         "DataVolumeTemplate": ("dataVolumeTemplates", "template"),
         "ISO": ("iso", "iso")}


@attrs.frozen
class BackupStorageConfig:
    """
    Backup storage service settings (seconds; ports).

    @ivar agent_port: the agent port a bare C{hostname} means (ZStack's Sftp agent: 7171).
    @ivar download_timeout: how long an image download may take (ZStack: 3 hours).
    """

    agent_port: int = 7171
    connect_timeout: float = 60.0
    echo_interval: float = 2.0
    echo_timeout: float = 5.0
    command_timeout: float = 300.0
    download_timeout: float = 3 * 3600.0
    page_size: int = 1000


def install_path(url: str, image_uuid: str, media_type: str) -> str:
    """
    Where an image goes on a backup storage whose storage path is C{url} (Note [install
    paths]).
    """
    directory, ext = _DIRS.get(media_type, _DIRS["RootVolumeTemplate"])
    return f"{url.rstrip('/')}/{directory}/{image_uuid}/{image_uuid}.{ext}"


@register_inventory("backupStorage", ("attachedZoneUuids",))
async def _expand_backup_storages(store: Any, rows: list[dict[str, Any]]
                                  ) -> list[dict[str, Any]]:
    uuids = [r["uuid"] for r in rows]
    refs = await store.query("backupStorageZoneRef", Query(
        conditions=[Condition("backupStorageUuid", "?=", uuids)],
        fields=["backupStorageUuid", "zoneUuid"], sort="zoneUuid", limit=100_000))
    zones: dict[str, list[str]] = {u: [] for u in uuids}
    for ref in refs.inventories:
        zones[ref["backupStorageUuid"]].append(ref["zoneUuid"])
    for r in rows:
        r["attachedZoneUuids"] = zones[r["uuid"]]
    return rows


def _hostname_error(hostname: Any) -> OperationError:
    return validate.invalid("hostname", hostname, "must be an IP address, a host name or an "
                            "agent base URL (scheme://host[:port][/hosts/<id>])")


class BackupStorageService(Service):
    """
    The backup storage service on one management node.
    """

    service_id = SERVICE_ID

    def __init__(self, clock: Any, bus: Any, store: Any, agents: Any,
                 config: BackupStorageConfig = BackupStorageConfig(), **kwargs: Any) -> None:
        super().__init__(clock, bus, store, **kwargs)
        self.agents = agents
        self.config = config

    # --- helpers --------------------------------------------------------------------------

    def _base(self, row: dict[str, Any]) -> str:
        return agent_base_url(row["hostname"], self.config.agent_port)

    def _canonical(self, hostname: str) -> str:
        try:
            return canonical_agent_url(hostname, self.config.agent_port)
        except OperationError:
            raise _hostname_error(hostname) from None

    async def _get(self, uuid: Any, field: str = "uuid") -> dict[str, Any]:
        return await self.must_get("backupStorage", uuid, BS.NOT_FOUND, field=field)

    async def _inventory(self, uuid: str) -> dict[str, Any] | None:
        return await inventory(self.store, "backupStorage", uuid)

    async def _reply(self, uuid: str) -> BackupStorageReply:
        return BackupStorageReply(inventory=await self._inventory(uuid))

    async def _set_status(self, uuid: str, status: str) -> dict[str, Any]:
        return await self.store.update("backupStorage", uuid, {"status": status})

    async def _store_capacity(self, uuid: str, rsp: Any) -> None:
        """
        Store the capacity an agent response reports (if it reports one); a backup storage
        deleted meanwhile is no error. The writes of one backup storage run one at a time in
        the order the responses came (chain C{bs-capacity-<uuid>}): concurrent writes could
        complete in any order, and the last would not be the agent's latest figure.
        """
        total, available = rsp.total_capacity, rsp.available_capacity
        if total is None or available is None:
            return

        async def write() -> None:
            try:
                await self.store.update("backupStorage", uuid, {
                    "totalCapacity": total, "availableCapacity": max(0, min(available, total))})
            except OperationError as e:
                if e.error.code != SYS.RESOURCE_NOT_FOUND:
                    raise

        await self.serialized(f"bs-capacity-{uuid}", write)

    async def _taken(self, canonical: str, uuid: str) -> None:
        """
        C{BS.1004} when a backup storage other than C{uuid}, or a host, is at the agent
        C{canonical} (L{zcontrol.services.agenturls}: one agent address, one resource).
        """
        from zcontrol.services.agenturls import resources_at

        for kind, row in await resources_at(self.store, canonical, self.config.page_size,
                                            {"backupStorage": self.config.agent_port}):
            if kind == "backupStorage" and row["uuid"] != uuid:
                raise OperationError.of(
                    BS.DUPLICATE_HOSTNAME,
                    f"hostname {row['hostname']!r} of backup storage {row['uuid']} "
                    f"({row['name']!r}) names the same agent {canonical}",
                    field="hostname", existingBackupStorageUuid=row["uuid"],
                    agentUrl=canonical)
            if kind == "host":
                raise OperationError.of(
                    BS.DUPLICATE_HOSTNAME,
                    f"hostname names the agent {canonical} of host {row['uuid']} "
                    f"({row['name']!r}, managementIp {row['managementIp']!r}); one agent "
                    "address serves one host or backup storage",
                    field="hostname", existingHostUuid=row["uuid"], agentUrl=canonical)

    # --- add and connect ------------------------------------------------------------------

    @handles(AddSftpBackupStorageMsg)
    async def add(self, msg: AddSftpBackupStorageMsg) -> BackupStorageReply:
        """
        Insert and connect (see the module docstring); C{BS.1000} when the connect fails.
        Runs on the backup storage's owner node, in its chain (Note [add on the owner]).
        """
        name = validate.name(msg.name)
        description = validate.optional_text(msg.description, "description")
        url = validate.name(msg.url, "url", 2048)
        if not url.startswith("/") or any(c.isspace() for c in url):
            raise validate.invalid("url", msg.url, "must be an absolute path on the backup "
                                   "storage")
        if not isinstance(msg.hostname, str):
            raise _hostname_error(msg.hostname)
        canonical = self._canonical(msg.hostname)
        username = validate.name(msg.username, "username")
        validate.optional_text(msg.password, "password", 255)
        ssh_port = validate.integer(msg.ssh_port, "sshPort", 1, 65535)
        validate.one_of(msg.type, "type", [SFTP_BACKUP_STORAGE_TYPE])
        uuid = validate.uuid(msg.uuid, "uuid") if msg.uuid is not None else uuidlib.uuid4().hex
        if msg.resource_uuid != uuid and self.bus.owner_of(uuid) != self.bus.node_id:
            forwarded = attrs.evolve(msg, id=new_id(), uuid=uuid, resource_uuid=uuid,
                                     deadline=None, timeout=None, reply_to=None)
            return await self.send(forwarded, timeout=self.config.connect_timeout
                                   + self.config.command_timeout + self.send_timeout)
        base = agent_base_url(msg.hostname, self.config.agent_port)

        async def insert(ctx: dict[str, Any]) -> None:
            await self._taken(canonical, uuid)
            await self.store.insert("backupStorage", {
                "uuid": uuid, "name": name, "description": description, "url": url,
                "type": SFTP_BACKUP_STORAGE_TYPE, "hostname": msg.hostname,
                "username": username, "sshPort": ssh_port, "status": CONNECTING})
            ctx["inserted"] = True
            await self._taken(canonical, uuid)

        async def uninsert(ctx: dict[str, Any]) -> None:
            if ctx.get("inserted"):
                await self.store.delete("backupStorage", uuid)

        async def connect(ctx: dict[str, Any]) -> None:
            await self._connect(uuid)

        def forget(ctx: dict[str, Any]) -> None:
            self.agents.forget(base, f"adding backup storage {uuid} failed")

        chain = FlowChain("add-backup-storage", [
            flow("insert-backup-storage", insert, uninsert),
            flow("connect-backup-storage", connect, forget),
        ])
        try:
            await self.serialized(f"bs-{uuid}", lambda: chain.run({}))
        except OperationError as e:
            err = e.error
            cause = err.cause if err.cause is not None and err.location else err
            if not err.opaque.get("rollback_errors") and cause.code in (
                    BS.DUPLICATE_HOSTNAME, SYS.INVALID_ARGUMENT_ERROR, DB.DUPLICATE):
                raise OperationError(cause) from None
            raise OperationError(error_code(
                BS.ADD_ERROR, f"cannot add backup storage {name!r}", cause,
                backupStorageUuid=uuid)) from None
        return await self._reply(uuid)

    @handles(ReconnectBackupStorageMsg)
    async def reconnect(self, msg: ReconnectBackupStorageMsg) -> BackupStorageReply:
        """
        Reconnect (C{BS.1001} on failure, the backup storage then C{Disconnected}).
        """
        await self._get(msg.uuid)
        await self.serialized(f"bs-{msg.uuid}", lambda: self._connect(msg.uuid))
        return await self._reply(msg.uuid)

    async def _connect(self, uuid: str) -> dict[str, Any]:
        row = await self._get(uuid)
        base = self._base(row)
        await self._set_status(uuid, CONNECTING)
        try:
            await self._echo_until_up(base)
            await self.agents.connect(base, uuid, timeout=self.config.echo_timeout * 2)
            rsp = await self.agents.call(
                base, p.SftpConnectCmd(uuid=uuid, storage_path=row["url"]),
                timeout=self.config.command_timeout, raise_on_failure=False)
            await self._store_capacity(uuid, rsp)
            if not rsp.success:
                raise OperationError.of(SYS.OPERATION_ERROR,
                                        f"{base}/sftpbackupstorage/connect: {rsp.error}",
                                        reason=rsp.error)
        except OperationError as e:
            await self._set_status(uuid, DISCONNECTED)
            raise OperationError(error_code(
                BS.CONNECT_ERROR, f"cannot connect backup storage {uuid} at {base}", e.error,
                backupStorageUuid=uuid)) from None
        return await self._set_status(uuid, CONNECTED)

    async def _echo_until_up(self, base: str) -> None:
        from zcontrol.services.agenturls import echo_until_up

        await echo_until_up(self.clock, self.agents, base, what=f"backup storage at {base}",
                            connect_timeout=self.config.connect_timeout,
                            echo_interval=self.config.echo_interval,
                            echo_timeout=self.config.echo_timeout,
                            setting="backup storage connect_timeout")

    # --- zones ----------------------------------------------------------------------------

    @handles(AttachBackupStorageToZoneMsg)
    async def attach(self, msg: AttachBackupStorageToZoneMsg) -> BackupStorageReply:
        """
        Attach to a zone: C{BS.1005} when already attached.
        """
        await self._get(msg.backup_storage_uuid, "backupStorageUuid")
        await self.must_get("zone", msg.zone_uuid, SYS.RESOURCE_NOT_FOUND, field="zoneUuid")

        async def attach() -> None:
            try:
                await self.store.insert("backupStorageZoneRef", {
                    "uuid": uuidlib.uuid4().hex, "backupStorageUuid": msg.backup_storage_uuid,
                    "zoneUuid": msg.zone_uuid})
            except OperationError as e:
                if e.error.code == DB.DUPLICATE:
                    raise OperationError.of(
                        BS.ATTACH_ERROR, f"backup storage {msg.backup_storage_uuid} is "
                        f"already attached to zone {msg.zone_uuid}",
                        backupStorageUuid=msg.backup_storage_uuid,
                        zoneUuid=msg.zone_uuid) from None
                if e.error.code == DB.REFERENCE:
                    raise OperationError.of(
                        SYS.RESOURCE_NOT_FOUND, f"no zone {msg.zone_uuid} (or backup storage "
                        f"{msg.backup_storage_uuid}) any more", field="zoneUuid",
                        uuid=msg.zone_uuid) from None
                raise

        await self.serialized(f"bs-{msg.backup_storage_uuid}", attach)
        return await self._reply(msg.backup_storage_uuid)

    @handles(DetachBackupStorageFromZoneMsg)
    async def detach(self, msg: DetachBackupStorageFromZoneMsg) -> BackupStorageReply:
        """
        Detach from a zone: C{BS.1006} when not attached to it.
        """
        await self._get(msg.backup_storage_uuid, "backupStorageUuid")
        validate.uuid(msg.zone_uuid, "zoneUuid")

        async def detach() -> None:
            if not await self.store.detach_backup_storage(msg.backup_storage_uuid,
                                                          msg.zone_uuid):
                raise OperationError.of(
                    BS.NOT_ATTACHED, f"backup storage {msg.backup_storage_uuid} is not "
                    f"attached to zone {msg.zone_uuid}",
                    backupStorageUuid=msg.backup_storage_uuid, zoneUuid=msg.zone_uuid)

        await self.serialized(f"bs-{msg.backup_storage_uuid}", detach)
        return await self._reply(msg.backup_storage_uuid)

    # --- state, update, delete ------------------------------------------------------------

    @handles(ChangeBackupStorageStateMsg)
    async def change_state(self, msg: ChangeBackupStorageStateMsg) -> BackupStorageReply:
        """
        C{enable} / C{disable}.
        """
        event = validate.one_of(msg.state_event, "stateEvent", _STATE_EVENTS)
        await self._get(msg.uuid)
        await self.serialized(f"bs-{msg.uuid}", lambda: self.store.update(
            "backupStorage", msg.uuid, {"state": _STATE_EVENTS[event]}))
        return await self._reply(msg.uuid)

    @handles(UpdateBackupStorageMsg)
    async def update(self, msg: UpdateBackupStorageMsg) -> BackupStorageReply:
        """
        Change the given fields.
        """
        changes: dict[str, Any] = validate.common_changes(msg)
        if msg.username is not None:
            changes["username"] = validate.name(msg.username, "username")
        if msg.ssh_port is not None:
            changes["sshPort"] = validate.integer(msg.ssh_port, "sshPort", 1, 65535)
        validate.optional_text(msg.password, "password", 255)
        await self._get(msg.uuid)
        if changes:
            await self.serialized(f"bs-{msg.uuid}", lambda: self.store.update(
                "backupStorage", msg.uuid, changes))
        return await self._reply(msg.uuid)

    @handles(DeleteBackupStorageMsg)
    @succeeds_if_gone(BS.NOT_FOUND)
    async def delete(self, msg: DeleteBackupStorageMsg) -> BackupStorageReply:
        """
        Drop its image refs (image service), detach it, delete it, forget its agent.
        """
        from zcontrol.services.image.messages import SERVICE_ID as IMAGE_SERVICE
        from zcontrol.services.image.messages import DeleteImageRefsOnBackupStorageMsg

        row = await self._get(msg.uuid)

        async def delete() -> None:
            try:
                await self.send(DeleteImageRefsOnBackupStorageMsg(
                    service_id=IMAGE_SERVICE, resource_uuid=msg.uuid,
                    backup_storage_uuid=msg.uuid))
                await self.store.delete_backup_storage(msg.uuid)
            except OperationError as e:
                raise OperationError(error_code(
                    BS.DELETE_ERROR, f"cannot delete backup storage {msg.uuid}", e.error,
                    backupStorageUuid=msg.uuid)) from None
            self.agents.forget(self._base(row), f"backup storage {msg.uuid} was deleted")
            self.publish(BackupStorageDeletedEvent(backup_storage_uuid=msg.uuid))

        await self.serialized(f"bs-{msg.uuid}", delete)
        return BackupStorageReply(inventory=None)

    # --- commands -------------------------------------------------------------------------

    async def _usable(self, uuid: str, need_enabled: bool) -> dict[str, Any]:
        row = await self._get(uuid, "backupStorageUuid")
        if row["status"] != CONNECTED or (need_enabled and row["state"] != "Enabled"):
            raise OperationError.of(
                BS.WRONG_STATUS, f"backup storage {uuid} is {row['status']} and "
                f"{row['state']}", backupStorageUuid=uuid, status=row["status"],
                state=row["state"])
        if self.agents.secret_for(self._base(row)) is None:
            row = await self._take_over(uuid)
        return row

    async def _take_over(self, uuid: str) -> dict[str, Any]:
        """
        Note [take over]: a Connected backup storage whose callback secret this node does not
        hold was connected by another node (this one took it over when that node left the
        ring, or restarted): reconnect it from here first (once, in its chain C{bs-<uuid>}),
        so that commands are signed with a secret this node agreed and their callbacks come
        here. C{BS.1001} when that fails.
        """
        async def reconnect() -> dict[str, Any]:
            row = await self._get(uuid, "backupStorageUuid")
            if self.agents.secret_for(self._base(row)) is not None:
                return row  # a reconnect queued before this one did it
            log.info("backup storage {uuid}: taking it over (no callback secret here); "
                     "reconnecting", uuid=uuid)
            return await self._connect(uuid)

        return await self.serialized(f"bs-{uuid}", reconnect)

    @handles(DownloadImageMsg)
    async def download(self, msg: DownloadImageMsg) -> DownloadImageReply:
        """
        Download an image; C{BS.1007} with the agent's C{reason}.
        """
        from zcontrol.services.image.messages import FORMATS, MEDIA_TYPES

        validate.uuid(msg.image_uuid, "imageUuid")
        url = validate.url(msg.url, "url", ("http", "https", "file", "ftp", "sftp"))
        if msg.format is not None:
            validate.one_of(msg.format, "format", FORMATS)
        validate.one_of(msg.media_type, "mediaType", MEDIA_TYPES)
        row = await self._usable(msg.backup_storage_uuid, need_enabled=True)
        path = install_path(row["url"], msg.image_uuid, msg.media_type)
        cmd = p.SftpDownloadCmd(image_uuid=msg.image_uuid, install_path=path, url=url,
                                url_scheme=urlsplit(url).scheme, format=msg.format,
                                timeout=int(self.config.download_timeout))
        try:
            rsp = await self.agents.call(self._base(row), cmd,
                                         timeout=self.config.download_timeout,
                                         raise_on_failure=False)
        except OperationError as e:
            raise OperationError(error_code(
                BS.DOWNLOAD_ERROR, f"cannot download {url} to backup storage "
                f"{msg.backup_storage_uuid}", e.error, reason=str(e.error),
                backupStorageUuid=msg.backup_storage_uuid)) from None
        await self._store_capacity(msg.backup_storage_uuid, rsp)
        if not rsp.success:
            raise OperationError.of(
                BS.DOWNLOAD_ERROR, f"backup storage {msg.backup_storage_uuid}: {rsp.error}",
                reason=rsp.error, backupStorageUuid=msg.backup_storage_uuid)
        return DownloadImageReply(install_path=rsp.install_path or path, size=rsp.size or 0,
                                  actual_size=rsp.actual_size or 0, md5sum=rsp.md5_sum,
                                  format=rsp.format)

    @handles(DeleteBitsOnBackupStorageMsg)
    async def delete_bits(self, msg: DeleteBitsOnBackupStorageMsg) -> Any:
        """
        Delete bits; C{BS.1008} with the agent's reason.
        """
        from zcontrol.bus.message import Reply

        path = validate.name(msg.install_path, "installPath", 2048)
        row = await self._usable(msg.backup_storage_uuid, need_enabled=False)
        try:
            rsp = await self.agents.call(self._base(row), p.SftpDeleteCmd(install_url=path),
                                         timeout=self.config.command_timeout,
                                         raise_on_failure=False)
        except OperationError as e:
            raise OperationError(error_code(
                BS.DELETE_BITS_ERROR, f"cannot delete {path} on backup storage "
                f"{msg.backup_storage_uuid}", e.error)) from None
        await self._store_capacity(msg.backup_storage_uuid, rsp)
        if not rsp.success:
            raise OperationError.of(
                BS.DELETE_BITS_ERROR, f"backup storage {msg.backup_storage_uuid}: {rsp.error}",
                reason=rsp.error, backupStorageUuid=msg.backup_storage_uuid)
        return Reply()


def make(node: Any) -> BackupStorageService:
    """
    The backup storage service of C{node}.
    """
    return BackupStorageService(node.reactor, node.bus, node.store, node.agents)


