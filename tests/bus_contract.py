"""
The bus contract: one behaviour suite that every L{IBus} implementation passes.

A test case mixes in L{BusContractMixin} and defines C{make_buses(count, clock,
registries=None)}: C{count} started buses of one cluster (management nodes that see each
other), their timers on C{clock} (a L{task.Clock}, so that timeouts are driven by the test),
their I/O on the real reactor, stopped by a cleanup. It also defines C{kill_node(bus)}: make
the others see C{bus}'s node die, as its heartbeat expiring would.

Tests wait on Deferreds that handlers fire, never on time.
"""

from __future__ import annotations

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from zcontrol.bus.interfaces import IBus, ISubscription
from zcontrol.bus.message import Event, Message, NeedReplyMessage, Reply, registry
from zcontrol.core.chain import ChainTaskQueue
from zcontrol.core.errors import SYS, OperationError
from zcontrol.core.trace import current_trace_id, trace_scope

SERVICE = "contract"


@registry.register
@attrs.define(kw_only=True)
class ContractEcho(NeedReplyMessage):
    """
    A request whose handler echoes C{text}.
    """

    text: str = ""
    count: int = 0


@registry.register
@attrs.define(kw_only=True)
class ContractEchoReply(Reply):
    text: str = ""
    node_id: str = ""


@registry.register
@attrs.define(kw_only=True)
class ContractNote(Message):
    """
    A fire-and-forget message.
    """

    text: str = ""


@registry.register
@attrs.define(kw_only=True)
class ContractVmStateChanged(Event):
    topic = "contract.vm.state"

    vm_uuid: str = ""
    state: str = ""


@registry.register
@attrs.define(kw_only=True)
class ContractHostPinged(Event):
    topic = "contract.host.ping"

    host_uuid: str = ""


def echo(bus):
    def handler(msg):
        return ContractEchoReply(text=msg.text, node_id=bus.node_id)

    return handler


def uuid_owned_by(bus, node_id: str) -> str:
    """
    A resource uuid that the ring gives to C{node_id}.
    """
    for i in range(100000):
        key = f"resource-{i}"
        if bus.owner_of(key) == node_id:
            return key
    raise AssertionError(f"no key hashes to {node_id}")


