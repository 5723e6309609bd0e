# -*- test-case-name: tests.test_l2_network -*-
"""
The L2 network service (bus service id C{network.l2}, ZStack's C{L2NetworkManagerImpl},
C{L2NoVlanNetwork}, C{L2VlanNetwork} and C{L2NetworkApiInterceptor}): NoVlan and Vlan L2
networks of a zone, attached to clusters.

Operations on one L2 network run one at a time under the chain key C{l2-<uuid>}; the
checks that involve other networks (vlan uniqueness, one L2 per interface and vlan in a
cluster) are also enforced by the store (a unique index, a transaction under the cluster's
lock), so they hold across management nodes.

Not done here: realising the bridge and VLAN device on the hosts (ZStack's
C{/network/l2novlan/createbridge} and C{/network/l2vlan/createbridge} agent commands when
an L2 is attached to a cluster or a host connects). The simulated agent has no such command
yet; the VM issue realises the L2 networks of a VM's NICs on its host before starting it.
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Any

from zcontrol.core.errors import OperationError
from zcontrol.db.interfaces import DB
from zcontrol.db.query import Condition, Query
from zcontrol.services import inventory as inv
from zcontrol.services import validate as v
from zcontrol.services.base import Service, handles
from zcontrol.services.network.messages import (
    L2,
    L2_SERVICE_ID,
    AttachL2NetworkToClusterMsg,
    CreateL2NoVlanNetworkMsg,
    CreateL2VlanNetworkMsg,
    DeleteL2NetworkMsg,
    DetachL2NetworkFromClusterMsg,
    L2NetworkReply,
    UpdateL2NetworkMsg,
)

__all__ = ["L2NetworkService", "make", "physical_interface"]

NO_VLAN, VLAN = "L2NoVlanNetwork", "L2VlanNetwork"


def physical_interface(value: Any, field: str = "physicalInterface") -> str:
    """
    A host interface name (C{eth0}, C{bond0}): non-empty, at most 255 characters, no white
    space.

    @raise OperationError: C{SYS.1007} naming C{field}.
    """
    text = v.name(value, field, 255)
    if any(c.isspace() for c in text):
        raise v.invalid(field, value, "must not contain white space")
    return text


@inv.register_inventory("l2Network", ("attachedClusterUuids",))
async def _expand_l2(store: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    ZStack's C{L2NetworkInventory}: the row plus C{attachedClusterUuids} (one batched query).
    """
    clusters = await store.l2_cluster_uuids([r["uuid"] for r in rows])
    for r in rows:
        r["attachedClusterUuids"] = clusters.get(r["uuid"], [])
    return rows


