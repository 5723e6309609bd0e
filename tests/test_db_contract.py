"""
The store contract: one suite, run against SQLite (a temp file) and the real PostgreSQL (a
fresh database per test). PostgreSQL missing is a failure, never a skip.
"""

from __future__ import annotations

import threading
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from tests.db_support import (
    LATEST_SCHEMA,
    TOPOLOGY,
    MemoryStoreFactory,
    PostgresNonCStoreFactory,
    PostgresStoreFactory,
    SQLiteStoreFactory,
    error_of,
    pg_drop_database_sync,
)
from zcontrol._defer import async_to_deferred
from zcontrol.core.errors import SYS, OperationError, error_code
from zcontrol.db import DB, IStore, Query, open_store
from zcontrol.db import _store as _thd
from zcontrol.db._store import Db, load_migrations

ORDER = ["zone", "cluster", "host", "primaryStorage", "l2Network", "l3Network", "ipRange",
         "vmInstance"]


class StoreTestBase:
    """
    Opens the stores of a test (mixed with a store factory and a trial TestCase).
    """

    @async_to_deferred
    async def setUp(self) -> None:
        await self.setUp_database()
        self.stores: list[Any] = []
        self.store = await self.open()

    @async_to_deferred
    async def tearDown(self) -> None:
        for s in self.stores:
            await s.stop()
        await self.tearDown_database()

    async def open(self, start: bool = True, **options: Any) -> Any:
        options = {**self.store_options, **options}
        s = open_store(self.store_url(), reactor, **options)
        self.stores.append(s)
        if start:
            await s.start()
        return s

    async def seed(self, *names: str) -> None:
        for name in ORDER:
            if name in names or not names:
                values = TOPOLOGY[name]
                if name == "host":
                    await self.store.add_host(values)
                else:
                    await self.store.insert(name, values)

    async def failure(self, d: defer.Deferred, code: str) -> Any:
        try:
            result = await d
        except OperationError as e:
            self.assertEqual(e.error.code, code, str(e.error))
            return e.error
        self.fail(f"expected {code}, got the result {result!r}")

    def holder(self) -> tuple[str, str]:
        """
        A fresh holder of capacity or an address.
        """
        self._holders = getattr(self, "_holders", 0) + 1
        return ("VmInstanceVO", f"holder-{self._holders}")

    def raw(self, fn: Any, *args: Any) -> defer.Deferred:
        """
        Run a C{*_thd}-style function on the store's pool (test-only back door).
        """
        return self.store._run(fn, *args)

# Mixed case, accents (composed and decomposed), non-Latin scripts, punctuation and digits:
# code point order and a linguistic collation (ICU, en_US) disagree on almost every pair.
TEXTS = ["a", "A", "B", "b", "É", "e", "é", "e\u0301", "z", "Z", "ä", "_x", "1", "ß", "Ω",
         "日本", "a b", "ab", "aB", "Ab", "-a", "~"]


class TextOrderMixin(StoreTestBase):
    """
    Text sorts and compares by code point on every backend (Note [collation] in
    L{zcontrol.db.postgres}), whatever the database's locale.
    """

    async def seed_texts(self) -> None:
        for i, text in enumerate(TEXTS):
            await self.store.insert("zone", {"uuid": text, "name": text,
                                             "description": f"{i:02d}"})

    async def names(self, *conditions: str, sort: str | None = None) -> list[str]:
        r = await self.store.query("zone", Query(conditions=conditions, sort=sort))
        return [z["name"] for z in r.inventories]

    @async_to_deferred
    async def test_text_sorts_by_code_point(self) -> None:
        """
        Fault (issue 8 item 13): PostgreSQL sorted text by the database's collation, so a
        database created with en_US.UTF-8 (or an ICU locale) answered C{sort=name} with
        C{a, A, ä, b, B, ...} where SQLite and the memory store answer with code point
        order (C{A, B, Z, _x, a, ...}). Every backend sorts by code point: the API sort
        (both directions), the default order (by uuid) and the store's own C{ORDER BY uuid}.
        """
        await self.seed_texts()
        self.assertEqual(await self.names(sort="name"), sorted(TEXTS))
        self.assertEqual(await self.names(sort="+name"), sorted(TEXTS))
        self.assertEqual(await self.names(sort="-name"), sorted(TEXTS, reverse=True))
        self.assertEqual(await self.names(), sorted(TEXTS))
        # A sort on another column breaks ties by uuid, in code point order too.
        r = await self.store.query("zone", Query(sort="state"))
        self.assertEqual([z["uuid"] for z in r.inventories], sorted(TEXTS))
        # Hand-written SQL of the store (live management nodes, ORDER BY uuid).
        for text in TEXTS:
            await self.store.heartbeat(text, "host")
        live = await self.store.live_management_nodes(1000)
        self.assertEqual([n["uuid"] for n in live], sorted(TEXTS))

    @async_to_deferred
    async def test_text_compares_by_code_point(self) -> None:
        """
        Fault (issue 8 item 13): C{<}, C{<=}, C{>}, C{>=} on text followed the database's
        collation on PostgreSQL (C{'a' < 'B'} in en_US, not by code point), so the same
        query selected other rows than on SQLite. Every backend compares by code point;
        C{=}, C{!=}, C{?=} and LIKE match exact code points (case- and accent-sensitive,
        composed C{é} is not C{e} + combining acute).
        """
        await self.seed_texts()
        for op, test in (("<", lambda a, b: a < b), ("<=", lambda a, b: a <= b),
                         (">", lambda a, b: a > b), (">=", lambda a, b: a >= b),
                         ("!=", lambda a, b: a != b)):
            for bound in ("B", "a", "b", "é", "Z", "ab", "\u00e9"):
                self.assertEqual(await self.names(f"name{op}{bound}"),
                                 sorted(t for t in TEXTS if test(t, bound)), (op, bound))
        self.assertEqual(await self.names("name=é"), ["é"])
        self.assertEqual(await self.names("name=e\u0301"), ["e\u0301"])
        self.assertEqual(await self.names("name?=A,ä,日本"), sorted(["A", "ä", "日本"]))
        self.assertEqual(await self.names("name~=a%"), ["a", "a b", "aB", "ab"])
        self.assertEqual(await self.names("name~=A%"), ["A", "Ab"])
        self.assertEqual(await self.names("name~=_"), sorted(t for t in TEXTS if len(t) == 1))
        self.assertEqual(await self.names("name~=e%"), ["e", "e\u0301"])
        self.assertEqual(await self.names("name~=É%"), ["É"])
        self.assertEqual(await self.names("name>a", "name<b"), ["a b", "aB", "ab"])


