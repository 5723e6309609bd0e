# -*- test-case-name: tests.test_image -*-
"""
The image service's bus messages and events (ZStack's C{APIAddImageMsg},
C{APIDeleteImageMsg}, C{APIChangeImageStateMsg}, C{APIUpdateImageMsg}; the selection of a
backup storage for a VM's image, ZStack's C{VmImageSelectBackupStorageFlow}). Send a message
about one image with C{resource_uuid} = its uuid.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from zcontrol.bus.message import Event, NeedReplyMessage, Reply, registry
from zcontrol.core.errors import register_codes

__all__ = [
    "FORMATS",
    "IMAGE",
    "MEDIA_TYPES",
    "PLATFORMS",
    "SERVICE_ID",
    "AddImageMsg",
    "ChangeImageStateMsg",
    "DeleteImageMsg",
    "DeleteImageRefsOnBackupStorageMsg",
    "DeleteImageRefsOnBackupStorageReply",
    "ImageDeletedEvent",
    "ImageReply",
    "SelectBackupStorageMsg",
    "SelectBackupStorageReply",
    "UpdateImageMsg",
]

#: The bus service id of the image service (ZStack: C{image}).
SERVICE_ID = "image"

#: ZStack's C{ImageMediaType}.
MEDIA_TYPES = ("RootVolumeTemplate", "ISO", "DataVolumeTemplate")
#: Image formats (C{iso} only with the C{ISO} media type).
FORMATS = ("qcow2", "raw", "iso")
#: ZStack's C{ImagePlatform}.
PLATFORMS = ("Linux", "Windows", "Other", "Paravirtualization")


class IMAGE:
    """
    The image service's error codes.
    """

    _codes = register_codes(
        "IMAGE",
        {
            1000: "Unable to add the image: no backup storage could download it",
            1001: "No such image",
            1002: "The backup storage cannot take the image",
            1003: "The image is in use",
            1004: "No backup storage holds the image in the zone",
            1005: "The image is not in a status that allows the operation",
        },
    )
    ADD_ERROR = _codes[1000]
    NOT_FOUND = _codes[1001]
    BACKUP_STORAGE_UNUSABLE = _codes[1002]
    IN_USE = _codes[1003]
    NO_BACKUP_STORAGE = _codes[1004]
    WRONG_STATUS = _codes[1005]


@registry.register
@attrs.define(kw_only=True)
class ImageReply(Reply):
    """
    A reply carrying the image's inventory (its row plus C{backupStorageRefs}).
    """

    inventory: dict[str, Any] | None = None


@registry.register
@attrs.define(kw_only=True)
class AddImageMsg(NeedReplyMessage):
    """
    Register an image from C{url} (C{http}, C{https} or C{file}) and download it to each of
    C{backup_storage_uuids} (each Connected, Enabled and attached to a zone) in parallel
    (ZStack's C{APIAddImageMsg}). The image is C{Downloading}, then C{Ready} with C{size}
    and C{actualSize} (bytes) from the agent when one download at least succeeded (the refs
    that failed are removed), else C{Error} (each ref's C{lastError} says the agent's reason)
    and the reply fails with C{IMAGE.1000} whose cause is the first failure (ZStack deletes
    the image then: here it stays, in C{Error}, so the operator sees why; delete it with
    L{DeleteImageMsg}).

    Refusals: C{SYS.1007} naming the field; C{BS.1003} naming an unknown backup storage;
    C{IMAGE.1002} naming a backup storage not Connected, not Enabled or attached to no zone.
    """

    reply_type: ClassVar[type[Reply]] = ImageReply

    name: str
    url: str
    backup_storage_uuids: list[str]
    media_type: str = "RootVolumeTemplate"
    format: str = "qcow2"
    platform: str = "Linux"
    guest_os_type: str | None = None
    system: bool = False
    description: str | None = None
    uuid: str | None = None


@registry.register
@attrs.define(kw_only=True)
class DeleteImageMsg(NeedReplyMessage):
    """
    Delete an image (ZStack's C{APIDeleteImageMsg}): refused (C{IMAGE.1003}, the VMs in
    C{opaque["vmInstanceUuids"]}) while a VM that is not Destroyed uses it as its template;
    else its bits are deleted on each backup storage (one that cannot be reached is logged
    and skipped), its refs and row deleted, and an L{ImageDeletedEvent} published.
    """

    reply_type: ClassVar[type[Reply]] = ImageReply

    uuid: str


@registry.register
@attrs.define(kw_only=True)
class ChangeImageStateMsg(NeedReplyMessage):
    """
    C{state_event} C{enable} or C{disable} (ZStack's C{ImageStateEvent}).
    """

    reply_type: ClassVar[type[Reply]] = ImageReply

    uuid: str
    state_event: str


@registry.register
@attrs.define(kw_only=True)
class UpdateImageMsg(NeedReplyMessage):
    """
    Change an image's name, description, guest OS type, platform or system flag (a None
    field is left as it is).
    """

    reply_type: ClassVar[type[Reply]] = ImageReply

    uuid: str
    name: str | None = None
    description: str | None = None
    guest_os_type: str | None = None
    platform: str | None = None
    system: bool | None = None


@registry.register
@attrs.define(kw_only=True)
class SelectBackupStorageReply(Reply):
    """
    The chosen copy of the image: its backup storage, install path there, the backup
    storage's C{hostname} (its agent) and the image's sizes (bytes).
    """

    backup_storage_uuid: str | None = None
    install_path: str | None = None
    hostname: str | None = None
    size: int = 0
    actual_size: int = 0


@registry.register
@attrs.define(kw_only=True)
class SelectBackupStorageMsg(NeedReplyMessage):
    """
    Choose a backup storage to copy a Ready image from for a VM in C{zone_uuid} (ZStack's
    C{VmImageSelectBackupStorageFlow}): a Connected backup storage attached to the zone that
    holds the image Ready (the one with the most available capacity first).
    C{IMAGE.1005} when the image is not Ready, C{IMAGE.1004} when no backup storage fits.
    """

    reply_type: ClassVar[type[Reply]] = SelectBackupStorageReply

    image_uuid: str
    zone_uuid: str


@registry.register
@attrs.define(kw_only=True)
class DeleteImageRefsOnBackupStorageReply(Reply):
    """
    The images whose copy on the backup storage was dropped, and those of them left with
    no copy at all (now C{Deleted}).
    """

    image_uuids: list[str] = attrs.field(factory=list)
    deleted_image_uuids: list[str] = attrs.field(factory=list)


@registry.register
@attrs.define(kw_only=True)
class DeleteImageRefsOnBackupStorageMsg(NeedReplyMessage):
    """
    A backup storage is being deleted: drop every image's ref on it; an image left with no
    ref becomes C{Deleted} (ZStack's image cascade on a backup storage's deletion). Refused
    (C{IMAGE.1005}) while an image is downloading to it. Sent by the backup storage service.
    """

    reply_type: ClassVar[type[Reply]] = DeleteImageRefsOnBackupStorageReply

    backup_storage_uuid: str


@registry.register
@attrs.define(kw_only=True)
class ImageDeletedEvent(Event):
    """
    An image was deleted: primary storages drop their caches of it.
    """

    topic: ClassVar[str] = "image.deleted"

    image_uuid: str
