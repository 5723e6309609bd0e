"""
The host allocator: pure filters and strategies over snapshots read from the store
(L{zcontrol.scheduler.filters}, L{zcontrol.scheduler.strategies}), an atomic reservation in
the store (L{zcontrol.scheduler.allocator}), and the C{host.allocator} bus service
(L{zcontrol.scheduler.service}, L{zcontrol.scheduler.messages}).
"""

from zcontrol.scheduler.messages import (
    ALLOCATOR,
    SERVICE_ID,
    AllocateHostMsg,
    AllocateHostReply,
    HostCapacityReply,
    ReturnHostCapacityMsg,
)
from zcontrol.scheduler.model import AllocationRequest, HostView, PrimaryStorageView, Snapshot

__all__ = [
    "ALLOCATOR",
    "SERVICE_ID",
    "AllocateHostMsg",
    "AllocateHostReply",
    "AllocationRequest",
    "HostCapacityReply",
    "HostView",
    "PrimaryStorageView",
    "ReturnHostCapacityMsg",
    "Snapshot",
]
