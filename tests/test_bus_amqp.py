"""
AMQPBus against the real RabbitMQ (127.0.0.1:5672, guest/guest): the bus contract in both
delivery modes, several management nodes in one process, connection faults, garbage on the
wire. These tests fail (never skip) when the broker is missing.

Every test uses its own exchange and queue prefix and deletes what it declared.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, DeferredQueue, gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from txamqp.endpoint import AMQEndpoint
from zope.interface.verify import verifyObject

from tests.bus_contract import (
    SERVICE,
    BusContractMixin,
    ContractEcho,
    ContractEchoReply,
    ContractNote,
    ContractVmStateChanged,
    echo,
    uuid_owned_by,
)
from zcontrol.bus._amqp_proto import BusFactory
from zcontrol.bus.amqp import AMQPBus, Topology
from zcontrol.bus.interfaces import IBus
from zcontrol.bus.message import registry
from zcontrol.core.errors import SYS

HOST, PORT = "127.0.0.1", 5672


class Admin:
    """
    A bare connection to the broker (publish raw bytes, delete what a test declared).
    """

    def __init__(self, proto, ch):
        self.proto = proto
        self.ch = ch

    @classmethod
    async def connect(cls):
        endpoint = AMQEndpoint(reactor, HOST, PORT, username="guest", password="guest",
                               timeout=10)
        proto = await endpoint.connect(BusFactory(reactor, "zcontrol-test-admin"))
        ch = await proto.channel(1)
        await ch.channel_open()
        return cls(proto, ch)

    async def close(self):
        await self.proto.close(within=5)
        await self.proto.disconnected.wait()


class AMQPBusFactory:
    """
    make_buses/kill_node for the contract suite: buses on one random prefix.
    """

    shortcut = False
    heartbeat_interval = 5.0
    heartbeat_misses = 3

    def new_bus(self, clock, prefix, i, **kw):
        params = dict(
            node_id=f"n{i}-{uuid.uuid4().hex[:6]}", prefix=prefix, queue_expires=120,
            local_shortcut=self.shortcut, heartbeat_interval=self.heartbeat_interval,
            heartbeat_misses=self.heartbeat_misses, start_attempts=3)
        params.update(kw)
        return AMQPBus(reactor, clock, **params)

    async def make_buses(self, count, clock, registries=None, **kw):
        prefix = f"t{uuid.uuid4().hex[:10]}."
        buses = []
        self.addCleanup(self.teardown_buses, buses, prefix)
        for i in range(count):
            reg = (registries[i] if registries else None) or registry
            bus = self.new_bus(clock, prefix, i, registry=reg, **kw)
            await bus.start()
            buses.append(bus)
        for b in buses:
            await b.when_members(count)
        self.buses = buses
        return buses

    async def teardown_buses(self, buses, prefix):
        for b in buses:
            await b.stop()
        admin = await Admin.connect()
        try:
            topo = Topology(prefix)
            for b in buses:
                for q in [topo.reply_queue(b.node_id), topo.event_queue(b.node_id)] + [
                        topo.service_queue(s, b.node_id) for s in b._services]:
                    admin.ch.queue_delete(queue=q, nowait=True)
            await admin.ch.queue_delete(queue=topo.no_route_queue)
            for ex in (topo.p2p, topo.broadcast, topo.no_route):
                await admin.ch.exchange_delete(exchange=ex)
        finally:
            await admin.close()

    async def kill_node(self, bus):
        await bus._simulate_crash()
        peers = [b for b in self.buses if b is not bus and b._running]
        for _ in range(bus._heartbeat_misses + 2):
            # each live node hears the others and its own heartbeat back (a node judges
            # its peers only when its own heartbeat came back: Note [who may judge])
            heard = [p.when_heard(q.node_id) for p in peers for q in peers]
            self.clock.advance(bus._heartbeat_interval)
            if heard:
                await gatherResults(heard)


class AMQPBusContractTests(AMQPBusFactory, BusContractMixin, TestCase):
    """
    The contract over RabbitMQ, every message through the broker.
    """

    timeout = 30


class AMQPBusShortcutContractTests(AMQPBusFactory, BusContractMixin, TestCase):
    """
    The contract over RabbitMQ with the local short-cut on.
    """

    timeout = 30
    shortcut = True


def rabbitmqctl(*args):
    """
    Run rabbitmqctl (in a thread: it takes ~0.5 s).
    """
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"

    def run():
        return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "LC_ALL": "C.UTF-8"})

    return threads.deferToThread(run)


class AMQPBusTests(AMQPBusFactory, TestCase):
    """
    What only a networked bus shows: several nodes, faults, wire garbage.
    """

    timeout = 15

    async def test_verify_object(self):
        """
        AMQPBus provides IBus.
        """
        self.clock = Clock()
        (bus,) = await self.make_buses(1, self.clock)
        self.assertTrue(verifyObject(IBus, bus))

    async def test_every_resource_on_one_node(self):
        """
        Three nodes agree on the owner of every resource; each resource's messages, from
        whichever node, are handled on that node only; every node owns some.
        """
        self.clock = Clock()
        buses = await self.make_buses(3, self.clock)
        seen = {}
        for b in buses:
            def handler(msg, b=b):
                seen.setdefault(msg.resource_uuid, set()).add(b.node_id)
                return ContractEchoReply(node_id=b.node_id)
            await b.register_service(SERVICE, handler)
        keys = [f"vm-{i}" for i in range(90)]
        msgs = [ContractEcho(service_id=SERVICE, resource_uuid=k) for k in keys for _ in buses]
        replies = await gatherResults([
            buses[i % 3].send(m) for i, m in enumerate(msgs)])
        self.assertTrue(all(r.success for r in replies))
        for k in keys:
            owners = {b.owner_of(k) for b in buses}
            self.assertEqual(len(owners), 1)
            self.assertEqual(seen[k], owners)
        self.assertEqual({o for s in seen.values() for o in s}, {b.node_id for b in buses})

    async def test_node_leaves_keys_move(self):
        """
        Of three nodes, one dies silently: once its heartbeat expires the waiters on it get
        SYS.1012, only its keys move, and they move to the two live nodes.
        """
        self.clock = Clock()
        a, b, c = await self.make_buses(3, self.clock)
        started, never = Deferred(), Deferred()
        self.addCleanup(lambda: never.called or never.callback(None))
        await a.register_service(SERVICE, echo(a))
        await b.register_service(SERVICE, lambda m: started.callback(m) or never)
        await c.register_service(SERVICE, echo(c))
        keys = [f"k{i}" for i in range(600)]
        before = {k: a.owner_of(k) for k in keys}
        key = uuid_owned_by(a, b.node_id)
        d = c.send(ContractEcho(service_id=SERVICE, resource_uuid=key))
        await started
        await self.kill_node(b)
        reply = await d
        self.assertEqual(reply.error.code, SYS.MANAGEMENT_NODE_UNAVAILABLE_ERROR)
        self.assertEqual(a.members, c.members)
        self.assertEqual(a.members, frozenset({a.node_id, c.node_id}))
        after = {k: a.owner_of(k) for k in keys}
        moved = {k for k in keys if before[k] != after[k]}
        self.assertEqual(moved, {k for k in keys if before[k] == b.node_id})
        self.assertTrue(moved)
        r = await a.send(ContractEcho(service_id=SERVICE, resource_uuid=key))
        self.assertIn(r.node_id, {a.node_id, c.node_id})

    async def test_set_members(self):
        """
        Membership fed from outside: a node dropped from it is answered for with SYS.1012.
        """
        self.clock = Clock()
        a, b = await self.make_buses(2, self.clock)
        started, never = Deferred(), Deferred()
        self.addCleanup(lambda: never.called or never.callback(None))
        await b.register_service(SERVICE, lambda m: started.callback(m) or never)
        key = uuid_owned_by(a, b.node_id)
        d = a.send(ContractEcho(service_id=SERVICE, resource_uuid=key))
        await started
        a.set_members([a.node_id])
        self.assertEqual((await d).error.code, SYS.MANAGEMENT_NODE_UNAVAILABLE_ERROR)
        self.assertEqual(a.owner_of(key), a.node_id)
        a.set_members([a.node_id, b.node_id])
        self.assertEqual(a.owner_of(key), b.node_id)

    async def test_stop_says_left(self):
        """
        A node that stops tells the others at once: they answer its waiters SYS.1012 and
        drop it from the ring without waiting for the heartbeat to expire.
        """
        self.clock = Clock()
        a, b = await self.make_buses(2, self.clock)
        started, release = Deferred(), Deferred()
        await b.register_service(SERVICE, lambda m: started.callback(m) or release)
        key = uuid_owned_by(a, b.node_id)
        d = a.send(ContractEcho(service_id=SERVICE, resource_uuid=key))
        await started
        stopping = b.stop()
        release.callback(ContractEchoReply(text="done"))
        await stopping
        reply = await d
        # The handler finished before b left, so its reply may win; either way no hang.
        self.assertIn(reply.error.code if reply.error else "ok",
                      {"ok", SYS.MANAGEMENT_NODE_UNAVAILABLE_ERROR})
        await a.when_left(b.node_id)
        self.assertEqual(a.owner_of(key), a.node_id)

    def _turn(self):
        d = Deferred()
        reactor.callLater(0.01, d.callback, None)
        return d

    async def test_garbage_on_the_wire(self):
        """
        Raw bytes, unknown types and missing fields published to a service queue are
        dropped (never requeued), answered where a reply-to exists, and the consumer keeps
        consuming.
        """
        self.clock = Clock()
        (bus,) = await self.make_buses(1, self.clock)
        await bus.register_service(SERVICE, echo(bus))
        admin = await Admin.connect()
        self.addCleanup(admin.close)
        topo = bus.topology
        key = topo.service_key(SERVICE, bus.node_id)
        bodies = {
            "raw": b"\xff\x00 not json",
            "unknown": json.dumps({"NoSuchType": {"id": "garbage-unknown"}}).encode(),
            "missing": json.dumps({"ContractEcho": {"id": "garbage-missing", "text": 5}}
                                  ).encode(),
            "list": b"[1, 2]",
        }
        waits = {}
        for name, body in bodies.items():
            msg_id = f"garbage-{name}"
            # waiters registered by hand on the bus's table, as if it had sent them
            m = ContractEcho(id=msg_id, service_id=SERVICE, timeout=30)
            bus._pending.prepare(m, None)
            waits[name] = bus._pending.add(m, bus.node_id)
            admin.proto.publish(1, topo.p2p, key, body, kind="req", message_id=msg_id,
                                reply_to=bus.node_id)
        admin.proto.publish(1, topo.p2p, key, b"{}", kind="msg")  # no reply-to: dropped
        replies = {n: await d for n, d in waits.items()}
        self.assertEqual({n: r.error.code for n, r in replies.items()}, {
            "raw": SYS.INVALID_ARGUMENT_ERROR, "unknown": SYS.UNKNOWN_MESSAGE_ERROR,
            "missing": SYS.INVALID_ARGUMENT_ERROR, "list": SYS.INVALID_ARGUMENT_ERROR})
        ok = await bus.send(ContractEcho(service_id=SERVICE, text="after"))
        self.assertEqual(ok.text, "after")
        # nothing was requeued: the queue is empty and consumed
        declared = await admin.ch.queue_declare(queue=topo.service_queue(SERVICE, bus.node_id),
                                                passive=True)
        self.assertEqual(declared.message_count, 0)

    async def test_unroutable_to_dead_node(self):
        """
        A message to a node whose queues are gone is answered SYS.1009 at once (alternate
        exchange), not after its timeout.
        """
        self.clock = Clock()
        a, b = await self.make_buses(2, self.clock)
        await b.register_service(SERVICE, echo(b))
        b.unregister_service(SERVICE)
        await b.register_service("other", echo(b))  # channel barrier
        key = uuid_owned_by(a, b.node_id)
        reply = await a.send(ContractEcho(service_id=SERVICE, resource_uuid=key))
        self.assertEqual(reply.error.code, SYS.NO_ROUTE_ERROR)

    async def test_dead_lettered(self):
        """
        A request that expires in its queue is dead-lettered to NO_ROUTE and answered
        SYS.1011 (when the sender still waits).
        """
        self.clock = Clock()
        (bus,) = await self.make_buses(1, self.clock)
        topo = bus.topology
        admin = await Admin.connect()
        self.addCleanup(admin.close)
        # a queue nobody consumes, dead-lettering like the bus's own
        q = topo.service_queue("parked", bus.node_id)
        await admin.ch.queue_declare(queue=q, arguments=bus._queue_args)
        await admin.ch.queue_bind(queue=q, exchange=topo.p2p,
                                  routing_key=topo.service_key("parked", bus.node_id))
        self.addCleanup(lambda: admin.ch.queue_delete(queue=q))
        m = ContractEcho(service_id="parked", timeout=30)
        bus._pending.prepare(m, None)
        d = bus._pending.add(m, bus.node_id)
        admin.proto.publish(1, topo.p2p, topo.service_key("parked", bus.node_id),
                            registry.encode(m), kind="req", message_id=m.id,
                            reply_to=bus.node_id, expiration="50")
        reply = await d
        self.assertEqual(reply.error.code, SYS.UNDELIVERABLE_ERROR)
        self.assertIn("expired", reply.error.details)

    async def test_broker_nack(self):
        """
        Publisher confirms: a request or a post the broker refuses (nack: its queue is full
        and rejects publishes) is answered SYS.1011 at once instead of vanishing.
        """
        self.clock = Clock()
        (bus,) = await self.make_buses(1, self.clock)
        topo = bus.topology
        admin = await Admin.connect()
        self.addCleanup(admin.close)
        q = topo.service_queue("full", bus.node_id)
        await admin.ch.queue_declare(queue=q, arguments={
            "x-max-length": 0, "x-overflow": "reject-publish"})
        await admin.ch.queue_bind(queue=q, exchange=topo.p2p,
                                  routing_key=topo.service_key("full", bus.node_id))
        self.addCleanup(lambda: admin.ch.queue_delete(queue=q))
        reply = await bus.send(ContractEcho(service_id="full"))
        self.assertEqual(reply.error.code, SYS.UNDELIVERABLE_ERROR)
        self.assertIn("nack", reply.error.details)
        with self.assertRaises(Exception) as e:
            await bus.post(ContractNote(service_id="full"))
        self.assertEqual(e.exception.error.code, SYS.UNDELIVERABLE_ERROR)

    async def test_basic_return(self):
        """
        With no queue even behind the alternate exchange, the broker returns a mandatory
        message: a waiting send gets SYS.1011, a post fails with it.
        """
        self.clock = Clock()
        (bus,) = await self.make_buses(1, self.clock)
        admin = await Admin.connect()
        self.addCleanup(admin.close)
        # unbound rather than deleted: the bus would declare a deleted queue again
        topo = bus.topology
        await admin.ch.queue_unbind(queue=topo.no_route_queue, exchange=topo.no_route,
                                    routing_key="")
        reply = await bus.send(ContractEcho(service_id="nobody"))
        self.assertEqual(reply.error.code, SYS.UNDELIVERABLE_ERROR)
        with self.assertRaises(Exception) as e:
            await bus.post(ContractNote(service_id="nobody"))
        self.assertEqual(e.exception.error.code, SYS.UNDELIVERABLE_ERROR)

    async def test_post_and_publish_confirmed(self):
        """
        post() and publish() fire once the broker confirmed them.
        """
        self.clock = Clock()
        (bus,) = await self.make_buses(1, self.clock)
        got = Deferred()
        await bus.register_service(SERVICE, lambda m: got.callback(m.text))
        self.assertIsNone(await bus.post(ContractNote(service_id=SERVICE, text="n")))
        self.assertEqual(await got, "n")
        self.assertIsNone(await bus.publish(ContractVmStateChanged(vm_uuid="v")))

    async def test_connection_closed_by_broker(self):
        """
        rabbitmqctl close_connection: the waiting send gets SYS.1016 at once, the bus
        reconnects by itself, its services and subscriptions come back, new sends work.
        """
        self.clock = Clock()
        a, b = await self.make_buses(2, self.clock)
        started, never = Deferred(), Deferred()
        self.addCleanup(lambda: never.called or never.callback(None))
        await a.register_service(SERVICE, lambda m: started.callback(m) or never)
        await a.register_service("echo", echo(a))
        events = []
        got_event = Deferred()
        await a.subscribe("contract.vm.*", lambda e: (events.append(e.vm_uuid),
                                                      got_event.callback(None))).ready
        d = a.send(ContractEcho(service_id=SERVICE))
        await started
        result = await rabbitmqctl("close_connection", await self.pid_of(a), "test")
        self.assertEqual(result.returncode, 0, result.stderr)
        reply = await d
        self.assertEqual(reply.error.code, SYS.IO_ERROR)
        await a.when_connected()
        again = await a.send(ContractEcho(service_id="echo", text="back"))
        self.assertEqual(again.text, "back")
        key = uuid_owned_by(b, a.node_id)
        remote = await b.send(ContractEcho(service_id="echo", resource_uuid=key))
        self.assertEqual(remote.node_id, a.node_id)
        for s in a._subs:
            await s.ready
        await b.publish(ContractVmStateChanged(vm_uuid="after"))
        await got_event
        self.assertEqual(events, ["after"])

    async def test_channel_closed_by_broker(self):
        """
        A channel error (here a publish to an exchange that is gone) makes the bus start
        afresh: the waiting send is answered, the topology is declared again, sends work.
        Fault (issue 8 item 4): the waiting sends were told "connection closed cleanly"
        while the real cause was only in the log; they are told the broker's reason.
        """
        self.clock = Clock()
        (bus,) = await self.make_buses(1, self.clock)
        await bus.register_service("echo", echo(bus))
        started, never = Deferred(), Deferred()
        self.addCleanup(lambda: never.called or never.callback(None))
        await bus.register_service(SERVICE, lambda m: started.callback(m) or never)
        d = bus.send(ContractEcho(service_id=SERVICE))
        await started
        bus._publish("no-such-exchange", "x", b"{}", kind="msg")
        reply = await d
        self.assertEqual(reply.error.code, SYS.IO_ERROR)
        # the waiters are told the real cause, not "connection closed cleanly"
        self.assertIn("no-such-exchange", reply.error.details)
        await bus.when_connected()
        again = await bus.send(ContractEcho(service_id="echo", text="back"))
        self.assertEqual(again.text, "back")
        self.flushLoggedErrors()

    async def pid_of(self, bus):
        for _ in range(50):
            result = await rabbitmqctl("list_connections", "pid", "client_properties",
                                       "--no-table-headers", "-q")
            for line in result.stdout.splitlines():
                if bus.connection_name in line:
                    return line.split("\t")[0]
            await self._turn()
        self.fail(f"no connection named {bus.connection_name}: {result.stdout}")

    async def test_start_fails_without_broker(self):
        """
        With no broker at the address, start() fails with SYS.1016 after its attempts (it
        never hangs).
        """
        from twisted.internet import protocol

        port = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol))
        closed_port = port.getHost().port
        await port.stopListening()
        bus = AMQPBus(reactor, Clock(), port=closed_port, start_attempts=2,
                      retry_policy=lambda n: 0.01)
        failure = None
        try:
            await bus.start()
        except Exception as e:
            failure = e
        self.assertEqual(failure.error.code, SYS.IO_ERROR)

    async def test_many_in_flight(self):
        """
        2,000 sends outstanding at once all come back (window well above prefetch).
        """
        self.clock = Clock()
        a, b = await self.make_buses(2, self.clock)
        await b.register_service(SERVICE, echo(b))
        key = uuid_owned_by(a, b.node_id)
        replies = await a.send_all(
            [ContractEcho(service_id=SERVICE, resource_uuid=key, text=str(i))
             for i in range(2000)])
        self.assertEqual([r.text for r in replies], [str(i) for i in range(2000)])
        self.assertEqual(len(a._pending), 0)
        self.assertEqual(a._unconfirmed, {})

    async def test_large_message(self):
        """
        A body larger than one frame is split and reassembled.
        """
        self.clock = Clock()
        (bus,) = await self.make_buses(1, self.clock)
        await bus.register_service(SERVICE, echo(bus))
        text = "é" * 300_000
        reply = await bus.send(ContractEcho(service_id=SERVICE, text=text))
        self.assertEqual(reply.text, text)


    # issue 8 item 2

    async def test_connection_lost_fails_pending_publish_and_post(self):
        """
        Fault (issue 8 item 2): on connection loss only the waiting requests were answered;
        a publish or a post waiting for the broker's confirm was never answered, so whoever
        awaited it (the host service, in a host's chain slot) waited forever. Both fail
        with SYS.1016 at once.
        """
        self.clock = Clock()
        (bus,) = await self.make_buses(1, self.clock)
        await bus.register_service(SERVICE, echo(bus))
        published = bus.publish(ContractVmStateChanged(vm_uuid="v"))
        posted = bus.post(ContractNote(service_id=SERVICE))
        self.assertEqual(len(bus._unconfirmed), 2)
        # cut before the broker's confirms can be read
        bus._proto.transport.abortConnection()
        for d in (published, posted):
            with self.assertRaises(Exception) as e:
                await d.addTimeout(5, reactor)
            self.assertEqual(e.exception.error.code, SYS.IO_ERROR)
        await bus.when_connected()
        self.assertIsNone(await bus.publish(ContractVmStateChanged(vm_uuid="after")))

    # issue 8 item 3

    def _cancelled(self, bus):
        """
        A Deferred firing once C{bus} has taken the broker's next consumer cancellation.
        """
        d = Deferred()
        original = getattr(bus, "amqp_cancelled", lambda channel, tag: None)

        def hooked(channel, tag):
            original(channel, tag)
            if not d.called:
                d.callback(tag)

        bus.amqp_cancelled = hooked
        return d

    async def test_reply_queue_deleted(self):
        """
        Fault (issue 8 item 3): the reply queue deleted while the connection stays up left
        every later send waiting for its full timeout while the bus said it was connected.
        The waiting send is answered SYS.1016 at once, the queue is declared and consumed
        again, and sends work.
        """
        self.clock = Clock()
        (bus,) = await self.make_buses(1, self.clock)
        started, never = Deferred(), Deferred()
        self.addCleanup(lambda: never.called or never.callback(None))
        await bus.register_service(SERVICE, lambda m: started.callback(m) or never)
        await bus.register_service("echo", echo(bus))
        d = bus.send(ContractEcho(service_id=SERVICE))
        await started
        cancelled = self._cancelled(bus)
        admin = await Admin.connect()
        self.addCleanup(admin.close)
        await admin.ch.queue_delete(queue=bus.topology.reply_queue(bus.node_id))
        self.assertEqual(await cancelled.addTimeout(5, reactor), "reply")
        reply = self.successResultOf(d)
        self.assertEqual(reply.error.code, SYS.IO_ERROR)
        self.assertIn("reply queue", reply.error.details)
        # until the queue is back (a round trip away), sends are refused at once
        self.assertFalse(bus.connected)
        refused = self.successResultOf(bus.send(ContractEcho(service_id="echo")))
        self.assertEqual(refused.error.code, SYS.IO_ERROR)
        await bus.when_connected().addTimeout(5, reactor)
        again = await bus.send(ContractEcho(service_id="echo", text="back"))
        self.assertEqual(again.text, "back")
        # the queue exists again, with the bus's arguments
        declared = await admin.ch.queue_declare(
            queue=bus.topology.reply_queue(bus.node_id), passive=True)
        self.assertEqual(declared.consumer_count, 1)

    async def test_service_and_event_queues_deleted(self):
        """
        Fault (issue 8 item 3): a deleted service queue left the service unreachable (every
        send to it answered SYS.1009) and a deleted event queue left the node deaf, with
        the consumer silently gone. Both are declared, bound and consumed again.
        """
        self.clock = Clock()
        a, b = await self.make_buses(2, self.clock)
        await a.register_service(SERVICE, echo(a))
        got = DeferredQueue()
        await a.subscribe("contract.vm.*", lambda e: got.put(e.vm_uuid)).ready
        admin = await Admin.connect()
        self.addCleanup(admin.close)
        topo = a.topology
        for queue, tag in [(topo.service_queue(SERVICE, a.node_id), f"s.{SERVICE}"),
                           (topo.event_queue(a.node_id), "event"),
                           (topo.no_route_queue, "noroute")]:
            cancelled = self._cancelled(a)
            await admin.ch.queue_delete(queue=queue)
            self.assertEqual(await cancelled.addTimeout(5, reactor), tag)
            await a.when_connected().addTimeout(5, reactor)
        key = uuid_owned_by(b, a.node_id)
        reply = await b.send(ContractEcho(service_id=SERVICE, resource_uuid=key, text="hi"))
        self.assertEqual((reply.text, reply.node_id), ("hi", a.node_id))
        await b.publish(ContractVmStateChanged(vm_uuid="heard"))
        self.assertEqual(await got.get(), "heard")
        # NO_ROUTE is back too: a send to a service nobody serves is answered at once
        nobody = await b.send(ContractEcho(service_id="nobody", resource_uuid=key))
        self.assertEqual(nobody.error.code, SYS.NO_ROUTE_ERROR)

    # issue 8 item 4

    async def test_oversized_message_fails_alone(self):
        """
        Fault (issue 8 item 4): a message over the broker's max_message_size made the broker
        close the channel; the bus dropped the connection and every unrelated send in flight
        failed with "connection closed cleanly". The size is checked before publishing:
        only that send fails, with SYS.1007 naming the size and the limit; the others and
        the connection are unaffected. Oversized posts, publishes and replies too.
        """
        self.clock = Clock()
        limit = 64 * 1024
        a, b = await self.make_buses(2, self.clock, max_message_size=limit)
        started, release = Deferred(), Deferred()
        await b.register_service(SERVICE, lambda m: started.callback(m) or release)
        await b.register_service("big", lambda m: ContractEchoReply(text="x" * limit))
        await b.register_service("echo", echo(b))
        key = uuid_owned_by(a, b.node_id)
        inflight = a.send(ContractEcho(service_id=SERVICE, resource_uuid=key))
        await started
        proto = a._proto
        big = ContractEcho(service_id="echo", resource_uuid=key, text="x" * limit)
        reply = self.successResultOf(a.send(big))
        self.assertEqual(reply.error.code, SYS.INVALID_ARGUMENT_ERROR)
        self.assertIn(f"over the bus limit of {limit} bytes", reply.error.details)
        self.assertGreater(reply.error.opaque["size"], limit)
        self.assertEqual(reply.error.opaque["limit"], limit)
        for d in (a.post(ContractNote(service_id="echo", resource_uuid=key, text="x" * limit)),
                  a.publish(ContractVmStateChanged(vm_uuid="x" * limit))):
            self.assertEqual(self.failureResultOf(d).value.error.code,
                             SYS.INVALID_ARGUMENT_ERROR)
        # an oversized reply becomes an error reply naming it
        big_reply = await a.send(ContractEcho(service_id="big", resource_uuid=key))
        self.assertEqual(big_reply.error.code, SYS.INVALID_ARGUMENT_ERROR)
        self.assertIn("the reply to", big_reply.error.details)
        # the send in flight is untouched and the connection survived
        release.callback(ContractEchoReply(text="unaffected"))
        self.assertEqual((await inflight).text, "unaffected")
        ok = await a.send(ContractEcho(service_id="echo", resource_uuid=key, text="small"))
        self.assertEqual(ok.text, "small")
        self.assertIs(a._proto, proto)
        self.flushLoggedErrors()

    # issue 8 item 5

    async def test_heartbeat_loop_survives_an_exception(self):
        """
        Fault (issue 8 item 5): one exception in a heartbeat round stopped the loop for good
        and silently; membership froze. The round is logged and the loop goes on.
        """
        self.clock = Clock()
        a, b = await self.make_buses(2, self.clock)
        original = a._publish_node
        calls = []

        def broken(op):
            calls.append(op)
            if len(calls) == 1:
                raise RuntimeError("heartbeat bug")
            return original(op)

        a._publish_node = broken
        self.clock.advance(a._heartbeat_interval)
        self.assertTrue(a._beat_loop.running)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        heard = b.when_heard(a.node_id)
        self.clock.advance(a._heartbeat_interval)
        await heard.addTimeout(5, reactor)
        self.assertEqual(calls, ["beat", "beat"])

    async def test_no_judging_without_own_heartbeat_echo(self):
        """
        Fault (issue 8 item 5): a node whose own path through the broker is stalled counted
        its peers' missing heartbeats and evicted them all. A node judges only when its own
        previous heartbeat came back; rounds without it are not counted.
        """
        self.clock = Clock()
        a, b = await self.make_buses(2, self.clock)
        # no reactor turn between rounds: nothing, not even a's own heartbeat, comes back
        for _ in range(a._heartbeat_misses + 3):
            self.clock.advance(a._heartbeat_interval)
        self.assertEqual(a.members, frozenset({a.node_id, b.node_id}))
        self.assertEqual(b.members, frozenset({a.node_id, b.node_id}))

    async def test_broker_outage_no_split_brain(self):
        """
        Fault (issue 8 item 5): during its own broker outage a node counted its peers'
        missed heartbeats, evicted them all and owned every resource once it reconnected
        (split brain). A node whose connection is down does not judge; after reconnecting
        its counts restart from zero.
        """
        from twisted.internet import protocol

        self.clock = Clock()
        a, b = await self.make_buses(2, self.clock, retry_policy=lambda n: 0.05)
        await b.register_service(SERVICE, echo(b))
        key = uuid_owned_by(a, b.node_id)
        a._missed[b.node_id] = a._heartbeat_misses  # one more miss would evict b
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol))
        closed = port.getHost().port
        await port.stopListening()
        lost = Deferred()
        original = a.amqp_lost

        def hooked(proto, reason):
            original(proto, reason)
            lost.called or lost.callback(None)

        a.amqp_lost = hooked
        a._endpoint._port = closed  # reconnection attempts fail while the outage lasts
        a._proto.transport.abortConnection()
        await lost.addTimeout(5, reactor)
        self.assertFalse(a.connected)
        for _ in range(3 * a._heartbeat_misses):
            self.clock.advance(a._heartbeat_interval)
        self.assertIn(b.node_id, a.members)
        self.assertEqual(a.owner_of(key), b.node_id)
        a._endpoint._port = PORT
        await a.when_connected().addTimeout(10, reactor)
        self.assertEqual(a._missed, {b.node_id: 0})
        reply = await a.send(ContractEcho(service_id=SERVICE, resource_uuid=key))
        self.assertEqual(reply.node_id, b.node_id)
        self.flushLoggedErrors()

    def test_max_message_size_from_config(self):
        """
        The limit of issue 8 item 4 is C{bus.max_message_size} in the config tree (8 MiB by
        default, below RabbitMQ's own default); a nonsensical value is refused.
        """
        from zcontrol.config import ConfigError, load_config
        from zcontrol.node import make_bus

        default = make_bus(load_config(overrides={"bus": {"backend": "amqp"}}), reactor)
        self.assertEqual(default._max_message_size, 8 * 1024 * 1024)
        bus = make_bus(load_config(overrides={"bus": {"backend": "amqp",
                                                      "max_message_size": 65536}}), reactor)
        self.assertEqual(bus._max_message_size, 65536)
        with self.assertRaises(ConfigError) as e:
            load_config(overrides={"bus": {"max_message_size": 0}})
        self.assertIn("bus.max_message_size", str(e.exception))
