"""
The allocator's pure filters and strategies (L{zcontrol.scheduler.filters},
L{zcontrol.scheduler.strategies}), property-tested with hypothesis over random inventories,
plus a few examples spelled out.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.test_scheduler_fixtures import GIB, inventories, requests, snapshot_of
from zcontrol.scheduler.allocator import no_host_error
from zcontrol.scheduler.filters import FILTER_NAMES, passes, run_filters, usable_primary_storages
from zcontrol.scheduler.messages import ALLOCATOR
from zcontrol.scheduler.model import AllocationRequest, HostView, PrimaryStorageView, Snapshot
from zcontrol.scheduler.strategies import (
    FIRST_FIT,
    LAST_HOST_PREFERRED,
    LEAST_USED,
    STRATEGIES,
    order_hosts,
    strategy_named,
)


@st.composite
def cases(draw):
    inv = draw(inventories())
    return inv, draw(requests(inv))


class FilterPropertyTests(SynchronousTestCase):
    """
    The filters over full snapshots of random inventories.
    """

    @given(cases())
    def test_survivors_pass_every_filter(self, case) -> None:
        """
        Every host left passes every filter; every host removed fails at least one, and the
        first it fails is the filter that removed it.
        """
        inv, req = case
        snap = snapshot_of(inv)
        result = run_filters(req, snap)
        left = {h.uuid for h in result.hosts}
        for h in snap.hosts:
            verdicts = passes(req, snap, h)
            self.assertEqual(h.uuid in left, all(verdicts.values()), (h, verdicts))

    @given(cases())
    def test_counts_add_up(self, case) -> None:
        """
        The removed counts add up to the candidates minus the hosts left; each filter's
        C{left} is the previous one's minus what it removed; the filters are in order.
        """
        inv, req = case
        result = run_filters(req, snapshot_of(inv))
        self.assertEqual(result.candidates, len(inv.of("host")))
        self.assertEqual([c.name for c in result.counts], list(FILTER_NAMES))
        before = result.candidates
        for c in result.counts:
            self.assertGreaterEqual(c.removed, 0)
            self.assertEqual(c.left, before - c.removed)
            before = c.left
        self.assertEqual(sum(c.removed for c in result.counts),
                         result.candidates - len(result.hosts))
        self.assertEqual(before, len(result.hosts))

    @given(cases())
    def test_first_fit_is_the_smallest_uuid(self, case) -> None:
        """
        First-fit chooses the fitting host with the smallest uuid.
        """
        inv, req = case
        fitting = run_filters(req, snapshot_of(inv)).hosts
        if fitting:
            chosen = order_hosts(FIRST_FIT, fitting)[0]
            self.assertEqual(chosen.uuid, min(h.uuid for h in fitting))

    @given(cases())
    def test_least_used_has_the_most_free(self, case) -> None:
        """
        Least-used chooses a fitting host no other fitting host beats: none has more free
        memory, or as much and more free CPUs, or as much of both and a smaller uuid.
        """
        inv, req = case
        fitting = run_filters(req, snapshot_of(inv)).hosts
        if not fitting:
            return
        c = order_hosts(LEAST_USED, fitting)[0]
        for h in fitting:
            if h is c:
                continue
            self.assertTrue(
                h.available_memory < c.available_memory
                or (h.available_memory == c.available_memory
                    and (h.available_cpu < c.available_cpu
                         or (h.available_cpu == c.available_cpu and h.uuid > c.uuid))),
                (c, h))

    @given(cases())
    def test_storages_fit_the_root_volume(self, case) -> None:
        """
        Every primary storage offered for a fitting host is attached to its cluster,
        Enabled and Connected, has room for the root volume (on the host for LocalStorage;
        mounted on the host for NFS), is the requested one when one is; best first.
        """
        inv, req = case
        snap = snapshot_of(inv)
        for h in run_filters(req, snap).hosts:
            found = usable_primary_storages(req, snap, h)
            self.assertTrue(found)
            rooms = []
            for u in found:
                ps = snap.primary_storages[u]
                self.assertIn(u, snap.cluster_primary_storages[h.cluster_uuid])
                self.assertEqual((ps.state, ps.status), ("Enabled", "Connected"))
                self.assertGreaterEqual(ps.available_capacity, req.disk_size)
                if req.primary_storage_uuid is not None:
                    self.assertEqual(u, req.primary_storage_uuid)
                if ps.type == "LocalStorage":
                    self.assertGreaterEqual(snap.local_capacity[(u, h.uuid)], req.disk_size)
                    rooms.append(snap.local_capacity[(u, h.uuid)])
                else:
                    self.assertIn((u, h.uuid), snap.mounted)
                    rooms.append(ps.available_capacity)
            self.assertEqual(rooms, sorted(rooms, reverse=True))

    @given(cases())
    def test_no_host_error_names_every_filter(self, case) -> None:
        """
        The "no available host" error carries each filter's count and names the request.
        """
        inv, req = case
        result = run_filters(req, snapshot_of(inv))
        err = no_host_error(req, result.candidates, [c.left for c in result.counts]).error
        self.assertEqual(err.code, ALLOCATOR.NO_AVAILABLE_HOST)
        self.assertEqual(err.opaque["filters"], [c.as_dict() for c in result.counts])
        self.assertEqual(err.opaque["candidates"], result.candidates)
        self.assertIn(f"cpuNum={req.cpu_num}", err.details)
        self.assertIn(f"memorySize={req.memory_size}", err.details)
        self.assertIn(f"diskSize={req.disk_size}", err.details)
        for l3 in req.l3_network_uuids:
            self.assertIn(l3, err.details)


def _host(uuid: str, **kw) -> HostView:
    kw.setdefault("available_cpu", 8)
    kw.setdefault("available_memory", 8 * GIB)
    return HostView(uuid=uuid, zone_uuid="z", cluster_uuid=kw.pop("cluster", "c"), **kw)


class FilterExampleTests(SynchronousTestCase):
    """
    The filters and strategies on hand-made snapshots.
    """

    def snap(self, hosts, **kw) -> Snapshot:
        kw.setdefault("cluster_l2", {"c": {"l2"}})
        kw.setdefault("cluster_primary_storages", {"c": ["nfs"]})
        kw.setdefault("l3_l2", {"l3": "l2"})
        kw.setdefault("primary_storages", {"nfs": PrimaryStorageView(
            uuid="nfs", type="NFS", available_capacity=100 * GIB)})
        kw.setdefault("mounted", {("nfs", h.uuid) for h in hosts})
        return Snapshot(hosts=hosts, **kw)

    def req(self, **kw) -> AllocationRequest:
        kw.setdefault("cpu_num", 1)
        kw.setdefault("memory_size", GIB)
        kw.setdefault("disk_size", 10 * GIB)
        kw.setdefault("l3_network_uuids", ["l3"])
        return AllocationRequest(**kw)

    def left(self, req, snap) -> list[str]:
        return [h.uuid for h in run_filters(req, snap).hosts]

    def test_states(self) -> None:
        """
        Only Enabled and Connected hosts in Enabled clusters and zones are kept: not
        Disabled, PreMaintenance, Maintenance, Connecting or Disconnected ones.
        """
        hosts = [_host("h1"), _host("h2", state="Maintenance"),
                 _host("h3", state="PreMaintenance"), _host("h4", state="Disabled"),
                 _host("h5", status="Disconnected"), _host("h6", status="Connecting"),
                 _host("h7", cluster_state="Disabled"), _host("h8", zone_state="Disabled")]
        result = run_filters(self.req(), self.snap(hosts))
        self.assertEqual([h.uuid for h in result.hosts], ["h1"])
        self.assertEqual(result.counts[2].as_dict(), {"name": "state", "removed": 7, "left": 1})

    def test_local_storage_needs_room_on_that_host(self) -> None:
        """
        LocalStorage room counts on the host itself: a host whose own disk is too small is
        removed although the storage as a whole has room; a host without a ref too.
        """
        local = PrimaryStorageView(uuid="local", type="LocalStorage",
                                   available_capacity=100 * GIB)
        snap = self.snap([_host("h1"), _host("h2"), _host("h3")],
                         cluster_primary_storages={"c": ["local"]},
                         primary_storages={"local": local},
                         local_capacity={("local", "h1"): 5 * GIB, ("local", "h2"): 50 * GIB})
        self.assertEqual(self.left(self.req(), snap), ["h2"])
        self.assertEqual(self.left(self.req(disk_size=5 * GIB), snap), ["h1", "h2"])

    def test_nfs_needs_a_connected_mount(self) -> None:
        """
        NFS storage counts only on hosts where it is mounted (Connected), and only with
        room on the storage.
        """
        snap = self.snap([_host("h1"), _host("h2")], mounted={("nfs", "h2")})
        self.assertEqual(self.left(self.req(), snap), ["h2"])
        self.assertEqual(self.left(self.req(disk_size=101 * GIB), snap), [])

    def test_every_l3_needs_its_l2(self) -> None:
        """
        The cluster must be attached to the L2 of every requested L3 network.
        """
        snap = self.snap([_host("h1"), _host("h2", cluster="c2")],
                         cluster_l2={"c": {"l2"}, "c2": {"l2", "l2b"}},
                         cluster_primary_storages={"c": ["nfs"], "c2": ["nfs"]},
                         l3_l2={"l3": "l2", "l3b": "l2b"})
        self.assertEqual(self.left(self.req(), snap), ["h1", "h2"])
        self.assertEqual(self.left(self.req(l3_network_uuids=["l3", "l3b"]), snap), ["h2"])
        self.assertEqual(self.left(self.req(l3_network_uuids=["nope"]), snap), [])

    def test_narrowing_and_avoid(self) -> None:
        """
        An explicit zone, cluster or host narrows the candidates; the avoid list removes.
        """
        snap = self.snap([_host("h1"), _host("h2"), _host("h3")])
        self.assertEqual(self.left(self.req(host_uuid="h2"), snap), ["h2"])
        self.assertEqual(self.left(self.req(cluster_uuid="other"), snap), [])
        self.assertEqual(self.left(self.req(zone_uuid="z", avoid_host_uuids=["h1"]), snap),
                         ["h2", "h3"])

    def test_capacity(self) -> None:
        """
        CPUs and memory must both suffice (a request takes C{cpu_num} CPUs).
        """
        snap = self.snap([_host("h1", available_cpu=1), _host("h2", available_memory=GIB - 1),
                          _host("h3", available_cpu=2, available_memory=GIB)])
        self.assertEqual(self.left(self.req(cpu_num=2), snap), ["h3"])

    def test_strategies(self) -> None:
        """
        First-fit orders by uuid, least-used by free memory, free CPUs, uuid; ZStack's
        names map onto them and None is first-fit.
        """
        hosts = [_host("h1", available_memory=2 * GIB), _host("h2", available_memory=4 * GIB,
                                                               available_cpu=2),
                 _host("h3", available_memory=4 * GIB, available_cpu=4),
                 _host("h4", available_memory=4 * GIB, available_cpu=4)]
        self.assertEqual([h.uuid for h in order_hosts(strategy_named(None), hosts)],
                         ["h1", "h2", "h3", "h4"])
        least = strategy_named("LeastVmPreferredHostAllocatorStrategy")
        self.assertEqual([h.uuid for h in order_hosts(least, hosts)], ["h3", "h4", "h2", "h1"])
        self.assertIs(strategy_named("DefaultHostAllocatorStrategy"), FIRST_FIT)
        self.assertEqual(set(STRATEGIES.values()), {FIRST_FIT, LEAST_USED, LAST_HOST_PREFERRED})
        # Last-host-preferred orders the other hosts as first-fit.
        self.assertEqual([h.uuid for h in order_hosts(LAST_HOST_PREFERRED, hosts)],
                         ["h1", "h2", "h3", "h4"])
        self.assertRaises(KeyError, strategy_named, "RandomStrategy")
