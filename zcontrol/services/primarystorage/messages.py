# -*- test-case-name: tests.test_primary_storage -*-
"""
The primary storage service's bus messages and events (ZStack's C{APIAdd*PrimaryStorageMsg},
C{APIAttachPrimaryStorageToClusterMsg}, ... without C{API}, and the internal messages of
C{PrimaryStorageBase}: C{AllocatePrimaryStorageMsg}, C{InstantiateVolumeOnPrimaryStorageMsg},
...). Every message about one storage is sent with C{resource_uuid} = the storage's uuid.

Sizes are bytes. An image spec
(L{InstantiateRootVolumeFromTemplateOnPrimaryStorageMsg.image}) is a dict with camelCase keys:
C{uuid}, C{size} (virtual), C{actualSize} (bytes to copy; default C{size}), C{format},
C{mediaType}, and where to copy it from: C{backupStorageUuid}, C{installPath} (on the backup
storage), C{backupStorageHostname}.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from zcontrol.bus.message import NeedReplyMessage, Reply, registry
from zcontrol.core.errors import register_codes

__all__ = [
    "PS",
    "SERVICE_ID",
    "AddLocalPrimaryStorageMsg",
    "AddNfsPrimaryStorageMsg",
    "AllocatePrimaryStorageMsg",
    "AllocatePrimaryStorageReply",
    "AttachPrimaryStorageToClusterMsg",
    "ChangePrimaryStorageStateMsg",
    "InstantiateVolumeOnPrimaryStorageMsg",
    "DeletePrimaryStorageMsg",
    "DeleteVolumeBitsOnPrimaryStorageMsg",
    "DetachPrimaryStorageFromClusterMsg",
    "DownloadImageToPrimaryStorageCacheMsg",
    "ImageCacheReply",
    "InstantiateRootVolumeFromTemplateOnPrimaryStorageMsg",
    "PrimaryStorageReply",
    "ReconnectPrimaryStorageMsg",
    "RemoveHostFromPrimaryStorageMsg",
    "ReturnPrimaryStorageCapacityMsg",
    "UpdatePrimaryStorageMsg",
    "InstantiateVolumeOnPrimaryStorageReply",
]

#: The bus service id of the primary storage service (ZStack: C{storage.primary}).
SERVICE_ID = "storage.primary"

LOCAL_STORAGE_TYPE = "LocalStorage"
NFS_TYPE = "NFS"


class PS:
    """
    The primary storage service's error codes (ZStack's C{PS} prefix).
    """

    _codes = register_codes(
        "PS",
        {
            1000: "Unable to add the primary storage",
            1001: "Unable to attach the primary storage to the cluster",
            1002: "Unable to detach the primary storage from the cluster",
            1003: "No such primary storage",
            1004: "The primary storage is in use",
            1005: "The primary storage is not in a state that allows this",
            1006: "A storage command on a host failed",
            1007: "Not enough primary storage capacity",
            1008: "Unable to download the image to the primary storage's cache",
            1009: "Unable to create the volume on the primary storage",
        },
    )
    ADD_ERROR = _codes[1000]
    ATTACH_ERROR = _codes[1001]
    DETACH_ERROR = _codes[1002]
    NOT_FOUND = _codes[1003]
    IN_USE = _codes[1004]
    WRONG_STATE = _codes[1005]
    HOST_ERROR = _codes[1006]
    CAPACITY = _codes[1007]
    DOWNLOAD_ERROR = _codes[1008]
    VOLUME_ERROR = _codes[1009]


@registry.register
@attrs.define(kw_only=True)
class PrimaryStorageReply(Reply):
    """
    A reply carrying the storage's inventory (its row plus C{attachedClusterUuids}).
    """

    inventory: dict[str, Any] | None = None


@registry.register
@attrs.define(kw_only=True)
class AddLocalPrimaryStorageMsg(NeedReplyMessage):
    """
    Add a LocalStorage (ZStack C{APIAddLocalPrimaryStorageMsg}): C{url} is the absolute
    directory on each host's disk (C{/zstack_ps}). The storage is Connected with zero
    capacity until attached to a cluster. C{SYS.1007} naming the field; C{PS.1003} for an
    unknown zone.
    """

    reply_type: ClassVar[type[Reply]] = PrimaryStorageReply

    name: str
    zone_uuid: str
    url: str
    uuid: str | None = None
    description: str | None = None


@registry.register
@attrs.define(kw_only=True)
class AddNfsPrimaryStorageMsg(NeedReplyMessage):
    """
    Add an NFS primary storage (ZStack C{APIAddNfsPrimaryStorageMsg}): C{url} is
    C{server:/export}; C{mount_path} where the hosts mount it (default
    C{/opt/zstack/nfsprimarystorage/prim-<uuid>}). Connected, zero capacity until attached.
    """

    reply_type: ClassVar[type[Reply]] = PrimaryStorageReply

    name: str
    zone_uuid: str
    url: str
    mount_path: str | None = None
    uuid: str | None = None
    description: str | None = None


@registry.register
@attrs.define(kw_only=True)
class AttachPrimaryStorageToClusterMsg(NeedReplyMessage):
    """
    Attach a storage to a cluster of its zone: LocalStorage initialises every Connected host
    of the cluster (capacity per host), NFS mounts on every one (capacity of the export).
    If a host fails, everything done is undone and the reply fails with C{PS.1001}.
    Refused: another cluster's zone, already attached, a second LocalStorage on the cluster.
    """

    reply_type: ClassVar[type[Reply]] = PrimaryStorageReply

    primary_storage_uuid: str
    cluster_uuid: str


@registry.register
@attrs.define(kw_only=True)
class DetachPrimaryStorageFromClusterMsg(NeedReplyMessage):
    """
    Detach a storage from a cluster: unmount (NFS) / forget (LocalStorage: with the image
    caches and the capacity of those hosts). Refused with C{PS.1004} naming the holders
    while volumes hold capacity on the cluster's hosts (LocalStorage) or on the storage when
    the cluster is its last (NFS).
    """

    reply_type: ClassVar[type[Reply]] = PrimaryStorageReply

    primary_storage_uuid: str
    cluster_uuid: str


@registry.register
@attrs.define(kw_only=True)
class DeletePrimaryStorageMsg(NeedReplyMessage):
    """
    Delete a storage with its image caches. Refused with C{PS.1004} while it is attached to
    clusters (details C{clusterUuids}) or volumes hold capacity (details C{holders}).
    """

    reply_type: ClassVar[type[Reply]] = Reply

    uuid: str


@registry.register
@attrs.define(kw_only=True)
class ChangePrimaryStorageStateMsg(NeedReplyMessage):
    """
    C{state_event}: C{enable} (Enabled), C{disable} (Disabled: no new volumes), C{maintain}
    (Maintenance).
    """

    reply_type: ClassVar[type[Reply]] = PrimaryStorageReply

    uuid: str
    state_event: str


@registry.register
@attrs.define(kw_only=True)
class ReconnectPrimaryStorageMsg(NeedReplyMessage):
    """
    Initialise / mount again on every Connected host of the attached clusters and refresh
    the capacity (idempotent). C{PS.1006} when a host fails.
    """

    reply_type: ClassVar[type[Reply]] = PrimaryStorageReply

    uuid: str


@registry.register
@attrs.define(kw_only=True)
class UpdatePrimaryStorageMsg(NeedReplyMessage):
    """
    Change the name or description (None: unchanged).
    """

    reply_type: ClassVar[type[Reply]] = PrimaryStorageReply

    uuid: str
    name: str | None = None
    description: str | None = None


@registry.register
@attrs.define(kw_only=True)
class AllocatePrimaryStorageReply(Reply):
    """
    Where the capacity was reserved.
    """

    primary_storage_uuid: str | None = None
    host_uuid: str | None = None
    size: int = 0


@registry.register
@attrs.define(kw_only=True)
class AllocatePrimaryStorageMsg(NeedReplyMessage):
    """
    Reserve C{size} bytes for a holder (ZStack C{AllocatePrimaryStorageMsg}): on
    C{required_primary_storage_uuid}, else on the first Enabled, Connected storage attached
    to C{required_host_uuid}'s cluster that has room (for LocalStorage, room on that host).
    Idempotent per holder. C{PS.1007} when none has room (details per candidate).
    """

    reply_type: ClassVar[type[Reply]] = AllocatePrimaryStorageReply

    size: int
    holder_uuid: str
    holder_type: str = "VolumeVO"
    required_primary_storage_uuid: str | None = None
    required_host_uuid: str | None = None


@registry.register
@attrs.define(kw_only=True)
class ReturnPrimaryStorageCapacityMsg(NeedReplyMessage):
    """
    Give back what a holder holds on a storage (ZStack C{ReturnPrimaryStorageCapacityMsg});
    nothing held is fine.
    """

    reply_type: ClassVar[type[Reply]] = PrimaryStorageReply

    primary_storage_uuid: str
    holder_uuid: str
    holder_type: str = "VolumeVO"


@registry.register
@attrs.define(kw_only=True)
class InstantiateVolumeOnPrimaryStorageReply(Reply):
    """
    A volume's bits on a primary storage: C{install_path}, C{size} (bytes), the host they
    are on (LocalStorage) or were created through (NFS).
    """

    primary_storage_uuid: str | None = None
    host_uuid: str | None = None
    install_path: str | None = None
    size: int = 0


@registry.register
@attrs.define(kw_only=True)
class InstantiateRootVolumeFromTemplateOnPrimaryStorageMsg(NeedReplyMessage):
    """
    Create a root volume from an image (ZStack C{InstantiateRootVolumeFromTemplateOnPrimary
    StorageMsg}): ensure the image is in the storage's cache (one download however many ask
    at once), reserve C{size} (default the image's size; holder C{("VolumeVO",
    volume_uuid)}) and create the volume on the cache. LocalStorage needs C{host_uuid}; NFS
    uses it or any host that mounts the storage. The volumes table is not written here. The
    volume's reference to the cache is recorded (ZStack's C{ImageCacheVolumeRefVO}): the
    cache outlives its image's deletion until the last such volume's bits are deleted.
    Idempotent per volume uuid (a resend after a lost reply answers the existing volume).
    C{PS.1008} when the image is deleted and not cached, or the host left during the
    download.

    @ivar image: the image spec (module docstring).
    """

    reply_type: ClassVar[type[Reply]] = InstantiateVolumeOnPrimaryStorageReply

    primary_storage_uuid: str
    volume_uuid: str
    image: dict[str, Any]
    host_uuid: str | None = None
    size: int | None = None


@registry.register
@attrs.define(kw_only=True)
class InstantiateVolumeOnPrimaryStorageMsg(NeedReplyMessage):
    """
    Create an empty (data) volume of C{size} bytes (holder C{("VolumeVO", volume_uuid)};
    ZStack's C{InstantiateVolumeOnPrimaryStorageMsg}, which creates an empty volume unless
    it is the root-from-template subclass). Idempotent per volume uuid: a resend with the
    same size answers the existing volume; another size is C{PS.1009} naming C{volumeUuid}.
    """

    reply_type: ClassVar[type[Reply]] = InstantiateVolumeOnPrimaryStorageReply

    primary_storage_uuid: str
    volume_uuid: str
    size: int
    host_uuid: str | None = None


@registry.register
@attrs.define(kw_only=True)
class DeleteVolumeBitsOnPrimaryStorageMsg(NeedReplyMessage):
    """
    Delete a volume's bits (ZStack C{DeleteVolumeBitsOnPrimaryStorageMsg}) and give back its
    capacity. LocalStorage: on the host holding it (or C{host_uuid}).

    @ivar install_path: the volume's path; None: the path this service gives a volume of
        C{volume_type} (C{Root} or C{Data}) it created, so that a caller that never learnt
        the path (its create was interrupted) can still delete what may exist there.
    """

    reply_type: ClassVar[type[Reply]] = PrimaryStorageReply

    primary_storage_uuid: str
    volume_uuid: str
    install_path: str | None = None
    host_uuid: str | None = None
    volume_type: str = "Root"


@registry.register
@attrs.define(kw_only=True)
class ImageCacheReply(Reply):
    """
    The image cache entry (its row, C{Ready}).
    """

    inventory: dict[str, Any] | None = None


@registry.register
@attrs.define(kw_only=True)
class DownloadImageToPrimaryStorageCacheMsg(NeedReplyMessage):
    """
    Ensure an image is in the storage's cache (on C{host_uuid} for LocalStorage), as
    L{InstantiateRootVolumeFromTemplateOnPrimaryStorageMsg} does first. C{PS.1008} when the
    download fails (no cache row and
    no capacity left held; the next request tries again).
    """

    reply_type: ClassVar[type[Reply]] = ImageCacheReply

    primary_storage_uuid: str
    image: dict[str, Any]
    host_uuid: str | None = None


@registry.register
@attrs.define(kw_only=True)
class RemoveHostFromPrimaryStorageMsg(NeedReplyMessage):
    """
    A host is about to be deleted: drop what the primary storage keeps on it (its NFS mount
    record; for LocalStorage its image caches and its share of the storage's capacity).
    Refused while volumes are on the host's local storage (the error names them). Sent by
    the host service with C{resource_uuid} = C{primary_storage_uuid}, for every primary
    storage attached to the host's cluster (ZStack's C{RemoveHostFromLocalStorageMsg}).
    """

    reply_type: ClassVar[type[Reply]] = Reply

    primary_storage_uuid: str
    host_uuid: str
