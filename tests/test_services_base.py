"""
The services' shared base: L{zcontrol.services.base} (dispatch, serialisation, lookups,
send, publish, stop), L{zcontrol.services.validate} (field checks) and
L{zcontrol.services.inventory} (inventory builders and the generic query).
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from zcontrol.bus.local import LocalBus
from zcontrol.bus.message import Event, NeedReplyMessage, Reply, registry
from zcontrol.core.errors import SYS, OperationError, error_code
from zcontrol.db.memory import MemoryStore
from zcontrol.services import inventory as inv
from zcontrol.services import validate
from zcontrol.services.base import Service, handles, reply_or_raise


@registry.register
@attrs.define(kw_only=True)
class EchoTestReply(Reply):
    """
    A test reply.
    """

    value: Any = None


@registry.register
@attrs.define(kw_only=True)
class EchoTestMsg(NeedReplyMessage):
    """
    A test message.
    """

    reply_type: ClassVar[type[Reply]] = EchoTestReply

    value: Any = None


@registry.register
@attrs.define(kw_only=True)
class UnhandledTestMsg(NeedReplyMessage):
    """
    A message no test service handles.
    """


@registry.register
@attrs.define(kw_only=True)
class BaseTestEvent(Event):
    """
    A test event.
    """

    topic: ClassVar[str] = "basetest.happened"

    value: Any = None


class EchoService(Service):
    """
    Answers EchoTestMsg with its value; a value "fail" raises an OperationError; a value
    "wait" waits for C{gate}.
    """

    service_id = "echotest"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate: Deferred = Deferred()
        self.log: list[Any] = []

    @handles(EchoTestMsg)
    async def echo(self, msg: EchoTestMsg) -> EchoTestReply:
        if msg.value == "fail":
            raise OperationError.of(SYS.OPERATION_ERROR, "asked to fail", why="test")
        if msg.value == "wait":
            await self.gate
        return EchoTestReply(value=msg.value)


class Harness(SynchronousTestCase):
    """
    A LocalBus and a MemoryStore on a Clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = LocalBus(self.clock, node_id="mn-1")
        self.bus.start()
        self.store = MemoryStore(self.clock)
        self.successResultOf(self.store.start())
        self.addCleanup(self.stop_store)

    def stop_store(self) -> None:
        self.store.flush()
        d = self.store.stop()
        self.store.flush()
        self.successResultOf(d)

    def pump(self) -> None:
        for _ in range(30):
            self.clock.advance(0)

    def result(self, d: Deferred) -> Any:
        self.pump()
        return self.successResultOf(d)


