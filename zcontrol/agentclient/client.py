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

Note [per-host slots]: hosts that accept TCP and never answer would fill the global
C{max_in_flight} and starve every healthy host. So an exchange first takes one of its host's
C{max_in_flight_per_host} slots (per agent base URL), and only then one of the global slots: a
hung host holds at most its own share of the global ones. A command whose deadline passes
while it still waits for a slot was never sent; it fails with C{AGENT.1000} (L{NOT_SENT}), so
callers know that retrying it is safe.

Note [hung hosts]: a share per host is not enough: C{max_in_flight / max_in_flight_per_host}
hung hosts still take every global slot, and an unanswered POST would hold its slots until its
command's own timeout (300 s by default). So (1) every POST has its own C{accept_timeout}: an
agent answers a POST at once (an asynchronous command's accept, or a synchronous command's
answer), and one unanswered after that long fails with C{SYS.1001}, freeing its slots; (2) a
host whose POST timed out is I{suspect} (a circuit breaker): its share shrinks to one slot and
its exchanges also take one of the few quarantine slots (a quarter of the global ones) before
a global one, so suspect hosts together never hold more than a quarter of the global slots,
however many they are. Exchanges that already waited for a global slot when their host turned
suspect queue again behind the quarantine. The first answer from the host (any status) ends
its suspicion and restores its share.

Note [lost work]: when an agent is known to have restarted (its ping answers without the host
uuid it was connected with) or the host is forgotten, the commands it accepted are gone: they
fail at once with C{AGENT.1001} (L{AGENT_LOST_WORK}) instead of waiting out their timeout.
Those still waiting for a slot were never sent: they fail with C{AGENT.1000} (safe to retry).

Note [close]: L{AgentClient.close} fails everything in progress at once with C{SYS.1017}: the
pending asynchronous commands (sent or still waiting for a slot) and the synchronous calls;
those that never reached an agent say "not sent". After a close nothing more is sent.