class StoreContractMixin(TextOrderMixin):
    """
    Behaviour every L{IStore} must have. Mixed with a store factory and a trial TestCase.
    """

    # -- lifecycle and migrations ----------------------------------------------------------

    @async_to_deferred
    async def test_provides_interface(self) -> None:
        """
        The store provides L{IStore}, is at the latest schema version and stays within its thread
        budget.
        """
        self.assertTrue(verifyObject(IStore, self.store))
        self.assertEqual(self.store.schema_version, LATEST_SCHEMA)
        self.assertEqual(self.store.backend, self.backend)
        self.assertLessEqual(self.store.pool_size, 16)

    @async_to_deferred
    async def test_migrations_idempotent(self) -> None:
        """
        Starting a second store on the same database applies nothing and records each
        version once.
        """
        other = await self.open()
        self.assertEqual(other.schema_version, LATEST_SCHEMA)
        rows = await self.raw(lambda db: db.all(
            "SELECT version, name FROM schema_versions ORDER BY version"))
        self.assertEqual([tuple(r) for r in rows],
                         [(m.version, m.name) for m in load_migrations(self.backend)])

    @async_to_deferred
    async def test_newer_schema_refused(self) -> None:
        """
        A database at a newer schema version than known makes start fail with DB.1006 and a
        message that says why; the store is left unstarted.
        """
        await self.raw(lambda db: db.run(
            "INSERT INTO schema_versions (version, name, applied_at) VALUES (?, ?, ?)",
            (999, "future", 0.0)))
        other = await self.open(start=False)
        err = await self.failure(other.start(), DB.SCHEMA_TOO_NEW)
        self.assertIn("999", err.details)
        self.assertIn("refusing to start", err.details)
        self.assertIsNone(other.schema_version)
        await self.failure(other.get("zone", "x"), SYS.NOT_READY_ERROR)

    @async_to_deferred
    async def test_stop_drains(self) -> None:
        """
        Operations in flight when stop is called complete; later ones fail with SYS.1010.
        """
        await self.seed("zone")
        pending = [self.store.get("zone", "zone-1") for _ in range(20)]
        await self.store.stop()
        results = await defer.gatherResults(pending)
        self.assertEqual([r["name"] for r in results], ["zone1"] * 20)
        await self.failure(self.store.get("zone", "zone-1"), SYS.NOT_READY_ERROR)

    # -- CRUD ------------------------------------------------------------------------------

    @async_to_deferred
    async def test_crud(self) -> None:
        """
        insert returns the stored row with defaults, get reads it, update changes it and
        bumps lastOpDate, delete removes it once.
        """
        row = await self.store.insert("zone", {"uuid": "z", "name": "n", "description": "d"})
        self.assertEqual(row["state"], "Enabled")
        self.assertEqual(row["createDate"], row["lastOpDate"])
        self.assertEqual(await self.store.get("zone", "z"), row)
        updated = await self.store.update("zone", "z", {"state": "Disabled"})
        self.assertEqual(updated["state"], "Disabled")
        self.assertGreaterEqual(updated["lastOpDate"], row["lastOpDate"])
        self.assertTrue(await self.store.delete("zone", "z"))
        self.assertFalse(await self.store.delete("zone", "z"))
        self.assertIsNone(await self.store.get("zone", "z"))

    @async_to_deferred
    async def test_types_round_trip(self) -> None:
        """
        Booleans, integers, floats and JSON fields come back as the same Python values on
        both backends.
        """
        await self.store.insert("image", {"uuid": "i", "name": "img", "system": True,
                                          "size": 2**40})
        img = await self.store.get("image", "i")
        self.assertIs(img["system"], True)
        self.assertEqual(img["size"], 2**40)
        job = await self.store.create_job("j", "APICreateZoneMsg", {"name": "z", "n": [1, 2]},
                                          "node-1")
        self.assertEqual(job["apiMessage"], {"name": "z", "n": [1, 2]})

    @async_to_deferred
    async def test_constraint_violations_are_error_codes(self) -> None:
        """
        Unique, foreign-key, check and not-null violations become DB.1000/1001/1002, never a
        crash; the store keeps working afterwards.
        """
        await self.seed("zone", "cluster")
        await self.failure(self.store.insert("zone", {"uuid": "z2", "name": "zone1"}),
                           DB.DUPLICATE)
        await self.failure(self.store.insert("zone", {"uuid": "zone-1", "name": "other"}),
                           DB.DUPLICATE)
        await self.failure(self.store.insert("cluster", {
            "uuid": "c2", "name": "c", "zoneUuid": "nope", "hypervisorType": "KVM"}),
            DB.REFERENCE)
        await self.failure(self.store.delete("zone", "zone-1"), DB.REFERENCE)
        await self.failure(self.store.insert("zone", {"uuid": "z3", "name": "z3",
                                                      "state": "Bogus"}), DB.CONSTRAINT)
        await self.failure(self.store.insert("cluster", {"uuid": "c3", "zoneUuid": "zone-1",
                                                         "hypervisorType": "KVM"}),
                           DB.CONSTRAINT)
        await self.failure(self.store.add_host(dict(
            TOPOLOGY["host"], availableCpuCapacity=17)), DB.CONSTRAINT)
        self.assertEqual((await self.store.get("zone", "zone-1"))["name"], "zone1")

    @async_to_deferred
    async def test_whitelist(self) -> None:
        """
        Unknown resources and fields, and values of the wrong type, are SYS.1007.
        """
        await self.failure(self.store.insert("nope", {"uuid": "x"}), SYS.INVALID_ARGUMENT_ERROR)
        await self.failure(self.store.insert("zone", {"uuid": "x", "name": "x", "evil": 1}),
                           SYS.INVALID_ARGUMENT_ERROR)
        await self.failure(self.store.insert("zone", {"name": "x"}), SYS.INVALID_ARGUMENT_ERROR)
        await self.failure(self.store.insert("host", {"uuid": "x", "cpuNum": "many"}),
                           SYS.INVALID_ARGUMENT_ERROR)
        await self.failure(self.store.update("zone", "x", {"uuid": "y"}),
                           SYS.INVALID_ARGUMENT_ERROR)

    @async_to_deferred
    async def test_edge_public_methods_never_raise(self) -> None:
        """
        Fault (issue 8 item 13): a bad argument to a public method raised at the caller (a
        TypeError from C{dict(None)}, C{float("x")}) or crashed a backend with SYS.1000.
        Every such call is a failed Deferred with SYS.1007 naming the argument or field.
        """
        await self.seed("zone", "cluster", "host", "l2Network", "l3Network", "ipRange")
        store = self.store
        cases = [
            (lambda: store.insert("zone", None), "values"),
            (lambda: store.insert("zone", {"uuid": "z\x00", "name": "n"}), "uuid"),
            (lambda: store.insert("zone", {"uuid": "z", "name": "n" * 256}), "name"),
            (lambda: store.insert("zone", {"uuid": "z", "name": "a\ud800"}), "name"),
            (lambda: store.insert("zone", {"uuid": "z", "name": "n", "createDate": "nan"}),
             "createDate"),
            (lambda: store.add_host(dict(TOPOLOGY["host"], uuid="h", cpuNum=2**31)), "cpuNum"),
            (lambda: store.add_host(dict(TOPOLOGY["host"], uuid="h",
                                         totalCpuCapacity=2**63)), "totalCpuCapacity"),
            (lambda: store.add_host("host"), "values"),
            (lambda: store.insert(7, {"uuid": "x"}), "resource"),
            (lambda: store.get("zone", 12), "uuid"),
            (lambda: store.get("zone", None), "uuid"),
            (lambda: store.delete("zone", ["zone-1"]), "uuid"),
            (lambda: store.update("zone", "zone-1", None), "changes"),
            (lambda: store.update("zone", "zone-1", {"name": "x"}, expected="Enabled"),
             "expected"),
            (lambda: store.query("zone", Query(conditions=["name=a\x00"])), "name"),
            (lambda: store.query("zone", Query(conditions=["name~=a\\"])), "name"),
            (lambda: store.query("host", Query(conditions=["totalCpuCapacity>" + "9" * 30])),
             "totalCpuCapacity"),
            (lambda: store.query("zone", Query(limit=float("inf"))), "limit"),
            (lambda: store.query("zone", Query(conditions=5)), "conditions"),
            (lambda: store.reserve_host_capacity("host-1", 2**64, 1, ("t", "u")), "cpu"),
            (lambda: store.set_host_capacity("host-1", 16, 1024, cpu_num=2**40), "cpu_num"),
            (lambda: store.allocate_ip("l3-1", ("t", "u"), ip=3232235521), "ip"),
            (lambda: store.allocate_ip("l3-1", ("t", "u"), strategy=["first"]), "strategy"),
            (lambda: store.change_vm_state("vm-1", "Created", "Starting", changes="x"),
             "changes"),
            (lambda: store.heartbeat("mn", "h\x00"), "hostname"),
            (lambda: store.heartbeat("mn", "h", port=2**40), "port"),
            (lambda: store.live_management_nodes("x"), "max_age"),
            (lambda: store.live_management_nodes(None), "max_age"),
            (lambda: store.running_jobs(None), "management_node_uuid"),
            (lambda: store.create_job("j", "APIx", {"a": float("nan")}, "mn"), "apiMessage"),
            (lambda: store.finish_job("j", error="boom"), "error"),
        ]
        for call, field in cases:
            try:
                d = call()
            except Exception as e:  # noqa: BLE001
                self.fail(f"raised at the caller ({field}): {e!r}")
            err = await self.failure(d, SYS.INVALID_ARGUMENT_ERROR)
            self.assertEqual(err.opaque.get("field"), field, str(err))
        nested: list[Any] = []
        for _ in range(5000):
            nested = [nested]
        err = await self.failure(store.create_job("j", "APIx", nested, "mn"),
                                 SYS.INVALID_ARGUMENT_ERROR)
        self.assertEqual(err.opaque["field"], "apiMessage")
        self.assertEqual((await self.store.query("zone", Query(count=True))).total, 1)

    @async_to_deferred
    async def test_update_compare_and_swap(self) -> None:
        """
        update with expected values changes the row only when they hold; otherwise
        SYS.1005 names the expected and actual values. Unknown rows are SYS.1003.
        """
        await self.seed("zone", "cluster", "host")
        row = await self.store.update_host_status("host-1", "Connected", expected="Connecting")
        self.assertEqual(row["status"], "Connected")
        err = await self.failure(
            self.store.update_host_status("host-1", "Connected", expected="Connecting"),
            SYS.CHANGE_RESOURCE_STATE_ERROR)
        self.assertEqual(err.opaque["expected"], {"status": "Connecting"})
        self.assertEqual(err.opaque["actual"], {"status": "Connected"})
        row = await self.store.update_host_status(
            "host-1", "Disconnected", expected=["Connecting", "Connected"])
        self.assertEqual(row["status"], "Disconnected")
        await self.failure(self.store.update_host_status("nope", "Connected"),
                           SYS.RESOURCE_NOT_FOUND)

    # -- host capacity ---------------------------------------------------------------------

    @async_to_deferred
    async def test_host_capacity(self) -> None:
        """
        Reservations take CPU and memory together or not at all; a release gives back what
        its holder held, once.
        """
        await self.seed("zone", "cluster", "host")
        vm = self.holder()
        row = await self.store.reserve_host_capacity("host-1", 10, 1000, vm)
        self.assertEqual((row["availableCpuCapacity"], row["availableMemoryCapacity"]), (6, 24))
        err = await self.failure(self.store.reserve_host_capacity("host-1", 1, 100,
                                                                  self.holder()),
                                 DB.HOST_CAPACITY)
        self.assertEqual(err.opaque["availableMemory"], 24)
        host = await self.store.get("host", "host-1")
        self.assertEqual(host["availableCpuCapacity"], 6)
        row = await self.store.release_host_capacity("host-1", vm)
        self.assertEqual((row["availableCpuCapacity"], row["availableMemoryCapacity"]),
                         (16, 1024))
        await self.failure(self.store.reserve_host_capacity("nope", 1, 1, vm),
                           SYS.RESOURCE_NOT_FOUND)
        await self.failure(self.store.release_host_capacity("nope", vm), SYS.RESOURCE_NOT_FOUND)
        await self.failure(self.store.reserve_host_capacity("host-1", -1, 1, vm),
                           SYS.INVALID_ARGUMENT_ERROR)
        for bad in (None, "vm-1", ("VmInstanceVO",), ("", "x"), ("t", 7)):
            err = await self.failure(self.store.reserve_host_capacity("host-1", 1, 1, bad),
                                     SYS.INVALID_ARGUMENT_ERROR)
            self.assertTrue(err.opaque["field"].startswith("holder"), err)

    @async_to_deferred
    async def test_reservation_for_allocation_needs_an_allocatable_host(self) -> None:
        """
        Fault (review 2, item 1): the allocator's reservation checked only capacity, so a
        host that went to Maintenance (Disabled, Disconnected, or its cluster or zone
        Disabled) after the allocator's snapshot still got the VM.
        C{reserve_host_capacity_for_allocation} refuses such a host with C{DB.1008} in
        the same statement, taking nothing; C{reserve_host_capacity} (the other callers)
        still checks capacity only.
        """
        await self.seed("zone", "cluster", "host")
        await self.store.update_host_status("host-1", "Connected")
        row = await self.store.reserve_host_capacity_for_allocation("host-1", 1, 10,
                                                                    self.holder())
        self.assertEqual(row["availableCpuCapacity"], 15)
        for resource, uuid, changes in (
                ("host", "host-1", {"state": "Maintenance"}),
                ("host", "host-1", {"state": "PreMaintenance"}),
                ("host", "host-1", {"state": "Disabled"}),
                ("host", "host-1", {"status": "Disconnected"}),
                ("cluster", "cluster-1", {"state": "Disabled"}),
                ("zone", "zone-1", {"state": "Disabled"})):
            before = await self.store.get(resource, uuid)
            await self.store.update(resource, uuid, changes)
            err = await self.failure(self.store.reserve_host_capacity_for_allocation(
                "host-1", 1, 10, self.holder()), DB.HOST_NOT_ALLOCATABLE)
            self.assertEqual(err.opaque["host_uuid"], "host-1")
            self.assertIn("takes no new VM", err.details)
            self.assertEqual((await self.store.get("host", "host-1"))["availableCpuCapacity"],
                             15, changes)
            await self.store.update(resource, uuid, {k: before[k] for k in changes})
        # Short of capacity on an allocatable host: still DB.1003.
        await self.failure(self.store.reserve_host_capacity_for_allocation(
            "host-1", 100, 10, self.holder()), DB.HOST_CAPACITY)
        # The plain reservation does not look at the state.
        await self.store.update("host", "host-1", {"state": "Maintenance"})
        row = await self.store.reserve_host_capacity("host-1", 1, 10, self.holder())
        self.assertEqual(row["availableCpuCapacity"], 14)
        self.assertEqual(await self.store.audit_capacity(), [])

    @async_to_deferred
    async def test_delete_host_releases_destroyed_vms(self) -> None:
        """
        Fault (review 2, item 4): a Destroyed VM's hostUuid kept the host from being
        deleted. C{delete_host} clears it (lastHostUuid = the host) in the delete's
        transaction; any other VM still refuses it (DB.1001), changing nothing;
        C{host_capacity_holders} names who holds the host's CPU and memory.
        """
        await self.seed("zone", "cluster", "host")
        base = TOPOLOGY["vmInstance"]
        await self.store.insert("vmInstance", {**base, "uuid": "vm-d", "hostUuid": "host-1",
                                               "state": "Destroyed"})
        await self.store.insert("vmInstance", {**base, "uuid": "vm-r", "hostUuid": "host-1",
                                               "state": "Running"})
        await self.store.reserve_host_capacity("host-1", 2, 20, ("VmInstanceVO", "vm-r"))
        held = await self.store.host_capacity_holders("host-1")
        self.assertEqual(held, {"total": 1, "holders": [
            {"holderType": "VmInstanceVO", "holderUuid": "vm-r", "cpu": 2, "memory": 20}]})
        await self.failure(self.store.delete_host("host-1"), DB.REFERENCE)
        self.assertEqual((await self.store.get("vmInstance", "vm-d"))["hostUuid"], "host-1")
        await self.store.release_host_capacity("host-1", ("VmInstanceVO", "vm-r"))
        await self.failure(self.store.delete_host("host-1"), DB.REFERENCE)
        await self.store.delete("vmInstance", "vm-r")
        self.assertTrue(await self.store.delete_host("host-1"))
        vm = await self.store.get("vmInstance", "vm-d")
        self.assertEqual((vm["hostUuid"], vm["lastHostUuid"]), (None, "host-1"))
        self.assertIsNone(await self.store.get("host", "host-1"))
        self.assertFalse(await self.store.delete_host("host-1"))

    @async_to_deferred
    async def test_concurrent_reservations(self) -> None:
        """
        40 concurrent reservations of 1 CPU on a 16-CPU host: exactly 16 win, the rest get
        DB.1003, and nothing goes negative.
        """
        await self.seed("zone", "cluster", "host")
        results = await defer.DeferredList(
            [self.store.reserve_host_capacity("host-1", 1, 1, self.holder()) for _ in range(40)],
            consumeErrors=True)
        won = [r for ok, r in results if ok]
        lost = [error_of(r).code for ok, r in results if not ok]
        self.assertEqual(len(won), 16)
        self.assertEqual(set(lost), {DB.HOST_CAPACITY})
        host = await self.store.get("host", "host-1")
        self.assertEqual((host["availableCpuCapacity"], host["availableMemoryCapacity"]),
                         (0, 1024 - 16))

    @async_to_deferred
    async def test_set_host_capacity(self) -> None:
        """
        New totals keep what is reserved; totals below the reservations are refused.
        """
        await self.seed("zone", "cluster", "host")
        await self.store.reserve_host_capacity("host-1", 4, 100, self.holder())
        row = await self.store.set_host_capacity("host-1", 32, 2048, cpu_num=16)
        self.assertEqual((row["totalCpuCapacity"], row["availableCpuCapacity"], row["cpuNum"]),
                         (32, 28, 16))
        self.assertEqual(row["availableMemoryCapacity"], 1948)
        await self.failure(self.store.set_host_capacity("host-1", 3, 2048), DB.CONSTRAINT)
        await self.failure(self.store.set_host_capacity("nope", 3, 3), SYS.RESOURCE_NOT_FOUND)

    @async_to_deferred
    async def test_primary_storage_capacity(self) -> None:
        """
        Primary storage bytes are reserved atomically (25 concurrent 100-byte reservations on
        1000 bytes: 10 win) and each holder's bytes are released once.
        """
        await self.seed("zone", "primaryStorage")
        holders = [self.holder() for _ in range(25)]
        results = await defer.DeferredList(
            [self.store.reserve_primary_storage_capacity("ps-1", 100, h) for h in holders],
            consumeErrors=True)
        self.assertEqual(sum(ok for ok, _ in results), 10)
        self.assertEqual({error_of(r).code for ok, r in results if not ok},
                         {DB.STORAGE_CAPACITY})
        for h in holders:
            row = await self.store.release_primary_storage_capacity("ps-1", h)
        self.assertEqual(row["availableCapacity"], 1000)
        await self.failure(self.store.reserve_primary_storage_capacity("nope", 1, holders[0]),
                           SYS.RESOURCE_NOT_FOUND)

    # -- holders: idempotent reservations and the audit (issue 8 item 12) ------------------

    def lost_ack(self, fn: Any) -> Any:
        """
        C{fn} (a C{*_thd} function) that runs and commits, then loses its connection as the
        acknowledgement would be lost: the caller hears the driver's connection error.
        """
        def run(db: Db, *args: Any) -> None:
            fn(db, *args)
            raise self.connection_lost()

        return run

    @async_to_deferred
    async def test_lost_ack_retry_takes_once(self) -> None:
        """
        Fault (issue 8 item 12): a reservation committed whose acknowledgement was lost is
        reported as SYS.1016, which the contract calls retryable, and the retry took the
        capacity (or an address) a second time. Now the retry by the same holder finds its
        reservation: host and storage capacity are taken once, the IP is the same one.
        """
        await self.seed("zone", "cluster", "host", "primaryStorage", "l2Network",
                        "l3Network", "ipRange")
        vm = self.holder()
        await self.failure(self.raw(self.lost_ack(_thd.reserve_host_capacity_thd),
                                    "host-1", 4, 100, vm, 0.0), SYS.IO_ERROR)
        await self.failure(self.raw(self.lost_ack(_thd.reserve_primary_storage_thd),
                                    "ps-1", 300, vm, 0.0), SYS.IO_ERROR)
        await self.failure(self.raw(self.lost_ack(_thd.allocate_ip_thd),
                                    "l3-1", vm, None, None, 0.0), SYS.IO_ERROR)
        host = await self.store.get("host", "host-1")
        self.assertEqual(host["availableCpuCapacity"], 12, "the first attempt committed")
        for _ in range(2):
            host = await self.store.reserve_host_capacity("host-1", 4, 100, vm)
            self.assertEqual((host["availableCpuCapacity"], host["availableMemoryCapacity"]),
                             (12, 924))
            ps = await self.store.reserve_primary_storage_capacity("ps-1", 300, vm)
            self.assertEqual(ps["availableCapacity"], 700)
        held = (await self.store.query("usedIp", Query())).inventories
        self.assertEqual(len(held), 1)
        again = await self.store.allocate_ip("l3-1", vm)
        self.assertEqual(again, held[0])
        self.assertEqual((again["holderType"], again["holderUuid"]), vm)
        self.assertEqual(await self.store.allocate_ip("l3-1", vm, ip=again["ip"]), again)
        await self.failure(self.store.allocate_ip("l3-1", vm, ip="10.0.0.10"
                                                  if again["ip"] != "10.0.0.10" else "10.0.0.11"),
                           DB.DUPLICATE)
        self.assertEqual(await self.store.audit_capacity(), [])

    @async_to_deferred
    async def test_release_is_idempotent(self) -> None:
        """
        Fault (issue 8 item 12): releasing twice (a retried release) gave the capacity back
        twice, or failed. A release gives back what the holder holds, once; an IP released
        twice is freed once.
        """
        await self.seed("zone", "cluster", "host", "primaryStorage", "l2Network",
                        "l3Network", "ipRange")
        vm, other = self.holder(), self.holder()
        await self.store.reserve_host_capacity("host-1", 4, 100, vm)
        await self.store.reserve_host_capacity("host-1", 2, 10, other)
        for _ in range(2):
            host = await self.store.release_host_capacity("host-1", vm)
            self.assertEqual((host["availableCpuCapacity"], host["availableMemoryCapacity"]),
                             (14, 1014))
        await self.store.reserve_primary_storage_capacity("ps-1", 300, vm)
        for _ in range(2):
            ps = await self.store.release_primary_storage_capacity("ps-1", vm)
            self.assertEqual(ps["availableCapacity"], 1000)
        ip = await self.store.allocate_ip("l3-1", vm)
        self.assertEqual(await self.store.release_ip("l3-1", vm), ip)
        self.assertIsNone(await self.store.release_ip("l3-1", vm))
        self.assertEqual((await self.store.query("usedIp", Query(count=True))).total, 0)
        self.assertEqual(await self.store.audit_capacity(), [])

    @async_to_deferred
    async def test_reservation_round_trips(self) -> None:
        """
        A reservation and a release are one statement (one round trip) on PostgreSQL,
        where the holders change made them a transaction of four (BEGIN, INSERT, UPDATE,
        COMMIT) and cut the reservation rate (bench/bench_db.py); on SQLite, whose
        statements cost no round trip, they stay a transaction.
        """
        await self.seed("zone", "cluster", "host", "primaryStorage")
        statements: list[str] = []

        class Counting(Db):
            def execute(self, sql: str, params: Any = ()) -> Any:
                statements.append(sql.split()[0])
                return super().execute(sql, params)

        def counted(fn: Any, *args: Any) -> Any:
            return lambda db: fn(Counting(db.raw, db.dialect), *args)

        vm = self.holder()
        expected = 1 if self.backend == "postgresql" else 4
        for fn, args in ((_thd.reserve_host_capacity_thd, ("host-1", 2, 20, vm, 1.0)),
                         (_thd.release_host_capacity_thd, ("host-1", vm, 1.0)),
                         (_thd.reserve_primary_storage_thd, ("ps-1", 10, vm, 1.0)),
                         (_thd.release_primary_storage_thd, ("ps-1", vm, 1.0))):
            del statements[:]
            await self.raw(counted(fn, *args))
            self.assertEqual(len(statements), expected, (fn.__name__, statements))
        self.assertEqual(await self.store.audit_capacity(), [])

    @async_to_deferred
    async def test_concurrent_retries_of_one_holder(self) -> None:
        """
        Ten concurrent reservations and allocations by the same holder (retries racing each
        other) take once and all answer the same address.
        """
        await self.seed("zone", "cluster", "host", "l2Network", "l3Network", "ipRange")
        vm = self.holder()
        rows = await defer.gatherResults(
            [self.store.reserve_host_capacity("host-1", 3, 30, vm) for _ in range(10)])
        self.assertEqual({r["availableCpuCapacity"] for r in rows} - {13}, set())
        host = await self.store.get("host", "host-1")
        self.assertEqual((host["availableCpuCapacity"], host["availableMemoryCapacity"]),
                         (13, 994))
        for strategy in ("random", "first"):
            ips = await defer.gatherResults(
                [self.store.allocate_ip("l3-1", vm, strategy=strategy) for _ in range(10)])
            self.assertEqual(len({r["uuid"] for r in ips}), 1, ips)
            self.assertEqual((await self.store.query("usedIp", Query(count=True))).total, 1)

    @async_to_deferred
    async def test_holder_with_other_amounts_refused(self) -> None:
        """
        A holder asking again for other amounts is refused with DB.1000 naming what it
        holds (a changed reservation is a release and a reservation), nothing changes.
        """
        await self.seed("zone", "cluster", "host", "primaryStorage")
        vm = self.holder()
        await self.store.reserve_host_capacity("host-1", 4, 100, vm)
        err = await self.failure(self.store.reserve_host_capacity("host-1", 5, 100, vm),
                                 DB.DUPLICATE)
        self.assertEqual(err.opaque["held"], {"cpu": 4, "memory": 100})
        await self.store.reserve_primary_storage_capacity("ps-1", 10, vm)
        await self.failure(self.store.reserve_primary_storage_capacity("ps-1", 11, vm),
                           DB.DUPLICATE)
        host = await self.store.get("host", "host-1")
        self.assertEqual(host["availableCpuCapacity"], 12)
        # the same holder on another host is another reservation
        await self.store.add_host(dict(TOPOLOGY["host"], uuid="host-2", managementIp="10.9.9.9"))
        host2 = await self.store.reserve_host_capacity("host-2", 5, 100, vm)
        self.assertEqual(host2["availableCpuCapacity"], 11)
        # a host whose capacity is held cannot be deleted
        await self.failure(self.store.delete("host", "host-1"), DB.REFERENCE)
        await self.store.release_host_capacity("host-1", vm)
        self.assertTrue(await self.store.delete("host", "host-1"))

    @async_to_deferred
    async def test_audit_capacity(self) -> None:
        """
        The audit recomputes the available figures from the holders and reports each
        drifted one (recorded, computed, held); with repair it sets them, and a second audit
        finds nothing.
        """
        await self.seed("zone", "cluster", "host", "primaryStorage")
        await self.store.reserve_host_capacity("host-1", 4, 100, self.holder())
        await self.store.reserve_host_capacity("host-1", 2, 24, self.holder())
        await self.store.reserve_primary_storage_capacity("ps-1", 250, self.holder())
        self.assertEqual(await self.store.audit_capacity(), [])
        await self.raw(lambda db: db.run(
            "UPDATE hosts SET available_cpu_capacity = 1 WHERE uuid = ?", ("host-1",)))
        await self.raw(lambda db: db.run(
            "UPDATE primary_storages SET available_capacity = 1000 WHERE uuid = ?", ("ps-1",)))
        drift = await self.store.audit_capacity()
        self.assertEqual(drift, [
            {"resource": "host", "uuid": "host-1", "field": "availableCpuCapacity",
             "recorded": 1, "computed": 10, "held": 6, "repaired": False},
            {"resource": "primaryStorage", "uuid": "ps-1", "field": "availableCapacity",
             "recorded": 1000, "computed": 750, "held": 250, "repaired": False},
        ])
        self.assertEqual((await self.store.get("host", "host-1"))["availableCpuCapacity"], 1)
        repaired = await self.store.audit_capacity(repair=True)
        self.assertEqual([d["repaired"] for d in repaired], [True, True])
        self.assertEqual(await self.store.audit_capacity(), [])
        host = await self.store.get("host", "host-1")
        self.assertEqual((host["availableCpuCapacity"], host["availableMemoryCapacity"]),
                         (10, 900))

    # -- IP addresses ----------------------------------------------------------------------

    @async_to_deferred
    async def test_ip_allocation(self) -> None:
        """
        Addresses come lowest first from the L3's ranges; a full network is DB.1005; a
        released address is reused; a specific address can be taken once; releasing twice
        is a no-op.
        """
        await self.seed("zone", "l2Network", "l3Network", "ipRange")
        holders = [self.holder() for _ in range(5)]
        got = [await self.store.allocate_ip("l3-1", h, strategy="first") for h in holders]
        self.assertEqual([g["ip"] for g in got], [f"10.0.0.{n}" for n in range(10, 15)])
        self.assertEqual(got[0]["gateway"], "10.0.0.1")
        self.assertEqual(got[0]["ipRangeUuid"], "range-1")
        await self.failure(self.store.allocate_ip("l3-1", self.holder()), DB.NO_FREE_IP)
        self.assertEqual(await self.store.release_ip("l3-1", holders[2]), got[2])
        self.assertIsNone(await self.store.release_ip("l3-1", holders[2]))
        self.assertEqual((await self.store.allocate_ip("l3-1", self.holder(), strategy="first"))["ip"],
                         "10.0.0.12")
        await self.store.release_ip("l3-1", holders[4])
        await self.failure(self.store.allocate_ip("l3-1", self.holder(), ip="10.0.0.13"), DB.DUPLICATE)
        row = await self.store.allocate_ip("l3-1", self.holder(), ip="10.0.0.14", uuid="mine")
        self.assertEqual((row["uuid"], row["ipInLong"]), ("mine", 0x0A00000E))
        await self.failure(self.store.allocate_ip("l3-1", self.holder(), ip="10.0.0.99"),
                           SYS.INVALID_ARGUMENT_ERROR)
        await self.failure(self.store.allocate_ip("l3-1", self.holder(), ip="not-an-ip"),
                           SYS.INVALID_ARGUMENT_ERROR)
        await self.failure(self.store.allocate_ip("nope", self.holder()), SYS.RESOURCE_NOT_FOUND)

    @async_to_deferred
    async def test_ip_allocation_several_ranges(self) -> None:
        """
        Allocation walks every range of the L3 network.
        """
        await self.seed("zone", "l2Network", "l3Network", "ipRange")
        await self.store.insert("ipRange", {
            "uuid": "range-2", "l3NetworkUuid": "l3-1", "startIp": "10.0.1.1",
            "endIp": "10.0.1.2", "netmask": "255.255.255.0", "gateway": "10.0.1.254"})
        ips = [(await self.store.allocate_ip("l3-1", self.holder(), strategy="first"))["ip"] for _ in range(7)]
        self.assertEqual(ips[-2:], ["10.0.1.1", "10.0.1.2"])
        await self.failure(self.store.allocate_ip("l3-1", self.holder()), DB.NO_FREE_IP)
        await self.failure(self.store.allocate_ip("l3-1", self.holder(), strategy="best"),
                           SYS.INVALID_ARGUMENT_ERROR)

    @async_to_deferred
    async def test_ip_allocation_random(self) -> None:
        """
        The random strategy (the default) hands out every address of the ranges exactly
        once and then reports the network full.
        """
        await self.seed("zone", "l2Network", "l3Network", "ipRange")
        ips = [(await self.store.allocate_ip("l3-1", self.holder()))["ip"] for _ in range(5)]
        self.assertEqual(sorted(ips), [f"10.0.0.{n}" for n in range(10, 15)])
        await self.failure(self.store.allocate_ip("l3-1", self.holder()), DB.NO_FREE_IP)

    @async_to_deferred
    async def test_concurrent_ip_allocation(self) -> None:
        """
        20 concurrent allocations on a 5-address network: 5 distinct addresses, 15 DB.1005.
        """
        await self.seed("zone", "l2Network", "l3Network", "ipRange")
        results = await defer.DeferredList(
            [self.store.allocate_ip("l3-1", self.holder()) for _ in range(20)], consumeErrors=True)
        ips = [r["ip"] for ok, r in results if ok]
        self.assertEqual(sorted(ips), [f"10.0.0.{n}" for n in range(10, 15)])
        self.assertEqual({error_of(r).code for ok, r in results if not ok}, {DB.NO_FREE_IP})

    @async_to_deferred
    async def test_concurrent_first_available(self) -> None:
        """
        120 concurrent first-available allocations on one 200-address network (every
        caller racing for the same lowest address) all succeed with distinct addresses, the
        lowest 120: the losers of a race queue on the network's lock instead of giving up.
        """
        await self.seed("zone", "l2Network", "l3Network")
        await self.store.insert("ipRange", {
            "uuid": "r-wide", "l3NetworkUuid": "l3-1", "startIp": "10.1.0.1",
            "endIp": "10.1.0.200", "netmask": "255.255.0.0", "gateway": "10.1.255.254"})
        results = await defer.DeferredList(
            [self.store.allocate_ip("l3-1", self.holder(), strategy="first") for _ in range(120)],
            consumeErrors=True)
        errors = [str(error_of(r)) for ok, r in results if not ok]
        self.assertEqual(errors, [])
        ips = sorted(int(r["ip"].rsplit(".", 1)[1]) for ok, r in results)
        self.assertEqual(ips, list(range(1, 121)))

    @async_to_deferred
    async def test_ip_in_use_by_nic(self) -> None:
        """
        An IP a VM NIC still uses cannot be released (DB.1001); after the NIC goes it can.
        """
        await self.seed()
        ip_holder = self.holder()
        ip = await self.store.allocate_ip("l3-1", ip_holder)
        await self.store.insert("vmNic", {"uuid": "nic", "vmInstanceUuid": "vm-1",
                                          "l3NetworkUuid": "l3-1", "usedIpUuid": ip["uuid"],
                                          "ip": ip["ip"], "mac": "fa:16:3e:00:00:01",
                                          "deviceId": 0})
        await self.failure(self.store.release_ip("l3-1", ip_holder), DB.REFERENCE)
        await self.store.delete("vmNic", "nic")
        self.assertEqual((await self.store.release_ip("l3-1", ip_holder))["uuid"], ip["uuid"])

    @async_to_deferred
    async def test_free_ip_only_without_holder(self) -> None:
        """
        Fault (issue 8 item 12): C{free_ip(uuid)} and C{delete("usedIp", uuid)} gave back
        any address, ignoring its holder, beside C{release_ip(l3, holder)}: a late or
        retried free by uuid could take an address from the holder it had gone to since.
        An address with a holder is given back only by C{release_ip} (SYS.1006 naming the
        holder and the call to make, nothing changes); C{free_ip} is kept for the
        holder-less rows of schema version 1.
        """
        await self.seed("zone", "l2Network", "l3Network", "ipRange")
        vm = self.holder()
        ip = await self.store.allocate_ip("l3-1", vm, strategy="first")
        for call in (self.store.free_ip, lambda u: self.store.delete("usedIp", u)):
            err = await self.failure(call(ip["uuid"]), SYS.OPERATION_ERROR)
            self.assertIn("release_ip", err.details)
            self.assertEqual((err.opaque["holder_type"], err.opaque["holder_uuid"],
                              err.opaque["l3_network_uuid"]), (vm[0], vm[1], "l3-1"))
        self.assertEqual(await self.store.get("usedIp", ip["uuid"]), ip)
        # A row of schema version 1: no holder.
        await self.store.insert("usedIp", {
            "uuid": "legacy", "ipRangeUuid": "range-1", "l3NetworkUuid": "l3-1",
            "ip": "10.0.0.11", "ipInLong": 0x0A00000B, "netmask": "255.255.255.0",
            "gateway": "10.0.0.1"})
        self.assertIs(await self.store.free_ip("legacy"), True)
        self.assertIs(await self.store.free_ip("legacy"), False)
        self.assertIs(await self.store.free_ip("never-was"), False)
        self.assertEqual(await self.store.release_ip("l3-1", vm), ip)

    # -- VM state --------------------------------------------------------------------------

    @async_to_deferred
    async def test_vm_state_cas(self) -> None:
        """
        The VM state moves only from the expected state; ten concurrent Created -> Starting
        swaps have exactly one winner, and each loser's SYS.1005 names both states.
        """
        await self.seed()
        results = await defer.DeferredList(
            [self.store.change_vm_state("vm-1", "Created", "Starting",
                                        {"hostUuid": "host-1"}) for _ in range(10)],
            consumeErrors=True)
        self.assertEqual(sum(ok for ok, _ in results), 1)
        for ok, r in results:
            if not ok:
                err = error_of(r)
                self.assertEqual(err.code, SYS.CHANGE_RESOURCE_STATE_ERROR)
                self.assertIn("expected state Created", err.details)
                self.assertIn("it is state Starting", err.details)
                self.assertEqual(err.opaque["actual"], {"state": "Starting"})
        vm = await self.store.change_vm_state("vm-1", ["Starting", "Stopping"], "Running")
        self.assertEqual((vm["state"], vm["hostUuid"]), ("Running", "host-1"))
        await self.failure(self.store.change_vm_state("nope", "Created", "Starting"),
                           SYS.RESOURCE_NOT_FOUND)
        await self.failure(self.store.change_vm_state("vm-1", "Running", "Bogus"),
                           DB.CONSTRAINT)

    # -- jobs and management nodes ---------------------------------------------------------

    @async_to_deferred
    async def test_jobs(self) -> None:
        """
        Jobs are created Running, listed per owner node, and finished once with a result or
        an ErrorCode.
        """
        for n, owner in enumerate(["node-1", "node-1", "node-2"]):
            await self.store.create_job(f"job-{n}", "APIStartVmInstanceMsg", {"n": n}, owner,
                                        resource_uuid="vm-1")
        running = await self.store.running_jobs("node-1")
        self.assertEqual([j["uuid"] for j in running], ["job-0", "job-1"])
        done = await self.store.finish_job("job-0", result={"inventory": {"uuid": "vm-1"}})
        self.assertEqual((done["state"], done["result"]), ("Succeeded", {"inventory": {"uuid": "vm-1"}}))
        self.assertIsNotNone(done["finishDate"])
        err = error_code(SYS.TIMEOUT, "agent did not answer")
        failed = await self.store.finish_job("job-1", error=err)
        self.assertEqual(failed["state"], "Failed")
        self.assertEqual(failed["error"], err.to_dict())
        await self.failure(self.store.finish_job("job-1", result=1),
                           SYS.CHANGE_RESOURCE_STATE_ERROR)
        self.assertEqual(await self.store.running_jobs("node-1"), [])
        await self.failure(self.store.create_job("job-2", "x", {}, "node-1"), DB.DUPLICATE)

    @async_to_deferred
    async def test_claim_jobs(self) -> None:
        """
        A node takes over the running jobs of a dead one in one statement: two concurrent
        claimers split them, never share one; finished jobs stay where they are.
        """
        for n in range(6):
            await self.store.create_job(f"job-{n}", "APIStartVmInstanceMsg", {}, "dead")
        await self.store.finish_job("job-5", result=None)
        claims = await defer.gatherResults([
            self.store.claim_jobs("dead", "mn-1"), self.store.claim_jobs("dead", "mn-2")])
        uuids = [j["uuid"] for claim in claims for j in claim]
        self.assertEqual(sorted(uuids), [f"job-{n}" for n in range(5)])
        self.assertTrue(all(j["managementNodeUuid"] == "mn-1" for j in claims[0]))
        self.assertTrue(all(j["managementNodeUuid"] == "mn-2" for j in claims[1]))
        self.assertEqual(await self.store.running_jobs("dead"), [])
        owned = len(await self.store.running_jobs("mn-1")) + len(
            await self.store.running_jobs("mn-2"))
        self.assertEqual(owned, 5)
        self.assertEqual((await self.store.get("job", "job-5"))["managementNodeUuid"], "dead")

    @async_to_deferred
    async def test_thread_budget(self) -> None:
        """
        However many operations are in flight, the store uses at most pool_size threads.
        """
        await self.seed("zone")
        before = threading.active_count()
        await defer.gatherResults([self.store.get("zone", "zone-1") for _ in range(200)])
        pool = getattr(self.store, "_pool", None)
        if pool is not None:
            self.assertLessEqual(len(pool.threadpool.threads), self.store.pool_size)
        else:
            self.assertEqual(self.store.pool_size, 0)
            self.assertEqual(threading.active_count(), before)

    @async_to_deferred
    async def test_management_nodes(self) -> None:
        """
        Heartbeats upsert the node row; only nodes with a recent heartbeat are live; a node
        can be deleted.
        """
        first = await self.store.heartbeat("mn-b", "host-b", 8080, state="JOINING")
        again = await self.store.heartbeat("mn-b", "host-b", 8080)
        self.assertEqual(again["state"], "RUNNING")
        self.assertEqual(again["joinDate"], first["joinDate"])
        self.assertGreaterEqual(again["heartbeat"], first["heartbeat"])
        await self.store.heartbeat("mn-a", "host-a")
        await self.store.update("managementNode", "mn-a",
                                {"heartbeat": again["heartbeat"] - 100})
        live = await self.store.live_management_nodes(30)
        self.assertEqual([n["uuid"] for n in live], ["mn-b"])
        live = await self.store.live_management_nodes(1000)
        self.assertEqual([n["uuid"] for n in live], ["mn-a", "mn-b"])
        self.assertTrue(await self.store.delete_management_node("mn-a"))
        self.assertEqual([n["uuid"] for n in await self.store.live_management_nodes(1000)],
                         ["mn-b"])

    # -- queries ---------------------------------------------------------------------------

    @async_to_deferred
    async def test_query(self) -> None:
        """
        Every operator, sort, paging, count and fields give the same answers on both
        backends; LIKE is case-sensitive on both.
        """
        await self.seed("zone", "cluster")
        for n in range(6):
            await self.store.add_host(dict(
                TOPOLOGY["host"], uuid=f"h{n}", name=f"Host-{n}" if n % 2 else f"host-{n}",
                managementIp=f"10.1.0.{n}", totalCpuCapacity=n,
                description=None if n < 3 else "rack"))

        async def uuids(*conds: str, **kw: Any) -> list[str]:
            r = await self.store.query("host", Query(conditions=conds, **kw))
            return [h["uuid"] for h in r.inventories]

        self.assertEqual(await uuids("totalCpuCapacity>3"), ["h4", "h5"])
        self.assertEqual(await uuids("totalCpuCapacity>=3"), ["h3", "h4", "h5"])
        self.assertEqual(await uuids("totalCpuCapacity<1"), ["h0"])
        self.assertEqual(await uuids("totalCpuCapacity<=1"), ["h0", "h1"])
        self.assertEqual(await uuids("totalCpuCapacity=2"), ["h2"])
        self.assertEqual(await uuids("totalCpuCapacity!=2", "totalCpuCapacity<4"),
                         ["h0", "h1", "h3"])
        self.assertEqual(await uuids("uuid?=h1,h3,zz"), ["h1", "h3"])
        self.assertEqual(await uuids("uuid!?=h1,h3"), ["h0", "h2", "h4", "h5"])
        self.assertEqual(await uuids("name~=host-%"), ["h0", "h2", "h4"])
        self.assertEqual(await uuids("name!~=host-%"), ["h1", "h3", "h5"])
        self.assertEqual(await uuids("description is null"), ["h0", "h1", "h2"])
        self.assertEqual(await uuids("description not null"), ["h3", "h4", "h5"])
        self.assertEqual(await uuids(sort="-totalCpuCapacity", limit=2), ["h5", "h4"])
        self.assertEqual(await uuids(sort="+totalCpuCapacity", limit=2, start=1), ["h1", "h2"])
        r = await self.store.query("host", Query(count=True, conditions=["totalCpuCapacity>0"]))
        self.assertEqual((r.inventories, r.total), ([], 5))
        r = await self.store.query("host", Query(reply_with_count=True, limit=1,
                                                 fields=["uuid", "name"]))
        self.assertEqual((r.inventories, r.total), ([{"uuid": "h0", "name": "host-0"}], 6))

    @async_to_deferred
    async def test_query_injection(self) -> None:
        """
        Injection attempts through names, sort and fields are SYS.1007; through values they
        are plain values. The tables are intact afterwards.
        """
        await self.seed("zone")
        for q in (
            Query(conditions=["name=x' OR '1'='1"]),
            Query(conditions=["name=zone1'; DROP TABLE zones; --"]),
            Query(conditions=["uuid?=zone-1') OR ('1'='1"]),
        ):
            r = await self.store.query("zone", q)
            self.assertEqual(r.inventories, [])
        for q in (
            Query(conditions=["name OR 1=1 --=x"]),
            Query(conditions=["(select 1)=1"]),
            Query(conditions=["name;DROP TABLE zones=1"]),
            Query(sort="name; DROP TABLE zones"),
            Query(sort="name DESC"),
            Query(fields=["uuid", "(SELECT password FROM accounts)"]),
            Query(limit="1; DROP TABLE zones"),
        ):
            await self.failure(self.store.query("zone", q), SYS.INVALID_ARGUMENT_ERROR)
        await self.failure(self.store.query("zones; DROP TABLE zones", Query()),
                           SYS.INVALID_ARGUMENT_ERROR)
        self.assertEqual(len((await self.store.query("zone", Query())).inventories), 1)

    @async_to_deferred
    async def test_thread_functions_run_on_plain_connections(self) -> None:
        """
        The C{*_thd} functions are synchronous functions of a L{Db}: the pool runs them, and
        so can a plain connection (what the property tests use).
        """
        await self.seed("zone")
        rows = await self.raw(lambda db: (isinstance(db, Db), db.all(
            "SELECT name FROM zones WHERE uuid = ?", ("zone-1",))))
        self.assertEqual((rows[0], [tuple(r) for r in rows[1]]), (True, [("zone1",)]))


