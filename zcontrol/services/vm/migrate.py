# -*- test-case-name: tests.test_vm_migrate -*-
"""
Live migration (ZStack's C{APIMigrateVmMsg}, C{VmInstanceBase.migrateVm}: its flows
C{VmMigrationCheckL2NetworkOnHostFlow} -> C{VmAllocateHostForMigrateVmFlow} ->
C{VmMigrateOnHypervisorFlow} -> C{VmReturnHostFlow}) as the journaled job C{MigrateVm}.

Refusals, before any job row exists (in the VM's chain, on the state the previous operation
left): C{VM.1100} unknown VM; C{VM.1010} naming the state unless the VM is C{Running}
(ZStack also lets L{states.Operation.migrate} start from C{Unknown} and C{Paused}; the
simulated hypervisor migrates running guests only); C{VM.1008} when a volume of the VM (root
or data) is on C{LocalStorage} (no shared storage: ZStack migrates those with their disks,
which is not live migration), or when the destination given is the source, is not
C{Connected} and C{Enabled}, or is in a cluster not attached to every primary storage of
the VM's volumes and to the L2 network of every NIC's L3; C{HOST.1003} naming C{hostUuid}
for an unknown destination; C{SYS.1007} naming a malformed field.

The flows (holder C{("VmInstanceVO", vm)}; C{host_capacity_holders}' primary key is (host,
holder type, holder uuid), so the VM holds capacity on both hosts while it moves, and the
capacity moves only on success):

 1. C{vm-migrating}: C{Running} -> C{Migrating} (a compare-and-swap); took C{{"state":
    "Running", "host": source}}. Rollback: C{Migrating} -> C{Running}, C{hostUuid} the source.
 2. C{allocate-destination}: C{AllocateHostMsg} (the VM's CPUs and memory, the L3 networks
    of its NICs: ZStack's C{CheckL2}, its root volume's primary storage, its zone; the host
    asked for or any, avoiding the source); took C{{"host": destination, "cpu", "memory"}}.
    Rollback: C{ReturnHostCapacityMsg} for the destination only; with no record (Note
    [in-flight rollback] of L{zcontrol.core.journal}), every reservation of the holder on a
    host that is not the source.
 3. C{migrate-on-hypervisor}: C{MigrateVmCmd} to the source's agent naming the destination's
    agent base URL. When the agent reports a failure, the destination is asked
    (C{/vm/checkstate}): a VM Running there has moved (ZStack's
    C{checkVmStateOnDestinationHost}), anything else fails the flow with the agent's error.
    Took C{{"source", "destination"}}. Probe at recovery: Running on the destination ->
    happened; Running on the source (and not on the destination) -> did not; else cannot
    tell. See Note [migration rollback] for its rollback.
 4. C{return-source}: C{ReturnHostCapacityMsg} for the source and, in one compare-and-swap
    on C{Migrating}, C{hostUuid} = destination, C{lastHostUuid} = source, C{clusterUuid} the
    destination's; took C{{"host": source, "cpu", "memory"}}. Rollback: the source's
    capacity reserved again for the holder (idempotent) and the three columns as the plan
    found them.
 5. C{vm-migrated}: C{Migrating} -> C{Running}. Rollback: back to C{Migrating} (the
    earlier rollbacks then move it).

The job's C{apiMessage} carries the C{plan} the checks made (the source, the VM's CPUs and
memory, its storages and networks, the destination asked for), so that every flow, and a
recovery, works from what the VM was when the migration began.

Recovery (L{JobKind.forward}): once C{migrate-on-hypervisor} is recorded, or when it was in
flight and its probe says the VM runs on the destination, the job is finished forward
(the VM has moved: giving back the source and marking it Running there is the only state
that matches the hypervisors); otherwise it is rolled back.

Note [migration rollback]
=========================
Rolling back C{migrate-on-hypervisor} must leave the VM running on the source, because the
rollbacks after it give the destination's capacity back and mark the VM Running on the
source. So it asks the destination (C{/vm/checkstate}): a VM not running there never left
the source (the agent's C{/vm/migrate} moves the guest or leaves it), and nothing is done.
A VM running there is migrated back (C{MigrateVmCmd} to the destination's agent naming the
source's). When that fails, or when neither host can be asked, the VM is I{stranded}: the
rollback fails and, through the context (C{ctx["stranded"]}), makes the rollbacks of
C{allocate-destination} and C{vm-migrating} fail too instead of releasing what the VM
still uses. The job then stays C{Running}, rolling back, and the VM C{Migrating} with its
capacity held on both hosts, until a recovery (the node's periodic retry of its interrupted
jobs, L{VmServiceBase.retry_interrupted}, or its next start) moves it back and finishes the
rollbacks: an intermediate state that says the truth, never a C{Running}
VM recorded on a host it is not on. (ZStack's C{VmMigrateOnHypervisorFlow} has no rollback
at all: a VM that moved before a later flow failed is recorded on its source.)
"""

