# -*- test-case-name: tests.test_agent_client -*-
"""
The management node's callback endpoint: a klein resource at which agents POST results.

C{400} without a C{taskuuid} header or with a body that is not JSON; C{404} for an unknown,
expired or already completed task; C{403} for a missing or bad signature (or a signature made
for another task: a replay); C{200} when the task completed, exactly once (see
L{AgentClient.complete}).

Agent-initiated commands (C{/kvm/reportvmstate}) arrive at L{SEND_COMMAND_PATH}: 404 for a
command path nobody handles, 403 unless signed with the secret of the host named in
C{X-Resource-UUID}, 400 for a body that is not the command or has no sequence number, 409 for
a report whose sequence number is not above the last one applied for that host since its last
connect (a replay, or a retried report that a later one overtook: it is dropped, see Note
[report order] in L{agent.protocol}), 503 when too many reports of the host wait, 500 if the
handler fails (the agent retries; the sequence does not advance), else 200. A host's reports
reach the handler one at a time, in the order of their sequence numbers.

Every body is checked for its signature B{before} it is parsed, is bounded in size
(L{agent.http.QuietSite.max_body_size}, and L{agent.protocol.MAX_BODY_SIZE} again here) and
parsed by L{agent.protocol.decode_body}, so that no input raises past the endpoint.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from klein import Klein
from twisted.internet.defer import DeferredLock, maybeDeferred
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
    The reports of one host since its last connect: C{epoch} is the secret agreed then, C{last}
    the highest sequence number applied, C{lock} serialises the handler.
    """

    epoch: str
    last: int = 0
    lock: DeferredLock = attrs.Factory(DeferredLock)


class CallbackEndpoint:
    """
    Receives agents' callbacks and hands them to an L{AgentClient}.

    @ivar app: the klein app with one route, C{POST <path>}.
    """

    def __init__(self, client: AgentClient, path: str = CALLBACK_PATH,
                 send_command_path: str = SEND_COMMAND_PATH,
                 max_queued_reports: int = 1000) -> None:
        """
        @param max_queued_reports: reports of one host waiting for the handler at most; more
            are answered 503 (the agent retries).
        """
        self.client = client
        self.max_queued_reports = max_queued_reports
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
                                         body, first(SIGNATURE_HEADER)):
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
        if seq <= order.last:
            return self._stale(request, host_uuid, seq, order.last)
        if len(order.lock.waiting) >= self.max_queued_reports:
            request.setResponseCode(503)
            return f"too many reports of host {host_uuid} waiting".encode()
        return order.lock.run(self._apply, request, order, path, handler, host_uuid, cmd, seq)

    def _stale(self, request: Any, host_uuid: str, seq: int, last: int) -> bytes:
        log.info("dropped report {seq} of host {host}: not after {last}", seq=seq,
                 host=host_uuid, last=last)
        request.setResponseCode(409)
        return f"report {seq} of host {host_uuid} is stale or replayed (last {last})".encode()

    def _apply(self, request: Any, order: _ReportOrder, path: str,
               handler: Callable[[Any], Any], host_uuid: str, cmd: Any, seq: int) -> Any:
        if seq <= order.last:  # a later report overtook this one while it waited
            return self._stale(request, host_uuid, seq, order.last)

        def applied(_: Any) -> bytes:
            order.last = max(order.last, seq)
            return b""

        def failed(reason: Failure) -> bytes:
            log.failure("handler of {path} failed", reason, path=path)
            request.setResponseCode(500)
            return b"handler failed"

        return maybeDeferred(handler, cmd).addCallbacks(applied, failed)

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
