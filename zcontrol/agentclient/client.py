# -*- test-case-name: tests.test_agent_client -*-
"""
The agent client: sends commands of the L{agent.protocol} contract over treq and keeps the
table of pending tasks that the callback endpoint (L{zcontrol.agentclient.endpoint}) completes.

Note [pending table]: C{taskuuid -> _Pending}. An entry is created B{before} the command is
POSTed (an agent with no latency may call back before its C{200} reaches us) and leaves the
table exactly once: completed by a verified callback, failed by the accept exchange (non-2xx
status, connection error), timed out by its timer, or cancelled by the caller. Whatever comes
later for that task (a late or duplicate callback) finds nothing and gets C{404}.

Note [sizing]: one C{HTTPConnectionPool} with C{maxPersistentPerHost} = C{pool_size} and a
semaphore of C{max_in_flight} over the accept exchanges (the pool itself never bounds
concurrency). All simulated hosts of an agent process share one endpoint (see
L{agent.protocol}), so one pool per agent process carries them. The callback endpoint must be
listened on with a large backlog (L{zcontrol.agentclient.endpoint.listen_callback}).
"""

from __future__ import annotations

import secrets
import uuid
from functools import partial
from typing import Any

from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from zope.interface import implementer

from agent import protocol
from agent.http import DEFAULT_POOL_SIZE, make_http_client, make_pool
from agent.protocol import CALLBACK_URL_HEADER, TASK_UUID_HEADER, Message, ProtocolError
from zcontrol.agentclient.errors import AGENT
from zcontrol.agentclient.interfaces import IAgentClient
from zcontrol.core.errors import SYS, OperationError, error_code

__all__ = ["AgentClient"]

log = Logger()

_TASK = TASK_UUID_HEADER.encode("ascii")
_CALLBACK = CALLBACK_URL_HEADER.encode("ascii")
_SIGNATURE = protocol.SIGNATURE_HEADER.encode("ascii")
_CONTENT_TYPE = b"content-type"
_JSON = [b"application/json"]

#: Exchanges that broke on a (possibly stale, pooled) connection before an answer came; the
#: POST is retried once with the same taskuuid, which the agent deduplicates.
_RETRYABLE = (ResponseNeverReceived, RequestNotSent, RequestTransmissionFailed)


class _Pending:
    """
    One command waiting for its callback.
    """

    __slots__ = ("result", "url", "secret", "rsp_type", "timer", "accept", "raise_on_failure")

    def __init__(self, result: Deferred, url: str, secret: str, rsp_type: type,
                 raise_on_failure: bool) -> None:
        self.result = result
        self.url = url
        self.secret = secret
        self.rsp_type = rsp_type
        self.raise_on_failure = raise_on_failure
        self.timer: Any = None
        self.accept: Deferred | None = None


def _connection_error(url: str, reason: Failure) -> OperationError:
    exc = reason.value
    what = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ierror.ConnectError):
        return OperationError.of(SYS.IO_ERROR, f"cannot reach {url}: {what}", url=url)
    if isinstance(exc, (ResponseFailed, RequestTransmissionFailed, RequestNotSent)):
        return OperationError.of(SYS.HTTP_ERROR, f"HTTP exchange with {url} failed: {what}",
                                 url=url)
    return OperationError.of(SYS.IO_ERROR, f"call to {url} failed: {what}", url=url)


