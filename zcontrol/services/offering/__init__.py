"""
The offering service: instance and disk offerings (ZStack's C{InstanceOfferingVO},
C{DiskOfferingVO}) on the bus.
"""

from zcontrol.services.offering.messages import (
    DISK_ALLOCATOR_STRATEGIES,
    HOST_ALLOCATOR_STRATEGIES,
    INSTANCE_OFFERING_TYPES,
    MIN_DISK_SIZE,
    MIN_MEMORY_SIZE,
    OFFERING,
    SERVICE_ID,
    ChangeDiskOfferingStateMsg,
    ChangeInstanceOfferingStateMsg,
    CreateDiskOfferingMsg,
    CreateInstanceOfferingMsg,
    DeleteDiskOfferingMsg,
    DeleteInstanceOfferingMsg,
    DiskOfferingReply,
    InstanceOfferingReply,
    UpdateDiskOfferingMsg,
    UpdateInstanceOfferingMsg,
)
from zcontrol.services.offering.service import OfferingService, make

__all__ = [
    "DISK_ALLOCATOR_STRATEGIES",
    "HOST_ALLOCATOR_STRATEGIES",
    "INSTANCE_OFFERING_TYPES",
    "MIN_DISK_SIZE",
    "MIN_MEMORY_SIZE",
    "OFFERING",
    "SERVICE_ID",
    "ChangeDiskOfferingStateMsg",
    "ChangeInstanceOfferingStateMsg",
    "CreateDiskOfferingMsg",
    "CreateInstanceOfferingMsg",
    "DeleteDiskOfferingMsg",
    "DeleteInstanceOfferingMsg",
    "DiskOfferingReply",
    "InstanceOfferingReply",
    "OfferingService",
    "UpdateDiskOfferingMsg",
    "UpdateInstanceOfferingMsg",
    "make",
]
