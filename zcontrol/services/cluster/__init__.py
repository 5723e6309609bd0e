"""
The cluster service: KVM clusters (ZStack's C{ClusterVO}) on the bus.
"""

from zcontrol.services.cluster.messages import (
    CLUSTER,
    HYPERVISOR_TYPES,
    SERVICE_ID,
    ChangeClusterStateMsg,
    ClusterDeletedEvent,
    ClusterReply,
    ClusterStateChangedEvent,
    CreateClusterMsg,
    DeleteClusterMsg,
    UpdateClusterMsg,
)
from zcontrol.services.cluster.service import ClusterService, make

__all__ = [
    "CLUSTER",
    "HYPERVISOR_TYPES",
    "SERVICE_ID",
    "ChangeClusterStateMsg",
    "ClusterDeletedEvent",
    "ClusterReply",
    "ClusterService",
    "ClusterStateChangedEvent",
    "CreateClusterMsg",
    "DeleteClusterMsg",
    "UpdateClusterMsg",
    "make",
]
