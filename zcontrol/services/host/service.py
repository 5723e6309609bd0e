# -*- test-case-name: tests.test_host_service -*-
"""
The host service: add, connect, ping, reconnect and VM-state reconciliation of KVM hosts, on
the bus, with hosts in the store and commands through the agent client.

Lifecycle (ZStack's C{KVMHost} and C{HostTrackImpl})
=====================================================
 - B{add}: a L{FlowChain} C{add-host}: C{insert-host} (the host C{Connecting}), then
   C{connect-host}; if a flow fails, each flow that ran undoes its own work (the row is
   deleted, the callback secret forgotten) and the add fails with C{HOST.1000}.
 - B{connect}: C{Connecting}; echo the agent until it answers (at most C{connect_timeout});
   C{/host/connect} with a fresh callback secret; C{/host/fact} and C{/host/capacity}; the
   capacity into the store (totals, keeping what is reserved); C{Connected}. A failure leaves
   the host C{Disconnected} (C{HOST.1001} wrapping the cause).
 - B{track}: every C{ping_interval} seconds, the hosts this node owns (the bus's hash ring)
   are pinged with at most C{ping_parallelism} pings in flight (C{send_stepping}). A ping
   that fails C{max_ping_failures} times in a row makes a Connected host C{Disconnected} and,
   with C{auto_reconnect}, starts a reconnect. A ping answered with another host uuid (the
   agent restarted or was taken over) forces a reconnect; so does a successful ping of a
   Disconnected host. With C{vm_sync_on_ping}, a successful ping is followed by a VM sync.
 - B{VM states}: the VM sync (C{/vm/vmsync}) and the agent's C{/kvm/reportvmstate} are
   reconciled B{with the VM service} (Note [VM states]). With C{vm_sync_on_ping}, the
   connect of a host that was Disconnected, or has VMs recorded Unknown, is followed by a
   VM sync too, so that those VMs come back to what it runs at once rather than at the
   next ping.

Note [VM states]: the host service observes and the VM service decides. It never writes a
VM's state: every difference between the host and the store becomes a
L{zcontrol.services.vm.messages.VmStateChangedOnHostMsg} routed by the VM's uuid to its
owner, which decides in the VM's chain C{vm-<uuid>}, so that a report never races an
operation on the VM (L{zcontrol.services.vm.hoststate}: a Running VM its host reports
Stopped becomes Stopped and gives back its capacity, strangers are reported, not adopted,
...). The sync reads the store's VMs before it asks the agent, and sends the state it read
(ZStack's C{vmStateAtTracingMoment}): a VM whose state changed meanwhile was changed by an
operation, and the report about it is stale.

Note [chain tasks per host]: commands to one host go through the chain-task queue under
C{host-<uuid>} with C{host_sync_level} (ZStack: 10) slots, so no host gets more than that many
commands in flight however many VM operations target it; connect and ping are serialised per
host under C{host-connect-<uuid>} so two reconnects never interleave.

Note [deadlines]: a command's timeout runs from when L{HostService.call} is called, not from
when it leaves the host's chain: the time it waits for a slot counts, and the deadline of the
bus message being handled (if earlier) caps it; the chain drops a command whose deadline
passed while it waited, and L{HostService.call} reports that as the agent client reports a
command that waited for a connection slot: C{AGENT.1000}, not sent (the chain's C{SYS.1001}
as its cause); the agent call gets the same deadline.
Connect, ping and VM sync inherit the deadline of the message that caused them. Work the
service starts on its own (a reconnect after failed pings, a VM sync after a ping) is new
work: it runs with its own timeouts, not the deadline of the ping that triggered it.

Note [one host per agent]: two hosts may not share an agent, however its address is spelt:
C{managementIp} is stored as the user gave it (as ZStack does, so the inventory shows what was
typed), and the uniqueness check compares L{canonical_agent_url} forms (C{127.0.0.1},
C{http://127.0.0.1:7070/} and C{http://127.0.0.1:7070/hosts/0} are one agent host). The add
checks before inserting (C{HOST.1004} naming the existing host), maps the store's unique-key
error on the same text (a concurrent add that won the race) to C{HOST.1004} too, and checks
again after inserting, so that two concurrent adds of different spellings of one agent (on
this node or two) never both succeed: the one that committed last sees the other and rolls
back (in a tight race both may, and both callers get C{HOST.1004}).

Note [lost work]: a ping (or the ping that precedes every connect) answered with no host uuid
means the agent restarted and forgot the connect, and with it the commands it had accepted:
they are failed at once (C{AGENT.1001}) rather than left to their timeouts.
"""

from __future__ import annotations

