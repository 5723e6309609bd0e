"""
The host service: KVM hosts' lifecycle (add, connect, ping, reconnect) and VM-state
reconciliation, on the bus.
"""

from zcontrol.services.host.interfaces import IHostService
from zcontrol.services.host.messages import (
    HOST,
    SERVICE_ID,
    AddHostMsg,
    ChangeHostStateMsg,
    ConnectHostMsg,
    DeleteHostMsg,
    HostDeletedEvent,
    HostReply,
    HostStateChangedEvent,
    HostStatusChangedEvent,
    KVMHostAsyncHttpCallMsg,
    KVMHostAsyncHttpCallReply,
    PingHostMsg,
    PingHostReply,
    ReconnectHostMsg,
    UpdateHostMsg,
    VmStateChangedOnHostEvent,
)
from zcontrol.services.host.service import (
    HostConfig,
    HostService,
    agent_base_url,
    canonical_agent_url,
)

__all__ = [
    "HOST",
    "SERVICE_ID",
    "AddHostMsg",
    "ChangeHostStateMsg",
    "ConnectHostMsg",
    "DeleteHostMsg",
    "HostDeletedEvent",
    "HostStateChangedEvent",
    "HostConfig",
    "HostReply",
    "KVMHostAsyncHttpCallMsg",
    "KVMHostAsyncHttpCallReply",
    "HostService",
    "HostStatusChangedEvent",
    "IHostService",
    "PingHostMsg",
    "PingHostReply",
    "ReconnectHostMsg",
    "UpdateHostMsg",
    "VmStateChangedOnHostEvent",
    "agent_base_url",
    "canonical_agent_url",
]
