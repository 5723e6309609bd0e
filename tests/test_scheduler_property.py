"""
The store's SQL pre-filter agrees with the pure filters (Note [allocation pre-filter] in
L{zcontrol.db.components.scheduler}): random inventories loaded into a L{MemoryStore} (the
SQLite schema and statements), requests over them, and the allocator's choice compared with
the pure functions over the full snapshot.
"""

from __future__ import annotations

from typing import Any

from hypothesis import find, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.test_scheduler_fixtures import inventories, load_inventory, requests, snapshot_of
from zcontrol._defer import async_to_deferred
from zcontrol.core.errors import OperationError
from zcontrol.db.memory import MemoryStore
from zcontrol.scheduler.allocator import Allocator
from zcontrol.scheduler.filters import passes, run_filters, usable_primary_storages
from zcontrol.scheduler.messages import ALLOCATOR
from zcontrol.scheduler.strategies import order_hosts, strategy_named


@st.composite
def cases(draw):
    inv = draw(inventories())
    return inv, draw(requests(inv)), draw(st.integers(1, 4))


def _gaps(drift: list[dict]) -> dict[tuple[str, str], int]:
    return {(d["uuid"], d["field"]): d["computed"] - d["recorded"] for d in drift}


class PreFilterAgreementTests(SynchronousTestCase):
    """
    One fresh in-memory store per example, run synchronously on a Clock.
    """

    def run_sync(self, d: Deferred, store: MemoryStore) -> Any:
        for _ in range(200):
            if d.called:
                break
            store.flush()
        return self.successResultOf(d)

    def with_store(self, fn) -> None:
        clock = Clock()
        store = MemoryStore(clock, shuffle=False)
        self.run_sync(store.start(), store)
        try:
            self.run_sync(async_to_deferred(fn)(store), store)
        finally:
            self.run_sync(store.stop(), store)

    @given(cases())
    def test_store_agrees_with_pure_filters(self, case) -> None:
        """
        On a random inventory: the store's full snapshot filters as the Python one does;
        the per-filter counts query equals the pure counts; the pre-filtered page is the
        first C{limit} fitting hosts in the strategy's order; the allocator reserves on the
        host the strategy's definition picks over the full snapshot (passing every filter)
        with the storages the pure function lists, or fails with C{ALLOCATOR.1000}, whose
        per-filter counts are the pure ones, exactly when the pure filters find nothing.
        """
        inv, req, limit = case
        expected_snap = snapshot_of(inv)
        expected = run_filters(req, expected_snap)
        strategy = strategy_named(req.allocator_strategy)
        ordered = order_hosts(strategy, expected.hosts)

        async def check(store: MemoryStore) -> None:
            await load_inventory(store, inv)
            full = await store.full_snapshot(req.l3_network_uuids)
            got = run_filters(req, full)
            self.assertEqual(got, expected)
            for h in got.hosts:
                self.assertEqual(usable_primary_storages(req, full, h),
                                 usable_primary_storages(req, expected_snap, h))
            candidates, lefts = await store.allocation_counts(req)
            self.assertEqual((candidates, lefts),
                             (expected.candidates, [c.left for c in expected.counts]))
            page = await store.allocation_snapshot(req, strategy.order, limit)
            self.assertEqual([h.uuid for h in order_hosts(strategy, page.hosts)],
                             [h.uuid for h in ordered[:limit]])
            self.assertEqual(run_filters(req, page).hosts, page.hosts)
            allocator = Allocator(store, page_size=limit)
            if not ordered:
                try:
                    await allocator.allocate(req, ("VmInstanceVO", "vm-1"))
                except OperationError as e:
                    self.assertEqual(e.error.code, ALLOCATOR.NO_AVAILABLE_HOST)
                    self.assertEqual(e.error.opaque["filters"],
                                     [c.as_dict() for c in expected.counts])
                    self.assertEqual(e.error.opaque["candidates"], expected.candidates)
                else:
                    self.fail("an allocation succeeded where no host fits")
                return
            chosen = ordered[0]
            # (the inventory's figures are drawn without holders: drift is expected; the
            # reservation must not change it)
            drift = _gaps(await store.audit_capacity())
            allocation = await allocator.allocate(req, ("VmInstanceVO", "vm-1"))
            self.assertEqual(allocation.host["uuid"], chosen.uuid)
            self.assertTrue(all(passes(req, expected_snap, chosen).values()))
            self.assertEqual(allocation.primary_storage_uuids,
                             usable_primary_storages(req, expected_snap, chosen))
            self.assertEqual(allocation.host["availableCpuCapacity"],
                             chosen.available_cpu - req.cpu_num)
            self.assertEqual(allocation.host["availableMemoryCapacity"],
                             chosen.available_memory - req.memory_size)
            self.assertEqual(_gaps(await store.audit_capacity()), drift)
            self.assertEqual(await store.holder_reservations(("VmInstanceVO", "vm-1")),
                             [(chosen.uuid, req.cpu_num, req.memory_size)])

        self.with_store(check)

    def test_generator_covers_both_outcomes(self) -> None:
        """
        The generated cases include allocations that fit (with several hosts fitting) and
        ones that do not, so the agreement test checks both sides.
        """
        def fitting(case) -> int:
            inv, req, _ = case
            return len(run_filters(req, snapshot_of(inv)).hosts)

        quiet = settings(database=None, max_examples=500)
        self.assertGreaterEqual(fitting(find(cases(), lambda c: fitting(c) >= 3,
                                             settings=quiet)), 3)
        self.assertEqual(fitting(find(cases(), lambda c: fitting(c) == 0 and len(c[0].of("host")) > 3,
                                      settings=quiet)), 0)
