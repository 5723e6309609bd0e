"""
The L2 and L3 network services (one package for both: they share the IP range rules and
the store component L{zcontrol.db.components.networks}).

 - L{zcontrol.services.network.l2}: bus service C{network.l2}, factory C{l2.make};
 - L{zcontrol.services.network.l3}: bus service C{network.l3}, factory C{l3.make};
 - L{zcontrol.services.network.messages}: the messages of both and the C{L2}/C{L3} codes;
 - L{zcontrol.services.network.ranges}: the pure IPv4 range rules.
"""

from zcontrol.services.network.messages import *  # noqa: F403
from zcontrol.services.network.messages import __all__ as _messages

__all__ = list(_messages)