class ServiceTests(Harness):
    """
    L{Service}.
    """

    def setUp(self) -> None:
        super().setUp()
        self.service = EchoService(self.clock, self.bus, self.store)
        self.service.start()

    def test_needs_service_id(self) -> None:
        """
        A subclass without a service id cannot be built.
        """
        class Nameless(Service):
            pass

        self.assertRaises(TypeError, Nameless, self.clock, self.bus, self.store)

    def test_dispatch(self) -> None:
        """
        A message reaches its handler through the bus; the reply is the handler's.
        """
        reply = self.result(self.bus.send(EchoTestMsg(service_id="echotest", value=3)))
        self.assertEqual((reply.success, reply.value), (True, 3))

    def test_handler_error(self) -> None:
        """
        An OperationError raised by a handler is the error reply.
        """
        reply = self.result(self.bus.send(EchoTestMsg(service_id="echotest", value="fail")))
        self.assertFalse(reply.success)
        self.assertEqual((reply.error.code, reply.error.opaque["why"]),
                         (SYS.OPERATION_ERROR, "test"))

    def test_unknown_message(self) -> None:
        """
        A message type without a handler is SYS.1008 naming the service and the type.
        """
        reply = self.result(self.bus.send(UnhandledTestMsg(service_id="echotest")))
        self.assertEqual(reply.error.code, SYS.UNKNOWN_MESSAGE_ERROR)
        self.assertEqual((reply.error.opaque["service"], reply.error.opaque["message"]),
                         ("echotest", "UnhandledTestMsg"))

    def test_subclass_handlers(self) -> None:
        """
        A subclass overriding a handler method serves it; inherited handlers still work.
        """
        class Louder(EchoService):
            service_id = "loudertest"

            @handles(EchoTestMsg)
            async def echo(self, msg: EchoTestMsg) -> EchoTestReply:
                return EchoTestReply(value=f"{msg.value}!")

        Louder(self.clock, self.bus, self.store).start()
        reply = self.result(self.bus.send(EchoTestMsg(service_id="loudertest", value="hi")))
        self.assertEqual(reply.value, "hi!")

    def test_serialized_order(self) -> None:
        """
        Work queued under one key runs one at a time in queue order; another key is not
        held up.
        """
        ran: list[str] = []
        first: Deferred = Deferred()

        def step(name: str, wait: Deferred | None = None) -> Any:
            def fn() -> Any:
                ran.append(f"start {name}")
                if wait is not None:
                    return wait.addCallback(lambda _: ran.append(f"end {name}"))
                ran.append(f"end {name}")
                return None
            return fn

        d1 = self.service.serialized("k", step("a", first))
        d2 = self.service.serialized("k", step("b"))
        d3 = self.service.serialized("other", step("c"))
        self.pump()
        self.assertEqual(ran, ["start a", "start c", "end c"])
        self.assertNoResult(d2)
        first.callback(None)
        self.pump()
        self.assertEqual(ran[3:], ["end a", "start b", "end b"])
        for d in (d1, d2, d3):
            self.successResultOf(d)

    def test_serialized_failure_does_not_block(self) -> None:
        """
        A failing task fails its own Deferred only; the next one in the chain runs.
        """
        def boom() -> None:
            raise OperationError.of(SYS.INTERNAL, "boom")

        d1 = self.service.serialized("k", boom)
        d2 = self.service.serialized("k", lambda: "next")
        self.pump()
        self.assertEqual(self.failureResultOf(d1, OperationError).value.error.code,
                         SYS.INTERNAL)
        self.assertEqual(self.successResultOf(d2), "next")

    def test_must_get(self) -> None:
        """
        The row when it exists; the given NOT_FOUND code naming the uuid and the field
        otherwise; SYS.1007 for a uuid that is not a non-empty string.
        """
        self.result(self.store.insert("zone", {"uuid": "z1", "name": "z"}))
        row = self.successResultOf(self.result_deferred(
            self.service.must_get("zone", "z1", "ZONE.1000")))
        self.assertEqual(row["name"], "z")
        f = self.failureResultOf(self.result_deferred(
            self.service.must_get("zone", "nope", "ZONE.1000", field="zoneUuid")))
        err = f.value.error
        self.assertEqual(err.code, "ZONE.1000")
        self.assertEqual(err.opaque, {"resource": "zone", "uuid": "nope", "field": "zoneUuid"})
        self.assertIn("nope", err.details)
        for bad in ("", None, 3):
            f = self.failureResultOf(self.result_deferred(
                self.service.must_get("zone", bad, "ZONE.1000", field="zoneUuid")))
            self.assertEqual((f.value.error.code, f.value.error.opaque["field"]),
                             (SYS.INVALID_ARGUMENT_ERROR, "zoneUuid"))

    def result_deferred(self, coroutine: Any) -> Deferred:
        d = Deferred.fromCoroutine(coroutine)
        self.pump()
        return d

    def test_send(self) -> None:
        """
        send fires with a successful reply, and fails with the ErrorCode of an error reply.
        """
        reply = self.result(self.service.send(EchoTestMsg(service_id="echotest", value=1)))
        self.assertEqual(reply.value, 1)
        d = self.service.send(EchoTestMsg(service_id="echotest", value="fail"))
        self.pump()
        self.assertEqual(self.failureResultOf(d, OperationError).value.error.code,
                         SYS.OPERATION_ERROR)

    def test_send_timeout(self) -> None:
        """
        Without a timeout of its own, a message sent gets the service's send_timeout.
        """
        d = self.service.send(EchoTestMsg(service_id="echotest", value="wait"))
        self.pump()
        self.clock.advance(self.service.send_timeout - 1)
        self.assertNoResult(d)
        self.clock.advance(2)
        self.pump()
        self.assertEqual(self.failureResultOf(d, OperationError).value.error.code,
                         SYS.TIMEOUT)
        self.service.gate.callback(None)
        self.pump()

    def test_reply_or_raise(self) -> None:
        """
        A successful reply passes; an error reply raises its ErrorCode.
        """
        ok = Reply()
        self.assertIs(reply_or_raise(ok), ok)
        err = error_code(SYS.INTERNAL, "x")
        with self.assertRaises(OperationError) as cm:
            reply_or_raise(Reply.failure(err))
        self.assertEqual(cm.exception.error, err)

    def test_publish(self) -> None:
        """
        publish delivers the event to subscribers.
        """
        seen: list[Any] = []
        self.bus.subscribe("basetest.#", seen.append)
        self.service.publish(BaseTestEvent(value=5))
        self.pump()
        self.assertEqual([e.value for e in seen], [5])

    def test_stop_waits_for_work(self) -> None:
        """
        stop stops serving at once and fires when the work in flight is done.
        """
        d = self.bus.send(EchoTestMsg(service_id="echotest", value="wait"))
        self.pump()
        stopped = self.service.stop()
        self.assertNoResult(stopped)
        late = self.bus.send(EchoTestMsg(service_id="echotest", value=1), 5)
        self.pump()
        self.service.gate.callback(None)
        self.pump()
        self.successResultOf(stopped)
        self.assertEqual(self.successResultOf(d).value, "wait")
        self.clock.advance(10)
        self.pump()
        self.assertFalse(self.successResultOf(late).success)