import ipaddress
import uuid as uuidlib
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from agent import protocol as p
from zcontrol._defer import DeferWaiter, async_to_deferred, maybe_deferred
from zcontrol.agentclient.errors import AGENT
from zcontrol.bus.message import Reply, new_id
from zcontrol.bus.publishing import publish_after_commit
from zcontrol.config import HostConfig
from zcontrol.core.chain import ChainTaskQueue
from zcontrol.core.deadline import current_deadline, deadline_scope
from zcontrol.core.errors import SYS, OperationError, error_code, from_failure
from zcontrol.core.flow import FlowChain, flow
from zcontrol.db.interfaces import DB
from zcontrol.db.query import Condition, Query
from zcontrol.services import validate
from zcontrol.services.cluster.messages import CLUSTER, HYPERVISOR_TYPES
from zcontrol.services.host.interfaces import IHostService
from zcontrol.services.host.messages import (
    HOST,
    SERVICE_ID,
    AddHostMsg,
    ConnectHostMsg,
    HostReply,
    HostStatusChangedEvent,
    KVMHostAsyncHttpCallMsg,
    KVMHostAsyncHttpCallReply,
    PingHostMsg,
    PingHostReply,
)
from zcontrol.services.host.operations import HostOperations
from zcontrol.services.vm.messages import SERVICE_ID as VM_SERVICE_ID
from zcontrol.services.vm.messages import VmStateChangedOnHostMsg
from zcontrol.services.vm.states import INTERMEDIATE_STATES
from zcontrol.services.zone.messages import ZONE

__all__ = ["HostConfig", "HostService", "agent_base_url", "canonical_agent_url"]

log = Logger()

CONNECTING, CONNECTED, DISCONNECTED = "Connecting", "Connected", "Disconnected"
_STOPPED = "Stopped"
#: States in which a VM the store does not place on the host is reported by the sync.
_RUNNING = ("Running", "Paused")


def agent_base_url(management_ip: str, agent_port: int) -> str:
    """
    The agent base URL of a host whose C{managementIp} is C{management_ip}.
    """
    if "://" in management_ip:
        return management_ip.rstrip("/")
    return f"http://{management_ip}:{agent_port}"


_DEFAULT_PORTS = {"http": 80, "https": 443}


def canonical_agent_url(management_ip: str, agent_port: int) -> str:
    """
    The one spelling of the agent base URL that C{management_ip} names, so that two
    spellings of one agent compare equal: the scheme and host name lower-cased, an IP
    address in its compressed form, the port explicit (a bare IP or name means
    C{agent_port}; a URL without a port the scheme's), no trailing C{/}, and the path
    C{/hosts/0} dropped (an agent serves its host 0 without the prefix too, see
    L{agent.protocol}). C{127.0.0.1}, C{http://127.0.0.1:7070/} and
    C{http://127.0.0.1:7070/hosts/0} all give C{http://127.0.0.1:7070}.

    @raise OperationError: C{SYS.1007} (C{field} C{managementIp}) when C{management_ip} is
        not a host name, IP address or C{http(s)} URL with a host.
    """
    def bad(why: str) -> OperationError:
        return OperationError.of(
            SYS.INVALID_ARGUMENT_ERROR, f"managementIp {management_ip!r} {why}",
            field="managementIp", value=management_ip)

    if not isinstance(management_ip, str) or not management_ip.strip():
        raise bad("is empty")
    if len(management_ip) > 255:
        raise validate.invalid("managementIp", management_ip, "must be at most 255 characters")
    if validate.has_control(management_ip):
        raise validate.invalid("managementIp", management_ip,
                               "must not contain control characters")
    if management_ip != management_ip.strip() or any(c.isspace() for c in management_ip):
        raise bad("contains white space")
    parts = urlsplit(agent_base_url(management_ip, agent_port))
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise bad("is not an http or https URL, an IP address or a host name")
    try:
        port = parts.port
    except ValueError:
        raise bad("has an invalid port") from None
    host = parts.hostname
    if not host or parts.query or parts.fragment or parts.username or parts.password:
        raise bad("must be an IP address, a host name or an agent base URL "
                  "(scheme://host[:port][/hosts/<id>])")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        host = f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
    if port is None:
        port = _DEFAULT_PORTS[scheme]
    path = parts.path.rstrip("/")
    if path == p.HOSTS_PREFIX + "0":
        path = ""
    return f"{scheme}://{host}:{port}{path}"


def _like_pattern(canonical: str) -> str:
    """
    A C{~=} (LIKE) pattern matched by every spelling of C{canonical} (and more: callers
    compare canonical forms after): the host with each letter a one-character wildcard (host
    names are case-insensitive; the stores' LIKE is not), an IPv6 address only by its
    bracket.
    """
    host = urlsplit(canonical).netloc.rsplit(":", 1)[0]
    if host.startswith("["):
        return "%[%"
    out = []
    for c in host:
        if c.isalpha():
            out.append("_")
        elif c in "%_\\":
            out.append("\\" + c)
        else:
            out.append(c)
    return "%" + "".join(out) + "%"


