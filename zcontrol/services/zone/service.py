# -*- test-case-name: tests.test_zone -*-
"""
The zone service (ZStack's C{ZoneManagerImpl}/C{ZoneBase}): create, update, change the
state of and delete zones. A zone's inventory is its row.

Every operation on one zone runs in the chain C{zone-<uuid>} (L{Service.serialized}); state
changes are compare-and-swaps on C{state}, so another node's concurrent change (while the
ring moves) fails with C{SYS.1005} instead of being overwritten.

Deleting: ZStack cascades a zone's deletion to everything in it; here (issue 9) a zone that
still has clusters, hosts, L2/L3 networks, primary storages, attached backup storages or
VMs is refused with C{ZONE.1001} naming them (see Note [dependents] in
L{zcontrol.db.components.zones}): the user deletes or detaches them first.

A disabled zone still accepts new clusters, as ZStack's does (the state is for the
allocator and the operator; nothing else looks at it).
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Any

from zcontrol.core.errors import SYS, OperationError, error_code
from zcontrol.db.interfaces import DB
from zcontrol.services import validate
from zcontrol.services.base import Service, handles, succeeds_if_gone
from zcontrol.services.zone.messages import (
    SERVICE_ID,
    ZONE,
    ChangeZoneStateMsg,
    CreateZoneMsg,
    DeleteZoneMsg,
    UpdateZoneMsg,
    ZoneDeletedEvent,
    ZoneReply,
    ZoneStateChangedEvent,
)

__all__ = ["STATE_EVENTS", "ZoneService", "describe_dependents", "make", "new_uuid",
           "refuse_dependents", "state_after"]

#: ZStack's C{ZoneStateEvent}/C{ClusterStateEvent}/offering state events -> the new state.
STATE_EVENTS = {"enable": "Enabled", "disable": "Disabled"}


def new_uuid() -> str:
    """
    A fresh resource uuid (uuid4 hex without dashes, as ZStack's).
    """
    return uuidlib.uuid4().hex


def state_after(state_event: Any, events: dict[str, str] = STATE_EVENTS) -> str:
    """
    The state C{state_event} leads to, or C{SYS.1007} naming C{stateEvent}.
    """
    return events[validate.one_of(state_event, "stateEvent", events)]


def describe_dependents(dependents: dict[str, dict[str, Any]]) -> str:
    """
    C{"2 cluster(s) (c1, c2), 1 l2Network(s) (l2)"} for a dependents mapping (see
    L{zcontrol.db.components.zones.zone_dependents_thd}).
    """
    parts = []
    for kind, found in dependents.items():
        names = ", ".join(found["uuids"])
        more = ", ..." if found["count"] > len(found["uuids"]) else ""
        parts.append(f"{found['count']} {kind}(s) ({names}{more})")
    return ", ".join(parts)


def refuse_dependents(code: str, what: str, uuid_field: str, uuid: str,
                      dependents: dict[str, dict[str, Any]],
                      cause: Any = None) -> OperationError:
    """
    The refusal C{code} of deleting C{what} while C{dependents} hold it (details:
    C{<uuid_field>}, C{dependents}).
    """
    text = (f"cannot delete {what} {uuid}: it still has {describe_dependents(dependents)}"
            if dependents else f"cannot delete {what} {uuid}: it is still referenced")
    return OperationError(error_code(code, text, cause,
                                     **{uuid_field: uuid, "dependents": dependents}))


class ZoneService(Service):
    """
    The C{zone} service on one management node.
    """

    service_id = SERVICE_ID

    async def _zone(self, uuid: Any, field: str = "uuid") -> dict[str, Any]:
        validate.uuid(uuid, field)
        return await self.must_get("zone", uuid, ZONE.NOT_FOUND, field=field)

    def _not_found(self, uuid: str) -> OperationError:
        return OperationError.of(ZONE.NOT_FOUND, f"no zone with uuid {uuid}", resource="zone",
                                 uuid=uuid, field="uuid")

    async def _update(self, uuid: str, changes: dict[str, Any],
                      expected: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            return await self.store.update("zone", uuid, changes, expected)
        except OperationError as e:
            if e.error.code == SYS.RESOURCE_NOT_FOUND:
                raise self._not_found(uuid) from None
            if e.error.code == DB.DUPLICATE and "name" in changes:
                raise OperationError.of(ZONE.DUPLICATE,
                                        f"a zone named {changes['name']!r} already exists",
                                        field="name", value=changes["name"]) from None
            raise

    @handles(CreateZoneMsg)
    async def create(self, msg: CreateZoneMsg) -> ZoneReply:
        """
        L{CreateZoneMsg}: insert the zone, C{Enabled}, type C{zstack}.
        """
        name = validate.name(msg.name)
        description = validate.optional_text(msg.description, "description")
        uuid = new_uuid() if msg.uuid is None else validate.uuid(msg.uuid, "uuid")

        async def create() -> ZoneReply:
            try:
                row = await self.store.insert("zone", {
                    "uuid": uuid, "name": name, "description": description})
            except OperationError as e:
                if e.error.code != DB.DUPLICATE:
                    raise
                if await self.store.get("zone", uuid) is not None:
                    raise OperationError.of(ZONE.DUPLICATE, f"a zone with uuid {uuid} exists",
                                            field="uuid", value=uuid) from None
                raise OperationError.of(ZONE.DUPLICATE, f"a zone named {name!r} already exists",
                                        field="name", value=name) from None
            return ZoneReply(inventory=row)

        return await self.serialized(f"zone-{uuid}", create)

    @handles(UpdateZoneMsg)
    async def update(self, msg: UpdateZoneMsg) -> ZoneReply:
        """
        L{UpdateZoneMsg}: the fields given (not None) change; none given is a no-op.
        """
        uuid = validate.uuid(msg.uuid, "uuid")
        changes: dict[str, Any] = validate.common_changes(msg)

        async def update() -> ZoneReply:
            row = await self._zone(uuid)
            if changes:
                row = await self._update(uuid, changes)
            return ZoneReply(inventory=row)

        return await self.serialized(f"zone-{uuid}", update)

    @handles(ChangeZoneStateMsg)
    async def change_state(self, msg: ChangeZoneStateMsg) -> ZoneReply:
        """
        L{ChangeZoneStateMsg}: a compare-and-swap of C{state}; the same state again is a
        no-op (no event). Publishes L{ZoneStateChangedEvent}.
        """
        uuid = validate.uuid(msg.uuid, "uuid")
        new = state_after(msg.state_event)

        async def change() -> ZoneReply:
            row = await self._zone(uuid)
            old = row["state"]
            if old == new:
                return ZoneReply(inventory=row)
            row = await self._update(uuid, {"state": new}, {"state": old})
            self.publish(ZoneStateChangedEvent(zone_uuid=uuid, old_state=old, new_state=new))
            return ZoneReply(inventory=row)

        return await self.serialized(f"zone-{uuid}", change)

    @handles(DeleteZoneMsg)
    @succeeds_if_gone(ZONE.NOT_FOUND)
    async def delete(self, msg: DeleteZoneMsg) -> ZoneReply:
        """
        L{DeleteZoneMsg}: refused with C{ZONE.1001} while anything is in the zone; publishes
        L{ZoneDeletedEvent}.
        """
        uuid = validate.uuid(msg.uuid, "uuid")

        async def delete() -> ZoneReply:
            await self._zone(uuid)
            try:
                deleted, dependents = await self.store.delete_zone(uuid)
            except OperationError as e:
                if e.error.code != DB.REFERENCE:
                    raise
                dependents = await self.store.zone_dependents(uuid)
                raise refuse_dependents(ZONE.HAS_DEPENDENTS, "zone", "zoneUuid", uuid,
                                        dependents, e.error) from None
            if dependents:
                raise refuse_dependents(ZONE.HAS_DEPENDENTS, "zone", "zoneUuid", uuid,
                                        dependents)
            if not deleted:
                raise self._not_found(uuid)
            self.publish(ZoneDeletedEvent(zone_uuid=uuid))
            return ZoneReply(inventory=None)

        return await self.serialized(f"zone-{uuid}", delete)


def make(node: Any) -> ZoneService:
    """
    The zone service of C{node}.
    """
    return ZoneService(node.reactor, node.bus, node.store)