class ValidateTests(SynchronousTestCase):
    """
    L{validate}: each check returns the value or raises SYS.1007 naming the field.
    """

    def bad(self, fn: Any, *args: Any, field: str, **kw: Any) -> Any:
        with self.assertRaises(OperationError) as cm:
            fn(*args, **kw)
        err = cm.exception.error
        self.assertEqual(err.code, SYS.INVALID_ARGUMENT_ERROR)
        self.assertEqual(err.opaque["field"], field)
        return err

    def test_invalid(self) -> None:
        """
        The error names the field and the value (long values shortened).
        """
        err = validate.invalid("name", "x" * 300, "is bad")
        self.assertEqual(err.error.opaque["field"], "name")
        self.assertEqual(len(err.error.opaque["value"]), 256)
        self.assertTrue(err.error.details.startswith("name is bad, not "))
        err = validate.invalid("f", {"a": 1}, "is bad")
        self.assertEqual(err.error.opaque["value"], "{'a': 1}")

    def test_name(self) -> None:
        self.assertEqual(validate.name("zone 1"), "zone 1")
        self.assertEqual(validate.name("ü" * 255), "ü" * 255)
        for value in ("", "   ", None, 3, "x" * 256, "a\nb", "a\x7fb", "\ud800"):
            self.bad(validate.name, value, field="name")
        self.bad(lambda: validate.name("abc", field="label", max_length=2), field="label")

    def test_optional_text(self) -> None:
        self.assertIsNone(validate.optional_text(None, "description"))
        self.assertEqual(validate.optional_text("", "description"), "")
        self.bad(validate.optional_text, "x" * 2049, "description", field="description")
        self.bad(validate.optional_text, 5, "description", field="description")

    def test_uuid(self) -> None:
        self.assertEqual(validate.uuid("abc-1", "zoneUuid"), "abc-1")
        for value in ("", "a b", "a\tb", None, 1, "u" * 65):
            self.bad(validate.uuid, value, "zoneUuid", field="zoneUuid")

    def test_uuids(self) -> None:
        self.assertEqual(validate.uuids(["b", "a"], "uuids"), ["b", "a"])
        self.assertEqual(validate.uuids([], "uuids", allow_empty=True), [])
        self.bad(validate.uuids, [], "uuids", field="uuids")
        self.bad(validate.uuids, "a", "uuids", field="uuids")
        self.bad(validate.uuids, ["a", "a"], "uuids", field="uuids")
        self.bad(validate.uuids, ["a", ""], "uuids", field="uuids[1]")

    def test_integer_and_size(self) -> None:
        self.assertEqual(validate.integer(5, "n", 1, 5), 5)
        for value in (True, 1.0, "1", None, 0, 6):
            self.bad(validate.integer, value, "n", 1, 5, field="n")
        self.assertEqual(validate.size(2**63 - 1, "size"), 2**63 - 1)
        for value in (0, -1, 2**63, 1.5):
            self.bad(validate.size, value, "size", field="size")
        self.assertEqual(validate.size(0, "size", minimum=0), 0)

    def test_one_of(self) -> None:
        self.assertEqual(validate.one_of("KVM", "hypervisorType", ["KVM"]), "KVM")
        err = self.bad(validate.one_of, "kvm", "hypervisorType", ["KVM", "ESX"],
                       field="hypervisorType")
        self.assertIn("KVM, ESX", err.details)
        self.bad(validate.one_of, None, "t", ["a"], field="t")
        self.bad(validate.one_of, ["a"], "t", ["a"], field="t")

    def test_ipv4(self) -> None:
        self.assertEqual(validate.ipv4("10.0.0.1", "ip"), "10.0.0.1")
        for value in ("010.0.0.1", "10.0.0", "::1", "10.0.0.256", "", 5, " 10.0.0.1"):
            self.bad(validate.ipv4, value, "ip", field="ip")

    def test_netmask(self) -> None:
        """
        Contiguous netmasks only: not 0.0.0.0, not a gapped mask, not a host mask.
        """
        self.assertEqual(validate.netmask("255.255.255.0"), "255.255.255.0")
        self.assertEqual(validate.netmask("255.255.255.255"), "255.255.255.255")
        self.assertEqual(validate.netmask("128.0.0.0"), "128.0.0.0")
        for value in ("255.0.255.0", "0.0.0.0", "0.0.0.255", "0.255.255.255", "1.2.3"):
            self.bad(validate.netmask, value, field="netmask")

    def test_cidr(self) -> None:
        """
        Network/prefix with no host bits; a bare address or a netmask suffix is not CIDR.
        """
        net = validate.cidr("192.168.0.0/24")
        self.assertEqual((str(net.network_address), net.prefixlen), ("192.168.0.0", 24))
        for value in ("192.168.0.1/24", "192.168.0.0/33", "192.168.0.0", "10.0.0.0/255.0.0.0",
                      "x", 5, "10.0.0.0/"):
            self.bad(validate.cidr, value, field="networkCidr")

    def test_vlan(self) -> None:
        self.assertEqual(validate.vlan(1), 1)
        self.assertEqual(validate.vlan(4094), 4094)
        for value in (0, 4095, "10", True):
            self.bad(validate.vlan, value, field="vlan")

    def test_url(self) -> None:
        self.assertEqual(validate.url("http://h/x.qcow2"), "http://h/x.qcow2")
        self.assertEqual(validate.url("file:///a", schemes=("file",)), "file:///a")
        for value in ("ftp://h/x", "http:///x", "http://h/a b", "h/x", "", 3,
                      "http://h:99999/x", "http://h:port/x", "http://[::1/x"):
            self.bad(validate.url, value, field="url")
        self.bad(validate.url, "file://", schemes=("file",), field="url")


