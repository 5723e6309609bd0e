"""
The audit of the VM service's invariants at rest (issue 10, "Tests": "a helper that audits
the store against the agents, reused by later tests"): every invariant the module docstring
of L{zcontrol.services.vm.base} lists, checked against the store and, when given, against
the simulated agents.

    from tests.vm_audit import audit
    self.assertEqual(await audit(store, simulated_cluster), [])

L{audit} returns one line of text per difference (empty: clean), each naming the resource
and what differs, so that a failing test says what leaked. Its checks:

 - B{capacity figures}: C{store.audit_capacity()} (host CPU/memory, primary storage and each
   LocalStorage host share recomputed from their holders) finds no drift;
 - B{jobs}: no job C{Running};
 - B{VM states}: every VM in a state at rest (C{Running}, C{Paused}, C{Unknown}, C{Crashed}
   on a host; C{Created}, C{Stopped}, C{Destroyed}, C{Error} off any host); nothing else
   (C{Starting}, C{Stopping}, C{Expunging}, C{NoState}, ...);
 - B{host capacity}: a VM on a host holds exactly its C{cpuNum}/C{memorySize} on its
   C{hostUuid} (holder C{("VmInstanceVO", vm)}) and nowhere else; a VM off any host has
   C{hostUuid} NULL and holds nothing; every host holder is such a VM;
 - B{addresses}: a NIC's C{usedIpUuid} and C{ip} name the C{usedIp} row on its L3 with
   that address, held by C{("VmNicVO", nic)}, or are both NULL and it holds none; every NIC
   of a VM on a host holds one; a C{Destroyed} VM's NICs hold none; every C{usedIp} row is
   held by a NIC;
 - B{volumes}: a C{Ready} volume has C{installPath} and C{primaryStorageUuid} and holds its
   C{size} there (holder C{("VolumeVO", volume)}; on LocalStorage naming a host); a
   C{NotInstantiated} volume holds nothing; no volume in another status (C{Creating},
   C{Deleted}, C{Migrating}); a root volume's VM exists and a VM's C{rootVolumeUuid}
   exists; every primary storage holder is a C{Ready} volume or an image cache of that
   storage (and host);
 - B{agents} (with C{simulated_cluster}, a
   L{agent.hypervisor.simulator.SimulatedCluster}, or C{agent_vms} gathered elsewhere, e.g.
   through C{/vm/vmsync} of another process): the VMs Running on each host's agent are
   exactly the store's VMs on that host in C{Running}/C{Paused}/C{Crashed} (an C{Unknown}
   one may or may not run there); with C{simulated_cluster}, the files on each host's local
   disk and on each NFS export are exactly the C{Ready} volumes' install paths and the
   image caches' install URLs that belong there; with C{agent_local_used} (gathered through
   C{/localstorage/getphysicalcapacity} of another process), the bytes used on each host's
   local disk are what the store's LocalStorage holders on that host hold.

Hosts map to simulated hosts by their C{managementIp}: C{.../hosts/<i>} is host key C{i}, a
URL without that prefix host C{0} (as L{agent.app.AgentApp} addresses them).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit

from agent.protocol import HOSTS_PREFIX, VmState
from zcontrol.db.query import Query

__all__ = [
    "HOST_STATES",
    "OFF_HOST_STATES",
    "audit",
    "host_key",
]

VM_HOLDER = "VmInstanceVO"
VOLUME_HOLDER = "VolumeVO"
NIC_HOLDER = "VmNicVO"
IMAGE_CACHE_HOLDER = "ImageCacheVO"

#: VM states at rest on a host (C{hostUuid} set, host capacity held).
HOST_STATES = frozenset({"Running", "Paused", "Unknown", "Crashed"})
#: VM states at rest off any host (C{hostUuid} NULL, nothing held on a host).
OFF_HOST_STATES = frozenset({"Created", "Stopped", "Destroyed", "Error"})
#: Of L{HOST_STATES}, those whose VM the agent must report Running (C{Unknown}: the host
#: cannot tell).
AGENT_RUNNING_STATES = frozenset({"Running", "Paused", "Crashed"})

_PAGE = 1000


async def _all(store: Any, resource: str, *conditions: str) -> list[dict[str, Any]]:
    """
    Every row of C{resource} matching C{conditions}, page by page (by uuid).
    """
    rows: list[dict[str, Any]] = []
    start = 0
    while True:
        page = (await store.query(resource, Query(conditions=list(conditions), sort="uuid",
                                                  limit=_PAGE, start=start))).inventories
        rows.extend(page)
        if len(page) < _PAGE:
            return rows
        start += _PAGE


def host_key(management_ip: str | None) -> str | None:
    """
    The simulated host key of a host's C{managementIp} (C{http://ip:port/hosts/3} -> C{"3"};
    no C{/hosts/} prefix -> C{"0"}), or None when it is not an agent URL.
    """
    if not management_ip:
        return None
    path = urlsplit(management_ip).path if "://" in management_ip else ""
    if HOSTS_PREFIX in path:
        return path.rsplit(HOSTS_PREFIX, 1)[1].strip("/") or None
    return "0"


def _holder(row: Mapping[str, Any]) -> tuple[str, str]:
    return (row["holderType"], row["holderUuid"])


async def audit(store: Any, simulated_cluster: Any = None, *,
                agent_vms: Mapping[str, Mapping[str, str]] | None = None,
                agent_local_used: Mapping[str, int] | None = None) -> list[str]:
    """
    Every difference between the store and the invariants at rest (see the module
    docstring), and between the store and the agents when given.

    @param store: the L{zcontrol.db.IStore}.
    @param simulated_cluster: the agents' L{agent.hypervisor.simulator.SimulatedCluster}
        (VMs and files), or None.
    @param agent_vms: host uuid -> {VM uuid: state} as each host's agent reports them
        (C{/vm/vmsync}), for the hosts observed; used instead of C{simulated_cluster}'s
        hypervisors when given.
    @param agent_local_used: host uuid -> bytes used on the host's local disk as its agent
        reports them (C{/localstorage/getphysicalcapacity}: total - available), for the
        hosts observed: they must be what the store's LocalStorage holders on that host
        hold (the Ready volumes' sizes and the caches' actual sizes; the files' sizes on
        the simulated disk), so leaked or missing bits show without a file listing.
    @return: the differences, one sentence each, sorted; empty when clean.
    """
    out: list[str] = []

    # capacity figures recomputed from the holders
    for d in await store.audit_capacity():
        out.append(f"{d['resource']} {d['uuid']}: {d['field']} is {d['recorded']}, its holders"
                   f" leave {d['computed']} (held {d['held']})")

    # jobs
    for job in await _all(store, "job", "state=Running"):
        out.append(f"job {job['uuid']} ({job['apiName']}, resource {job.get('resourceUuid')})"
                   f" is still Running")

    hosts = {h["uuid"]: h for h in await _all(store, "host")}
    vms = {v["uuid"]: v for v in await _all(store, "vmInstance")}
    volumes = {v["uuid"]: v for v in await _all(store, "volume")}
    nics = {n["uuid"]: n for n in await _all(store, "vmNic")}
    used_ips = {u["uuid"]: u for u in await _all(store, "usedIp")}
    storages = {s["uuid"]: s for s in await _all(store, "primaryStorage")}
    caches = {c["uuid"]: c for c in await _all(store, "imageCache")}

    # VM states and host capacity
    held_on: dict[tuple[str, str], list[tuple[str, dict]]] = defaultdict(list)
    for host_uuid in hosts:
        answer = await store.host_capacity_holders(host_uuid, 10_000)
        for h in answer["holders"]:
            held_on[_holder(h)].append((host_uuid, h))
            if h["holderType"] != VM_HOLDER or h["holderUuid"] not in vms:
                out.append(f"host {host_uuid}: {h['cpu']} CPU and {h['memory']} bytes held by"
                           f" {h['holderType']} {h['holderUuid']}, which is no VM")
    for vm in vms.values():
        state, where = vm["state"], vm.get("hostUuid")
        held = held_on.get((VM_HOLDER, vm["uuid"]), [])
        if state in HOST_STATES:
            if where is None:
                out.append(f"VM {vm['uuid']} is {state} with no hostUuid")
            expected = [(where, vm["cpuNum"], vm["memorySize"])] if where else []
            got = [(h, r["cpu"], r["memory"]) for h, r in held]
            if got != expected:
                out.append(f"VM {vm['uuid']} ({state} on {where}) holds host capacity {got},"
                           f" not {expected} (host, cpu, memory)")
        elif state in OFF_HOST_STATES:
            if where is not None:
                out.append(f"VM {vm['uuid']} is {state} with hostUuid {where}")
            if held:
                out.append(f"VM {vm['uuid']} is {state} and holds host capacity "
                           f"{[(h, r['cpu'], r['memory']) for h, r in held]}")
        else:
            out.append(f"VM {vm['uuid']} is {state}, not a state at rest")

    # NICs and addresses
    ip_holders: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for u in used_ips.values():
        ip_holders[(u.get("holderType"), u.get("holderUuid"))].append(u)
        nic = nics.get(u.get("holderUuid")) if u.get("holderType") == NIC_HOLDER else None
        if nic is None:
            out.append(f"usedIp {u['uuid']} ({u['ip']} on L3 {u['l3NetworkUuid']}) is held by"
                       f" {u.get('holderType')} {u.get('holderUuid')}, which is no NIC")
    for nic in nics.values():
        vm = vms.get(nic["vmInstanceUuid"])
        held = ip_holders.get((NIC_HOLDER, nic["uuid"]), [])
        if vm is None:
            out.append(f"NIC {nic['uuid']} belongs to no VM ({nic['vmInstanceUuid']})")
            continue
        if vm["state"] not in HOST_STATES | OFF_HOST_STATES:
            continue  # reported above; its addresses follow from the operation under way
        used_uuid, ip = nic.get("usedIpUuid"), nic.get("ip")
        if used_uuid is None and ip is None:
            if vm["state"] in HOST_STATES:
                out.append(f"NIC {nic['uuid']} of {vm['state']} VM {vm['uuid']} holds no"
                           f" address")
            if held:
                out.append(f"NIC {nic['uuid']} of {vm['state']} VM {vm['uuid']} names no"
                           f" address but holds {[u['ip'] for u in held]}")
            continue
        if vm["state"] == "Destroyed":
            out.append(f"NIC {nic['uuid']} of Destroyed VM {vm['uuid']} still names address"
                       f" {ip} (usedIp {used_uuid})")
        used = used_ips.get(used_uuid) if used_uuid else None
        if used is None or ip is None:
            out.append(f"NIC {nic['uuid']} of {vm['state']} VM {vm['uuid']} names ip {ip},"
                       f" usedIp {used_uuid}, which it does not hold")
        elif (used["ip"] != ip or used["l3NetworkUuid"] != nic["l3NetworkUuid"]
              or _holder(used) != (NIC_HOLDER, nic["uuid"])):
            out.append(f"NIC {nic['uuid']} names {ip} on L3 {nic['l3NetworkUuid']} but"
                       f" usedIp {used['uuid']} is {used['ip']} on L3 {used['l3NetworkUuid']}"
                       f" held by {_holder(used)}")
        extra = [u["ip"] for u in held if u["uuid"] != nic.get("usedIpUuid")]
        if extra:
            out.append(f"NIC {nic['uuid']} holds other addresses {extra}")

    # volumes and primary storage capacity
    ps_held: dict[tuple[str, str], list[tuple[str, dict]]] = defaultdict(list)
    for ps_uuid in storages:
        for h in await store.primary_storage_holders(ps_uuid):
            ps_held[_holder(h)].append((ps_uuid, h))
            if h["holderType"] == VOLUME_HOLDER:
                volume = volumes.get(h["holderUuid"])
                if volume is None:
                    out.append(f"primary storage {ps_uuid}: {h['size']} bytes held by volume"
                               f" {h['holderUuid']}, which does not exist")
            elif h["holderType"] == IMAGE_CACHE_HOLDER:
                cache = caches.get(h["holderUuid"])
                if cache is None or cache["primaryStorageUuid"] != ps_uuid or (
                        cache.get("hostUuid") != h.get("hostUuid")):
                    out.append(f"primary storage {ps_uuid}: {h['size']} bytes held by image"
                               f" cache {h['holderUuid']} (host {h.get('hostUuid')}), which"
                               f" is not there")
            else:
                out.append(f"primary storage {ps_uuid}: {h['size']} bytes held by"
                           f" {h['holderType']} {h['holderUuid']}, which is no volume or cache")
    for volume in volumes.values():
        held = ps_held.get((VOLUME_HOLDER, volume["uuid"]), [])
        status = volume["status"]
        if status == "Ready":
            ps = storages.get(volume.get("primaryStorageUuid"))
            if volume.get("installPath") is None or ps is None:
                out.append(f"volume {volume['uuid']} is Ready with installPath"
                           f" {volume.get('installPath')} on primary storage"
                           f" {volume.get('primaryStorageUuid')}")
            got = [(p, r["size"]) for p, r in held]
            expected = [(volume.get("primaryStorageUuid"), volume["size"])]
            if got != expected:
                out.append(f"volume {volume['uuid']} (Ready) holds {got}, not {expected}"
                           f" (primary storage, bytes)")
            elif ps is not None and ps["type"] == "LocalStorage" and not held[0][1].get(
                    "hostUuid"):
                out.append(f"volume {volume['uuid']} holds LocalStorage {ps['uuid']} on no host")
        elif status == "NotInstantiated":
            if held:
                out.append(f"volume {volume['uuid']} is NotInstantiated and holds"
                           f" {[(p, r['size']) for p, r in held]}")
        else:
            out.append(f"volume {volume['uuid']} is {status}, not a status at rest")
        owner = volume.get("vmInstanceUuid")
        if owner is not None and owner not in vms:
            out.append(f"volume {volume['uuid']} ({volume['type']}) belongs to VM {owner},"
                       f" which does not exist")
        if owner is None and volume["type"] == "Root":
            out.append(f"root volume {volume['uuid']} belongs to no VM")
    for vm in vms.values():
        root = vm.get("rootVolumeUuid")
        if root is not None and root not in volumes:
            out.append(f"VM {vm['uuid']} names root volume {root}, which does not exist")

    # the agents
    if agent_vms is not None or simulated_cluster is not None:
        out.extend(_audit_agent_vms(hosts, vms, agent_vms, simulated_cluster))
    if agent_local_used is not None:
        for host_uuid, used in sorted(agent_local_used.items()):
            held = sum(r["size"] for rows in ps_held.values() for ps_uuid, r in rows
                       if r.get("hostUuid") == host_uuid
                       and storages[ps_uuid]["type"] == "LocalStorage")
            if used != held:
                out.append(f"local disk of host {host_uuid}: its agent reports {used} bytes"
                           f" used, the store's volumes and caches there hold {held}")
    if simulated_cluster is not None:
        out.extend(_audit_bits(hosts, storages, volumes, caches, ps_held, simulated_cluster))
    return sorted(out)


def _simulated_vms(hosts: Mapping[str, dict], cluster: Any) -> dict[str, dict[str, str]]:
    """
    Host uuid -> {VM uuid: state} from the simulated hypervisors (hosts the agent has never
    seen report no VMs).
    """
    found: dict[str, dict[str, str]] = {}
    for host_uuid, host in hosts.items():
        key = host_key(host.get("managementIp"))
        hv = cluster.hypervisor(key) if key is not None else None
        found[host_uuid] = {} if hv is None else {u: vm.state for u, vm in hv.vms.items()}
    return found


def _audit_agent_vms(hosts: Mapping[str, dict], vms: Mapping[str, dict],
                     agent_vms: Mapping[str, Mapping[str, str]] | None,
                     cluster: Any) -> Iterable[str]:
    reported = agent_vms if agent_vms is not None else _simulated_vms(hosts, cluster)
    for host_uuid, states in sorted(reported.items()):
        running = {u for u, s in states.items() if s == VmState.RUNNING}
        on_host = {u: v for u, v in vms.items() if v.get("hostUuid") == host_uuid}
        must = {u for u, v in on_host.items() if v["state"] in AGENT_RUNNING_STATES}
        may = must | {u for u, v in on_host.items() if v["state"] == "Unknown"}
        for u in sorted(must - running):
            yield (f"VM {u} is {vms[u]['state']} on host {host_uuid} but its agent reports it"
                   f" {states.get(u, 'absent')}")
        for u in sorted(running - may):
            vm = vms.get(u)
            said = "no VM in the store" if vm is None else (
                f"{vm['state']} on host {vm.get('hostUuid')} in the store")
            yield f"VM {u} runs on host {host_uuid}'s agent: {said}"


def _audit_bits(hosts: Mapping[str, dict], storages: Mapping[str, dict],
                volumes: Mapping[str, dict], caches: Mapping[str, dict],
                ps_held: Mapping[tuple[str, str], list], cluster: Any) -> Iterable[str]:
    """
    The files of each disk against the volumes and caches that belong there.
    """
    # disk name -> (its files, the paths that must exist, the paths that may)
    disks: dict[str, tuple[dict[str, int], set[str], set[str]]] = {}

    def disk_of(ps: dict, host_uuid: str | None) -> str | None:
        if ps["type"] == "LocalStorage":
            host = hosts.get(host_uuid) if host_uuid else None
            key = host_key(host.get("managementIp")) if host else None
            storage = cluster.storage(key) if key is not None else None
            name = f"local disk of host {host_uuid}"
            if name not in disks:
                disks[name] = ({} if storage is None else storage.local.files, set(), set())
            return name
        name = f"NFS export {ps['url']}"
        if name not in disks:
            export = cluster.nfs_exports.get(ps["url"])
            disks[name] = ({} if export is None else export.files, set(), set())
        return name

    for host_uuid in hosts:
        # every local disk the store knows of is checked, even with nothing on it
        for ps in storages.values():
            if ps["type"] == "LocalStorage":
                disk_of(ps, host_uuid)
    for ps in storages.values():
        if ps["type"] != "LocalStorage":
            disk_of(ps, None)
    for volume in volumes.values():
        ps = storages.get(volume.get("primaryStorageUuid"))
        path = volume.get("installPath")
        if ps is None or path is None:
            continue
        held = ps_held.get((VOLUME_HOLDER, volume["uuid"]), [])
        host_uuid = held[0][1].get("hostUuid") if held else None
        name = disk_of(ps, host_uuid)
        if volume["status"] == "Ready":
            disks[name][1].add(path)
            disks[name][2].add(path)
    for cache in caches.values():
        ps = storages.get(cache["primaryStorageUuid"])
        if ps is None or not cache.get("installUrl"):
            continue
        name = disk_of(ps, cache.get("hostUuid"))
        disks[name][2].add(cache["installUrl"])
        if cache["status"] == "Ready":
            disks[name][1].add(cache["installUrl"])
    for name, (files, must, may) in sorted(disks.items()):
        for path in sorted(must - set(files)):
            yield f"{name}: {path} is missing"
        for path in sorted(set(files) - may):
            yield f"{name}: {path} belongs to no Ready volume nor image cache"
