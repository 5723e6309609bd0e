# -*- test-case-name: tests.test_agent_client -*-
"""
The management node's view of agents.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

__all__ = ["IAgentClient"]


class IAgentClient(Interface):
    """
    Sends commands of the L{agent.protocol} contract to agents and completes them when their
    callbacks arrive.
    """

    callback_url = Attribute("the URL agents POST results to (the callback endpoint)")

    def connect(base_url, host_uuid, send_command_url=None, timeout=None, deadline=None):
        """
        C{/host/connect} the host at C{base_url} (its agent base URL, e.g.
        C{http://10.0.0.5:7070} or C{http://127.0.0.1:7070/hosts/17}): generate a fresh
        callback secret, send it (with the node's bootstrap token and its callback URL as the
        only one the agent may call back), and on success use it to authenticate that host's
        callbacks (any older secret is dropped, so callbacks of commands sent before fail
        with 403).

        @return: a Deferred firing with the L{agent.protocol.ConnectRsp}; it fails with an
            L{OperationError} as L{call} does for a synchronous command, or with
            C{AGENT.1002} when the agent refused the bootstrap token (it answered 401: none
            configured on the node, or 403: a different one; C{opaque["status"]}, and the
            agent's answer as cause).
        """

    def call(base_url, cmd, timeout=None, deadline=None, raise_on_failure=True):
        """
        Send C{cmd} (a command of the contract; its type chooses the path) to the host at
        C{base_url}. Synchronous commands are answered inline; asynchronous ones complete when
        the agent's signed callback arrives.

        @param timeout: seconds (default: the client's default timeout).
        @param deadline: an absolute time on the client's clock (the deadline of the message
            that caused the call); the call times out at the earlier of the two. The bus
            deadline of the message being handled, if any, caps it too.
        @param raise_on_failure: fail (C{SYS.1006}, the agent's error as details) when the
            response says C{success=false}; otherwise fire with it.
        @return: a Deferred firing with the decoded response (the command's response type).
            It fails with an L{OperationError} carrying C{SYS.1001} (timeout, naming the URL;
            the pending entry is gone; also when the agent did not answer the POST itself
            within the client's accept timeout: the command may or may not have reached it),
            C{SYS.1015} (the agent answered a non-2xx status, or an HTTP exchange broke, or
            the signed callback was malformed), C{SYS.1016} (could not connect), C{SYS.1006}
            (the agent reported a failure), C{SYS.1017} (cancelled, or the client was closed:
            see L{close}), C{AGENT.1000} (not sent: it waited for a free connection slot until
            its deadline, or its host was forgotten meanwhile; safe to retry) or C{AGENT.1001}
            (sent, but the agent lost it, see L{lost_work}). Cancelling it forgets the task.
        """

    def verify_report(host_uuid, taskuuid, body, signature):
        """
        Whether an agent-initiated command claiming to come from C{host_uuid} is signed (over
        C{taskuuid} and C{body}) with the secret agreed with that host at its last connect.
        """

    def forget(base_url, reason="the host was forgotten"):
        """
        Drop the callback secret of C{base_url} (e.g. the host was deleted or disconnected)
        and fail its pending commands at once, as L{lost_work} does.

        @return: the number of pending commands failed.
        """

    def lost_work(base_url, reason):
        """
        Fail every command pending at C{base_url} at once (its agent restarted after
        accepting them: they will never call back): those sent with C{AGENT.1001}, those
        still waiting for a connection slot with C{AGENT.1000} (not sent, safe to retry).

        @param reason: why, put in the errors' details.
        @return: the number of commands failed.
        """

    def close(reason="the agent client was closed"):
        """
        Fail every call in progress at once with C{SYS.1017}, C{reason} in its details
        (those that never reached an agent say "not sent"), refuse later calls the same way,
        and close the connection pool the client made, if any.

        @return: a Deferred firing when the pool's connections are closed.
        """