class InventoryTests(Harness):
    """
    L{inventory}: builders and L{inventory.QueryService}.
    """

    def setUp(self) -> None:
        super().setUp()
        self.service = inv.QueryService(self.clock, self.bus, self.store)
        self.service.start()
        self.calls: list[list[str]] = []
        previous = inv.builder_for("zone")

        def restore() -> None:
            if previous is None:
                inv._BUILDERS.pop("zone", None)
            else:
                inv._BUILDERS["zone"] = previous

        self.addCleanup(restore)

        @inv.register_inventory("zone", ("clusterUuids",))
        async def expand(store: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
            from zcontrol.db.query import Condition, Query
            self.calls.append([r["uuid"] for r in rows])
            page = await store.query("cluster", Query(
                conditions=[Condition("zoneUuid", "?=", [r["uuid"] for r in rows])],
                fields=["uuid", "zoneUuid"], sort="uuid"))
            for r in rows:
                r["clusterUuids"] = [c["uuid"] for c in page.inventories
                                     if c["zoneUuid"] == r["uuid"]]
            return rows

        for z in ("z1", "z2"):
            self.result(self.store.insert("zone", {"uuid": z, "name": z}))
        self.result(self.store.insert("cluster", {"uuid": "c1", "name": "c", "zoneUuid": "z1",
                                                  "hypervisorType": "KVM"}))

    def query(self, **kw: Any) -> Any:
        return self.result(self.bus.send(inv.QueryInventoryMsg(service_id="query", **kw)))

    def test_builder_registered(self) -> None:
        self.assertEqual(inv.builder_for("zone").extra_fields, ("clusterUuids",))
        self.assertIsNone(inv.builder_for("vmNic"))

    def test_inventories_batched(self) -> None:
        """
        One expand call for a page of rows; rows of a resource without a builder are
        copies of themselves.
        """
        rows = [self.result(self.store.get("zone", z)) for z in ("z1", "z2")]
        out = self.result(Deferred.fromCoroutine(inv.inventories(self.store, "zone", rows)))
        self.assertEqual([r["clusterUuids"] for r in out], [["c1"], []])
        self.assertEqual(self.calls, [["z1", "z2"]])
        self.assertNotIn("clusterUuids", rows[0])
        plain = [{"uuid": "x"}]
        copied = self.result(Deferred.fromCoroutine(inv.inventories(self.store, "vmNic",
                                                                    plain)))
        self.assertEqual(copied, plain)
        self.assertIsNot(copied[0], plain[0])

    def test_inventory_one(self) -> None:
        one = self.result(Deferred.fromCoroutine(inv.inventory(self.store, "zone", "z1")))
        self.assertEqual(one["clusterUuids"], ["c1"])
        self.assertIsNone(self.result(Deferred.fromCoroutine(
            inv.inventory(self.store, "zone", "nope"))))

    def test_query_all_fields(self) -> None:
        """
        Without fields, the list fields are in every inventory.
        """
        reply = self.query(resource="zone", sort="uuid", reply_with_count=True)
        self.assertEqual([(r["uuid"], r["clusterUuids"]) for r in reply.inventories],
                         [("z1", ["c1"]), ("z2", [])])
        self.assertEqual(reply.total, 2)

    def test_query_conditions(self) -> None:
        reply = self.query(resource="zone", conditions=["name=z2"])
        self.assertEqual([r["uuid"] for r in reply.inventories], ["z2"])

    def test_query_fields(self) -> None:
        """
        Only the fields asked: a list field alone brings no uuid; plain fields alone call no
        builder.
        """
        reply = self.query(resource="zone", fields=["clusterUuids"], sort="uuid")
        self.assertEqual(reply.inventories, [{"clusterUuids": ["c1"]}, {"clusterUuids": []}])
        del self.calls[:]
        reply = self.query(resource="zone", fields=["name"], sort="uuid")
        self.assertEqual(reply.inventories, [{"name": "z1"}, {"name": "z2"}])
        self.assertEqual(self.calls, [])

    def test_query_count_only(self) -> None:
        reply = self.query(resource="zone", count=True)
        self.assertEqual((reply.inventories, reply.total), ([], 2))

    def test_query_refusals(self) -> None:
        """
        Bad resource, field, condition or fields list: SYS.1007.
        """
        for kw in ({"resource": "nothing"}, {"resource": "zone", "fields": ["nope"]},
                   {"resource": "zone", "conditions": ["name~~x"]},
                   {"resource": "zone", "fields": "name"}):
            reply = self.query(**kw)
            self.assertFalse(reply.success, kw)
            self.assertEqual(reply.error.code, SYS.INVALID_ARGUMENT_ERROR, kw)

    def test_make(self) -> None:
        class Node:
            reactor = self.clock
            bus = self.bus
            store = self.store

        service = inv.make(Node)
        self.assertIsInstance(service, inv.QueryService)
        self.assertEqual(service.service_id, inv.SERVICE_ID)
