# -*- test-case-name: tests.test_agent_app -*-
"""
The console proxy agent plugin: establish, check and delete a proxy to a VM's console on the
host's L{IConsoleProxy}, reporting the URL a browser opens.
"""

from __future__ import annotations

from typing import Any

import attrs
from zope.interface import implementer

from agent import protocol as p
from agent.app import HostState, IAgentPlugin
from agent.hypervisor.interfaces import IConsoleProxy

__all__ = ["ConsolePlugin"]


def _proxy(host: HostState) -> Any:
    return IConsoleProxy(host.backends.console)


@implementer(IAgentPlugin)
@attrs.frozen
class ConsolePlugin:
    """
    C{/console/establish}, C{/console/check}, C{/console/delete}.
    """

    name = "console"

    def handlers(self) -> dict[str, Any]:
        return {
            "/console/establish": self.establish,
            "/console/check": self.check,
            "/console/delete": self.delete,
        }

    def establish(self, host: HostState, cmd: p.EstablishProxyCmd) -> Any:
        def rsp(result: tuple[int, str]) -> p.EstablishProxyRsp:
            port, url = result
            return p.EstablishProxyRsp(proxy_port=port, url=url)

        return (
            _proxy(host)
            .establish(cmd.vm_uuid, cmd.target_hostname, cmd.target_port, cmd.token,
                       cmd.proxy_hostname)
            .addCallback(rsp)
        )

    def check(self, host: HostState, cmd: p.CheckProxyCmd) -> Any:
        return _proxy(host).check(cmd.token).addCallback(
            lambda ok: p.CheckProxyRsp(available=ok)
        )

    def delete(self, host: HostState, cmd: p.DeleteProxyCmd) -> Any:
        return _proxy(host).delete(cmd.token).addCallback(lambda _: p.DeleteProxyRsp())
