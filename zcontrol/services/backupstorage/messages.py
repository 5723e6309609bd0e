# -*- test-case-name: tests.test_backup_storage -*-
"""
The backup storage service's bus messages and events (ZStack's C{APIAddSftpBackupStorageMsg},
C{APIAttachBackupStorageToZoneMsg}, ..., and the internal C{DownloadImageMsg} and
C{DeleteBitsOnBackupStorageMsg}). Send a message about one backup storage with
C{resource_uuid} = its uuid.

A backup storage's C{hostname} names its agent: an agent base URL
(C{http://127.0.0.1:7171/hosts/3}) or a bare IP or host name (then
C{http://<hostname>:<agent port>}, 7171 by default, ZStack's Sftp agent port).
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from zcontrol.bus.message import Event, NeedReplyMessage, Reply, registry
from zcontrol.core.errors import register_codes

__all__ = [
    "BS",
    "SERVICE_ID",
    "SFTP_BACKUP_STORAGE_TYPE",
    "AddSftpBackupStorageMsg",
    "AttachBackupStorageToZoneMsg",
    "BackupStorageDeletedEvent",
    "BackupStorageReply",
    "ChangeBackupStorageStateMsg",
    "DeleteBackupStorageMsg",
    "DeleteBitsOnBackupStorageMsg",
    "DetachBackupStorageFromZoneMsg",
    "DownloadImageMsg",
    "DownloadImageReply",
    "ReconnectBackupStorageMsg",
    "UpdateBackupStorageMsg",
]

#: The bus service id of the backup storage service (ZStack: C{storage.backup}).
SERVICE_ID = "storage.backup"
#: ZStack's C{SftpBackupStorageConstant.SFTP_BACKUP_STORAGE_TYPE}.
SFTP_BACKUP_STORAGE_TYPE = "SftpBackupStorage"


class BS:
    """
    The backup storage service's error codes.
    """

    _codes = register_codes(
        "BS",
        {
            1000: "Unable to add the backup storage",
            1001: "Unable to connect the backup storage",
            1002: "The backup storage is not usable in its current status or state",
            1003: "No such backup storage",
            1004: "A backup storage with the same hostname already exists",
            1005: "Unable to attach the backup storage to the zone",
            1006: "The backup storage is not attached to the zone",
            1007: "Unable to download the image to the backup storage",
            1008: "Unable to delete bits on the backup storage",
            1009: "Unable to delete the backup storage",
        },
    )
    ADD_ERROR = _codes[1000]
    CONNECT_ERROR = _codes[1001]
    WRONG_STATUS = _codes[1002]
    NOT_FOUND = _codes[1003]
    DUPLICATE_HOSTNAME = _codes[1004]
    ATTACH_ERROR = _codes[1005]
    NOT_ATTACHED = _codes[1006]
    DOWNLOAD_ERROR = _codes[1007]
    DELETE_BITS_ERROR = _codes[1008]
    DELETE_ERROR = _codes[1009]


@registry.register
@attrs.define(kw_only=True)
class BackupStorageReply(Reply):
    """
    A reply carrying the backup storage's inventory (its row plus C{attachedZoneUuids}; None
    after a delete).
    """

    inventory: dict[str, Any] | None = None


@registry.register
@attrs.define(kw_only=True)
class AddSftpBackupStorageMsg(NeedReplyMessage):
    """
    Add an Sftp backup storage and connect it (ZStack's C{APIAddSftpBackupStorageMsg}); if it
    cannot be connected it is removed again and the reply fails with C{BS.1000} (cause: the
    connect's C{BS.1001}). C{url} is the storage path on the agent (C{/zstack_bs});
    C{password} is accepted and never stored. A C{hostname} naming the agent of an existing
    backup storage (in any spelling) fails with C{BS.1004}; bad fields with C{SYS.1007}.
    """

    reply_type: ClassVar[type[Reply]] = BackupStorageReply

    name: str
    url: str
    hostname: str
    username: str = "root"
    password: str | None = None
    ssh_port: int = 22
    description: str | None = None
    uuid: str | None = None
    type: str = SFTP_BACKUP_STORAGE_TYPE


@registry.register
@attrs.define(kw_only=True)
class AttachBackupStorageToZoneMsg(NeedReplyMessage):
    """
    Attach a backup storage to a zone (C{BS.1005} when already attached; the zone must
    exist: C{SYS.1003} naming C{zoneUuid}).
    """

    reply_type: ClassVar[type[Reply]] = BackupStorageReply

    zone_uuid: str
    backup_storage_uuid: str


@registry.register
@attrs.define(kw_only=True)
class DetachBackupStorageFromZoneMsg(NeedReplyMessage):
    """
    Detach a backup storage from a zone (C{BS.1006} when it is not attached to it).
    """

    reply_type: ClassVar[type[Reply]] = BackupStorageReply

    zone_uuid: str
    backup_storage_uuid: str


@registry.register
@attrs.define(kw_only=True)
class DeleteBackupStorageMsg(NeedReplyMessage):
    """
    Delete a backup storage: its image refs are dropped (through the image service: images
    left with no copy become C{Deleted}), it is detached from every zone, its row deleted and
    its agent forgotten; a L{BackupStorageDeletedEvent} follows. Refused (C{BS.1009}) while an
    image is downloading to it.
    """

    reply_type: ClassVar[type[Reply]] = BackupStorageReply

    uuid: str


@registry.register
@attrs.define(kw_only=True)
class ChangeBackupStorageStateMsg(NeedReplyMessage):
    """
    C{state_event} C{enable} or C{disable} (ZStack's C{BackupStorageStateEvent}): a Disabled
    backup storage takes no new image.
    """

    reply_type: ClassVar[type[Reply]] = BackupStorageReply

    uuid: str
    state_event: str


@registry.register
@attrs.define(kw_only=True)
class ReconnectBackupStorageMsg(NeedReplyMessage):
    """
    Reconnect a backup storage (echo, a fresh callback secret, its capacity): C{Connected},
    or C{Disconnected} and C{BS.1001}.
    """

    reply_type: ClassVar[type[Reply]] = BackupStorageReply

    uuid: str


@registry.register
@attrs.define(kw_only=True)
class UpdateBackupStorageMsg(NeedReplyMessage):
    """
    Change a backup storage's name, description, username or ssh port (ZStack's
    C{APIUpdateSftpBackupStorageMsg}; a None field is left as it is; a password is
    accepted and not stored).
    """

    reply_type: ClassVar[type[Reply]] = BackupStorageReply

    uuid: str
    name: str | None = None
    description: str | None = None
    username: str | None = None
    password: str | None = None
    ssh_port: int | None = None


@registry.register
@attrs.define(kw_only=True)
class DownloadImageReply(Reply):
    """
    Where the image landed (C{install_path}) and its sizes (bytes): C{size} virtual,
    C{actual_size} on disk.
    """

    install_path: str | None = None
    size: int = 0
    actual_size: int = 0
    md5sum: str | None = None
    format: str | None = None


@registry.register
@attrs.define(kw_only=True)
class DownloadImageMsg(NeedReplyMessage):
    """
    Download an image to a Connected, Enabled backup storage (ZStack's C{DownloadImageMsg},
    sent by the image service). Fails with C{BS.1007} whose C{opaque["reason"]} is the
    agent's reason (and the capacity the agent reported is stored all the same), C{BS.1002}
    when the backup storage is not Connected and Enabled, C{BS.1003} when unknown.
    """

    reply_type: ClassVar[type[Reply]] = DownloadImageReply

    backup_storage_uuid: str
    image_uuid: str
    url: str
    format: str | None = None
    media_type: str = "RootVolumeTemplate"


@registry.register
@attrs.define(kw_only=True)
class DeleteBitsOnBackupStorageMsg(NeedReplyMessage):
    """
    Delete the bits at C{install_path} on a backup storage (ZStack's
    C{DeleteBitsOnBackupStorageMsg}); C{BS.1002} when it is not Connected, C{BS.1008} when the
    agent failed.
    """

    reply_type: ClassVar[type[Reply]] = Reply

    backup_storage_uuid: str
    install_path: str


@registry.register
@attrs.define(kw_only=True)
class BackupStorageDeletedEvent(Event):
    """
    A backup storage was deleted (its row is gone).
    """

    topic: ClassVar[str] = "backupstorage.deleted"

    backup_storage_uuid: str