class SQLiteContractTests(SQLiteStoreFactory, StoreContractMixin, unittest.TestCase):
    """
    The contract on SQLite (temp file, WAL).
    """


class PostgresContractTests(PostgresStoreFactory, StoreContractMixin, unittest.TestCase):
    """
    The contract on the real PostgreSQL (fresh database per test).
    """

    @async_to_deferred
    async def test_jit_off(self) -> None:
        """
        Pooled connections run with JIT off (the allocator's counting query over 10,000
        hosts spent most of its time compiling), and keep the statement timeout.
        """
        rows = await self.raw(lambda db: db.all("SELECT current_setting('jit'),"
                                                " current_setting('statement_timeout')"))
        self.assertEqual(rows[0][0], "off")
        self.assertNotEqual(rows[0][1], "0")


class MemoryContractTests(MemoryStoreFactory, StoreContractMixin, unittest.TestCase):
    """
    The contract on the in-memory store (L{zcontrol.db.memory.MemoryStore}).
    """


class PostgresNonCTextTests(PostgresNonCStoreFactory, TextOrderMixin, unittest.TestCase):
    """
    Text order on a PostgreSQL database whose own collation is not code point order (ICU
    English, as a database created with C{LC_COLLATE en_US.UTF-8} would sort).
    """

    @async_to_deferred
    async def test_database_collation_is_linguistic(self) -> None:
        """
        The fixture is what it claims: the database's default collation puts C{'a'} before
        C{'B'} (code point order puts it after), so the text order tests above prove that
        the store does not depend on it.
        """
        rows = await self.raw(lambda db: db.all("SELECT 'a' < 'B', 'a' < 'B' COLLATE \"C\""))
        self.assertEqual(tuple(rows[0]), (True, False))

    @async_to_deferred
    async def test_every_text_column_in_c(self) -> None:
        """
        Fault (issue 8 item 13): every text column of the schema (including the ones later
        migrations add) has collation C{"C"}, so no comparison or sort of the store, its
        indexes included, follows the database's locale.
        """
        rows = await self.raw(lambda db: db.all(
            "SELECT table_name, column_name, collation_name FROM information_schema.columns"
            " WHERE table_schema = current_schema()"
            " AND data_type IN ('text', 'character varying', 'character')"))
        self.assertGreater(len(rows), 100)
        self.assertEqual([r for r in rows if r[2] != "C"], [])

    @async_to_deferred
    async def test_upgrade_from_version_2(self) -> None:
        """
        A database created at schema version 2 (text in the database's collation) is
        converted by migration 0003: its rows are kept and sort by code point after.
        """
        await self.store.stop()
        self.stores.remove(self.store)
        await deferToThread(pg_drop_database_sync, self.db_name)
        await self.setUp_database()
        old = [m for m in load_migrations("postgresql") if m.version <= 2]
        store = open_store(self.store_url(), reactor, **self.store_options)

        def at_version_2(db: Db) -> int:
            return _thd.migrate_thd(db, old, 0.0)

        # The store as it was at version 2: no collation set by the runner.
        self.patch(store.dialect, "after_migrations", lambda db: None)
        self.patch(store.dialect, "ddl", lambda statement: statement)
        store._pool = store.pool_class(store.dialect, reactor, store.pool_size)
        store._pool.start()
        try:
            self.assertEqual(await store._raw_run(at_version_2), 2)
            for text in TEXTS:
                await store._raw_run(_thd.insert_thd, "zone",
                                     {"uuid": text, "name": text}, 0.0)
            r = await store._raw_run(_thd.query_thd, "zone", Query(sort="name"))
            self.assertNotEqual([z["name"] for z in r.inventories], sorted(TEXTS))
        finally:
            pool, store._pool = store._pool, None
            pool.close()
        self.store = await self.open()
        self.assertEqual(self.store.schema_version, LATEST_SCHEMA)
        self.assertEqual(await self.names(sort="name"), sorted(TEXTS))
        self.assertEqual(await self.names("name<a"), sorted(t for t in TEXTS if t < "a"))


