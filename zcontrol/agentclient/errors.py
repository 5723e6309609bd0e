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
            1000: "An agent command was not sent: it waited for a free connection slot until "
                  "its deadline (retrying it is safe)",
            1001: "The agent lost a command it had accepted (it restarted, or the host was "
                  "forgotten)",
            1002: "The agent refused the management node's bootstrap token",
        },
    )
    #: The command's deadline passed while it waited in the local queue for a connection
    #: slot; nothing reached the agent.
    NOT_SENT = _codes[1000]
    #: The agent restarted (or the host was forgotten) after accepting the command.
    LOST_WORK = _codes[1001]
    #: C{/host/connect} answered 401 (no token sent) or 403 (a wrong one): the operator must
    #: configure the same bootstrap token on the management node and the agent.
    TOKEN_REFUSED = _codes[1002]
