# -*- test-case-name: tests.test_agent_app -*-
"""
The KVM agent plugin: host capacity and facts, and the VM commands, on the host's
L{IHypervisor}.
"""

from __future__ import annotations

from typing import Any

import attrs
from zope.interface import implementer

from agent import protocol as p
from agent.app import HostState, IAgentPlugin
from agent.hypervisor.interfaces import HostCapacity, HostFacts, IHypervisor, VmSpec

__all__ = ["KvmPlugin"]


def _hv(host: HostState) -> Any:
    return IHypervisor(host.backends.hypervisor)


@implementer(IAgentPlugin)
@attrs.frozen
class KvmPlugin:
    """
    C{/host/capacity}, C{/host/fact} and C{/vm/*}.
    """

    name = "kvm"

    def handlers(self) -> dict[str, Any]:
        return {
            "/host/capacity": self.capacity,
            "/host/fact": self.fact,
            "/vm/start": self.start,
            "/vm/stop": self.stop,
            "/vm/reboot": self.reboot,
            "/vm/destroy": self.destroy,
            "/vm/migrate": self.migrate,
            "/vm/attachnic": self.attach_nic,
            "/vm/detachnic": self.detach_nic,
            "/vm/attachdatavolume": self.attach_volume,
            "/vm/detachdatavolume": self.detach_volume,
            "/vm/vmsync": self.vmsync,
            "/vm/checkstate": self.checkstate,
            "/vm/getvncport": self.vncport,
        }

    def capacity(self, host: HostState, cmd: p.HostCapacityCmd) -> Any:
        def rsp(c: HostCapacity) -> p.HostCapacityRsp:
            return p.HostCapacityRsp(
                cpu_num=c.cpu_num,
                cpu_speed=c.cpu_speed,
                total_memory=c.total_memory,
                used_cpu=c.used_cpu,
                used_memory=c.used_memory,
            )

        return _hv(host).capacity().addCallback(rsp)

    def fact(self, host: HostState, cmd: p.HostFactCmd) -> Any:
        def rsp(f: HostFacts) -> p.HostFactRsp:
            return p.HostFactRsp(**attrs.asdict(f))

        return _hv(host).facts().addCallback(rsp)

    def start(self, host: HostState, cmd: p.StartVmCmd) -> Any:
        spec = VmSpec(
            uuid=cmd.vm_instance_uuid,
            name=cmd.vm_name,
            cpu_num=cmd.cpu_num,
            memory_size=cmd.memory_size,
            nics=tuple(cmd.nics),
            root_volume_install_path=cmd.root_volume_install_path,
            data_volumes=tuple(cmd.data_volumes),
        )
        return _hv(host).start_vm(spec).addCallback(lambda port: p.StartVmRsp(vnc_port=port))

    def stop(self, host: HostState, cmd: p.StopVmCmd) -> Any:
        return (
            _hv(host)
            .stop_vm(cmd.uuid, cmd.type in ("cold", "force"))
            .addCallback(lambda _: p.StopVmRsp())
        )

    def reboot(self, host: HostState, cmd: p.RebootVmCmd) -> Any:
        return _hv(host).reboot_vm(cmd.uuid).addCallback(lambda _: p.RebootVmRsp())

    def destroy(self, host: HostState, cmd: p.DestroyVmCmd) -> Any:
        return _hv(host).destroy_vm(cmd.uuid).addCallback(lambda _: p.DestroyVmRsp())

    def migrate(self, host: HostState, cmd: p.MigrateVmCmd) -> Any:
        return (
            _hv(host)
            .migrate_vm(cmd.vm_uuid, cmd.dest_host_address)
            .addCallback(lambda _: p.MigrateVmRsp())
        )

    def attach_nic(self, host: HostState, cmd: p.AttachNicCmd) -> Any:
        return _hv(host).attach_nic(cmd.vm_uuid, cmd.nic).addCallback(lambda _: p.AttachNicRsp())

    def detach_nic(self, host: HostState, cmd: p.DetachNicCmd) -> Any:
        return _hv(host).detach_nic(cmd.vm_uuid, cmd.nic).addCallback(lambda _: p.DetachNicRsp())

    def attach_volume(self, host: HostState, cmd: p.AttachDataVolumeCmd) -> Any:
        return (
            _hv(host)
            .attach_volume(cmd.vm_instance_uuid, cmd.volume)
            .addCallback(lambda _: p.AttachDataVolumeRsp())
        )

    def detach_volume(self, host: HostState, cmd: p.DetachDataVolumeCmd) -> Any:
        return (
            _hv(host)
            .detach_volume(cmd.vm_instance_uuid, cmd.volume)
            .addCallback(lambda _: p.DetachDataVolumeRsp())
        )

    def vmsync(self, host: HostState, cmd: p.VmSyncCmd) -> Any:
        return _hv(host).vm_states().addCallback(lambda states: p.VmSyncRsp(states=states))

    def checkstate(self, host: HostState, cmd: p.CheckVmStateCmd) -> Any:
        def rsp(states: dict[str, str]) -> p.CheckVmStateRsp:
            return p.CheckVmStateRsp(
                states={u: states.get(u, p.VmState.STOPPED) for u in cmd.vm_uuids}
            )

        return _hv(host).vm_states().addCallback(rsp)

    def vncport(self, host: HostState, cmd: p.GetVncPortCmd) -> Any:
        return _hv(host).vnc_port(cmd.vm_uuid).addCallback(lambda port: p.GetVncPortRsp(port=port))
