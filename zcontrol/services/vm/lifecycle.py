# -*- test-case-name: tests.test_vm_lifecycle -*-
"""
A VM's life: create, start, stop, reboot, destroy, recover and expunge, each a journaled job
(L{zcontrol.core.journal}) run in the VM's chain by L{LifecycleMixin} (the conventions are
L{zcontrol.services.vm.base}'s).

The job kinds and their flows (ZStack's C{VmInstanceManager.xml} flow lists,
C{shared/ZSTACK_FACTS.md} section 4):

 - C{CreateVm}: insert-vm, allocate-host, allocate-volumes, allocate-nics,
   instantiate-volumes, start-on-hypervisor, vm-running. A failed create rolls everything
   back and removes the VM (ZStack's C{VmInstanceManagerImpl} deletes a VO whose create
   failed); the reply fails with C{VM.1000} whose cause is the flow's error, with the agent's
   own words at its root (ZStack issue #4 masked it as a timeout: never here).
 - C{CreateStoppedVm} (strategy C{CreateStopped}): the same up to instantiate-volumes, then
   return-host and vm-stopped (the VM keeps its volumes and addresses, not the host).
 - C{CreateVmRecord} (strategy C{JustCreate}): insert-vm only; the VM stays C{Created}.
 - C{StartVm}: vm-starting, allocate-host (the last host first; a VM whose root volume is
   on LocalStorage only on the volume's host), allocate-nic-ips (the NICs a destroy or a
   recover left without an address), start-on-hypervisor, vm-running. A failure leaves the
   VM as it was (C{Stopped}). C{StartNewCreatedVm}: the create's flows for a C{Created} VM.
 - C{StopVm}: vm-stopping, stop-on-hypervisor (graceful, then forced after
   C{vm.stop_timeout}; C{type=cold} forced at once), return-host, vm-stopped.
 - C{RebootVm}: vm-rebooting, reboot-on-hypervisor, vm-running.
 - C{DestroyVm}: vm-destroying, destroy-on-hypervisor (skipped when the host is not
   Connected, as ZStack's C{VmDestroyOnHypervisorFlow}: the host's VM sync reports it later),
   return-host, release-nics, vm-destroyed; with the deletion policy C{Direct}
   (C{DestroyAndExpungeVm}), then delete-volumes and remove-vm.
 - C{RecoverVm}: vm-recovered (Destroyed -> Stopped).
 - C{ExpungeVm}: vm-expunging, return-host, release-nics, delete-volumes, remove-vm.

Recovery (L{zcontrol.core.journal.recover_jobs}): creates and starts go forward only when the
agent says the VM runs (the probe of start-on-hypervisor, C{/vm/checkstate}) or the last flow
was in flight; stops go forward when the agent says it is stopped; destroys and expunges always
go forward (each flow is idempotent); otherwise the job rolls back. Either way the VM ends in a
final state and nothing taken is left held.
"""

from __future__ import annotations

import random
from typing import Any, Iterable, MutableMapping

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from agent import protocol as p
from zcontrol.core.errors import SYS, OperationError, error_code
from zcontrol.core.journal import JobKind, JournaledFlow
from zcontrol.db.query import Condition, Query
from zcontrol.scheduler.messages import SERVICE_ID as ALLOCATOR
from zcontrol.scheduler.messages import AllocateHostMsg, ReturnHostCapacityMsg
from zcontrol.services import inventory as inv
from zcontrol.services import validate
from zcontrol.services.base import handles
from zcontrol.services.host.messages import HOST
from zcontrol.services.image.messages import IMAGE, SelectBackupStorageMsg
from zcontrol.services.image.messages import SERVICE_ID as IMAGE_SERVICE
from zcontrol.services.network.messages import L3, L3_SERVICE_ID, AllocateIpMsg, ReturnIpMsg
from zcontrol.services.offering.messages import OFFERING
from zcontrol.services.primarystorage.messages import SERVICE_ID as PRIMARY
from zcontrol.services.primarystorage.messages import (
    AllocatePrimaryStorageMsg,
    DeleteVolumeBitsOnPrimaryStorageMsg,
    InstantiateRootVolumeFromTemplateOnPrimaryStorageMsg,
    InstantiateVolumeOnPrimaryStorageMsg,
    ReturnPrimaryStorageCapacityMsg,
)
from zcontrol.services.vm import states
from zcontrol.services.vm.base import (
    NIC_HOLDER,
    NO_JOB,
    VM_HOLDER,
    VOLUME_HOLDER,
    job_kinds,
    message_body,
)
from zcontrol.services.vm.errors import VM
from zcontrol.services.vm.messages import (
    CREATE_STRATEGIES,
    STOP_TYPES,
    CreateVmInstanceMsg,
    DestroyVmInstanceMsg,
    ExpungeVmInstanceMsg,
    RebootVmInstanceMsg,
    RecoverVmInstanceMsg,
    StartVmInstanceMsg,
    StopVmInstanceMsg,
    VmInstanceReply,
)
from zcontrol.services.vm.volumes import data_volume_tos
from zcontrol.services.zone.messages import ZONE

__all__ = ["LifecycleMixin", "new_mac"]

log = Logger()

S = states.VmInstanceState
E = states.Event
Op = states.Operation

#: The states whose VM holds host capacity and may run on its host (the invariants at rest).
ON_HOST = frozenset({S.Running, S.Paused, S.Unknown, S.Crashed})
#: System tag prefixes the create understands (ZStack's C{VmSystemTags}).
STATIC_IP_TAG = "staticIp::"
HOSTNAME_TAG = "hostname::"
#: ZStack's C{APIDeleteMessage.DeletionMode}: C{Permissive} (refused while something depends
#: on the resource), C{Enforcing} (deleted all the same).
DELETE_MODES = ("Permissive", "Enforcing")


def new_mac() -> str:
    """
    A random MAC address in ZStack's form (C{fa:} then five random bytes,
    C{NetworkUtils.generateMacWithDeviceId}'s prefix).
    """
    return "fa:" + ":".join(f"{random.randrange(256):02x}" for _ in range(5))


def _plan(ctx: MutableMapping[str, Any]) -> dict[str, Any]:
    return ctx["message"]["plan"]


def _took(ctx: MutableMapping[str, Any], flow: str) -> dict[str, Any]:
    return ctx["took"].get(flow) or {}


def _host_of(ctx: MutableMapping[str, Any]) -> str | None:
    """
    The VM's host in this job: what allocate-host took, else the plan's current host.
    """
    return _took(ctx, "allocate-host").get("host") or _plan(ctx).get("currentHostUuid")


def _gone(e: OperationError) -> bool:
    """
    The error says the host is not there to command (gone or not Connected).
    """
    codes = {HOST.NOT_FOUND, HOST.NOT_CONNECTED, SYS.RESOURCE_NOT_FOUND}
    err: Any = e.error
    while err is not None:
        if err.code in codes:
            return True
        err = err.cause
    return False


# --- flows ---------------------------------------------------------------------------------


class _Flow(JournaledFlow):
    def __init__(self, svc: Any) -> None:
        self.svc = svc


