# -*- test-case-name: tests.test_agent_app -*-
"""
The agent framework: a klein app serving many hosts, the synchronous host URIs (echo,
connect, ping) and the asynchronous command pattern, with plugins supplying the commands.

Asynchronous URIs
=================
A command POSTed without a C{taskuuid}, C{callbackurl} or L{protocol.EXPIRY_HEADER} header
(or with a malformed expiry) gets C{400}; a host that was never connected (no callback secret)
gets C{409}; a command not signed with the host's secret for this path, callback URL, expiry
and task (L{protocol.sign_command} in the L{SIGNATURE_HEADER}) gets C{403}; so does a command
whose expiry has passed, or lies more than C{max_command_age} seconds ahead (both with
C{clock_skew} seconds of tolerance); a body that does not decode gets C{400}; a callback URL
not agreed at connect gets C{403}. Else
the agent answers C{200} with an empty body at once, runs the plugin's handler, and POSTs the
response (a L{Response}; a handler failure becomes C{success=false} with the error text) to the
callback URL with the same C{taskuuid}, signed with the host's secret. A task uuid seen before
is answered C{200} and ignored; task uuids are remembered for L{TaskMemory.ttl} seconds and at
most L{TaskMemory.max_size} of them (oldest forgotten first), so memory stays bounded.

The callback is retried with exponential backoff (L{CallbackPolicy}) until the management node
acknowledges it with a 2xx, answers a 4xx other than 408/429 (it will never accept it: unknown,
expired or already completed task, bad signature), or the attempts run out.

Synchronous URIs (echo, connect, ping) are answered inline and refuse a C{taskuuid} (as
ZStack's agents do).

Trust
=====
Only the management node commands an agent:

 - An agent configured with a bootstrap token (L{AgentApp} C{bootstrap_token}, C{twistd zagent
   --bootstrap-token-file}) answers a C{/host/connect} without it C{401} and with another one
   C{403} (compared in constant time), and keeps the host's previous secret. C{twistd zagent}
   refuses to start without a token unless told C{--insecure-no-token} (it then logs a
   warning); the management node by default keeps its token in C{<data_dir>/agent-token}
   (L{agent.bootstrap}). An L{AgentApp} built in code with C{bootstrap_token=None} is open.
 - Asynchronous commands are signed with the host's secret (agreed at connect) over their
   path, callback URL, expiry, task uuid and body, checked before the body is parsed: a
   captured command is valid nowhere else, and not after its expiry; replayed before it, it
   is a duplicate and ignored (L{TaskMemory} remembers task uuids longer than any expiry the
   agent admits). TLS keeps commands from being captured at all.
 - A host calls back only under the URL prefixes agreed at its last connect
   (L{protocol.allowed_callback_prefixes}); a command naming another C{callbackurl} is refused
   with C{403} before anything runs, and nothing is ever POSTed there.
 - Request bodies are limited to C{max_body_size} bytes (C{413} past it, read into no
   buffer, see L{agent.http.JSONRequest}) and decoded by L{protocol.decode_body}, which
   turns any malformed input (deep nesting, huge numbers, wrong types, bad UTF-8) into a
   C{400}.
 - Reports carry a sequence number (Note [report order] in L{agent.protocol}).

Note [callback outbox]
======================
Twisted buffers C{transport.write} until the next reactor turn. If the agent built every
callback inside the request that accepted its command, a burst of 1,000 commands read in one
turn would be answered by 1,000 callbacks written together only after all of them were built:
the agent works while the management node waits, then the other way round (a convoy), and
throughput is bounded by the sum of both processes' CPU per command rather than by the busier
one. Callbacks are therefore queued and POSTed from the reactor loop in slices of
C{time_slice} seconds; between slices the reactor writes what was built and reads new
commands, so both sides work at the same time.

Faults (simulation)
===================
L{Faults} makes a share of accepted commands never call back, or makes the host crash right
after accepting (the host forgets its VMs, its secret and its work; nothing calls back).
"""

