# -*- test-case-name: tests.test_zone -*-
"""
The zone service's bus messages, replies and events (ZStack's C{APICreateZoneMsg},
C{APIUpdateZoneMsg}, C{APIChangeZoneStateMsg}, C{APIDeleteZoneMsg}, without C{API}).

Messages about one zone carry its uuid in C{uuid} (as ZStack's) and are sent with
C{resource_uuid} = that uuid; L{CreateZoneMsg} with C{resource_uuid} = None or the chosen
uuid.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from zcontrol.bus.message import Event, NeedReplyMessage, Reply, registry
from zcontrol.core.errors import register_codes

__all__ = [
    "SERVICE_ID",
    "ZONE",
    "ChangeZoneStateMsg",
    "CreateZoneMsg",
    "DeleteZoneMsg",
    "UpdateZoneMsg",
    "ZoneDeletedEvent",
    "ZoneReply",
    "ZoneStateChangedEvent",
]

#: The bus service id of the zone service (ZStack: C{zone}).
SERVICE_ID = "zone"


class ZONE:
    """
    The zone service's error codes.
    """

    _codes = register_codes(
        "ZONE",
        {
            1000: "No such zone",
            1001: "The zone still has resources in it",
            1002: "A zone with the same name or uuid already exists",
        },
    )
    #: Details: C{resource}, C{uuid}, C{field} (the message field that named it).
    NOT_FOUND = _codes[1000]
    #: Details: C{zoneUuid}, C{dependents} (C{{kind: {"count": n, "uuids": [...]}}}).
    HAS_DEPENDENTS = _codes[1001]
    #: Details: C{field} (C{name} or C{uuid}), C{value}.
    DUPLICATE = _codes[1002]


@registry.register
@attrs.define(kw_only=True)
class ZoneReply(Reply):
    """
    A reply carrying the zone's inventory (its store row: C{uuid}, C{name},
    C{description}, C{type}, C{state}, C{createDate}, C{lastOpDate}); None after a delete.
    """

    inventory: dict[str, Any] | None = None


@registry.register
@attrs.define(kw_only=True)
class CreateZoneMsg(NeedReplyMessage):
    """
    Create a zone, C{Enabled}. Fails with C{SYS.1007} naming the field, C{ZONE.1002} when
    the name (unique in the schema) or the uuid is taken.
    """

    reply_type: ClassVar[type[Reply]] = ZoneReply

    name: str
    description: str | None = None
    uuid: str | None = None


@registry.register
@attrs.define(kw_only=True)
class UpdateZoneMsg(NeedReplyMessage):
    """
    Change a zone's name and/or description (None: unchanged).
    """

    reply_type: ClassVar[type[Reply]] = ZoneReply

    uuid: str
    name: str | None = None
    description: str | None = None


@registry.register
@attrs.define(kw_only=True)
class ChangeZoneStateMsg(NeedReplyMessage):
    """
    C{state_event} C{enable} -> C{Enabled}, C{disable} -> C{Disabled} (ZStack's
    C{ZoneStateEvent}).
    """

    reply_type: ClassVar[type[Reply]] = ZoneReply

    uuid: str
    state_event: str


@registry.register
@attrs.define(kw_only=True)
class DeleteZoneMsg(NeedReplyMessage):
    """
    Delete a zone that holds nothing; refused with C{ZONE.1001} naming the dependents.
    """

    reply_type: ClassVar[type[Reply]] = ZoneReply

    uuid: str


@registry.register
@attrs.define(kw_only=True)
class ZoneStateChangedEvent(Event):
    """
    A zone's state changed (committed).
    """

    topic: ClassVar[str] = "zone.state"

    zone_uuid: str
    old_state: str
    new_state: str


@registry.register
@attrs.define(kw_only=True)
class ZoneDeletedEvent(Event):
    """
    A zone was deleted (its row is gone).
    """

    topic: ClassVar[str] = "zone.deleted"

    zone_uuid: str
