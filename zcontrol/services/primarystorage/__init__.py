"""
The primary storage service: LocalStorage and NFS primary storage served through the KVM
agents of the hosts, image caches, volumes on storage, capacity.
"""

from zcontrol.services.primarystorage.messages import (
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
from zcontrol.services.primarystorage.service import PrimaryStorageService, make

__all__ = [
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
    "PS",
    "PrimaryStorageReply",
    "PrimaryStorageService",
    "ReconnectPrimaryStorageMsg",
    "RemoveHostFromPrimaryStorageMsg",
    "ReturnPrimaryStorageCapacityMsg",
    "SERVICE_ID",
    "UpdatePrimaryStorageMsg",
    "InstantiateVolumeOnPrimaryStorageReply",
    "make",
]
