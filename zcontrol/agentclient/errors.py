"""
The agent client's error codes (domain C{AGENT}).
"""

from __future__ import annotations

from zcontrol.core.errors import register_codes

__all__ = ["AGENT"]


class AGENT:
    """
    Error codes of the management node's dealings with agents.
    """

    _codes = register_codes(
        "AGENT",
        {
            1000: "An agent command was not sent: it waited (for a free connection slot, or "
                  "in its host's queue) until its deadline, or until its host was forgotten or "
                  "its agent restarted; nothing reached the agent (retrying it is safe)",
            1001: "The agent lost a command it had accepted (it restarted, or the host was "
                  "forgotten)",
            1002: "The agent refused the management node's bootstrap token",
        },
    )
    #: The command never left the management node: its deadline passed while it waited for
    #: a connection slot (or in its host's chain, L{zcontrol.services.host}), or its host was
    #: forgotten or its agent restarted meanwhile
    #: (L{zcontrol.agentclient.client.AgentClient.lost_work}). Retrying is safe.
    NOT_SENT = _codes[1000]
    #: The agent restarted (or the host was forgotten) after the command was sent: it will
    #: not call back, and the command may or may not have run.
    LOST_WORK = _codes[1001]
    #: C{/host/connect} answered 401 (no token sent) or 403 (a wrong one): the operator must
    #: configure the same bootstrap token on the management node and the agent.
    TOKEN_REFUSED = _codes[1002]
