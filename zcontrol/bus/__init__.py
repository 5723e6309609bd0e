"""
The message bus: request/reply between services, routed by resource to its owner node, and
events to every node. L{LocalBus} is the in-process default; the AMQP bus lives in
L{zcontrol.bus.amqp}.
"""

from zcontrol.bus.interfaces import IBus, ISubscription
from zcontrol.bus.local import LocalBroker, LocalBus
from zcontrol.bus.message import (
    DecodeError,
    Event,
    Message,
    NeedReplyMessage,
    Registry,
    Reply,
    registry,
)

__all__ = [
    "DecodeError",
    "Event",
    "IBus",
    "ISubscription",
    "LocalBroker",
    "LocalBus",
    "Message",
    "NeedReplyMessage",
    "Registry",
    "Reply",
    "registry",
]
