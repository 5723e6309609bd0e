# -*- test-case-name: tests.test_agent_app -*-
"""
The virtual router agent plugin: init, configure NICs, SNAT, DHCP entries and firewall rules on
the host's L{IVirtualRouter}.
"""

from __future__ import annotations

from typing import Any

import attrs
from zope.interface import implementer

from agent import protocol as p
from agent.app import HostState, IAgentPlugin
from agent.hypervisor.interfaces import IVirtualRouter

__all__ = ["VRouterPlugin"]


def _router(host: HostState) -> Any:
    return IVirtualRouter(host.backends.vrouter)


@implementer(IAgentPlugin)
@attrs.frozen
class VRouterPlugin:
    """
    C{/vrouter/init}, C{/vrouter/configurenic}, C{/vrouter/setsnat}, C{/vrouter/adddhcp},
    C{/vrouter/refreshfirewall}.
    """

    name = "vrouter"

    def handlers(self) -> dict[str, Any]:
        return {
            "/vrouter/init": self.init,
            "/vrouter/configurenic": self.configure_nic,
            "/vrouter/setsnat": self.set_snat,
            "/vrouter/adddhcp": self.add_dhcp,
            "/vrouter/refreshfirewall": self.refresh_firewall,
        }

    def init(self, host: HostState, cmd: p.InitVRouterCmd) -> Any:
        return (
            _router(host)
            .init(cmd.vrouter_uuid, cmd.management_nic_mac)
            .addCallback(lambda _: p.InitVRouterRsp())
        )

    def configure_nic(self, host: HostState, cmd: p.ConfigureNicCmd) -> Any:
        return (
            _router(host)
            .configure_nics(cmd.vrouter_uuid, cmd.nics)
            .addCallback(lambda _: p.ConfigureNicRsp())
        )

    def set_snat(self, host: HostState, cmd: p.SetSNATCmd) -> Any:
        return (
            _router(host).set_snat(cmd.vrouter_uuid, cmd.snat).addCallback(lambda _: p.SetSNATRsp())
        )

    def add_dhcp(self, host: HostState, cmd: p.AddDhcpEntryCmd) -> Any:
        return (
            _router(host)
            .add_dhcp(cmd.vrouter_uuid, cmd.dhcp_entries, cmd.rebuild)
            .addCallback(lambda _: p.AddDhcpEntryRsp())
        )

    def refresh_firewall(self, host: HostState, cmd: p.RefreshFirewallCmd) -> Any:
        return (
            _router(host)
            .refresh_firewall(cmd.vrouter_uuid, cmd.rules)
            .addCallback(lambda _: p.RefreshFirewallRsp())
        )
