# -*- test-case-name: tests.test_host_service -*-
"""
What other services use of the host service.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

__all__ = ["IHostService"]


class IHostService(Interface):
    """
    Hosts: connect, ping, commands to their agents.
    """

    config = Attribute("the L{HostConfig}")

    def call(host_uuid, cmd, timeout=None, deadline=None):
        """
        Send an agent command to a Connected host through its chain (at most
        C{host_sync_level} in flight per host).

        @return: a Deferred firing with the agent's response; fails with C{HOST.1002} (not
            Connected), C{HOST.1003} (unknown), or as the agent client's C{call}.
        """

    def connect(host_uuid):
        """
        (Re)connect a host.

        @return: a Deferred firing with its row, Connected; fails with C{HOST.1001}.
        """

    def ping(host_uuid):
        """
        Ping a host once (may mark it Disconnected or start a reconnect).

        @return: a Deferred firing with its row after the ping.
        """

    def reconnect_all(parallelism=None):
        """
        Reconnect every host this node owns with a parallelism bound (at boot).

        @return: a Deferred firing with the number of hosts connected.
        """

    def track_once():
        """
        Ping every host this node owns with a parallelism bound.

        @return: a Deferred firing with the number of hosts pinged.
        """

    def sync_vms(host_uuid):
        """
        Reconcile the store's VM states on the host with the host's.

        @return: a Deferred firing with the number of VMs changed.
        """

    def report_vm_state(cmd):
        """
        Handle an agent's C{ReportVmStateCmd}.

        @return: a Deferred firing with whether the store was changed.
        """
