"""
The management node's agent client: commands to agents over treq with a pending-callback
table (L{AgentClient}) and the klein callback endpoint (L{CallbackEndpoint},
L{listen_callback}).
"""

from zcontrol.agentclient.client import AgentClient
from zcontrol.agentclient.endpoint import (
    CALLBACK_PATH,
    SEND_COMMAND_PATH,
    CallbackEndpoint,
    callback_site,
    listen_callback,
)
from zcontrol.agentclient.interfaces import IAgentClient

__all__ = [
    "AgentClient",
    "CALLBACK_PATH",
    "SEND_COMMAND_PATH",
    "CallbackEndpoint",
    "IAgentClient",
    "callback_site",
    "listen_callback",
]