class InsertVm(_Flow):
    """
    Record the VM (C{Created}, with its tags), then move it to C{Starting}. Rollback: remove
    what is left of the VM's rows (its NICs and volumes first); the flows after this one gave
    back what they held before.
    """

    name = "insert-vm"

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        plan = _plan(ctx)
        vm = ctx["resource"]
        if await self.svc.store.get("vmInstance", vm) is None:
            await self.svc.store.insert("vmInstance", dict(plan["row"]))
        for tag in plan.get("tags") or []:
            if await self.svc.store.get("tag", tag["uuid"]) is None:
                await self.svc.store.insert("tag", {
                    "uuid": tag["uuid"], "resourceUuid": vm, "resourceType": "VmInstanceVO",
                    "tag": tag["tag"], "type": tag["type"]})
        if plan.get("final") != S.Created:
            row = await self.svc.store.get("vmInstance", vm)
            if row["state"] == S.Created:
                await self.svc.change_state(vm, E.starting, expected=[S.Created])
        return {"vm": vm}

    async def rollback(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        await self.svc.remove_vm_rows(ctx["resource"])


class StateFlow(_Flow):
    """
    Move the VM from one of C{sources} into C{into}, recording the state it left; rollback
    moves it back there (a compare-and-swap from C{into}).
    """

    def __init__(self, svc: Any, name: str, sources: Iterable[str], into: str) -> None:
        super().__init__(svc)
        self.name = name
        self.sources = list(sources)
        self.into = into

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        vm = ctx["resource"]
        row = await self.svc.vm_row(vm)
        if row["state"] == self.into and ctx.get("recovering"):
            return {"from": _plan(ctx).get("fromState", row["state"])}
        await self.svc.set_state(vm, self.sources, self.into)
        return {"from": row["state"]}

    async def rollback(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        back = (took or {}).get("from") or _plan(ctx).get("fromState")
        row = await self.svc.store.get("vmInstance", ctx["resource"])
        if back is None or row is None or row["state"] != self.into:
            return  # never moved (it failed, or stopped, before the swap), or removed
        await self.svc.set_state(ctx["resource"], [self.into], back, missing_ok=True)


class SettleFlow(StateFlow):
    """
    A state flow of an operation on a VM that is on a host (stop, reboot, destroy), whose
    rollback settles the VM to what its host says rather than to the state it left: once
    the hypervisor acted, "back" may be a lie. The agent is asked (C{/vm/checkstate}):
    running there, the VM goes back to the state it left (C{Running} if that was not a state
    on a host) holding its host capacity again; not running, C{Stopped} with its host
    capacity given back; the host cannot tell, C{Unknown} on that host (its VM sync settles
    it later). A VM that had no host goes back to the state it left.
    """

    async def rollback(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        vm = ctx["resource"]
        row = await self.svc.store.get("vmInstance", vm)
        if row is None or row["state"] != self.into:
            return
        back = (took or {}).get("from") or _plan(ctx).get("fromState") or S.Stopped
        host = _plan(ctx).get("currentHostUuid")
        if host is None:
            await self.svc.set_state(vm, [self.into], back, missing_ok=True)
            return
        runs = await self.svc.runs_on(vm, host)
        if runs is False:
            await self.svc.return_host_capacity(vm)
            await self.svc.set_state(vm, [self.into], S.Stopped,
                                     {"hostUuid": None, "lastHostUuid": host},
                                     missing_ok=True)
            return
        await self.svc.hold_host_capacity(vm, host, row)
        target = (back if back in ON_HOST else S.Running) if runs else S.Unknown
        await self.svc.set_state(vm, [self.into], target, {"hostUuid": host},
                                 missing_ok=True)


class FinalState(_Flow):
    """
    The last flow: move the VM from C{sources} to C{into} with the job's host columns; no
    rollback (nothing runs after it). Idempotent: a VM already there is left alone.
    """

    def __init__(self, svc: Any, name: str, sources: Iterable[str], into: str,
                 on_host: bool) -> None:
        super().__init__(svc)
        self.name = name
        self.sources = list(sources)
        self.into = into
        self.on_host = on_host

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        vm = ctx["resource"]
        host = _host_of(ctx)
        if self.on_host:
            changes = {"hostUuid": host, "lastHostUuid": host}
        else:
            changes = {"hostUuid": None, "lastHostUuid": host or
                       (await self.svc.vm_row(vm)).get("lastHostUuid")}
        row = await self.svc.vm_row(vm)
        if row["state"] == self.into:
            return {"state": self.into}
        # Known to the rollback should the journal refuse to record this flow after the
        # swap (the chain then rolls it back with took=None).
        ctx[f"{self.name}:from"] = (row["state"], row.get("hostUuid"))
        await self.svc.set_state(vm, self.sources, self.into, changes)
        return {"state": self.into}

    async def rollback(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        before = ctx.get(f"{self.name}:from")
        row = await self.svc.store.get("vmInstance", ctx["resource"])
        if before is None or row is None or row["state"] != self.into:
            return
        await self.svc.set_state(ctx["resource"], [self.into], before[0],
                                 {"hostUuid": before[1]}, missing_ok=True)


class AllocateHost(_Flow):
    """
    Reserve CPU and memory on a host for the VM (the allocator's C{AllocateHostMsg}, holder
    C{("VmInstanceVO", vm)}; idempotent per VM) and record it on the VM row. Rollback: give
    back every reservation the VM holds (by holder: also when the run never reported).
    """

    name = "allocate-host"

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        plan = _plan(ctx)
        vm = ctx["resource"]
        reply = await self.svc.send(AllocateHostMsg(
            service_id=ALLOCATOR, vm_instance_uuid=vm, cpu_num=plan["cpuNum"],
            memory_size=plan["memorySize"], cpu_speed=plan.get("cpuSpeed") or 0,
            disk_size=plan.get("diskSize") or 0,
            l3_network_uuids=list(plan.get("l3NetworkUuids") or []),
            zone_uuid=plan.get("zoneUuid"), cluster_uuid=plan.get("clusterUuid"),
            host_uuid=plan.get("hostUuid"), allocator_strategy=plan.get("allocatorStrategy"),
            primary_storage_uuid=plan.get("primaryStorageUuid"),
            last_host_uuid=plan.get("lastHostUuid")))
        host = reply.inventory
        await self.svc.store.update("vmInstance", vm, {
            "hostUuid": host["uuid"], "clusterUuid": host["clusterUuid"],
            "zoneUuid": host["zoneUuid"], "hypervisorType": host.get("hypervisorType")
            or "KVM"})
        return {"host": host["uuid"], "cpu": plan["cpuNum"], "memory": plan["memorySize"],
                "primaryStorageUuids": list(reply.primary_storage_uuids)}

    async def rollback(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        vm = ctx["resource"]
        await self.svc.return_host_capacity(vm)
        if await self.svc.store.get("vmInstance", vm) is not None:
            await self.svc.store.update("vmInstance", vm, {"hostUuid": None})


class ReturnHost(_Flow):
    """
    Give back the host capacity the VM holds (every host: a migration's two). No rollback:
    the flows after it only record the result.
    """

    name = "return-host"

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        hosts = await self.svc.return_host_capacity(ctx["resource"])
        return {"hosts": hosts}


class AllocateVolumes(_Flow):
    """
    Record the planned volumes (C{NotInstantiated}) and reserve their size on a primary
    storage the chosen host reaches (C{AllocatePrimaryStorageMsg}, holder
    C{("VolumeVO", volume)}). Rollback: give the reservations back (by holder on every
    candidate storage) and remove the volume rows (a row still C{Ready} too: its instantiate
    rollback failed and is retried later without it).
    """

    name = "allocate-volumes"

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        plan = _plan(ctx)
        vm = ctx["resource"]
        host = _host_of(ctx)
        candidates = list(plan.get("primaryStorageUuid") and [plan["primaryStorageUuid"]]
                          or _took(ctx, "allocate-host").get("primaryStorageUuids") or [])
        if not candidates:
            raise OperationError.of(
                VM.CREATE_ERROR, f"host {host} reaches no primary storage for VM {vm}",
                hostUuid=host)
        out = []
        for vol in plan["volumes"]:
            if await self.svc.store.get("volume", vol["uuid"]) is None:
                await self.svc.store.insert("volume", dict(vol["row"]))
            reply = None
            last: OperationError | None = None
            for ps in candidates:
                try:
                    reply = await self.svc.send(AllocatePrimaryStorageMsg(
                        service_id=PRIMARY, size=vol["size"], holder_uuid=vol["uuid"],
                        holder_type=VOLUME_HOLDER, required_primary_storage_uuid=ps,
                        required_host_uuid=host))
                    break
                except OperationError as e:
                    last = e
            if reply is None:
                assert last is not None
                raise last
            ps = reply.primary_storage_uuid
            await self.svc.store.update("volume", vol["uuid"], {"primaryStorageUuid": ps})
            out.append({"uuid": vol["uuid"], "primaryStorageUuid": ps, "size": vol["size"],
                        "hostUuid": reply.host_uuid})
        return {"volumes": out, "primaryStorageUuids": candidates}

    async def rollback(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        plan = _plan(ctx)
        candidates = set((took or {}).get("primaryStorageUuids") or
                         _took(ctx, "allocate-host").get("primaryStorageUuids") or [])
        if plan.get("primaryStorageUuid"):
            candidates.add(plan["primaryStorageUuid"])
        for vol in plan["volumes"]:
            for ps in sorted(candidates):
                await self.svc.send(ReturnPrimaryStorageCapacityMsg(
                    service_id=PRIMARY, resource_uuid=ps, primary_storage_uuid=ps,
                    holder_uuid=vol["uuid"], holder_type=VOLUME_HOLDER))
            # Whatever its status: a volume still Ready here is one whose instantiate
            # rollback failed (the journal goes on with the earlier flows and retries that
            # one later, from the recorded allocation, without the row).
            if await self.svc.store.get("volume", vol["uuid"]) is not None:
                await self.svc.store.delete("volume", vol["uuid"])


class InstantiateVolumes(_Flow):
    """
    Create the planned volumes' bits on their primary storage through the storage agent (the
    root volume from the image's cache, C{InstantiateRootVolumeFromTemplateOnPrimaryStorageMsg};
    data volumes empty); each volume C{Ready} with its install path. Rollback: delete the bits
    (C{DeleteVolumeBitsOnPrimaryStorageMsg}: also what an interrupted run may have made, by
    the volume's default path) and mark the volumes C{NotInstantiated} again.
    """

    name = "instantiate-volumes"

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        plan = _plan(ctx)
        allocated = {v["uuid"]: v for v in _took(ctx, "allocate-volumes")["volumes"]}
        host = _host_of(ctx)
        image = None
        out = []
        for vol in plan["volumes"]:
            where = allocated[vol["uuid"]]
            ps = where["primaryStorageUuid"]
            if vol["type"] == "Root":
                if image is None:
                    image = await self.svc.image_spec(plan["image"], plan["row"].get("zoneUuid")
                                                      or (await self.svc.vm_row(
                                                          ctx["resource"]))["zoneUuid"])
                reply = await self.svc.send(InstantiateRootVolumeFromTemplateOnPrimaryStorageMsg(
                    service_id=PRIMARY, resource_uuid=ps, primary_storage_uuid=ps,
                    volume_uuid=vol["uuid"], image=image, host_uuid=host, size=vol["size"]))
            else:
                reply = await self.svc.send(InstantiateVolumeOnPrimaryStorageMsg(
                    service_id=PRIMARY, resource_uuid=ps, primary_storage_uuid=ps,
                    volume_uuid=vol["uuid"], size=vol["size"], host_uuid=host))
            await self.svc.store.update("volume", vol["uuid"], {
                "status": "Ready", "installPath": reply.install_path,
                "primaryStorageUuid": ps})
            out.append({"uuid": vol["uuid"], "primaryStorageUuid": ps,
                        "installPath": reply.install_path, "hostUuid": reply.host_uuid,
                        "type": vol["type"]})
        return {"volumes": out}

    async def rollback(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        plan = _plan(ctx)
        made = {v["uuid"]: v for v in (took or {}).get("volumes", [])}
        allocated = {v["uuid"]: v for v in _took(ctx, "allocate-volumes").get("volumes", [])}
        host = _host_of(ctx)
        for vol in plan["volumes"]:
            where = made.get(vol["uuid"]) or allocated.get(vol["uuid"])
            if where is None:
                continue
            ps = where["primaryStorageUuid"]
            await self.svc.send(DeleteVolumeBitsOnPrimaryStorageMsg(
                service_id=PRIMARY, resource_uuid=ps, primary_storage_uuid=ps,
                volume_uuid=vol["uuid"], install_path=where.get("installPath"),
                host_uuid=where.get("hostUuid") or host, volume_type=vol["type"]))
            if await self.svc.store.get("volume", vol["uuid"]) is not None:
                await self.svc.store.update("volume", vol["uuid"], {
                    "status": "NotInstantiated", "installPath": None})


class AllocateNics(_Flow):
    """
    Record the planned NICs and take an address for each on its L3 network
    (C{AllocateIpMsg}, holder C{("VmNicVO", nic)}; a static IP from the C{staticIp} tag).
    With C{create=False} (a start), only the NICs that hold no address take one. Rollback:
    give back each planned NIC's address (by holder) and, for a create, remove its row.
    """

    def __init__(self, svc: Any, name: str, create: bool) -> None:
        super().__init__(svc)
        self.name = name
        self.create = create

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        plan = _plan(ctx)
        vm = ctx["resource"]
        out = []
        for nic in plan["nics"]:
            if self.create and await self.svc.store.get("vmNic", nic["uuid"]) is None:
                await self.svc.store.insert("vmNic", {
                    "uuid": nic["uuid"], "vmInstanceUuid": vm,
                    "l3NetworkUuid": nic["l3NetworkUuid"], "mac": nic["mac"],
                    "deviceId": nic["deviceId"], "internalName": nic["internalName"]})
            reply = await self.svc.send(AllocateIpMsg(
                service_id=L3_SERVICE_ID, l3_network_uuid=nic["l3NetworkUuid"],
                holder_type=NIC_HOLDER, holder_uuid=nic["uuid"],
                required_ip=nic.get("staticIp")))
            ip = reply.inventory
            await self.svc.store.update("vmNic", nic["uuid"], {
                "usedIpUuid": ip["uuid"], "ip": ip["ip"], "netmask": ip["netmask"],
                "gateway": ip["gateway"]})
            out.append({"uuid": nic["uuid"], "l3NetworkUuid": nic["l3NetworkUuid"],
                        "ip": ip["ip"]})
        return {"nics": out}

    async def rollback(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        for nic in _plan(ctx)["nics"]:
            await self.svc.release_nic_ip(nic["uuid"], nic["l3NetworkUuid"],
                                          delete=self.create)


class StartOnHypervisor(_Flow):
    """
    C{/vm/start} on the VM's host (its NICs, its root volume). At recovery (re-run forward)
    a VM the agent already runs is left alone. Probe: C{/vm/checkstate}. Rollback: C{/vm/destroy}
    (idempotent; the volumes stay), skipped when the host cannot be reached.
    """

    name = "start-on-hypervisor"

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        vm = ctx["resource"]
        host = _host_of(ctx)
        if ctx.get("recovering") and await self.probe(ctx):
            return {"host": host}
        row = await self.svc.vm_row(vm)
        nics = await self.svc.store.query("vmNic", Query(
            conditions=[Condition("vmInstanceUuid", "=", vm)], sort="deviceId", limit=1000))
        root = (await self.svc.store.get("volume", row["rootVolumeUuid"])
                if row.get("rootVolumeUuid") else None)
        rsp = await self.svc.host_call(host, p.StartVmCmd(
            vm_instance_uuid=vm, vm_name=row["name"], cpu_num=row["cpuNum"],
            memory_size=row["memorySize"],
            nics=[p.NicTO(mac=n["mac"], ip=n["ip"], netmask=n["netmask"],
                          gateway=n["gateway"], device_id=n["deviceId"],
                          l3_network_uuid=n["l3NetworkUuid"]) for n in nics.inventories],
            root_volume_install_path=root["installPath"] if root else None,
            data_volumes=await data_volume_tos(self.svc.store, vm)))
        return {"host": host, "vncPort": rsp.vnc_port}

    async def probe(self, ctx: MutableMapping[str, Any]) -> bool | None:
        return await self.svc.runs_on(ctx["resource"], _host_of(ctx))

    async def rollback(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        await self.svc.destroy_on_host(ctx["resource"], _host_of(ctx))


class StopOnHypervisor(_Flow):
    """
    C{/vm/stop}: graceful (the guest has C{vm.stop_timeout} seconds, then the agent forces
    it), or C{cold}; a graceful stop whose command times out is sent again C{cold}. Probe:
    C{/vm/checkstate} says Stopped. No rollback (a stop cannot be undone; the state flow's
    rollback puts the VM back in the state it left).
    """

    name = "stop-on-hypervisor"

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        vm = ctx["resource"]
        host = _plan(ctx)["currentHostUuid"]
        kind = ctx["message"].get("type") or "grace"
        timeout = int(self.svc.config.stop_timeout)
        try:
            await self.svc.host_call(host, p.StopVmCmd(uuid=vm, type=kind, timeout=timeout),
                                     timeout=self.svc.config.stop_timeout + 30)
        except OperationError as e:
            if kind == "cold" or e.error.code != SYS.TIMEOUT:
                raise
            log.warn("VM {vm}: graceful stop timed out on host {host}; forcing it off",
                     vm=vm, host=host)
            await self.svc.host_call(host, p.StopVmCmd(uuid=vm, type="cold", timeout=timeout))
        return {"host": host}

    async def probe(self, ctx: MutableMapping[str, Any]) -> bool | None:
        runs = await self.svc.runs_on(ctx["resource"], _plan(ctx)["currentHostUuid"])
        return None if runs is None else not runs


class RebootOnHypervisor(_Flow):
    """
    C{/vm/reboot} on the VM's host. Probe: the VM runs. No rollback.
    """

    name = "reboot-on-hypervisor"

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        host = _plan(ctx)["currentHostUuid"]
        await self.svc.host_call(host, p.RebootVmCmd(
            uuid=ctx["resource"], timeout=int(self.svc.config.stop_timeout)))
        return {"host": host}

    async def probe(self, ctx: MutableMapping[str, Any]) -> bool | None:
        return await self.svc.runs_on(ctx["resource"], _plan(ctx)["currentHostUuid"])


class DestroyOnHypervisor(_Flow):
    """
    C{/vm/destroy} on the VM's host (idempotent); skipped when the VM has no host or the host
    is not Connected (ZStack's C{VmDestroyOnHypervisorFlow}). No rollback.
    """

    name = "destroy-on-hypervisor"

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        host = _plan(ctx).get("currentHostUuid")
        if host is None:
            return {"host": None}
        done = await self.svc.destroy_on_host(ctx["resource"], host)
        return {"host": host, "skipped": not done}

    def probe(self, ctx: MutableMapping[str, Any]) -> bool:
        return True


class ReleaseNics(_Flow):
    """
    Give back every NIC's address (C{ReturnIpMsg} by holder); the NIC rows stay (a recover
    allocates again at the next start). No rollback.
    """

    name = "release-nics"

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        nics = await self.svc.nics_of(ctx["resource"])
        for nic in nics:
            await self.svc.release_nic_ip(nic["uuid"], nic["l3NetworkUuid"], delete=False)
        return {"nics": [n["uuid"] for n in nics]}


class DeleteVolumes(_Flow):
    """
    Delete the VM's root volume (bits through the agent, capacity given back, row removed)
    and detach its data volumes (kept, as ZStack's expunge does). No rollback.
    """

    name = "delete-volumes"

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        vm = ctx["resource"]
        page = await self.svc.store.query("volume", Query(
            conditions=[Condition("vmInstanceUuid", "=", vm)], limit=1000))
        deleted, detached = [], []
        for vol in page.inventories:
            if vol["type"] != "Root":
                await self.svc.store.update("volume", vol["uuid"], {
                    "vmInstanceUuid": None, "deviceId": None})
                detached.append(vol["uuid"])
                continue
            await self.svc.delete_volume(vol)
            deleted.append(vol["uuid"])
        return {"deleted": deleted, "detached": detached}


class RemoveVm(_Flow):
    """
    Remove the VM's rows (NICs, tags, the VM). No rollback.
    """

    name = "remove-vm"

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        await self.svc.remove_vm_rows(ctx["resource"])
        return {"removed": ctx["resource"]}


# --- the mixin -----------------------------------------------------------------------------


def _forward_when(*flows: str, happened: bool = True) -> Any:
    """
    A C{JobKind.forward}: finish forward when the flow in flight is one of C{flows}, or its
    probe said C{happened}.
    """
    def forward(ctx: MutableMapping[str, Any], recorded: list, probe: bool | None) -> bool:
        kind_flows = ctx["kindFlows"]
        in_flight = kind_flows[len(recorded)] if len(recorded) < len(kind_flows) else None
        if in_flight in flows:
            return True
        return in_flight in ctx.get("probed", ()) and probe is happened

    return forward


class LifecycleMixin:
    """
    Create, start, stop, reboot, destroy, recover and expunge (see the module docstring).
    """

    @job_kinds
    def _lifecycle_kinds(self) -> list[JobKind]:
        insert = InsertVm(self)
        host = AllocateHost(self)
        volumes = AllocateVolumes(self)
        nics = AllocateNics(self, "allocate-nics", create=True)
        nic_ips = AllocateNics(self, "allocate-nic-ips", create=False)
        inst = InstantiateVolumes(self)
        start = StartOnHypervisor(self)
        running = FinalState(self, "vm-running", [S.Starting, S.Rebooting], S.Running, True)
        ret = ReturnHost(self)
        stopped = FinalState(self, "vm-stopped", [S.Starting, S.Stopping], S.Stopped, False)
        destroying = SettleFlow(self, "vm-destroying", states.OPERATIONS[Op.destroy],
                                S.Destroying)
        destroyed = FinalState(self, "vm-destroyed", [S.Destroying], S.Destroyed, False)
        release = ReleaseNics(self)
        delete = DeleteVolumes(self)
        remove = RemoveVm(self)
        expunging = StateFlow(self, "vm-expunging", [S.Destroyed, S.Error, S.Destroying],
                              S.Expunging)
        recovered = FinalState(self, "vm-recovered", [S.Destroyed], S.Stopped, False)

        def ctx_of(*probed: str) -> Any:
            def context(job: dict) -> dict:
                kind = self.kinds[job["apiName"]]
                return {"kindFlows": [f.name for f in kind.flows], "probed": probed}
            return context

        always = lambda ctx, recorded, probe: True  # noqa: E731
        started = _forward_when("vm-running")
        return [
            JobKind("CreateVm", [insert, host, volumes, nics, inst, start, running],
                    forward=started, context=ctx_of("start-on-hypervisor")),
            JobKind("CreateStoppedVm", [insert, host, volumes, nics, inst, ret, stopped],
                    forward=_forward_when("return-host", "vm-stopped"), context=ctx_of()),
            JobKind("CreateVmRecord", [insert], context=ctx_of()),
            JobKind("StartNewCreatedVm",
                    [StateFlow(self, "vm-starting", [S.Created], S.Starting), host, volumes,
                     nics, inst, start, running],
                    forward=started, context=ctx_of("start-on-hypervisor")),
            JobKind("StartVm",
                    [StateFlow(self, "vm-starting", [S.Stopped, S.Crashed], S.Starting),
                     host, nic_ips, start, running],
                    forward=started, context=ctx_of("start-on-hypervisor")),
            JobKind("StopVm",
                    [SettleFlow(self, "vm-stopping", states.OPERATIONS[Op.stop], S.Stopping),
                     StopOnHypervisor(self), ret, stopped],
                    forward=_forward_when("return-host", "vm-stopped"),
                    context=ctx_of("stop-on-hypervisor")),
            JobKind("RebootVm",
                    [SettleFlow(self, "vm-rebooting", states.OPERATIONS[Op.reboot],
                                S.Rebooting), RebootOnHypervisor(self), running],
                    forward=_forward_when("vm-running"), context=ctx_of("reboot-on-hypervisor")),
            JobKind("DestroyVm", [destroying, DestroyOnHypervisor(self), ret, release,
                                  destroyed], forward=always, context=ctx_of()),
            JobKind("DestroyAndExpungeVm", [destroying, DestroyOnHypervisor(self), ret,
                                            release, delete, remove],
                    forward=always, context=ctx_of()),
            JobKind("RecoverVm", [recovered], forward=always, context=ctx_of()),
            JobKind("ExpungeVm", [expunging, ret, release, delete, remove], forward=always,
                    context=ctx_of()),
        ]

    def start(self) -> Any:
        """
        Serve (L{zcontrol.services.vm.base.VmServiceBase.start}), then, with the deletion
        policy C{Delay}, expunge every C{vm.expunge_interval} seconds the VMs destroyed more
        than C{vm.expunge_period} seconds ago (ZStack's C{VmExpungeTask}).
        """
        d = super().start()  # type: ignore[misc]

        def loops(result: Any) -> Any:
            if self.config.deletion_policy == "Delay":
                self.every(self.config.expunge_interval, self.expunge_expired,
                           "expunging destroyed VMs")
            return result

        return d.addCallback(loops)

    async def expunge_expired(self, now: float | None = None) -> list[str]:
        """
        Expunge (one at a time, each in its chain) the VMs this node owns that were
        destroyed more than C{vm.expunge_period} seconds before C{now} (default: the
        clock's time, in seconds since the epoch as the store's dates); at most 1,000 a
        round.

        @return: the uuids expunged.
        """
        now = self.clock.seconds() if now is None else now
        cutoff = now - self.config.expunge_period
        page = await self.store.query("vmInstance", Query(
            conditions=[Condition("state", "=", S.Destroyed),
                        Condition("lastOpDate", "<", cutoff)],
            fields=["uuid"], sort="lastOpDate", limit=1000))
        done = []
        for row in page.inventories:
            if self.bus.owner_of(row["uuid"]) != self.bus.node_id:
                continue
            try:
                await self.expunge_vm(ExpungeVmInstanceMsg(uuid=row["uuid"]))
            except OperationError as e:
                log.warn("VM {vm}: expunge failed: {error}", vm=row["uuid"], error=str(e.error))
                continue
            done.append(row["uuid"])
        return done

    # --- handlers -------------------------------------------------------------------------

    @handles(CreateVmInstanceMsg)
    async def create_vm(self, msg: CreateVmInstanceMsg) -> VmInstanceReply:
        """
        See L{CreateVmInstanceMsg}. The VM's uuid is chosen first and the create runs on the
        VM's owner node (forwarded there when this node is not it).
        """
        vm = msg.uuid = (validate.uuid(msg.uuid, "uuid") if msg.uuid is not None
                         else validate_new_uuid())
        forwarded = self.forward_to_owner(msg, vm)
        if forwarded is not None:
            return await forwarded
        strategy = validate.one_of(msg.strategy, "strategy", CREATE_STRATEGIES)
        kind = {"InstantStart": "CreateVm", "CreateStopped": "CreateStoppedVm",
                "JustCreate": "CreateVmRecord"}[strategy]

        async def prepare() -> dict:
            if await self.store.get("vmInstance", vm) is not None:
                raise validate.invalid("uuid", vm, "is the uuid of an existing VM instance")
            return await self.create_plan(msg, vm)

        return await self.vm_job(kind, vm, prepare, VM.CREATE_ERROR)

    @handles(StartVmInstanceMsg)
    async def start_vm(self, msg: StartVmInstanceMsg) -> VmInstanceReply:
        vm = validate.uuid(msg.uuid, "uuid")

        async def prepare() -> Any:
            row = await self.check(vm, Op.start)
            if row["state"] == S.Running:
                return NO_JOB
            kind = "StartNewCreatedVm" if row["state"] == S.Created else "StartVm"
            return kind, await self.start_plan(msg, row)

        return await self.vm_job("StartVm", vm, prepare, VM.START_ERROR)

    @handles(StopVmInstanceMsg)
    async def stop_vm(self, msg: StopVmInstanceMsg) -> VmInstanceReply:
        vm = validate.uuid(msg.uuid, "uuid")
        kind = validate.one_of(msg.type, "type", STOP_TYPES)

        async def prepare() -> Any:
            row = await self.check(vm, Op.stop)
            if row["state"] == S.Stopped:
                return NO_JOB
            if row.get("hostUuid") is None:
                # Unknown with no host, or Crashed without one: nothing runs anywhere.
                raise OperationError.of(VM.STOP_ERROR, f"VM {vm} has no host to stop it on",
                                        uuid=vm, state=row["state"])
            body = self.state_body(msg, row)
            body["type"] = kind
            return body

        return await self.vm_job("StopVm", vm, prepare, VM.STOP_ERROR)

    @handles(RebootVmInstanceMsg)
    async def reboot_vm(self, msg: RebootVmInstanceMsg) -> VmInstanceReply:
        vm = validate.uuid(msg.uuid, "uuid")

        async def prepare() -> Any:
            return self.state_body(msg, await self.check(vm, Op.reboot))

        return await self.vm_job("RebootVm", vm, prepare, VM.REBOOT_ERROR)

    @handles(DestroyVmInstanceMsg)
    async def destroy_vm(self, msg: DestroyVmInstanceMsg) -> VmInstanceReply:
        vm = validate.uuid(msg.uuid, "uuid")
        validate.one_of(msg.delete_mode, "deleteMode", DELETE_MODES)
        direct = self.config.deletion_policy == "Direct"

        async def prepare() -> Any:
            row = await self.store.get("vmInstance", vm)
            if row is None or (row["state"] == S.Destroyed and not direct):
                return NO_JOB  # idempotent, as ZStack's successIfResourceNotExisting
            if row["state"] == S.Destroyed:
                return "ExpungeVm", self.state_body(msg, row)
            states.check_operation(row["state"], Op.destroy)
            return self.state_body(msg, row)

        kind = "DestroyAndExpungeVm" if direct else "DestroyVm"
        return await self.vm_job(kind, vm, prepare, VM.DESTROY_ERROR)

    @handles(RecoverVmInstanceMsg)
    async def recover_vm(self, msg: RecoverVmInstanceMsg) -> VmInstanceReply:
        vm = validate.uuid(msg.uuid, "uuid")

        async def prepare() -> Any:
            return self.state_body(msg, await self.check(vm, Op.recover))

        return await self.vm_job("RecoverVm", vm, prepare, VM.DESTROY_ERROR)

    @handles(ExpungeVmInstanceMsg)
    async def expunge_vm(self, msg: ExpungeVmInstanceMsg) -> VmInstanceReply:
        vm = validate.uuid(msg.uuid, "uuid")

        async def prepare() -> Any:
            row = await self.store.get("vmInstance", vm)
            if row is None:
                return NO_JOB
            states.check_operation(row["state"], Op.expunge)
            return self.state_body(msg, row)

        return await self.vm_job("ExpungeVm", vm, prepare, VM.DESTROY_ERROR)

    # --- plans ----------------------------------------------------------------------------

    def state_body(self, msg: Any, row: dict) -> dict:
        """
        The job's apiMessage for an operation on an existing VM: the message's fields and the
        plan every such kind reads (the VM's host and the state it leaves).
        """
        body = message_body(msg)
        body["plan"] = {"currentHostUuid": row.get("hostUuid"), "fromState": row["state"]}
        return body

    async def create_plan(self, msg: CreateVmInstanceMsg, vm: str) -> dict:
        """
        Check a create and plan it: every uuid the job will create (volumes, NICs, MACs) is
        chosen here and recorded in the job, so that a rollback or a recovery knows what to
        give back even when a flow never reported.
        """
        name = validate.name(msg.name, "name")
        description = validate.optional_text(msg.description, "description")
        l3s = validate.uuids(msg.l3_network_uuids, "l3NetworkUuids")
        default_l3 = l3s[0]
        if msg.default_l3_network_uuid is not None:
            default_l3 = validate.uuid(msg.default_l3_network_uuid, "defaultL3NetworkUuid")
            if default_l3 not in l3s:
                raise validate.invalid("defaultL3NetworkUuid", default_l3,
                                       "must be one of l3NetworkUuids")
        vm_type = validate.one_of(msg.type, "type", ("UserVm", "ApplianceVm"))
        offering = await self.must_get("instanceOffering", msg.instance_offering_uuid,
                                       OFFERING.INSTANCE_OFFERING_NOT_FOUND,
                                       field="instanceOfferingUuid")
        if offering.get("state") not in (None, "Enabled"):
            raise validate.invalid("instanceOfferingUuid", offering["uuid"],
                                   f"names a {offering['state']} instance offering")
        image = await self.must_get("image", msg.image_uuid, IMAGE.NOT_FOUND,
                                    field="imageUuid")
        if image["status"] != "Ready":
            raise OperationError.of(IMAGE.WRONG_STATUS, f"image {image['uuid']} is"
                                    f" {image['status']}, not Ready", uuid=image["uuid"],
                                    field="imageUuid")
        if image.get("state") == "Disabled":
            raise validate.invalid("imageUuid", image["uuid"], "names a Disabled image")
        if image["mediaType"] != "RootVolumeTemplate":
            raise validate.invalid("imageUuid", image["uuid"],
                                   f"names an image of media type {image['mediaType']};"
                                   " only RootVolumeTemplate images can be a root volume")
        for i, l3 in enumerate(l3s):
            row = await self.must_get("l3Network", l3, L3.NOT_FOUND,
                                      field=f"l3NetworkUuids[{i}]")
            if row.get("state") == "Disabled":
                raise OperationError.of(L3.STATE_ERROR, f"L3 network {l3} is Disabled",
                                        uuid=l3, field=f"l3NetworkUuids[{i}]")
        zone = cluster = host = None
        if msg.zone_uuid is not None:
            zone = (await self.must_get("zone", msg.zone_uuid, ZONE.NOT_FOUND,
                                        field="zoneUuid"))["uuid"]
        if msg.cluster_uuid is not None:
            from zcontrol.services.cluster.messages import CLUSTER

            cluster = (await self.must_get("cluster", msg.cluster_uuid, CLUSTER.NOT_FOUND,
                                           field="clusterUuid"))["uuid"]
        if msg.host_uuid is not None:
            host = (await self.must_get("host", msg.host_uuid, HOST.NOT_FOUND,
                                        field="hostUuid"))["uuid"]
        ps_root = None
        if msg.primary_storage_uuid_for_root_volume is not None:
            from zcontrol.services.primarystorage.messages import PS

            ps_root = (await self.must_get("primaryStorage",
                                           msg.primary_storage_uuid_for_root_volume,
                                           PS.NOT_FOUND,
                                           field="primaryStorageUuidForRootVolume"))["uuid"]
        account = None
        if msg.account_uuid is not None:
            account = (await self.must_get("account", msg.account_uuid, SYS.RESOURCE_NOT_FOUND,
                                           field="accountUuid"))["uuid"]
        static: dict[str, str] = {}
        hostname = None
        tags = _tags(msg.system_tags, "systemTags")
        user_tags = _tags(msg.user_tags, "userTags")
        for i, tag in enumerate(tags):
            if tag.startswith(STATIC_IP_TAG):
                parts = tag[len(STATIC_IP_TAG):].split("::")
                if len(parts) != 2 or parts[0] not in l3s:
                    raise validate.invalid(f"systemTags[{i}]", tag,
                                           "must be staticIp::<one of l3NetworkUuids>::<ip>")
                static[parts[0]] = validate.ipv4(parts[1], f"systemTags[{i}]")
            elif tag.startswith(HOSTNAME_TAG):
                hostname = tag[len(HOSTNAME_TAG):]
                if not hostname or len(hostname) > 63 or not all(
                        c.isalnum() or c == "-" for c in hostname):
                    raise validate.invalid(f"systemTags[{i}]", tag,
                                           "must be hostname::<a DNS label>")
        root_size = image["size"]
        volumes = [{"uuid": validate_new_uuid(), "type": "Root", "size": root_size,
                    "deviceId": 0}]
        if msg.root_disk_offering_uuid is not None:
            disk = await self.must_get("diskOffering", msg.root_disk_offering_uuid,
                                       OFFERING.DISK_OFFERING_NOT_FOUND,
                                       field="rootDiskOfferingUuid")
            volumes[0]["size"] = max(root_size, disk["diskSize"])
            volumes[0]["diskOfferingUuid"] = disk["uuid"]
        data_disks = msg.data_disk_offering_uuids
        if not isinstance(data_disks, list):
            raise validate.invalid("dataDiskOfferingUuids", data_disks,
                                   "must be a list of disk offering uuids")
        for i, d in enumerate(data_disks):
            disk = await self.must_get("diskOffering", d, OFFERING.DISK_OFFERING_NOT_FOUND,
                                       field=f"dataDiskOfferingUuids[{i}]")
            volumes.append({"uuid": validate_new_uuid(), "type": "Data",
                            "size": disk["diskSize"], "deviceId": i + 1,
                            "diskOfferingUuid": disk["uuid"]})
        for v in volumes:
            v["row"] = {
                "uuid": v["uuid"],
                "name": (f"ROOT-for-{name}" if v["type"] == "Root"
                         else f"DATA-for-{name}-{v['deviceId']}")[:255],
                "vmInstanceUuid": vm, "rootImageUuid": image["uuid"] if v["type"] == "Root"
                else None, "diskOfferingUuid": v.get("diskOfferingUuid"), "type": v["type"],
                "format": image.get("format") or "qcow2", "size": v["size"],
                "deviceId": v["deviceId"], "status": "NotInstantiated",
                "accountUuid": account}
        nics = [{"uuid": validate_new_uuid(), "l3NetworkUuid": l3, "mac": new_mac(),
                 "deviceId": i, "staticIp": static.get(l3),
                 "internalName": f"vnic{vm[:8]}.{i}"} for i, l3 in enumerate(l3s)]
        row = {
            "uuid": vm, "name": name, "description": description, "zoneUuid": zone,
            "clusterUuid": cluster, "imageUuid": image["uuid"],
            "instanceOfferingUuid": offering["uuid"], "rootVolumeUuid": volumes[0]["uuid"],
            "defaultL3NetworkUuid": default_l3, "type": vm_type, "hypervisorType": "KVM",
            "platform": image.get("platform"),
            "allocatorStrategy": offering.get("allocatorStrategy"),
            "cpuNum": offering["cpuNum"], "cpuSpeed": offering.get("cpuSpeed") or 0,
            "memorySize": offering["memorySize"], "state": S.Created,
            "accountUuid": account}
        body = message_body(msg)
        body["plan"] = {
            "row": row,
            "tags": [{"uuid": validate_new_uuid(), "tag": t, "type": kind}
                     for kind, group in (("System", tags), ("User", user_tags))
                     for t in group],
            "final": S.Created if msg.strategy == "JustCreate" else None,
            "cpuNum": offering["cpuNum"], "memorySize": offering["memorySize"],
            "cpuSpeed": offering.get("cpuSpeed") or 0,
            "allocatorStrategy": offering.get("allocatorStrategy"),
            "diskSize": sum(v["size"] for v in volumes), "l3NetworkUuids": l3s,
            "zoneUuid": zone, "clusterUuid": cluster, "hostUuid": host,
            "primaryStorageUuid": ps_root, "image": {"uuid": image["uuid"]},
            "volumes": volumes, "nics": nics, "hostname": hostname}
        return body

    async def start_plan(self, msg: StartVmInstanceMsg, row: dict) -> dict:
        """
        Plan a start: where it may go (the last host first; a VM whose root volume is on
        LocalStorage only on that volume's host) and which NICs need an address again.
        """
        vm = row["uuid"]
        host = cluster = None
        if msg.cluster_uuid is not None:
            from zcontrol.services.cluster.messages import CLUSTER

            cluster = (await self.must_get("cluster", msg.cluster_uuid, CLUSTER.NOT_FOUND,
                                           field="clusterUuid"))["uuid"]
        if msg.host_uuid is not None:
            host = (await self.must_get("host", msg.host_uuid, HOST.NOT_FOUND,
                                        field="hostUuid"))["uuid"]
        body = message_body(msg)
        nics = await self.nics_of(vm)
        l3s = [n["l3NetworkUuid"] for n in nics]
        if row["state"] == S.Created:
            plan = dict((await self.created_plan(row, nics))["plan"])
            plan.update({"hostUuid": host or plan.get("hostUuid"),
                         "clusterUuid": cluster or plan.get("clusterUuid"),
                         "fromState": S.Created})
            body["plan"] = plan
            return body
        static = await self.static_ips(vm)
        ps = pinned = None
        root = (await self.store.get("volume", row["rootVolumeUuid"])
                if row.get("rootVolumeUuid") else None)
        if root is not None and root.get("primaryStorageUuid"):
            ps = root["primaryStorageUuid"]
            pinned = await self.local_volume_host(ps, root["uuid"])
        if pinned is not None:
            if host is not None and host != pinned:
                raise validate.invalid("hostUuid", host, f"cannot be used: the VM's root"
                                       f" volume is on the local storage of host {pinned}")
            host = pinned
        body["plan"] = {
            "cpuNum": row["cpuNum"], "memorySize": row["memorySize"],
            "cpuSpeed": row.get("cpuSpeed") or 0,
            "allocatorStrategy": row.get("allocatorStrategy"), "l3NetworkUuids": l3s,
            "zoneUuid": row.get("zoneUuid"), "clusterUuid": cluster, "hostUuid": host,
            "lastHostUuid": row.get("lastHostUuid"), "primaryStorageUuid": ps,
            "fromState": row["state"],
            "nics": [{"uuid": n["uuid"], "l3NetworkUuid": n["l3NetworkUuid"],
                      "staticIp": static.get(n["l3NetworkUuid"])}
                     for n in nics if n.get("usedIpUuid") is None]}
        return body

    async def created_plan(self, row: dict, nics: list[dict]) -> dict:
        """
        The create plan of a C{Created} VM (strategy JustCreate), rebuilt from its rows and
        the create job that recorded it.
        """
        jobs = await self.store.query("job", Query(
            conditions=[Condition("resourceUuid", "=", row["uuid"]),
                        Condition("apiName", "=", "CreateVmRecord")],
            sort="-createDate", limit=1))
        if not jobs.inventories:
            raise OperationError.of(VM.START_ERROR, f"VM {row['uuid']} is Created but its"
                                    " create job is gone", uuid=row["uuid"])
        return jobs.inventories[0]["apiMessage"]

    # --- helpers the flows use ------------------------------------------------------------

    def vm_job(self, kind: str, vm: str, prepare: Any, fail_code: str) -> Deferred:
        """
        L{run_job} answering the VM's inventory as the job left it (a L{VmInstanceReply}).
        """
        return self.run_job(kind, vm, prepare, fail_code,
                            reply=lambda job: self.vm_reply(vm, job))

    async def vm_reply(self, vm: str, job: Any) -> VmInstanceReply:
        inventory = await inv.inventory(self.store, "vmInstance", vm)
        return VmInstanceReply(inventory=inventory,
                               job_uuid=None if job is NO_JOB else job["uuid"])

    async def set_state(self, vm: str, sources: Iterable[str], into: str,
                        changes: dict | None = None, missing_ok: bool = False) -> dict | None:
        """
        Compare-and-swap the VM from C{sources} into C{into} (with C{changes}) and publish
        the state change; C{VM.1010} naming the actual state when it is in none of them.
        """
        before = await self.store.get("vmInstance", vm)
        if before is None:
            if missing_ok:
                return None
            raise OperationError.of(VM.NOT_FOUND, f"no VM instance {vm}", uuid=vm)
        try:
            row = await self.store.change_vm_state(vm, list(sources), into, changes)
        except OperationError as e:
            if e.error.code == SYS.RESOURCE_NOT_FOUND and missing_ok:
                return None
            if e.error.code == SYS.CHANGE_RESOURCE_STATE_ERROR:
                actual = (e.error.opaque.get("actual") or {}).get("state")
                raise OperationError(error_code(
                    VM.NOT_IN_CORRECT_STATE, f"VM {vm} is {actual}, not one of"
                    f" {sorted(sources)}: cannot move it to {into}", e.error, uuid=vm,
                    state=actual)) from None
            raise
        from zcontrol.core.trace import current_trace_id
        from zcontrol.services.vm.messages import VmInstanceStateChangedEvent

        self.publish(VmInstanceStateChangedEvent(
            vm_uuid=vm, old_state=before["state"], new_state=into,
            host_uuid=row.get("hostUuid"), trace_id=current_trace_id()))
        return row

    async def return_host_capacity(self, vm: str) -> list[str]:
        """
        Give back every host reservation of the VM (by holder, so idempotent); the VM row's
        C{hostUuid} is left to the state flows.

        @return: the hosts given back.
        """
        held = await self.store.holder_reservations((VM_HOLDER, vm))
        hosts = [h for h, _cpu, _mem in held]
        for h in hosts:
            await self.send(ReturnHostCapacityMsg(service_id=ALLOCATOR, host_uuid=h,
                                                  vm_instance_uuid=vm))
        return hosts

    async def hold_host_capacity(self, vm: str, host: str, row: dict) -> None:
        """
        Make the VM hold its CPU and memory on C{host} again (idempotent: a holder holds
        once); a host without the room is logged (the VM runs there all the same).
        """
        try:
            await self.store.reserve_host_capacity(host, row["cpuNum"], row["memorySize"],
                                                   (VM_HOLDER, vm))
        except OperationError as e:
            log.warn("VM {vm} runs on host {host}, which has no room left for it: {error}",
                     vm=vm, host=host, error=str(e.error))

    async def release_nic_ip(self, nic: str, l3: str, delete: bool) -> None:
        """
        Give back the address NIC C{nic} holds on C{l3} (by holder) and clear it on the NIC
        row (or delete the row).
        """
        # The NIC row references the address: let go of it first (the address is given
        # back by holder, so a retry after a crash between the two still finds it).
        if await self.store.get("vmNic", nic) is not None:
            if delete:
                await self.store.delete("vmNic", nic)
            else:
                await self.store.update("vmNic", nic, {"usedIpUuid": None, "ip": None,
                                                       "netmask": None, "gateway": None})
        await self.send(ReturnIpMsg(service_id=L3_SERVICE_ID, l3_network_uuid=l3,
                                    holder_type=NIC_HOLDER, holder_uuid=nic))

    async def static_ips(self, vm: str) -> dict[str, str]:
        """
        The VM's C{staticIp::<l3>::<ip>} system tags, as L3 uuid -> address.
        """
        tags = await self.store.query("tag", Query(
            conditions=[Condition("resourceUuid", "=", vm), Condition("type", "=", "System")],
            limit=1000))
        out = {}
        for t in tags.inventories:
            if t["tag"].startswith(STATIC_IP_TAG):
                parts = t["tag"][len(STATIC_IP_TAG):].split("::")
                if len(parts) == 2:
                    out[parts[0]] = parts[1]
        return out

    async def nics_of(self, vm: str) -> list[dict]:
        page = await self.store.query("vmNic", Query(
            conditions=[Condition("vmInstanceUuid", "=", vm)], sort="deviceId", limit=1000))
        return page.inventories

    async def local_volume_host(self, ps: str, volume: str) -> str | None:
        """
        The host whose local disk holds the volume (LocalStorage; None otherwise).
        """
        row = await self.store.get("primaryStorage", ps)
        if row is None or row["type"] != "LocalStorage":
            return None
        for h in await self.store.primary_storage_holders(ps):
            if h["holderType"] == VOLUME_HOLDER and h["holderUuid"] == volume:
                return h.get("hostUuid")
        return None

    async def delete_volume(self, vol: dict) -> None:
        """
        Delete a volume's bits through the storage agent (giving back its capacity) when it
        has any, then its row.
        """
        ps = vol.get("primaryStorageUuid")
        if ps is not None and await self.store.get("primaryStorage", ps) is not None:
            if vol["status"] == "Ready" and vol.get("installPath"):
                host = await self.local_volume_host(ps, vol["uuid"])
                await self.send(DeleteVolumeBitsOnPrimaryStorageMsg(
                    service_id=PRIMARY, resource_uuid=ps, primary_storage_uuid=ps,
                    volume_uuid=vol["uuid"], install_path=vol["installPath"],
                    host_uuid=host, volume_type=vol["type"]))
            else:
                await self.send(ReturnPrimaryStorageCapacityMsg(
                    service_id=PRIMARY, resource_uuid=ps, primary_storage_uuid=ps,
                    holder_uuid=vol["uuid"], holder_type=VOLUME_HOLDER))
        if await self.store.get("volume", vol["uuid"]) is not None:
            await self.store.delete("volume", vol["uuid"])

    async def remove_vm_rows(self, vm: str) -> None:
        """
        Remove the VM's NIC, volume and tag rows and the VM row (what is left of them).
        """
        for nic in await self.nics_of(vm):
            await self.store.delete("vmNic", nic["uuid"])
        vols = await self.store.query("volume", Query(
            conditions=[Condition("vmInstanceUuid", "=", vm)], limit=1000))
        for vol in vols.inventories:
            if vol["status"] == "Ready":
                await self.store.update("volume", vol["uuid"], {"vmInstanceUuid": None})
            else:
                await self.store.delete("volume", vol["uuid"])
        tags = await self.store.query("tag", Query(
            conditions=[Condition("resourceUuid", "=", vm)], limit=1000))
        for tag in tags.inventories:
            await self.store.delete("tag", tag["uuid"])
        if await self.store.get("vmInstance", vm) is not None:
            await self.store.delete("vmInstance", vm)

    async def image_spec(self, image: dict, zone: str) -> dict:
        """
        The image spec the primary storage service instantiates from: a backup storage of
        the zone that holds the image Ready (C{SelectBackupStorageMsg}).
        """
        row = await self.must_get("image", image["uuid"], IMAGE.NOT_FOUND, field="imageUuid")
        select = await self.send(SelectBackupStorageMsg(
            service_id=IMAGE_SERVICE, resource_uuid=row["uuid"], image_uuid=row["uuid"],
            zone_uuid=zone))
        return {"uuid": row["uuid"], "size": row["size"], "actualSize": row["actualSize"],
                "format": row["format"], "mediaType": row["mediaType"],
                "backupStorageUuid": select.backup_storage_uuid,
                "installPath": select.install_path,
                "backupStorageHostname": select.hostname}

    async def runs_on(self, vm: str, host: str | None) -> bool | None:
        """
        Whether the VM runs on C{host} (C{/vm/checkstate}); None when the host cannot tell.
        """
        if host is None:
            return False
        try:
            rsp = await self.host_call(host, p.CheckVmStateCmd(vm_uuids=[vm]),
                                       timeout=self.config.probe_timeout)
        except OperationError as e:
            log.info("VM {vm}: host {host} cannot tell its state: {error}", vm=vm,
                     host=host, error=str(e.error))
            return None
        return rsp.states.get(vm) == p.VmState.RUNNING

    async def destroy_on_host(self, vm: str, host: str | None) -> bool:
        """
        C{/vm/destroy} on C{host} (idempotent). A host that is gone or not Connected is
        skipped (logged): its VM sync reports the VM later.

        @return: whether the agent was told.
        """
        if host is None:
            return False
        try:
            await self.host_call(host, p.DestroyVmCmd(uuid=vm))
        except OperationError as e:
            if _gone(e):
                log.warn("VM {vm}: not destroyed on host {host}, which cannot be reached"
                         " ({error}); its VM sync will report it", vm=vm, host=host,
                         error=str(e.error))
                return False
            raise
        return True

    def forward_to_owner(self, msg: Any, vm: str) -> Deferred | None:
        """
        Note [create on the owner]: a VM's operations run on its owner node (the ring), so
        a create whose uuid this node does not own is forwarded there.
        """
        import attrs as _attrs

        from zcontrol.bus.message import new_id

        if msg.resource_uuid == vm or self.bus.owner_of(vm) == self.bus.node_id:
            return None
        forwarded = _attrs.evolve(msg, id=new_id(), resource_uuid=vm, deadline=None,
                                  reply_to=None, timeout=self.config.create_timeout)
        return self.bus.send(forwarded, self.config.create_timeout)


def _tags(value: Any, field: str) -> list[str]:
    """
    A create's C{systemTags} or C{userTags}: a list of distinct non-blank strings of at most
    2,048 characters (the C{tags.tag} column), else C{SYS.1007} naming the field (and the
    index of the tag at fault).
    """
    if not isinstance(value, list):
        raise validate.invalid(field, value, "must be a list of tags")
    out: list[str] = []
    for i, tag in enumerate(value):
        validate.name(tag, f"{field}[{i}]", 2048)
        if tag in out:
            raise validate.invalid(field, value, f"names the tag {tag!r} twice")
        out.append(tag)
    return out


def validate_new_uuid() -> str:
    """
    A fresh uuid (32 hex digits).
    """
    import uuid as uuidlib

    return uuidlib.uuid4().hex


@inv.register_inventory("vmInstance", ("vmNics", "allVolumes"))
async def _expand_vms(store: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    ZStack's C{VmInstanceInventory}: the row plus C{vmNics} and C{allVolumes}.
    """
    uuids = [r["uuid"] for r in rows]
    nics: dict[str, list] = {u: [] for u in uuids}
    vols: dict[str, list] = {u: [] for u in uuids}
    for chunk in range(0, len(uuids), 500):
        part = uuids[chunk:chunk + 500]
        page = await store.query("vmNic", Query(
            conditions=[Condition("vmInstanceUuid", "?=", part)], sort="deviceId",
            limit=100_000))
        for n in page.inventories:
            nics[n["vmInstanceUuid"]].append(n)
        page = await store.query("volume", Query(
            conditions=[Condition("vmInstanceUuid", "?=", part)], sort="deviceId",
            limit=100_000))
        for v in page.inventories:
            vols[v["vmInstanceUuid"]].append(v)
    for r in rows:
        r["vmNics"] = nics.get(r["uuid"], [])
        r["allVolumes"] = vols.get(r["uuid"], [])
    return rows