@implementer(IAgentClient)
class AgentClient:
    """
    Commands to agents over HTTP, with their callbacks matched by task uuid.

    @ivar callback_url: the URL agents POST results to (settable, e.g. once the endpoint's
        port is known).
    """

    def __init__(self, clock: Any, http: Any, callback_url: str, *,
                 default_timeout: float = 300.0, max_in_flight: int = DEFAULT_POOL_SIZE,
                 bootstrap_token: str | None = None) -> None:
        """
        @param clock: C{IReactorTime}: timeouts and deadlines are on this clock.
        @param http: a treq C{HTTPClient} (or C{StubTreq}) for the POSTs.
        @param callback_url: the callback endpoint's URL as agents reach it.
        @param default_timeout: seconds a command may take when the caller gives none.
        @param max_in_flight: accept exchanges (HTTP requests) in flight at once.
        @param bootstrap_token: the token agents require at C{/host/connect} (see
            L{agent.app}); an agent refusing it fails the connect with C{AGENT.1000}.
        """
        self.bootstrap_token = bootstrap_token
        self._clock = clock
        self._http = http
        self.callback_url = callback_url
        self.default_timeout = default_timeout
        self._sem = DeferredSemaphore(max_in_flight)
        self._pending: dict[str, _Pending] = {}
        self._secrets: dict[str, str] = {}
        self._base_of_host: dict[str, str] = {}
        self._pool: Any = None
        #: Counters for observation and tests.
        self.stats = {"sent": 0, "completed": 0, "timeouts": 0, "rejected": 0}

    @classmethod
    def create(cls, reactor: Any, callback_url: str, *, pool_size: int = DEFAULT_POOL_SIZE,
               max_in_flight: int | None = None, default_timeout: float = 300.0,
               connect_timeout: float = 10.0, bootstrap_token: str | None = None,
               trust_root: Any = None) -> AgentClient:
        """
        A client with its own connection pool keeping C{pool_size} persistent connections per
        agent endpoint, and C{max_in_flight} (default: C{pool_size}) requests at once.

        @param trust_root: the C{IOpenSSLTrustRoot} agents' HTTPS certificates are checked
            against (None: the platform's CAs).
        """
        pool = make_pool(reactor, pool_size)
        client = cls(
            reactor,
            make_http_client(reactor, pool, connect_timeout, trust_root=trust_root),
            callback_url,
            default_timeout=default_timeout,
            max_in_flight=max_in_flight or pool_size,
            bootstrap_token=bootstrap_token,
        )
        client._pool = pool
        return client

    def __len__(self) -> int:
        """
        The number of pending tasks.
        """
        return len(self._pending)

    def is_pending(self, taskuuid: str) -> bool:
        """
        Whether C{taskuuid} waits for its callback.
        """
        return taskuuid in self._pending

    # --- secrets --------------------------------------------------------------------------

    def secret_for(self, base_url: str) -> str | None:
        """
        The callback secret agreed with the host at C{base_url}, or None.
        """
        return self._secrets.get(base_url)

    def forget(self, base_url: str) -> None:
        self._secrets.pop(base_url, None)
        for host_uuid, base in list(self._base_of_host.items()):
            if base == base_url:
                del self._base_of_host[host_uuid]

    def verify_report(self, host_uuid: str | None, taskuuid: str | None, body: bytes,
                      signature: str | bytes | None) -> bool:
        """
        Whether an agent-initiated command claiming to come from C{host_uuid} is signed with
        the secret agreed with that host at its last connect.
        """
        if not host_uuid or not taskuuid:
            return False
        secret = self.report_secret(host_uuid)
        return secret is not None and protocol.verify(secret, taskuuid, body, signature)

    def report_secret(self, host_uuid: str | None) -> str | None:
        """
        The secret agreed with host C{host_uuid} at its last connect (its reports' epoch, see
        Note [report order] in L{agent.protocol}), or None.
        """
        base = self._base_of_host.get(host_uuid or "")
        return None if base is None else self._secrets.get(base)

    def connect(self, base_url: str, host_uuid: str, send_command_url: str | None = None,
                timeout: float | None = None, deadline: float | None = None,
                version: str | None = None) -> Deferred[protocol.ConnectRsp]:
        secret = secrets.token_hex(32)
        cmd = protocol.ConnectCmd(host_uuid=host_uuid, callback_secret=secret,
                                  send_command_url=send_command_url, version=version,
                                  bootstrap_token=self.bootstrap_token,
                                  callback_url_prefixes=[self.callback_url] if self.callback_url
                                  else [])

        def connected(rsp: protocol.ConnectRsp) -> protocol.ConnectRsp:
            self._secrets[base_url] = secret
            self._base_of_host[host_uuid] = base_url
            return rsp

        def refused_credentials(reason: Failure, url: str) -> Failure:
            error = getattr(reason.value, "error", None)
            status = error.opaque.get("status") if error is not None else None
            if reason.check(OperationError) and status in (401, 403):
                raise OperationError.of(
                    AGENT.TOKEN_REFUSED,
                    f"the agent at {url} refused the connect ({status}: "
                    f"{'no bootstrap token configured here' if status == 401 else 'wrong token'});"
                    " configure the same bootstrap token on the node ([agents] bootstrap_token)"
                    " and the agent (--bootstrap-token-file)",
                    cause=error, url=url, status=status, field="bootstrap_token")
            return reason

        return self.call(base_url, cmd, timeout=timeout, deadline=deadline).addCallbacks(
            connected, refused_credentials, errbackArgs=(base_url,))

    # --- calls ----------------------------------------------------------------------------

    def _expiry(self, timeout: float | None, deadline: float | None) -> tuple[float, float]:
        now = self._clock.seconds()
        expiry = now + (self.default_timeout if timeout is None else timeout)
        if deadline is not None and deadline < expiry:
            expiry = deadline
        return now, expiry

    def call(self, base_url: str, cmd: Message, timeout: float | None = None,
             deadline: float | None = None, raise_on_failure: bool = True) -> Deferred[Any]:
        try:
            definition = protocol.command_for(cmd)
        except KeyError:
            return fail(OperationError.of(
                SYS.INVALID_ARGUMENT_ERROR, f"{type(cmd).__name__} is not an agent command"))
        url = base_url.rstrip("/") + definition.path
        now, expiry = self._expiry(timeout, deadline)
        if expiry <= now:
            return fail(OperationError.of(
                SYS.TIMEOUT, f"[Async Http Timeout] deadline passed before sending to {url}",
                url=url))
        if definition.sync:
            return self._call_sync(url, cmd, definition.rsp_type, expiry - now,
                                   raise_on_failure)
        secret = self._secrets.get(base_url)
        if secret is None:
            return fail(OperationError.of(
                SYS.OPERATION_ERROR,
                f"host at {base_url} is not connected (no callback secret): cannot send {url}",
                url=url))
        taskuuid = uuid.uuid4().hex
        result: Deferred[Any] = Deferred(partial(self._cancelled, taskuuid))
        entry = _Pending(result, url, secret, definition.rsp_type, raise_on_failure)
        self._pending[taskuuid] = entry
        entry.timer = self._clock.callLater(expiry - now, self._timed_out, taskuuid,
                                            expiry - now)
        self.stats["sent"] += 1
        self._send(taskuuid, entry, cmd.to_json(), 1)
        return result

    def _send(self, taskuuid: str, entry: _Pending, body: bytes, attempt: int) -> None:
        headers = {
            _TASK: [taskuuid.encode("ascii")],
            _CALLBACK: [self.callback_url.encode("utf-8")],
            _CONTENT_TYPE: _JSON,
            _SIGNATURE: [protocol.sign_command(entry.secret, taskuuid, body).encode("ascii")],
        }
        accept = self._sem.run(self._http.post, entry.url, data=body, headers=headers,
                               allow_redirects=False, unbuffered=True)
        entry.accept = accept
        accept.addCallbacks(self._accepted, self._accept_failed, callbackArgs=(taskuuid,),
                            errbackArgs=(taskuuid, body, attempt))

    def _accepted(self, response: Any, taskuuid: str) -> Any:
        if 200 <= response.code < 300:
            return None
        entry = self._pending.pop(taskuuid, None)
        if entry is None:
            return None
        entry.timer.cancel()

        def refused(text: Any) -> None:
            if isinstance(text, Failure):
                text = b""
            details = text.decode("utf-8", "replace")[:500]
            self.stats["rejected"] += 1
            entry.result.errback(OperationError.of(
                SYS.HTTP_ERROR, f"{entry.url} answered {response.code}: {details}",
                url=entry.url, status=response.code, taskUuid=taskuuid))

        return response.content().addBoth(refused)

    def _accept_failed(self, reason: Failure, taskuuid: str, body: bytes, attempt: int) -> None:
        entry = self._pending.get(taskuuid)
        if entry is None:  # completed, timed out or cancelled meanwhile
            return None
        if attempt == 1 and reason.check(*_RETRYABLE):
            # A pooled connection the agent closed: resend (the agent deduplicates taskuuid).
            self._send(taskuuid, entry, body, 2)
            return None
        del self._pending[taskuuid]
        entry.timer.cancel()
        self.stats["rejected"] += 1
        entry.result.errback(_connection_error(entry.url, reason))
        return None

    def _timed_out(self, taskuuid: str, seconds: float) -> None:
        entry = self._pending.pop(taskuuid, None)
        if entry is None:
            return
        self.stats["timeouts"] += 1
        accept, entry.accept = entry.accept, None
        if accept is not None:
            accept.cancel()  # a no-op once it has its result
        entry.result.errback(OperationError.of(
            SYS.TIMEOUT,
            f"[Async Http Timeout] url: {entry.url}, taskuuid: {taskuuid}, "
            f"no callback after {seconds:g}s",
            url=entry.url, taskUuid=taskuuid))

    def _cancelled(self, taskuuid: str, result: Deferred) -> None:
        entry = self._pending.pop(taskuuid, None)
        if entry is None:
            return
        entry.timer.cancel()
        accept, entry.accept = entry.accept, None
        if accept is not None:
            accept.cancel()  # a no-op once it has its result
        result.errback(OperationError.of(SYS.CANCEL, f"cancelled: {entry.url}", url=entry.url,
                                         taskUuid=taskuuid))

    def _call_sync(self, url: str, cmd: Message, rsp_type: type, timeout: float,
                   raise_on_failure: bool) -> Deferred[Any]:
        d = self._sem.run(self._http.post, url, data=cmd.to_json(),
                          headers={_CONTENT_TYPE: _JSON}, allow_redirects=False,
                          unbuffered=True)
        timer = self._clock.callLater(timeout, d.cancel)
        timed_out = []

        def answered(response: Any) -> Any:
            return response.content().addCallback(decode, response.code)

        def decode(body: bytes, code: int) -> Any:
            if not 200 <= code < 300:
                raise OperationError.of(
                    SYS.HTTP_ERROR,
                    f"{url} answered {code}: {body.decode('utf-8', 'replace')[:500]}",
                    url=url, status=code)
            try:
                rsp = protocol.decode_body(rsp_type, body)
            except ProtocolError as e:
                raise OperationError.of(SYS.HTTP_ERROR, f"{url} answered a malformed body: {e}",
                                        url=url) from None
            return self._checked(rsp, url) if raise_on_failure else rsp

        def failed(reason: Failure) -> Any:
            if reason.check(OperationError):
                return reason
            if reason.check(CancelledError) and timed_out:
                raise OperationError.of(
                    SYS.TIMEOUT, f"[Http Timeout] url: {url}, no answer after {timeout:g}s",
                    url=url)
            raise _connection_error(url, reason)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            else:
                timed_out.append(True)
            return result

        d.addBoth(done)
        return d.addCallback(answered).addErrback(failed)

    def _checked(self, rsp: Any, url: str, taskuuid: str | None = None) -> Any:
        if rsp.success:
            return rsp
        extra = {} if taskuuid is None else {"taskUuid": taskuuid}
        raise OperationError.of(SYS.OPERATION_ERROR, f"{url}: {rsp.error}", url=url,
                                response=rsp.to_dict(), **extra)

    # --- callbacks ------------------------------------------------------------------------

    def complete(self, taskuuid: str | None, body: bytes, signature: str | bytes | None,
                 ) -> tuple[int, str]:
        """
        Deliver a callback (the callback endpoint calls this).

        @return: C{(HTTP status, message)}: 400 without a task uuid or with a body that is not
            JSON (nothing is completed); 404 for an unknown, expired or already completed task;
            403 for a missing or bad signature (the task stays pending); 400 for a signed
            body that is not the command's response (the task fails with C{SYS.1015}); 200
            when the task completed, exactly once.
        """
        if not taskuuid:
            return 400, "taskuuid header missing"
        if len(body) > protocol.MAX_BODY_SIZE:
            return 413, f"body over {protocol.MAX_BODY_SIZE} bytes"
        entry = self._pending.get(taskuuid)
        if entry is None:
            return 404, f"no pending task {taskuuid}"
        # The signature is checked before the body is parsed: unsigned input is never parsed.
        if not protocol.verify(entry.secret, taskuuid, body, signature):
            log.warn("callback for {task} with a bad or missing signature", task=taskuuid)
            return 403, "bad or missing signature"
        try:
            data = protocol.loads(body)
        except ProtocolError as e:
            return 400, str(e)
        del self._pending[taskuuid]
        entry.timer.cancel()
        entry.accept = None
        try:
            rsp = entry.rsp_type.from_dict(data)
        except (ProtocolError, ValueError, TypeError, RecursionError) as e:
            entry.result.errback(OperationError.of(
                SYS.HTTP_ERROR, f"{entry.url} called back with a malformed response: {e}",
                url=entry.url, taskUuid=taskuuid))
            return 400, str(e)
        self.stats["completed"] += 1
        if entry.raise_on_failure and not rsp.success:
            entry.result.errback(OperationError(error_code(
                SYS.OPERATION_ERROR, f"{entry.url}: {rsp.error}", url=entry.url,
                taskUuid=taskuuid, response=rsp.to_dict())))
        else:
            entry.result.callback(rsp)
        return 200, ""

    # --- lifecycle ------------------------------------------------------------------------

    def close(self) -> Deferred[None]:
        """
        Cancel every pending task (each fails with C{SYS.1017}) and close the connection pool
        if this client made it.

        @return: a Deferred firing when the pool's connections are closed.
        """
        for taskuuid in list(self._pending):
            entry = self._pending.get(taskuuid)
            if entry is not None:
                entry.result.cancel()
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return succeed(None)