class BusContractMixin:
    """
    The behaviour of every IBus.
    """

    # Timeouts fire up to one timer tick late: advance past it.
    tick = 0.1

    def make_buses(self, count: int, clock: Clock, registries=None) -> Deferred:
        raise NotImplementedError()

    def kill_node(self, bus) -> Deferred:
        raise NotImplementedError()

    async def barrier(self, bus):
        """
        One more round trip on C{bus}: the replies already sent have arrived by its end.
        """
        if not getattr(bus, "_barrier_registered", False):
            bus.register_service("contract-barrier", echo(bus))
            bus._barrier_registered = True
        reply = await bus.send(ContractEcho(service_id="contract-barrier"))
        self.assertTrue(reply.success, reply.error)

    async def serve(self, bus, service_id, handler):
        """
        Register a service and wait until peers can reach it (a bus over a remote broker
        returns a Deferred for that; an in-process bus returns None).
        """
        d = bus.register_service(service_id, handler)
        if isinstance(d, Deferred):
            await d

    async def one_bus(self):
        self.clock = Clock()
        (bus,) = await self.make_buses(1, self.clock)
        return bus

    async def test_provides_interface(self):
        """
        The bus and its subscriptions provide their interfaces.
        """
        bus = await self.one_bus()
        self.assertTrue(verifyObject(IBus, bus))
        sub = bus.subscribe("contract.#", lambda e: None)
        self.assertTrue(verifyObject(ISubscription, sub))
        await sub.cancel()

    async def test_request_reply(self):
        """
        A reply carries the handler's payload and the request's id as correlation id.
        """
        bus = await self.one_bus()
        bus.register_service(SERVICE, echo(bus))
        msg = ContractEcho(service_id=SERVICE, text="héllo")
        reply = await bus.send(msg)
        self.assertTrue(reply.success, reply.error)
        self.assertIsInstance(reply, ContractEchoReply)
        self.assertEqual((reply.text, reply.correlation_id), ("héllo", msg.id))

    async def test_unknown_service(self):
        """
        A message to a service nobody serves is answered SYS.1009, without waiting for the
        timeout.
        """
        bus = await self.one_bus()
        reply = await bus.send(ContractEcho(service_id="nobody-serves-this"))
        self.assertFalse(reply.success)
        self.assertEqual(reply.error.code, SYS.NO_ROUTE_ERROR)

    async def test_unroutable_envelope(self):
        """
        A message whose C{resource_uuid} is not a string (or None), or whose C{service_id} is
        not a non-empty string, fails its send or post with SYS.1007 naming the field,
        instead of raising from inside the bus's routing.
        """
        bus = await self.one_bus()
        for fields, field in (({"resource_uuid": 5}, "resource_uuid"),
                              ({"resource_uuid": ["a"]}, "resource_uuid"),
                              ({"service_id": ""}, "service_id"),
                              ({"service_id": None}, "service_id")):
            for call in (bus.send, bus.post):
                kw = {"service_id": SERVICE, **fields}
                msg = (ContractEcho if call == bus.send else ContractNote)(**kw)
                try:
                    await call(msg)
                except OperationError as e:
                    self.assertEqual((e.error.code, e.error.opaque["field"]),
                                     (SYS.INVALID_ARGUMENT_ERROR, field))
                else:
                    self.fail(f"{call.__name__} of {fields} did not fail")

    async def test_handler_raises(self):
        """
        An unexpected exception becomes SYS.1000 naming it; an OperationError keeps its
        code; a failing Deferred too; the bus keeps serving afterwards.
        """
        bus = await self.one_bus()

        def handler(msg):
            if msg.text == "boom":
                raise ValueError("kaboom")
            if msg.text == "op":
                raise OperationError.of(SYS.OPERATION_ERROR, "no can do")
            if msg.text == "deferred":
                d = Deferred()
                d.errback(OperationError.of(SYS.RESOURCE_NOT_FOUND, "gone"))
                return d
            if msg.text == "wrong":
                return 42
            return ContractEchoReply(text="fine")

        bus.register_service(SERVICE, handler)
        replies = [await bus.send(ContractEcho(service_id=SERVICE, text=t))
                   for t in ("boom", "op", "deferred", "wrong", "ok")]
        self.assertEqual(
            [r.error.code if r.error else None for r in replies],
            [SYS.INTERNAL, SYS.OPERATION_ERROR, SYS.RESOURCE_NOT_FOUND, SYS.INTERNAL, None],
        )
        self.assertIn("kaboom", replies[0].error.details)
        self.assertEqual(replies[4].text, "fine")
        self.flushLoggedErrors(ValueError)

    async def test_async_handler(self):
        """
        A coroutine handler's result is the reply.
        """
        bus = await self.one_bus()

        async def handler(msg):
            inner = await bus.send(ContractEcho(service_id="echo", text=msg.text + "!"))
            return ContractEchoReply(text=inner.text)

        bus.register_service("echo", echo(bus))
        bus.register_service(SERVICE, handler)
        reply = await bus.send(ContractEcho(service_id=SERVICE, text="hi"))
        self.assertEqual(reply.text, "hi!")

    async def test_timeout_and_late_reply(self):
        """
        No reply before the timeout gives SYS.1001 naming the message; the late reply is
        dropped and the bus keeps working.
        """
        bus = await self.one_bus()
        started, release = Deferred(), Deferred()

        def slow(msg):
            started.callback(msg)
            return release

        bus.register_service(SERVICE, slow)
        bus.register_service("echo", echo(bus))
        msg = ContractEcho(service_id=SERVICE)
        d = bus.send(msg, timeout=5)
        await started
        self.assertNoResult(d)
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1 + self.tick)
        reply = await d
        self.assertEqual(reply.error.code, SYS.TIMEOUT)
        self.assertIn(f"Message[name: ContractEcho, id: {msg.id}]", reply.error.details)
        self.assertIn("timeout after 5 seconds", reply.error.details)
        release.callback(ContractEchoReply(text="late"))
        after = await bus.send(ContractEcho(service_id="echo", text="still alive"))
        self.assertEqual(after.text, "still alive")

    async def test_message_timeout_field(self):
        """
        Without an explicit timeout the message's own C{timeout} applies.
        """
        bus = await self.one_bus()
        started = Deferred()
        never = Deferred()
        self.addCleanup(lambda: never.called or never.callback(None))
        bus.register_service(SERVICE, lambda m: started.callback(m) or never)
        d = bus.send(ContractEcho(service_id=SERVICE, timeout=2))
        await started
        self.clock.advance(2 + self.tick)
        self.assertEqual((await d).error.code, SYS.TIMEOUT)

    async def test_deferred_reply(self):
        """
        A handler that returns None replies later with bus.reply; a second reply is ignored.
        """
        bus = await self.one_bus()
        held = []
        got = Deferred()

        def handler(msg):
            held.append(msg)
            got.callback(None)

        bus.register_service(SERVICE, handler)
        msg = ContractEcho(service_id=SERVICE)
        d = bus.send(msg)
        await got
        bus.reply(held[0], ContractEchoReply(text="later"))
        bus.reply(held[0], ContractEchoReply(text="twice"))
        reply = await d
        self.assertEqual((reply.text, reply.correlation_id), ("later", msg.id))

    async def test_cancel(self):
        """
        Cancelling a send answers SYS.1017.
        """
        bus = await self.one_bus()
        started, never = Deferred(), Deferred()
        self.addCleanup(lambda: never.called or never.callback(None))
        bus.register_service(SERVICE, lambda m: started.callback(m) or never)
        d = bus.send(ContractEcho(service_id=SERVICE))
        await started
        d.cancel()
        self.assertEqual((await d).error.code, SYS.CANCEL)

    async def test_send_all_order(self):
        """
        send_all gives the replies in request order whatever order they come back in; a
        message nobody answers becomes a timeout reply in its place.
        """
        bus = await self.one_bus()
        queue = DeferredQueue()

        def handler(msg):
            d = Deferred()
            queue.put((msg, d))
            return d

        bus.register_service(SERVICE, handler)
        msgs = [ContractEcho(service_id=SERVICE, text=str(i), timeout=10) for i in range(5)]
        d = bus.send_all(msgs)
        held = {}
        for _ in range(5):
            msg, hd = await queue.get()
            held[msg.text] = hd
        for t in ("3", "1", "4", "0"):
            held[t].callback(ContractEchoReply(text=t))
        await self.barrier(bus)
        self.clock.advance(10 + self.tick)
        replies = await d
        self.assertEqual([r.text if r.success else r.error.code for r in replies],
                         ["0", "1", SYS.TIMEOUT, "3", "4"])
        held["2"].callback(ContractEchoReply(text="2"))

    async def test_send_stepping(self):
        """
        send_stepping keeps at most C{parallelism} in flight and answers every message once.
        """
        bus = await self.one_bus()
        queue = DeferredQueue()
        inflight = [0, 0]

        def handler(msg):
            inflight[0] += 1
            inflight[1] = max(inflight[1], inflight[0])
            d = Deferred()
            queue.put((msg, d))
            return d

        bus.register_service(SERVICE, handler)
        answered = []
        total, window = 30, 4
        msgs = (ContractEcho(service_id=SERVICE, count=i) for i in range(total))
        done = bus.send_stepping(msgs, window, lambda m, r: answered.append((m.count, r.text)))
        held = []
        for released in range(total):
            # Wait until the whole window has arrived, then answer one of them: a bus that
            # sent more than the window would show in the handler's count.
            while len(held) < min(window, total - released):
                held.append(await queue.get())
            msg, d = held.pop(released % len(held))
            inflight[0] -= 1
            d.callback(ContractEchoReply(text=str(msg.count)))
        await done
        self.assertEqual(inflight[1], window)
        self.assertEqual(sorted(answered), [(i, str(i)) for i in range(total)])

    async def test_post(self):
        """
        A fire-and-forget message reaches its handler.
        """
        bus = await self.one_bus()
        got = Deferred()
        bus.register_service(SERVICE, lambda m: got.callback(m.text))
        await bus.post(ContractNote(service_id=SERVICE, text="note"))
        self.assertEqual(await got, "note")

    async def test_events(self):
        """
        Events reach the subscriptions whose pattern matches, with AMQP wildcards; a failing
        subscriber does not stop the others; a cancelled subscription gets nothing more.
        """
        bus = await self.one_bus()
        seen = {"star": [], "hash": [], "exact": []}
        done = Deferred()

        def broken(event):
            raise RuntimeError("subscriber bug")

        def last(event):
            if isinstance(event, ContractHostPinged):
                done.callback(None)

        subs = [
            bus.subscribe("contract.vm.*", broken),
            bus.subscribe("contract.vm.*", lambda e: seen["star"].append(e.state)),
            bus.subscribe("contract.#", lambda e: seen["hash"].append(e.topic)),
            bus.subscribe("contract.vm.state", lambda e: seen["exact"].append(e.vm_uuid)),
            bus.subscribe("contract.host.*", last),
        ]
        for s in subs:
            await s.ready
        await bus.publish(ContractVmStateChanged(vm_uuid="v1", state="Running"))
        await bus.publish(ContractHostPinged(host_uuid="h1"))
        await done
        self.assertEqual(seen, {"star": ["Running"], "hash": ["contract.vm.state",
                                                             "contract.host.ping"],
                                "exact": ["v1"]})
        self.flushLoggedErrors(RuntimeError)
        await subs[1].cancel()
        done2 = Deferred()
        bus.subscribe("contract.vm.state", lambda e: done2.callback(None))
        await bus.subscribe("contract.vm.state", lambda e: None).ready
        await bus.publish(ContractVmStateChanged(vm_uuid="v2", state="Stopped"))
        await done2
        self.assertEqual(seen["star"], ["Running"])
        self.flushLoggedErrors(RuntimeError)

    async def test_deadline_propagation(self):
        """
        A message sent while handling another gets at most the time its parent has left.
        """
        bus = await self.one_bus()
        child_seen, never = Deferred(), Deferred()
        self.addCleanup(lambda: never.called or never.callback(None))

        async def parent(msg):
            r = await bus.send(ContractEcho(service_id="child", timeout=1000))
            return ContractEchoReply(text=r.error.code if r.error else "ok")

        def child(msg):
            child_seen.callback(msg)
            return never

        bus.register_service(SERVICE, parent)
        bus.register_service("child", child)
        p = ContractEcho(service_id=SERVICE, timeout=10)
        d = bus.send(p)
        c = await child_seen
        self.assertLessEqual(c.deadline, p.deadline)
        self.assertLessEqual(c.timeout, 10)
        self.clock.advance(10 + self.tick)
        self.assertEqual((await d).error.code, SYS.TIMEOUT)

    async def test_trace_propagation(self):
        """
        A request sent under a trace id carries it; its handler runs with it current; what
        the handler sends (a request to another node, a post) carries it; a chain task that
        waited for its slot and was started outside any scope still sees it; a message sent
        with no trace id current has none, and one that names its own keeps it.
        """
        self.clock = Clock()
        buses = await self.make_buses(2, self.clock)
        bus, other = buses
        seen = {}
        noted = Deferred()
        queue = ChainTaskQueue()
        blocker, queued = Deferred(), Deferred()
        self.addCleanup(lambda: blocker.called or blocker.callback(None))

        async def parent(msg):
            seen["parent"] = (msg.trace_id, current_trace_id())
            queue.run("sig", lambda: blocker)
            waited = queue.run("sig", lambda: current_trace_id())
            queued.callback(None)
            seen["chain"] = await waited
            r = await bus.send(ContractEcho(service_id="child", resource_uuid=remote))
            seen["child"] = r.text
            await bus.post(ContractNote(service_id="note", resource_uuid=remote))
            seen["after"] = current_trace_id()
            return ContractEchoReply(text="ok")

        def child(msg):
            return ContractEchoReply(text=f"{msg.trace_id}/{current_trace_id()}")

        for b in buses:
            await self.serve(b, SERVICE, parent)
            await self.serve(b, "child", child)
            await self.serve(b, "note", lambda m: noted.callback((m.trace_id,
                                                                   current_trace_id())))
        remote = uuid_owned_by(bus, other.node_id)
        d = trace_scope("trace-1", bus.send, ContractEcho(service_id=SERVICE))
        self.assertIsNone(current_trace_id())
        await queued
        blocker.callback(None)  # frees the slot outside any trace scope
        reply = await d
        self.assertTrue(reply.success, reply.error)
        self.assertEqual(seen["parent"], ("trace-1", "trace-1"))
        self.assertEqual(seen["chain"], "trace-1")
        self.assertEqual(seen["child"], "trace-1/trace-1")
        self.assertEqual(seen["after"], "trace-1")
        self.assertEqual(await noted, ("trace-1", "trace-1"))

        untraced = await bus.send(ContractEcho(service_id="child", resource_uuid=remote))
        self.assertEqual(untraced.text, "None/None")
        own = await trace_scope("trace-1", bus.send, ContractEcho(
            service_id="child", resource_uuid=remote, trace_id="own"))
        self.assertEqual(own.text, "own/own")

    async def test_routing_by_resource(self):
        """
        Several nodes: a message with a resource uuid is handled on the owner node, and
        each resource always on the same one.
        """
        self.clock = Clock()
        buses = await self.make_buses(3, self.clock)
        for b in buses:
            await self.serve(b, SERVICE, echo(b))
        owners = {b.owner_of(f"vm-{i}") for b in buses for i in range(60)}
        self.assertEqual(owners, {b.node_id for b in buses})
        for i in range(60):
            key = f"vm-{i}"
            expected = {b.owner_of(key) for b in buses}
            self.assertEqual(len(expected), 1)
            sender = buses[i % 3]
            reply = await sender.send(ContractEcho(service_id=SERVICE, resource_uuid=key))
            self.assertEqual(reply.node_id, expected.pop())
        local = await buses[1].send(ContractEcho(service_id=SERVICE))
        self.assertEqual(local.node_id, buses[1].node_id)

    async def test_events_reach_every_node(self):
        """
        An event published on one node reaches the subscribers of every node.
        """
        self.clock = Clock()
        buses = await self.make_buses(2, self.clock)
        got = [Deferred(), Deferred()]
        for b, d in zip(buses, got, strict=True):
            await b.subscribe("contract.vm.*", lambda e, d=d: d.called or d.callback(
                e.node_id)).ready
        await buses[0].publish(ContractVmStateChanged(vm_uuid="v", state="Running"))
        self.assertEqual([await d for d in got], [buses[0].node_id] * 2)

    async def test_unknown_message_type(self):
        """
        A receiver that does not know the message type answers SYS.1008.
        """
        self.clock = Clock()
        extended = registry.copy()

        @attrs.define(kw_only=True)
        class StrangerMsg(NeedReplyMessage):
            type_name = "ContractStranger"

        extended.register(StrangerMsg)
        a, b = await self.make_buses(2, self.clock, registries=[extended, None])
        await self.serve(b, SERVICE, echo(b))
        key = uuid_owned_by(a, b.node_id)
        reply = await a.send(StrangerMsg(service_id=SERVICE, resource_uuid=key))
        self.assertEqual(reply.error.code, SYS.UNKNOWN_MESSAGE_ERROR)

    async def test_node_leaves(self):
        """
        When a node dies, the sends waiting on it are answered SYS.1012 and its resources
        move to the live nodes.
        """
        self.clock = Clock()
        a, b = await self.make_buses(2, self.clock)
        started, never = Deferred(), Deferred()
        self.addCleanup(lambda: never.called or never.callback(None))
        await self.serve(b, SERVICE, lambda m: started.callback(m) or never)
        await self.serve(a, SERVICE, echo(a))
        key = uuid_owned_by(a, b.node_id)
        d = a.send(ContractEcho(service_id=SERVICE, resource_uuid=key))
        await started
        await self.kill_node(b)
        reply = await d
        self.assertEqual(reply.error.code, SYS.MANAGEMENT_NODE_UNAVAILABLE_ERROR)
        self.assertEqual(a.owner_of(key), a.node_id)
        moved = await a.send(ContractEcho(service_id=SERVICE, resource_uuid=key))
        self.assertEqual(moved.node_id, a.node_id)

    async def test_stop_answers_waiters(self):
        """
        Stopping a bus answers its own waiting sends (SYS.1017) after the handlers in
        flight have finished.
        """
        self.clock = Clock()
        a, b = await self.make_buses(2, self.clock)
        started, release = Deferred(), Deferred()
        await self.serve(b, SERVICE, lambda m: started.callback(m) or release)
        key = uuid_owned_by(a, b.node_id)
        d = a.send(ContractEcho(service_id=SERVICE, resource_uuid=key))
        await started
        stopping = a.stop()
        reply = await d
        self.assertEqual(reply.error.code, SYS.CANCEL)
        await stopping
        release.callback(ContractEchoReply())

    # issue 8 item 1: one exchange per send

    async def test_same_message_sent_twice(self):
        """
        Fault (issue 8 item 1): sending one message object twice left the first Deferred
        unfired forever (the second send took over its table entry), and the expiry of the
        orphaned entry raised into the reactor. Each send is its own exchange: both get
        their own reply.
        """
        bus = await self.one_bus()
        queue = DeferredQueue()

        def handler(msg):
            d = Deferred()
            queue.put((msg, d))
            return d

        bus.register_service(SERVICE, handler)
        msg = ContractEcho(service_id=SERVICE, timeout=10)
        first = bus.send(msg)
        second = bus.send(msg)
        held = [await queue.get(), await queue.get()]
        self.assertNotEqual(held[0][0].id, held[1][0].id)
        for n, (_m, d) in enumerate(held):
            d.callback(ContractEchoReply(text=str(n)))
        await self.barrier(bus)
        self.assertTrue(first.called and second.called)
        replies = [await first, await second]
        self.assertTrue(all(r.success for r in replies), replies)
        self.assertEqual(sorted(r.text for r in replies), ["0", "1"])
        self.assertNotEqual(replies[0].correlation_id, replies[1].correlation_id)
        self.assertEqual(len(bus._pending), 0)
        # nothing left to expire, and no timer raises
        self.clock.advance(10 + self.tick)

    async def test_resend_after_timeout_gets_its_own_reply(self):
        """
        Fault (issue 8 item 1): a message resent after its timeout took the late reply of
        the first attempt (same id). The resend waits for its own reply.
        """
        bus = await self.one_bus()
        queue = DeferredQueue()

        def handler(msg):
            d = Deferred()
            queue.put((msg, d))
            return d

        bus.register_service(SERVICE, handler)
        msg = ContractEcho(service_id=SERVICE)
        d1 = bus.send(msg, timeout=5)
        _m1, h1 = await queue.get()
        self.clock.advance(5 + self.tick)
        self.assertEqual((await d1).error.code, SYS.TIMEOUT)
        d2 = bus.send(msg, timeout=5)
        _m2, h2 = await queue.get()
        h1.callback(ContractEchoReply(text="late reply of the first attempt"))
        await self.barrier(bus)
        self.assertNoResult(d2)
        h2.callback(ContractEchoReply(text="second"))
        reply = await d2
        self.assertEqual(reply.text, "second")

    async def test_pending_id_reused_refused(self):
        """
        Fault (issue 8 item 1): a different message carrying the id of a send still waiting
        replaced its waiter (which then never fired). It is refused at once with SYS.1007
        naming the id; the first send still gets its reply.
        """
        bus = await self.one_bus()
        started, release = Deferred(), Deferred()
        bus.register_service(SERVICE, lambda m: started.callback(m) or release)
        first = ContractEcho(service_id=SERVICE, text="first")
        d1 = bus.send(first)
        await started
        d2 = bus.send(ContractEcho(id=first.id, service_id=SERVICE, text="same id"))
        refused = self.successResultOf(d2)
        self.assertEqual(refused.error.code, SYS.INVALID_ARGUMENT_ERROR)
        self.assertIn(first.id, refused.error.details)
        self.assertEqual(refused.error.opaque["field"], "id")
        release.callback(ContractEchoReply(text="first"))
        self.assertEqual((await d1).text, "first")

    # issue 8 item 5: send_stepping

    async def test_send_stepping_survives_failed_sends(self):
        """
        Fault (issue 8 item 5): send_stepping hung when a send errbacked (its window slot
        was never given back and its Deferred never fired). A failed send counts as
        answered with its error; the others go on.
        """
        bus = await self.one_bus()
        bus.register_service(SERVICE, echo(bus))
        msgs = [ContractEcho(service_id=SERVICE, text="a"),
                ContractNote(service_id=SERVICE, text="not a request"),
                ContractEcho(service_id=SERVICE, text="b"),
                ContractNote(service_id=SERVICE, text="not one either"),
                ContractEcho(service_id=SERVICE, text="c")]
        answered = []
        done = bus.send_stepping(msgs, 1, lambda m, r: answered.append(
            (m.text, r.text if r.success else r.error.code)))
        await done.addTimeout(10, reactor)
        self.assertEqual(answered, [("a", "a"), ("not a request", SYS.INVALID_ARGUMENT_ERROR),
                                    ("b", "b"), ("not one either", SYS.INVALID_ARGUMENT_ERROR),
                                    ("c", "c")])

    async def test_send_stepping_broken_iterator(self):
        """
        Fault (issue 8 item 5): an iterator that raises must not hang send_stepping: the
        sends in flight are answered, then its Deferred fails with the error.
        """
        bus = await self.one_bus()
        bus.register_service(SERVICE, echo(bus))
        answered = []

        def messages():
            yield ContractEcho(service_id=SERVICE, text="a")
            raise RuntimeError("the message source broke")

        done = bus.send_stepping(messages(), 2, lambda m, r: answered.append(r.text))
        with self.assertRaises(RuntimeError):
            await done.addTimeout(10, reactor)
        self.assertEqual(answered, ["a"])
        self.flushLoggedErrors(RuntimeError)
