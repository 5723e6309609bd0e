# -*- test-case-name: tests.test_agent_client -*-
"""
The management node's callback endpoint: a klein resource at which agents POST results.

C{400} without a C{taskuuid} header or with a body that is not JSON; C{404} for an unknown,
expired or already completed task; C{403} for a missing or bad signature (or a signature made
for another task: a replay); C{200} when the task completed, exactly once (see
L{AgentClient.complete}).
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import IResource

from agent.http import DEFAULT_BACKLOG, QuietSite
from agent.protocol import SIGNATURE_HEADER, TASK_UUID_HEADER
from zcontrol.agentclient.client import AgentClient

__all__ = ["CALLBACK_PATH", "CallbackEndpoint", "callback_site", "listen_callback"]

#: ZStack's callback path (C{http://<mn ip>:8080/zstack/asyncrest/callback}).
CALLBACK_PATH = "/zstack/asyncrest/callback"

_TASK = TASK_UUID_HEADER.encode("ascii")
_SIGNATURE = SIGNATURE_HEADER.encode("ascii")


class CallbackEndpoint:
    """
    Receives agents' callbacks and hands them to an L{AgentClient}.

    @ivar app: the klein app with one route, C{POST <path>}.
    """

    def __init__(self, client: AgentClient, path: str = CALLBACK_PATH) -> None:
        self.client = client
        self.path = path
        self.app = Klein()
        self.app.route(path, methods=["POST"])(self._callback)

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
            taskuuid, request.content.read(), signatures[0] if signatures else None
        )
        request.setResponseCode(status)
        return message.encode("utf-8")


def callback_site(endpoint: CallbackEndpoint) -> QuietSite:
    """
    A site serving C{endpoint} with no per-request access log.
    """
    return QuietSite(endpoint.resource())


def listen_callback(reactor: Any, endpoint: CallbackEndpoint, port: int = 0,
                    interface: str = "", backlog: int = DEFAULT_BACKLOG) -> IListeningPort:
    """
    Listen for callbacks with a deliberate backlog (Twisted's default of 50 overflows when a
    thousand agents call back at once), and point the client's C{callback_url} at the
    endpoint if it is unset (C{http://<interface or 127.0.0.1>:<port><path>}).

    @return: the listening port.
    """
    listening = reactor.listenTCP(port, callback_site(endpoint), backlog=backlog,
                                  interface=interface)
    if not endpoint.client.callback_url:
        host = interface or "127.0.0.1"
        endpoint.client.callback_url = (
            f"http://{host}:{listening.getHost().port}{endpoint.path}"
        )
    return listening
