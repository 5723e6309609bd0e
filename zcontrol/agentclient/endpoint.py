# -*- test-case-name: tests.test_agent_client -*-
"""
The management node's callback endpoint: a klein resource at which agents POST results.

C{400} without a C{taskuuid} header or with a body that is not JSON; C{404} for an unknown,
expired or already completed task; C{403} for a missing or bad signature (or a signature made
for another task: a replay); C{200} when the task completed, exactly once (see
L{AgentClient.complete}).

Agent-initiated commands (C{/kvm/reportvmstate}) arrive at L{SEND_COMMAND_PATH}: 404 for a
command path nobody handles, 403 unless signed with the secret of the host named in
C{X-Resource-UUID} (L{agent.protocol.sign_report}, over the command path too), 400 for a body
that is not the command or has no sequence number, 409 for a report whose sequence number is
not above the last one applied for the same resource (the VM it is about) of that host since
its last connect (a replay, or a retried report that a later report of that VM overtook: it is
dropped, see Note [report order] in L{agent.protocol}), 503 when too many reports of the host
wait, 500 if the handler fails or takes longer than C{handler_timeout} (the agent retries; the
sequence does not advance; the handler's Deferred is cancelled and the host's next report
proceeds), else 200. A host's reports reach the handler one at a time.

Note [bounded report order]: the last sequence number applied is kept per (host, VM), so that
a retried report of one VM overtaken by a report of another VM still applies. That memory is
bounded: it starts afresh at every connect (a new secret, a new sequence), and a VM with no
report applied for C{forget_after} seconds, or the least recently reported one when a host
tracks more than C{max_tracked_resources}, is forgotten after raising the host's I{floor}
(the highest sequence number forgotten): a report at or below the floor is refused. A host's
sequence numbers grow over all its VMs, so a report under the floor was made before the
forgotten VM's last report was applied, at least C{forget_after} seconds ago: longer than an
agent retries (under 15 minutes with its default policy), so only a replay is refused.

Every body is checked for its signature B{before} it is parsed, is bounded in size
(L{agent.http.QuietSite.max_body_size}, and L{agent.protocol.MAX_BODY_SIZE} again here) and
parsed by L{agent.protocol.decode_body}, so that no input raises past the endpoint.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from klein import Klein
from twisted.internet.defer import DeferredLock, maybeDeferred
from twisted.internet.defer import TimeoutError as HandlerTimeout
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource

from agent import protocol
from agent.http import DEFAULT_BACKLOG, QuietSite
from agent.protocol import (
    COMMAND_PATH_HEADER,
    REPORTS,
    RESOURCE_UUID_HEADER,
    SIGNATURE_HEADER,
    TASK_UUID_HEADER,
    ProtocolError,
)
from zcontrol.agentclient.client import AgentClient

__all__ = [
    "CALLBACK_PATH",
    "SEND_COMMAND_PATH",
    "CallbackEndpoint",
    "callback_site",
    "listen_callback",
]

#: ZStack's callback path (C{http://<mn ip>:8080/zstack/asyncrest/callback}).
CALLBACK_PATH = "/zstack/asyncrest/callback"
#: ZStack's path for agent-initiated commands (the C{sendCommandUrl} given at connect).
SEND_COMMAND_PATH = "/zstack/asyncrest/sendcommand"

log = Logger()

_TASK = TASK_UUID_HEADER.encode("ascii")
_SIGNATURE = SIGNATURE_HEADER.encode("ascii")


@attrs.define
class _ReportOrder:
    """
    The reports of one host since its last connect (Note [bounded report order]): C{epoch} is
    the secret agreed then; C{last} maps a resource (VM uuid; C{""} for a report about no VM)
    to the highest sequence number applied for it and when (seconds), least recently applied
    first; C{floor} is the highest sequence number of the resources forgotten; C{lock}
    serialises the handler.
    """

    epoch: str
    last: dict[str, tuple[int, float]] = attrs.Factory(dict)
    floor: int = 0
    lock: DeferredLock = attrs.Factory(DeferredLock)

    def last_for(self, resource: str) -> int:
        """
        The sequence number a report about C{resource} must exceed.
        """
        entry = self.last.get(resource)
        return self.floor if entry is None else max(self.floor, entry[0])

    def applied(self, resource: str, seq: int, now: float) -> None:
        """
        Record that report C{seq} about C{resource} was applied at C{now}.
        """
        previous = self.last.pop(resource, None)
        self.last[resource] = (max(seq, previous[0]) if previous else seq, now)

    def forget(self, now: float, forget_after: float, max_resources: int) -> None:
        """
        Forget the resources with no report applied since C{now - forget_after}, and the least
        recently reported ones past C{max_resources}, raising the floor to their numbers.
        """
        last = self.last
        while last:
            resource = next(iter(last))
            seq, when = last[resource]
            if when > now - forget_after and len(last) <= max_resources:
                break
            del last[resource]
            self.floor = max(self.floor, seq)


def _resource_of(cmd: Any) -> str:
    return getattr(cmd, "vm_uuid", None) or ""


class CallbackEndpoint:
    """
    Receives agents' callbacks and hands them to an L{AgentClient}.

    @ivar app: the klein app with one route, C{POST <path>}.
    """

    def __init__(self, client: AgentClient, path: str = CALLBACK_PATH,
                 send_command_path: str = SEND_COMMAND_PATH,
                 max_queued_reports: int = 1000, handler_timeout: float = 30.0,
                 forget_after: float = 3600.0, max_tracked_resources: int = 100_000,
                 clock: Any = None) -> None:
        """
        @param max_queued_reports: reports of one host waiting for the handler at most; more
            are answered 503 (the agent retries).
        @param handler_timeout: seconds a report handler may take; past it its Deferred is
            cancelled, the report is answered 500 (the agent retries) and the host's next
            report proceeds. A handler that ignores the cancellation may still finish later,
            after a newer report of the same VM: handlers must not let an older state
            overwrite a newer one by themselves (compare before writing).
        @param forget_after: seconds after which the order of a VM with no report is
            forgotten (Note [bounded report order]); keep it above the agents' retry span.
        @param max_tracked_resources: VMs per host whose order is kept at most.
        @param clock: C{IReactorTime} for the handler timeout and forgetting (default: the
            client's clock).
        """
        if handler_timeout <= 0 or forget_after <= 0 or max_tracked_resources < 1:
            raise ValueError("handler_timeout and forget_after must be > 0, "
                             "max_tracked_resources >= 1")
        self.client = client
        self.max_queued_reports = max_queued_reports
        self.handler_timeout = handler_timeout
        self.forget_after = forget_after
        self.max_tracked_resources = max_tracked_resources
        if clock is None:
            clock = getattr(client, "_clock", None)
        if clock is None:
            from twisted.internet import reactor as clock
        self._clock = clock
        self._order: dict[str, _ReportOrder] = {}
        self.path = path
        self.send_command_path = send_command_path
        self._reports: dict[str, Callable[[Any], Any]] = {}
        self.app = Klein()
        self.app.route(path, methods=["POST"])(self._callback)
        self.app.route(send_command_path, methods=["POST"])(self._send_command)

    def on_report(self, command_path: str, handler: Callable[[Any], Any]) -> None:
        """
        Handle agent-initiated commands of C{command_path} (a key of
        L{agent.protocol.REPORTS}) with C{handler(cmd)}, returning a value or a Deferred.
        """
        if command_path not in REPORTS:
            raise ValueError(f"{command_path} is not an agent-initiated command")
        self._reports[command_path] = handler

    def _send_command(self, request: Any) -> Any:
        headers = request.requestHeaders

        def first(name: str) -> str | None:
            values = headers.getRawHeaders(name.encode("ascii"))
            return values[0].decode("utf-8", "replace") if values else None

        path = first(COMMAND_PATH_HEADER)
        handler = self._reports.get(path or "")
        if handler is None:
            request.setResponseCode(404)
            return f"no handler for command path {path!r}".encode()
        body = request.content.read(protocol.MAX_BODY_SIZE + 1)
        if len(body) > protocol.MAX_BODY_SIZE:
            request.setResponseCode(413)
            return f"body over {protocol.MAX_BODY_SIZE} bytes".encode()
        host_uuid = first(RESOURCE_UUID_HEADER)
        # The signature is checked before the body is parsed: unsigned input is never parsed.
        if not self.client.verify_report(host_uuid, first(TASK_UUID_HEADER),
                                         body, first(SIGNATURE_HEADER), command_path=path):
            request.setResponseCode(403)
            return b"bad or missing signature"
        try:
            cmd = protocol.decode_body(REPORTS[path], body)
        except ProtocolError as e:
            request.setResponseCode(400)
            return str(e).encode()
        if getattr(cmd, "host_uuid", None) not in (None, host_uuid):
            request.setResponseCode(403)
            return b"the command names another host"
        seq = getattr(cmd, "seq", None)
        if seq is None or not 1 <= seq <= protocol.MAX_SEQ:
            request.setResponseCode(400)
            return b"a report needs a sequence number (seq) from 1"
        epoch = self.client.report_secret(host_uuid)
        order = self._order.get(host_uuid)
        if order is None or order.epoch != epoch:
            order = self._order[host_uuid] = _ReportOrder(epoch)
        order.forget(self._clock.seconds(), self.forget_after, self.max_tracked_resources)
        resource = _resource_of(cmd)
        last = order.last_for(resource)
        if seq <= last:
            return self._stale(request, host_uuid, resource, seq, last)
        if len(order.lock.waiting) >= self.max_queued_reports:
            request.setResponseCode(503)
            return f"too many reports of host {host_uuid} waiting".encode()
        return order.lock.run(self._apply, request, order, path, handler, host_uuid, cmd, seq)

    def _stale(self, request: Any, host_uuid: str, resource: str, seq: int,
               last: int) -> bytes:
        log.info("dropped report {seq} of host {host} about {resource!r}: not after {last}",
                 seq=seq, host=host_uuid, resource=resource, last=last)
        request.setResponseCode(409)
        return (f"report {seq} of host {host_uuid} about {resource!r} is stale or replayed "
                f"(last {last})").encode()

    def _apply(self, request: Any, order: _ReportOrder, path: str,
               handler: Callable[[Any], Any], host_uuid: str, cmd: Any, seq: int) -> Any:
        resource = _resource_of(cmd)
        last = order.last_for(resource)
        if seq <= last:  # a later report of the same VM overtook this one while it waited
            return self._stale(request, host_uuid, resource, seq, last)
        timeout = self.handler_timeout

        def applied(_: Any) -> bytes:
            now = self._clock.seconds()
            order.applied(resource, seq, now)
            order.forget(now, self.forget_after, self.max_tracked_resources)
            return b""

        def failed(reason: Failure) -> bytes:
            request.setResponseCode(500)
            if reason.check(HandlerTimeout):
                log.warn("handler of {path} for host {host} took over {timeout:g}s: cancelled,"
                         " answered 500 (the agent retries)", path=path, host=host_uuid,
                         timeout=timeout)
                return f"handler took over {timeout:g}s".encode()
            log.failure("handler of {path} failed", reason, path=path)
            return b"handler failed"

        d = maybeDeferred(handler, cmd)
        # Bounded: a hung handler must not hold the lock every later report of the host needs.
        d.addTimeout(timeout, self._clock)
        return d.addCallbacks(applied, failed)

    def resource(self) -> IResource:
        """
        The resource to serve (at the root of a site, or mounted by the API).
        """
        return self.app.resource()

    def _callback(self, request: Any) -> bytes:
        headers = request.requestHeaders
        tasks = headers.getRawHeaders(_TASK)
        signatures = headers.getRawHeaders(_SIGNATURE)
        taskuuid = tasks[0].decode("utf-8", "replace") if tasks else None
        status, message = self.client.complete(
            taskuuid, request.content.read(protocol.MAX_BODY_SIZE + 1),
            signatures[0] if signatures else None
        )
        request.setResponseCode(status)
        return message.encode("utf-8")


def callback_site(endpoint: CallbackEndpoint) -> QuietSite:
    """
    A site serving C{endpoint} with no per-request access log.
    """
    return QuietSite(endpoint.resource())


def listen_callback(reactor: Any, endpoint: CallbackEndpoint, port: int = 0,
                    interface: str = "", backlog: int = DEFAULT_BACKLOG,
                    tls_options: Any = None) -> IListeningPort:
    """
    Listen for callbacks with a deliberate backlog (Twisted's default of 50 overflows when a
    thousand agents call back at once), and point the client's C{callback_url} at the
    endpoint if it is unset (C{http(s)://<interface or 127.0.0.1>:<port><path>}).

    @param tls_options: server TLS options (e.g. L{agent.http.server_tls_options}) to serve
        HTTPS; None serves plain HTTP.
    @return: the listening port.
    """
    if tls_options is not None:
        listening = reactor.listenSSL(port, callback_site(endpoint), tls_options,
                                      backlog=backlog, interface=interface)
    else:
        listening = reactor.listenTCP(port, callback_site(endpoint), backlog=backlog,
                                      interface=interface)
    if not endpoint.client.callback_url:
        host = interface or "127.0.0.1"
        scheme = "http" if tls_options is None else "https"
        endpoint.client.callback_url = (
            f"{scheme}://{host}:{listening.getHost().port}{endpoint.path}"
        )
    return listening