from __future__ import annotations

import random
import uuid
from collections import deque
from typing import Any, Callable, Iterable, Mapping

import attrs
from klein import Klein
from twisted.internet.defer import Deferred, DeferredSemaphore, fail, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

from agent import protocol
from agent.hypervisor.interfaces import HostBackends, HypervisorError
from agent.protocol import (
    CALLBACK_URL_HEADER,
    COMMANDS,
    CONNECT_PATH,
    ECHO_PATH,
    PING_PATH,
    SIGNATURE_HEADER,
    TASK_UUID_HEADER,
    CommandDef,
    Message,
    ProtocolError,
    Response,
)

__all__ = [
    "AgentApp",
    "CallbackPolicy",
    "Faults",
    "HostState",
    "IAgentPlugin",
    "TaskMemory",
]

log = Logger()

_TASK = TASK_UUID_HEADER.encode("ascii")
_CALLBACK = CALLBACK_URL_HEADER.encode("ascii")
_SIGNATURE = SIGNATURE_HEADER.encode("ascii")
_EXPIRY = protocol.EXPIRY_HEADER.encode("ascii")
_TRACE = protocol.TRACE_ID_HEADER.encode("ascii")
_JSON = b"application/json"

#: A plugin's command handler: (host, decoded command) -> Response or Deferred[Response].
Handler = Callable[["HostState", Message], Any]


class IAgentPlugin(Interface):
    """
    A set of commands an agent serves (KVM, console proxy, virtual router).
    """

    name = Attribute("the plugin's name, as given to --plugins")

    def handlers():
        """
        @return: a mapping of command path (a key of L{agent.protocol.COMMANDS}) to a handler
            called with the L{HostState} and the decoded command, returning the response or a
            Deferred firing with it. A failure becomes C{success=false}.
        """


@attrs.define
class HostState:
    """
    One host served by this agent process.

    @ivar key: its address (the C{<host id>} of C{/hosts/<host id>/...}).
    @ivar backends: its hypervisor, console proxy and virtual router.
    @ivar host_uuid: the uuid given at connect (None before).
    @ivar secret: the callback secret given at connect (None before).
    @ivar send_command_url: where agent-initiated commands go.
    @ivar callback_prefixes: the URL prefixes callbacks may go to (agreed at connect).
    @ivar report_seq: the sequence number of the last report sent since connect.
    """

    key: str
    backends: HostBackends
    host_uuid: str | None = None
    secret: str | None = None
    send_command_url: str | None = None
    callback_prefixes: tuple[str, ...] = ()
    report_seq: int = 0


class TaskMemory:
    """
    The task uuids seen recently, bounded in time and count.

    C{ttl} (seconds) must exceed the longest time a command stays acceptable (the agent's
    C{max_command_age} plus twice its C{clock_skew}, checked by L{AgentApp}), else a captured
    command could be replayed once its task uuid is forgotten. C{max_size} is a last resort
    against memory exhaustion: past it the oldest uuids are forgotten before their time.
    """

    def __init__(self, clock: Any, ttl: float = 3600.0, max_size: int = 200_000) -> None:
        self._clock = clock
        self.ttl = ttl
        self.max_size = max_size
        self._seen: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def seen(self, taskuuid: str) -> bool:
        """
        Whether C{taskuuid} was seen before; remembers it if not.
        """
        now = self._clock.seconds()
        seen = self._seen
        # Insertion order is expiry order (one ttl): drop expired ones from the front.
        while seen:
            oldest = next(iter(seen))
            if seen[oldest] > now:
                break
            del seen[oldest]
        if taskuuid in seen:
            return True
        seen[taskuuid] = now + self.ttl
        if len(seen) > self.max_size:
            del seen[next(iter(seen))]
        return False


