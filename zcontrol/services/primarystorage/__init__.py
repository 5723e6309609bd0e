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
    CreateEmptyVolumeMsg,
    DeletePrimaryStorageMsg,
    DeleteVolumeBitsOnPrimaryStorageMsg,
    DetachPrimaryStorageFromClusterMsg,
    DownloadImageToPrimaryStorageCacheMsg,
    ImageCacheReply,
    InstantiateVolumeMsg,
    PrimaryStorageReply,
    ReconnectPrimaryStorageMsg,
    RemoveHostFromPrimaryStorageMsg,
    ReturnPrimaryStorageCapacityMsg,
    UpdatePrimaryStorageMsg,
    VolumeOnPrimaryStorageReply,
)
from zcontrol.services.primarystorage.service import PrimaryStorageService, make

__all__ = [
    "AddLocalPrimaryStorageMsg",
    "AddNfsPrimaryStorageMsg",
    "AllocatePrimaryStorageMsg",
    "AllocatePrimaryStorageReply",
    "AttachPrimaryStorageToClusterMsg",
    "ChangePrimaryStorageStateMsg",
    "CreateEmptyVolumeMsg",
    "DeletePrimaryStorageMsg",
    "DeleteVolumeBitsOnPrimaryStorageMsg",
    "DetachPrimaryStorageFromClusterMsg",
    "DownloadImageToPrimaryStorageCacheMsg",
    "ImageCacheReply",
    "InstantiateVolumeMsg",
    "PS",
    "PrimaryStorageReply",
    "PrimaryStorageService",
    "ReconnectPrimaryStorageMsg",
    "RemoveHostFromPrimaryStorageMsg",
    "ReturnPrimaryStorageCapacityMsg",
    "SERVICE_ID",
    "UpdatePrimaryStorageMsg",
    "VolumeOnPrimaryStorageReply",
    "make",
]