@implementer(IHostService)
class HostService(HostOperations):
    """
    The host service on one management node (its administrative operations, change state,
    update, reconnect and delete, are in L{HostOperations}).
    """

    def __init__(self, clock: Any, bus: Any, store: Any, agents: Any,
                 config: HostConfig = HostConfig(), queue: ChainTaskQueue | None = None) -> None:
        self._clock = clock
        self._bus = bus
        self._store = store
        self._agents = agents
        self.config = config
        self._own_queue = queue is None
        self._queue = queue if queue is not None else ChainTaskQueue(clock)
        self._failures: dict[str, int] = {}
        self._facts: dict[str, p.HostFactRsp] = {}
        self._waiter = DeferWaiter()
        self._tracker: LoopingCall | None = None
        self._round: Deferred | None = None
        #: Tracker rounds skipped because the previous one was still running.
        self.skipped_rounds = 0

    # --- lifecycle --------------------------------------------------------------------------

    def start(self, track: bool = True) -> None:
        """
        Serve the C{host} service on the bus and (with C{track}) start the periodic ping.
        """
        self._bus.register_service(SERVICE_ID, self.handle)
        if track:
            self._tracker = LoopingCall(self._track_once)
            self._tracker.clock = self._clock
            self._tracker.start(self.config.ping_interval, now=False).addErrback(
                lambda f: log.failure("host tracker stopped", f)
            )

    def stop(self, drain_timeout: float | None = None) -> Deferred[None]:
        """
        Stop tracking and serving, and wait for the work in flight (reconnects, tracks, the
        commands in the hosts' chains) for at most C{drain_timeout} seconds (default: the
        config's C{drain_timeout}). Work still in flight then is failed: tasks waiting in a
        host's chain never run and running ones are cancelled, with C{SYS.1017} saying that
        the host service is stopping (an agent command's own 300 s are not waited out).

        @return: a Deferred firing once drained, or at the drain limit.
        """
        if self._tracker is not None and self._tracker.running:
            self._tracker.stop()
        self._bus.unregister_service(SERVICE_ID)
        limit = self.config.drain_timeout if drain_timeout is None else drain_timeout
        drained = self._waiter.wait()
        if drained.called:
            self._close_queue("the host service stopped")
            return drained
        done: Deferred[None] = Deferred()

        def give_up() -> None:
            log.error("host service: {n} piece(s) of work still in flight after the {s}s "
                      "drain limit; failing them", n=len(self._waiter), s=limit)
            self._close_queue(f"the host service is stopping (drain limit of {limit:g}s "
                              "reached)")
            for d in list(self._waiter._waiting):  # what is not in the queue
                d.cancel()
            if not done.called:
                done.callback(None)

        timer = self._clock.callLater(limit, give_up)

        def finished(_: Any) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                self._close_queue("the host service stopped")
                done.callback(None)

        drained.addBoth(finished)
        return done

    def _close_queue(self, reason: str) -> None:
        # A queue given by the caller may be shared: its owner closes it.
        if self._own_queue:
            self._queue.close(reason)

    def report_handlers(self) -> dict[str, Any]:
        """
        The agent-initiated commands this service handles, for
        L{zcontrol.agentclient.CallbackEndpoint.on_report}.
        """
        return {p.REPORT_VM_STATE_PATH: self.report_vm_state}

    def facts(self, host_uuid: str) -> p.HostFactRsp | None:
        """
        The facts the host reported at its last connect (the store has no system tags yet).
        """
        return self._facts.get(host_uuid)

    # --- bus ------------------------------------------------------------------------------

    def handle(self, msg: Any) -> Any:
        """
        The bus handler of the C{host} service.
        """
        if isinstance(msg, PingHostMsg):
            return self.ping(validate.uuid(msg.host_uuid, "hostUuid")).addCallback(
                lambda row: PingHostReply(connected=row["status"] == CONNECTED,
                                          status=row["status"])
            )
        if isinstance(msg, ConnectHostMsg):
            return self.connect(validate.uuid(msg.host_uuid, "hostUuid")).addCallback(
                lambda row: HostReply(inventory=row)
            )
        if isinstance(msg, AddHostMsg):
            forwarded = self._add_on_owner(msg)
            if forwarded is not None:
                return forwarded
            return self.add_host(msg).addCallback(lambda row: HostReply(inventory=row))
        if isinstance(msg, KVMHostAsyncHttpCallMsg):
            return self._async_http_call(msg)
        operation = self.handle_operation(msg)
        if operation is not None:
            return operation
        raise OperationError.of(SYS.UNKNOWN_MESSAGE_ERROR,
                                f"the host service does not handle {type(msg).__name__}")

    # --- helpers --------------------------------------------------------------------------

    async def _host(self, host_uuid: str) -> dict[str, Any]:
        row = await self._store.get("host", host_uuid)
        if row is None:
            raise OperationError.of(HOST.NOT_FOUND, f"no host {host_uuid}", hostUuid=host_uuid)
        return row

    def _base(self, row: dict[str, Any]) -> str:
        return agent_base_url(row["managementIp"], self.config.agent_port)

    async def _set_status(self, row: dict[str, Any], status: str, reason: str | None = None,
                          expected: Any = None) -> dict[str, Any]:
        old = row["status"]
        new_row = await self._store.update_host_status(row["uuid"], status, expected)
        if old != status:
            log.info("host {uuid} {old} -> {new}: {reason}", uuid=row["uuid"], old=old,
                     new=status, reason=reason)
            self._background(publish_after_commit(self._bus, HostStatusChangedEvent(
                host_uuid=row["uuid"], old_status=old, new_status=status, reason=reason),
                self._clock), "publishing a host status change")
        return new_row

    def _background(self, d: Deferred, what: str) -> None:
        d.addErrback(lambda f: log.error("{what} failed: {error}", what=what,
                                         error=str(from_failure(f))))
        self._waiter.add(d)

    # --- commands -------------------------------------------------------------------------

    def call(self, host_uuid: str, cmd: p.Message, timeout: float | None = None,
             deadline: float | None = None) -> Deferred[Any]:
        """
        Send C{cmd} to the host's agent through the host's chain (at most C{host_sync_level}
        commands in flight to one host). The timeout (default C{command_timeout}) runs from
        this call, so the time spent waiting in the chain counts; C{deadline} (absolute, on
        the clock) and the current bus deadline cap it (see Note [deadlines]).

        @return: a Deferred firing with the agent's response; fails as
            L{zcontrol.agentclient.IAgentClient.call}, with C{AGENT.1000} when the deadline
            passed while the command waited in the host's chain (it was not sent, retrying is
            safe; the chain's C{SYS.1001} is its cause), with
            C{CHAIN.1000} when too many commands already wait for the host, or with
            C{HOST.1002} when the host is not Connected, C{HOST.1003} when unknown.
        """
        expiry = self._clock.seconds() + (timeout or self.config.command_timeout)
        for cap in (deadline, current_deadline()):
            if cap is not None and cap < expiry:
                expiry = cap

        started: list[bool] = []

        async def run() -> Any:
            started.append(True)
            row = await self._host(host_uuid)
            if row["status"] != CONNECTED:
                raise OperationError.of(HOST.NOT_CONNECTED,
                                        f"host {host_uuid} is {row['status']}",
                                        hostUuid=host_uuid)
            if self._agents.secret_for(self._base(row)) is None:
                row = await self._take_over(host_uuid)
            return await self._agents.call(self._base(row), cmd, deadline=expiry)

        def not_sent(reason: Any) -> Any:
            error = getattr(reason.value, "error", None)
            if started or error is None or error.code != SYS.TIMEOUT:
                return reason
            # The chain dropped it at its deadline: say "not sent" as the agent client does.
            raise OperationError.of(
                AGENT.NOT_SENT, f"not sent: the command to host {host_uuid} waited in the "
                "host's chain until its deadline; nothing reached the agent", cause=error,
                hostUuid=host_uuid)

        return self._run(f"host-{host_uuid}", run, sync_level=self.config.host_sync_level,
                         max_pending=self.config.max_pending_per_host,
                         deadline=expiry).addErrback(not_sent)

    async def _take_over(self, host_uuid: str) -> dict[str, Any]:
        """
        Note [take over]: a Connected host whose callback secret this node does not hold
        was connected by another node (this one took it over when that node left the
        ring, or restarted): reconnect it from here first (once, in its connect chain), so
        that its commands are signed with a secret agreed by this node and their callbacks
        come here.

        @return: the host row, Connected; fails as L{connect}.
        """
        async def reconnect() -> dict[str, Any]:
            row = await self._host(host_uuid)
            if self._agents.secret_for(self._base(row)) is not None:
                return row  # a reconnect queued before this one did it
            log.info("host {uuid}: taking it over (no callback secret here); reconnecting",
                     uuid=host_uuid)
            return await self._connect(host_uuid)

        return await self._run(f"host-connect-{host_uuid}", reconnect)

    def _run(self, signature: str, coroutine_fn: Any, **kwargs: Any) -> Deferred[Any]:
        """
        Run C{coroutine_fn()} in the chain C{signature}, counted as work in flight (a stop
        drains it, see L{stop}).
        """
        return self._waiter.add(self._queue.run(
            signature, lambda: Deferred.fromCoroutine(coroutine_fn()), **kwargs))

    def _async_http_call(self, msg: KVMHostAsyncHttpCallMsg) -> Deferred[Any]:
        host_uuid = validate.uuid(msg.host_uuid, "hostUuid")
        timeout = (validate.seconds(msg.command_timeout, "commandTimeout")
                   if msg.command_timeout is not None else None)
        definition = p.COMMANDS.get(msg.path) if isinstance(msg.path, str) else None
        if definition is None or definition.sync:
            raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR,
                                    f"{msg.path!r} is not an asynchronous agent command",
                                    field="path", value=msg.path)
        try:
            cmd = definition.cmd_type.from_dict(msg.command)
        except p.ProtocolError as e:
            raise OperationError.of(SYS.INVALID_ARGUMENT_ERROR,
                                    f"command for {msg.path}: {e}", field="command") from None
        return self.call(host_uuid, cmd, timeout=timeout).addCallback(
            lambda rsp: KVMHostAsyncHttpCallReply(response=rsp.to_dict()))

    # --- add and connect ------------------------------------------------------------------

    def _add_on_owner(self, msg: AddHostMsg) -> Deferred[Reply] | None:
        """
        Note [add on the owner]: the node that connects a host holds its callback secret
        and is where the agent's callbacks go, so the add runs on the host's owner node
        (its uuid chosen first, C{msg.uuid} set to it); a node that is not the owner
        forwards the message there and returns the owner's reply. None: add here.
        """
        try:
            msg.uuid = (uuidlib.uuid4().hex if msg.uuid is None
                        else validate.uuid(msg.uuid, "uuid"))
        except OperationError:
            return fail()
        if msg.resource_uuid == msg.uuid or self._bus.owner_of(msg.uuid) == self._bus.node_id:
            return None
        forwarded = attrs.evolve(msg, id=new_id(), resource_uuid=msg.uuid, deadline=None,
                                 timeout=None, reply_to=None)
        return self._bus.send(forwarded, self.config.connect_timeout
                              + 3 * self.config.command_timeout)

    def add_host(self, msg: AddHostMsg) -> Deferred[dict[str, Any]]:
        """
        Insert the host and connect it, as a L{FlowChain} (C{add-host}) whose flows undo
        their own work when a later one fails: C{insert-host} deletes the row it inserted
        (never a row it did not insert, e.g. on a duplicate uuid), C{connect-host} forgets
        the callback secret and fails the host's pending commands.

        @return: a Deferred firing with the host row, Connected; fails with C{HOST.1000}
            whose cause is the failing flow's error (e.g. C{HOST.1001} from the connect).
            Rollback errors, if any, are in the cause's C{opaque["rollback_errors"]}. A
            management address taken by another host (see Note [one host per agent]) fails
            with C{HOST.1004} itself (C{opaque}: C{field} C{managementIp}, C{value},
            C{existingHostUuid}, C{agentUrl}), a malformed one with C{SYS.1007}; every
            field is checked first (C{SYS.1007} naming it), an unknown zone or cluster is
            C{ZONE.1000} / C{CLUSTER.1000} naming it, a cluster of another zone C{SYS.1007}
            naming C{clusterUuid}.
        """
        try:
            host_uuid = (uuidlib.uuid4().hex if msg.uuid is None
                         else validate.uuid(msg.uuid, "uuid"))
            name = validate.name(msg.name)
            description = validate.optional_text(msg.description, "description")
            zone_uuid = validate.uuid(msg.zone_uuid, "zoneUuid")
            cluster_uuid = validate.uuid(msg.cluster_uuid, "clusterUuid")
            hypervisor = validate.one_of(msg.hypervisor_type, "hypervisorType",
                                         HYPERVISOR_TYPES)
            management_ip = validate.name(msg.management_ip, "managementIp")
        except OperationError:
            return fail()
        base = agent_base_url(management_ip, self.config.agent_port)

        async def insert(ctx: dict[str, Any]) -> None:
            # Note [one host per agent]: the check before the insert is what a user
            # normally meets; the store's unique key on the text catches a concurrent add of
            # the same text, and the check after the insert one of another spelling.
            canonical = canonical_agent_url(management_ip, self.config.agent_port)
            await self._refuse_taken(management_ip, canonical, host_uuid)
            await self._cluster_in_zone(cluster_uuid, zone_uuid)
            try:
                await self._store.add_host({
                    "uuid": host_uuid, "name": name, "description": description,
                    "zoneUuid": zone_uuid, "clusterUuid": cluster_uuid,
                    "managementIp": management_ip, "hypervisorType": hypervisor,
                    "status": CONNECTING,
                })
            except OperationError as e:
                if e.error.code == DB.DUPLICATE:
                    await self._refuse_taken(management_ip, canonical, host_uuid)
                if e.error.code == DB.REFERENCE:  # the cluster went meanwhile
                    await self._cluster_in_zone(cluster_uuid, zone_uuid)
                raise
            ctx["inserted"] = True
            await self._refuse_taken(management_ip, canonical, host_uuid)

        async def uninsert(ctx: dict[str, Any]) -> None:
            if ctx.get("inserted"):
                await self._store.delete("host", host_uuid)

        async def connect(ctx: dict[str, Any]) -> None:
            ctx["row"] = await self.connect(host_uuid)

        def disconnect(ctx: dict[str, Any]) -> None:
            self._facts.pop(host_uuid, None)
            self._failures.pop(host_uuid, None)
            self._agents.forget(base, f"adding host {host_uuid} failed")

        # Flows after the first are started from callbacks, outside the handler's context:
        # each runs under the deadline of the message that asked for the host.
        deadline = current_deadline()

        def scoped(fn: Any) -> Any:
            return lambda ctx: deadline_scope(
                deadline, lambda: maybe_deferred(fn, ctx))

        chain = FlowChain("add-host", [
            flow("insert-host", scoped(insert), uninsert),
            flow("connect-host", scoped(connect), disconnect),
        ])

        def failed(reason: Any) -> Any:
            err = from_failure(reason)
            cause = err.cause if err.cause is not None and err.location else err
            if err.opaque.get("rollback_errors"):
                cause = err
            elif cause.code in (HOST.DUPLICATE_MANAGEMENT_IP, SYS.INVALID_ARGUMENT_ERROR,
                                ZONE.NOT_FOUND, CLUSTER.NOT_FOUND):
                raise OperationError(cause)  # the caller's argument: its own code
            raise OperationError(error_code(HOST.ADD_ERROR, f"cannot add host {name}",
                                            cause, hostUuid=host_uuid))

        return chain.run({}).addCallbacks(lambda ctx: ctx["row"], failed)

    async def _cluster_in_zone(self, cluster_uuid: str, zone_uuid: str) -> None:
        """
        Raise C{CLUSTER.1000} or C{ZONE.1000} naming the unknown one, or C{SYS.1007} naming
        C{clusterUuid} when the cluster is in another zone.
        """
        cluster = await self._store.get("cluster", cluster_uuid)
        if cluster is not None and cluster["zoneUuid"] == zone_uuid:
            return
        if await self._store.get("zone", zone_uuid) is None:
            raise OperationError.of(ZONE.NOT_FOUND, f"no zone with uuid {zone_uuid}",
                                    resource="zone", uuid=zone_uuid, field="zoneUuid")
        if cluster is None:
            raise OperationError.of(CLUSTER.NOT_FOUND, f"no cluster with uuid {cluster_uuid}",
                                    resource="cluster", uuid=cluster_uuid, field="clusterUuid")
        raise OperationError.of(
            SYS.INVALID_ARGUMENT_ERROR,
            f"clusterUuid {cluster_uuid} is a cluster of zone {cluster['zoneUuid']}, not of "
            f"zone {zone_uuid}", field="clusterUuid", value=cluster_uuid)

    async def _refuse_taken(self, management_ip: str, canonical: str, host_uuid: str) -> None:
        """
        Raise C{HOST.1004} if a host other than C{host_uuid}, or a backup storage, is at the
        agent C{canonical} (L{zcontrol.services.agenturls}).
        """
        from zcontrol.services.agenturls import resources_at

        others = [(kind, r) for kind, r in await resources_at(
            self._store, canonical, self.config.page_size, {"host": self.config.agent_port})
            if not (kind == "host" and r["uuid"] == host_uuid)]
        if not others:
            return
        kind, other = others[0]
        if kind == "host":
            raise OperationError.of(
                HOST.DUPLICATE_MANAGEMENT_IP,
                f"managementIp {management_ip!r} names the agent {canonical} of host "
                f"{other['uuid']} ({other['name']!r}, managementIp {other['managementIp']!r})",
                field="managementIp", value=management_ip, existingHostUuid=other["uuid"],
                agentUrl=canonical)
        raise OperationError.of(
            HOST.DUPLICATE_MANAGEMENT_IP,
            f"managementIp {management_ip!r} names the agent {canonical} of backup storage "
            f"{other['uuid']} ({other['name']!r}, hostname {other['hostname']!r}); one agent "
            "address serves one host or backup storage",
            field="managementIp", value=management_ip,
            existingBackupStorageUuid=other["uuid"], agentUrl=canonical)

    def connect(self, host_uuid: str) -> Deferred[dict[str, Any]]:
        """
        (Re)connect the host (serialised per host with pings).

        @return: a Deferred firing with the host row, Connected; fails with C{HOST.1001}
            wrapping the cause (the host is then Disconnected), or C{HOST.1003}.
        """
        return self._run(f"host-connect-{host_uuid}", lambda: self._connect(host_uuid))

    async def _connect(self, host_uuid: str) -> dict[str, Any]:
        row = await self._host(host_uuid)
        was = row["status"]
        base = self._base(row)
        row = await self._set_status(row, CONNECTING, "connecting")
        try:
            await self._echo_until_up(host_uuid, base)
            ping = await self._agents.call(base, p.PingCmd(host_uuid=host_uuid),
                                           timeout=self.config.ping_timeout)
            if ping.host_uuid is None:
                self._agents.lost_work(base, f"the agent of host {host_uuid} restarted "
                                             "(it answers as never connected)")
            await self._agents.connect(base, host_uuid, self.config.send_command_url,
                                       timeout=self.config.echo_timeout * 2)
            fact = await self._agents.call(base, p.HostFactCmd(),
                                           timeout=self.config.command_timeout)
            capacity = await self._agents.call(base, p.HostCapacityCmd(),
                                               timeout=self.config.command_timeout)
            await self._store.set_host_capacity(host_uuid, capacity.cpu_num,
                                                capacity.total_memory, capacity.cpu_num)
        except OperationError as e:
            await self._set_status(row, DISCONNECTED, str(e.error))
            raise OperationError(error_code(HOST.CONNECT_ERROR,
                                            f"cannot connect host {host_uuid} at {base}",
                                            e.error, hostUuid=host_uuid)) from None
        self._facts[host_uuid] = fact
        self._failures[host_uuid] = 0
        row = await self._set_status(row, CONNECTED, "connected")
        if self.config.vm_sync_on_ping and (was == DISCONNECTED
                                            or await self._has_unknown_vms(host_uuid)):
            # New work, not bounded by the connect's deadline (Note [deadlines]).
            self._background(deadline_scope(None, self.sync_vms, host_uuid),
                             f"VM sync of host {host_uuid} after its reconnect")
        return row

    async def _has_unknown_vms(self, host_uuid: str) -> bool:
        page = await self._store.query("vmInstance", Query(
            conditions=[Condition("hostUuid", "=", host_uuid), Condition("state", "=",
                                                                         "Unknown")],
            fields=["uuid"], limit=1))
        return bool(page.inventories)

    async def _echo_until_up(self, host_uuid: str, base: str) -> None:
        """
        Echo the agent until it answers, for at most C{connect_timeout} seconds
        (L{zcontrol.services.agenturls.echo_until_up}).
        """
        from zcontrol.services.agenturls import echo_until_up

        await echo_until_up(self._clock, self._agents, base, what=f"host {host_uuid}",
                            connect_timeout=self.config.connect_timeout,
                            echo_interval=self.config.echo_interval,
                            echo_timeout=self.config.echo_timeout,
                            setting="host.connect_timeout")

    # --- ping -----------------------------------------------------------------------------

    def ping(self, host_uuid: str) -> Deferred[dict[str, Any]]:
        """
        Ping the host once and act on the outcome (see the module docstring).

        @return: a Deferred firing with the host row after the ping.
        """
        return self._run(f"host-connect-{host_uuid}", lambda: self._ping(host_uuid))

    async def _ping(self, host_uuid: str) -> dict[str, Any]:
        row = await self._host(host_uuid)
        if row["status"] == CONNECTING:
            return row
        base = self._base(row)
        try:
            rsp = await self._agents.call(base, p.PingCmd(host_uuid=host_uuid),
                                          timeout=self.config.ping_timeout)
        except OperationError as e:
            failures = self._failures.get(host_uuid, 0) + 1
            self._failures[host_uuid] = failures
            log.info("ping of host {uuid} failed ({n}): {error}", uuid=host_uuid, n=failures,
                     error=str(e.error))
            if failures >= self.config.max_ping_failures and row["status"] == CONNECTED:
                try:
                    row = await self._set_status(row, DISCONNECTED,
                                                 f"{failures} pings failed: {e.error}",
                                                 expected=CONNECTED)
                except OperationError:
                    return await self._host(host_uuid)
                if self.config.auto_reconnect:
                    self._reconnect_later(host_uuid)
            return row
        self._failures[host_uuid] = 0
        if rsp.host_uuid != host_uuid:
            log.info("host {uuid}: agent answered as {other}; reconnecting", uuid=host_uuid,
                     other=rsp.host_uuid)
            if rsp.host_uuid is None:
                self._agents.lost_work(base, f"the agent of host {host_uuid} restarted (its "
                                             "ping answers as never connected)")
            self._reconnect_later(host_uuid)
        elif row["status"] == DISCONNECTED or self._agents.secret_for(base) is None:
            # Disconnected, or connected by another node (Note [take over]): its callbacks
            # and reports must come here.
            self._reconnect_later(host_uuid)
        elif self.config.vm_sync_on_ping:
            # New work, not bounded by the ping's deadline (Note [deadlines]).
            self._background(deadline_scope(None, self.sync_vms, host_uuid),
                             f"VM sync of host {host_uuid}")
        return row

    def _reconnect_later(self, host_uuid: str) -> None:
        # Queued behind the current ping in the host's connect chain; new work, not bounded
        # by the ping's deadline (Note [deadlines]).
        self._background(deadline_scope(None, self.connect, host_uuid),
                         f"reconnect of host {host_uuid}")

    async def _my_hosts(self) -> list[str]:
        uuids: list[str] = []
        start = 0
        while True:
            page = await self._store.query("host", Query(
                fields=["uuid"], sort="uuid", limit=self.config.page_size, start=start))
            uuids.extend(r["uuid"] for r in page.inventories)
            if len(page.inventories) < self.config.page_size:
                break
            start += self.config.page_size
        return [u for u in uuids if self._bus.owner_of(u) == self._bus.node_id]

    @async_to_deferred
    async def track_once(self) -> int:
        """
        Ping every host this node owns, at most C{ping_parallelism} at a time.

        @return: a Deferred firing with the number of hosts pinged.
        """
        mine = await self._my_hosts()
        messages = (PingHostMsg(service_id=SERVICE_ID, resource_uuid=u, host_uuid=u,
                                timeout=self.config.ping_timeout * 3) for u in mine)

        def on_reply(msg: PingHostMsg, reply: Reply) -> None:
            if not reply.success:
                log.info("ping of {uuid}: {error}", uuid=msg.host_uuid, error=str(reply.error))

        await self._bus.send_stepping(messages, self.config.ping_parallelism, on_reply)
        return len(mine)

    @async_to_deferred
    async def reconnect_all(self, parallelism: int | None = None) -> int:
        """
        Reconnect every host this node owns, at most C{parallelism} (default:
        C{ping_parallelism}) at a time, as ZStack does at boot: callback secrets live in
        memory only, so a starting management node must agree new ones.

        @return: a Deferred firing with the number of hosts connected.
        """
        mine = await self._my_hosts()
        connected = []
        messages = (ConnectHostMsg(service_id=SERVICE_ID, resource_uuid=u, host_uuid=u,
                                   timeout=self.config.connect_timeout * 2) for u in mine)

        def on_reply(msg: ConnectHostMsg, reply: Reply) -> None:
            if reply.success:
                connected.append(msg.host_uuid)
            else:
                log.info("reconnect of {uuid}: {error}", uuid=msg.host_uuid,
                         error=str(reply.error))

        await self._bus.send_stepping(messages, parallelism or self.config.ping_parallelism,
                                      on_reply)
        return len(connected)

    def _track_once(self) -> None:
        # Rounds never overlap: a round slower than the ping interval makes the next one
        # skip (LoopingCall would not wait, since the round runs in the background).
        if self._round is not None:
            self.skipped_rounds += 1
            log.warn("host tracking: the previous round is still running after "
                     "{s}s; skipping this one", s=self.config.ping_interval)
            return
        d = self._round = self.track_once()

        def ended(result: Any) -> Any:
            self._round = None
            return result

        d.addBoth(ended)
        self._background(d, "host tracking")

    # --- VM states ------------------------------------------------------------------------

    @async_to_deferred
    async def sync_vms(self, host_uuid: str) -> int:
        """
        Reconcile the store's VMs on the host with the host's own list (C{/vm/vmsync}), with
        the VM service deciding (Note [VM states]): the store's VMs on the host are read
        first, then the agent's list; each VM whose stable state differs, and each VM the
        host runs that the store does not place on it, becomes a L{VmStateChangedOnHostMsg}
        to the VM's owner (at most C{ping_parallelism} in flight), which decides in the VM's
        chain. A VM the store has on the host and the host does not list is reported
        C{Stopped} (ZStack's C{VmTracer.handleMissingVm}).

        @return: a Deferred firing with the number of VMs whose record the VM service
            changed; fails as L{call} when the host cannot be asked.
        """
        # The store before the agent (ZStack's vmStateAtTracingMoment): a VM whose state
        # changes between the two reads is one an operation changed, and the VM service
        # ignores the report about it.
        page = await self._store.query("vmInstance", Query(
            # A Condition, not the text "hostUuid=<uuid>": the parser trims text, which
            # would make the sync of host "h1 " read the VMs of host "h1".
            conditions=[Condition("hostUuid", "=", host_uuid)], fields=["uuid", "state"],
            limit=100_000))
        known = {vm["uuid"]: vm["state"] for vm in page.inventories}
        rsp = await self.call(host_uuid, p.VmSyncCmd(), timeout=self.config.ping_timeout * 3)
        reports: list[VmStateChangedOnHostMsg] = []
        for vm_uuid, state in known.items():
            actual = rsp.states.get(vm_uuid, _STOPPED)
            if state == actual or state in INTERMEDIATE_STATES:
                continue
            reports.append(self._vm_report(host_uuid, vm_uuid, actual, state))
        for vm_uuid, actual in rsp.states.items():
            if vm_uuid not in known and actual in _RUNNING:
                reports.append(self._vm_report(host_uuid, vm_uuid, actual, None))
        changed: list[str] = []

        def on_reply(msg: VmStateChangedOnHostMsg, reply: Reply) -> None:
            if not reply.success:
                log.warn("host {host}: the VM service did not take the report of VM {vm} "
                         "({state}): {error}", host=host_uuid, vm=msg.vm_instance_uuid,
                         state=msg.state, error=str(reply.error))
            elif getattr(reply, "changed", False):
                changed.append(msg.vm_instance_uuid)

        if reports:
            await self._bus.send_stepping(reports, self.config.ping_parallelism, on_reply)
        return len(changed)

    def _vm_report(self, host_uuid: str, vm_uuid: str, state: str, expected: str | None,
                   from_sync: bool = True) -> VmStateChangedOnHostMsg:
        return VmStateChangedOnHostMsg(
            service_id=VM_SERVICE_ID, resource_uuid=vm_uuid, vm_instance_uuid=vm_uuid,
            host_uuid=host_uuid, state=state, from_host_sync=from_sync,
            vm_state_at_tracing_moment=expected, timeout=self.config.ping_timeout * 3)

    @async_to_deferred
    async def report_vm_state(self, cmd: p.ReportVmStateCmd) -> bool:
        """
        Handle the agent's C{/kvm/reportvmstate}: tell the VM's owner (a
        L{VmStateChangedOnHostMsg}) and wait for its decision (Note [VM states]).

        @return: a Deferred firing with whether the VM's record was changed; fails (the
            agent is answered 500 and retries) when the VM service could not be reached.
        """
        reply = await self._bus.send(self._vm_report(cmd.host_uuid, cmd.vm_uuid,
                                                     cmd.vm_state, None, from_sync=False))
        if not reply.success:
            if reply.error.code == SYS.INVALID_ARGUMENT_ERROR:
                log.warn("host {host} reports VM {vm} as {state}: refused ({error})",
                         host=cmd.host_uuid, vm=cmd.vm_uuid, state=cmd.vm_state,
                         error=str(reply.error))
                return False
            raise OperationError(reply.error)
        return bool(getattr(reply, "changed", False))
