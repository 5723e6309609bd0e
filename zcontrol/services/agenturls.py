# -*- test-case-name: tests.test_agent_urls -*-
"""
One agent address, one resource: a KVM host (C{managementIp}) and an Sftp backup storage
(C{hostname}) are both served at an agent base URL, and the agent keeps one callback secret
per base URL (C{/hosts/<id>}). Two resources at one base URL would take each other's secret
at every connect, so the host and backup storage services both refuse an address that any
host or backup storage already names, however it is spelt
(L{zcontrol.services.host.service.canonical_agent_url}).
"""

from __future__ import annotations

from typing import Any

from zcontrol.core.errors import SYS, ErrorCode, OperationError, error_code
from zcontrol.db.query import Condition, Query

__all__ = ["HOST_AGENT_PORT", "SFTP_AGENT_PORT", "echo_refusal", "resources_at"]

#: The port a bare host C{managementIp} means (ZStack's KVM agent).
HOST_AGENT_PORT = 7070
#: The port a bare backup storage C{hostname} means (ZStack's Sftp backup storage agent).
SFTP_AGENT_PORT = 7171

#: resource name -> (address field, port a bare address means)
_KINDS = {"host": ("managementIp", HOST_AGENT_PORT),
          "backupStorage": ("hostname", SFTP_AGENT_PORT)}


async def resources_at(store: Any, canonical: str, page_size: int = 1000,
                       ports: dict[str, int] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """
    The hosts and backup storages whose address names the agent base URL C{canonical}.

    @param ports: resource name -> the agent port a bare address of that kind means
        (default L{HOST_AGENT_PORT}, L{SFTP_AGENT_PORT}).
    @return: C{(resource, row)} pairs, rows with C{uuid}, C{name} and the address field.
    """
    from zcontrol.services.host.service import _like_pattern, canonical_agent_url

    found: list[tuple[str, dict[str, Any]]] = []
    like = _like_pattern(canonical)
    for resource, (field, default_port) in _KINDS.items():
        port = (ports or {}).get(resource, default_port)
        start = 0
        while True:
            page = await store.query(resource, Query(
                conditions=[Condition(field, "~=", like)], fields=["uuid", "name", field],
                sort="uuid", limit=page_size, start=start))
            for row in page.inventories:
                if not row.get(field):
                    continue
                try:
                    if canonical_agent_url(row[field], port) == canonical:
                        found.append((resource, row))
                except OperationError:
                    pass  # stored before addresses were checked: not this agent
            if len(page.inventories) < page_size:
                break
            start += page_size
    return found


def echo_refusal(error: ErrorCode, base: str) -> OperationError | None:
    """
    When an echo's C{error} says that retrying cannot help, the error to fail with at once
    (C{SYS.1015} naming C{url} and the hint), else None: an agent that answers C{404} to
    C{<base>/host/echo} is up but serves no such slot (C{/hosts/<i>} beyond its
    C{--hosts}, or a path that is not an agent's), which no amount of echoing changes.
    """
    if error.code == SYS.HTTP_ERROR and error.opaque.get("status") == 404:
        return OperationError(error_code(
            SYS.HTTP_ERROR, f"the agent at {base} answered 404 to its echo: it serves no such "
            "host slot; check the address (a simulated agent serves /hosts/0 to "
            "/hosts/<N-1> with --hosts N)", error, url=base, status=404))
    return None