@attrs.frozen
class CallbackPolicy:
    """
    How callbacks are POSTed.

    @ivar max_attempts: attempts before giving up (ZStack's agents retry 15 times).
    @ivar initial_delay: the first backoff, seconds.
    @ivar max_delay: the backoff cap.
    @ivar factor: backoff growth per attempt.
    @ivar jitter: up to this fraction of each delay is added at random.
    @ivar timeout: the timeout of one POST.
    @ivar concurrency: callbacks POSTed at once (the pool should keep this many connections).
    @ivar time_slice: callbacks are queued and POSTed from the reactor loop for at most this
        many seconds per turn (None: POSTed at once, inside the request that accepted the
        command). See Note [callback outbox].
    """

    max_attempts: int = 15
    initial_delay: float = 0.5
    max_delay: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2
    timeout: float = 30.0
    concurrency: int = 1000
    time_slice: float | None = 0.02

    def delay(self, attempt: int, rng: random.Random) -> float:
        """
        The backoff before attempt C{attempt + 1} (C{attempt} >= 1).
        """
        base = min(self.max_delay, self.initial_delay * self.factor ** (attempt - 1))
        return base * (1.0 + self.jitter * rng.random())


@attrs.frozen
class Faults:
    """
    Simulated faults of accepted asynchronous commands.

    @ivar never_callback_rate: probability that a command does its work but never calls back.
    @ivar crash_after_accept_rate: probability that the host crashes right after accepting.
    """

    never_callback_rate: float = 0.0
    crash_after_accept_rate: float = 0.0


def _error_text(reason: Failure) -> str:
    if reason.check(HypervisorError, ProtocolError):
        return str(reason.value)
    return f"{type(reason.value).__name__}: {reason.value}"