class L2NetworkService(Service):
    """
    The L2 network service on one management node.
    """

    service_id = L2_SERVICE_ID

    async def _reply(self, uuid: str) -> L2NetworkReply:
        return L2NetworkReply(inventory=await inv.inventory(self.store, "l2Network", uuid))

    async def _l2(self, uuid: Any, field: str = "l2NetworkUuid") -> dict[str, Any]:
        return await self.must_get("l2Network", uuid, L2.NOT_FOUND, field=field)

    # --- create -------------------------------------------------------------------------

    @handles(CreateL2NoVlanNetworkMsg, CreateL2VlanNetworkMsg)
    async def create(self, msg: CreateL2NoVlanNetworkMsg | CreateL2VlanNetworkMsg
                     ) -> L2NetworkReply:
        """
        Create an L2 network.

        @raise OperationError: C{SYS.1007} naming a bad field; C{L2.1000} for an unknown
            zone (field C{zoneUuid}); C{L2.1001} for a vlan already used on the interface
            in the zone (details C{existingL2NetworkUuid}).
        """
        name = v.name(msg.name)
        description = v.optional_text(msg.description, "description")
        zone_uuid = v.uuid(msg.zone_uuid, "zoneUuid")
        iface = physical_interface(msg.physical_interface)
        vlan = v.vlan(msg.vlan) if isinstance(msg, CreateL2VlanNetworkMsg) else None
        uuid = v.uuid(msg.uuid, "uuid") if msg.uuid is not None else uuidlib.uuid4().hex
        await self.must_get("zone", zone_uuid, L2.NOT_FOUND, field="zoneUuid")
        if vlan is not None:
            await self._check_vlan(zone_uuid, iface, vlan)
        values = {"uuid": uuid, "name": name, "description": description,
                  "zoneUuid": zone_uuid, "physicalInterface": iface,
                  "type": NO_VLAN if vlan is None else VLAN, "vlan": vlan}
        try:
            await self.store.insert("l2Network", values)
        except OperationError as e:
            if e.error.code != DB.DUPLICATE or vlan is None:
                raise
            # A concurrent create (on any node) won the vlan: name it.
            await self._check_vlan(zone_uuid, iface, vlan, cause=e)
            raise
        return await self._reply(uuid)

    async def _check_vlan(self, zone_uuid: str, iface: str, vlan: int,
                          cause: OperationError | None = None) -> None:
        page = await self.store.query("l2Network", Query(conditions=[
            Condition("zoneUuid", "=", zone_uuid), Condition("physicalInterface", "=", iface),
            Condition("vlan", "=", vlan)], fields=["uuid"], limit=1))
        if page.inventories:
            existing = page.inventories[0]["uuid"]
            raise OperationError.of(
                L2.DUPLICATE_VLAN,
                f"L2 network {existing} already uses vlan {vlan} on physical interface"
                f" {iface} of zone {zone_uuid}",
                cause=None if cause is None else cause.error,
                field="vlan", existingL2NetworkUuid=existing, vlan=vlan,
                physicalInterface=iface, zoneUuid=zone_uuid)

    # --- update -------------------------------------------------------------------------

    @handles(UpdateL2NetworkMsg)
    async def update(self, msg: UpdateL2NetworkMsg) -> L2NetworkReply:
        """
        Rename or re-describe an L2 network (C{L2.1000} when unknown).
        """
        uuid = v.uuid(msg.uuid, "uuid")
        changes: dict[str, Any] = v.common_changes(msg)

        async def run() -> L2NetworkReply:
            await self._l2(uuid, "uuid")
            if changes:
                await self.store.update("l2Network", uuid, changes)
            return await self._reply(uuid)

        return await self.serialized(f"l2-{uuid}", run)

    # --- clusters -----------------------------------------------------------------------

    @handles(AttachL2NetworkToClusterMsg)
    async def attach(self, msg: AttachL2NetworkToClusterMsg) -> L2NetworkReply:
        """
        Attach to a cluster of the L2's zone.

        @raise OperationError: C{L2.1000} (unknown L2 or cluster, naming the field);
            C{L2.1002} when the cluster is in another zone (field C{clusterUuid}), the L2 is
            already attached to it, or the cluster has an L2 on the same physical interface
            and vlan (details C{conflictingL2NetworkUuids}).
        """
        l2_uuid = v.uuid(msg.l2_network_uuid, "l2NetworkUuid")
        cluster_uuid = v.uuid(msg.cluster_uuid, "clusterUuid")

        async def run() -> L2NetworkReply:
            l2 = await self._l2(l2_uuid)
            cluster = await self.must_get("cluster", cluster_uuid, L2.NOT_FOUND,
                                          field="clusterUuid")
            if cluster["zoneUuid"] != l2["zoneUuid"]:
                raise OperationError.of(
                    L2.ATTACH_ERROR,
                    f"cluster {cluster_uuid} is in zone {cluster['zoneUuid']}, L2 network"
                    f" {l2_uuid} in zone {l2['zoneUuid']}",
                    field="clusterUuid", clusterZoneUuid=cluster["zoneUuid"],
                    zoneUuid=l2["zoneUuid"])
            try:
                result = await self.store.attach_l2_to_cluster(l2_uuid, cluster_uuid)
            except OperationError as e:
                if e.error.code != DB.REFERENCE:
                    raise
                # The cluster (or the L2) was deleted after the store's check.
                missing = ("l2Network" if await self.store.get("l2Network", l2_uuid) is None
                           else "cluster")
                raise self._gone(missing, l2_uuid, cluster_uuid, e.error) from None
            if "missing" in result:
                raise self._gone(result["missing"], l2_uuid, cluster_uuid)
            if "attached" in result:
                raise OperationError.of(
                    L2.ATTACH_ERROR,
                    f"L2 network {l2_uuid} is already attached to cluster {cluster_uuid}",
                    field="clusterUuid", clusterUuid=cluster_uuid)
            if "conflicts" in result:
                what = ("a NoVlan L2 network" if l2["vlan"] is None
                        else f"an L2 network with vlan {l2['vlan']}")
                raise OperationError.of(
                    L2.ATTACH_ERROR,
                    f"cluster {cluster_uuid} already has {what} on physical interface"
                    f" {l2['physicalInterface']}: {', '.join(result['conflicts'])}",
                    field="clusterUuid", conflictingL2NetworkUuids=result["conflicts"],
                    physicalInterface=l2["physicalInterface"], vlan=l2["vlan"])
            return await self._reply(l2_uuid)

        return await self.serialized(f"l2-{l2_uuid}", run)

    @staticmethod
    def _gone(missing: str, l2_uuid: str, cluster_uuid: str, cause: Any = None
              ) -> OperationError:
        """
        C{L2.1000} naming the L2 network or the cluster deleted while attaching.
        """
        uuid, field = ((cluster_uuid, "clusterUuid") if missing == "cluster"
                       else (l2_uuid, "l2NetworkUuid"))
        extra = {} if cause is None else {"cause": cause}
        return OperationError.of(L2.NOT_FOUND, f"no {missing} with uuid {uuid}",
                                 field=field, uuid=uuid, **extra)

    @handles(DetachL2NetworkFromClusterMsg)
    async def detach(self, msg: DetachL2NetworkFromClusterMsg) -> L2NetworkReply:
        """
        Detach from a cluster.

        @raise OperationError: C{L2.1000} (unknown L2); C{L2.1003} while VMs of the cluster
            have NICs on the L2's L3 networks (details C{vmInstanceUuids}).
        """
        l2_uuid = v.uuid(msg.l2_network_uuid, "l2NetworkUuid")
        cluster_uuid = v.uuid(msg.cluster_uuid, "clusterUuid")

        async def run() -> L2NetworkReply:
            await self._l2(l2_uuid)
            result = await self.store.detach_l2_from_cluster(l2_uuid, cluster_uuid)
            if "vms" in result:
                raise OperationError.of(
                    L2.DETACH_ERROR,
                    f"VMs of cluster {cluster_uuid} have NICs on L3 networks of L2 network"
                    f" {l2_uuid}: {', '.join(result['vms'])}",
                    vmInstanceUuids=result["vms"], clusterUuid=cluster_uuid)
            return await self._reply(l2_uuid)

        return await self.serialized(f"l2-{l2_uuid}", run)

    # --- delete -------------------------------------------------------------------------

    @handles(DeleteL2NetworkMsg)
    async def delete(self, msg: DeleteL2NetworkMsg) -> L2NetworkReply:
        """
        Delete (with its cluster refs).

        @raise OperationError: C{L2.1004} while L3 networks are on it (details
            C{l3NetworkUuids}).
        """
        uuid = v.uuid(msg.uuid, "uuid")

        async def run() -> L2NetworkReply:
            try:
                result = await self.store.delete_l2_network(uuid)
            except OperationError as e:
                if e.error.code != DB.REFERENCE:
                    raise
                # An L3 created on another node after the check: the foreign key refused.
                result = await self.store.delete_l2_network(uuid)
            if "l3s" in result:
                raise OperationError.of(
                    L2.DELETE_ERROR,
                    f"L2 network {uuid} has L3 networks: {', '.join(result['l3s'])}",
                    l3NetworkUuids=result["l3s"], uuid=uuid)
            return L2NetworkReply(inventory=None)

        return await self.serialized(f"l2-{uuid}", run)


def make(node: Any) -> L2NetworkService:
    """
    The L2 network service of C{node}.
    """
    return L2NetworkService(node.reactor, node.bus, node.store)