class SQLiteMemoryStoreTests(unittest.TestCase):
    """
    The in-memory SQLite store (one connection).
    """

    @async_to_deferred
    async def test_memory(self) -> None:
        """
        sqlite://:memory: migrates and stores rows on its single connection.
        """
        store = open_store("sqlite://:memory:", reactor)
        await store.start()
        try:
            await store.insert("zone", dict(TOPOLOGY["zone"]))
            self.assertEqual((await store.get("zone", "zone-1"))["name"], "zone1")
        finally:
            await store.stop()


class OpenStoreTests(unittest.SynchronousTestCase):
    """
    The URL factory.
    """

    def test_urls(self) -> None:
        """
        sqlite and postgresql URLs pick the backend; bad URLs are refused.
        """
        s = open_store("sqlite:///tmp/x.db", reactor)
        self.assertEqual((s.backend, s.dialect.path), ("sqlite", "/tmp/x.db"))
        self.assertEqual(open_store("sqlite:////tmp/x.db", reactor).dialect.path, "/tmp/x.db")
        m = open_store("sqlite://:memory:", reactor)
        self.assertEqual((m.dialect.path, m.pool_size), (":memory:", 1))
        p = open_store("postgresql://postgres@127.0.0.1:5432/db", reactor, pool_size=3)
        self.assertEqual((p.backend, p.pool_size), ("postgresql", 3))
        mem = open_store("memory://", reactor)
        self.assertEqual((mem.backend, mem.pool_size, mem.name), ("memory", 0, None))
        self.assertEqual(open_store("memory://shared", reactor).name, "shared")
        self.assertRaises(ValueError, open_store, "sqlite://relative.db", reactor)
        self.assertRaises(ValueError, open_store, "mysql://x/y", reactor)
        self.assertRaises(ValueError, open_store, "sqlite:///x.db", reactor, pool_size=17)
