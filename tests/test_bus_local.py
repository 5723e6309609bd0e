"""
LocalBus: the bus contract in both delivery modes, plus what only an in-process bus can show
synchronously (property tests on a Clock, the timer wheel, memory bookkeeping).
"""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.bus_contract import (
    SERVICE,
    BusContractMixin,
    ContractEcho,
    ContractEchoReply,
    ContractVmStateChanged,
    echo,
)
from tests.test_host_service import HostServiceTestCase
from zcontrol.bus.local import LocalBroker, LocalBus
from zcontrol.bus.message import registry
from zcontrol.bus.publishing import publish_after_commit
from zcontrol.core.errors import SYS, OperationError
from zcontrol.services.host.messages import HostStatusChangedEvent


class LocalBusFactory:
    copy = False

    async def make_buses(self, count, clock, registries=None):
        broker = LocalBroker(reactor)
        buses = []
        for i in range(count):
            reg = (registries[i] if registries else None) or registry
            bus = LocalBus(clock, node_id=f"node-{i}", broker=broker, scheduler=reactor,
                           registry=reg, copy=self.copy)
            await bus.start()
            self.addCleanup(bus.stop)
            buses.append(bus)
        return buses

    async def kill_node(self, bus):
        bus._running = False
        bus._broker.leave(bus)


class LocalBusContractTests(LocalBusFactory, BusContractMixin, TestCase):
    """
    The contract, objects passed as they are.
    """


class LocalBusCopyContractTests(LocalBusFactory, BusContractMixin, TestCase):
    """
    The contract, every message encoded and decoded on the way.
    """

    copy = True


def pump(clock: Clock) -> None:
    """
    Run everything due now on C{clock} (deliveries are C{callLater(0)} batches).
    """
    while any(c.getTime() <= clock.seconds() for c in clock.getDelayedCalls()):
        clock.advance(0)


def make_bus(**kw) -> tuple[LocalBus, Clock]:
    clock = Clock()
    bus = LocalBus(clock, **kw)
    bus.start()
    return bus, clock