from __future__ import annotations

from typing import Any, Iterable, MutableMapping

from twisted.logger import Logger

from agent import protocol as p
from zcontrol.core.errors import OperationError, from_failure
from zcontrol.core.journal import JobKind, JournaledFlow
from zcontrol.db.query import Query
from zcontrol.scheduler.messages import SERVICE_ID as ALLOCATOR_SERVICE
from zcontrol.scheduler.messages import AllocateHostMsg, ReturnHostCapacityMsg
from zcontrol.services import validate
from zcontrol.services.agenturls import HOST_AGENT_PORT
from zcontrol.services.base import handles
from zcontrol.services.host.messages import HOST
from zcontrol.services.host.service import agent_base_url
from zcontrol.services.vm import states
from zcontrol.services.vm.base import VM_HOLDER, VmServiceBase, job_kinds, message_body
from zcontrol.services.vm.errors import VM
from zcontrol.services.vm.messages import MigrateVmMsg, VmInstanceReply

__all__ = ["MIGRATE_VM", "MigrateVmMixin"]

log = Logger()

#: The job kind's name (the job row's C{apiName}).
MIGRATE_VM = "MigrateVm"
LOCAL_STORAGE = "LocalStorage"
_S = states.VmInstanceState
_E = states.Event


async def _all(store: Any, resource: str, *conditions: str) -> list[dict[str, Any]]:
    """
    Every row of C{resource} matching C{conditions} (a VM has few NICs and volumes).
    """
    page = await store.query(resource, Query(conditions=list(conditions), sort="createDate",
                                             limit=1000))
    return list(page.inventories)


class _MigrateFlow(JournaledFlow):
    """
    A flow of the C{MigrateVm} kind: it holds the service.
    """

    def __init__(self, service: MigrateVmMixin) -> None:
        self.svc = service

    @staticmethod
    def vm(ctx: MutableMapping[str, Any]) -> str:
        return ctx["resource"]

    @staticmethod
    def plan(ctx: MutableMapping[str, Any]) -> dict[str, Any]:
        return ctx["message"]["plan"]

    @classmethod
    def source(cls, ctx: MutableMapping[str, Any]) -> str:
        return cls.plan(ctx)["sourceHostUuid"]

    @staticmethod
    def destination(ctx: MutableMapping[str, Any]) -> str | None:
        took = ctx["took"].get("allocate-destination")
        return None if took is None else took["host"]

    @staticmethod
    def stranded(ctx: MutableMapping[str, Any], flow: str) -> None:
        if ctx.get("stranded"):
            raise OperationError.of(
                VM.MIGRATE_ERROR,
                f"VM {ctx['resource']} may still run on the destination: the rollback of"
                f" flow {flow!r} keeps what it holds until a recovery moves it back",
                uuid=ctx["resource"], flow=flow)


