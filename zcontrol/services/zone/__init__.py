"""
The zone service: zones (ZStack's C{ZoneVO}) on the bus.
"""

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
from zcontrol.services.zone.service import ZoneService, make

__all__ = [
    "SERVICE_ID",
    "ZONE",
    "ChangeZoneStateMsg",
    "CreateZoneMsg",
    "DeleteZoneMsg",
    "UpdateZoneMsg",
    "ZoneDeletedEvent",
    "ZoneReply",
    "ZoneService",
    "ZoneStateChangedEvent",
    "make",
]
