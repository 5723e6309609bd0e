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

from twisted.internet.task import deferLater
from twisted.logger import Logger

from zcontrol.core.errors import SYS, ErrorCode, OperationError, error_code
from zcontrol.db.query import Condition, Query

log = Logger()

__all__ = ["HOST_AGENT_PORT", "SFTP_AGENT_PORT", "echo_refusal", "echo_until_up",
           "resources_at"]

#: A connect logs its first failed echo, then every this many.
ECHO_LOG_EVERY = 10

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


async def echo_until_up(clock: Any, agents: Any, base: str, *, what: str,
                        connect_timeout: float, echo_interval: float, echo_timeout: float,
                        setting: str) -> None:
    """
    Echo the agent at C{base} every C{echo_interval} seconds until it answers, for at most
    C{connect_timeout} seconds (or the current deadline, if earlier): how a host or a backup
    storage connect waits for an agent that is starting (ZStack's KVMHost echo). An answer
    that no retry can change fails at once (L{echo_refusal}). Failed attempts are logged at
    info, rate-limited (the first, then every L{ECHO_LOG_EVERY}th).

    @param what: the resource, for the log (C{"host <uuid>"}).
    @param setting: the name of the C{connect_timeout} setting, for the error.
    @raise OperationError: C{SYS.1001} wrapping the last attempt's error, with the number of
        attempts and the last reason (C{opaque}: C{attempts}, C{lastError}, C{url}); or
        L{echo_refusal}'s C{SYS.1015}.
    """
    from agent import protocol as p
    from zcontrol.core.deadline import current_deadline

    started = clock.seconds()
    give_up = started + connect_timeout
    deadline = current_deadline()
    if deadline is not None and deadline < give_up:
        give_up = deadline
    attempts = 0
    while True:
        attempts += 1
        try:
            await agents.call(base, p.EchoCmd(), timeout=echo_timeout)
            if attempts > 1:
                log.info("{what}: agent at {url} answered echo after {n} attempt(s)",
                         what=what, url=base, n=attempts)
            return
        except OperationError as e:
            refusal = echo_refusal(e.error, base)
            if refusal is not None:
                raise refusal from None
            if attempts == 1 or attempts % ECHO_LOG_EVERY == 0:
                log.info("{what}: echo attempt {n} to agent at {url} failed: {error}; "
                         "retrying every {interval:g}s for up to {limit:g}s", what=what,
                         n=attempts, url=base, error=str(e.error), interval=echo_interval,
                         limit=max(give_up - clock.seconds(), 0.0))
            if clock.seconds() + echo_interval >= give_up:
                waited = clock.seconds() - started
                raise OperationError(error_code(
                    SYS.TIMEOUT, f"agent at {base} did not answer echo: {attempts} "
                    f"attempt(s) in {waited:g}s, every {echo_interval:g}s ({setting} "
                    f"{connect_timeout:g}s); last error: {e.error}",
                    e.error, url=base, attempts=attempts, lastError=str(e.error))) from None
        await deferLater(clock, echo_interval, lambda: None)
