# -*- test-case-name: tests.test_l3_network -*-
"""
The bus messages of the L2 network service (C{network.l2}) and the L3 network service
(C{network.l3}), and their error codes.

Names are ZStack's without C{API} (C{APICreateL2VlanNetworkMsg} -> L{CreateL2VlanNetworkMsg});
fields are ZStack's in snake form. A message about one L2 or L3 network is sent with
C{resource_uuid} set to that network's uuid (an IP range message: its L3 network's uuid;
an L2 attach/detach: the L2's); creates carry C{resource_uuid=None} or the chosen uuid.
Every reply carries the resource's inventory (L{zcontrol.services.inventory}).
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from zcontrol.bus.message import NeedReplyMessage, Reply, registry
from zcontrol.core.errors import register_codes

__all__ = [
    "L2",
    "L2_SERVICE_ID",
    "L3",
    "L3_SERVICE_ID",
    "NETWORK_SERVICE_TYPES",
    "AddDnsToL3NetworkMsg",
    "AddIpRangeByNetworkCidrMsg",
    "AddIpRangeMsg",
    "AllocateIpMsg",
    "AllocateIpReply",
    "AttachL2NetworkToClusterMsg",
    "AttachNetworkServiceToL3NetworkMsg",
    "ChangeL3NetworkStateMsg",
    "CheckIpAvailabilityMsg",
    "CheckIpAvailabilityReply",
    "CreateL2NoVlanNetworkMsg",
    "CreateL2VlanNetworkMsg",
    "CreateL3NetworkMsg",
    "DeleteIpRangeMsg",
    "DeleteL2NetworkMsg",
    "DeleteL3NetworkMsg",
    "DetachL2NetworkFromClusterMsg",
    "DetachNetworkServiceFromL3NetworkMsg",
    "GetFreeIpMsg",
    "GetFreeIpReply",
    "GetIpAddressCapacityMsg",
    "GetIpAddressCapacityReply",
    "IpRangeReply",
    "L2NetworkReply",
    "L3NetworkReply",
    "RemoveDnsFromL3NetworkMsg",
    "ReturnIpMsg",
    "ReturnIpReply",
    "UpdateL2NetworkMsg",
    "UpdateL3NetworkMsg",
]

#: ZStack's C{L2NetworkConstant.SERVICE_ID}.
L2_SERVICE_ID = "network.l2"
#: ZStack's C{L3NetworkConstant.SERVICE_ID}.
L3_SERVICE_ID = "network.l3"

#: The network service types ZStack knows (C{NetworkServiceType} and the types its
#: providers register): the names L{AttachNetworkServiceToL3NetworkMsg} accepts.
NETWORK_SERVICE_TYPES = (
    "DHCP", "DNS", "SNAT", "PortForwarding", "Eip", "LoadBalancer", "IPsec", "VipQos",
    "HostRoute", "Userdata", "SecurityGroup", "CentralizedDNS", "VRouterRoute", "Flat",
)


class L2:
    """
    The L2 network service's error codes.
    """

    _codes = register_codes(
        "L2",
        {
            1000: "No such L2 network (or a resource it names)",
            1001: "An L2 network on the same physical interface already uses the vlan",
            1002: "Unable to attach the L2 network to the cluster",
            1003: "Unable to detach the L2 network from the cluster",
            1004: "Unable to delete the L2 network: resources depend on it",
        },
    )
    NOT_FOUND = _codes[1000]
    DUPLICATE_VLAN = _codes[1001]
    ATTACH_ERROR = _codes[1002]
    DETACH_ERROR = _codes[1003]
    DELETE_ERROR = _codes[1004]


class L3:
    """
    The L3 network service's error codes.
    """

    _codes = register_codes(
        "L3",
        {
            1000: "No such L3 network (or a resource it names)",
            1001: "The IP range overlaps an existing IP range",
            1002: "Unable to delete: addresses or NICs depend on it",
            1003: "The L3 network is not in a state that allows the operation",
            1004: "The DNS server is already set on the L3 network",
            1005: "Unable to allocate an IP address",
            1006: "The network service is already provided by another provider",
            1007: "The IP address is already in use",
            1008: "The IP range has addresses in use",
            1009: "The IP range does not match the other IP ranges of the L3 network",
        },
    )
    NOT_FOUND = _codes[1000]
    IP_RANGE_OVERLAP = _codes[1001]
    DELETE_ERROR = _codes[1002]
    STATE_ERROR = _codes[1003]
    DUPLICATE_DNS = _codes[1004]
    ALLOCATE_IP_ERROR = _codes[1005]
    NETWORK_SERVICE_CONFLICT = _codes[1006]
    IP_IN_USE = _codes[1007]
    IP_RANGE_IN_USE = _codes[1008]
    IP_RANGE_MISMATCH = _codes[1009]


# Replies -----------------------------------------------------------------------------------


@registry.register
@attrs.define(kw_only=True)
class L2NetworkReply(Reply):
    """
    The L2 network's inventory (None after a delete): its row plus C{attachedClusterUuids}.
    """

    inventory: dict[str, Any] | None = None


@registry.register
@attrs.define(kw_only=True)
class L3NetworkReply(Reply):
    """
    The L3 network's inventory (None after a delete): its row plus C{ipRanges}, C{dns} and
    C{networkServices}.
    """

    inventory: dict[str, Any] | None = None


@registry.register
@attrs.define(kw_only=True)
class IpRangeReply(Reply):
    """
    An IP range's inventory (C{inventories}: all the ranges an C{AddIpRangeByNetworkCidr}
    added, in address order; C{inventory} is the first). None after a delete.
    """

    inventory: dict[str, Any] | None = None
    inventories: list[dict[str, Any]] = attrs.field(factory=list)


@registry.register
@attrs.define(kw_only=True)
class AllocateIpReply(Reply):
    """
    The usedIp row of the address taken (C{uuid}, C{ip}, C{ipInLong}, C{netmask},
    C{gateway}, C{ipRangeUuid}, C{l3NetworkUuid}, C{holderType}, C{holderUuid}).
    """

    inventory: dict[str, Any] | None = None


@registry.register
@attrs.define(kw_only=True)
class ReturnIpReply(Reply):
    """
    The usedIp row given back, or None when the holder held no address there.
    """

    inventory: dict[str, Any] | None = None


@registry.register
@attrs.define(kw_only=True)
class GetFreeIpReply(Reply):
    """
    Free addresses, lowest first: C{{"ipRangeUuid", "ip", "netmask", "gateway"}} each
    (ZStack's C{FreeIpInventory}).
    """

    inventories: list[dict[str, Any]] = attrs.field(factory=list)


@registry.register
@attrs.define(kw_only=True)
class CheckIpAvailabilityReply(Reply):
    """
    Whether C{ip} could be allocated now, and when not, why (C{reason}: its ipRange absent,
    the gateway, or in use).
    """

    available: bool = False
    reason: str | None = None


@registry.register
@attrs.define(kw_only=True)
class GetIpAddressCapacityReply(Reply):
    """
    Address counts over the ranges asked (ZStack's C{APIGetIpAddressCapacityReply}).
    """

    total_capacity: int = 0
    available_capacity: int = 0
    used_ip_address_number: int = 0


# L2 ----------------------------------------------------------------------------------------


@registry.register
@attrs.define(kw_only=True)
class CreateL2NoVlanNetworkMsg(NeedReplyMessage):
    """
    Create an L2 network on C{physical_interface} of the hosts of a zone (type
    C{L2NoVlanNetwork}).
    """

    reply_type: ClassVar[type[Reply]] = L2NetworkReply

    name: str
    zone_uuid: str
    physical_interface: str
    description: str | None = None
    uuid: str | None = None


@registry.register
@attrs.define(kw_only=True)
class CreateL2VlanNetworkMsg(NeedReplyMessage):
    """
    Create a VLAN L2 network (type C{L2VlanNetwork}, C{vlan} 1 to 4094). Two VLAN networks
    on one physical interface of a zone cannot share a vlan (C{L2.1001} naming the existing
    network).
    """

    reply_type: ClassVar[type[Reply]] = L2NetworkReply

    name: str
    zone_uuid: str
    physical_interface: str
    vlan: int
    description: str | None = None
    uuid: str | None = None


@registry.register
@attrs.define(kw_only=True)
class UpdateL2NetworkMsg(NeedReplyMessage):
    """
    Change an L2 network's name or description (None: unchanged).
    """

    reply_type: ClassVar[type[Reply]] = L2NetworkReply

    uuid: str
    name: str | None = None
    description: str | None = None


@registry.register
@attrs.define(kw_only=True)
class AttachL2NetworkToClusterMsg(NeedReplyMessage):
    """
    Attach an L2 network to a cluster of its zone. Attaching twice is refused, as is a
    cluster that already has an L2 network on the same physical interface with the same
    vlan (or, for NoVlan networks, any other NoVlan network on that interface).
    """

    reply_type: ClassVar[type[Reply]] = L2NetworkReply

    l2_network_uuid: str
    cluster_uuid: str


@registry.register
@attrs.define(kw_only=True)
class DetachL2NetworkFromClusterMsg(NeedReplyMessage):
    """
    Detach an L2 network from a cluster; refused while VMs of that cluster have NICs on
    the L2's L3 networks (naming the VMs). Detaching a cluster not attached is a no-op.
    """

    reply_type: ClassVar[type[Reply]] = L2NetworkReply

    l2_network_uuid: str
    cluster_uuid: str


@registry.register
@attrs.define(kw_only=True)
class DeleteL2NetworkMsg(NeedReplyMessage):
    """
    Delete an L2 network and its cluster attachments; refused while it has L3 networks
    (C{L2.1004} naming them). Deleting a network that does not exist is a no-op (ZStack's
    interceptor answers success).
    """

    reply_type: ClassVar[type[Reply]] = L2NetworkReply

    uuid: str


# L3 ----------------------------------------------------------------------------------------


@registry.register
@attrs.define(kw_only=True)
class CreateL3NetworkMsg(NeedReplyMessage):
    """
    Create an L3 network on an L2 network (its zone is the L2's).

    @ivar type: C{L3BasicNetwork} (the only type here).
    @ivar category: C{Public}, C{Private} or C{System}; with C{system} the valid pairs are
        ZStack's: Public (system or not), Private (not system), System (system).
    @ivar ip_version: 4 (IPv6 ranges are not supported here).
    """

    reply_type: ClassVar[type[Reply]] = L3NetworkReply

    name: str
    l2_network_uuid: str
    type: str = "L3BasicNetwork"
    category: str = "Private"
    system: bool = False
    dns_domain: str | None = None
    ip_version: int = 4
    description: str | None = None
    uuid: str | None = None


@registry.register
@attrs.define(kw_only=True)
class UpdateL3NetworkMsg(NeedReplyMessage):
    """
    Change an L3 network's name, description, DNS domain, category or system flag (None:
    unchanged; category and system are checked together as on create).
    """

    reply_type: ClassVar[type[Reply]] = L3NetworkReply

    uuid: str
    name: str | None = None
    description: str | None = None
    dns_domain: str | None = None
    category: str | None = None
    system: bool | None = None


@registry.register
@attrs.define(kw_only=True)
class ChangeL3NetworkStateMsg(NeedReplyMessage):
    """
    Enable or disable an L3 network (C{state_event} C{enable} / C{disable}); a disabled
    network hands out no new addresses.
    """

    reply_type: ClassVar[type[Reply]] = L3NetworkReply

    uuid: str
    state_event: str


@registry.register
@attrs.define(kw_only=True)
class DeleteL3NetworkMsg(NeedReplyMessage):
    """
    Delete an L3 network with its IP ranges, DNS servers and network service refs; refused
    while VM NICs are on it or any of its addresses is held (C{L3.1002} naming them).
    Deleting a network that does not exist is a no-op.
    """

    reply_type: ClassVar[type[Reply]] = L3NetworkReply

    uuid: str


@registry.register
@attrs.define(kw_only=True)
class AddIpRangeMsg(NeedReplyMessage):
    """
    Add an IPv4 range (rules in L{zcontrol.services.network.ranges}).
    """

    reply_type: ClassVar[type[Reply]] = IpRangeReply

    l3_network_uuid: str
    name: str
    start_ip: str
    end_ip: str
    netmask: str
    gateway: str
    description: str | None = None
    uuid: str | None = None


@registry.register
@attrs.define(kw_only=True)
class AddIpRangeByNetworkCidrMsg(NeedReplyMessage):
    """
    Add the usable addresses of C{network_cidr} (C{192.168.1.0/24}) but the gateway (the
    first usable address by default) as one range, or two around a gateway in the middle.
    """

    reply_type: ClassVar[type[Reply]] = IpRangeReply

    l3_network_uuid: str
    name: str
    network_cidr: str
    gateway: str | None = None
    description: str | None = None


@registry.register
@attrs.define(kw_only=True)
class DeleteIpRangeMsg(NeedReplyMessage):
    """
    Delete an IP range; refused while addresses in it are held (C{L3.1008} naming the
    holders). Deleting a range that does not exist is a no-op.
    """

    reply_type: ClassVar[type[Reply]] = IpRangeReply

    uuid: str


@registry.register
@attrs.define(kw_only=True)
class AddDnsToL3NetworkMsg(NeedReplyMessage):
    """
    Add an IPv4 DNS server after the L3 network's others (a duplicate: C{L3.1004}).
    """

    reply_type: ClassVar[type[Reply]] = L3NetworkReply

    l3_network_uuid: str
    dns: str


@registry.register
@attrs.define(kw_only=True)
class RemoveDnsFromL3NetworkMsg(NeedReplyMessage):
    """
    Remove a DNS server (one not set is a no-op, as ZStack).
    """

    reply_type: ClassVar[type[Reply]] = L3NetworkReply

    l3_network_uuid: str
    dns: str


@registry.register
@attrs.define(kw_only=True)
class AttachNetworkServiceToL3NetworkMsg(NeedReplyMessage):
    """
    Attach network services: C{network_services} maps a provider uuid to service types
    (L{NETWORK_SERVICE_TYPES}). A type already given by the same provider is kept; by
    another provider it is refused (C{L3.1006}).
    """

    reply_type: ClassVar[type[Reply]] = L3NetworkReply

    l3_network_uuid: str
    network_services: dict[str, list[str]]


@registry.register
@attrs.define(kw_only=True)
class DetachNetworkServiceFromL3NetworkMsg(NeedReplyMessage):
    """
    Detach network services (same shape as L{AttachNetworkServiceToL3NetworkMsg}); refs
    not attached are ignored.
    """

    reply_type: ClassVar[type[Reply]] = L3NetworkReply

    l3_network_uuid: str
    network_services: dict[str, list[str]]


@registry.register
@attrs.define(kw_only=True)
class GetFreeIpMsg(NeedReplyMessage):
    """
    Up to C{limit} free addresses of an L3 network or of one of its ranges (one of
    C{l3_network_uuid}, C{ip_range_uuid}), lowest first, from C{start} when given.
    """

    reply_type: ClassVar[type[Reply]] = GetFreeIpReply

    l3_network_uuid: str | None = None
    ip_range_uuid: str | None = None
    start: str | None = None
    limit: int = 100


@registry.register
@attrs.define(kw_only=True)
class CheckIpAvailabilityMsg(NeedReplyMessage):
    """
    Whether C{ip} is free in an L3 network.
    """

    reply_type: ClassVar[type[Reply]] = CheckIpAvailabilityReply

    l3_network_uuid: str
    ip: str


@registry.register
@attrs.define(kw_only=True)
class GetIpAddressCapacityMsg(NeedReplyMessage):
    """
    Address counts over ranges, L3 networks or zones (at least one list non-empty, or
    C{all}).
    """

    reply_type: ClassVar[type[Reply]] = GetIpAddressCapacityReply

    ip_range_uuids: list[str] = attrs.field(factory=list)
    l3_network_uuids: list[str] = attrs.field(factory=list)
    zone_uuids: list[str] = attrs.field(factory=list)
    all: bool = False


@registry.register
@attrs.define(kw_only=True)
class AllocateIpMsg(NeedReplyMessage):
    """
    Take an address of an L3 network for a holder (ZStack's internal C{AllocateIpMsg} of
    C{L3NetworkManager}; the VM service sends it for each NIC). A holder holds at most one
    address per L3 network: a retry answers the address it already holds.

    @ivar holder_type: what holds it (C{VmInstanceVO}, C{ApplianceVmVO}, ...).
    @ivar required_ip: this address (C{L3.1007} when taken, C{SYS.1007} when in no range).
    @ivar allocate_strategy: C{RandomIpAllocatorStrategy} (default) or
        C{FirstAvailableIpAllocatorStrategy}.
    @ivar used_ip_uuid: the uuid of the usedIp row to create (None: a new one).
    """

    reply_type: ClassVar[type[Reply]] = AllocateIpReply

    l3_network_uuid: str
    holder_type: str
    holder_uuid: str
    required_ip: str | None = None
    allocate_strategy: str | None = None
    used_ip_uuid: str | None = None


@registry.register
@attrs.define(kw_only=True)
class ReturnIpMsg(NeedReplyMessage):
    """
    Give back the address a holder holds in an L3 network (ZStack's C{ReturnIpMsg});
    idempotent.
    """

    reply_type: ClassVar[type[Reply]] = ReturnIpReply

    l3_network_uuid: str
    holder_type: str
    holder_uuid: str