Note [inherited deadline]: the bus deadline of the message being handled
(L{zcontrol.bus._pending.current_deadline}, on the same clock) caps every call's deadline.
"""

from __future__ import annotations

import secrets
import uuid
from collections import deque
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
from zcontrol.core.deadline import current_deadline
from zcontrol.core.errors import SYS, OperationError, error_code
from zcontrol.core.trace import current_trace_id

__all__ = ["AGENT_LOST_WORK", "AgentClient", "DEFAULT_ACCEPT_TIMEOUT",
           "DEFAULT_MAX_IN_FLIGHT_PER_HOST", "NOT_SENT"]

log = Logger()

#: C{AGENT.1000}: nothing reached the agent (see L{AGENT.NOT_SENT}); retrying is safe.
NOT_SENT = AGENT.NOT_SENT
#: C{AGENT.1001}: the agent restarted (or the host was forgotten) after the command was sent.
AGENT_LOST_WORK = AGENT.LOST_WORK

#: The default bound of exchanges in flight to one agent base URL (one host).
DEFAULT_MAX_IN_FLIGHT_PER_HOST = 32

#: The default seconds an agent has to answer a POST (see Note [hung hosts]). An agent answers
#: at once, but the time also covers the TCP connect and both reactors' backlog: with 1,000
#: commands in flight on a loaded machine (2 cores, load 7) single exchanges took over 10 s.
DEFAULT_ACCEPT_TIMEOUT = 30.0

_TASK = TASK_UUID_HEADER.encode("ascii")
_CALLBACK = CALLBACK_URL_HEADER.encode("ascii")
_SIGNATURE = protocol.SIGNATURE_HEADER.encode("ascii")
_EXPIRY = protocol.EXPIRY_HEADER.encode("ascii")
_TRACE = protocol.TRACE_ID_HEADER.encode("ascii")
_CONTENT_TYPE = b"content-type"
_JSON = [b"application/json"]

#: Exchanges that broke on a (possibly stale, pooled) connection before an answer came; the
#: POST is retried once with the same taskuuid, which the agent deduplicates.
_RETRYABLE = (ResponseNeverReceived, RequestNotSent, RequestTransmissionFailed)


class _Pending:
    """
    One command waiting for its callback.
    """

    __slots__ = ("result", "url", "secret", "rsp_type", "timer", "accept", "raise_on_failure",
                 "base", "sent", "expiry", "accepted", "trace_id")

    def __init__(self, result: Deferred, url: str, secret: str, rsp_type: type,
                 raise_on_failure: bool, base: str = "") -> None:
        self.result = result
        self.base = base
        self.sent = False
        #: The agent answered the command's POST with 2xx (it took the command).
        self.accepted = False
        self.expiry = 0.0
        self.url = url
        self.secret = secret
        self.rsp_type = rsp_type
        self.raise_on_failure = raise_on_failure
        self.timer: Any = None
        self.accept: Deferred | None = None
        #: The trace id current when the command was sent (L{zcontrol.core.trace}), or None.
        self.trace_id: str | None = None


class _Slots:
    """
    Counting slots granted first come, first served, whose limit may change while some are
    held (a suspect host's share shrinks to one, see Note [hung hosts]).
    """

    __slots__ = ("limit", "used", "waiting")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.waiting: deque[Deferred[None]] = deque()

    def acquire(self) -> Deferred[None]:
        """
        A Deferred firing when a slot is taken; cancelling it while it waits leaves the queue.
        """
        if self.used < self.limit and not self.waiting:
            self.used += 1
            return succeed(None)
        d: Deferred[None] = Deferred(self.waiting.remove)
        self.waiting.append(d)
        return d

    def release(self) -> None:
        self.used -= 1
        self._wake()

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        while self.waiting and self.used < self.limit:
            self.used += 1
            self.waiting.popleft().callback(None)

    @property
    def idle(self) -> bool:
        return self.used == 0 and not self.waiting


class _Grant:
    """
    The slots one exchange holds (see L{AgentClient._slot}).
    """

    __slots__ = ("base", "host", "suspect", "global_")

    def __init__(self, base: str) -> None:
        self.base = base
        #: the host's L{_Slots} once one of them is taken
        self.host: _Slots | None = None
        self.suspect = False
        self.global_ = False


class _SyncCall:
    """
    A synchronous call in progress (so that L{AgentClient.close} can fail it).
    """

    __slots__ = ("exchange", "sent", "closed")

    def __init__(self) -> None:
        self.exchange: Deferred | None = None
        self.sent = False
        #: the close's reason once the client was closed under it
        self.closed: str | None = None


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
    @ivar accept_timeout: seconds an agent has to answer a POST (settable; see Note [hung
        hosts]).
    """

    def __init__(self, clock: Any, http: Any, callback_url: str, *,
                 default_timeout: float = 300.0, max_in_flight: int = DEFAULT_POOL_SIZE,
                 max_in_flight_per_host: int = DEFAULT_MAX_IN_FLIGHT_PER_HOST,
                 bootstrap_token: str | None = None,
                 accept_timeout: float = DEFAULT_ACCEPT_TIMEOUT) -> None:
        """
        @param clock: C{IReactorTime}: timeouts and deadlines are on this clock (the bus's).
        @param http: a treq C{HTTPClient} (or C{StubTreq}) for the POSTs.
        @param callback_url: the callback endpoint's URL as agents reach it.
        @param default_timeout: seconds a command may take when the caller gives none.
        @param max_in_flight: accept exchanges (HTTP requests) in flight at once.
        @param max_in_flight_per_host: accept exchanges in flight at once to one agent base
            URL (see Note [per-host slots]); capped by C{max_in_flight}.
        @param bootstrap_token: the token agents require at C{/host/connect} (see
            L{agent.app}); an agent refusing it fails the connect with C{AGENT.1002}.
        @param accept_timeout: seconds an agent has to answer a POST (an asynchronous
            command's accept, a synchronous command's answer) before the exchange fails with
            C{SYS.1001} and its host becomes suspect (see Note [hung hosts]).
        """
        self.bootstrap_token = bootstrap_token
        self.accept_timeout = accept_timeout
        self._clock = clock
        self._http = http
        self.callback_url = callback_url
        self.default_timeout = default_timeout
        self._sem = DeferredSemaphore(max_in_flight)
        self._per_host = max(1, min(max_in_flight_per_host, max_in_flight))
        self._host_slots: dict[str, _Slots] = {}
        #: base URLs whose last POST went unanswered (Note [hung hosts])
        self._suspect: set[str] = set()
        self._quarantine = DeferredSemaphore(max(1, max_in_flight // 4))
        self._sync_calls: set[_SyncCall] = set()
        #: the close's reason once closed (Note [close])
        self._closed: str | None = None
        self._pending: dict[str, _Pending] = {}
        self._secrets: dict[str, str] = {}
        self._base_of_host: dict[str, str] = {}
        self._pool: Any = None
        #: Counters for observation and tests.
        self.stats = {"sent": 0, "completed": 0, "timeouts": 0, "rejected": 0}

    @classmethod
    def create(cls, reactor: Any, callback_url: str, *, pool_size: int = DEFAULT_POOL_SIZE,
               max_in_flight: int | None = None, default_timeout: float = 300.0,
               connect_timeout: float = 10.0,
               max_in_flight_per_host: int = DEFAULT_MAX_IN_FLIGHT_PER_HOST,
               bootstrap_token: str | None = None, trust_root: Any = None) -> AgentClient:
        """
        A client with its own connection pool keeping C{pool_size} persistent connections per
        agent endpoint, C{max_in_flight} (default: C{pool_size}) requests at once and
        C{max_in_flight_per_host} per agent base URL (a node takes all three from its
        C{[agents]} config section).

        @param trust_root: the C{IOpenSSLTrustRoot} agents' HTTPS certificates are checked
            against (None: the platform's CAs).
        @raise ValueError: C{pool_size}, C{max_in_flight} or C{max_in_flight_per_host} is
            below 1.
        """
        for name, value in (("pool_size", pool_size), ("max_in_flight", max_in_flight),
                            ("max_in_flight_per_host", max_in_flight_per_host)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, not {value!r}")
        pool = make_pool(reactor, pool_size)
        client = cls(
            reactor,
            make_http_client(reactor, pool, connect_timeout, trust_root=trust_root),
            callback_url,
            default_timeout=default_timeout,
            max_in_flight=max_in_flight or pool_size,
            max_in_flight_per_host=max_in_flight_per_host,
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

    def forget(self, base_url: str, reason: str = "the host was forgotten") -> int:
        """
        Drop the callback secret of C{base_url} and fail its pending commands at once (see
        L{lost_work}).

        @return: the number of pending commands failed.
        """
        self._secrets.pop(base_url, None)
        self._suspect.discard(base_url)
        for host_uuid, base in list(self._base_of_host.items()):
            if base == base_url:
                del self._base_of_host[host_uuid]
        return self.lost_work(base_url, reason)

    def lost_work(self, base_url: str, reason: str) -> int:
        """
        Fail every command pending at C{base_url} at once, e.g. when its agent restarted
        after accepting them: those sent with C{AGENT.1001} (L{AGENT_LOST_WORK}), those still
        waiting for a connection slot with C{AGENT.1000} (L{NOT_SENT}: nothing reached the
        agent, retrying is safe).

        @param reason: why the work is gone, put in the errors' details.
        @return: the number of commands failed.
        """
        # The unsent first: cancelling a sent one's exchange frees a slot that one of them
        # would otherwise take and send.
        lost = sorted((t for t, e in self._pending.items() if e.base == base_url),
                      key=lambda t: self._pending[t].sent)
        for taskuuid in lost:
            entry = self._pending.pop(taskuuid)
            entry.timer.cancel()
            accept, entry.accept = entry.accept, None
            if accept is not None:
                accept.cancel()  # a no-op once it has its result; gives back a slot waited for
            if entry.sent:
                error = OperationError.of(
                    AGENT_LOST_WORK, f"{entry.url}, taskuuid {taskuuid}: {reason}; the agent "
                    "will not call back", url=entry.url, taskUuid=taskuuid)
            else:
                error = OperationError.of(
                    NOT_SENT, f"not sent: {entry.url}, taskuuid {taskuuid}: {reason} while it "
                    "waited for a connection slot; nothing reached the agent", url=entry.url,
                    taskUuid=taskuuid)
            entry.result.errback(error)
        if lost:
            log.warn("{n} command(s) pending at {base} failed: {reason}", n=len(lost),
                     base=base_url, reason=reason)
        return len(lost)

    def verify_report(self, host_uuid: str | None, taskuuid: str | None, body: bytes,
                      signature: str | bytes | None,
                      command_path: str = protocol.REPORT_VM_STATE_PATH) -> bool:
        """
        Whether an agent-initiated command of C{command_path} claiming to come from
        C{host_uuid} is signed (L{protocol.sign_report}) with the secret agreed with that host
        at its last connect.
        """
        if not host_uuid or not taskuuid:
            return False
        secret = self.report_secret(host_uuid)
        return secret is not None and protocol.verify_report(secret, command_path, taskuuid,
                                                             body, signature)

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
        inherited = current_deadline()
        if inherited is not None and (deadline is None or inherited < deadline):
            deadline = inherited
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
        if self._closed is not None:
            return fail(OperationError.of(
                SYS.CANCEL, f"not sent: {url}: {self._closed}", url=url))
        now, expiry = self._expiry(timeout, deadline)
        if expiry <= now:
            return fail(OperationError.of(
                SYS.TIMEOUT, f"[Async Http Timeout] deadline passed before sending to {url}",
                url=url))
        if definition.sync:
            return self._call_sync(base_url, url, cmd, definition.rsp_type, expiry - now,
                                   raise_on_failure)
        secret = self._secrets.get(base_url)
        if secret is None:
            return fail(OperationError.of(
                SYS.OPERATION_ERROR,
                f"host at {base_url} is not connected (no callback secret): cannot send {url}",
                url=url))
        taskuuid = uuid.uuid4().hex
        result: Deferred[Any] = Deferred(partial(self._cancelled, taskuuid))
        entry = _Pending(result, url, secret, definition.rsp_type, raise_on_failure, base_url)
        entry.expiry = expiry
        entry.trace_id = current_trace_id()
        self._pending[taskuuid] = entry
        entry.timer = self._clock.callLater(expiry - now, self._timed_out, taskuuid,
                                            expiry - now)
        self.stats["sent"] += 1
        self._send(taskuuid, entry, cmd.to_json(), 1)
        return result

    # --- slots (Notes [per-host slots], [hung hosts]) ------------------------------------

    def _slot(self, base_url: str) -> Deferred[_Grant]:
        """
        Take one of C{base_url}'s slots, then (if the host is suspect) a quarantine slot,
        then a global slot. Cancelling the result while it waits gives back whatever was
        taken.
        """
        host = self._host_slots.get(base_url)
        if host is None:
            host = self._host_slots[base_url] = _Slots(
                1 if base_url in self._suspect else self._per_host)
        grant = _Grant(base_url)
        waiting: list[Deferred | None] = [None]

        def cancel(_d: Deferred) -> None:
            step, waiting[0] = waiting[0], None
            if step is not None:
                step.cancel()

        slot: Deferred[_Grant] = Deferred(cancel)

        def wait(step: Deferred, took: str) -> None:
            waiting[0] = step

            def got(_: Any) -> None:
                waiting[0] = None
                if took == "host":
                    grant.host = host
                else:
                    setattr(grant, took, True)
                advance()

            def cancelled(_f: Failure) -> None:
                waiting[0] = None
                self._give_back(grant)

            step.addCallbacks(got, cancelled)

        def advance() -> None:
            if slot.called:  # cancelled meanwhile
                self._give_back(grant)
            elif grant.host is None:
                wait(host.acquire(), "host")
            elif base_url in self._suspect and not grant.suspect:
                if grant.global_:
                    # The host turned suspect while this exchange waited: queue again, behind
                    # the quarantine (Note [hung hosts]).
                    grant.global_ = False
                    self._sem.release()
                wait(self._quarantine.acquire(), "suspect")
            elif not grant.global_:
                wait(self._sem.acquire(), "global_")
            else:
                slot.callback(grant)

        advance()
        return slot

    def _give_back(self, grant: _Grant) -> None:
        """
        Release every slot C{grant} holds (once).
        """
        if grant.global_:
            grant.global_ = False
            self._sem.release()
        if grant.suspect:
            grant.suspect = False
            self._quarantine.release()
        host, grant.host = grant.host, None
        if host is not None:
            host.release()
            if host.idle and self._host_slots.get(grant.base) is host:
                del self._host_slots[grant.base]

    def _suspected(self, base_url: str) -> None:
        """
        A POST to C{base_url} went unanswered for C{accept_timeout}: its share shrinks to
        one slot (Note [hung hosts]).
        """
        if base_url in self._suspect:
            return
        self._suspect.add(base_url)
        log.warn("{base} did not answer a POST within {t}s: it holds one connection slot "
                 "until it answers again", base=base_url, t=self.accept_timeout)
        host = self._host_slots.get(base_url)
        if host is not None:
            host.set_limit(1)

    def _answered(self, base_url: str) -> None:
        """
        C{base_url} answered a POST: it is no longer suspect.
        """
        if base_url not in self._suspect:
            return
        self._suspect.discard(base_url)
        log.info("{base} answers again", base=base_url)
        host = self._host_slots.get(base_url)
        if host is not None:
            host.set_limit(self._per_host)

    def _post(self, base_url: str, url: str, expiry: float, on_sent: Any = None,
              **kwargs: Any) -> Deferred:
        """
        POST once a slot is free; the slots are given back when the exchange ends.
        C{on_sent()} is called when the request is handed to the HTTP client. A slot that
        comes free only at C{expiry} (absolute) or later is given back unused and the POST
        fails with C{AGENT.1000}; one that comes free after L{close} fails with C{SYS.1017}.
        An exchange unanswered after C{accept_timeout} is cancelled and fails with
        C{SYS.1001}, and its host becomes suspect (Note [hung hosts]).
        """
        slot = self._slot(base_url)
        queued = self._clock.seconds()

        def send(grant: _Grant) -> Deferred:
            now = self._clock.seconds()
            if self._closed is not None:
                self._give_back(grant)
                return fail(OperationError.of(
                    SYS.CANCEL, f"not sent: {url}: {self._closed}", url=url))
            if now >= expiry:
                self._give_back(grant)
                return fail(self._not_sent(url, now - queued))
            if on_sent is not None:
                on_sent()
            try:
                d = self._http.post(url, **kwargs)
            except BaseException:
                d = fail()
            unanswered: list[bool] = []

            def give_up() -> None:
                unanswered.append(True)
                d.cancel()

            timer = self._clock.callLater(self.accept_timeout, give_up)

            def done(result: Any) -> Any:
                if timer.active():
                    timer.cancel()
                self._give_back(grant)
                if unanswered:
                    self._suspected(base_url)
                    return Failure(OperationError.of(
                        SYS.TIMEOUT,
                        f"[Http Timeout] url: {url}, the agent did not answer the POST within "
                        f"{self.accept_timeout:g}s (agents answer at once: the host may be "
                        "hung); the command may or may not have reached it",
                        url=url))
                if not isinstance(result, Failure):
                    self._answered(base_url)
                return result

            return d.addBoth(done)

        return slot.addCallback(send)

    def _not_sent(self, url: str, waited: float, **details: Any) -> OperationError:
        return OperationError.of(
            NOT_SENT, f"not sent: {url} waited {waited:g}s for a free connection slot "
            "(every slot to this host or in total was busy); nothing reached the agent",
            url=url, **details)

    def _send(self, taskuuid: str, entry: _Pending, body: bytes, attempt: int) -> None:
        # Signed over path, callback URL, expiry (the call's deadline, capped at what agents
        # admit), task and body: see Note [signed strings] in agent.protocol.
        expiry = protocol.format_expiry(min(
            entry.expiry, self._clock.seconds() + protocol.MAX_COMMAND_AGE))
        path = entry.url[len(entry.base.rstrip("/")):]
        headers = {
            _TASK: [taskuuid.encode("ascii")],
            _CALLBACK: [self.callback_url.encode("utf-8")],
            _CONTENT_TYPE: _JSON,
            _EXPIRY: [expiry.encode("ascii")],
            _SIGNATURE: [protocol.sign_command(entry.secret, path, taskuuid, self.callback_url,
                                               expiry, body).encode("ascii")],
        }
        if entry.trace_id is not None:
            headers[_TRACE] = [entry.trace_id.encode("ascii", "replace")]

        def sent() -> None:
            entry.sent = True

        accept = self._post(entry.base, entry.url, entry.expiry, sent, data=body,
                            headers=headers, allow_redirects=False, unbuffered=True)
        entry.accept = accept
        accept.addCallbacks(self._accepted, self._accept_failed, callbackArgs=(taskuuid,),
                            errbackArgs=(taskuuid, body, attempt))

    def _accepted(self, response: Any, taskuuid: str) -> Any:
        if 200 <= response.code < 300:
            entry = self._pending.get(taskuuid)
            if entry is not None:
                entry.accepted = True
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
        if reason.check(OperationError):  # not sent
            entry.result.errback(reason)
        else:
            entry.result.errback(_connection_error(entry.url, reason))
        return None

    def _timed_out(self, taskuuid: str, seconds: float) -> None:
        entry = self._pending.pop(taskuuid, None)
        if entry is None:
            return
        self.stats["timeouts"] += 1
        accept, entry.accept = entry.accept, None
        # An accepted command whose callback went missing: usually agents cannot reach
        # callback_url (a wrong http.public_url or a firewall).
        accepted = entry.accepted
        if accept is not None:
            accept.cancel()  # a no-op once it has its result
        if not entry.sent:
            entry.result.errback(self._not_sent(entry.url, seconds, taskUuid=taskuuid))
            return
        if accepted:
            why = (f"the agent accepted the command but its callback never reached this "
                   f"node at {self.callback_url} (check http.public_url, the URL agents "
                   "call back to, and the firewall between the agent and this node)")
        else:
            why = f"the agent did not answer the POST (callback URL {self.callback_url})"
        entry.result.errback(OperationError.of(
            SYS.TIMEOUT,
            f"[Async Http Timeout] url: {entry.url}, taskuuid: {taskuuid}, "
            f"no callback after {seconds:g}s: {why}",
            url=entry.url, taskUuid=taskuuid, callbackUrl=self.callback_url,
            accepted=accepted))

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

    def _call_sync(self, base_url: str, url: str, cmd: Message, rsp_type: type,
                   timeout: float, raise_on_failure: bool) -> Deferred[Any]:
        call = _SyncCall()

        def sent() -> None:
            call.sent = True

        headers = {_CONTENT_TYPE: _JSON}
        trace_id = current_trace_id()
        if trace_id is not None:
            headers[_TRACE] = [trace_id.encode("ascii", "replace")]
        d = self._post(base_url, url, self._clock.seconds() + timeout, sent,
                       data=cmd.to_json(), headers=headers, allow_redirects=False,
                       unbuffered=True)
        call.exchange = d
        self._sync_calls.add(call)
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
            if call.closed is not None and reason.check(CancelledError):
                raise OperationError.of(
                    SYS.CANCEL, f"{'' if call.sent else 'not sent: '}{url}: {call.closed}",
                    url=url)
            if reason.check(CancelledError) and timed_out:
                if not call.sent:
                    raise self._not_sent(url, timeout)
                raise OperationError.of(
                    SYS.TIMEOUT, f"[Http Timeout] url: {url}, no answer after {timeout:g}s",
                    url=url)
            raise _connection_error(url, reason)

        def done(result: Any) -> Any:
            self._sync_calls.discard(call)
            if timer.active():
                timer.cancel()
            elif call.closed is None:
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

        @return: C{(HTTP status, message)}: 400 without a task uuid (nothing is completed);
            404 for an unknown, expired or already completed task; 403 for a missing or bad
            signature (the task stays pending); 400 for a signed body that is not JSON or not
            the command's response (the task fails with C{SYS.1015}: its agent will not send
            a better one); 200 when the task completed, exactly once.
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
        del self._pending[taskuuid]
        entry.timer.cancel()
        entry.accept = None
        try:
            rsp = entry.rsp_type.from_dict(protocol.loads(body))
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

    def close(self, reason: str = "the agent client was closed") -> Deferred[None]:
        """
        Fail every call in progress at once with C{SYS.1017}, C{reason} in its details
        (nothing waits out a command's own timeout): the pending asynchronous commands and
        the synchronous calls, whether sent or still waiting for a connection slot (those say
        "not sent"). Later calls fail at once the same way, and nothing more is sent. Then
        close the connection pool if this client made it (see Note [close]).

        @return: a Deferred firing when the pool's connections are closed.
        """
        if self._closed is None:
            self._closed = reason
        for taskuuid in list(self._pending):
            entry = self._pending.pop(taskuuid, None)
            if entry is None:
                continue
            entry.timer.cancel()
            accept, entry.accept = entry.accept, None
            if accept is not None:
                accept.cancel()
            entry.result.errback(OperationError.of(
                SYS.CANCEL, f"{'' if entry.sent else 'not sent: '}{entry.url}, taskuuid "
                f"{taskuuid}: {reason}", url=entry.url, taskUuid=taskuuid))
        for call in list(self._sync_calls):
            call.closed = reason
            if call.exchange is not None:
                call.exchange.cancel()
        self._sync_calls.clear()
        if self._pool is not None:
            return self._pool.closeCachedConnections()
        return succeed(None)