class VmMigratingFlow(_MigrateFlow):
    """
    C{Running} -> C{Migrating}, remembering the source host.
    """

    name = "vm-migrating"

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        row = await self.svc.change_state(self.vm(ctx), _E.migrating, expected=[_S.Running])
        return {"state": _S.Running, "host": row["hostUuid"]}

    async def rollback(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        self.stranded(ctx, self.name)
        row = await self.svc.store.get("vmInstance", self.vm(ctx))
        if row is None or row["state"] != _S.Migrating:
            return  # the swap never happened (took None), or was undone already
        await self.svc.change_state(self.vm(ctx), _E.running,
                                    {"hostUuid": self.source(ctx)}, expected=[_S.Migrating])


class AllocateDestinationFlow(_MigrateFlow):
    """
    Reserve the VM's CPUs and memory on the destination (the allocator's
    C{AllocateHostMsg}), held by the VM.
    """

    name = "allocate-destination"

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        vm_uuid, source, plan = self.vm(ctx), self.source(ctx), self.plan(ctx)
        reply = await self.svc.send(AllocateHostMsg(
            service_id=ALLOCATOR_SERVICE, vm_instance_uuid=vm_uuid, cpu_num=plan["cpuNum"],
            memory_size=plan["memorySize"], l3_network_uuids=plan["l3NetworkUuids"],
            zone_uuid=plan["zoneUuid"], host_uuid=plan["hostUuid"],
            avoid_host_uuids=[source], primary_storage_uuid=plan["rootPrimaryStorageUuid"],
            allocator_strategy=plan["allocatorStrategy"]))
        host = reply.inventory
        took = {"host": host["uuid"], "cpu": plan["cpuNum"], "memory": plan["memorySize"]}
        # A failing check below rolls this flow back with took=None, which releases by
        # holder anyway.
        missing = await self.svc.unattached(host, plan)
        if missing:
            raise OperationError.of(
                VM.MIGRATE_ERROR, f"host {host['uuid']} chosen for VM {vm_uuid} is in cluster"
                f" {host['clusterUuid']}, not attached to {', '.join(missing)}",
                hostUuid=host["uuid"], missing=missing)
        return took

    async def rollback(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        self.stranded(ctx, self.name)
        vm_uuid, source = self.vm(ctx), self.source(ctx)
        if took is not None:
            hosts = [took["host"]]
        else:
            held = await self.svc.store.holder_reservations((VM_HOLDER, vm_uuid))
            hosts = [h for h, _, _ in held if h != source]
        for host in hosts:
            await self.svc.send(ReturnHostCapacityMsg(
                service_id=ALLOCATOR_SERVICE, host_uuid=host, vm_instance_uuid=vm_uuid))


class MigrateOnHypervisorFlow(_MigrateFlow):
    """
    Move the guest: C{MigrateVmCmd} to the source's agent (see the module docstring and
    Note [migration rollback]).
    """

    name = "migrate-on-hypervisor"

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        vm_uuid, source, dest = self.vm(ctx), self.source(ctx), self.destination(ctx)
        assert dest is not None
        if (ctx.get("recovering")
                and await self.svc.vm_state_on(dest, vm_uuid) == p.VmState.RUNNING):
            return {"source": source, "destination": dest}
        url = await self.svc.agent_url(dest)
        try:
            await self.svc.host_call(source, p.MigrateVmCmd(vm_uuid=vm_uuid,
                                                            dest_host_address=url))
        except OperationError as e:
            state = await self.svc.vm_state_on(dest, vm_uuid)
            if state != p.VmState.RUNNING:
                raise
            log.warn("vm {vm}: the migration to host {dest} reported {error}, but the VM runs"
                     " there: it moved", vm=vm_uuid, dest=dest, error=str(e.error))
        return {"source": source, "destination": dest}

    async def probe(self, ctx: MutableMapping[str, Any]) -> bool | None:
        vm_uuid, source, dest = self.vm(ctx), self.source(ctx), self.destination(ctx)
        if dest is not None and await self.svc.vm_state_on(dest, vm_uuid) == p.VmState.RUNNING:
            return True
        if await self.svc.vm_state_on(source, vm_uuid) == p.VmState.RUNNING:
            return False
        return None

    async def rollback(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        vm_uuid, source, dest = self.vm(ctx), self.source(ctx), self.destination(ctx)
        if dest is None:
            return
        there = await self.svc.vm_state_on(dest, vm_uuid)
        if there is None:
            # The destination cannot say; the source can tell that the VM never left.
            if await self.svc.vm_state_on(source, vm_uuid) == p.VmState.RUNNING:
                return
            ctx["stranded"] = True
            raise OperationError.of(
                VM.MIGRATE_ERROR, f"cannot tell where VM {vm_uuid} runs: neither its source"
                f" {source} nor its destination {dest} answered", uuid=vm_uuid)
        if there != p.VmState.RUNNING:
            return
        url = await self.svc.agent_url(source)
        try:
            await self.svc.host_call(dest, p.MigrateVmCmd(vm_uuid=vm_uuid,
                                                          dest_host_address=url))
        except OperationError as e:
            if await self.svc.vm_state_on(source, vm_uuid) == p.VmState.RUNNING:
                return
            ctx["stranded"] = True
            raise OperationError.of(
                VM.MIGRATE_ERROR, f"VM {vm_uuid} runs on the destination {dest} and could not"
                f" be migrated back to {source}", e.error, uuid=vm_uuid) from None
        log.info("vm {vm}: migrated back from {dest} to {source} (rollback)", vm=vm_uuid,
                 dest=dest, source=source)


class ReturnSourceFlow(_MigrateFlow):
    """
    Give back the source's capacity; the VM's C{hostUuid} becomes the destination.
    """

    name = "return-source"

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        vm_uuid, source, dest = self.vm(ctx), self.source(ctx), self.destination(ctx)
        plan = self.plan(ctx)
        host = await self.svc.must_get("host", dest, HOST.NOT_FOUND, field="hostUuid")
        await self.svc.send(ReturnHostCapacityMsg(
            service_id=ALLOCATOR_SERVICE, host_uuid=source, vm_instance_uuid=vm_uuid))
        await self.svc.store.update("vmInstance", vm_uuid, {
            "hostUuid": dest, "lastHostUuid": source, "clusterUuid": host["clusterUuid"]},
            expected={"state": _S.Migrating})
        return {"host": source, "cpu": plan["cpuNum"], "memory": plan["memorySize"]}

    async def rollback(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        vm_uuid, source, plan = self.vm(ctx), self.source(ctx), self.plan(ctx)
        await self.svc.store.reserve_host_capacity(source, plan["cpuNum"], plan["memorySize"],
                                                   (VM_HOLDER, vm_uuid))
        await self.svc.store.update("vmInstance", vm_uuid, {
            "hostUuid": source, "lastHostUuid": plan["lastHostUuid"],
            "clusterUuid": plan["clusterUuid"]}, expected={"state": _S.Migrating})


class VmMigratedFlow(_MigrateFlow):
    """
    C{Migrating} -> C{Running} (on the destination).
    """

    name = "vm-migrated"

    async def run(self, ctx: MutableMapping[str, Any]) -> dict:
        if ctx.get("recovering"):
            row = await self.svc.vm_row(self.vm(ctx))
            if row["state"] == _S.Running and row["hostUuid"] == self.destination(ctx):
                return {"state": row["state"], "host": row["hostUuid"]}  # done before
        row = await self.svc.change_state(self.vm(ctx), _E.migrated, expected=[_S.Migrating])
        return {"state": row["state"], "host": row["hostUuid"]}

    async def rollback(self, ctx: MutableMapping[str, Any], took: dict | None) -> None:
        if took is not None:
            await self.svc.change_state(self.vm(ctx), _E.migrating, expected=[_S.Running])


def _forward(ctx: MutableMapping[str, Any], recorded: list, happened: bool | None) -> bool:
    """
    Finish a migration forward once the guest has moved (see the module docstring).
    """
    names = [r["name"] for r in recorded]
    if MigrateOnHypervisorFlow.name in names:
        return True
    return names == [VmMigratingFlow.name, AllocateDestinationFlow.name] and happened is True


class MigrateVmMixin(VmServiceBase):
    """
    The VM service's live migration (see the module docstring).
    """

    @job_kinds
    def _migrate_kinds(self) -> Iterable[JobKind]:
        yield JobKind(MIGRATE_VM, (VmMigratingFlow(self), AllocateDestinationFlow(self),
                                   MigrateOnHypervisorFlow(self), ReturnSourceFlow(self),
                                   VmMigratedFlow(self)), forward=_forward)

    @handles(MigrateVmMsg)
    async def migrate_vm(self, msg: MigrateVmMsg) -> VmInstanceReply:
        """
        Live-migrate a Running VM (see the module docstring for the refusals).

        @return: a L{VmInstanceReply} with the VM's inventory (Running on the destination)
            and the job uuid; fails with C{VM.1008} wrapping the job's error (C{SYS.1006},
            C{location} the failing flow, its cause the flow's: the allocator's C{ALLOCATOR.1000}
            saying why no host fits, the agent's error text) after the rollback (the VM
            Running on its source, nothing held on the destination).
        """
        vm_uuid = validate.uuid(msg.vm_instance_uuid, "vmInstanceUuid")
        if msg.host_uuid is not None:
            validate.uuid(msg.host_uuid, "hostUuid")
        return await self.run_job(MIGRATE_VM, vm_uuid, lambda: self.migrate_body(msg),
                                  VM.MIGRATE_ERROR,
                                  reply=lambda job: self.vm_reply(vm_uuid, job))

    async def migrate_body(self, msg: MigrateVmMsg) -> dict[str, Any]:
        """
        Check a migration (the refusals of the module docstring) on the VM as it is now and
        return the job's C{apiMessage}: the message's fields and the C{plan}
        (C{sourceHostUuid}, C{hostUuid} asked for or None, C{cpuNum}, C{memorySize},
        C{zoneUuid}, C{clusterUuid}, C{lastHostUuid}, C{allocatorStrategy} and
        L{migration_plan}'s storages and networks).
        """
        vm_uuid = msg.vm_instance_uuid
        vm = await self.check(vm_uuid, states.Operation.migrate, "vmInstanceUuid")
        if vm["state"] != _S.Running:
            raise OperationError.of(
                VM.NOT_IN_CORRECT_STATE,
                f"the VM instance in state {vm['state']} cannot be live-migrated: only a"
                f" Running VM can", state=vm["state"], operation="migrate",
                allowedStates=[_S.Running])
        plan = await self.migration_plan(vm)
        if msg.host_uuid is not None:
            await self.check_destination(vm, msg.host_uuid, plan)
        plan.update(sourceHostUuid=vm["hostUuid"], hostUuid=msg.host_uuid,
                    lastHostUuid=vm.get("lastHostUuid"), clusterUuid=vm.get("clusterUuid"),
                    zoneUuid=vm.get("zoneUuid"), cpuNum=vm["cpuNum"],
                    memorySize=vm["memorySize"], allocatorStrategy=vm.get("allocatorStrategy"))
        body = message_body(msg)
        body["plan"] = plan
        return body

    # --- helpers ------------------------------------------------------------------------

    async def migration_plan(self, vm: dict[str, Any]) -> dict[str, Any]:
        """
        What a migration of C{vm} needs: C{primaryStorageUuids} (of all its volumes),
        C{rootPrimaryStorageUuid}, C{l3NetworkUuids} (of its NICs), C{l2NetworkUuids}.

        @raise OperationError: C{VM.1008} naming the volume and the storage when a volume
            is on C{LocalStorage}.
        """
        volumes = await _all(self.store, "volume", f"vmInstanceUuid={vm['uuid']}")
        storages: dict[str, dict] = {}
        root_ps = None
        for volume in volumes:
            ps_uuid = volume.get("primaryStorageUuid")
            if ps_uuid is None:
                continue
            if ps_uuid not in storages:
                storages[ps_uuid] = await self.store.get("primaryStorage", ps_uuid) or {}
            if storages[ps_uuid].get("type") == LOCAL_STORAGE:
                raise OperationError.of(
                    VM.MIGRATE_ERROR,
                    f"the {volume['type']} volume {volume['uuid']} of VM {vm['uuid']} is on"
                    f" LocalStorage primary storage {ps_uuid}: live migration needs shared"
                    " storage", uuid=vm["uuid"], volumeUuid=volume["uuid"],
                    primaryStorageUuid=ps_uuid)
            if volume["uuid"] == vm.get("rootVolumeUuid"):
                root_ps = ps_uuid
        nics = await _all(self.store, "vmNic", f"vmInstanceUuid={vm['uuid']}")
        l3s = list(dict.fromkeys(n["l3NetworkUuid"] for n in nics))
        l2s = []
        for l3 in l3s:
            row = await self.store.get("l3Network", l3)
            if row is not None:
                l2s.append(row["l2NetworkUuid"])
        return {"primaryStorageUuids": sorted(storages), "rootPrimaryStorageUuid": root_ps,
                "l3NetworkUuids": l3s, "l2NetworkUuids": list(dict.fromkeys(l2s))}

    async def unattached(self, host: dict[str, Any], plan: dict[str, Any]) -> list[str]:
        """
        The primary storages and L2 networks of C{plan} not attached to C{host}'s cluster,
        as C{"primaryStorage <uuid>"} / C{"l2Network <uuid>"}.
        """
        cluster = host["clusterUuid"]
        ps = {r["primaryStorageUuid"] for r in await _all(
            self.store, "primaryStorageClusterRef", f"clusterUuid={cluster}")}
        l2 = {r["l2NetworkUuid"] for r in await _all(
            self.store, "l2NetworkClusterRef", f"clusterUuid={cluster}")}
        return ([f"primaryStorage {u}" for u in plan["primaryStorageUuids"] if u not in ps]
                + [f"l2Network {u}" for u in plan["l2NetworkUuids"] if u not in l2])

    async def check_destination(self, vm: dict[str, Any], host_uuid: str,
                                plan: dict[str, Any]) -> dict[str, Any]:
        """
        The destination C{host_uuid} given to a migration of C{vm}, checked.

        @raise OperationError: C{HOST.1003} naming C{hostUuid}; C{VM.1008} when it is the
            source, not C{Connected}, not C{Enabled}, or its cluster lacks a primary storage
            or L2 network of C{plan}.
        """
        host = await self.must_get("host", host_uuid, HOST.NOT_FOUND, field="hostUuid")

        def refuse(why: str, **opaque: Any) -> OperationError:
            return OperationError.of(
                VM.MIGRATE_ERROR, f"cannot migrate VM {vm['uuid']} to host {host_uuid}: {why}",
                uuid=vm["uuid"], hostUuid=host_uuid, field="hostUuid", **opaque)

        if host_uuid == vm.get("hostUuid"):
            raise refuse("the VM already runs there")
        if host["status"] != "Connected":
            raise refuse(f"the host is {host['status']}, not Connected", status=host["status"])
        if host["state"] != "Enabled":
            raise refuse(f"the host is {host['state']}, not Enabled", state=host["state"])
        missing = await self.unattached(host, plan)
        if missing:
            raise refuse(f"its cluster {host['clusterUuid']} is not attached to "
                         f"{', '.join(missing)}", missing=missing)
        return host

    async def agent_url(self, host_uuid: str) -> str:
        """
        The agent base URL of host C{host_uuid} (what C{MigrateVmCmd} names).
        """
        host = await self.must_get("host", host_uuid, HOST.NOT_FOUND, field="hostUuid")
        return agent_base_url(host["managementIp"], HOST_AGENT_PORT)

    async def vm_state_on(self, host_uuid: str, vm_uuid: str) -> str | None:
        """
        The VM's state as host C{host_uuid}'s agent reports it (C{/vm/checkstate}: C{Running},
        C{Stopped} for a VM it does not have, ...), or None when the host cannot be asked.
        """
        try:
            rsp = await self.host_call(host_uuid, p.CheckVmStateCmd(vm_uuids=[vm_uuid]),
                                       timeout=self.config.probe_timeout)
        except OperationError as e:
            log.warn("vm {vm}: cannot ask host {host} for its state: {error}", vm=vm_uuid,
                     host=host_uuid, error=str(e.error))
            return None
        except Exception as e:  # a bug must not turn a rollback into a guess
            log.error("vm {vm}: asking host {host} failed: {error}", vm=vm_uuid,
                      host=host_uuid, error=str(from_failure(e)))
            return None
        return rsp.states.get(vm_uuid)
