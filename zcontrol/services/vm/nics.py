# -*- test-case-name: tests.test_vm_nics -*-
"""
A VM's NICs and its instance offering: attach an L3 network (ZStack's
C{APIAttachL3NetworkToVmMsg}: a new NIC), detach a NIC (C{APIDetachL3NetworkFromVmMsg}) and
change the instance offering while Stopped (C{APIChangeInstanceOfferingMsg}).

Attach (journaled job C{AttachL3NetworkToVm}, in the VM's chain):
 1. C{create-nic}: a C{vmNic} row on the L3 with a fresh MAC (unique: the table's unique key
    arbitrates, a clash draws again) and the lowest free device id; its uuid is the plan's
    (the job's C{apiMessage}), so a rollback without a record finds it. Rollback: the row
    deleted.
 2. C{allocate-ip}: C{AllocateIpMsg} for the holder C{("VmNicVO", nic)} (C{static_ip} when
    given), written into the NIC (C{usedIpUuid}, C{ip}, C{netmask}, C{gateway}). Rollback:
    the NIC let go of the address, C{ReturnIpMsg} for the holder (idempotent).
 3. C{attach-on-hypervisor}: C{AttachNicCmd} to the VM's host when the VM is C{Running}
    (nothing when Stopped: its next start plugs every NIC). Rollback: C{DetachNicCmd}.
 4. C{set-default-l3}: a VM without a default L3 network gets this one (ZStack's
    C{SetDefaultL3Network} of C{VmInstanceBase.attachNic}). Rollback: back to none.

Refusals (before any job row): C{VM.1100}; C{VM.1010} unless C{Running} or C{Stopped};
C{L3.1000} naming C{l3NetworkUuid}; C{VM.1007} when the VM already has a NIC on that L3
(ZStack's C{VmInstanceApiInterceptor}), or when the VM runs on a host whose cluster is not
attached to the L3's L2 network; C{SYS.1007} for a malformed C{staticIp}. In the job: the L3
service's codes (C{L3.1003} Disabled, C{L3.1005} no free address, C{L3.1007} the static IP
taken), wrapped in C{VM.1007}.

Detach (journaled job C{DetachL3NetworkFromVm}): the NIC's VM is found from the NIC.
 1. C{detach-on-hypervisor}: C{DetachNicCmd} when the VM is C{Running} (the plan records the
    NIC's row, the VM's host and its default L3). Rollback: C{AttachNicCmd} again.
 2. C{change-default-l3}: when the NIC is on the VM's default L3 network, the default moves
    to the L3 of the VM's other NIC with the lowest device id, or to none when it was the
    last NIC (ZStack's C{VmInstanceBase.selectDefaultL3}; ZStack lets the last NIC go too).
    Rollback: the default restored.
 3. C{delete-nic}: the row deleted, then C{ReturnIpMsg}. Rollback: the address taken again
    for the holder (the same one: C{required_ip}) and the row put back.
Refusals: C{SYS.1003} naming C{vmNicUuid} for an unknown NIC; C{SYS.1007} when
C{vmInstanceUuid} is given and is not the NIC's VM; C{VM.1010} unless C{Running} or C{Stopped}.
Failures in the job: C{VM.1007} wrapping the job's error.

Change instance offering: C{Stopped} only (L{states.OPERATIONS}; ZStack also hot-plugs a
Running VM); C{cpuNum}, C{cpuSpeed}, C{memorySize}, C{allocatorStrategy} and
C{instanceOfferingUuid} are copied from the offering in one compare-and-swap on the state, so
the next start allocates and boots with them. Not a job: nothing is taken. Refusals:
C{VM.1010}, C{OFFERING.1000} naming C{instanceOfferingUuid}, C{SYS.1007} for a Disabled
offering.

Note [NIC failures on the hypervisor]: the rollback of an attach (or detach) whose agent
call never reported (C{took=None}) cannot know whether the agent acted; it sends the opposite
command and, when the agent refuses it (the NIC was never plugged), logs and goes on, so the
store is never left with a NIC the VM does not have.
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Any, Iterable, MutableMapping

from twisted.logger import Logger

from agent import protocol as p
from zcontrol.core.errors import SYS, OperationError
from zcontrol.core.journal import JobKind, JournaledFlow
from zcontrol.db.interfaces import DB
from zcontrol.services import inventory as inv
from zcontrol.services import validate
from zcontrol.services.base import handles
from zcontrol.services.network.messages import L3, L3_SERVICE_ID, AllocateIpMsg, ReturnIpMsg
from zcontrol.services.offering.messages import OFFERING
from zcontrol.services.vm import states
from zcontrol.services.vm.base import NIC_HOLDER, VmServiceBase, job_kinds, message_body
from zcontrol.services.vm.errors import VM
from zcontrol.services.vm.lifecycle import new_mac
from zcontrol.services.vm.messages import (
    AttachL3NetworkToVmMsg,
    ChangeInstanceOfferingMsg,
    DetachL3NetworkFromVmMsg,
    VmInstanceReply,
)
from zcontrol.services.vm.migrate import _all

__all__ = ["ATTACH_L3", "DETACH_L3", "VmNicsMixin"]

log = Logger()

ATTACH_L3 = "AttachL3NetworkToVm"
DETACH_L3 = "DetachL3NetworkFromVm"
#: How many MACs an attach draws before giving up on clashes (C{VM.1009}).
MAC_ATTEMPTS = 8
_S = states.VmInstanceState
_NIC_IP_FIELDS = ("usedIpUuid", "ip", "netmask", "gateway")
def nic_to(nic: dict[str, Any]) -> p.NicTO:
    """
    The agent's view of a NIC row.
    """
    return p.NicTO(mac=nic["mac"], ip=nic.get("ip"), netmask=nic.get("netmask"),
                   gateway=nic.get("gateway"), device_id=nic.get("deviceId") or 0,
                   l3_network_uuid=nic.get("l3NetworkUuid"))


class _NicFlow(JournaledFlow):
    """
    A flow of the NIC kinds: it holds the service.
    """

    def __init__(self, service: VmNicsMixin) -> None:
        self.svc = service

    @staticmethod
    def vm(ctx: MutableMapping[str, Any]) -> str:
        return ctx["resource"]

    @staticmethod
    def plan(ctx: MutableMapping[str, Any]) -> dict[str, Any]:
        return ctx["message"]["plan"]

    async def running_on(self, ctx: MutableMapping[str, Any]) -> str | None:
        """
        The VM's host when it is Running, else None.
        """
        vm = await self.svc.vm_row(self.vm(ctx))
        return vm["hostUuid"] if vm["state"] == _S.Running else None

    async def plug(self, host: str, vm_uuid: str, nic: dict[str, Any], attach: bool,
                   best_effort: bool) -> None:
        """
        C{AttachNicCmd} (or C{DetachNicCmd}) to C{host}; with C{best_effort} a refusal is
        logged, not raised (Note [NIC failures on the hypervisor]).
        """
        cmd = (p.AttachNicCmd if attach else p.DetachNicCmd)(vm_uuid=vm_uuid, nic=nic_to(nic))
        try:
            await self.svc.host_call(host, cmd)
        except OperationError as e:
            if not best_effort:
                raise
            log.warn("vm {vm}: {what} NIC {mac} on host {host} (rollback): {error}",
                     vm=vm_uuid, what="attaching" if attach else "detaching", mac=nic["mac"],
                     host=host, error=str(e.error))


# --- attach ----------------------------------------------------------------------------


class CreateNicFlow(_NicFlow):
    """
    The C{vmNic} row, with a fresh MAC and the lowest free device id, no address yet.
    """

    name = "create-nic"

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        vm_uuid, plan = self.vm(ctx), self.plan(ctx)
        nic_uuid = plan["nicUuid"]
        existing = await self.svc.store.get("vmNic", nic_uuid)
        if existing is not None:  # re-run at recovery: it was made before
            return {"nic": nic_uuid, "mac": existing["mac"]}
        last = None
        for _ in range(MAC_ATTEMPTS):
            mac = new_mac()
            try:
                await self.svc.store.insert("vmNic", {
                    "uuid": nic_uuid, "vmInstanceUuid": vm_uuid,
                    "l3NetworkUuid": plan["l3NetworkUuid"], "mac": mac,
                    "deviceId": plan["deviceId"], "internalName": plan["internalName"]})
            except OperationError as e:
                if e.error.code != DB.DUPLICATE:
                    raise
                last = e.error
                continue
            return {"nic": nic_uuid, "mac": mac}
        raise OperationError.of(VM.ALLOCATE_MAC_ERROR,
                                f"no free MAC address for a NIC of VM {vm_uuid} after"
                                f" {MAC_ATTEMPTS} draws", last, uuid=vm_uuid)

    async def rollback(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        await self.svc.store.delete("vmNic", self.plan(ctx)["nicUuid"])


class AllocateNicIpFlow(_NicFlow):
    """
    The NIC's address (C{AllocateIpMsg}, holder C{("VmNicVO", nic)}).
    """

    name = "allocate-ip"

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        nic_uuid = self.plan(ctx)["nicUuid"]
        msg = self.plan(ctx)
        ip = await self.svc.take_ip(msg["l3NetworkUuid"], nic_uuid, msg.get("staticIp"))
        await self.svc.store.update("vmNic", nic_uuid, {
            "usedIpUuid": ip["uuid"], "ip": ip["ip"], "netmask": ip["netmask"],
            "gateway": ip["gateway"]})
        return {"l3": msg["l3NetworkUuid"], "ip": ip["ip"], "usedIpUuid": ip["uuid"]}

    async def rollback(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        nic_uuid = self.plan(ctx)["nicUuid"]
        if await self.svc.store.get("vmNic", nic_uuid) is not None:
            await self.svc.store.update("vmNic", nic_uuid, dict.fromkeys(_NIC_IP_FIELDS))
        await self.svc.give_ip(self.plan(ctx)["l3NetworkUuid"], nic_uuid)


class AttachOnHypervisorFlow(_NicFlow):
    """
    Hot-plug the NIC when the VM runs.
    """

    name = "attach-on-hypervisor"

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        host = await self.running_on(ctx)
        if host is not None:
            nic = await self.svc.store.get("vmNic", self.plan(ctx)["nicUuid"])
            await self.plug(host, self.vm(ctx), nic, attach=True, best_effort=False)
        return {"host": host}

    async def rollback(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        host = took["host"] if took is not None else await self.running_on(ctx)
        nic = await self.svc.store.get("vmNic", self.plan(ctx)["nicUuid"])
        if host is None or nic is None:
            return
        await self.plug(host, self.vm(ctx), nic, attach=False, best_effort=took is None)


class SetDefaultL3Flow(_NicFlow):
    """
    A VM without a default L3 network gets the attached one.
    """

    name = "set-default-l3"

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        l3 = self.plan(ctx)["l3NetworkUuid"]
        vm = await self.svc.vm_row(self.vm(ctx))
        if vm.get("defaultL3NetworkUuid") is not None:
            return {"set": False}
        await self.svc.store.update("vmInstance", self.vm(ctx), {"defaultL3NetworkUuid": l3},
                                    expected={"defaultL3NetworkUuid": None})
        return {"set": True}

    async def rollback(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        if took is not None and not took["set"]:
            return
        # Without a record: the VM had no NIC on this L3 before (refused otherwise), so a
        # default on it can only be this job's.
        l3 = self.plan(ctx)["l3NetworkUuid"]
        vm = await self.svc.vm_row(self.vm(ctx))
        if vm.get("defaultL3NetworkUuid") == l3:
            await self.svc.store.update("vmInstance", self.vm(ctx),
                                        {"defaultL3NetworkUuid": None},
                                        expected={"defaultL3NetworkUuid": l3})


# --- detach ----------------------------------------------------------------------------


class DetachOnHypervisorFlow(_NicFlow):
    """
    Unplug the NIC when the VM runs (the plan names the NIC and the VM's host).
    """

    name = "detach-on-hypervisor"

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        plan = self.plan(ctx)
        host = plan["hostUuid"]
        if host is not None:
            await self.plug(host, self.vm(ctx), plan["nic"], attach=False, best_effort=False)
        return {"host": host}

    async def rollback(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        plan = self.plan(ctx)
        if plan["hostUuid"] is None:
            return
        await self.plug(plan["hostUuid"], self.vm(ctx), plan["nic"], attach=True,
                        best_effort=took is None)


class ChangeDefaultL3Flow(_NicFlow):
    """
    ZStack's C{selectDefaultL3}: the default L3 leaves the detached NIC's network.
    """

    name = "change-default-l3"

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        nic = self.plan(ctx)["nic"]
        vm = await self.svc.vm_row(self.vm(ctx))
        old = vm.get("defaultL3NetworkUuid")
        if old != nic["l3NetworkUuid"]:
            return {"changed": False}
        others = sorted((n for n in await _all(self.svc.store, "vmNic",
                                                f"vmInstanceUuid={self.vm(ctx)}")
                         if n["uuid"] != nic["uuid"]), key=lambda n: n["deviceId"])
        new = others[0]["l3NetworkUuid"] if others else None
        await self.svc.store.update("vmInstance", self.vm(ctx), {"defaultL3NetworkUuid": new},
                                    expected={"defaultL3NetworkUuid": old})
        return {"changed": True, "from": old, "to": new}

    async def rollback(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        if took is not None and not took["changed"]:
            return
        old = self.plan(ctx)["defaultL3NetworkUuid"]
        await self.svc.store.update("vmInstance", self.vm(ctx), {"defaultL3NetworkUuid": old})


class DeleteNicFlow(_NicFlow):
    """
    The NIC's row deleted and its address given back.
    """

    name = "delete-nic"

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        nic = self.plan(ctx)["nic"]
        await self.svc.store.delete("vmNic", nic["uuid"])
        await self.svc.give_ip(nic["l3NetworkUuid"], nic["uuid"])
        return {"nic": nic["uuid"], "ip": nic.get("ip")}

    async def rollback(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        nic = self.plan(ctx)["nic"]
        ip = None
        if nic.get("ip") is not None:
            ip = await self.svc.take_ip(nic["l3NetworkUuid"], nic["uuid"], nic["ip"])
        if await self.svc.store.get("vmNic", nic["uuid"]) is None:
            row = {k: v for k, v in nic.items() if k not in ("createDate", "lastOpDate")}
            if ip is not None:
                row.update(usedIpUuid=ip["uuid"], ip=ip["ip"], netmask=ip["netmask"],
                           gateway=ip["gateway"])
            await self.svc.store.insert("vmNic", row)


class VmNicsMixin(VmServiceBase):
    """
    The VM service's NIC operations and instance offering change (see the module
    docstring).
    """

    @job_kinds
    def _nic_kinds(self) -> Iterable[JobKind]:
        yield JobKind(ATTACH_L3, (CreateNicFlow(self), AllocateNicIpFlow(self),
                                  AttachOnHypervisorFlow(self), SetDefaultL3Flow(self)))
        yield JobKind(DETACH_L3, (DetachOnHypervisorFlow(self), ChangeDefaultL3Flow(self),
                                  DeleteNicFlow(self)))

    # --- handlers -----------------------------------------------------------------------

    @handles(AttachL3NetworkToVmMsg)
    async def attach_l3_network(self, msg: AttachL3NetworkToVmMsg) -> VmInstanceReply:
        """
        Add a NIC on C{l3_network_uuid} (see the module docstring).

        @return: a L{VmInstanceReply} (the inventory lists the new NIC with its address) and
            the job uuid; fails with C{VM.1007} wrapping the job's error after the rollback.
        """
        vm_uuid = validate.uuid(msg.vm_instance_uuid, "vmInstanceUuid")
        l3_uuid = validate.uuid(msg.l3_network_uuid, "l3NetworkUuid")
        if msg.static_ip is not None:
            validate.ipv4(msg.static_ip, "staticIp")

        async def prepare() -> dict:
            vm = await self.check(vm_uuid, states.Operation.attachNic, "vmInstanceUuid")
            l3 = await self.must_get("l3Network", l3_uuid, L3.NOT_FOUND, field="l3NetworkUuid")
            nics = await _all(self.store, "vmNic", f"vmInstanceUuid={vm_uuid}")
            if any(n["l3NetworkUuid"] == l3_uuid for n in nics):
                raise OperationError.of(
                    VM.ATTACH_NETWORK_ERROR, f"VM {vm_uuid} already has a NIC on L3 network"
                    f" {l3_uuid}", uuid=vm_uuid, field="l3NetworkUuid")
            if vm["state"] == _S.Running and vm.get("hostUuid"):
                host = await self.store.get("host", vm["hostUuid"])
                refs = await _all(self.store, "l2NetworkClusterRef",
                                  f"clusterUuid={host['clusterUuid']}")
                if l3["l2NetworkUuid"] not in {r["l2NetworkUuid"] for r in refs}:
                    raise OperationError.of(
                        VM.ATTACH_NETWORK_ERROR,
                        f"VM {vm_uuid} runs on host {host['uuid']} in cluster"
                        f" {host['clusterUuid']}, which is not attached to L2 network"
                        f" {l3['l2NetworkUuid']} of L3 network {l3_uuid}",
                        uuid=vm_uuid, field="l3NetworkUuid")
            used = {n["deviceId"] for n in nics}
            device = next(i for i in range(len(used) + 1) if i not in used)
            body = message_body(msg)
            body["plan"] = {"nicUuid": uuidlib.uuid4().hex, "deviceId": device,
                            "internalName": f"vnic{device}", "l3NetworkUuid": l3_uuid,
                            "staticIp": msg.static_ip}
            return body

        return await self._nic_job(ATTACH_L3, vm_uuid, prepare)

    @handles(DetachL3NetworkFromVmMsg)
    async def detach_l3_network(self, msg: DetachL3NetworkFromVmMsg) -> VmInstanceReply:
        """
        Remove the NIC C{vm_nic_uuid} (see the module docstring).

        @return: a L{VmInstanceReply} (the VM's inventory without the NIC) and the job
            uuid; fails with C{VM.1007} wrapping the job's error after the rollback.
        """
        nic_uuid = validate.uuid(msg.vm_nic_uuid, "vmNicUuid")
        nic = await self.nic_row(nic_uuid)
        vm_uuid = nic["vmInstanceUuid"]
        if msg.vm_instance_uuid is not None and msg.vm_instance_uuid != vm_uuid:
            raise validate.invalid("vmInstanceUuid", msg.vm_instance_uuid,
                                   f"is not the VM of NIC {nic_uuid} ({vm_uuid})")

        async def prepare() -> dict:
            # Read again in the VM's chain: an earlier operation may have removed it.
            nic = await self.nic_row(nic_uuid)
            vm = await self.check(vm_uuid, states.Operation.detachNic)
            body = message_body(msg)
            body["plan"] = {
                "nic": {k: v for k, v in nic.items() if k not in ("createDate", "lastOpDate")},
                "hostUuid": vm["hostUuid"] if vm["state"] == _S.Running else None,
                "defaultL3NetworkUuid": vm.get("defaultL3NetworkUuid")}
            return body

        # The message routes by the NIC's VM only when the sender knew it; the job runs in
        # the VM's chain here either way (the job's resourceUuid is the VM).
        return await self._nic_job(DETACH_L3, vm_uuid, prepare)

    @handles(ChangeInstanceOfferingMsg)
    async def change_instance_offering(self, msg: ChangeInstanceOfferingMsg
                                       ) -> VmInstanceReply:
        """
        Give a Stopped VM the instance offering's CPUs, CPU speed, memory and allocator
        strategy (see the module docstring).

        @return: a L{VmInstanceReply} with the updated inventory.
        """
        vm_uuid = validate.uuid(msg.vm_instance_uuid, "vmInstanceUuid")
        offering_uuid = validate.uuid(msg.instance_offering_uuid, "instanceOfferingUuid")

        async def change() -> None:
            await self.check(vm_uuid, states.Operation.changeInstanceOffering,
                             "vmInstanceUuid")
            offering = await self.must_get("instanceOffering", offering_uuid,
                                           OFFERING.INSTANCE_OFFERING_NOT_FOUND,
                                           field="instanceOfferingUuid")
            if offering.get("state", "Enabled") != "Enabled":
                raise validate.invalid("instanceOfferingUuid", offering_uuid,
                                       f"is {offering['state']}")
            try:
                await self.store.update("vmInstance", vm_uuid, {
                    "instanceOfferingUuid": offering_uuid, "cpuNum": offering["cpuNum"],
                    "cpuSpeed": offering.get("cpuSpeed") or 0,
                    "memorySize": offering["memorySize"],
                    "allocatorStrategy": offering.get("allocatorStrategy")},
                    expected={"state": _S.Stopped})
            except OperationError as e:
                if e.error.code != SYS.CHANGE_RESOURCE_STATE_ERROR:
                    raise
                row = await self.vm_row(vm_uuid)
                states.check_operation(row["state"], states.Operation.changeInstanceOffering)
                raise

        await self.in_vm_chain(vm_uuid, lambda: _deferred(change()))
        return VmInstanceReply(inventory=await inv.inventory(self.store, "vmInstance",
                                                             vm_uuid))

    # --- helpers ------------------------------------------------------------------------

    async def _nic_job(self, kind: str, vm_uuid: str, prepare: Any) -> VmInstanceReply:
        return await self.run_job(kind, vm_uuid, prepare, VM.ATTACH_NETWORK_ERROR,
                                  reply=lambda job: self.vm_reply(vm_uuid, job))

    async def nic_row(self, nic_uuid: str) -> dict[str, Any]:
        """
        The NIC's row, or C{SYS.1003} naming C{vmNicUuid}.
        """
        return await self.must_get("vmNic", nic_uuid, SYS.RESOURCE_NOT_FOUND, field="vmNicUuid")

    async def take_ip(self, l3_uuid: str, nic_uuid: str, ip: str | None) -> dict[str, Any]:
        """
        C{AllocateIpMsg} for the holder C{("VmNicVO", nic_uuid)}: the usedIp row.
        """
        reply = await self.send(AllocateIpMsg(
            service_id=L3_SERVICE_ID, resource_uuid=l3_uuid, l3_network_uuid=l3_uuid,
            holder_type=NIC_HOLDER, holder_uuid=nic_uuid, required_ip=ip))
        return reply.inventory

    async def give_ip(self, l3_uuid: str, nic_uuid: str) -> None:
        """
        C{ReturnIpMsg} for the holder C{("VmNicVO", nic_uuid)} (idempotent).
        """
        await self.send(ReturnIpMsg(service_id=L3_SERVICE_ID, resource_uuid=l3_uuid,
                                    l3_network_uuid=l3_uuid, holder_type=NIC_HOLDER,
                                    holder_uuid=nic_uuid))


def _deferred(coro: Any) -> Any:
    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(coro)
