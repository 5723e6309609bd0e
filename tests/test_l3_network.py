"""
The L3 network service, deterministically (LocalBus, MemoryStore, Clock): L3 networks, IP
ranges (with a hypothesis property of the overlap rule), DNS, network service refs, the
address queries; and the range rules as pure functions.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import SynchronousTestCase

from tests.test_l2_network import NetworkTestCase
from zcontrol.core.errors import SYS, OperationError
from zcontrol.db.memory import MemoryStore
from zcontrol.services import inventory as inv
from zcontrol.services.network import (
    L3,
    L3_SERVICE_ID,
    AddDnsToL3NetworkMsg,
    AddIpRangeByNetworkCidrMsg,
    AddIpRangeMsg,
    AllocateIpMsg,
    AttachNetworkServiceToL3NetworkMsg,
    ChangeL3NetworkStateMsg,
    CheckIpAvailabilityMsg,
    CreateL3NetworkMsg,
    DeleteIpRangeMsg,
    DeleteL3NetworkMsg,
    DetachNetworkServiceFromL3NetworkMsg,
    GetFreeIpMsg,
    GetIpAddressCapacityMsg,
    RemoveDnsFromL3NetworkMsg,
    ReturnIpMsg,
    UpdateL3NetworkMsg,
)
from zcontrol.services.network.ranges import overlaps, range_from_fields, ranges_from_cidr


def add_range(start: str, end: str, l3: str = "l3a", gateway: str = "10.0.0.1",
              netmask: str = "255.255.255.0", **kw: Any) -> AddIpRangeMsg:
    return AddIpRangeMsg(l3_network_uuid=l3, name="r", start_ip=start, end_ip=end,
                         netmask=netmask, gateway=gateway, **kw)


class L3TestCase(NetworkTestCase):
    """
    An L2 C{l2a} attached to cluster C{c}.
    """

    def setUp(self) -> None:
        super().setUp()
        self.novlan()
        self.attach("l2a")


class CreateL3Tests(L3TestCase):
    """
    CreateL3NetworkMsg, UpdateL3NetworkMsg, ChangeL3NetworkStateMsg.
    """

    def test_create(self) -> None:
        """
        The inventory: zone from the L2, type L3BasicNetwork, the empty lists.
        """
        l3 = self.l3(dns_domain="example.org", category="public")
        self.assertEqual(
            {k: l3[k] for k in ("uuid", "l2NetworkUuid", "zoneUuid", "type", "category",
                                "system", "state", "dnsDomain", "ipVersion", "ipRanges",
                                "dns", "networkServices")},
            {"uuid": "l3a", "l2NetworkUuid": "l2a", "zoneUuid": "z", "type": "L3BasicNetwork",
             "category": "Public", "system": False, "state": "Enabled",
             "dnsDomain": "example.org", "ipVersion": 4, "ipRanges": [], "dns": [],
             "networkServices": []})

    def test_bad_fields(self) -> None:
        """
        Each bad field is SYS.1007 naming it; an unknown L2 is L3.1000 naming l2NetworkUuid.
        """
        for kw, field in [
            ({"type": "L3VpcNetwork"}, "type"),
            ({"category": "Guest"}, "category"),
            ({"category": "Private", "system": True}, "category"),
            ({"category": "System", "system": False}, "category"),
            ({"dns_domain": "bad domain"}, "dnsDomain"),
            ({"ip_version": 6}, "ipVersion"),
            ({"name": ""}, "name"),
        ]:
            args = {"name": "n", "l2_network_uuid": "l2a", **kw}
            self.refused(CreateL3NetworkMsg(**args), SYS.INVALID_ARGUMENT_ERROR, field)
        self.refused(CreateL3NetworkMsg(name="n", l2_network_uuid="nope"), L3.NOT_FOUND,
                     "l2NetworkUuid")
        self.l3("sys", category="System", system=True)
        self.assertEqual([r["uuid"] for r in self.rows("l3Network")], ["sys"])

    def test_update_and_state(self) -> None:
        """
        Update changes the fields given; category and system are checked together;
        disable/enable flip the state; an unknown state event is SYS.1007.
        """
        self.l3()
        l3 = self.ok(UpdateL3NetworkMsg(uuid="l3a", name="x", category="Public",
                                        system=True)).inventory
        self.assertEqual((l3["name"], l3["category"], l3["system"]), ("x", "Public", True))
        self.refused(UpdateL3NetworkMsg(uuid="l3a", category="Private"),
                     SYS.INVALID_ARGUMENT_ERROR, "category")
        l3 = self.ok(ChangeL3NetworkStateMsg(uuid="l3a", state_event="disable")).inventory
        self.assertEqual(l3["state"], "Disabled")
        l3 = self.ok(ChangeL3NetworkStateMsg(uuid="l3a", state_event="enable")).inventory
        self.assertEqual(l3["state"], "Enabled")
        self.refused(ChangeL3NetworkStateMsg(uuid="l3a", state_event="pause"),
                     SYS.INVALID_ARGUMENT_ERROR, "stateEvent")
        self.refused(ChangeL3NetworkStateMsg(uuid="nope", state_event="enable"),
                     L3.NOT_FOUND, "uuid")


class IpRangeTests(L3TestCase):
    """
    AddIpRangeMsg, AddIpRangeByNetworkCidrMsg, DeleteIpRangeMsg.
    """

    def setUp(self) -> None:
        super().setUp()
        self.l3()

    def test_add(self) -> None:
        """
        The range inventory has the integer forms, the CIDR and the prefix; the L3's
        inventory lists its ranges by start address.
        """
        r = self.ok(add_range("10.0.0.100", "10.0.0.200", uuid="rb")).inventory
        self.assertEqual(
            {k: r[k] for k in ("uuid", "l3NetworkUuid", "startIp", "endIp", "netmask",
                               "gateway", "networkCidr", "prefixLen", "ipVersion")},
            {"uuid": "rb", "l3NetworkUuid": "l3a", "startIp": "10.0.0.100",
             "endIp": "10.0.0.200", "netmask": "255.255.255.0", "gateway": "10.0.0.1",
             "networkCidr": "10.0.0.0/24", "prefixLen": 24, "ipVersion": 4})
        self.ok(add_range("10.0.0.10", "10.0.0.20", uuid="ra"))
        l3 = self.result(Deferred.fromCoroutine(inv.inventory(self.store, "l3Network", "l3a")))
        self.assertEqual([x["uuid"] for x in l3["ipRanges"]], ["ra", "rb"])

    def test_bad_ranges(self) -> None:
        """
        Invalid ranges are SYS.1007 naming the field; nothing is inserted.
        """
        cases = [
            (("10.0.0.300", "10.0.0.20"), {}, "startIp"),
            (("10.0.0.10", "x"), {}, "endIp"),
            (("10.0.0.20", "10.0.0.10"), {}, "endIp"),
            (("10.0.0.10", "10.0.0.20"), {"netmask": "255.0.255.0"}, "netmask"),
            (("10.0.0.10", "10.0.0.20"), {"netmask": "0.0.0.0"}, "netmask"),
            (("10.0.0.10", "10.0.1.20"), {}, "endIp"),
            (("10.0.0.10", "10.0.0.20"), {"gateway": "10.0.1.1"}, "gateway"),
            (("10.0.0.10", "10.0.0.20"), {"gateway": "10.0.0.15"}, "gateway"),
            (("10.0.0.0", "10.0.0.20"), {}, "startIp"),
            (("10.0.0.10", "10.0.0.255"), {}, "endIp"),
        ]
        for (start, end), kw, field in cases:
            self.refused(add_range(start, end, **kw), SYS.INVALID_ARGUMENT_ERROR, field)
        self.refused(add_range("10.0.0.10", "10.0.0.20", l3="nope"), L3.NOT_FOUND,
                     "l3NetworkUuid")
        self.assertEqual(self.rows("ipRange"), [])

    def test_overlap_same_l3(self) -> None:
        """
        An overlapping range of the same L3 is L3.1001 naming the existing range.
        """
        self.ok(add_range("10.0.0.10", "10.0.0.20", uuid="r1"))
        for start, end in [("10.0.0.20", "10.0.0.30"), ("10.0.0.2", "10.0.0.10"),
                           ("10.0.0.12", "10.0.0.13"), ("10.0.0.2", "10.0.0.254")]:
            err = self.refused(add_range(start, end), L3.IP_RANGE_OVERLAP)
            self.assertEqual(err.opaque["ipRangeUuid"], "r1")
            self.assertIn("r1", err.details)
        self.ok(add_range("10.0.0.21", "10.0.0.30"))

    def test_overlap_other_l3_same_l2(self) -> None:
        """
        Ranges of two L3 networks of one L2 cannot overlap; of another L2 they can.
        """
        self.ok(add_range("10.0.0.10", "10.0.0.20", uuid="r1"))
        self.l3("l3b")
        err = self.refused(add_range("10.0.0.15", "10.0.0.25", l3="l3b"), L3.IP_RANGE_OVERLAP)
        self.assertEqual((err.opaque["ipRangeUuid"], err.opaque["l3NetworkUuid"]),
                         ("r1", "l3a"))
        self.novlan("l2b", iface="eth1")
        self.l3("l3c", l2="l2b")
        self.ok(add_range("10.0.0.15", "10.0.0.25", l3="l3c"))

    def test_same_gateway_and_cidr(self) -> None:
        """
        Ranges of one L3 share the gateway and the network (L3.1009 naming the field).
        """
        self.ok(add_range("10.0.0.10", "10.0.0.20", uuid="r1"))
        err = self.refused(add_range("10.0.0.30", "10.0.0.40", gateway="10.0.0.254"),
                           L3.IP_RANGE_MISMATCH, "gateway")
        self.assertEqual(err.opaque["ipRangeUuid"], "r1")
        self.refused(add_range("10.0.0.30", "10.0.0.40", netmask="255.255.0.0"),
                     L3.IP_RANGE_MISMATCH, "netmask")

    def test_by_cidr(self) -> None:
        """
        A /24 with the default gateway: .1 is the gateway, .2-.254 the range; a gateway
        in the middle splits it in two.
        """
        reply = self.ok(AddIpRangeByNetworkCidrMsg(l3_network_uuid="l3a", name="c",
                                                   network_cidr="10.0.0.0/24"))
        self.assertEqual([(r["startIp"], r["endIp"], r["gateway"], r["networkCidr"])
                          for r in reply.inventories],
                         [("10.0.0.2", "10.0.0.254", "10.0.0.1", "10.0.0.0/24")])
        self.l3("l3b")
        self.novlan("l2b", iface="eth1")
        self.l3("l3c", l2="l2b")
        reply = self.ok(AddIpRangeByNetworkCidrMsg(l3_network_uuid="l3c", name="c",
                                                   network_cidr="10.1.0.0/24",
                                                   gateway="10.1.0.100"))
        self.assertEqual([(r["startIp"], r["endIp"]) for r in reply.inventories],
                         [("10.1.0.1", "10.1.0.99"), ("10.1.0.101", "10.1.0.254")])
        for cidr, gw, field in [("10.2.0.1/24", None, "networkCidr"),
                                ("10.2.0.0/31", None, "networkCidr"),
                                ("10.2.0.0/24", "10.2.0.255", "gateway"),
                                ("10.2.0.0/24", "10.3.0.1", "gateway")]:
            self.refused(AddIpRangeByNetworkCidrMsg(l3_network_uuid="l3b", name="c",
                                                    network_cidr=cidr, gateway=gw),
                         SYS.INVALID_ARGUMENT_ERROR, field)
        # Overlaps the ranges of l3a on the same L2.
        self.refused(AddIpRangeByNetworkCidrMsg(l3_network_uuid="l3b", name="c",
                                                network_cidr="10.0.0.0/25"),
                     L3.IP_RANGE_OVERLAP)

    def test_delete_range(self) -> None:
        """
        A range with held addresses is not deleted (L3.1008 naming the holders); once
        returned it is; deleting again is a no-op.
        """
        self.ok(add_range("10.0.0.10", "10.0.0.20", uuid="r1"))
        ip = self.ok(AllocateIpMsg(l3_network_uuid="l3a", holder_type="VmInstanceVO",
                                   holder_uuid="vm1")).inventory
        err = self.refused(DeleteIpRangeMsg(uuid="r1"), L3.IP_RANGE_IN_USE)
        self.assertEqual(err.opaque["holders"], [
            {"holderType": "VmInstanceVO", "holderUuid": "vm1", "ip": ip["ip"]}])
        self.assertIn("vm1", err.details)
        self.ok(ReturnIpMsg(l3_network_uuid="l3a", holder_type="VmInstanceVO",
                            holder_uuid="vm1"))
        self.ok(DeleteIpRangeMsg(uuid="r1"))
        self.assertEqual(self.rows("ipRange"), [])
        self.ok(DeleteIpRangeMsg(uuid="r1"))

    def test_concurrent_adds_never_overlap(self) -> None:
        """
        Overlapping AddIpRange messages sent at once, to one L3 and to a sibling L3 of the
        same L2: exactly one of each overlapping group wins.
        """
        self.l3("l3b")
        msgs = []
        for i in range(6):
            l3 = "l3a" if i % 2 else "l3b"
            msgs.append(add_range(f"10.0.0.{10 + i}", f"10.0.0.{40 + i}", l3=l3,
                                  service_id=L3_SERVICE_ID, resource_uuid=l3))
        ds = [self.bus.send(m) for m in msgs]
        self.pump()
        self.assertEqual(sum(self.successResultOf(d).success for d in ds), 1)
        ranges = self.rows("ipRange")
        for i, a in enumerate(ranges):
            for b in ranges[:i]:
                self.assertFalse(overlaps(a["startIpInLong"], a["endIpInLong"],
                                          b["startIpInLong"], b["endIpInLong"]))


class GatewayInRangeTests(L3TestCase):
    """
    Fault (review 2, item 7): a range's gateway could lie inside another L3 network's
    range on the same L2 network (one broadcast domain), so a VM on that L3 could be given
    the other network's router address.
    """

    def test_gateway_inside_another_range(self) -> None:
        """
        A new range whose gateway lies in an existing range of the L2, or whose addresses
        contain an existing range's gateway: L3.1001 naming that range; nothing added. A
        gateway outside every range is accepted.
        """
        self.l3("l3a")
        self.l3("l3b")
        self.ok(add_range("10.0.0.10", "10.0.0.20", l3="l3a", gateway="10.0.0.1", uuid="ra"))
        err = self.refused(add_range("10.0.0.30", "10.0.0.40", l3="l3b",
                                     gateway="10.0.0.15"), L3.IP_RANGE_OVERLAP, "gateway")
        self.assertEqual((err.opaque["ipRangeUuid"], err.opaque["l3NetworkUuid"]),
                         ("ra", "l3a"))
        self.assertIn("10.0.0.15", err.details)
        err = self.refused(add_range("10.0.0.1", "10.0.0.5", l3="l3b", gateway="10.0.0.50",
                                     netmask="255.255.0.0"), L3.IP_RANGE_OVERLAP)
        self.assertEqual(err.opaque["ipRangeUuid"], "ra")
        self.assertIn("contains the gateway 10.0.0.1", err.details)
        err = self.refused(AddIpRangeByNetworkCidrMsg(
            l3_network_uuid="l3b", name="c", network_cidr="10.0.0.0/29",
            gateway="10.0.0.6"), L3.IP_RANGE_OVERLAP)
        self.assertEqual(err.opaque["ipRangeUuid"], "ra")
        self.assertEqual([r["uuid"] for r in self.rows("ipRange")], ["ra"])
        self.ok(add_range("10.0.0.30", "10.0.0.40", l3="l3b", gateway="10.0.0.1"))

    def test_gateway_inside_the_other_new_range(self) -> None:
        """
        Within one request (a CIDR's two spans share the gateway they leave out): each
        range's gateway is checked against the others too.
        """
        from zcontrol.services.network.ranges import NewRange, check_new_ranges

        a = NewRange(167772170, 167772180, "255.255.255.0", "10.0.0.1", "10.0.0.0/24", 24)
        b = NewRange(167772190, 167772200, "255.255.255.0", "10.0.0.15", "10.0.0.0/24", 24)
        with self.assertRaises(OperationError) as e:
            check_new_ranges("l3a", [a, b], [])
        self.assertEqual(e.exception.error.code, L3.IP_RANGE_OVERLAP)
        self.assertEqual(e.exception.error.opaque["field"], "gateway")
        check_new_ranges("l3a", ranges_from_cidr("10.0.0.0/24", "10.0.0.100"), [])


class RangePropertyTests(L3TestCase):
    """
    The overlap rule, by property: AddIpRange accepts exactly the ranges that overlap no
    range accepted before (on the L3 or its sibling on the same L2).
    """

    @settings(max_examples=30)
    @given(st.lists(st.tuples(st.integers(2, 254), st.integers(0, 40), st.booleans()),
                    min_size=1, max_size=12))
    def test_accepts_exactly_the_non_overlapping(self, specs: list) -> None:
        """
        For random ranges of 10.0.0.0/24 (gateway .1) on two L3 networks of one L2, each is
        accepted iff it overlaps no accepted one.
        """
        self.tearDown_l3s()
        self.l3("p1")
        self.l3("p2")
        accepted: list[tuple[int, int]] = []
        for start, width, second in specs:
            end = min(start + width, 254)
            l3 = "p2" if second else "p1"
            reply = self.send(add_range(f"10.0.0.{start}", f"10.0.0.{end}", l3=l3))
            expect = not any(overlaps(start, end, a, b) for a, b in accepted)
            self.assertEqual(reply.success, expect, (start, end, accepted, reply.error))
            if expect:
                accepted.append((start, end))
            else:
                self.assertEqual(reply.error.code, L3.IP_RANGE_OVERLAP)
        self.assertEqual(len(self.rows("ipRange")), len(accepted))

    def tearDown_l3s(self) -> None:
        for uuid in ("p1", "p2"):
            self.ok(DeleteL3NetworkMsg(uuid=uuid))


class FreeIpPropertyTests(L3TestCase):
    """
    Fault (review 2, item 3): GetFreeIp read the used addresses in batches of 256 and,
    after a full batch, answered the addresses past its end as free, used or not. It is
    compared here with a brute-force set difference on random used sets (runs of used
    addresses longer than a batch included).
    """

    RANGES = (("r1", "10.0.0.10", "10.0.2.200"), ("r2", "10.0.3.10", "10.0.3.100"))

    def setUp(self) -> None:
        super().setUp()
        self.l3()
        self.addresses: list[tuple[int, str]] = []
        for uuid, start, end in self.RANGES:
            self.ok(add_range(start, end, uuid=uuid, netmask="255.255.252.0"))
            lo, hi = (int(ipaddress.IPv4Address(a)) for a in (start, end))
            self.addresses += [(n, uuid) for n in range(lo, hi + 1)]

    @settings(max_examples=25, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 800), st.integers(1, 600)), max_size=4),
           st.one_of(st.none(), st.integers(0, 800)), st.integers(1, 40))
    def test_free_ips_are_the_set_difference(self, runs: list, start: int | None,
                                             limit: int) -> None:
        """
        GetFreeIp (of the L3 network, from C{start} when given, up to C{limit}) answers
        the lowest addresses of its ranges that are not used, in address order.
        """
        used: dict[int, str] = {}
        for first, length in runs:
            for n, range_uuid in self.addresses[first:first + length]:
                used[n] = range_uuid
        rows = self.result(gatherResults([self.store.insert("usedIp", {
            "uuid": f"u{n}", "ipRangeUuid": r, "l3NetworkUuid": "l3a",
            "ip": str(ipaddress.IPv4Address(n)), "ipInLong": n, "netmask": "255.255.252.0",
            "gateway": "10.0.0.1"}) for n, r in used.items()], consumeErrors=True))
        try:
            start_n = None if start is None else self.addresses[start][0]
            expected = [(str(ipaddress.IPv4Address(n)), r) for n, r in self.addresses
                        if n not in used and (start_n is None or n >= start_n)][:limit]
            msg = GetFreeIpMsg(l3_network_uuid="l3a", limit=limit,
                               start=None if start_n is None
                               else str(ipaddress.IPv4Address(start_n)))
            got = [(f["ip"], f["ipRangeUuid"]) for f in self.ok(msg).inventories]
            self.assertEqual(got, expected)
        finally:
            self.result(gatherResults([self.store.delete("usedIp", r["uuid"]) for r in rows]))


class DeletedMeanwhileTests(L3TestCase):
    """
    Fault (review 2, item 6, the same kind in L3): a write into an L3 network deleted
    between the service's look-up and the store's write (AddIpRange runs on the L2's
    chain, not the L3's) answered the store's raw C{DB.1001} / C{SYS.1003}.
    """

    def delete_first(self, name: str) -> None:
        """
        Make the store's C{name} delete the L3 network C{l3a} (as another node) first.
        """
        orig = getattr(MemoryStore, name).__get__(self.store)

        def racing(*a: Any, **kw: Any) -> Deferred:
            async def go() -> Any:
                await self.store.delete_l3_network("l3a")
                return await orig(*a, **kw)
            return Deferred.fromCoroutine(go())

        setattr(self.store, name, racing)

    def test_writes_into_a_deleted_l3(self) -> None:
        """
        AddIpRange, AddDns, AttachNetworkService: L3.1000 naming l3NetworkUuid; nothing
        written.
        """
        for name, msg in (
                ("add_ip_ranges", add_range("10.0.0.10", "10.0.0.20")),
                ("add_dns", AddDnsToL3NetworkMsg(l3_network_uuid="l3a", dns="8.8.8.8")),
                ("attach_network_services", AttachNetworkServiceToL3NetworkMsg(
                    l3_network_uuid="l3a", network_services={"flat": ["DHCP"]}))):
            self.l3()
            self.delete_first(name)
            err = self.refused(msg, L3.NOT_FOUND, "l3NetworkUuid")
            self.assertEqual(err.opaque["uuid"], "l3a", name)
            self.assertIn("l3a", err.details)
            for resource in ("l3Network", "ipRange", "l3NetworkDns",
                             "networkServiceL3NetworkRef"):
                self.assertEqual(self.rows(resource), [], (name, resource))
            delattr(self.store, name)

    def test_l3_on_a_deleted_l2(self) -> None:
        """
        CreateL3Network racing DeleteL2Network: L3.1000 naming l2NetworkUuid.
        """
        orig = self.store.insert

        def racing(resource: str, values: dict) -> Deferred:
            async def go() -> Any:
                if resource == "l3Network":
                    await self.store.delete_l2_network("l2a")
                return await orig(resource, values)
            return Deferred.fromCoroutine(go())

        self.store.insert = racing
        err = self.refused(CreateL3NetworkMsg(name="x", l2_network_uuid="l2a"), L3.NOT_FOUND,
                           "l2NetworkUuid")
        self.assertEqual(err.opaque["uuid"], "l2a")
        self.assertEqual(self.rows("l3Network"), [])


class DnsAndServicesTests(L3TestCase):
    """
    AddDnsToL3NetworkMsg, RemoveDnsFromL3NetworkMsg, AttachNetworkServiceToL3NetworkMsg,
    DetachNetworkServiceFromL3NetworkMsg.
    """

    def setUp(self) -> None:
        super().setUp()
        self.l3()

    def test_dns_in_order(self) -> None:
        """
        DNS servers keep their order; a duplicate is L3.1004; a bad address SYS.1007
        naming dns; removing one keeps the others' order; removing an absent one is a no-op.
        """
        for dns in ("8.8.8.8", "1.1.1.1", "9.9.9.9"):
            l3 = self.ok(AddDnsToL3NetworkMsg(l3_network_uuid="l3a", dns=dns)).inventory
        self.assertEqual(l3["dns"], ["8.8.8.8", "1.1.1.1", "9.9.9.9"])
        self.refused(AddDnsToL3NetworkMsg(l3_network_uuid="l3a", dns="1.1.1.1"),
                     L3.DUPLICATE_DNS, "dns")
        self.refused(AddDnsToL3NetworkMsg(l3_network_uuid="l3a", dns="1.1.1"),
                     SYS.INVALID_ARGUMENT_ERROR, "dns")
        self.refused(AddDnsToL3NetworkMsg(l3_network_uuid="nope", dns="1.1.1.1"),
                     L3.NOT_FOUND, "l3NetworkUuid")
        page = self.send(inv.QueryInventoryMsg(service_id=inv.SERVICE_ID, resource="l3Network",
                                               fields=["dns"]))
        self.assertEqual(page.inventories, [{"dns": ["8.8.8.8", "1.1.1.1", "9.9.9.9"]}])
        l3 = self.ok(RemoveDnsFromL3NetworkMsg(l3_network_uuid="l3a", dns="1.1.1.1")).inventory
        self.assertEqual(l3["dns"], ["8.8.8.8", "9.9.9.9"])
        self.ok(RemoveDnsFromL3NetworkMsg(l3_network_uuid="l3a", dns="1.1.1.1"))
        l3 = self.ok(AddDnsToL3NetworkMsg(l3_network_uuid="l3a", dns="1.1.1.1")).inventory
        self.assertEqual(l3["dns"], ["8.8.8.8", "9.9.9.9", "1.1.1.1"])

    def test_network_services(self) -> None:
        """
        Attach refs of a provider; the inventory lists them; another provider of an attached
        type is L3.1006 and attaches nothing; an unknown type is SYS.1007; detach removes.
        """
        l3 = self.ok(AttachNetworkServiceToL3NetworkMsg(
            l3_network_uuid="l3a", network_services={"flat": ["DHCP", "Userdata"]})).inventory
        self.assertEqual(l3["networkServices"], [
            {"l3NetworkUuid": "l3a", "networkServiceProviderUuid": "flat",
             "networkServiceType": t} for t in ("DHCP", "Userdata")])
        # The same again is kept as it is.
        self.ok(AttachNetworkServiceToL3NetworkMsg(
            l3_network_uuid="l3a", network_services={"flat": ["DHCP"]}))
        err = self.refused(AttachNetworkServiceToL3NetworkMsg(
            l3_network_uuid="l3a", network_services={"vr": ["SNAT", "DHCP"]}),
            L3.NETWORK_SERVICE_CONFLICT, "networkServices")
        self.assertEqual(err.opaque["conflicts"], [
            {"networkServiceType": "DHCP", "networkServiceProviderUuid": "flat"}])
        self.assertEqual(len(self.rows("networkServiceL3NetworkRef")), 2)
        for bad in ({"vr": ["Teleport"]}, {}, {"vr": []}, {"vr": "DHCP"}):
            self.refused(AttachNetworkServiceToL3NetworkMsg(
                l3_network_uuid="l3a", network_services=bad), SYS.INVALID_ARGUMENT_ERROR)
        l3 = self.ok(DetachNetworkServiceFromL3NetworkMsg(
            l3_network_uuid="l3a", network_services={"flat": ["DHCP"]})).inventory
        self.assertEqual([s["networkServiceType"] for s in l3["networkServices"]],
                         ["Userdata"])


class AddressQueryTests(L3TestCase):
    """
    GetFreeIpMsg, CheckIpAvailabilityMsg, GetIpAddressCapacityMsg.
    """

    def setUp(self) -> None:
        super().setUp()
        self.l3()
        self.ok(add_range("10.0.0.10", "10.0.0.14", uuid="r1"))
        self.ok(add_range("10.0.0.20", "10.0.0.29", uuid="r2"))
        self.ok(AllocateIpMsg(l3_network_uuid="l3a", holder_type="VmInstanceVO",
                              holder_uuid="vm1", required_ip="10.0.0.11"))

    def test_free_ips(self) -> None:
        """
        Free addresses lowest first, skipping used ones, across ranges; from a start; of
        one range; the limit holds.
        """
        free = self.ok(GetFreeIpMsg(l3_network_uuid="l3a", limit=6)).inventories
        self.assertEqual([f["ip"] for f in free],
                         ["10.0.0.10", "10.0.0.12", "10.0.0.13", "10.0.0.14", "10.0.0.20",
                          "10.0.0.21"])
        self.assertEqual(free[4]["ipRangeUuid"], "r2")
        free = self.ok(GetFreeIpMsg(l3_network_uuid="l3a", start="10.0.0.13",
                                    limit=3)).inventories
        self.assertEqual([f["ip"] for f in free], ["10.0.0.13", "10.0.0.14", "10.0.0.20"])
        free = self.ok(GetFreeIpMsg(ip_range_uuid="r2", limit=100)).inventories
        self.assertEqual(len(free), 10)
        self.refused(GetFreeIpMsg(), SYS.INVALID_ARGUMENT_ERROR, "l3NetworkUuid")
        self.refused(GetFreeIpMsg(ip_range_uuid="nope"), L3.NOT_FOUND, "ipRangeUuid")
        self.refused(GetFreeIpMsg(l3_network_uuid="l3a", limit=-1),
                     SYS.INVALID_ARGUMENT_ERROR, "limit")

    def test_check_ip(self) -> None:
        """
        Free, used (naming the holder), the gateway, outside every range.
        """
        def check(ip: str) -> Any:
            return self.ok(CheckIpAvailabilityMsg(l3_network_uuid="l3a", ip=ip))

        self.assertTrue(check("10.0.0.10").available)
        used = check("10.0.0.11")
        self.assertFalse(used.available)
        self.assertIn("vm1", used.reason)
        self.assertIn("gateway", check("10.0.0.1").reason)
        self.assertFalse(check("10.0.0.15").available)
        self.refused(CheckIpAvailabilityMsg(l3_network_uuid="l3a", ip="10.0.0"),
                     SYS.INVALID_ARGUMENT_ERROR, "ip")

    def test_capacity(self) -> None:
        """
        15 addresses, 1 used, by L3, by range, by zone and all; none named: SYS.1007.
        """
        for kw, expect in [({"l3_network_uuids": ["l3a"]}, (15, 14, 1)),
                           ({"ip_range_uuids": ["r2"]}, (10, 10, 0)),
                           ({"ip_range_uuids": ["r1"], "l3_network_uuids": ["l3a"]},
                            (15, 14, 1)),
                           ({"zone_uuids": ["z"]}, (15, 14, 1)),
                           ({"zone_uuids": ["z2"]}, (0, 0, 0)),
                           ({"all": True}, (15, 14, 1))]:
            r = self.ok(GetIpAddressCapacityMsg(**kw))
            self.assertEqual((r.total_capacity, r.available_capacity,
                              r.used_ip_address_number), expect, kw)
        self.refused(GetIpAddressCapacityMsg(), SYS.INVALID_ARGUMENT_ERROR, "ipRangeUuids")


class DeleteL3Tests(L3TestCase):
    """
    DeleteL3NetworkMsg.
    """

    def setUp(self) -> None:
        super().setUp()
        self.l3()
        self.ok(add_range("10.0.0.10", "10.0.0.20"))
        self.ok(AddDnsToL3NetworkMsg(l3_network_uuid="l3a", dns="8.8.8.8"))
        self.ok(AttachNetworkServiceToL3NetworkMsg(l3_network_uuid="l3a",
                                                   network_services={"p": ["DHCP"]}))

    def assert_clean(self) -> None:
        for resource in ("l3Network", "ipRange", "usedIp", "l3NetworkDns",
                         "networkServiceL3NetworkRef"):
            self.assertEqual(self.rows(resource), [], resource)

    def test_delete_leaves_nothing(self) -> None:
        """
        Deleting removes the network, its ranges, DNS servers and refs; again: a no-op.
        """
        self.ok(DeleteL3NetworkMsg(uuid="l3a"))
        self.assert_clean()
        self.ok(DeleteL3NetworkMsg(uuid="l3a"))

    def test_refused_while_vm_nic(self) -> None:
        """
        A VM NIC on it: L3.1002 naming the VM.
        """
        self.seed_vm_nic("vm9", "l3a")
        err = self.refused(DeleteL3NetworkMsg(uuid="l3a"), L3.DELETE_ERROR)
        self.assertEqual(err.opaque["vmInstanceUuids"], ["vm9"])
        self.assertIn("vm9", err.details)

    def test_refused_while_ip_held(self) -> None:
        """
        A held address: L3.1002 naming the holder; after ReturnIp the delete goes through.
        """
        self.ok(AllocateIpMsg(l3_network_uuid="l3a", holder_type="ApplianceVmVO",
                              holder_uuid="vr1"))
        err = self.refused(DeleteL3NetworkMsg(uuid="l3a"), L3.DELETE_ERROR)
        self.assertEqual([h["holderUuid"] for h in err.opaque["holders"]], ["vr1"])
        self.ok(ReturnIpMsg(l3_network_uuid="l3a", holder_type="ApplianceVmVO",
                            holder_uuid="vr1"))
        self.ok(DeleteL3NetworkMsg(uuid="l3a"))
        self.assert_clean()


class RangeRuleTests(SynchronousTestCase):
    """
    The pure range rules.
    """

    def test_cidr_gateway_at_end(self) -> None:
        """
        A gateway at the last usable address leaves one range before it.
        """
        [r] = ranges_from_cidr("192.168.1.0/24", "192.168.1.254")
        self.assertEqual((r.start_ip, r.end_ip), ("192.168.1.1", "192.168.1.253"))

    @given(st.integers(0, 2**32 - 1), st.integers(8, 30), st.integers(0, 2**32 - 1))
    def test_valid_ranges_exclude_reserved(self, a: int, prefix: int, b: int) -> None:
        """
        Whatever range_from_fields accepts lies in one subnet and leaves out its network,
        broadcast and gateway addresses.
        """
        import ipaddress

        net = ipaddress.IPv4Network(f"{ipaddress.IPv4Address(a)}/{prefix}", strict=False)
        size = net.num_addresses
        lo = int(net.network_address)
        start, end = lo + a % size, lo + b % size
        gw = lo + 1
        try:
            r = range_from_fields(str(ipaddress.IPv4Address(start)),
                                  str(ipaddress.IPv4Address(end)), str(net.netmask),
                                  str(ipaddress.IPv4Address(gw)))
        except OperationError as e:
            self.assertEqual(e.error.code, SYS.INVALID_ARGUMENT_ERROR)
            self.assertIn(e.error.opaque["field"], ("startIp", "endIp", "gateway"))
            return
        self.assertTrue(lo < r.start <= r.end < lo + size - 1)
        self.assertFalse(r.start <= gw <= r.end)
