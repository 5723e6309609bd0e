"""
The host service: KVM hosts' lifecycle (add, connect, ping, reconnect) and VM-state
reconciliation, on the bus.
"""

from zcontrol.services.host.interfaces import IHostService
from zcontrol.services.host.messages import (
    HOST,
    SERVICE_ID,
    AddHostMsg,
    ConnectHostMsg,
    HostDeletedEvent,
    HostReply,
    HostStatusChangedEvent,
    KVMHostAsyncHttpCallMsg,
    KVMHostAsyncHttpCallReply,
    PingHostMsg,
    PingHostReply,
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
    "ConnectHostMsg",
    "HostConfig",
    "HostDeletedEvent",
    "HostReply",
    "KVMHostAsyncHttpCallMsg",
    "KVMHostAsyncHttpCallReply",
    "HostService",
    "HostStatusChangedEvent",
    "IHostService",
    "PingHostMsg",
    "PingHostReply",
    "VmStateChangedOnHostEvent",
    "agent_base_url",
    "canonical_agent_url",
]
