# -*- test-case-name: tests.test_cluster -*-
"""
The cluster service (ZStack's C{ClusterManagerImpl}/C{ClusterBase}): create, update, change
the state of and delete clusters. A cluster's inventory is its row.

Every operation on one cluster runs in the chain C{cluster-<uuid>}; state changes are
compare-and-swaps.

Creating: the zone must exist; an unknown zone is answered with the zone service's own
C{ZONE.1000} naming C{zoneUuid} (the cluster service reads the zone's row, read only, and
maps the store's foreign-key error of a zone deleted meanwhile to the same code). A
disabled zone accepts clusters, as ZStack's does.

Deleting: refused with C{CLUSTER.1001} while hosts (or VMs) are in the cluster. The
cluster's attachments to primary storages and L2 networks are not detached one by one:
their ref rows go with the cluster (C{ON DELETE CASCADE} in the schema), and the cluster
service sends those services nothing; it publishes L{ClusterDeletedEvent} listing what was
attached, for whoever keeps something per attachment.
"""

from __future__ import annotations

from typing import Any

from zcontrol.core.errors import SYS, OperationError
from zcontrol.db.interfaces import DB
from zcontrol.db.query import Condition, Query
from zcontrol.services import validate
from zcontrol.services.base import Service, handles, succeeds_if_gone
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
from zcontrol.services.zone.messages import ZONE
from zcontrol.services.zone.service import new_uuid, refuse_dependents, state_after

__all__ = ["ClusterService", "make"]

#: ZStack's cluster types (C{ClusterConstant.ZSTACK_CLUSTER_TYPE}).
CLUSTER_TYPES = ("zstack",)


class ClusterService(Service):
    """
    The C{cluster} service on one management node.
    """

    service_id = SERVICE_ID

    async def _cluster(self, uuid: Any) -> dict[str, Any]:
        validate.uuid(uuid, "uuid")
        return await self.must_get("cluster", uuid, CLUSTER.NOT_FOUND, field="uuid")

    def _not_found(self, uuid: str) -> OperationError:
        return OperationError.of(CLUSTER.NOT_FOUND, f"no cluster with uuid {uuid}",
                                 resource="cluster", uuid=uuid, field="uuid")

    async def _update(self, uuid: str, changes: dict[str, Any],
                      expected: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            return await self.store.update("cluster", uuid, changes, expected)
        except OperationError as e:
            if e.error.code == SYS.RESOURCE_NOT_FOUND:
                raise self._not_found(uuid) from None
            raise

    @handles(CreateClusterMsg)
    async def create(self, msg: CreateClusterMsg) -> ClusterReply:
        """
        L{CreateClusterMsg}.
        """
        zone_uuid = validate.uuid(msg.zone_uuid, "zoneUuid")
        name = validate.name(msg.name)
        description = validate.optional_text(msg.description, "description")
        hypervisor = validate.one_of(msg.hypervisor_type, "hypervisorType", HYPERVISOR_TYPES)
        ctype = validate.one_of(msg.type, "type", CLUSTER_TYPES)
        uuid = new_uuid() if msg.uuid is None else validate.uuid(msg.uuid, "uuid")

        def zone_not_found() -> OperationError:
            return OperationError.of(ZONE.NOT_FOUND, f"no zone with uuid {zone_uuid}",
                                     resource="zone", uuid=zone_uuid, field="zoneUuid")

        async def create() -> ClusterReply:
            await self.must_get("zone", zone_uuid, ZONE.NOT_FOUND, field="zoneUuid")
            try:
                row = await self.store.insert("cluster", {
                    "uuid": uuid, "name": name, "description": description,
                    "zoneUuid": zone_uuid, "hypervisorType": hypervisor, "type": ctype})
            except OperationError as e:
                if e.error.code == DB.REFERENCE:
                    raise zone_not_found() from None
                if e.error.code == DB.DUPLICATE:
                    raise OperationError.of(CLUSTER.DUPLICATE,
                                            f"a cluster with uuid {uuid} exists",
                                            field="uuid", value=uuid) from None
                raise
            return ClusterReply(inventory=row)

        return await self.serialized(f"cluster-{uuid}", create)

    @handles(UpdateClusterMsg)
    async def update(self, msg: UpdateClusterMsg) -> ClusterReply:
        """
        L{UpdateClusterMsg}: the fields given (not None) change.
        """
        uuid = validate.uuid(msg.uuid, "uuid")
        changes: dict[str, Any] = validate.common_changes(msg)

        async def update() -> ClusterReply:
            row = await self._cluster(uuid)
            if changes:
                row = await self._update(uuid, changes)
            return ClusterReply(inventory=row)

        return await self.serialized(f"cluster-{uuid}", update)

    @handles(ChangeClusterStateMsg)
    async def change_state(self, msg: ChangeClusterStateMsg) -> ClusterReply:
        """
        L{ChangeClusterStateMsg}: a compare-and-swap; the same state is a no-op. Publishes
        L{ClusterStateChangedEvent}.
        """
        uuid = validate.uuid(msg.uuid, "uuid")
        new = state_after(msg.state_event)

        async def change() -> ClusterReply:
            row = await self._cluster(uuid)
            old = row["state"]
            if old == new:
                return ClusterReply(inventory=row)
            row = await self._update(uuid, {"state": new}, {"state": old})
            self.publish(ClusterStateChangedEvent(cluster_uuid=uuid, zone_uuid=row["zoneUuid"],
                                                  old_state=old, new_state=new))
            return ClusterReply(inventory=row)

        return await self.serialized(f"cluster-{uuid}", change)

    async def _attached(self, resource: str, field: str, uuid: str) -> list[str]:
        page = await self.store.query(resource, Query(
            conditions=[Condition("clusterUuid", "=", uuid)], fields=[field], sort=field,
            limit=10_000))
        return [r[field] for r in page.inventories]

    @handles(DeleteClusterMsg)
    @succeeds_if_gone(CLUSTER.NOT_FOUND)
    async def delete(self, msg: DeleteClusterMsg) -> ClusterReply:
        """
        L{DeleteClusterMsg}: refused with C{CLUSTER.1001} naming the hosts (and VMs) in it;
        publishes L{ClusterDeletedEvent}.
        """
        uuid = validate.uuid(msg.uuid, "uuid")

        async def delete() -> ClusterReply:
            row = await self._cluster(uuid)
            storages = await self._attached("primaryStorageClusterRef", "primaryStorageUuid",
                                            uuid)
            l2s = await self._attached("l2NetworkClusterRef", "l2NetworkUuid", uuid)
            try:
                deleted, dependents = await self.store.delete_cluster(uuid)
            except OperationError as e:
                if e.error.code != DB.REFERENCE:
                    raise
                dependents = await self.store.cluster_dependents(uuid)
                raise refuse_dependents(CLUSTER.HAS_DEPENDENTS, "cluster", "clusterUuid",
                                        uuid, dependents, e.error) from None
            if dependents:
                raise refuse_dependents(CLUSTER.HAS_DEPENDENTS, "cluster", "clusterUuid",
                                        uuid, dependents)
            if not deleted:
                raise self._not_found(uuid)
            self.publish(ClusterDeletedEvent(cluster_uuid=uuid, zone_uuid=row["zoneUuid"],
                                             primary_storage_uuids=storages,
                                             l2_network_uuids=l2s))
            return ClusterReply(inventory=None)

        return await self.serialized(f"cluster-{uuid}", delete)


def make(node: Any) -> ClusterService:
    """
    The cluster service of C{node}.
    """
    return ClusterService(node.reactor, node.bus, node.store)
