# -*- test-case-name: tests.test_l3_network -*-
"""
IPv4 range arithmetic of the L3 network service: pure functions (no store, no reactor), so
they are property-tested directly and also run inside the store's range transaction
(L{zcontrol.db.components.networks.add_ip_ranges_thd} calls L{check_new_ranges} with the
rows it read under the L2 network's lock).

The rules are those of ZStack's C{L3NetworkApiInterceptor.validate(IpRangeInventory)} and
C{IpRangeInventory.fromMessage}:
 - C{startIp}, C{endIp} and C{gateway} are IPv4 addresses, C{netmask} a contiguous mask;
 - C{startIp <= endIp}; start, end and gateway lie in the one subnet the netmask gives;
 - neither the subnet's network address nor its broadcast address lies in the range;
 - the gateway is not in the range;
 - ranges of one L3 network share the gateway and the network CIDR;
 - no two ranges of the L3 networks of one L2 network overlap (the L2 is one broadcast
   domain).

Bad fields answer C{SYS.1007} naming the field; a conflict with an existing range answers
C{L3.1001} (overlap) or C{L3.1009} (a different gateway or CIDR from the L3's other ranges)
naming that range.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Iterable, Sequence

import attrs

from zcontrol.core.errors import OperationError
from zcontrol.services import validate as v
from zcontrol.services.network.messages import L3

__all__ = [
    "NewRange",
    "check_new_ranges",
    "overlaps",
    "range_from_fields",
    "ranges_from_cidr",
]


@attrs.frozen
class NewRange:
    """
    A validated IPv4 range, ready to insert.

    @ivar start: the first address, as an integer.
    @ivar end: the last address, as an integer (C{start <= end}).
    """

    start: int
    end: int
    netmask: str
    gateway: str
    network_cidr: str
    prefix_len: int

    @property
    def start_ip(self) -> str:
        return str(ipaddress.IPv4Address(self.start))

    @property
    def end_ip(self) -> str:
        return str(ipaddress.IPv4Address(self.end))

    def values(self) -> dict[str, Any]:
        """
        The ipRange row values (without uuid, l3NetworkUuid, name, description).
        """
        return {"startIp": self.start_ip, "endIp": self.end_ip, "netmask": self.netmask,
                "gateway": self.gateway, "startIpInLong": self.start,
                "endIpInLong": self.end, "networkCidr": self.network_cidr,
                "prefixLen": self.prefix_len, "ipVersion": 4}


def overlaps(a_start: int, a_end: int, b_start: int, b_end: int) -> bool:
    """
    Whether the closed intervals [a_start, a_end] and [b_start, b_end] share an address.
    """
    return a_start <= b_end and b_start <= a_end


def range_from_fields(start_ip: Any, end_ip: Any, netmask: Any, gateway: Any) -> NewRange:
    """
    Validate an C{AddIpRange}'s fields (ZStack's rules, see the module docstring).

    @raise OperationError: C{SYS.1007} naming the field (C{startIp}, C{endIp}, C{netmask},
        C{gateway}).
    """
    start_s = v.ipv4(start_ip, "startIp")
    end_s = v.ipv4(end_ip, "endIp")
    mask_s = v.netmask(netmask, "netmask")
    gw_s = v.ipv4(gateway, "gateway")
    start, end, gw = (int(ipaddress.IPv4Address(x)) for x in (start_s, end_s, gw_s))
    if start > end:
        raise v.invalid("endIp", end_s, f"must not be lower than startIp {start_s}")
    net = ipaddress.IPv4Network(f"{start_s}/{mask_s}", strict=False)
    if ipaddress.IPv4Address(end) not in net:
        raise v.invalid("endIp", end_s, f"must be in the subnet {net} of startIp and netmask")
    if ipaddress.IPv4Address(gw) not in net:
        raise v.invalid("gateway", gw_s, f"must be in the subnet {net} of the range")
    lo, hi = int(net.network_address), int(net.broadcast_address)
    if start <= lo <= end:
        raise v.invalid("startIp", start_s,
                        f"must leave out the network address {net.network_address} of {net}")
    if start <= hi <= end:
        raise v.invalid("endIp", end_s,
                        f"must leave out the broadcast address {net.broadcast_address} of {net}")
    if start <= gw <= end:
        raise v.invalid("gateway", gw_s, f"must not be inside the range [{start_s}, {end_s}]")
    return NewRange(start, end, mask_s, gw_s, str(net), net.prefixlen)


def ranges_from_cidr(network_cidr: Any, gateway: Any = None) -> list[NewRange]:
    """
    The ranges of ZStack's C{AddIpRangeByNetworkCidr}: every usable address of the network
    except the gateway, which defaults to the first usable address. A gateway at either end
    gives one range; one in the middle gives two, around it.

    @raise OperationError: C{SYS.1007} naming C{networkCidr} (not a CIDR, or no usable
        address besides the gateway) or C{gateway} (outside the network's usable addresses).
    """
    net = v.cidr(network_cidr, "networkCidr")
    if net.num_addresses < 4:
        raise v.invalid("networkCidr", network_cidr,
                        "must leave at least two usable addresses (a prefix of at most 30)")
    first, last = int(net.network_address) + 1, int(net.broadcast_address) - 1
    if gateway is None:
        gw = first
    else:
        gw = int(ipaddress.IPv4Address(v.ipv4(gateway, "gateway")))
        if not first <= gw <= last:
            raise v.invalid("gateway", gateway,
                            f"must be a usable address of {net} ({net.network_address + 1}"
                            f" to {net.broadcast_address - 1})")
    gw_s = str(ipaddress.IPv4Address(gw))
    mask = str(net.netmask)
    spans = [(first, gw - 1), (gw + 1, last)]
    return [NewRange(a, b, mask, gw_s, str(net), net.prefixlen) for a, b in spans if a <= b]


def _check_gateways(r: NewRange, uuid: str | None, l3_uuid: str, start_ip: str, end_ip: str,
                    start: int, end: int, gateway: str) -> None:
    """
    C{L3.1001} when the new range C{r}'s gateway lies in the range C{[start, end]} (of
    L3 network C{l3_uuid}; C{uuid} None for another new range), or C{r} contains that
    range's C{gateway}.
    """
    name = "the new range" if uuid is None else f"ip range {uuid}"
    where = f"{name} [{start_ip}, {end_ip}] of L3 network {l3_uuid}"
    details = {"ipRangeUuid": uuid, "l3NetworkUuid": l3_uuid, "startIp": start_ip,
               "endIp": end_ip}
    gw = int(ipaddress.IPv4Address(r.gateway))
    if start <= gw <= end:
        raise OperationError.of(
            L3.IP_RANGE_OVERLAP,
            f"the gateway {r.gateway} of new ip range [{r.start_ip}, {r.end_ip}] lies in"
            f" {where}", field="gateway", **details)
    other_gw = int(ipaddress.IPv4Address(gateway))
    if r.start <= other_gw <= r.end:
        raise OperationError.of(
            L3.IP_RANGE_OVERLAP,
            f"new ip range [{r.start_ip}, {r.end_ip}] contains the gateway {gateway} of"
            f" {where}", field="startIp", gateway=gateway, **details)


def check_new_ranges(l3_uuid: str, new: Sequence[NewRange],
                     existing: Iterable[dict[str, Any]]) -> None:
    """
    Refuse C{new} (ranges to add to L3 network C{l3_uuid}) when one overlaps an C{existing}
    range of any L3 network of the same L2 network, or another of C{new}, when its gateway
    lies in such a range or its addresses contain such a range's gateway (one broadcast
    domain: a VM would get a router's address), or when it differs from the L3's own
    ranges in gateway or network CIDR.

    @param existing: ipRange rows (C{uuid}, C{l3NetworkUuid}, C{startIp}, C{endIp},
        C{startIpInLong}, C{endIpInLong}, C{gateway}, C{networkCidr}).
    @raise OperationError: C{L3.1001} (overlap or a gateway inside a range, details
        C{ipRangeUuid}, C{l3NetworkUuid}, C{startIp}, C{endIp} of the existing range) or C{L3.1009} (gateway or CIDR
        mismatch, naming the range and the field).
    """
    rows = list(existing)
    for i, r in enumerate(new):
        for other in new[:i]:
            if overlaps(r.start, r.end, other.start, other.end):
                raise OperationError.of(
                    L3.IP_RANGE_OVERLAP,
                    f"new ip range [{r.start_ip}, {r.end_ip}] overlaps the new range"
                    f" [{other.start_ip}, {other.end_ip}]",
                    field="startIp", startIp=r.start_ip, endIp=r.end_ip)
            _check_gateways(r, None, l3_uuid, other.start_ip, other.end_ip, other.start,
                            other.end, other.gateway)
            _check_gateways(other, None, l3_uuid, r.start_ip, r.end_ip, r.start, r.end,
                            r.gateway)
        for row in rows:
            if overlaps(r.start, r.end, int(row["startIpInLong"]), int(row["endIpInLong"])):
                raise OperationError.of(
                    L3.IP_RANGE_OVERLAP,
                    f"new ip range [{r.start_ip}, {r.end_ip}] overlaps ip range"
                    f" {row['uuid']} [{row['startIp']}, {row['endIp']}] of L3 network"
                    f" {row['l3NetworkUuid']}",
                    field="startIp", ipRangeUuid=row["uuid"],
                    l3NetworkUuid=row["l3NetworkUuid"], startIp=row["startIp"],
                    endIp=row["endIp"])
            _check_gateways(r, row["uuid"], row["l3NetworkUuid"], row["startIp"],
                            row["endIp"], int(row["startIpInLong"]), int(row["endIpInLong"]),
                            row["gateway"])
            if row["l3NetworkUuid"] != l3_uuid:
                continue
            if row["gateway"] != r.gateway:
                raise OperationError.of(
                    L3.IP_RANGE_MISMATCH,
                    f"the gateway {r.gateway} differs from the gateway {row['gateway']} of"
                    f" ip range {row['uuid']} of the same L3 network",
                    field="gateway", ipRangeUuid=row["uuid"], gateway=row["gateway"])
            cidr = row.get("networkCidr")
            if cidr is not None and cidr != r.network_cidr:
                raise OperationError.of(
                    L3.IP_RANGE_MISMATCH,
                    f"the network {r.network_cidr} differs from the network {cidr} of ip"
                    f" range {row['uuid']} of the same L3 network",
                    field="netmask", ipRangeUuid=row["uuid"], networkCidr=cidr)