class LocalBusSyncTests(SynchronousTestCase):
    """
    LocalBus driven by a Clock alone.
    """

    def test_timers_are_shared(self):
        """
        Sends whose deadlines fall in one timer tick share one delayed call, and the
        bookkeeping is empty once they are answered.
        """
        bus, clock = make_bus()
        held = []
        bus.register_service(SERVICE, lambda m: held.append(Deferred()) or held[-1])
        ds = [bus.send(ContractEcho(service_id=SERVICE), timeout=30) for _ in range(1000)]
        pump(clock)
        self.assertEqual(len(held), 1000)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        for h in held:
            h.callback(ContractEchoReply(text="x"))
        pump(clock)
        self.assertTrue(all(self.successResultOf(d).success for d in ds))
        self.assertEqual(len(bus._pending), 0)
        self.assertEqual(bus._pending._buckets, {})
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_timeout_never_early(self):
        """
        A timeout fires after its deadline, at most one tick late.
        """
        bus, clock = make_bus(timer_resolution=0.05)
        bus.register_service(SERVICE, lambda m: Deferred())
        d = bus.send(ContractEcho(service_id=SERVICE), timeout=1.23)
        pump(clock)
        clock.advance(1.229)
        self.assertNoResult(d)
        clock.advance(0.05)
        self.assertEqual(self.successResultOf(d).error.code, SYS.TIMEOUT)

    def test_expired_deadline_is_not_handled(self):
        """
        A message whose deadline passed before delivery is skipped (its sender already got
        a timeout), not handled.
        """
        bus, clock = make_bus()
        calls = []
        bus.register_service(SERVICE, lambda m: calls.append(m))
        d = bus.send(ContractEcho(service_id=SERVICE), timeout=0)
        self.assertEqual(self.successResultOf(d).error.code, SYS.TIMEOUT)
        pump(clock)
        self.assertEqual(calls, [])

    def test_no_recursion_in_stepping(self):
        """
        100,000 stepping sends answered at once do not recurse.
        """
        bus, clock = make_bus()
        count = []
        d = bus.send_stepping(
            (ContractEcho(service_id="nobody") for _ in range(100_000)), 10,
            lambda m, r: count.append(r.error.code))
        while not d.called:
            pump(clock)
        self.assertEqual(len(count), 100_000)
        self.assertEqual(set(count), {SYS.NO_ROUTE_ERROR})

    def test_send_refuses_plain_message(self):
        """
        send() of a fire-and-forget message is a clear SYS.1007 failure.
        """
        from tests.bus_contract import ContractNote

        bus, _ = make_bus()
        f = self.failureResultOf(bus.send(ContractNote(service_id=SERVICE)))
        self.assertEqual(f.value.error.code, SYS.INVALID_ARGUMENT_ERROR)

    def test_strict_decoding_in_copy_mode(self):
        """
        In copy mode an ill-typed field is answered SYS.1007 by the receiving side.
        """
        bus, clock = make_bus(copy=True)
        bus.register_service(SERVICE, echo(bus))
        d = bus.send(ContractEcho(service_id=SERVICE, text=12))
        pump(clock)
        reply = self.successResultOf(d)
        self.assertEqual(reply.error.code, SYS.INVALID_ARGUMENT_ERROR)
        self.assertIn("ContractEcho.text must be a str", reply.error.details)

    @given(
        n=st.integers(0, 60),
        parallelism=st.integers(1, 8),
        seed=st.integers(0, 2**32 - 1),
        failing=st.sets(st.integers(0, 59)),
    )
    def test_stepping_property(self, n, parallelism, seed, failing):
        """
        Whatever order replies come back in, send_stepping never has more than
        C{parallelism} in flight and answers every message exactly once.
        """
        bus, clock = make_bus()
        rnd = random.Random(seed)
        held: list[tuple[ContractEcho, Deferred]] = []
        peak = [0]

        def handler(msg):
            d = Deferred()
            held.append((msg, d))
            peak[0] = max(peak[0], len(held))
            return d

        bus.register_service(SERVICE, handler)
        answers: dict[int, int] = {}

        def on_reply(msg, reply):
            answers[msg.count] = answers.get(msg.count, 0) + 1
            if msg.count in failing:
                raise RuntimeError("on_reply bug")

        done = bus.send_stepping(
            (ContractEcho(service_id=SERVICE, count=i) for i in range(n)), parallelism,
            on_reply)
        pump(clock)
        while held:
            msg, d = held.pop(rnd.randrange(len(held)))
            if msg.count % 3 == 0:
                d.errback(ValueError("handler failure"))
            else:
                d.callback(ContractEchoReply())
            pump(clock)
        self.successResultOf(done)
        self.assertLessEqual(peak[0], parallelism)
        self.assertEqual(answers, {i: 1 for i in range(n)})
        self.flushLoggedErrors(ValueError, RuntimeError)

    def test_expiry_never_raises_into_the_reactor(self):
        """
        Fault (issue 8 item 1): two sends of one id left an orphaned timer entry whose
        expiry raised KeyError out of the DelayedCall (into the reactor), and the sends of
        that tick after it were never answered. The second send is refused at once; the
        expiry answers every send of its tick and raises nothing.
        """
        bus, clock = make_bus()
        bus.register_service(SERVICE, lambda m: Deferred())
        first = ContractEcho(service_id=SERVICE)
        d1 = bus.send(first, timeout=5)
        d2 = bus.send(ContractEcho(id=first.id, service_id=SERVICE), timeout=5)
        others = [bus.send(ContractEcho(service_id=SERVICE), timeout=5) for _ in range(3)]
        pump(clock)
        self.assertEqual(self.successResultOf(d2).error.code, SYS.INVALID_ARGUMENT_ERROR)
        clock.advance(5.1)  # a DelayedCall that raises would raise here
        for d in [d1, *others]:
            self.assertEqual(self.successResultOf(d).error.code, SYS.TIMEOUT)
        self.assertEqual(len(bus._pending), 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_expiry_survives_a_misbehaving_waiter(self):
        """
        Fault (issue 8 item 1): a waiter's Deferred fired by someone else before its timer
        made the expiry raise AlreadyCalledError into the reactor, leaving the rest of its
        tick unanswered. The expiry skips it and answers the others.
        """
        bus, clock = make_bus()
        bus.register_service(SERVICE, lambda m: Deferred())
        ds = [bus.send(ContractEcho(service_id=SERVICE), timeout=5) for _ in range(3)]
        pump(clock)
        ds[0].callback(ContractEchoReply(text="fired behind the bus's back"))
        clock.advance(5.1)
        self.assertEqual(self.successResultOf(ds[0]).text, "fired behind the bus's back")
        for d in ds[1:]:
            self.assertEqual(self.successResultOf(d).error.code, SYS.TIMEOUT)


class FlakyBus:
    """
    A bus whose publish fails with the given ErrorCodes in turn, then succeeds (or never
    answers, for C{None}).
    """

    def __init__(self, outcomes):
        self.outcomes = list(outcomes)
        self.published = []

    def publish(self, event):
        self.published.append(event)
        outcome = self.outcomes.pop(0) if self.outcomes else "ok"
        if outcome == "ok":
            return succeed(None)
        if outcome is None:
            return Deferred()
        if outcome == "raise":
            raise RuntimeError("publish raised")
        return fail(OperationError.of(outcome, "refused"))


class PublishAfterCommitTests(SynchronousTestCase):
    """
    publish_after_commit (issue 8 item 2): a committed state change whose event fails to
    publish does not fail; the event is retried a bounded number of times, and logged.
    """

    def event(self):
        return ContractVmStateChanged(vm_uuid="v1", state="Running")

    def test_retries_until_published(self):
        """
        Fault (issue 8 item 2): a failed publish failed the operation whose state change
        was already committed. Transient failures (SYS.1016, a raise, a publish that never
        answers) are retried with a growing delay until the bus takes the event.
        """
        clock = Clock()
        bus = FlakyBus([SYS.IO_ERROR, "raise", None, SYS.UNDELIVERABLE_ERROR])
        d = publish_after_commit(bus, self.event(), clock, attempt_timeout=10)
        self.assertNoResult(d)
        for delay in (0.5, 1.0):
            clock.advance(delay)
        self.assertEqual(len(bus.published), 3)
        clock.advance(10)  # the third attempt never answered: timed out, retried in 2 s
        clock.advance(2)
        self.assertEqual(len(bus.published), 4)
        clock.advance(4)
        self.assertIs(self.successResultOf(d), True)
        self.assertEqual(len(bus.published), 5)
        self.assertEqual(len({e.id for e in bus.published}), 1)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.flushLoggedErrors(RuntimeError)

    def test_gives_up_without_failing(self):
        """
        After its attempts, or at once for a failure no retry cures (SYS.1007: the event is
        too large or cannot be encoded), it gives up: False, never an errback, and an
        error in the log.
        """
        clock = Clock()
        bus = FlakyBus([SYS.IO_ERROR] * 10)
        d = publish_after_commit(bus, self.event(), clock, attempts=3)
        clock.pump([1] * 10)
        self.assertIs(self.successResultOf(d), False)
        self.assertEqual(len(bus.published), 3)
        permanent = FlakyBus([SYS.INVALID_ARGUMENT_ERROR])
        d = publish_after_commit(permanent, self.event(), clock)
        self.assertIs(self.successResultOf(d), False)
        self.assertEqual(len(permanent.published), 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_total_time_bounded(self):
        """
        Whoever waits for it waits at most C{total_timeout}: attempts that never answer are
        cut at the total, whatever the attempt count left.
        """
        clock = Clock()
        bus = FlakyBus([None] * 10)
        d = publish_after_commit(bus, self.event(), clock, attempts=10, attempt_timeout=10,
                                 total_timeout=25)
        clock.pump([0.5] * 49)
        self.assertNoResult(d)
        clock.advance(0.5)
        self.assertIs(self.successResultOf(d), False)
        self.assertEqual(len(bus.published), 3)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancel_stops_retrying(self):
        """
        Cancelling (a node shutting down) fires False at once and publishes no more.
        """
        clock = Clock()
        bus = FlakyBus([SYS.IO_ERROR] * 10)
        d = publish_after_commit(bus, self.event(), clock)
        d.cancel()
        self.assertIs(self.successResultOf(d), False)
        clock.pump([1] * 20)
        self.assertEqual(len(bus.published), 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_local_bus_publishes_at_once(self):
        """
        On a bus that takes the event, it is published before the call returns.
        """
        bus, clock = make_bus()
        got = []
        bus.subscribe("contract.#", got.append)
        d = publish_after_commit(bus, self.event(), clock)
        self.assertIs(self.successResultOf(d), True)
        pump(clock)
        self.assertEqual([e.vm_uuid for e in got], ["v1"])


class HostServicePublishTests(HostServiceTestCase):
    """
    The host service publishes its events with publish_after_commit.
    """

    def test_failed_event_does_not_fail_add_host(self):
        """
        Fault (issue 8 item 2): the host service awaited bus.publish after committing a
        status change, so a publish that failed (SYS.1016: the broker connection dropped)
        failed add_host although the host was connected and stored. The operation
        succeeds; the event is retried, then given up with an error in the log.
        """
        attempts = []

        def broken_publish(event):
            attempts.append(event)
            return fail(OperationError.of(SYS.IO_ERROR, "not connected to RabbitMQ"))

        self.bus.publish = broken_publish
        reply = self.successResultOf(self.add(1))
        self.assertTrue(reply.success, reply.error)
        self.assertEqual(reply.inventory["status"], "Connected")
        for _ in range(60):
            self.pump(1)
        self.assertEqual(len(attempts), 5)  # Connecting -> Connected, five attempts
        self.assertEqual(len({e.id for e in attempts}), 1)
        self.assertTrue(all(isinstance(e, HostStatusChangedEvent) for e in attempts))
        self.successResultOf(self.service.stop())
