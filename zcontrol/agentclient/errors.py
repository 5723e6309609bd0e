"""
The agent client's error codes.
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
            1000: "The agent refused the management node's bootstrap token",
        },
    )
    #: C{/host/connect} answered 401 (no token sent) or 403 (a wrong one): the operator must
    #: configure the same bootstrap token on the management node and the agent.
    TOKEN_REFUSED = _codes[1000]
