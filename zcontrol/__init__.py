"""
zcontrol: an event-driven IaaS control plane on Twisted.

The management node decides (schedule, allocate) and dispatches the slow work to agents on the
hypervisor hosts over asynchronous HTTP; everything in between is a Deferred.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
