# -*- test-case-name: tests.test_cluster -*-
"""
The cluster service's bus messages, replies and events (ZStack's C{APICreateClusterMsg},
C{APIUpdateClusterMsg}, C{APIChangeClusterStateMsg}, C{APIDeleteClusterMsg}, without
C{API}).

Messages about one cluster carry its uuid in C{uuid} and are sent with C{resource_uuid} =
that uuid; L{CreateClusterMsg} with C{resource_uuid} = None or the chosen uuid.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from zcontrol.bus.message import Event, NeedReplyMessage, Reply, registry
from zcontrol.core.errors import register_codes

__all__ = [
    "CLUSTER",
    "HYPERVISOR_TYPES",
    "SERVICE_ID",
    "ChangeClusterStateMsg",
    "ClusterDeletedEvent",
    "ClusterReply",
    "ClusterStateChangedEvent",
    "CreateClusterMsg",
    "DeleteClusterMsg",
    "UpdateClusterMsg",
]

#: The bus service id of the cluster service (ZStack: C{cluster}).
SERVICE_ID = "cluster"

#: The hypervisor types a cluster may have (ZStack also knows Simulator, ESX, ...).
HYPERVISOR_TYPES = ("KVM",)


class CLUSTER:
    """
    The cluster service's error codes.
    """

    _codes = register_codes(
        "CLUSTER",
        {
            1000: "No such cluster",
            1001: "The cluster still has hosts in it",
            1002: "A cluster with the same uuid already exists",
        },
    )
    #: Details: C{resource}, C{uuid}, C{field}.
    NOT_FOUND = _codes[1000]
    #: Details: C{clusterUuid}, C{dependents} (C{{kind: {"count": n, "uuids": [...]}}}).
    HAS_DEPENDENTS = _codes[1001]
    #: Details: C{field} C{uuid}, C{value}.
    DUPLICATE = _codes[1002]


@registry.register
@attrs.define(kw_only=True)
class ClusterReply(Reply):
    """
    A reply carrying the cluster's inventory (its row: C{uuid}, C{name}, C{description},
    C{zoneUuid}, C{hypervisorType}, C{type}, C{state}, C{createDate}, C{lastOpDate}); None
    after a delete.
    """

    inventory: dict[str, Any] | None = None


@registry.register
@attrs.define(kw_only=True)
class CreateClusterMsg(NeedReplyMessage):
    """
    Create a cluster in a zone, C{Enabled}. An unknown zone is the zone service's
    C{ZONE.1000} naming C{zoneUuid}; a hypervisor type other than C{KVM} is C{SYS.1007}
    naming C{hypervisorType}; C{type} is C{zstack} (ZStack's only cluster type).
    """

    reply_type: ClassVar[type[Reply]] = ClusterReply

    zone_uuid: str
    name: str
    hypervisor_type: str = "KVM"
    description: str | None = None
    type: str = "zstack"
    uuid: str | None = None


@registry.register
@attrs.define(kw_only=True)
class UpdateClusterMsg(NeedReplyMessage):
    """
    Change a cluster's name and/or description (None: unchanged).
    """

    reply_type: ClassVar[type[Reply]] = ClusterReply

    uuid: str
    name: str | None = None
    description: str | None = None


@registry.register
@attrs.define(kw_only=True)
class ChangeClusterStateMsg(NeedReplyMessage):
    """
    C{state_event} C{enable} -> C{Enabled}, C{disable} -> C{Disabled}.
    """

    reply_type: ClassVar[type[Reply]] = ClusterReply

    uuid: str
    state_event: str


@registry.register
@attrs.define(kw_only=True)
class DeleteClusterMsg(NeedReplyMessage):
    """
    Delete a cluster without hosts (C{CLUSTER.1001} naming them otherwise); its primary
    storage and L2 network attachments go with it.
    """

    reply_type: ClassVar[type[Reply]] = ClusterReply

    uuid: str


@registry.register
@attrs.define(kw_only=True)
class ClusterStateChangedEvent(Event):
    """
    A cluster's state changed (committed).
    """

    topic: ClassVar[str] = "cluster.state"

    cluster_uuid: str
    zone_uuid: str
    old_state: str
    new_state: str


@registry.register
@attrs.define(kw_only=True)
class ClusterDeletedEvent(Event):
    """
    A cluster was deleted, and with it its attachments to primary storages and L2
    networks (listed, as they were just before).
    """

    topic: ClassVar[str] = "cluster.deleted"

    cluster_uuid: str
    zone_uuid: str
    primary_storage_uuids: list[str] = attrs.field(factory=list)
    l2_network_uuids: list[str] = attrs.field(factory=list)