class AgentApp:
    """
    The agent: a klein app serving C{host_count} hosts under C{/hosts/<i>/} (and host C{0}
    unprefixed), with the commands of C{plugins}.

    @ivar app: the klein app; C{app.resource()} is what a site serves.
    """

    app = Klein()

    def __init__(
        self,
        clock: Any,
        http: Any,
        backend_factory: Callable[[str], HostBackends],
        plugins: Iterable[Any],
        host_count: int = 1,
        faults: Faults = Faults(),
        policy: CallbackPolicy = CallbackPolicy(),
        rng: random.Random | None = None,
        tasks: TaskMemory | None = None,
        reset_host: Callable[[str], None] | None = None,
        bootstrap_token: str | None = None,
        clock_skew: float = 60.0,
        max_command_age: float = protocol.MAX_COMMAND_AGE,
    ) -> None:
        """
        @param clock: an C{IReactorTime} for backoff and POST timeouts.
        @param http: a treq C{HTTPClient} (see L{agent.http.make_http_client}) for callbacks.
        @param backend_factory: host key -> its L{HostBackends}.
        @param plugins: L{IAgentPlugin} providers.
        @param reset_host: called with a host key when that host crashes (a simulated fault),
            so that the backend forgets it.
        @param bootstrap_token: the token a C{/host/connect} must carry (None: connect is
            open; C{twistd zagent} allows that only with C{--insecure-no-token}).
        @param clock_skew: seconds the management node's clock may differ from this one's:
            a command is still accepted this long after its expiry.
        @param max_command_age: seconds ahead an expiry may lie (plus C{clock_skew}); a
            command asking for longer is refused.
        @raise ValueError: C{tasks} forgets task uuids before the commands they name expire
            (its C{ttl} is under C{max_command_age + 2 * clock_skew}).
        """
        if bootstrap_token is not None and not bootstrap_token:
            raise ValueError("an empty bootstrap token would admit anyone; give None or a token")
        self.bootstrap_token = bootstrap_token
        self._clock = clock
        self._http = http
        self._backend_factory = backend_factory
        self._host_count = host_count
        self._faults = faults
        self._policy = policy
        self._rng = rng if rng is not None else random.Random()
        self.tasks = tasks if tasks is not None else TaskMemory(clock)
        if clock_skew < 0 or max_command_age <= 0:
            raise ValueError("clock_skew must be >= 0 and max_command_age > 0")
        if self.tasks.ttl < max_command_age + 2 * clock_skew:
            raise ValueError(
                f"task uuids are remembered {self.tasks.ttl:g}s, under the {max_command_age:g}s"
                f" + 2 x {clock_skew:g}s a command may stay acceptable: a captured command "
                "could be replayed")
        self.clock_skew = clock_skew
        self.max_command_age = max_command_age
        self._reset_host = reset_host
        self._hosts: dict[str, HostState] = {}
        self._sem = DeferredSemaphore(policy.concurrency)
        self.plugins = list(plugins)
        self._handlers: dict[str, tuple[CommandDef, Handler]] = {
            ECHO_PATH: (COMMANDS[ECHO_PATH], self._echo),
            CONNECT_PATH: (COMMANDS[CONNECT_PATH], self._connect),
            PING_PATH: (COMMANDS[PING_PATH], self._ping),
        }
        for plugin in self.plugins:
            for path, handler in plugin.handlers().items():
                if path in self._handlers:
                    raise ValueError(f"two plugins serve {path}")
                self._handlers[path] = (COMMANDS[path], handler)
        #: Counters for observation and tests.
        self.stats = {"accepted": 0, "duplicates": 0, "callbacks": 0, "callback_failures": 0}
        self._in_flight: set[Deferred] = set()
        self._outbox: deque = deque()
        self._flush_scheduled = False
        self._idle: list[Deferred] = []

    def __len__(self) -> int:
        """
        The number of accepted commands whose callback is not delivered (or given up) yet.
        """
        return len(self._in_flight)

    def drain(self) -> Deferred[None]:
        """
        A Deferred that fires once no accepted command is working or calling back (for a
        clean stop; commands that never call back by simulated fault do not count).
        """
        if not self._in_flight:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def _track(self, d: Deferred) -> None:
        self._in_flight.add(d)

        def done(result: Any) -> Any:
            self._in_flight.discard(d)
            if not self._in_flight:
                idle, self._idle = self._idle, []
                for w in idle:
                    w.callback(None)
            return result

        d.addBoth(done)

    @property
    def paths(self) -> list[str]:
        """
        The command paths served.
        """
        return sorted(self._handlers)

    # --- hosts ----------------------------------------------------------------------------

    def host(self, key: str) -> HostState | None:
        """
        The state of host C{key} (created on first use), or None if there is no such host.
        """
        state = self._hosts.get(key)
        if state is None:
            if not key.isdigit() or int(key) >= self._host_count or str(int(key)) != key:
                return None
            state = self._hosts[key] = HostState(key, self._backend_factory(key))
        return state

    def crash_host(self, key: str) -> None:
        """
        Simulate a crash of host C{key}: it forgets its VMs, its connection (secret, uuid) and
        the work in progress, which never calls back.
        """
        self._hosts.pop(key, None)
        if self._reset_host is not None:
            self._reset_host(key)

    # --- routes ---------------------------------------------------------------------------

    @app.route("/hosts/<string:host>/<path:command>", methods=["POST"])
    def _hosted(self, request: Any, host: str, command: str) -> Any:
        return self._dispatch(request, host, "/" + command)

    @app.route("/<path:command>", methods=["POST"])
    def _single(self, request: Any, command: str) -> Any:
        return self._dispatch(request, "0", "/" + command)

    def _dispatch(self, request: Any, key: str, path: str) -> Any:
        host = self.host(key)
        if host is None:
            request.setResponseCode(404)
            return f"no host {key} here".encode()
        entry = self._handlers.get(path)
        if entry is None:
            request.setResponseCode(404)
            return f"no command {path}".encode()
        definition, handler = entry
        headers = request.requestHeaders
        taskuuids = headers.getRawHeaders(_TASK)
        if definition.sync:
            if taskuuids:
                request.setResponseCode(400)
                return f"{path} is synchronous: no taskuuid".encode()
            try:
                cmd = protocol.decode_body(definition.cmd_type, request.content.read())
            except ProtocolError as e:
                request.setResponseCode(400)
                return str(e).encode()
            if path == CONNECT_PATH and not protocol.token_matches(self.bootstrap_token,
                                                                   cmd.bootstrap_token):
                request.setResponseCode(401 if not cmd.bootstrap_token else 403)
                log.warn("refused /host/connect of host {key}: {why} bootstrap token",
                         key=key, why="no" if not cmd.bootstrap_token else "a wrong")
                return (b"bootstrap token missing" if not cmd.bootstrap_token
                        else b"bootstrap token refused")
            d = self._handle(definition, handler, host, cmd)
            request.setHeader(b"content-type", _JSON)
            return d.addCallback(lambda rsp: rsp.to_json())
        if not taskuuids or not taskuuids[0]:
            request.setResponseCode(400)
            return b"taskuuid header missing"
        callbacks = headers.getRawHeaders(_CALLBACK)
        if not callbacks or not callbacks[0]:
            request.setResponseCode(400)
            return b"callbackurl header missing"
        taskuuid = taskuuids[0].decode("utf-8", "replace")
        try:
            callback_url = callbacks[0].decode("ascii")
        except UnicodeDecodeError:
            request.setResponseCode(400)
            return b"callbackurl header is not ASCII"
        expiries = headers.getRawHeaders(_EXPIRY)
        expiry_text = expiries[0].decode("ascii", "replace") if expiries else ""
        expiry = protocol.parse_expiry(expiry_text)
        if expiry is None:
            request.setResponseCode(400)
            return f"{protocol.EXPIRY_HEADER} header missing or malformed".encode()
        if host.secret is None:
            request.setResponseCode(409)
            return f"host {key} is not connected".encode()
        body = request.content.read(protocol.MAX_BODY_SIZE + 1)
        if len(body) > protocol.MAX_BODY_SIZE:
            request.setResponseCode(413)
            return f"body over {protocol.MAX_BODY_SIZE} bytes".encode()
        # The signature is checked before the body is parsed: unsigned input is never parsed.
        signatures = headers.getRawHeaders(_SIGNATURE)
        if not protocol.verify_command(host.secret, path, taskuuid, callback_url, expiry_text,
                                       body, signatures[0] if signatures else None):
            request.setResponseCode(403)
            log.warn("refused {path} for host {key}: bad or missing signature", path=path,
                     key=key)
            return b"bad or missing signature"
        now = self._clock.seconds()
        if expiry + self.clock_skew < now:
            request.setResponseCode(403)
            log.warn("refused {path} for host {key}: expired {ago:.3f}s ago", path=path,
                     key=key, ago=now - expiry)
            return f"command expired at {expiry_text} (now {now:.3f})".encode()
        if expiry > now + self.max_command_age + self.clock_skew:
            request.setResponseCode(403)
            return (f"command expiry {expiry_text} is more than {self.max_command_age:g}s "
                    "ahead").encode()
        try:
            cmd = protocol.decode_body(definition.cmd_type, body)
        except ProtocolError as e:
            request.setResponseCode(400)
            return str(e).encode()
        if not protocol.url_under(callback_url, host.callback_prefixes):
            request.setResponseCode(403)
            log.warn("refused {path} for host {key}: callback URL {url!r} is not under {ok}",
                     path=path, key=key, url=callback_url[:200], ok=host.callback_prefixes)
            return (f"callbackurl {callback_url[:200]!r} is not under the management node URLs "
                    f"agreed at connect {list(host.callback_prefixes)}").encode()
        if self.tasks.seen(taskuuid):
            self.stats["duplicates"] += 1
            return b""
        self.stats["accepted"] += 1
        trace_id = protocol.trace_id_of(headers.getRawHeaders(_TRACE))
        if trace_id is not None:
            log.info("accepted {path} task {task} for host {key}", path=path, task=taskuuid,
                     key=key, trace_id=trace_id)
        self._accepted(definition, handler, host, taskuuid, callback_url, cmd, trace_id)
        return b""

    # --- the asynchronous pattern ---------------------------------------------------------

    def _accepted(self, definition: CommandDef, handler: Handler, host: HostState,
                  taskuuid: str, callback_url: str, cmd: Message,
                  trace_id: str | None = None) -> None:
        faults = self._faults
        if faults.crash_after_accept_rate and self._rng.random() < faults.crash_after_accept_rate:
            log.info("simulated crash of host {key} after accepting {task}", key=host.key,
                     task=taskuuid)
            self.crash_host(host.key)
            return
        silent = bool(faults.never_callback_rate) and (
            self._rng.random() < faults.never_callback_rate
        )
        secret = host.secret
        d = self._handle(definition, handler, host, cmd)
        if silent:
            d.addErrback(lambda f: None)
            return
        d.addCallback(self._send_result, host, taskuuid, callback_url, secret, trace_id)
        d.addErrback(
            lambda f: log.failure("callback of {task} failed", f, task=taskuuid)
        )
        self._track(d)

    def _handle(self, definition: CommandDef, handler: Handler, host: HostState,
                cmd: Message) -> Deferred[Response]:
        try:
            result = handler(host, cmd)
        except Exception:
            result = fail()
        if not isinstance(result, Deferred):
            result = succeed(result)

        def failed(reason: Failure) -> Response:
            if not reason.check(HypervisorError, ProtocolError):
                log.failure("{path} failed on host {key}", reason, path=definition.path,
                            key=host.key)
            return definition.rsp_type(success=False, error=_error_text(reason))

        return result.addErrback(failed)

    def _send_result(self, rsp: Response, host: HostState, taskuuid: str, url: str,
                     secret: str, trace_id: str | None = None) -> Deferred[bool] | None:
        if self._hosts.get(host.key) is not host:
            return None  # the host crashed meanwhile: its work is lost
        body = rsp.to_json()
        headers = {
            _TASK: [taskuuid.encode("utf-8")],
            SIGNATURE_HEADER.encode("ascii"): [
                protocol.sign(secret, taskuuid, body).encode("ascii")
            ],
            b"content-type": [_JSON],
        }
        if trace_id is not None:
            headers[_TRACE] = [trace_id.encode("ascii")]
            log.info("calling back task {task} for host {key} (success={success})",
                     task=taskuuid, key=host.key, success=rsp.success, trace_id=trace_id)
        if self._policy.time_slice is None:
            return self._post(url, body, headers, taskuuid, 1)
        done: Deferred[bool] = Deferred()
        self._outbox.append((host, url, body, headers, taskuuid, done))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._clock.callLater(0, self._flush)
        return done

    def _flush(self) -> None:
        """
        POST queued callbacks for at most one time slice, then let the reactor run (see
        Note [callback outbox]).
        """
        self._flush_scheduled = False
        clock, outbox = self._clock, self._outbox
        until = clock.seconds() + self._policy.time_slice
        hosts = self._hosts
        while outbox:
            host, url, body, headers, taskuuid, done = outbox.popleft()
            if hosts.get(host.key) is not host:
                done.callback(False)  # the host crashed meanwhile: its work is lost
                continue
            self._post(url, body, headers, taskuuid, 1).chainDeferred(done)
            if clock.seconds() >= until:
                break
        if outbox:
            self._flush_scheduled = True
            clock.callLater(0, self._flush)

    def _post(self, url: str, body: bytes, headers: Mapping, taskuuid: str,
              attempt: int) -> Deferred[bool]:
        policy = self._policy
        # The semaphore bounds POSTs in flight, not backoff sleeps.
        d = self._sem.run(self._http.post, url, data=body, headers=headers,
                          timeout=policy.timeout, reactor=self._clock,
                          allow_redirects=False, unbuffered=True)

        def answered(response: Any) -> Any:
            code = response.code
            if 200 <= code < 300:
                self.stats["callbacks"] += 1
                return True
            if 400 <= code < 500 and code not in (408, 429):
                self.stats["callback_failures"] += 1
                log.warn("callback {task} refused with {code}; not retrying", task=taskuuid,
                         code=code)
                return False
            return retry(f"HTTP {code}")

        def errored(reason: Failure) -> Any:
            return retry(f"{type(reason.value).__name__}: {reason.value}")

        def retry(why: str) -> Any:
            if attempt >= policy.max_attempts:
                self.stats["callback_failures"] += 1
                log.warn("callback {task} to {url} given up after {n} attempts: {why}",
                         task=taskuuid, url=url, n=attempt, why=why)
                return False
            delay = policy.delay(attempt, self._rng)
            return deferLater(self._clock, delay, self._post, url, body, headers, taskuuid,
                              attempt + 1)

        return d.addCallbacks(answered, errored)

    # --- agent-initiated commands --------------------------------------------------------

    def report(self, key: str, path: str, cmd: Message) -> Deferred[bool]:
        """
        POST an agent-initiated command (a path of L{agent.protocol.REPORTS}) for host C{key}
        to the management node's C{sendCommandUrl}, signed, retried as callbacks are.

        @return: a Deferred firing with whether the management node acknowledged it (False,
            without sending, if the host is not connected or has no C{sendCommandUrl}).
        """
        host = self._hosts.get(key)
        if host is None or host.secret is None or not host.send_command_url:
            return succeed(False)
        taskuuid = uuid.uuid4().hex
        body = cmd.to_json()
        headers = {
            _TASK: [taskuuid.encode("ascii")],
            protocol.COMMAND_PATH_HEADER.encode("ascii"): [path.encode("utf-8")],
            protocol.RESOURCE_UUID_HEADER.encode("ascii"): [host.host_uuid.encode("utf-8")],
            SIGNATURE_HEADER.encode("ascii"): [
                protocol.sign_report(host.secret, path, taskuuid, body).encode("ascii")
            ],
            b"content-type": [_JSON],
        }
        d = self._post(host.send_command_url, body, headers, taskuuid, 1)
        self._track(d)
        return d

    def report_vm_state(self, key: str, vm_uuid: str, state: str) -> Deferred[bool]:
        """
        Tell the management node that a VM of host C{key} changed state on its own
        (C{/kvm/reportvmstate}), numbered with the host's next report sequence number (see
        Note [report order] in L{agent.protocol}).
        """
        host = self._hosts.get(key)
        if host is None or host.host_uuid is None:
            return succeed(False)
        host.report_seq += 1
        return self.report(key, protocol.REPORT_VM_STATE_PATH, protocol.ReportVmStateCmd(
            host_uuid=host.host_uuid, vm_uuid=vm_uuid, vm_state=state, seq=host.report_seq))

    # --- synchronous host URIs ------------------------------------------------------------

    def _echo(self, host: HostState, cmd: Message) -> Response:
        return protocol.EchoRsp()

    def _connect(self, host: HostState, cmd: protocol.ConnectCmd) -> Response:
        host.host_uuid = cmd.host_uuid
        host.secret = cmd.callback_secret
        host.send_command_url = cmd.send_command_url
        host.callback_prefixes = protocol.allowed_callback_prefixes(cmd)
        host.report_seq = 0
        log.info("host {key} connected as {uuid}", key=host.key, uuid=cmd.host_uuid)
        return protocol.ConnectRsp()

    def _ping(self, host: HostState, cmd: protocol.PingCmd) -> Response:
        return protocol.PingRsp(host_uuid=host.host_uuid)
