# -*- test-case-name: tests.test_l3_network -*-
"""
The L3 network service (bus service id C{network.l3}, ZStack's C{L3NetworkManagerImpl},
C{L3BasicNetwork} and C{L3NetworkApiInterceptor}): L3 networks on L2 networks, their IPv4
ranges, DNS servers and network service refs, and the addresses handed to NICs
(L{AllocateIpMsg} / L{ReturnIpMsg}, which the VM service sends).

Serialisation: operations on one L3 network run one at a time under C{l3-<uuid>}; range
changes run under the key of the L3's L2 network (C{l2-<uuid>}), because ranges of all the
L3 networks of one L2 must not overlap; the store repeats the overlap check inside one
transaction under the L2's lock (L{zcontrol.db.components.networks.add_ip_ranges_thd}), so
that adds routed to two management nodes cannot both pass it either. Address allocation is
not serialised here: each allocation is one atomic insert on the (L3, address) unique key
(L{zcontrol.db.components.ips}), so concurrent allocations never share an address.
"""

from __future__ import annotations

import ipaddress
import re
import uuid as uuidlib
from typing import Any

from zcontrol.core.errors import SYS, OperationError
from zcontrol.db.interfaces import DB
from zcontrol.services import inventory as inv
from zcontrol.services import validate as v
from zcontrol.services.base import Service, handles
from zcontrol.services.network.messages import (
    L3,
    L3_SERVICE_ID,
    NETWORK_SERVICE_TYPES,
    AddDnsToL3NetworkMsg,
    AddIpRangeByNetworkCidrMsg,
    AddIpRangeMsg,
    AllocateIpMsg,
    AllocateIpReply,
    AttachNetworkServiceToL3NetworkMsg,
    ChangeL3NetworkStateMsg,
    CheckIpAvailabilityMsg,
    CheckIpAvailabilityReply,
    CreateL3NetworkMsg,
    DeleteIpRangeMsg,
    DeleteL3NetworkMsg,
    DetachNetworkServiceFromL3NetworkMsg,
    GetFreeIpMsg,
    GetFreeIpReply,
    GetIpAddressCapacityMsg,
    GetIpAddressCapacityReply,
    IpRangeReply,
    L3NetworkReply,
    RemoveDnsFromL3NetworkMsg,
    ReturnIpMsg,
    ReturnIpReply,
    UpdateL3NetworkMsg,
)
from zcontrol.services.network.ranges import (
    NewRange,
    check_new_ranges,
    range_from_fields,
    ranges_from_cidr,
)

__all__ = ["IP_ALLOCATOR_STRATEGIES", "L3NetworkService", "make"]

L3_BASIC = "L3BasicNetwork"
CATEGORIES = ("Public", "Private", "System")
#: ZStack's C{IpAllocatorType} names -> the store's strategies.
IP_ALLOCATOR_STRATEGIES = {"RandomIpAllocatorStrategy": "random",
                           "FirstAvailableIpAllocatorStrategy": "first"}
DEFAULT_IP_ALLOCATOR_STRATEGY = "RandomIpAllocatorStrategy"
_STATE_EVENTS = {"enable": "Enabled", "disable": "Disabled"}
_DOMAIN = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                     r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def _category(value: Any, system: Any, field: str = "category") -> tuple[str, bool]:
    """
    ZStack's C{L3NetworkCategory.checkSystemAndCategory}: the category (case-insensitive)
    and the system flag must be one of (Public, any), (Private, false), (System, true).
    """
    if not isinstance(system, bool):
        raise v.invalid("system", system, "must be a boolean")
    text = value if isinstance(value, str) else ""
    category = next((c for c in CATEGORIES if c.lower() == text.lower()), None)
    if category is None:
        raise v.invalid(field, value, f"must be one of {', '.join(CATEGORIES)}")
    if (category == "Private" and system) or (category == "System" and not system):
        raise v.invalid(field, value, f"cannot go with system={system}: valid are Public"
                                      " (system or not), Private (not system), System (system)")
    return category, system


def _dns_domain(value: Any) -> str | None:
    if value is None:
        return None
    text = v.name(value, "dnsDomain", 253)
    if not _DOMAIN.match(text):
        raise v.invalid("dnsDomain", value, "must be a domain name")
    return text


def _network_services(value: Any) -> list[tuple[str, str]]:
    """
    C{{provider uuid: [types]}} -> C{[(provider, type)]}, each type one of
    L{NETWORK_SERVICE_TYPES} (SYS.1007 naming C{networkServices}).
    """
    field = "networkServices"
    if not isinstance(value, dict) or not value:
        raise v.invalid(field, value, "must map provider uuids to lists of service types")
    out: list[tuple[str, str]] = []
    for provider, types in value.items():
        provider = v.uuid(provider, f"{field}.<provider uuid>")
        if not isinstance(types, list) or not types:
            raise v.invalid(f"{field}.{provider}", types, "must be a non-empty list of types")
        for t in types:
            v.one_of(t, f"{field}.{provider}", NETWORK_SERVICE_TYPES)
            if (provider, t) not in out:
                out.append((provider, t))
    seen: dict[str, str] = {}
    for provider, t in out:
        if seen.setdefault(t, provider) != provider:
            raise v.invalid(field, value, f"names two providers of {t}")
    return out


def _ip_long(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


@inv.register_inventory("l3Network", ("ipRanges", "dns", "networkServices"))
async def _expand_l3(store: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    ZStack's C{L3NetworkInventory}: the row plus C{ipRanges} (range inventories by start
    address), C{dns} (in order) and C{networkServices} (C{{l3NetworkUuid,
    networkServiceProviderUuid, networkServiceType}}): one store call for the page.
    """
    extras = await store.l3_extras([r["uuid"] for r in rows])
    for r in rows:
        r.update(extras.get(r["uuid"], {"ipRanges": [], "dns": [], "networkServices": []}))
    return rows


class L3NetworkService(Service):
    """
    The L3 network service on one management node.
    """

    service_id = L3_SERVICE_ID

    async def _reply(self, uuid: str) -> L3NetworkReply:
        return L3NetworkReply(inventory=await inv.inventory(self.store, "l3Network", uuid))

    async def _l3(self, uuid: Any, field: str = "l3NetworkUuid") -> dict[str, Any]:
        return await self.must_get("l3Network", uuid, L3.NOT_FOUND, field=field)

    @staticmethod
    async def _gone_as_not_found(l3_uuid: str, d: Any) -> Any:
        """
        The result of C{d}, a store write into the L3 network C{l3_uuid}; when the L3
        network was deleted since it was looked up (C{SYS.1003} from the store's check
        under the lock, or C{DB.1001} from a foreign key), C{L3.1000} naming
        C{l3NetworkUuid} instead of the store's code.
        """
        try:
            return await d
        except OperationError as e:
            if e.error.code not in (SYS.RESOURCE_NOT_FOUND, DB.REFERENCE):
                raise
            raise OperationError.of(L3.NOT_FOUND, f"L3 network {l3_uuid} was deleted",
                                    cause=e.error, field="l3NetworkUuid",
                                    uuid=l3_uuid) from None

    # --- the network ----------------------------------------------------------------------

    @handles(CreateL3NetworkMsg)
    async def create(self, msg: CreateL3NetworkMsg) -> L3NetworkReply:
        """
        Create an L3 network on an L2 network, in the L2's zone.

        @raise OperationError: C{SYS.1007} naming a bad field (C{type} other than
            C{L3BasicNetwork}, C{category}/C{system} not a valid pair, C{dnsDomain},
            C{ipVersion} other than 4); C{L3.1000} for an unknown L2 (field
            C{l2NetworkUuid}).
        """
        name = v.name(msg.name)
        description = v.optional_text(msg.description, "description")
        l2_uuid = v.uuid(msg.l2_network_uuid, "l2NetworkUuid")
        v.one_of(msg.type, "type", (L3_BASIC,))
        category, system = _category(msg.category, msg.system)
        dns_domain = _dns_domain(msg.dns_domain)
        v.integer(msg.ip_version, "ipVersion", 4, 4)
        uuid = v.uuid(msg.uuid, "uuid") if msg.uuid is not None else uuidlib.uuid4().hex
        l2 = await self.must_get("l2Network", l2_uuid, L3.NOT_FOUND, field="l2NetworkUuid")
        try:
            await self.store.insert("l3Network", {
                "uuid": uuid, "name": name, "description": description,
                "l2NetworkUuid": l2_uuid, "zoneUuid": l2["zoneUuid"], "type": L3_BASIC,
                "category": category, "system": system, "dnsDomain": dns_domain,
                "ipVersion": 4, "state": "Enabled"})
        except OperationError as e:
            if e.error.code != DB.REFERENCE:
                raise
            raise OperationError.of(L3.NOT_FOUND, f"L2 network {l2_uuid} was deleted",
                                    cause=e.error, field="l2NetworkUuid",
                                    uuid=l2_uuid) from None
        return await self._reply(uuid)

    @handles(UpdateL3NetworkMsg)
    async def update(self, msg: UpdateL3NetworkMsg) -> L3NetworkReply:
        """
        Change name, description, DNS domain, category or system (C{SYS.1007} naming the
        field; C{L3.1000} when unknown).
        """
        uuid = v.uuid(msg.uuid, "uuid")
        changes: dict[str, Any] = v.common_changes(msg)
        if msg.dns_domain is not None:
            changes["dnsDomain"] = _dns_domain(msg.dns_domain)

        async def run() -> L3NetworkReply:
            l3 = await self._l3(uuid, "uuid")
            if msg.category is not None or msg.system is not None:
                category, system = _category(
                    msg.category if msg.category is not None else l3["category"],
                    msg.system if msg.system is not None else l3["system"])
                changes.update(category=category, system=system)
            if changes:
                await self.store.update("l3Network", uuid, changes)
            return await self._reply(uuid)

        return await self.serialized(f"l3-{uuid}", run)

    @handles(ChangeL3NetworkStateMsg)
    async def change_state(self, msg: ChangeL3NetworkStateMsg) -> L3NetworkReply:
        """
        C{enable} -> Enabled, C{disable} -> Disabled (C{SYS.1007} naming C{stateEvent}).
        """
        uuid = v.uuid(msg.uuid, "uuid")
        state = _STATE_EVENTS[v.one_of(msg.state_event, "stateEvent", _STATE_EVENTS)]

        async def run() -> L3NetworkReply:
            await self._l3(uuid, "uuid")
            await self.store.update("l3Network", uuid, {"state": state})
            return await self._reply(uuid)

        return await self.serialized(f"l3-{uuid}", run)

    @handles(DeleteL3NetworkMsg)
    async def delete(self, msg: DeleteL3NetworkMsg) -> L3NetworkReply:
        """
        Delete with its ranges, DNS servers and network service refs.

        @raise OperationError: C{L3.1002} while VM NICs are on it or addresses are held
            (details C{vmInstanceUuids}, C{holders}: C{{holderType, holderUuid, ip}}).
        """
        uuid = v.uuid(msg.uuid, "uuid")

        async def run() -> L3NetworkReply:
            try:
                result = await self.store.delete_l3_network(uuid)
            except OperationError as e:
                if e.error.code != DB.REFERENCE:
                    raise
                # An address or NIC added after the check (the foreign key refused): the
                # second look names it.
                result = await self.store.delete_l3_network(uuid)
            if "deleted" not in result:
                raise _dependents_error(
                    L3.DELETE_ERROR, f"L3 network {uuid}", result, uuid=uuid)
            return L3NetworkReply(inventory=None)

        return await self.serialized(f"l3-{uuid}", run)

    # --- IP ranges ------------------------------------------------------------------------

    @handles(AddIpRangeMsg)
    async def add_ip_range(self, msg: AddIpRangeMsg) -> IpRangeReply:
        """
        Add one range (rules and errors: L{zcontrol.services.network.ranges}).
        """
        name = v.name(msg.name)
        description = v.optional_text(msg.description, "description")
        l3_uuid = v.uuid(msg.l3_network_uuid, "l3NetworkUuid")
        new = range_from_fields(msg.start_ip, msg.end_ip, msg.netmask, msg.gateway)
        uuid = v.uuid(msg.uuid, "uuid") if msg.uuid is not None else uuidlib.uuid4().hex
        return await self._add_ranges(l3_uuid, [(uuid, new)], name, description)

    @handles(AddIpRangeByNetworkCidrMsg)
    async def add_ip_range_by_cidr(self, msg: AddIpRangeByNetworkCidrMsg) -> IpRangeReply:
        """
        Add the ranges of a network CIDR (L{ranges_from_cidr}).
        """
        name = v.name(msg.name)
        description = v.optional_text(msg.description, "description")
        l3_uuid = v.uuid(msg.l3_network_uuid, "l3NetworkUuid")
        new = ranges_from_cidr(msg.network_cidr, msg.gateway)
        return await self._add_ranges(l3_uuid, [(uuidlib.uuid4().hex, r) for r in new], name,
                                      description)

    async def _add_ranges(self, l3_uuid: str, new: list[tuple[str, NewRange]], name: str,
                          description: str | None) -> IpRangeReply:
        l3 = await self._l3(l3_uuid)
        ranges = [r for _, r in new]

        def check(existing: list[dict[str, Any]]) -> None:
            check_new_ranges(l3_uuid, ranges, existing)

        async def run() -> IpRangeReply:
            rows = await self._gone_as_not_found(l3_uuid, self.store.add_ip_ranges(l3_uuid, [
                {"uuid": u, "name": name, "description": description, **r.values()}
                for u, r in new], check))
            if rows is None:
                raise OperationError.of(L3.NOT_FOUND, f"no l3Network with uuid {l3_uuid}",
                                        field="l3NetworkUuid", uuid=l3_uuid)
            return IpRangeReply(inventory=rows[0], inventories=rows)

        return await self.serialized(f"l2-{l3['l2NetworkUuid']}", run)

    @handles(DeleteIpRangeMsg)
    async def delete_ip_range(self, msg: DeleteIpRangeMsg) -> IpRangeReply:
        """
        Delete a range.

        @raise OperationError: C{L3.1008} while addresses in it are held (details
            C{holders}).
        """
        uuid = v.uuid(msg.uuid, "uuid")
        rng = await self.store.get("ipRange", uuid)
        if rng is None:
            return IpRangeReply()
        l3 = await self.store.get("l3Network", rng["l3NetworkUuid"])
        key = f"l2-{l3['l2NetworkUuid']}" if l3 is not None else f"range-{uuid}"

        async def run() -> IpRangeReply:
            try:
                result = await self.store.delete_ip_range(uuid)
            except OperationError as e:
                if e.error.code != DB.REFERENCE:
                    raise
                result = await self.store.delete_ip_range(uuid)
            if "deleted" not in result:
                raise _dependents_error(L3.IP_RANGE_IN_USE, f"ip range {uuid}", result,
                                        uuid=uuid)
            return IpRangeReply()

        return await self.serialized(key, run)

    # --- DNS and network services ---------------------------------------------------------

    @handles(AddDnsToL3NetworkMsg)
    async def add_dns(self, msg: AddDnsToL3NetworkMsg) -> L3NetworkReply:
        """
        Append an IPv4 DNS server (C{SYS.1007} naming C{dns}; C{L3.1004} when present).
        """
        l3_uuid = v.uuid(msg.l3_network_uuid, "l3NetworkUuid")
        dns = v.ipv4(msg.dns, "dns")

        async def run() -> L3NetworkReply:
            await self._l3(l3_uuid)
            if await self._gone_as_not_found(l3_uuid, self.store.add_dns(l3_uuid, dns)) is None:
                raise OperationError.of(
                    L3.DUPLICATE_DNS, f"L3 network {l3_uuid} already has DNS server {dns}",
                    field="dns", dns=dns)
            return await self._reply(l3_uuid)

        return await self.serialized(f"l3-{l3_uuid}", run)

    @handles(RemoveDnsFromL3NetworkMsg)
    async def remove_dns(self, msg: RemoveDnsFromL3NetworkMsg) -> L3NetworkReply:
        """
        Remove a DNS server (absent: a no-op).
        """
        l3_uuid = v.uuid(msg.l3_network_uuid, "l3NetworkUuid")
        dns = v.ipv4(msg.dns, "dns")

        async def run() -> L3NetworkReply:
            await self._l3(l3_uuid)
            await self.store.remove_dns(l3_uuid, dns)
            return await self._reply(l3_uuid)

        return await self.serialized(f"l3-{l3_uuid}", run)

    @handles(AttachNetworkServiceToL3NetworkMsg)
    async def attach_network_services(self, msg: AttachNetworkServiceToL3NetworkMsg
                                      ) -> L3NetworkReply:
        """
        Attach network service refs, all or none.

        @raise OperationError: C{SYS.1007} naming C{networkServices} (unknown type, two
            providers of a type); C{L3.1006} when another provider already gives a type
            (details C{conflicts}).
        """
        l3_uuid = v.uuid(msg.l3_network_uuid, "l3NetworkUuid")
        refs = _network_services(msg.network_services)

        async def run() -> L3NetworkReply:
            await self._l3(l3_uuid)
            result = await self._gone_as_not_found(
                l3_uuid, self.store.attach_network_services(l3_uuid, refs))
            if "conflicts" in result:
                names = ", ".join(f"{c['networkServiceType']} (provider"
                                  f" {c['networkServiceProviderUuid']})"
                                  for c in result["conflicts"])
                raise OperationError.of(
                    L3.NETWORK_SERVICE_CONFLICT,
                    f"L3 network {l3_uuid} already has {names}",
                    field="networkServices", conflicts=result["conflicts"])
            return await self._reply(l3_uuid)

        return await self.serialized(f"l3-{l3_uuid}", run)

    @handles(DetachNetworkServiceFromL3NetworkMsg)
    async def detach_network_services(self, msg: DetachNetworkServiceFromL3NetworkMsg
                                      ) -> L3NetworkReply:
        """
        Detach network service refs (absent ones ignored).
        """
        l3_uuid = v.uuid(msg.l3_network_uuid, "l3NetworkUuid")
        refs = _network_services(msg.network_services)

        async def run() -> L3NetworkReply:
            await self._l3(l3_uuid)
            await self.store.detach_network_services(l3_uuid, refs)
            return await self._reply(l3_uuid)

        return await self.serialized(f"l3-{l3_uuid}", run)

    # --- addresses ------------------------------------------------------------------------

    @handles(AllocateIpMsg)
    async def allocate_ip(self, msg: AllocateIpMsg) -> AllocateIpReply:
        """
        Take an address for a holder (a retry answers the one it holds).

        @raise OperationError: C{SYS.1007} naming a bad field (C{requiredIp} in no range of
            the network); C{L3.1000} unknown network; C{L3.1003} when it is Disabled;
            C{L3.1007} when C{requiredIp} is taken (or the holder holds another address
            there); C{L3.1005} (cause C{DB.1005}) when no address is free.
        """
        l3_uuid = v.uuid(msg.l3_network_uuid, "l3NetworkUuid")
        holder = (v.name(msg.holder_type, "holderType", 64),
                  v.uuid(msg.holder_uuid, "holderUuid"))
        required = v.ipv4(msg.required_ip, "requiredIp") if msg.required_ip is not None \
            else None
        strategy = IP_ALLOCATOR_STRATEGIES[v.one_of(
            DEFAULT_IP_ALLOCATOR_STRATEGY if msg.allocate_strategy is None
            else msg.allocate_strategy, "allocateStrategy",
            IP_ALLOCATOR_STRATEGIES)]
        used_uuid = v.uuid(msg.used_ip_uuid, "usedIpUuid") if msg.used_ip_uuid is not None \
            else None
        l3 = await self._l3(l3_uuid)
        if l3["state"] != "Enabled":
            raise OperationError.of(
                L3.STATE_ERROR,
                f"L3 network {l3_uuid} is {l3['state']}: it hands out no addresses",
                state=l3["state"], uuid=l3_uuid)
        try:
            row = await self.store.allocate_ip(l3_uuid, holder, required, used_uuid, strategy)
        except OperationError as e:
            code = e.error.code
            if code == DB.NO_FREE_IP:
                raise OperationError.of(
                    L3.ALLOCATE_IP_ERROR, f"no free IP address left in L3 network {l3_uuid}",
                    cause=e.error, uuid=l3_uuid) from None
            if code == DB.DUPLICATE:
                raise OperationError.of(
                    L3.IP_IN_USE, e.error.details, cause=e.error, field="requiredIp",
                    ip=required, uuid=l3_uuid) from None
            if code == SYS.INVALID_ARGUMENT_ERROR and e.error.opaque.get("field") == "ip":
                raise OperationError.of(
                    SYS.INVALID_ARGUMENT_ERROR, e.error.details, field="requiredIp",
                    value=required) from None
            if code == SYS.RESOURCE_NOT_FOUND or code == DB.REFERENCE:
                raise OperationError.of(
                    L3.NOT_FOUND, f"L3 network {l3_uuid} (or its range) was deleted",
                    cause=e.error, field="l3NetworkUuid", uuid=l3_uuid) from None
            raise
        return AllocateIpReply(inventory=row)

    @handles(ReturnIpMsg)
    async def return_ip(self, msg: ReturnIpMsg) -> ReturnIpReply:
        """
        Give back the holder's address (none held, or no such network: a no-op).
        """
        l3_uuid = v.uuid(msg.l3_network_uuid, "l3NetworkUuid")
        holder = (v.name(msg.holder_type, "holderType", 64),
                  v.uuid(msg.holder_uuid, "holderUuid"))
        return ReturnIpReply(inventory=await self.store.release_ip(l3_uuid, holder))

    @handles(GetFreeIpMsg)
    async def get_free_ip(self, msg: GetFreeIpMsg) -> GetFreeIpReply:
        """
        Free addresses (see L{GetFreeIpMsg}); C{SYS.1007} when neither C{l3NetworkUuid}
        nor C{ipRangeUuid} is given (or both, the range not in that network), C{L3.1000}
        naming the unknown one. Both are checked when both are given.
        """
        limit = v.integer(msg.limit, "limit", 0, 100_000)
        start = _ip_long(v.ipv4(msg.start, "start")) if msg.start is not None else None
        l3_uuid = (v.uuid(msg.l3_network_uuid, "l3NetworkUuid")
                   if msg.l3_network_uuid is not None else None)
        range_uuid = (v.uuid(msg.ip_range_uuid, "ipRangeUuid")
                      if msg.ip_range_uuid is not None else None)
        if l3_uuid is not None:
            await self._l3(l3_uuid)
        if range_uuid is not None:
            rng = await self.must_get("ipRange", range_uuid, L3.NOT_FOUND,
                                      field="ipRangeUuid")
            if l3_uuid is not None and rng["l3NetworkUuid"] != l3_uuid:
                raise v.invalid("ipRangeUuid", range_uuid,
                                f"is a range of L3 network {rng['l3NetworkUuid']}, "
                                f"not of {l3_uuid}")
            ranges = await self.store.ip_ranges_of(None, range_uuid)
        elif l3_uuid is not None:
            ranges = await self.store.ip_ranges_of(l3_uuid)
        else:
            raise v.invalid("l3NetworkUuid", None, "or ipRangeUuid must be given")
        return GetFreeIpReply(inventories=await self.store.free_ips(ranges, start, limit))

    @handles(CheckIpAvailabilityMsg)
    async def check_ip(self, msg: CheckIpAvailabilityMsg) -> CheckIpAvailabilityReply:
        """
        Whether an address is free in an L3 network.
        """
        l3_uuid = v.uuid(msg.l3_network_uuid, "l3NetworkUuid")
        ip = v.ipv4(msg.ip, "ip")
        await self._l3(l3_uuid)
        rng, used = await self.store.ip_use(l3_uuid, _ip_long(ip))
        if used is not None:
            who = (f" by {used['holderType']} {used['holderUuid']}"
                   if used.get("holderUuid") else "")
            return CheckIpAvailabilityReply(available=False, reason=f"{ip} is in use{who}")
        if rng is None:
            ranges = await self.store.ip_ranges_of(l3_uuid)
            if any(r[5] == ip for r in ranges):
                return CheckIpAvailabilityReply(available=False,
                                                reason=f"{ip} is the gateway")
            return CheckIpAvailabilityReply(
                available=False, reason=f"{ip} is in no IP range of L3 network {l3_uuid}")
        return CheckIpAvailabilityReply(available=True)

    @handles(GetIpAddressCapacityMsg)
    async def capacity(self, msg: GetIpAddressCapacityMsg) -> GetIpAddressCapacityReply:
        """
        Total, available and used address counts (C{SYS.1007} naming C{ipRangeUuids} when
        every list is empty and C{all} is not set).
        """
        ranges = v.uuids(msg.ip_range_uuids, "ipRangeUuids", allow_empty=True)
        l3s = v.uuids(msg.l3_network_uuids, "l3NetworkUuids", allow_empty=True)
        zones = v.uuids(msg.zone_uuids, "zoneUuids", allow_empty=True)
        if not isinstance(msg.all, bool):
            raise v.invalid("all", msg.all, "must be a boolean")
        if not (ranges or l3s or zones or msg.all):
            raise v.invalid("ipRangeUuids", ranges, "l3NetworkUuids or zoneUuids must name"
                            " at least one uuid, or all must be true")
        total, used = await self.store.ip_capacity(ranges, l3s, zones, msg.all)
        return GetIpAddressCapacityReply(total_capacity=total, available_capacity=total - used,
                                         used_ip_address_number=used)


def _dependents_error(code: str, what: str, result: dict[str, Any], **details: Any
                      ) -> OperationError:
    """
    The refusal of a delete naming the VMs with NICs and the holders of addresses.
    """
    vms = result.get("vms", [])
    holders = result.get("holders", [])
    parts = []
    if vms:
        parts.append(f"VM NICs of {', '.join(vms)}")
    if holders:
        parts.append("addresses held by " + ", ".join(
            f"{h['holderType']} {h['holderUuid']} ({h['ip']})" for h in holders))
    return OperationError.of(code, f"{what} is in use: {'; '.join(parts)}",
                             vmInstanceUuids=vms, holders=holders, **details)


def make(node: Any) -> L3NetworkService:
    """
    The L3 network service of C{node}.
    """
    return L3NetworkService(node.reactor, node.bus, node.store)
